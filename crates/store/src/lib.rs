//! The unified content-addressed snapshot store.
//!
//! One directory holds every checkpoint and savepoint of every job, per
//! tenant: task state is cut into chunks stored once as blobs named by their
//! blake3 hash, and each snapshot is a small JSON [`Manifest`] referencing
//! blobs by hash. Checkpoints and savepoints therefore share storage and
//! dedupe against each other, and are listed, read, exported and garbage
//! collected the same way. The on-disk format is specified in
//! `docs/STORAGE.md`.
//!
//! ```
//! use memento::store::*;
//! # let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path(), StoreOptions::default())?;
//! let tenant = store.tenant("default")?;
//! let job = JobName::new("wordcount")?;
//!
//! let number = tenant.next_snapshot_number(&job)?;
//! let mut writer = tenant.begin(&job, number)?;
//! let state = b"the operator's canonical state".repeat(1000);
//! let chunks = writer.put_chunks_cdc(&state)?;
//! let mut manifest =
//!     writer.manifest(SnapshotKind::Checkpoint, Trigger::Periodic, StateFormat::Canonical);
//! manifest.tasks.push(TaskState {
//!     key: TaskKey::new("count", 0),
//!     state: TaskStateData::Canonical { len: state.len() as u64, chunks: chunks.clone() },
//! });
//! let id = writer.commit(manifest)?;
//!
//! let latest = tenant.latest(&job)?.unwrap();
//! assert_eq!(latest.id, id);
//! let bytes = tenant.read_chunks(&id, &TaskKey::new("count", 0), &chunks)?;
//! assert_eq!(bytes, state);
//! # Ok::<(), StoreError>(())
//! ```
//!
//! # Concepts
//!
//! * **Write order** (what makes crashes harmless): new blobs are *staged*
//!   in temporary files while the snapshot is written; at commit they are
//!   synced and renamed into place as one batch, their directories synced,
//!   and the manifest is written last and never overwritten. A snapshot
//!   exists exactly when its manifest does, a manifest only ever names
//!   durable blobs, and an aborted snapshot leaves nothing behind.
//! * **Pins**: a [`SnapshotWriter`] holds a shared lock from `begin` until
//!   commit, abort or drop; [`TenantStore::gc`] deletes only while holding it
//!   exclusively, so blobs of snapshots in progress (in this process or any
//!   other) are never collected.
//! * **Tenancy**: every tenant has its own blobs and manifests under
//!   `tenants/<name>/`; a [`TenantStore`] can only name paths inside its own
//!   directory, so ids of other tenants' snapshots resolve to "not found".
//! * **Threading**: [`Store`], [`TenantStore`] and [`BlobWriter`] are cheap
//!   to clone, `Send` and `Sync`. Large puts and reads use up to
//!   [`StoreOptions::threads`] threads.
//!
//! The store knows nothing of Wasm, plugins, jobs or the runtime -- its
//! crate depends on none of them: it stores bytes under the names it is
//! given (a snapshot's "job" is the name of its series, see [`SeriesLease`])
//! and answers questions (list, latest, expired) without deciding policy.

mod archive;
mod backend;
mod blob;
mod chunk;
mod error;
mod fsck;
mod gc;
mod manifest;
mod name;
mod series;

pub use archive::{ArchiveSummary, Progress};
pub use backend::{Backend, LocalDir, LockGuard, LockMode, PutMode, Staged};
pub use blob::{BlobHash, Compression};
pub use chunk::{CDC_AVG, CDC_MAX, CDC_MIN, ChunkRef, DEFAULT_FIXED_CHUNK, MAX_CHUNK};
pub use error::{BadChunk, BlobProblem, StoreError};
pub use fsck::{DamagedSnapshot, FsckReport};
pub use gc::GcReport;
pub use manifest::{
    Figures, MANIFEST_SCHEMA_VERSION, Manifest, MemoryImage, Retention, SnapshotKind, SnapshotStatus,
    SourcePosition, StateFormat, TaskKey, TaskState, TaskStateData, Trigger, now_ms,
};
pub use name::{ID_NUMBER_WIDTH, JobName, MAX_NAME_LEN, SnapshotId, TenantName};
pub use series::SeriesLease;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Name of the file at the root identifying a store and its layout version.
pub const STORE_FILE: &str = "store.json";
/// Layout version of the store directory written by this build.
pub const STORE_VERSION: u32 = 1;

