//! Writing one snapshot: its blobs (from several threads) and, last, its
//! manifest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::backend::{LockGuard, LockMode, PutMode};
use crate::manifest::now_ms;
use crate::pack::{PackWriter, SealedPack};
use crate::packed::Found;
use crate::{
    BlobHash, ChunkRef, JobName, MAX_CHUNK, Manifest, SnapshotId, SnapshotKind, SnapshotStatus, StateFormat,
    StoreError, TenantStore, Trigger,
};
use crate::{blob, chunk};

impl TenantStore {
    /// Starts writing snapshot `number` of `job`. Blobs the writer stores (or
    /// finds already present) are protected from GC until it commits, aborts
    /// or is dropped. Waits while a GC is deleting.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] if that snapshot is committed; I/O
    /// errors.
    pub fn begin(&self, job: &JobName, number: u64) -> Result<SnapshotWriter, StoreError> {
        let id = SnapshotId::new(job.clone(), number);
        let pin = match self.gc_grace() {
            // Object storage: no lock objects per snapshot; a view of the
            // packs not older than a quarter of the grace period instead
            // (docs/STORAGE.md, "Garbage collection on object storage").
            Some(grace) => {
                self.inner.store.upgrade_layout()?;
                let view = self.inner.index.read().unwrap().view;
                if view.is_none_or(|v| v.elapsed() >= grace / 4) {
                    self.refresh_index()?;
                }
                Pin::View(self.inner.index.read().unwrap().view.expect("refreshed"))
            }
            None => {
                // The gate lets a GC that is waiting for writers stop new
                // ones from starting, so a busy store cannot starve it.
                let gate = self.lock("gate", LockMode::Shared, None)?;
                let pin = self
                    .lock("writers", LockMode::Shared, None)?
                    .expect("waits without timeout");
                drop(gate);
                self.inner.store.upgrade_layout()?;
                // Under the pin, so GC cannot remove what the refreshed
                // index names until this writer is done.
                self.refresh_index()?;
                Pin::Lock(pin)
            }
        };
        // A number just taken through this process's lease is fresh: no
        // manifest can be there, and object storage saves the request.
        let fresh = self.active_lease(job).is_some_and(|l| l.holds(number));
        if !fresh && self.manifest_exists(&id)? {
            return Err(StoreError::AlreadyExists {
                tenant: self.inner.name.to_string(),
                id,
            });
        }
        let shared = Arc::new(WriterShared {
            tenant: self.clone(),
            id,
            pin: Mutex::new(Some(pin)),
            seen: Mutex::new(HashMap::new()),
            open: Mutex::new(None),
            sealed: Mutex::new(Vec::new()),
            broken: std::sync::atomic::AtomicBool::new(false),
            written: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
        });
        Ok(SnapshotWriter {
            blobs: BlobWriter { shared },
            started: Instant::now(),
        })
    }
}

