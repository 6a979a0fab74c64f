//! Migration of a layout-1 store: its loose blobs moved into packs
//! (docs/STORAGE.md, "Migrating a layout-1 store").
//!
//! Each pack is published with its index (durable) before the loose files
//! it holds are deleted, so a crash leaves every blob loose, packed or
//! both; a second run skips what is packed already and finishes the
//! deletes: the migration is resumable.

use std::collections::HashSet;

use crate::archive::Progress;
use crate::backend::LockMode;
use crate::blob::{self, BlobHash};
use crate::pack::{PackWriter, SealedPack};
use crate::{Store, StoreError, TenantStore};

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MigrateReport {
    /// Tenants looked at.
    pub tenants: usize,
    /// Loose blobs found.
    pub loose_blobs: usize,
    /// Blobs written into packs.
    pub blobs_packed: usize,
    /// Loose blobs that were packed already (an interrupted run).
    pub blobs_already_packed: usize,
    /// Loose blob files deleted (all of them, unless some are damaged).
    pub loose_removed: usize,
    /// Loose blobs that do not verify, left where they are for fsck.
    pub damaged: Vec<String>,
    /// Packs written.
    pub packs_written: usize,
    /// Loose bytes read.
    pub bytes: u64,
}

impl Store {
    /// Migrates every tenant (see [`TenantStore::migrate`]), after raising
    /// `store.json` to layout 2. `progress` counts loose bytes over all
    /// tenants.
    ///
    /// # Errors
    /// As [`TenantStore::migrate`].
    pub fn migrate(&self, progress: &mut dyn FnMut(Progress)) -> Result<MigrateReport, StoreError> {
        self.inner.upgrade_layout()?;
        let tenants: Vec<TenantStore> = self
            .tenants()?
            .iter()
            .map(|n| self.tenant(n.as_str()))
            .collect::<Result<_, _>>()?;
        let mut total = 0;
        for t in &tenants {
            for hash in t.all_blobs()? {
                total += t.blob_file_size(&hash)?;
            }
        }
        let mut report = MigrateReport::default();
        let mut done = 0;
        for t in &tenants {
            let r = t.migrate_loose(&mut |p: Progress| {
                progress(Progress {
                    done_bytes: done + p.done_bytes,
                    total_bytes: Some(total),
                });
            })?;
            done += r.bytes;
            report.tenants += 1;
            report.loose_blobs += r.loose_blobs;
            report.blobs_packed += r.blobs_packed;
            report.blobs_already_packed += r.blobs_already_packed;
            report.loose_removed += r.loose_removed;
            report.damaged.extend(r.damaged);
            report.packs_written += r.packs_written;
            report.bytes += r.bytes;
        }
        progress(Progress {
            done_bytes: total,
            total_bytes: Some(total),
        });
        Ok(report)
    }
}

impl TenantStore {
    fn blob_file_size(&self, hash: &BlobHash) -> Result<u64, StoreError> {
        let key = self.blob_key(hash);
        Ok(self
            .backend()
            .size(&key)
            .map_err(|e| StoreError::io("stat blob", key, e))?
            .unwrap_or(0))
    }

