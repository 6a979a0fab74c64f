//! The API of one running job (`memento run --listen ADDR`): the job routes
//! of [`jobs`](super::jobs), answered exactly as `memento serve` answers
//! them, for the one job the command runs, in its tenant.
//!
//! Without `--token` every request is the job's tenant; with one, a
//! request must carry it (compared through its blake3, in constant time).

use std::net::SocketAddr;
use std::sync::Arc;

use super::jobs::{self, Backend};
use super::{ApiError, ApiStartError};
use memento::service::{Caller, Scope, ServiceError, ServiceJob, check_job_name};

/// The backend of one job.
pub struct SingleJob {
    job: Arc<ServiceJob>,
    /// blake3 of the bearer token the API requires, if any.
    token: Option<blake3::Hash>,
}

impl Backend for SingleJob {
    fn authenticate(&self, token: Option<&str>) -> Result<Caller, ServiceError> {
        let own = || Caller::Tenant(self.job.tenant().to_string());
        match (&self.token, token) {
            (None, _) => Ok(own()),
            (Some(want), Some(given)) if memento::service::token_matches(given, want) => Ok(own()),
            (Some(_), _) => Err(ServiceError::Unauthorized),
        }
    }

    fn has_tenant(&self, tenant: &str) -> bool {
        tenant == self.job.tenant()
    }

    fn jobs(&self, scope: &Scope) -> Vec<Arc<ServiceJob>> {
        match scope {
            Scope::Tenant(t) if t != self.job.tenant() => Vec::new(),
            _ => vec![self.job.clone()],
        }
    }

    fn job(&self, tenant: &str, name: &str) -> Result<Arc<ServiceJob>, ServiceError> {
        check_job_name(name)?;
        if tenant == self.job.tenant() && name == self.job.name() {
            Ok(self.job.clone())
        } else {
            Err(ServiceError::NotFound(format!("no job `{name}`")))
        }
    }
}

/// What `memento run --listen` does not serve (`memento serve` does): a
/// JSON error, like every other answer.
async fn not_served() -> ApiError {
    ApiError::not_found(
        "no such endpoint on `memento run --listen`: it serves the job routes under /v1/jobs \
         (`memento serve` serves the whole API)",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed("method not allowed on this endpoint")
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// A server answering for one running job.
pub struct JobServer {
    addr: SocketAddr,
    job: Arc<ServiceJob>,
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
        while self.job.has_unread_requests() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Serve the API of `job` on `addr` in background threads until the
/// returned server is dropped. A bearer token is required on a
/// non-loopback address.
///
/// # Errors
/// [`ApiStartError`] when the address cannot be bound or needs a token.
pub fn serve_job(addr: &str, job: Arc<ServiceJob>, token: Option<&str>) -> Result<JobServer, ApiStartError> {
    let (runtime, listener, local) = super::bind(addr, 1)?;
    if !local.ip().is_loopback() && token.is_none() {
        return Err(ApiStartError::TokenRequired(local));
    }
    let backend = Arc::new(SingleJob {
        job: job.clone(),
        token: token.map(|t| blake3::hash(t.as_bytes())),
    });
    let mut table = jobs::route_table::<SingleJob>();
    table.push(("get", "/healthz", axum::routing::get(healthz)));
    let app = jobs::router(table)
        .fallback(not_served)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(backend);
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(JobServer {
        addr: local,
        job,
        _runtime: runtime,
    })
}
