//! `count-maps`: the keyed count of `wordcount` (emit `(key, count)` per
//! event) over the map config `map` names, so that a benchmark can time
//! the same operator in wasm with each: `keyed` (the SDK's `KeyedState`,
//! the default, each batch through its batch update
//! `get_or_insert_each`), `keyed-each` (`KeyedState`, one
//! `get_or_insert_with` per event), `keyed-boxed` (the layout `KeyedState`
//! had before keys moved into the slot: a `hashbrown::HashTable` of
//! (hash, boxed key, count) placed by the low bits of `key_hash`, one
//! lookup per event), `btree` (`BTreeMap<Vec<u8>, u64>`, what the tutorial
//! taught before) or `hashbrown` (`hashbrown::HashMap` with its default
//! hasher, foldhash, seeded per process: fast, but its iteration order
//! differs between runs). Its state is not snapshotted (the benchmark
//! takes none); `snapshot` writes nothing.

use std::collections::BTreeMap;

use memento_guest::{
    Context, Error, Event, EventRef, KeyedState, Operator, Output, StateReader, StateWriter,
};
use serde::{Deserialize, Serialize};

enum Map {
    Keyed(KeyedState<u64>),
    KeyedEach(KeyedState<u64>),
    KeyedBoxed(hashbrown::HashTable<(u64, Box<[u8]>, u64)>),
    Btree(BTreeMap<Vec<u8>, u64>),
    Hashbrown(hashbrown::HashMap<Vec<u8>, u64>),
}

#[derive(Serialize, Deserialize)]
pub struct CountMaps {
    #[serde(skip)]
    map: Option<Map>,
}

impl CountMaps {
    fn bump(&mut self, key: &[u8]) -> u64 {
        let n = match self.map.as_mut().expect("opened") {
            Map::Keyed(m) | Map::KeyedEach(m) => m.get_or_insert_with(key, || 0),
            Map::KeyedBoxed(m) => {
                let hash = memento_guest::key_hash(key);
                let entry = m.entry(hash, |s| s.0 == hash && *s.1 == *key, |s| s.0);
                &mut entry.or_insert_with(|| (hash, key.into(), 0)).into_mut().2
            }
            Map::Btree(m) => match m.get_mut(key) {
                Some(n) => n,
                None => m.entry(key.to_vec()).or_insert(0),
            },
            Map::Hashbrown(m) => match m.get_mut(key) {
                Some(n) => n,
                None => m.entry(key.to_vec()).or_insert(0),
            },
        };
        *n += 1;
        *n
    }

    /// Keys counted so far.
    pub fn len(&self) -> usize {
        match self.map.as_ref().expect("opened") {
            Map::Keyed(m) | Map::KeyedEach(m) => m.len(),
            Map::KeyedBoxed(m) => m.len(),
            Map::Btree(m) => m.len(),
            Map::Hashbrown(m) => m.len(),
        }
    }

    /// Whether no key was counted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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

impl Operator for CountMaps {
    fn open(ctx: &Context) -> Result<Self, Error> {
        let map = match ctx.get("map") {
            None | Some("keyed") => Map::Keyed(KeyedState::new(ctx)),
            Some("keyed-each") => Map::KeyedEach(KeyedState::new(ctx)),
            Some("keyed-boxed") => Map::KeyedBoxed(hashbrown::HashTable::new()),
            Some("btree") => Map::Btree(BTreeMap::new()),
            Some("hashbrown") => Map::Hashbrown(hashbrown::HashMap::new()),
            Some(other) => {
                return Err(format!(
                    "config `map` = {other:?}: expected \"keyed\", \"keyed-each\", \"keyed-boxed\", \"btree\" or \"hashbrown\""
                )
                .into());
            }
        };
        Ok(CountMaps { map: Some(map) })
    }

    fn process(&mut self, event: Event, out: &mut Output) -> Result<(), Error> {
        self.process_ref(event.as_ref(), out)
    }

    fn process_ref(&mut self, event: EventRef<'_>, out: &mut Output) -> Result<(), Error> {
        let n = self.bump(event.key);
        let mut digits = [0u8; 20];
        out.emit(event.key, decimal(n, &mut digits), event.timestamp);
        Ok(())
    }

    fn process_batch(&mut self, events: &[EventRef<'_>], out: &mut Output) -> Result<(), Error> {
        let Some(Map::Keyed(m)) = self.map.as_mut() else {
            for &event in events {
                self.process_ref(event, out)?;
            }
            return Ok(());
        };
        let mut digits = [0u8; 20];
        m.get_or_insert_each(
            events.iter().map(|e| e.key),
            || 0,
            |i, key, n| {
                *n += 1;
                out.emit(key, decimal(*n, &mut digits), events[i].timestamp);
            },
        );
        Ok(())
    }

    fn snapshot(&self, _out: &mut StateWriter<'_>) -> Result<(), Error> {
        Ok(())
    }

    fn restore(&mut self, _ctx: &Context, _from: &mut StateReader<'_>) -> Result<(), Error> {
        Ok(())
    }
}

memento_guest::export_operator!(CountMaps);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every map counts the same.
    #[test]
    fn the_maps_count_alike() {
        for map in ["keyed", "keyed-each", "keyed-boxed", "btree", "hashbrown"] {
            let mut op = CountMaps::open(&Context::for_test([("map", map)])).unwrap();
            let mut out = Output::new();
            let events: Vec<Event> = ["a", "b", "a", "a"]
                .into_iter()
                .map(|k| Event::new(k, "", 0))
                .collect();
            let refs: Vec<EventRef<'_>> = events.iter().map(Event::as_ref).collect();
            op.process_batch(&refs[..1], &mut out).unwrap();
            op.process_batch(&refs[1..], &mut out).unwrap();
            let values: Vec<Vec<u8>> = out.take().into_iter().map(|e| e.value).collect();
            assert_eq!(
                values,
                [b"1".to_vec(), b"1".to_vec(), b"2".to_vec(), b"3".to_vec()],
                "{map}"
            );
            assert_eq!(op.len(), 2);
        }
        assert!(CountMaps::open(&Context::for_test([("map", "x")])).is_err());
    }
}
