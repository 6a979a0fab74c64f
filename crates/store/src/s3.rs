//! The object-storage backend: a store under a prefix of an S3-compatible
//! bucket, through the `object_store` crate.
//!
//! What replaces the POSIX steps (`docs/STORAGE.md`, "Object storage"): a
//! PUT is atomic and durable when it returns, so `flush` and `sync_staged`
//! do nothing; put-if-absent is `If-None-Match: *`; staged objects are kept
//! in memory until published (a pack is at most the pack size plus one
//! blob), and large ones are published as multipart uploads, which S3 makes
//! visible only when complete. Locks are lock objects (`s3::lock`).
//!
//! The store's API is synchronous and `object_store` is async: the backend
//! owns a small tokio runtime and waits for each request on the calling
//! thread. Requests are spawned onto the runtime rather than `block_on`'d,
//! so a caller that is itself on a tokio thread (the REST server) does not
//! panic.

mod lock;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode as ObjPutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion,
};

use crate::backend::{Backend, LockGuard, LockMode, PutMode, Staged, StagedAppend, check_key};

pub use lock::DEFAULT_LOCK_TTL;

/// Default grace period of garbage collection on object storage.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(300);

/// Objects larger than this are uploaded in parts (a pack is 16 MiB plus
/// at most one blob, so a default pack is one PUT).
const MULTIPART_ABOVE: usize = 24 << 20;
/// Size of one part of a multipart upload (S3 wants ≥ 5 MiB).
const PART_SIZE: usize = 8 << 20;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// Requests made so far, by kind: what object storage bills, and what the
/// benchmarks report per checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// PUTs, multipart part uploads and completions included.
    pub puts: u64,
    /// GETs (whole or ranged) and HEADs.
    pub gets: u64,
    /// LISTs (one per page).
    pub lists: u64,
    /// DELETEs.
    pub deletes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    puts: AtomicU64,
    gets: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
}

/// Options of an [`S3Backend`] beyond the `AWS_*` environment.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Time to live of lock objects and job leases (default
    /// [`DEFAULT_LOCK_TTL`]): how long a killed holder keeps others out.
    pub lock_ttl: Duration,
    /// How long one request may take before it fails (default 60 s).
    pub request_timeout: Duration,
    /// Retries of a failing request (default 3, within 15 s): an
    /// unreachable endpoint fails in seconds rather than minutes.
    pub max_retries: usize,
    /// Grace period of garbage collection (default
    /// [`DEFAULT_GC_GRACE`]): GC deletes a pack only this long after it
    /// announced it, and a writer relies on its view of the packs for at
    /// most half of it. Requests are given at most a quarter of it.
    pub gc_grace: Duration,
    /// Settings applied over the `AWS_*` environment, as (key, value)
    /// with `object_store`'s key names (`aws_endpoint`, `aws_allow_http`,
    /// ...): for embedders and tests that configure in code.
    pub config: Vec<(String, String)>,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            lock_ttl: DEFAULT_LOCK_TTL,
            request_timeout: Duration::from_secs(60),
            max_retries: 3,
            gc_grace: DEFAULT_GC_GRACE,
            config: Vec::new(),
        }
    }
}

impl S3Options {
    /// The defaults, with `MEMENTO_S3_LOCK_TTL_MS` (if set and valid)
    /// as the lock time to live and `MEMENTO_S3_GC_GRACE_MS` as the GC
    /// grace period.
    ///
    /// # Errors
    /// A one-line message if a variable is set but not a number of
    /// milliseconds between 100 and 3,600,000.
    pub fn from_env() -> Result<S3Options, String> {
        let mut o = S3Options::default();
        let ms = |name: &str| -> Result<Option<Duration>, String> {
            let Ok(v) = std::env::var(name) else {
                return Ok(None);
            };
            v.trim()
                .parse()
                .ok()
                .filter(|ms| (100..=3_600_000).contains(ms))
                .map(|ms| Some(Duration::from_millis(ms)))
                .ok_or_else(|| format!("{name}={v:?}: not a number of ms in 100..=3600000"))
        };
        if let Some(d) = ms("MEMENTO_S3_LOCK_TTL_MS")? {
            o.lock_ttl = d;
        }
        if let Some(d) = ms("MEMENTO_S3_GC_GRACE_MS")? {
            o.gc_grace = d;
        }
        Ok(o)
    }
}

