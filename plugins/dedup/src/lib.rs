//! `dedup`: drops events whose key was already seen, in bounded memory.
//!
//! The first event with a key passes through unchanged (key, value and
//! timestamp); later events with a key the operator still remembers are
//! dropped and counted. Give it all events of a key (parallelism 1, or an
//! upstream stage keyed the same way, which is how memento routes anyway).
//!
//! Memory is bounded: the operator remembers at most `max_keys` keys. When a
//! new key would exceed that, the key remembered longest ago is forgotten
//! (FIFO by the time a key was remembered; seeing a duplicate does not
//! refresh a key, so this is not LRU). A forgotten key counts as new again.
//! Eviction depends only on the order of input events, so it is
//! deterministic.
//!
//! With `ttl`, a key also counts as new again when the event's timestamp is
//! more than `ttl` after the timestamp of the event that made it remembered
//! (event time: `timestamp - remembered_at > ttl`). That event passes and the
//! key is remembered afresh, at the back of the FIFO.
//!
//! Config:
//! - `max_keys`: how many keys to remember, at least 1; default 100000.
//! - `ttl`: event-time duration after which a key counts as new again,
//!   milliseconds or a duration such as `"10m"`; default: none (keys are
//!   remembered until evicted).

use memento_guest::{Context, Error, Event, KeyedState, Operator, Output};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Default for config `max_keys`.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// One remembered key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    key: Vec<u8>,
    /// Timestamp of the event that made the key remembered.
    timestamp: i64,
}

/// The operator's state: the remembered keys in FIFO order, plus its
/// configuration and counters.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Dedup {
    /// Config `max_keys`.
    max_keys: usize,
    /// Config `ttl` in milliseconds.
    ttl_ms: Option<u64>,
    /// Remembered keys by sequence number, oldest first (the FIFO). This is
    /// the only copy of the keys in a snapshot.
    remembered: BTreeMap<u64, Remembered>,
    /// Key to its sequence number in `remembered`: the SDK's keyed state,
    /// for its fixed hash and allocation-free lookups. Not snapshotted
    /// (the FIFO holds the keys once); rebuilt on restore. The FIFO is
    /// task-wide state (eviction is across keys), so a snapshot of this
    /// operator restores only at its own parallelism.
    #[serde(skip)]
    index: KeyedState<u64>,
    /// Sequence number for the next remembered key.
    next_seq: u64,
    /// Duplicates dropped so far.
    duplicates_dropped: u64,
    /// Keys forgotten to stay within `max_keys`.
    evicted: u64,
    /// Keys that counted as new again because their `ttl` had passed.
    expired: u64,
}

impl Dedup {
    /// Number of keys remembered now (at most `max_keys`).
    pub fn remembered(&self) -> usize {
        self.remembered.len()
    }

    /// Duplicates dropped so far.
    pub fn duplicates_dropped(&self) -> u64 {
        self.duplicates_dropped
    }

    /// Keys forgotten so far to stay within `max_keys`.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Keys that counted as new again because their `ttl` had passed.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Remember `key`, seen first at `timestamp`, evicting the oldest keys
    /// beyond `max_keys`.
    fn remember(&mut self, key: Vec<u8>, timestamp: i64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.index.insert(&key, seq);
        self.remembered.insert(seq, Remembered { key, timestamp });
        self.evict_beyond_max();
    }

    fn evict_beyond_max(&mut self) {
        while self.remembered.len() > self.max_keys {
            if let Some((_, old)) = self.remembered.pop_first() {
                self.index.remove(&old.key);
                self.evicted += 1;
            }
        }
    }
}

/// Read `max_keys` and `ttl` from the config.
fn config(ctx: &Context) -> Result<(usize, Option<u64>), Error> {
    let max_keys: usize = ctx.parse_or("max_keys", DEFAULT_MAX_KEYS)?;
    if max_keys == 0 {
        return Err(format!(
            "config `max_keys` = {:?}: must be at least 1",
            ctx.get("max_keys").unwrap_or_default()
        )
        .into());
    }
    let ttl_ms = match ctx.get("ttl") {
        None => None,
        Some(_) => Some(ctx.duration_ms_or("ttl", 0)?),
    };
    Ok((max_keys, ttl_ms))
}

impl Operator for Dedup {
    fn open(ctx: &Context) -> Result<Self, Error> {
        let (max_keys, ttl_ms) = config(ctx)?;
        Ok(Dedup {
            max_keys,
            ttl_ms,
            index: KeyedState::new(ctx),
            ..Dedup::default()
        })
    }

    fn process(&mut self, event: Event, out: &mut Output) -> Result<(), Error> {
        if let Some(&seq) = self.index.get(event.key.as_slice()) {
            let since = self
                .remembered
                .get(&seq)
                .map_or(0, |r| i128::from(event.timestamp) - i128::from(r.timestamp));
            if self.ttl_ms.is_none_or(|ttl| since <= i128::from(ttl)) {
                self.duplicates_dropped += 1;
                return Ok(());
            }
            // The ttl has passed: forget the key, then remember it afresh.
            self.remembered.remove(&seq);
            self.index.remove(event.key.as_slice());
            self.expired += 1;
        }
        self.remember(event.key.clone(), event.timestamp);
        out.push(event);
        Ok(())
    }

