//! The life of one operator task: instantiate, open, maybe restore, then
//! process batches, align and take snapshots at barriers, and end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::align::Alignment;
use super::budget::Inputs;
use super::error::JobError;
use super::fault::{self, Site};
use super::messages::{Barrier, Edge, FROM_COORDINATOR, Msg, Report, TaskFigures, route};
use super::partition;
use super::sink::{SinkCommit, SinkWriter};
use crate::runtime::{
    Context, Event, KeyGroupRange, LoadedComponent, Runtime, SandboxLimits, TaskInstance, TaskLabel,
};
use crate::snapshot::{self, CaptureError, NativeBase};
use crate::store::{SnapshotId, TaskKey, TaskState, TaskStateData, TenantStore};

/// Where a task sends what its operator emits.
pub(super) enum Downstream {
    /// The edges into the next stage, its key groups, and this task's
    /// index (the sender id).
    Next(Vec<Edge>, u32, usize),
    /// The sink (last stage).
    Sink(Box<dyn SinkWriter>),
}

/// Marker error: a neighbour is gone; its own error is already reported.
struct Gone;

impl Downstream {
    fn send(&mut self, events: Vec<Event>, figures: &mut TaskFigures) -> Result<(), JobError> {
        if events.is_empty() {
            return Ok(());
        }
        match self {
            Downstream::Next(next, key_groups, me) => {
                if route(next, *key_groups, *me, events) {
                    Ok(())
                } else {
                    Err(JobError::Cancelled(String::new()))
                }
            }
            Downstream::Sink(sink) => {
                figures.sink_records += events.len() as u64;
                Ok(sink.write(&events)?)
            }
        }
    }

    fn broadcast(&self, make: impl Fn() -> Msg) -> Result<(), Gone> {
        if let Downstream::Next(next, _, me) = self {
            for edge in next {
                if !edge.send(*me, make()) {
                    return Err(Gone);
                }
            }
        }
        Ok(())
    }

    fn precommit(&mut self, snapshot: u64) -> Result<Option<SinkCommit>, JobError> {
        match self {
            Downstream::Sink(sink) => Ok(sink.precommit(snapshot)?),
            Downstream::Next(..) => Ok(None),
        }
    }
}

/// Everything a task thread needs.
pub(super) struct Task {
    pub runtime: Runtime,
    pub component: Arc<LoadedComponent>,
    pub limits: SandboxLimits,
    pub job: String,
    pub key: TaskKey,
    pub parallelism: u32,
    /// The operator's key groups (fixed for the job's life).
    pub key_groups: u32,
    pub config: BTreeMap<String, String>,
    pub upstreams: usize,
    pub rx: Receiver<(usize, Msg)>,
    /// The budgets of the edges into this task: closed when the task goes,
    /// however it ends, so no sender waits for it.
    pub _inputs: Inputs,
    pub downstream: Downstream,
    pub reports: Sender<Report>,
    pub restore: Option<(TenantStore, SnapshotId, TaskState)>,
    /// Highest aborted snapshot number (see `Attempt::abort`).
    pub aborted: Arc<std::sync::atomic::AtomicU64>,
    /// Base of incremental native captures (see `snapshot::NativeBase`).
    pub native: NativeBase,
}

impl Task {
    /// Run the task and report how it ended.
    pub(super) fn run_and_report(self, reports: Sender<Report>) {
        let key = self.key.clone();
        let mut figures = TaskFigures::default();
        match self.run(&mut figures) {
            Ok(sink) => {
                let _ = reports.send(Report::TaskDone {
                    task: key,
                    figures,
                    sink,
                });
            }
            // A neighbour vanished: whoever failed has reported why.
            Err(JobError::Cancelled(_)) => {}
            Err(e) => {
                let _ = reports.send(Report::Failed(e));
            }
        }
    }

