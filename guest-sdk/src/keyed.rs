//! [`KeyedState`]: a value per key, held in a hash table under memento's
//! own key hash, snapshotted per key group so that a job can resume at
//! another parallelism.
//!
//! Why a hash table with a fixed hash rather than a `BTreeMap`: at a
//! million keys every `BTreeMap` lookup is a chain of dependent loads and
//! byte-string comparisons through the guest's memory, and that was where
//! a keyed count spent nine tenths of its time. The hash table finds a key
//! in about one probe; its hash is [`key_hash`](crate::key_hash), the one
//! the host routes with, so it is computed once per event and also names
//! the key's group at snapshot time. The hash is fixed (no random seed),
//! so the table behaves identically on every run and after every restore.
//!
//! # Canonical format
//!
//! Each key group's state is one stream of pieces of that group (see
//! [`StateWriter::write_piece`]): a format byte ([`KEYED_FORMAT`], 2), the
//! number of keys in the group (unsigned LEB128), then one record per key,
//! in ascending order of (key hash, key bytes):
//!
//! | field        | encoding                                    |
//! |--------------|---------------------------------------------|
//! | key length   | unsigned LEB128, at most [`MAX_KEY`]        |
//! | key          | the key's bytes                             |
//! | value length | unsigned LEB128                             |
//! | value        | MessagePack with field names (`rmp_serde`)  |
//!
//! A group without keys writes nothing. The order makes the bytes a
//! function of the contents only (the same state snapshots to the same
//! bytes, which the store then stores once), whatever order the keys came
//! in. A value type evolves as serde allows: add fields with
//! `#[serde(default)]`.
//!
//! The key count is there so that a restore sizes its table once for all
//! the keys it will hold instead of growing it by doubling (each growth
//! rehashes every key already in); it must equal the records that follow.
//! Format 1 (written before the count existed) is the same without it, and
//! is still read.

use std::collections::BTreeMap;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::state::{PIECE, StateReader, StateWriter};
use crate::{Context, Error, key_hash};

/// The format byte that starts each key group's state (the one written;
/// format 1, without the key count, is read too).
pub const KEYED_FORMAT: u8 = 2;

/// The format before key counts, still read.
const KEYED_FORMAT_1: u8 = 1;

/// The longest key a snapshot may hold (16 MiB): a bound on what a
/// damaged length can make a restore allocate.
pub const MAX_KEY: usize = 16 << 20;

/// The largest encoded value a snapshot may hold (256 MiB), for the same
/// reason.
pub const MAX_VALUE: usize = 256 << 20;

struct Slot<V> {
    /// `key_hash(key)`: compared before the key, reused when the table
    /// grows, and the key's group at snapshot time.
    hash: u64,
    key: Key,
    value: V,
}

/// Keys up to this long are kept in the slot itself: at a million keys a
/// key of its own allocation is one more cache miss per lookup. 14 makes
/// a [`Key`] 16 bytes in a 32-bit guest, no larger than the `Box<[u8]>`
/// and its tag would be.
const INLINE: usize = 14;

/// A key's bytes, inline when short.
enum Key {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl From<&[u8]> for Key {
    #[inline]
    fn from(key: &[u8]) -> Key {
        if key.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..key.len()].copy_from_slice(key);
            Key::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(key.into())
        }
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];

    #[inline]
    fn deref(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len).min(INLINE)],
            Key::Heap(bytes) => bytes,
        }
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        **self == **other
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Key) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

/// Where the table places a key of hash `hash`: the hash with its halves
/// swapped. hashbrown picks the bucket from the low bits and the tag it
/// filters by from bits 25..32 (on a 32-bit guest) or the top 7, but a
/// task owns a contiguous range of key groups, `hash % key_groups`, so the
/// low bits of its keys' hashes are not uniform (two tasks of 128 groups:
/// bit 6 is the same for all of a task's keys, and half the buckets are
/// never a key's first choice). The high half does not depend on the group.
/// Every call into the table passes `place(hash)`, and every hasher it is
/// given is `|s| place(s.hash)`: a slot placed by anything else is lost to
/// lookups.
#[inline]
fn place(hash: u64) -> u64 {
    hash.rotate_left(32)
}

/// Keys of a batch update looked up together before they are updated (see
/// [`KeyedState::get_or_insert_each`]): enough independent probes to
/// overlap their cache misses, few enough to stay in the CPU's window.
const AHEAD: usize = 8;

/// A value of type `V` per key: what an operator keeps instead of a map of
/// its own, so that its state is fast at millions of keys, snapshotted per
/// key group and rescalable.
///
/// Lookups by `&[u8]` cost no allocation; inserting a new key allocates
/// its bytes once. Iteration is only offered in a deterministic order
/// ([`KeyedState::sorted`]): the table's own order depends on the order
/// keys arrived in and on its capacity, and output that followed it would
/// differ after a restore.
///
/// ```
/// use memento_guest::{Context, KeyedState};
///
/// let mut counts: KeyedState<u64> = KeyedState::new(&Context::for_test([]));
/// *counts.get_or_insert_with(b"a", || 0) += 1;
/// *counts.get_or_insert_with(b"a", || 0) += 1;
/// assert_eq!(counts.get(b"a"), Some(&2));
/// assert_eq!(counts.remove(b"a"), Some(2));
/// assert!(counts.is_empty());
/// ```
pub struct KeyedState<V> {
    table: HashTable<Slot<V>>,
    key_groups: u32,
}

