//! The layout of an incremental native image: fixed chunks of
//! [`DEFAULT_FIXED_CHUNK`] bytes, each from the base, copied whole, or
//! patched with the [`PAGE`]s written since the base; and the arithmetic of
//! chunks, pages and the bytes a capture copies for them.

use crate::runtime::PAGE;
use crate::store::{ChunkRef, DEFAULT_FIXED_CHUNK};

/// One memory of an incremental native capture.
pub struct MemoryDelta {
    /// Index of the memory (creation order).
    pub index: u32,
    /// Its size in bytes when captured.
    pub size: u64,
    /// Where each chunk of [`DEFAULT_FIXED_CHUNK`] comes from.
    pub chunks: Vec<ChunkSource>,
    /// The bytes copied in the pause, back to back in chunk order: whole
    /// chunks for [`ChunkSource::Copied`], the written pages (ascending)
    /// for [`ChunkSource::Patched`].
    pub copied: Vec<u8>,
}

/// Where one chunk of an incremental native capture comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkSource {
    /// Unchanged since the base: the base's chunk, as it is.
    Base(ChunkRef),
    /// Copied whole.
    Copied,
    /// Some pages written since the base: those (bit `p` of `pages` = the
    /// chunk's [`PAGE`] `p`) were copied; the upload rebuilds the chunk
    /// from the base's chunk with them laid over it. The pause copies only
    /// the written pages, however few per chunk.
    Patched {
        /// The base's version of the chunk.
        base: ChunkRef,
        /// Written pages.
        pages: u64,
    },
}

/// Length of chunk `i` of a memory of `size` bytes.
pub(super) fn chunk_len(size: u64, i: usize) -> usize {
    (size as usize - i * DEFAULT_FIXED_CHUNK).min(DEFAULT_FIXED_CHUNK)
}

/// The mask of every page of a chunk of `len` bytes.
pub(super) fn all_pages(len: usize) -> u64 {
    match len.div_ceil(PAGE) {
        64 => u64::MAX,
        n => (1 << n) - 1,
    }
}

/// Runs of set bits of `mask`, as (first page, pages), ascending.
pub(super) fn page_runs(mut mask: u64) -> impl Iterator<Item = (usize, usize)> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let first = mask.trailing_zeros();
        let run = (mask >> first).trailing_ones();
        let end = first + run;
        mask = if end == 64 { 0 } else { mask & !((1 << end) - 1) };
        Some((first as usize, run as usize))
    })
}

/// The byte range within a chunk of `len` bytes of `pages` pages from page
/// `first` (the chunk's last page may be short).
pub(super) fn page_range(first: usize, pages: usize, len: usize) -> std::ops::Range<usize> {
    first * PAGE..((first + pages) * PAGE).min(len)
}

/// Copy what `chunks` says is needed from `memory`, back to back.
pub(super) fn copy_sources(memory: &[u8], chunks: &[ChunkSource]) -> Vec<u8> {
    let bytes: usize = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| source_len(c, chunk_len(memory.len() as u64, i)))
        .sum();
    let mut out = crate::runtime::prefaulted_buffer(bytes);
    for (i, c) in chunks.iter().enumerate() {
        let start = i * DEFAULT_FIXED_CHUNK;
        let chunk = &memory[start..start + chunk_len(memory.len() as u64, i)];
        match c {
            ChunkSource::Base(_) => {}
            ChunkSource::Copied => out.extend_from_slice(chunk),
            ChunkSource::Patched { pages, .. } => {
                for (first, n) in page_runs(*pages) {
                    out.extend_from_slice(&chunk[page_range(first, n, chunk.len())]);
                }
            }
        }
    }
    out
}

/// Bytes a chunk of `len` bytes takes in a delta's `copied`.
pub(super) fn source_len(c: &ChunkSource, len: usize) -> usize {
    match c {
        ChunkSource::Base(_) => 0,
        ChunkSource::Copied => len,
        ChunkSource::Patched { pages, .. } => {
            page_runs(*pages).map(|(f, n)| page_range(f, n, len).len()).sum()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_masks_and_runs() {
        assert_eq!(all_pages(DEFAULT_FIXED_CHUNK), u64::MAX);
        assert_eq!(all_pages(64 * 1024), 0xffff);
        assert_eq!(all_pages(PAGE + 1), 0b11);
        assert_eq!(page_runs(0).count(), 0);
        let runs: Vec<_> = page_runs(0b1011_0001 | 1 << 63).collect();
        assert_eq!(runs, vec![(0, 1), (4, 2), (7, 1), (63, 1)]);
        assert_eq!(page_runs(u64::MAX).collect::<Vec<_>>(), vec![(0, 64)]);
        // The last page of a short chunk is short.
        assert_eq!(page_range(1, 2, 2 * PAGE + 100), PAGE..2 * PAGE + 100);
        let patched = ChunkSource::Patched {
            base: ChunkRef::Zero { zero: 0 },
            pages: 0b101,
        };
        assert_eq!(source_len(&patched, DEFAULT_FIXED_CHUNK), 2 * PAGE);
        assert_eq!(source_len(&ChunkSource::Copied, 1000), 1000);
    }
}
