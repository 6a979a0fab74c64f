//! The response bodies of the REST API: the wire shapes `openapi.json`
//! describes, built from the library's own types (a job's
//! [`ServiceJob`] handle and [`JobStatus`], a snapshot's [`Manifest`]).
//! They deserialize too, so the CLI reads the server's answers as these
//! types.

use serde::{Deserialize, Serialize};

use memento::coordinator::status::{SnapshotCounts, TaskSnapshotFigures};
use memento::coordinator::{JobState, JobStatus, SnapshotOutcome, SnapshotRecord};
use memento::service::{Desired, RemoteJob, ServiceJob};
use memento::spec::SnapshotFormat;
use memento::store::{Manifest, SnapshotId, SnapshotKind, StateFormat, TaskKey, Trigger};

/// A job's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateName {
    /// Loaded, not started.
    Created,
    /// Running.
    Running,
    /// Waiting to restart after a failure.
    Restarting,
    /// The input ended; all output committed.
    Finished,
    /// Stopped with a savepoint.
    Stopped,
    /// Cancelled.
    Cancelled,
    /// Failed for good.
    Failed,
}

impl StateName {
    /// Whether a job in this state still runs (or is about to).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            StateName::Created | StateName::Running | StateName::Restarting
        )
    }

    /// As it is written in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StateName::Created => "created",
            StateName::Running => "running",
            StateName::Restarting => "restarting",
            StateName::Finished => "finished",
            StateName::Stopped => "stopped",
            StateName::Cancelled => "cancelled",
            StateName::Failed => "failed",
        }
    }
}

/// `GET /v1/jobs/{job}`, an entry of `GET /v1/jobs`, the answer to a
/// submission.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobView {
    /// Owning tenant.
    pub tenant: String,
    /// Job name.
    pub name: String,
    /// Where it stands.
    pub state: StateName,
    /// Why it failed, when `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The final savepoint, when `stopped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint: Option<SnapshotId>,
    /// Restarts after failures.
    pub restarts: u32,
    /// The snapshot of the latest restore.
    pub restored_from: Option<SnapshotId>,
    /// Records read by the source so far.
    pub records_in: u64,
    /// Snapshot counts.
    pub counts: CountsView,
    /// When it was submitted, unix ms.
    pub submitted_at_ms: u64,
    /// When it started running, unix ms (0 before).
    pub started_at_ms: u64,
    /// Operators in chain order.
    pub operators: Vec<OperatorView>,
    /// The effective sandbox limits (after the tenant's caps).
    pub limits: LimitsView,
    /// In a pool of hosts: the id of the host that runs the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// In a pool of hosts: the API URL of that host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_url: Option<String>,
    /// For a job another host of the pool runs: its latest snapshot (the
    /// figures above are that host's to give; they are zero here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_snapshot: Option<SnapshotId>,
}

impl JobView {
    /// The view of one job.
    pub fn of(job: &ServiceJob) -> JobView {
        let st = job.status();
        let (state, error, savepoint) = match job.state() {
            JobState::Created => (StateName::Created, None, None),
            JobState::Running => (StateName::Running, None, None),
            JobState::Restarting => (StateName::Restarting, None, None),
            JobState::Finished => (StateName::Finished, None, None),
            JobState::Stopped { savepoint } => (StateName::Stopped, None, Some(savepoint)),
            JobState::Cancelled => (StateName::Cancelled, None, None),
            JobState::Failed { error } => (StateName::Failed, Some(error), None),
        };
        let spec = job.spec();
        let (host, host_url) = job.host().unzip();
        JobView {
            tenant: job.tenant().to_string(),
            name: job.name().to_string(),
            state,
            error,
            savepoint,
            restarts: st.restarts,
            restored_from: st.restored_from,
            records_in: st.records_in,
            counts: CountsView::from(&st.counts),
            submitted_at_ms: job.submitted_at_ms(),
            started_at_ms: st.started_at_ms,
            operators: spec
                .operators
                .iter()
                .zip(job.component_hashes())
                .map(|(op, component)| OperatorView {
                    name: op.name.clone(),
                    parallelism: op.parallelism,
                    component,
                })
                .collect(),
            limits: LimitsView {
                memory: spec.limits.memory.0,
                call_timeout_ms: u64::try_from(spec.limits.call_timeout.0.as_millis()).unwrap_or(u64::MAX),
            },
            host,
            host_url,
            latest_snapshot: None,
        }
    }