impl<V> KeyedState<V> {
    /// Empty state for a task in context `ctx` (its number of key groups
    /// decides how the state is cut at snapshot time).
    pub fn new(ctx: &Context) -> KeyedState<V> {
        KeyedState::with_key_groups(ctx.key_groups)
    }

    /// Empty state for an operator with `key_groups` key groups (at least 1).
    pub fn with_key_groups(key_groups: u32) -> KeyedState<V> {
        KeyedState {
            table: HashTable::new(),
            key_groups: key_groups.max(1),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no key has a value.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The operator's number of key groups (0 for a state made with
    /// `Default`).
    pub fn key_groups(&self) -> u32 {
        self.key_groups
    }

    /// The value of `key`, if it has one.
    pub fn get(&self, key: &[u8]) -> Option<&V> {
        let hash = key_hash(key);
        self.table
            .find(place(hash), |s| s.hash == hash && *s.key == *key)
            .map(|s| &s.value)
    }

    /// The value of `key` to change in place, if it has one.
    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let hash = key_hash(key);
        self.table
            .find_mut(place(hash), |s| s.hash == hash && *s.key == *key)
            .map(|s| &mut s.value)
    }

    /// The value of `key`, first set to `init()` if it has none: the
    /// read-modify-write of a keyed update, with one hash and one probe.
    pub fn get_or_insert_with(&mut self, key: &[u8], init: impl FnOnce() -> V) -> &mut V {
        self.get_or_insert_hashed(key_hash(key), key, init)
    }

    /// For each of `keys`, in order, its value (first set to `init()` if
    /// it has none), given to `f` with the key's index and the key: what
    /// [`get_or_insert_with`](Self::get_or_insert_with) per key does, but
    /// faster in a large table. It hashes every key first, then, a few keys
    /// at a time, looks them all up before it updates them: the cache
    /// misses of those lookups, most of what a lookup costs at a million
    /// keys, overlap instead of following one another.
    ///
    /// ```
    /// use memento_guest::{Context, KeyedState};
    ///
    /// let mut counts: KeyedState<u64> = KeyedState::new(&Context::for_test([]));
    /// let mut seen = Vec::new();
    /// let keys: [&[u8]; 3] = [b"a", b"b", b"a"];
    /// counts.get_or_insert_each(keys, || 0, |i, key, n| {
    ///     *n += 1;
    ///     seen.push((i, key, *n));
    /// });
    /// assert_eq!(seen, [(0, &b"a"[..], 1), (1, &b"b"[..], 1), (2, &b"a"[..], 2)]);
    /// ```
    pub fn get_or_insert_each<'k>(
        &mut self,
        keys: impl IntoIterator<Item = &'k [u8]>,
        mut init: impl FnMut() -> V,
        mut f: impl FnMut(usize, &'k [u8], &mut V),
    ) {
        let hashed: Vec<(u64, &'k [u8])> = keys.into_iter().map(|k| (key_hash(k), k)).collect();
        let mut index = 0;
        for block in hashed.chunks(AHEAD) {
            // Independent probes by hash alone: they bring the control
            // bytes and slots into the cache together. Their result only
            // keeps the compiler from dropping them.
            let mut found = 0u32;
            for &(hash, _) in block {
                found += u32::from(self.table.find(place(hash), |s| s.hash == hash).is_some());
            }
            std::hint::black_box(found);
            for &(hash, key) in block {
                f(index, key, self.get_or_insert_hashed(hash, key, &mut init));
                index += 1;
            }
        }
    }

    /// [`get_or_insert_with`](Self::get_or_insert_with) of a key whose
    /// hash is `hash`.
    #[inline]
    fn get_or_insert_hashed(&mut self, hash: u64, key: &[u8], init: impl FnOnce() -> V) -> &mut V {
        match self.table.entry(
            place(hash),
            |s| s.hash == hash && *s.key == *key,
            |s| place(s.hash),
        ) {
            Entry::Occupied(o) => &mut o.into_mut().value,
            Entry::Vacant(v) => {
                &mut v
                    .insert(Slot {
                        hash,
                        key: key.into(),
                        value: init(),
                    })
                    .into_mut()
                    .value
            }
        }
    }

    /// Set the value of `key`, returning the one it replaced.
    pub fn insert(&mut self, key: &[u8], value: V) -> Option<V> {
        let hash = key_hash(key);
        match self.table.entry(
            place(hash),
            |s| s.hash == hash && *s.key == *key,
            |s| place(s.hash),
        ) {
            Entry::Occupied(mut o) => Some(std::mem::replace(&mut o.get_mut().value, value)),
            Entry::Vacant(v) => {
                v.insert(Slot {
                    hash,
                    key: key.into(),
                    value,
                });
                None
            }
        }
    }

    /// Change, set or remove the value of `key` in one step: `f` gets the
    /// current value (`None`: none) and returns the new one (`None`:
    /// remove the key).
    pub fn update(&mut self, key: &[u8], f: impl FnOnce(Option<V>) -> Option<V>) {
        let hash = key_hash(key);
        match self.table.entry(
            place(hash),
            |s| s.hash == hash && *s.key == *key,
            |s| place(s.hash),
        ) {
            Entry::Occupied(o) => {
                let (slot, vacant) = o.remove();
                if let Some(value) = f(Some(slot.value)) {
                    vacant.insert(Slot { value, ..slot });
                }
            }
            Entry::Vacant(v) => {
                if let Some(value) = f(None) {
                    v.insert(Slot {
                        hash,
                        key: key.into(),
                        value,
                    });
                }
            }
        }
    }

    /// Remove `key`, returning its value.
    pub fn remove(&mut self, key: &[u8]) -> Option<V> {
        let hash = key_hash(key);
        match self
            .table
            .find_entry(place(hash), |s| s.hash == hash && *s.key == *key)
        {
            Ok(o) => Some(o.remove().0.value),
            Err(_) => None,
        }
    }

    /// Remove every key.
    pub fn clear(&mut self) {
        self.table.clear();
    }

    /// Every key and value, ordered by key bytes: a deterministic order to
    /// emit in (costs a sort; the table itself has no order to rely on).
    pub fn sorted(&self) -> Vec<(&[u8], &V)> {
        let mut all: Vec<(&[u8], &V)> = self.table.iter().map(|s| (&*s.key, &s.value)).collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all
    }

    /// Keep only the keys for which `keep` returns true. `keep` sees keys
    /// in no particular order, so it must decide each key on its own.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], &mut V) -> bool) {
        self.table.retain(|s| keep(&s.key, &mut s.value));
    }

    /// The slots in snapshot order: by key group, then hash, then key.
    fn in_snapshot_order(&self) -> Vec<(u32, &Slot<V>)> {
        let groups = u64::from(self.key_groups);
        let mut all: Vec<(u32, &Slot<V>)> =
            self.table.iter().map(|s| ((s.hash % groups) as u32, s)).collect();
        all.sort_unstable_by(|a, b| (a.0, a.1.hash, &a.1.key).cmp(&(b.0, b.1.hash, &b.1.key)));
        all
    }
}

impl<V: Serialize> KeyedState<V> {
    /// Write the state to `out`, each key group's keys as pieces of that
    /// group, in the canonical format described in this module.
    ///
    /// # Errors
    /// When a value does not serialize, or the host refuses a piece.
    pub fn snapshot(&self, out: &mut StateWriter<'_>) -> Result<(), Error> {
        if self.key_groups == 0 {
            return Err(no_key_groups());
        }
        let mut buffer: Vec<u8> = Vec::with_capacity(PIECE + 64);
        let mut value = Vec::new();
        let mut current: Option<u32> = None;
        let order = self.in_snapshot_order();
        let mut counts = vec![0u32; self.key_groups as usize];
        for (group, _) in &order {
            counts[*group as usize] += 1;
        }
        for (group, slot) in order {
            if current != Some(group) {
                if let Some(g) = current {
                    out.write_piece(Some(g), &buffer)?;
                }
                buffer.clear();
                buffer.push(KEYED_FORMAT);
                put_len(&mut buffer, counts[group as usize] as usize);
                current = Some(group);
            }
            value.clear();
            rmp_serde::encode::write_named(&mut value, &slot.value).map_err(|e| {
                Error(format!(
                    "keyed state: the value of key {} does not serialize: {e}",
                    excerpt(&slot.key)
                ))
            })?;
            put_len(&mut buffer, slot.key.len());
            buffer.extend_from_slice(&slot.key);
            put_len(&mut buffer, value.len());
            buffer.extend_from_slice(&value);
            if buffer.len() >= PIECE {
                out.write_piece(Some(group), &buffer)?;
                buffer.clear();
            }
        }
        if let Some(g) = current {
            out.write_piece(Some(g), &buffer)?;
        }
        Ok(())
    }
}

/// A key group's stream being parsed: pieces of it may end anywhere.
#[derive(Default)]
struct GroupStream {
    /// The format byte (and, from format 2, the key count) was read.
    started: bool,
    /// The key count of the group's head (format 2), then what is left
    /// of it as records are read.
    expected: Option<u64>,
    /// Records read.
    read: u64,
    /// Bytes of the head or of an entry not complete yet.
    tail: Vec<u8>,
}

/// The head of a group's stream at the start of `bytes`: its format and
/// key count (`None` for format 1), and where the records start; `None`
/// if the bytes end inside it.
fn group_head(g: u32, bytes: &[u8]) -> Result<Option<(Option<u64>, usize)>, Error> {
    let Some(&format) = bytes.first() else {
        return Ok(None);
    };
    match format {
        KEYED_FORMAT_1 => Ok(Some((None, 1))),
        KEYED_FORMAT => {
            Ok(get_len(g, bytes, 1, "key count", usize::MAX)?.map(|(n, at)| (Some(n as u64), at)))
        }
        _ => Err(Error(format!(
            "keyed state of key group {g} has format {format}; this SDK reads formats {KEYED_FORMAT_1} and {KEYED_FORMAT}"
        ))),
    }
}

impl<V: DeserializeOwned> KeyedState<V> {
    /// Add the keys of every keyed piece in `from` (a snapshot's state, or
    /// the key groups of this task taken from several snapshotted tasks)
    /// to this state, and return the bytes of the unkeyed pieces, in
    /// order (state of the operator's own that is not keyed, or a whole
    /// snapshot from before the operator used keyed state).
    ///
    /// The pieces are held until the last has arrived, so that the table
    /// is sized once for every key they hold: a restore needs the
    /// snapshot's bytes of this task's groups in memory beside the state.
    ///
    /// # Errors
    /// When a piece is damaged (an unknown format byte, a length past
    /// [`MAX_KEY`] or [`MAX_VALUE`], a value that does not decode, a group
    /// that ends inside a record or holds another number of keys than its
    /// head says), belongs to a key group the operator does not have,
    /// holds a key of another group, or repeats a key.
    pub fn restore(&mut self, from: &mut StateReader<'_>) -> Result<Vec<u8>, Error> {
        if self.key_groups == 0 {
            return Err(no_key_groups());
        }
        let mut unkeyed = Vec::new();
        let mut held: Vec<(u32, Vec<u8>)> = Vec::new();
        // Per group: the first bytes of its stream (enough for the head)
        // and its length, to size the table before any key goes in.
        let mut heads: BTreeMap<u32, (Vec<u8>, usize)> = BTreeMap::new();
        while let Some((group, bytes)) = from.next_piece()? {
            let Some(g) = group else {
                unkeyed.extend_from_slice(&bytes);
                continue;
            };
            if g >= self.key_groups {
                return Err(Error(format!(
                    "keyed state: a piece of key group {g}, but the operator has {} key groups",
                    self.key_groups
                )));
            }
            let (head, len) = heads.entry(g).or_default();
            if head.len() < 16 {
                head.extend_from_slice(&bytes[..bytes.len().min(16 - head.len())]);
            }
            *len += bytes.len();
            held.push((g, bytes));
        }
        let mut keys: usize = 0;
        for (&g, (head, len)) in &heads {
            if let Some((Some(count), _)) = group_head(g, head)? {
                // Every record takes at least 3 bytes: a damaged count
                // must not size the table.
                if count > (*len / 3) as u64 {
                    return Err(Error(format!(
                        "keyed state of key group {g}: a key count of {count} in {len} bytes"
                    )));
                }
                keys += count as usize;
            }
        }
        self.reserve_restored(keys);
        let mut streams: BTreeMap<u32, GroupStream> = BTreeMap::new();
        for (g, bytes) in held {
            let stream = streams.entry(g).or_default();
            let mut rest: &[u8] = &bytes;
            if !stream.started {
                stream.tail.extend_from_slice(rest);
                rest = &[];
                let Some((expected, at)) = group_head(g, &stream.tail)? else {
                    continue;
                };
                stream.started = true;
                stream.expected = expected;
                stream.tail.drain(..at);
            }
            if stream.tail.is_empty() {
                let (used, n) = self.restore_records(g, rest)?;
                stream.read += n;
                stream.tail.extend_from_slice(&rest[used..]);
            } else {
                let mut joined = std::mem::take(&mut stream.tail);
                joined.extend_from_slice(rest);
                let (used, n) = self.restore_records(g, &joined)?;
                stream.read += n;
                joined.drain(..used);
                stream.tail = joined;
            }
        }
        for (g, s) in &streams {
            if !s.tail.is_empty() {
                return Err(Error(format!(
                    "keyed state of key group {g} ends inside a record ({} bytes after the last whole one)",
                    s.tail.len()
                )));
            }
            if let Some(expected) = s.expected.filter(|&e| e != s.read) {
                return Err(Error(format!(
                    "keyed state of key group {g} holds {} keys, but its head says {expected}",
                    s.read
                )));
            }
        }
        Ok(unkeyed)
    }

