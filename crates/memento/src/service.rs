//! The multi-tenant host service behind `memento serve`: jobs of many tenants
//! in one process, each tenant confined to its own namespace and limits.
//!
//! A [`Service`] wraps the library's [`Host`] exactly as an embedding service
//! would: it loads jobs with [`Host::load_job`], runs each on its own thread
//! and talks to it through [`JobControl`] and the job's status handle. It
//! knows nothing of HTTP; `api::service` maps its answers and
//! [`ServiceError`]s to REST.
//!
//! What the service adds to the library:
//! - **Tenancy.** Every operation names a tenant; a tenant's jobs and
//!   snapshots are looked up in that tenant's namespace only, so another
//!   tenant's names are simply "not found".
//! - **Limits.** A tenant runs at most `max_jobs` jobs (and the host at most
//!   its own `max_jobs`); a job's `[limits] memory` and `call_timeout` may
//!   not exceed the tenant's caps — an explicit value above a cap is
//!   refused, an unset one (the default) is lowered to the cap; the tenant's
//!   store has the tenant's quota, so a snapshot that would exceed it fails
//!   with the store's "quota exceeded" reason.
//! - **Submitted jobs are confined.** A job submitted over the API names its
//!   plugins by the names they were uploaded under (stored once under
//!   `<state_dir>/components/<blake3>.wasm`), its file source and sink paths
//!   are relative and resolve inside `<state_dir>/files/<tenant>/`, and it
//!   cannot write to the host's stdout.
//! - **Restarts resume.** A submitted job is recorded under
//!   `<state_dir>/service/jobs/<tenant>/<name>.json` (tenant, job file text,
//!   the blake3 of each plugin) while it runs, and the record is removed
//!   when the job ends for good (finished, stopped, cancelled by a user,
//!   failed). Jobs cancelled because the service shuts down keep theirs, as
//!   do jobs of a killed process, so [`Service::start`] resumes every
//!   recorded job from its latest snapshot: the state directory, not the
//!   process, is the source of truth.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::coordinator::RequestStatus;
use crate::coordinator::{
    JobControl, JobState, JobStatus, SnapshotOutcome, SnapshotRecord, StatusHandle, TriggerResult,
};
use crate::host::{Host, HostError, Job, RunOptions, StartFrom};
use crate::spec::host_config::{HostConfig, TenantConfig};
use crate::spec::{HumanDuration, HumanSize, JobSpec, SinkSpec, SnapshotFormat, SourceSpec, validate_name};
use crate::store::{
    ListFilter, Manifest, SnapshotId, SnapshotKind, Store, StoreError, StoreOptions, TenantStore,
};

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
    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        ServiceError::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn from_store(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { id, .. } => ServiceError::NotFound(format!("no snapshot {id}")),
            e @ StoreError::InvalidName { .. } => ServiceError::bad("bad_request", e.to_string()),
            e => ServiceError::Internal(e.to_string()),
        }
    }
}

/// Who is calling: the admin, or one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The admin token: every tenant.
    Admin,
    /// A tenant's token: that tenant only.
    Tenant(String),
}

/// Which tenants a listing covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant (the admin without `?tenant=`).
    All,
    /// One tenant.
    Tenant(String),
}

/// A job submission: the job file's text and the uploaded components.
#[derive(Clone, Debug, Default)]
pub struct Submission {
    /// The job file (TOML). Its operators' `plugin` keys name entries of
    /// `plugins`.
    pub job: String,
    /// Uploaded components by name (e.g. `wordcount.wasm`).
    pub plugins: BTreeMap<String, Vec<u8>>,
    /// `None` from scratch, `Some("latest")`, or a snapshot id.
    pub from: Option<String>,
}

struct TenantEntry {
    config: TenantConfig,
    /// Shares the service's runtime; its store carries the tenant's quota.
    host: Host,
    store: TenantStore,
}

/// The multi-tenant service. Cheap to clone; every clone is the same service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    config: HostConfig,
    tenants: BTreeMap<String, TenantEntry>,
    /// Jobs by (tenant, name). Holds ended jobs too (bounded), so their
    /// final state can be read.
    jobs: Mutex<BTreeMap<(String, String), Arc<ServiceJob>>>,
    components_dir: PathBuf,
    files_dir: PathBuf,
    /// `<state_dir>/service/jobs`: one record per running submitted job.
    records_dir: PathBuf,
    /// Set by [`Service::shutdown`]: jobs it cancels keep their records so
    /// the next start resumes them.
    shutting_down: Arc<AtomicBool>,
}

/// What is kept on disk about a running submitted job: enough to submit it
/// again, exactly as the tenant did, after a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct JobRecord {
    tenant: String,
    /// The job file's text as submitted.
    job: String,
    /// Upload name → blake3 hex of the component in `components/`.
    plugins: BTreeMap<String, String>,
}

/// One job of one tenant, running or ended.
pub struct ServiceJob {
    tenant: String,
    name: String,
    job: Arc<Job>,
    control: JobControl,
    status: StatusHandle,
    /// Set by the run thread when `Job::run` returns: `Err` holds why it
    /// failed (also failures before the coordinator started).
    outcome: Arc<Mutex<Option<Result<(), String>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    requests: crate::coordinator::RequestLog,
    submitted_at_ms: u64,
}