    /// The view of a pool job another host runs (or is to take over), from
    /// what the store says: its run's figures are that host's.
    pub fn remote(job: &RemoteJob) -> JobView {
        // A user's stop is final once accepted; a lease may outlive its
        // dead holder, so it says "running" only of a job to run.
        let state = match (job.desired, job.leased) {
            (Desired::Stopped, _) => StateName::Stopped,
            (Desired::Running, true) => StateName::Running,
            (Desired::Running, false) => StateName::Restarting,
        };
        let (host, host_url) = job.host.clone().unzip();
        JobView {
            tenant: job.tenant.clone(),
            name: job.name.clone(),
            state,
            error: None,
            savepoint: None,
            restarts: 0,
            restored_from: None,
            records_in: 0,
            counts: CountsView::default(),
            submitted_at_ms: job.since_ms,
            started_at_ms: job.since_ms,
            operators: job
                .spec
                .iter()
                .flat_map(|s| &s.operators)
                .zip(job.components.iter().cloned())
                .map(|(op, component)| OperatorView {
                    name: op.name.clone(),
                    parallelism: op.parallelism,
                    component,
                })
                .collect(),
            limits: job.spec.as_ref().map_or(
                LimitsView {
                    memory: 0,
                    call_timeout_ms: 0,
                },
                |s| LimitsView {
                    memory: s.limits.memory.0,
                    call_timeout_ms: u64::try_from(s.limits.call_timeout.0.as_millis()).unwrap_or(u64::MAX),
                },
            ),
            host,
            host_url,
            latest_snapshot: job.latest.clone(),
        }
    }
}

/// `GET /v1/jobs`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobsView {
    /// By tenant, then name.
    pub jobs: Vec<JobView>,
}

/// One operator of a job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OperatorView {
    /// Operator name.
    pub name: String,
    /// Number of tasks.
    pub parallelism: u32,
    /// blake3 of its component.
    pub component: String,
}

/// Effective per-instance limits.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LimitsView {
    /// Linear memory per instance, bytes.
    pub memory: u64,
    /// Deadline of one call, ms.
    pub call_timeout_ms: u64,
}

/// Snapshot counts over the job's life in this process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountsView {
    /// Completed snapshots.
    pub completed: u64,
    /// Failed snapshots.
    pub failed: u64,
    /// In progress (0 or 1).
    pub in_progress: u64,
    /// Restores (start from a snapshot, restarts).
    pub restored: u64,
}

impl From<&SnapshotCounts> for CountsView {
    fn from(c: &SnapshotCounts) -> Self {
        CountsView {
            completed: c.completed,
            failed: c.failed,
            in_progress: c.in_progress,
            restored: c.restored,
        }
    }
}

/// Where a snapshot stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum OutcomeView {
    /// Barrier injected, not all acknowledgements in.
    InProgress,
    /// Committed to the store.
    Completed,
    /// Aborted.
    Failed {
        /// Why.
        reason: String,
    },
}

/// One snapshot of a job's history: `GET /v1/jobs/{job}/checkpoints/{n}`,
/// and the entries of the checkpoints view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordView {
    /// The snapshot number.
    pub number: u64,
    /// The id, once complete.
    pub id: Option<SnapshotId>,
    /// Checkpoint or savepoint.
    pub kind: SnapshotKind,
    /// What triggered it.
    pub trigger: Trigger,
    /// The format asked for.
    pub format: SnapshotFormat,
    /// Where it stands (`status`, and `reason` when failed).
    #[serde(flatten)]
    pub outcome: OutcomeView,
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
    pub tasks: Vec<TaskView>,
}

impl From<&SnapshotRecord> for RecordView {
    fn from(r: &SnapshotRecord) -> Self {
        RecordView {
            number: r.number,
            id: r.id.clone(),
            kind: r.kind,
            trigger: r.trigger,
            format: r.format,
            outcome: match &r.outcome {
                SnapshotOutcome::InProgress => OutcomeView::InProgress,
                SnapshotOutcome::Completed => OutcomeView::Completed,
                SnapshotOutcome::Failed { reason } => OutcomeView::Failed {
                    reason: reason.clone(),
                },
            },
            triggered_at_ms: r.triggered_at_ms,
            duration_ms: r.duration_ms,
            pause_ms: r.pause_ms,
            logical_bytes: r.logical_bytes,
            new_bytes: r.new_bytes,
            tasks: r.tasks.iter().map(TaskView::from).collect(),
        }
    }
}