    /// Insert the whole records at the start of `bytes` (of group `g`);
    /// returns how many bytes they took and how many records they were.
    fn restore_records(&mut self, g: u32, bytes: &[u8]) -> Result<(usize, u64), Error> {
        let mut at = 0;
        let mut n = 0;
        loop {
            let Some((key, value, end)) = record(g, bytes, at)? else {
                return Ok((at, n));
            };
            n += 1;
            let hash = key_hash(key);
            let owner = (hash % u64::from(self.key_groups)) as u32;
            if owner != g {
                return Err(Error(format!(
                    "keyed state of key group {g} holds key {}, which belongs to key group {owner} \
                     (the snapshot was taken with other key groups, or is damaged)",
                    excerpt(key)
                )));
            }
            let value: V = decode_value(value).map_err(|e| {
                Error(format!(
                    "keyed state of key group {g}: the value of key {} does not decode: {e}",
                    excerpt(key)
                ))
            })?;
            if self.insert_restored(hash, key, value).is_err() {
                return Err(Error(format!(
                    "keyed state of key group {g} holds key {} twice",
                    excerpt(key)
                )));
            }
            at = end;
        }
    }
}

impl<V> KeyedState<V> {
    /// Room for `n` more keys read from a snapshot, so that inserting them
    /// does not grow the table.
    fn reserve_restored(&mut self, n: usize) {
        self.table.reserve(n, |s| place(s.hash));
    }

