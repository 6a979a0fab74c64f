//! Why a job run fails.

use crate::runtime::RuntimeError;
use crate::snapshot::RestoreError;
use crate::store::{InvalidName, SnapshotId, StoreError, TaskKey};

use super::sink::SinkError;
use super::source::SourceError;

/// Why a job run failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The source failed (unreadable input, malformed record).
    #[error("source: {0}")]
    Source(#[from] SourceError),
    /// The sink failed (I/O).
    #[error("sink: {0}")]
    Sink(#[from] SinkError),
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
    /// The host panicked while running the job (a bug of the host, not of
    /// the plugin): the job fails for good, since a restart would meet the
    /// same bug, and nothing else of the process is touched.
    #[error("the host panicked in {thread}: {message}")]
    Panicked {
        /// The thread: a task (`count[0]`), `the source`, `the coordinator`.
        thread: String,
        /// The panic's message, cut to 500 characters.
        message: String,
    },
}

impl JobError {
    /// The failure of a thread whose panic was caught with `payload`.
    pub(crate) fn panicked(thread: impl Into<String>, payload: &(dyn std::any::Any + Send)) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&str>() {
            s
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.as_str()
        } else {
            "a panic without a message"
        };
        JobError::Panicked {
            thread: thread.into(),
            message: crate::spec::excerpt(message, 500),
        }
    }
}

impl From<RuntimeError> for JobError {
    fn from(e: RuntimeError) -> Self {
        JobError::Task(Box::new(e))
    }
}

impl From<InvalidName> for JobError {
    fn from(e: InvalidName) -> Self {
        JobError::Store(e.into())
    }
}
