//! Capture and restore of one task's state: runtime → bytes → chunks in the
//! store, and back. The coordinator decides when; this module decides how.
//!
//! Capture is split in two so that the task is paused only for the first:
//! [`capture`] runs on the task's thread between two `process` calls and
//! returns the state's bytes; [`persist`] chunks and writes them to the store
//! on another thread while the task goes on processing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::runtime::{
    CapturedMemory, LoadedComponent, PAGE, Runtime, RuntimeError, SandboxLimits, TaskInstance, TaskLabel,
    Written,
};
use crate::spec::SnapshotFormat;
use crate::store::{
    BlobWriter, ChunkRef, DEFAULT_FIXED_CHUNK, MemoryImage, SnapshotId, StoreError, TaskKey, TaskState,
    TaskStateData, TenantStore,
};

/// Version of the native image layout written in `extra.image_version`.
/// A reader refuses other versions: the meaning of the chunks would differ.
pub const NATIVE_IMAGE_VERSION: u64 = 1;

/// State captured at a barrier, not yet in the store.
pub struct Captured {
    /// What was captured.
    pub state: CapturedState,
    /// How long the task was paused for the capture.
    pub pause: Duration,
    /// For an incremental native capture: where to record the persisted
    /// images (they become the base once the snapshot is known committed).
    record: Option<(NativeBase, u64)>,
}

/// The two kinds of captured state.
pub enum CapturedState {
    /// The operator's canonical bytes (`snapshot-state`).
    Canonical(Vec<u8>),
    /// Copies of the instance's linear memories.
    Native(Vec<CapturedMemory>),
    /// Copies of the chunks written since a committed base snapshot, and
    /// the base's references for the others.
    NativeDelta(Vec<MemoryDelta>),
}

/// One memory of an incremental native capture.
pub struct MemoryDelta {
    /// Index of the memory (creation order).
    pub index: u32,
    /// Its size in bytes when captured.
    pub size: u64,
    /// Where each chunk of [`DEFAULT_FIXED_CHUNK`] comes from.
    pub chunks: Vec<ChunkSource>,
    /// The bytes copied in the pause, back to back in chunk order: whole
    /// chunks for [`ChunkSource::Copied`], the written pages (ascending)
    /// for [`ChunkSource::Patched`].
    pub copied: Vec<u8>,
}

/// Where one chunk of an incremental native capture comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkSource {
    /// Unchanged since the base: the base's chunk, as it is.
    Base(ChunkRef),
    /// Copied whole.
    Copied,
    /// Some pages written since the base: those (bit `p` of `pages` = the
    /// chunk's [`PAGE`] `p`) were copied; the upload rebuilds the chunk
    /// from the base's chunk with them laid over it. The pause copies only
    /// the written pages, however few per chunk.
    Patched {
        /// The base's version of the chunk.
        base: ChunkRef,
        /// Written pages.
        pages: u64,
    },
}

impl Captured {
    /// Bytes copied during the pause.
    pub fn copied_bytes(&self) -> u64 {
        match &self.state {
            CapturedState::Canonical(b) => b.len() as u64,
            CapturedState::Native(m) => m.iter().map(|m| m.bytes.len() as u64).sum(),
            CapturedState::NativeDelta(m) => m.iter().map(|m| m.copied.len() as u64).sum(),
        }
    }
}

/// A task's memory of its native snapshots, for incremental capture: the
/// last snapshot known to be committed (the *base*) with its chunk lists,
/// the images persisted but not yet known committed, and the chunks
/// written at each capture since the base.
///
/// A capture may reference the base's chunks only because the base
/// committed: its blobs are in the store as long as its manifest is, and
/// the store's commit checks they still are (retention may have deleted
/// it; then that snapshot fails and the base is dropped, so the next
/// capture is a full one -- see [`NativeBase::capture`]). An aborted
/// snapshot never becomes a base: only a `Complete` notice promotes one.
/// A missed notice only keeps an older base, with the writes since it
/// accumulated from the log. Cheap to clone (shared with upload threads).
#[derive(Clone, Default)]
pub struct NativeBase {
    state: Arc<Mutex<BaseState>>,
    /// Digest of the operator config the task was opened with, recorded in
    /// its images (see [`config_digest`]).
    config: Option<Arc<str>>,
}

