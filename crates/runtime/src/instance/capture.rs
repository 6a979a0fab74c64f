//! What native snapshots read and write of an instance: its linear
//! memories (copies, refills, zeroing), which pages the guest wrote since
//! the last look, and whether an image of it can be taken at all.

use std::sync::Arc;

use crate::cow::{COW_PAGE, CowTracker, PageBytes, Preimages, StaleBarrier};

use crate::error::{NativeRefusal, RuntimeError};
use crate::label::TaskLabel;
use crate::memory::Mapping;

use super::TaskInstance;

impl TaskInstance {
    /// The current size in bytes of each linear memory, in creation order.
    pub fn memory_sizes(&self) -> Vec<u64> {
        self.memories.iter().map(|m| m.size() as u64).collect()
    }

    /// The bytes of linear memory `index` (creation order) as the guest
    /// left them after its last call; `None` if there is no such memory.
    pub fn memory(&self, index: usize) -> Option<&[u8]> {
        // SAFETY: the guest only runs inside `&mut self` calls, so it cannot
        // run (or grow the memory) while this borrow of `self` lives.
        self.memories.get(index).map(|m| unsafe { m.bytes() })
    }

    /// Linear memory `index`, writable: for filling it from an image before
    /// the first call. `None` if there is no such memory.
    pub fn memory_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        // SAFETY: as in `memory`, and `&mut self` makes this slice unique.
        self.memories.get(index).map(|m| unsafe { m.bytes_mut() })
    }

    /// Make `[offset, offset + len)` of memory `index` read as zero, handing
    /// whole pages back to the kernel rather than writing them.
    ///
    /// # Panics
    /// If the memory does not exist or the range is outside it.
    pub fn zero_memory(&mut self, index: usize, offset: usize, len: usize) {
        let m = &self.memories[index];
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= m.size()),
            "range outside memory {index}"
        );
        // SAFETY: `&mut self`: the guest is not running and no slice lives.
        unsafe { m.zero(offset, len) }
    }

    /// Host resources (WASI streams, pollables, ...) the guest holds
    /// between calls beyond those it held right after instantiation, named.
    /// A native image would carry their handles but not the resources.
    pub fn held_resources(&mut self) -> Vec<String> {
        let names: Vec<String> = self
            .store
            .data_mut()
            .table()
            .iter_mut()
            .map(resource_name)
            .collect();
        if names.len() <= self.resources_at_start {
            return Vec::new();
        }
        names
    }

    /// Why a native image of this instance cannot be taken right now, if
    /// it cannot: checked before anything is captured or scanned, so a
    /// refusal loses no write-tracking information.
    ///
    /// # Errors
    /// [`RuntimeError::Poisoned`] after a trap; [`RuntimeError::NativeSnapshot`]
    /// if the component does not support native snapshots or the guest
    /// holds host resources (named in the error).
    pub fn check_native_capture(&mut self) -> Result<(), RuntimeError> {
        if self.poisoned {
            return Err(RuntimeError::Poisoned {
                task: (*self.label).clone(),
            });
        }
        let refuse = |reason: NativeRefusal, label: &TaskLabel| RuntimeError::NativeSnapshot {
            task: label.clone(),
            reason,
        };
        if let Err(source) = self.component.native_support() {
            return Err(refuse(
                NativeRefusal::Unsupported {
                    component: self.component.name(),
                    source: Box::new(source),
                },
                &self.label,
            ));
        }
        let resources = self.held_resources();
        if !resources.is_empty() {
            return Err(refuse(NativeRefusal::HeldResources { resources }, &self.label));
        }
        Ok(())
    }

    /// Copy every linear memory (creation order) with its current size: a
    /// consistent image, since the guest is not running between calls.
    ///
    /// # Errors
    /// As [`TaskInstance::check_native_capture`].
    pub fn capture_memories(&mut self) -> Result<Vec<CapturedMemory>, RuntimeError> {
        self.check_native_capture()?;
        Ok(self
            .memories
            .iter()
            .enumerate()
            .map(|(index, m)| {
                let mut bytes = crate::memory::prefaulted_buffer(m.size());
                // SAFETY: `&mut self`: the guest is not running.
                bytes.extend_from_slice(unsafe { m.bytes() });
                CapturedMemory {
                    index: index as u32,
                    size: bytes.len() as u64,
                    bytes,
                }
            })
            .collect())
    }

    /// Turn write tracking off for good: every capture copies whole
    /// memories in the pause (the portable path). A test hook, and what
    /// the host does by itself when the kernel refuses the mechanism.
    #[doc(hidden)]
    pub fn disable_write_tracking(&mut self) {
        self.tracking = Tracking::Unavailable;
    }

    /// Whether writes are tracked (copy-on-write capture and page deltas
    /// possible).
    pub fn tracks_writes(&self) -> bool {
        matches!(self.tracking, Tracking::Cow(_))
    }

    /// Start copy-on-write tracking from the memories as they are now,
    /// which count as a barrier: the next [`TaskInstance::cow_barrier`]
    /// reports only later writes. Called after a native restore filled the
    /// memories, so the restored image can be the base of the next page
    /// delta. Returns whether tracking is on.
    pub fn start_write_tracking(&mut self) -> bool {
        self.start_cow().is_some()
    }

    /// A barrier for a copy-on-write capture: protects the pages written
    /// since the previous barrier again and hands out what is needed to
    /// read this barrier's image later, while the guest runs on (pages it
    /// writes meanwhile are copied out first). The pause is the protection
    /// alone. `Ok(None)` where the kernel does not allow the mechanism:
    /// the caller copies the memories instead
    /// ([`TaskInstance::capture_memories`]).
    ///
    /// The first barrier reports every page as written: nothing is known
    /// about the time before it.
    ///
    /// # Errors
    /// As [`TaskInstance::check_native_capture`].
    pub fn cow_barrier(&mut self) -> Result<Option<CowCapture>, RuntimeError> {
        self.check_native_capture()?;
        let Tracking::Cow(trackers) = &mut self.tracking else {
            return Ok(self.start_cow());
        };
        let mut memories = Vec::with_capacity(self.memories.len());
        for (index, (m, (tracker, tracked))) in self.memories.iter().zip(trackers.iter_mut()).enumerate() {
            let size = m.size();
            let previous = (*tracked).min(size);
            let barrier = tracker.barrier(previous).and_then(|(epoch, preimages)| {
                // Pages growth made accessible since the previous barrier
                // were not protected: all of them count as written, with
                // the zeros they held before they existed.
                if size > *tracked {
                    tracker.protect(*tracked, size - *tracked)?;
                    *tracked = size;
                }
                Ok((epoch, preimages))
            });
            match barrier {
                Ok((epoch, preimages)) => memories.push(CowMemory {
                    index: index as u32,
                    size: size as u64,
                    written: Some(WrittenPages {
                        previous_size: previous as u64,
                        preimages,
                    }),
                    tracker: tracker.clone(),
                    mapping: m.clone(),
                    epoch,
                }),
                Err(e) => {
                    tracing::warn!(
                        target: "memento::snapshot",
                        "copy-on-write tracking failed ({e}); native captures copy whole memories from now on"
                    );
                    self.tracking = Tracking::Unavailable;
                    return Ok(None);
                }
            }
        }
        Ok(Some(CowCapture { memories }))
    }

    /// Start copy-on-write tracking with a first barrier at which every
    /// page counts as written; `None` if unavailable or refused.
    fn start_cow(&mut self) -> Option<CowCapture> {
        if matches!(self.tracking, Tracking::Unavailable) {
            return None;
        }
        if std::env::var_os(DISABLE_TRACKING_ENV).is_some_and(|v| v == "off" || v == "0") {
            log_mechanism(Err("disabled by MEMENTO_DIRTY_TRACKING".into()));
            self.tracking = Tracking::Unavailable;
            return None;
        }
        // Dropping the old trackers first: one userfaultfd per range.
        self.tracking = Tracking::Off;
        let mut trackers = Vec::with_capacity(self.memories.len());
        let mut memories = Vec::with_capacity(self.memories.len());
        for (index, m) in self.memories.iter().enumerate() {
            // The whole reservation is registered (growth stays covered);
            // only the accessible prefix is protected.
            match CowTracker::new(m.base(), m.capacity(), m.size()) {
                Ok(t) => {
                    let t = Arc::new(t);
                    memories.push(CowMemory {
                        index: index as u32,
                        size: m.size() as u64,
                        written: None,
                        tracker: t.clone(),
                        mapping: m.clone(),
                        epoch: t.epoch(),
                    });
                    trackers.push((t, m.size()));
                }
                Err(e) => {
                    log_mechanism(Err(e.to_string()));
                    self.tracking = Tracking::Unavailable;
                    return None;
                }
            }
        }
        log_mechanism(Ok(()));
        self.tracking = Tracking::Cow(trackers);
        Some(CowCapture { memories })
    }
}

