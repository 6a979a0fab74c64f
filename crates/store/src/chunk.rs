//! Chunk references and the two ways of cutting bytes into chunks.
//!
//! * Fixed-size chunks for memory images: a page that changed maps to
//!   exactly one chunk, and chunk boundaries never move, so an incremental
//!   snapshot writes only the chunks that changed.
//! * Content-defined chunks (FastCDC 2020) for canonical state bytes, whose
//!   content shifts when the operator inserts or removes entries: boundaries
//!   follow the content, so an insertion rewrites only the chunks around it.

use serde::{Deserialize, Serialize};

use crate::blob::BlobHash;

/// Default fixed chunk size for memory images (256 KiB); the measurements
/// behind it are in docs/PERFORMANCE.md.
pub const DEFAULT_FIXED_CHUNK: usize = 256 * 1024;

/// FastCDC minimum chunk size.
pub const CDC_MIN: usize = 64 * 1024;
/// FastCDC average (target) chunk size.
pub const CDC_AVG: usize = 256 * 1024;
/// FastCDC maximum chunk size.
pub const CDC_MAX: usize = 1024 * 1024;

/// One chunk of a task's state, in order: either a stored blob or a run of
/// zero bytes that is not stored at all.
///
/// JSON: `{"blob": "<64 hex>", "len": 262144}` or `{"zero": 262144}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum ChunkRef {
    /// Bytes stored as the blob `blob`; `len` is the uncompressed length.
    Blob {
        /// Hash (name) of the blob.
        blob: BlobHash,
        /// Uncompressed length in bytes.
        len: u64,
    },
    /// `zero` bytes of value 0 (nothing stored).
    Zero {
        /// Number of zero bytes.
        zero: u64,
    },
}

impl ChunkRef {
    /// Uncompressed length of the chunk.
    pub fn len(&self) -> u64 {
        match *self {
            ChunkRef::Blob { len, .. } => len,
            ChunkRef::Zero { zero } => zero,
        }
    }

    /// True for a zero-length chunk (never produced by the chunkers).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The blob it refers to, if any.
    pub fn blob(&self) -> Option<BlobHash> {
        match *self {
            ChunkRef::Blob { blob, .. } => Some(blob),
            ChunkRef::Zero { .. } => None,
        }
    }
}

/// True if every byte is zero. ORs blocks of words so the compiler can
/// vectorise, and stops at the first non-zero block.
pub(crate) fn is_all_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(256);
    for block in &mut blocks {
        let acc = block
            .chunks_exact(8)
            .fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().unwrap()));
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Fixed-size boundaries: `(offset, len)` pairs covering `total` bytes.
pub(crate) fn fixed_boundaries(total: usize, chunk_size: usize) -> Vec<(usize, usize)> {
    (0..total)
        .step_by(chunk_size.max(1))
        .map(|off| (off, chunk_size.min(total - off)))
        .collect()
}

/// FastCDC boundaries with the store's parameters.
pub(crate) fn cdc_boundaries(bytes: &[u8]) -> Vec<(usize, usize)> {
    if bytes.is_empty() {
        return Vec::new();
    }
    fastcdc::v2020::FastCDC::new(bytes, CDC_MIN, CDC_AVG, CDC_MAX)
        .map(|c| (c.offset, c.length))
        .collect()
}
