//! Index files (blob hash → pack, offset, length) and the merged in-memory
//! index a tenant's readers and writers share (docs/STORAGE.md, "Index
//! files").
//!
//! ```text
//! offset 0   4       magic "MIDX"
//! offset 4   1       index format version (1)
//! offset 5   3       reserved, 0
//! offset 8   4       P: packs (u32 LE)
//! offset 12  4       E: entries (u32 LE)
//! offset 16  P × 40  pack name (32), pack length (u64 LE)
//! ...        E × 52  blob hash (32), pack ordinal (u32), offset (u64),
//!                    stored length (u32), plain length (u32)
//! ```
//!
//! An index file is named by the blake3 of its bytes.

use std::collections::{HashMap, HashSet};

use crate::blob::{BlobHash, MAX_CHUNK};

// The record geometry of packs, here rather than in `pack` (which reads
// and writes index files as pack trailers), so the two modules do not
// import each other.

/// Length of the pack header.
pub(crate) const PACK_HEADER_LEN: u64 = 8;
/// Length of one record header.
pub(crate) const RECORD_HEADER_LEN: usize = 44;
/// Largest stored payload accepted: a chunk's bound plus zstd's worst-case
/// growth, with room to spare.
pub(crate) const MAX_STORED: u64 = MAX_CHUNK as u64 + 256 * 1024;

/// Where one blob is in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) hash: BlobHash,
    /// Offset of the record header.
    pub(crate) offset: u64,
    pub(crate) stored: u32,
    pub(crate) plain: u32,
}

impl Entry {
    /// Bytes the record occupies (what a quota counts).
    pub(crate) fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.stored)
    }
}

/// Magic bytes at the start of every index file.
pub(crate) const INDEX_MAGIC: &[u8; 4] = b"MIDX";
/// Version of the index layout written by this build.
pub(crate) const INDEX_VERSION: u8 = 1;
const HEADER_LEN: u64 = 16;
const PACK_LEN: u64 = 40;
const ENTRY_LEN: u64 = 52;
/// Most packs one index may list.
pub(crate) const MAX_PACKS: u32 = 1 << 20;
/// Most entries one index may hold (4 TiB of 256 KiB chunks).
pub(crate) const MAX_ENTRIES: u32 = 1 << 24;
/// Largest index file a reader loads: what the maxima above take.
pub(crate) const MAX_INDEX_LEN: u64 =
    HEADER_LEN + PACK_LEN * MAX_PACKS as u64 + ENTRY_LEN * MAX_ENTRIES as u64;

/// The packs one index describes, with their blobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct IndexFile {
    /// Pack name, pack length, entries of that pack.
    pub(crate) packs: Vec<(BlobHash, u64, Vec<Entry>)>,
}

