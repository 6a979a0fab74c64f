//! The multi-tenant REST API of `memento serve` over a [`Service`]: the job
//! routes of [`jobs`](super::jobs), submission, stored snapshots,
//! `/metrics`, `/healthz`, the OpenAPI document and the dashboard.
//!
//! Every `/v1` request but `GET /v1/openapi.json` needs `Authorization:
//! Bearer <token>`, and so does `/metrics`. A tenant's token acts in that
//! tenant only: another tenant's job or snapshot answers 404 as if it did
//! not exist. The admin token lists every tenant and names one with
//! `?tenant=NAME` to act on its jobs and snapshots.
//!
//! Handlers that touch the disk (the store, compiling plugins) run on
//! tokio's blocking pool so a slow submission never stalls other requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;

use super::jobs::{self, Backend, InScope, InTenant, Route};
use super::views::{DisposeResponse, JobView, SnapshotView, SnapshotsView};
use super::{ApiError, ApiStartError};
use memento::service::{Caller, RemoteJob, Scope, Service, ServiceError, ServiceJob, Submission};

/// The OpenAPI 3 document of this API (committed as `openapi.json`).
pub const OPENAPI: &str = include_str!("openapi.json");
/// The dashboard: one self-contained HTML page.
pub const DASHBOARD: &str = include_str!("dashboard.html");

impl Backend for Service {
    fn authenticate(&self, token: Option<&str>) -> Result<Caller, ServiceError> {
        Service::authenticate(self, token)
    }

    fn has_tenant(&self, tenant: &str) -> bool {
        self.config().tenants.iter().any(|t| t.name == tenant)
    }

    fn jobs(&self, scope: &Scope) -> Vec<Arc<ServiceJob>> {
        Service::jobs(self, scope)
    }

    fn job(&self, tenant: &str, name: &str) -> Result<Arc<ServiceJob>, ServiceError> {
        Service::job(self, tenant, name)
    }

    fn elsewhere(&self, tenant: &str, name: &str) -> Result<Option<RemoteJob>, ServiceError> {
        Service::elsewhere(self, tenant, name)
    }

    fn elsewhere_all(&self, scope: &Scope) -> Result<Vec<RemoteJob>, ServiceError> {
        Service::elsewhere_all(self, scope)
    }

    fn cancel_unplaced(&self, tenant: &str, name: &str) -> Result<(), ServiceError> {
        Service::cancel_unplaced(self, tenant, name)
    }
}

type Shared = State<Arc<Service>>;

/// Run blocking work (store, compilation) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker failed: {e}")))?
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

async fn metrics(State(s): Shared, InScope(scope): InScope) -> Result<Response, ApiError> {
    let text = blocking(move || Ok(super::metrics::render(&s, &scope))).await?;
    let text = text.map_err(|e| ApiError::internal(format!("encode metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
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

/// The `POST /v1/jobs` body as the service takes it: JSON with the job
/// file's text, the plugins in base64 and where to start. Checking what it
/// holds (the job file, the components, the tenant's caps) is
/// [`Service::submit`]'s.
///
/// # Errors
/// 400 naming what is malformed: the JSON, an unknown field, a plugin's
/// base64.
pub fn submission_body(bytes: &[u8]) -> Result<Submission, ApiError> {
    let body: SubmitBody = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let mut plugins = BTreeMap::new();
    for (name, b64) in body.plugins {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| ApiError::bad_request(format!("plugins[{name:?}]: invalid base64: {e}")))?;
        plugins.insert(name, bytes);
    }
    Ok(Submission {
        job: body.job,
        plugins,
        from: body.from,
    })
}

async fn submit(
    State(s): Shared,
    InTenant(tenant): InTenant,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
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
    let submission = submission_body(&bytes)?;
    let job = blocking(move || s.submit(&tenant, submission)).await?;
    Ok((StatusCode::CREATED, Json(JobView::of(&job))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RescaleBody {
    parallelism: u32,
}

/// The answer to a rescale: the savepoint it went through and the job as
/// it runs now.
#[derive(serde::Serialize)]
struct RescaleResponse {
    savepoint: String,
    job: JobView,
}

/// `POST /v1/jobs/{job}/rescale`: stop with a savepoint and start again at
/// another parallelism, in one call (it returns once the job runs again).
async fn rescale(
    State(s): Shared,
    InTenant(tenant): InTenant,
    p: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
    body: axum::body::Bytes,
) -> Result<Json<RescaleResponse>, ApiError> {
    let axum::extract::Path(name) =
        p.map_err(|e| ApiError::bad_request(format!("bad path: {}", e.body_text())))?;
    // The job first (404 before 400, 409 when another host of the pool
    // runs it), as on every job route.
    let (s2, t2, n2) = (s.clone(), tenant.clone(), name.clone());
    blocking(move || s2.job_here(&t2, &n2).map(|_| ())).await?;
    let body: RescaleBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid JSON body (expected {{\"parallelism\": N}}): {e}"
        ))
    })?;
    let done = blocking(move || s.rescale(&tenant, &name, body.parallelism)).await?;
    Ok(Json(RescaleResponse {
        savepoint: done.savepoint.to_string(),
        job: JobView::of(&done.job),
    }))
}

async fn list_snapshots(State(s): Shared, InScope(scope): InScope) -> Result<Json<SnapshotsView>, ApiError> {
    let list = blocking(move || s.snapshots(&scope)).await?;
    let snapshots = list.iter().map(|(t, m)| SnapshotView::of(t, m)).collect();
    Ok(Json(SnapshotsView { snapshots }))
}

async fn dispose(
    State(s): Shared,
    InTenant(tenant): InTenant,
    p: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<DisposeResponse>, ApiError> {
    let axum::extract::Path(id) =
        p.map_err(|e| ApiError::bad_request(format!("bad path: {}", e.body_text())))?;
    let disposed = blocking(move || s.dispose(&tenant, &id)).await?;
    Ok(Json(DisposeResponse { disposed }))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint (see /v1/openapi.json)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed("method not allowed on this endpoint (see /v1/openapi.json)")
}

/// Every route of the API: the job routes shared with `memento run
/// --listen`, and what only `memento serve` serves. The router is built
/// from this table and [`routes`] lists it, so the OpenAPI document can be
/// checked against what is really served (a test does, both ways).
fn route_table() -> Vec<Route<Arc<Service>>> {
    let mut table: Vec<Route<Arc<Service>>> = vec![
        ("get", "/", get(dashboard)),
        ("get", "/healthz", get(healthz)),
        ("get", "/metrics", get(metrics)),
        ("get", "/v1/openapi.json", get(openapi)),
        // The upload limit is enforced by `submit` itself (413 with the
        // limit in JSON), so axum's default 2 MB cap is lifted there.
        (
            "post",
            "/v1/jobs",
            post(submit).layer(DefaultBodyLimit::disable()),
        ),
        ("post", "/v1/jobs/{job}/rescale", post(rescale)),
        ("get", "/v1/snapshots", get(list_snapshots)),
        ("delete", "/v1/snapshots/{id}", delete(dispose)),
    ];
    table.extend(jobs::route_table::<Service>());
    table
}

/// Every route as (lowercase method, path template), in table order.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    route_table().into_iter().map(|(m, p, _)| (m, p)).collect()
}

/// The router of the multi-tenant API over `service`.
pub fn router(service: Service) -> Router {
    jobs::router(route_table())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(super::forward::forward))
        .with_state(Arc::new(service))
}

/// A running `memento serve` API.
pub struct ServiceServer {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ServiceServer {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
    let app = router(service);
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(ServiceServer {
        addr: local,
        runtime: Some(runtime),
    })
}
