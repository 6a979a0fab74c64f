//! Blobs: immutable chunks named by the blake3 hash of their content.
//!
//! A blob file is a 6-byte header followed by the payload:
//!
//! ```text
//! offset 0  4 bytes  magic "MBLB"
//! offset 4  1 byte   blob format version (1)
//! offset 5  1 byte   codec: 0 = stored raw, 1 = zstd frame
//! offset 6  ...      payload
//! ```
//!
//! The name is the hash of the *uncompressed* bytes, so identical chunks
//! dedupe regardless of the codec each store (or each write) chose, and a
//! reader can always verify what it got.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::name::InvalidName;

/// What is wrong with one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlobProblem {
    /// No file exists under the blob's name.
    Missing,
    /// The file's content does not hash to its name.
    HashMismatch {
        /// blake3 of the bytes actually found (after decompression).
        actual: BlobHash,
    },
    /// The decoded bytes have a different length than the reference says.
    LengthMismatch {
        /// Length recorded in the manifest.
        expected: u64,
        /// Length found on disk.
        actual: u64,
    },
    /// The file does not start with a valid blob header.
    BadHeader(String),
    /// The compressed payload does not decompress.
    Decompress(String),
    /// The file could not be read.
    Unreadable(String),
}

impl fmt::Display for BlobProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobProblem::Missing => write!(f, "blob is missing"),
            BlobProblem::HashMismatch { actual } => {
                write!(f, "content hashes to {actual} (blob is corrupt)")
            }
            BlobProblem::LengthMismatch { expected, actual } => {
                write!(f, "length is {actual} bytes, expected {expected}")
            }
            BlobProblem::BadHeader(reason) => write!(f, "bad blob header: {reason}"),
            BlobProblem::Decompress(reason) => write!(f, "cannot decompress: {reason}"),
            BlobProblem::Unreadable(reason) => write!(f, "cannot read: {reason}"),
        }
    }
}

/// Largest chunk accepted by any `put`: a blob holds one chunk, so this
/// bounds the memory a read of one blob may allocate.
pub const MAX_CHUNK: usize = 16 * 1024 * 1024;

/// Magic bytes at the start of every blob file.
pub const BLOB_MAGIC: &[u8; 4] = b"MBLB";
/// Version of the blob file layout written by this build.
pub const BLOB_VERSION: u8 = 1;
/// Length of the blob header.
pub const BLOB_HEADER_LEN: usize = 6;

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// The blake3 hash of a blob's uncompressed content; its name in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobHash(pub [u8; 32]);

impl BlobHash {
    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        BlobHash(*blake3::hash(bytes).as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 lowercase hex digits.
    ///
    /// # Errors
    /// [`InvalidName`] for anything else.
    pub fn parse(value: &str) -> Result<Self, InvalidName> {
        let ok = value.len() == 64
            && value
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(InvalidName::new(
                "blob hash",
                value,
                "expected 64 lowercase hex digits (blake3)".into(),
            ));
        }
        let hash =
            blake3::Hash::from_hex(value).map_err(|e| InvalidName::new("blob hash", value, e.to_string()))?;
        Ok(BlobHash(*hash.as_bytes()))
    }

    /// Path of the blob relative to the tenant directory:
    /// `blobs/<first 2 hex>/<64 hex>`.
    pub(crate) fn rel_path(&self) -> String {
        let hex = self.to_hex();
        format!("blobs/{}/{}", &hex[..2], hex)
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({})", &self.to_hex()[..16])
    }
}

impl FromStr for BlobHash {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        Self::parse(s)
    }
}

impl Serialize for BlobHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for BlobHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// How blob payloads are compressed when written. Reading handles every codec
/// regardless of this setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "codec")]
pub enum Compression {
    /// Store the bytes as they are.
    None,
    /// zstd at `level` (1 is fast; see docs/PERFORMANCE.md for the figures).
    /// A chunk that does not shrink by at least 1/8 is stored raw, so
    /// incompressible data costs one failed attempt and no read overhead.
    Zstd {
        /// zstd compression level (1..=22; negative levels are faster still).
        level: i32,
    },
}

