//! Pack files: many blobs in one immutable file, each blob with its own
//! header, so a pack verifies and indexes from its own bytes
//! (docs/STORAGE.md, "Pack files").
//!
//! ```text
//! offset 0  4 bytes  magic "MPAK"
//! offset 4  1 byte   pack format version (1)
//! offset 5  3 bytes  reserved, 0
//! offset 8  ...      records: hash (32), codec (1), reserved (3),
//!                    plain length (u32 LE), stored length (u32 LE), payload
//! ```
//!
//! Version 2 (written on object storage) appends a *trailer*: an index
//! file describing this pack alone, then a 60-byte footer (trailer length
//! u64 LE, trailer name (32), nonce (16), magic "MPTX"), so that a pack
//! needs no index object of its own: one PUT makes the blobs and their
//! index visible. The nonce is hashed into the name after the record
//! headers: a pack written again with the same blobs gets a new name, so
//! a GC deleting the old one (condemned before) never deletes the new.
//!
//! A pack's name is the blake3 of its header and its record headers: it
//! covers the content through the blob hashes without a second pass over
//! the payload bytes.

use std::io;

use crate::backend::{Backend, Staged, StagedAppend};
use crate::blob::{self, BlobHash, BlobProblem, MAX_CHUNK};
pub(crate) use crate::index::{Entry, MAX_STORED, PACK_HEADER_LEN, RECORD_HEADER_LEN};

/// Magic bytes at the start of every pack.
pub(crate) const PACK_MAGIC: &[u8; 4] = b"MPAK";
/// Version of the pack layout written on a local directory.
pub(crate) const PACK_VERSION: u8 = 1;
/// Version of the pack layout with a trailer (written on object storage).
pub(crate) const PACK_VERSION_TRAILER: u8 = 2;
/// Length of a version-2 pack's footer.
pub(crate) const FOOTER_LEN: u64 = 60;
/// Magic at the very end of a version-2 pack.
const FOOTER_MAGIC: &[u8; 4] = b"MPTX";

/// The 8-byte pack header of a pack of format `version`.
pub(crate) fn pack_header(version: u8) -> [u8; PACK_HEADER_LEN as usize] {
    let mut h = [0u8; PACK_HEADER_LEN as usize];
    h[..4].copy_from_slice(PACK_MAGIC);
    h[4] = version;
    h
}

/// Checks a pack header; returns the pack format version.
pub(crate) fn check_pack_header(h: &[u8]) -> Result<u8, String> {
    if h.len() < PACK_HEADER_LEN as usize || &h[..4] != PACK_MAGIC {
        return Err("does not start with the pack magic MPAK".into());
    }
    if h[4] != PACK_VERSION && h[4] != PACK_VERSION_TRAILER {
        return Err(format!(
            "pack format version {} (this build reads {PACK_VERSION} and {PACK_VERSION_TRAILER})",
            h[4]
        ));
    }
    if h[5..8] != [0, 0, 0] {
        return Err("reserved bytes of the pack header are not zero".into());
    }
    Ok(h[4])
}

/// Reads and checks the trailer of the version-2 pack `name` at `key`
/// (`len` bytes): the blobs it says the pack holds, or what is wrong. Two
/// ranged reads; every length is checked before it is used.
///
/// # Errors
/// I/O errors reading (damage is the inner `Err`).
pub(crate) fn read_trailer(
    backend: &dyn Backend,
    key: &str,
    name: &BlobHash,
    len: u64,
) -> io::Result<Result<Vec<Entry>, String>> {
    if len < PACK_HEADER_LEN + FOOTER_LEN {
        return Ok(Err(format!(
            "file of {len} bytes is too short for a pack with a trailer"
        )));
    }
    let mut head = [0u8; PACK_HEADER_LEN as usize];
    backend.read_at(key, 0, &mut head)?;
    match check_pack_header(&head) {
        Ok(PACK_VERSION_TRAILER) => {}
        Ok(v) => return Ok(Err(format!("pack format version {v} has no trailer"))),
        Err(p) => return Ok(Err(p)),
    }
    let mut foot = [0u8; FOOTER_LEN as usize];
    backend.read_at(key, len - FOOTER_LEN, &mut foot)?;
    let (tlen, tname, _) = match parse_footer(&foot, len) {
        Ok(f) => f,
        Err(p) => return Ok(Err(p)),
    };
    let mut trailer = vec![0u8; tlen as usize];
    backend.read_at(key, len - FOOTER_LEN - tlen, &mut trailer)?;
    Ok(check_trailer(&trailer, &tname, name, len))
}