impl IndexFile {
    /// The file's bytes and its name.
    pub(crate) fn encode(&self) -> (Vec<u8>, BlobHash) {
        let entries: usize = self.packs.iter().map(|p| p.2.len()).sum();
        let mut out = Vec::with_capacity(16 + self.packs.len() * 40 + entries * 52);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&[INDEX_VERSION, 0, 0, 0]);
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        out.extend_from_slice(&(entries as u32).to_le_bytes());
        for (name, len, _) in &self.packs {
            out.extend_from_slice(&name.0);
            out.extend_from_slice(&len.to_le_bytes());
        }
        for (ordinal, (_, _, list)) in self.packs.iter().enumerate() {
            for e in list {
                out.extend_from_slice(&e.hash.0);
                out.extend_from_slice(&(ordinal as u32).to_le_bytes());
                out.extend_from_slice(&e.offset.to_le_bytes());
                out.extend_from_slice(&e.stored.to_le_bytes());
                out.extend_from_slice(&e.plain.to_le_bytes());
            }
        }
        let name = BlobHash::of(&out);
        (out, name)
    }

    /// Splits into index files each within `max_packs` and `max_entries`
    /// (what a reader accepts), packs kept whole and in order. A pack with
    /// more entries than one file may hold is left out (logged): its blobs
    /// stay readable to GC and `fsck`, which walk unindexed packs.
    pub(crate) fn split(self, max_packs: usize, max_entries: usize) -> Vec<IndexFile> {
        let mut out: Vec<IndexFile> = Vec::new();
        let mut current = IndexFile::default();
        let mut entries = 0usize;
        for pack in self.packs {
            if pack.2.len() > max_entries {
                tracing::warn!(pack = %pack.0, entries = pack.2.len(), "pack has too many blobs for one index");
                continue;
            }
            if current.packs.len() == max_packs || entries + pack.2.len() > max_entries {
                out.push(std::mem::take(&mut current));
                entries = 0;
            }
            entries += pack.2.len();
            current.packs.push(pack);
        }
        if !current.packs.is_empty() {
            out.push(current);
        }
        out
    }

    /// Parses an index file named `name`, checking every count, length and
    /// offset before using it.
    ///
    /// # Errors
    /// What is wrong, in one line.
    pub(crate) fn parse(bytes: &[u8], name: &BlobHash) -> Result<IndexFile, String> {
        if bytes.len() < HEADER_LEN as usize || &bytes[..4] != INDEX_MAGIC {
            return Err("does not start with the index magic MIDX".into());
        }
        if bytes[4] != INDEX_VERSION {
            return Err(format!(
                "index format version {} (this build reads {INDEX_VERSION})",
                bytes[4]
            ));
        }
        if bytes[5..8] != [0, 0, 0] {
            return Err("reserved bytes of the header are not zero".into());
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let (p, e) = (u32_at(8), u32_at(12));
        if p > MAX_PACKS || e > MAX_ENTRIES {
            return Err(format!(
                "states {p} packs and {e} entries, more than an index may hold"
            ));
        }
        let expected = HEADER_LEN + PACK_LEN * u64::from(p) + ENTRY_LEN * u64::from(e);
        if bytes.len() as u64 != expected {
            return Err(format!(
                "is {} bytes, but {p} packs and {e} entries take {expected}",
                bytes.len()
            ));
        }
        if BlobHash::of(bytes) != *name {
            return Err("content does not hash to its name".into());
        }
        let mut packs = Vec::with_capacity(p as usize);
        let mut at = HEADER_LEN as usize;
        for _ in 0..p {
            let mut pn = [0u8; 32];
            pn.copy_from_slice(&bytes[at..at + 32]);
            packs.push((BlobHash(pn), u64_at(at + 32), Vec::new()));
            at += PACK_LEN as usize;
        }
        for i in 0..e {
            let mut h = [0u8; 32];
            h.copy_from_slice(&bytes[at..at + 32]);
            let ordinal = u32_at(at + 32);
            let entry = Entry {
                hash: BlobHash(h),
                offset: u64_at(at + 36),
                stored: u32_at(at + 44),
                plain: u32_at(at + 48),
            };
            at += ENTRY_LEN as usize;
            let Some((_, pack_len, list)) = packs.get_mut(ordinal as usize) else {
                return Err(format!("entry {i} names pack {ordinal} of {p}"));
            };
            let end = entry
                .offset
                .checked_add(RECORD_HEADER_LEN as u64 + u64::from(entry.stored));
            if entry.offset < PACK_HEADER_LEN
                || end.is_none_or(|end| end > *pack_len)
                || u64::from(entry.plain) > MAX_CHUNK as u64
                || u64::from(entry.stored) > MAX_STORED
            {
                return Err(format!("entry {i} (blob {}) lies outside its pack", entry.hash));
            }
            list.push(entry);
        }
        Ok(IndexFile { packs })
    }
}

/// Where a blob is: the pack (by ordinal in [`MergedIndex::packs`]) and
/// the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    pub(crate) pack: u32,
    pub(crate) entry: Entry,
}

/// Every index file of a tenant merged: what readers look blobs up in and
/// writers dedupe against.
#[derive(Debug, Default)]
pub(crate) struct MergedIndex {
    /// Names of the index files merged in.
    pub(crate) files: HashSet<BlobHash>,
    /// Index files that could not be used, with the reason (fsck reports them).
    pub(crate) damaged: Vec<(String, String)>,
    /// Packs merged from their own trailers (object storage), not from an
    /// index file.
    pub(crate) trailers: HashSet<BlobHash>,
    /// Packs a GC on object storage is about to delete: still read, never
    /// deduplicated against (docs/STORAGE.md, "Garbage collection on
    /// object storage"). Set before anything is merged.
    pub(crate) condemned: HashSet<BlobHash>,
    /// Packs found without an index whose trailer could not be used
    /// (format 1, or damaged): not read again at every refresh.
    pub(crate) no_trailer: HashSet<BlobHash>,
    /// When the listing this index reflects started (object storage): a
    /// writer may rely on it for dedup only for half a GC grace period.
    pub(crate) view: Option<std::time::Instant>,
    /// Pack names and lengths, by ordinal.
    pub(crate) packs: Vec<(BlobHash, u64)>,
    pack_ordinals: HashMap<BlobHash, u32>,
    /// One location per blob (the first found, preferring packs not
    /// condemned; any copy serves).
    pub(crate) blobs: HashMap<BlobHash, Location>,
}

