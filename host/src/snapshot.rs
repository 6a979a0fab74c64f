//! Capture and restore of one task's state: runtime → bytes → chunks in the
//! store, and back. The coordinator decides when; this module decides how.
//!
//! Capture is split in two so that the task is paused only for the first:
//! [`capture`] runs on the task's thread between two `process` calls and
//! returns the state's bytes; [`persist`] chunks and writes them to the store
//! on another thread while the task goes on processing.

use std::time::Duration;

use crate::runtime::{RuntimeError, TaskInstance};
use crate::spec::SnapshotFormat;
use crate::store::{BlobWriter, SnapshotId, StoreError, TaskKey, TaskState, TaskStateData, TenantStore};

/// State captured at a barrier, not yet in the store.
pub struct Captured {
    /// The operator's canonical bytes.
    pub bytes: Vec<u8>,
    /// How long the task was paused for the capture.
    pub pause: Duration,
}

/// Why a capture did not produce state.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The operator declined (its `snapshot-state` returned an error): the
    /// snapshot fails, the task goes on.
    #[error("{0}")]
    Declined(String),
    /// The instance trapped or overran its deadline: the task fails.
    #[error(transparent)]
    Failed(Box<RuntimeError>),
}

/// Capture the task's state in `format` (task thread, instance quiescent).
///
/// # Errors
/// [`CaptureError::Declined`] when the operator refuses or the format is not
/// available; [`CaptureError::Failed`] when the instance traps.
pub fn capture(instance: &mut TaskInstance, format: SnapshotFormat) -> Result<Captured, CaptureError> {
    let started = std::time::Instant::now();
    match format {
        SnapshotFormat::Canonical => match instance.snapshot_state() {
            Ok(bytes) => Ok(Captured {
                bytes,
                pause: started.elapsed(),
            }),
            Err(RuntimeError::Guest { message, task, .. }) => {
                Err(CaptureError::Declined(format!("{task}: snapshot-state declined: {message}")))
            }
            Err(e) => Err(CaptureError::Failed(Box::new(e))),
        },
        SnapshotFormat::Native => Err(CaptureError::Declined(
            "native snapshots are not available in this version; use format = \"canonical\"".into(),
        )),
    }
}

/// Chunk captured state into the snapshot's blobs (FastCDC, deduplicated
/// against everything in the store).
///
/// # Errors
/// Store errors (I/O, quota).
pub fn persist(captured: &Captured, writer: &BlobWriter) -> Result<TaskStateData, StoreError> {
    let chunks = writer.put_chunks_cdc(&captured.bytes)?;
    Ok(TaskStateData::Canonical {
        len: captured.bytes.len() as u64,
        chunks,
    })
}

/// Why a task could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot's bytes could not be read (missing or corrupt blob).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operator refused or trapped on `restore-state`.
    #[error("restoring snapshot {id}: {source}")]
    Operator {
        /// The snapshot being restored.
        id: SnapshotId,
        /// What the operator did.
        source: Box<RuntimeError>,
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
            instance.restore_state(&bytes).map_err(|source| RestoreError::Operator {
                id: id.clone(),
                source: Box::new(source),
            })
        }
        TaskStateData::Native { .. } => Err(RestoreError::Unsupported {
            id: id.clone(),
            reason: "native snapshots cannot be restored by this version".into(),
        }),
    }
}

/// The key of a task in manifests.
pub fn task_key(operator: &str, index: u32) -> TaskKey {
    TaskKey::new(operator, index)
}