/// The trailer's length and name and the pack's nonce from a footer,
/// checked against the file length.
fn parse_footer(foot: &[u8; FOOTER_LEN as usize], len: u64) -> Result<(u64, BlobHash, [u8; 16]), String> {
    if &foot[56..60] != FOOTER_MAGIC {
        return Err("does not end with the trailer magic MPTX".into());
    }
    let tlen = u64::from_le_bytes(foot[..8].try_into().expect("8 bytes"));
    if tlen > len - PACK_HEADER_LEN - FOOTER_LEN || tlen > crate::index::MAX_INDEX_LEN {
        return Err(format!("trailer of {tlen} bytes does not fit the file"));
    }
    let mut tname = [0u8; 32];
    tname.copy_from_slice(&foot[8..40]);
    let mut nonce = [0u8; 16];
    nonce.copy_from_slice(&foot[40..56]);
    Ok((tlen, BlobHash(tname), nonce))
}

/// Parses a trailer: an index of exactly this pack, at this length.
fn check_trailer(bytes: &[u8], tname: &BlobHash, name: &BlobHash, len: u64) -> Result<Vec<Entry>, String> {
    let file = crate::index::IndexFile::parse(bytes, tname).map_err(|p| format!("trailer {p}"))?;
    let [(pack, pack_len, entries)] = <[_; 1]>::try_from(file.packs)
        .map_err(|p: Vec<_>| format!("trailer describes {} packs, not one", p.len()))?;
    if pack != *name || pack_len != len {
        return Err("trailer describes another pack".into());
    }
    Ok(entries)
}

/// One blob record's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) hash: BlobHash,
    pub(crate) codec: u8,
    pub(crate) plain: u32,
    pub(crate) stored: u32,
}

impl Record {
    pub(crate) fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[..32].copy_from_slice(&self.hash.0);
        b[32] = self.codec;
        b[36..40].copy_from_slice(&self.plain.to_le_bytes());
        b[40..44].copy_from_slice(&self.stored.to_le_bytes());
        b
    }

    /// Parses and bounds-checks a record header (not yet against the file).
    pub(crate) fn parse(b: &[u8; RECORD_HEADER_LEN]) -> Result<Record, String> {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[..32]);
        let r = Record {
            hash: BlobHash(hash),
            codec: b[32],
            plain: u32::from_le_bytes(b[36..40].try_into().expect("4 bytes")),
            stored: u32::from_le_bytes(b[40..44].try_into().expect("4 bytes")),
        };
        if b[33..36] != [0, 0, 0] {
            return Err("reserved bytes of a record header are not zero".into());
        }
        if !blob::is_known_codec(r.codec) {
            return Err(format!("record of blob {} has unknown codec {}", r.hash, r.codec));
        }
        if u64::from(r.plain) > MAX_CHUNK as u64 || u64::from(r.stored) > MAX_STORED {
            return Err(format!("record of blob {} states an implausible length", r.hash));
        }
        if blob::is_raw_codec(r.codec) && r.plain != r.stored {
            return Err(format!(
                "raw record of blob {} states {} plain and {} stored bytes",
                r.hash, r.plain, r.stored
            ));
        }
        Ok(r)
    }

    /// Bytes the record occupies in its pack (header and payload).
    pub(crate) fn len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.stored)
    }
}

/// What walking a pack's records found.
#[derive(Debug)]
pub(crate) struct Walk {
    /// Records that are intact as headers (payloads not yet verified).
    pub(crate) entries: Vec<Entry>,
    /// The name the headers hash to (meaningful only without `problem`).
    pub(crate) name: BlobHash,
    /// The first structural problem, which ended the walk.
    pub(crate) problem: Option<String>,
    /// A version-2 pack whose trailer is intact and matches the records.
    pub(crate) self_indexed: bool,
}

