//! Barrier alignment of a task's inputs: an input that delivered barrier
//! *n* is held back -- what it sends next is buffered, not processed --
//! until every input delivered *n* or can no longer deliver one (it ended
//! or stopped). Then the task snapshots, and the buffered messages are
//! handed out again, in the order each input sent them, before anything
//! new is read.
//!
//! Generic over the barrier `B` and the message `M`, so that the rules can
//! be tested without a store or a plugin.

use std::collections::VecDeque;

/// The alignment state of a task with `n` inputs.
pub(super) struct Alignment<B, M> {
    /// The barrier being aligned, since its first input delivered it.
    barrier: Option<B>,
    arrived: Vec<bool>,
    ended: Vec<bool>,
    stopped: Vec<bool>,
    /// Per input, what it sent after its barrier.
    held: Vec<VecDeque<M>>,
    /// Messages released by the last alignment, handed out before new ones.
    replay: VecDeque<(usize, M)>,
}

impl<B, M> Alignment<B, M> {
    /// No barrier in flight, every input open.
    pub(super) fn new(inputs: usize) -> Self {
        Alignment {
            barrier: None,
            arrived: vec![false; inputs],
            ended: vec![false; inputs],
            stopped: vec![false; inputs],
            held: (0..inputs).map(|_| VecDeque::new()).collect(),
            replay: VecDeque::new(),
        }
    }

    /// The next message released by an alignment, if any: these come
    /// before anything new is read.
    pub(super) fn released(&mut self) -> Option<(usize, M)> {
        self.replay.pop_front()
    }

    /// Whether released messages are still waiting.
    pub(super) fn releasing(&self) -> bool {
        !self.replay.is_empty()
    }

    /// `msg` from input `from`: handed back if the task may process it now,
    /// held (`None`) if `from` already delivered the barrier being aligned.
    pub(super) fn admit(&mut self, from: usize, msg: M) -> Option<M> {
        if self.barrier.is_some() && self.arrived[from] {
            self.held[from].push_back(msg);
            return None;
        }
        Some(msg)
    }

    /// Input `from` delivered `barrier` (the first input to do so starts
    /// the alignment).
    pub(super) fn barrier(&mut self, from: usize, barrier: B) {
        self.barrier.get_or_insert(barrier);
        self.arrived[from] = true;
    }

    /// Input `from` ended: it delivers no more barriers.
    pub(super) fn end(&mut self, from: usize) {
        self.ended[from] = true;
    }

    /// Input `from` stopped (after a stop-with-savepoint barrier).
    pub(super) fn stop(&mut self, from: usize) {
        self.stopped[from] = true;
    }

    /// The barrier, once every input delivered it or can no longer: the
    /// task snapshots now. What the inputs sent after it is released, in
    /// input order, each input's messages in the order sent.
    pub(super) fn aligned(&mut self) -> Option<B> {
        let done = (0..self.arrived.len()).all(|i| self.arrived[i] || self.ended[i] || self.stopped[i]);
        if !done {
            return None;
        }
        let barrier = self.barrier.take()?;
        for (i, held) in self.held.iter_mut().enumerate() {
            self.replay.extend(held.drain(..).map(|m| (i, m)));
            self.arrived[i] = false;
        }
        Some(barrier)
    }

    /// Every input stopped or ended, and at least one stopped: the job
    /// stops with a savepoint (the task does not close).
    pub(super) fn all_stopped(&self) -> bool {
        self.stopped.iter().zip(&self.ended).all(|(s, e)| *s || *e) && self.stopped.iter().any(|s| *s)
    }

    /// Every input ended: the task closes.
    pub(super) fn all_ended(&self) -> bool {
        self.ended.iter().all(|e| *e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a task does with a message in the order it goes: process a
    /// batch, or snapshot at barrier `n`.
    #[derive(Debug, PartialEq)]
    enum Did {
        Process(&'static str),
        Snapshot(u64),
    }

    #[derive(Debug)]
    enum Msg {
        Batch(&'static str),
        Barrier(u64),
        End,
    }

    /// Run the task loop over `arrivals` (input, message), as `Task::run`
    /// does: released messages first, then the next arrival.
    fn drive(inputs: usize, arrivals: Vec<(usize, Msg)>) -> Vec<Did> {
        let mut align = Alignment::new(inputs);
        let mut arrivals = arrivals.into_iter();
        let mut did = Vec::new();
        loop {
            let Some((from, msg)) = align.released().or_else(|| arrivals.next()) else {
                return did;
            };
            let Some(msg) = align.admit(from, msg) else {
                continue;
            };
            match msg {
                Msg::Batch(b) => did.push(Did::Process(b)),
                Msg::Barrier(n) => align.barrier(from, n),
                Msg::End => align.end(from),
            }
            if let Some(n) = align.aligned() {
                did.push(Did::Snapshot(n));
            }
        }
    }

    use Did::{Process as P, Snapshot as S};

    #[test]
    fn an_input_past_the_barrier_waits_for_the_others() {
        let did = drive(
            2,
            vec![
                (0, Msg::Batch("a1")),
                (0, Msg::Barrier(1)),
                (0, Msg::Batch("a2")),
                (1, Msg::Batch("b1")),
                (0, Msg::Batch("a3")),
                (1, Msg::Barrier(1)),
                (1, Msg::Batch("b2")),
            ],
        );
        // a2 and a3 came after input 0's barrier: not processed before the
        // snapshot, and afterwards in the order they were sent.
        assert_eq!(did, [P("a1"), P("b1"), S(1), P("a2"), P("a3"), P("b2")]);
    }

    #[test]
    fn a_second_barrier_held_back_is_aligned_in_turn() {
        let did = drive(
            2,
            vec![
                (0, Msg::Barrier(1)),
                (0, Msg::Batch("a1")),
                (0, Msg::Barrier(2)),
                (0, Msg::Batch("a2")),
                (1, Msg::Batch("b0")),
                (1, Msg::Barrier(1)),
                (1, Msg::Batch("b1")),
                (1, Msg::Barrier(2)),
            ],
        );
        assert_eq!(did, [P("b0"), S(1), P("a1"), P("b1"), S(2), P("a2")]);
    }

    #[test]
    fn an_ended_input_does_not_hold_up_the_barrier() {
        let did = drive(
            3,
            vec![
                (2, Msg::End),
                (0, Msg::Barrier(7)),
                (0, Msg::Batch("a")),
                (1, Msg::Barrier(7)),
            ],
        );
        assert_eq!(did, [S(7), P("a")]);
        let mut align: Alignment<u64, ()> = Alignment::new(2);
        align.barrier(0, 3);
        assert_eq!(align.aligned(), None);
        align.end(1);
        assert_eq!(align.aligned(), Some(3), "the input that ended cannot deliver it");
        assert_eq!(align.aligned(), None, "aligned once");
    }

    #[test]
    fn stop_and_end_of_every_input() {
        let mut align: Alignment<u64, ()> = Alignment::new(2);
        align.end(0);
        assert!(!align.all_ended() && !align.all_stopped());
        align.stop(1);
        assert!(align.all_stopped(), "stopped where not ended");
        assert!(!align.all_ended());
        let mut align: Alignment<u64, ()> = Alignment::new(2);
        align.end(0);
        align.end(1);
        assert!(align.all_ended() && !align.all_stopped());
    }
}
