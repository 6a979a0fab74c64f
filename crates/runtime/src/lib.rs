//! The Wasm side of the host: one wasmtime engine, component loading and
//! validation against the `memento:operator` contract, and sandboxed task
//! instances with a memory limit and a per-call deadline.
//!
//! This module knows nothing of the store, of jobs or of dataflow: it turns
//! component bytes into [`TaskInstance`]s and reports what went wrong in
//! terms a plugin author can act on ([`RuntimeError`]).

mod batch;
mod bindings;
mod component;
mod dirty;
mod instance;
mod memory;
mod native;
#[doc(hidden)]
pub mod uffd;

pub use batch::Event;
pub use bindings::Context;
pub use component::{ComponentInfo, LoadedComponent};
pub use instance::{
    CallStats, CapturedMemory, DISABLE_TRACKING_ENV, PAGE, Phase, TaskInstance, TaskLabel, Written,
};
#[doc(hidden)]
pub use memory::HostMemoryCreator;
pub use memory::prefaulted_buffer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine};

/// Set to `1` (`.ci/run` does) to make a test fail, instead of skipping its
/// incremental part, where dirty-page tracking is unavailable: CI must never
/// go green without exercising incremental capture.
pub const REQUIRE_TRACKING_ENV: &str = "MEMENTO_REQUIRE_UFFD";

/// For tests: says that dirty-page tracking is unavailable and what is
/// therefore not tested; panics instead when [`REQUIRE_TRACKING_ENV`] is `1`.
#[doc(hidden)]
pub fn tracking_unavailable(consequence: &str) {
    let why =
        "dirty-page tracking (userfaultfd write-protect + PAGEMAP_SCAN, Linux >= 6.7) is unavailable here";
    if std::env::var(REQUIRE_TRACKING_ENV).is_ok_and(|v| v == "1") {
        panic!("{why} but {REQUIRE_TRACKING_ENV}=1 requires it");
    }
    eprintln!("{why}: {consequence}");
}

/// The WIT package version this host implements.
pub const CONTRACT_PACKAGE: &str = "memento:operator@0.1.0";
/// The interface every plugin must export.
pub const OPERATOR_INTERFACE: &str = "memento:operator/operator@0.1.0";
/// The interface that carries canonical snapshots.
pub const SNAPSHOT_INTERFACE: &str = "memento:operator/snapshot@0.1.0";

/// How often the deadline clock ticks. A call overruns its deadline by at
/// most one tick.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Limits applied to every task instance, and the capabilities granted to
/// it (nothing unless `grants` says so).
///
/// Every limit bounds what one task can cost the host: a guest that hits
/// one traps (its instance is poisoned) with a [`RuntimeError`] naming the
/// limit, the task and the phase; the host and other tasks are unaffected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Maximum size of each linear memory of an instance, in bytes.
    /// Growth beyond it traps the instance with a "memory limit" error.
    pub memory_bytes: u64,
    /// Maximum wall time of one call into the guest. An overrun traps the
    /// instance with a "deadline exceeded" error.
    pub call_timeout: Duration,
    /// Maximum wasm instructions (wasmtime fuel units, roughly one per
    /// instruction) of one call; `None`: unmetered. Needs a runtime created
    /// with [`RuntimeOptions::fuel`] on.
    pub fuel: Option<u64>,
    /// Maximum bytes the host copies out of one `process` or `close` result:
    /// keys and values plus [`EVENT_OVERHEAD`] per event. Checked while the
    /// result is copied, before the host allocates it.
    pub max_output: u64,
    /// Maximum bytes of one `snapshot-state` result; `None`: the memory
    /// limit (a guest cannot return more than its memory anyway).
    pub max_snapshot: Option<u64>,
    /// Maximum core instances per store (a component is several).
    pub max_instances: usize,
    /// Maximum tables per store.
    pub max_tables: usize,
    /// Maximum linear memories per store.
    pub max_memories: usize,
    /// Maximum elements of one table.
    pub max_table_elements: usize,
    /// Maximum live host resources (WASI streams, pollables, descriptors,
    /// ...) and component handles per store.
    pub max_resources: usize,
    /// Directories the guest may read (preopened read-only); empty: no
    /// filesystem at all.
    pub grants: Vec<DirGrant>,
}

/// Host bytes counted per event of a `process`/`close` result beyond its key
/// and value: the size of the host's event record, which is what wasmtime
/// charges per list element while copying.
pub const EVENT_OVERHEAD: u64 = std::mem::size_of::<Event>() as u64;

/// A host directory the guest may read, at a path of its own.
///
/// Granted read-only (`FsPerms::ReadOnly`: no file opened for writing, no
/// entry created, renamed or removed) through wasmtime-wasi's preopens,
/// which resolve every guest path with `cap-std`: `..`, absolute paths and
/// symlinks cannot leave the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirGrant {
    /// The directory on the host (already confined by the caller).
    pub host: PathBuf,
    /// Where the guest sees it, e.g. `/data`.
    pub guest: String,
}

