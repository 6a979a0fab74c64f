//! One sandboxed instance of a plugin: its own `Store`, WASI context with
//! nothing granted, memory limiter and call deadline.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use super::Event;
use super::batch;
use super::bindings::memento::operator::{log, types};
use super::bindings::{Context, Plugin};
use super::component::{LoadedComponent, one_line};
use super::dirty::DirtyTracker;
use super::memory::{self, Mapping};
use super::{RuntimeError, SandboxLimits};

/// How much of a guest's stderr is kept to explain a trap (a Rust panic
/// message lands there). Writes beyond it fail in the guest.
const STDERR_CAPACITY: usize = 64 << 10;

/// Which task an instance runs; used in every error and log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskLabel {
    /// Job name.
    pub job: String,
    /// Operator name within the job.
    pub operator: String,
    /// Task index within the operator.
    pub task: u32,
}

impl fmt::Display for TaskLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "job `{}`, operator `{}`, task {}",
            self.job, self.operator, self.task
        )
    }
}

/// The lifecycle phase a call belongs to, named like the WIT export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Instantiation (start functions, data segments).
    Instantiate,
    /// `open`.
    Open,
    /// `process`.
    Process,
    /// `close`.
    Close,
    /// `snapshot-state`.
    SnapshotState,
    /// `restore-state`.
    RestoreState,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Instantiate => "instantiate",
            Phase::Open => "open",
            Phase::Process => "process",
            Phase::Close => "close",
            Phase::SnapshotState => "snapshot-state",
            Phase::RestoreState => "restore-state",
        })
    }
}

/// Counters of the calls made into one instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Number of `process` calls.
    pub process_calls: u64,
    /// Wall time spent inside the guest, all exports together.
    pub time_in_plugin: Duration,
}

/// The data of one task's `Store`.
pub(crate) struct TaskState {
    wasi: WasiCtx,
    table: ResourceTable,
    label: Arc<TaskLabel>,
    memory_limit: usize,
    /// Caps of the limiter (`[limits] max_instances`, ...).
    max_instances: usize,
    max_tables: usize,
    max_memories: usize,
    max_table_elements: usize,
    /// Set when the limiter refused a growth, so the resulting trap can be
    /// reported as a memory-limit error rather than a generic one.
    limit_hit: Option<String>,
    /// Likewise for a table growth refused by `max_table_elements`.
    table_hit: Option<String>,
}

impl WasiView for TaskState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for TaskState {}

impl log::Host for TaskState {
    fn log(&mut self, level: log::Level, message: String) {
        let l = &self.label;
        let (job, operator, task) = (l.job.as_str(), l.operator.as_str(), l.task);
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "memento::plugin", job, operator, task, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "memento::plugin", job, operator, task, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "memento::plugin", job, operator, task, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "memento::plugin", job, operator, task, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "memento::plugin", job, operator, task, "{message}")
            }
        }
    }
}

