//! One tenant's snapshots: naming, listing, the latest, expiry, deletion.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{Backend, LockGuard, LockMode};
use crate::index::MergedIndex;
use crate::{
    BlobHash, JobName, Manifest, SnapshotId, SnapshotKind, SnapshotStatus, StoreError, StoreInner,
    StoreOptions, TenantName,
};

/// One tenant's view of the store: the only way to reach snapshots.
/// Clone + Send + Sync.
#[derive(Clone, Debug)]
pub struct TenantStore {
    pub(crate) inner: Arc<TenantInner>,
}

#[derive(Debug)]
pub(crate) struct TenantInner {
    pub(crate) store: Arc<StoreInner>,
    pub(crate) name: TenantName,
    /// `tenants/<name>`: every key this tenant touches starts with it.
    pub(crate) prefix: String,
    /// Bytes referenced by the tenant's manifests, for quotas; built lazily.
    pub(crate) usage: Mutex<Option<UsageCache>>,
    /// When this process last started a GC of the tenant (see
    /// [`TenantStore::gc_if_due`]).
    pub(crate) last_gc: Mutex<Option<std::time::Instant>>,
    /// Every index file of the tenant merged, refreshed from `index/`.
    pub(crate) index: std::sync::RwLock<MergedIndex>,
    /// Whether `blobs/` (layout 1) has anything: 0 no, 1 yes, 2 unknown.
    pub(crate) loose: std::sync::atomic::AtomicU8,
    /// Leases of series this process holds on object storage, so that
    /// taking a number of a leased series goes through its lease.
    pub(crate) leases: Mutex<HashMap<JobName, std::sync::Weak<crate::lease::LeaseState>>>,
    /// Serialises refreshes on object storage, so that the view time of
    /// the merged index only moves forward.
    pub(crate) refreshing: Mutex<()>,
    /// Manifests listed and read (object storage only; see
    /// `TenantStore::get_listed`).
    pub(crate) manifests: Mutex<HashMap<SnapshotId, Manifest>>,
}

/// Which snapshots [`TenantStore::list`] returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this job.
    pub job: Option<JobName>,
    /// Only this kind.
    pub kind: Option<SnapshotKind>,
}

impl ListFilter {
    /// Every snapshot of every job.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only snapshots of `job`.
    pub fn job(job: &JobName) -> Self {
        ListFilter {
            job: Some(job.clone()),
            kind: None,
        }
    }

    /// Restricts to `kind`.
    pub fn kind(mut self, kind: SnapshotKind) -> Self {
        self.kind = Some(kind);
        self
    }
}

/// Distinct blobs of a manifest.
pub(crate) fn unique_blobs(m: &Manifest) -> HashSet<BlobHash> {
    m.chunk_refs().filter_map(|(_, _, c)| c.blob()).collect()
}

/// Reference counts of the blobs the tenant's manifests use, with the blobs'
/// stored sizes: what a quota counts.
#[derive(Debug, Default)]
pub(crate) struct UsageCache {
    pub(crate) manifests: HashSet<SnapshotId>,
    pub(crate) blobs: HashMap<BlobHash, (u64, u32)>,
    pub(crate) total: u64,
}

impl UsageCache {
    pub(crate) fn add(&mut self, id: &SnapshotId, blobs: impl IntoIterator<Item = (BlobHash, u64)>) {
        if !self.manifests.insert(id.clone()) {
            return;
        }
        for (hash, size) in blobs {
            let e = self.blobs.entry(hash).or_insert((size, 0));
            if e.1 == 0 {
                self.total += e.0;
            }
            e.1 += 1;
        }
    }

    pub(crate) fn remove(&mut self, id: &SnapshotId, blobs: impl IntoIterator<Item = BlobHash>) {
        if !self.manifests.remove(id) {
            return;
        }
        for hash in blobs {
            if let Some(e) = self.blobs.get_mut(&hash) {
                e.1 -= 1;
                if e.1 == 0 {
                    self.total -= e.0;
                    self.blobs.remove(&hash);
                }
            }
        }
    }
}

