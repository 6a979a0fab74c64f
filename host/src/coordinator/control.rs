//! Requests to a running job's coordinator, from any thread.

use crossbeam_channel::{Receiver, Sender};

use crate::spec::SnapshotFormat;
use crate::store::{SnapshotId, SnapshotKind};

/// The answer to a trigger: the completed snapshot, or why it failed.
pub type TriggerResult = Result<SnapshotId, String>;

/// Requests to a running job's coordinator.
pub(crate) enum Control {
    Trigger {
        kind: SnapshotKind,
        format: Option<SnapshotFormat>,
        reply: Option<Sender<TriggerResult>>,
    },
    Stop {
        reply: Option<Sender<TriggerResult>>,
    },
    Cancel,
}

/// A handle to a running job: trigger snapshots, stop or cancel it, from any
/// thread. Cheap to clone.
#[derive(Clone)]
pub struct JobControl {
    pub(crate) tx: Sender<Control>,
}

impl JobControl {
    /// Take a checkpoint now; the receiver gets its id when it completes.
    pub fn trigger_checkpoint(&self) -> Receiver<TriggerResult> {
        self.trigger(SnapshotKind::Checkpoint, None)
    }

    /// Take a savepoint now (in `format`, or the job's savepoint format).
    pub fn trigger_savepoint(&self, format: Option<SnapshotFormat>) -> Receiver<TriggerResult> {
        self.trigger(SnapshotKind::Savepoint, format)
    }

    fn trigger(&self, kind: SnapshotKind, format: Option<SnapshotFormat>) -> Receiver<TriggerResult> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self
            .tx
            .send(Control::Trigger {
                kind,
                format,
                reply: Some(tx.clone()),
            })
            .is_err()
        {
            let _ = tx.send(Err("the job is not running".into()));
        }
        rx
    }

    /// Stop the sources, take a final savepoint and end the job; the
    /// receiver gets the savepoint's id.
    pub fn stop_with_savepoint(&self) -> Receiver<TriggerResult> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self
            .tx
            .send(Control::Stop {
                reply: Some(tx.clone()),
            })
            .is_err()
        {
            let _ = tx.send(Err("the job is not running".into()));
        }
        rx
    }

    /// Cancel the job: stop at once, commit nothing more. Checkpoints stay
    /// if `persistent`.
    pub fn cancel(&self) {
        let _ = self.tx.send(Control::Cancel);
    }
}
