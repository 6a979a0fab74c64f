//! The library's front door: a [`Host`] loads jobs and runs them. The CLI
//! (and later the REST API) call only this; an embedding service uses it the
//! same way.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::dataflow::{self, JobError, JobReport};
use crate::runtime::{ComponentInfo, LoadedComponent, Runtime, RuntimeError};
use crate::spec::{JobSpec, SpecError};

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
        source: RuntimeError,
    },
    /// The runtime could not start.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The run failed.
    #[error(transparent)]
    Job(#[from] JobError),
}

/// A memento host: the wasm runtime and its compiled-component cache.
/// Create one per process and share it (`Clone` is cheap).
#[derive(Clone)]
pub struct Host {
    runtime: Runtime,
}

impl Host {
    /// Start a host.
    ///
    /// # Errors
    /// When the wasm engine cannot be created.
    pub fn new() -> Result<Host, HostError> {
        Ok(Host {
            runtime: Runtime::new()?,
        })
    }

    /// The wasm runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Read a job file and load (validate, compile) its plugins.
    ///
    /// # Errors
    /// [`HostError::Spec`] for a bad job file, [`HostError::Plugin`] naming
    /// the operator whose plugin is missing or does not fit the contract.
    pub fn load_job_file(&self, path: &Path) -> Result<Job, HostError> {
        self.load_job(JobSpec::from_file(path)?)
    }

    /// Load the plugins of a parsed job.
    ///
    /// # Errors
    /// [`HostError::Plugin`] naming the operator.
    pub fn load_job(&self, spec: JobSpec) -> Result<Job, HostError> {
        let components = spec
            .operators
            .iter()
            .map(|op| {
                self.runtime
                    .load_file(&spec.resolve(&op.plugin))
                    .map_err(|source| HostError::Plugin {
                        operator: op.name.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Job {
            host: self.clone(),
            spec,
            components,
            cancel: Arc::new(AtomicBool::new(false)),
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

/// A job whose plugins are loaded, ready to run.
pub struct Job {
    host: Host,
    spec: JobSpec,
    components: Vec<Arc<LoadedComponent>>,
    cancel: Arc<AtomicBool>,
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

    /// A flag that cancels the run when set (from any thread).
    pub fn cancel_handle(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Run the job until its input ends.
    ///
    /// # Errors
    /// [`HostError::Job`] with the first failure of the run.
    pub fn run(&self) -> Result<JobReport, HostError> {
        Ok(dataflow::run(
            &self.host.runtime,
            &self.spec,
            &self.components,
            self.cancel.clone(),
        )?)
    }
}