/// What a copy-on-write barrier hands out: per memory, the pages written
/// since the previous barrier (with their contents then) and the means to
/// read this barrier's contents until the next barrier.
pub struct CowCapture {
    /// Per memory, in creation order.
    pub memories: Vec<CowMemory>,
}

/// One memory at a copy-on-write barrier.
pub struct CowMemory {
    /// Index of the memory (creation order).
    pub index: u32,
    /// Its size in bytes at the barrier.
    pub size: u64,
    /// The pages written since the previous barrier, or `None` when that
    /// is not known (the first barrier): every page counts as written.
    pub written: Option<WrittenPages>,
    tracker: Arc<CowTracker>,
    /// Keeps the memory mapped while its image is read.
    mapping: Arc<Mapping>,
    epoch: u64,
}

impl CowMemory {
    /// Bytes `[offset, offset + out.len())` as they were at the barrier;
    /// an error once a later barrier happened (the image is gone).
    ///
    /// # Panics
    /// If the range is not whole [`PAGE`]s within the memory's size at
    /// the barrier.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), StaleBarrier> {
        assert!(
            offset.is_multiple_of(PAGE as u64)
                && out.len().is_multiple_of(PAGE)
                && offset + out.len() as u64 <= self.size,
            "{} bytes at {offset}: not whole pages of a memory of {} bytes",
            out.len(),
            self.size
        );
        debug_assert!(self.mapping.capacity() as u64 >= self.size);
        // SAFETY: the range was accessible at the barrier (checked above)
        // and stays mapped: memories only grow, and `mapping` keeps it.
        unsafe { self.tracker.read_at_barrier(self.epoch, offset as usize, out) }
    }
}

