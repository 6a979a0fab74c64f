//! `wordcount-v2`: version 2 of the `wordcount` example operator, for the
//! end-to-end test that a canonical savepoint of version 1 restores into a
//! newer plugin.
//!
//! Same behaviour as `plugins/wordcount` (a keyed running count, emitting
//! `(key, count)` per event), plus a new state field `total` counting every
//! event this operator has seen. Snapshots of version 1 lack `total`; serde
//! fills in 0 (`#[serde(default)]`), and counting per key continues from the
//! restored counts. At `close` it logs `wordcount-v2 total N` so a test can
//! see the new field in use.
//!
//! The counts are keyed state, as `wordcount`'s; `total` is task-wide
//! (unkeyed) state, so a snapshot of this version cannot change
//! parallelism — the test of that refusal uses it.

use memento_guest::{Context, Error, Event, KeyedState, Operator, Output, StateReader, StateWriter};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The unkeyed part of the state: `total` as this version writes it, or
/// a whole state from before keyed state (counts included).
#[derive(Default, Serialize, Deserialize)]
struct Unkeyed {
    #[serde(default)]
    counts: BTreeMap<Vec<u8>, u64>,
    #[serde(default)]
    total: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WordCount {
    /// Running count per key (or word).
    #[serde(skip)]
    counts: KeyedState<u64>,
    /// Count words of the value instead of keys (from config `split`).
    split_words: bool,
    /// New in state version 2: events seen (since the state began, or since
    /// the version 1 state it was restored from).
    #[serde(default)]
    total: u64,
}

impl WordCount {
    fn bump(&mut self, key: &[u8], timestamp: i64, out: &mut Output) {
        let n = self.counts.get_or_insert_with(key, || 0);
        *n += 1;
        out.emit(key, n.to_string(), timestamp);
    }
}

impl Operator for WordCount {
    const STATE_VERSION: u32 = 2;

    fn open(ctx: &Context) -> Result<Self, Error> {
        let split_words = match ctx.get("split") {
            None | Some("keys") => false,
            Some("words") => true,
            Some(other) => {
                return Err(format!("config `split` = {other:?}: expected \"keys\" or \"words\"").into());
            }
        };
        Ok(WordCount {
            counts: KeyedState::new(ctx),
            split_words,
            total: 0,
        })
    }

    fn process(&mut self, event: Event, out: &mut Output) -> Result<(), Error> {
        self.total += 1;
        if self.split_words {
            let text = String::from_utf8_lossy(&event.value);
            for word in text.split_whitespace() {
                self.bump(word.as_bytes(), event.timestamp, out);
            }
        } else {
            self.bump(&event.key, event.timestamp, out);
        }
        Ok(())
    }

    fn close(&mut self, _out: &mut Output) -> Result<(), Error> {
        memento_guest::info!("wordcount-v2 total {}", self.total);
        Ok(())
    }

    /// Keep the mode from this run's configuration; counts (and, from a
    /// version 2 snapshot, the total) from the snapshot.
    fn restore(&mut self, _ctx: &Context, from: &mut StateReader<'_>) -> Result<(), Error> {
        let unkeyed = self.counts.restore(from)?;
        if !unkeyed.is_empty() {
            let (_, restored) = memento_guest::decode_state::<Unkeyed>(Self::STATE_VERSION, &unkeyed)?;
            for (key, n) in restored.counts {
                self.counts.insert(&key, n);
            }
            self.total = restored.total;
        }
        Ok(())
    }

    /// The counts per key group, then `total` in the SDK's envelope.
    fn snapshot(&self, out: &mut StateWriter<'_>) -> Result<(), Error> {
        self.counts.snapshot(out)?;
        let unkeyed = Unkeyed {
            counts: BTreeMap::new(),
            total: self.total,
        };
        memento_guest::write_state(out, Self::STATE_VERSION, &unkeyed)
    }
}

memento_guest::export_operator!(WordCount);

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 1 state (no `total`) restores with `total` = 0 and the
    /// counts intact.
    #[test]
    fn restores_a_version_1_state() {
        #[derive(Serialize)]
        struct V1 {
            counts: BTreeMap<Vec<u8>, u64>,
            split_words: bool,
        }
        let v1 = V1 {
            counts: [(b"a".to_vec(), 2)].into_iter().collect(),
            split_words: false,
        };
        let bytes = memento_guest::encode_state(1, &v1).unwrap();
        let ctx = Context::for_test([]);
        let mut op = WordCount::open(&ctx).unwrap();
        memento_guest::restore_bytes(&mut op, &ctx, &bytes).unwrap();
        assert_eq!(op.total, 0);
        let mut out = Output::new();
        op.process(Event::new("a", "", 1), &mut out).unwrap();
        let got: Vec<_> = out.take().into_iter().map(|e| e.value).collect();
        assert_eq!(got, vec![b"3".to_vec()]);
        assert_eq!(op.total, 1);
    }
}
