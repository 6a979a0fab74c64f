//! What bounds the edges between stages: every (sender, receiver)
//! pair of tasks -- the source and each first-stage task too -- has a
//! byte budget for the batches it has sent that the receiver has not
//! finished with (in the channel, held back by barrier alignment, or being
//! processed). A sender waits while its edge is full, so what a job
//! buffers between its stages is bounded in bytes, not only in messages,
//! whatever size its events are. A task's inputs share [`INPUT_BYTES`]
//! ([`edge_capacity`]), so the bound grows with the tasks, not with the
//! square of the parallelism.
//!
//! Budgets are per edge, not per receiving channel: a receiver aligning a
//! barrier holds what one input sent after it, and that input must be the
//! one to wait, not the input whose barrier is still on its way (that
//! would deadlock the alignment).
//!
//! Only batches are charged. Barriers, end and stop markers and the
//! coordinator's notices are a few bytes each and must never wait behind
//! data.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::runtime::{EVENT_OVERHEAD, Event};

/// Bytes of batches the inputs of one task may have in flight together
/// (see the module docs).
pub const INPUT_BYTES: u64 = 8 << 20;

/// The least one edge may have in flight, however many inputs share a
/// task's budget: room for a few batches of small events.
pub const MIN_EDGE_BYTES: u64 = 256 << 10;

/// The budget of each of a task's `inputs` edges: an equal share of
/// [`INPUT_BYTES`], at least [`MIN_EDGE_BYTES`].
pub fn edge_capacity(inputs: usize) -> u64 {
    (INPUT_BYTES / inputs.max(1) as u64).max(MIN_EDGE_BYTES)
}

/// The bytes an event is charged: key, value and the host's record of it
/// (the same count `[limits] max_output` uses).
pub(crate) fn event_bytes(e: &Event) -> u64 {
    EVENT_OVERHEAD + e.key.len() as u64 + e.value.len() as u64
}

/// The byte budget of one edge, shared by its sender and its receiver.
pub(crate) struct Budget {
    capacity: u64,
    state: Mutex<State>,
    freed: Condvar,
}

struct State {
    used: u64,
    /// The receiver is gone: senders stop waiting (their send then fails).
    closed: bool,
}

impl Budget {
    pub(crate) fn new(capacity: u64) -> Arc<Budget> {
        Arc::new(Budget {
            capacity,
            state: Mutex::new(State {
                used: 0,
                closed: false,
            }),
            freed: Condvar::new(),
        })
    }

    /// Wait until `bytes` fit, and charge them; `None` once the receiver is
    /// gone. A batch larger than the whole budget (one event larger than
    /// it) is let through when nothing else is in flight, so an edge holds
    /// at most its capacity or one such batch.
    pub(crate) fn charge(self: &Arc<Self>, bytes: u64) -> Option<Charge> {
        // The lock guards two integers and is never held across a call
        // that can panic, so a poisoned lock still holds sound values.
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !s.closed && s.used > 0 && s.used.saturating_add(bytes) > self.capacity {
            s = self.freed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        if s.closed {
            return None;
        }
        s.used += bytes;
        Some(Charge {
            budget: self.clone(),
            bytes,
        })
    }

    fn release(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.used -= bytes;
        self.freed.notify_all();
    }

    /// The receiver is gone: wake and refuse every sender.
    pub(crate) fn close(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        self.freed.notify_all();
    }

    /// Bytes in flight now.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.state.lock().unwrap().used
    }
}

/// Bytes charged to an edge, given back when the batch carrying it is
/// dropped: after the receiver processed it.
pub(crate) struct Charge {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// Events in flight on an edge, with the bytes they are charged.
pub(crate) struct Batch {
    pub(crate) events: Vec<Event>,
    _charge: Charge,
}

/// Charge `events` to `budget` as batches of at most its capacity and
/// hand each to `send`, waiting while the edge is full; `false` as soon as
/// the receiver is gone or `send` fails.
pub(crate) fn send_charged(
    budget: &Arc<Budget>,
    events: Vec<Event>,
    mut send: impl FnMut(Batch) -> bool,
) -> bool {
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let mut part = Vec::new();
        let mut bytes = 0u64;
        while let Some(e) = events.next_if(|e| part.is_empty() || bytes + event_bytes(e) <= budget.capacity) {
            bytes += event_bytes(&e);
            part.push(e);
        }
        let Some(charge) = budget.charge(bytes) else {
            return false;
        };
        if !send(Batch {
            events: part,
            _charge: charge,
        }) {
            return false;
        }
    }
    true
}

