//! The job routes, shared by `memento serve` and `memento run --listen`:
//! one handler per route over a [`Backend`], the bearer-token extractor
//! and the tenant resolution every request goes through.
//!
//! Order of checks, the same on every route: the token (401), the query
//! string and `?tenant=` (400, 404), the job name (400 when malformed,
//! 404 when unknown), then the rest of the path and the body (400).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{MethodRouter, get, post};
use serde::Deserialize;

use super::ApiError;
use super::views::{
    CancelResponse, CheckpointsView, JobView, JobsView, RecordView, Requested, TriggerResponse,
};
use memento::coordinator::RequestStatus;
use memento::service::{Caller, Desired, RemoteJob, Scope, ServiceError, ServiceJob};
use memento::spec::SnapshotFormat;

/// What the job routes act on: the jobs of a [`Service`](memento::service::Service),
/// or the one job of `memento run --listen`.
pub trait Backend: Send + Sync + 'static {
    /// Who holds `token` (the bearer token in clear, `None` when the
    /// request has none).
    ///
    /// # Errors
    /// [`ServiceError::Unauthorized`].
    fn authenticate(&self, token: Option<&str>) -> Result<Caller, ServiceError>;

    /// Whether a tenant of this name exists here.
    fn has_tenant(&self, tenant: &str) -> bool;

    /// Jobs in `scope`, by tenant then name.
    fn jobs(&self, scope: &Scope) -> Vec<Arc<ServiceJob>>;

    /// The tenant's job `name`.
    ///
    /// # Errors
    /// [`ServiceError::BadRequest`] for a malformed name,
    /// [`ServiceError::NotFound`] for an unknown one.
    fn job(&self, tenant: &str, name: &str) -> Result<Arc<ServiceJob>, ServiceError>;

    /// The tenant's job `name` as the store of a pool tells it, when
    /// another host runs it (or is to take it over). Blocks on the store.
    ///
    /// # Errors
    /// Store I/O errors.
    fn elsewhere(&self, tenant: &str, name: &str) -> Result<Option<RemoteJob>, ServiceError> {
        let _ = (tenant, name);
        Ok(None)
    }

    /// The jobs in `scope` that other hosts of a pool run (or are to take
    /// over), as the store tells them. Blocks on the store.
    ///
    /// # Errors
    /// Store I/O errors.
    fn elsewhere_all(&self, scope: &Scope) -> Result<Vec<RemoteJob>, ServiceError> {
        let _ = scope;
        Ok(Vec::new())
    }

    /// Cancel the tenant's pool job `name` that no host runs. Blocks on the
    /// store.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] where there are no pools; as
    /// [`Service::cancel_unplaced`](memento::service::Service::cancel_unplaced).
    fn cancel_unplaced(&self, tenant: &str, name: &str) -> Result<(), ServiceError> {
        let _ = tenant;
        Err(ServiceError::NotFound(format!("no job `{name}`")))
    }
}

/// The token of an `Authorization: Bearer <token>` header: the scheme in
/// any case, the token without surrounding whitespace; `None` when there
/// is no such header or the token is empty.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The authenticated caller of a request (401 otherwise).
pub struct Authed(pub Caller);

impl<B: Backend> FromRequestParts<Arc<B>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, backend: &Arc<B>) -> Result<Self, ApiError> {
        Ok(Authed(backend.authenticate(bearer(&parts.headers))?))
    }
}

#[derive(Default, Deserialize)]
struct TenantQuery {
    tenant: Option<String>,
}

fn tenant_query(parts: &Parts) -> Result<Option<String>, ApiError> {
    Query::<TenantQuery>::try_from_uri(&parts.uri)
        .map(|Query(q)| q.tenant)
        .map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))
}

/// What a listing covers: the caller's tenant, or for the admin every
/// tenant or the one of `?tenant=`.
pub struct InScope(pub Scope);

impl<B: Backend> FromRequestParts<Arc<B>> for InScope {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, backend: &Arc<B>) -> Result<Self, ApiError> {
        let Authed(caller) = Authed::from_request_parts(parts, backend).await?;
        let tenant = tenant_query(parts)?;
        Ok(InScope(
            caller.scope(tenant.as_deref(), |t| backend.has_tenant(t))?,
        ))
    }
}

/// The one tenant a request acts in.
pub struct InTenant(pub String);

impl<B: Backend> FromRequestParts<Arc<B>> for InTenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, backend: &Arc<B>) -> Result<Self, ApiError> {
        let Authed(caller) = Authed::from_request_parts(parts, backend).await?;
        let tenant = tenant_query(parts)?;
        Ok(InTenant(
            caller.act_in(tenant.as_deref(), |t| backend.has_tenant(t))?,
        ))
    }
}

