//! The REST API over a running job (`memento run --listen ADDR`), shaped like
//! Flink's: trigger checkpoints and savepoints, poll their status, stop or
//! cancel. JSON under `/v1`; errors are `{"error": code, "message": …}`.
//!
//! It calls only the library's public [`JobControl`] and [`StatusHandle`]; it never
//! touches tasks.
//! The multi-tenant API of `memento serve` is in [`service`]; both answer
//! errors in the same shape ([`ApiError`]).

pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use memento::coordinator::{JobControl, RequestLog, RequestStatus, StatusHandle, TriggerResult};
use memento::service::CheckpointsView;
use memento::spec::SnapshotFormat;

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

/// The answer to a trigger: the id to poll.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TriggerResponse {
    /// Request id for `GET /v1/jobs/{job}/savepoints/{request}`.
    pub request_id: String,
}

#[derive(Default, Deserialize)]
struct TriggerBody {
    format: Option<SnapshotFormat>,
}

struct ApiState {
    job: String,
    control: JobControl,
    status: StatusHandle,
    token: Option<String>,
    requests: Arc<RequestLog>,
}

/// An API error: a status code, a short code and a message, answered as
/// `{"error": code, "message": …}`.
pub(crate) struct ApiError(pub StatusCode, pub &'static str, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.1, "message": self.2 });
        (self.0, Json(body)).into_response()
    }
}

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "not_found", what)
}

impl ApiState {
    fn check(&self, headers: &HeaderMap, job: &str) -> Result<(), ApiError> {
        if let Some(token) = &self.token {
            let given = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if given != Some(token.as_str()) {
                return Err(ApiError(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing or wrong bearer token".into(),
                ));
            }
        }
        if job != self.job {
            return Err(not_found(format!("no job `{job}`")));
        }
        Ok(())
    }

    /// Record a trigger and follow its outcome.
    fn track(&self, rx: crossbeam_channel::Receiver<TriggerResult>) -> TriggerResponse {
        TriggerResponse {
            request_id: self.requests.track(rx).to_string(),
        }
    }
}

type Shared = State<Arc<ApiState>>;

async fn healthz() -> &'static str {
    "ok\n"
}

async fn get_job(
    State(s): Shared,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<Json<memento::coordinator::JobStatus>, ApiError> {
    s.check(&headers, &job)?;
    Ok(Json(s.status.get()))
}

async fn list_jobs(State(s): Shared, headers: HeaderMap) -> Result<Json<serde_json::Value>, ApiError> {
    s.check(&headers, &s.job.clone())?;
    Ok(Json(serde_json::json!({ "jobs": [s.status.get()] })))
}

async fn checkpoints(
    State(s): Shared,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<Json<CheckpointsView>, ApiError> {
    s.check(&headers, &job)?;
    Ok(Json(CheckpointsView::of(&s.status.get())))
}

/// What `memento run --listen` does not serve (the multi-tenant API of
/// `memento serve` does): a JSON error, like every other answer.
async fn not_served() -> ApiError {
    not_found(
        "no such endpoint on `memento run --listen`: it serves the job, its checkpoints, triggers, their status, \
         stop and cancel (`memento serve` serves the whole API)"
            .into(),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint".into(),
    )
}

fn parse_body(body: &[u8]) -> Result<TriggerBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(TriggerBody::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("invalid JSON body: {e}"),
        )
    })
}

async fn trigger_savepoint(
    State(s): Shared,
    headers: HeaderMap,
    Path(job): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<TriggerResponse>), ApiError> {
    s.check(&headers, &job)?;
    let body = parse_body(&body)?;
    let rx = s.control.trigger_savepoint(body.format);
    Ok((StatusCode::ACCEPTED, Json(s.track(rx))))
}

async fn trigger_checkpoint(
    State(s): Shared,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<(StatusCode, Json<TriggerResponse>), ApiError> {
    s.check(&headers, &job)?;
    let rx = s.control.trigger_checkpoint();
    Ok((StatusCode::ACCEPTED, Json(s.track(rx))))
}

async fn stop(
    State(s): Shared,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<(StatusCode, Json<TriggerResponse>), ApiError> {
    s.check(&headers, &job)?;
    let rx = s.control.stop_with_savepoint();
    Ok((StatusCode::ACCEPTED, Json(s.track(rx))))
}

async fn cancel(
    State(s): Shared,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.check(&headers, &job)?;
    s.control.cancel();
    Ok(StatusCode::ACCEPTED)
}

async fn request_status(
    State(s): Shared,
    headers: HeaderMap,
    Path((job, request)): Path<(String, String)>,
) -> Result<Json<RequestStatus>, ApiError> {
    s.check(&headers, &job)?;
    let id: u64 = request.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("malformed request id {request:?}"),
        )
    })?;
    s.requests
        .get(id)
        .map(Json)
        .ok_or_else(|| not_found(format!("no request {id}")))
}

/// A server answering for one running job.
pub struct JobServer {
    addr: SocketAddr,
    requests: Arc<RequestLog>,
    _runtime: tokio::runtime::Runtime,
}

impl JobServer {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// After the job ended: keep answering, for at most `max`, until every
    /// trigger's outcome has been read -- a client that asked to stop the
    /// job polls for the final savepoint's id after the job is gone.
    pub fn linger(&self, max: std::time::Duration) {
        let deadline = std::time::Instant::now() + max;
        while self.requests.unread() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
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

/// Serve the API for `job` on `addr` in background threads until the
/// returned server is dropped. A bearer token is required on a
/// non-loopback address.
///
/// # Errors
/// [`ApiStartError`] when the address cannot be bound or needs a token.
pub fn serve_job(
    addr: &str,
    job: &str,
    control: JobControl,
    status: StatusHandle,
    token: Option<String>,
) -> Result<JobServer, ApiStartError> {
    let (runtime, listener, local) = bind(addr, 1)?;
    if !local.ip().is_loopback() && token.is_none() {
        return Err(ApiStartError::TokenRequired(local));
    }
    let state = Arc::new(ApiState {
        job: job.to_string(),
        control,
        status,
        token,
        requests: Arc::new(RequestLog::default()),
    });
    let requests = state.requests.clone();
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{job}", get(get_job))
        .route(
            "/v1/jobs/{job}/checkpoints",
            get(checkpoints).post(trigger_checkpoint),
        )
        .route("/v1/jobs/{job}/savepoints", post(trigger_savepoint))
        .route("/v1/jobs/{job}/savepoints/{request}", get(request_status))
        .route(
            "/v1/jobs/{job}/checkpoints/requests/{request}",
            get(request_status),
        )
        .route("/v1/jobs/{job}/stop", post(stop))
        .route("/v1/jobs/{job}/cancel", post(cancel))
        .fallback(not_served)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(JobServer {
        addr: local,
        requests,
        _runtime: runtime,
    })
}
