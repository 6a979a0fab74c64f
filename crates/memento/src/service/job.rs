//! The per-job handle: one loaded job, run on some thread, and everything a
//! front end asks of it — its effective state, status and history, triggers
//! with request ids to poll, stop and cancel.
//!
//! The [`Service`](super::Service) makes one for each job it runs; a
//! single-job front end (`memento run --listen`) makes one for the job it
//! runs itself, so both answer the same questions the same way.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::thread::JoinHandle;

use super::ServiceError;
use crate::coordinator::{
    JobControl, JobFailed, JobReport, JobState, JobStatus, RequestLog, RequestStatus, SnapshotRecord,
    TriggerResult,
};
use crate::dataflow::JobError;
use crate::host::{HostError, Job, RunOptions};
use crate::spec::{JobSpec, SnapshotFormat};

/// One job of one tenant, running or ended.
pub struct ServiceJob {
    tenant: String,
    name: String,
    job: Job,
    /// Set when [`ServiceJob::run`] returns: `Err` holds why it failed
    /// (also failures before the coordinator started).
    outcome: Mutex<Option<Result<(), String>>>,
    /// The thread running it, when the service started one.
    thread: Mutex<Option<JoinHandle<()>>>,
    requests: RequestLog,
    submitted_at_ms: u64,
    /// In a pool: this host's id and API URL.
    host: Mutex<Option<(String, String)>>,
    /// In a pool: records that a user stopped or cancelled the job, before
    /// the job is told (so no host takes it over).
    user_end: Mutex<Option<UserEnd>>,
}

/// What [`ServiceJob::stop`] and [`ServiceJob::cancel`] do first.
pub(super) type UserEnd = Box<dyn Fn() -> Result<(), ServiceError> + Send + Sync>;

impl ServiceJob {
    /// A handle on a loaded job that has not run yet; its tenant is the one
    /// whose store it snapshots into. Run it with [`ServiceJob::run`].
    pub fn new(job: Job) -> ServiceJob {
        ServiceJob {
            tenant: job.store().name().to_string(),
            name: job.spec().name.clone(),
            job,
            outcome: Mutex::new(None),
            thread: Mutex::new(None),
            requests: RequestLog::default(),
            submitted_at_ms: crate::store::now_ms(),
            host: Mutex::new(None),
            user_end: Mutex::new(None),
        }
    }

    pub(super) fn set_host(&self, host: Option<(String, String)>) {
        *self.host.lock().unwrap() = host;
    }

    pub(super) fn set_user_end(&self, f: UserEnd) {
        *self.user_end.lock().unwrap() = Some(f);
    }

    /// In a pool of hosts: this host's id and API URL (the job runs here).
    pub fn host(&self) -> Option<(String, String)> {
        self.host.lock().unwrap().clone()
    }

    fn user_ends(&self) -> Result<(), ServiceError> {
        match &*self.user_end.lock().unwrap() {
            Some(f) => f(),
            None => Ok(()),
        }
    }

