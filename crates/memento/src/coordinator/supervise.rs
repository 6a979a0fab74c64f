//! Supervision of a run: attempts one after another, each from the newest
//! complete snapshot, as long as the restart strategy allows; what the run
//! reports when it gives up.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use crossbeam_channel::unbounded;

use super::Coordinator;
use super::compat::{self, FINISHED, check_fits, resume_point_before};
use super::control::{Control, TriggerError};
use super::protocol::{AttemptEnd, AttemptState};
use super::report::{FinalState, JobFailed, JobReport, OperatorReport};
use super::status::JobState;
use super::triggers::Triggers;
use super::{regroup, restart};
use crate::dataflow::fault::{self, Site};
use crate::dataflow::sink;
use crate::dataflow::{Attempt, JobError, RestorePoint};
use crate::spec::RestartStrategy;
use crate::store::{JobName, Manifest, SnapshotId};

impl Coordinator<'_> {
    pub(super) fn run_inner(&mut self, from: Option<Manifest>) -> Result<JobReport, Box<JobFailed>> {
        let started = Instant::now();
        let mut restore = from;
        self.report.restored_from = restore.as_ref().map(|m| m.id.clone());
        loop {
            let end = match restore.as_ref() {
                // A finished run's record only commits; `attempt` checks
                // every other snapshot (`restore_point`).
                Some(m) if m.extra.contains_key(FINISHED) => {
                    match check_fits(self.spec, &self.job, &self.components, m) {
                        Ok(()) => self.finish_again(m),
                        Err(e) => AttemptEnd::Failed(e),
                    }
                }
                _ => {
                    // A panic of the coordinator's own code fails the job
                    // like any failure: reported, its attempt's threads
                    // stopped (dropping an `Attempt` joins them).
                    let attempt = AssertUnwindSafe(|| {
                        fault::panic_if_asked(
                            Site::Coordinator,
                            self.spec.operators.iter().map(|o| &o.config),
                        );
                        self.attempt(restore.as_ref())
                    });
                    catch_unwind(attempt)
                        .unwrap_or_else(|p| AttemptEnd::Failed(JobError::panicked("the coordinator", &*p)))
                }
            };
            let error = match end {
                AttemptEnd::Done(state) => {
                    self.report.state = Some(state);
                    self.report.elapsed = started.elapsed();
                    return Ok(std::mem::take(&mut self.report));
                }
                AttemptEnd::Failed(error) => error,
            };
            if !(retryable(&error) && self.restart_allowed()) {
                return Err(Box::new(self.give_up(error, restore.as_ref())));
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
            // The newest complete snapshot of any kind (FLIP-10: they are
            // all restore points); none means start from scratch.
            restore = match self.store.latest(&self.job) {
                Ok(m) => m,
                Err(e) => {
                    return Err(Box::new(JobFailed {
                        error: e.into(),
                        restarts: self.report.restarts,
                        resume_from: None,
                        searched_older: false,
                    }));
                }
            };
        }
    }

    /// The failure the run ends with, and where to resume: when starting
    /// from `restore` is what failed, the newest older snapshot that can
    /// start the job as it is (not one that fails the same way); else the
    /// newest complete one.
    fn give_up(&self, error: JobError, restore: Option<&Manifest>) -> JobFailed {
        let (resume_from, searched_older) = match resume_advice(&error, restore, &self.job) {
            Resume::OlderThan(id) => (
                resume_point_before(&self.store, self.spec, &self.job, &self.components, id),
                true,
            ),
            Resume::Latest => (self.store.latest(&self.job).ok().flatten().map(|m| m.id), false),
            Resume::Nothing => (None, false),
        };
        JobFailed {
            error,
            restarts: self.report.restarts,
            resume_from,
            searched_older,
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
                        let _ = r.send(Err(TriggerError::Restarting));
                    }
                }
                Err(_) => {}
            }
        }
    }

    /// Resuming from the record of a finished job: finish its output commit
    /// (idempotent) and end.
    fn finish_again(&mut self, m: &Manifest) -> AttemptEnd {
        let commits = sink::commits_of(m, &*self.sink);
        match commits.and_then(|c| self.sink.recover(Some((&m.id, &c)))) {
            Ok(_) => AttemptEnd::Done(FinalState::AlreadyFinished {
                snapshot: m.id.clone(),
            }),
            Err(e) => AttemptEnd::Failed(e.into()),
        }
    }

    /// Check that a snapshot fits this job, then bring the sink to its
    /// state (in that order: a snapshot that cannot start the job leaves
    /// the output alone).
    fn restore_point(&self, m: &Manifest) -> Result<RestorePoint, JobError> {
        check_fits(self.spec, &self.job, &self.components, m)?;
        // At another parallelism, each task gathers its key groups.
        let tasks = regroup::restore_states(self.spec, m).map_err(|reason| JobError::Incompatible {
            id: m.id.clone(),
            reason,
        })?;
        let commits = sink::commits_of(m, &*self.sink)?;
        let sink_next_seq = self.sink.recover(Some((&m.id, &commits)))?;
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
                if let Err(e) = self.sink.recover(None) {
                    return AttemptEnd::Failed(e.into());
                }
                None
            }
        };
        self.key_groups = match compat::key_groups(self.spec, restore) {
            Ok(k) => k,
            Err(reason) => {
                return AttemptEnd::Failed(JobError::Incompatible {
                    id: restore
                        .map(|m| m.id.clone())
                        .expect("only a snapshot's record can be wrong"),
                    reason,
                });
            }
        };
        let sinks = self.spec.sink_parallelism();
        self.retired_sinks = point
            .iter()
            .flat_map(|p| &p.sink_next_seq)
            .filter(|(task, _)| **task >= sinks)
            .map(|(&task, &next_seq)| sink::SinkCommit {
                task,
                next_seq,
                files: Vec::new(),
            })
            .collect();
        // Counted by the source thread: positions are not record counts
        // for every source (the push source's are the service's offsets).
        let records_before = self.status.records_in.load(std::sync::atomic::Ordering::Relaxed);
        let (reports_tx, reports) = unbounded();
        let attempt = match Attempt::start(
            self.runtime,
            self.spec,
            self.loaded,
            point.as_ref(),
            &self.key_groups,
            reports_tx,
            self.status.records_in.clone(),
        ) {
            Ok(a) => a,
            Err(e) => return AttemptEnd::Failed(e),
        };
        let mut run = AttemptState {
            attempt: Some(attempt),
            pending: None,
            triggers: Triggers::new(&self.spec.checkpoints, &self.spec.savepoints, Instant::now()),
            total_tasks: self.spec.operators.iter().map(|o| o.parallelism as usize).sum(),
            done: BTreeMap::new(),
            source_end: None,
            stopped: None,
        };
        let end = self.coordinate(&mut run, &reports);
        if let Some(p) = run.pending.take() {
            self.fail_pending(p, "the job ended before the snapshot completed", false);
        }
        run.triggers.refuse_all(&TriggerError::EndedBeforeStart);
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
        self.report.source_records = self
            .status
            .records_in
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(records_before);
        end
    }
}