impl Default for Compression {
    /// No compression. Measured (docs/PERFORMANCE.md, section Store): zstd
    /// level 1 shrinks typical memory images about 1.8x, but compresses at
    /// roughly half the speed of an fsynced write to a local SSD on one core,
    /// so it makes large snapshots CPU-bound; all-zero chunks, the largest
    /// saving in memory images, are skipped regardless. Choose
    /// `Zstd { level: 1 }` when disk space or a slow (network) disk is the
    /// limit.
    fn default() -> Self {
        Compression::None
    }
}

thread_local! {
    /// One zstd context per thread and level: creating a context costs about
    /// as much as compressing a small chunk.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether `codec` is one this build reads.
pub(crate) fn is_known_codec(codec: u8) -> bool {
    matches!(codec, CODEC_RAW | CODEC_ZSTD)
}

/// Whether `codec` stores the bytes as they are.
pub(crate) fn is_raw_codec(codec: u8) -> bool {
    codec == CODEC_RAW
}

/// A blob file's header for `codec`, with room for `capacity` more bytes.
pub(crate) fn file_header(codec: u8, capacity: usize) -> Vec<u8> {
    header(codec, capacity)
}

fn header(codec: u8, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOB_HEADER_LEN + capacity);
    out.extend_from_slice(BLOB_MAGIC);
    out.push(BLOB_VERSION);
    out.push(codec);
    out
}

/// zstd-compresses `plain` after a header; `None` if zstd fails or does
/// not save at least 1/8.
fn try_zstd(plain: &[u8], level: i32) -> Option<Vec<u8>> {
    let bound = zstd::zstd_safe::compress_bound(plain.len());
    let mut cursor = std::io::Cursor::new(header(CODEC_ZSTD, bound));
    cursor.set_position(BLOB_HEADER_LEN as u64);
    let n = COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, _)| *l != level) {
            *cell = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, c) = cell.as_mut()?;
        c.compress_to_buffer(plain, &mut cursor).ok()
    })?;
    let out = cursor.into_inner();
    debug_assert_eq!(out.len(), BLOB_HEADER_LEN + n);
    (n < plain.len() - plain.len() / 8).then_some(out)
}

/// Encodes `plain` into a blob file (header + payload).
pub(crate) fn encode(plain: &[u8], compression: Compression) -> Vec<u8> {
    if let Compression::Zstd { level } = compression
        && let Some(out) = try_zstd(plain, level)
    {
        return out;
    }
    let mut out = header(CODEC_RAW, plain.len());
    out.extend_from_slice(plain);
    out
}

/// Checks the header; returns the codec and the payload.
fn parse(file: &[u8]) -> Result<(u8, &[u8]), BlobProblem> {
    if file.len() < BLOB_HEADER_LEN {
        return Err(BlobProblem::BadHeader(format!(
            "file is {} bytes, shorter than the header",
            file.len()
        )));
    }
    if &file[..4] != BLOB_MAGIC {
        return Err(BlobProblem::BadHeader("magic is not MBLB".into()));
    }
    if file[4] != BLOB_VERSION {
        return Err(BlobProblem::BadHeader(format!(
            "blob format version {} (this build reads {BLOB_VERSION})",
            file[4]
        )));
    }
    match file[5] {
        c @ (CODEC_RAW | CODEC_ZSTD) => Ok((c, &file[BLOB_HEADER_LEN..])),
        other => Err(BlobProblem::BadHeader(format!("unknown codec {other}"))),
    }
}

/// Decodes a blob file straight into `out`, whose length is the expected
/// plaintext length, and verifies it against `hash`.
///
/// # Errors
/// The [`BlobProblem`] found; the caller adds the context.
pub(crate) fn decode_into(file: &[u8], hash: &BlobHash, out: &mut [u8]) -> Result<(), BlobProblem> {
    let (codec, payload) = parse(file)?;
    decode_payload_into(codec, payload, hash, out)
}

