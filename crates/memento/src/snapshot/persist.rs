//! Persisting captured state into a snapshot's blobs, off the task's
//! thread: chunking, hashing, writing — and for copy-on-write captures,
//! reading the barrier's image while the task goes on.

use crate::runtime::{CowMemory, PAGE, WrittenPages};
use crate::store::{
    BlobWriter, ChunkRef, DEFAULT_FIXED_CHUNK, MemoryImage, PageDeltaRef, StoreError, TaskStateData,
};

use super::base::CHAIN_BYTES_DIVISOR;
use super::captured::{Captured, CapturedState, MemoryPlan};
use super::delta::DeltaWriter;
use super::image::native_extra;

/// Why captured state could not be persisted.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The store refused or failed (I/O, quota).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A copy-on-write capture's image was no longer readable: the task
    /// passed a later barrier first (its snapshot was given up on).
    #[error("the task passed a later barrier before this snapshot's image was read")]
    ImageGone,
}

/// Write captured state into the snapshot's blobs: canonical state framed
/// and content-defined chunked (FastCDC; already streaming since the
/// capture, this waits for its last chunk), memory images cut into fixed
/// [`DEFAULT_FIXED_CHUNK`] chunks, page deltas as their encoded bytes.
/// Chunks already in the store are not written again and all-zero chunks
/// are not stored at all.
///
/// # Errors
/// Store errors (I/O, quota); [`PersistError::ImageGone`] as it says.
pub fn persist(captured: &Captured, writer: &BlobWriter) -> Result<TaskStateData, PersistError> {
    match &captured.state {
        CapturedState::Canonical(streamed) => {
            let (len, chunks) = streamed.upload.recv().map_err(|_| StoreError::Io {
                action: "upload state of",
                path: writer.id().to_string(),
                source: std::io::Error::other("the upload thread ended without a result"),
            })??;
            Ok(TaskStateData::Canonical { len, chunks })
        }
        CapturedState::Native(memories) => {
            let mut images = Vec::with_capacity(memories.len());
            for m in memories {
                images.push(full_image(writer, m.index, m.size, |offset, out| {
                    out.copy_from_slice(&m.bytes[offset as usize..offset as usize + out.len()]);
                    Ok(())
                })?);
            }
            Ok(TaskStateData::Native {
                memories: images,
                extra: native_extra(None, captured.globals.as_ref()),
            })
        }
        CapturedState::CopyOnWrite { memories, plans } => {
            let mut images = Vec::with_capacity(memories.len());
            for (m, plan) in memories.iter().zip(plans) {
                let image = match plan {
                    MemoryPlan::Delta { base, written, slot } => {
                        delta_image(writer, m, base, &written[*slot])?
                    }
                    MemoryPlan::Full => None,
                };
                let image = match image {
                    Some(image) => image,
                    None => full_image(writer, m.index, m.size, |offset, out| {
                        m.read(offset, out).map_err(|_| PersistError::ImageGone)
                    })?,
                };
                images.push(image);
            }
            let mut config = None;
            if let Some(r) = &captured.record {
                r.base.record(r.number, &images);
                config = r.config.as_deref();
            }
            Ok(TaskStateData::Native {
                memories: images,
                extra: native_extra(config, captured.globals.as_ref()),
            })
        }
    }
}

/// Store a whole memory image of `size` bytes, `read` filling each chunk,
/// on the store's threads.
fn full_image(
    writer: &BlobWriter,
    index: u32,
    size: u64,
    read: impl Fn(u64, &mut [u8]) -> Result<(), PersistError> + Sync,
) -> Result<MemoryImage, PersistError> {
    let count = (size as usize).div_ceil(DEFAULT_FIXED_CHUNK);
    let per = count.div_ceil(writer.threads()).max(1);
    let read = &read;
    let store = move |first: usize, last: usize| -> Result<Vec<(ChunkRef, bool)>, PersistError> {
        let mut buf = vec![0u8; DEFAULT_FIXED_CHUNK];
        let mut out = Vec::with_capacity(last - first);
        for i in first..last {
            let offset = (i * DEFAULT_FIXED_CHUNK) as u64;
            let len = (size - offset).min(DEFAULT_FIXED_CHUNK as u64) as usize;
            read(offset, &mut buf[..len])?;
            out.push(writer.store_chunk(&buf[..len])?);
        }
        Ok(out)
    };
    // The groups are contiguous and joined in order: chunks stay in order.
    let stored: Vec<(ChunkRef, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .step_by(per)
            .map(|first| s.spawn(move || store(first, (first + per).min(count))))
            .collect();
        let mut all = Vec::with_capacity(count);
        for h in handles {
            all.extend(h.join().expect("store thread panicked")?);
        }
        Ok::<_, PersistError>(all)
    })?;
    let new_chunks = stored.iter().filter(|(_, new)| *new).count() as u64;
    let mut image = MemoryImage::new(
        index,
        size,
        DEFAULT_FIXED_CHUNK as u64,
        stored.into_iter().map(|(c, _)| c).collect(),
    );
    image.new_chunks = Some(new_chunks);
    Ok(image)
}

/// Store the pages `written` since `base` as a page delta extending its
/// chain; `None` when the delta would be so large that a full image is
/// the better write (the chain would close right after anyway).
fn delta_image(
    writer: &BlobWriter,
    m: &CowMemory,
    base: &MemoryImage,
    written: &WrittenPages,
) -> Result<Option<MemoryImage>, PersistError> {
    let indices = written.indices(m.size);
    let per = indices.len().div_ceil(writer.threads()).max(1);
    // Contiguous groups, encoded on the store's threads, joined in order.
    let parts: Vec<DeltaWriter> = std::thread::scope(|s| {
        let handles: Vec<_> = indices
            .chunks(per)
            .map(|group| {
                s.spawn(move || {
                    let zero = [0u8; PAGE];
                    let mut after = Box::new([0u8; PAGE]);
                    let mut part = DeltaWriter::new(m.size);
                    for &index in group {
                        m.read(u64::from(index) * PAGE as u64, &mut after[..])
                            .map_err(|_| PersistError::ImageGone)?;
                        let before = written.before(index).map_or(&zero, |b| &**b);
                        part.page(index, before, &after);
                    }
                    Ok::<_, PersistError>(part)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("delta thread panicked"))
            .collect::<Result<_, _>>()
    })?;
    let mut delta = DeltaWriter::new(m.size);
    for part in parts {
        delta.append(part);
    }
    let pages = delta.pages();
    if pages == 0 && m.size == base.size {
        // Nothing changed: the base as it is (a savepoint right after a
        // checkpoint writes its manifest alone).
        let mut image = base.clone();
        image.new_chunks = Some(0);
        return Ok(Some(image));
    }
    let bytes = delta.finish();
    if bytes.len() as u64 > base.base_len() / CHAIN_BYTES_DIVISOR {
        return Ok(None);
    }
    let mut chunks = Vec::with_capacity(bytes.len().div_ceil(DEFAULT_FIXED_CHUNK));
    let mut new_chunks = 0;
    for piece in bytes.chunks(DEFAULT_FIXED_CHUNK) {
        let (chunk, new) = writer.store_chunk(piece)?;
        chunks.push(chunk);
        new_chunks += u64::from(new);
    }
    let mut image = base.clone();
    image.size = m.size;
    image.base_size = Some(base.base_len());
    image.new_chunks = Some(new_chunks);
    image.deltas.push(PageDeltaRef {
        len: bytes.len() as u64,
        pages,
        chunks,
    });
    Ok(Some(image))
}