/// What keeps GC from deleting the blobs a writer relies on.
#[derive(Debug)]
pub(crate) enum Pin {
    /// A directory: the shared `writers` lock; GC cannot delete while it
    /// is held.
    Lock(#[allow(dead_code)] Box<dyn LockGuard>),
    /// Object storage: when the listing of the view of the packs this
    /// writer relies on started. It must commit within half the GC grace
    /// period of it, or look again.
    View(Instant),
}

/// Writes the blobs of one snapshot and commits its manifest.
///
/// Dropping it without `commit` aborts: the manifest is never written, the
/// pin is released, and the blobs it wrote become garbage for the next GC.
#[derive(Debug)]
pub struct SnapshotWriter {
    pub(crate) blobs: BlobWriter,
    pub(crate) started: Instant,
}

/// A handle for storing blobs of one snapshot from several threads.
/// Clone + Send + Sync; obtained from [`SnapshotWriter::blob_writer`].
/// After the snapshot commits or aborts, puts fail.
#[derive(Debug, Clone)]
pub struct BlobWriter {
    pub(crate) shared: Arc<WriterShared>,
}

#[derive(Debug)]
pub(crate) struct WriterShared {
    pub(crate) tenant: TenantStore,
    pub(crate) id: SnapshotId,
    /// What keeps GC from deleting what this writer relies on; `None`
    /// once the writer committed or aborted.
    pub(crate) pin: Mutex<Option<Pin>>,
    /// Blobs this writer wrote (`true`) or found in the store (`false`),
    /// with their stored size: no need to look again. A blob being written
    /// is claimed here first (size 0), so two threads never both write it.
    pub(crate) seen: Mutex<HashMap<BlobHash, (u64, bool)>>,
    /// The pack new blobs are appended to; sealed at the target size.
    pub(crate) open: Mutex<Option<PackWriter>>,
    /// Packs written and closed, published at commit (one durability
    /// batch), discarded on abort.
    pub(crate) sealed: Mutex<Vec<SealedPack>>,
    /// Set when writing a pack failed: blobs this writer claimed may be in
    /// no pack, so it must never commit.
    pub(crate) broken: std::sync::atomic::AtomicBool,
    pub(crate) written: AtomicU64,
    pub(crate) new_bytes: AtomicU64,
    pub(crate) stored_bytes: AtomicU64,
}

impl WriterShared {
    pub(crate) fn note_written(&self, plain: u64, stored: u64) {
        self.written.fetch_add(1, Ordering::Relaxed);
        self.new_bytes.fetch_add(plain, Ordering::Relaxed);
        self.stored_bytes.fetch_add(stored, Ordering::Relaxed);
    }
}

impl BlobWriter {
    /// Stores one chunk (unless the store already has it, or this writer
    /// already stored it) and returns its reference. The blob is staged: it
    /// becomes visible to readers when the snapshot commits. All-zero input
    /// is *not* special-cased here: use the chunking puts for that.
    ///
    /// # Errors
    /// I/O errors; an error if the snapshot already committed or aborted;
    /// an error for chunks larger than [`MAX_CHUNK`].
    pub fn put_chunk(&self, bytes: &[u8]) -> Result<ChunkRef, StoreError> {
        let hash = BlobHash::of(bytes);
        self.put_hashed(hash, bytes)?;
        Ok(ChunkRef::Blob {
            blob: hash,
            len: bytes.len() as u64,
        })
    }

    /// Stores one chunk of a memory image: an all-zero chunk becomes a zero
    /// reference and is not stored; any other as [`BlobWriter::put_chunk`].
    /// Also says whether this call wrote a new blob (for the manifest's
    /// count of new chunks).
    ///
    /// # Errors
    /// As [`BlobWriter::put_chunk`].
    pub fn store_chunk(&self, bytes: &[u8]) -> Result<(ChunkRef, bool), StoreError> {
        if chunk::is_all_zero(bytes) {
            return Ok((
                ChunkRef::Zero {
                    zero: bytes.len() as u64,
                },
                false,
            ));
        }
        let hash = BlobHash::of(bytes);
        let new = self.put_hashed(hash, bytes)?;
        Ok((
            ChunkRef::Blob {
                blob: hash,
                len: bytes.len() as u64,
            },
            new,
        ))
    }

    /// Reads a chunk the store already holds (a zero reference reads as
    /// zeros) into `out`, its exact length, verified: for building a chunk
    /// from an earlier snapshot's version of it.
    ///
    /// # Errors
    /// [`StoreError::BadBlob`] if the blob is missing or damaged.
    ///
    /// # Panics
    /// If `out` is not as long as the chunk.
    pub fn read_chunk_into(&self, chunk: &ChunkRef, out: &mut [u8]) -> Result<(), StoreError> {
        assert_eq!(
            out.len() as u64,
            chunk.len(),
            "output is not as long as the chunk"
        );
        match *chunk {
            ChunkRef::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            ChunkRef::Blob { blob, .. } => self
                .shared
                .tenant
                .read_blob_into(&blob, out)
                .map_err(|problem| StoreError::BadBlob { hash: blob, problem }),
        }
    }

    /// The snapshot this writer writes.
    pub fn id(&self) -> &SnapshotId {
        &self.shared.id
    }

    /// Whether snapshot `number` of this writer's job is committed and not
    /// deleted: what a chunk reference into it relies on. An I/O error
    /// answers `false` (the caller then builds on nothing).
    pub fn job_snapshot_exists(&self, number: u64) -> bool {
        let id = SnapshotId::new(self.shared.id.job().clone(), number);
        self.shared.tenant.manifest_exists(&id).unwrap_or(false)
    }

    /// How many threads the store may use for one snapshot's blobs.
    pub fn threads(&self) -> usize {
        self.shared.tenant.options().threads.max(1)
    }

