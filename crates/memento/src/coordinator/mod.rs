//! The checkpoint coordinator: every job has one, always, also without
//! periodic checkpoints, so a savepoint can be taken at any time.
//!
//! It triggers snapshots (periodic checkpoints and savepoints, manual ones,
//! stop-with-savepoint), injects their barriers at the source, collects the
//! tasks' acknowledgements, commits the manifest to the store, then commits
//! the sink's pre-committed output and applies retention. It also supervises
//! attempts: when a task fails it tears the attempt down and, as the restart
//! strategy allows, starts a new one from the newest complete snapshot.
//!
//! It talks to tasks only through messages ([`crate::dataflow`]'s barriers
//! and reports); it shares no lock with them.

mod control;
mod report;
mod requests;
mod restart;
pub(crate) mod schedule;
pub mod status;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select, unbounded};

use crate::dataflow::sink::{self, SinkCommit};
use crate::dataflow::{Attempt, Barrier, InjectError, JobError, Report, RestorePoint, TaskFigures};
use crate::runtime::{LoadedComponent, Runtime};
use crate::spec::{JobSpec, RestartStrategy, SnapshotFormat};
use crate::store::{
    JobName, ListFilter, Manifest, Retention, SnapshotId, SnapshotKind, SourcePosition, StateFormat, TaskKey,
    TaskState, TaskStateData, TenantStore, Trigger,
};
pub(crate) use control::Control;
pub use control::{JobControl, TriggerResult};
pub use report::{FinalState, JobFailed, JobReport, OperatorReport, SnapshotSummary};
pub use requests::{RequestLog, RequestStatus};
pub use schedule::Schedule;
pub use status::{JobState, JobStatus, SnapshotOutcome, SnapshotRecord, StatusHandle};

/// Least time between two garbage collections of a running job.
const GC_INTERVAL: Duration = Duration::from_secs(10);

/// Key in a manifest's `extra` marking the record of a finished job.
const FINISHED: &str = "finished";

/// A snapshot in flight.
struct Pending {
    number: u64,
    kind: SnapshotKind,
    trigger: Trigger,
    writer: crate::store::SnapshotWriter,
    started: Instant,
    created_at_ms: u64,
    acks: BTreeMap<TaskKey, TaskStateData>,
    sinks: Vec<SinkCommit>,
    source_position: Option<u64>,
    pause: Duration,
    upload: Duration,
    tasks: BTreeMap<TaskKey, status::TaskFigures>,
    replies: Vec<Sender<TriggerResult>>,
    stop: bool,
}

/// A trigger waiting for the current snapshot to finish.
struct Request {
    kind: SnapshotKind,
    trigger: Trigger,
    format: SnapshotFormat,
    reply: Option<Sender<TriggerResult>>,
    stop: bool,
}

/// Why an attempt ended.
enum AttemptEnd {
    Done(FinalState),
    Failed(JobError),
}

/// Runs a job: attempts, restarts, snapshots.
pub(crate) struct Coordinator<'a> {
    pub runtime: &'a Runtime,
    pub spec: &'a JobSpec,
    pub components: &'a [Arc<LoadedComponent>],
    pub store: TenantStore,
    pub job: JobName,
    pub control: Receiver<Control>,
    status: StatusHandle,
    report: JobReport,
    consecutive_failures: u32,
    gc_pending: bool,
}

impl<'a> Coordinator<'a> {
    pub(crate) fn new(
        runtime: &'a Runtime,
        spec: &'a JobSpec,
        components: &'a [Arc<LoadedComponent>],
        store: TenantStore,
        control: Receiver<Control>,
        status: StatusHandle,
    ) -> Result<Self, JobError> {
        let job = JobName::new(&spec.name)?;
        Ok(Coordinator {
            runtime,
            spec,
            components,
            store,
            job,
            control,
            status,
            report: JobReport::default(),
            consecutive_failures: 0,
            gc_pending: false,
        })
    }