/// Decodes a payload of `codec` into `out` (the expected plaintext
/// length) and verifies it against `hash`.
///
/// # Errors
/// The [`BlobProblem`] found.
pub(crate) fn decode_payload_into(
    codec: u8,
    payload: &[u8],
    hash: &BlobHash,
    out: &mut [u8],
) -> Result<(), BlobProblem> {
    let expected = out.len() as u64;
    if codec == CODEC_RAW {
        if payload.len() != out.len() {
            return Err(BlobProblem::LengthMismatch {
                expected,
                actual: payload.len() as u64,
            });
        }
        out.copy_from_slice(payload);
    } else {
        // The frame header states the content size; check it first so the
        // error for a wrong length says so rather than "buffer too small".
        if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(payload)
            && size != expected
        {
            return Err(BlobProblem::LengthMismatch {
                expected,
                actual: size,
            });
        }
        let n = DECOMPRESSOR.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = Some(
                    zstd::bulk::Decompressor::new().map_err(|e| BlobProblem::Decompress(e.to_string()))?,
                );
            }
            let d = cell.as_mut().expect("just set");
            d.decompress_to_buffer(payload, out)
                .map_err(|e| BlobProblem::Decompress(e.to_string()))
        })?;
        if n != out.len() {
            return Err(BlobProblem::LengthMismatch {
                expected,
                actual: n as u64,
            });
        }
    }
    verify(out, hash)
}

/// Whether a blob header (the first [`BLOB_HEADER_LEN`] bytes) says the
/// payload is stored raw: then the payload *is* the content.
///
/// # Errors
/// A bad header.
pub(crate) fn is_raw(head: &[u8]) -> Result<bool, BlobProblem> {
    Ok(parse(head)?.0 == CODEC_RAW)
}

/// Checks content against the hash it is stored under.
///
/// # Errors
/// [`BlobProblem::HashMismatch`].
pub(crate) fn verify(content: &[u8], hash: &BlobHash) -> Result<(), BlobProblem> {
    let actual = BlobHash::of(content);
    if actual != *hash {
        return Err(BlobProblem::HashMismatch { actual });
    }
    Ok(())
}

/// Decodes a blob file and verifies it against `hash` and (if given) the
/// expected plaintext length.
///
/// # Errors
/// The [`BlobProblem`] found; the caller adds the context.
pub(crate) fn decode(
    file: &[u8],
    hash: &BlobHash,
    expected_len: Option<u64>,
) -> Result<Vec<u8>, BlobProblem> {
    let len = match expected_len {
        Some(n) => n,
        None => {
            let (codec, payload) = parse(file)?;
            if codec == CODEC_RAW {
                payload.len() as u64
            } else {
                match zstd::zstd_safe::get_frame_content_size(payload) {
                    Ok(Some(n)) if n <= MAX_CHUNK as u64 => n,
                    _ => {
                        return Err(BlobProblem::Decompress(
                            "frame does not state a plausible content size".into(),
                        ));
                    }
                }
            }
        }
    };
    let mut out = vec![0u8; len as usize];
    decode_into(file, hash, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_raw_and_zstd() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        let hash = BlobHash::of(&data);
        for c in [Compression::None, Compression::Zstd { level: 1 }] {
            let file = encode(&data, c);
            assert_eq!(decode(&file, &hash, Some(data.len() as u64)).unwrap(), data);
        }
        assert!(encode(&data, Compression::Zstd { level: 1 }).len() < data.len() / 10);
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let mut x = 1u64;
        let data: Vec<u8> = (0..10_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let file = encode(&data, Compression::Zstd { level: 1 });
        assert_eq!(file[5], CODEC_RAW);
    }

    #[test]
    fn corruption_is_detected() {
        let data = b"hello world".repeat(10);
        let hash = BlobHash::of(&data);
        let mut file = encode(&data, Compression::None);
        file[10] ^= 1;
        assert!(matches!(
            decode(&file, &hash, None),
            Err(BlobProblem::HashMismatch { .. })
        ));
        assert!(matches!(
            decode(b"MB", &hash, None),
            Err(BlobProblem::BadHeader(_))
        ));
        let file = encode(&data, Compression::None);
        assert!(matches!(
            decode(&file, &hash, Some(3)),
            Err(BlobProblem::LengthMismatch { .. })
        ));
    }

    #[test]
    fn hash_parsing() {
        let h = BlobHash::of(b"x");
        assert_eq!(BlobHash::parse(&h.to_hex()).unwrap(), h);
        assert!(BlobHash::parse("../../etc").is_err());
        assert!(BlobHash::parse(&h.to_hex().to_uppercase()).is_err());
        assert!(h.rel_path().starts_with(&format!("blobs/{}/", &h.to_hex()[..2])));
    }
}