    /// Returns whether the blob was new to the store.
    pub(crate) fn put_hashed(&self, hash: BlobHash, bytes: &[u8]) -> Result<bool, StoreError> {
        let s = &*self.shared;
        if bytes.len() > MAX_CHUNK {
            return Err(StoreError::ManifestMismatch {
                id: s.id.clone(),
                reason: format!(
                    "chunk of {} bytes is larger than the maximum of {MAX_CHUNK}",
                    bytes.len()
                ),
            });
        }
        if s.pin.lock().unwrap().is_none() {
            return Err(StoreError::ManifestMismatch {
                id: s.id.clone(),
                reason: "the snapshot writer has already committed or aborted".into(),
            });
        }
        self.store_blob(hash, bytes.len() as u64, || {
            blob::encode(bytes, s.tenant.options().compression)
        })
    }

    /// Appends the blob file made by `encode` (see [`blob::encode`]) to
    /// this writer's open pack unless the store or this writer already has
    /// `hash`. Returns whether it was new.
    pub(crate) fn store_blob(
        &self,
        hash: BlobHash,
        plain_len: u64,
        encode: impl FnOnce() -> Vec<u8>,
    ) -> Result<bool, StoreError> {
        let s = &*self.shared;
        let tenant = &s.tenant;
        if s.seen.lock().unwrap().contains_key(&hash) {
            return Ok(false);
        }
        if let Some(found) = tenant.find_blob_live(&hash)? {
            s.seen.lock().unwrap().insert(hash, (found.stored_size(), false));
            return Ok(false);
        }
        {
            let mut seen = s.seen.lock().unwrap();
            if seen.contains_key(&hash) {
                return Ok(false); // another thread claimed it meanwhile
            }
            seen.insert(hash, (0, true));
        }
        let file = encode();
        let backend = tenant.backend();
        let io = |e| {
            s.broken.store(true, Ordering::Relaxed);
            StoreError::io("write pack", tenant.key("packs"), e)
        };
        let sealed = {
            let mut open = s.open.lock().unwrap();
            if open.is_none() {
                *open = Some(PackWriter::new(backend).map_err(io)?);
            }
            let pack = open.as_mut().expect("just opened");
            let entry = pack.append_file(hash, plain_len, &file).map_err(io)?;
            s.seen.lock().unwrap().insert(hash, (entry.record_len(), true));
            s.note_written(plain_len, entry.record_len());
            if pack.len() >= tenant.options().pack_size {
                open.take()
            } else {
                None
            }
        };
        if let Some(full) = sealed {
            // Sealed outside the lock: other threads start the next pack.
            let sealed = full.seal(tenant.options().sync).map_err(io)?;
            s.sealed.lock().unwrap().push(sealed);
        }
        Ok(true)
    }

    /// Stores the chunks `bounds` of `bytes` (zero chunks skipped when
    /// `skip_zero`) using up to `threads` threads; references in order.
    pub(crate) fn put_ranges(
        &self,
        bytes: &[u8],
        bounds: &[(usize, usize)],
        skip_zero: bool,
    ) -> Result<Vec<ChunkRef>, StoreError> {
        let one = |&(off, len): &(usize, usize)| -> Result<ChunkRef, StoreError> {
            let piece = &bytes[off..off + len];
            if skip_zero {
                return self.store_chunk(piece).map(|(chunk, _)| chunk);
            }
            self.put_chunk(piece)
        };
        let threads = self.threads();
        if threads <= 1 || bounds.len() < 4 {
            return bounds.iter().map(one).collect();
        }
        // Contiguous groups keep each thread's writes local; chunks are
        // similar in size so the split is balanced enough.
        let per = bounds.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = bounds
                .chunks(per)
                .map(|group| s.spawn(move || group.iter().map(one).collect::<Result<Vec<_>, _>>()))
                .collect();
            let mut out = Vec::with_capacity(bounds.len());
            for h in handles {
                out.extend(h.join().expect("writer thread panicked")?);
            }
            Ok(out)
        })
    }

    /// Cuts `bytes` into fixed `chunk_size` chunks (the last may be shorter),
    /// stores those not all-zero and not already present, and returns the
    /// references in order. For memory images.
    ///
    /// # Errors
    /// As [`BlobWriter::put_chunk`]; `chunk_size` must be 1..=[`MAX_CHUNK`].
    pub fn put_chunks_fixed(&self, bytes: &[u8], chunk_size: usize) -> Result<Vec<ChunkRef>, StoreError> {
        if chunk_size == 0 || chunk_size > MAX_CHUNK {
            return Err(StoreError::ManifestMismatch {
                id: self.shared.id.clone(),
                reason: format!("chunk size {chunk_size} is not within 1..={MAX_CHUNK}"),
            });
        }
        self.put_ranges(bytes, &chunk::fixed_boundaries(bytes.len(), chunk_size), true)
    }

    /// Cuts `bytes` with FastCDC ([`CDC_MIN`]/[`CDC_AVG`]/[`CDC_MAX`]),
    /// stores the chunks not all-zero and not already present, and returns
    /// the references in order. For canonical state.
    ///
    /// # Errors
    /// As [`BlobWriter::put_chunk`].
    pub fn put_chunks_cdc(&self, bytes: &[u8]) -> Result<Vec<ChunkRef>, StoreError> {
        self.put_ranges(bytes, &chunk::cdc_boundaries(bytes), true)
    }
}

