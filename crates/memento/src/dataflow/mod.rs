//! One attempt of a job: a source thread, one thread per operator task,
//! bounded channels between them (backpressure), events travelling in
//! batches and routed between stages by a hash of their key, and snapshot
//! barriers flowing with the data.
//!
//! ```text
//! source ──partition──▶ op0[0..p0] ──partition──▶ op1[0..p1] … ──▶ sink part per last task
//!   ▲ barriers injected here        tasks align, capture, forward, ack ──▶ coordinator
//! ```
//!
//! Each task owns its plugin instance and calls it synchronously. Tasks talk
//! to the coordinator only through messages ([`Report`]); nothing else is
//! shared between threads.

mod align;
pub mod partition;
pub mod sink;
pub mod source;
mod task;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::runtime::{DirGrant, Event, LoadedComponent, Runtime, RuntimeError, SandboxLimits};
use crate::snapshot::RestoreError;
use crate::spec::{JobSpec, SnapshotFormat};
use crate::store::{BlobWriter, SnapshotId, StoreError, TaskKey, TaskState, TaskStateData, TenantStore};
use sink::SinkCommit;

/// Batches in flight per channel before the sender blocks.
const CHANNEL_CAPACITY: usize = 4;

/// Why a job run failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The source failed (unreadable input, malformed record).
    #[error("source: {0}")]
    Source(#[from] source::SourceError),
    /// The sink failed (I/O).
    #[error("sink: {0}")]
    Sink(#[from] sink::SinkError),
    /// A task failed: trap, deadline, memory limit or an error from the plugin.
    #[error(transparent)]
    Task(Box<RuntimeError>),
    /// A task could not be restored from a snapshot.
    #[error("{task}: {source}")]
    Restore {
        /// The task.
        task: TaskKey,
        /// Why (names the snapshot).
        source: Box<RestoreError>,
    },
    /// A directory grant of an operator cannot be given.
    #[error("operator `{operator}`: cannot grant a directory: {reason}")]
    Grant {
        /// The operator.
        operator: String,
        /// Why (names the directory).
        reason: String,
    },
    /// The snapshot to start from does not fit the job.
    #[error("cannot start from snapshot {id}: {reason}")]
    Incompatible {
        /// The snapshot.
        id: SnapshotId,
        /// Why.
        reason: String,
    },
    /// Too many snapshots failed in a row.
    #[error("{0}")]
    Snapshots(String),
    /// The final savepoint of a stop failed; the job stopped without one.
    #[error("stop-with-savepoint failed: {0}")]
    StopFailed(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The job was cancelled.
    #[error("job `{0}` was cancelled")]
    Cancelled(String),
    /// A thread could not be started or died.
    #[error("thread: {0}")]
    Thread(String),
}

impl From<RuntimeError> for JobError {
    fn from(e: RuntimeError) -> Self {
        JobError::Task(Box::new(e))
    }
}

/// A snapshot barrier: the coordinator's request that every task captures
/// its state after the records before it and before the records after it.
#[derive(Clone)]
pub struct Barrier {
    /// The snapshot number.
    pub id: u64,
    /// The format to capture in.
    pub format: SnapshotFormat,
    /// Where the tasks' uploads put their chunks.
    pub writer: BlobWriter,
}

/// What flows on the channels between stages.
pub(crate) enum Msg {
    Batch(Vec<Event>),
    Barrier(Barrier),
    /// The input ended: close the operator, then end downstream.
    End,
    /// Stop without draining (after a stop-with-savepoint barrier).
    Stop,
    /// Snapshot `n` completed (coordinator → every task; not aligned):
    /// sinks forget its part files, native captures may use it as a base.
    Complete(u64),
}

/// A task's input: messages tagged with the index of the sending task.
type Channel = (Sender<(usize, Msg)>, Receiver<(usize, Msg)>);

/// Partition `events` by key over the next stage's channels and send each
/// non-empty part, tagged with the sender's index `from`. `false` if a
/// receiving task is gone (it failed; its error is reported).
fn route(next: &[Sender<(usize, Msg)>], from: usize, events: Vec<Event>) -> bool {
    partition::partition(events, next.len())
        .into_iter()
        .enumerate()
        .all(|(task, part)| part.is_empty() || next[task].send((from, Msg::Batch(part))).is_ok())
}

/// Sender index used for messages from the coordinator.
const FROM_COORDINATOR: usize = usize::MAX;

/// What the dataflow tells the coordinator.
pub(crate) enum Report {
    /// The source injected barrier `id` at `position`.
    SourceAck { id: u64, position: u64 },
    /// The source reached the end of its input at `position`.
    SourceEnded { position: u64 },
    /// A task's state for snapshot `id` is in the store.
    TaskAck {
        id: u64,
        task: TaskKey,
        state: TaskStateData,
        sink: Option<SinkCommit>,
        pause: Duration,
        upload: Duration,
    },
    /// A task could not contribute to snapshot `id`.
    Declined { id: u64, task: TaskKey, reason: String },
    /// A task ended (input ended or stopped), with its last sink commit.
    TaskDone {
        task: TaskKey,
        figures: TaskFigures,
        sink: Option<SinkCommit>,
    },
    /// The attempt failed.
    Failed(JobError),
}

/// Counters of one task.
#[derive(Clone, Debug, Default)]
pub struct TaskFigures {
    /// Events passed to `process`.
    pub records_in: u64,
    /// Events emitted.
    pub records_out: u64,
    /// Events written to the sink (last stage only).
    pub sink_records: u64,
    /// `process` calls.
    pub process_calls: u64,
    /// Wall time inside the plugin.
    pub time_in_plugin: Duration,
}

/// Where an attempt starts from.
pub(crate) struct RestorePoint {
    pub store: TenantStore,
    pub id: SnapshotId,
    pub tasks: BTreeMap<TaskKey, TaskState>,
    pub source_position: u64,
    pub sink_next_seq: BTreeMap<u32, u64>,
}

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
        reports: Sender<Report>,
        records_in: Arc<AtomicU64>,
    ) -> Result<Attempt, JobError> {
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
                                reason,
                            })?,
                            guest: g.guest.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, JobError>>()
            })
            .collect::<Result<Vec<_>, JobError>>()?;
        let mut source = source::open(&spec.source, &spec.base_dir)?;
        if let Some(r) = restore {
            source.seek(r.source_position)?;
        }
        // Open every sink writer first, so an unwritable output fails the
        // job before any work is done.
        let last = spec.operators.len() - 1;
        let mut sinks: Vec<Option<Box<dyn sink::SinkWriter>>> = (0..spec.sink_parallelism())
            .map(|t| {
                let seq = restore
                    .and_then(|r| r.sink_next_seq.get(&t).copied())
                    .unwrap_or(0);
                sink::open(&spec.sink, &spec.base_dir, t, seq).map(Some)
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
                    task::Downstream::Next(senders(stage + 1), index as usize)
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
                    config: op.config.clone(),
                    upstreams,
                    rx: channels[stage][index as usize].1.clone(),
                    downstream,
                    reports: reports.clone(),
                    restore: restored,
                    aborted: aborted.clone(),
                    native: crate::snapshot::NativeBase::with_config(&op.config),
                };
                let reports = reports.clone();
                let handle = thread::Builder::new()
                    .name(format!("{}[{}]", op.name, index))
                    .spawn(move || t.run_and_report(reports))
                    .map_err(|e| JobError::Thread(e.to_string()))?;
                handles.push(handle);
            }
        }

        let (ctl_tx, ctl_rx) = bounded::<SourceCtl>(16);
        let first = senders(0);
        let all_tasks = (0..channels.len()).flat_map(senders).collect();
        drop(channels);
        let source_halt = halt.clone();
        let source_aborted = aborted.clone();
        let handle = thread::Builder::new()
            .name("source".into())
            .spawn(move || {
                run_source(
                    source,
                    first,
                    ctl_rx,
                    reports,
                    source_halt,
                    source_aborted,
                    records_in,
                )
            })
            .map_err(|e| JobError::Thread(e.to_string()))?;
        handles.push(handle);
        Ok(Attempt {
            source_ctl: ctl_tx,
            aborted,
            all_tasks,
            halt,
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
    pub(crate) fn shutdown(mut self) {
        self.halt.store(true, Ordering::SeqCst);
        // Dropping our senders lets tasks see their inputs disconnect.
        self.all_tasks.clear();
        drop(self.source_ctl);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The source thread: read batches, partition them to the first stage, and
/// inject barriers between batches when the coordinator asks.
fn run_source(
    mut source: Box<dyn source::Source>,
    first: Vec<Sender<(usize, Msg)>>,
    ctl: Receiver<SourceCtl>,
    reports: Sender<Report>,
    halt: Arc<AtomicBool>,
    aborted: Arc<AtomicU64>,
    records_in: Arc<AtomicU64>,
) {
    let broadcast = |make: &dyn Fn() -> Msg| -> bool { first.iter().all(|tx| tx.send((0, make())).is_ok()) };
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
                if !route(&first, 0, batch) {
                    return; // a task failed; its error is reported
                }
            }
        }
    }
}
