//! The snapshot protocol of one attempt: start a snapshot (a number, a
//! writer, a barrier at the source), collect the acknowledgements, commit
//! the manifest, then the output; fail it on a decline or a timeout; and
//! when the input ends, write the job's end-of-input record.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};

use super::Coordinator;
use super::compat::{self, FINISHED};
use super::control::{Control, TriggerError};
use super::pending::{Acks, Pending};
use super::report::{FinalState, SnapshotSummary};
use super::retention;
use super::status::{self, SnapshotOutcome};
use super::triggers::{Request, Triggers};
use crate::dataflow::sink::SinkCommit;
use crate::dataflow::{Attempt, Barrier, InjectError, JobError, Report, TaskFigures};
use crate::spec::SnapshotFormat;
use crate::store::{
    JobName, SnapshotId, SnapshotKind, SourcePosition, StateFormat, TaskKey, TaskState, Trigger, now_ms,
};

/// Why an attempt ended.
pub(super) enum AttemptEnd {
    Done(FinalState),
    Failed(JobError),
}

/// The coordinator's view of one running attempt.
pub(super) struct AttemptState {
    pub(super) attempt: Option<Attempt>,
    pub(super) pending: Option<Pending>,
    pub(super) triggers: Triggers,
    pub(super) total_tasks: usize,
    pub(super) done: BTreeMap<TaskKey, (TaskFigures, Option<SinkCommit>)>,
    /// Where the source's input ended, once it did.
    pub(super) source_end: Option<u64>,
    /// The completed stop savepoint.
    pub(super) stopped: Option<SnapshotId>,
}

/// How an attempt ends once every task ended and no snapshot is in flight:
/// stopped with its savepoint, finished (the input ended: the end-of-input
/// record follows), or stopped without one -- which only a failed stop
/// savepoint leads to.
pub(super) enum Ending {
    Stopped(SnapshotId),
    Finished,
    StoppedWithoutSavepoint,
}

pub(super) fn ending(stopped: Option<SnapshotId>, input_ended: bool) -> Ending {
    match (stopped, input_ended) {
        (Some(id), _) => Ending::Stopped(id),
        (None, true) => Ending::Finished,
        (None, false) => Ending::StoppedWithoutSavepoint,
    }
}