impl SnapshotWriter {
    /// The id this writer commits.
    pub fn id(&self) -> &SnapshotId {
        &self.blobs.shared.id
    }

    /// A handle for putting blobs from other threads.
    pub fn blob_writer(&self) -> BlobWriter {
        self.blobs.clone()
    }

    /// A fresh manifest for this snapshot (id, job, number, created now).
    pub fn manifest(&self, kind: SnapshotKind, trigger: Trigger, format: StateFormat) -> Manifest {
        let id = self.id();
        Manifest::new(id.job().clone(), id.number(), kind, trigger, format)
    }

    /// See [`BlobWriter::put_chunk`].
    ///
    /// # Errors
    /// As there.
    pub fn put_chunk(&mut self, bytes: &[u8]) -> Result<ChunkRef, StoreError> {
        self.blobs.put_chunk(bytes)
    }

    /// See [`BlobWriter::put_chunks_fixed`].
    ///
    /// # Errors
    /// As there.
    pub fn put_chunks_fixed(&mut self, bytes: &[u8], chunk_size: usize) -> Result<Vec<ChunkRef>, StoreError> {
        self.blobs.put_chunks_fixed(bytes, chunk_size)
    }

    /// See [`BlobWriter::put_chunks_cdc`].
    ///
    /// # Errors
    /// As there.
    pub fn put_chunks_cdc(&mut self, bytes: &[u8]) -> Result<Vec<ChunkRef>, StoreError> {
        self.blobs.put_chunks_cdc(bytes)
    }

