//! The push source: a service hands batches of its own events to a running
//! job through a bounded handle, each batch tagged with the service's
//! offset; the job's position is the offset after the last batch it read,
//! and a restore asks the service to push again from there.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Event, Source, SourceError, SourceReader};

/// How long a reader waits for a batch before it answers "nothing yet", so
/// that the source thread takes barriers, stop and cancel.
const IDLE: Duration = Duration::from_millis(50);

/// Why a push was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The job restarted from a snapshot (or from scratch): push again
    /// every batch whose offset is `from` or more. The batch given was not
    /// taken.
    #[error("the job resumed: push again from offset {from}")]
    Replay {
        /// The first offset to push again.
        from: u64,
    },
    /// The job's source is gone (the job and every copy of its spec were
    /// dropped): nothing will read what is pushed.
    #[error("the job's push source is gone")]
    Gone,
}

/// A job source fed by the service (see the [module docs](super)).
/// Create it with [`PushSource::new`], give it to the job as its source
/// ([`crate::spec::SourceSpec::custom`]), and feed it through its
/// [`PushHandle`].
pub struct PushSource {
    shared: Arc<Shared>,
}

/// The service's end of a [`PushSource`]: cheap to clone, usable from any
/// thread; one feeder at a time keeps the offsets in order.
#[derive(Clone)]
pub struct PushHandle {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a batch is queued or taken, on a replay and on close.
    changed: Condvar,
}

struct State {
    queue: VecDeque<(u64, Vec<Event>)>,
    /// Batches the queue holds before `push` blocks.
    capacity: usize,
    /// The offset after the last batch queued (or the position sought):
    /// batches below it are already the job's and are dropped.
    next_from: u64,
    /// A replay the feeder has not been told of yet.
    replay: Option<u64>,
    /// The service said the input ends after what is queued.
    closed: bool,
    /// Readers opened so far: every one after the first is a new attempt,
    /// which starts over unless it seeks.
    opened: u64,
    /// The [`PushSource`] was dropped: a feeder must not wait for a reader.
    gone: bool,
}

impl PushSource {
    /// A push source whose handle holds at most `capacity` batches (at
    /// least 1) before `push` blocks.
    pub fn new(capacity: usize) -> (PushSource, PushHandle) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                capacity: capacity.max(1),
                next_from: 0,
                replay: None,
                closed: false,
                opened: 0,
                gone: false,
            }),
            changed: Condvar::new(),
        });
        (
            PushSource {
                shared: shared.clone(),
            },
            PushHandle { shared },
        )
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind, which
        // stays consistent: every update is one assignment.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drop what is queued and ask the feeder to push again from `from`.
    fn rewind(&self, from: u64) {
        let mut s = self.lock();
        s.queue.clear();
        s.next_from = from;
        s.replay = Some(from);
        s.closed = false;
        drop(s);
        self.changed.notify_all();
    }
}