    /// Run the job to its end, restarting per the strategy.
    pub(crate) fn run(mut self, from: Option<Manifest>) -> Result<JobReport, Box<JobFailed>> {
        let status = self.status.clone();
        let result = self.run_inner(from);
        if self.gc_pending {
            self.run_gc();
        }
        status.set_state(match &result {
            Ok(r) => match r.state.clone() {
                Some(FinalState::Stopped { savepoint }) => JobState::Stopped { savepoint },
                Some(FinalState::Cancelled) => JobState::Cancelled,
                _ => JobState::Finished,
            },
            Err(e) => JobState::Failed { error: e.to_string() },
        });
        result
    }

    fn run_inner(&mut self, from: Option<Manifest>) -> Result<JobReport, Box<JobFailed>> {
        let started = Instant::now();
        let mut restore = from;
        self.report.restored_from = restore.as_ref().map(|m| m.id.clone());
        loop {
            let end = match restore.as_ref() {
                // A finished run's record only commits; `attempt` checks
                // every other snapshot (`restore_point`).
                Some(m) if m.extra.contains_key(FINISHED) => match check_fits(self.spec, &self.job, m) {
                    Ok(()) => self.finish_again(m),
                    Err(e) => AttemptEnd::Failed(e),
                },
                _ => self.attempt(restore.as_ref()),
            };
            match end {
                AttemptEnd::Done(state) => {
                    self.report.state = Some(state);
                    self.report.elapsed = started.elapsed();
                    return Ok(std::mem::take(&mut self.report));
                }
                AttemptEnd::Failed(error) => {
                    let retry = retryable(&error) && self.restart_allowed();
                    if !retry {
                        let resume_from = match (&error, restore.as_ref()) {
                            // Restoring that snapshot is what failed: point
                            // past it, not back at it.
                            (JobError::Restore { .. }, Some(m)) => {
                                self.store.next_intact_before(&m.id).ok().flatten()
                            }
                            // The job file does not fit the snapshot: the
                            // same command would fail the same way.
                            (JobError::Incompatible { .. }, _) => None,
                            _ => self.store.latest(&self.job).ok().flatten().map(|m| m.id),
                        };
                        return Err(Box::new(JobFailed {
                            error,
                            restarts: self.report.restarts,
                            resume_from,
                        }));
                    }
                    let delay = self.restart_delay();
                    self.report.restarts += 1;
                    self.status.restarted(self.report.restarts);
                    tracing::warn!(
                        target: "memento::job",
                        job = %self.job,
                        restart = self.report.restarts,
                        delay_ms = delay.as_millis() as u64,
                        "task failed, restarting: {error}"
                    );
                    if self.sleep_or_cancel(delay) {
                        self.report.state = Some(FinalState::Cancelled);
                        self.report.elapsed = started.elapsed();
                        return Ok(std::mem::take(&mut self.report));
                    }
                    // The newest complete snapshot of any kind (FLIP-10: they
                    // are all restore points); none means start from scratch.
                    restore = match self.store.latest(&self.job) {
                        Ok(m) => m,
                        Err(e) => {
                            return Err(Box::new(JobFailed {
                                error: e.into(),
                                restarts: self.report.restarts,
                                resume_from: None,
                            }));
                        }
                    };
                }
            }
        }
    }

    fn restart_allowed(&self) -> bool {
        let r = &self.spec.restart;
        r.strategy != RestartStrategy::None && self.report.restarts < r.attempts
    }

    fn restart_delay(&self) -> Duration {
        // Jitter only spreads restarts of many jobs; it needs no
        // determinism, so the clock's nanoseconds are random enough.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let unit = f64::from(nanos % 1_000_000) / 1_000_000.0;
        restart::delay(&self.spec.restart, self.report.restarts, unit)
    }