    /// Commits the snapshot: checks that `manifest` belongs to this writer
    /// and that every blob it references is in the store, enforces the quota,
    /// makes the blobs durable, then writes the manifest atomically (never
    /// replacing an existing one) and syncs its directory. Fills the store's
    /// figures (`new_bytes`, `stored_bytes`, `chunks_*`, `commit_ms`, and
    /// `logical_bytes` if 0) and `completed_at_ms`.
    ///
    /// Chunk references may come from earlier snapshots without being put
    /// again (incremental snapshots): commit checks they still exist.
    ///
    /// # Errors
    /// [`StoreError::ManifestMismatch`], [`StoreError::MissingBlobAtCommit`],
    /// [`StoreError::QuotaExceeded`], [`StoreError::AlreadyExists`], I/O
    /// errors. On error nothing is committed.
    pub fn commit(self, mut manifest: Manifest) -> Result<SnapshotId, StoreError> {
        let commit_start = Instant::now();
        let s = &*self.blobs.shared;
        let tenant = &s.tenant;
        let mismatch = |reason: String| StoreError::ManifestMismatch {
            id: s.id.clone(),
            reason,
        };
        if manifest.id != s.id || manifest.job != *s.id.job() || manifest.number != s.id.number() {
            return Err(mismatch(format!(
                "manifest is for {} (job {}, number {})",
                manifest.id, manifest.job, manifest.number
            )));
        }
        if s.broken.load(Ordering::Relaxed) {
            return Err(mismatch(
                "writing one of its packs failed earlier, so some of its blobs may be in no pack".into(),
            ));
        }
        manifest.schema_version = manifest.required_schema();
        manifest.status = SnapshotStatus::Complete;
        manifest.check_lengths().map_err(mismatch)?;

        // Every referenced blob must exist (or be staged by this writer). We
        // hold the pin, so none can disappear between this check and the
        // manifest write.
        let mut unique: HashMap<BlobHash, u64> = HashMap::new();
        // Packs this snapshot relies on that other writers wrote, with the
        // first reference into each (for the error if one is gone).
        let mut packs_used: HashMap<BlobHash, (String, usize, BlobHash)> = HashMap::new();
        {
            let seen = s.seen.lock().unwrap();
            let mut refreshed = false;
            for (task, index, c) in manifest.chunk_refs() {
                let Some(hash) = c.blob() else { continue };
                if unique.contains_key(&hash) {
                    continue;
                }
                if let Some(&(size, true)) = seen.get(&hash) {
                    unique.insert(hash, size);
                    continue;
                }
                let mut found = tenant.find_blob_live(&hash)?;
                if found.is_none() && !refreshed {
                    tenant.refresh_index()?;
                    refreshed = true;
                    found = tenant.find_blob_live(&hash)?;
                }
                let missing = || StoreError::MissingBlobAtCommit {
                    id: s.id.clone(),
                    task: task.to_string(),
                    index,
                    hash,
                };
                let found = found.ok_or_else(missing)?;
                if let Found::Packed { pack, .. } = found {
                    packs_used.entry(pack).or_insert((task.to_string(), index, hash));
                }
                unique.insert(hash, found.stored_size());
            }
        }
        // An index entry may name a pack that never became durable (its
        // writer died between rename and directory sync) or is gone. On
        // object storage a PUT is durable when it returns, and the grace
        // period keeps every pack of the view (checked below).
        if tenant.gc_grace().is_some() {
            packs_used.clear();
        }
        for (pack, (task, index, hash)) in &packs_used {
            let key = tenant.pack_key(pack);
            let present = tenant
                .backend()
                .size(&key)
                .map_err(|e| StoreError::io("stat pack", key, e))?;
            if present.is_none() {
                return Err(StoreError::MissingBlobAtCommit {
                    id: s.id.clone(),
                    task: task.clone(),
                    index: *index,
                    hash: *hash,
                });
            }
        }

        let f = &mut manifest.figures;
        if f.logical_bytes == 0 {
            f.logical_bytes = manifest.tasks.iter().map(|t| t.state.logical_bytes()).sum();
        }
        f.chunks_total = manifest
            .tasks
            .iter()
            .map(|t| t.state.chunks().count() as u64)
            .sum();
        f.chunks_new = s.written.load(Ordering::Relaxed);
        f.new_bytes = s.new_bytes.load(Ordering::Relaxed);
        f.stored_bytes = s.stored_bytes.load(Ordering::Relaxed);
        if f.async_ms == 0 {
            f.async_ms = self.started.elapsed().as_millis() as u64;
        }

        let mut usage = tenant.inner.usage.lock().unwrap();
        if let Some(quota) = tenant.options().quota_bytes {
            tenant.refresh_usage(&mut usage)?;
            let cache = usage.as_ref().expect("refreshed");
            let extra: u64 = unique
                .iter()
                .filter(|(h, _)| !cache.blobs.contains_key(h))
                .map(|(_, size)| size)
                .sum();
            let would_use = cache.total + extra;
            if would_use > quota {
                return Err(StoreError::QuotaExceeded {
                    tenant: tenant.inner.name.to_string(),
                    id: s.id.clone(),
                    would_use,
                    quota,
                });
            }
        }

        let backend = tenant.backend();
        let sync = tenant.options().sync;
        // Write order: packs durable, then their index, their names
        // durable, then the manifest.
        if let Some(open) = s.open.lock().unwrap().take() {
            let sealed = open
                .seal(sync)
                .map_err(|e| StoreError::io("write pack", tenant.key("packs"), e))?;
            s.sealed.lock().unwrap().push(sealed);
        }
        let sealed = std::mem::take(&mut *s.sealed.lock().unwrap());
        let own: Vec<BlobHash> = sealed.iter().map(|p| p.name).collect();
        tenant.publish_packs(sealed)?;
        self.check_view(&unique, &own)?;
        manifest.completed_at_ms = now_ms();
        manifest.figures.commit_ms = commit_start.elapsed().as_millis() as u64;
        if let Some(lease) = tenant.active_lease(s.id.job())
            && lease.is_lost()
        {
            // Not what keeps a fenced writer out (the put-if-absent below
            // is, against the successor's void); it only stops early.
            return Err(StoreError::LeaseLost {
                tenant: tenant.inner.name.to_string(),
                job: s.id.job().to_string(),
            });
        }
        let key = tenant.manifest_key(&s.id);
        let written = backend
            .put(&key, &manifest.to_json(), PutMode::NoReplace, sync)
            .map_err(|e| StoreError::io("write manifest", key.clone(), e))?;
        if !written {
            return Err(StoreError::AlreadyExists {
                tenant: tenant.inner.name.to_string(),
                id: s.id.clone(),
            });
        }
        if sync {
            backend.flush().map_err(|e| StoreError::io("sync", key, e))?;
        }
        if let Some(cache) = usage.as_mut() {
            cache.add(&s.id, unique);
        }
        drop(usage);
        if tenant.gc_grace().is_some() {
            // What retention lists next reads it from here.
            tenant
                .inner
                .manifests
                .lock()
                .unwrap()
                .insert(s.id.clone(), manifest);
        }

        // Keep the counter above every committed number, so a number used
        // by `begin` without `next_snapshot_number` (import) is never
        // reissued. A number of this process's lease is above it already
        // (the lease writes the counter when it is released).
        let job = s.id.job();
        let leased = tenant.active_lease(job).is_some_and(|l| l.holds(s.id.number()));
        if !leased && tenant.read_counter(job)? <= s.id.number() {
            let _guard = tenant.counter_lock(job)?;
            if tenant.read_counter(job)? <= s.id.number() {
                // At u64::MAX the counter stays there: the series is
                // exhausted (`next_snapshot_number` refuses).
                tenant.write_counter(job, s.id.number().saturating_add(1))?;
            }
        }
        s.pin.lock().unwrap().take();
        Ok(s.id.clone())
    }

