//! One attempt of a job: its threads -- the source and one per task -- and
//! the bounded channels between them, started from scratch or from a
//! restore point, and the coordinator's handle on them.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::runtime::{DirGrant, LoadedComponent, Runtime, SandboxLimits};
use crate::spec::JobSpec;
use crate::store::{SnapshotId, TaskKey, TaskState, TenantStore};

use super::budget::{Budget, Inputs, edge_capacity};
use super::error::JobError;
use super::fault::{self, Site};
use super::messages::{Barrier, Channel, Edge, FROM_COORDINATOR, Msg, Report, route};
use super::{sink, source, task};

/// Messages a task's input channel holds before its senders block; what
/// they may hold in bytes is bounded per edge (`budget`).
const CHANNEL_CAPACITY: usize = 4;

/// Where an attempt starts from.
pub(crate) struct RestorePoint {
    pub store: TenantStore,
    pub id: SnapshotId,
    pub tasks: BTreeMap<TaskKey, TaskState>,
    pub source_position: u64,
    pub sink_next_seq: BTreeMap<u32, u64>,
}

/// The key groups of each operator in an attempt: what the snapshot it
/// restores recorded, else the job file's (see `JobSpec`'s
/// `OperatorSpec::key_groups`).
pub(crate) type KeyGroups = BTreeMap<String, u32>;

/// Why a barrier could not be handed to the source.
pub(crate) enum InjectError {
    /// The source has not taken earlier requests (blocked by backpressure).
    Busy,
    /// The source has ended: its input is exhausted (the coordinator hears
    /// of it soon) or the attempt is going down.
    Ended,
}

impl<T> From<crossbeam_channel::TrySendError<T>> for InjectError {
    fn from(e: crossbeam_channel::TrySendError<T>) -> Self {
        match e {
            crossbeam_channel::TrySendError::Full(_) => InjectError::Busy,
            crossbeam_channel::TrySendError::Disconnected(_) => InjectError::Ended,
        }
    }
}

enum SourceCtl {
    Inject(Barrier),
    Stop(Barrier),
}

/// A running attempt: handles to inject barriers, notify, stop and join.
pub(crate) struct Attempt {
    source_ctl: Sender<SourceCtl>,
    /// The highest snapshot number the coordinator aborted: sources and
    /// tasks skip the work of barriers at or below it. A watermark, not
    /// coordination: reading it late only costs a wasted capture.
    aborted: Arc<AtomicU64>,
    /// Senders into every task's channel, for completion notices.
    all_tasks: Vec<Sender<(usize, Msg)>>,
    halt: Arc<AtomicBool>,
    /// Every edge's budget, closed at shutdown: a sender waiting on a
    /// receiver that holds its batches for an alignment that will never
    /// complete (its other input went) must not wait for ever.
    budgets: Vec<Arc<Budget>>,
    handles: Vec<JoinHandle<()>>,
}