impl Default for SandboxLimits {
    /// 512 MiB of memory, 10 s per call, no fuel metering, 64 MiB of output
    /// per call, snapshots up to the memory limit, 64 instances, 64
    /// tables, 16 memories, 100 000 table elements, 1 024 host resources,
    /// nothing granted.
    fn default() -> Self {
        SandboxLimits {
            memory_bytes: 512 << 20,
            call_timeout: Duration::from_secs(10),
            fuel: None,
            max_output: 64 << 20,
            max_snapshot: None,
            max_instances: 64,
            max_tables: 64,
            max_memories: 16,
            max_table_elements: 100_000,
            max_resources: 1024,
            grants: Vec::new(),
        }
    }
}

/// Engine-wide settings of a [`Runtime`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// Compile plugins with fuel metering, so jobs may set `[limits] fuel`.
    /// Off by default: metering slows guest code for every job (see
    /// `docs/PERFORMANCE.md`), and the call deadline already stops endless
    /// loops.
    pub fuel: bool,
    /// Bound of the compiled-component cache, in bytes of compiled code
    /// (least recently used entries are dropped first; a component in use
    /// by a job stays alive through the job's own handle). Default 256 MiB.
    pub component_cache_bytes: usize,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            fuel: false,
            component_cache_bytes: 256 << 20,
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
    options: RuntimeOptions,
    cache: Mutex<ComponentCache>,
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
    /// Create the engine (Cranelift, component model, epoch interruption)
    /// with default [`RuntimeOptions`].
    ///
    /// # Errors
    /// [`RuntimeError::Engine`] if wasmtime rejects the configuration.
    pub fn new() -> Result<Runtime, RuntimeError> {
        Runtime::with_options(RuntimeOptions::default())
    }

    /// Create the engine with `options` (fuel metering, cache bound).
    ///
    /// # Errors
    /// [`RuntimeError::Engine`] if wasmtime rejects the configuration.
    pub fn with_options(options: RuntimeOptions) -> Result<Runtime, RuntimeError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.consume_fuel(options.fuel);
        // `perf` sees guest functions by name with MEMENTO_PROFILE=perfmap
        // (wasmtime writes /tmp/perf-<pid>.map).
        if std::env::var_os("MEMENTO_PROFILE").is_some_and(|v| v == "perfmap") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
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
                cache: Mutex::new(ComponentCache::new(options.component_cache_bytes)),
                options,
                ticker: Mutex::new(Some((stop, ticker))),
            }),
        })
    }

    /// The options the runtime was created with.
    pub fn options(&self) -> &RuntimeOptions {
        &self.inner.options
    }

    /// Compiled components in the cache and their compiled bytes.
    pub fn cached_components(&self) -> (usize, usize) {
        let cache = self.inner.cache.lock().unwrap();
        (cache.entries.len(), cache.bytes)
    }

    /// The underlying wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Load, validate and compile the component at `path`. Compiled
    /// components are cached by the blake3 hash of their bytes, up to
    /// [`RuntimeOptions::component_cache_bytes`] (least recently used out).
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
            return Ok(hit);
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
        self.instantiate_presized(component, label, limits, &[])
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
            self.inner.options.fuel,
        )
    }
}

/// The compiled-component cache: blake3 of the bytes → compiled component,
/// bounded by compiled bytes, least recently used dropped first.
///
/// A linear scan finds the oldest entry; the cache holds a handful of
/// plugins (each several MiB compiled), so that is cheaper than keeping a
/// second index. Dropping an entry only drops the cache's handle: jobs
/// running the component keep theirs.
struct ComponentCache {
    entries: HashMap<[u8; 32], (Arc<LoadedComponent>, u64)>,
    bytes: usize,
    max_bytes: usize,
    clock: u64,
}

impl ComponentCache {
    fn new(max_bytes: usize) -> ComponentCache {
        ComponentCache {
            entries: HashMap::new(),
            bytes: 0,
            max_bytes,
            clock: 0,
        }
    }

    fn get(&mut self, hash: &[u8; 32]) -> Option<Arc<LoadedComponent>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(hash).map(|(c, used)| {
            *used = clock;
            c.clone()
        })
    }

    fn insert(&mut self, hash: [u8; 32], component: Arc<LoadedComponent>) {
        self.clock += 1;
        let size = component.compiled_size();
        if let Some((old, _)) = self.entries.insert(hash, (component, self.clock)) {
            self.bytes -= old.compiled_size();
        }
        self.bytes += size;
        // Never evict the entry just added, even if it alone is too big: the
        // caller is about to use it.
        while self.bytes > self.max_bytes && self.entries.len() > 1 {
            let oldest = *self
                .entries
                .iter()
                .filter(|(h, _)| **h != hash)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(h, _)| h)
                .expect("more than one entry");
            let (gone, _) = self.entries.remove(&oldest).expect("present");
            self.bytes -= gone.compiled_size();
        }
    }
}