/// A store on S3-compatible object storage (see the module doc).
pub struct S3Backend {
    shared: Arc<Shared>,
    /// Staged objects (in memory until published), by handle.
    staged: StagedTable,
    next_staged: AtomicU64,
    locks: Arc<lock::Locks>,
    gc_grace: Duration,
}

/// What requests need, shared with the lock renewer.
struct Shared {
    rt: tokio::runtime::Runtime,
    store: Arc<AmazonS3>,
    /// Key prefix ending in `/`, or empty.
    prefix: String,
    /// `s3://bucket/prefix`, for errors.
    url: String,
    counts: Counters,
}

impl fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Backend")
            .field("url", &self.shared.url)
            .finish()
    }
}

/// One line saying what failed where: the URL, the operation, the key and
/// the reason, without the request dump `object_store` errors carry.
fn obj_err(url: &str, op: &str, key: &str, e: object_store::Error) -> io::Error {
    use object_store::Error as E;
    let (kind, reason) = match &e {
        E::NotFound { .. } => (io::ErrorKind::NotFound, "not found".to_string()),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            (io::ErrorKind::PermissionDenied, "access denied".to_string())
        }
        _ => {
            let text = e.to_string();
            let reason = if text.contains("NoSuchBucket") {
                "the bucket does not exist".to_string()
            } else if text.contains("AccessDenied") || text.contains("403") {
                "access denied".to_string()
            } else if text.contains("QuotaExceeded")
                || text.contains("EntityTooLarge")
                || text.contains("507")
            {
                "the bucket is full (quota exceeded)".to_string()
            } else if text.contains("error sending request")
                || text.contains("connect")
                || text.contains("timed out")
                || text.contains("dns")
            {
                "endpoint unreachable".to_string()
            } else {
                text.split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .take(200)
                    .collect()
            };
            (io::ErrorKind::Other, reason)
        }
    };
    let at = if key.is_empty() {
        String::new()
    } else {
        format!(" {key}")
    };
    io::Error::new(kind, format!("{url}: {op}{at}: {reason}"))
}

impl Shared {
    fn path(&self, key: &str) -> ObjPath {
        ObjPath::from(format!("{}{key}", self.prefix))
    }

