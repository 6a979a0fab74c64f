//! Host-owned linear memories: the engine asks [`HostMemoryCreator`] for
//! every linear memory an instance defines, so the host knows where each
//! one lives and can copy it (native snapshots) or fill it (native restore)
//! between calls, without instrumenting guest code.
//!
//! Each memory is one private anonymous mapping of the whole reservation
//! plus its guard region, `PROT_NONE` except for the accessible prefix.
//! Growth makes more of it readable and writable in place; the base never
//! moves, so the compiled code's bounds-check elision stays valid.
//!
//! Which instance a memory belongs to: the engine calls the creator on the
//! thread that instantiates, during instantiation, with no hint of the
//! store. [`collect`] arms a thread-local collector around one
//! instantiation; every memory created meanwhile is handed back in creation
//! order (which is fixed by the component, so it is the same order at
//! snapshot and at restore). Memories created with no collector armed (by
//! `inspect`, say) are simply not tracked.

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

/// Host page size assumed for `mprotect` rounding. Linux on x86_64 and
/// aarch64 (4 KiB kernels); checked against `sysconf` when a memory is made.
const HOST_PAGE: usize = 4096;

/// One linear memory's mapping, shared by the engine's [`LinearMemory`]
/// and the task that snapshots it. Unmapped when both let go, so a task's
/// handle can never dangle even if it outlives the store.
#[derive(Debug)]
pub(crate) struct Mapping {
    /// Start of the mapping; the memory's byte 0.
    base: NonNull<u8>,
    /// Bytes the memory may grow to without moving (the reservation).
    capacity: usize,
    /// Total length of the mapping: capacity plus the trailing guard.
    mapped: usize,
    /// The memory's current size in bytes (what the guest sees).
    size: AtomicUsize,
    /// Bytes currently readable and writable (size rounded up to pages).
    accessible: AtomicUsize,
}

// SAFETY: the mapping is plain memory; who may touch it when is decided by
// the owners (the engine during calls, the task between calls), and the
// size fields are atomics.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Reserve `capacity + guard` bytes, of which the first `size` are
    /// accessible (and zero).
    fn new(capacity: usize, guard: usize, size: usize) -> Result<Mapping, String> {
        if size > capacity {
            return Err(format!(
                "a memory of {size} bytes does not fit the reservation of {capacity} bytes"
            ));
        }
        let mapped = capacity
            .checked_add(guard)
            .ok_or_else(|| "memory reservation overflows the address space".to_string())?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing aliases nothing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped.max(HOST_PAGE),
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "cannot reserve {mapped} bytes for a linear memory: {}",
                std::io::Error::last_os_error()
            ));
        }
        let map = Mapping {
            base: NonNull::new(base.cast()).expect("mmap never returns null on success"),
            capacity,
            mapped: mapped.max(HOST_PAGE),
            size: AtomicUsize::new(0),
            accessible: AtomicUsize::new(0),
        };
        map.grow_to(size)?;
        Ok(map)
    }

    /// Make the first `new_size` bytes accessible (never shrinks).
    fn grow_to(&self, new_size: usize) -> Result<(), String> {
        if new_size > self.capacity {
            return Err(format!(
                "cannot grow a memory to {new_size} bytes: its reservation is {} bytes",
                self.capacity
            ));
        }
        let old = self.accessible.load(Ordering::Relaxed);
        let want = new_size.div_ceil(HOST_PAGE) * HOST_PAGE;
        if want > old {
            // SAFETY: [old, want) lies inside our own reservation.
            let rc = unsafe {
                libc::mprotect(
                    self.base.as_ptr().add(old).cast(),
                    want - old,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if rc != 0 {
                return Err(format!(
                    "cannot grow a memory to {new_size} bytes: {}",
                    std::io::Error::last_os_error()
                ));
            }
            self.accessible.store(want, Ordering::Relaxed);
        }
        self.size.store(new_size, Ordering::Relaxed);
        Ok(())
    }

    /// The memory's current size in bytes.
    pub(crate) fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// Bytes the memory may grow to without moving (its reservation).
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Start of the memory.
    pub(crate) fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// The memory's bytes.
    ///
    /// # Safety
    /// The guest must not run while the slice lives (the caller holds the
    /// instance exclusively), and the memory must not grow meanwhile.
    pub(crate) unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: [0, size) is mapped readable; exclusivity is the caller's.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.size()) }
    }

    /// The memory's bytes, writable.
    ///
    /// # Safety
    /// As [`Mapping::bytes`], and no other slice of the memory may live.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: as above, and the caller guarantees uniqueness.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.size()) }
    }

    /// Give back the pages of `[offset, offset + len)` to the kernel; they
    /// read as zero afterwards. Rounds inwards to whole pages and zeroes the
    /// partial pages at the edges by hand. Cheaper than writing zeros: pages
    /// never touched cost nothing.
    ///
    /// # Safety
    /// As [`Mapping::bytes_mut`]; the range must lie within the size.
    pub(crate) unsafe fn zero(&self, offset: usize, len: usize) {
        debug_assert!(offset + len <= self.size());
        let start = offset.div_ceil(HOST_PAGE) * HOST_PAGE;
        let end = ((offset + len) / HOST_PAGE) * HOST_PAGE;
        // SAFETY: all ranges are inside [0, size), exclusivity is the caller's.
        unsafe {
            let base = self.base.as_ptr();
            if start >= end {
                std::ptr::write_bytes(base.add(offset), 0, len);
                return;
            }
            std::ptr::write_bytes(base.add(offset), 0, start - offset);
            std::ptr::write_bytes(base.add(end), 0, offset + len - end);
            if libc::madvise(base.add(start).cast(), end - start, libc::MADV_DONTNEED) != 0 {
                std::ptr::write_bytes(base.add(start), 0, end - start);
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and nobody holds a reference
        // (this is the last Arc).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.mapped);
        }
    }
}

