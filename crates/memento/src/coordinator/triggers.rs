//! Which snapshot starts next: periodic checkpoints and savepoints when
//! they are due, requests from [`super::JobControl`] in the order they came,
//! and which requests are refused. One snapshot is in flight at a time;
//! everything else waits here.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::control::{TriggerError, TriggerResult};
use super::schedule::Schedule;
use crate::spec::{CheckpointSpec, SavepointSpec, SnapshotFormat};
use crate::store::{SnapshotKind, Trigger};

/// A snapshot waiting to start.
pub(super) struct Request {
    pub(super) kind: SnapshotKind,
    pub(super) trigger: Trigger,
    pub(super) format: SnapshotFormat,
    pub(super) reply: Option<Sender<TriggerResult>>,
    /// Stop the job with this savepoint.
    pub(super) stop: bool,
}

impl Request {
    fn is_periodic_checkpoint(&self) -> bool {
        self.kind == SnapshotKind::Checkpoint && self.trigger == Trigger::Periodic
    }

    /// Answer whoever asked (if anyone): no snapshot, for `why`.
    pub(super) fn refuse(self, why: TriggerError) {
        if let Some(reply) = self.reply {
            let _ = reply.send(Err(why));
        }
    }
}

/// The triggers of one attempt.
pub(super) struct Triggers {
    queue: VecDeque<Request>,
    /// When the next periodic checkpoint is due; `None` without an interval
    /// and while a periodic one waits or runs (re-armed when it ends).
    next_checkpoint: Option<Instant>,
    /// When the last periodic checkpoint was due: the interval counts from
    /// trigger to trigger, as in Flink, not from the end of the previous one.
    last_due: Instant,
    checkpoint_interval: Option<Duration>,
    min_pause: Duration,
    checkpoint_format: SnapshotFormat,
    savepoint_format: SnapshotFormat,
    savepoints: Schedule,
}

impl Triggers {
    /// The triggers of an attempt starting at `now`.
    pub(super) fn new(checkpoints: &CheckpointSpec, savepoints: &SavepointSpec, now: Instant) -> Triggers {
        Triggers {
            queue: VecDeque::new(),
            next_checkpoint: checkpoints.interval.map(|i| now + i.0),
            last_due: now,
            checkpoint_interval: checkpoints.interval.map(|i| i.0),
            min_pause: checkpoints.min_pause.0,
            checkpoint_format: checkpoints.format,
            savepoint_format: savepoints.format,
            savepoints: Schedule::from_spec_at(savepoints, now),
        }
    }

    /// Queue the periodic snapshots due at `now`.
    pub(super) fn due(&mut self, now: Instant) {
        if let Some(due) = self.next_checkpoint.filter(|t| *t <= now) {
            self.last_due = due;
            self.queue.push_back(Request {
                kind: SnapshotKind::Checkpoint,
                trigger: Trigger::Periodic,
                format: self.checkpoint_format,
                reply: None,
                stop: false,
            });
            self.next_checkpoint = None;
        }
        if self.savepoints.due(now) {
            self.queue.push_back(Request {
                kind: SnapshotKind::Savepoint,
                trigger: Trigger::Periodic,
                format: self.savepoint_format,
                reply: None,
                stop: false,
            });
        }
    }

    /// The next snapshot to start, oldest request first.
    pub(super) fn next(&mut self) -> Option<Request> {
        self.queue.pop_front()
    }

    /// A checkpoint ended at `now` (completed or failed): the next periodic
    /// one is due an interval after the last one was due, and no sooner than
    /// `min_pause` after this end. A checkpoint that took longer than the
    /// interval is followed `min_pause` later, not by a backlog of missed
    /// ones.
    pub(super) fn checkpoint_ended(&mut self, now: Instant) {
        let Some(interval) = self.checkpoint_interval else {
            return;
        };
        let earliest = now + self.min_pause;
        self.next_checkpoint = Some(match self.next_checkpoint {
            // A manual checkpoint ended while the periodic one is armed.
            Some(armed) => armed.max(earliest),
            // A manual checkpoint ended while the periodic one waits in the
            // queue: that one re-arms when it ends.
            None if self.queue.iter().any(Request::is_periodic_checkpoint) => return,
            None => (self.last_due + interval).max(earliest),
        });
    }