/// The pages of a memory written between two barriers.
#[derive(Clone)]
pub struct WrittenPages {
    /// The memory's size at the earlier barrier: pages beyond it did not
    /// exist then and were zero.
    pub previous_size: u64,
    preimages: Preimages,
}

impl WrittenPages {
    /// The written pages' indices, ascending: those the guest wrote, and
    /// every page growth added.
    pub fn indices(&self, size: u64) -> Vec<u32> {
        let mut v = self.preimages.indices();
        let first_new = (self.previous_size / COW_PAGE as u64) as u32;
        v.retain(|i| *i < first_new);
        v.extend(first_new..(size / COW_PAGE as u64) as u32);
        v
    }

    /// PageBytes `index` as it was at the earlier barrier, `None` for a page
    /// that was zero then (beyond its size, or never written).
    pub fn before(&self, index: u32) -> Option<&PageBytes> {
        self.preimages.get(index)
    }

    /// Merge the pages of the next interval (`later`), for a snapshot whose
    /// barrier was abandoned: the result covers both intervals, each page
    /// with its content at this set's barrier.
    pub fn absorb(&mut self, later: WrittenPages) {
        let first_new = self.previous_size / COW_PAGE as u64;
        let mut later_pre = later.preimages;
        // Pages that did not exist at this barrier were zero then, whatever
        // the later interval saw.
        later_pre.retain_below(first_new as u32);
        self.preimages.absorb(later_pre);
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.preimages.len()
    }

