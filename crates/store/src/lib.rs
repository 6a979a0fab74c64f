//! The unified content-addressed snapshot store.
//!
//! One directory holds every checkpoint and savepoint of every job, per
//! tenant: task state is cut into chunks stored once as blobs named by their
//! blake3 hash, many blobs to a pack file found through index files, and
//! each snapshot is a small JSON [`Manifest`] referencing blobs by hash. Checkpoints and savepoints therefore share storage and
//! dedupe against each other, and are listed, read, exported and garbage
//! collected the same way. The on-disk format is specified in
//! `docs/STORAGE.md`.
//!
//! ```
//! use memento_store::*;
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
//! * **Write order** (what makes crashes harmless): new blobs are appended
//!   to a temporary pack while the snapshot is written; at commit the packs
//!   are made durable and renamed into place, then their index, their
//!   directories synced, and the manifest is written last and never
//!   overwritten. A snapshot exists exactly when its manifest does, a
//!   manifest only ever names blobs in durable, indexed packs, and an
//!   aborted snapshot leaves nothing behind.
//! * **Layouts**: a fresh store is layout 2 (packs); a layout-1 store (one
//!   file per blob) is read as it is, raised to layout 2 by its first
//!   writer, and its loose blobs are packed by [`Store::migrate`].
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
mod index;
mod lease;
mod location;
mod manifest;
mod migrate;
mod name;
mod numbers;
mod pack;
mod packed;
mod read;
#[cfg(feature = "s3")]
mod s3;
mod series;
mod service_objects;
mod tenant;
mod usage;
mod writer;

pub use archive::{ArchiveSummary, Progress};
pub use backend::{Backend, LocalDir, LockGuard, LockMode, PutMode, Staged, StagedAppend, SyncCounts};
pub use blob::{BlobHash, BlobProblem, Compression, MAX_CHUNK};
pub use chunk::{CDC_AVG, CDC_MAX, CDC_MIN, ChunkRef, DEFAULT_FIXED_CHUNK};
pub use error::{BadChunk, StoreError};
pub use fsck::{DamagedSnapshot, FsckReport, RepairReport};
pub use gc::{GcReport, REPACK_LIVE_FRACTION, SMALL_PACK_DIVISOR, SMALL_PACKS_TO_MERGE};
pub use lease::holder_name;
pub use location::StoreLocation;
pub use manifest::{
    Figures, MANIFEST_SCHEMA_VERSION, MAX_CHAIN, MAX_STATE_LEN, Manifest, MemoryImage,
    OLDEST_MANIFEST_SCHEMA, PageDeltaRef, Retention, SnapshotKind, SnapshotStatus, SourcePosition,
    StateFormat, TaskKey, TaskState, TaskStateData, Trigger, now_ms,
};
pub use migrate::MigrateReport;
pub use name::{ID_NUMBER_WIDTH, InvalidName, JobName, MAX_NAME_LEN, SnapshotId, TenantName};
#[cfg(feature = "s3")]
pub use s3::{DEFAULT_GC_GRACE, DEFAULT_LOCK_TTL, RequestCounts, S3Backend, S3Options};
pub use series::SeriesLease;
pub use service_objects::{LeaseView, MAX_SERVICE_OBJECT};
pub use tenant::{ListFilter, TenantStore};
pub use writer::{BlobWriter, SnapshotWriter};

pub(crate) use numbers::NumberFile;
pub(crate) use tenant::{TenantInner, unique_blobs};

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Name of the file at the root identifying a store and its layout version.
pub const STORE_FILE: &str = "store.json";
/// Layout version of the store directory written by this build (packs).
pub const STORE_VERSION: u32 = 2;
/// Layout version of a store on object storage written by this build:
/// layout 2 with packs that carry their index and writers that take no
/// locks (docs/STORAGE.md, "Object storage"). A build that knows only the
/// locking protocol must not write such a store, so it must refuse it.
pub const STORE_VERSION_REMOTE: u32 = 3;
/// The oldest layout this build still reads (loose blobs).
pub const STORE_VERSION_LOOSE: u32 = 1;
/// Default target size of a pack file (see docs/STORAGE.md).
pub const DEFAULT_PACK_SIZE: u64 = 16 * 1024 * 1024;

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
    /// Size at which a writer seals its open pack and starts the next
    /// (default [`DEFAULT_PACK_SIZE`]); a pack exceeds it by at most one blob.
    pub pack_size: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            compression: Compression::default(),
            quota_bytes: None,
            sync: true,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()).min(4),
            gc_wait: Duration::from_secs(60),
            pack_size: DEFAULT_PACK_SIZE,
        }
    }
}

/// Handle to one store root directory. Clone + Send + Sync.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
pub(crate) struct StoreInner {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) options: StoreOptions,
    /// One shared state per tenant, so that clones and repeated
    /// `tenant()` calls share caches (usage, index) while any is alive. Weak: a tenant holds its store, so a strong reference
    /// here would keep both alive for ever (and the store's owner lock
    /// file open) once the last handle is gone.
    tenants: Mutex<HashMap<TenantName, std::sync::Weak<TenantInner>>>,
    /// Layout version in `store.json` as this handle knows it: 1 until the
    /// first writer (or a migration) raises it.
    layout: Mutex<u32>,
    /// Name of the store in errors.
    label: String,
}