/// A job as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct JobView {
    /// Owning tenant.
    pub tenant: String,
    /// Job name.
    pub name: String,
    /// `created`, `running`, `restarting`, `finished`, `stopped`,
    /// `cancelled` or `failed`.
    pub state: String,
    /// Why it failed, when `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The final savepoint, when `stopped`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub savepoint: Option<SnapshotId>,
    /// Restarts after failures.
    pub restarts: u32,
    /// The snapshot of the latest restore.
    pub restored_from: Option<SnapshotId>,
    /// Records read by the source so far.
    pub records_in: u64,
    /// Snapshot counts.
    pub counts: crate::coordinator::status::SnapshotCounts,
    /// When it was submitted, unix ms.
    pub submitted_at_ms: u64,
    /// When it started running, unix ms (0 before).
    pub started_at_ms: u64,
    /// Operators in chain order: name, parallelism, component blake3.
    pub operators: Vec<OperatorView>,
    /// The effective sandbox limits (after the tenant's caps).
    pub limits: LimitsView,
}

/// One operator of a job.
#[derive(Clone, Debug, Serialize)]
pub struct OperatorView {
    /// Operator name.
    pub name: String,
    /// Number of tasks.
    pub parallelism: u32,
    /// blake3 of its component.
    pub component: String,
}

/// Effective per-instance limits.
#[derive(Clone, Debug, Serialize)]
pub struct LimitsView {
    /// Linear memory per instance, bytes.
    pub memory: u64,
    /// Deadline of one call, ms.
    pub call_timeout_ms: u64,
}

/// min/p50/p90/p99/max of one figure over completed snapshots.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Smallest.
    pub min: u64,
    /// Median (nearest rank).
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl Stats {
    /// Nearest-rank percentiles of `values` (all zero when empty).
    pub fn of(mut values: Vec<u64>) -> Stats {
        if values.is_empty() {
            return Stats::default();
        }
        values.sort_unstable();
        let rank = |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Stats {
            min: values[0],
            p50: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            max: values[values.len() - 1],
        }
    }
}

/// `GET /v1/jobs/{job}/checkpoints`: counts, summary, latest, history.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointsView {
    /// Completed, failed, in progress, restored.
    pub counts: crate::coordinator::status::SnapshotCounts,
    /// Over the completed snapshots in the history.
    pub summary: Summary,
    /// The newest of each kind of event.
    pub latest: Latest,
    /// The newest snapshots (checkpoints and savepoints), newest first.
    pub history: Vec<SnapshotRecord>,
}

impl CheckpointsView {
    /// The view of a job's status: counts, summary over the completed
    /// snapshots of its history, the newest of each kind, the history
    /// newest first.
    pub fn of(st: &crate::coordinator::JobStatus) -> CheckpointsView {
        let completed: Vec<&SnapshotRecord> = st
            .history
            .iter()
            .filter(|r| r.outcome == SnapshotOutcome::Completed)
            .collect();
        let stats = |f: fn(&SnapshotRecord) -> u64| Stats::of(completed.iter().map(|r| f(r)).collect());
        let newest =
            |pred: &dyn Fn(&SnapshotRecord) -> bool| st.history.iter().rev().find(|r| pred(r)).cloned();
        CheckpointsView {
            summary: Summary {
                completed: completed.len(),
                duration_ms: stats(|r| r.duration_ms),
                logical_bytes: stats(|r| r.logical_bytes),
                new_bytes: stats(|r| r.new_bytes),
            },
            latest: Latest {
                completed: newest(&|r| {
                    r.kind == SnapshotKind::Checkpoint && r.outcome == SnapshotOutcome::Completed
                }),
                savepoint: newest(&|r| {
                    r.kind == SnapshotKind::Savepoint && r.outcome == SnapshotOutcome::Completed
                }),
                failed: newest(&|r| matches!(r.outcome, SnapshotOutcome::Failed { .. })),
                restored: st.restored_from.clone(),
            },
            counts: st.counts.clone(),
            history: st.history.iter().rev().cloned().collect(),
        }
    }
}

/// Statistics over completed snapshots.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// How many completed snapshots the figures cover.
    pub completed: usize,
    /// Trigger to commit, ms.
    pub duration_ms: Stats,
    /// Logical size of the state.
    pub logical_bytes: Stats,
    /// Bytes of blobs newly written.
    pub new_bytes: Stats,
}

/// The newest completed checkpoint, savepoint, failure and restore.
#[derive(Clone, Debug, Serialize)]
pub struct Latest {
    /// Newest completed checkpoint.
    pub completed: Option<SnapshotRecord>,
    /// Newest completed savepoint.
    pub savepoint: Option<SnapshotRecord>,
    /// Newest failed snapshot.
    pub failed: Option<SnapshotRecord>,
    /// The snapshot of the newest restore.
    pub restored: Option<SnapshotId>,
}

