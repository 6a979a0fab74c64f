//! What a capture produces: state copied at a barrier, not yet in the
//! store, and why a capture can fail.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::runtime::{CapturedMemory, CowMemory, GlobalValues, RuntimeError, WrittenPages};
use crate::store::MemoryImage;

use super::stream::Uploaded;

/// State captured at a barrier, not yet in the store.
pub struct Captured {
    /// What was captured.
    pub state: CapturedState,
    /// How long the task was paused for the capture.
    pub pause: Duration,
    /// For a native capture of a component with mutable globals: their
    /// values, read in the same pause as the memories.
    pub globals: Option<GlobalValues>,
    /// For an incremental native capture: where to record the persisted
    /// images (they become the base once the snapshot is known committed).
    pub(super) record: Option<Recording>,
}

/// The two kinds of captured state.
pub enum CapturedState {
    /// The operator's canonical state (`snapshot-state`), already
    /// streaming into the store.
    Canonical(Streamed),
    /// Copies of the instance's linear memories, taken in the pause
    /// (where copy-on-write tracking is unavailable).
    Native(Vec<CapturedMemory>),
    /// The instance's memories as of a copy-on-write barrier, read by the
    /// upload while the task goes on, and per memory what to write.
    CopyOnWrite {
        /// Per memory, creation order.
        memories: Vec<CowMemory>,
        /// Per memory, the same order.
        plans: Vec<MemoryPlan>,
    },
}

/// What a copy-on-write capture writes of one memory.
pub enum MemoryPlan {
    /// The whole image (unchanged chunks deduplicate as always).
    Full,
    /// A page delta extending `base`'s chain.
    Delta {
        /// The committed image the delta extends.
        base: MemoryImage,
        /// Per memory, the pages written since the base's barrier.
        written: Arc<Vec<WrittenPages>>,
        /// This memory's entry in `written`.
        slot: usize,
    },
}

impl Captured {
    /// Bytes copied during the pause (none for a copy-on-write capture).
    pub fn copied_bytes(&self) -> u64 {
        match &self.state {
            CapturedState::Canonical(s) => s.written,
            CapturedState::Native(m) => m.iter().map(|m| m.bytes.len() as u64).sum(),
            CapturedState::CopyOnWrite { .. } => 0,
        }
    }

    /// Bytes of canonical state in no key group (`None`: a native image,
    /// which no rescale can move either).
    pub fn unkeyed_bytes(&self) -> Option<u64> {
        match &self.state {
            CapturedState::Canonical(s) => Some(s.unkeyed),
            CapturedState::Native(_) | CapturedState::CopyOnWrite { .. } => None,
        }
    }
}

/// Canonical state the operator wrote, on its way into the store.
pub struct Streamed {
    /// Bytes the operator wrote (before framing).
    pub written: u64,
    /// Of those, bytes in pieces of no key group.
    pub unkeyed: u64,
    /// The upload's outcome, once its last chunk is stored.
    pub(super) upload: Receiver<Uploaded>,
}

/// Where an incremental capture's images are recorded once persisted: the
/// task's [`super::NativeBase`], which makes them its base when the snapshot
/// is known committed.
pub(super) struct Recording {
    /// The snapshot the capture is for.
    pub(super) number: u64,
    /// The base that took the capture.
    pub(super) base: Arc<dyn RecordImages>,
    /// Digest of the operator config the task was opened with.
    pub(super) config: Option<Arc<str>>,
}

/// Takes the images of a persisted incremental capture.
pub(super) trait RecordImages: Send + Sync {
    /// Snapshot `number`'s images were persisted.
    fn record(&self, number: u64, images: &[MemoryImage]);
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

pub(super) fn native_error(e: RuntimeError) -> CaptureError {
    match e {
        e @ RuntimeError::NativeSnapshot { .. } => CaptureError::Declined(e.to_string()),
        e => CaptureError::Failed(Box::new(e)),
    }
}