impl PushHandle {
    /// Hand the job `events`, the service's batch number `offset` (offsets
    /// increase from batch to batch; gaps are allowed). Blocks while the
    /// job holds `capacity` batches it has not read. A batch below the
    /// job's position is dropped (`Ok`): the job has it already.
    ///
    /// # Errors
    /// [`PushError::Replay`] when the job resumed: nothing was taken, push
    /// again from the offset it names.
    pub fn push(&self, offset: u64, events: Vec<Event>) -> Result<(), PushError> {
        let mut s = self.shared.lock();
        loop {
            if s.gone {
                return Err(PushError::Gone);
            }
            if let Some(from) = s.replay.take() {
                return Err(PushError::Replay { from });
            }
            if offset < s.next_from {
                return Ok(());
            }
            if s.queue.len() < s.capacity {
                s.queue.push_back((offset, events));
                s.next_from = offset.saturating_add(1);
                drop(s);
                self.shared.changed.notify_all();
                return Ok(());
            }
            s = self.shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The input ends after what has been pushed: the job reads the rest,
    /// then finishes. A restart later reopens the input (its
    /// [`PushError::Replay`] comes through [`PushHandle::replay`]).
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }

    /// Wait up to `timeout` for the job to ask for a replay, and take the
    /// request: what a feeder with nothing to push (or that has closed the
    /// input) calls so that it learns of a restart. `Ok(None)`: no request.
    ///
    /// # Errors
    /// [`PushError::Gone`] once the job's source is dropped.
    pub fn replay(&self, timeout: Duration) -> Result<Option<u64>, PushError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.lock();
        loop {
            if s.gone {
                return Err(PushError::Gone);
            }
            if let Some(from) = s.replay.take() {
                return Ok(Some(from));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Source for PushSource {
    fn describe(&self) -> String {
        "push source".into()
    }

    fn open(&self) -> Result<Box<dyn SourceReader>, SourceError> {
        let restart = {
            let mut s = self.shared.lock();
            s.opened += 1;
            s.opened > 1
        };
        // A later attempt without a snapshot starts the input over; one
        // with a snapshot seeks right after this.
        if restart {
            self.shared.rewind(0);
        }
        Ok(Box::new(PushReader {
            shared: self.shared.clone(),
            position: 0,
        }))
    }
}

/// The job is gone with its source: wake a feeder waiting for room, so
/// that a service whose job ended for good does not hang in `push`.
impl Drop for PushSource {
    fn drop(&mut self) {
        self.shared.lock().gone = true;
        self.shared.changed.notify_all();
    }
}

/// One attempt's reader of a [`PushSource`].
struct PushReader {
    shared: Arc<Shared>,
    /// The offset after the last batch read.
    position: u64,
}

impl SourceReader for PushReader {
    fn next_batch(&mut self) -> Result<Option<Vec<Event>>, SourceError> {
        let mut s = self.shared.lock();
        if s.queue.is_empty() && !s.closed {
            s = self
                .shared
                .changed
                .wait_timeout(s, IDLE)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        match s.queue.pop_front() {
            Some((offset, events)) => {
                self.position = offset.saturating_add(1);
                drop(s);
                // The feeder may be waiting for room.
                self.shared.changed.notify_all();
                Ok(Some(events))
            }
            None if s.closed => Ok(None),
            None => Ok(Some(Vec::new())),
        }
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn seek(&mut self, position: u64) -> Result<(), SourceError> {
        self.shared.rewind(position);
        self.position = position;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: u64) -> Vec<Event> {
        vec![Event {
            key: format!("k{i}").into_bytes(),
            value: Vec::new(),
            timestamp: i as i64,
        }]
    }

    fn read(r: &mut Box<dyn SourceReader>) -> Option<Vec<Event>> {
        loop {
            match r.next_batch().unwrap() {
                Some(b) if b.is_empty() => continue,
                other => return other,
            }
        }
    }

    #[test]
    fn batches_flow_in_order_and_the_position_follows_the_offsets() {
        let (source, handle) = PushSource::new(4);
        let mut r = source.open().unwrap();
        assert_eq!(r.position(), 0);
        handle.push(10, ev(10)).unwrap();
        handle.push(12, ev(12)).unwrap();
        assert_eq!(read(&mut r).unwrap()[0].timestamp, 10);
        assert_eq!(r.position(), 11);
        assert_eq!(read(&mut r).unwrap()[0].timestamp, 12);
        assert_eq!(r.position(), 13);
        // Nothing queued: "nothing yet", not the end.
        assert_eq!(r.next_batch().unwrap(), Some(Vec::new()));
        handle.close();
        assert_eq!(r.next_batch().unwrap(), None);
    }

    #[test]
    fn a_full_handle_blocks_the_feeder_until_the_job_reads() {
        let (source, handle) = PushSource::new(2);
        let mut r = source.open().unwrap();
        handle.push(0, ev(0)).unwrap();
        handle.push(1, ev(1)).unwrap();
        let feeder = std::thread::spawn(move || {
            let t = Instant::now();
            handle.push(2, ev(2)).unwrap();
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!feeder.is_finished(), "the third push waits for room");
        read(&mut r).unwrap();
        assert!(feeder.join().unwrap() >= Duration::from_millis(150));
    }

    #[test]
    fn a_seek_asks_the_feeder_to_replay_and_drops_what_the_job_has() {
        let (source, handle) = PushSource::new(8);
        let mut r = source.open().unwrap();
        for i in 0..5 {
            handle.push(i, ev(i)).unwrap();
        }
        // A restore at position 3: the queue goes, the feeder is told.
        r.seek(3).unwrap();
        assert_eq!(handle.push(5, ev(5)), Err(PushError::Replay { from: 3 }));
        // Replaying from further back is harmless: below 3 is dropped.
        handle.push(2, ev(2)).unwrap();
        handle.push(3, ev(3)).unwrap();
        assert_eq!(read(&mut r).unwrap()[0].timestamp, 3);
        assert_eq!(r.position(), 4);
    }

    #[test]
    fn a_new_attempt_without_a_snapshot_starts_over_and_reopens_a_closed_input() {
        let (source, handle) = PushSource::new(8);
        let mut first = source.open().unwrap();
        handle.push(0, ev(0)).unwrap();
        handle.push(1, ev(1)).unwrap();
        handle.close();
        read(&mut first).unwrap();
        drop(first);
        let mut second = source.open().unwrap();
        assert_eq!(handle.replay(Duration::from_secs(1)), Ok(Some(0)));
        handle.push(0, ev(0)).unwrap();
        assert_eq!(read(&mut second).unwrap()[0].timestamp, 0);
        assert_eq!(
            second.next_batch().unwrap(),
            Some(Vec::new()),
            "not closed any more"
        );
        assert_eq!(handle.replay(Duration::from_millis(10)), Ok(None));
    }

    #[test]
    fn a_feeder_waiting_for_room_is_woken_when_the_job_is_dropped() {
        let (source, handle) = PushSource::new(1);
        handle.push(0, ev(0)).unwrap();
        let feeder = std::thread::spawn({
            let handle = handle.clone();
            move || handle.push(1, ev(1))
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!feeder.is_finished(), "waiting for room");
        drop(source);
        assert_eq!(feeder.join().unwrap(), Err(PushError::Gone));
        assert_eq!(handle.replay(Duration::from_secs(5)), Err(PushError::Gone));
    }
}