    /// Moves this tenant's loose blobs into packs. Holds the GC lock (no GC
    /// meanwhile) and a writer's pin (GC waits for it); writers go on.
    ///
    /// # Errors
    /// [`StoreError::Busy`] if a GC held the tenant for `gc_wait`; I/O
    /// errors (what was published stays; run it again).
    pub fn migrate_loose(&self, progress: &mut dyn FnMut(Progress)) -> Result<MigrateReport, StoreError> {
        self.inner.store.upgrade_layout()?;
        let wait = self.options().gc_wait;
        let busy = || {
            StoreError::Busy(format!(
                "migration of tenant {} waited {wait:?} for a gc",
                self.name()
            ))
        };
        let _gc = self
            .lock("gc", LockMode::Exclusive, Some(wait))?
            .ok_or_else(busy)?;
        let gate = self
            .lock("gate", LockMode::Shared, Some(wait))?
            .ok_or_else(busy)?;
        let _pin = self
            .lock("writers", LockMode::Shared, Some(wait))?
            .ok_or_else(busy)?;
        drop(gate);
        self.refresh_index()?;

        let loose = self.all_blobs()?;
        let mut report = MigrateReport {
            tenants: 1,
            loose_blobs: loose.len(),
            ..MigrateReport::default()
        };
        let total: u64 = loose
            .iter()
            .map(|h| self.blob_file_size(h))
            .sum::<Result<u64, _>>()?;
        let io = |e| StoreError::io("write pack", self.key("packs"), e);
        let mut open: Option<PackWriter> = None;
        let mut in_open: Vec<BlobHash> = Vec::new();
        let mut packed_already: Vec<BlobHash> = Vec::new();
        let mut queued: HashSet<BlobHash> = HashSet::new();
        let result = (|| {
            for hash in &loose {
                let key = self.blob_key(hash);
                let size = self.blob_file_size(hash)?;
                report.bytes += size;
                if self.inner.index.read().unwrap().get(hash).is_some() {
                    report.blobs_already_packed += 1;
                    packed_already.push(*hash);
                } else if queued.insert(*hash) {
                    let file = match self.backend().read(&key) {
                        Ok(f) => f,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                            report.damaged.push(format!("{key}: {e}"));
                            continue;
                        }
                        Err(e) => return Err(StoreError::io("read blob", key, e)),
                    };
                    let plain = match blob::decode(&file, hash, None) {
                        Ok(plain) => plain.len() as u64,
                        Err(problem) => {
                            report.damaged.push(format!("{key}: {problem}"));
                            continue;
                        }
                    };
                    if open.is_none() {
                        open = Some(PackWriter::new(self.backend()).map_err(io)?);
                    }
                    let w = open.as_mut().expect("just opened");
                    w.append_file(*hash, plain, &file).map_err(io)?;
                    in_open.push(*hash);
                    report.blobs_packed += 1;
                    if w.len() >= self.options().pack_size {
                        let sealed = open.take().expect("open").seal(self.options().sync).map_err(io)?;
                        self.publish_and_unlink(sealed, &mut in_open, &mut report)?;
                    }
                }
                progress(Progress {
                    done_bytes: report.bytes,
                    total_bytes: Some(total),
                });
            }
            if let Some(w) = open.take() {
                let sealed = w.seal(self.options().sync).map_err(io)?;
                self.publish_and_unlink(sealed, &mut in_open, &mut report)?;
            }
            // Packed by an interrupted run: the index is durable already.
            for hash in &packed_already {
                self.unlink_loose(hash, &mut report)?;
            }
            self.finish_unlinking()
        })();
        if let Err(e) = result {
            if let Some(w) = open {
                w.discard(self.backend());
            }
            return Err(e);
        }
        Ok(report)
    }

    /// Publishes one pack with its index, then deletes the loose files it
    /// now holds.
    fn publish_and_unlink(
        &self,
        sealed: SealedPack,
        hashes: &mut Vec<BlobHash>,
        report: &mut MigrateReport,
    ) -> Result<(), StoreError> {
        self.publish_packs(vec![sealed])?;
        report.packs_written += 1;
        for hash in hashes.drain(..) {
            self.unlink_loose(&hash, report)?;
        }
        Ok(())
    }

    fn unlink_loose(&self, hash: &BlobHash, report: &mut MigrateReport) -> Result<(), StoreError> {
        let key = self.blob_key(hash);
        if self
            .backend()
            .delete(&key)
            .map_err(|e| StoreError::io("delete blob", key, e))?
        {
            report.loose_removed += 1;
        }
        Ok(())
    }

    /// Makes the deletes durable and removes the emptied fan-out
    /// directories and `blobs/` itself, so readers stop looking there.
    fn finish_unlinking(&self) -> Result<(), StoreError> {
        let root = self.key("blobs");
        let backend = self.backend();
        for fan in backend
            .list(&root)
            .map_err(|e| StoreError::io("list", root.clone(), e))?
        {
            let dir = format!("{root}/{fan}");
            backend
                .remove_empty_dir(&dir)
                .map_err(|e| StoreError::io("remove", dir, e))?;
        }
        backend
            .remove_empty_dir(&root)
            .map_err(|e| StoreError::io("remove", root.clone(), e))?;
        if self.options().sync {
            backend.flush().map_err(|e| StoreError::io("sync", root, e))?;
        }
        self.recheck_loose_blobs();
        Ok(())
    }
}