/// The engine's handle to a [`Mapping`].
struct HostMemory {
    map: Arc<Mapping>,
}

// SAFETY: the base never moves (growth is in place within the reservation),
// [0, byte_size) is always readable and writable, and the guard region
// behind the reservation stays PROT_NONE.
unsafe impl LinearMemory for HostMemory {
    fn byte_size(&self) -> usize {
        self.map.size()
    }

    fn byte_capacity(&self) -> usize {
        self.map.capacity
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        self.map.grow_to(new_size).map_err(wasmtime::Error::msg)
    }

    fn as_ptr(&self) -> *mut u8 {
        self.map.base()
    }
}

/// The engine's memory creator: every linear memory is a host [`Mapping`],
/// reported to the collector armed on this thread, if any. Public (hidden)
/// only so the native benchmark can run guest code on it beside wasmtime's
/// own memories.
pub struct HostMemoryCreator;

/// Reservation used when the engine gives none (it always does with the
/// on-demand allocator; this is a safe default): 4 GiB, the whole 32-bit
/// address space, so growth never moves the base.
const DEFAULT_RESERVATION: usize = 4 << 30;

// SAFETY: memories are zero-filled on creation, reserve what the engine asks
// for plus the guard, and never move.
unsafe impl MemoryCreator for HostMemoryCreator {
    fn new_memory(
        &self,
        ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        if ty.is_shared() {
            return Err("shared linear memories are not supported".into());
        }
        // Always the whole reservation, even for a memory with a small
        // maximum: compiled code elides bounds checks on the promise that
        // everything past the accessible prefix, up to reservation + guard,
        // faults.
        let capacity = reserved_size_in_bytes.unwrap_or(DEFAULT_RESERVATION);
        // A restoring instance asks for its memories pre-sized to the image:
        // data segments are then applied inside the image's size, and the
        // instance's view of the size is right from the start.
        let size = COLLECTOR.with_borrow(|c| {
            c.as_ref()
                .and_then(|c| c.presize.get(c.created.len()).copied())
                .map_or(minimum, |s| s.max(minimum))
        });
        if let Some(max) = maximum
            && size > max
        {
            return Err(format!(
                "the image is {size} bytes but the memory's maximum is {max} bytes"
            ));
        }
        let map = Arc::new(Mapping::new(capacity, guard_size_in_bytes, size)?);
        COLLECTOR.with_borrow_mut(|c| {
            if let Some(c) = c {
                c.created.push(map.clone());
            }
        });
        Ok(Box::new(HostMemory { map }))
    }
}

/// The memories created on this thread while a collector is armed.
struct Collector {
    /// Sizes to create the memories at, by creation order (restore).
    presize: Vec<usize>,
    /// Memories created so far, in order.
    created: Vec<Arc<Mapping>>,
}

thread_local! {
    static COLLECTOR: RefCell<Option<Collector>> = const { RefCell::new(None) };
}

