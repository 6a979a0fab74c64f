//! `wordcount`: a keyed running count.
//!
//! For every input event the count of its key goes up by one and the
//! operator emits `(key, count)`, the count as decimal text. With config
//! `split = "words"` it counts the whitespace-separated words of the value
//! instead, emitting one update per word; give it all occurrences of a word
//! (parallelism 1, or upstream keyed by word) for correct totals.

use memento_guest::{Context, Error, Event, EventRef, Operator, Output};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WordCount {
    /// Running count per key (or word).
    counts: BTreeMap<Vec<u8>, u64>,
    /// Count words of the value instead of keys (from config `split`).
    split_words: bool,
}

impl WordCount {
    fn bump(&mut self, key: &[u8], timestamp: i64, out: &mut Output) {
        // Look up before inserting so a known key costs no allocation.
        let n = match self.counts.get_mut(key) {
            Some(n) => n,
            None => self.counts.entry(key.to_vec()).or_insert(0),
        };
        *n += 1;
        out.emit(key, n.to_string(), timestamp);
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
            counts: BTreeMap::new(),
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

    /// Keep the mode from this run's configuration, the counts from the snapshot.
    fn restore(&mut self, _ctx: &Context, from: &mut memento_guest::StateReader<'_>) -> Result<(), Error> {
        let (_, restored) = memento_guest::read_state::<WordCount>(Self::STATE_VERSION, from)?;
        self.counts = restored.counts;
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
        let state = memento_guest::snapshot_bytes(&op).unwrap();
        let ctx = Context::for_test([]);
        let mut fresh = WordCount::open(&ctx).unwrap();
        memento_guest::restore_bytes(&mut fresh, &ctx, &state).unwrap();
        assert_eq!(
            run(&mut fresh, vec![Event::new("a", "", 3)]),
            pairs(&[("a", "3")])
        );
    }
}
