//! Events and the contract's packed `batch` record (see `wit/operator.wit`):
//! a batch crosses the component boundary as three lists, so lowering it
//! into the guest costs three allocations there instead of two per event.
//!
//! `guest-sdk/src/batch.rs` is the guest's side of the same layout. The two
//! are written twice on purpose: the guest SDK is never a dependency of the
//! host (and the host's code never ships into guests); both are tested.

use super::bindings::Batch;

/// One record flowing through a job: a key (routes it between stages), a
/// value (the payload) and an event time in milliseconds since the epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Event {
    /// Partitioning key.
    pub key: Vec<u8>,
    /// Payload.
    pub value: Vec<u8>,
    /// Event time, ms since the Unix epoch.
    pub timestamp: i64,
}

/// Pack events into a batch (copies keys and values into one buffer).
pub(crate) fn pack(events: &[Event]) -> Batch {
    let bytes: usize = events.iter().map(|e| e.key.len() + e.value.len()).sum();
    let mut batch = Batch {
        data: Vec::with_capacity(bytes),
        lengths: Vec::with_capacity(events.len() * 2),
        timestamps: Vec::with_capacity(events.len()),
    };
    for e in events {
        batch.data.extend_from_slice(&e.key);
        batch.data.extend_from_slice(&e.value);
        batch.lengths.push(e.key.len() as u32);
        batch.lengths.push(e.value.len() as u32);
        batch.timestamps.push(e.timestamp);
    }
    batch
}

/// How a batch a guest returned breaks the contract's layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedBatch {
    /// `lengths` does not hold a key and a value length per timestamp.
    #[error(
        "malformed batch: {lengths} lengths for {events} event{} (two per event: key and value)",
        if *.events == 1 { "" } else { "s" }
    )]
    Lengths {
        /// Entries of `lengths`.
        lengths: usize,
        /// Entries of `timestamps`, one per event.
        events: usize,
    },
    /// The lengths add up to more than `data` holds.
    #[error("malformed batch: event {event}'s key and value lengths run past the {data} bytes of data")]
    Overrun {
        /// The first event that does not fit.
        event: usize,
        /// Bytes of `data`.
        data: usize,
    },
    /// `data` holds bytes no event accounts for.
    #[error("malformed batch: {bytes} bytes of data left over after the last event")]
    LeftOver {
        /// The bytes no event accounts for.
        bytes: usize,
    },
}

/// Unpack a batch a guest returned. Guest data is untrusted: every length
/// is checked against the buffer.
///
/// # Errors
/// [`MalformedBatch`]: how the batch breaks the layout.
pub(crate) fn unpack(batch: Batch) -> Result<Vec<Event>, MalformedBatch> {
    let Batch {
        data,
        lengths,
        timestamps,
    } = batch;
    if lengths.len() != timestamps.len().saturating_mul(2) {
        return Err(MalformedBatch::Lengths {
            lengths: lengths.len(),
            events: timestamps.len(),
        });
    }
    let mut events = Vec::with_capacity(timestamps.len());
    let mut at = 0usize;
    let mut take = |len: u32| -> Option<Vec<u8>> {
        let end = at.checked_add(len as usize).filter(|end| *end <= data.len())?;
        let bytes = data[at..end].to_vec();
        at = end;
        Some(bytes)
    };
    for (i, timestamp) in timestamps.into_iter().enumerate() {
        let overrun = MalformedBatch::Overrun {
            event: i,
            data: data.len(),
        };
        let key = take(lengths[2 * i]).ok_or(overrun.clone())?;
        let value = take(lengths[2 * i + 1]).ok_or(overrun)?;
        events.push(Event {
            key,
            value,
            timestamp,
        });
    }
    if at != data.len() {
        return Err(MalformedBatch::LeftOver {
            bytes: data.len() - at,
        });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(k: &str, v: &str, t: i64) -> Event {
        Event {
            key: k.into(),
            value: v.into(),
            timestamp: t,
        }
    }

    #[test]
    fn round_trip_and_malformed() {
        let events = vec![ev("a", "1", 5), ev("", "", -1), ev("key", "v", 7)];
        assert_eq!(unpack(pack(&events)).unwrap(), events);
        let mut b = pack(&events);
        b.lengths[0] = u32::MAX;
        assert_eq!(
            unpack(b).unwrap_err(),
            MalformedBatch::Overrun { event: 0, data: 6 }
        );
        let mut b = pack(&events);
        b.timestamps.pop();
        assert!(
            unpack(b)
                .unwrap_err()
                .to_string()
                .contains("6 lengths for 2 events")
        );
        let mut b = pack(&events);
        b.data.push(1);
        assert_eq!(unpack(b).unwrap_err(), MalformedBatch::LeftOver { bytes: 1 });
    }
}
