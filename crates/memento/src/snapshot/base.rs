//! A task's native base: the last committed native image its next capture
//! is incremental against.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::runtime::{TaskInstance, Written};
use crate::store::{BlobWriter, DEFAULT_FIXED_CHUNK, MemoryImage};

use super::captured::{CaptureError, Captured, CapturedState, RecordImages, Recording, native_error};
use super::image::config_digest;
use super::pages::{ChunkSource, MemoryDelta, all_pages, chunk_len, copy_sources};

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
pub(super) struct BaseState {
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
            record: Some(Recording {
                number,
                base: self.state.clone(),
                config: self.config.clone(),
            }),
        })
    }
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