    fn run(mut self, figures: &mut TaskFigures) -> Result<Option<SinkCommit>, JobError> {
        let label = TaskLabel {
            job: self.job.clone(),
            operator: self.key.operator.clone(),
            task: self.key.task_index,
        };
        let restore_error = |e: snapshot::RestoreError| JobError::Restore {
            task: self.key.clone(),
            source: Box::new(e),
        };
        // A native image holds the guest's whole state, the opened operator
        // included: it replaces instantiate + open + restore-state, and
        // calling `open` again would build a fresh operator over it.
        let mut instance = match self.restore.take() {
            Some((store, id, state)) if matches!(state.state, TaskStateData::Native { .. }) => {
                let instance = snapshot::restore_native(
                    &self.runtime,
                    &self.component,
                    label,
                    &self.limits,
                    &store,
                    &id,
                    &state,
                )
                .map_err(restore_error)?;
                // The restored snapshot is committed: the next native
                // capture only copies what changes from here.
                if let TaskStateData::Native { memories, .. } = state.state
                    && instance.tracks_writes()
                {
                    self.native.restored(id.number(), memories);
                }
                instance
            }
            restore => {
                let mut instance = self.runtime.instantiate(&self.component, label, &self.limits)?;
                instance.open(&Context {
                    job: self.job.clone(),
                    operator_name: self.key.operator.clone(),
                    task_index: self.key.task_index,
                    parallelism: self.parallelism,
                    config: self.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    key_groups: self.key_groups,
                    owned: {
                        let owned =
                            partition::owned_groups(self.key.task_index, self.parallelism, self.key_groups);
                        KeyGroupRange {
                            start: owned.start,
                            end: owned.end,
                        }
                    },
                })?;
                if let Some((store, id, state)) = restore {
                    snapshot::restore(&mut instance, &store, &id, &state).map_err(restore_error)?;
                }
                instance
            }
        };

        let mut align: Alignment<Barrier, Msg> = Alignment::new(self.upstreams);
        loop {
            let (from, msg) = match align.released() {
                Some(m) => m,
                None => match self.rx.recv() {
                    Ok(m) => m,
                    // Every sender is gone without ending: upstream failed.
                    Err(_) => return Err(JobError::Cancelled(String::new())),
                },
            };
            // Notices from the coordinator are not part of the data flow:
            // never aligned, never held.
            let msg = if from == FROM_COORDINATOR {
                msg
            } else {
                match align.admit(from, msg) {
                    Some(msg) => msg,
                    None => continue,
                }
            };
            match msg {
                Msg::Batch(batch) => {
                    fault::panic_if_asked(Site::Task, std::iter::once(&self.config));
                    figures.records_in += batch.events.len() as u64;
                    let out = instance.process(&batch.events)?;
                    // The edge's bytes are free again.
                    drop(batch);
                    figures.records_out += out.len() as u64;
                    self.downstream.send(out, figures)?;
                }
                Msg::Barrier(b) => align.barrier(from, b),
                Msg::End => align.end(from),
                Msg::Stop => align.stop(from),
                Msg::Complete(id) => {
                    self.native.committed(id);
                    if let Downstream::Sink(sink) = &mut self.downstream {
                        sink.committed(id);
                    }
                }
            }
            if let Some(barrier) = align.aligned() {
                self.snapshot(&mut instance, barrier)?;
                continue;
            }
            if align.releasing() {
                continue;
            }
            if align.all_stopped() {
                // Stop-with-savepoint: do not close (the job will resume).
                self.downstream
                    .broadcast(|| Msg::Stop)
                    .map_err(|Gone| JobError::Cancelled(String::new()))?;
                return self.finish(&instance, figures);
            }
            if align.all_ended() {
                let out = instance.close()?;
                figures.records_out += out.len() as u64;
                self.downstream.send(out, figures)?;
                self.downstream
                    .broadcast(|| Msg::End)
                    .map_err(|Gone| JobError::Cancelled(String::new()))?;
                return self.finish(&instance, figures);
            }
        }
    }

    fn finish(
        &mut self,
        instance: &TaskInstance,
        figures: &mut TaskFigures,
    ) -> Result<Option<SinkCommit>, JobError> {
        let stats = instance.stats();
        figures.process_calls = stats.process_calls;
        figures.time_in_plugin = stats.time_in_plugin;
        // The final files are committed by the coordinator's final record.
        self.downstream.precommit(u64::MAX)
    }

    /// Capture at a barrier (task paused), forward the barrier, then persist
    /// on another thread and acknowledge from there.
    fn snapshot(&mut self, instance: &mut TaskInstance, barrier: Barrier) -> Result<(), JobError> {
        let started = Instant::now();
        // A barrier of a snapshot the coordinator already gave up on is
        // only forwarded: capturing it would pause the task for nothing.
        let watermark = self.aborted.load(std::sync::atomic::Ordering::SeqCst);
        let aborted = barrier.id <= watermark;
        let capture = |instance: &mut TaskInstance| {
            snapshot::capture_at_barrier(instance, barrier.format, &self.native, &barrier.writer, watermark)
        };
        let captured = match (!aborted).then(|| capture(instance)) {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(CaptureError::Declined(reason))) => {
                let _ = self.reports.send(Report::Declined {
                    id: barrier.id,
                    task: self.key.clone(),
                    reason,
                });
                None
            }
            Some(Err(CaptureError::Failed(e))) => return Err(JobError::Task(e)),
        };
        let sink = self.downstream.precommit(barrier.id)?;
        let b = barrier.clone();
        self.downstream
            .broadcast(|| Msg::Barrier(b.clone()))
            .map_err(|Gone| JobError::Cancelled(String::new()))?;
        let pause = started.elapsed();
        let Some(captured) = captured else { return Ok(()) };
        let (reports, key) = (self.reports.clone(), self.key.clone());
        let config = self.config.clone();
        let unkeyed = captured.unkeyed_bytes();
        // Hashing and writing happen off the task thread: processing goes on.
        std::thread::Builder::new()
            .name(format!("upload {key}"))
            .spawn(move || {
                let started = Instant::now();
                let persist = || {
                    fault::panic_if_asked(Site::Upload, std::iter::once(&config));
                    snapshot::persist(&captured, &barrier.writer).map_err(|e| e.to_string())
                };
                // A panic here fails this snapshot, named as the host's
                // failure, instead of leaving it to time out.
                let persisted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(persist))
                    .unwrap_or_else(|p| {
                        Err(JobError::panicked(format!("the upload of {key}"), &*p).to_string())
                    });
                let report = match persisted {
                    Ok(state) => Report::TaskAck {
                        id: barrier.id,
                        task: key,
                        state,
                        unkeyed,
                        sink,
                        pause,
                        upload: started.elapsed(),
                    },
                    Err(reason) => Report::NotStored {
                        id: barrier.id,
                        task: key,
                        reason,
                    },
                };
                let _ = reports.send(report);
            })
            .map_err(|e| JobError::Thread(e.to_string()))?;
        Ok(())
    }
}
