//! Capture and restore of one task's state: runtime → bytes → chunks in the
//! store, and back. The coordinator decides when; this module decides how.
//!
//! Capture is split in two so that the task is paused only for the first:
//! [`capture`] runs on the task's thread between two `process` calls and
//! returns the state's bytes; [`persist`] chunks and writes them to the store
//! on another thread while the task goes on processing.

use std::sync::Arc;
use std::time::Duration;

use crate::runtime::{
    CapturedMemory, LoadedComponent, Runtime, RuntimeError, SandboxLimits, TaskInstance, TaskLabel,
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
}

/// The two kinds of captured state.
pub enum CapturedState {
    /// The operator's canonical bytes (`snapshot-state`).
    Canonical(Vec<u8>),
    /// Copies of the instance's linear memories.
    Native(Vec<CapturedMemory>),
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

/// Capture the task's state in `format` (task thread, instance quiescent).
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
        SnapshotFormat::Canonical => match instance.snapshot_state() {
            Ok(bytes) => CapturedState::Canonical(bytes),
            Err(RuntimeError::Guest { message, task, .. }) => {
                return Err(CaptureError::Declined(format!(
                    "{task}: snapshot-state declined: {message}"
                )));
            }
            Err(e) => return Err(CaptureError::Failed(Box::new(e))),
        },
        SnapshotFormat::Native => match instance.capture_memories() {
            Ok(memories) => CapturedState::Native(memories),
            Err(e @ RuntimeError::NativeSnapshot { .. }) => {
                return Err(CaptureError::Declined(e.to_string()));
            }
            Err(e) => return Err(CaptureError::Failed(Box::new(e))),
        },
    };
    Ok(Captured {
        state,
        pause: started.elapsed(),
    })
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
                images.push(MemoryImage {
                    index: m.index,
                    size: m.size,
                    chunk_size: DEFAULT_FIXED_CHUNK as u64,
                    chunks: writer.put_chunks_fixed(&m.bytes, DEFAULT_FIXED_CHUNK)?,
                });
            }
            Ok(TaskStateData::Native {
                memories: images,
                extra: native_extra(),
            })
        }
    }
}

/// What a native image records besides its memories: the layout version
/// (checked on restore) and the engine that took it (for diagnostics; the
/// guest's memory does not depend on it).
fn native_extra() -> serde_json::Value {
    serde_json::json!({
        "image_version": NATIVE_IMAGE_VERSION,
        "engine": "wasmtime 48",
    })
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

/// How many chunks one read of a native restore brings in at most: bounds
/// the transient buffer (64 × 256 KiB = 16 MiB) while keeping the store's
/// parallel reads busy.
const RESTORE_CHUNKS_PER_READ: usize = 64;

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
    Ok(instance)
}

/// Copy the blob chunks of one memory image into memory `index`, reading
/// runs of consecutive blob chunks together (zero chunks are left alone:
/// the memory already reads zero there).
fn fill_memory(
    instance: &mut TaskInstance,
    index: usize,
    store: &TenantStore,
    id: &SnapshotId,
    task: &TaskKey,
    chunks: &[ChunkRef],
) -> Result<(), RestoreError> {
    let mut offset = 0usize;
    let mut i = 0usize;
    while i < chunks.len() {
        if chunks[i].blob().is_none() {
            offset += chunks[i].len() as usize;
            i += 1;
            continue;
        }
        let run_end = (i..chunks.len())
            .take(RESTORE_CHUNKS_PER_READ)
            .take_while(|&j| chunks[j].blob().is_some())
            .last()
            .map_or(i + 1, |j| j + 1);
        let bytes = store.read_chunks(id, task, &chunks[i..run_end])?;
        let memory = instance
            .memory_mut(index)
            .expect("memory exists: sizes were checked");
        memory[offset..offset + bytes.len()].copy_from_slice(&bytes);
        offset += bytes.len();
        i = run_end;
    }
    Ok(())
}

/// The key of a task in manifests.
pub fn task_key(operator: &str, index: u32) -> TaskKey {
    TaskKey::new(operator, index)
}
