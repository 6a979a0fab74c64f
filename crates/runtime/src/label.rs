//! What names a call in errors and log lines: the task and the phase.

use std::fmt;

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
