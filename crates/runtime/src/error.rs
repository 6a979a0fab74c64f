//! What can go wrong loading or running a plugin, in terms a plugin author
//! can act on.

use std::path::PathBuf;
use std::time::Duration;

use crate::batch::MalformedBatch;
use crate::label::{Phase, TaskLabel};
use crate::native::NativeUnsupported;

/// Everything that can go wrong loading or running a plugin. Each variant
/// names the plugin and, for calls, the task and the lifecycle phase.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The component file could not be read.
    #[error("cannot read component {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// The bytes are not a component implementing the contract.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// The engine could not be created (bad engine configuration).
    #[error("cannot create the wasm engine: {0}")]
    Engine(String),
    /// The compiled-component cache directory cannot be used.
    #[error("compiled-component cache directory {path}: {reason}")]
    CacheDir { path: PathBuf, reason: String },
    /// Instantiation failed (missing import, start function trapped, ...).
    #[error("{task}: cannot instantiate {plugin}: {reason}")]
    Instantiate {
        task: TaskLabel,
        plugin: String,
        reason: String,
    },
    /// A call ran past the configured deadline and was interrupted.
    #[error("{task}: deadline exceeded in `{phase}` (call timeout {timeout:?})")]
    DeadlineExceeded {
        task: TaskLabel,
        phase: Phase,
        timeout: Duration,
    },
    /// The call used up its fuel (`[limits] fuel`).
    #[error("{task}: fuel exhausted in `{phase}` (limit {fuel} per call)")]
    FuelExhausted {
        task: TaskLabel,
        phase: Phase,
        fuel: u64,
    },
    /// The guest returned more than the host accepts from one call
    /// (`[limits] max_output` or `max_snapshot`).
    #[error("{task}: `{phase}` returned more than {limit} bytes (limits.{key})")]
    OutputLimit {
        task: TaskLabel,
        phase: Phase,
        /// The job-file key of the limit.
        key: &'static str,
        limit: u64,
    },
    /// The guest exceeded a resource cap: live host resources, table
    /// elements.
    #[error("{task}: resource limit exceeded in `{phase}`: {detail}")]
    ResourceLimit {
        task: TaskLabel,
        phase: Phase,
        detail: String,
    },
    /// Fuel was asked for on a runtime compiled without metering.
    #[error("{task}: `[limits] fuel` is set but this host runs without fuel metering")]
    FuelUnavailable { task: TaskLabel },
    /// The guest tried to grow a memory past the limit.
    #[error("{task}: memory limit exceeded in `{phase}`: {detail}")]
    MemoryLimit {
        task: TaskLabel,
        phase: Phase,
        detail: String,
    },
    /// The guest trapped (panic, unreachable, out-of-bounds access, ...).
    #[error("{task}: plugin trapped in `{phase}`: {message}")]
    Trap {
        task: TaskLabel,
        phase: Phase,
        message: String,
    },
    /// The guest returned an error value from an export.
    #[error("{task}: `{phase}` returned an error: {message}")]
    Guest {
        task: TaskLabel,
        phase: Phase,
        message: String,
    },
    /// The host's own check of what the guest returned failed: the plugin
    /// ran fine but its result breaks the contract.
    #[error("{task}: the host rejected the output of `{phase}`: {source}")]
    MalformedOutput {
        task: TaskLabel,
        phase: Phase,
        source: MalformedBatch,
    },
    /// The host refused canonical state passing through it: a piece the
    /// contract forbids (too long, a key group the task does not own),
    /// keyed state for a 0.1.0 component, or a sink that failed.
    #[error("{task}: the host refused the state of `{phase}`: {reason}")]
    StateRefused {
        task: TaskLabel,
        phase: Phase,
        reason: String,
    },
    /// The state to restore could not be read (the source failed).
    #[error("{task}: cannot read the state to restore: {reason}")]
    StateUnreadable { task: TaskLabel, reason: String },
    /// A native snapshot of the instance is not possible (unsupported
    /// component, host resources held by the guest).
    #[error("{task}: native snapshot refused: {reason}")]
    NativeSnapshot { task: TaskLabel, reason: NativeRefusal },
    /// The instance trapped earlier and cannot be called again.
    #[error("{task}: instance is poisoned by an earlier trap")]
    Poisoned { task: TaskLabel },
}

/// Why a native image of an instance cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NativeRefusal {
    /// The component's state is not all in its memories (decided at load).
    #[error("{component} does not support native snapshots: {source}")]
    Unsupported {
        /// The component's name.
        component: String,
        /// Why.
        source: Box<NativeUnsupported>,
    },
    /// The guest holds host resources between calls, which an image of
    /// its memories would carry as dead handles.
    #[error(
        "the plugin holds {} host resource(s) across calls ({}), e.g. a cached stdout handle after \
         printing; a memory image cannot carry them over. Log through the `log` import instead of \
         printing, or use format = \"canonical\"",
        .resources.len(),
        .resources.join(", ")
    )]
    HeldResources {
        /// What each held resource is.
        resources: Vec<String>,
    },
    /// The globals of an image do not fit the instance.
    #[error("{0}")]
    Globals(String),
}

/// The error chain of a wasmtime error on one line.
pub(crate) fn one_line(e: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}