/// One task's part of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    /// The task.
    pub task: TaskKey,
    /// How long the task was paused to capture its state, ms.
    pub pause_ms: u64,
    /// Chunking and writing its state (off the task thread), ms.
    pub async_ms: u64,
    /// Logical size of its state.
    pub logical_bytes: u64,
}

impl From<&TaskSnapshotFigures> for TaskView {
    fn from(t: &TaskSnapshotFigures) -> Self {
        TaskView {
            task: t.task.clone(),
            pause_ms: t.pause_ms,
            async_ms: t.async_ms,
            logical_bytes: t.logical_bytes,
        }
    }
}

/// min/p50/p90/p99/max of one figure over completed snapshots.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Smallest.
    pub min: u64,
    /// Median (nearest rank).
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl Stats {
    /// Nearest-rank percentiles of `values`; `None` when there are none.
    pub fn of(mut values: Vec<u64>) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        values.sort_unstable();
        let rank = |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Some(Stats {
            min: values[0],
            p50: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            max: values[values.len() - 1],
        })
    }

    /// The figures as (quantile, value): 0 is the minimum, 1 the maximum.
    pub fn quantiles(&self) -> [(&'static str, u64); 5] {
        [
            ("0", self.min),
            ("0.5", self.p50),
            ("0.9", self.p90),
            ("0.99", self.p99),
            ("1", self.max),
        ]
    }
}

/// `GET /v1/jobs/{job}/checkpoints`: counts, summary, latest, history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointsView {
    /// Completed, failed, in progress, restored.
    pub counts: CountsView,
    /// Over the completed snapshots in the history.
    pub summary: Summary,
    /// The newest of each kind of event.
    pub latest: Latest,
    /// The newest snapshots (checkpoints and savepoints), newest first.
    pub history: Vec<RecordView>,
}

impl CheckpointsView {
    /// The view of a job's status: counts, summary over the completed
    /// snapshots of its history, the newest of each kind, the history
    /// newest first.
    pub fn of(st: &JobStatus) -> CheckpointsView {
        let completed: Vec<&SnapshotRecord> = st
            .history
            .iter()
            .filter(|r| r.outcome == SnapshotOutcome::Completed)
            .collect();
        let stats = |f: fn(&SnapshotRecord) -> u64| {
            Stats::of(completed.iter().map(|r| f(r)).collect()).unwrap_or_default()
        };
        let newest = |pred: &dyn Fn(&SnapshotRecord) -> bool| {
            st.history.iter().rev().find(|r| pred(r)).map(RecordView::from)
        };
        CheckpointsView {
            summary: Summary {
                completed: completed.len() as u64,
                duration_ms: stats(|r| r.duration_ms),
                logical_bytes: stats(|r| r.logical_bytes),
                new_bytes: stats(|r| r.new_bytes),
            },
            latest: Latest {
                completed: newest(&|r| {
                    r.kind == SnapshotKind::Checkpoint && r.outcome == SnapshotOutcome::Completed
                }),
                savepoint: newest(&|r| {
                    r.kind == SnapshotKind::Savepoint && r.outcome == SnapshotOutcome::Completed
                }),
                failed: newest(&|r| matches!(r.outcome, SnapshotOutcome::Failed { .. })),
                restored: st.restored_from.clone(),
            },
            counts: CountsView::from(&st.counts),
            history: st.history.iter().rev().map(RecordView::from).collect(),
        }
    }
}

/// Statistics over completed snapshots (all zero while there are none).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// How many completed snapshots the figures cover.
    pub completed: u64,
    /// Trigger to commit, ms.
    pub duration_ms: Stats,
    /// Logical size of the state.
    pub logical_bytes: Stats,
    /// Bytes of blobs newly written.
    pub new_bytes: Stats,
}

/// The newest completed checkpoint, savepoint, failure and restore.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Latest {
    /// Newest completed checkpoint.
    pub completed: Option<RecordView>,
    /// Newest completed savepoint.
    pub savepoint: Option<RecordView>,
    /// Newest failed snapshot.
    pub failed: Option<RecordView>,
    /// The snapshot of the newest restore.
    pub restored: Option<SnapshotId>,
}