impl TenantStore {
    /// The tenant's name.
    pub fn name(&self) -> &TenantName {
        &self.inner.name
    }

    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.inner.store.backend
    }

    pub(crate) fn options(&self) -> &StoreOptions {
        &self.inner.store.options
    }

    /// The GC grace period on object storage (`None`: a directory, where
    /// writers pin with locks).
    pub(crate) fn gc_grace(&self) -> Option<Duration> {
        self.backend().gc_grace()
    }

    pub(crate) fn key(&self, rel: &str) -> String {
        format!("{}/{rel}", self.inner.prefix)
    }

    pub(crate) fn blob_key(&self, hash: &BlobHash) -> String {
        self.key(&hash.rel_path())
    }

    pub(crate) fn manifest_key(&self, id: &SnapshotId) -> String {
        self.key(&format!("snapshots/{}/{id}.json", id.job()))
    }

    pub(crate) fn lock(
        &self,
        name: &str,
        mode: LockMode,
        timeout: Option<Duration>,
    ) -> Result<Option<Box<dyn LockGuard>>, StoreError> {
        let key = self.key(&format!("locks/{name}"));
        self.backend()
            .lock(&key, mode, timeout)
            .map_err(|e| StoreError::io("lock", key, e))
    }

    pub(crate) fn manifest_exists(&self, id: &SnapshotId) -> Result<bool, StoreError> {
        let key = self.manifest_key(id);
        self.backend()
            .size(&key)
            .map(|s| s.is_some())
            .map_err(|e| StoreError::io("stat", key, e))
    }

    /// Reads the manifest of `id`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if the tenant has no such snapshot;
    /// [`StoreError::CorruptManifest`] / [`StoreError::UnsupportedSchema`] if
    /// it does not parse.
    pub fn get(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        let key = self.manifest_key(id);
        let bytes = match self.backend().read(&key) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    tenant: self.inner.name.to_string(),
                    id: id.clone(),
                });
            }
            // Something that is not a file where the manifest belongs is a
            // damaged manifest, not a failing disk.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(StoreError::CorruptManifest {
                    id: id.to_string(),
                    reason: e.to_string(),
                });
            }
            Err(e) => return Err(StoreError::io("read manifest", key, e)),
        };
        if bytes == crate::manifest::VOID_MANIFEST {
            // A number voided by a lease takeover: never a snapshot.
            return Err(StoreError::NotFound {
                tenant: self.inner.name.to_string(),
                id: id.clone(),
            });
        }
        Manifest::from_json(&id.to_string(), &bytes)
    }

    /// The lease of `job` this process holds, if any.
    pub(crate) fn active_lease(&self, job: &JobName) -> Option<Arc<crate::lease::LeaseState>> {
        self.inner
            .leases
            .lock()
            .unwrap()
            .get(job)
            .and_then(std::sync::Weak::upgrade)
    }

    /// Like `get`, but a snapshot deleted meanwhile (by another thread or
    /// process, between listing and reading) is `None` rather than an error.
    pub(crate) fn get_if_present(&self, id: &SnapshotId) -> Result<Option<Manifest>, StoreError> {
        match self.get(id) {
            Ok(m) => Ok(Some(m)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Jobs that have a snapshot directory, sorted.
    ///
    /// # Errors
    /// I/O errors.
    pub fn jobs(&self) -> Result<Vec<JobName>, StoreError> {
        let key = self.key("snapshots");
        let mut jobs: Vec<JobName> = self
            .backend()
            .list(&key)
            .map_err(|e| StoreError::io("list", key, e))?
            .iter()
            .filter_map(|n| JobName::new(n).ok())
            .collect();
        jobs.sort();
        Ok(jobs)
    }

    /// Ids of `job`'s committed snapshots in number order (manifests are not
    /// read, so damaged ones are included).
    ///
    /// # Errors
    /// I/O errors.
    pub fn list_ids(&self, job: &JobName) -> Result<Vec<SnapshotId>, StoreError> {
        let key = self.key(&format!("snapshots/{job}"));
        let mut ids: Vec<SnapshotId> = self
            .backend()
            .list(&key)
            .map_err(|e| StoreError::io("list", key, e))?
            .iter()
            .filter_map(|name| manifest_at(job.as_str(), name))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every snapshot whose manifest is at its own path, and every file
    /// under `snapshots/` named like a manifest (`*.json`) that is not --
    /// a renamed `wc-11.json`, one moved under another job -- as keys,
    /// sorted. Nothing lists the latter as snapshots, so GC refuses to run
    /// while they exist.
    ///
    /// # Errors
    /// I/O errors listing the directories.
    pub(crate) fn scan_manifests(&self) -> Result<(Vec<SnapshotId>, Vec<String>), StoreError> {
        let root = self.key("snapshots");
        let (mut ids, mut misplaced) = (Vec::new(), Vec::new());
        let entries = match self.backend().list(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((ids, misplaced)),
            Err(e) => return Err(StoreError::io("list", root, e)),
        };
        for dir in entries {
            let key = format!("{root}/{dir}");
            let Ok(names) = self.backend().list(&key) else {
                // A file, not a job's directory.
                if dir.ends_with(".json") {
                    misplaced.push(key);
                }
                continue;
            };
            for name in names {
                match manifest_at(&dir, &name) {
                    Some(id) => ids.push(id),
                    None if name.ends_with(".json") => misplaced.push(format!("{key}/{name}")),
                    None => {}
                }
            }
        }
        ids.sort();
        misplaced.sort();
        Ok((ids, misplaced))
    }

    pub(crate) fn all_ids(&self) -> Result<Vec<SnapshotId>, StoreError> {
        Ok(self.scan_manifests()?.0)
    }

    /// Manifests matching `filter`, ordered by job then number. Manifests that
    /// do not parse are skipped with a warning (`fsck` reports them).
    ///
    /// # Errors
    /// I/O errors listing or reading.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<Manifest>, StoreError> {
        let jobs = match &filter.job {
            Some(j) => vec![j.clone()],
            None => self.jobs()?,
        };
        let mut out = Vec::new();
        for job in jobs {
            let ids = self.list_ids(&job)?;
            self.forget_manifests_but(&job, &ids);
            for id in ids {
                match self.get_listed(&id) {
                    Ok(m) if filter.kind.is_none_or(|k| k == m.kind) => out.push(m),
                    Ok(_) | Err(StoreError::NotFound { .. }) => {}
                    Err(e @ (StoreError::CorruptManifest { .. } | StoreError::UnsupportedSchema { .. })) => {
                        tracing::warn!(tenant = %self.inner.name, "skipping snapshot: {e}");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// [`TenantStore::get`] of a snapshot just listed. On object storage
    /// a manifest read once is kept (it never changes once committed), so
    /// that retention, which lists a job's snapshots after checkpoints,
    /// costs one LIST rather than a GET per snapshot.
    fn get_listed(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        if self.gc_grace().is_none() {
            return self.get(id);
        }
        if let Some(m) = self.inner.manifests.lock().unwrap().get(id) {
            return Ok(m.clone());
        }
        let m = self.get(id)?;
        self.inner.manifests.lock().unwrap().insert(id.clone(), m.clone());
        Ok(m)
    }

    /// Drops the kept manifests of `job` that are no longer listed.
    fn forget_manifests_but(&self, job: &JobName, listed: &[SnapshotId]) {
        let listed: HashSet<&SnapshotId> = listed.iter().collect();
        self.inner
            .manifests
            .lock()
            .unwrap()
            .retain(|id, _| id.job() != job || listed.contains(id));
    }

    /// The newest complete snapshot of `job` whose manifest reads, of any
    /// kind.
    ///
    /// # Errors
    /// I/O errors.
    pub fn latest(&self, job: &JobName) -> Result<Option<Manifest>, StoreError> {
        let fence = self.fence(job)?;
        for id in self.list_ids(job)?.into_iter().rev() {
            if id.number() < fence {
                // An earlier run's: the run that started over discarded
                // the output those snapshots would restore alongside.
                break;
            }
            match self.get(&id) {
                Ok(m) if m.status == SnapshotStatus::Complete => return Ok(Some(m)),
                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                Err(e @ (StoreError::CorruptManifest { .. } | StoreError::UnsupportedSchema { .. })) => {
                    tracing::warn!(tenant = %self.inner.name, "skipping snapshot: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Snapshots of `job` and `kind` that a count/age policy would expire,
    /// oldest first. The newest is never returned. The store only answers;
    /// the caller deletes (and decides about persistent checkpoints).
    ///
    /// # Errors
    /// As [`TenantStore::list`].
    pub fn expired(
        &self,
        job: &JobName,
        kind: SnapshotKind,
        max_count: Option<usize>,
        max_age: Option<Duration>,
        now_ms: u64,
    ) -> Result<Vec<SnapshotId>, StoreError> {
        let all = self.list(&ListFilter::job(job).kind(kind))?;
        let mut out = Vec::new();
        for (age_rank, m) in all.iter().rev().enumerate() {
            if age_rank == 0 {
                continue;
            }
            let too_many = max_count.is_some_and(|n| age_rank >= n);
            let too_old =
                max_age.is_some_and(|a| now_ms.saturating_sub(m.created_at_ms) > a.as_millis() as u64);
            if too_many || too_old {
                out.push(m.id.clone());
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Deletes the snapshot's manifest (its blobs go at the next GC).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if there is no such snapshot.
    pub fn delete(&self, id: &SnapshotId) -> Result<(), StoreError> {
        let kept = self.inner.manifests.lock().unwrap().remove(id);
        let manifest = kept.map_or_else(|| self.get(id), Ok);
        if let Err(StoreError::NotFound { .. }) = manifest {
            return manifest.map(|_| ());
        }
        let key = self.manifest_key(id);
        let deleted = self
            .backend()
            .delete(&key)
            .and_then(|d| self.backend().flush().map(|()| d))
            .map_err(|e| StoreError::io("delete manifest", key, e))?;
        if !deleted {
            return Err(StoreError::NotFound {
                tenant: self.inner.name.to_string(),
                id: id.clone(),
            });
        }
        let mut usage = self.inner.usage.lock().unwrap();
        match (manifest, usage.as_mut()) {
            (Ok(m), Some(cache)) => cache.remove(id, unique_blobs(&m)),
            // A damaged manifest's references are unknown: rebuild later.
            (Err(_), _) => *usage = None,
            _ => {}
        }
        Ok(())
    }

    /// The newest snapshot of the same job older than `id` whose manifest
    /// reads and whose blobs are all present (checked by existence, not by
    /// content: cheap enough to call on an error path).
    ///
    /// # Errors
    /// I/O errors listing the job.
    pub fn next_intact_before(&self, id: &SnapshotId) -> Result<Option<SnapshotId>, StoreError> {
        self.refresh_index()?;
        for older in self.list_ids(id.job())?.into_iter().rev() {
            if older.number() >= id.number() {
                continue;
            }
            let Ok(m) = self.get(&older) else { continue };
            let all_present = unique_blobs(&m)
                .iter()
                .all(|h| matches!(self.blob_size(h), Ok(Some(_))));
            if all_present {
                return Ok(Some(older));
            }
        }
        Ok(None)
    }
}

/// The snapshot whose manifest `snapshots/<dir>/<name>` is, if it is at
/// that snapshot's own path (the id spelled as `SnapshotId` spells it).
pub(crate) fn manifest_at(dir: &str, name: &str) -> Option<SnapshotId> {
    let stem = name.strip_suffix(".json")?;
    SnapshotId::parse(stem)
        .ok()
        .filter(|id| id.job().as_str() == dir && id.to_string() == stem)
}
