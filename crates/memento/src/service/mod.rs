//! The multi-tenant host service behind `memento serve`: jobs of many tenants
//! in one process, each tenant confined to its own namespace and limits.
//!
//! A [`Service`] wraps the library's [`Host`] exactly as an embedding service
//! would: it loads jobs with [`Host::load_job`], runs each on its own thread
//! and talks to it through its [`ServiceJob`] handle. It knows nothing of
//! HTTP: the REST API (crate `memento-cli`) maps its answers and
//! [`ServiceError`]s to requests and responses.
//!
//! What the service adds to the library, one file each:
//! - **Tenancy** (`auth.rs`). Every operation names a tenant; a token is
//!   a [`Caller`] (the admin, or one tenant), and a tenant's jobs and
//!   snapshots are looked up in that tenant's namespace only, so another
//!   tenant's names are simply "not found".
//! - **Submission and confinement** (`submit.rs`). A job submitted over the
//!   API names its plugins by the names they were uploaded under (stored
//!   once under `<state_dir>/components/<blake3>.wasm`), its file source
//!   and sink paths are relative and resolve inside
//!   `<state_dir>/files/<tenant>/`, and it cannot write to the host's
//!   stdout. A job's `[limits] memory` and `call_timeout` may not exceed
//!   the tenant's caps — an explicit value above a cap is refused, an unset
//!   one (the default) is lowered to the cap.
//! - **Resume records** (`record.rs`). A submitted job is recorded under
//!   `<state_dir>/service/jobs/<tenant>/<name>.json` (tenant, job file
//!   text, the blake3 of each plugin) while it runs, and the record is
//!   removed when the job ends for good (finished, stopped, cancelled by a
//!   user, failed). Jobs cancelled because the service shuts down keep
//!   theirs, as do jobs of a killed process, so [`Service::start`] resumes
//!   every recorded job from its latest snapshot: the state directory, not
//!   the process, is the source of truth.
//! - **The pool** (`pool.rs`). On an `s3://` store the records and
//!   components live in the store instead (`docs/STORAGE.md`, "Pool
//!   records"), so every host of the pool can run any submitted job; each
//!   host takes over the jobs whose host died, and says which host runs a
//!   job it does not.
//! - **The per-job handle** (`job.rs`). [`ServiceJob`]: a job's state,
//!   triggers and their request ids, stop and cancel.
//!
//! And here: admission (a tenant runs at most `max_jobs` jobs, the host at
//! most its own `max_jobs`), the tenants' stores (each with the tenant's
//! quota, so a snapshot that would exceed it fails with the store's "quota
//! exceeded" reason), listing and disposing of snapshots, and shutdown.

mod auth;
mod job;
mod pool;
mod record;
mod rescale;
mod submit;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub use auth::{Caller, Scope, token_matches};
pub use job::ServiceJob;
pub use pool::{Desired, RemoteJob};
pub use rescale::Rescaled;
pub use submit::{MAX_TASKS, Submission};

use crate::host::{Host, HostError, RunOptions, StartFrom};
use crate::spec::host_config::{HostConfig, TenantConfig};
use crate::spec::{JobSpec, validate_name};
use crate::store::{ListFilter, Manifest, SnapshotId, Store, StoreError, StoreOptions, TenantStore};
use record::JobRecord;

/// Ended jobs kept per tenant for listing (the oldest are forgotten first).
pub const ENDED_JOBS_KEPT: usize = 20;