    /// Runs one request on the runtime and waits for it on this thread.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().expect("the runtime lives as long as the backend")
    }

    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        self.counts.gets.fetch_add(1, Ordering::Relaxed);
        let (store, path) = (self.store.clone(), self.path(key));
        self.run(async move { store.get(&path).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| obj_err(&self.url, "read", key, e))
    }

    fn get_versioned(&self, key: &str) -> io::Result<Option<(Vec<u8>, String)>> {
        self.counts.gets.fetch_add(1, Ordering::Relaxed);
        let (store, path) = (self.store.clone(), self.path(key));
        let got = self.run(async move {
            let r = store.get(&path).await?;
            let tag = r.meta.e_tag.clone();
            Ok::<_, object_store::Error>((r.bytes().await?, tag))
        });
        match got {
            Ok((bytes, Some(tag))) => Ok(Some((bytes.to_vec(), tag))),
            Ok((_, None)) => Err(io::Error::other(format!(
                "{}: read {key}: the server sent no ETag (conditional writes are impossible)",
                self.url
            ))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(obj_err(&self.url, "read", key, e)),
        }
    }

    /// HEAD: the object's size and ETag, `None` if absent.
    fn head(&self, key: &str) -> io::Result<Option<(u64, Option<String>)>> {
        self.counts.gets.fetch_add(1, Ordering::Relaxed);
        let (store, path) = (self.store.clone(), self.path(key));
        match self.run(async move { store.head(&path).await }) {
            Ok(meta) => Ok(Some((meta.size, meta.e_tag))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(obj_err(&self.url, "stat", key, e)),
        }
    }

    /// A PUT in `mode`; `Ok(None)` if its condition failed, else the new
    /// ETag (empty if the server sent none).
    fn put(&self, key: &str, data: Bytes, mode: ObjPutMode) -> io::Result<Option<String>> {
        let (store, path) = (self.store.clone(), self.path(key));
        let counts = &self.counts;
        let result = if data.len() > MULTIPART_ABOVE && mode == ObjPutMode::Overwrite {
            let parts = data.len().div_ceil(PART_SIZE) as u64;
            counts.puts.fetch_add(parts + 2, Ordering::Relaxed);
            self.run(async move { put_multipart(&store, &path, data).await })
        } else {
            counts.puts.fetch_add(1, Ordering::Relaxed);
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            self.run(async move { store.put_opts(&path, PutPayload::from(data), opts).await })
                .map(|r| r.e_tag)
        };
        match result {
            Ok(tag) => Ok(Some(tag.unwrap_or_default())),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok(None)
            }
            Err(e) => Err(obj_err(&self.url, "write", key, e)),
        }
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        self.counts.deletes.fetch_add(1, Ordering::Relaxed);
        let (store, path) = (self.store.clone(), self.path(key));
        match self.run(async move { store.delete(&path).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(obj_err(&self.url, "delete", key, e)),
        }
    }

    /// Names directly under `key/`.
    fn list(&self, key: &str) -> io::Result<Vec<String>> {
        self.counts.lists.fetch_add(1, Ordering::Relaxed);
        let (store, path) = (self.store.clone(), self.path(key));
        let listed = self
            .run(async move { store.list_with_delimiter(Some(&path)).await })
            .map_err(|e| obj_err(&self.url, "list", key, e))?;
        let last = |p: &ObjPath| p.filename().map(str::to_string);
        let mut names: Vec<String> = listed.common_prefixes.iter().filter_map(last).collect();
        names.extend(listed.objects.iter().filter_map(|o| last(&o.location)));
        Ok(names)
    }
}

/// Uploads `data` in parts, several at a time; the object appears only
/// when the upload completes, and a failed upload is aborted.
async fn put_multipart(
    store: &AmazonS3,
    path: &ObjPath,
    data: Bytes,
) -> Result<Option<String>, object_store::Error> {
    use futures_util::StreamExt;
    let mut upload = store.put_multipart(path).await?;
    let parts: Vec<_> = (0..data.len())
        .step_by(PART_SIZE)
        .map(|at| upload.put_part(PutPayload::from(data.slice(at..(at + PART_SIZE).min(data.len())))))
        .collect();
    let sent: Vec<_> = futures_util::stream::iter(parts)
        .buffered(PARTS_IN_FLIGHT)
        .collect()
        .await;
    if let Some(e) = sent.into_iter().find_map(Result::err) {
        let _ = upload.abort().await;
        return Err(e);
    }
    match upload.complete().await {
        Ok(r) => Ok(r.e_tag),
        Err(e) => {
            let _ = upload.abort().await;
            Err(e)
        }
    }
}

impl S3Backend {
    /// Opens `s3://bucket/prefix` with the `AWS_*` environment and checks
    /// that the bucket answers (one LIST), so that an unreachable endpoint,
    /// a missing bucket or denied access fail here with one line naming
    /// the URL.
    ///
    /// # Errors
    /// A one-line I/O error naming the URL, the operation and the reason.
    pub fn open(bucket: &str, prefix: &str, options: S3Options) -> io::Result<S3Backend> {
        let url = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("memento-s3")
            .enable_all()
            .build()?;
        let retry = RetryConfig {
            max_retries: options.max_retries,
            retry_timeout: Duration::from_secs(15).min(options.gc_grace / 8),
            ..Default::default()
        };
        // A request that outlives a quarter of the grace period could land
        // after a GC decided without it (docs/STORAGE.md).
        let request_timeout = options.request_timeout.min(options.gc_grace / 4);
        let client = ClientOptions::new()
            .with_timeout(request_timeout)
            .with_connect_timeout(Duration::from_secs(5));
        // Client options first: they include `allow_http`, which the
        // environment and `config` below may set.
        let mut builder = AmazonS3Builder::new()
            .with_client_options(client)
            .with_retry(retry)
            .with_bucket_name(bucket);
        let env = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .filter_map(|(k, v)| Some((k.to_ascii_lowercase().parse().ok()?, v)));
        for (key, value) in env {
            builder = builder.with_config(key, value);
        }
        for (key, value) in &options.config {
            let key = key
                .parse()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{url}: configure: {e}")))?;
            builder = builder.with_config(key, value);
        }
        let store = builder
            .build()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{url}: configure: {e}")))?;
        let shared = Arc::new(Shared {
            rt,
            store: Arc::new(store),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            url,
            counts: Counters::default(),
        });
        // Any answer to a LIST proves the endpoint, the bucket and the
        // credentials; an empty prefix is a valid answer.
        shared
            .list("tenants")
            .map_err(|e| io::Error::new(e.kind(), e.to_string().replacen(": list tenants:", ": open:", 1)))?;
        let locks = lock::Locks::start(shared.clone(), options.lock_ttl);
        Ok(S3Backend {
            shared,
            staged: StagedTable::default(),
            next_staged: AtomicU64::new(0),
            locks,
            gc_grace: options.gc_grace,
        })
    }

    /// `s3://bucket/prefix`.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// Requests made so far by this handle.
    pub fn request_counts(&self) -> RequestCounts {
        let c = &self.shared.counts;
        RequestCounts {
            puts: c.puts.load(Ordering::Relaxed),
            gets: c.gets.load(Ordering::Relaxed),
            lists: c.lists.load(Ordering::Relaxed),
            deletes: c.deletes.load(Ordering::Relaxed),
        }
    }

    /// The time to live of this handle's locks and leases.
    pub fn lock_ttl(&self) -> Duration {
        self.locks.ttl()
    }

    fn take_staged(&self, staged: &Staged) -> io::Result<Bytes> {
        self.staged
            .lock()
            .unwrap()
            .get(&staged.0)
            .cloned()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("staged object {} is gone", staged.0),
                )
            })
    }

    fn new_staged(&self, data: Bytes) -> Staged {
        let n = self.next_staged.fetch_add(1, Ordering::Relaxed);
        let handle = format!("mem-{n}");
        self.staged.lock().unwrap().insert(handle.clone(), data);
        Staged(handle)
    }
}