    /// The earliest instant a periodic snapshot is due, if any.
    pub(super) fn next_due(&self) -> Option<Instant> {
        match (self.next_checkpoint, self.savepoints.next()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a stop-with-savepoint is queued.
    pub(super) fn stopping(&self) -> bool {
        self.queue.iter().any(|r| r.stop)
    }

    /// A manual snapshot of `kind`, in `format` or the job's format for the
    /// kind. Refused once the input ended (`ended`) or the job stops
    /// (`stopped`: its stop savepoint completed, or one is queued).
    pub(super) fn manual(
        &mut self,
        kind: SnapshotKind,
        format: Option<SnapshotFormat>,
        reply: Option<Sender<TriggerResult>>,
        ended: bool,
        stopped: bool,
    ) {
        let request = Request {
            kind,
            trigger: Trigger::Manual,
            format: format.unwrap_or(match kind {
                SnapshotKind::Checkpoint => self.checkpoint_format,
                SnapshotKind::Savepoint => self.savepoint_format,
            }),
            reply,
            stop: false,
        };
        if ended || stopped || self.stopping() {
            request.refuse(TriggerError::Stopping);
        } else {
            self.queue.push_back(request);
        }
    }

    /// A stop with a savepoint in the job's savepoint format. Refused once
    /// the input ended (`ended`) or when a stop is queued already.
    pub(super) fn stop(&mut self, reply: Option<Sender<TriggerResult>>, ended: bool) {
        let request = Request {
            kind: SnapshotKind::Savepoint,
            trigger: Trigger::Stop,
            format: self.savepoint_format,
            reply,
            stop: true,
        };
        if ended || self.stopping() {
            request.refuse(TriggerError::AlreadyStopping);
        } else {
            self.queue.push_back(request);
        }
    }

    /// Refuse every waiting request for `why`: none of them will start.
    pub(super) fn refuse_all(&mut self, why: &TriggerError) {
        for r in self.queue.drain(..) {
            r.refuse(why.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::HumanDuration;

    fn checkpoints(interval_ms: Option<u64>, min_pause_ms: u64) -> CheckpointSpec {
        CheckpointSpec {
            interval: interval_ms.map(|ms| HumanDuration(Duration::from_millis(ms))),
            min_pause: HumanDuration(Duration::from_millis(min_pause_ms)),
            format: SnapshotFormat::Native,
            ..CheckpointSpec::default()
        }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn kinds(t: &mut Triggers) -> Vec<(SnapshotKind, Trigger, SnapshotFormat)> {
        std::iter::from_fn(|| t.next())
            .map(|r| (r.kind, r.trigger, r.format))
            .collect()
    }

    #[test]
    fn a_periodic_checkpoint_waits_for_its_interval_and_the_previous_one() {
        let t0 = Instant::now();
        let mut t = Triggers::new(&checkpoints(Some(100), 0), &SavepointSpec::default(), t0);
        t.due(ms(t0, 99));
        assert!(t.next().is_none());
        assert_eq!(t.next_due(), Some(ms(t0, 100)));
        t.due(ms(t0, 100));
        assert_eq!(
            kinds(&mut t),
            [(
                SnapshotKind::Checkpoint,
                Trigger::Periodic,
                SnapshotFormat::Native
            )]
        );
        // Not again while it runs, however long that takes.
        t.due(ms(t0, 1_000));
        assert!(t.next().is_none());
        assert_eq!(t.next_due(), None);
        // It took longer than the interval: the next one follows at once
        // (min_pause is 0), without a backlog of the missed ones.
        t.checkpoint_ended(ms(t0, 1_000));
        assert_eq!(t.next_due(), Some(ms(t0, 1_000)));
        t.due(ms(t0, 1_000));
        assert_eq!(kinds(&mut t).len(), 1);
        assert_eq!(t.next_due(), None);
    }

    #[test]
    fn the_interval_counts_from_trigger_to_trigger() {
        let t0 = Instant::now();
        let mut t = Triggers::new(&checkpoints(Some(100), 0), &SavepointSpec::default(), t0);
        // Woken a little late; the schedule does not drift by it.
        t.due(ms(t0, 103));
        assert_eq!(kinds(&mut t).len(), 1);
        t.checkpoint_ended(ms(t0, 160));
        assert_eq!(t.next_due(), Some(ms(t0, 200)));
        t.due(ms(t0, 200));
        assert_eq!(kinds(&mut t).len(), 1);
        t.checkpoint_ended(ms(t0, 230));
        assert_eq!(t.next_due(), Some(ms(t0, 300)));
    }

    #[test]
    fn a_manual_checkpoint_does_not_reset_the_periodic_one() {
        let t0 = Instant::now();
        let mut t = Triggers::new(&checkpoints(Some(100), 30), &SavepointSpec::default(), t0);
        t.manual(SnapshotKind::Checkpoint, None, None, false, false);
        assert_eq!(kinds(&mut t).len(), 1);
        t.checkpoint_ended(ms(t0, 40));
        assert_eq!(
            t.next_due(),
            Some(ms(t0, 100)),
            "armed, and min_pause has passed by then"
        );
        t.checkpoint_ended(ms(t0, 90));
        assert_eq!(t.next_due(), Some(ms(t0, 120)), "min_pause after the manual one");
        // A manual checkpoint ends while the periodic one waits behind it:
        // nothing more is queued, and the periodic one re-arms when it ends.
        t.manual(SnapshotKind::Checkpoint, None, None, false, false);
        t.due(ms(t0, 120));
        let first = t.next().unwrap();
        assert_eq!(first.trigger, Trigger::Manual);
        t.checkpoint_ended(ms(t0, 150));
        assert_eq!(t.next_due(), None);
        assert_eq!(kinds(&mut t).len(), 1, "the periodic one, once");
        t.checkpoint_ended(ms(t0, 170));
        assert_eq!(t.next_due(), Some(ms(t0, 220)));
    }

    #[test]
    fn min_pause_stretches_the_interval() {
        let t0 = Instant::now();
        let mut t = Triggers::new(&checkpoints(Some(100), 250), &SavepointSpec::default(), t0);
        t.checkpoint_ended(ms(t0, 10));
        assert_eq!(t.next_due(), Some(ms(t0, 260)));
        let mut none = Triggers::new(&checkpoints(None, 250), &SavepointSpec::default(), t0);
        none.checkpoint_ended(ms(t0, 10));
        assert_eq!(none.next_due(), None, "no interval, no periodic checkpoints");
    }

    #[test]
    fn requests_queue_in_order_behind_what_is_due() {
        let t0 = Instant::now();
        let savepoints = SavepointSpec {
            interval: Some(HumanDuration(Duration::from_millis(50))),
            ..SavepointSpec::default()
        };
        let mut t = Triggers::new(&checkpoints(Some(100), 0), &savepoints, t0);
        t.manual(
            SnapshotKind::Savepoint,
            Some(SnapshotFormat::Native),
            None,
            false,
            false,
        );
        t.manual(SnapshotKind::Checkpoint, None, None, false, false);
        t.due(ms(t0, 100));
        assert_eq!(
            kinds(&mut t),
            [
                (SnapshotKind::Savepoint, Trigger::Manual, SnapshotFormat::Native),
                (SnapshotKind::Checkpoint, Trigger::Manual, SnapshotFormat::Native),
                (
                    SnapshotKind::Checkpoint,
                    Trigger::Periodic,
                    SnapshotFormat::Native
                ),
                (
                    SnapshotKind::Savepoint,
                    Trigger::Periodic,
                    SnapshotFormat::Canonical
                ),
            ]
        );
    }

    #[test]
    fn refusals_answer_at_once() {
        let t0 = Instant::now();
        let mut t = Triggers::new(&checkpoints(None, 0), &SavepointSpec::default(), t0);
        let asked = |t: &mut Triggers, ended: bool, stopped: bool| {
            let (tx, rx) = crossbeam_channel::bounded(1);
            t.manual(SnapshotKind::Savepoint, None, Some(tx), ended, stopped);
            rx.try_recv().ok()
        };
        assert_eq!(asked(&mut t, true, false), Some(Err(TriggerError::Stopping)));
        assert_eq!(asked(&mut t, false, true), Some(Err(TriggerError::Stopping)));
        assert_eq!(asked(&mut t, false, false), None, "queued");

        let (tx, rx) = crossbeam_channel::bounded(1);
        t.stop(Some(tx), false);
        assert!(rx.try_recv().is_err(), "the stop is queued");
        assert!(t.stopping());
        assert_eq!(
            asked(&mut t, false, false),
            Some(Err(TriggerError::Stopping)),
            "nothing after a stop"
        );
        let (tx, second) = crossbeam_channel::bounded(1);
        t.stop(Some(tx), false);
        assert_eq!(second.try_recv(), Ok(Err(TriggerError::AlreadyStopping)));

        // What waits is answered when the run ends.
        t.refuse_all(&TriggerError::EndedBeforeStart);
        assert_eq!(rx.try_recv(), Ok(Err(TriggerError::EndedBeforeStart)));
        assert!(t.next().is_none());
    }
}
