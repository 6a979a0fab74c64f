//! Packing events into the contract's `batch` record and back (see
//! `wit/operator.wit`): one buffer of keys and values, their lengths, and
//! the event times. `crates/runtime/src/batch.rs` is the host's side of the
//! same layout, kept apart on purpose (the SDK never depends on the host).

use crate::bindings::memento::operator::types::Batch;
use crate::{Event, EventRef};

/// Events being packed into a batch, appended one at a time: an emitted
/// event costs a copy of its bytes, no allocation of its own.
#[derive(Debug, Default)]
pub(crate) struct Packer {
    data: Vec<u8>,
    lengths: Vec<u32>,
    timestamps: Vec<i64>,
}

impl Packer {
    /// Room for `events` more events of `bytes` bytes in all.
    pub(crate) fn reserve(&mut self, events: usize, bytes: usize) {
        self.data.reserve(bytes);
        self.lengths.reserve(2 * events);
        self.timestamps.reserve(events);
    }

    #[inline]
    pub(crate) fn push(&mut self, key: &[u8], value: &[u8], timestamp: i64) {
        self.data.extend_from_slice(key);
        self.data.extend_from_slice(value);
        self.lengths.push(key.len() as u32);
        self.lengths.push(value.len() as u32);
        self.timestamps.push(timestamp);
    }

    pub(crate) fn len(&self) -> usize {
        self.timestamps.len()
    }

    /// The batch so far, leaving the packer empty.
    pub(crate) fn take(&mut self) -> Batch {
        Batch {
            data: std::mem::take(&mut self.data),
            lengths: std::mem::take(&mut self.lengths),
            timestamps: std::mem::take(&mut self.timestamps),
        }
    }
}

/// Pack events into a batch.
#[cfg(test)]
pub(crate) fn pack(events: Vec<Event>) -> Batch {
    let mut p = Packer::default();
    for e in &events {
        p.push(&e.key, &e.value, e.timestamp);
    }
    p.take()
}

/// The events of a batch, borrowed from it: one allocation per batch, none
/// per event. The whole batch is checked first, so a malformed one yields
/// no events at all.
///
/// # Errors
/// When the batch is malformed (lengths that do not add up).
pub fn refs(batch: &Batch) -> Result<Vec<EventRef<'_>>, String> {
    let Batch {
        data,
        lengths,
        timestamps,
    } = batch;
    if lengths.len() != timestamps.len() * 2 {
        return Err(format!(
            "malformed batch: {} lengths for {} events",
            lengths.len(),
            timestamps.len()
        ));
    }
    let total = lengths
        .iter()
        .try_fold(0usize, |sum, &len| sum.checked_add(len as usize));
    match total {
        Some(total) if total == data.len() => {}
        Some(total) if total < data.len() => {
            return Err(format!(
                "malformed batch: {} bytes of data left over",
                data.len() - total
            ));
        }
        _ => {
            return Err(format!(
                "malformed batch: lengths exceed the {} bytes of data",
                data.len()
            ));
        }
    }
    let mut at = 0usize;
    let mut take = |len: u32| {
        let bytes = &data[at..at + len as usize];
        at += len as usize;
        bytes
    };
    Ok(timestamps
        .iter()
        .enumerate()
        .map(|(i, &timestamp)| EventRef {
            key: take(lengths[2 * i]),
            value: take(lengths[2 * i + 1]),
            timestamp,
        })
        .collect())
}

/// Unpack a batch into owned events.
///
/// # Errors
/// When the batch is malformed (lengths that do not add up).
pub fn unpack(batch: Batch) -> Result<Vec<Event>, String> {
    Ok(refs(&batch)?.into_iter().map(EventRef::to_event).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let events = vec![
            Event::new("a", "1", 5),
            Event::new("", "", -1),
            Event::new("key", vec![0u8, 255], 7),
        ];
        assert_eq!(unpack(pack(events.clone())).unwrap(), events);
        assert!(unpack(pack(Vec::new())).unwrap().is_empty());
    }

    #[test]
    fn malformed_batches_are_refused() {
        let mut b = pack(vec![Event::new("a", "1", 5)]);
        b.lengths.pop();
        assert!(unpack(b).unwrap_err().contains("1 lengths for 1 events"));
        let mut b = pack(vec![Event::new("a", "1", 5)]);
        b.lengths[1] = 9;
        assert!(unpack(b).unwrap_err().contains("exceed"));
        let mut b = pack(vec![Event::new("a", "1", 5)]);
        b.data.push(0);
        assert!(unpack(b).unwrap_err().contains("left over"));
    }
}