/// Closes the budgets of a receiver's inputs when it goes away, however it
/// ends, so that no sender waits for it for ever.
pub(crate) struct Inputs(pub(crate) Vec<Arc<Budget>>);

impl Drop for Inputs {
    fn drop(&mut self) {
        for b in &self.0 {
            b.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crossbeam_channel::unbounded;

    use super::*;

    fn event(value_len: usize) -> Event {
        Event {
            key: b"k".to_vec(),
            value: vec![b'v'; value_len],
            timestamp: 0,
        }
    }

    /// An edge whose receiving end is a channel of batches.
    #[derive(Clone)]
    struct Edge {
        tx: crossbeam_channel::Sender<Batch>,
        budget: Arc<Budget>,
    }

    impl Edge {
        fn send_events(&self, events: Vec<Event>) -> bool {
            send_charged(&self.budget, events, |b| self.tx.send(b).is_ok())
        }
    }

    #[test]
    fn a_sender_waits_while_its_edge_is_full_and_goes_on_when_the_receiver_is_done() {
        let (tx, rx) = unbounded();
        let edge = Edge {
            tx,
            budget: Budget::new(10_000),
        };
        let one = event_bytes(&event(1_000));
        // Nine events fit in 10,000 bytes, so they go as one batch.
        assert!(edge.send_events((0..9).map(|_| event(1_000)).collect()));
        assert_eq!(edge.budget.used(), 9 * one);
        let first = rx.recv().unwrap();
        assert_eq!(first.events.len(), 9);

        // Nine more must wait for the first batch's bytes.
        let sender = {
            let edge = edge.clone();
            std::thread::spawn(move || edge.send_events((0..9).map(|_| event(1_000)).collect()))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(rx.try_recv().is_err(), "sent past a full edge");
        assert_eq!(edge.budget.used(), 9 * one);
        drop(first);
        assert!(sender.join().unwrap());
        assert_eq!(rx.recv().unwrap().events.len(), 9);
        assert_eq!(edge.budget.used(), 0);
    }

    #[test]
    fn large_sends_are_cut_to_the_budget_and_one_oversize_event_goes_alone() {
        let (tx, rx) = unbounded();
        let edge = Edge {
            tx,
            budget: Budget::new(10_000),
        };
        let receiver = std::thread::spawn(move || {
            let mut sizes = Vec::new();
            while let Ok(m) = rx.recv() {
                let b = m;
                sizes.push(b.events.iter().map(event_bytes).sum::<u64>());
            }
            sizes
        });
        let mut events: Vec<Event> = (0..25).map(|_| event(1_000)).collect();
        events.push(event(50_000));
        events.push(event(10));
        assert!(edge.send_events(events));
        drop(edge);
        let sizes = receiver.join().unwrap();
        let one = event_bytes(&event(1_000));
        assert_eq!(
            sizes,
            [
                9 * one,
                9 * one,
                7 * one,
                event_bytes(&event(50_000)),
                event_bytes(&event(10))
            ]
        );
    }

    #[test]
    fn a_tasks_inputs_share_its_budget_down_to_a_floor() {
        assert_eq!(edge_capacity(1), 8 << 20);
        assert_eq!(edge_capacity(4), 2 << 20);
        assert_eq!(edge_capacity(32), 256 << 10);
        assert_eq!(edge_capacity(256), 256 << 10);
        assert_eq!(edge_capacity(0), 8 << 20);
    }

    #[test]
    fn a_gone_receiver_releases_a_waiting_sender() {
        let (tx, rx) = unbounded();
        let budget = Budget::new(100);
        let edge = Edge {
            tx,
            budget: budget.clone(),
        };
        let inputs = Inputs(vec![budget]);
        assert!(edge.send_events(vec![event(1_000)]));
        let sender = std::thread::spawn(move || edge.send_events(vec![event(1)]));
        std::thread::sleep(Duration::from_millis(50));
        drop(inputs);
        assert!(!sender.join().unwrap());
        drop(rx);
    }
}