    fn close(&mut self, _out: &mut Output) -> Result<(), Error> {
        memento_guest::info!(
            "dedup: dropped {} duplicates; {} keys remembered, {} evicted, {} expired",
            self.duplicates_dropped,
            self.remembered.len(),
            self.evicted,
            self.expired
        );
        Ok(())
    }

    /// Remembered keys and counters come from the snapshot, `max_keys` and
    /// `ttl` from this run's config; a smaller `max_keys` evicts the oldest
    /// keys right away.
    fn restore(&mut self, _ctx: &Context, from: &mut memento_guest::StateReader<'_>) -> Result<(), Error> {
        let (_, restored) = memento_guest::read_state::<Dedup>(Self::STATE_VERSION, from)?;
        self.index.clear();
        for (&seq, r) in &restored.remembered {
            self.index.insert(&r.key, seq);
        }
        if self.index.len() != restored.remembered.len() {
            return Err("dedup: corrupt snapshot: a key is remembered twice".into());
        }
        self.remembered = restored.remembered;
        self.next_seq = restored.next_seq;
        self.duplicates_dropped = restored.duplicates_dropped;
        self.evicted = restored.evicted;
        self.expired = restored.expired;
        self.evict_beyond_max();
        Ok(())
    }
}

memento_guest::export_operator!(Dedup);

#[cfg(test)]
mod tests {
    use super::*;

    type Row = (String, String, i64);

    fn open(config: &[(&str, &str)]) -> Dedup {
        Dedup::open(&Context::for_test(config.iter().copied())).unwrap()
    }

    fn run(op: &mut Dedup, events: &[(&str, &str, i64)]) -> Vec<Row> {
        let mut out = Output::new();
        for &(k, v, t) in events {
            op.process(Event::new(k, v, t), &mut out).unwrap();
        }
        out.take()
            .into_iter()
            .map(|e| {
                (
                    String::from_utf8(e.key).unwrap(),
                    String::from_utf8(e.value).unwrap(),
                    e.timestamp,
                )
            })
            .collect()
    }

    fn keys(rows: &[Row]) -> Vec<&str> {
        rows.iter().map(|r| r.0.as_str()).collect()
    }

    /// Internal consistency: the index mirrors the FIFO exactly.
    fn check_invariants(op: &Dedup) {
        assert!(op.remembered.len() <= op.max_keys);
        assert_eq!(op.index.len(), op.remembered.len());
        for (seq, r) in &op.remembered {
            assert_eq!(op.index.get(&r.key), Some(seq));
            assert!(*seq < op.next_seq);
        }
    }

    #[test]
    fn passes_first_occurrences_unchanged_and_drops_duplicates() {
        let mut op = open(&[]);
        let out = run(
            &mut op,
            &[
                ("a", "1", 5),
                ("b", "2", 6),
                ("a", "3", 7),
                ("b", "4", 1),
                ("c", "5", 9),
            ],
        );
        assert_eq!(
            out,
            vec![
                ("a".into(), "1".into(), 5),
                ("b".into(), "2".into(), 6),
                ("c".into(), "5".into(), 9)
            ]
        );
        assert_eq!(op.duplicates_dropped(), 2);
        check_invariants(&op);
    }

    #[test]
    fn memory_is_bounded_and_eviction_is_fifo_not_lru() {
        let mut op = open(&[("max_keys", "2")]);
        // `a` is seen again before `c` arrives; FIFO still evicts `a` first.
        let out = run(&mut op, &[("a", "", 0), ("b", "", 0), ("a", "", 0), ("c", "", 0)]);
        assert_eq!(keys(&out), ["a", "b", "c"]);
        assert_eq!(op.remembered(), 2);
        assert_eq!(op.evicted(), 1);
        // `a` was forgotten: new again (and evicts `b`); `c` is remembered.
        let out = run(&mut op, &[("c", "", 0), ("a", "", 0), ("b", "", 0)]);
        assert_eq!(keys(&out), ["a", "b"]);
        check_invariants(&op);
    }

    #[test]
    fn many_keys_stay_within_max_keys() {
        let mut op = open(&[("max_keys", "100")]);
        let events: Vec<(String, i64)> = (0..10_000).map(|i| (format!("k{}", i % 1000), i)).collect();
        let mut out = Output::new();
        for (k, t) in &events {
            op.process(Event::new(k.as_str(), "", *t), &mut out).unwrap();
            assert!(op.remembered() <= 100);
        }
        // Cycling through 1000 keys with room for 100: every event is new.
        assert_eq!(out.len(), 10_000);
        assert_eq!(op.evicted(), 9_900);
        check_invariants(&op);
    }

