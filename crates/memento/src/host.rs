//! The library's front door: a [`Host`] loads jobs and runs them. The CLI
//! (and the REST API) call only this; an embedding service uses it the same
//! way.
//!
//! ```no_run
//! use memento::{Host, RunOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let host = Host::open(std::path::Path::new("memento-state"))?;
//! let job = host.load_job_file("examples/words.toml".as_ref())?;
//! let control = job.control(); // trigger savepoints, stop or cancel from any thread
//! let report = job.run(RunOptions::default())?;
//! println!("{} records in, {} snapshots", report.source_records, report.snapshots.len());
//! # drop(control);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::Receiver;

use crate::coordinator::{
    Control, Coordinator, JobControl, JobFailed, JobReport, JobStatus, StatusHandle, check_fits,
    component_hashes, resume_point_before,
};
use crate::runtime::{
    ComponentInfo, LoadedComponent, NativeUnsupported, Runtime, RuntimeError, RuntimeOptions,
};
use crate::spec::{JobSpec, SnapshotFormat, SpecError};
use crate::store::{
    InvalidName, JobName, Manifest, SnapshotId, Store, StoreError, StoreLocation, StoreOptions, TenantStore,
};

/// The tenant of a single-user host (the CLI without `--tenant`).
pub const DEFAULT_TENANT: &str = "default";

/// Why a job could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The job file is unreadable or invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// An operator's plugin could not be loaded.
    #[error("operator `{operator}`: {source}")]
    Plugin {
        /// The operator whose plugin failed.
        operator: String,
        /// What was wrong with it.
        source: Box<RuntimeError>,
    },
    /// `[checkpoints]` or `[savepoints]` asks for native snapshots of an
    /// operator whose component cannot be imaged.
    #[error(
        "operator `{operator}`: [{section}] format = \"native\" needs a component whose state is all in \
         its memories, and this one's is not: {reason}; use \"auto\" (native where possible) or \"canonical\""
    )]
    NativeUnsupported {
        /// The operator.
        operator: String,
        /// `checkpoints` or `savepoints`.
        section: &'static str,
        /// Why its component cannot be imaged.
        reason: NativeUnsupported,
    },
    /// The job asks for periodic snapshots, but its source cannot seek
    /// back to a snapshot's position, so restoring one would lose or
    /// repeat input.
    #[error(
        "job `{job}`: its {source_name} cannot seek, so it cannot take exactly-once snapshots; \
         remove [{section}] {key} or give the job a source that can seek"
    )]
    SourceCannotSeek {
        /// The job.
        job: String,
        /// The source.
        source_name: String,
        /// `checkpoints` or `savepoints`.
        section: &'static str,
        /// The setting that asks for snapshots.
        key: &'static str,
    },
    /// The runtime could not start.
    #[error(transparent)]
    Runtime(Box<RuntimeError>),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No snapshot to resume from (none since the job last started over
    /// from scratch).
    #[error(
        "no snapshot of job `{job}` to resume from (`--from latest` considers the snapshots taken since the job \
         last started from scratch; older ones are restorable by id)"
    )]
    NoSnapshot {
        /// The job.
        job: String,
    },
    /// Another run of the job holds it: another process on the same store,
    /// or another run in this one.
    #[error(
        "job `{job}` is already running on this store (tenant {tenant}); a job runs once at a time \
         -- stop the other run first"
    )]
    JobBusy {
        /// Tenant of the job.
        tenant: String,
        /// The job.
        job: String,
    },
    /// The run failed for good.
    #[error(transparent)]
    Job(Box<JobFailed>),
}

impl From<InvalidName> for HostError {
    fn from(e: InvalidName) -> Self {
        HostError::Store(e.into())
    }
}

impl From<RuntimeError> for HostError {
    fn from(e: RuntimeError) -> Self {
        HostError::Runtime(Box::new(e))
    }
}

impl From<Box<JobFailed>> for HostError {
    fn from(e: Box<JobFailed>) -> Self {
        HostError::Job(e)
    }
}

/// Where a run starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StartFrom {
    /// From the beginning of the input, with empty state.
    #[default]
    Scratch,
    /// From the newest complete snapshot (checkpoint or savepoint) of the job.
    Latest,
    /// From this snapshot.
    Snapshot(SnapshotId),
}

/// Options of one run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Where to start.
    pub from: StartFrom,
}

/// A memento host: the wasm runtime with its compiled-component cache, and
/// the unified snapshot store. Create one per process and share it (`Clone`
/// is cheap).
#[derive(Clone)]
pub struct Host {
    runtime: Runtime,
    store: Store,
}

/// The default directory of the compiled-component cache of a host whose
/// state directory is `state_dir`: `<state_dir>/cache`, beside the store
/// (which ignores it).
pub fn default_cache_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cache")
}

