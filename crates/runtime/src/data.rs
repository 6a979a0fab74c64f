//! The data of a task instance's `Store`: the WASI context granting
//! nothing (or the job's read-only directories), the host resource table,
//! the `log` import, and the limiter that enforces the sandbox's caps.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::{v1, v2};
use crate::label::TaskLabel;
use crate::limits::SandboxLimits;

/// The data of one task's `Store`: its WASI context and resource table, and
/// the limiter that enforces the sandbox's caps.
pub(crate) struct InstanceData {
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

impl WasiView for InstanceData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl v1::memento::operator::types::Host for InstanceData {}
impl v2::memento::operator::types::Host for InstanceData {}

impl v1::memento::operator::log::Host for InstanceData {
    fn log(&mut self, level: v1::memento::operator::log::Level, message: String) {
        use v2::memento::operator::log::Level;
        let level = match level {
            v1::memento::operator::log::Level::Trace => Level::Trace,
            v1::memento::operator::log::Level::Debug => Level::Debug,
            v1::memento::operator::log::Level::Info => Level::Info,
            v1::memento::operator::log::Level::Warn => Level::Warn,
            v1::memento::operator::log::Level::Error => Level::Error,
        };
        v2::memento::operator::log::Host::log(self, level, message);
    }
}

impl v2::memento::operator::log::Host for InstanceData {
    fn log(&mut self, level: v2::memento::operator::log::Level, message: String) {
        use v2::memento::operator::log;
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

impl ResourceLimiter for InstanceData {
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

impl InstanceData {
    /// The store data of task `label` under `limits`, with `wasi` and the
    /// resource `table` already set up.
    pub(crate) fn new(
        wasi: WasiCtx,
        table: ResourceTable,
        label: Arc<TaskLabel>,
        limits: &SandboxLimits,
    ) -> InstanceData {
        InstanceData {
            wasi,
            table,
            label,
            memory_limit: usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
            max_instances: limits.max_instances,
            max_tables: limits.max_tables,
            max_memories: limits.max_memories,
            max_table_elements: limits.max_table_elements,
            limit_hit: None,
            table_hit: None,
        }
    }

    /// The host resources the guest holds.
    pub(crate) fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    /// What the limiter refused since the last look: a memory growth past
    /// the memory limit (first) or a table growth past its cap.
    pub(crate) fn take_limit_hit(&mut self) -> Option<LimitHit> {
        if let Some(detail) = self.limit_hit.take() {
            return Some(LimitHit::Memory(detail));
        }
        self.table_hit.take().map(LimitHit::Table)
    }
}

/// A growth the limiter refused, described for the error.
pub(crate) enum LimitHit {
    /// A memory growth past `[limits] memory`.
    Memory(String),
    /// A table growth past `[limits] max_table_elements`.
    Table(String),
}

/// The linker with everything a plugin may import: the `log` (and, for
/// 0.2.0 components, `state`) interfaces of both contract versions and WASI
/// (whose context grants nothing). The versions are distinct import names,
/// so one linker serves components of either.
pub(crate) fn build_linker(engine: &Engine) -> wasmtime::Result<Linker<InstanceData>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    v1::Plugin::add_to_linker::<InstanceData, HasSelf<InstanceData>>(&mut linker, |s| s)?;
    v2::Plugin::add_to_linker::<InstanceData, HasSelf<InstanceData>>(&mut linker, |s| s)?;
    Ok(linker)
}