impl ResourceLimiter for TaskState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let limit = maximum.map_or(self.memory_limit, |m| m.min(self.memory_limit));
        if desired > limit {
            let detail = format!(
                "growing a memory from {} to {} bytes, limit {} bytes",
                current, desired, self.memory_limit
            );
            self.limit_hit = Some(detail.clone());
            // Trapping (instead of failing `memory.grow`) makes the failure
            // clear: a Rust guest would otherwise abort with a vague message.
            return Err(wasmtime::format_err!("memory limit exceeded: {detail}"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_table_elements {
            let detail = format!(
                "growing a table from {current} to {desired} elements, limit {} (limits.max_table_elements)",
                self.max_table_elements
            );
            self.table_hit = Some(detail.clone());
            return Err(wasmtime::format_err!("table limit exceeded: {detail}"));
        }
        Ok(maximum.is_none_or(|m| desired <= m))
    }

    // A component instantiates several core instances, tables and
    // memories; these caps bound what a crafted component can make one
    // store allocate. Exceeding one fails instantiation ("resource limit
    // exceeded: instance count too high at N").
    fn instances(&self) -> usize {
        self.max_instances
    }

    fn tables(&self) -> usize {
        self.max_tables
    }

    fn memories(&self) -> usize {
        self.max_memories
    }
}

/// The linker with everything a plugin may import: the `log` interface and
/// WASI (whose context grants nothing).
pub(crate) fn build_linker(engine: &Engine) -> wasmtime::Result<Linker<TaskState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    Plugin::add_to_linker::<TaskState, HasSelf<TaskState>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// A running plugin instance for one task.
///
/// Calls never overlap (`&mut self`); each has the configured deadline.
/// After a trap the instance is poisoned and refuses further calls.
pub struct TaskInstance {
    store: Store<TaskState>,
    plugin: Plugin,
    /// The instance's linear memories in creation order (host-owned, see
    /// `memory.rs`); what native snapshots copy and native restores fill.
    memories: Vec<Arc<Mapping>>,
    /// Write tracking of `memories` for incremental native capture.
    tracking: Tracking,
    /// Entries in the WASI resource table right after instantiation. More
    /// than that between calls means the guest holds host handles in its
    /// memory, which a native image cannot carry over.
    resources_at_start: usize,
    component: Arc<LoadedComponent>,
    label: Arc<TaskLabel>,
    stderr: MemoryOutputPipe,
    deadline_ticks: u64,
    call_timeout: Duration,
    /// Fuel per call when the engine meters fuel: the job's limit, or
    /// unlimited. `None` when the engine does not meter.
    fuel: Option<u64>,
    /// Whether `fuel` is the job's limit (an exhaustion is its error).
    fuel_limited: bool,
    /// Copy budgets per call (see `call`): results of `process`/`close`,
    /// of `snapshot-state`, and everything else.
    max_output: usize,
    max_snapshot: usize,
    max_other: usize,
    max_resources: usize,
    poisoned: bool,
    stats: CallStats,
}

impl TaskInstance {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        engine: &Engine,
        component: Arc<LoadedComponent>,
        label: TaskLabel,
        limits: &SandboxLimits,
        tick: Duration,
        presize: &[usize],
        metered: bool,
    ) -> Result<TaskInstance, RuntimeError> {
        let label = Arc::new(label);
        let instantiate_error = |reason: String| RuntimeError::Instantiate {
            task: (*label).clone(),
            plugin: component.name(),
            reason,
        };
        if limits.fuel.is_some() && !metered {
            return Err(RuntimeError::FuelUnavailable {
                task: (*label).clone(),
            });
        }
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        // Nothing is granted unless the job says so: no preopened
        // directories, no environment, no arguments, no network; stdout is
        // discarded (operators log instead).
        let mut wasi = WasiCtx::builder();
        wasi.stderr(stderr.clone());
        wasi.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        for grant in &limits.grants {
            // Read-only: the guest can neither create nor modify entries
            // nor open a file for writing.
            wasi.preopened_dir(&grant.host, &grant.guest, FsPerms::ReadOnly)
                .map_err(|e| {
                    instantiate_error(format!(
                        "cannot grant directory {} as {}: {e:#}",
                        grant.host.display(),
                        grant.guest
                    ))
                })?;
        }
        let mut table = ResourceTable::new();
        table.set_max_capacity(limits.max_resources);
        let state = TaskState {
            wasi: wasi.build(),
            table,
            label: label.clone(),
            memory_limit: usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
            max_instances: limits.max_instances,
            max_tables: limits.max_tables,
            max_memories: limits.max_memories,
            max_table_elements: limits.max_table_elements,
            limit_hit: None,
            table_hit: None,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        store.epoch_deadline_trap();
        store.set_max_component_handles(limits.max_resources);
        let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        // Results the guest hands back are copied into the host, and
        // wasmtime charges every byte (and every list element at its host
        // size) against the store's "hostcall fuel" before allocating it.
        // Setting that budget per call to the job's output or snapshot
        // limit makes an oversized result an error while it is being
        // copied, never an allocation the host cannot afford. Other calls
        // return at most an error string; the memory limit bounds them.
        let max_other = to_usize(limits.memory_bytes);
        store.set_hostcall_fuel(max_other);
        let (fuel, fuel_limited) = match (metered, limits.fuel) {
            (false, _) => (None, false),
            (true, Some(f)) => (Some(f), true),
            (true, None) => (Some(u64::MAX), false),
        };
        if let Some(f) = fuel {
            // Instantiation runs start functions: they get the same budget.
            store.set_fuel(f).map_err(|e| instantiate_error(one_line(&e)))?;
        }
        let deadline_ticks = (limits.call_timeout.as_nanos() / tick.as_nanos()).max(1) as u64 + 1;
        store.set_epoch_deadline(deadline_ticks);
        if let Some(&too_big) = presize.iter().find(|&&s| s > limits.memory_bytes as usize) {
            return Err(instantiate_error(format!(
                "the memory image is {too_big} bytes, more than the memory limit of {} bytes",
                limits.memory_bytes
            )));
        }
        let (plugin, memories) = memory::collect(presize, || component.pre.instantiate(&mut store));
        let plugin = plugin.map_err(|e| {
            let reason = one_line(&e);
            if reason.contains("count too high") {
                instantiate_error(format!(
                    "{reason} (limits: max_instances = {}, max_tables = {}, max_memories = {})",
                    limits.max_instances, limits.max_tables, limits.max_memories
                ))
            } else {
                instantiate_error(reason)
            }
        })?;
        if !presize.is_empty() && presize.len() != memories.len() {
            return Err(instantiate_error(format!(
                "the memory image has {} memories but the component created {}",
                presize.len(),
                memories.len()
            )));
        }
        let resources_at_start = store.data_mut().table.iter_mut().count();
        Ok(TaskInstance {
            store,
            plugin,
            memories,
            tracking: Tracking::Off,
            resources_at_start,
            component,
            label,
            stderr,
            deadline_ticks,
            call_timeout: limits.call_timeout,
            fuel,
            fuel_limited,
            max_output: to_usize(limits.max_output),
            max_snapshot: to_usize(limits.max_snapshot.unwrap_or(limits.memory_bytes)),
            max_other,
            max_resources: limits.max_resources,
            poisoned: false,
            stats: CallStats::default(),
        })
    }

    /// The component this instance runs.
    pub fn component(&self) -> &Arc<LoadedComponent> {
        &self.component
    }

    /// Which task this is.
    pub fn label(&self) -> &TaskLabel {
        &self.label
    }

    /// Counters of the calls made so far.
    pub fn stats(&self) -> CallStats {
        self.stats
    }

    /// The current size in bytes of each linear memory, in creation order.
    pub fn memory_sizes(&self) -> Vec<u64> {
        self.memories.iter().map(|m| m.size() as u64).collect()
    }

    /// The bytes of linear memory `index` (creation order) as the guest
    /// left them after its last call; `None` if there is no such memory.
    pub fn memory(&self, index: usize) -> Option<&[u8]> {
        // SAFETY: the guest only runs inside `&mut self` calls, so it cannot
        // run (or grow the memory) while this borrow of `self` lives.
        self.memories.get(index).map(|m| unsafe { m.bytes() })
    }

    /// Linear memory `index`, writable: for filling it from an image before
    /// the first call. `None` if there is no such memory.
    pub fn memory_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        // SAFETY: as in `memory`, and `&mut self` makes this slice unique.
        self.memories.get(index).map(|m| unsafe { m.bytes_mut() })
    }

    /// Make `[offset, offset + len)` of memory `index` read as zero, handing
    /// whole pages back to the kernel rather than writing them.
    ///
    /// # Panics
    /// If the memory does not exist or the range is outside it.
    pub fn zero_memory(&mut self, index: usize, offset: usize, len: usize) {
        let m = &self.memories[index];
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= m.size()),
            "range outside memory {index}"
        );
        // SAFETY: `&mut self`: the guest is not running and no slice lives.
        unsafe { m.zero(offset, len) }
    }

    /// Host resources (WASI streams, pollables, ...) the guest holds
    /// between calls beyond those it held right after instantiation, named.
    /// A native image would carry their handles but not the resources.
    pub fn held_resources(&mut self) -> Vec<String> {
        let names: Vec<String> = self
            .store
            .data_mut()
            .table
            .iter_mut()
            .map(resource_name)
            .collect();
        if names.len() <= self.resources_at_start {
            return Vec::new();
        }
        names
    }

    /// Why a native image of this instance cannot be taken right now, if
    /// it cannot: checked before anything is captured or scanned, so a
    /// refusal loses no dirty-page information.
    ///
    /// # Errors
    /// [`RuntimeError::Poisoned`] after a trap; [`RuntimeError::NativeSnapshot`]
    /// if the component does not support native snapshots or the guest
    /// holds host resources (named in the error).
    pub fn check_native_capture(&mut self) -> Result<(), RuntimeError> {
        if self.poisoned {
            return Err(RuntimeError::Poisoned {
                task: (*self.label).clone(),
            });
        }
        let refuse = |reason: String, label: &TaskLabel| RuntimeError::NativeSnapshot {
            task: label.clone(),
            reason,
        };
        if let Err(why) = self.component.native_support() {
            return Err(refuse(
                format!(
                    "{} does not support native snapshots: {why}",
                    self.component.name()
                ),
                &self.label,
            ));
        }
        let held = self.held_resources();
        if !held.is_empty() {
            return Err(refuse(
                format!(
                    "the plugin holds {} host resource(s) across calls ({}), e.g. a cached stdout \
                     handle after printing; a memory image cannot carry them over. Log through \
                     the `log` import instead of printing, or use format = \"canonical\"",
                    held.len(),
                    held.join(", ")
                ),
                &self.label,
            ));
        }
        Ok(())
    }

    /// Copy every linear memory (creation order) with its current size: a
    /// consistent image, since the guest is not running between calls.
    ///
    /// # Errors
    /// As [`TaskInstance::check_native_capture`].
    pub fn capture_memories(&mut self) -> Result<Vec<CapturedMemory>, RuntimeError> {
        self.check_native_capture()?;
        Ok(self
            .memories
            .iter()
            .enumerate()
            .map(|(index, m)| {
                let mut bytes = super::prefaulted_buffer(m.size());
                // SAFETY: `&mut self`: the guest is not running.
                bytes.extend_from_slice(unsafe { m.bytes() });
                CapturedMemory {
                    index: index as u32,
                    size: bytes.len() as u64,
                    bytes,
                }
            })
            .collect())
    }

    /// Turn write tracking off for good: every capture copies whole
    /// memories (the portable path). A test hook, and what the host does
    /// by itself when the kernel refuses the mechanism.
    #[doc(hidden)]
    pub fn disable_write_tracking(&mut self) {
        self.tracking = Tracking::Unavailable;
    }

    /// Whether writes are being tracked (incremental capture possible).
    pub fn tracks_writes(&self) -> bool {
        matches!(self.tracking, Tracking::On(_))
    }

    /// (Re)start write tracking from the memories as they are now: the
    /// next [`TaskInstance::written_pages`] reports only later writes.
    /// Called after a native restore filled the memories, so that the
    /// restored image can serve as the base of the next capture. Returns
    /// whether tracking is on.
    pub fn reset_write_tracking(&mut self) -> bool {
        if matches!(self.tracking, Tracking::Unavailable) {
            return false;
        }
        if std::env::var_os(DISABLE_TRACKING_ENV).is_some_and(|v| v == "off" || v == "0") {
            log_mechanism(Err("disabled by MEMENTO_DIRTY_TRACKING".into()));
            self.tracking = Tracking::Unavailable;
            return false;
        }
        let mut trackers = Vec::with_capacity(self.memories.len());
        for m in &self.memories {
            // The whole reservation is registered (growth stays covered);
            // only the accessible prefix is protected.
            match DirtyTracker::new(m.base(), m.capacity(), m.size()) {
                Ok(t) => trackers.push((t, m.size())),
                Err(e) => {
                    log_mechanism(Err(e.to_string()));
                    self.tracking = Tracking::Unavailable;
                    return false;
                }
            }
        }
        log_mechanism(Ok(()));
        self.tracking = Tracking::On(trackers);
        true
    }

    /// Which [`PAGE`]s of each memory were written since the previous call
    /// (or since tracking started), grouped by `chunk_size` chunk, and
    /// protected again in the same walk; pages that growth added count as
    /// written. The first call starts tracking and answers
    /// [`Written::All`], as does every call where tracking is unavailable.
    ///
    /// # Panics
    /// If `chunk_size` is not a multiple of [`PAGE`] between 1 and 64
    /// pages (one bit per page of a chunk).
    pub fn written_pages(&mut self, chunk_size: usize) -> Written {
        assert!(
            chunk_size > 0 && chunk_size.is_multiple_of(PAGE) && chunk_size / PAGE <= 64,
            "chunk size {chunk_size}"
        );
        match &mut self.tracking {
            Tracking::Unavailable => return Written::All,
            Tracking::Off => {
                self.reset_write_tracking();
                return Written::All;
            }
            Tracking::On(_) => {}
        }
        let Tracking::On(trackers) = &mut self.tracking else {
            unreachable!("checked above")
        };
        let mut out = Vec::with_capacity(self.memories.len());
        for (m, (tracker, tracked)) in self.memories.iter().zip(trackers.iter_mut()) {
            let size = m.size();
            let mut masks = vec![0u64; size.div_ceil(chunk_size)];
            let mut mark = |from: usize, to: usize| {
                for page in from / PAGE..to.div_ceil(PAGE) {
                    let at = page * PAGE;
                    masks[at / chunk_size] |= 1 << ((at % chunk_size) / PAGE);
                }
            };
            let scanned = tracker.scan((*tracked).min(size)).and_then(|ranges| {
                for (a, b) in ranges {
                    mark(a, b.min(size));
                }
                // Pages growth made accessible since the last look were
                // not protected: all of them count as written, and from now
                // on they are tracked.
                if size > *tracked {
                    mark(*tracked, size);
                    tracker.protect(*tracked, size - *tracked)?;
                    *tracked = size;
                }
                Ok(())
            });
            if let Err(e) = scanned {
                tracing::warn!(
                    target: "memento::snapshot",
                    "dirty-page tracking failed ({e}); native captures copy whole memories from now on"
                );
                self.tracking = Tracking::Unavailable;
                return Written::All;
            }
            out.push(masks);
        }
        Written::Pages(out)
    }

    /// Run one export call with the deadline armed and map its outcome:
    /// trap, deadline, memory limit, or the guest's own error value.
    fn call<R>(
        &mut self,
        phase: Phase,
        f: impl FnOnce(&Plugin, &mut Store<TaskState>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, RuntimeError> {
        if self.poisoned {
            return Err(RuntimeError::Poisoned {
                task: (*self.label).clone(),
            });
        }
        self.store.set_epoch_deadline(self.deadline_ticks);
        if let Some(fuel) = self.fuel {
            // Per call, not per instance: the limit bounds one call's CPU
            // like the deadline does, deterministically.
            self.store
                .set_fuel(fuel)
                .expect("the engine meters fuel when `fuel` is set");
        }
        self.store.set_hostcall_fuel(self.copy_budget(phase));
        let started = Instant::now();
        let result = f(&self.plugin, &mut self.store);
        self.stats.time_in_plugin += started.elapsed();
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(RuntimeError::Guest {
                task: (*self.label).clone(),
                phase,
                message,
            }),
            Err(e) => {
                self.poisoned = true;
                Err(self.trap_error(phase, &e))
            }
        }
    }

    /// Bytes the host copies out of the result of a call in `phase` at
    /// most (see `new`).
    fn copy_budget(&self, phase: Phase) -> usize {
        match phase {
            Phase::Process | Phase::Close => self.max_output,
            Phase::SnapshotState => self.max_snapshot,
            _ => self.max_other,
        }
    }

    fn trap_error(&mut self, phase: Phase, e: &wasmtime::Error) -> RuntimeError {
        let task = (*self.label).clone();
        if let Some(detail) = self.store.data_mut().limit_hit.take() {
            return RuntimeError::MemoryLimit { task, phase, detail };
        }
        if let Some(detail) = self.store.data_mut().table_hit.take() {
            return RuntimeError::ResourceLimit { task, phase, detail };
        }
        let trap = e.downcast_ref::<Trap>();
        if trap == Some(&Trap::Interrupt) {
            return RuntimeError::DeadlineExceeded {
                task,
                phase,
                timeout: self.call_timeout,
            };
        }
        if trap == Some(&Trap::OutOfFuel) && self.fuel_limited {
            return RuntimeError::FuelExhausted {
                task,
                phase,
                fuel: self.fuel.unwrap_or(0),
            };
        }
        // wasmtime reports these through its error chain only (the types
        // are private); the texts are pinned by tests/sandbox.rs.
        let chain = one_line(e);
        if chain.contains("fuel allocated for hostcalls has been exhausted") {
            let (key, limit) = match phase {
                Phase::Process | Phase::Close => ("max_output", self.max_output),
                Phase::SnapshotState => ("max_snapshot", self.max_snapshot),
                _ => ("memory", self.max_other),
            };
            return RuntimeError::OutputLimit {
                task,
                phase,
                key,
                limit: limit as u64,
            };
        }
        if chain.contains("resource table has no free keys") || chain.contains("store handle limit exceeded")
        {
            return RuntimeError::ResourceLimit {
                task,
                phase,
                detail: format!(
                    "more than {} live host resources (limits.max_resources)",
                    self.max_resources
                ),
            };
        }
        let mut message = match trap {
            Some(Trap::StackOverflow) => {
                "call stack exhausted (stack overflow: too deep a recursion)".to_string()
            }
            Some(trap) => trap.to_string(),
            None => e.root_cause().to_string(),
        };
        if let Some(panic) = last_stderr_message(&self.stderr.contents()) {
            message = format!("{message} ({panic})");
        }
        RuntimeError::Trap { task, phase, message }
    }

    /// Call `open` with the task's context.
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `open`.
    pub fn open(&mut self, ctx: &Context) -> Result<(), RuntimeError> {
        self.call(Phase::Open, |p, s| {
            p.memento_operator_operator().call_open(s, ctx)
        })
    }

    /// Call `process` with a batch; returns the emitted events.
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `process`.
    pub fn process(&mut self, events: &[Event]) -> Result<Vec<Event>, RuntimeError> {
        self.stats.process_calls += 1;
        let batch = batch::pack(events);
        let out = self.call(Phase::Process, |p, s| {
            p.memento_operator_operator().call_process(s, &batch)
        })?;
        self.unpack(Phase::Process, out)
    }

    /// Unpack a batch the guest returned; a malformed one is the guest's
    /// error.
    fn unpack(&self, phase: Phase, out: super::bindings::Batch) -> Result<Vec<Event>, RuntimeError> {
        batch::unpack(out).map_err(|message| RuntimeError::Guest {
            task: (*self.label).clone(),
            phase,
            message,
        })
    }

    /// Call `close`; returns the final events.
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `close`.
    pub fn close(&mut self) -> Result<Vec<Event>, RuntimeError> {
        let out = self.call(Phase::Close, |p, s| p.memento_operator_operator().call_close(s))?;
        self.unpack(Phase::Close, out)
    }

    /// Call `snapshot-state`; returns the canonical state bytes.
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `snapshot-state`.
    pub fn snapshot_state(&mut self) -> Result<Vec<u8>, RuntimeError> {
        self.call(Phase::SnapshotState, |p, s| {
            p.memento_operator_snapshot().call_snapshot_state(s)
        })
    }

    /// Call `restore-state` with canonical state bytes.
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `restore-state`.
    pub fn restore_state(&mut self, state: &[u8]) -> Result<(), RuntimeError> {
        self.call(Phase::RestoreState, |p, s| {
            p.memento_operator_snapshot().call_restore_state(s, state)
        })
    }
}

