//! Forwarding in a pool: a request that acts on a job another host runs
//! (stop, savepoint, rescale, its checkpoints…) is sent on to that host,
//! and its answer is the answer. The host that runs a job is the only one
//! that can act on it; forwarding lets a client (or a load balancer) talk
//! to any host of the pool.
//!
//! A handler that finds the job elsewhere answers 409 `runs_elsewhere`
//! with the other host's URL in the response's extensions ([`Elsewhere`]);
//! this layer then replays the request there once, with the caller's own
//! credentials and a [`FORWARDED`] header. A forwarded request is never
//! forwarded again, so two hosts that disagree about a job cannot bounce
//! it between them: the second one's 409 is the answer.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// Set on a request one host sends to another.
pub const FORWARDED: HeaderName = HeaderName::from_static("x-memento-forwarded");

/// The API URL of the pool host that runs the job a request acts on.
#[derive(Clone, Debug)]
pub struct Elsewhere(pub String);

/// The largest request body forwarded: job actions carry a few bytes of
/// JSON (submissions, the large bodies, are not job actions).
const MAX_BODY: usize = 64 * 1024;
/// The largest answer passed back (a job's checkpoint history is the
/// longest).
const MAX_ANSWER: u64 = 16 << 20;
/// How long the other host may take: a rescale waits for a savepoint and
/// a restart.
const TIMEOUT: Duration = Duration::from_secs(300);

/// Whether `path` acts on one job: `/v1/jobs/{job}/…`. `GET
/// /v1/jobs/{job}` is answered by any host from the store and never needs
/// this; submissions (`/v1/jobs`) are not forwarded.
fn acts_on_a_job(path: &str) -> bool {
    path.strip_prefix("/v1/jobs/")
        .is_some_and(|rest| rest.split('/').filter(|s| !s.is_empty()).count() >= 2)
}

/// The middleware: serve here, and forward what this host finds runs on
/// another.
pub async fn forward(request: Request, next: Next) -> Response {
    if request.headers().contains_key(&FORWARDED) || !acts_on_a_job(request.uri().path()) {
        return next.run(request).await;
    }
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| request.uri().path().to_string(), |p| p.as_str().to_string());
    let headers = request.headers().clone();
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body is over the limit of {MAX_BODY} bytes for a job action"),
        )
        .into_response();
    };
    let here = next
        .run(Request::from_parts(parts, Body::from(body.clone())))
        .await;
    let Some(Elsewhere(base)) = here.extensions().get::<Elsewhere>().cloned() else {
        return here;
    };
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let sent = tokio::task::spawn_blocking(move || send(&method, &url, &headers, body)).await;
    match sent {
        Ok(Ok(answer)) => answer,
        Ok(Err(why)) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "host_unreachable",
            format!(
                "the job runs on {base}, which did not answer ({why}); if that host is down, \
                 the pool takes its jobs over once their leases expire"
            ),
        )
        .into_response(),
        Err(e) => ApiError::internal(format!("worker failed: {e}")).into_response(),
    }
}

/// The headers a forwarded request keeps: who asks and what they send.
const KEPT: [HeaderName; 3] = [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT];

/// Send the request to `url` and turn the answer into a response.
fn send(method: &Method, url: &str, headers: &HeaderMap, body: Bytes) -> Result<Response, String> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .new_agent();
    let mut request = axum::http::Request::builder()
        .method(method.clone())
        .uri(url)
        .header(FORWARDED, HeaderValue::from_static("1"));
    for name in KEPT {
        for value in headers.get_all(&name) {
            request = request.header(&name, value);
        }
    }
    let request = request.body(body.to_vec()).map_err(|e| e.to_string())?;
    let mut answer = agent.run(request).map_err(|e| e.to_string())?;
    let status = answer.status();
    let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
    let bytes = answer
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    let mut response = (status, bytes).into_response();
    if let Some(v) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_actions_on_one_job_are_forwarded() {
        for yes in [
            "/v1/jobs/j/stop",
            "/v1/jobs/j/savepoints",
            "/v1/jobs/j/savepoints/r1",
            "/v1/jobs/j/rescale",
        ] {
            assert!(acts_on_a_job(yes), "{yes}");
        }
        for no in [
            "/v1/jobs",
            "/v1/jobs/",
            "/v1/jobs/j",
            "/v1/jobs/j/",
            "/v1/snapshots",
            "/",
        ] {
            assert!(!acts_on_a_job(no), "{no}");
        }
    }
}
