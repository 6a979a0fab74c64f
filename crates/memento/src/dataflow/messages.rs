//! What travels in the dataflow: barriers and batches between stages,
//! notices from the coordinator, and the reports tasks and the source send
//! it.

use std::time::Duration;

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::runtime::Event;
use crate::spec::SnapshotFormat;
use crate::store::{BlobWriter, TaskKey, TaskStateData};

use super::budget::{self, Batch, Budget};
use super::error::JobError;
use super::partition;
use super::sink::SinkCommit;

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
    /// Events, charged to their edge's budget until the receiver drops them.
    Batch(Batch),
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
pub(super) type Channel = (Sender<(usize, Msg)>, Receiver<(usize, Msg)>);

/// The sending end of one edge between a task (or the source) and a task
/// of the next stage: the receiver's channel and the edge's byte budget.
#[derive(Clone)]
pub(super) struct Edge {
    pub(super) tx: Sender<(usize, Msg)>,
    pub(super) budget: Arc<Budget>,
}

impl Edge {
    /// Send `events`, cut to the edge's budget, waiting while it is full;
    /// `false` if the receiver is gone.
    fn send_events(&self, from: usize, events: Vec<Event>) -> bool {
        budget::send_charged(&self.budget, events, |b| {
            self.tx.send((from, Msg::Batch(b))).is_ok()
        })
    }

    /// Send a marker (barrier, end, stop): never charged, never waits on
    /// the budget; `false` if the receiver is gone.
    pub(super) fn send(&self, from: usize, msg: Msg) -> bool {
        self.tx.send((from, msg)).is_ok()
    }
}

/// Partition `events` by key over the next stage's edges and send each
/// non-empty part, tagged with the sender's index `from`. `false` if a
/// receiving task is gone (it failed; its error is reported).
pub(super) fn route(next: &[Edge], key_groups: u32, from: usize, events: Vec<Event>) -> bool {
    partition::partition(events, next.len(), key_groups)
        .into_iter()
        .enumerate()
        .all(|(task, part)| part.is_empty() || next[task].send_events(from, part))
}

/// Sender index used for messages from the coordinator.
pub(super) const FROM_COORDINATOR: usize = usize::MAX;

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
        /// Bytes of canonical state in no key group (`None`: native).
        unkeyed: Option<u64>,
        sink: Option<SinkCommit>,
        pause: Duration,
        upload: Duration,
    },
    /// A task could not capture its state for snapshot `id` (its plugin
    /// declined, or the format does not fit it now).
    Declined { id: u64, task: TaskKey, reason: String },
    /// The host could not store task `task`'s captured state for snapshot
    /// `id` (a full disk, the quota): the snapshot fails, and not because
    /// of the plugin.
    NotStored { id: u64, task: TaskKey, reason: String },
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
