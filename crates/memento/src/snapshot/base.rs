//! A task's native base: the last committed native image its next capture
//! extends with a page delta.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::runtime::{TaskInstance, WrittenPages};
use crate::store::{BlobWriter, DEFAULT_FIXED_CHUNK, MemoryImage};

use super::captured::{
    CaptureError, Captured, CapturedState, MemoryPlan, RecordImages, Recording, native_error,
};
use super::image::config_digest;

/// A chain is closed (the next capture writes a full image) when its
/// deltas add up to more than this fraction of the image (and a single
/// delta that large is written as a full image instead)...
pub(super) const CHAIN_BYTES_DIVISOR: u64 = 4;
/// ...or when it has this many deltas (`MEMENTO_DELTA_CHAIN` overrides
/// it, from 0 = no deltas). Both bound a restore's extra work and the space
/// a chain holds beside its base.
const MAX_DELTAS: usize = 64;

/// Environment variable: the most deltas a chain may have.
pub const DELTA_CHAIN_ENV: &str = "MEMENTO_DELTA_CHAIN";

fn max_deltas() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var(DELTA_CHAIN_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(MAX_DELTAS, |n| n.min(crate::store::MAX_CHAIN))
    })
}

/// A task's memory of its native snapshots, for page deltas: the last
/// snapshot known to be committed (the *base*: its images, each a full
/// image or a chain), the pages written since that snapshot's barrier
/// with their contents then, and the images persisted but not yet known
/// committed.
///
/// A capture may build on the base only because the base committed: its
/// blobs are in the store as long as its manifest (or a later one that
/// references them) is, and the store's commit checks they still are. An
/// aborted snapshot never becomes a base: only a `Complete` notice promotes
/// one; until then the pages written since the base keep accumulating, so
/// a missed notice costs a larger delta, never a wrong one. Cheap to clone
/// (shared with upload threads).
#[derive(Clone, Default)]
pub struct NativeBase {
    state: Arc<Mutex<BaseState>>,
    /// Digest of the operator config the task was opened with, recorded in
    /// its images (see [`config_digest`]).
    config: Option<Arc<str>>,
}

#[derive(Default)]
pub(super) struct BaseState {
    /// The base: snapshot number and its memory images.
    base: Option<(u64, Vec<MemoryImage>)>,
    /// The snapshot whose barrier the instance's write tracking last
    /// passed: what the pages of its next barrier are written since.
    last_barrier: Option<u64>,
    /// The pages written between the barrier of base `.0` and the last
    /// barrier, per memory, with their contents at the base's barrier.
    since_base: Option<(u64, Arc<Vec<WrittenPages>>)>,
    /// The last capture that wrote deltas: its snapshot and the base it
    /// extended.
    extended: Option<(u64, u64)>,
    /// Images persisted by uploads, by snapshot number, awaiting a notice.
    persisted: BTreeMap<u64, Vec<MemoryImage>>,
}

impl NativeBase {
    /// No base yet: the first capture writes full images.
    pub fn new() -> NativeBase {
        NativeBase::default()
    }