#[derive(Default)]
struct BaseState {
    /// The base: snapshot number and its memory images.
    base: Option<(u64, Vec<MemoryImage>)>,
    /// Per capture since the base: (snapshot number, pages written since
    /// the previous capture or `None` for "all", the base it referenced).
    log: Vec<(u64, Option<PageMasks>, Option<u64>)>,
    /// Images persisted by uploads, by snapshot number, awaiting a notice.
    persisted: BTreeMap<u64, Vec<MemoryImage>>,
}

/// Per memory, per chunk, the mask of written pages (see [`Written`]).
type PageMasks = Vec<Vec<u64>>;

/// Captures kept in the log at most: past that (notices missed for that
/// long), the log and base are forgotten and the next capture is full.
const MAX_LOG: usize = 1024;

impl NativeBase {
    /// No base yet: the first capture copies everything.
    pub fn new() -> NativeBase {
        NativeBase::default()
    }

    /// As [`NativeBase::new`], for a task opened with `config`: its images
    /// record the config's digest, and restoring one under another config
    /// is refused (see [`check_config`]).
    pub fn with_config(config: &BTreeMap<String, String>) -> NativeBase {
        NativeBase {
            config: Some(config_digest(config).into()),
            ..NativeBase::default()
        }
    }

    /// The base's snapshot number, if there is one.
    pub fn base(&self) -> Option<u64> {
        self.state.lock().unwrap().base.as_ref().map(|(n, _)| *n)
    }

    /// Snapshot `number` committed (a `Complete` notice): its images, if
    /// this task persisted them, become the base.
    pub fn committed(&self, number: u64) {
        let mut s = self.state.lock().unwrap();
        if let Some(images) = s.persisted.remove(&number) {
            s.base = Some((number, images));
            s.log.retain(|(n, ..)| *n > number);
        }
        // Older persisted images may be committed too (a missed notice) or
        // aborted: either way a newer snapshot supersedes them.
        s.persisted.retain(|n, _| *n > number);
    }

    /// Forget the base: the next native capture copies everything. For a
    /// task whose snapshot went canonical instead: retention may delete
    /// the base once that snapshot commits (the task's newer state no
    /// longer references the base's chunks), so nothing may build on it.
    pub fn forget(&self) {
        *self.state.lock().unwrap() = BaseState::default();
    }

    /// The instance was restored from snapshot `number` (committed, by
    /// definition) with these images; its write tracking restarted.
    pub fn restored(&self, number: u64, images: Vec<MemoryImage>) {
        let mut s = self.state.lock().unwrap();
        *s = BaseState {
            base: Some((number, images)),
            ..BaseState::default()
        };
    }

