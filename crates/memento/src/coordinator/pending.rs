//! The snapshot in flight: what it is, and the acknowledgements collected
//! for it so far.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::control::TriggerResult;
use super::status;
use crate::dataflow::sink::SinkCommit;
use crate::store::{SnapshotKind, SnapshotWriter, TaskKey, TaskStateData, Trigger};

/// A snapshot in flight.
pub(super) struct Pending {
    pub(super) number: u64,
    pub(super) kind: SnapshotKind,
    pub(super) trigger: Trigger,
    pub(super) writer: SnapshotWriter,
    pub(super) started: Instant,
    pub(super) created_at_ms: u64,
    pub(super) acks: Acks,
    pub(super) replies: Vec<Sender<TriggerResult>>,
    /// A stop-with-savepoint: the job ends when it completes.
    pub(super) stop: bool,
}

impl Pending {
    /// Whether it ran longer than `timeout` at `now`.
    pub(super) fn timed_out(&self, now: Instant, timeout: Duration) -> bool {
        now.saturating_duration_since(self.started) > timeout
    }
}

/// The acknowledgements of one snapshot: the source's position at the
/// barrier and each task's persisted state.
#[derive(Default)]
pub(super) struct Acks {
    /// Tasks of the job: every one must acknowledge.
    total: usize,
    pub(super) states: BTreeMap<TaskKey, TaskStateData>,
    /// Per task, bytes of canonical state in no key group (`None`: native).
    unkeyed: BTreeMap<TaskKey, Option<u64>>,
    pub(super) sinks: Vec<SinkCommit>,
    pub(super) source_position: Option<u64>,
    /// Longest task pause and upload.
    pub(super) pause: Duration,
    pub(super) upload: Duration,
    pub(super) tasks: BTreeMap<TaskKey, status::TaskSnapshotFigures>,
}

impl Acks {
    /// Acknowledgements expected from `total` tasks and the source.
    pub(super) fn new(total: usize) -> Acks {
        Acks {
            total,
            ..Acks::default()
        }
    }

    /// The source injected the barrier at `position`.
    pub(super) fn source(&mut self, position: u64) {
        self.source_position = Some(position);
    }

    /// `task` persisted its state; its sink pre-committed `sink`.
    pub(super) fn task(
        &mut self,
        task: TaskKey,
        state: TaskStateData,
        unkeyed: Option<u64>,
        sink: Option<SinkCommit>,
        pause: Duration,
        upload: Duration,
    ) {
        self.tasks.insert(
            task.clone(),
            status::TaskSnapshotFigures {
                task: task.clone(),
                pause_ms: pause.as_millis() as u64,
                async_ms: upload.as_millis() as u64,
                logical_bytes: state.logical_bytes(),
            },
        );
        self.unkeyed.insert(task.clone(), unkeyed);
        // A task acknowledges once; a repeated ack replaces, never adds.
        if self.states.insert(task, state).is_none() {
            self.sinks.extend(sink);
        }
        self.pause = self.pause.max(pause);
        self.upload = self.upload.max(upload);
    }

    /// Per operator whose tasks all wrote canonical state, the bytes of it
    /// in no key group (what the manifest records as `unkeyed_bytes`):
    /// an operator with 0 can resume at another parallelism.
    pub(super) fn unkeyed_by_operator(&self) -> BTreeMap<String, u64> {
        let mut sums: BTreeMap<String, Option<u64>> = BTreeMap::new();
        for (task, bytes) in &self.unkeyed {
            let sum = sums.entry(task.operator.clone()).or_insert(Some(0));
            *sum = sum.zip(*bytes).map(|(a, b)| a + b);
        }
        sums.into_iter().filter_map(|(op, n)| Some((op, n?))).collect()
    }

    /// Every task and the source acknowledged: the snapshot can commit.
    pub(super) fn complete(&self) -> bool {
        self.states.len() == self.total && self.source_position.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(len: u64) -> TaskStateData {
        TaskStateData::Canonical {
            len,
            chunks: Vec::new(),
        }
    }

    fn ack(acks: &mut Acks, operator: &str, index: u32) {
        acks.task(
            TaskKey::new(operator, index),
            state(0),
            Some(u64::from(index)),
            None,
            Duration::from_millis(u64::from(index)),
            Duration::ZERO,
        );
    }

    #[test]
    fn complete_only_with_every_task_and_the_source() {
        let mut acks = Acks::new(3);
        ack(&mut acks, "a", 0);
        ack(&mut acks, "b", 0);
        ack(&mut acks, "b", 1);
        assert!(!acks.complete(), "the source has not placed the barrier");
        acks.source(120);
        assert!(acks.complete());
        assert_eq!(acks.source_position, Some(120));
        assert_eq!(acks.pause, Duration::from_millis(1), "the longest pause");

        let mut acks = Acks::new(2);
        acks.source(7);
        ack(&mut acks, "a", 0);
        assert!(!acks.complete(), "one task is missing");
    }

    /// The manifest's `unkeyed_bytes`: summed per operator, and no entry
    /// for an operator with a native task.
    #[test]
    fn unkeyed_bytes_add_up_per_operator_and_native_has_none() {
        let mut acks = Acks::new(4);
        ack(&mut acks, "a", 0);
        ack(&mut acks, "b", 1);
        ack(&mut acks, "b", 2);
        acks.task(
            TaskKey::new("c", 0),
            state(0),
            None,
            None,
            Duration::ZERO,
            Duration::ZERO,
        );
        ack(&mut acks, "c", 1);
        assert_eq!(
            acks.unkeyed_by_operator(),
            BTreeMap::from([("a".to_string(), 0), ("b".to_string(), 3)])
        );
    }

    #[test]
    fn a_snapshot_times_out_only_past_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), crate::store::StoreOptions::default())
            .unwrap()
            .tenant("default")
            .unwrap();
        let job = crate::store::JobName::new("j").unwrap();
        let started = Instant::now();
        let p = Pending {
            number: 1,
            kind: SnapshotKind::Checkpoint,
            trigger: Trigger::Periodic,
            writer: store.begin(&job, 1).unwrap(),
            started,
            created_at_ms: 0,
            acks: Acks::new(1),
            replies: Vec::new(),
            stop: false,
        };
        let timeout = Duration::from_secs(60);
        assert!(!p.timed_out(started + timeout, timeout));
        assert!(p.timed_out(started + timeout + Duration::from_millis(1), timeout));
        assert!(!p.timed_out(started, timeout));
        p.writer.abort();
    }

    #[test]
    fn a_repeated_ack_does_not_stand_for_a_missing_one() {
        let mut acks = Acks::new(2);
        acks.source(0);
        let sink = |file: &str| {
            Some(SinkCommit {
                task: 0,
                next_seq: 1,
                files: vec![file.to_string()],
            })
        };
        acks.task(
            TaskKey::new("a", 0),
            state(1),
            Some(0),
            sink("f"),
            Duration::ZERO,
            Duration::ZERO,
        );
        acks.task(
            TaskKey::new("a", 0),
            state(1),
            Some(0),
            sink("f"),
            Duration::ZERO,
            Duration::ZERO,
        );
        assert!(!acks.complete());
        assert_eq!(acks.sinks.len(), 1, "its sink files are listed once");
        ack(&mut acks, "a", 1);
        assert!(acks.complete());
    }
}
