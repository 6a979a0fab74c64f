//! The multi-tenant REST API of `memento serve` over a [`Service`]: JSON
//! under `/v1` shaped like Flink's, `/metrics`, `/healthz`, the OpenAPI
//! document and the dashboard.
//!
//! Every `/v1` request but `GET /v1/openapi.json` needs `Authorization:
//! Bearer <token>`. A tenant's token acts in that tenant only: another
//! tenant's job or snapshot answers 404 as if it did not exist. The admin
//! token lists every tenant and names one with `?tenant=NAME` to act on its
//! jobs and snapshots. Errors are `{"error": code, "message": …}`.
//!
//! Handlers that touch the disk (the store, compiling plugins) run on
//! tokio's blocking pool so a slow submission never stalls other requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;

use super::{ApiError, ApiStartError, TriggerResponse};
use memento::coordinator::RequestStatus;
use memento::service::{Caller, Service, ServiceError, Submission};
use memento::spec::SnapshotFormat;

/// The OpenAPI 3 document of this API (committed as `openapi.json`).
pub const OPENAPI: &str = include_str!("openapi.json");
/// The dashboard: one self-contained HTML page.
pub const DASHBOARD: &str = include_str!("dashboard.html");

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let message = e.to_string();
        match e {
            ServiceError::Unauthorized => ApiError(StatusCode::UNAUTHORIZED, "unauthorized", message),
            ServiceError::NotFound(_) => ApiError(StatusCode::NOT_FOUND, "not_found", message),
            ServiceError::BadRequest { code, .. } => ApiError(StatusCode::BAD_REQUEST, code, message),
            ServiceError::Conflict(_) => ApiError(StatusCode::CONFLICT, "conflict", message),
            ServiceError::TooManyJobs(_) => ApiError(StatusCode::TOO_MANY_REQUESTS, "too_many_jobs", message),
            ServiceError::TooLarge { .. } => ApiError(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message),
            ServiceError::Internal(_) | ServiceError::Config(_) => {
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
        }
    }
}

fn bad_request(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "bad_request", message)
}

type Shared = State<Service>;
type ApiResult<T> = Result<T, ApiError>;

#[derive(Default, Deserialize)]
struct TenantQuery {
    tenant: Option<String>,
}

fn caller(s: &Service, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    Ok(s.authenticate(token)?)
}

fn query(q: Result<Query<TenantQuery>, QueryRejection>) -> ApiResult<TenantQuery> {
    q.map(|Query(q)| q)
        .map_err(|e| bad_request(format!("bad query string: {}", e.body_text())))
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> ApiResult<T> {
    p.map(|Path(p)| p)
        .map_err(|e| bad_request(format!("bad path: {}", e.body_text())))
}

/// Authenticate, then resolve the one tenant the request acts in.
fn tenant(
    s: &Service,
    headers: &HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<String> {
    let c = caller(s, headers)?;
    let q = query(q)?;
    Ok(s.tenant_of(&c, q.tenant.as_deref())?)
}

/// Run blocking work (store, compilation) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("worker failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn dashboard() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], DASHBOARD)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn metrics(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let c = caller(&s, &headers)?;
    let scope = s.scope(&c, query(q)?.tenant.as_deref())?;
    let text = blocking(move || Ok(s.metrics(&scope))).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn list_jobs(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let c = caller(&s, &headers)?;
    let scope = s.scope(&c, query(q)?.tenant.as_deref())?;
    let jobs: Vec<_> = s.jobs(&scope).iter().map(|j| j.view()).collect();
    Ok(Json(serde_json::json!({ "jobs": jobs })))
}

/// `POST /v1/jobs` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    job: String,
    #[serde(default)]
    plugins: BTreeMap<String, String>,
    #[serde(default)]
    from: Option<String>,
}

async fn submit(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    body: Body,
) -> ApiResult<(StatusCode, Json<memento::service::JobView>)> {
    let tenant = tenant(&s, &headers, q)?;
    let limit = s.config().max_upload;
    // Refuse an announced oversize body before reading any of it.
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(size) = announced
        && size > limit
    {
        return Err(ServiceError::TooLarge { size, limit }.into());
    }
    let bytes = axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .await
        .map_err(|_| ServiceError::TooLarge {
            size: announced.unwrap_or(limit + 1),
            limit,
        })?;
    let body: SubmitBody =
        serde_json::from_slice(&bytes).map_err(|e| bad_request(format!("invalid JSON body: {e}")))?;
    let mut plugins = BTreeMap::new();
    for (name, b64) in body.plugins {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| bad_request(format!("plugins[{name:?}]: invalid base64: {e}")))?;
        plugins.insert(name, bytes);
    }
    let submission = Submission {
        job: body.job,
        plugins,
        from: body.from,
    };
    let job = blocking(move || s.submit(&tenant, submission)).await?;
    Ok((StatusCode::CREATED, Json(job.view())))
}

async fn get_job(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<memento::service::JobView>> {
    let t = tenant(&s, &headers, q)?;
    Ok(Json(s.job(&t, &path(p)?)?.view()))
}

async fn cancel(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let t = tenant(&s, &headers, q)?;
    let job = s.job(&t, &path(p)?)?;
    job.cancel()?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "job": job.name(), "requested": "cancel" })),
    ))
}

