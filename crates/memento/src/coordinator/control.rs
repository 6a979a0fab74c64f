//! Requests to a running job's coordinator, from any thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender};

use crate::spec::SnapshotFormat;
use crate::store::{SnapshotId, SnapshotKind};

/// The answer to a trigger: the completed snapshot, or why there is none.
pub type TriggerResult = Result<SnapshotId, TriggerError>;

/// Why a trigger got no snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    /// No run of the job is going on (it ended, or none started).
    #[error("the job is not running")]
    NotRunning,
    /// The job is between two attempts after a failure: try again later.
    #[error("the job is restarting")]
    Restarting,
    /// The input ended: the job only finishes now (its end-of-input record
    /// commits the rest).
    #[error("the job's input has ended")]
    InputEnded,
    /// A snapshot was asked for while the input ended or the job stops.
    #[error("the job's input has ended or it is stopping")]
    Stopping,
    /// A stop was asked for while the input ended or the job stops already.
    #[error("the job's input has ended or it is already stopping")]
    AlreadyStopping,
    /// The run ended before the snapshot could start.
    #[error("the job ended before the snapshot could start")]
    EndedBeforeStart,
    /// The snapshot started and failed: why (timed out, declined by a task,
    /// the store, the run ending first).
    #[error("{0}")]
    Failed(String),
}

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
    tx: Sender<Control>,
    /// The coordinator's end of the channel, kept to answer requests that
    /// no coordinator will take once the run has ended: a trigger must
    /// never wait forever.
    rx: Receiver<Control>,
    /// Set when a run ends (and cleared when one starts).
    ended: Arc<AtomicBool>,
}

impl JobControl {
    /// A control handle and the receiver the coordinator reads.
    pub(crate) fn new() -> (JobControl, Receiver<Control>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let control = JobControl {
            tx,
            rx: rx.clone(),
            ended: Arc::new(AtomicBool::new(false)),
        };
        (control, rx)
    }

    /// A run starts (requests queue for its coordinator) or has ended
    /// (requests left over, and any sent from now on, are answered "not
    /// running" at once).
    pub(crate) fn set_ended(&self, ended: bool) {
        self.ended.store(ended, Ordering::SeqCst);
        if ended {
            self.answer_leftovers();
        }
    }

    /// Answer every queued request: nobody will take it. Called after
    /// `ended` is set by the ending run, and after sending by a requester
    /// that then sees `ended`: whichever comes second finds the request.
    fn answer_leftovers(&self) {
        while let Ok(request) = self.rx.try_recv() {
            if let Control::Trigger {
                reply: Some(reply), ..
            }
            | Control::Stop { reply: Some(reply) } = request
            {
                let _ = reply.send(Err(TriggerError::NotRunning));
            }
        }
    }

    fn send(&self, request: Control) {
        if self.tx.send(request).is_ok() && self.ended.load(Ordering::SeqCst) {
            self.answer_leftovers();
        }
    }

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
        self.send(Control::Trigger {
            kind,
            format,
            reply: Some(tx),
        });
        rx
    }

    /// Stop the sources, take a final savepoint and end the job; the
    /// receiver gets the savepoint's id.
    pub fn stop_with_savepoint(&self) -> Receiver<TriggerResult> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Control::Stop { reply: Some(tx) });
        rx
    }

    /// Cancel the job: stop at once, commit nothing more. Checkpoints stay
    /// if `persistent`.
    pub fn cancel(&self) {
        self.send(Control::Cancel);
    }
}