/// Walks the record headers of the pack at `key` (`len` bytes) with
/// ranged reads, checking each against the file before it seeks by it.
///
/// # Errors
/// I/O errors reading the file (a short file is a `problem`, not an error).
pub(crate) fn walk(backend: &dyn Backend, key: &str, len: u64) -> io::Result<Walk> {
    let mut walk = Walk {
        entries: Vec::new(),
        name: BlobHash([0; 32]),
        problem: None,
        self_indexed: false,
    };
    let mut hasher = blake3::Hasher::new();
    let mut head = [0u8; PACK_HEADER_LEN as usize];
    if len < PACK_HEADER_LEN {
        walk.problem = Some(format!("file of {len} bytes is shorter than the pack header"));
        return Ok(walk);
    }
    backend.read_at(key, 0, &mut head)?;
    let version = match check_pack_header(&head) {
        Ok(v) => v,
        Err(p) => {
            walk.problem = Some(p);
            return Ok(walk);
        }
    };
    // Records end where a version-2 pack's trailer starts.
    let mut trailer = None;
    let full_len = len;
    let len = if version == PACK_VERSION_TRAILER {
        let mut foot = [0u8; FOOTER_LEN as usize];
        if len < PACK_HEADER_LEN + FOOTER_LEN {
            walk.problem = Some(format!(
                "file of {len} bytes is too short for a pack with a trailer"
            ));
            return Ok(walk);
        }
        backend.read_at(key, len - FOOTER_LEN, &mut foot)?;
        match parse_footer(&foot, len) {
            Ok((tlen, tname, nonce)) => {
                let mut bytes = vec![0u8; tlen as usize];
                backend.read_at(key, len - FOOTER_LEN - tlen, &mut bytes)?;
                trailer = Some((bytes, tname, nonce));
                len - FOOTER_LEN - tlen
            }
            Err(p) => {
                walk.problem = Some(p);
                return Ok(walk);
            }
        }
    } else {
        len
    };
    hasher.update(&head);
    let mut offset = PACK_HEADER_LEN;
    while offset < len {
        if len - offset < RECORD_HEADER_LEN as u64 {
            walk.problem = Some(format!("truncated record header at offset {offset}"));
            break;
        }
        let mut rh = [0u8; RECORD_HEADER_LEN];
        backend.read_at(key, offset, &mut rh)?;
        let r = match Record::parse(&rh) {
            Ok(r) => r,
            Err(p) => {
                walk.problem = Some(format!("at offset {offset}: {p}"));
                break;
            }
        };
        if r.len() > len - offset {
            walk.problem = Some(format!(
                "record of blob {} at offset {offset} runs past the end of the file",
                r.hash
            ));
            break;
        }
        hasher.update(&rh);
        walk.entries.push(Entry {
            hash: r.hash,
            offset,
            stored: r.stored,
            plain: r.plain,
        });
        offset += r.len();
    }
    if let Some((_, _, nonce)) = &trailer {
        hasher.update(nonce);
    }
    walk.name = BlobHash(*hasher.finalize().as_bytes());
    if let (Some((bytes, tname, _)), None) = (trailer, &walk.problem) {
        match check_trailer(&bytes, &tname, &walk.name, full_len) {
            Ok(entries) if entries == walk.entries => walk.self_indexed = true,
            Ok(_) => walk.problem = Some("trailer does not match the records".into()),
            Err(p) => walk.problem = Some(p),
        }
    }
    Ok(walk)
}

/// Reads the blob at `entry` of the pack at `key` into `out` (its plain
/// length) and verifies it: the record header against the entry, then the
/// content against the hash. A raw payload is read straight into `out`.
pub(crate) fn read_blob_into(
    backend: &dyn Backend,
    key: &str,
    entry: &Entry,
    out: &mut [u8],
) -> Result<(), BlobProblem> {
    let io_problem = |e: io::Error| match e.kind() {
        io::ErrorKind::NotFound => BlobProblem::Missing,
        io::ErrorKind::UnexpectedEof => BlobProblem::Unreadable("pack is shorter than its index says".into()),
        _ => BlobProblem::Unreadable(e.to_string()),
    };
    if out.len() as u64 != u64::from(entry.plain) {
        return Err(BlobProblem::LengthMismatch {
            expected: out.len() as u64,
            actual: u64::from(entry.plain),
        });
    }
    if backend.has_versions() {
        // Object storage: one ranged GET of header and payload (a request
        // costs far more than copying the payload once more). The entry's
        // stored length is bounded by the index's checks.
        let mut record = vec![0u8; RECORD_HEADER_LEN + entry.stored as usize];
        backend
            .read_at(key, entry.offset, &mut record)
            .map_err(io_problem)?;
        let (rh, payload) = record.split_at(RECORD_HEADER_LEN);
        let r = Record::parse(rh.try_into().expect("header length")).map_err(BlobProblem::BadHeader)?;
        if r.hash != entry.hash || r.stored != entry.stored || r.plain != entry.plain {
            return Err(BlobProblem::BadHeader(
                "the record in the pack does not match its index entry".into(),
            ));
        }
        if blob::is_raw_codec(r.codec) {
            out.copy_from_slice(payload);
            return blob::verify(out, &entry.hash);
        }
        return blob::decode_payload_into(r.codec, payload, &entry.hash, out);
    }
    let mut rh = [0u8; RECORD_HEADER_LEN];
    backend.read_at(key, entry.offset, &mut rh).map_err(io_problem)?;
    let r = Record::parse(&rh).map_err(BlobProblem::BadHeader)?;
    if r.hash != entry.hash || r.stored != entry.stored || r.plain != entry.plain {
        return Err(BlobProblem::BadHeader(
            "the record in the pack does not match its index entry".into(),
        ));
    }
    let payload_at = entry.offset + RECORD_HEADER_LEN as u64;
    if blob::is_raw_codec(r.codec) {
        backend.read_at(key, payload_at, out).map_err(io_problem)?;
        return blob::verify(out, &entry.hash);
    }
    let mut payload = vec![0u8; r.stored as usize];
    backend
        .read_at(key, payload_at, &mut payload)
        .map_err(io_problem)?;
    blob::decode_payload_into(r.codec, &payload, &entry.hash, out)
}

