//! `wordcount`: a keyed running count.
//!
//! For every input event the count of its key goes up by one and the
//! operator emits `(key, count)`, the count as decimal text. With config
//! `split = "words"` it counts the whitespace-separated words of the value
//! instead, emitting one update per word; give it all occurrences of a word
//! (parallelism 1, or upstream keyed by word) for correct totals.
//!
//! The counts are keyed state ([`KeyedState`]), snapshotted per key group:
//! counting keys, a savepoint resumes at any parallelism. (Counting words,
//! which are not the events' keys and so not routed by their groups, the
//! totals are only right at parallelism 1, before and after a rescale.)

use memento_guest::{
    Context, Error, Event, EventRef, KeyedState, Operator, Output, StateReader, StateWriter,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WordCount {
    /// Running count per key (or word): the whole snapshot.
    #[serde(skip)]
    counts: KeyedState<u64>,
    /// Count words of the value instead of keys (from config `split`).
    split_words: bool,
}

/// The state as versions before keyed state wrote it (the SDK's envelope
/// around the whole struct): still restored, so that their snapshots do.
#[derive(Deserialize)]
struct Legacy {
    counts: BTreeMap<Vec<u8>, u64>,
}

impl WordCount {
    fn bump(&mut self, key: &[u8], timestamp: i64, out: &mut Output) {
        let n = self.counts.get_or_insert_with(key, || 0);
        *n += 1;
        let mut digits = [0u8; 20];
        out.emit(key, decimal(*n, &mut digits), timestamp);
    }

    /// The count of `key` (for tests).
    pub fn count(&self, key: &[u8]) -> u64 {
        self.counts.get(key).copied().unwrap_or(0)
    }
}

/// `n` as decimal digits, written into `buf` (no allocation per event).
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

impl Operator for WordCount {
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
        })
    }

    fn process(&mut self, event: Event, out: &mut Output) -> Result<(), Error> {
        self.process_ref(event.as_ref(), out)
    }

    /// Borrowed: a known key costs no allocation at all.
    fn process_ref(&mut self, event: EventRef<'_>, out: &mut Output) -> Result<(), Error> {
        if self.split_words {
            let text = String::from_utf8_lossy(event.value);
            for word in text.split_whitespace() {
                self.bump(word.as_bytes(), event.timestamp, out);
            }
        } else {
            self.bump(event.key, event.timestamp, out);
        }
        Ok(())
    }

    /// Counting keys, the whole batch through one batch update of the
    /// state, which overlaps the lookups of several keys.
    fn process_batch(&mut self, events: &[EventRef<'_>], out: &mut Output) -> Result<(), Error> {
        if self.split_words {
            for &event in events {
                self.process_ref(event, out)?;
            }
            return Ok(());
        }
        let mut digits = [0u8; 20];
        self.counts.get_or_insert_each(
            events.iter().map(|e| e.key),
            || 0,
            |i, key, n| {
                *n += 1;
                out.emit(key, decimal(*n, &mut digits), events[i].timestamp);
            },
        );
        Ok(())
    }

    /// Only the counts, per key group; the mode comes from the config.
    fn snapshot(&self, out: &mut StateWriter<'_>) -> Result<(), Error> {
        self.counts.snapshot(out)
    }

    /// Keep the mode from this run's configuration, the counts from the
    /// snapshot: keyed pieces, or one unkeyed envelope from a version
    /// before keyed state.
    fn restore(&mut self, _ctx: &Context, from: &mut StateReader<'_>) -> Result<(), Error> {
        let unkeyed = self.counts.restore(from)?;
        if !unkeyed.is_empty() {
            let (_, legacy) = memento_guest::decode_state::<Legacy>(Self::STATE_VERSION, &unkeyed)?;
            for (key, n) in legacy.counts {
                self.counts.insert(&key, n);
            }
        }
        Ok(())
    }
}

memento_guest::export_operator!(WordCount);

#[cfg(test)]
mod tests {
    use super::*;