/// A stored snapshot as `GET /v1/snapshots` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotView {
    /// Owning tenant.
    pub tenant: String,
    /// `<job>-<number>`.
    pub id: SnapshotId,
    /// The job.
    pub job: String,
    /// The number.
    pub number: u64,
    /// `checkpoint` or `savepoint`.
    pub kind: SnapshotKind,
    /// What triggered it.
    pub trigger: crate::store::Trigger,
    /// `canonical` or `native`.
    pub format: crate::store::StateFormat,
    /// Triggered, unix ms.
    pub created_at_ms: u64,
    /// Committed, unix ms.
    pub completed_at_ms: u64,
    /// Logical size of the state.
    pub logical_bytes: u64,
    /// Uncompressed bytes of blobs it wrote.
    pub new_bytes: u64,
    /// On-disk bytes of blobs it wrote.
    pub stored_bytes: u64,
    /// Retention in force when taken, in short human form.
    pub retention: String,
}

impl SnapshotView {
    fn of(tenant: &str, m: &Manifest) -> SnapshotView {
        SnapshotView {
            tenant: tenant.to_string(),
            id: m.id.clone(),
            job: m.job.to_string(),
            number: m.number,
            kind: m.kind,
            trigger: m.trigger,
            format: m.format,
            created_at_ms: m.created_at_ms,
            completed_at_ms: m.completed_at_ms,
            logical_bytes: m.figures.logical_bytes,
            new_bytes: m.figures.new_bytes,
            stored_bytes: m.figures.stored_bytes,
            retention: m.retention.to_string(),
        }
    }
}