/// A stored snapshot as `GET /v1/snapshots` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotView {
    /// Owning tenant.
    pub tenant: String,
    /// `<job>-<number>`.
    pub id: SnapshotId,
    /// The job.
    pub job: String,
    /// The number.
    pub number: u64,
    /// `checkpoint` or `savepoint`.
    pub kind: SnapshotKind,
    /// What triggered it.
    pub trigger: Trigger,
    /// How its state is encoded.
    pub format: StateFormat,
    /// Triggered, unix ms.
    pub created_at_ms: u64,
    /// Committed, unix ms.
    pub completed_at_ms: u64,
    /// Logical size of the state.
    pub logical_bytes: u64,
    /// Uncompressed bytes of blobs it wrote.
    pub new_bytes: u64,
    /// On-disk bytes of blobs it wrote.
    pub stored_bytes: u64,
    /// Retention in force when taken, in short human form.
    pub retention: String,
}

impl SnapshotView {
    /// The view of tenant `tenant`'s snapshot `m`.
    pub fn of(tenant: &str, m: &Manifest) -> SnapshotView {
        SnapshotView {
            tenant: tenant.to_string(),
            id: m.id.clone(),
            job: m.job.to_string(),
            number: m.number,
            kind: m.kind,
            trigger: m.trigger,
            format: m.format,
            created_at_ms: m.created_at_ms,
            completed_at_ms: m.completed_at_ms,
            logical_bytes: m.figures.logical_bytes,
            new_bytes: m.figures.new_bytes,
            stored_bytes: m.figures.stored_bytes,
            retention: m.retention.to_string(),
        }
    }
}

/// `GET /v1/snapshots`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotsView {
    /// By tenant, job and number.
    pub snapshots: Vec<SnapshotView>,
}

/// The answer to a trigger (checkpoint, savepoint, stop): the id to poll.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TriggerResponse {
    /// Request id for `GET /v1/jobs/{job}/savepoints/{request}`.
    pub request_id: String,
}

/// What was asked of a job that answers at once (`cancel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Requested {
    /// Cancel.
    Cancel,
}

/// `POST /v1/jobs/{job}/cancel`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CancelResponse {
    /// The job.
    pub job: String,
    /// What was requested.
    pub requested: Requested,
}

/// `DELETE /v1/snapshots/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DisposeResponse {
    /// The snapshot disposed of.
    pub disposed: SnapshotId,
}

/// Every error answer: `{"error": code, "message": …}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Short machine-readable code (`not_found`, `bad_request`, …).
    pub error: String,
    /// What went wrong, in one line.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use memento::coordinator::status::TaskSnapshotFigures;

    #[test]
    fn percentiles_are_nearest_rank_and_absent_without_values() {
        let s = Stats::of((1..=100).collect()).unwrap();
        assert_eq!((s.min, s.p50, s.p90, s.p99, s.max), (1, 50, 90, 99, 100));
        assert_eq!(Stats::of(vec![]), None);
        let one = Stats::of(vec![7]).unwrap();
        assert_eq!((one.min, one.p50, one.p99, one.max), (7, 7, 7, 7));
    }

    /// The view of a history record is the library record, field for field,
    /// and reads back as itself.
    #[test]
    fn records_keep_the_library_shape_and_round_trip() {
        let failed = SnapshotRecord {
            number: 3,
            id: None,
            kind: SnapshotKind::Savepoint,
            trigger: Trigger::Manual,
            format: SnapshotFormat::Auto,
            outcome: SnapshotOutcome::Failed {
                reason: "quota exceeded".into(),
            },
            triggered_at_ms: 10,
            duration_ms: 20,
            pause_ms: 1,
            logical_bytes: 2,
            new_bytes: 3,
            tasks: vec![TaskSnapshotFigures {
                task: TaskKey::new("count", 1),
                pause_ms: 4,
                async_ms: 5,
                logical_bytes: 6,
            }],
        };
        let completed = SnapshotRecord {
            id: Some(SnapshotId::parse("clicks-4").unwrap()),
            outcome: SnapshotOutcome::Completed,
            ..failed.clone()
        };
        for r in [failed, completed] {
            let view = RecordView::from(&r);
            let json = serde_json::to_value(&view).unwrap();
            assert_eq!(json, serde_json::to_value(&r).unwrap());
            assert_eq!(serde_json::from_value::<RecordView>(json).unwrap(), view);
        }
    }
}
