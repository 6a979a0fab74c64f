//! One sandboxed instance of a plugin: its own `Store`, WASI context with
//! nothing granted, memory limiter and call deadline.
//!
//! Calls into the guest and their failures are in `calls`, what native
//! snapshots read and write of its memories in `capture`.

mod calls;
mod capture;
mod globals;
mod stderr;

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx};

use crate::bindings::{v1, v2};
use crate::component::{LoadedComponent, PluginPre};
use crate::data::InstanceData;
use crate::error::{RuntimeError, one_line};
use crate::label::TaskLabel;
use crate::limits::SandboxLimits;
use crate::memory::{self, Mapping};

use capture::Tracking;
pub use capture::{CapturedMemory, CowCapture, CowMemory, DISABLE_TRACKING_ENV, PAGE, WrittenPages};
pub use globals::GlobalValues;

/// How much of a guest's stderr is kept to explain a trap (a Rust panic
/// message lands there). Writes beyond it fail in the guest.
const STDERR_CAPACITY: usize = 64 << 10;

/// Counters of the calls made into one instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Number of `process` calls.
    pub process_calls: u64,
    /// Wall time spent inside the guest, all exports together.
    pub time_in_plugin: Duration,
}

/// The instantiated bindings, by the contract version the component
/// implements.
pub(crate) enum Bindings {
    V1(v1::Plugin),
    V2(v2::Plugin),
}

/// A running plugin instance for one task.
///
/// Calls never overlap (`&mut self`); each has the configured deadline.
/// After a trap the instance is poisoned and refuses further calls.
pub struct TaskInstance {
    store: Store<InstanceData>,
    plugin: Bindings,
    /// The exports that read and write the mutable globals, for a
    /// component instrumented to expose them (see `instrument.rs`).
    globals: Option<globals::Accessors>,
    /// The key groups the task owns (from `open`'s context): state pieces
    /// of other groups are refused. Empty before `open`.
    owned: std::ops::Range<u32>,
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
    pub(crate) fn new(
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
        let state = InstanceData::new(wasi.build(), table, label.clone(), limits);
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
        let (plugin, memories) = memory::collect(
            presize,
            || -> wasmtime::Result<(Bindings, Option<globals::Accessors>)> {
                let instance = match &component.pre {
                    PluginPre::V1(pre) => pre.instance_pre().instantiate(&mut store)?,
                    PluginPre::V2(pre) => pre.instance_pre().instantiate(&mut store)?,
                };
                let plugin = match &component.pre {
                    PluginPre::V1(_) => Bindings::V1(v1::Plugin::new(&mut store, &instance)?),
                    PluginPre::V2(_) => Bindings::V2(v2::Plugin::new(&mut store, &instance)?),
                };
                let globals = match component.native_globals() {
                    Some(_) => Some(globals::Accessors::new(&mut store, &instance)?),
                    None => None,
                };
                Ok((plugin, globals))
            },
        );
        let (plugin, globals) = plugin.map_err(|e: wasmtime::Error| {
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
        let resources_at_start = store.data_mut().table().iter_mut().count();
        Ok(TaskInstance {
            store,
            plugin,
            globals,
            owned: 0..0,
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

    /// The key groups the task owns, as `open` was told (empty before).
    pub fn owned_key_groups(&self) -> std::ops::Range<u32> {
        self.owned.clone()
    }

    /// Counters of the calls made so far.
    pub fn stats(&self) -> CallStats {
        self.stats
    }
}