    fn run(op: &mut WordCount, events: Vec<Event>) -> Vec<(String, String)> {
        let mut out = Output::new();
        for e in events {
            op.process(e, &mut out).unwrap();
        }
        out.take()
            .into_iter()
            .map(|e| {
                (
                    String::from_utf8(e.key).unwrap(),
                    String::from_utf8(e.value).unwrap(),
                )
            })
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn counts_keys() {
        let mut op = WordCount::open(&Context::for_test([])).unwrap();
        let out = run(
            &mut op,
            vec![
                Event::new("a", "", 1),
                Event::new("b", "", 2),
                Event::new("a", "", 3),
            ],
        );
        assert_eq!(out, pairs(&[("a", "1"), ("b", "1"), ("a", "2")]));
    }

    /// A batch counts and emits exactly as its events one by one.
    #[test]
    fn a_batch_counts_as_its_events_one_by_one() {
        let events: Vec<Event> = (0..3000)
            .map(|i| Event::new(format!("k{}", (i * 7919) % 301), "", i))
            .collect();
        let mut one = WordCount::open(&Context::for_test([])).unwrap();
        let each = run(&mut one, events.clone());
        let mut batched = WordCount::open(&Context::for_test([])).unwrap();
        let mut out = Output::new();
        for chunk in events.chunks(1000) {
            let refs: Vec<EventRef<'_>> = chunk.iter().map(Event::as_ref).collect();
            batched.process_batch(&refs, &mut out).unwrap();
        }
        let got: Vec<(String, String)> = out
            .take()
            .into_iter()
            .map(|e| {
                (
                    String::from_utf8(e.key).unwrap(),
                    String::from_utf8(e.value).unwrap(),
                )
            })
            .collect();
        assert_eq!(got, each);
        assert_eq!(batched.count(b"k0"), one.count(b"k0"));
    }

    #[test]
    fn counts_words_of_the_value() {
        let mut op = WordCount::open(&Context::for_test([("split", "words")])).unwrap();
        let out = run(&mut op, vec![Event::new("", "to be or  not to be", 0)]);
        assert_eq!(
            out,
            pairs(&[
                ("to", "1"),
                ("be", "1"),
                ("or", "1"),
                ("not", "1"),
                ("to", "2"),
                ("be", "2")
            ])
        );
    }

    #[test]
    fn bad_split_config_is_rejected() {
        let err = WordCount::open(&Context::for_test([("split", "lines")])).unwrap_err();
        assert!(err.message().contains("config `split`"), "{err:?}");
    }

    #[test]
    fn snapshot_and_restore_continue_counting() {
        let mut op = WordCount::open(&Context::for_test([])).unwrap();
        run(&mut op, vec![Event::new("a", "", 1), Event::new("a", "", 2)]);
        let state = memento_guest::snapshot_pieces(&op).unwrap();
        let ctx = Context::for_test([]);
        let mut fresh = WordCount::open(&ctx).unwrap();
        memento_guest::restore_pieces(&mut fresh, &ctx, state).unwrap();
        assert_eq!(
            run(&mut fresh, vec![Event::new("a", "", 3)]),
            pairs(&[("a", "3")])
        );
    }

    #[test]
    fn counts_in_decimal() {
        let mut buf = [0u8; 20];
        for n in [0, 1, 9, 10, 99, 100, 12_345, u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    /// The state of versions before keyed state (a `BTreeMap` in the SDK's
    /// envelope) restores.
    #[test]
    fn restores_snapshots_from_before_keyed_state() {
        #[derive(Serialize)]
        struct Old {
            counts: BTreeMap<Vec<u8>, u64>,
            split_words: bool,
        }
        let old = Old {
            counts: BTreeMap::from([(b"a".to_vec(), 4), (b"b".to_vec(), 1)]),
            split_words: false,
        };
        let bytes = memento_guest::encode_state(1, &old).unwrap();
        let ctx = Context::for_test([]);
        let mut op = WordCount::open(&ctx).unwrap();
        memento_guest::restore_bytes(&mut op, &ctx, &bytes).unwrap();
        assert_eq!((op.count(b"a"), op.count(b"b")), (4, 1));
        assert_eq!(run(&mut op, vec![Event::new("a", "", 0)]), pairs(&[("a", "5")]));
    }

    /// Rescaling: the key groups of one task's snapshot restored into two
    /// tasks (each given its own groups' pieces, as the host does) hold
    /// every count exactly once, and counting goes on from them.
    #[test]
    fn key_groups_split_across_tasks() {
        let ctx = Context::for_test([]);
        let mut one = WordCount::open(&ctx).unwrap();
        let events: Vec<Event> = (0..500)
            .map(|i| Event::new(format!("k{}", i % 70), "", i))
            .collect();
        run(&mut one, events);
        let pieces = memento_guest::snapshot_pieces(&one).unwrap();
        assert!(pieces.iter().all(|(g, _)| g.is_some()), "only keyed state");
        let mut total = 0;
        for owned in [0..64u32, 64..128] {
            let ctx = Context {
                parallelism: 2,
                owned: owned.clone(),
                ..Context::for_test([])
            };
            let mine = pieces
                .iter()
                .filter(|(g, _)| owned.contains(&g.unwrap()))
                .cloned()
                .collect();
            let mut task = WordCount::open(&ctx).unwrap();
            memento_guest::restore_pieces(&mut task, &ctx, mine).unwrap();
            for k in 0..70 {
                let key = format!("k{k}");
                let n = task.count(key.as_bytes());
                if owned.contains(&memento_guest::key_group(key.as_bytes(), 128)) {
                    assert_eq!(n, one.count(key.as_bytes()), "{key}");
                    total += n;
                } else {
                    assert_eq!(n, 0, "{key} is not this task's");
                }
            }
        }
        assert_eq!(total, 500);
    }
}