impl Attempt {
    /// Start every thread of an attempt; reports go to `reports`.
    ///
    /// # Errors
    /// When the source or the sink cannot be opened, or a thread not started.
    pub(crate) fn start(
        runtime: &Runtime,
        spec: &JobSpec,
        components: &[Arc<LoadedComponent>],
        restore: Option<&RestorePoint>,
        key_groups: &KeyGroups,
        reports: Sender<Report>,
        records_in: Arc<AtomicU64>,
    ) -> Result<Attempt, JobError> {
        let groups_of = |op: &crate::spec::OperatorSpec| {
            key_groups
                .get(&op.name)
                .copied()
                .unwrap_or_else(|| op.key_groups())
        };
        assert_eq!(
            components.len(),
            spec.operators.len(),
            "one component per operator"
        );
        let l = &spec.limits;
        let limits = SandboxLimits {
            memory_bytes: l.memory.0,
            call_timeout: l.call_timeout.0,
            fuel: l.fuel,
            max_output: l.max_output.0,
            max_snapshot: l.max_snapshot.map(|s| s.0),
            max_instances: l.max_instances as usize,
            max_tables: l.max_tables as usize,
            max_memories: l.max_memories as usize,
            max_table_elements: l.max_table_elements as usize,
            max_resources: l.max_resources as usize,
            grants: Vec::new(),
        };
        // Grants were checked when the job was loaded; resolving again here
        // (symlinks included) means a directory swapped since is caught.
        let grants = spec
            .operators
            .iter()
            .map(|op| {
                op.grants
                    .iter()
                    .map(|g| {
                        Ok(DirGrant {
                            host: g.resolve(&spec.base_dir).map_err(|reason| JobError::Grant {
                                operator: op.name.clone(),
                                reason: reason.to_string(),
                            })?,
                            guest: g.guest.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, JobError>>()
            })
            .collect::<Result<Vec<_>, JobError>>()?;
        let source = source::of(&spec.source, &spec.base_dir);
        let mut source = source.open()?;
        if let Some(r) = restore {
            source.seek(r.source_position)?;
        }
        // Open every sink writer first, so an unwritable output fails the
        // job before any work is done.
        let last = spec.operators.len() - 1;
        let sink = sink::of(&spec.sink, &spec.base_dir);
        let mut sinks: Vec<Option<Box<dyn sink::SinkWriter>>> = (0..spec.sink_parallelism())
            .map(|t| {
                let seq = restore
                    .and_then(|r| r.sink_next_seq.get(&t).copied())
                    .unwrap_or(0);
                sink.writer(t, seq).map(Some)
            })
            .collect::<Result<_, _>>()?;

        let channels: Vec<Vec<Channel>> = spec
            .operators
            .iter()
            .map(|op| (0..op.parallelism).map(|_| bounded(CHANNEL_CAPACITY)).collect())
            .collect();
        let senders = |stage: usize| -> Vec<Sender<(usize, Msg)>> {
            channels[stage].iter().map(|(tx, _)| tx.clone()).collect()
        };
        // budgets[stage][task][upstream]: one per edge into each task, the
        // source being the one upstream of the first stage.
        let budgets: Vec<Vec<Vec<Arc<Budget>>>> = spec
            .operators
            .iter()
            .enumerate()
            .map(|(stage, op)| {
                let upstreams = if stage == 0 {
                    1
                } else {
                    spec.operators[stage - 1].parallelism as usize
                };
                (0..op.parallelism)
                    .map(|_| {
                        (0..upstreams)
                            .map(|_| Budget::new(edge_capacity(upstreams)))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        // The edges from upstream `from` into every task of `stage`.
        let edges = |stage: usize, from: usize| -> Vec<Edge> {
            channels[stage]
                .iter()
                .zip(&budgets[stage])
                .map(|((tx, _), b)| Edge {
                    tx: tx.clone(),
                    budget: b[from].clone(),
                })
                .collect()
        };

        let halt = Arc::new(AtomicBool::new(false));
        let aborted = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        for (stage, op) in spec.operators.iter().enumerate() {
            let upstreams = if stage == 0 {
                1
            } else {
                spec.operators[stage - 1].parallelism as usize
            };
            for index in 0..op.parallelism {
                let key = TaskKey::new(op.name.clone(), index);
                let downstream = if stage < last {
                    task::Downstream::Next(
                        edges(stage + 1, index as usize),
                        groups_of(&spec.operators[stage + 1]),
                        index as usize,
                    )
                } else {
                    task::Downstream::Sink(sinks[index as usize].take().expect("one sink per last task"))
                };
                let restored = restore.map(|r| {
                    (
                        r.store.clone(),
                        r.id.clone(),
                        r.tasks.get(&key).cloned().expect("restore point validated"),
                    )
                });
                let t = task::Task {
                    runtime: runtime.clone(),
                    component: components[stage].clone(),
                    limits: SandboxLimits {
                        grants: grants[stage].clone(),
                        ..limits.clone()
                    },
                    job: spec.name.clone(),
                    key,
                    parallelism: op.parallelism,
                    key_groups: groups_of(op),
                    config: op.config.clone(),
                    upstreams,
                    rx: channels[stage][index as usize].1.clone(),
                    _inputs: Inputs(budgets[stage][index as usize].clone()),
                    downstream,
                    reports: reports.clone(),
                    restore: restored,
                    aborted: aborted.clone(),
                    native: crate::snapshot::NativeBase::with_config(&op.config),
                };
                let reports = reports.clone();
                let handle = thread::Builder::new()
                    .name(format!("{}[{}]", op.name, index))
                    .spawn(move || {
                        let name = t.key.to_string();
                        let on_panic = reports.clone();
                        // A panic must fail the job: a task that vanished
                        // silently would leave the coordinator waiting.
                        if let Err(p) = catch_unwind(AssertUnwindSafe(|| t.run_and_report(reports))) {
                            let _ = on_panic.send(Report::Failed(JobError::panicked(name, &*p)));
                        }
                    })
                    .map_err(|e| JobError::Thread(e.to_string()))?;
                handles.push(handle);
            }
        }

        let (ctl_tx, ctl_rx) = bounded::<SourceCtl>(16);
        let first = (edges(0, 0), groups_of(&spec.operators[0]));
        let all_tasks = (0..channels.len()).flat_map(senders).collect();
        let all_budgets = budgets.iter().flatten().flatten().cloned().collect();
        drop(channels);
        let source_halt = halt.clone();
        let source_aborted = aborted.clone();
        let configs: Vec<_> = spec.operators.iter().map(|op| op.config.clone()).collect();
        let handle = thread::Builder::new()
            .name("source".into())
            .spawn(move || {
                let on_panic = reports.clone();
                let run = || {
                    fault::panic_if_asked(Site::Source, configs.iter());
                    run_source(
                        source,
                        first,
                        ctl_rx,
                        reports,
                        source_halt,
                        source_aborted,
                        records_in,
                    )
                };
                if let Err(p) = catch_unwind(AssertUnwindSafe(run)) {
                    let _ = on_panic.send(Report::Failed(JobError::panicked("the source", &*p)));
                }
            })
            .map_err(|e| JobError::Thread(e.to_string()))?;
        handles.push(handle);
        Ok(Attempt {
            source_ctl: ctl_tx,
            aborted,
            all_tasks,
            halt,
            budgets: all_budgets,
            handles,
        })
    }

    /// Ask the source to inject a barrier. Never blocks: if the source has
    /// not yet taken earlier requests, the barrier is refused.
    pub(crate) fn inject(&self, barrier: Barrier) -> Result<(), InjectError> {
        self.source_ctl
            .try_send(SourceCtl::Inject(barrier))
            .map_err(InjectError::from)
    }

    /// Ask the source to inject a final barrier and stop (no draining).
    pub(crate) fn stop(&self, barrier: Barrier) -> Result<(), InjectError> {
        self.source_ctl
            .try_send(SourceCtl::Stop(barrier))
            .map_err(InjectError::from)
    }

    /// Snapshot `id` was aborted: barriers up to it need no more work.
    pub(crate) fn abort(&self, id: u64) {
        self.aborted.fetch_max(id, Ordering::SeqCst);
    }

    /// Tell every task that snapshot `id` completed: sink tasks forget the
    /// part files it committed, tasks with native state may use it as the
    /// base of incremental captures. Never blocks: a missed notice only
    /// means the files are listed (harmlessly) once more, or that the next
    /// native capture builds on an older base (see `snapshot::NativeBase`).
    pub(crate) fn notify_complete(&self, id: u64) {
        for tx in &self.all_tasks {
            let _ = tx.try_send((FROM_COORDINATOR, Msg::Complete(id)));
        }
    }

    /// Stop every thread (failure or cancel) and wait for them.
    pub(crate) fn shutdown(self) {
        drop(self);
    }
}

/// Dropping an attempt stops its threads, also when the coordinator
/// unwinds from a panic: they must not run on, unsupervised.
impl Drop for Attempt {
    fn drop(&mut self) {
        self.halt.store(true, Ordering::SeqCst);
        // Dropping our senders lets tasks see their inputs disconnect.
        self.all_tasks.clear();
        for b in &self.budgets {
            b.close();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The source thread: read batches, partition them to the first stage, and
/// inject barriers between batches when the coordinator asks.
fn run_source(
    mut source: Box<dyn source::SourceReader>,
    (first, key_groups): (Vec<Edge>, u32),
    ctl: Receiver<SourceCtl>,
    reports: Sender<Report>,
    halt: Arc<AtomicBool>,
    aborted: Arc<AtomicU64>,
    records_in: Arc<AtomicU64>,
) {
    let broadcast = |make: &dyn Fn() -> Msg| -> bool { first.iter().all(|e| e.send(0, make())) };
    loop {
        while let Ok(cmd) = ctl.try_recv() {
            match cmd {
                SourceCtl::Inject(b) => {
                    if b.id <= aborted.load(Ordering::SeqCst) {
                        continue; // aborted before it was injected
                    }
                    let (id, position) = (b.id, source.position());
                    if !broadcast(&|| Msg::Barrier(b.clone())) {
                        return;
                    }
                    let _ = reports.send(Report::SourceAck { id, position });
                }
                SourceCtl::Stop(b) => {
                    let (id, position) = (b.id, source.position());
                    if broadcast(&|| Msg::Barrier(b.clone())) {
                        let _ = reports.send(Report::SourceAck { id, position });
                        broadcast(&|| Msg::Stop);
                    }
                    return;
                }
            }
        }
        if halt.load(Ordering::Relaxed) {
            return;
        }
        match source.next_batch() {
            Err(e) => {
                let _ = reports.send(Report::Failed(e.into()));
                return;
            }
            Ok(None) => {
                let _ = reports.send(Report::SourceEnded {
                    position: source.position(),
                });
                broadcast(&|| Msg::End);
                return;
            }
            Ok(Some(batch)) => {
                records_in.fetch_add(batch.len() as u64, Ordering::Relaxed);
                if !route(&first, key_groups, 0, batch) {
                    return; // a task failed; its error is reported
                }
            }
        }
    }
}
