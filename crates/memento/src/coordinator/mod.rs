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
//!
//! `supervise` runs attempts and restarts them; `protocol` takes snapshots
//! within an attempt, with `triggers` deciding what starts next, `pending`
//! collecting acknowledgements and `failures` counting failed checkpoints;
//! `retention` keeps the store to the job's settings; `compat` decides
//! whether a snapshot can start the job.

mod compat;
mod control;
mod failures;
mod pending;
mod protocol;
mod regroup;
mod report;
mod requests;
mod restart;
mod retention;
pub(crate) mod schedule;
pub mod status;
mod supervise;
mod triggers;

use std::collections::BTreeMap;
use std::sync::Arc;

use crossbeam_channel::Receiver;

use crate::dataflow::JobError;
use crate::runtime::{LoadedComponent, Runtime};
use crate::spec::JobSpec;
use crate::store::{JobName, Manifest, TenantStore};
pub(crate) use compat::{check_fits, resume_point_before};
pub(crate) use control::Control;
pub use control::{JobControl, TriggerError, TriggerResult};
use failures::FailureCounter;
pub use report::{FinalState, JobFailed, JobReport, OperatorReport, SnapshotSummary};
pub use requests::{RequestLog, RequestStatus};
pub use schedule::Schedule;
pub use status::{JobState, JobStatus, SnapshotOutcome, SnapshotRecord, StatusHandle};

/// Runs a job: attempts, restarts, snapshots.
pub(crate) struct Coordinator<'a> {
    runtime: &'a Runtime,
    spec: &'a JobSpec,
    /// One loaded component per operator, in chain order.
    loaded: &'a [Arc<LoadedComponent>],
    /// Operator → blake3 hex of its component: what manifests record and
    /// native images must match.
    components: BTreeMap<String, String>,
    /// Operator → its key groups in the current attempt: what manifests
    /// record (set when an attempt starts, from the snapshot it restores).
    key_groups: crate::dataflow::KeyGroups,
    /// The output position of sink tasks the restored snapshot had and
    /// this attempt does not (it runs fewer tasks than the snapshot's):
    /// carried into every manifest, so that a later rescale up gives such
    /// a task back its next part file rather than one it committed.
    retired_sinks: Vec<crate::dataflow::sink::SinkCommit>,
    store: TenantStore,
    /// The job's sink: commits after each snapshot, recovers before each
    /// attempt.
    sink: Arc<dyn crate::io::Sink>,
    job: JobName,
    control: Receiver<Control>,
    status: StatusHandle,
    report: JobReport,
    failures: FailureCounter,
    gc_pending: bool,
}

impl<'a> Coordinator<'a> {
    pub(crate) fn new(
        runtime: &'a Runtime,
        spec: &'a JobSpec,
        loaded: &'a [Arc<LoadedComponent>],
        store: TenantStore,
        control: Receiver<Control>,
        status: StatusHandle,
    ) -> Result<Self, JobError> {
        let job = JobName::new(&spec.name)?;
        Ok(Coordinator {
            runtime,
            spec,
            loaded,
            components: component_hashes(spec, loaded),
            key_groups: crate::dataflow::KeyGroups::new(),
            retired_sinks: Vec::new(),
            store,
            sink: crate::dataflow::sink::of(&spec.sink, &spec.base_dir),
            job,
            control,
            status,
            report: JobReport::default(),
            failures: FailureCounter::default(),
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
}

/// Operator → blake3 hex of the component it runs.
pub(crate) fn component_hashes(spec: &JobSpec, loaded: &[Arc<LoadedComponent>]) -> BTreeMap<String, String> {
    spec.operators
        .iter()
        .zip(loaded)
        .map(|(op, c)| (op.name.clone(), c.hash_hex()))
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::store::{Store, StoreOptions, TenantStore};

    /// A scratch store without fsync, for the coordinator's unit tests.
    pub(super) fn store() -> (tempfile::TempDir, TenantStore) {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            sync: false,
            ..StoreOptions::default()
        };
        let tenant = Store::open(dir.path(), options)
            .unwrap()
            .tenant("default")
            .unwrap();
        (dir, tenant)
    }
}