/// Disarms the collector even if the instantiation panics.
struct Disarm;

impl Drop for Disarm {
    fn drop(&mut self) {
        COLLECTOR.with_borrow_mut(|c| *c = None);
    }
}

/// Run `instantiate` with a collector armed on this thread and return what
/// it returned plus every memory it created, in creation order. Memory `i`
/// is created at `presize[i]` bytes (or its minimum, whichever is larger).
pub(crate) fn collect<R>(presize: &[usize], instantiate: impl FnOnce() -> R) -> (R, Vec<Arc<Mapping>>) {
    COLLECTOR.with_borrow_mut(|c| {
        debug_assert!(c.is_none(), "instantiations on one thread do not nest");
        *c = Some(Collector {
            presize: presize.to_vec(),
            created: Vec::new(),
        });
    });
    let disarm = Disarm;
    let out = instantiate();
    let created = COLLECTOR
        .with_borrow_mut(|c| c.take())
        .map(|c| c.created)
        .unwrap_or_default();
    drop(disarm);
    (out, created)
}

/// An empty buffer with room for `capacity` bytes whose pages are already
/// mapped, for copying memory images in a task's pause. A fresh allocation
/// takes one page fault per 4 KiB on first write, on the task's thread:
/// copying 1 GiB into one measured 0.6-1.8 s here, against 0.36 s into a
/// buffer pre-faulted with one `MADV_POPULATE_WRITE` (Linux >= 5.14;
/// elsewhere the advice fails and the faults happen during the copy, as
/// before). Transparent huge pages were measured too and rejected: with
/// `defrag = madvise` a 1 GiB buffer sometimes stalled 2-4 s in compaction.
pub fn prefaulted_buffer(capacity: usize) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(capacity);
    // Below this, the allocator serves the buffer from memory it mostly
    // already has mapped.
    #[cfg(target_os = "linux")]
    if capacity >= 1 << 20 {
        let page = 4096;
        let start = (buffer.as_mut_ptr() as usize).next_multiple_of(page);
        let end = (buffer.as_mut_ptr() as usize + capacity) & !(page - 1);
        if end > start {
            // SAFETY: the range lies inside the buffer's own allocation;
            // populating pages changes no byte the program can observe.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_POPULATE_WRITE) };
        }
    }
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_grows_in_place_and_zeroes() {
        let map = Mapping::new(1 << 20, 64 << 10, 65536).unwrap();
        let base = map.base();
        unsafe {
            map.bytes_mut()[65535] = 7;
        }
        map.grow_to(3 * 65536).unwrap();
        assert_eq!(map.base(), base, "growth never moves the base");
        assert_eq!(map.size(), 3 * 65536);
        unsafe {
            assert_eq!(map.bytes()[65535], 7);
            assert_eq!(map.bytes()[3 * 65536 - 1], 0);
            map.bytes_mut().fill(9);
            map.zero(100, 10_000);
            let b = map.bytes();
            assert_eq!(b[99], 9);
            assert!(b[100..10_100].iter().all(|&x| x == 0));
            assert_eq!(b[10_100], 9);
        }
        assert!(map.grow_to(2 << 20).is_err(), "past the reservation");
    }

    #[test]
    fn prefaulted_buffers_are_empty_with_room() {
        for capacity in [0, 100, 3 << 20] {
            let mut b = prefaulted_buffer(capacity);
            assert!(b.is_empty() && b.capacity() >= capacity);
            b.resize(capacity, 7);
            assert!(b.iter().all(|&x| x == 7));
        }
    }

    #[test]
    fn collector_sees_memories_created_while_armed() {
        let creator = HostMemoryCreator;
        let ty = MemoryType::new(1, None);
        let (_, none) = collect(&[], || ());
        assert!(none.is_empty());
        let (mem, created) = collect(&[5 * 65536], || {
            creator
                .new_memory(ty.clone(), 65536, None, Some(1 << 24), 0)
                .unwrap()
        });
        assert_eq!(created.len(), 1);
        assert_eq!(mem.byte_size(), 5 * 65536, "pre-sized for a restore");
        assert_eq!(created[0].size(), 5 * 65536);
        // Not armed any more: not collected.
        let other = creator.new_memory(ty, 65536, None, Some(1 << 24), 0).unwrap();
        assert_eq!(other.byte_size(), 65536);
    }
}
