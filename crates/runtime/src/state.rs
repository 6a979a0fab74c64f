//! What stands behind `memento:operator/state@0.2.0`: the `state-writer`
//! lent to `snapshot-state` and the `state-reader` lent to
//! `restore-state`, with the contract's bounds enforced as pieces pass
//! (the bindings' host traits are implemented in `host_state`).
//!
//! The runtime knows nothing of the store: a writer hands each piece to a
//! [`StateSink`] and a reader takes them from a [`StateSource`], both
//! supplied by the caller for one call.

use std::ops::Range;

/// The longest state piece the contract allows (1 MiB). Longer pieces trap
/// while they are copied out of the guest, before the host allocates them.
pub const MAX_PIECE: usize = 1 << 20;

/// One piece of canonical state: its key group (`None`: the task's state
/// that is not keyed) and its bytes.
pub type Piece = (Option<u32>, Vec<u8>);

/// Where the pieces a guest writes go, as they come.
pub trait StateSink: Send {
    /// Take one piece (at most [`MAX_PIECE`] bytes, its key group already
    /// checked).
    ///
    /// # Errors
    /// Why the host cannot take more state; the snapshot fails.
    fn write(&mut self, key_group: Option<u32>, bytes: Vec<u8>) -> Result<(), String>;
}

/// Where the pieces a guest reads come from.
pub trait StateSource: Send {
    /// The next piece, or `None` at the end.
    ///
    /// # Errors
    /// Why the state cannot be read (a damaged snapshot, ...).
    fn read(&mut self) -> Result<Option<Piece>, String>;
}

/// Why the host refused state a guest wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// More state in total than the job's `max_snapshot`.
    TooMuch { limit: u64 },
    /// A piece of a key group the task does not own, or longer than a
    /// piece may be.
    Contract(String),
    /// The sink failed.
    Sink(String),
}

impl Refusal {
    pub(crate) fn message(&self) -> String {
        match self {
            Refusal::TooMuch { limit } => {
                format!("more than {limit} bytes of state (limits.max_snapshot)")
            }
            Refusal::Contract(why) | Refusal::Sink(why) => why.clone(),
        }
    }
}

/// The resource behind a `state-writer` handle: one `snapshot-state` call.
pub struct StateWriter {
    sink: Box<dyn StateSink>,
    written: u64,
    max_total: u64,
    owned: Range<u32>,
    refused: Option<Refusal>,
}

impl StateWriter {
    pub(crate) fn new(sink: Box<dyn StateSink>, max_total: u64, owned: Range<u32>) -> StateWriter {
        StateWriter {
            sink,
            written: 0,
            max_total,
            owned,
            refused: None,
        }
    }

    /// Check one piece against the contract and the limit, then pass it on.
    pub(crate) fn write(&mut self, key_group: Option<u32>, bytes: Vec<u8>) -> Result<(), String> {
        if let Some(r) = &self.refused {
            // Once refused, the snapshot is lost: say so again rather than
            // take more.
            return Err(r.message());
        }
        let refusal = if bytes.len() > MAX_PIECE {
            Some(Refusal::Contract(format!(
                "a state piece of {} bytes is longer than the contract's {MAX_PIECE}",
                bytes.len()
            )))
        } else if let Some(g) = key_group.filter(|g| !self.owned.contains(g)) {
            Some(Refusal::Contract(format!(
                "a state piece of key group {g}, which the task does not own (it owns {}..{})",
                self.owned.start, self.owned.end
            )))
        } else if self.written.saturating_add(bytes.len() as u64) > self.max_total {
            Some(Refusal::TooMuch {
                limit: self.max_total,
            })
        } else {
            None
        };
        if let Some(r) = refusal {
            let message = r.message();
            self.refused = Some(r);
            return Err(message);
        }
        self.written += bytes.len() as u64;
        self.sink
            .write(key_group, bytes)
            .inspect_err(|e| self.refused = Some(Refusal::Sink(e.clone())))
    }

    /// The sink back, with the total written, or why the host refused the
    /// state.
    pub(crate) fn finish(self) -> Result<(Box<dyn StateSink>, u64), Refusal> {
        match self.refused {
            Some(r) => Err(r),
            None => Ok((self.sink, self.written)),
        }
    }
}

/// The resource behind a `state-reader` handle: one `restore-state` call.
pub struct StateReader {
    source: Box<dyn StateSource>,
    failed: Option<String>,
}

impl StateReader {
    pub(crate) fn new(source: Box<dyn StateSource>) -> StateReader {
        StateReader { source, failed: None }
    }

    pub(crate) fn read(&mut self) -> Result<Option<Piece>, String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.source.read().inspect_err(|e| self.failed = Some(e.clone()))
    }

    /// Why reading failed, if it did: the host's failure, whatever the
    /// guest made of it.
    pub(crate) fn failure(self) -> Option<String> {
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Vec<Piece>);
    impl StateSink for Collect {
        fn write(&mut self, key_group: Option<u32>, bytes: Vec<u8>) -> Result<(), String> {
            self.0.push((key_group, bytes));
            Ok(())
        }
    }

    #[test]
    fn writer_passes_pieces_and_counts_them() {
        let mut w = StateWriter::new(Box::new(Collect(Vec::new())), 100, 4..8);
        w.write(None, vec![1; 10]).unwrap();
        w.write(Some(4), vec![2; 20]).unwrap();
        w.write(Some(7), vec![3; 70]).unwrap();
        let Ok((_, total)) = w.finish() else {
            panic!("refused")
        };
        assert_eq!(total, 100);
    }

    #[test]
    fn writer_refuses_a_running_total_over_the_limit_and_stays_refused() {
        let mut w = StateWriter::new(Box::new(Collect(Vec::new())), 100, 0..1);
        w.write(None, vec![0; 60]).unwrap();
        let err = w.write(None, vec![0; 41]).unwrap_err();
        assert_eq!(err, "more than 100 bytes of state (limits.max_snapshot)");
        // Smaller pieces after a refusal are refused too: the state is lost.
        assert!(w.write(None, vec![0; 1]).is_err());
        assert_eq!(w.finish().err(), Some(Refusal::TooMuch { limit: 100 }));
    }

    #[test]
    fn writer_refuses_key_groups_the_task_does_not_own_and_long_pieces() {
        let mut w = StateWriter::new(Box::new(Collect(Vec::new())), u64::MAX, 4..8);
        let err = w.write(Some(8), vec![0; 1]).unwrap_err();
        assert_eq!(
            err,
            "a state piece of key group 8, which the task does not own (it owns 4..8)"
        );
        let mut w = StateWriter::new(Box::new(Collect(Vec::new())), u64::MAX, 0..1);
        let err = w.write(None, vec![0; MAX_PIECE + 1]).unwrap_err();
        assert_eq!(
            err,
            format!(
                "a state piece of {} bytes is longer than the contract's {MAX_PIECE}",
                MAX_PIECE + 1
            )
        );
    }
}