/// Why a service operation was refused or failed. Each variant maps to one
/// HTTP status in the REST API.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No token, or a token no tenant (nor the admin) has.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// The job, snapshot, request or tenant does not exist for this caller.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed: the message says what and why.
    #[error("{message}")]
    BadRequest {
        /// Short machine-readable code (`bad_request`, `invalid_job`, …).
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The job exists but cannot do that now (running job of the same name,
    /// ended job asked to snapshot).
    #[error("{0}")]
    Conflict(String),
    /// The job runs on another host of the pool: ask that one.
    #[error("job `{job}` runs on host {host} of the pool ({url}): send this request there")]
    Elsewhere {
        /// The job.
        job: String,
        /// The host's id in the pool.
        host: String,
        /// Its API.
        url: String,
    },
    /// A job limit (tenant's or host's `max_jobs`) is reached.
    #[error("{0}")]
    TooManyJobs(String),
    /// The request body is larger than `max_upload`.
    #[error("request body of {size} bytes is over the upload limit of {limit} bytes (max_upload)")]
    TooLarge {
        /// Bytes sent (or announced).
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The host itself failed (I/O on the state directory, a thread).
    #[error("internal error: {0}")]
    Internal(String),
    /// The host's configuration cannot be put into effect (a boot job of
    /// HOST.toml that does not load): only at start, never for a request.
    #[error("{0}")]
    Config(String),
}

impl ServiceError {
    pub(crate) fn bad(code: &'static str, message: impl Into<String>) -> Self {
        ServiceError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn from_store(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { id, .. } => ServiceError::NotFound(format!("no snapshot {id}")),
            e @ StoreError::InvalidName { .. } => ServiceError::bad("bad_request", e.to_string()),
            e => ServiceError::Internal(e.to_string()),
        }
    }
}

struct TenantEntry {
    config: TenantConfig,
    /// Shares the service's runtime; its store carries the tenant's quota.
    host: Host,
    store: TenantStore,
}

/// Jobs by (tenant, name).
type JobMap = BTreeMap<(String, String), Arc<ServiceJob>>;

/// The multi-tenant service. Cheap to clone; every clone is the same service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    config: HostConfig,
    tenants: BTreeMap<String, TenantEntry>,
    /// Holds ended jobs too (bounded), so their final state can be read.
    jobs: Mutex<JobMap>,
    components_dir: PathBuf,
    files_dir: PathBuf,
    /// `<state_dir>/service/jobs`: one record per running submitted job.
    records_dir: PathBuf,
    /// Set by [`Service::shutdown`]: jobs it cancels keep their records so
    /// the next start resumes them.
    shutting_down: AtomicBool,
    /// On an `s3://` store: this host's part in the pool.
    pool: Option<pool::Pool>,
}

/// A lease a pool's takeover took, dropped (released) right before the
/// job's run takes it again.
type Handoff = Arc<Mutex<Option<crate::store::SeriesLease>>>;

/// Where a running job's record is, so its end can remove it.
enum RecordAt {
    Local(PathBuf),
    Pool,
}

impl Service {
    /// Open the state directory, one store per tenant (with its quota),
    /// resume the recorded jobs and start the config's boot jobs.
    ///
    /// # Errors
    /// [`ServiceError::Internal`] when the runtime or the store cannot be
    /// opened; [`ServiceError::Config`] for a boot job that does not start,
    /// naming its job file.
    pub fn start(config: HostConfig) -> Result<Service, ServiceError> {
        let internal = |e: HostError| ServiceError::Internal(e.to_string());
        let runtime = crate::runtime::RuntimeOptions {
            cache_dir: Some(config.cache_dir.clone()),
            cache_dir_bytes: config.cache_size,
            ..crate::runtime::RuntimeOptions::default()
        };
        let base =
            Host::open_with_runtime(&config.store, StoreOptions::default(), runtime).map_err(internal)?;
        let mut tenants = BTreeMap::new();
        for t in &config.tenants {
            // One Store per tenant on the same directory: the quota is a
            // store option, and stores on one directory coordinate through
            // file locks exactly as separate processes would.
            let store = Store::open_location(
                &config.store,
                StoreOptions {
                    quota_bytes: t.quota,
                    ..StoreOptions::default()
                },
            )
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
            let tenant_store = store.tenant(&t.name).map_err(ServiceError::from_store)?;
            tenants.insert(
                t.name.clone(),
                TenantEntry {
                    config: t.clone(),
                    host: base.with_store(store),
                    store: tenant_store,
                },
            );
        }
        // Absolute: a submitted job's plugin paths point into
        // `components/`, and a job resolves relative paths against its own
        // base directory, so a relative state_dir (a HOST.toml given as a
        // relative path) would be resolved twice.
        let state_dir = std::path::absolute(&config.state_dir)
            .map_err(|e| ServiceError::Internal(format!("{}: {e}", config.state_dir.display())))?;
        let components_dir = state_dir.join("components");
        let files_dir = state_dir.join("files");
        let records_dir = state_dir.join("service").join("jobs");
        for dir in [&components_dir, &files_dir, &records_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|e| ServiceError::Internal(format!("create {}: {e}", dir.display())))?;
        }
        let boot = config.jobs.clone();
        let pool = matches!(config.store, crate::store::StoreLocation::S3 { .. })
            .then(|| pool::Pool::new(config.pool_scan));
        let service = Service {
            inner: Arc::new(Inner {
                config,
                tenants,
                jobs: Mutex::new(BTreeMap::new()),
                components_dir,
                files_dir,
                records_dir,
                shutting_down: AtomicBool::new(false),
                pool,
            }),
        };
        // A pool's jobs are resumed by its hosts' scans (`pool.rs`).
        if !service.in_pool() {
            service.resume_recorded();
        }
        for b in boot {
            match service.submit_file(&b.tenant, &b.file, b.from.as_deref()) {
                // A job of that name was resumed from its record (it was
                // submitted over the API after the boot job ended): the
                // running one wins, the host still starts.
                Err(ServiceError::Conflict(m)) => {
                    tracing::warn!(tenant = %b.tenant, file = %b.file.display(), "boot job not started: {m}");
                    continue;
                }
                r => r,
            }
            .map_err(|e| {
                let reason = match e {
                    ServiceError::Internal(m) => m,
                    e => e.to_string(),
                };
                ServiceError::Config(format!("[[jobs]] {}: {reason}", b.file.display()))
            })?;
        }
        Ok(service)
    }

    /// The configuration the service runs with.
    pub fn config(&self) -> &HostConfig {
        &self.inner.config
    }

    fn tenant(&self, name: &str) -> Result<&TenantEntry, ServiceError> {
        self.inner
            .tenants
            .get(name)
            .ok_or_else(|| ServiceError::NotFound(format!("no tenant {name:?}")))
    }

    /// The tenants in `scope`, in name order.
    pub fn tenants(&self, scope: &Scope) -> Vec<&TenantConfig> {
        self.tenants_in(scope).into_iter().map(|t| &t.config).collect()
    }

    fn tenants_in(&self, scope: &Scope) -> Vec<&TenantEntry> {
        match scope {
            Scope::All => self.inner.tenants.values().collect(),
            Scope::Tenant(t) => self.inner.tenants.get(t).into_iter().collect(),
        }
    }

    /// Refuse early when the job could not be admitted anyway.
    fn check_capacity(&self, tenant: &str, name: &str) -> Result<(), ServiceError> {
        let jobs = self.inner.jobs.lock().unwrap();
        self.admit(&jobs, tenant, name)
    }

    fn admit(&self, jobs: &JobMap, tenant: &str, name: &str) -> Result<(), ServiceError> {
        if jobs
            .get(&(tenant.to_string(), name.to_string()))
            .is_some_and(|j| !j.has_ended())
        {
            return Err(ServiceError::Conflict(format!(
                "job `{name}` is already running (cancel or stop it first)"
            )));
        }
        let running = |t: Option<&str>| {
            jobs.values()
                .filter(|j| t.is_none_or(|t| j.tenant() == t) && !j.has_ended())
                .count()
        };
        let cap = self.tenant(tenant)?.config.max_jobs as usize;
        if running(Some(tenant)) >= cap {
            return Err(ServiceError::TooManyJobs(format!(
                "tenant {tenant:?} already runs {cap} jobs, its limit (max_jobs)"
            )));
        }
        let host_cap = self.inner.config.max_jobs as usize;
        if running(None) >= host_cap {
            return Err(ServiceError::TooManyJobs(format!(
                "the host already runs {host_cap} jobs, its limit (max_jobs)"
            )));
        }
        Ok(())
    }

    /// Load `spec` for `tenant`, resolve where it starts, admit it, record
    /// it (when `record` is given) and run it on its own thread.
    fn launch(
        &self,
        tenant: &str,
        entry: &TenantEntry,
        spec: JobSpec,
        from: Option<&str>,
        record: Option<JobRecord>,
        handoff: Option<Handoff>,
    ) -> Result<Arc<ServiceJob>, ServiceError> {
        let name = spec.name.clone();
        let from = match from {
            None => StartFrom::Scratch,
            Some("latest") => StartFrom::Latest,
            Some(id) => {
                let id = SnapshotId::parse(id)
                    .map_err(|e| ServiceError::bad("bad_request", format!("from: {e}")))?;
                if id.job().as_str() != name {
                    return Err(ServiceError::bad(
                        "bad_request",
                        format!("from: snapshot {id} belongs to job `{}`, not `{name}`", id.job()),
                    ));
                }
                StartFrom::Snapshot(id)
            }
        };
        let job = entry.host.load_job(spec, tenant).map_err(|e| match e {
            e @ HostError::Plugin { .. } => ServiceError::bad("invalid_plugin", e.to_string()),
            e @ (HostError::Spec(_) | HostError::NativeUnsupported { .. }) => {
                ServiceError::bad("invalid_job", e.to_string())
            }
            e => ServiceError::Internal(e.to_string()),
        })?;
        job.resolve_start(&from).map_err(|e| match e {
            HostError::NoSnapshot { job } => {
                ServiceError::NotFound(format!("no snapshot of job `{job}` to resume from"))
            }
            HostError::Store(e) => ServiceError::from_store(e),
            // The snapshot does not fit the job file (operators,
            // parallelism, the config of a native image).
            HostError::Job(f) => ServiceError::bad("incompatible_snapshot", f.to_string()),
            e => ServiceError::Internal(e.to_string()),
        })?;
        let service_job = Arc::new(ServiceJob::new(job));
        let key = (tenant.to_string(), name.clone());
        {
            // Admit and insert under one lock: two submissions racing for
            // the last slot (or the same name) cannot both get in.
            let mut jobs = self.inner.jobs.lock().unwrap();
            self.admit(&jobs, tenant, &name)?;
            // Recorded after admission (a refused duplicate must not
            // overwrite the running job's record) and before the job runs
            // (a crash from here on finds it).
            let record_at = match &record {
                Some(_) if self.in_pool() && handoff.is_some() => Some(RecordAt::Pool),
                Some(r) if self.in_pool() => {
                    self.pool_write_record(r, &name)?;
                    Some(RecordAt::Pool)
                }
                Some(r) => Some(RecordAt::Local(r.write(&self.inner.records_dir, &name)?)),
                None => None,
            };
            if matches!(record_at, Some(RecordAt::Pool)) {
                self.pool_place(tenant, &name);
                service_job.set_host(self.pool_host());
                let weak = Arc::downgrade(&self.inner);
                let (t, n) = (tenant.to_string(), name.clone());
                service_job.set_user_end(Box::new(move || match weak.upgrade() {
                    Some(inner) => Service { inner }.pool_set_stopped(&t, &n),
                    None => Ok(()),
                }));
            }
            jobs.insert(key.clone(), service_job.clone());
            prune_ended(&mut jobs, tenant);
            let service = self.clone();
            let runner = service_job.clone();
            let label = format!("job-{tenant}-{name}");
            // The lease a takeover took goes right before the run takes
            // it again (a run takes its own lease).
            if let Some(h) = &handoff {
                h.lock().unwrap().take();
            }
            let handle = std::thread::Builder::new()
                .name(label.chars().take(15).collect())
                .spawn(move || {
                    let result = runner.run(RunOptions { from });
                    if let Err(e) = &result {
                        tracing::warn!(tenant = %runner.tenant(), job = %runner.name(), "job ended with an error: {e}");
                    }
                    if let Some(at) = record_at {
                        let busy = matches!(result, Err(HostError::JobBusy { .. }));
                        service.job_ended(&key, &runner, &at, busy);
                    }
                })
                .map_err(|e| ServiceError::Internal(format!("spawn job thread: {e}")))?;
            service_job.set_thread(handle);
        }
        tracing::info!(tenant, job = %name, "job started");
        Ok(service_job)
    }

    /// A recorded job's run returned: its record goes, unless the service's
    /// own shutdown cancelled it (the next start resumes it) or a new job
    /// of the same name was admitted meanwhile (the record is that job's
    /// now). Under the jobs lock, which admission holds while it writes a
    /// record.
    ///
    /// A pool job's record also stays when its run never got the lease
    /// (`busy`) or lost it to another host (`pool.rs`).
    fn job_ended(&self, key: &(String, String), job: &Arc<ServiceJob>, record: &RecordAt, busy: bool) {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let jobs = self.inner.jobs.lock().unwrap();
        if jobs.get(key).is_some_and(|j| !Arc::ptr_eq(j, job)) {
            return;
        }
        match record {
            RecordAt::Local(path) => {
                if let Err(e) = record::remove_durably(path) {
                    tracing::warn!(record = %path.display(), "cannot remove job record: {e}");
                }
            }
            RecordAt::Pool => self.pool_job_ended(&key.0, &key.1, busy),
        }
    }

    /// The record of the tenant's submitted job `name`: in the store on a
    /// pool, else in the state directory.
    fn job_record(&self, tenant: &str, name: &str) -> Result<Option<JobRecord>, ServiceError> {
        if self.in_pool() {
            return self.pool_job_record(tenant, name);
        }
        let path = self.inner.records_dir.join(tenant).join(format!("{name}.json"));
        Ok(JobRecord::read(&path).ok())
    }

    /// Jobs in `scope`, by tenant then name.
    pub fn jobs(&self, scope: &Scope) -> Vec<Arc<ServiceJob>> {
        self.inner
            .jobs
            .lock()
            .unwrap()
            .values()
            .filter(|j| match scope {
                Scope::All => true,
                Scope::Tenant(t) => j.tenant() == t,
            })
            .cloned()
            .collect()
    }

    /// The tenant's job `name`.
    ///
    /// # Errors
    /// [`ServiceError::BadRequest`] for a malformed name,
    /// [`ServiceError::NotFound`] if the tenant has no such job.
    pub fn job(&self, tenant: &str, name: &str) -> Result<Arc<ServiceJob>, ServiceError> {
        check_job_name(name)?;
        self.inner
            .jobs
            .lock()
            .unwrap()
            .get(&(tenant.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(format!("no job `{name}`")))
    }

    /// Stored snapshots (checkpoints and savepoints side by side) in
    /// `scope`: each with its tenant, by tenant, job and number. Blocks on
    /// the store.
    ///
    /// # Errors
    /// Store I/O errors.
    pub fn snapshots(&self, scope: &Scope) -> Result<Vec<(String, Manifest)>, ServiceError> {
        let mut out = Vec::new();
        for t in self.tenants_in(scope) {
            let list = t
                .store
                .list(&ListFilter::all())
                .map_err(ServiceError::from_store)?;
            out.extend(list.into_iter().map(|m| (t.config.name.clone(), m)));
        }
        Ok(out)
    }

    /// Dispose of the tenant's snapshot `id` (its blobs go at the next GC).
    ///
    /// # Errors
    /// [`ServiceError::BadRequest`] for a malformed id,
    /// [`ServiceError::NotFound`] if the tenant has no such snapshot.
    pub fn dispose(&self, tenant: &str, id: &str) -> Result<SnapshotId, ServiceError> {
        let id = SnapshotId::parse(id).map_err(|e| ServiceError::from_store(e.into()))?;
        self.tenant(tenant)?
            .store
            .delete(&id)
            .map_err(ServiceError::from_store)?;
        tracing::info!(tenant, snapshot = %id, "snapshot disposed");
        Ok(id)
    }

    /// Bytes of snapshot blobs the tenant keeps (what its quota limits).
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] for an unknown tenant; store I/O errors.
    pub fn usage_bytes(&self, tenant: &str) -> Result<u64, ServiceError> {
        self.tenant(tenant)?
            .store
            .usage_bytes()
            .map_err(ServiceError::from_store)
    }

    /// Cancel every running job and wait for their threads (checkpoints
    /// stay where `persistent`). Their records stay: the next
    /// [`Service::start`] on this state directory resumes them.
    pub fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let jobs: Vec<_> = self.inner.jobs.lock().unwrap().values().cloned().collect();
        for j in &jobs {
            j.control().cancel();
        }
        for j in jobs {
            j.join();
        }
    }
}

/// A job name as a request gives it: 400 when malformed, before any lookup.
///
/// # Errors
/// [`ServiceError::BadRequest`] naming the name and what is wrong.
pub fn check_job_name(name: &str) -> Result<(), ServiceError> {
    validate_name(name).map_err(|r| ServiceError::bad("bad_request", format!("job name {r}")))
}

/// Forget the oldest ended jobs of `tenant` beyond [`ENDED_JOBS_KEPT`].
fn prune_ended(jobs: &mut JobMap, tenant: &str) {
    let mut ended: Vec<(u64, (String, String))> = jobs
        .iter()
        .filter(|(_, j)| j.tenant() == tenant && j.has_ended())
        .map(|(k, j)| (j.submitted_at_ms(), k.clone()))
        .collect();
    if ended.len() > ENDED_JOBS_KEPT {
        ended.sort();
        for (_, k) in ended.iter().take(ended.len() - ENDED_JOBS_KEPT) {
            jobs.remove(k);
        }
    }
}
