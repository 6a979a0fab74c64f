//! Restoring a task from a snapshot: canonical state into an opened
//! instance, native images while instantiating.

use std::sync::Arc;

use crate::runtime::{LoadedComponent, Runtime, RuntimeError, SandboxLimits, TaskInstance, TaskLabel};
use crate::store::{MemoryImage, SnapshotId, StoreError, TaskKey, TaskState, TaskStateData, TenantStore};

use super::delta::apply as apply_delta;
use super::framing::FRAMING_VERSION;
use super::image::{ImageMismatch, check_component, check_version, image_globals};
use super::source::StoreSource;

/// Why a task could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot's bytes could not be read (missing or corrupt blob).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operator refused or trapped on `restore-state` (or, native,
    /// could not be instantiated from the image).
    #[error("restoring snapshot {id}: {source}")]
    Operator {
        /// The snapshot being restored.
        id: SnapshotId,
        /// What the operator did.
        source: Box<RuntimeError>,
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

/// Restore a freshly opened instance from a task's state in snapshot `id`:
/// canonical state streams from the store into `restore-state` chunk by
/// chunk (framed pieces, or, from a snapshot taken before framing, the
/// operator's bytes as unkeyed pieces); pieces of key groups the task does
/// not own are not its state and are skipped.
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
            let framed = match store.get(id)?.canonical_framing {
                None => false,
                Some(FRAMING_VERSION) => true,
                Some(v) => {
                    return Err(RestoreError::Unsupported {
                        id: id.clone(),
                        reason: format!(
                            "its canonical state uses framing version {v}; this build reads up to {FRAMING_VERSION}"
                        ),
                    });
                }
            };
            let (source, failure) = StoreSource::new(
                store.clone(),
                id.clone(),
                state.key.clone(),
                chunks.clone(),
                framed,
                instance.owned_key_groups(),
            );
            let restored = instance.restore_state_from(Box::new(source));
            // A damaged blob is the store's error, with the next intact
            // snapshot to try: report it as such, whatever the guest did.
            if let Some(e) = failure.lock().expect("not poisoned").take() {
                return Err(RestoreError::Store(e));
            }
            restored.map_err(|source| RestoreError::Operator {
                id: id.clone(),
                source: Box::new(source),
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
    let recorded = manifest.components.get(&state.key.operator).map(String::as_str);
    if let Err(ImageMismatch::Component {
        operator,
        snapshot_component,
        component,
    }) = check_component(state, recorded, &component.hash_hex())
    {
        return Err(RestoreError::ComponentMismatch {
            id: id.clone(),
            operator,
            snapshot_component,
            component,
        });
    }
    check_version(state, extra).map_err(|e| unsupported(e.to_string()))?;
    component.native_support().map_err(|why| {
        unsupported(format!(
            "{} does not support native snapshots: {why}",
            component.name()
        ))
    })?;
    let globals = image_globals(&state.key, extra, component.native_globals()).map_err(unsupported)?;
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
        fill_memory(&mut instance, index, store, id, &state.key, m)?;
    }
    if let Some(globals) = &globals {
        instance
            .restore_globals(globals)
            .map_err(|source| RestoreError::Operator {
                id: id.clone(),
                source: Box::new(source),
            })?;
    }
    // The memories now equal the image: track writes from here, so that
    // the restored snapshot can be the base of the next page delta.
    instance.start_write_tracking();
    Ok(instance)
}

/// Read one memory image straight into memory `index`: the base chunks
/// (zero chunks are left alone: the memory already reads zero there),
/// then each page delta of its chain, in order.
fn fill_memory(
    instance: &mut TaskInstance,
    index: usize,
    store: &TenantStore,
    id: &SnapshotId,
    task: &TaskKey,
    image: &MemoryImage,
) -> Result<(), RestoreError> {
    let memory = instance
        .memory_mut(index)
        .expect("memory exists: sizes were checked");
    // The manifest's lengths were checked when it was read: the base fits.
    let base = image.base_len() as usize;
    store.read_chunks_into(id, task, &image.chunks, &mut memory[..base], false)?;
    let mut delta = Vec::new();
    for (i, d) in image.deltas.iter().enumerate() {
        delta.resize(d.len as usize, 0);
        store.read_chunks_into(id, task, &d.chunks, &mut delta, true)?;
        apply_delta(&delta, memory).map_err(|e| RestoreError::Unsupported {
            id: id.clone(),
            reason: format!("task {task} memory {index}: delta {i}: {e}"),
        })?;
    }
    Ok(())
}