async fn stop(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<(StatusCode, Json<TriggerResponse>)> {
    let t = tenant(&s, &headers, q)?;
    let request_id = s.job(&t, &path(p)?)?.stop()?;
    Ok((StatusCode::ACCEPTED, Json(TriggerResponse { request_id })))
}

async fn checkpoints(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<memento::service::CheckpointsView>> {
    let t = tenant(&s, &headers, q)?;
    Ok(Json(s.job(&t, &path(p)?)?.checkpoints()))
}

async fn checkpoints_config(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let t = tenant(&s, &headers, q)?;
    let job = s.job(&t, &path(p)?)?;
    let spec = job.spec();
    Ok(Json(serde_json::json!({
        "checkpoints": spec.checkpoints,
        "savepoints": spec.savepoints,
        "restart": spec.restart,
        "limits": spec.limits,
    })))
}

async fn checkpoint_detail(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Json<memento::coordinator::SnapshotRecord>> {
    let t = tenant(&s, &headers, q)?;
    let (name, n) = path(p)?;
    let job = s.job(&t, &name)?;
    let n: u64 = n
        .parse()
        .map_err(|_| bad_request(format!("malformed snapshot number {n:?}")))?;
    Ok(Json(job.checkpoint(n)?))
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerBody {
    format: Option<SnapshotFormat>,
}

fn trigger_body(body: &[u8]) -> ApiResult<TriggerBody> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(TriggerBody::default());
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

async fn trigger_checkpoint(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<(StatusCode, Json<TriggerResponse>)> {
    let t = tenant(&s, &headers, q)?;
    let request_id = s.job(&t, &path(p)?)?.trigger_checkpoint()?;
    Ok((StatusCode::ACCEPTED, Json(TriggerResponse { request_id })))
}

async fn trigger_savepoint(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    p: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<TriggerResponse>)> {
    let t = tenant(&s, &headers, q)?;
    let job = s.job(&t, &path(p)?)?;
    let body = trigger_body(&body)?;
    let request_id = job.trigger_savepoint(body.format)?;
    Ok((StatusCode::ACCEPTED, Json(TriggerResponse { request_id })))
}

async fn request_status(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Json<RequestStatus>> {
    let t = tenant(&s, &headers, q)?;
    let (name, request) = path(p)?;
    Ok(Json(s.job(&t, &name)?.request(&request)?))
}

async fn list_snapshots(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let c = caller(&s, &headers)?;
    let scope = s.scope(&c, query(q)?.tenant.as_deref())?;
    let list = blocking(move || s.snapshots(&scope)).await?;
    Ok(Json(serde_json::json!({ "snapshots": list })))
}

async fn dispose(
    State(s): Shared,
    headers: HeaderMap,
    q: Result<Query<TenantQuery>, QueryRejection>,
    p: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let t = tenant(&s, &headers, q)?;
    let id = path(p)?;
    let id = blocking(move || s.dispose(&t, &id)).await?;
    Ok(Json(serde_json::json!({ "disposed": id })))
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint (see /v1/openapi.json)".into(),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint (see /v1/openapi.json)".into(),
    )
}

/// Every route of the API: method, path template and handler. The router
/// is built from this table and [`routes`] lists it, so the OpenAPI
/// document can be checked against what is really served (a test does,
/// both ways).
fn route_table() -> Vec<(&'static str, &'static str, MethodRouter<Service>)> {
    vec![
        ("get", "/", get(dashboard)),
        ("get", "/healthz", get(healthz)),
        ("get", "/metrics", get(metrics)),
        ("get", "/v1/openapi.json", get(openapi)),
        ("get", "/v1/jobs", get(list_jobs)),
        // The upload limit is enforced by `submit` itself (413 with the
        // limit in JSON), so axum's default 2 MB cap is lifted there.
        (
            "post",
            "/v1/jobs",
            post(submit).layer(DefaultBodyLimit::disable()),
        ),
        ("get", "/v1/jobs/{job}", get(get_job)),
        ("post", "/v1/jobs/{job}/cancel", post(cancel)),
        ("post", "/v1/jobs/{job}/stop", post(stop)),
        ("get", "/v1/jobs/{job}/checkpoints", get(checkpoints)),
        ("post", "/v1/jobs/{job}/checkpoints", post(trigger_checkpoint)),
        (
            "get",
            "/v1/jobs/{job}/checkpoints/config",
            get(checkpoints_config),
        ),
        (
            "get",
            "/v1/jobs/{job}/checkpoints/{number}",
            get(checkpoint_detail),
        ),
        (
            "get",
            "/v1/jobs/{job}/checkpoints/requests/{request}",
            get(request_status),
        ),
        ("post", "/v1/jobs/{job}/savepoints", post(trigger_savepoint)),
        ("get", "/v1/jobs/{job}/savepoints/{request}", get(request_status)),
        ("get", "/v1/snapshots", get(list_snapshots)),
        ("delete", "/v1/snapshots/{id}", delete(dispose)),
    ]
}

/// Every route as (lowercase method, path template), in table order.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    route_table().into_iter().map(|(m, p, _)| (m, p)).collect()
}

/// The router of the multi-tenant API over `service`.
pub fn router(service: Service) -> Router {
    // Routing the same path twice with different methods merges them.
    route_table()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| r.route(path, handler))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(service)
}

/// A running `memento serve` API.
pub struct ServiceServer {
    addr: SocketAddr,
    service: Service,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ServiceServer {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The service it serves.
    pub fn service(&self) -> &Service {
        &self.service
    }
}

impl Drop for ServiceServer {
    fn drop(&mut self) {
        // Dropping a runtime waits for blocking tasks; a compile in flight
        // need not hold up shutdown.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Serve `service`'s API on the address of its config in background threads
/// until the returned server is dropped.
///
/// # Errors
/// [`ApiStartError::Bind`] when the address cannot be bound.
pub fn serve(service: Service) -> Result<ServiceServer, ApiStartError> {
    let addr = service.config().listen;
    let (runtime, listener, local) = super::bind(&addr.to_string(), 2)?;
    let app = router(service.clone());
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(ServiceServer {
        addr: local,
        service,
        runtime: Some(runtime),
    })
}