/// Environment variable that turns dirty-page tracking off (`off` or `0`):
/// native captures then copy whole memories, as where the kernel lacks it.
pub const DISABLE_TRACKING_ENV: &str = "MEMENTO_DIRTY_TRACKING";

/// Write tracking of an instance's memories (see `dirty.rs`).
enum Tracking {
    /// Not started: the first native capture starts it, so tasks that only
    /// take canonical snapshots never pay for write faults.
    Off,
    /// One tracker per memory, with how many leading bytes it protects
    /// (where its scan is authoritative).
    On(Vec<(DirtyTracker, usize)>),
    /// Unavailable, refused or disabled: captures copy everything.
    Unavailable,
}

/// The unit of write tracking: 4 KiB, the smallest page size of the
/// hosts memento runs on (a larger host page marks all its 4 KiB pages).
pub const PAGE: usize = 4096;

/// Which pages of each memory were written since the last look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Not known: treat every page as written.
    All,
    /// Per memory (creation order), per chunk, a mask of its written
    /// [`PAGE`]s (bit `p` = page `p` of the chunk).
    Pages(Vec<Vec<u64>>),
}

/// Say once per process which mechanism native captures use.
fn log_mechanism(outcome: Result<(), String>) {
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    match outcome {
        Ok(()) => tracing::info!(
            target: "memento::snapshot",
            "native snapshots: dirty-page tracking with userfaultfd write-protect + PAGEMAP_SCAN \
             (captures copy only pages written since the last committed snapshot)"
        ),
        Err(why) => tracing::info!(
            target: "memento::snapshot",
            "native snapshots: dirty-page tracking unavailable ({why}); captures copy whole memories"
        ),
    }
}