    /// Capture the instance's memories natively for the snapshot `writer`
    /// writes, copying only the pages written since the base (everything
    /// if there is no base or tracking is unavailable). `aborted` is the
    /// highest snapshot number the coordinator gave up on.
    ///
    /// The guest is quiescent (`&mut` instance, between calls): the scan,
    /// which protects the pages again, and the copy see the same bytes.
    ///
    /// # Errors
    /// As [`capture`].
    pub fn capture(
        &self,
        instance: &mut TaskInstance,
        writer: &BlobWriter,
        aborted: u64,
    ) -> Result<Captured, CaptureError> {
        let started = std::time::Instant::now();
        let number = writer.id().number();
        instance.check_native_capture().map_err(native_error)?;
        let mut s = self.state.lock().unwrap();
        s.forget_aborted(aborted);
        // The base may have been deleted since it committed (a disposed
        // native savepoint): then nothing may reference it.
        if let Some((b, _)) = &s.base
            && !writer.job_snapshot_exists(*b)
        {
            *s = BaseState::default();
        }
        let written = match instance.written_pages(DEFAULT_FIXED_CHUNK) {
            Written::All => None,
            Written::Pages(p) => Some(p),
        };
        if s.log.len() >= MAX_LOG {
            *s = BaseState::default();
        }
        let base_number = s.base.as_ref().map(|(n, _)| *n);
        s.log.push((number, written, base_number));
        // Pages written since the base: the union over the captures after
        // it (this one included); `None` if any of them saw "all".
        let since_base: Option<PageMasks> = s.base.as_ref().and_then(|(b, _)| {
            let mut union: PageMasks = Vec::new();
            for (_, w, _) in s.log.iter().filter(|(n, ..)| n > b) {
                let w = w.as_ref()?;
                union.resize(union.len().max(w.len()), Vec::new());
                for (u, m) in union.iter_mut().zip(w) {
                    u.resize(u.len().max(m.len()), 0);
                    for (x, y) in u.iter_mut().zip(m) {
                        *x |= *y;
                    }
                }
            }
            Some(union)
        });
        let images = s.base.as_ref().map(|(_, images)| images);
        let mut deltas = Vec::new();
        for (index, size) in instance.memory_sizes().into_iter().enumerate() {
            let base = images
                .and_then(|i| i.iter().find(|m| m.index as usize == index))
                .filter(|b| b.chunk_size == DEFAULT_FIXED_CHUNK as u64);
            let written = since_base.as_ref().and_then(|u| u.get(index));
            let chunks: Vec<ChunkSource> = (0..(size as usize).div_ceil(DEFAULT_FIXED_CHUNK))
                .map(|i| {
                    let len = chunk_len(size, i);
                    // A chunk the base had shorter (memory grew since) is
                    // copied again.
                    let (Some(base), Some(written)) = (
                        base.and_then(|b| b.chunks.get(i))
                            .filter(|c| c.len() == len as u64),
                        written,
                    ) else {
                        return ChunkSource::Copied;
                    };
                    let all = all_pages(len);
                    match written.get(i).map_or(all, |m| m & all) {
                        0 => ChunkSource::Base(*base),
                        pages if pages == all => ChunkSource::Copied,
                        pages => ChunkSource::Patched { base: *base, pages },
                    }
                })
                .collect();
            let memory = instance.memory(index).expect("memory exists");
            let copied = copy_sources(memory, &chunks);
            deltas.push(MemoryDelta {
                index: index as u32,
                size,
                chunks,
                copied,
            });
        }
        drop(s);
        Ok(Captured {
            state: CapturedState::NativeDelta(deltas),
            pause: started.elapsed(),
            record: Some((self.clone(), number)),
        })
    }

    fn record(&self, number: u64, images: &[MemoryImage]) {
        let mut s = self.state.lock().unwrap();
        // A notice for a newer snapshot already came: this one is stale.
        if s.base.as_ref().is_some_and(|(b, _)| *b >= number) {
            return;
        }
        s.persisted.insert(number, images.to_vec());
    }
}

impl BaseState {
    /// Snapshots up to `aborted` without a notice may have failed. If one
    /// of them referenced the current base, the base itself may be gone
    /// (retention deleted it, so commit refused the references): drop it,
    /// so the next capture is full and cannot fail that way again.
    fn forget_aborted(&mut self, aborted: u64) {
        self.persisted.retain(|n, _| *n > aborted);
        if let Some((b, _)) = &self.base
            && self
                .log
                .iter()
                .any(|(n, _, used)| *n <= aborted && *used == Some(*b))
        {
            self.base = None;
        }
    }
}

/// Length of chunk `i` of a memory of `size` bytes.
fn chunk_len(size: u64, i: usize) -> usize {
    (size as usize - i * DEFAULT_FIXED_CHUNK).min(DEFAULT_FIXED_CHUNK)
}