    /// Insert a key read from a snapshot, whose hash `hash` the caller has
    /// computed and checked against its group; `Err` if the key is
    /// already here (a damaged snapshot). The one way restore inserts.
    fn insert_restored(&mut self, hash: u64, key: &[u8], value: V) -> Result<(), ()> {
        match self.table.entry(
            place(hash),
            |s| s.hash == hash && *s.key == *key,
            |s| place(s.hash),
        ) {
            Entry::Occupied(_) => Err(()),
            Entry::Vacant(v) => {
                v.insert(Slot {
                    hash,
                    key: key.into(),
                    value,
                });
                Ok(())
            }
        }
    }
}

/// State without key groups, to be replaced by [`KeyedState::new`] in
/// `open`: what `#[serde(skip)]` on an operator's field needs. Its
/// snapshot and restore fail, since it cannot say which group a key is in.
impl<V> Default for KeyedState<V> {
    fn default() -> Self {
        KeyedState {
            table: HashTable::new(),
            key_groups: 0,
        }
    }
}

/// The error of a state made with `Default` and never given key groups.
fn no_key_groups() -> Error {
    Error(
        "keyed state without key groups (made with `Default`): create it in `open` with `KeyedState::new(ctx)`"
            .into(),
    )
}

impl<V> std::fmt::Debug for KeyedState<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedState")
            .field("keys", &self.len())
            .field("key_groups", &self.key_groups)
            .finish()
    }
}

