//! A running job's status as the outside sees it (REST API, dashboard,
//! metrics): its state, and the history of its snapshots with per-task
//! figures. The coordinator writes it; readers take a copy.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::spec::SnapshotFormat;
use crate::store::{SnapshotId, SnapshotKind, TaskKey, Trigger};

/// How many snapshot records the history keeps (oldest dropped first).
pub const HISTORY_LEN: usize = 100;

/// Lifecycle of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum JobState {
    /// Loaded, not started.
    Created,
    /// Running an attempt.
    Running,
    /// Waiting to restart after a failure.
    Restarting,
    /// The input ended; all output committed.
    Finished,
    /// Stopped with a savepoint.
    Stopped {
        /// The final savepoint.
        savepoint: SnapshotId,
    },
    /// Cancelled.
    Cancelled,
    /// Failed for good.
    Failed {
        /// Why.
        error: String,
    },
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, JobState::Created | JobState::Running | JobState::Restarting)
    }
}

/// Outcome of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum SnapshotOutcome {
    /// Barrier injected, not all acknowledgements in.
    InProgress,
    /// Committed to the store.
    Completed,
    /// Aborted.
    Failed {
        /// Why (timeout, declined, write error…).
        reason: String,
    },
}

/// One task's part of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TaskSnapshotFigures {
    /// The task.
    pub task: TaskKey,
    /// How long the task was paused to capture its state, ms.
    pub pause_ms: u64,
    /// Chunking and writing its state (off the task thread), ms.
    pub async_ms: u64,
    /// Logical size of its state.
    pub logical_bytes: u64,
}

/// One snapshot in the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnapshotRecord {
    /// The snapshot number (the id once complete is `<job>-<number>`).
    pub number: u64,
    /// The id, once complete.
    pub id: Option<SnapshotId>,
    /// Checkpoint or savepoint.
    pub kind: SnapshotKind,
    /// What triggered it.
    pub trigger: Trigger,
    /// Format.
    pub format: SnapshotFormat,
    /// Where it stands.
    #[serde(flatten)]
    pub outcome: SnapshotOutcome,
    /// When it was triggered, unix ms.
    pub triggered_at_ms: u64,
    /// Trigger to commit (or to failure), ms.
    pub duration_ms: u64,
    /// Longest task pause, ms.
    pub pause_ms: u64,
    /// Logical size of all state.
    pub logical_bytes: u64,
    /// Bytes of blobs newly written.
    pub new_bytes: u64,
    /// Per task.
    pub tasks: Vec<TaskSnapshotFigures>,
}

/// Counts over the job's life (this process).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SnapshotCounts {
    /// Completed snapshots.
    pub completed: u64,
    /// Failed snapshots.
    pub failed: u64,
    /// In progress (0 or 1).
    pub in_progress: u64,
    /// Restores (start from a snapshot, restarts).
    pub restored: u64,
}

/// A copy of a job's status.
#[derive(Clone, Debug, Serialize)]
pub struct JobStatus {
    /// Job name.
    pub name: String,
    /// Lifecycle state.
    #[serde(flatten)]
    pub state: JobState,
    /// Restarts after failures.
    pub restarts: u32,
    /// The snapshot of the latest restore, if any.
    pub restored_from: Option<SnapshotId>,
    /// Records read by the source so far (all attempts).
    pub records_in: u64,
    /// Snapshot counts.
    pub counts: SnapshotCounts,
    /// The newest snapshots, oldest first.
    pub history: Vec<SnapshotRecord>,
    /// When the job started, unix ms.
    pub started_at_ms: u64,
}

/// The shared, updatable status of one job.
#[derive(Clone)]
pub struct StatusHandle {
    inner: Arc<Mutex<Inner>>,
    /// Records read by the source; incremented by the source thread without
    /// a lock (a metric, not coordination).
    pub(crate) records_in: Arc<AtomicU64>,
}

struct Inner {
    name: String,
    state: JobState,
    restarts: u32,
    restored_from: Option<SnapshotId>,
    counts: SnapshotCounts,
    history: VecDeque<SnapshotRecord>,
    started_at_ms: u64,
}