/// A consistent copy of one linear memory, taken between calls.
#[derive(Debug, Clone)]
pub struct CapturedMemory {
    /// Index of the memory within the instance (creation order).
    pub index: u32,
    /// Its size in bytes when captured.
    pub size: u64,
    /// All of its bytes.
    pub bytes: Vec<u8>,
}

/// What kind of host resource a table entry is, for error messages.
fn resource_name(r: &mut (dyn std::any::Any + Send)) -> String {
    use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable};
    let any: &dyn std::any::Any = r;
    if any.is::<DynOutputStream>() {
        "wasi:io/streams output-stream".into()
    } else if any.is::<DynInputStream>() {
        "wasi:io/streams input-stream".into()
    } else if any.is::<DynPollable>() {
        "wasi:io/poll pollable".into()
    } else {
        "a WASI resource".into()
    }
}

/// What the guest wrote to stderr to explain its failure, on one line: for
/// a Rust guest the panic message; for a guest that printed a stack trace
/// first (an uncaught Python or JavaScript exception) the exception line
/// too, since the panic or trap that follows it only says that something
/// was thrown.
fn last_stderr_message(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note:"))
        .collect();
    // A Rust panic prints "thread '…' panicked at FILE:LINE:COL:\nMESSAGE".
    let panic_at = lines.iter().rposition(|l| l.contains("panicked at"));
    let before = &lines[..panic_at.unwrap_or(lines.len())];
    let panic = panic_at.map(|i| {
        let first = lines[i];
        let first = &first[first.find("panicked at").unwrap_or(0)..];
        std::iter::once(first)
            .chain(lines[i + 1..].iter().map(|l| l.trim()))
            .collect::<Vec<_>>()
            .join(" ")
    });
    let exception = exception_line(before);
    let msg = match (exception, panic) {
        (Some(e), Some(p)) => format!("{e}; {p}"),
        (Some(e), None) => e.to_string(),
        (None, Some(p)) => p,
        (None, None) => before.last()?.trim().to_string(),
    };
    Some(format!("guest stderr: {}", truncate(&msg, 500)))
}