/// Options of a [`Store`]; `StoreOptions::default()` is what the host uses.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Codec for newly written blobs (default none; see
    /// [`Compression::default`]). Readers handle every codec, so this may
    /// change between runs.
    pub compression: Compression,
    /// Per-tenant quota on the bytes of blobs referenced by the tenant's
    /// manifests, checked at commit (default: none).
    pub quota_bytes: Option<u64>,
    /// Sync file data before renaming and directories before the manifest
    /// (default true). Turning it off keeps crash safety against process
    /// death but not against power loss; tests and benchmarks use it.
    pub sync: bool,
    /// Threads used to hash, compress and write (or read and verify) the
    /// chunks of one large put or read (default: available parallelism, at
    /// most 4).
    pub threads: usize,
    /// How long `gc` waits for in-progress snapshots to finish before giving
    /// up with [`StoreError::Busy`] (default 60 s).
    pub gc_wait: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            compression: Compression::default(),
            quota_bytes: None,
            sync: true,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()).min(4),
            gc_wait: Duration::from_secs(60),
        }
    }
}

/// Handle to one store root directory. Clone + Send + Sync.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    backend: Arc<dyn Backend>,
    options: StoreOptions,
    /// One shared state per tenant, so that clones and repeated
    /// `tenant()` calls share caches and locks.
    tenants: Mutex<HashMap<TenantName, Arc<TenantInner>>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoreFile {
    format: String,
    version: u32,
}

impl Store {
    /// Opens the store at `root`, creating it if missing, and removes
    /// temporary files left by writers that died.
    ///
    /// # Errors
    /// [`StoreError::StoreFormat`] if `root` holds a store of another version
    /// or a damaged `store.json`; [`StoreError::Io`] otherwise.
    pub fn open(root: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let backend =
            LocalDir::open(root).map_err(|e| StoreError::io("open store", root.display().to_string(), e))?;
        Self::with_backend(Arc::new(backend), options, &root.display().to_string())
    }

