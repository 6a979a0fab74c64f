//! Garbage collection: mark and sweep of a tenant's blobs.
//!
//! Mark reads every manifest without any lock (writers keep going). Sweep
//! then closes the gate to new writers, waits for the writers in progress
//! to finish (their pins are shared locks, the sweep needs it exclusively),
//! re-reads the manifests committed meanwhile and deletes the blobs still
//! unreferenced. Writers that were waiting at the gate start after the sweep
//! and find deleted blobs missing, so they write them again.
//!
//! A manifest that does not parse stops GC: its references are unknown, and
//! deleting blobs it might use could destroy a snapshot that a newer build
//! (or a repaired manifest) could still restore.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::backend::LockMode;
use super::blob::BlobHash;
use super::error::StoreError;
use super::name::SnapshotId;
use super::{TenantStore, unique_blobs};

/// What a GC run found and freed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Manifests read (the live snapshots).
    pub snapshots: usize,
    /// Blob files found.
    pub blobs_scanned: usize,
    /// Blobs referenced by at least one manifest (kept).
    pub blobs_referenced: usize,
    /// Blobs deleted.
    pub blobs_removed: usize,
    /// On-disk bytes of the deleted blobs.
    pub bytes_freed: u64,
    /// Time spent, including waiting for writers, in milliseconds.
    pub duration_ms: u64,
    /// Time new writers were held back at the gate, in milliseconds.
    pub exclusive_ms: u64,
}

impl TenantStore {
    /// Like [`TenantStore::gc`], but only if no GC of this tenant started in
    /// this process within `min_interval`; returns `None` when skipped. A
    /// GC marks over all of the tenant's snapshots and holds new writers
    /// back while it deletes, so many jobs of one tenant must not each run
    /// one after every checkpoint.
    ///
    /// # Errors
    /// As [`TenantStore::gc`].
    pub fn gc_if_due(&self, min_interval: std::time::Duration) -> Result<Option<GcReport>, StoreError> {
        {
            let mut last = self.inner.last_gc.lock().unwrap();
            if last.is_some_and(|t| t.elapsed() < min_interval) {
                return Ok(None);
            }
            // Claim the slot before running, so concurrent callers skip.
            *last = Some(std::time::Instant::now());
        }
        self.gc().map(Some)
    }

    /// Deletes blobs no manifest references. Blobs of snapshots in progress
    /// are kept (see the module docs for the protocol).
    ///
    /// # Errors
    /// [`StoreError::CorruptManifest`] / [`StoreError::UnsupportedSchema`]
    /// naming a manifest that does not read, [`StoreError::MisplacedManifest`]
    /// naming a manifest-like file that is not where a manifest belongs
    /// (nothing is deleted);
    /// [`StoreError::Busy`] if writers stayed active for longer than
    /// `StoreOptions::gc_wait` (e.g. `gc` called by a thread that holds a
    /// `SnapshotWriter`); I/O errors.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let start = Instant::now();
        let mut report = GcReport::default();
        let (listed, misplaced) = self.scan_manifests()?;
        if let Some(path) = misplaced.into_iter().next() {
            return Err(StoreError::MisplacedManifest { path });
        }

        // Mark, while writers keep working.
        let mut ids: HashSet<SnapshotId> = listed.into_iter().collect();
        let mut referenced: HashSet<BlobHash> = HashSet::new();
        for id in &ids {
            if let Some(m) = self.get_if_present(id)? {
                referenced.extend(unique_blobs(&m));
            }
        }
        let mut candidates: Vec<BlobHash> = self
            .all_blobs()?
            .into_iter()
            .inspect(|_| report.blobs_scanned += 1)
            .filter(|h| !referenced.contains(h))
            .collect();

        // Sweep, alone.
        let wait = self.options().gc_wait;
        let deadline = start + wait;
        let busy = || {
            StoreError::Busy(format!(
                "gc of tenant {} waited {wait:?} for snapshots in progress to finish",
                self.name()
            ))
        };
        let _gate = self
            .lock("gate", LockMode::Exclusive, Some(remaining(deadline)))?
            .ok_or_else(busy)?;
        let exclusive_start = Instant::now();
        let _writers = self
            .lock("writers", LockMode::Exclusive, Some(remaining(deadline)))?
            .ok_or_else(busy)?;
        for id in self.all_ids()? {
            if !ids.contains(&id) {
                if let Some(m) = self.get_if_present(&id)? {
                    referenced.extend(unique_blobs(&m));
                }
                ids.insert(id);
            }
        }
        candidates.retain(|h| !referenced.contains(h));
        let backend = self.backend();
        for hash in &candidates {
            let key = self.blob_key(hash);
            let size = backend.size(&key).ok().flatten().unwrap_or(0);
            if backend
                .delete(&key)
                .map_err(|e| StoreError::io("delete blob", key, e))?
            {
                report.blobs_removed += 1;
                report.bytes_freed += size;
            }
        }
        backend
            .flush()
            .map_err(|e| StoreError::io("sync", self.key("blobs"), e))?;
        report.exclusive_ms = exclusive_start.elapsed().as_millis() as u64;
        report.snapshots = ids.len();
        report.blobs_referenced = report.blobs_scanned - candidates.len();
        report.duration_ms = start.elapsed().as_millis() as u64;
        tracing::info!(tenant = %self.name(), ?report, "gc done");
        Ok(report)
    }

    /// Every blob file with a valid name in the right fan-out directory.
    pub(crate) fn all_blobs(&self) -> Result<Vec<BlobHash>, StoreError> {
        let (good, _stray) = self.scan_blobs()?;
        Ok(good)
    }

    /// Blob files with valid names, and store-relative paths of other files
    /// found among the blobs.
    pub(crate) fn scan_blobs(&self) -> Result<(Vec<BlobHash>, Vec<String>), StoreError> {
        let backend = self.backend();
        let root = self.key("blobs");
        let mut good = Vec::new();
        let mut stray = Vec::new();
        let fans = backend
            .list(&root)
            .map_err(|e| StoreError::io("list", root.clone(), e))?;
        for fan in fans {
            let dir = format!("{root}/{fan}");
            let names = match backend.list(&dir) {
                Ok(names) => names,
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    stray.push(dir);
                    continue;
                }
                Err(e) => return Err(StoreError::io("list", dir, e)),
            };
            for name in names {
                match BlobHash::parse(&name) {
                    Ok(h) if name.starts_with(&fan) && fan.len() == 2 => good.push(h),
                    _ => stray.push(format!("{dir}/{name}")),
                }
            }
        }
        Ok((good, stray))
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