/// The job a `/v1/jobs/{job}` request names, in the caller's tenant: one
/// running here, or (in a pool) one another host runs or is to take over.
pub enum AnyJob {
    /// It runs here, or ran here and no other host runs it now.
    Here(Arc<ServiceJob>),
    /// Another host of the pool runs it, or will.
    Elsewhere(Box<RemoteJob>),
}

impl<B: Backend> FromRequestParts<Arc<B>> for AnyJob {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, backend: &Arc<B>) -> Result<Self, ApiError> {
        let InTenant(tenant) = InTenant::from_request_parts(parts, backend).await?;
        let Path(params) = Path::<BTreeMap<String, String>>::from_request_parts(parts, backend)
            .await
            .map_err(|e| ApiError::bad_request(format!("bad path: {}", e.body_text())))?;
        let name = params
            .get("job")
            .ok_or_else(|| ApiError::internal("a job route without {job}"))?
            .clone();
        let local = match backend.job(&tenant, &name) {
            Ok(j) if !j.has_ended() => return Ok(AnyJob::Here(j)),
            Err(e @ ServiceError::NotFound(_)) => Err(e),
            Err(e) => return Err(e.into()),
            Ok(j) => Ok(j),
        };
        let b = backend.clone();
        let remote = tokio::task::spawn_blocking(move || b.elsewhere(&tenant, &name))
            .await
            .map_err(|e| ApiError::internal(format!("worker failed: {e}")))??;
        match (local, remote) {
            // It ended here and nobody runs it elsewhere: this host's view
            // of how it ended is the one to give.
            (Ok(j), Some(r)) if !r.leased => Ok(AnyJob::Here(j)),
            (_, Some(r)) => Ok(AnyJob::Elsewhere(Box::new(r))),
            (Ok(j), None) => Ok(AnyJob::Here(j)),
            (Err(e), None) => Err(e.into()),
        }
    }
}

/// The job a `/v1/jobs/{job}/…` request acts on, in the caller's tenant:
/// it must run here. A job another host of the pool runs is answered 409
/// naming that host and its URL (`runs_elsewhere`).
pub struct TheJob(pub Arc<ServiceJob>);

impl<B: Backend> FromRequestParts<Arc<B>> for TheJob {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, backend: &Arc<B>) -> Result<Self, ApiError> {
        match AnyJob::from_request_parts(parts, backend).await? {
            AnyJob::Here(j) => Ok(TheJob(j)),
            AnyJob::Elsewhere(r) => Err(not_here(*r).into()),
        }
    }
}

/// Why a request that acts on a job cannot be served by this host.
fn not_here(r: RemoteJob) -> ServiceError {
    match (r.leased, r.host, r.desired) {
        (_, _, Desired::Stopped) => ServiceError::Conflict(format!(
            "job `{}` was stopped on another host of the pool",
            r.name
        )),
        (true, Some((host, url)), _) => ServiceError::Elsewhere {
            job: r.name,
            host,
            url,
        },
        (true, None, _) => {
            ServiceError::Conflict(format!("job `{}` runs on another host of the pool", r.name))
        }
        (false, _, _) => ServiceError::Conflict(format!(
            "job `{}` is waiting to be taken over by a host of the pool (its host stopped \
                     renewing its lease); ask again in a few seconds, or cancel it",
            r.name
        )),
    }
}