    /// Whether no page was written.
    pub fn is_empty(&self) -> bool {
        self.preimages.len() == 0
    }
}

/// Environment variable that turns write tracking off (`off` or `0`):
/// native captures then copy whole memories, as where the kernel lacks it.
pub const DISABLE_TRACKING_ENV: &str = "MEMENTO_DIRTY_TRACKING";

/// Write tracking of an instance's memories (see `cow.rs`).
pub(super) enum Tracking {
    /// Not started: the first native capture starts it, so tasks that only
    /// take canonical snapshots never pay for write faults.
    Off,
    /// One tracker per memory, with how many leading bytes it protects.
    Cow(Vec<(Arc<CowTracker>, usize)>),
    /// Unavailable, refused or disabled: captures copy everything.
    Unavailable,
}

/// While it lives, the calling thread (the task's, in a call into the
/// guest) stays on the CPU it is on, and the copy-on-write handlers of its
/// memories run there too: the guest's first write to a page after a
/// barrier stops it until the handler saved the page, and a switch between
/// two threads on one CPU costs a fraction of waking another, possibly
/// halted, virtual CPU and back (see `CowTracker::pin_handler`). The
/// thread's own CPU set is restored on drop.
pub(super) struct CallPin {
    saved: libc::cpu_set_t,
}

impl CallPin {
    /// Pin for a call, if copy-on-write tracking is on.
    pub(super) fn new(tracking: &Tracking) -> Option<CallPin> {
        let Tracking::Cow(trackers) = tracking else {
            return None;
        };
        // SAFETY: plain system calls on a set we own.
        let (cpu, saved) = unsafe {
            let mut saved: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut saved) != 0 {
                return None;
            }
            (libc::sched_getcpu(), saved)
        };
        if !crate::cow::set_affinity(0, cpu) {
            return None;
        }
        for (t, _) in trackers {
            t.pin_handler(cpu);
        }
        Some(CallPin { saved })
    }
}

impl Drop for CallPin {
    fn drop(&mut self) {
        // SAFETY: restoring the set saved in `new`.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.saved) };
    }
}

/// The unit of write tracking: 4 KiB, the smallest page size of the
/// hosts memento runs on (a larger host page marks all its 4 KiB pages).
pub const PAGE: usize = COW_PAGE;

/// Say once per process which mechanism native captures use.
fn log_mechanism(outcome: Result<(), String>) {
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    match outcome {
        Ok(()) => tracing::info!(
            target: "memento::snapshot",
            "native snapshots: copy-on-write capture with userfaultfd write-protect \
             (the pause protects the pages written since the last barrier; checkpoints store page deltas)"
        ),
        Err(why) => tracing::info!(
            target: "memento::snapshot",
            "native snapshots: copy-on-write capture unavailable ({why}); captures copy whole memories"
        ),
    }
}

/// A consistent copy of one linear memory, taken between calls.
#[derive(Debug, Clone)]
pub struct CapturedMemory {
    /// Index of the memory within the instance (creation order).
    pub index: u32,
    /// Its size in bytes when captured.
    pub size: u64,
    /// All of its bytes.
    pub bytes: Vec<u8>,
}

/// What kind of host resource a table entry is, for error messages.
fn resource_name(r: &mut (dyn std::any::Any + Send)) -> String {
    use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable};
    let any: &dyn std::any::Any = r;
    if any.is::<DynOutputStream>() {
        "wasi:io/streams output-stream".into()
    } else if any.is::<DynInputStream>() {
        "wasi:io/streams input-stream".into()
    } else if any.is::<DynPollable>() {
        "wasi:io/poll pollable".into()
    } else {
        "a WASI resource".into()
    }
}