/// The mask of every page of a chunk of `len` bytes.
fn all_pages(len: usize) -> u64 {
    match len.div_ceil(PAGE) {
        64 => u64::MAX,
        n => (1 << n) - 1,
    }
}

/// Runs of set bits of `mask`, as (first page, pages), ascending.
fn page_runs(mut mask: u64) -> impl Iterator<Item = (usize, usize)> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let first = mask.trailing_zeros();
        let run = (mask >> first).trailing_ones();
        let end = first + run;
        mask = if end == 64 { 0 } else { mask & !((1 << end) - 1) };
        Some((first as usize, run as usize))
    })
}

/// The byte range within a chunk of `len` bytes of `pages` pages from page
/// `first` (the chunk's last page may be short).
fn page_range(first: usize, pages: usize, len: usize) -> std::ops::Range<usize> {
    first * PAGE..((first + pages) * PAGE).min(len)
}

/// Copy what `chunks` says is needed from `memory`, back to back.
fn copy_sources(memory: &[u8], chunks: &[ChunkSource]) -> Vec<u8> {
    let bytes: usize = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| source_len(c, chunk_len(memory.len() as u64, i)))
        .sum();
    let mut out = crate::runtime::prefaulted_buffer(bytes);
    for (i, c) in chunks.iter().enumerate() {
        let start = i * DEFAULT_FIXED_CHUNK;
        let chunk = &memory[start..start + chunk_len(memory.len() as u64, i)];
        match c {
            ChunkSource::Base(_) => {}
            ChunkSource::Copied => out.extend_from_slice(chunk),
            ChunkSource::Patched { pages, .. } => {
                for (first, n) in page_runs(*pages) {
                    out.extend_from_slice(&chunk[page_range(first, n, chunk.len())]);
                }
            }
        }
    }
    out
}

/// Bytes a chunk of `len` bytes takes in a delta's `copied`.
fn source_len(c: &ChunkSource, len: usize) -> usize {
    match c {
        ChunkSource::Base(_) => 0,
        ChunkSource::Copied => len,
        ChunkSource::Patched { pages, .. } => {
            page_runs(*pages).map(|(f, n)| page_range(f, n, len).len()).sum()
        }
    }
}

fn native_error(e: RuntimeError) -> CaptureError {
    match e {
        e @ RuntimeError::NativeSnapshot { .. } => CaptureError::Declined(e.to_string()),
        e => CaptureError::Failed(Box::new(e)),
    }
}

/// Why a capture did not produce state.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The operator declined (its `snapshot-state` returned an error), or a
    /// native image is not possible right now: the snapshot fails, the task
    /// goes on.
    #[error("{0}")]
    Declined(String),
    /// The instance trapped or overran its deadline: the task fails.
    #[error(transparent)]
    Failed(Box<RuntimeError>),
}

/// Capture the task's state in `format` (task thread, instance quiescent),
/// copying the whole memory for native; `auto` means canonical here (it
/// needs a task's base: see [`capture_at_barrier`]).
///
/// Native format copies the linear memories and runs no guest code, so it
/// works for operators whose `snapshot-state` fails.
///
/// # Errors
/// [`CaptureError::Declined`] when the operator refuses or the format is not
/// possible for this instance (the reason names the component or the host
/// resources the guest holds); [`CaptureError::Failed`] when the instance
/// traps.
pub fn capture(instance: &mut TaskInstance, format: SnapshotFormat) -> Result<Captured, CaptureError> {
    let started = std::time::Instant::now();
    let state = match format {
        SnapshotFormat::Canonical | SnapshotFormat::Auto => match instance.snapshot_state() {
            Ok(bytes) => CapturedState::Canonical(bytes),
            Err(RuntimeError::Guest { message, task, .. }) => {
                return Err(CaptureError::Declined(format!(
                    "{task}: snapshot-state declined: {message}"
                )));
            }
            Err(e) => return Err(CaptureError::Failed(Box::new(e))),
        },
        SnapshotFormat::Native => CapturedState::Native(instance.capture_memories().map_err(native_error)?),
    };
    Ok(Captured {
        state,
        pause: started.elapsed(),
        record: None,
    })
}