/// A value from its MessagePack bytes. Integers, the commonest values of
/// keyed state (counts, sums), are read here directly; anything else goes
/// through `rmp_serde`. The bytes must hold exactly one value.
fn decode_value<V: DeserializeOwned>(bytes: &[u8]) -> Result<V, String> {
    V::deserialize(ValueDe(bytes)).map_err(|e| e.to_string())
}

/// The deserializer of [`decode_value`].
struct ValueDe<'a>(&'a [u8]);

impl<'de> ValueDe<'de> {
    /// The bytes as one MessagePack integer, if they are exactly one.
    fn int(&self) -> Option<Int> {
        let b = self.0;
        let (&marker, rest) = b.split_first()?;
        let be = |n: usize| -> Option<[u8; 8]> {
            if rest.len() != n {
                return None;
            }
            let mut out = [0u8; 8];
            out[8 - n..].copy_from_slice(rest);
            Some(out)
        };
        let sign = |n: usize| -> Option<i64> {
            let raw = u64::from_be_bytes(be(n)?);
            let shift = 64 - 8 * n as u32;
            Some(((raw << shift) as i64) >> shift)
        };
        Some(match marker {
            0x00..=0x7f if rest.is_empty() => Int::U(u64::from(marker)),
            0xe0..=0xff if rest.is_empty() => Int::I(i64::from(marker as i8)),
            0xcc => Int::U(u64::from_be_bytes(be(1)?)),
            0xcd => Int::U(u64::from_be_bytes(be(2)?)),
            0xce => Int::U(u64::from_be_bytes(be(4)?)),
            0xcf => Int::U(u64::from_be_bytes(be(8)?)),
            0xd0 => Int::I(sign(1)?),
            0xd1 => Int::I(sign(2)?),
            0xd2 => Int::I(sign(4)?),
            0xd3 => Int::I(sign(8)?),
            _ => return None,
        })
    }
}

/// A MessagePack integer.
enum Int {
    U(u64),
    I(i64),
}

macro_rules! int_fast_path {
    ($($method:ident),*) => {$(
        fn $method<Vis: serde::de::Visitor<'de>>(self, visitor: Vis) -> Result<Vis::Value, Self::Error> {
            match self.int() {
                Some(Int::U(n)) => visitor.visit_u64(n),
                Some(Int::I(n)) => visitor.visit_i64(n),
                None => {
                    let mut de = rmp_serde::Deserializer::from_read_ref(self.0);
                    serde::Deserializer::$method(&mut de, visitor)
                }
            }
        }
    )*};
}

macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*)),* $(,)?) => {$(
        fn $method<Vis: serde::de::Visitor<'de>>(self, $($arg: $ty,)* visitor: Vis) -> Result<Vis::Value, Self::Error> {
            let mut de = rmp_serde::Deserializer::from_read_ref(self.0);
            serde::Deserializer::$method(&mut de, $($arg,)* visitor)
        }
    )*};
}