/// Where a run that failed for good should resume.
#[derive(Debug, PartialEq, Eq)]
enum Resume<'a> {
    /// Starting from this snapshot is what failed: from the newest older
    /// one that can start the job.
    OlderThan(&'a SnapshotId),
    /// From the newest complete snapshot.
    Latest,
    /// Nowhere this job can offer: the snapshot belongs to another job.
    Nothing,
}

fn resume_advice<'a>(error: &JobError, restore: Option<&'a Manifest>, job: &JobName) -> Resume<'a> {
    match (error, restore) {
        (
            JobError::Restore { .. }
            | JobError::Incompatible { .. }
            | JobError::Sink(sink::SinkError::BadCommit { .. }),
            Some(m),
        ) if m.job == *job => Resume::OlderThan(&m.id),
        (JobError::Incompatible { .. }, _) => Resume::Nothing,
        _ => Resume::Latest,
    }
}

/// Failures that a restart may cure.
fn retryable(e: &JobError) -> bool {
    matches!(
        e,
        JobError::Source(_) | JobError::Task(_) | JobError::Snapshots(_) | JobError::Thread(_)
    ) || matches!(e, JobError::Sink(s) if !matches!(s, sink::SinkError::BadCommit { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::RestoreError;
    use crate::store::{SnapshotKind, StateFormat, Trigger};

    fn manifest(id: &str) -> Manifest {
        let id = SnapshotId::parse(id).unwrap();
        Manifest::new(
            id.job().clone(),
            id.number(),
            SnapshotKind::Checkpoint,
            Trigger::Periodic,
            StateFormat::Native,
        )
    }

    fn restore_failed(m: &Manifest) -> JobError {
        JobError::Restore {
            task: crate::store::TaskKey::new("count", 0),
            source: Box::new(RestoreError::Unsupported {
                id: m.id.clone(),
                reason: "test".into(),
            }),
        }
    }

    fn incompatible(m: &Manifest) -> JobError {
        JobError::Incompatible {
            id: m.id.clone(),
            reason: "test".into(),
        }
    }

    #[test]
    fn a_snapshot_that_cannot_start_the_job_is_neither_retried_nor_offered_again() {
        let job = JobName::new("j").unwrap();
        let m = manifest("j-000007");
        for error in [restore_failed(&m), incompatible(&m)] {
            assert!(!retryable(&error), "{error}");
            assert_eq!(resume_advice(&error, Some(&m), &job), Resume::OlderThan(&m.id));
        }
        // Another job's snapshot: nothing of this job is offered.
        let other = manifest("other-000003");
        assert_eq!(
            resume_advice(&incompatible(&other), Some(&other), &job),
            Resume::Nothing
        );
    }

    #[test]
    fn a_failure_while_running_resumes_from_the_newest_snapshot() {
        let job = JobName::new("j").unwrap();
        let m = manifest("j-000007");
        let failed = JobError::Snapshots("3 consecutive checkpoints failed".into());
        assert!(retryable(&failed));
        assert_eq!(resume_advice(&failed, Some(&m), &job), Resume::Latest);
        assert_eq!(resume_advice(&failed, None, &job), Resume::Latest);
        assert!(!retryable(&JobError::StopFailed("timed out".into())));
    }
}