impl StatusHandle {
    /// A fresh status for job `name`.
    pub fn new(name: &str) -> StatusHandle {
        StatusHandle {
            inner: Arc::new(Mutex::new(Inner {
                name: name.to_string(),
                state: JobState::Created,
                restarts: 0,
                restored_from: None,
                counts: SnapshotCounts::default(),
                history: VecDeque::new(),
                started_at_ms: 0,
            })),
            records_in: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A copy of the current status.
    pub fn get(&self) -> JobStatus {
        let i = self.inner.lock().unwrap();
        JobStatus {
            name: i.name.clone(),
            state: i.state.clone(),
            restarts: i.restarts,
            restored_from: i.restored_from.clone(),
            records_in: self.records_in.load(Ordering::Relaxed),
            counts: i.counts.clone(),
            history: i.history.iter().cloned().collect(),
            started_at_ms: i.started_at_ms,
        }
    }

    pub(crate) fn set_state(&self, state: JobState) {
        let mut i = self.inner.lock().unwrap();
        if i.started_at_ms == 0 && state == JobState::Running {
            i.started_at_ms = crate::store::now_ms();
        }
        i.state = state;
    }

    pub(crate) fn restarted(&self, restarts: u32) {
        let mut i = self.inner.lock().unwrap();
        i.restarts = restarts;
        i.state = JobState::Restarting;
    }

    pub(crate) fn restored(&self, id: &SnapshotId) {
        let mut i = self.inner.lock().unwrap();
        i.counts.restored += 1;
        i.restored_from = Some(id.clone());
    }

    pub(crate) fn triggered(
        &self,
        number: u64,
        kind: SnapshotKind,
        trigger: Trigger,
        format: SnapshotFormat,
    ) {
        let mut i = self.inner.lock().unwrap();
        i.counts.in_progress += 1;
        if i.history.len() == HISTORY_LEN {
            i.history.pop_front();
        }
        i.history.push_back(SnapshotRecord {
            number,
            id: None,
            kind,
            trigger,
            format,
            outcome: SnapshotOutcome::InProgress,
            triggered_at_ms: crate::store::now_ms(),
            duration_ms: 0,
            pause_ms: 0,
            logical_bytes: 0,
            new_bytes: 0,
            tasks: Vec::new(),
        });
    }

    /// Record the end of snapshot `number`.
    pub(crate) fn ended(&self, number: u64, outcome: SnapshotOutcome, figures: Option<EndFigures>) {
        let mut i = self.inner.lock().unwrap();
        i.counts.in_progress = i.counts.in_progress.saturating_sub(1);
        match outcome {
            SnapshotOutcome::Completed => i.counts.completed += 1,
            SnapshotOutcome::Failed { .. } => i.counts.failed += 1,
            SnapshotOutcome::InProgress => {}
        }
        if let Some(r) = i.history.iter_mut().rev().find(|r| r.number == number) {
            r.outcome = outcome;
            r.duration_ms = crate::store::now_ms().saturating_sub(r.triggered_at_ms);
            if let Some(f) = figures {
                r.duration_ms = f.duration_ms;
                r.id = Some(f.id);
                r.pause_ms = f.pause_ms;
                r.logical_bytes = f.logical_bytes;
                r.new_bytes = f.new_bytes;
                r.tasks = f.tasks.into_values().collect();
            }
        }
    }
}

/// Figures of a completed snapshot for its history record.
pub(crate) struct EndFigures {
    pub id: SnapshotId,
    /// Start to commit, as the manifest records it (the same figure in the
    /// log, the store's list and the API).
    pub duration_ms: u64,
    pub pause_ms: u64,
    pub logical_bytes: u64,
    pub new_bytes: u64,
    pub tasks: BTreeMap<TaskKey, TaskSnapshotFigures>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_tracks_outcomes_and_is_bounded() {
        let s = StatusHandle::new("j");
        for n in 1..=(HISTORY_LEN as u64 + 5) {
            s.triggered(
                n,
                SnapshotKind::Checkpoint,
                Trigger::Periodic,
                SnapshotFormat::Canonical,
            );
            let outcome = if n % 2 == 0 {
                SnapshotOutcome::Completed
            } else {
                SnapshotOutcome::Failed {
                    reason: "timed out".into(),
                }
            };
            s.ended(n, outcome, None);
        }
        let st = s.get();
        assert_eq!(st.history.len(), HISTORY_LEN);
        assert_eq!(st.history.first().unwrap().number, 6);
        assert_eq!(st.counts.completed + st.counts.failed, HISTORY_LEN as u64 + 5);
        assert_eq!(st.counts.in_progress, 0);
        assert!(matches!(
            st.history.last().unwrap().outcome,
            SnapshotOutcome::Failed { .. }
        ));
    }
}