    /// Run the job on this thread (see [`Job::run`]) and keep how it ended.
    /// A panic of the host on the way fails the job (the coordinator
    /// already turns panics within attempts into failures; this catches
    /// the rest), so the job ends, its slot is free and the thread lives.
    ///
    /// # Errors
    /// As [`Job::run`]; [`JobError::Panicked`] inside [`HostError::Job`]
    /// for a panic.
    pub fn run(&self, options: RunOptions) -> Result<JobReport, HostError> {
        let result = catch_unwind(AssertUnwindSafe(|| self.job.run(options))).unwrap_or_else(|p| {
            Err(HostError::Job(Box::new(JobFailed {
                error: JobError::panicked("the job's thread", &*p),
                restarts: 0,
                resume_from: None,
                searched_older: false,
            })))
        });
        *self.outcome.lock().unwrap() = Some(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        result
    }

    pub(super) fn set_thread(&self, handle: JoinHandle<()>) {
        *self.thread.lock().unwrap() = Some(handle);
    }

    /// Wait for the thread the service runs the job on, if any.
    pub(super) fn join(&self) {
        if let Some(h) = self.thread.lock().unwrap().take() {
            let _ = h.join();
        }
    }

    /// Owning tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Job name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The job's specification (after the tenant's caps).
    pub fn spec(&self) -> &JobSpec {
        self.job.spec()
    }

    /// The blake3 (hex) of each operator's component, in chain order.
    pub fn component_hashes(&self) -> Vec<String> {
        self.job.components().iter().map(|c| c.hash_hex()).collect()
    }

    /// When the handle was made (the job submitted), unix ms.
    pub fn submitted_at_ms(&self) -> u64 {
        self.submitted_at_ms
    }

    /// A handle to trigger, stop or cancel the job directly.
    pub fn control(&self) -> JobControl {
        self.job.control()
    }

    /// A copy of the job's status.
    pub fn status(&self) -> JobStatus {
        self.job.status()
    }

    /// The job's state, counting a run that returned an error before the
    /// coordinator could say so (a busy store, a start that failed) as
    /// failed with that error.
    pub fn state(&self) -> JobState {
        let state = self.job.status().state;
        match &*self.outcome.lock().unwrap() {
            Some(Err(error)) if !state.is_terminal() => JobState::Failed { error: error.clone() },
            _ => state,
        }
    }

    /// Whether the job has ended (its run returned, or its state is final).
    pub fn has_ended(&self) -> bool {
        self.outcome.lock().unwrap().is_some() || self.job.status().state.is_terminal()
    }

    /// Snapshot `number` from the history, with its per-task figures.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] when it is not (or no longer) in the
    /// history.
    pub fn checkpoint(&self, number: u64) -> Result<SnapshotRecord, ServiceError> {
        self.job
            .status()
            .history
            .into_iter()
            .find(|r| r.number == number)
            .ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "no snapshot number {number} in the history of job `{}`",
                    self.name
                ))
            })
    }

    fn ensure_running(&self) -> Result<(), ServiceError> {
        if self.has_ended() {
            let state = match self.state() {
                JobState::Created => "created",
                JobState::Running => "running",
                JobState::Restarting => "restarting",
                JobState::Finished => "finished",
                JobState::Stopped { .. } => "stopped",
                JobState::Cancelled => "cancelled",
                JobState::Failed { .. } => "failed",
            };
            return Err(ServiceError::Conflict(format!(
                "job `{}` has ended ({state})",
                self.name
            )));
        }
        Ok(())
    }

    /// Take a checkpoint now; returns the request id to poll.
    ///
    /// # Errors
    /// [`ServiceError::Conflict`] when the job has ended.
    pub fn trigger_checkpoint(&self) -> Result<String, ServiceError> {
        self.ensure_running()?;
        Ok(self.track(self.job.control().trigger_checkpoint()))
    }

    /// Take a savepoint now, in `format` (default: the job's savepoint
    /// format); returns the request id to poll.
    ///
    /// # Errors
    /// [`ServiceError::Conflict`] when the job has ended.
    pub fn trigger_savepoint(&self, format: Option<SnapshotFormat>) -> Result<String, ServiceError> {
        self.ensure_running()?;
        Ok(self.track(self.job.control().trigger_savepoint(format)))
    }

    /// Stop with a savepoint; returns the request id to poll.
    ///
    /// # Errors
    /// [`ServiceError::Conflict`] when the job has ended.
    pub fn stop(&self) -> Result<String, ServiceError> {
        self.ensure_running()?;
        self.user_ends()?;
        Ok(self.track(self.job.control().stop_with_savepoint()))
    }

    /// Cancel the job.
    ///
    /// # Errors
    /// [`ServiceError::Conflict`] when the job has ended.
    pub fn cancel(&self) -> Result<(), ServiceError> {
        self.ensure_running()?;
        self.user_ends()?;
        self.job.control().cancel();
        Ok(())
    }

    /// The status of trigger request `id`.
    ///
    /// # Errors
    /// [`ServiceError::BadRequest`] for a malformed id,
    /// [`ServiceError::NotFound`] for an unknown one.
    pub fn request(&self, id: &str) -> Result<RequestStatus, ServiceError> {
        let n: u64 = id
            .parse()
            .map_err(|_| ServiceError::bad("bad_request", format!("malformed request id {id:?}")))?;
        self.requests
            .get(n)
            .ok_or_else(|| ServiceError::NotFound(format!("no request {n} for job `{}`", self.name)))
    }

    /// Whether some trigger's outcome has not been read by a client yet (a
    /// client that stopped the job polls for its final savepoint after the
    /// job ended).
    pub fn has_unread_requests(&self) -> bool {
        self.requests.unread()
    }

    /// Record a trigger and follow its outcome.
    fn track(&self, rx: crossbeam_channel::Receiver<TriggerResult>) -> String {
        self.requests.track(rx).to_string()
    }
}