    /// As [`NativeBase::new`], for a task opened with `config`: its images
    /// record the config's digest, and restoring one under another config
    /// is refused (see [`super::check_image`]).
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
        }
        // Older persisted images may be committed too (a missed notice) or
        // aborted: either way a newer snapshot supersedes them.
        s.persisted.retain(|n, _| *n > number);
    }

    /// Forget the base: the next native capture writes full images. For a
    /// task whose snapshot went canonical instead: retention may delete
    /// the base once that snapshot commits (the task's newer state no
    /// longer references the base's chunks), so nothing may build on it.
    pub fn forget(&self) {
        *self.state.lock().unwrap() = BaseState::default();
    }

    /// The instance was restored from snapshot `number` (committed, by
    /// definition) with these images, and its write tracking started
    /// there: the next capture's delta is against them.
    pub fn restored(&self, number: u64, images: Vec<MemoryImage>) {
        *self.state.lock().unwrap() = BaseState {
            base: Some((number, images)),
            last_barrier: Some(number),
            since_base: None,
            extended: None,
            persisted: BTreeMap::new(),
        };
    }

    /// Capture the instance's memories natively for the snapshot `writer`
    /// writes. With copy-on-write tracking the task pauses only to protect
    /// the pages written since the previous barrier; the upload then reads
    /// this barrier's image while the task goes on, and writes either a
    /// page delta against the base or, when there is no base or its chain
    /// is long, a full image. Without tracking the memories are copied in
    /// the pause. `aborted` is the highest snapshot number the coordinator
    /// gave up on.
    ///
    /// # Errors
    /// As [`super::capture`].
    pub fn capture(
        &self,
        instance: &mut TaskInstance,
        writer: &BlobWriter,
        aborted: u64,
    ) -> Result<Captured, CaptureError> {
        let started = std::time::Instant::now();
        let number = writer.id().number();
        let mut s = self.state.lock().unwrap();
        s.persisted.retain(|n, _| *n > aborted);
        // The base may have been deleted since it committed (a disposed
        // native savepoint): then nothing may reference it. And a snapshot
        // that extended it and was given up on may have failed because its
        // blobs were gone: start over with a full image rather than fail
        // that way again.
        if let Some((b, _)) = &s.base
            && (!writer.job_snapshot_exists(*b) || s.extended.is_some_and(|(n, e)| n <= aborted && e == *b))
        {
            s.base = None;
        }
        let Some(mut cow) = instance.cow_barrier().map_err(native_error)? else {
            *s = BaseState::default();
            let memories = instance.capture_memories().map_err(native_error)?;
            let globals = instance.capture_globals().map_err(native_error)?;
            return Ok(Captured {
                state: CapturedState::Native(memories),
                pause: started.elapsed(),
                globals,
                record: None,
            });
        };
        // Same pause as the barrier: the guest has not run since.
        let globals = instance.capture_globals().map_err(native_error)?;
        let fresh: Option<Vec<WrittenPages>> = cow.memories.iter_mut().map(|m| m.written.take()).collect();
        // The pages written since the base's barrier: this interval's
        // alone when the previous barrier was the base's, else those of
        // every interval since, each page with its oldest content. Known
        // only if every interval since the base was seen.
        let earlier = s.since_base.take();
        let base_number = s.base.as_ref().map(|(b, _)| *b);
        let since: Option<Vec<WrittenPages>> = match (fresh, base_number) {
            (Some(fresh), Some(b)) if s.last_barrier == Some(b) => Some(fresh),
            (Some(fresh), Some(b)) => match earlier {
                Some((eb, earlier)) if eb == b && earlier.len() == fresh.len() => {
                    let mut merged: Vec<WrittenPages> = earlier.iter().cloned().collect();
                    for (m, f) in merged.iter_mut().zip(fresh) {
                        m.absorb(f);
                    }
                    Some(merged)
                }
                _ => None,
            },
            _ => None,
        };
        let since = since.map(Arc::new);
        let plans: Vec<MemoryPlan> = cow
            .memories
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let base = s
                    .base
                    .as_ref()
                    .and_then(|(_, images)| images.iter().find(|b| b.index == m.index));
                match (base, &since) {
                    (Some(base), Some(since)) if extendable(base, m.size) => MemoryPlan::Delta {
                        base: base.clone(),
                        written: since.clone(),
                        slot: i,
                    },
                    _ => MemoryPlan::Full,
                }
            })
            .collect();
        s.extended = base_number
            .filter(|_| plans.iter().any(|p| matches!(p, MemoryPlan::Delta { .. })))
            .map(|b| (number, b));
        s.last_barrier = Some(number);
        s.since_base = base_number.zip(since);
        drop(s);
        Ok(Captured {
            state: CapturedState::CopyOnWrite {
                memories: cow.memories,
                plans,
            },
            pause: started.elapsed(),
            globals,
            record: Some(Recording {
                number,
                base: self.state.clone(),
                config: self.config.clone(),
            }),
        })
    }
}

/// Whether a delta may extend `base` to a memory of `size` bytes: cut the
/// way this build cuts images, not shrunk (memories only grow), and its
/// chain still short.
fn extendable(base: &MemoryImage, size: u64) -> bool {
    let chain: u64 = base.deltas.iter().map(|d| d.len).sum();
    base.chunk_size == DEFAULT_FIXED_CHUNK as u64
        && base.size <= size
        && base.deltas.len() < max_deltas()
        && chain <= base.base_len() / CHAIN_BYTES_DIVISOR
}

impl RecordImages for Mutex<BaseState> {
    fn record(&self, number: u64, images: &[MemoryImage]) {
        let mut s = self.lock().unwrap();
        // A notice for a newer snapshot already came: this one is stale.
        if s.base.as_ref().is_some_and(|(b, _)| *b >= number) {
            return;
        }
        s.persisted.insert(number, images.to_vec());
    }
}