impl Host {
    /// Start a host whose snapshots live in `state_dir` (created if
    /// missing): a local directory (a `&Path`), or any [`StoreLocation`]
    /// such as `s3://bucket/prefix` (cargo feature `s3`). Compiled
    /// components are cached in [`default_cache_dir`]`(state_dir)` for a
    /// local directory, and not at all for object storage (the cache is
    /// local and trusted: give one with [`Host::open_with_runtime`]).
    ///
    /// # Errors
    /// When the wasm engine cannot be created, the cache directory cannot
    /// be created, or the store cannot be opened.
    pub fn open(state_dir: impl Into<StoreLocation>) -> Result<Host, HostError> {
        Host::open_with(state_dir, StoreOptions::default())
    }

    /// Start a host whose store is opened with `options` (quotas,
    /// durability).
    ///
    /// # Errors
    /// As [`Host::open`].
    pub fn open_with(state_dir: impl Into<StoreLocation>, options: StoreOptions) -> Result<Host, HostError> {
        let location = state_dir.into();
        let runtime = RuntimeOptions {
            cache_dir: location.local_path().map(default_cache_dir),
            ..RuntimeOptions::default()
        };
        Host::open_with_runtime(location, options, runtime)
    }

    /// Start a host with `runtime` options as given: among them where the
    /// compiled-component cache lives ([`RuntimeOptions::cache_dir`];
    /// `None` compiles every component in every process) and its bound.
    ///
    /// # Errors
    /// As [`Host::open`].
    pub fn open_with_runtime(
        state_dir: impl Into<StoreLocation>,
        options: StoreOptions,
        runtime: RuntimeOptions,
    ) -> Result<Host, HostError> {
        Ok(Host {
            runtime: Runtime::with_options(runtime)?,
            store: Store::open_location(&state_dir.into(), options)?,
        })
    }

    /// A host sharing this one's runtime (engine and component cache) but
    /// snapshotting into `store`: how a multi-tenant service gives each
    /// tenant its own store options (quota) without a second engine.
    pub fn with_store(&self, store: Store) -> Host {
        Host {
            runtime: self.runtime.clone(),
            store,
        }
    }

    /// The wasm runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The unified snapshot store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Read a job file and load (validate, compile) its plugins, for the
    /// default tenant.
    ///
    /// # Errors
    /// [`HostError::Spec`] for a bad job file, [`HostError::Plugin`] naming
    /// the operator whose plugin is missing or does not fit the contract.
    pub fn load_job_file(&self, path: &Path) -> Result<Job, HostError> {
        self.load_job(JobSpec::from_file(path)?, DEFAULT_TENANT)
    }