/// Capture the task's state for the snapshot `writer` writes in `format`, the way a
/// task does at a barrier: native captures go through the task's `base`
/// (incremental); `auto` captures natively where the component allows it
/// and, when the guest holds host resources right now (or the component
/// cannot be imaged at all), canonically instead. `aborted` is the highest
/// snapshot number the coordinator gave up on.
///
/// # Errors
/// As [`capture`]; for `auto`, a decline names both reasons.
pub fn capture_at_barrier(
    instance: &mut TaskInstance,
    format: SnapshotFormat,
    base: &NativeBase,
    writer: &BlobWriter,
    aborted: u64,
) -> Result<Captured, CaptureError> {
    match format {
        SnapshotFormat::Native => base.capture(instance, writer, aborted),
        SnapshotFormat::Canonical => capture(instance, SnapshotFormat::Canonical),
        SnapshotFormat::Auto => {
            let native = match instance.component().native_support() {
                Ok(()) => base.capture(instance, writer, aborted),
                Err(why) => Err(CaptureError::Declined(why.to_string())),
            };
            match native {
                Err(CaptureError::Declined(why)) => {
                    base.forget();
                    capture(instance, SnapshotFormat::Canonical).map_err(|e| match e {
                        CaptureError::Declined(c) => {
                            CaptureError::Declined(format!("native: {why}; canonical: {c}"))
                        }
                        e => e,
                    })
                }
                other => other,
            }
        }
    }
}

/// Write captured state into the snapshot's blobs: canonical bytes
/// content-defined chunked (FastCDC), memory images cut into fixed
/// [`DEFAULT_FIXED_CHUNK`] chunks. Either way chunks already in the store
/// are not written again and all-zero chunks are not stored at all, so a
/// memory image costs only the chunks that changed since any snapshot.
///
/// # Errors
/// Store errors (I/O, quota).
pub fn persist(captured: &Captured, writer: &BlobWriter) -> Result<TaskStateData, StoreError> {
    match &captured.state {
        CapturedState::Canonical(bytes) => {
            let chunks = writer.put_chunks_cdc(bytes)?;
            Ok(TaskStateData::Canonical {
                len: bytes.len() as u64,
                chunks,
            })
        }
        CapturedState::Native(memories) => {
            let mut images = Vec::with_capacity(memories.len());
            for m in memories {
                let sources = vec![ChunkSource::Copied; (m.size as usize).div_ceil(DEFAULT_FIXED_CHUNK)];
                images.push(persist_image(writer, m.index, m.size, &sources, &m.bytes)?);
            }
            Ok(TaskStateData::Native {
                memories: images,
                extra: native_extra(None),
            })
        }
        CapturedState::NativeDelta(memories) => {
            let mut images = Vec::with_capacity(memories.len());
            for m in memories {
                images.push(persist_image(writer, m.index, m.size, &m.chunks, &m.copied)?);
            }
            let mut config = None;
            if let Some((base, number)) = &captured.record {
                base.record(*number, &images);
                config = base.config.as_deref();
            }
            Ok(TaskStateData::Native {
                memories: images,
                extra: native_extra(config),
            })
        }
    }
}