/// The line naming an exception in a stack trace, if `lines` end with one:
/// the last unindented line next to indented ones (Python puts it after
/// its `  File …` lines, JavaScript before its `    at …` lines).
fn exception_line<'a>(lines: &[&'a str]) -> Option<&'a str> {
    let indented = |i: usize| lines.get(i).is_some_and(|l| l.starts_with(char::is_whitespace));
    (0..lines.len())
        .rev()
        .take(32)
        .find(|&i| {
            !indented(i)
                && !lines[i].starts_with("Traceback")
                && ((i > 0 && indented(i - 1)) || indented(i + 1))
        })
        .map(|i| lines[i])
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_message_is_extracted_from_stderr() {
        let err =
            b"\nthread '<unnamed>' panicked at src/lib.rs:10:5:\nboom\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(
            last_stderr_message(err).unwrap(),
            "guest stderr: panicked at src/lib.rs:10:5: boom"
        );
        assert_eq!(last_stderr_message(b"  \n"), None);
        assert_eq!(
            last_stderr_message(b"loaded 3 keys\nthread '<unnamed>' panicked at src/lib.rs:1:1:\nboom\n")
                .unwrap(),
            "guest stderr: panicked at src/lib.rs:1:1: boom",
            "an unrelated earlier line is not an exception"
        );
    }

    #[test]
    fn an_uncaught_python_exception_keeps_its_type_and_message() {
        let err = b"Traceback (most recent call last):\n  File \"/app/app.py\", line 12, in process\n    \
            raise ValueError(f\"bad record {key}\")\nValueError: bad record k7\n\
            thread '<unnamed>' panicked at src/lib.rs:95:22:\nPython function threw an unexpected exception\n\
            note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            last_stderr_message(err).unwrap(),
            "guest stderr: ValueError: bad record k7; panicked at src/lib.rs:95:22: \
             Python function threw an unexpected exception"
        );
    }

    #[test]
    fn an_uncaught_javascript_error_keeps_its_message() {
        let err = b"starting\nError: no state for key k1\n    at process (app.js:14:11)\n    at main (app.js:40:3)\n";
        assert_eq!(
            last_stderr_message(err).unwrap(),
            "guest stderr: Error: no state for key k1"
        );
    }
}