    /// Opens a store on any [`Backend`]. `label` names it in errors.
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn with_backend(
        backend: Arc<dyn Backend>,
        options: StoreOptions,
        label: &str,
    ) -> Result<Store, StoreError> {
        let format_err = |reason: String| StoreError::StoreFormat {
            root: label.to_string(),
            reason,
        };
        match backend.read(STORE_FILE) {
            Ok(bytes) => {
                let f: StoreFile = serde_json::from_slice(&bytes)
                    .map_err(|e| format_err(format!("{STORE_FILE} is damaged: {e}")))?;
                if f.format != "memento-store" {
                    return Err(format_err(format!("{STORE_FILE} is not a memento store")));
                }
                if f.version != STORE_VERSION {
                    return Err(format_err(format!(
                        "store layout version {} (this build reads {STORE_VERSION})",
                        f.version
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = StoreFile {
                    format: "memento-store".into(),
                    version: STORE_VERSION,
                };
                let bytes = serde_json::to_vec_pretty(&f).expect("serializable");
                backend
                    .put(STORE_FILE, &bytes, PutMode::NoReplace, options.sync)
                    .and_then(|_| backend.flush())
                    .map_err(|e| StoreError::io("create", STORE_FILE, e))?;
            }
            Err(e) => return Err(StoreError::io("read", STORE_FILE, e)),
        }
        let removed = backend
            .remove_stale_temp()
            .map_err(|e| StoreError::io("clean", "tmp", e))?;
        if removed > 0 {
            tracing::info!(removed, "removed temporary files of interrupted writers");
        }
        Ok(Store {
            inner: Arc::new(StoreInner {
                backend,
                options,
                tenants: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.options
    }

    /// The namespace of tenant `name`. Creates nothing on disk until the
    /// tenant writes.
    ///
    /// # Errors
    /// [`StoreError::InvalidName`] if `name` is not a valid tenant name.
    pub fn tenant(&self, name: &str) -> Result<TenantStore, StoreError> {
        let name = TenantName::new(name)?;
        let mut tenants = self.inner.tenants.lock().unwrap();
        let inner = tenants
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(TenantInner {
                    store: self.inner.clone(),
                    prefix: format!("tenants/{name}"),
                    name,
                    usage: Mutex::new(None),
                    last_gc: Mutex::new(None),
                })
            })
            .clone();
        Ok(TenantStore { inner })
    }

    /// Tenants that have anything stored, sorted.
    ///
    /// # Errors
    /// I/O errors listing the root.
    pub fn tenants(&self) -> Result<Vec<TenantName>, StoreError> {
        let mut names: Vec<TenantName> = self
            .inner
            .backend
            .list("tenants")
            .map_err(|e| StoreError::io("list", "tenants", e))?
            .iter()
            .filter_map(|n| TenantName::new(n).ok())
            .collect();
        names.sort();
        Ok(names)
    }
}

/// One tenant's view of the store: the only way to reach snapshots.
/// Clone + Send + Sync.
#[derive(Clone, Debug)]
pub struct TenantStore {
    inner: Arc<TenantInner>,
}

#[derive(Debug)]
struct TenantInner {
    store: Arc<StoreInner>,
    name: TenantName,
    /// `tenants/<name>`: every key this tenant touches starts with it.
    prefix: String,
    /// Bytes referenced by the tenant's manifests, for quotas; built lazily.
    usage: Mutex<Option<UsageCache>>,
    /// When this process last started a GC of the tenant (see
    /// [`TenantStore::gc_if_due`]).
    last_gc: Mutex<Option<std::time::Instant>>,
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

/// Reference counts of the blobs the tenant's manifests use, with the blobs'
/// stored sizes: what a quota counts.
#[derive(Debug, Default)]
struct UsageCache {
    manifests: HashSet<SnapshotId>,
    blobs: HashMap<BlobHash, (u64, u32)>,
    total: u64,
}

impl UsageCache {
    fn add(&mut self, id: &SnapshotId, blobs: impl IntoIterator<Item = (BlobHash, u64)>) {
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

    fn remove(&mut self, id: &SnapshotId, blobs: impl IntoIterator<Item = BlobHash>) {
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

/// Distinct blobs of a manifest.
fn unique_blobs(m: &Manifest) -> HashSet<BlobHash> {
    m.chunk_refs().filter_map(|(_, _, c)| c.blob()).collect()
}

impl TenantStore {
    /// The tenant's name.
    pub fn name(&self) -> &TenantName {
        &self.inner.name
    }

    fn backend(&self) -> &dyn Backend {
        &*self.inner.store.backend
    }

    fn options(&self) -> &StoreOptions {
        &self.inner.store.options
    }

    fn key(&self, rel: &str) -> String {
        format!("{}/{rel}", self.inner.prefix)
    }

    fn blob_key(&self, hash: &BlobHash) -> String {
        self.key(&hash.rel_path())
    }

    fn manifest_key(&self, id: &SnapshotId) -> String {
        self.key(&format!("snapshots/{}/{id}.json", id.job()))
    }

    fn counter_key(&self, job: &JobName) -> String {
        self.key(&format!("counters/{job}"))
    }

    /// The lock of `job`'s counter: per job, so that jobs sharing a tenant
    /// do not queue behind each other's counter fsyncs.
    fn counter_lock(&self, job: &JobName) -> Result<Option<Box<dyn LockGuard>>, StoreError> {
        self.lock(&format!("counter.{job}"), LockMode::Exclusive, None)
    }

    fn lock(
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

    /// Returns the number for the next snapshot of `job` and advances the
    /// job's counter durably. One counter per job, shared by checkpoints and
    /// savepoints; never reissues a number, even after deletes and restarts
    /// (it is also kept above every number committed).
    ///
    /// # Errors
    /// I/O errors, or a damaged counter file.
    pub fn next_snapshot_number(&self, job: &JobName) -> Result<u64, StoreError> {
        // The lock makes read-increment-write atomic across threads and
        // processes.
        let _guard = self.counter_lock(job)?;
        let stored = self.read_counter(job)?;
        let above_existing = self.list_ids(job)?.last().map_or(1, |id| id.number() + 1);
        let n = stored.max(above_existing);
        self.write_counter(job, n + 1)?;
        Ok(n)
    }

    fn read_counter(&self, job: &JobName) -> Result<u64, StoreError> {
        Ok(self.read_number(self.counter_key(job), COUNTER)?.unwrap_or(1))
    }

    fn write_counter(&self, job: &JobName, next: u64) -> Result<(), StoreError> {
        self.write_number(self.counter_key(job), COUNTER, next)
    }

    /// A small file holding one decimal number (`None` if it is missing).
    fn read_number(&self, key: String, what: NumberFile) -> Result<Option<u64>, StoreError> {
        match self.backend().read(&key) {
            Ok(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Some)
                .ok_or_else(|| {
                    StoreError::io(
                        what.parse,
                        key,
                        io::Error::new(io::ErrorKind::InvalidData, "not a decimal number"),
                    )
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(what.read, key, e)),
        }
    }

    /// Replace such a file, durably when the store syncs.
    fn write_number(&self, key: String, what: NumberFile, n: u64) -> Result<(), StoreError> {
        let sync = self.options().sync;
        self.backend()
            .put(&key, format!("{n}\n").as_bytes(), PutMode::Replace, sync)
            .and_then(|_| if sync { self.backend().flush() } else { Ok(()) })
            .map_err(|e| StoreError::io(what.write, key, e))
    }

    /// Starts writing snapshot `number` of `job`. Blobs the writer stores (or
    /// finds already present) are protected from GC until it commits, aborts
    /// or is dropped. Waits while a GC is deleting.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] if that snapshot is committed; I/O
    /// errors.
    pub fn begin(&self, job: &JobName, number: u64) -> Result<SnapshotWriter, StoreError> {
        let id = SnapshotId::new(job.clone(), number);
        // The gate lets a GC that is waiting for writers stop new ones from
        // starting, so a busy store cannot starve it.
        let gate = self.lock("gate", LockMode::Shared, None)?;
        let pin = self
            .lock("writers", LockMode::Shared, None)?
            .expect("waits without timeout");
        drop(gate);
        if self.manifest_exists(&id)? {
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
            pending: Mutex::new(Vec::new()),
            written: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
        });
        Ok(SnapshotWriter {
            blobs: BlobWriter { shared },
            started: Instant::now(),
        })
    }

    fn manifest_exists(&self, id: &SnapshotId) -> Result<bool, StoreError> {
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
            Err(e) => return Err(StoreError::io("read manifest", key, e)),
        };
        Manifest::from_json(&id.to_string(), &bytes)
    }

    /// Like `get`, but a snapshot deleted meanwhile (by another thread or
    /// process, between listing and reading) is `None` rather than an error.
    fn get_if_present(&self, id: &SnapshotId) -> Result<Option<Manifest>, StoreError> {
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
            .filter_map(|n| n.strip_suffix(".json"))
            .filter_map(|stem| SnapshotId::parse(stem).ok())
            .filter(|id| id.job() == job)
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn all_ids(&self) -> Result<Vec<SnapshotId>, StoreError> {
        let mut ids = Vec::new();
        for job in self.jobs()? {
            ids.extend(self.list_ids(&job)?);
        }
        Ok(ids)
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
            for id in self.list_ids(&job)? {
                match self.get(&id) {
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
        let manifest = self.get(id);
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
    fn refresh_usage(&self, usage: &mut Option<UsageCache>) -> Result<(), StoreError> {
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

    fn blob_size(&self, hash: &BlobHash) -> Result<Option<u64>, StoreError> {
        let key = self.blob_key(hash);
        self.backend()
            .size(&key)
            .map_err(|e| StoreError::io("stat blob", key, e))
    }

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

    /// Reads blob `blob` into `out` (its exact plaintext length) and
    /// verifies it. A raw blob is read straight into `out`; a compressed
    /// one through a buffer.
    fn read_blob_into(&self, blob: &BlobHash, out: &mut [u8]) -> Result<(), BlobProblem> {
        let key = self.blob_key(blob);
        let io_problem = |e: io::Error| match e.kind() {
            io::ErrorKind::NotFound => BlobProblem::Missing,
            _ => BlobProblem::Unreadable(e.to_string()),
        };
        let mut head = [0u8; blob::BLOB_HEADER_LEN];
        if self
            .backend()
            .read_split(&key, &mut head, out)
            .map_err(io_problem)?
            && blob::is_raw(&head)?
        {
            return blob::verify(out, blob);
        }
        let file = self.backend().read(&key).map_err(io_problem)?;
        blob::decode_into(&file, blob, out)
    }

    /// Fills the slots from their blobs using up to `threads` threads;
    /// returns the first failure (lowest chunk index) if any.
    fn read_slots(
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

    /// The newest snapshot of the same job older than `id` whose manifest
    /// reads and whose blobs are all present (checked by existence, not by
    /// content: cheap enough to call on an error path).
    ///
    /// # Errors
    /// I/O errors listing the job.
    pub fn next_intact_before(&self, id: &SnapshotId) -> Result<Option<SnapshotId>, StoreError> {
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

/// Writes the blobs of one snapshot and commits its manifest.
///
/// Dropping it without `commit` aborts: the manifest is never written, the
/// pin is released, and the blobs it wrote become garbage for the next GC.
#[derive(Debug)]
pub struct SnapshotWriter {
    blobs: BlobWriter,
    started: Instant,
}

/// The actions naming a small number file in errors.
#[derive(Clone, Copy)]
struct NumberFile {
    read: &'static str,
    parse: &'static str,
    write: &'static str,
}

const COUNTER: NumberFile = NumberFile {
    read: "read counter",
    parse: "parse counter",
    write: "write counter",
};

/// A handle for storing blobs of one snapshot from several threads.
/// Clone + Send + Sync; obtained from [`SnapshotWriter::blob_writer`].
/// After the snapshot commits or aborts, puts fail.
#[derive(Debug, Clone)]
pub struct BlobWriter {
    shared: Arc<WriterShared>,
}

#[derive(Debug)]
struct WriterShared {
    tenant: TenantStore,
    id: SnapshotId,
    /// The shared `writers` lock: GC cannot delete while it is held. `None`
    /// once the writer committed or aborted.
    pin: Mutex<Option<Box<dyn LockGuard>>>,
    /// Blobs known to be in the store (written or found): no need to look
    /// again, and commit can skip checking them.
    seen: Mutex<HashMap<BlobHash, u64>>,
    /// Blobs written by this writer but not yet visible: staged files and
    /// their keys, published at commit (one durability batch), discarded on
    /// abort.
    pending: Mutex<Vec<(Staged, String)>>,
    written: AtomicU64,
    new_bytes: AtomicU64,
    stored_bytes: AtomicU64,
}

impl WriterShared {
    fn note_written(&self, plain: u64, stored: u64) {
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
    fn put_hashed(&self, hash: BlobHash, bytes: &[u8]) -> Result<bool, StoreError> {
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
        if s.seen.lock().unwrap().contains_key(&hash) {
            return Ok(false);
        }
        self.store_blob(hash, bytes.len() as u64, || {
            blob::encode(bytes, s.tenant.options().compression)
        })
    }

    /// Stages the blob file made by `encode` unless the store already has
    /// `hash`. Returns whether it was new.
    pub(crate) fn store_blob(
        &self,
        hash: BlobHash,
        plain_len: u64,
        encode: impl FnOnce() -> Vec<u8>,
    ) -> Result<bool, StoreError> {
        let s = &*self.shared;
        let key = s.tenant.blob_key(&hash);
        let backend = s.tenant.backend();
        let present = backend
            .size(&key)
            .map_err(|e| StoreError::io("stat blob", key.clone(), e))?;
        let (size, new) = match present {
            Some(size) => (size, false),
            None => {
                let file = encode();
                let staged = backend
                    .stage(&file, s.tenant.options().sync)
                    .map_err(|e| StoreError::io("write blob", key.clone(), e))?;
                s.pending.lock().unwrap().push((staged, key));
                s.note_written(plain_len, file.len() as u64);
                (file.len() as u64, true)
            }
        };
        s.seen.lock().unwrap().insert(hash, size);
        Ok(new)
    }

    /// Stores the chunks `bounds` of `bytes` (zero chunks skipped when
    /// `skip_zero`) using up to `threads` threads; references in order.
    fn put_ranges(
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
        manifest.schema_version = MANIFEST_SCHEMA_VERSION;
        manifest.status = SnapshotStatus::Complete;
        manifest.check_lengths().map_err(mismatch)?;

        // Every referenced blob must exist (or be staged by this writer). We
        // hold the pin, so none can disappear between this check and the
        // manifest write.
        let mut unique: HashMap<BlobHash, u64> = HashMap::new();
        {
            let seen = s.seen.lock().unwrap();
            for (task, index, c) in manifest.chunk_refs() {
                let Some(hash) = c.blob() else { continue };
                if unique.contains_key(&hash) {
                    continue;
                }
                if let Some(&size) = seen.get(&hash) {
                    unique.insert(hash, size);
                    continue;
                }
                match tenant.blob_size(&hash)? {
                    Some(size) => unique.insert(hash, size),
                    None => {
                        return Err(StoreError::MissingBlobAtCommit {
                            id: s.id.clone(),
                            task: task.to_string(),
                            index,
                            hash,
                        });
                    }
                };
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
        // Write order: blobs durable and visible, their names durable, then
        // the manifest.
        let pending = std::mem::take(&mut *s.pending.lock().unwrap());
        backend
            .publish(&pending, sync)
            .map_err(|e| StoreError::io("publish blobs", tenant.key("blobs"), e))?;
        if sync {
            backend
                .flush()
                .map_err(|e| StoreError::io("sync", tenant.key("blobs"), e))?;
        }
        manifest.completed_at_ms = now_ms();
        manifest.figures.commit_ms = commit_start.elapsed().as_millis() as u64;
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

        // Keep the counter above every committed number, so a number used
        // by `begin` without `next_snapshot_number` (import) is never reissued.
        let job = s.id.job();
        if tenant.read_counter(job)? <= s.id.number() {
            let _guard = tenant.counter_lock(job)?;
            if tenant.read_counter(job)? <= s.id.number() {
                tenant.write_counter(job, s.id.number() + 1)?;
            }
        }
        s.pin.lock().unwrap().take();
        Ok(s.id.clone())
    }

    /// Abandons the snapshot (same as dropping it): nothing is committed and
    /// the blobs it wrote are garbage for the next GC.
    pub fn abort(self) {}
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        let s = &self.blobs.shared;
        // Staged blobs of an aborted (or failed) snapshot are never needed.
        for (staged, _) in s.pending.lock().unwrap().drain(..) {
            s.tenant.backend().discard(&staged);
        }
        // Release the pin; any BlobWriter clones stop accepting puts.
        s.pin.lock().unwrap().take();
    }
}

#[cfg(test)]
mod tests;
