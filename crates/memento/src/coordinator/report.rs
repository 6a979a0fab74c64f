//! What a job run reports: its summary ([`JobReport`]) or why it failed
//! for good ([`JobFailed`]).

use std::time::Duration;

use serde::Serialize;

use crate::dataflow::JobError;
use crate::store::{SnapshotId, SnapshotKind, Trigger};

/// How a job run ended (when it did not fail).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum FinalState {
    /// The input ended and all output is committed.
    Finished,
    /// Stopped with a savepoint; resume from it.
    Stopped {
        /// The final savepoint.
        savepoint: SnapshotId,
    },
    /// Cancelled.
    Cancelled,
    /// The snapshot resumed from records that the job had already finished.
    AlreadyFinished {
        /// That snapshot.
        snapshot: SnapshotId,
    },
}

/// One completed snapshot, for the run summary.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotSummary {
    /// Its id.
    pub id: SnapshotId,
    /// Checkpoint or savepoint.
    pub kind: SnapshotKind,
    /// What triggered it.
    pub trigger: Trigger,
    /// Longest task pause, ms.
    pub pause_ms: u64,
    /// Trigger to commit, ms.
    pub duration_ms: u64,
    /// Logical size of the state.
    pub logical_bytes: u64,
    /// Bytes of new blobs written.
    pub new_bytes: u64,
}

/// What one run of a job did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JobReport {
    /// How it ended.
    pub state: Option<FinalState>,
    /// Records read from the source in the last attempt.
    pub source_records: u64,
    /// Records written to the sink in the last attempt.
    pub sink_records: u64,
    /// Per operator, in chain order (last attempt).
    pub operators: Vec<OperatorReport>,
    /// Wall time of the whole run.
    #[serde(serialize_with = "as_ms")]
    pub elapsed: Duration,
    /// Restarts after failures.
    pub restarts: u32,
    /// The snapshot the run started from.
    pub restored_from: Option<SnapshotId>,
    /// Snapshots completed.
    pub snapshots: Vec<SnapshotSummary>,
    /// Snapshots that failed (timeouts, declines, write errors).
    pub failed_snapshots: u32,
}

/// Figures of one operator, summed over its tasks.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OperatorReport {
    /// Operator name.
    pub name: String,
    /// Number of tasks.
    pub parallelism: u32,
    /// Events passed to `process`.
    pub records_in: u64,
    /// Events returned from `process` and `close`.
    pub records_out: u64,
    /// `process` calls made.
    pub process_calls: u64,
    /// Wall time inside the plugin, all tasks together.
    #[serde(serialize_with = "as_ms")]
    pub time_in_plugin: Duration,
}

/// Durations appear in JSON as milliseconds.
fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// A job run failed for good.
#[derive(Debug, thiserror::Error)]
#[error("{error}{}{}", restarts_note(*.restarts), resume_note(.resume_from, *.searched_older))]
pub struct JobFailed {
    /// The error of the last attempt.
    pub error: JobError,
    /// Restarts made before giving up.
    pub restarts: u32,
    /// The snapshot to resume from: the newest complete one; or, when
    /// starting from a snapshot is what failed, the newest older one that
    /// can start the job as it is now (see `searched_older`).
    pub resume_from: Option<SnapshotId>,
    /// Starting from a snapshot failed (it does not fit the job, or it did
    /// not restore), so `resume_from` is the newest older snapshot that can
    /// start the job as it is now: its manifest and blobs are there, it
    /// fits the job file, native images are of the components the job
    /// runs. `None` there means no such snapshot exists.
    pub searched_older: bool,
}

fn restarts_note(n: u32) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" (after {n} restarts)")
    }
}

fn resume_note(id: &Option<SnapshotId>, searched_older: bool) -> String {
    match (id, searched_older) {
        (Some(id), false) => format!("; snapshot {id} is kept to resume from"),
        (Some(id), true) => {
            format!("; the newest older snapshot that can start the job as it is now is {id}")
        }
        (None, true) => "; no older snapshot can start the job as it is now".into(),
        (None, false) => String::new(),
    }
}