impl Backend for S3Backend {
    fn read(&self, key: &str) -> io::Result<Vec<u8>> {
        check_key(key)?;
        self.shared.get(key)
    }

    fn size(&self, key: &str) -> io::Result<Option<u64>> {
        check_key(key)?;
        Ok(self.shared.head(key)?.map(|(size, _)| size))
    }

    fn read_at(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_key(key)?;
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "range past the end"))?;
        let sh = &self.shared;
        sh.counts.gets.fetch_add(1, Ordering::Relaxed);
        let (store, path) = (sh.store.clone(), sh.path(key));
        let got = sh
            .run(async move { store.get_range(&path, offset..end).await })
            .map_err(|e| obj_err(&sh.url, "read", key, e))?;
        if got.len() != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: read {key}: range past the end", sh.url),
            ));
        }
        buf.copy_from_slice(&got);
        Ok(())
    }

    fn stage_append(&self) -> io::Result<Box<dyn StagedAppend>> {
        let n = self.next_staged.fetch_add(1, Ordering::Relaxed);
        let handle = format!("mem-{n}");
        Ok(Box::new(MemAppend {
            handle,
            buf: Vec::new(),
            staged: self.staged.clone(),
        }))
    }

    fn sync_staged(&self, _items: &[&Staged]) -> io::Result<()> {
        // Nothing is on the server until published, and a PUT is durable
        // when it returns.
        Ok(())
    }

    fn publish_new(&self, staged: &Staged, key: &str) -> io::Result<bool> {
        check_key(key)?;
        let data = self.take_staged(staged)?;
        let done = self.shared.put(key, data, ObjPutMode::Create)?.is_some();
        self.discard(staged);
        Ok(done)
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode, _sync: bool) -> io::Result<bool> {
        check_key(key)?;
        let mode = match mode {
            PutMode::Replace => ObjPutMode::Overwrite,
            PutMode::NoReplace => ObjPutMode::Create,
        };
        Ok(self
            .shared
            .put(key, Bytes::copy_from_slice(data), mode)?
            .is_some())
    }

    fn stage(&self, data: &[u8], _sync: bool) -> io::Result<Staged> {
        Ok(self.new_staged(Bytes::copy_from_slice(data)))
    }

    fn publish(&self, items: &[(Staged, String)], _sync: bool) -> io::Result<()> {
        for (_, key) in items {
            check_key(key)?;
        }
        // Several objects at once: each PUT is one round trip, and they are
        // independent (the caller publishes what must come later after
        // this returns).
        let sh = &self.shared;
        let mut jobs = Vec::new();
        for (staged, key) in items {
            let data = self.take_staged(staged)?;
            let multipart = data.len() > MULTIPART_ABOVE;
            let n = if multipart {
                data.len().div_ceil(PART_SIZE) as u64 + 2
            } else {
                1
            };
            sh.counts.puts.fetch_add(n, Ordering::Relaxed);
            let (store, path, key) = (sh.store.clone(), sh.path(key), key.clone());
            jobs.push(async move {
                let r = if multipart {
                    put_multipart(&store, &path, data).await.map(|_| ())
                } else {
                    store.put(&path, PutPayload::from(data)).await.map(|_| ())
                };
                r.map_err(|e| (key, e))
            });
        }
        let results = sh.run(futures_util::future::join_all(jobs));
        for r in results {
            r.map_err(|(key, e)| obj_err(&sh.url, "write", &key, e))?;
        }
        for (staged, _) in items {
            self.discard(staged);
        }
        Ok(())
    }

    fn discard(&self, staged: &Staged) {
        self.staged.lock().unwrap().remove(&staged.0);
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn delete(&self, key: &str) -> io::Result<bool> {
        check_key(key)?;
        // S3's DELETE answers the same whether or not the object was there.
        if self.shared.head(key)?.is_none() {
            return Ok(false);
        }
        self.shared.delete(key)?;
        Ok(true)
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        check_key(prefix)?;
        self.shared.list(prefix)
    }

    fn copy(&self, from: &str, to: &str) -> io::Result<()> {
        check_key(from)?;
        check_key(to)?;
        let sh = &self.shared;
        sh.counts.puts.fetch_add(1, Ordering::Relaxed);
        let (store, src, dst) = (sh.store.clone(), sh.path(from), sh.path(to));
        sh.run(async move { store.copy(&src, &dst).await })
            .map_err(|e| obj_err(&sh.url, "copy", from, e))
    }

    fn lock(
        &self,
        key: &str,
        mode: LockMode,
        timeout: Option<Duration>,
    ) -> io::Result<Option<Box<dyn LockGuard>>> {
        check_key(key)?;
        self.locks.lock(key, mode, timeout)
    }

    fn remove_stale_temp(&self) -> io::Result<usize> {
        // Staged objects live in memory and die with their process; an
        // interrupted multipart upload leaves no object (a bucket
        // lifecycle rule reclaims its parts).
        Ok(0)
    }

    fn has_versions(&self) -> bool {
        true
    }

    fn lease_ttl(&self) -> Option<Duration> {
        Some(self.locks.ttl())
    }

    fn gc_grace(&self) -> Option<Duration> {
        Some(self.gc_grace)
    }

    fn modified(&self, key: &str) -> io::Result<Option<std::time::SystemTime>> {
        check_key(key)?;
        let sh = &self.shared;
        sh.counts.gets.fetch_add(1, Ordering::Relaxed);
        let (store, path) = (sh.store.clone(), sh.path(key));
        match sh.run(async move { store.head(&path).await }) {
            Ok(meta) => Ok(Some(meta.last_modified.into())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(obj_err(&sh.url, "stat", key, e)),
        }
    }

    fn read_versioned(&self, key: &str) -> io::Result<Option<(Vec<u8>, String)>> {
        check_key(key)?;
        self.shared.get_versioned(key)
    }

    fn put_versioned(&self, key: &str, data: &[u8], expected: Option<&str>) -> io::Result<Option<String>> {
        check_key(key)?;
        let mode = match expected {
            None => ObjPutMode::Create,
            Some(tag) => ObjPutMode::Update(UpdateVersion {
                e_tag: Some(tag.to_string()),
                version: None,
            }),
        };
        let tag = self.shared.put(key, Bytes::copy_from_slice(data), mode)?;
        match tag {
            Some(t) if t.is_empty() => Err(io::Error::other(format!(
                "{}: write {key}: the server sent no ETag (conditional writes are impossible)",
                self.shared.url
            ))),
            other => Ok(other),
        }
    }
}

/// Staged objects by handle; shared with unfinished appenders.
type StagedTable = Arc<Mutex<HashMap<String, Bytes>>>;

/// A pack being appended to, in memory.
struct MemAppend {
    handle: String,
    buf: Vec<u8>,
    staged: StagedTable,
}

impl fmt::Debug for MemAppend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemAppend")
            .field("handle", &self.handle)
            .field("len", &self.buf.len())
            .finish()
    }
}

impl StagedAppend for MemAppend {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn finish(self: Box<Self>, _sync: bool) -> io::Result<Staged> {
        let MemAppend { handle, buf, staged } = *self;
        staged.lock().unwrap().insert(handle.clone(), Bytes::from(buf));
        Ok(Staged(handle))
    }

    fn staged(&self) -> Staged {
        Staged(self.handle.clone())
    }
}