/// The second path parameter of a job route (`{number}`, `{request}`).
fn second(
    p: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<String, ApiError> {
    p.map(|Path((_, x))| x)
        .map_err(|e| ApiError::bad_request(format!("bad path: {}", e.body_text())))
}

type Accepted<T> = (StatusCode, Json<T>);

/// This host's jobs and, in a pool, those other hosts run: a job that
/// ended here but runs elsewhere now is shown as it runs there.
async fn list_jobs<B: Backend>(
    State(b): State<Arc<B>>,
    InScope(scope): InScope,
) -> Result<Json<JobsView>, ApiError> {
    let local = b.jobs(&scope);
    let remote = tokio::task::spawn_blocking(move || b.elsewhere_all(&scope))
        .await
        .map_err(|e| ApiError::internal(format!("worker failed: {e}")))??;
    let mut jobs: BTreeMap<(String, String), JobView> = local
        .iter()
        .map(|j| ((j.tenant().to_string(), j.name().to_string()), JobView::of(j)))
        .collect();
    for r in remote {
        let key = (r.tenant.clone(), r.name.clone());
        if r.leased || !jobs.contains_key(&key) {
            jobs.insert(key, JobView::remote(&r));
        }
    }
    Ok(Json(JobsView {
        jobs: jobs.into_values().collect(),
    }))
}

async fn get_job(job: AnyJob) -> Json<JobView> {
    Json(match job {
        AnyJob::Here(job) => JobView::of(&job),
        AnyJob::Elsewhere(remote) => JobView::remote(&remote),
    })
}

async fn cancel<B: Backend>(
    State(b): State<Arc<B>>,
    job: AnyJob,
) -> Result<Accepted<CancelResponse>, ApiError> {
    let job = match job {
        AnyJob::Here(job) => job,
        // No host runs it (its host died, maybe while stopping it).
        AnyJob::Elsewhere(r) if !r.leased => {
            let (tenant, name) = (r.tenant.clone(), r.name.clone());
            tokio::task::spawn_blocking(move || b.cancel_unplaced(&tenant, &name))
                .await
                .map_err(|e| ApiError::internal(format!("worker failed: {e}")))??;
            return Ok((
                StatusCode::ACCEPTED,
                Json(CancelResponse {
                    job: r.name,
                    requested: Requested::Cancel,
                }),
            ));
        }
        AnyJob::Elsewhere(r) => return Err(not_here(*r).into()),
    };
    job.cancel()?;
    Ok((
        StatusCode::ACCEPTED,
        Json(CancelResponse {
            job: job.name().to_string(),
            requested: Requested::Cancel,
        }),
    ))
}

async fn stop(TheJob(job): TheJob) -> Result<Accepted<TriggerResponse>, ApiError> {
    let request_id = job.stop()?;
    Ok((StatusCode::ACCEPTED, Json(TriggerResponse { request_id })))
}

async fn checkpoints(TheJob(job): TheJob) -> Json<CheckpointsView> {
    Json(CheckpointsView::of(&job.status()))
}

async fn trigger_checkpoint(TheJob(job): TheJob) -> Result<Accepted<TriggerResponse>, ApiError> {
    let request_id = job.trigger_checkpoint()?;
    Ok((StatusCode::ACCEPTED, Json(TriggerResponse { request_id })))
}

async fn checkpoints_config(TheJob(job): TheJob) -> Json<serde_json::Value> {
    let spec = job.spec();
    Json(serde_json::json!({
        "checkpoints": spec.checkpoints,
        "savepoints": spec.savepoints,
        "restart": spec.restart,
        "limits": spec.limits,
    }))
}

async fn checkpoint_detail(
    TheJob(job): TheJob,
    p: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<Json<RecordView>, ApiError> {
    let n = second(p)?;
    let n: u64 = n
        .parse()
        .map_err(|_| ApiError::bad_request(format!("malformed snapshot number {n:?}")))?;
    Ok(Json(RecordView::from(&job.checkpoint(n)?)))
}

/// `POST …/savepoints` body: optional, and nothing but `format`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerBody {
    format: Option<SnapshotFormat>,
}

/// The body of a savepoint trigger: empty, or JSON naming the format.
///
/// # Errors
/// 400 naming what is malformed.
pub fn trigger_body(body: &[u8]) -> Result<Option<SnapshotFormat>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice::<TriggerBody>(body)
        .map(|b| b.format)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The most a trigger body may hold: it names a format, in a few bytes.
const MAX_TRIGGER_BODY: usize = 64 * 1024;

async fn trigger_savepoint(
    TheJob(job): TheJob,
    body: axum::body::Body,
) -> Result<Accepted<TriggerResponse>, ApiError> {
    // Read here, under our own limit, so that an oversize body gets the
    // API's JSON error (axum's own limit answers in plain text).
    let body = axum::body::to_bytes(body, MAX_TRIGGER_BODY).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body is over the limit of {MAX_TRIGGER_BODY} bytes for a trigger"),
        )
    })?;
    let format = trigger_body(&body)?;
    let request_id = job.trigger_savepoint(format)?;
    Ok((StatusCode::ACCEPTED, Json(TriggerResponse { request_id })))
}

async fn request_status(
    TheJob(job): TheJob,
    p: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<Json<RequestStatus>, ApiError> {
    Ok(Json(job.request(&second(p)?)?))
}

/// A route: lowercase method, path template, handler.
pub(crate) type Route<S> = (&'static str, &'static str, MethodRouter<S>);

/// The job routes over backend `B`.
pub(crate) fn route_table<B: Backend>() -> Vec<Route<Arc<B>>> {
    vec![
        ("get", "/v1/jobs", get(list_jobs::<B>)),
        ("get", "/v1/jobs/{job}", get(get_job)),
        ("post", "/v1/jobs/{job}/cancel", post(cancel::<B>)),
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
    ]
}

/// Build a router from a route table (the same path twice with different
/// methods merges them).
pub(crate) fn router<S: Clone + Send + Sync + 'static>(table: Vec<Route<S>>) -> axum::Router<S> {
    table
        .into_iter()
        .fold(axum::Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_the_same_way_everywhere() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            bearer(&h).map(str::to_string)
        };
        assert_eq!(with("Bearer abc"), Some("abc".into()));
        assert_eq!(with("bearer  abc "), Some("abc".into()));
        assert_eq!(with("BEARER abc"), Some("abc".into()));
        assert_eq!(with("Bearer "), None);
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("abc"), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
