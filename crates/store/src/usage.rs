//! What a tenant's snapshots occupy, for its quota.

use std::collections::HashSet;

use crate::tenant::UsageCache;
use crate::{BlobHash, SnapshotId, StoreError, TenantStore, unique_blobs};

impl TenantStore {
    /// Bytes of the blobs referenced by the tenant's manifests (each blob
    /// counted once, at its stored size): what the quota limits. Garbage not
    /// yet collected is not counted.
    ///
    /// # Errors
    /// Damaged manifests or I/O errors.
    pub fn usage_bytes(&self) -> Result<u64, StoreError> {
        let mut usage = self.inner.usage.lock().unwrap();
        self.refresh_usage(&mut usage)?;
        Ok(usage.as_ref().map_or(0, |u| u.total))
    }

    /// Brings the usage cache up to date with the manifests on disk (others
    /// may have been added or removed by other processes).
    pub(crate) fn refresh_usage(&self, usage: &mut Option<UsageCache>) -> Result<(), StoreError> {
        self.refresh_index()?;
        let ids: HashSet<SnapshotId> = self.all_ids()?.into_iter().collect();
        if usage.as_ref().is_some_and(|u| !u.manifests.is_subset(&ids)) {
            *usage = None; // something was deleted elsewhere: recount
        }
        let cache = usage.get_or_insert_with(UsageCache::default);
        let mut added: Vec<SnapshotId> = ids.difference(&cache.manifests).cloned().collect();
        added.sort();
        for id in &added {
            let m = match self.get(id) {
                Ok(m) => m,
                Err(StoreError::NotFound { .. }) => continue,
                // Unknown references count as nothing; fsck reports it, and
                // one bad manifest must not block every commit.
                Err(e @ (StoreError::CorruptManifest { .. } | StoreError::UnsupportedSchema { .. })) => {
                    tracing::warn!(tenant = %self.inner.name, "quota ignores snapshot: {e}");
                    cache.add(id, []);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut blobs = Vec::new();
            for hash in unique_blobs(&m) {
                let size = match cache.blobs.get(&hash) {
                    Some(&(size, _)) => size,
                    None => self.blob_size(&hash)?.unwrap_or(0),
                };
                blobs.push((hash, size));
            }
            cache.add(id, blobs);
        }
        Ok(())
    }

    /// Bytes blob `hash` occupies on disk (its record in a pack, or its
    /// loose file), `None` if the store does not have it.
    pub(crate) fn blob_size(&self, hash: &BlobHash) -> Result<Option<u64>, StoreError> {
        Ok(self.find_blob(hash)?.map(|f| f.stored_size()))
    }
}
