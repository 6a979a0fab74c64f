//! The Wasm side of the host: one wasmtime engine, component loading and
//! validation against the `memento:operator` contract, and sandboxed task
//! instances with a memory limit and a per-call deadline.
//!
//! This module knows nothing of the store, of jobs or of dataflow: it turns
//! component bytes into [`TaskInstance`]s and reports what went wrong in
//! terms a plugin author can act on ([`RuntimeError`]).

mod bindings;
mod component;
// Measured and tested, not yet used by capture (see its module docs).
#[cfg_attr(not(test), allow(dead_code))]
mod dirty;
mod instance;
mod memory;
mod native;

pub use bindings::{Context, Event};
pub use component::{ComponentInfo, LoadedComponent};
pub use instance::{CallStats, CapturedMemory, Phase, TaskInstance, TaskLabel};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine};

/// The WIT package version this host implements.
pub const CONTRACT_PACKAGE: &str = "memento:operator@0.1.0";
/// The interface every plugin must export.
pub const OPERATOR_INTERFACE: &str = "memento:operator/operator@0.1.0";
/// The interface that carries canonical snapshots.
pub const SNAPSHOT_INTERFACE: &str = "memento:operator/snapshot@0.1.0";

/// How often the deadline clock ticks. A call overruns its deadline by at
/// most one tick.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Limits applied to every task instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Maximum size of each linear memory of an instance, in bytes.
    /// Growth beyond it traps the instance with a "memory limit" error.
    pub memory_bytes: u64,
    /// Maximum wall time of one call into the guest. An overrun traps the
    /// instance with a "deadline exceeded" error.
    pub call_timeout: Duration,
}

impl Default for SandboxLimits {
    /// 512 MiB of memory and 10 s per call.
    fn default() -> Self {
        SandboxLimits {
            memory_bytes: 512 << 20,
            call_timeout: Duration::from_secs(10),
        }
    }
}

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
    /// A native snapshot of the instance is not possible (unsupported
    /// component, host resources held by the guest).
    #[error("{task}: native snapshot refused: {reason}")]
    NativeSnapshot { task: TaskLabel, reason: String },
    /// The instance trapped earlier and cannot be called again.
    #[error("{task}: instance is poisoned by an earlier trap")]
    Poisoned { task: TaskLabel },
}

/// The host's wasm engine plus the compiled-component cache.
///
/// Cheap to share (`Clone` is an `Arc` bump); create one per process. A
/// background thread advances the engine's epoch every 10 ms to enforce call
/// deadlines; it stops when the last clone is dropped.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<instance::TaskState>,
    cache: Mutex<HashMap<[u8; 32], Arc<LoadedComponent>>>,
    ticker: Mutex<Option<(Arc<AtomicBool>, JoinHandle<()>)>>,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.ticker.lock().unwrap().take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}

impl Runtime {
    /// Create the engine (Cranelift, component model, epoch interruption).
    ///
    /// # Errors
    /// [`RuntimeError::Engine`] if wasmtime rejects the configuration.
    pub fn new() -> Result<Runtime, RuntimeError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // The host owns every linear memory, so native snapshots can copy
        // them between calls at no cost to guest code. Copy-on-write
        // initialisation would map the module's data image over our mapping
        // behind our back; plain copying of the data segments keeps the
        // mapping ours (and is what a restore overwrites anyway).
        config.with_host_memory(Arc::new(memory::HostMemoryCreator));
        config.memory_init_cow(false);
        let engine = Engine::new(&config).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let linker = instance::build_linker(&engine).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.weak();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("memento-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        match engine.upgrade() {
                            Some(engine) => engine.increment_epoch(),
                            None => break,
                        }
                    }
                })
                .map_err(|e| RuntimeError::Engine(format!("cannot start the epoch thread: {e}")))?
        };
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                cache: Mutex::new(HashMap::new()),
                ticker: Mutex::new(Some((stop, ticker))),
            }),
        })
    }

    /// The underlying wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Load, validate and compile the component at `path`. Compiled
    /// components are cached by the blake3 hash of their bytes.
    ///
    /// # Errors
    /// [`RuntimeError::Read`] if the file cannot be read, and
    /// [`RuntimeError::Invalid`] if it is not a component implementing
    /// `memento:operator/plugin@0.1.0`; both name the file.
    pub fn load_file(&self, path: &Path) -> Result<Arc<LoadedComponent>, RuntimeError> {
        let read_err = |reason: String| RuntimeError::Read {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| read_err(e.to_string()))?;
        if !meta.is_file() {
            return Err(read_err("not a file".into()));
        }
        let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
        self.load_bytes(path, &bytes)
    }

    /// Like [`Runtime::load_file`] for bytes already in memory; `origin`
    /// names them in errors.
    ///
    /// # Errors
    /// [`RuntimeError::Invalid`] naming `origin`.
    pub fn load_bytes(&self, origin: &Path, bytes: &[u8]) -> Result<Arc<LoadedComponent>, RuntimeError> {
        let hash = *blake3::hash(bytes).as_bytes();
        if let Some(hit) = self.inner.cache.lock().unwrap().get(&hash) {
            return Ok(hit.clone());
        }
        // Compile outside the lock: compiling takes long and other tasks may
        // want other components meanwhile.
        let loaded = Arc::new(component::load(
            &self.inner.engine,
            &self.inner.linker,
            origin,
            bytes,
            hash,
        )?);
        self.inner.cache.lock().unwrap().insert(hash, loaded.clone());
        Ok(loaded)
    }

    /// Describe a component file without requiring it to fit the contract:
    /// its imports, exports, and whether (and why not) it is a memento
    /// operator.
    ///
    /// # Errors
    /// [`RuntimeError::Read`] / [`RuntimeError::Invalid`] when the file is not
    /// a readable, valid component at all.
    pub fn inspect_file(&self, path: &Path) -> Result<ComponentInfo, RuntimeError> {
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        component::inspect(&self.inner.engine, &self.inner.linker, path, &bytes)
    }

    /// Instantiate `component` as one task in a fresh, sandboxed store.
    ///
    /// # Errors
    /// [`RuntimeError::Instantiate`] naming the task and plugin.
    pub fn instantiate(
        &self,
        component: &Arc<LoadedComponent>,
        label: TaskLabel,
        limits: &SandboxLimits,
    ) -> Result<TaskInstance, RuntimeError> {
        TaskInstance::new(
            &self.inner.engine,
            component.clone(),
            label,
            limits,
            EPOCH_TICK,
            &[],
        )
    }

    /// Instantiate `component` with its linear memories created at
    /// `memory_sizes` bytes (creation order) instead of their minimum: the
    /// first step of a native restore, which then overwrites the memories
    /// (data segments were applied inside them) before any call.
    ///
    /// # Errors
    /// [`RuntimeError::Instantiate`] naming the task and plugin, also when
    /// the sizes exceed the memory limit or the component creates another
    /// number of memories.
    pub fn instantiate_presized(
        &self,
        component: &Arc<LoadedComponent>,
        label: TaskLabel,
        limits: &SandboxLimits,
        memory_sizes: &[u64],
    ) -> Result<TaskInstance, RuntimeError> {
        let sizes: Vec<usize> = memory_sizes
            .iter()
            .map(|&s| usize::try_from(s).unwrap_or(usize::MAX))
            .collect();
        TaskInstance::new(
            &self.inner.engine,
            component.clone(),
            label,
            limits,
            EPOCH_TICK,
            &sizes,
        )
    }
}