impl MergedIndex {
    /// Adds one index file's packs and entries.
    pub(crate) fn merge(&mut self, name: BlobHash, file: &IndexFile) {
        if !self.files.insert(name) {
            return;
        }
        self.merge_packs(file);
    }

    /// Adds one pack described by its own trailer.
    pub(crate) fn merge_trailer(&mut self, pack: BlobHash, len: u64, entries: Vec<Entry>) {
        if !self.trailers.insert(pack) {
            return;
        }
        self.merge_packs(&IndexFile {
            packs: vec![(pack, len, entries)],
        });
    }

    fn merge_packs(&mut self, file: &IndexFile) {
        for (pack, len, entries) in &file.packs {
            let ordinal = *self.pack_ordinals.entry(*pack).or_insert_with(|| {
                self.packs.push((*pack, *len));
                (self.packs.len() - 1) as u32
            });
            let live = !self.condemned.contains(pack);
            for e in entries {
                let at = Location {
                    pack: ordinal,
                    entry: *e,
                };
                match self.blobs.entry(e.hash) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(at);
                    }
                    std::collections::hash_map::Entry::Occupied(mut o) => {
                        let old = self.packs[o.get().pack as usize].0;
                        if live && self.condemned.contains(&old) {
                            o.insert(at);
                        }
                    }
                }
            }
        }
    }

    /// Where a blob is, in any pack (for reading).
    pub(crate) fn get(&self, hash: &BlobHash) -> Option<(BlobHash, Entry)> {
        let loc = self.blobs.get(hash)?;
        Some((self.packs[loc.pack as usize].0, loc.entry))
    }

    /// Where a blob is, in a pack that is not condemned (for a writer to
    /// reference without storing it again).
    pub(crate) fn get_live(&self, hash: &BlobHash) -> Option<(BlobHash, Entry)> {
        self.get(hash).filter(|(pack, _)| !self.condemned.contains(pack))
    }
}

/// Path of a pack relative to the tenant directory.
pub(crate) fn pack_path(name: &BlobHash) -> String {
    format!("packs/{name}")
}

/// Path of an index file relative to the tenant directory.
pub(crate) fn index_path(name: &BlobHash) -> String {
    format!("index/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IndexFile {
        let e = |i: u8, offset| Entry {
            hash: BlobHash([i; 32]),
            offset,
            stored: 10,
            plain: 10,
        };
        IndexFile {
            packs: vec![
                (BlobHash([1; 32]), 8 + 2 * 54, vec![e(1, 8), e(2, 62)]),
                (BlobHash([2; 32]), 8 + 54, vec![e(3, 8)]),
            ],
        }
    }

    #[test]
    fn round_trip_and_merge() {
        let (bytes, name) = sample().encode();
        let parsed = IndexFile::parse(&bytes, &name).unwrap();
        assert_eq!(parsed, sample());
        let mut m = MergedIndex::default();
        m.merge(name, &parsed);
        m.merge(name, &parsed);
        assert_eq!(m.blobs.len(), 3);
        assert_eq!(m.get(&BlobHash([3; 32])).unwrap().0, BlobHash([2; 32]));
    }

    #[test]
    fn split_keeps_every_file_within_the_maxima() {
        let files = sample().split(1, 10);
        assert_eq!(files.len(), 2);
        assert!(files.iter().all(|f| f.packs.len() == 1));
        let files = sample().split(10, 2);
        assert_eq!(
            files.iter().map(|f| f.packs.len()).collect::<Vec<_>>(),
            vec![1, 1]
        );
        let files = sample().split(10, 1);
        assert_eq!(
            files.len(),
            1,
            "the pack of 2 entries cannot be indexed: {files:?}"
        );
        assert_eq!(sample().split(10, 10), vec![sample()]);
    }

    #[test]
    fn hostile_indexes_are_refused_before_allocating() {
        let (bytes, name) = sample().encode();
        // Counts that do not fit the file.
        let mut big = bytes.clone();
        big[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            IndexFile::parse(&big, &BlobHash::of(&big))
                .unwrap_err()
                .contains("more than")
        );
        let mut off = bytes.clone();
        off[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert!(
            IndexFile::parse(&off, &BlobHash::of(&off))
                .unwrap_err()
                .contains("bytes")
        );
        // An entry past its pack's end, and a wrong name.
        let mut past = bytes.clone();
        let first_entry = 16 + 2 * 40;
        past[first_entry + 36..first_entry + 44].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            IndexFile::parse(&past, &BlobHash::of(&past))
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            IndexFile::parse(&bytes, &BlobHash([0; 32]))
                .unwrap_err()
                .contains("hash")
        );
        assert!(IndexFile::parse(b"MIDX", &name).is_err());
    }
}