impl StoreInner {
    /// Raises `store.json` to layout 2 before anything is written into a
    /// pack, so an older build refuses the store rather than missing the
    /// blobs that are only in packs. A no-op once done.
    pub(crate) fn upgrade_layout(&self) -> Result<(), StoreError> {
        let mut layout = self.layout.lock().unwrap();
        let target = current_layout(&*self.backend);
        if *layout >= target {
            return Ok(());
        }
        let f = StoreFile {
            format: "memento-store".into(),
            version: target,
        };
        let bytes = serde_json::to_vec_pretty(&f).expect("serializable");
        let sync = self.options.sync;
        self.backend
            .put(STORE_FILE, &bytes, PutMode::Replace, sync)
            .and_then(|_| if sync { self.backend.flush() } else { Ok(()) })
            .map_err(|e| StoreError::io("upgrade", STORE_FILE, e))?;
        tracing::info!(store = %self.label, "store layout raised from {} to {target}", *layout);
        *layout = target;
        Ok(())
    }
}

/// The layout this build writes on `backend`.
fn current_layout(backend: &dyn Backend) -> u32 {
    if backend.gc_grace().is_some() {
        STORE_VERSION_REMOTE
    } else {
        STORE_VERSION
    }
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

    /// Opens the existing store at `root` only to read it: nothing on disk
    /// is created, cleaned or locked, and any change fails. What the
    /// commands that only read use (`snapshots`, `fsck`, `savepoint
    /// export`), so that they work on a read-only or full disk.
    ///
    /// # Errors
    /// As [`Store::open`]; a missing root or store file is an error here.
    pub fn open_read_only(root: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let label = root.display().to_string();
        let backend =
            LocalDir::open_read_only(root).map_err(|e| StoreError::io("open store", label.clone(), e))?;
        let present = backend
            .size(STORE_FILE)
            .map_err(|e| StoreError::io("read", STORE_FILE, e))?;
        if present.is_none() {
            return Err(StoreError::StoreFormat {
                root: label,
                reason: format!("no {STORE_FILE}: not a memento store"),
            });
        }
        Self::with_backend(Arc::new(backend), options, &label)
    }

    /// Opens the store at `location`: a local directory as
    /// [`Store::open`], or a prefix of an S3-compatible bucket (cargo
    /// feature `s3`; `AWS_*` environment, lock time to live from
    /// `MEMENTO_S3_LOCK_TTL_MS`, see `docs/STORAGE.md`).
    ///
    /// # Errors
    /// As [`Store::open`]; [`StoreError::InvalidLocation`] for `s3://` in
    /// a build without the feature; one-line I/O errors naming the URL
    /// when the bucket cannot be reached, does not exist or denies access.
    pub fn open_location(location: &StoreLocation, options: StoreOptions) -> Result<Store, StoreError> {
        match location {
            StoreLocation::Local(path) => Store::open(path, options),
            #[cfg(feature = "s3")]
            StoreLocation::S3 { bucket, prefix } => {
                let label = location.to_string();
                let s3 = S3Options::from_env().map_err(|reason| StoreError::InvalidLocation {
                    location: label.clone(),
                    reason,
                })?;
                let backend =
                    S3Backend::open(bucket, prefix, s3).map_err(|e| StoreError::Remote(e.to_string()))?;
                Self::with_backend(Arc::new(backend), options, &label)
            }
            #[cfg(not(feature = "s3"))]
            StoreLocation::S3 { .. } => Err(StoreError::InvalidLocation {
                location: location.to_string(),
                reason: "this build has no object storage support (cargo feature `s3`)".into(),
            }),
        }
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
        let layout = match backend.read(STORE_FILE) {
            Ok(bytes) => {
                let f: StoreFile = serde_json::from_slice(&bytes)
                    .map_err(|e| format_err(format!("{STORE_FILE} is damaged: {e}")))?;
                if f.format != "memento-store" {
                    return Err(format_err(format!("{STORE_FILE} is not a memento store")));
                }
                let newest = current_layout(&*backend);
                if !(STORE_VERSION_LOOSE..=newest).contains(&f.version) {
                    let reads = if newest == STORE_VERSION {
                        format!("{STORE_VERSION_LOOSE} and {STORE_VERSION}")
                    } else {
                        format!("{STORE_VERSION_LOOSE} to {newest}")
                    };
                    return Err(format_err(format!(
                        "store layout version {} (this build reads {reads})",
                        f.version
                    )));
                }
                f.version
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = StoreFile {
                    format: "memento-store".into(),
                    version: current_layout(&*backend),
                };
                let bytes = serde_json::to_vec_pretty(&f).expect("serializable");
                backend
                    .put(STORE_FILE, &bytes, PutMode::NoReplace, options.sync)
                    .and_then(|_| backend.flush())
                    .map_err(|e| StoreError::io("create", STORE_FILE, e))?;
                f.version
            }
            Err(e) => return Err(StoreError::io("read", STORE_FILE, e)),
        };
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
                layout: Mutex::new(layout),
                label: label.to_string(),
            }),
        })
    }

    /// The layout version of the store's directory: 1 (loose blobs) until
    /// a writer or a migration raises it to 2.
    pub fn layout_version(&self) -> u32 {
        *self.inner.layout.lock().unwrap()
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
        if let Some(inner) = tenants.get(&name).and_then(std::sync::Weak::upgrade) {
            return Ok(TenantStore { inner });
        }
        let inner = Arc::new(TenantInner {
            store: self.inner.clone(),
            prefix: format!("tenants/{name}"),
            name: name.clone(),
            usage: Mutex::new(None),
            last_gc: Mutex::new(None),
            index: std::sync::RwLock::new(Default::default()),
            loose: std::sync::atomic::AtomicU8::new(2),
            leases: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(()),
            manifests: Mutex::new(HashMap::new()),
        });
        tenants.retain(|_, t| t.strong_count() > 0);
        tenants.insert(name, Arc::downgrade(&inner));
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

#[cfg(test)]
mod pack_tests;
#[cfg(all(test, feature = "s3"))]
mod s3_tests;
#[cfg(test)]
mod tests;