    /// Wait `delay`; `true` if the job was cancelled meanwhile.
    fn sleep_or_cancel(&self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.control.recv_timeout(left) {
                Ok(Control::Cancel) => return true,
                Ok(Control::Trigger { reply, .. } | Control::Stop { reply }) => {
                    if let Some(r) = reply {
                        let _ = r.send(Err("the job is restarting".into()));
                    }
                }
                Err(_) => {}
            }
        }
    }

    /// Resuming from the record of a finished job: finish its output commit
    /// (idempotent) and end.
    fn finish_again(&mut self, m: &Manifest) -> AttemptEnd {
        match sink::commit(&self.spec.sink, &self.spec.base_dir, &sink_commits(m)) {
            Ok(()) => AttemptEnd::Done(FinalState::AlreadyFinished {
                snapshot: m.id.clone(),
            }),
            Err(e) => AttemptEnd::Failed(JobError::Sink(e)),
        }
    }

    /// Check that a snapshot fits this job and bring the sink to its state.
    fn restore_point(&self, m: &Manifest) -> Result<RestorePoint, JobError> {
        check_fits(self.spec, &self.job, m)?;
        let mut tasks = BTreeMap::new();
        for t in &m.tasks {
            tasks.insert(t.key.clone(), t.clone());
        }
        let sink_next_seq = sink::recover(&self.spec.sink, &self.spec.base_dir, Some(&sink_commits(m)))
            .map_err(JobError::Sink)?;
        Ok(RestorePoint {
            store: self.store.clone(),
            id: m.id.clone(),
            tasks,
            source_position: m.source_positions.first().map_or(0, |p| p.position),
            sink_next_seq,
        })
    }

    /// One attempt: start the dataflow (from `restore`), coordinate
    /// snapshots until it ends, fails or is stopped.
    fn attempt(&mut self, restore: Option<&Manifest>) -> AttemptEnd {
        self.status.set_state(JobState::Running);
        let point = match restore {
            Some(m) => match self.restore_point(m) {
                Ok(p) => {
                    self.status.restored(&m.id);
                    Some(p)
                }
                Err(e) => return AttemptEnd::Failed(e),
            },
            None => {
                if let Err(e) = sink::recover(&self.spec.sink, &self.spec.base_dir, None) {
                    return AttemptEnd::Failed(JobError::Sink(e));
                }
                None
            }
        };
        let start_position = point.as_ref().map_or(0, |p| p.source_position);
        let (reports_tx, reports) = unbounded();
        let attempt = match Attempt::start(
            self.runtime,
            self.spec,
            self.components,
            point.as_ref(),
            reports_tx,
            self.status.records_in.clone(),
        ) {
            Ok(a) => a,
            Err(e) => return AttemptEnd::Failed(e),
        };
        let mut run = AttemptState {
            attempt: Some(attempt),
            pending: None,
            queue: VecDeque::new(),
            total_tasks: self.spec.operators.iter().map(|o| o.parallelism as usize).sum(),
            done: BTreeMap::new(),
            source_end: None,
            position: None,
            stopped: None,
            next_checkpoint: self.spec.checkpoints.interval.map(|i| Instant::now() + i.0),
            savepoints: Schedule::from_spec(&self.spec.savepoints),
        };
        let end = self.coordinate(&mut run, &reports);
        if let Some(p) = run.pending.take() {
            self.fail_pending(p, "the job ended before the snapshot completed", false);
        }
        for r in run.queue.drain(..) {
            if let Some(reply) = r.reply {
                let _ = reply.send(Err("the job ended before the snapshot could start".into()));
            }
        }
        if let Some(a) = run.attempt.take() {
            a.shutdown();
        }
        // Figures of this attempt's tasks.
        self.report.operators = self
            .spec
            .operators
            .iter()
            .map(|op| {
                let mut r = OperatorReport {
                    name: op.name.clone(),
                    parallelism: op.parallelism,
                    ..Default::default()
                };
                for (key, (f, _)) in &run.done {
                    if key.operator == op.name {
                        r.records_in += f.records_in;
                        r.records_out += f.records_out;
                        r.process_calls += f.process_calls;
                        r.time_in_plugin += f.time_in_plugin;
                    }
                }
                r
            })
            .collect();
        self.report.sink_records = run.done.values().map(|(f, _)| f.sink_records).sum();
        self.report.source_records = run
            .position
            .unwrap_or(start_position)
            .saturating_sub(start_position);
        end
    }

    fn coordinate(&mut self, run: &mut AttemptState, reports: &Receiver<Report>) -> AttemptEnd {
        loop {
            // Start what is due.
            if run.pending.is_none() && run.source_end.is_none() && run.stopped.is_none() {
                let now = Instant::now();
                if run.next_checkpoint.is_some_and(|t| t <= now) {
                    run.queue.push_back(Request {
                        kind: SnapshotKind::Checkpoint,
                        trigger: Trigger::Periodic,
                        format: self.spec.checkpoints.format,
                        reply: None,
                        stop: false,
                    });
                    run.next_checkpoint = None; // re-armed when it ends
                }
                if run.savepoints.due(now) {
                    run.queue.push_back(Request {
                        kind: SnapshotKind::Savepoint,
                        trigger: Trigger::Periodic,
                        format: self.spec.savepoints.format,
                        reply: None,
                        stop: false,
                    });
                }
                if let Some(req) = run.queue.pop_front()
                    && let Err(e) = self.start(run, req)
                {
                    return AttemptEnd::Failed(e);
                }
            }
            // Done?
            if run.done.len() == run.total_tasks && run.pending.is_none() {
                return match run.stopped.take() {
                    Some(id) => AttemptEnd::Done(FinalState::Stopped { savepoint: id }),
                    None if run.source_end.is_some() => match self.finish(run) {
                        Ok(()) => AttemptEnd::Done(FinalState::Finished),
                        Err(e) => AttemptEnd::Failed(e),
                    },
                    None => {
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
            // Timeout of the snapshot in flight.
            if let Some(p) = &run.pending
                && p.started.elapsed() > self.spec.checkpoints.timeout.0
            {
                let p = run.pending.take().expect("checked");
                let reason = format!("timed out after {:?}", self.spec.checkpoints.timeout.0);
                if let Err(e) = self.snapshot_failed(run, p, &reason) {
                    return AttemptEnd::Failed(e);
                }
            }
        }
    }

    fn next_wakeup(&self, run: &AttemptState) -> Duration {
        let now = Instant::now();
        let mut next = now + Duration::from_millis(500);
        if let Some(t) = run.next_checkpoint {
            next = next.min(t);
        }
        if let Some(t) = run.savepoints.next() {
            next = next.min(t);
        }
        if let Some(p) = &run.pending {
            next = next.min(p.started + self.spec.checkpoints.timeout.0);
        }
        next.saturating_duration_since(now).max(Duration::from_millis(1))
    }

    fn on_control(&mut self, run: &mut AttemptState, c: Control) -> Option<AttemptEnd> {
        let refuse = |reply: Option<Sender<TriggerResult>>, why: &str| {
            if let Some(r) = reply {
                let _ = r.send(Err(why.to_string()));
            }
        };
        match c {
            Control::Cancel => {
                if !self.spec.checkpoints.persistent {
                    self.delete_checkpoints(|_| true);
                }
                return Some(AttemptEnd::Done(FinalState::Cancelled));
            }
            Control::Trigger { kind, format, reply } => {
                if run.source_end.is_some() || run.stopped.is_some() || run.queue.iter().any(|r| r.stop) {
                    refuse(reply, "the job's input has ended or it is stopping");
                } else {
                    let format = format.unwrap_or(match kind {
                        SnapshotKind::Checkpoint => self.spec.checkpoints.format,
                        SnapshotKind::Savepoint => self.spec.savepoints.format,
                    });
                    run.queue.push_back(Request {
                        kind,
                        trigger: Trigger::Manual,
                        format,
                        reply,
                        stop: false,
                    });
                }
            }
            Control::Stop { reply } => {
                if run.source_end.is_some() || run.queue.iter().any(|r| r.stop) {
                    refuse(reply, "the job's input has ended or it is already stopping");
                } else {
                    run.queue.push_back(Request {
                        kind: SnapshotKind::Savepoint,
                        trigger: Trigger::Stop,
                        format: self.spec.savepoints.format,
                        reply,
                        stop: true,
                    });
                }
            }
        }
        None
    }

    /// Begin a snapshot and inject its barrier.
    fn start(&mut self, run: &mut AttemptState, req: Request) -> Result<(), JobError> {
        let begun = self
            .store
            .next_snapshot_number(&self.job)
            .and_then(|n| self.store.begin(&self.job, n).map(|w| (n, w)));
        let (number, writer) = match begun {
            Ok(x) => x,
            Err(e) => {
                let reason = format!("cannot start a snapshot: {e}");
                if let Some(r) = req.reply {
                    let _ = r.send(Err(reason.clone()));
                }
                return self.count_failure(run, req.kind, &reason);
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
            acks: BTreeMap::new(),
            sinks: Vec::new(),
            source_position: None,
            pause: Duration::ZERO,
            upload: Duration::ZERO,
            tasks: BTreeMap::new(),
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
                run.position = Some(position);
                if let Some(p) = run.pending.as_mut().filter(|p| p.number == id) {
                    p.source_position = Some(position);
                }
            }
            Report::SourceEnded { position } => {
                run.source_end = Some(position);
                run.position = Some(position);
                // A barrier not injected before the end never will be.
                if let Some(p) = run.pending.take_if(|p| p.source_position.is_none()) {
                    if let Some(a) = &run.attempt {
                        a.abort(p.number);
                    }
                    self.fail_pending(p, "the input ended before the barrier was injected", false);
                }
                for r in run.queue.drain(..) {
                    if let Some(reply) = r.reply {
                        let _ = reply.send(Err("the job's input has ended".into()));
                    }
                }
            }
            Report::TaskAck {
                id,
                task,
                state,
                sink,
                pause,
                upload,
            } => {
                if let Some(p) = run.pending.as_mut().filter(|p| p.number == id) {
                    p.tasks.insert(
                        task.clone(),
                        status::TaskFigures {
                            task: task.clone(),
                            pause_ms: pause.as_millis() as u64,
                            async_ms: upload.as_millis() as u64,
                            logical_bytes: state.logical_bytes(),
                        },
                    );
                    p.acks.insert(task, state);
                    p.sinks.extend(sink);
                    p.pause = p.pause.max(pause);
                    p.upload = p.upload.max(upload);
                }
            }
            Report::Declined { id, task, reason } => {
                if let Some(p) = run.pending.take_if(|p| p.number == id) {
                    let reason = format!("declined by {task}: {reason}");
                    self.snapshot_failed(run, p, &reason)?;
                }
            }
            Report::TaskDone { task, figures, sink } => {
                run.done.insert(task, (figures, sink));
            }
        }
        if run
            .pending
            .as_ref()
            .is_some_and(|p| p.acks.len() == run.total_tasks && p.source_position.is_some())
        {
            let p = run.pending.take().expect("checked");
            self.complete(run, p)?;
        }
        Ok(())
    }

    /// Every task acknowledged: commit the manifest, then the output.
    fn complete(&mut self, run: &mut AttemptState, p: Pending) -> Result<(), JobError> {
        // With `auto`, tasks may differ: the manifest says what was taken.
        let format = StateFormat::of_tasks(p.acks.values());
        let mut m = p.writer.manifest(p.kind, p.trigger, format);
        m.created_at_ms = p.created_at_ms;
        m.retention = self.retention(p.kind);
        m.components = self.component_hashes();
        m.tasks = p
            .acks
            .into_iter()
            .map(|(key, state)| TaskState { key, state })
            .collect();
        m.source_positions = vec![SourcePosition {
            source: "source".into(),
            task_index: 0,
            position: p.source_position.unwrap_or(0),
        }];
        if !p.sinks.is_empty() {
            m.sink_commit = serde_json::json!({ "tasks": p.sinks });
        }
        m.figures.sync_ms = p.pause.as_millis() as u64;
        m.figures.async_ms = p.upload.as_millis() as u64;
        m.figures.before_commit_ms = p.started.elapsed().as_millis() as u64;
        let sinks = p.sinks;
        let id = match p.writer.commit(m) {
            Ok(id) => id,
            Err(e) => {
                let reason = format!("commit failed: {e}");
                for r in &p.replies {
                    let _ = r.send(Err(reason.clone()));
                }
                self.status.ended(
                    p.number,
                    SnapshotOutcome::Failed {
                        reason: reason.clone(),
                    },
                    None,
                );
                log_failure(&self.job, p.number, p.kind, p.trigger, &reason);
                return self.count_failure(run, p.kind, &reason);
            }
        };
        // The manifest is durable: now, and only now, the output may show.
        sink::commit(&self.spec.sink, &self.spec.base_dir, &sinks).map_err(JobError::Sink)?;
        if let Some(a) = &run.attempt {
            a.notify_complete(p.number);
        }
        let m = self.store.get(&id)?;
        let duration_ms = m.figures.duration_ms();
        tracing::info!(
            target: "memento::snapshot",
            id = %id,
            kind = ?p.kind,
            trigger = ?p.trigger,
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
            p.number,
            SnapshotOutcome::Completed,
            Some(status::EndFigures {
                id: id.clone(),
                duration_ms,
                pause_ms: m.figures.sync_ms,
                logical_bytes: m.figures.logical_bytes,
                new_bytes: m.figures.new_bytes,
                tasks: p.tasks,
            }),
        );
        self.report.snapshots.push(SnapshotSummary {
            id: id.clone(),
            kind: p.kind,
            trigger: p.trigger,
            pause_ms: m.figures.sync_ms,
            duration_ms,
            logical_bytes: m.figures.logical_bytes,
            new_bytes: m.figures.new_bytes,
        });
        for r in &p.replies {
            let _ = r.send(Ok(id.clone()));
        }
        if p.kind == SnapshotKind::Checkpoint {
            self.consecutive_failures = 0;
        }
        self.after_snapshot(run, p.kind);
        if p.stop {
            run.stopped = Some(id);
        }
        self.apply_retention(p.kind);
        Ok(())
    }

    /// Re-arm the periodic checkpoint timer after a checkpoint ended.
    fn after_snapshot(&self, run: &mut AttemptState, kind: SnapshotKind) {
        if kind == SnapshotKind::Checkpoint
            && let Some(interval) = self.spec.checkpoints.interval
        {
            let pause = self.spec.checkpoints.min_pause.0;
            run.next_checkpoint = Some(Instant::now() + interval.0.max(pause));
        }
    }

    fn snapshot_failed(&mut self, run: &mut AttemptState, p: Pending, reason: &str) -> Result<(), JobError> {
        if let Some(a) = &run.attempt {
            a.abort(p.number);
        }
        let kind = p.kind;
        let stop = p.stop;
        self.fail_pending(p, reason, true);
        self.after_snapshot(run, kind);
        if stop {
            return Err(JobError::StopFailed(reason.to_string()));
        }
        self.count_failure(run, kind, reason)
    }

    fn fail_pending(&mut self, p: Pending, reason: &str, counted: bool) {
        log_failure(&self.job, p.number, p.kind, p.trigger, reason);
        self.status.ended(
            p.number,
            SnapshotOutcome::Failed {
                reason: reason.to_string(),
            },
            None,
        );
        for r in &p.replies {
            let _ = r.send(Err(reason.to_string()));
        }
        if counted {
            self.report.failed_snapshots += 1;
        }
        // Dropping the writer aborts it: its blobs become garbage.
        p.writer.abort();
    }

    /// Checkpoint failures count against `tolerable_failures`; savepoint
    /// failures are only reported to whoever asked.
    fn count_failure(
        &mut self,
        _run: &mut AttemptState,
        kind: SnapshotKind,
        reason: &str,
    ) -> Result<(), JobError> {
        if kind != SnapshotKind::Checkpoint {
            return Ok(());
        }
        self.consecutive_failures += 1;
        let tolerable = self.spec.checkpoints.tolerable_failures;
        if self.consecutive_failures > tolerable {
            let n = self.consecutive_failures;
            self.consecutive_failures = 0;
            return Err(JobError::Snapshots(format!(
                "{n} consecutive checkpoints failed (tolerable_failures = {tolerable}); last: {reason}"
            )));
        }
        Ok(())
    }

    /// The input ended and every task finished: record it, commit the final
    /// output.
    fn finish(&mut self, run: &mut AttemptState) -> Result<(), JobError> {
        let sinks: Vec<SinkCommit> = run.done.values().filter_map(|(_, s)| s.clone()).collect();
        let number = self.store.next_snapshot_number(&self.job)?;
        let writer = self.store.begin(&self.job, number)?;
        let mut m = writer.manifest(
            SnapshotKind::Checkpoint,
            Trigger::EndOfInput,
            StateFormat::Canonical,
        );
        m.retention = self.retention(SnapshotKind::Checkpoint);
        m.components = self.component_hashes();
        m.source_positions = vec![SourcePosition {
            source: "source".into(),
            task_index: 0,
            position: run.source_end.unwrap_or(0),
        }];
        m.sink_commit = serde_json::json!({ "tasks": sinks });
        m.extra.insert(FINISHED.into(), serde_json::Value::Bool(true));
        let id = writer.commit(m)?;
        sink::commit(&self.spec.sink, &self.spec.base_dir, &sinks).map_err(JobError::Sink)?;
        sink::tidy(&self.spec.sink, &self.spec.base_dir);
        tracing::info!(target: "memento::snapshot", id = %id, outcome = "finished", "job finished; output committed");
        if self.spec.checkpoints.persistent {
            self.apply_retention(SnapshotKind::Checkpoint);
        } else {
            // Only the record of the finish stays.
            self.delete_checkpoints(|m| m.id != id);
        }
        Ok(())
    }

    fn retention(&self, kind: SnapshotKind) -> Retention {
        match kind {
            SnapshotKind::Checkpoint => Retention {
                retained: Some(self.spec.checkpoints.retained),
                persistent: self.spec.checkpoints.persistent,
                ..Default::default()
            },
            SnapshotKind::Savepoint => Retention {
                max_count: self.spec.savepoints.max_count,
                max_age_ms: self.spec.savepoints.max_age.map(|a| a.0.as_millis() as u64),
                ..Default::default()
            },
        }
    }

    fn component_hashes(&self) -> BTreeMap<String, String> {
        self.spec
            .operators
            .iter()
            .zip(self.components)
            .map(|(op, c)| (op.name.clone(), c.hash_hex()))
            .collect()
    }

    /// Subsume old checkpoints / expire savepoints, then collect garbage.
    fn apply_retention(&mut self, kind: SnapshotKind) {
        let expired = match kind {
            SnapshotKind::Checkpoint => self.store.expired(
                &self.job,
                SnapshotKind::Checkpoint,
                Some(self.spec.checkpoints.retained as usize),
                None,
                now_ms(),
            ),
            SnapshotKind::Savepoint => self.store.expired(
                &self.job,
                SnapshotKind::Savepoint,
                self.spec.savepoints.max_count.map(|n| n as usize),
                self.spec.savepoints.max_age.map(|a| a.0),
                now_ms(),
            ),
        };
        match expired {
            Ok(ids) if !ids.is_empty() => {
                for id in &ids {
                    if let Err(e) = self.store.delete(id) {
                        tracing::warn!(target: "memento::snapshot", id = %id, "cannot delete expired snapshot: {e}");
                    }
                }
                self.collect_garbage();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(target: "memento::snapshot", job = %self.job, "retention skipped: {e}"),
        }
    }

    fn delete_checkpoints(&mut self, keep_unless: impl Fn(&Manifest) -> bool) {
        let list = self
            .store
            .list(&ListFilter::job(&self.job).kind(SnapshotKind::Checkpoint));
        if let Ok(list) = list {
            for m in list.iter().filter(|m| keep_unless(m)) {
                let _ = self.store.delete(&m.id);
            }
            self.collect_garbage();
        }
    }

    /// Collect the blobs of deleted snapshots. GC marks over the whole
    /// tenant, so while jobs run it happens at most every [`GC_INTERVAL`]
    /// per tenant (garbage waits a little; checkpoints do not), and once
    /// when a job ends.
    fn collect_garbage(&mut self) {
        self.gc_pending = true;
        match self.store.gc_if_due(GC_INTERVAL) {
            Ok(Some(r)) => {
                self.gc_pending = false;
                tracing::debug!(target: "memento::snapshot", "gc: {r:?}");
            }
            Ok(None) => {}
            Err(e) => {
                self.gc_pending = false;
                tracing::warn!(target: "memento::snapshot", "gc failed: {e}");
            }
        }
    }

    /// The final collection when a job ends (not throttled).
    fn run_gc(&mut self) {
        self.gc_pending = false;
        match self.store.gc() {
            Ok(r) => tracing::debug!(target: "memento::snapshot", "gc: {r:?}"),
            Err(e) => tracing::warn!(target: "memento::snapshot", "gc failed: {e}"),
        }
    }
}

struct AttemptState {
    attempt: Option<Attempt>,
    pending: Option<Pending>,
    queue: VecDeque<Request>,
    total_tasks: usize,
    done: BTreeMap<TaskKey, (TaskFigures, Option<SinkCommit>)>,
    source_end: Option<u64>,
    /// The source's last known position (acks and end).
    position: Option<u64>,
    stopped: Option<SnapshotId>,
    next_checkpoint: Option<Instant>,
    savepoints: Schedule,
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

/// Failures that a restart may cure.
fn retryable(e: &JobError) -> bool {
    matches!(
        e,
        JobError::Source(_)
            | JobError::Sink(_)
            | JobError::Task(_)
            | JobError::Snapshots(_)
            | JobError::Thread(_)
    )
}

/// The sink commits recorded in a manifest.
fn sink_commits(m: &Manifest) -> Vec<SinkCommit> {
    m.sink_commit
        .get("tasks")
        .and_then(|t| serde_json::from_value(t.clone()).ok())
        .unwrap_or_default()
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether snapshot `m` can start job `job` as `spec` describes it: the same
/// job, the same operators at the same parallelism, and native images taken
/// under the same operator config. Checked before a run starts (so that a
/// submission is refused at once) and again by the coordinator.
///
/// # Errors
/// [`JobError::Incompatible`] with the reason.
pub(crate) fn check_fits(spec: &JobSpec, job: &JobName, m: &Manifest) -> Result<(), JobError> {
    let incompatible = |reason: String| JobError::Incompatible {
        id: m.id.clone(),
        reason,
    };
    if m.job != *job {
        return Err(incompatible(format!(
            "it belongs to job `{}`, not `{}`",
            m.job, job
        )));
    }
    if m.extra.contains_key(FINISHED) {
        // The record of a finished run holds no state: it only commits.
        return Ok(());
    }
    for op in &spec.operators {
        let n = m.tasks.iter().filter(|t| t.key.operator == op.name).count();
        if n == 0 {
            return Err(incompatible(format!(
                "it has no state for operator `{}`",
                op.name
            )));
        }
        if n != op.parallelism as usize {
            return Err(incompatible(format!(
                "operator `{}` has {n} tasks in the snapshot but parallelism {} in the job file \
                     (changing parallelism is not supported)",
                op.name, op.parallelism
            )));
        }
    }
    if let Some(t) = m
        .tasks
        .iter()
        .find(|t| !spec.operators.iter().any(|o| o.name == t.key.operator))
    {
        return Err(incompatible(format!(
            "it has state for operator `{}`, which the job does not have",
            t.key.operator
        )));
    }
    for op in &spec.operators {
        for t in m.tasks.iter().filter(|t| t.key.operator == op.name) {
            crate::snapshot::check_config(t, &op.config).map_err(incompatible)?;
        }
    }
    Ok(())
}