/// Store one memory image from its chunk sources and the bytes copied for
/// them, on the store's threads: copied chunks as they are, patched ones
/// rebuilt from the base's chunk (read back from the store) with the
/// written pages laid over it.
fn persist_image(
    writer: &BlobWriter,
    index: u32,
    size: u64,
    sources: &[ChunkSource],
    copied: &[u8],
) -> Result<MemoryImage, StoreError> {
    // Each chunk to store, with where its bytes start in `copied`.
    let mut todo = Vec::new();
    let mut at = 0;
    for (i, c) in sources.iter().enumerate() {
        let n = source_len(c, chunk_len(size, i));
        if !matches!(c, ChunkSource::Base(_)) {
            todo.push((i, at));
        }
        at += n;
    }
    debug_assert_eq!(at, copied.len());
    let store = |group: &[(usize, usize)]| -> Result<Vec<(ChunkRef, bool)>, StoreError> {
        let mut scratch = Vec::new();
        let mut out = Vec::with_capacity(group.len());
        for &(i, at) in group {
            let len = chunk_len(size, i);
            let bytes: &[u8] = match sources[i] {
                ChunkSource::Patched { base, pages } => {
                    scratch.resize(len, 0);
                    writer.read_chunk_into(&base, &mut scratch)?;
                    let mut from = at;
                    for (first, n) in page_runs(pages) {
                        let range = page_range(first, n, len);
                        let to = from + range.len();
                        scratch[range].copy_from_slice(&copied[from..to]);
                        from = to;
                    }
                    &scratch
                }
                _ => &copied[at..at + len],
            };
            out.push(writer.store_chunk(bytes)?);
        }
        Ok(out)
    };
    let per = todo.len().div_ceil(writer.threads()).max(1);
    // The groups are contiguous and joined in order: `stored` is in chunk
    // order, one entry per chunk that is not the base's.
    let stored: Vec<(ChunkRef, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = todo.chunks(per).map(|g| s.spawn(move || store(g))).collect();
        let mut all = Vec::with_capacity(todo.len());
        for h in handles {
            all.extend(h.join().expect("store thread panicked")?);
        }
        Ok::<_, StoreError>(all)
    })?;
    let new_chunks = stored.iter().filter(|(_, new)| *new).count() as u64;
    let mut fresh = stored.into_iter().map(|(chunk, _)| chunk);
    let chunks = sources
        .iter()
        .map(|c| match c {
            ChunkSource::Base(c) => *c,
            _ => fresh
                .next()
                .expect("one stored chunk per chunk not from the base"),
        })
        .collect();
    Ok(MemoryImage {
        index,
        size,
        chunk_size: DEFAULT_FIXED_CHUNK as u64,
        chunks,
        new_chunks: Some(new_chunks),
    })
}

/// What a native image records besides its memories: the layout version
/// (checked on restore), the digest of the operator config the task was
/// opened with (checked on restore, when known) and the engine that took it
/// (for diagnostics; the guest's memory does not depend on it).
fn native_extra(config: Option<&str>) -> serde_json::Value {
    let mut extra = serde_json::json!({
        "image_version": NATIVE_IMAGE_VERSION,
        "engine": "wasmtime 48",
    });
    if let Some(config) = config {
        extra["config"] = config.into();
    }
    extra
}

