//! The REST API, JSON under `/v1` shaped like Flink's, served two ways:
//!
//! - [`multi`]: `memento serve`, the multi-tenant host over a
//!   [`Service`](memento::service::Service): every route, `/metrics`, the
//!   OpenAPI document and the dashboard;
//! - [`single`]: `memento run --listen`, the API of the one job the command
//!   runs: the job routes only.
//!
//! Both serve the job routes with the same handlers ([`jobs`]) over a
//! [`Backend`](jobs::Backend) — the service, or the one job — with one
//! bearer-token extractor and one error type, [`ApiError`], answered as
//! `{"error": code, "message": …}`. The bodies are the types of [`views`].

mod forward;
pub mod jobs;
mod metrics;
pub mod multi;
pub mod single;
pub mod views;

use std::net::SocketAddr;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use memento::service::ServiceError;
pub use single::{JobServer, serve_job};
use views::ErrorBody;

/// A tokio runtime with `workers` threads and a listener bound to `addr`.
pub(crate) fn bind(
    addr: &str,
    workers: usize,
) -> Result<(tokio::runtime::Runtime, tokio::net::TcpListener, SocketAddr), ApiStartError> {
    let bind_err = |reason: String| ApiStartError::Bind {
        addr: addr.to_string(),
        reason,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("memento-api")
        .build()
        .map_err(|e| bind_err(e.to_string()))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| bind_err(e.to_string()))?;
    let local = listener.local_addr().map_err(|e| bind_err(e.to_string()))?;
    Ok((runtime, listener, local))
}

/// An API error: a status code, a short code and a message, answered as
/// `{"error": code, "message": …}`.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The short code of `error`.
    pub code: &'static str,
    /// The one-line message.
    pub message: String,
    /// The API of the pool host that can serve the request instead
    /// ([`forward`]).
    pub elsewhere: Option<String>,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            elsewhere: None,
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message.into())
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message.into())
    }

    /// 405 `method_not_allowed`.
    pub fn method_not_allowed(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message.into(),
        )
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_string(),
            // A message may quote an input; an answer never echoes one whole.
            message: memento::spec::excerpt(&self.message, 2000),
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(url) = self.elsewhere {
            response.extensions_mut().insert(forward::Elsewhere(url));
        }
        response
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let message = e.to_string();
        match e {
            ServiceError::Unauthorized => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message),
            ServiceError::NotFound(_) => ApiError::not_found(message),
            ServiceError::BadRequest { code, .. } => ApiError::new(StatusCode::BAD_REQUEST, code, message),
            ServiceError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            ServiceError::Elsewhere { url, .. } => ApiError {
                elsewhere: Some(url),
                ..ApiError::new(StatusCode::CONFLICT, "runs_elsewhere", message)
            },
            ServiceError::TooManyJobs(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_jobs", message)
            }
            ServiceError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
            }
            ServiceError::Internal(_) | ServiceError::Config(_) => ApiError::internal(message),
        }
    }
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    /// A non-loopback address without a token.
    #[error("--listen {0} is not a loopback address: set a bearer token with --token")]
    TokenRequired(SocketAddr),
    /// Binding failed.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
}
