//! A test plugin for the packed batch a guest returns: it bypasses the
//! SDK's packing and returns, from `process` and `close`, whatever batch
//! the value of its first input event spells, so that the host's checks of
//! a returned batch (`fuzz/fuzz_targets/plugin_batch.rs`) meet arbitrary
//! layouts through the real call path.
//!
//! The value is read as: the number of lengths (u16, little-endian), the
//! number of timestamps (u16), that many lengths (u32 each) and timestamps
//! (i64 each), and the rest is the data. Missing bytes read as zero.

#[cfg(target_family = "wasm")]
mod guest {
    use std::cell::RefCell;

    use memento_guest::bindings::exports::memento::operator::{operator, snapshot};
    use memento_guest::bindings::memento::operator::state::{StateReader, StateWriter};
    use memento_guest::bindings::memento::operator::types::{Batch, Context};

    thread_local! {
        /// What `close` returns: the last batch `process` spelled.
        static LAST: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    struct Reader<'a>(&'a [u8]);

    impl Reader<'_> {
        fn take<const N: usize>(&mut self) -> [u8; N] {
            let mut out = [0u8; N];
            let n = N.min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            out
        }
    }

    fn spell(bytes: &[u8]) -> Batch {
        let mut r = Reader(bytes);
        let lengths = u16::from_le_bytes(r.take());
        let timestamps = u16::from_le_bytes(r.take());
        Batch {
            lengths: (0..lengths).map(|_| u32::from_le_bytes(r.take())).collect(),
            timestamps: (0..timestamps).map(|_| i64::from_le_bytes(r.take())).collect(),
            data: r.0.to_vec(),
        }
    }

    struct RawBatch;

    impl operator::Guest for RawBatch {
        fn open(_ctx: Context) -> Result<(), String> {
            Ok(())
        }

        fn process(events: Batch) -> Result<Batch, String> {
            // The first event's value is what follows its key in `data`.
            let key = events.lengths.first().copied().unwrap_or(0) as usize;
            let value = events.lengths.get(1).copied().unwrap_or(0) as usize;
            let spelled = events.data.get(key..key + value).unwrap_or(&[]).to_vec();
            let batch = spell(&spelled);
            LAST.with(|l| *l.borrow_mut() = spelled);
            Ok(batch)
        }

        fn close() -> Result<Batch, String> {
            Ok(LAST.with(|l| spell(&l.borrow())))
        }
    }

    impl snapshot::Guest for RawBatch {
        // No state: nothing written, nothing read.
        fn snapshot_state(_out: &StateWriter) -> Result<(), String> {
            Ok(())
        }

        fn restore_state(_from: &StateReader) -> Result<(), String> {
            Ok(())
        }
    }

    memento_guest::bindings::__export_plugin!(RawBatch with_types_in memento_guest::bindings);
}