/// blake3 hex of an operator config (keys in order, each key and value
/// length-prefixed, so no two configs share a digest by concatenation).
pub fn config_digest(config: &BTreeMap<String, String>) -> String {
    let mut h = blake3::Hasher::new();
    for (k, v) in config {
        for part in [k, v] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    h.finalize().to_hex().to_string()
}

/// A native image holds the operator that `open` built from the config of
/// its time, and `open` does not run again on restore: refuse to restore
/// it into a job whose config for the operator differs (images that did
/// not record their config pass).
///
/// # Errors
/// The reason, naming the task and the way out.
pub fn check_config(state: &TaskState, config: &BTreeMap<String, String>) -> Result<(), String> {
    let TaskStateData::Native { extra, .. } = &state.state else {
        return Ok(());
    };
    match extra.get("config").and_then(serde_json::Value::as_str) {
        Some(recorded) if recorded != config_digest(config) => Err(format!(
            "task {}: the operator's config changed since this native snapshot was taken, and a native \
             image holds the operator built from the old config; run with the old config, or resume from \
             a canonical savepoint (format = \"canonical\")",
            state.key
        )),
        _ => Ok(()),
    }
}

/// Why a task could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot's bytes could not be read (missing or corrupt blob).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operator refused or trapped on `restore-state` (or, native,
    /// could not be instantiated from the image).
    #[error("restoring snapshot {id}: {source}{}", older_note(.next_older))]
    Operator {
        /// The snapshot being restored.
        id: SnapshotId,
        /// What the operator did.
        source: Box<RuntimeError>,
        /// The newest older intact snapshot of the job, where a restore can
        /// go instead (a plugin that cannot read this state may read an
        /// older one); `None` if there is none or it cannot be listed.
        next_older: Option<SnapshotId>,
    },
    /// A native snapshot was taken with another component than the one the
    /// job runs now.
    #[error(
        "snapshot {id} holds a native image of operator `{operator}` taken with component {snapshot_component}, \
         but the job now runs component {component}: native snapshots restore only into the identical component; \
         to change the plugin, resume from a canonical savepoint (format = \"canonical\")"
    )]
    ComponentMismatch {
        /// The snapshot being restored.
        id: SnapshotId,
        /// The operator.
        operator: String,
        /// blake3 hex of the component in the snapshot (or "unknown").
        snapshot_component: String,
        /// blake3 hex of the component the job runs.
        component: String,
    },
    /// The snapshot's format cannot be restored here.
    #[error("snapshot {id}: {reason}")]
    Unsupported {
        /// The snapshot.
        id: SnapshotId,
        /// Why.
        reason: String,
    },
}

fn older_note(id: &Option<SnapshotId>) -> String {
    match id {
        Some(id) => format!("; the next older intact snapshot is {id}"),
        None => "; no older intact snapshot of this job exists".into(),
    }
}

/// Restore a freshly opened instance from a task's state in snapshot `id`.
///
/// # Errors
/// [`RestoreError`] naming the snapshot (and, for damaged blobs, the task,
/// the chunk and the next older intact snapshot).
pub fn restore(
    instance: &mut TaskInstance,
    store: &TenantStore,
    id: &SnapshotId,
    state: &TaskState,
) -> Result<(), RestoreError> {
    match &state.state {
        TaskStateData::Canonical { chunks, .. } => {
            let bytes = store.read_chunks(id, &state.key, chunks)?;
            instance
                .restore_state(&bytes)
                .map_err(|source| RestoreError::Operator {
                    id: id.clone(),
                    source: Box::new(source),
                    next_older: store.next_intact_before(id).unwrap_or(None),
                })
        }
        TaskStateData::Native { .. } => Err(RestoreError::Unsupported {
            id: id.clone(),
            reason: "native state is restored while instantiating (snapshot::restore_native), \
                     not into an opened instance"
                .into(),
        }),
    }
}

