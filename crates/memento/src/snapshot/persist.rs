//! Persisting captured state into a snapshot's blobs, off the task's
//! thread: chunking, hashing, writing.

use crate::store::{BlobWriter, ChunkRef, DEFAULT_FIXED_CHUNK, MemoryImage, StoreError, TaskStateData};

use super::captured::{Captured, CapturedState};
use super::image::native_extra;
use super::pages::{ChunkSource, chunk_len, page_range, page_runs, source_len};

/// Write captured state into the snapshot's blobs: canonical bytes
/// content-defined chunked (FastCDC), memory images cut into fixed
/// [`DEFAULT_FIXED_CHUNK`] chunks. Either way chunks already in the store
/// are not written again and all-zero chunks are not stored at all, so a
/// memory image costs only the chunks that changed since any snapshot.
///
/// # Errors
/// Store errors (I/O, quota).
pub fn persist(captured: &Captured, writer: &BlobWriter) -> Result<TaskStateData, StoreError> {
    match &captured.state {
        CapturedState::Canonical(bytes) => {
            let chunks = writer.put_chunks_cdc(bytes)?;
            Ok(TaskStateData::Canonical {
                len: bytes.len() as u64,
                chunks,
            })
        }
        CapturedState::Native(memories) => {
            let mut images = Vec::with_capacity(memories.len());
            for m in memories {
                let sources = vec![ChunkSource::Copied; (m.size as usize).div_ceil(DEFAULT_FIXED_CHUNK)];
                images.push(persist_image(writer, m.index, m.size, &sources, &m.bytes)?);
            }
            Ok(TaskStateData::Native {
                memories: images,
                extra: native_extra(None),
            })
        }
        CapturedState::NativeDelta(memories) => {
            let mut images = Vec::with_capacity(memories.len());
            for m in memories {
                images.push(persist_image(writer, m.index, m.size, &m.chunks, &m.copied)?);
            }
            let mut config = None;
            if let Some(r) = &captured.record {
                r.base.record(r.number, &images);
                config = r.config.as_deref();
            }
            Ok(TaskStateData::Native {
                memories: images,
                extra: native_extra(config),
            })
        }
    }
}

/// Store one memory image from its chunk sources and the bytes copied for
/// them, on the store's threads: copied chunks as they are, patched ones
/// rebuilt from the base's chunk (read back from the store) with the
/// written pages laid over it.
fn persist_image(
    writer: &BlobWriter,
    index: u32,
    size: u64,
    sources: &[ChunkSource],
    copied: &[u8],
) -> Result<MemoryImage, StoreError> {
    // Each chunk to store, with where its bytes start in `copied`.
    let mut todo = Vec::new();
    let mut at = 0;
    for (i, c) in sources.iter().enumerate() {
        let n = source_len(c, chunk_len(size, i));
        if !matches!(c, ChunkSource::Base(_)) {
            todo.push((i, at));
        }
        at += n;
    }
    debug_assert_eq!(at, copied.len());
    let store = |group: &[(usize, usize)]| -> Result<Vec<(ChunkRef, bool)>, StoreError> {
        let mut scratch = Vec::new();
        let mut out = Vec::with_capacity(group.len());
        for &(i, at) in group {
            let len = chunk_len(size, i);
            let bytes: &[u8] = match sources[i] {
                ChunkSource::Patched { base, pages } => {
                    scratch.resize(len, 0);
                    writer.read_chunk_into(&base, &mut scratch)?;
                    let mut from = at;
                    for (first, n) in page_runs(pages) {
                        let range = page_range(first, n, len);
                        let to = from + range.len();
                        scratch[range].copy_from_slice(&copied[from..to]);
                        from = to;
                    }
                    &scratch
                }
                _ => &copied[at..at + len],
            };
            out.push(writer.store_chunk(bytes)?);
        }
        Ok(out)
    };
    let per = todo.len().div_ceil(writer.threads()).max(1);
    // The groups are contiguous and joined in order: `stored` is in chunk
    // order, one entry per chunk that is not the base's.
    let stored: Vec<(ChunkRef, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = todo.chunks(per).map(|g| s.spawn(move || store(g))).collect();
        let mut all = Vec::with_capacity(todo.len());
        for h in handles {
            all.extend(h.join().expect("store thread panicked")?);
        }
        Ok::<_, StoreError>(all)
    })?;
    let new_chunks = stored.iter().filter(|(_, new)| *new).count() as u64;
    let mut fresh = stored.into_iter().map(|(chunk, _)| chunk);
    let chunks = sources
        .iter()
        .map(|c| match c {
            ChunkSource::Base(c) => *c,
            _ => fresh
                .next()
                .expect("one stored chunk per chunk not from the base"),
        })
        .collect();
    Ok(MemoryImage {
        index,
        size,
        chunk_size: DEFAULT_FIXED_CHUNK as u64,
        chunks,
        new_chunks: Some(new_chunks),
        base_size: None,
        deltas: Vec::new(),
    })
}