impl Service {
    /// Open the state directory, one store per tenant (with its quota), and
    /// start the config's boot jobs.
    ///
    /// # Errors
    /// [`ServiceError::Internal`] when the runtime or the store cannot be
    /// opened; a boot job's submission error, naming the job file.
    pub fn start(config: HostConfig) -> Result<Service, ServiceError> {
        let internal = |e: HostError| ServiceError::Internal(e.to_string());
        let base = Host::open(&config.state_dir).map_err(internal)?;
        let mut tenants = BTreeMap::new();
        for t in &config.tenants {
            // One Store per tenant on the same directory: the quota is a
            // store option, and stores on one directory coordinate through
            // file locks exactly as separate processes would.
            let store = Store::open(
                &config.state_dir,
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
        let service = Service {
            inner: Arc::new(Inner {
                config,
                tenants,
                jobs: Mutex::new(BTreeMap::new()),
                components_dir,
                files_dir,
                records_dir,
                shutting_down: Arc::new(AtomicBool::new(false)),
            }),
        };
        service.resume_recorded();
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

    /// Submit again every job recorded under `service/jobs/`, from its
    /// latest snapshot (from scratch when it has none). A record that
    /// cannot be resumed (its tenant left the config, a component is gone,
    /// a cap was lowered below what it asks) is logged and kept, so the job
    /// resumes once the config is fixed; it does not stop the other
    /// tenants' jobs from starting.
    fn resume_recorded(&self) {
        let mut records = Vec::new();
        let Ok(tenants) = std::fs::read_dir(&self.inner.records_dir) else {
            return;
        };
        for t in tenants.flatten() {
            for f in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
                let path = f.path();
                if path.extension().is_some_and(|e| e == "json") {
                    records.push(path);
                }
            }
        }
        records.sort();
        for path in records {
            match self.resume(&path) {
                Ok(job) => tracing::info!(
                    tenant = %job.tenant,
                    job = %job.name,
                    from = ?job.status().restored_from,
                    "job resumed from the state directory"
                ),
                Err(e) => tracing::error!(record = %path.display(), "cannot resume job: {e}"),
            }
        }
    }

    fn resume(&self, path: &Path) -> Result<Arc<ServiceJob>, ServiceError> {
        let text = std::fs::read(path).map_err(|e| ServiceError::Internal(format!("read: {e}")))?;
        let record: JobRecord =
            serde_json::from_slice(&text).map_err(|e| ServiceError::Internal(format!("parse: {e}")))?;
        let mut plugins = BTreeMap::new();
        for (name, hash) in &record.plugins {
            let file = self.inner.components_dir.join(format!("{hash}.wasm"));
            let bytes = std::fs::read(&file)
                .map_err(|e| ServiceError::Internal(format!("component {}: {e}", file.display())))?;
            plugins.insert(name.clone(), bytes);
        }
        let submission = Submission {
            job: record.job,
            plugins,
            from: Some("latest".into()),
        };
        match self.submit(&record.tenant, submission.clone()) {
            // No snapshot yet: it had not checkpointed when the host went
            // down, so it starts over, as it would have on its first run.
            Err(ServiceError::NotFound(m)) if m.starts_with("no snapshot") => self.submit(
                &record.tenant,
                Submission {
                    from: None,
                    ..submission
                },
            ),
            r => r,
        }
    }

    /// The configuration the service runs with.
    pub fn config(&self) -> &HostConfig {
        &self.inner.config
    }

    /// Who holds `token` (the bearer token in clear).
    ///
    /// # Errors
    /// [`ServiceError::Unauthorized`] for no token or an unknown one.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Caller, ServiceError> {
        let token = token.ok_or(ServiceError::Unauthorized)?;
        // blake3::Hash compares in constant time.
        let hash = blake3::hash(token.as_bytes());
        if self.inner.config.admin_token == Some(hash) {
            return Ok(Caller::Admin);
        }
        self.inner
            .tenants
            .values()
            .find(|t| t.config.token == hash)
            .map(|t| Caller::Tenant(t.config.name.clone()))
            .ok_or(ServiceError::Unauthorized)
    }

    /// What a listing by `caller` covers; `tenant` is the `?tenant=` the
    /// caller asked for.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] for a tenant that does not exist or is not
    /// the caller's.
    pub fn scope(&self, caller: &Caller, tenant: Option<&str>) -> Result<Scope, ServiceError> {
        match (caller, tenant) {
            (Caller::Admin, None) => Ok(Scope::All),
            (_, _) => self.tenant_of(caller, tenant).map(Scope::Tenant),
        }
    }

    /// The one tenant an operation by `caller` acts in.
    ///
    /// # Errors
    /// [`ServiceError::BadRequest`] when the admin names no tenant;
    /// [`ServiceError::NotFound`] for a tenant that does not exist or is not
    /// the caller's (as if it did not exist).
    pub fn tenant_of(&self, caller: &Caller, tenant: Option<&str>) -> Result<String, ServiceError> {
        let name = match (caller, tenant) {
            (Caller::Tenant(own), None) => return Ok(own.clone()),
            (Caller::Tenant(own), Some(t)) if t == own => return Ok(own.clone()),
            (Caller::Tenant(_), Some(t)) => t,
            (Caller::Admin, Some(t)) => t,
            (Caller::Admin, None) => {
                return Err(ServiceError::bad(
                    "tenant_required",
                    "the admin token acts on a tenant's jobs and snapshots with ?tenant=NAME",
                ));
            }
        };
        if matches!(caller, Caller::Admin) && self.inner.tenants.contains_key(name) {
            return Ok(name.to_string());
        }
        Err(ServiceError::NotFound(format!("no tenant {name:?}")))
    }

    fn tenant(&self, name: &str) -> Result<&TenantEntry, ServiceError> {
        self.inner
            .tenants
            .get(name)
            .ok_or_else(|| ServiceError::NotFound(format!("no tenant {name:?}")))
    }

    fn tenants_in(&self, scope: &Scope) -> Vec<&TenantEntry> {
        match scope {
            Scope::All => self.inner.tenants.values().collect(),
            Scope::Tenant(t) => self.inner.tenants.get(t).into_iter().collect(),
        }
    }

    /// Submit a job over the API: confine it to the tenant, store its
    /// components, load (compile) its plugins and start it on its own
    /// thread. Blocks while compiling: call it off the async executor.
    ///
    /// # Errors
    /// [`ServiceError::BadRequest`] for an invalid job file, a plugin that
    /// was not uploaded or is not a valid component, a limit above the
    /// tenant's cap, a path leaving the tenant's directory, a malformed
    /// `from`; [`ServiceError::Conflict`] if a job of that name is running;
    /// [`ServiceError::TooManyJobs`]; [`ServiceError::NotFound`] for a
    /// `from` snapshot the tenant does not have.
    pub fn submit(&self, tenant: &str, submission: Submission) -> Result<Arc<ServiceJob>, ServiceError> {
        let entry = self.tenant(tenant)?;
        let base_dir = self.inner.files_dir.join(tenant);
        let mut spec = JobSpec::from_toml(&submission.job, Path::new("<submitted>"), &base_dir)
            .map_err(|e| ServiceError::bad("invalid_job", e.to_string()))?;
        // Cheap checks first: do not compile plugins for a job that cannot run.
        self.check_capacity(tenant, &spec.name)?;
        confine(&mut spec)?;
        apply_caps(&mut spec, &submission.job, &entry.config)?;
        for name in submission.plugins.keys() {
            validate_name(name).map_err(|r| ServiceError::bad("bad_request", format!("plugin name {r}")))?;
        }
        let mut plugins = BTreeMap::new();
        for (i, op) in spec.operators.iter_mut().enumerate() {
            let name = op.plugin.to_string_lossy().into_owned();
            let bytes = submission.plugins.get(&name).ok_or_else(|| {
                let uploaded: Vec<&str> = submission.plugins.keys().map(String::as_str).collect();
                ServiceError::bad(
                    "invalid_job",
                    format!(
                        "operators[{i}].plugin: {name:?} was not uploaded (uploaded: {})",
                        if uploaded.is_empty() {
                            "none".to_string()
                        } else {
                            uploaded.join(", ")
                        }
                    ),
                )
            })?;
            // Validate before storing: the error names the uploaded name, and
            // what is no component is never kept (compiled once: the cache
            // is by content, so loading the stored file later hits it).
            entry
                .host
                .runtime()
                .load_bytes(Path::new(&name), bytes)
                .map_err(|e| ServiceError::bad("invalid_plugin", format!("operator `{}`: {e}", op.name)))?;
            op.plugin = self.store_component(bytes)?;
            plugins.insert(name, blake3::hash(bytes).to_hex().to_string());
        }
        std::fs::create_dir_all(&base_dir)
            .map_err(|e| ServiceError::Internal(format!("create {}: {e}", base_dir.display())))?;
        let record = JobRecord {
            tenant: tenant.to_string(),
            job: submission.job.clone(),
            plugins,
        };
        self.launch(tenant, entry, spec, submission.from.as_deref(), Some(record))
    }

    /// Start a job from a file of the operator's (a boot job): trusted, so
    /// its paths are used as written; the tenant's caps and limits apply.
    ///
    /// # Errors
    /// As [`Service::submit`], and an unreadable file.
    pub fn submit_file(
        &self,
        tenant: &str,
        path: &Path,
        from: Option<&str>,
    ) -> Result<Arc<ServiceJob>, ServiceError> {
        let entry = self.tenant(tenant)?;
        let text = std::fs::read_to_string(path).map_err(|e| {
            ServiceError::bad(
                "invalid_job",
                format!("cannot read job file {}: {e}", path.display()),
            )
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut spec = JobSpec::from_toml(&text, path, &base)
            .map_err(|e| ServiceError::bad("invalid_job", e.to_string()))?;
        self.check_capacity(tenant, &spec.name)?;
        apply_caps(&mut spec, &text, &entry.config)?;
        // Not recorded: the config starts boot jobs at every start anyway.
        self.launch(tenant, entry, spec, from, None)
    }

    /// Store a component under its blake3 hash (written once, atomically).
    fn store_component(&self, bytes: &[u8]) -> Result<PathBuf, ServiceError> {
        let path = self
            .inner
            .components_dir
            .join(format!("{}.wasm", blake3::hash(bytes).to_hex()));
        if path.exists() {
            return Ok(path);
        }
        let io =
            |e: std::io::Error| ServiceError::Internal(format!("store component {}: {e}", path.display()));
        let mut tmp = tempfile::NamedTempFile::new_in(&self.inner.components_dir).map_err(io)?;
        std::io::Write::write_all(&mut tmp, bytes).map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        Ok(path)
    }

    /// Refuse early when the job could not be admitted anyway.
    fn check_capacity(&self, tenant: &str, name: &str) -> Result<(), ServiceError> {
        let jobs = self.inner.jobs.lock().unwrap();
        self.admit(&jobs, tenant, name)
    }

    fn admit(
        &self,
        jobs: &BTreeMap<(String, String), Arc<ServiceJob>>,
        tenant: &str,
        name: &str,
    ) -> Result<(), ServiceError> {
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
                .filter(|j| t.is_none_or(|t| j.tenant == t) && !j.has_ended())
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

    fn launch(
        &self,
        tenant: &str,
        entry: &TenantEntry,
        spec: JobSpec,
        from: Option<&str>,
        record: Option<JobRecord>,
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
            e @ HostError::Spec(_) => ServiceError::bad("invalid_job", e.to_string()),
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
        let job = Arc::new(job);
        let service_job = Arc::new(ServiceJob {
            tenant: tenant.to_string(),
            name: name.clone(),
            control: job.control(),
            status: job.status_handle(),
            job: job.clone(),
            outcome: Arc::new(Mutex::new(None)),
            thread: Mutex::new(None),
            requests: crate::coordinator::RequestLog::default(),
            submitted_at_ms: crate::store::now_ms(),
        });
        {
            // Admit and insert under one lock: two submissions racing for
            // the last slot (or the same name) cannot both get in.
            let mut jobs = self.inner.jobs.lock().unwrap();
            self.admit(&jobs, tenant, &name)?;
            // Recorded after admission (a refused duplicate must not
            // overwrite the running job's record) and before the job runs
            // (a crash from here on finds it).
            let record_path = match &record {
                Some(r) => {
                    let path = self.inner.records_dir.join(tenant).join(format!("{name}.json"));
                    let bytes = serde_json::to_vec_pretty(r)
                        .map_err(|e| ServiceError::Internal(format!("encode job record: {e}")))?;
                    write_durably(&path, &bytes).map_err(|e| {
                        ServiceError::Internal(format!("write job record {}: {e}", path.display()))
                    })?;
                    Some(path)
                }
                None => None,
            };
            jobs.insert((tenant.to_string(), name.clone()), service_job.clone());
            prune_ended(&mut jobs, tenant);
            let outcome = service_job.outcome.clone();
            let shutting_down = self.inner.shutting_down.clone();
            let label = format!("job-{tenant}-{name}");
            let handle = std::thread::Builder::new()
                .name(label.chars().take(15).collect())
                .spawn(move || {
                    let result = job
                        .run(RunOptions { from })
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    if let Err(e) = &result {
                        tracing::warn!(job = %job.spec().name, "job ended with an error: {e}");
                    }
                    // Ended for good, unless the service's own shutdown
                    // cancelled it: then the next start resumes it.
                    if let Some(path) = record_path
                        && !shutting_down.load(Ordering::SeqCst)
                        && let Err(e) = remove_durably(&path)
                    {
                        tracing::warn!(record = %path.display(), "cannot remove job record: {e}");
                    }
                    *outcome.lock().unwrap() = Some(result);
                })
                .map_err(|e| ServiceError::Internal(format!("spawn job thread: {e}")))?;
            *service_job.thread.lock().unwrap() = Some(handle);
        }
        tracing::info!(tenant, job = %name, "job started");
        Ok(service_job)
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
                Scope::Tenant(t) => &j.tenant == t,
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
        validate_name(name).map_err(|r| ServiceError::bad("bad_request", format!("job name {r}")))?;
        self.inner
            .jobs
            .lock()
            .unwrap()
            .get(&(tenant.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(format!("no job `{name}`")))
    }

    /// Stored snapshots (checkpoints and savepoints side by side) in
    /// `scope`, by tenant, job and number. Blocks on the store.
    ///
    /// # Errors
    /// Store I/O errors.
    pub fn snapshots(&self, scope: &Scope) -> Result<Vec<SnapshotView>, ServiceError> {
        let mut out = Vec::new();
        for t in self.tenants_in(scope) {
            let list = t
                .store
                .list(&ListFilter::all())
                .map_err(ServiceError::from_store)?;
            out.extend(list.iter().map(|m| SnapshotView::of(&t.config.name, m)));
        }
        Ok(out)
    }

    /// Dispose of the tenant's snapshot `id` (its blobs go at the next GC).
    ///
    /// # Errors
    /// [`ServiceError::BadRequest`] for a malformed id,
    /// [`ServiceError::NotFound`] if the tenant has no such snapshot.
    pub fn dispose(&self, tenant: &str, id: &str) -> Result<SnapshotId, ServiceError> {
        let id = SnapshotId::parse(id).map_err(ServiceError::from_store)?;
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
    /// Store I/O errors.
    pub fn usage_bytes(&self, tenant: &str) -> Result<u64, ServiceError> {
        self.tenant(tenant)?
            .store
            .usage_bytes()
            .map_err(ServiceError::from_store)
    }

    /// Prometheus text exposition of the jobs and tenants in `scope`.
    pub fn metrics(&self, scope: &Scope) -> String {
        metrics(self, scope)
    }

    /// Cancel every running job and wait for their threads (checkpoints
    /// stay where `persistent`). Their records stay: the next
    /// [`Service::start`] on this state directory resumes them.
    pub fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let jobs: Vec<_> = self.inner.jobs.lock().unwrap().values().cloned().collect();
        for j in &jobs {
            j.control.cancel();
        }
        for j in jobs {
            if let Some(h) = j.thread.lock().unwrap().take() {
                let _ = h.join();
            }
        }
    }
}

/// Write `path` so that after a crash it holds either nothing or all of
/// `bytes`: a synced temporary file renamed into place, then the directory
/// synced so the rename itself survives.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Remove `path` (gone already is fine) and sync its directory.
fn remove_durably(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Forget the oldest ended jobs of `tenant` beyond [`ENDED_JOBS_KEPT`].
fn prune_ended(jobs: &mut BTreeMap<(String, String), Arc<ServiceJob>>, tenant: &str) {
    let mut ended: Vec<(u64, (String, String))> = jobs
        .iter()
        .filter(|(_, j)| j.tenant == tenant && j.has_ended())
        .map(|(k, j)| (j.submitted_at_ms, k.clone()))
        .collect();
    if ended.len() > ENDED_JOBS_KEPT {
        ended.sort();
        for (_, k) in ended.iter().take(ended.len() - ENDED_JOBS_KEPT) {
            jobs.remove(k);
        }
    }
}

/// A relative path of normal components only: it cannot leave its base.
fn is_confined(path: &Path) -> bool {
    !path.as_os_str().is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Keep a submitted job inside its tenant: plugins by bare upload name,
/// file paths relative and without `..`, no stdout sink.
fn confine(spec: &mut JobSpec) -> Result<(), ServiceError> {
    for (i, op) in spec.operators.iter().enumerate() {
        let name = op.plugin.to_string_lossy();
        if op.plugin.components().count() != 1 || !is_confined(&op.plugin) {
            return Err(ServiceError::bad(
                "invalid_job",
                format!(
                    "operators[{i}].plugin: {name:?} must be the name of an uploaded component, not a path"
                ),
            ));
        }
    }
    if let SourceSpec::File { path, .. } = &spec.source
        && !is_confined(path)
    {
        return Err(ServiceError::bad(
            "invalid_job",
            format!(
                "source.path: {} must be a relative path inside the tenant's directory",
                path.display()
            ),
        ));
    }
    match &spec.sink {
        SinkSpec::File { path } if !is_confined(path) => Err(ServiceError::bad(
            "invalid_job",
            format!(
                "sink.path: {} must be a relative path inside the tenant's directory",
                path.display()
            ),
        )),
        SinkSpec::Stdout => Err(ServiceError::bad(
            "invalid_job",
            "sink.type: `stdout` is not available on a shared host (use `file` or `null`)",
        )),
        _ => Ok(()),
    }
}

/// Apply the tenant's caps to `[limits]`: an explicit value above a cap is
/// refused (the author asked for something the host will not give); a
/// default above it is lowered to the cap (the author asked for nothing).
fn apply_caps(spec: &mut JobSpec, text: &str, tenant: &TenantConfig) -> Result<(), ServiceError> {
    let explicit = |key: &str| {
        toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|t| t.get("limits").and_then(|l| l.get(key)).map(|_| ()))
            .is_some()
    };
    if let Some(cap) = tenant.memory
        && spec.limits.memory.0 > cap
    {
        if explicit("memory") {
            return Err(ServiceError::bad(
                "limit_exceeded",
                format!(
                    "limits.memory: {} bytes is above tenant {:?}'s cap of {cap} bytes",
                    spec.limits.memory.0, tenant.name
                ),
            ));
        }
        spec.limits.memory = HumanSize(cap);
    }
    if let Some(cap) = tenant.call_timeout
        && spec.limits.call_timeout.0 > cap
    {
        if explicit("call_timeout") {
            return Err(ServiceError::bad(
                "limit_exceeded",
                format!(
                    "limits.call_timeout: {} ms is above tenant {:?}'s cap of {} ms",
                    spec.limits.call_timeout.0.as_millis(),
                    tenant.name,
                    cap.as_millis()
                ),
            ));
        }
        spec.limits.call_timeout = HumanDuration(cap);
    }
    Ok(())
}

impl ServiceJob {
    /// Owning tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Job name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The job's specification (after the tenant's caps).
    pub fn spec(&self) -> &JobSpec {
        self.job.spec()
    }

    /// A copy of the job's status.
    pub fn status(&self) -> JobStatus {
        self.status.get()
    }

    /// Whether the job has ended (its run returned, or its state is final).
    pub fn has_ended(&self) -> bool {
        self.outcome.lock().unwrap().is_some() || self.status.get().state.is_terminal()
    }

    /// The job as the API shows it.
    pub fn view(&self) -> JobView {
        let st = self.status.get();
        let outcome = self.outcome.lock().unwrap().clone();
        let (state, error, savepoint) = match (&st.state, outcome) {
            (JobState::Failed { error }, _) => ("failed", Some(error.clone()), None),
            (JobState::Stopped { savepoint }, _) => ("stopped", None, Some(savepoint.clone())),
            (s, Some(Err(e))) if !s.is_terminal() => ("failed", Some(e), None),
            (JobState::Created, _) => ("created", None, None),
            (JobState::Running, _) => ("running", None, None),
            (JobState::Restarting, _) => ("restarting", None, None),
            (JobState::Finished, _) => ("finished", None, None),
            (JobState::Cancelled, _) => ("cancelled", None, None),
        };
        let spec = self.job.spec();
        JobView {
            tenant: self.tenant.clone(),
            name: self.name.clone(),
            state: state.to_string(),
            error,
            savepoint,
            restarts: st.restarts,
            restored_from: st.restored_from,
            records_in: st.records_in,
            counts: st.counts,
            submitted_at_ms: self.submitted_at_ms,
            started_at_ms: st.started_at_ms,
            operators: spec
                .operators
                .iter()
                .zip(self.job.components())
                .map(|(op, c)| OperatorView {
                    name: op.name.clone(),
                    parallelism: op.parallelism,
                    component: c.hash_hex(),
                })
                .collect(),
            limits: LimitsView {
                memory: spec.limits.memory.0,
                call_timeout_ms: spec.limits.call_timeout.0.as_millis() as u64,
            },
        }
    }

    /// Counts, summary, latest and history of the job's snapshots.
    pub fn checkpoints(&self) -> CheckpointsView {
        CheckpointsView::of(&self.status.get())
    }

    /// Snapshot `number` from the history, with its per-task figures.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] when it is not (or no longer) in the
    /// history.
    pub fn checkpoint(&self, number: u64) -> Result<SnapshotRecord, ServiceError> {
        self.status
            .get()
            .history
            .into_iter()
            .find(|r| r.number == number)
            .ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "no snapshot number {number} in the history of job `{}`",
                    self.name
                ))
            })
    }

    fn ensure_running(&self) -> Result<(), ServiceError> {
        if self.has_ended() {
            return Err(ServiceError::Conflict(format!(
                "job `{}` has ended ({})",
                self.name,
                self.view().state
            )));
        }
        Ok(())
    }

    /// Take a checkpoint now; returns the request id to poll.
    ///
    /// # Errors
    /// [`ServiceError::Conflict`] when the job has ended.
    pub fn trigger_checkpoint(&self) -> Result<String, ServiceError> {
        self.ensure_running()?;
        Ok(self.track(self.control.trigger_checkpoint()))
    }

    /// Take a savepoint now; returns the request id to poll.
    ///
    /// # Errors
    /// [`ServiceError::Conflict`] when the job has ended.
    pub fn trigger_savepoint(&self, format: Option<SnapshotFormat>) -> Result<String, ServiceError> {
        self.ensure_running()?;
        Ok(self.track(self.control.trigger_savepoint(format)))
    }

    /// Stop with a savepoint; returns the request id to poll.
    ///
    /// # Errors
    /// [`ServiceError::Conflict`] when the job has ended.
    pub fn stop(&self) -> Result<String, ServiceError> {
        self.ensure_running()?;
        Ok(self.track(self.control.stop_with_savepoint()))
    }

    /// Cancel the job.
    ///
    /// # Errors
    /// [`ServiceError::Conflict`] when the job has ended.
    pub fn cancel(&self) -> Result<(), ServiceError> {
        self.ensure_running()?;
        self.control.cancel();
        Ok(())
    }

    /// The status of trigger request `id`.
    ///
    /// # Errors
    /// [`ServiceError::BadRequest`] for a malformed id,
    /// [`ServiceError::NotFound`] for an unknown one.
    pub fn request(&self, id: &str) -> Result<RequestStatus, ServiceError> {
        let n: u64 = id
            .parse()
            .map_err(|_| ServiceError::bad("bad_request", format!("malformed request id {id:?}")))?;
        self.requests
            .get(n)
            .ok_or_else(|| ServiceError::NotFound(format!("no request {n} for job `{}`", self.name)))
    }

    /// Record a trigger and follow its outcome.
    fn track(&self, rx: crossbeam_channel::Receiver<TriggerResult>) -> String {
        self.requests.track(rx).to_string()
    }
}

/// Escape a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn metrics(service: &Service, scope: &Scope) -> String {
    use std::fmt::Write;
    let jobs = service.jobs(scope);
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    let job_labels = |j: &ServiceJob| format!("tenant=\"{}\",job=\"{}\"", label(&j.tenant), label(&j.name));
    let views: Vec<(String, CheckpointsView, JobView)> = jobs
        .iter()
        .map(|j| (job_labels(j), j.checkpoints(), j.view()))
        .collect();
    let per_job = |f: &dyn Fn(&CheckpointsView, &JobView) -> f64| -> Vec<(String, f64)> {
        views.iter().map(|(l, c, v)| (l.clone(), f(c, v))).collect()
    };
    family(
        "memento_job_running",
        "gauge",
        "1 while the job runs (or restarts), 0 once it ended.",
        per_job(&|_, v| {
            f64::from(u8::from(matches!(
                v.state.as_str(),
                "created" | "running" | "restarting"
            )))
        }),
    );
    family(
        "memento_job_records_in_total",
        "counter",
        "Records read by the job's source.",
        per_job(&|_, v| v.records_in as f64),
    );
    family(
        "memento_job_restarts_total",
        "counter",
        "Restarts after task failures.",
        per_job(&|_, v| f64::from(v.restarts)),
    );
    family(
        "memento_snapshots_completed_total",
        "counter",
        "Completed checkpoints and savepoints.",
        per_job(&|c, _| c.counts.completed as f64),
    );
    family(
        "memento_snapshots_failed_total",
        "counter",
        "Failed checkpoints and savepoints.",
        per_job(&|c, _| c.counts.failed as f64),
    );
    family(
        "memento_snapshots_in_progress",
        "gauge",
        "Snapshots in flight.",
        per_job(&|c, _| c.counts.in_progress as f64),
    );
    family(
        "memento_restores_total",
        "counter",
        "Restores from a snapshot.",
        per_job(&|c, _| c.counts.restored as f64),
    );
    let mut quantiles = |name: &str, help: &str, f: fn(&Summary) -> &Stats| {
        let mut rows = Vec::new();
        for (l, c, _) in &views {
            let s = f(&c.summary);
            for (q, v) in [
                ("0", s.min),
                ("0.5", s.p50),
                ("0.9", s.p90),
                ("0.99", s.p99),
                ("1", s.max),
            ] {
                rows.push((format!("{l},quantile=\"{q}\""), v as f64));
            }
        }
        family(name, "gauge", help, rows);
    };
    quantiles(
        "memento_snapshot_duration_ms",
        "Trigger-to-commit time of recent completed snapshots, by quantile.",
        |s| &s.duration_ms,
    );
    quantiles(
        "memento_snapshot_logical_bytes",
        "Logical state size of recent completed snapshots, by quantile.",
        |s| &s.logical_bytes,
    );
    quantiles(
        "memento_snapshot_new_bytes",
        "Bytes newly written by recent completed snapshots, by quantile.",
        |s| &s.new_bytes,
    );
    let tenants = service.tenants_in(scope);
    let tenant_rows = |f: &dyn Fn(&TenantEntry) -> f64| -> Vec<(String, f64)> {
        tenants
            .iter()
            .map(|t| (format!("tenant=\"{}\"", label(&t.config.name)), f(t)))
            .collect()
    };
    family(
        "memento_tenant_jobs_running",
        "gauge",
        "Running jobs of the tenant.",
        tenant_rows(&|t| {
            jobs.iter()
                .filter(|j| j.tenant == t.config.name && !j.has_ended())
                .count() as f64
        }),
    );
    family(
        "memento_tenant_storage_bytes",
        "gauge",
        "Bytes of snapshot blobs the tenant keeps (what its quota limits).",
        tenant_rows(&|t| t.store.usage_bytes().unwrap_or(0) as f64),
    );
    family(
        "memento_tenant_quota_bytes",
        "gauge",
        "The tenant's storage quota (absent: unlimited).",
        tenants
            .iter()
            .filter_map(|t| {
                t.config
                    .quota
                    .map(|q| (format!("tenant=\"{}\"", label(&t.config.name)), q as f64))
            })
            .collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Stats::of((1..=100).collect());
        assert_eq!((s.min, s.p50, s.p90, s.p99, s.max), (1, 50, 90, 99, 100));
        assert_eq!(Stats::of(vec![]), Stats::default());
        let one = Stats::of(vec![7]);
        assert_eq!((one.min, one.p50, one.p99, one.max), (7, 7, 7, 7));
    }

    #[test]
    fn confinement_rejects_paths_that_leave_the_tenant() {
        assert!(is_confined(Path::new("out/part")));
        for bad in ["/etc/passwd", "../x", "a/../../b", "", "./x"] {
            assert!(!is_confined(Path::new(bad)), "{bad}");
        }
    }
}