/// Restore a task from native state: instantiate the identical component
/// with its memories created at the image's sizes, then overwrite them with
/// the image before any call. The guest's whole state -- including the
/// operator object built by `open` -- comes back from the image, so the
/// returned instance must *not* be opened again.
///
/// # Errors
/// [`RestoreError::ComponentMismatch`] if the snapshot was taken with
/// another component; [`RestoreError::Unsupported`] if the state is not
/// native, the image version or memory layout does not fit, or the
/// component no longer supports native snapshots;
/// [`RestoreError::Operator`] if instantiation fails; [`RestoreError::Store`]
/// for missing or corrupt blobs.
#[allow(clippy::too_many_arguments)]
pub fn restore_native(
    runtime: &Runtime,
    component: &Arc<LoadedComponent>,
    label: TaskLabel,
    limits: &SandboxLimits,
    store: &TenantStore,
    id: &SnapshotId,
    state: &TaskState,
) -> Result<TaskInstance, RestoreError> {
    let unsupported = |reason: String| RestoreError::Unsupported {
        id: id.clone(),
        reason,
    };
    let TaskStateData::Native { memories, extra } = &state.state else {
        return Err(unsupported(format!("task {} has no native state", state.key)));
    };
    let manifest = store.get(id)?;
    let recorded = manifest.components.get(&state.key.operator);
    if recorded.map(String::as_str) != Some(component.hash_hex().as_str()) {
        return Err(RestoreError::ComponentMismatch {
            id: id.clone(),
            operator: state.key.operator.clone(),
            snapshot_component: recorded.cloned().unwrap_or_else(|| "unknown".into()),
            component: component.hash_hex(),
        });
    }
    let version = extra.get("image_version").and_then(serde_json::Value::as_u64);
    if version != Some(NATIVE_IMAGE_VERSION) {
        return Err(unsupported(format!(
            "task {}: native image version {} is not the version this host reads ({NATIVE_IMAGE_VERSION})",
            state.key,
            version.map_or("missing".to_string(), |v| v.to_string())
        )));
    }
    component.native_support().map_err(|why| {
        unsupported(format!(
            "{} does not support native snapshots: {why}",
            component.name()
        ))
    })?;
    let mut sizes = vec![0u64; memories.len()];
    for m in memories {
        let slot = sizes.get_mut(m.index as usize).ok_or_else(|| {
            unsupported(format!(
                "task {}: memory index {} out of range",
                state.key, m.index
            ))
        })?;
        *slot = m.size;
    }
    let mut instance = runtime
        .instantiate_presized(component, label, limits, &sizes)
        .map_err(|source| RestoreError::Operator {
            id: id.clone(),
            source: Box::new(source),
            next_older: store.next_intact_before(id).unwrap_or(None),
        })?;
    let actual = instance.memory_sizes();
    for m in memories {
        let index = m.index as usize;
        if actual[index] != m.size {
            return Err(unsupported(format!(
                "task {}: memory {index} is {} bytes after instantiation, the image {} bytes",
                state.key, actual[index], m.size
            )));
        }
        // Data segments were written at instantiation; the image replaces
        // everything. Dropping the pages is cheaper than writing zeros and
        // leaves the image's zero chunks free.
        instance.zero_memory(index, 0, m.size as usize);
        fill_memory(&mut instance, index, store, id, &state.key, &m.chunks)?;
    }
    // The memories now equal the image: track writes from here, so that
    // the restored snapshot can be the base of the next capture.
    instance.reset_write_tracking();
    Ok(instance)
}

/// Read the chunks of one memory image straight into memory `index`
/// (zero chunks are left alone: the memory already reads zero there).
fn fill_memory(
    instance: &mut TaskInstance,
    index: usize,
    store: &TenantStore,
    id: &SnapshotId,
    task: &TaskKey,
    chunks: &[ChunkRef],
) -> Result<(), RestoreError> {
    let memory = instance
        .memory_mut(index)
        .expect("memory exists: sizes were checked");
    store.read_chunks_into(id, task, chunks, memory, false)?;
    Ok(())
}

/// The key of a task in manifests.
pub fn task_key(operator: &str, index: u32) -> TaskKey {
    TaskKey::new(operator, index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_masks_and_runs() {
        assert_eq!(all_pages(DEFAULT_FIXED_CHUNK), u64::MAX);
        assert_eq!(all_pages(64 * 1024), 0xffff);
        assert_eq!(all_pages(PAGE + 1), 0b11);
        assert_eq!(page_runs(0).count(), 0);
        let runs: Vec<_> = page_runs(0b1011_0001 | 1 << 63).collect();
        assert_eq!(runs, vec![(0, 1), (4, 2), (7, 1), (63, 1)]);
        assert_eq!(page_runs(u64::MAX).collect::<Vec<_>>(), vec![(0, 64)]);
        // The last page of a short chunk is short.
        assert_eq!(page_range(1, 2, 2 * PAGE + 100), PAGE..2 * PAGE + 100);
        let patched = ChunkSource::Patched {
            base: ChunkRef::Zero { zero: 0 },
            pages: 0b101,
        };
        assert_eq!(source_len(&patched, DEFAULT_FIXED_CHUNK), 2 * PAGE);
        assert_eq!(source_len(&ChunkSource::Copied, 1000), 1000);
    }
}