impl<'de> serde::Deserializer<'de> for ValueDe<'de> {
    type Error = rmp_serde::decode::Error;

    fn is_human_readable(&self) -> bool {
        false
    }

    forward!(deserialize_any());

    int_fast_path!(
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64
    );

    forward!(
        deserialize_bool(),
        deserialize_i128(),
        deserialize_u128(),
        deserialize_f32(),
        deserialize_f64(),
        deserialize_char(),
        deserialize_str(),
        deserialize_string(),
        deserialize_bytes(),
        deserialize_byte_buf(),
        deserialize_option(),
        deserialize_unit(),
        deserialize_unit_struct(name: &'static str),
        deserialize_newtype_struct(name: &'static str),
        deserialize_seq(),
        deserialize_tuple(len: usize),
        deserialize_tuple_struct(name: &'static str, len: usize),
        deserialize_map(),
        deserialize_struct(name: &'static str, fields: &'static [&'static str]),
        deserialize_enum(name: &'static str, variants: &'static [&'static str]),
        deserialize_identifier(),
        deserialize_ignored_any(),
    );
}

/// A record read from a group's bytes: key, encoded value, and where the
/// next record starts.
type Record<'a> = (&'a [u8], &'a [u8], usize);

/// The record starting at `bytes[at..]`; `None` if the bytes end first.
#[inline(always)]
fn record(g: u32, bytes: &[u8], at: usize) -> Result<Option<Record<'_>>, Error> {
    let Some((key_len, at)) = get_len(g, bytes, at, "key", MAX_KEY)? else {
        return Ok(None);
    };
    let Some(key_end) = at.checked_add(key_len).filter(|&e| e <= bytes.len()) else {
        return Ok(None);
    };
    let Some((value_len, value_at)) = get_len(g, bytes, key_end, "value", MAX_VALUE)? else {
        return Ok(None);
    };
    let Some(end) = value_at.checked_add(value_len).filter(|&e| e <= bytes.len()) else {
        return Ok(None);
    };
    Ok(Some((&bytes[at..key_end], &bytes[value_at..end], end)))
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// An unsigned LEB128 length at `bytes[at..]` and where it ends; `None` if
/// the bytes end inside it. Every `max` is at least 127: a length of one
/// byte, by far the commonest, needs no further check.
#[inline(always)]
fn get_len(g: u32, bytes: &[u8], at: usize, what: &str, max: usize) -> Result<Option<(usize, usize)>, Error> {
    match bytes.get(at) {
        Some(&byte) if byte < 0x80 => Ok(Some((usize::from(byte), at + 1))),
        _ => get_long_len(g, bytes, at, what, max),
    }
}

/// [`get_len`] of a length of more than one byte.
#[inline(never)]
fn get_long_len(
    g: u32,
    bytes: &[u8],
    mut at: usize,
    what: &str,
    max: usize,
) -> Result<Option<(usize, usize)>, Error> {
    let mut n: u64 = 0;
    for shift in (0..).step_by(7) {
        let Some(&byte) = bytes.get(at) else {
            return Ok(None);
        };
        at += 1;
        if shift > 28 {
            return Err(Error(format!(
                "keyed state of key group {g}: a {what} length runs past 5 bytes"
            )));
        }
        n |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    if n > max as u64 {
        return Err(Error(format!(
            "keyed state of key group {g}: a {what} of {n} bytes, more than the {max} allowed"
        )));
    }
    Ok(Some((n as usize, at)))
}

/// A key for a message: at most 40 bytes of it, escaped.
fn excerpt(key: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&key[..key.len().min(40)]).into_owned();
    if key.len() > 40 {
        format!("{shown:?}… ({} bytes)", key.len())
    } else {
        format!("{shown:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Piece;

    fn state(groups: u32, keys: impl IntoIterator<Item = u64>) -> KeyedState<u64> {
        let mut s = KeyedState::with_key_groups(groups);
        for i in keys {
            *s.get_or_insert_with(format!("key-{i}").as_bytes(), || 0) += i;
        }
        s
    }

    fn pieces(s: &KeyedState<u64>) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let mut w = StateWriter::memory(&mut pieces);
        s.snapshot(&mut w).unwrap();
        w.finish().unwrap();
        pieces
    }

    fn contents(s: &KeyedState<u64>) -> Vec<(Vec<u8>, u64)> {
        s.sorted().into_iter().map(|(k, v)| (k.to_vec(), *v)).collect()
    }

    #[test]
    fn get_update_remove() {
        let mut s: KeyedState<u64> = KeyedState::with_key_groups(128);
        assert_eq!(s.get(b"a"), None);
        assert_eq!(s.insert(b"a", 1), None);
        assert_eq!(s.insert(b"a", 2), Some(1));
        *s.get_mut(b"a").unwrap() += 1;
        assert_eq!(s.get(b"a"), Some(&3));
        s.update(b"b", |v| Some(v.unwrap_or(10) + 1));
        assert_eq!(s.get(b"b"), Some(&11));
        s.update(b"b", |v| v.filter(|&n| n > 100));
        assert_eq!(s.get(b"b"), None);
        s.update(b"", |_| Some(7));
        assert_eq!(s.get(b""), Some(&7));
        assert_eq!(s.remove(b"a"), Some(3));
        assert_eq!(s.remove(b"a"), None);
        assert_eq!(s.len(), 1);
        s.retain(|_, _| false);
        assert!(s.is_empty());
    }

    /// Keys short enough to sit in the slot and longer ones (on the heap),
    /// the empty key among them, are told apart and kept alike; a batch
    /// update gives each key the value it would get one key at a time.
    #[test]
    fn inline_and_heap_keys_and_batch_updates() {
        let keys: Vec<Vec<u8>> = (0..4000u32)
            .map(|i| match i % 4 {
                0 => Vec::new(),
                1 => vec![b'x'; (i as usize / 4) % (INLINE + 1)],
                2 => vec![b'x'; INLINE + 1 + (i as usize / 4) % 40],
                _ => format!("key-{}", i % 997).into_bytes(),
            })
            .collect();
        let mut each: KeyedState<u64> = KeyedState::with_key_groups(8);
        let mut want = Vec::new();
        for k in &keys {
            let n = each.get_or_insert_with(k, || 0);
            *n += 1;
            want.push((k.clone(), *n));
        }
        let mut batch: KeyedState<u64> = KeyedState::with_key_groups(8);
        let mut got = Vec::new();
        for chunk in keys.chunks(333) {
            batch.get_or_insert_each(
                chunk.iter().map(Vec::as_slice),
                || 0,
                |i, k, n| {
                    *n += 1;
                    assert_eq!(k, &chunk[i][..]);
                    got.push((k.to_vec(), *n));
                },
            );
        }
        assert_eq!(got, want);
        assert_eq!(contents(&batch), contents(&each));
        assert_eq!(pieces(&batch), pieces(&each));
        assert_eq!(batch.get(&[b'x'; INLINE]), each.get(&[b'x'; INLINE]));
        assert_eq!(batch.get(&[b'x'; INLINE + 1]), each.get(&[b'x'; INLINE + 1]));
        assert!(each.get(b"").is_some_and(|&n| n > 1000));
        assert_eq!(batch.remove(b""), each.get(b"").copied());
        assert_eq!(batch.get(b""), None);
    }

    /// Keys only go into the pieces of their own group; a group's pieces
    /// start with the format byte; the bytes depend on the contents only,
    /// not on the order the keys arrived in.
    #[test]
    fn snapshots_are_per_key_group_and_canonical() {
        let forward = state(16, 0..5000);
        let backward = state(16, (0..5000).rev());
        let (a, b) = (pieces(&forward), pieces(&backward));
        assert_eq!(a, b);
        assert!(a.iter().all(|(g, p)| g.is_some() && p.len() <= PIECE));
        let groups: Vec<u32> = a.iter().map(|(g, _)| g.unwrap()).collect();
        assert!(groups.windows(2).all(|w| w[0] <= w[1]), "groups in order");
        assert_eq!(groups.iter().collect::<std::collections::BTreeSet<_>>().len(), 16);
        for g in 0..16 {
            let mut one = KeyedState::<u64>::with_key_groups(16);
            let mine: Vec<Piece> = a.iter().filter(|(x, _)| *x == Some(g)).cloned().collect();
            assert_eq!(mine[0].1[0], KEYED_FORMAT);
            one.restore(&mut StateReader::memory(mine)).unwrap();
            assert!(one.sorted().iter().all(|(k, _)| crate::key_group(k, 16) == g));
        }
    }

    /// Restoring the groups of several snapshotted tasks into one, or one
    /// task's into several, loses and duplicates nothing, whatever the
    /// pieces were cut into.
    #[test]
    fn restores_merge_and_split_key_groups() {
        let whole = state(128, 0..3000);
        let all = pieces(&whole);
        // Split: each half of the groups into its own state.
        let mut halves = [
            KeyedState::<u64>::with_key_groups(128),
            KeyedState::<u64>::with_key_groups(128),
        ];
        for (i, half) in halves.iter_mut().enumerate() {
            let range = (i as u32 * 64)..(i as u32 * 64 + 64);
            let mine = all
                .iter()
                .filter(|(g, _)| range.contains(&g.unwrap()))
                .cloned()
                .collect();
            assert!(half.restore(&mut StateReader::memory(mine)).unwrap().is_empty());
        }
        assert_eq!(halves[0].len() + halves[1].len(), 3000);
        // Merge the halves' snapshots again, cut into 7-byte pieces.
        let mut merged = KeyedState::<u64>::with_key_groups(128);
        let cut: Vec<Piece> = halves
            .iter()
            .flat_map(pieces)
            .flat_map(|(g, p)| p.chunks(7).map(|c| (g, c.to_vec())).collect::<Vec<_>>())
            .collect();
        merged.restore(&mut StateReader::memory(cut)).unwrap();
        assert_eq!(contents(&merged), contents(&whole));
        assert_eq!(pieces(&merged), all);
    }

    /// A restore into a state that already holds keys (the second of two
    /// snapshotted tasks merged into one) grows a table that is not empty:
    /// every key, old and new, is found by lookup afterwards, so whatever
    /// the restore sizes or inserts with places keys as lookups do.
    #[test]
    fn a_restore_into_a_state_with_keys_finds_every_key() {
        let whole = state(128, 0..20_000);
        let all = pieces(&whole);
        let mut s = KeyedState::<u64>::with_key_groups(128);
        for range in [0..64u32, 64..128] {
            let mine = all
                .iter()
                .filter(|(g, _)| range.contains(&g.unwrap()))
                .cloned()
                .collect();
            s.restore(&mut StateReader::memory(mine)).unwrap();
        }
        for i in 0..20_000u64 {
            let key = format!("key-{i}");
            assert_eq!(s.get(key.as_bytes()), Some(&i), "{key}");
        }
        for i in 20_000..40_000u64 {
            *s.get_or_insert_with(format!("key-{i}").as_bytes(), || 0) += i;
        }
        assert_eq!(s.len(), 40_000);
        assert_eq!(s.get(b"key-7"), Some(&7));
        assert_eq!(contents(&s), contents(&state(128, 0..40_000)));
    }

    #[test]
    fn unkeyed_pieces_come_back_to_the_caller() {
        let mut s = KeyedState::<u64>::with_key_groups(4);
        let mut p = pieces(&state(4, 0..10));
        p.insert(0, (None, b"he".to_vec()));
        p.push((None, b"ad".to_vec()));
        assert_eq!(s.restore(&mut StateReader::memory(p)).unwrap(), b"head");
        assert_eq!(s.len(), 10);
    }

    #[test]
    fn damaged_state_is_refused_with_the_reason() {
        let err = |p: Vec<Piece>, groups: u32| {
            KeyedState::<u64>::with_key_groups(groups)
                .restore(&mut StateReader::memory(p))
                .unwrap_err()
                .message()
                .to_string()
        };
        let good = pieces(&state(4, 0..50));
        assert!(
            err(good.clone(), 8).contains("belongs to key group"),
            "other key groups"
        );
        assert!(err(vec![(Some(9), vec![1])], 4).contains("key group 9, but the operator has 4"));
        assert!(err(vec![(Some(0), vec![7])], 4).contains("has format 7"));
        let mut truncated = good.clone();
        let last = truncated.last_mut().unwrap();
        last.1.pop();
        assert!(err(truncated, 4).contains("ends inside a record"));
        let (g, first) = good[0].clone();
        let (count, records) = get_len(0, &first, 1, "key count", usize::MAX).unwrap().unwrap();
        let twice = vec![(g, first.clone()), (g, first[records..].to_vec())];
        assert!(err(twice, 4).contains("twice"));
        // The head's key count must match the records.
        let mut miscounted = vec![KEYED_FORMAT];
        put_len(&mut miscounted, count + 1);
        miscounted.extend_from_slice(&first[records..]);
        let msg = err(vec![(g, miscounted)], 4);
        assert!(
            msg.contains(&format!("holds {count} keys, but its head says {}", count + 1)),
            "{msg}"
        );
        // A count no bytes could hold sizes nothing.
        let msg = err(
            vec![(Some(0), vec![KEYED_FORMAT, 0xff, 0xff, 0xff, 0xff, 0x0f])],
            4,
        );
        assert!(msg.contains("a key count of 4294967295 in 6 bytes"), "{msg}");
        let long = vec![(Some(0), vec![1, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01])];
        assert!(err(long, 4).contains("length runs past 5 bytes"));
        let huge = vec![(Some(0), vec![1, 0x80, 0x80, 0x80, 0x80, 0x01])];
        assert!(err(huge, 4).contains("more than the"));
        // A key in its right group but a value that is not a u64.
        let key = (0u32..)
            .map(|i| format!("k{i}"))
            .find(|k| crate::key_group(k.as_bytes(), 4) == 0)
            .unwrap();
        let mut bad = vec![1, key.len() as u8];
        bad.extend_from_slice(key.as_bytes());
        bad.extend_from_slice(&[1, 0xc0]); // nil
        let msg = err(vec![(Some(0), bad)], 4);
        assert!(msg.contains("does not decode"), "{msg}");
    }

    /// Format 1 (no key count), as SDKs before format 2 wrote it, is
    /// still read, whatever the pieces were cut into.
    #[test]
    fn format_1_is_still_read() {
        let whole = state(8, 0..400);
        let v1: Vec<Piece> = pieces(&whole)
            .into_iter()
            .map(|(g, p)| {
                let (_, records) = get_len(0, &p, 1, "key count", usize::MAX).unwrap().unwrap();
                let mut old = vec![KEYED_FORMAT_1];
                old.extend_from_slice(&p[records..]);
                (g, old)
            })
            .flat_map(|(g, p)| p.chunks(5).map(|c| (g, c.to_vec())).collect::<Vec<_>>())
            .collect();
        let mut back = KeyedState::<u64>::with_key_groups(8);
        back.restore(&mut StateReader::memory(v1)).unwrap();
        assert_eq!(contents(&back), contents(&whole));
    }

    /// Integers are decoded without the generic deserializer, in every
    /// MessagePack width and sign, and into narrower types with range
    /// checks; other values still go through `rmp_serde`.
    #[test]
    fn values_decode_by_the_fast_path_and_the_generic_one() {
        fn round<V: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: V) {
            let mut bytes = Vec::new();
            rmp_serde::encode::write_named(&mut bytes, &v).unwrap();
            assert_eq!(decode_value::<V>(&bytes).unwrap(), v);
        }
        for n in [
            0u64,
            1,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            round(n);
        }
        for n in [
            0i64,
            -1,
            -32,
            -33,
            -128,
            -129,
            -32_768,
            -32_769,
            i64::MIN,
            i64::MAX,
        ] {
            round(n);
        }
        round(200u8);
        round(-5i32);
        round((3u64, -4i64));
        round(Some(7u64));
        round("text".to_string());
        let mut big = Vec::new();
        rmp_serde::encode::write_named(&mut big, &300u64).unwrap();
        assert!(decode_value::<u8>(&big).is_err(), "300 is not a u8");
        assert!(decode_value::<u64>(&[0xcd, 1]).is_err(), "truncated");
        assert!(decode_value::<u64>(&[0xc0]).is_err(), "nil");
    }

    #[test]
    fn lengths_round_trip() {
        for n in [0usize, 1, 127, 128, 300, 16_383, 16_384, MAX_KEY] {
            let mut b = Vec::new();
            put_len(&mut b, n);
            assert_eq!(get_len(0, &b, 0, "key", MAX_KEY).unwrap(), Some((n, b.len())));
            assert_eq!(get_len(0, &b[..b.len() - 1], 0, "key", MAX_KEY).unwrap(), None);
        }
    }

    /// Values keep their field names, so a later value type with a new
    /// `#[serde(default)]` field reads an older snapshot.
    #[test]
    fn struct_values_evolve_through_serde_defaults() {
        #[derive(Serialize, serde::Deserialize)]
        struct V1 {
            sum: i64,
        }
        #[derive(serde::Deserialize, PartialEq, Debug)]
        struct V2 {
            sum: i64,
            #[serde(default)]
            count: u64,
        }
        let mut old = KeyedState::with_key_groups(8);
        old.insert(b"x", V1 { sum: -5 });
        let mut p = Vec::new();
        let mut w = StateWriter::memory(&mut p);
        old.snapshot(&mut w).unwrap();
        let mut new = KeyedState::<V2>::with_key_groups(8);
        new.restore(&mut StateReader::memory(p)).unwrap();
        assert_eq!(new.get(b"x"), Some(&V2 { sum: -5, count: 0 }));
    }
}