/// Reads the blob at `entry` as a layout-1 blob file (6-byte header and
/// payload as stored), verified: what an export archive carries.
pub(crate) fn read_blob_file(
    backend: &dyn Backend,
    key: &str,
    entry: &Entry,
) -> Result<Vec<u8>, BlobProblem> {
    let io_problem = |e: io::Error| match e.kind() {
        io::ErrorKind::NotFound => BlobProblem::Missing,
        _ => BlobProblem::Unreadable(e.to_string()),
    };
    let mut rh = [0u8; RECORD_HEADER_LEN];
    backend.read_at(key, entry.offset, &mut rh).map_err(io_problem)?;
    let r = Record::parse(&rh).map_err(BlobProblem::BadHeader)?;
    if r.hash != entry.hash || r.stored != entry.stored || r.plain != entry.plain {
        return Err(BlobProblem::BadHeader(
            "the record in the pack does not match its index entry".into(),
        ));
    }
    let mut file = blob::file_header(r.codec, r.stored as usize);
    let at = file.len();
    file.resize(at + r.stored as usize, 0);
    backend
        .read_at(key, entry.offset + RECORD_HEADER_LEN as u64, &mut file[at..])
        .map_err(io_problem)?;
    blob::decode(&file, &entry.hash, Some(u64::from(r.plain)))?;
    Ok(file)
}

