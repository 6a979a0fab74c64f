//! The host's wasm engine: one per process, with the epoch ticker behind
//! call deadlines and the compiled-component cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine};

use crate::cache::ComponentCache;
use crate::component::{self, ComponentInfo, LoadedComponent};
use crate::data::{self, InstanceData};
use crate::disk_cache::{self, DiskCache, DiskCacheStats};
use crate::error::RuntimeError;
use crate::instance::TaskInstance;
use crate::label::TaskLabel;
use crate::limits::SandboxLimits;
use crate::memory;
use crate::native::{self, NativeUnsupported};

/// How often the deadline clock ticks. A call overruns its deadline by at
/// most one tick.
const EPOCH_TICK: Duration = Duration::from_millis(10);

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
    /// Directory of the on-disk cache of compiled components, shared by
    /// every process that uses it, so that a component is compiled once per
    /// engine configuration rather than once per process. `None` (the
    /// default of a bare `Runtime`) compiles in every process; a
    /// `memento::Host` defaults it to `<state dir>/cache`.
    pub cache_dir: Option<PathBuf>,
    /// Bound of [`RuntimeOptions::cache_dir`] in bytes of entry files;
    /// least recently used entries are deleted first. Default 2 GiB.
    pub cache_dir_bytes: u64,
    /// Instrument components whose core modules have mutable globals other
    /// than the stack pointer (interpreters), so that native snapshots can
    /// capture them (default). Off, such components run as they are and
    /// their native snapshots are refused: what `cargo bench --bench
    /// interpreters` compares `process` against.
    pub instrument_globals: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            fuel: false,
            component_cache_bytes: 256 << 20,
            cache_dir: None,
            cache_dir_bytes: 2 << 30,
            instrument_globals: true,
        }
    }
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
    linker: Linker<InstanceData>,
    options: RuntimeOptions,
    cache: Mutex<ComponentCache>,
    disk_cache: Option<DiskCache>,
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
        let linker = data::build_linker(&engine).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let disk_cache = match &options.cache_dir {
            Some(dir) => {
                // What this crate sets beyond wasmtime's own compatibility
                // hash: memories are the host's, initialised by copying.
                let settings = [
                    ("host_memory", "memento::memory::HostMemoryCreator".to_string()),
                    ("memory_init_cow", "false".to_string()),
                    ("fuel", options.fuel.to_string()),
                ];
                let fingerprint = disk_cache::engine_fingerprint(&engine, &settings);
                Some(DiskCache::open(dir, options.cache_dir_bytes, fingerprint)?)
            }
            None => None,
        };

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
                disk_cache,
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
        self.inner.cache.lock().unwrap().usage()
    }

    /// What the on-disk cache of compiled components did since this
    /// runtime was created (all zero without [`RuntimeOptions::cache_dir`]).
    pub fn disk_cache_stats(&self) -> DiskCacheStats {
        self.inner
            .disk_cache
            .as_ref()
            .map(DiskCache::stats)
            .unwrap_or_default()
    }

    /// The directory of the on-disk cache of compiled components, if any.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.inner.disk_cache.as_ref().map(DiskCache::dir)
    }

    /// The underlying wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Load, validate and compile the component at `path`. Compiled
    /// components are cached by the blake3 hash of their bytes, up to
    /// [`RuntimeOptions::component_cache_bytes`] (least recently used out),
    /// and with [`RuntimeOptions::cache_dir`] also on disk across
    /// processes.
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
        component::check_header(origin, bytes)?;
        let engine = &self.inner.engine;
        let disk = self.inner.disk_cache.as_ref();
        let plan = native::plan(bytes, self.inner.options.instrument_globals);
        let mut native = plan.native;
        // What is compiled is the instrumented component where there is
        // one, so it is what the disk cache is keyed by.
        let mut source: (&[u8], [u8; 32]) = (bytes, hash);
        let instrumented_hash;
        if let Some(instrumented) = &plan.instrumented {
            instrumented_hash = *blake3::hash(instrumented).as_bytes();
            source = (instrumented, instrumented_hash);
        }
        let (compiled, fresh) = match disk.and_then(|d| d.get(engine, &source.1)) {
            Some(c) => (c, false),
            None => match component::compile(engine, origin, source.0) {
                Ok(c) => (c, true),
                // Instrumentation must never make a valid component fail:
                // compile it as it is and refuse native snapshots instead.
                Err(e) if plan.instrumented.is_some() => {
                    let compiled = component::compile(engine, origin, bytes)?;
                    native = native.and_then(|_| Err(NativeUnsupported::Instrumentation(e.to_string())));
                    source = (bytes, hash);
                    (compiled, true)
                }
                Err(e) => return Err(e),
            },
        };
        let loaded = Arc::new(component::load(
            engine,
            &self.inner.linker,
            origin,
            bytes.len(),
            hash,
            compiled.clone(),
            native,
        )?);
        // Only components that fit the contract are worth keeping.
        if fresh && let Some(d) = disk {
            d.put(&source.1, &compiled);
        }
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
