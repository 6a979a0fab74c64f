//! Reading state back: chunks verified against their hashes, in parallel.

use crate::{BadChunk, BlobHash, BlobProblem, ChunkRef, SnapshotId, StoreError, TaskKey, TenantStore};

impl TenantStore {
    /// Reads the chunks of `task` of snapshot `id` and returns their
    /// concatenation. Every blob is verified against its hash and length.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if the tenant has no such snapshot;
    /// [`StoreError::BadChunk`] naming the snapshot, task, chunk and the next
    /// older intact snapshot if a blob is missing or corrupt.
    pub fn read_chunks(
        &self,
        id: &SnapshotId,
        task: &TaskKey,
        chunks: &[ChunkRef],
    ) -> Result<Vec<u8>, StoreError> {
        let total: u64 = chunks.iter().map(ChunkRef::len).sum();
        let mut out = vec![0u8; total as usize];
        self.read_chunks_into(id, task, chunks, &mut out, false)?;
        Ok(out)
    }

    /// As [`TenantStore::read_chunks`], into `out`, whose length must be
    /// the chunks' total: raw blobs are read straight into place (no
    /// intermediate buffer). Zero chunks are written as zeros unless
    /// `write_zeros` is false (the caller knows `out` reads zero there
    /// already, as a fresh memory does).
    ///
    /// # Errors
    /// As [`TenantStore::read_chunks`].
    ///
    /// # Panics
    /// If `out` is not exactly as long as the chunks.
    pub fn read_chunks_into(
        &self,
        id: &SnapshotId,
        task: &TaskKey,
        chunks: &[ChunkRef],
        out: &mut [u8],
        write_zeros: bool,
    ) -> Result<(), StoreError> {
        if !self.manifest_exists(id)? {
            return Err(StoreError::NotFound {
                tenant: self.inner.name.to_string(),
                id: id.clone(),
            });
        }
        let total: u64 = chunks.iter().map(ChunkRef::len).sum();
        assert_eq!(out.len() as u64, total, "output is not as long as the chunks");
        let mut slots: Vec<(usize, &ChunkRef, &mut [u8])> = Vec::with_capacity(chunks.len());
        let mut rest = out;
        for (i, c) in chunks.iter().enumerate() {
            let (slot, tail) = rest.split_at_mut(c.len() as usize);
            rest = tail;
            if c.blob().is_some() {
                slots.push((i, c, slot));
            } else if write_zeros {
                slot.fill(0);
            }
        }
        let failure = self.read_slots(slots);
        if let Some((index, hash, problem)) = failure {
            return Err(StoreError::BadChunk(Box::new(BadChunk {
                snapshot: id.clone(),
                task: task.to_string(),
                index,
                hash,
                problem,
                next_intact: self.next_intact_before(id).unwrap_or(None),
            })));
        }
        Ok(())
    }

    /// Fills the slots from their blobs using up to `threads` threads;
    /// returns the first failure (lowest chunk index) if any.
    pub(crate) fn read_slots(
        &self,
        mut slots: Vec<(usize, &ChunkRef, &mut [u8])>,
    ) -> Option<(usize, BlobHash, BlobProblem)> {
        let read_one = |(i, c, slot): &mut (usize, &ChunkRef, &mut [u8])| {
            let ChunkRef::Blob { blob, len } = **c else {
                return Ok(());
            };
            debug_assert_eq!(slot.len() as u64, len);
            self.read_blob_into(&blob, slot).map_err(|p| (*i, blob, p))
        };
        let threads = self.options().threads.max(1).min(slots.len().max(1));
        if threads <= 1 || slots.len() < 4 {
            return slots.iter_mut().map(read_one).find_map(Result::err);
        }
        let per = slots.len().div_ceil(threads);
        let mut failures: Vec<(usize, BlobHash, BlobProblem)> = std::thread::scope(|s| {
            let handles: Vec<_> = slots
                .chunks_mut(per)
                .map(|group| s.spawn(|| group.iter_mut().map(read_one).find_map(Result::err)))
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().expect("reader thread panicked"))
                .collect()
        });
        failures.sort_by_key(|f| f.0);
        failures.into_iter().next()
    }
}