/// 16 bytes no other pack gets: this process, this instant, a counter.
fn pack_nonce() -> [u8; 16] {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut h = blake3::Hasher::new();
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(
        &NEXT
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// A pack being written: a staged, append-only file.
#[derive(Debug)]
pub(crate) struct PackWriter {
    out: Box<dyn StagedAppend>,
    /// Format 2: a trailer is appended at sealing.
    trailer: bool,
    len: u64,
    hasher: blake3::Hasher,
    entries: Vec<Entry>,
}

/// A pack written and closed, not yet published.
#[derive(Debug)]
pub(crate) struct SealedPack {
    pub(crate) staged: Staged,
    pub(crate) name: BlobHash,
    pub(crate) len: u64,
    pub(crate) entries: Vec<Entry>,
}

impl PackWriter {
    /// A new pack: format 2 (with its trailer) on object storage, where
    /// it saves the index object, format 1 on a directory.
    pub(crate) fn new(backend: &dyn Backend) -> io::Result<PackWriter> {
        let trailer = backend.has_versions();
        let mut out = backend.stage_append()?;
        let head = pack_header(if trailer {
            PACK_VERSION_TRAILER
        } else {
            PACK_VERSION
        });
        if let Err(e) = out.append(&head) {
            backend.discard(&out.staged());
            return Err(e);
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head);
        Ok(PackWriter {
            out,
            trailer,
            len: PACK_HEADER_LEN,
            hasher,
            entries: Vec::new(),
        })
    }

    /// Appends one blob given as a layout-1 blob file (header + payload,
    /// see [`blob::encode`]) of `plain` uncompressed bytes.
    pub(crate) fn append_file(&mut self, hash: BlobHash, plain: u64, file: &[u8]) -> io::Result<Entry> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
        let codec = *file
            .get(5)
            .ok_or_else(|| bad("blob file shorter than its header"))?;
        let payload = &file[blob::BLOB_HEADER_LEN..];
        let record = Record {
            hash,
            codec,
            plain: u32::try_from(plain).map_err(|_| bad("blob too large"))?,
            stored: u32::try_from(payload.len()).map_err(|_| bad("blob too large"))?,
        };
        let rh = record.encode();
        self.out.append(&rh)?;
        self.out.append(payload)?;
        self.hasher.update(&rh);
        let entry = Entry {
            hash,
            offset: self.len,
            stored: record.stored,
            plain: record.plain,
        };
        self.len += record.len();
        self.entries.push(entry);
        Ok(entry)
    }

    /// Bytes written so far.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Closes the pack (starting its write-back with `sync`); a format-2
    /// pack gets its trailer and footer first.
    pub(crate) fn seal(mut self, sync: bool) -> io::Result<SealedPack> {
        let nonce = self.trailer.then(pack_nonce);
        if let Some(nonce) = &nonce {
            self.hasher.update(nonce);
        }
        let name = BlobHash(*self.hasher.finalize().as_bytes());
        if let Some(nonce) = nonce {
            // The trailer states the whole file's length, which its own
            // length (fixed by the entry count) determines.
            let tlen = 16 + 40 + 52 * self.entries.len() as u64;
            let full = self.len + tlen + FOOTER_LEN;
            let (bytes, tname) = crate::index::IndexFile {
                packs: vec![(name, full, self.entries.clone())],
            }
            .encode();
            debug_assert_eq!(bytes.len() as u64, tlen);
            let mut foot = Vec::with_capacity(FOOTER_LEN as usize);
            foot.extend_from_slice(&tlen.to_le_bytes());
            foot.extend_from_slice(&tname.0);
            foot.extend_from_slice(&nonce);
            foot.extend_from_slice(FOOTER_MAGIC);
            self.out.append(&bytes)?;
            self.out.append(&foot)?;
            self.len = full;
        }
        let staged = self.out.finish(sync)?;
        Ok(SealedPack {
            staged,
            name,
            len: self.len,
            entries: self.entries,
        })
    }

    /// Drops the pack unpublished.
    pub(crate) fn discard(self, backend: &dyn Backend) {
        let staged = self.out.staged();
        drop(self.out);
        backend.discard(&staged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalDir;
    use crate::blob::Compression;

    #[test]
    fn written_pack_walks_and_reads_back_and_damage_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::open(dir.path()).unwrap();
        let mut w = PackWriter::new(&b).unwrap();
        let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 + i as usize * 7]).collect();
        for (i, data) in blobs.iter().enumerate() {
            let c = if i % 2 == 0 {
                Compression::None
            } else {
                Compression::Zstd { level: 1 }
            };
            w.append_file(BlobHash::of(data), data.len() as u64, &blob::encode(data, c))
                .unwrap();
        }
        let sealed = w.seal(false).unwrap();
        b.publish(&[(sealed.staged.clone(), "p".into())], false).unwrap();
        let walked = walk(&b, "p", sealed.len).unwrap();
        assert!(walked.problem.is_none(), "{:?}", walked.problem);
        assert_eq!(walked.entries, sealed.entries);
        assert_eq!(walked.name, sealed.name);
        for (e, data) in sealed.entries.iter().zip(&blobs) {
            let mut out = vec![0u8; data.len()];
            read_blob_into(&b, "p", e, &mut out).unwrap();
            assert_eq!(&out, data);
            let file = read_blob_file(&b, "p", e).unwrap();
            assert_eq!(blob::decode(&file, &e.hash, None).unwrap(), *data);
        }
        // A flipped payload byte fails the hash; a truncated file ends the walk.
        let path = dir.path().join("p");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = sealed.entries[4];
        let mut out = vec![0u8; e.plain as usize];
        assert!(read_blob_into(&b, "p", &e, &mut out).is_err());
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let walked = walk(&b, "p", bytes.len() as u64 - 3).unwrap();
        assert_eq!(walked.entries.len(), 4);
        assert!(walked.problem.unwrap().contains("past the end"));
        // A hostile length is refused before anything is allocated by it.
        let mut rh = sealed.entries[0].hash.0.to_vec();
        rh.extend([0u8, 0, 0, 0]);
        rh.extend(u32::MAX.to_le_bytes());
        rh.extend(u32::MAX.to_le_bytes());
        assert!(Record::parse(rh.as_slice().try_into().unwrap()).is_err());
    }
}