    /// Load the plugins of a parsed job for `tenant`.
    ///
    /// # Errors
    /// [`HostError::Plugin`] naming the operator; store errors for a bad
    /// tenant name.
    pub fn load_job(&self, spec: JobSpec, tenant: &str) -> Result<Job, HostError> {
        // Directory grants must stay inside the job file's directory, also
        // through symlinks; checked against the filesystem here because
        // parsing the job file does not touch it.
        for (i, op) in spec.operators.iter().enumerate() {
            for (j, g) in op.grants.iter().enumerate() {
                g.resolve(&spec.base_dir).map_err(|reason| SpecError::Invalid {
                    path: spec.base_dir.clone(),
                    field: format!("operators[{i}].grants[{j}].dir"),
                    reason: reason.to_string(),
                })?;
            }
        }
        let components = spec
            .operators
            .iter()
            .map(|op| {
                self.runtime
                    .load_file(&spec.resolve(&op.plugin))
                    .map_err(|source| HostError::Plugin {
                        operator: op.name.clone(),
                        source: Box::new(source),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        check_native_formats(&spec, &components)?;
        check_source_seeks(&spec)?;
        let (control, control_rx) = JobControl::new();
        Ok(Job {
            host: self.clone(),
            store: self.store.tenant(tenant)?,
            status: StatusHandle::new(&spec.name),
            spec,
            components,
            control,
            control_rx,
        })
    }

    /// Describe a component file (`memento inspect`).
    ///
    /// # Errors
    /// When the file is unreadable or not a valid component at all.
    pub fn inspect(&self, path: &Path) -> Result<ComponentInfo, HostError> {
        Ok(self.runtime.inspect_file(path)?)
    }
}

/// A job that asks for `format = "native"` gets it for every operator or
/// does not load: finding out at the first checkpoint would be too late.
fn check_native_formats(spec: &JobSpec, components: &[Arc<LoadedComponent>]) -> Result<(), HostError> {
    let sections = [
        ("checkpoints", spec.checkpoints.format),
        ("savepoints", spec.savepoints.format),
    ];
    for (section, _) in sections.iter().filter(|(_, f)| *f == SnapshotFormat::Native) {
        for (op, component) in spec.operators.iter().zip(components) {
            if let Err(reason) = component.native_support() {
                return Err(HostError::NativeUnsupported {
                    operator: op.name.clone(),
                    section,
                    reason,
                });
            }
        }
    }
    Ok(())
}

/// A job whose source cannot seek takes no periodic snapshots: each would
/// promise a restore that cannot keep its input exactly-once.
fn check_source_seeks(spec: &JobSpec) -> Result<(), HostError> {
    if spec.source.can_seek() {
        return Ok(());
    }
    let asked = [
        ("checkpoints", "interval", spec.checkpoints.interval.is_some()),
        ("savepoints", "interval", spec.savepoints.interval.is_some()),
        ("savepoints", "cron", spec.savepoints.cron.is_some()),
    ];
    match asked.into_iter().find(|(_, _, on)| *on) {
        Some((section, key, _)) => Err(HostError::SourceCannotSeek {
            job: spec.name.clone(),
            source_name: spec.source.describe(),
            section,
            key,
        }),
        None => Ok(()),
    }
}

/// A job whose plugins are loaded, ready to run.
pub struct Job {
    host: Host,
    store: TenantStore,
    spec: JobSpec,
    components: Vec<Arc<LoadedComponent>>,
    control: JobControl,
    control_rx: Receiver<Control>,
    status: StatusHandle,
}

impl Job {
    /// The job's specification.
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// The loaded plugin of each operator, in chain order.
    pub fn components(&self) -> &[Arc<LoadedComponent>] {
        &self.components
    }

    /// A handle to trigger snapshots, stop or cancel the run from another
    /// thread.
    pub fn control(&self) -> JobControl {
        self.control.clone()
    }

    /// A copy of the job's current status: state, snapshot counts and
    /// history (for APIs and dashboards).
    pub fn status(&self) -> JobStatus {
        self.status.get()
    }

    /// A handle that reads the status from another thread.
    pub fn status_handle(&self) -> StatusHandle {
        self.status.clone()
    }

    /// The tenant's store this job snapshots into.
    pub fn store(&self) -> &TenantStore {
        &self.store
    }

    /// The snapshot `from` names, checked to exist.
    ///
    /// # Errors
    /// [`HostError::NoSnapshot`] for `Latest` without snapshots; store
    /// errors (not found, damaged) for an id.
    pub fn resolve_start(&self, from: &StartFrom) -> Result<Option<Manifest>, HostError> {
        let job = JobName::new(&self.spec.name)?;
        let m = match from {
            StartFrom::Scratch => Ok(None),
            StartFrom::Latest => match self.store.latest(&job)? {
                Some(m) => Ok(Some(m)),
                None => Err(HostError::NoSnapshot {
                    job: self.spec.name.clone(),
                }),
            },
            StartFrom::Snapshot(id) => Ok(Some(self.store.get(id)?)),
        }?;
        if m.is_some() && !self.spec.source.can_seek() {
            return Err(HostError::Job(Box::new(JobFailed {
                error: crate::dataflow::JobError::Source(crate::io::SourceError::CannotSeek {
                    source_name: self.spec.source.describe(),
                }),
                restarts: 0,
                resume_from: None,
                searched_older: false,
            })));
        }
        if let Some(m) = &m {
            // Refuse a snapshot that cannot start this job before anything
            // runs (a submission over the API is answered at once, and no
            // output is touched), offering one that can.
            let components = component_hashes(&self.spec, &self.components);
            if let Err(error) = check_fits(&self.spec, &job, &components, m) {
                let searched_older = m.job == job;
                let resume_from = searched_older
                    .then(|| resume_point_before(&self.store, &self.spec, &job, &components, &m.id))
                    .flatten();
                return Err(HostError::Job(Box::new(JobFailed {
                    error,
                    restarts: 0,
                    resume_from,
                    searched_older,
                })));
            }
        }
        Ok(m)
    }

    /// Run the job until its input ends, it is stopped or cancelled, or it
    /// fails for good (after the restarts its strategy allows).
    ///
    /// # Errors
    /// [`HostError::Job`] with the last failure and the snapshot kept to
    /// resume from; errors resolving `options.from`;
    /// [`HostError::JobBusy`] if another run of the job is using the store.
    pub fn run(&self, options: RunOptions) -> Result<JobReport, HostError> {
        let job = JobName::new(&self.spec.name)?;
        self.control.set_ended(false);
        // Whatever happens below, requests nobody will take get an answer.
        let _ended = Ended(&self.control);
        // One run of a job per store at a time: two would commit into the
        // same output and snapshot sequence.
        let Some(_lease) = self.store.lease_series(&job)? else {
            return Err(HostError::JobBusy {
                tenant: self.store.name().to_string(),
                job: job.to_string(),
            });
        };
        let from = self.resolve_start(&options.from)?;
        if from.is_none() {
            // Starting over discards earlier runs' output; from now on their
            // snapshots are no restore points for `latest`.
            self.store.fence_series(&job)?;
        }
        let coordinator = Coordinator::new(
            &self.host.runtime,
            &self.spec,
            &self.components,
            self.store.clone(),
            self.control_rx.clone(),
            self.status.clone(),
        )
        .map_err(|e| {
            Box::new(JobFailed {
                error: e,
                restarts: 0,
                resume_from: None,
                searched_older: false,
            })
        })?;
        Ok(coordinator.run(from)?)
    }
}

/// Marks the run ended when dropped (see [`JobControl::set_ended`]).
struct Ended<'a>(&'a JobControl);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.set_ended(true);
    }
}