impl Coordinator<'_> {
    pub(super) fn coordinate(&mut self, run: &mut AttemptState, reports: &Receiver<Report>) -> AttemptEnd {
        loop {
            // Start what is due.
            if run.pending.is_none() && run.source_end.is_none() && run.stopped.is_none() {
                run.triggers.due(Instant::now());
                if let Some(req) = run.triggers.next()
                    && let Err(e) = self.start(run, req)
                {
                    return AttemptEnd::Failed(e);
                }
            }
            if run.done.len() == run.total_tasks && run.pending.is_none() {
                return match ending(run.stopped.take(), run.source_end.is_some()) {
                    Ending::Stopped(id) => AttemptEnd::Done(FinalState::Stopped { savepoint: id }),
                    Ending::Finished => match self.finish(run) {
                        Ok(()) => AttemptEnd::Done(FinalState::Finished),
                        Err(e) => AttemptEnd::Failed(e),
                    },
                    Ending::StoppedWithoutSavepoint => {
                        AttemptEnd::Failed(JobError::StopFailed("the job stopped without a savepoint".into()))
                    }
                };
            }

            let wait = self.next_wakeup(run);
            select! {
                recv(reports) -> r => {
                    let Ok(r) = r else { return AttemptEnd::Failed(JobError::Thread("every task thread is gone".into())) };
                    if let Err(e) = self.on_report(run, r) {
                        return AttemptEnd::Failed(e);
                    }
                }
                recv(self.control) -> c => {
                    if let Ok(c) = c && let Some(end) = self.on_control(run, c) {
                        return end;
                    }
                }
                default(wait) => {}
            }
            // Never while this job holds a writer: GC waits for writers.
            if self.gc_pending && run.pending.is_none() {
                self.collect_garbage();
            }
            let timeout = self.spec.checkpoints.timeout.0;
            if let Some(p) = run.pending.take_if(|p| p.timed_out(Instant::now(), timeout)) {
                let reason = format!("timed out after {timeout:?}");
                if let Err(e) = self.snapshot_failed(run, p, &reason) {
                    return AttemptEnd::Failed(e);
                }
            }
        }
    }

    fn next_wakeup(&self, run: &AttemptState) -> Duration {
        let now = Instant::now();
        let mut next = now + Duration::from_millis(500);
        if let Some(t) = run.triggers.next_due() {
            next = next.min(t);
        }
        if let Some(p) = &run.pending {
            next = next.min(p.started + self.spec.checkpoints.timeout.0);
        }
        next.saturating_duration_since(now).max(Duration::from_millis(1))
    }

    fn on_control(&mut self, run: &mut AttemptState, c: Control) -> Option<AttemptEnd> {
        match c {
            Control::Cancel => {
                if !self.spec.checkpoints.persistent {
                    self.delete_checkpoints(|_| true);
                }
                return Some(AttemptEnd::Done(FinalState::Cancelled));
            }
            Control::Trigger { kind, format, reply } => {
                let (ended, stopped) = (run.source_end.is_some(), run.stopped.is_some());
                run.triggers.manual(kind, format, reply, ended, stopped);
            }
            Control::Stop { reply } => run.triggers.stop(reply, run.source_end.is_some()),
        }
        None
    }

    /// Begin a snapshot and inject its barrier.
    fn start(&mut self, run: &mut AttemptState, req: Request) -> Result<(), JobError> {
        // Restoring the snapshot would lose or repeat input (periodic
        // snapshots of such a job are refused when it is loaded).
        if !self.spec.source.can_seek() {
            req.refuse(TriggerError::Failed(format!(
                "{} cannot seek, so a snapshot of this job could not be restored",
                self.spec.source.describe()
            )));
            return Ok(());
        }
        let begun = self
            .store
            .next_snapshot_number(&self.job)
            .and_then(|n| self.store.begin(&self.job, n).map(|w| (n, w)));
        let (number, writer) = match begun {
            Ok(x) => x,
            // Another host took the job over: this run can commit nothing
            // more, so it stops instead of counting failures.
            Err(e @ crate::store::StoreError::LeaseLost { .. }) => {
                req.refuse(TriggerError::Failed(e.to_string()));
                return Err(e.into());
            }
            Err(e) => {
                let reason = format!("cannot start a snapshot: {e}");
                let kind = req.kind;
                req.refuse(TriggerError::Failed(reason.clone()));
                if kind == SnapshotKind::Checkpoint {
                    run.triggers.checkpoint_ended(Instant::now());
                }
                return self.count_failure(kind, &reason);
            }
        };
        let barrier = Barrier {
            id: number,
            format: req.format,
            writer: writer.blob_writer(),
        };
        self.status.triggered(number, req.kind, req.trigger, req.format);
        let attempt = run.attempt.as_ref().expect("attempt running");
        let injected = if req.stop {
            attempt.stop(barrier)
        } else {
            attempt.inject(barrier)
        };
        run.pending = Some(Pending {
            number,
            kind: req.kind,
            trigger: req.trigger,
            writer,
            started: Instant::now(),
            created_at_ms: now_ms(),
            acks: Acks::new(run.total_tasks),
            replies: req.reply.into_iter().collect(),
            stop: req.stop,
        });
        match injected {
            Ok(()) => {}
            Err(InjectError::Busy) => {
                let p = run.pending.take().expect("just set");
                return self.snapshot_failed(
                    run,
                    p,
                    "the source is not taking barriers (blocked by backpressure)",
                );
            }
            // The input just ended: not a failure, there is nothing left to
            // snapshot (the end-of-input record follows).
            Err(InjectError::Ended) => {
                let p = run.pending.take().expect("just set");
                self.fail_pending(p, "the input ended before the barrier was injected", false);
            }
        }
        Ok(())
    }

    fn on_report(&mut self, run: &mut AttemptState, r: Report) -> Result<(), JobError> {
        match r {
            Report::Failed(e) => return Err(e),
            Report::SourceAck { id, position } => {
                if let Some(p) = run.pending.as_mut().filter(|p| p.number == id) {
                    p.acks.source(position);
                }
            }
            Report::SourceEnded { position } => {
                run.source_end = Some(position);
                // A barrier not injected before the end never will be.
                if let Some(p) = run.pending.take_if(|p| p.acks.source_position.is_none()) {
                    if let Some(a) = &run.attempt {
                        a.abort(p.number);
                    }
                    self.fail_pending(p, "the input ended before the barrier was injected", false);
                }
                run.triggers.refuse_all(&TriggerError::InputEnded);
            }
            Report::TaskAck {
                id,
                task,
                state,
                unkeyed,
                sink,
                pause,
                upload,
            } => {
                if let Some(p) = run.pending.as_mut().filter(|p| p.number == id) {
                    p.acks.task(task, state, unkeyed, sink, pause, upload);
                }
            }
            Report::Declined { id, task, reason } => {
                if let Some(p) = run.pending.take_if(|p| p.number == id) {
                    let reason = format!("declined by {task}: {reason}");
                    self.snapshot_failed(run, p, &reason)?;
                }
            }
            Report::NotStored { id, task, reason } => {
                if let Some(p) = run.pending.take_if(|p| p.number == id) {
                    let reason = format!("the host could not store the state of {task}: {reason}");
                    self.snapshot_failed(run, p, &reason)?;
                }
            }
            Report::TaskDone { task, figures, sink } => {
                run.done.insert(task, (figures, sink));
            }
        }
        if let Some(p) = run.pending.take_if(|p| p.acks.complete()) {
            self.complete(run, p)?;
        }
        Ok(())
    }

    /// Every task acknowledged: commit the manifest, then the output.
    fn complete(&mut self, run: &mut AttemptState, p: Pending) -> Result<(), JobError> {
        let Pending {
            number,
            kind,
            trigger,
            writer,
            started,
            created_at_ms,
            acks,
            replies,
            stop,
        } = p;
        // With `auto`, tasks may differ: the manifest says what was taken.
        let format = StateFormat::of_tasks(acks.states.values());
        let mut m = writer.manifest(kind, trigger, format);
        m.created_at_ms = created_at_ms;
        m.retention = retention::settings(self.spec, kind);
        m.components = self.components.clone();
        m.extra
            .insert(compat::KEY_GROUPS.into(), serde_json::json!(self.key_groups));
        m.extra.insert(
            compat::UNKEYED_BYTES.into(),
            serde_json::json!(acks.unkeyed_by_operator()),
        );
        // Every canonical state this build persists is framed.
        m.canonical_framing = Some(crate::snapshot::FRAMING_VERSION);
        m.tasks = acks
            .states
            .into_iter()
            .map(|(key, state)| TaskState { key, state })
            .collect();
        m.source_positions = vec![SourcePosition {
            source: "source".into(),
            task_index: 0,
            position: acks.source_position.unwrap_or(0),
        }];
        let mut sinks = acks.sinks.clone();
        sinks.extend(self.retired_sinks.iter().cloned());
        if !sinks.is_empty() {
            m.sink_commit = serde_json::json!({ "tasks": sinks });
        }
        m.figures.sync_ms = acks.pause.as_millis() as u64;
        m.figures.async_ms = acks.upload.as_millis() as u64;
        m.figures.before_commit_ms = started.elapsed().as_millis() as u64;
        let id = match writer.commit(m) {
            Ok(id) => id,
            Err(e) => {
                let reason = format!("commit failed: {e}");
                for r in &replies {
                    let _ = r.send(Err(TriggerError::Failed(reason.clone())));
                }
                self.status.ended(
                    number,
                    SnapshotOutcome::Failed {
                        reason: reason.clone(),
                    },
                    None,
                );
                log_failure(&self.job, number, kind, trigger, &reason);
                if kind == SnapshotKind::Checkpoint {
                    run.triggers.checkpoint_ended(Instant::now());
                }
                return self.count_failure(kind, &reason);
            }
        };
        // The manifest is durable: now, and only now, the output may show.
        self.sink.commit(&id, &acks.sinks)?;
        if let Some(a) = &run.attempt {
            a.notify_complete(number);
        }
        let m = self.store.get(&id)?;
        let duration_ms = m.figures.duration_ms();
        tracing::info!(
            target: "memento::snapshot",
            id = %id,
            kind = ?kind,
            trigger = ?trigger,
            format = %m.format,
            outcome = "completed",
            pause_ms = m.figures.sync_ms,
            async_ms = m.figures.async_ms,
            commit_ms = m.figures.commit_ms,
            duration_ms,
            logical_bytes = m.figures.logical_bytes,
            new_bytes = m.figures.new_bytes,
            "snapshot completed"
        );
        self.status.ended(
            number,
            SnapshotOutcome::Completed,
            Some(status::EndFigures {
                id: id.clone(),
                duration_ms,
                pause_ms: m.figures.sync_ms,
                logical_bytes: m.figures.logical_bytes,
                new_bytes: m.figures.new_bytes,
                tasks: acks.tasks,
            }),
        );
        self.report.snapshots.push(SnapshotSummary {
            id: id.clone(),
            kind,
            trigger,
            pause_ms: m.figures.sync_ms,
            duration_ms,
            logical_bytes: m.figures.logical_bytes,
            new_bytes: m.figures.new_bytes,
        });
        for r in &replies {
            let _ = r.send(Ok(id.clone()));
        }
        self.failures.completed(kind);
        if kind == SnapshotKind::Checkpoint {
            run.triggers.checkpoint_ended(Instant::now());
        }
        if stop {
            run.stopped = Some(id);
        }
        self.apply_retention(kind);
        Ok(())
    }

    /// The snapshot in flight failed for `reason`: abort it, answer, count.
    fn snapshot_failed(&mut self, run: &mut AttemptState, p: Pending, reason: &str) -> Result<(), JobError> {
        if let Some(a) = &run.attempt {
            a.abort(p.number);
        }
        let kind = p.kind;
        let stop = p.stop;
        self.fail_pending(p, reason, true);
        if kind == SnapshotKind::Checkpoint {
            run.triggers.checkpoint_ended(Instant::now());
        }
        if stop {
            return Err(JobError::StopFailed(reason.to_string()));
        }
        self.count_failure(kind, reason)
    }

    /// Give up on `p`: log it, answer whoever asked, abort its writer (its
    /// blobs become garbage). `counted`: a failure, not a snapshot that
    /// had nothing left to take.
    pub(super) fn fail_pending(&mut self, p: Pending, reason: &str, counted: bool) {
        log_failure(&self.job, p.number, p.kind, p.trigger, reason);
        self.status.ended(
            p.number,
            SnapshotOutcome::Failed {
                reason: reason.to_string(),
            },
            None,
        );
        for r in &p.replies {
            let _ = r.send(Err(TriggerError::Failed(reason.to_string())));
        }
        if counted {
            self.report.failed_snapshots += 1;
        }
        p.writer.abort();
    }

    fn count_failure(&mut self, kind: SnapshotKind, reason: &str) -> Result<(), JobError> {
        let tolerable = self.spec.checkpoints.tolerable_failures;
        self.failures.failed(kind, tolerable, reason)
    }

    /// The input ended and every task finished: record it, commit the final
    /// output.
    fn finish(&mut self, run: &mut AttemptState) -> Result<(), JobError> {
        let sinks: Vec<SinkCommit> = run.done.values().filter_map(|(_, s)| s.clone()).collect();
        let number = self.store.next_snapshot_number(&self.job)?;
        let writer = self.store.begin(&self.job, number)?;
        // The record holds no state; its format is the one the job's
        // checkpoints take (the manifest needs one).
        let mut m = writer.manifest(
            SnapshotKind::Checkpoint,
            Trigger::EndOfInput,
            self.checkpoint_format(),
        );
        m.retention = retention::settings(self.spec, SnapshotKind::Checkpoint);
        m.components = self.components.clone();
        m.source_positions = vec![SourcePosition {
            source: "source".into(),
            task_index: 0,
            position: run.source_end.unwrap_or(0),
        }];
        m.sink_commit = serde_json::json!({ "tasks": sinks });
        m.extra.insert(FINISHED.into(), serde_json::Value::Bool(true));
        let id = writer.commit(m)?;
        self.sink.commit(&id, &sinks)?;
        self.sink.finished();
        tracing::info!(target: "memento::snapshot", id = %id, outcome = "finished", "job finished; output committed");
        if self.spec.checkpoints.persistent {
            self.apply_retention(SnapshotKind::Checkpoint);
        } else {
            // Only the record of the finish stays.
            self.delete_checkpoints(|m| m.id != id);
        }
        Ok(())
    }

    /// The format the job's checkpoints take: `native` or `canonical` as
    /// configured; for `auto`, per operator whether its component can be
    /// imaged (`mixed` when some can and some cannot).
    fn checkpoint_format(&self) -> StateFormat {
        match self.spec.checkpoints.format {
            SnapshotFormat::Native => StateFormat::Native,
            SnapshotFormat::Canonical => StateFormat::Canonical,
            SnapshotFormat::Auto => {
                let native = self.loaded.iter().filter(|c| c.native_support().is_ok()).count();
                match native {
                    0 => StateFormat::Canonical,
                    n if n == self.loaded.len() => StateFormat::Native,
                    _ => StateFormat::Mixed,
                }
            }
        }
    }
}

fn log_failure(job: &JobName, number: u64, kind: SnapshotKind, trigger: Trigger, reason: &str) {
    tracing::warn!(
        target: "memento::snapshot",
        job = %job,
        number,
        kind = ?kind,
        trigger = ?trigger,
        outcome = "failed",
        "snapshot failed: {reason}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_ends_stopped_finished_or_failed() {
        let id = SnapshotId::parse("j-000004").unwrap();
        assert!(matches!(ending(Some(id.clone()), false), Ending::Stopped(s) if s == id));
        // A stop savepoint that completed as the input ended still stops.
        assert!(matches!(ending(Some(id.clone()), true), Ending::Stopped(s) if s == id));
        assert!(matches!(ending(None, true), Ending::Finished));
        assert!(matches!(ending(None, false), Ending::StoppedWithoutSavepoint));
    }
}