    /// Abandons the snapshot (same as dropping it): nothing is committed and
    /// the blobs it wrote are garbage for the next GC.
    pub fn abort(self) {}

    /// On object storage, just before the manifest is written: the view
    /// of the packs this writer relied on must be younger than half the
    /// GC grace period. If it is not, look again: every blob referenced
    /// and not written here must be in a pack no GC condemned, and so
    /// must the packs written here.
    fn check_view(&self, unique: &HashMap<BlobHash, u64>, own: &[BlobHash]) -> Result<(), StoreError> {
        let s = &*self.blobs.shared;
        let tenant = &s.tenant;
        let Some(grace) = tenant.gc_grace() else {
            return Ok(());
        };
        let mut pin = s.pin.lock().unwrap();
        let Some(Pin::View(view)) = pin.as_mut() else {
            return Ok(());
        };
        if view.elapsed() < grace / 2 {
            return Ok(());
        }
        tenant.refresh_index()?;
        let fresh = tenant.inner.index.read().unwrap().view.expect("refreshed");
        let seen = s.seen.lock().unwrap();
        let stale = |reason: String| StoreError::ManifestMismatch {
            id: s.id.clone(),
            reason: format!("took longer than half the GC grace period ({grace:?}) and {reason}"),
        };
        for hash in unique.keys() {
            if matches!(seen.get(hash), Some((_, true))) {
                continue;
            }
            if tenant.find_blob_live(hash)?.is_none() {
                return Err(stale(format!("blob {hash} is now in no pack GC keeps")));
            }
        }
        let idx = tenant.inner.index.read().unwrap();
        if let Some(p) = own.iter().find(|p| idx.condemned.contains(*p)) {
            return Err(stale(format!("GC condemned its pack {p}")));
        }
        *view = fresh;
        Ok(())
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        let s = &self.blobs.shared;
        // Packs of an aborted (or failed) snapshot are never needed.
        if let Some(open) = s.open.lock().unwrap().take() {
            open.discard(s.tenant.backend());
        }
        for sealed in s.sealed.lock().unwrap().drain(..) {
            s.tenant.backend().discard(&sealed.staged);
        }
        // Release the pin; any BlobWriter clones stop accepting puts.
        s.pin.lock().unwrap().take();
        // Committed or abandoned: no longer a number the lease must keep
        // voidable.
        if let Some(lease) = s.tenant.active_lease(s.id.job()) {
            lease.done(s.id.number());
        }
    }
}