    #[test]
    fn ttl_makes_a_key_new_again_in_event_time() {
        let mut op = open(&[("ttl", "10s")]);
        let out = run(
            &mut op,
            &[
                ("a", "first", 1_000),
                ("a", "dup", 11_000),   // exactly ttl later: still a duplicate
                ("a", "earlier", 0),    // out of order: a duplicate
                ("a", "again", 11_001), // more than ttl later: new
                ("a", "dup", 21_001),   // ttl counts from 11_001 now
                ("a", "again", 21_002),
            ],
        );
        let values: Vec<&str> = out.iter().map(|r| r.1.as_str()).collect();
        assert_eq!(values, ["first", "again", "again"]);
        assert_eq!(op.expired(), 2);
        assert_eq!(op.duplicates_dropped(), 3);
        check_invariants(&op);
    }

    #[test]
    fn ttl_refresh_moves_the_key_to_the_back_of_the_fifo() {
        let mut op = open(&[("max_keys", "2"), ("ttl", "100")]);
        run(&mut op, &[("a", "", 0), ("b", "", 50), ("a", "", 200)]);
        // `a` was remembered afresh after `b`, so `c` evicts `b`.
        let out = run(&mut op, &[("c", "", 201), ("a", "", 202), ("b", "", 203)]);
        assert_eq!(keys(&out), ["c", "b"]);
        check_invariants(&op);
    }

    #[test]
    fn without_ttl_keys_never_expire() {
        let mut op = open(&[]);
        let out = run(&mut op, &[("a", "", i64::MIN), ("a", "", i64::MAX)]);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn bad_config_is_rejected_naming_key_and_value() {
        for (key, value) in [
            ("max_keys", "0"),
            ("max_keys", "-1"),
            ("max_keys", "lots"),
            ("ttl", "forever"),
        ] {
            let err = Dedup::open(&Context::for_test([(key, value)])).unwrap_err();
            let msg = err.message();
            assert!(
                msg.contains(&format!("config `{key}`")) && msg.contains(&format!("{value:?}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn snapshot_restore_round_trip_behaves_like_an_uninterrupted_run() {
        let config = [("max_keys", "3"), ("ttl", "1m")];
        let events: Vec<(String, i64)> = (0..200)
            .map(|i| (format!("k{}", (i * 7) % 5), i * 10_000))
            .collect();
        let as_refs: Vec<(&str, &str, i64)> = events.iter().map(|(k, t)| (k.as_str(), "", *t)).collect();

        let mut whole = open(&config);
        let expected = run(&mut whole, &as_refs);

        let mut first = open(&config);
        let mut got = run(&mut first, &as_refs[..77]);
        let state = memento_guest::snapshot_bytes(&first).unwrap();
        let ctx = Context::for_test(config);
        let mut second = Dedup::open(&ctx).unwrap();
        memento_guest::restore_bytes(&mut second, &ctx, &state).unwrap();
        check_invariants(&second);
        assert_eq!(second.remembered, first.remembered);
        assert_eq!(memento_guest::snapshot_bytes(&second).unwrap(), state);
        got.extend(run(&mut second, &as_refs[77..]));
        assert_eq!(got, expected);
        assert_eq!(second.duplicates_dropped(), whole.duplicates_dropped());
        assert_eq!(
            memento_guest::snapshot_bytes(&second).unwrap(),
            memento_guest::snapshot_bytes(&whole).unwrap()
        );
    }

    #[test]
    fn restore_with_smaller_max_keys_evicts_the_oldest() {
        let mut op = open(&[]);
        run(&mut op, &[("a", "", 0), ("b", "", 0), ("c", "", 0)]);
        let state = memento_guest::snapshot_bytes(&op).unwrap();
        let ctx = Context::for_test([("max_keys", "2")]);
        let mut small = Dedup::open(&ctx).unwrap();
        memento_guest::restore_bytes(&mut small, &ctx, &state).unwrap();
        check_invariants(&small);
        // `a` was evicted, `b` and `c` are still remembered.
        let out = run(&mut small, &[("c", "", 1), ("b", "", 1), ("a", "", 1)]);
        assert_eq!(keys(&out), ["a"]);
    }

    #[test]
    fn snapshot_does_not_depend_on_hash_order() {
        let events: Vec<(String, i64)> = (0..500).map(|i| (format!("key-{}", (i * 31) % 97), i)).collect();
        let as_refs: Vec<(&str, &str, i64)> = events.iter().map(|(k, t)| (k.as_str(), "", *t)).collect();
        let mut a = open(&[("max_keys", "50")]);
        let mut b = open(&[("max_keys", "50")]);
        assert_eq!(run(&mut a, &as_refs), run(&mut b, &as_refs));
        assert_eq!(
            memento_guest::snapshot_bytes(&a).unwrap(),
            memento_guest::snapshot_bytes(&b).unwrap()
        );
    }
}
