//! Copy-on-write capture of a memory: which pages were written since the
//! last barrier, what they held at that barrier, and their contents at this
//! barrier read after the guest has already moved on.
//!
//! Mechanism (Linux ≥ 5.7 for anonymous memory, no privileges): a
//! `userfaultfd` opened with `UFFD_USER_MODE_ONLY`, registered for
//! write-protect faults in *synchronous* mode, and `UFFD_FEATURE_WP_UNPOPULATED`
//! so pages never touched are protected too. The first write to a protected
//! page stops the writing thread; a handler thread copies the page as it was
//! (its *preimage*), then removes the protection, which lets the write go on.
//! So after a barrier that protects every page again:
//!
//! - the pages written since the barrier are exactly the preimages taken,
//!   and each preimage is the page's content at the barrier: the barrier's
//!   image can be read at leisure (a page written before it was read is
//!   taken from its preimage) while the guest runs — the task pauses only to
//!   protect the pages written in the interval before;
//! - the preimages of an interval are the previous barrier's contents of
//!   exactly the pages that interval changed: what a page delta is computed
//!   against, without a second copy of the whole memory.
//!
//! The price is a fault round trip (two context switches, ~10 µs here) on
//! the first write to each page per interval, and memory for the preimages
//! of the pages written: at most one per page per interval, so at most the
//! memory's size per set held. Asynchronous write protection
//! (`UFFD_FEATURE_WP_ASYNC`, with `PAGEMAP_SCAN` to find written pages)
//! costs less per write but cannot keep preimages: the kernel resolves the
//! fault before anyone could copy the page.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use super::uffd::{
    UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_WP_UNPOPULATED, UFFDIO_REGISTER_MODE_WP, UFFDIO_WRITEPROTECT,
    UFFDIO_WRITEPROTECT_MODE_WP, UffdioRange, UffdioWriteprotect, ioctl,
};

/// The unit of tracking: the host's page.
pub const COW_PAGE: usize = 4096;

/// One page's bytes.
pub type PageBytes = Box<[u8; COW_PAGE]>;

/// Protecting pages one run at a time costs about 0.65 µs a page here;
/// protecting the whole range costs about 19 ms per GiB regardless of how
/// much was written. Above this many written pages per GiB of range the
/// whole range is protected in one call.
const WHOLE_RANGE_PAGES_PER_GIB: usize = 29_000;

/// `struct uffd_msg` as a page fault fills it.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

/// The preimages of the pages written since the last barrier, by page
/// index from the start of the range.
#[derive(Clone, Default)]
pub(crate) struct Preimages {
    pages: HashMap<u32, PageBytes>,
}

impl Preimages {
    /// Pages written since the barrier that began this set.
    pub(crate) fn len(&self) -> usize {
        self.pages.len()
    }

    /// The page indices, ascending.
    pub(crate) fn indices(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.pages.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Page `index` as it was at the barrier that began this set, if it was
    /// written since.
    pub(crate) fn get(&self, index: u32) -> Option<&PageBytes> {
        self.pages.get(&index)
    }

    /// Drop the pages at or beyond index `end`.
    pub(crate) fn retain_below(&mut self, end: u32) {
        self.pages.retain(|i, _| *i < end);
    }

    /// Merge `later` (the set of the next interval) into this one: a page
    /// in both keeps this set's, older, preimage. Used when the barrier
    /// between the two was abandoned (its snapshot aborted).
    pub(crate) fn absorb(&mut self, later: Preimages) {
        for (i, p) in later.pages {
            self.pages.entry(i).or_insert(p);
        }
    }
}

struct Shared {
    uffd: OwnedFd,
    start: u64,
    len: u64,
    current: Mutex<Preimages>,
    /// Barriers so far. Readers of a barrier's image hold it shared, a
    /// barrier exclusively: an image is readable until the next barrier.
    epoch: RwLock<u64>,
}

/// The image of an earlier barrier was asked for after a later barrier:
/// its pages may have changed since, and their preimages are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleBarrier;

/// Copy-on-write tracking of one address range (a memory's reservation).
pub(crate) struct CowTracker {
    shared: Arc<Shared>,
    /// The handler thread's kernel thread id (0 until it started), and the
    /// CPU it is pinned to (-1: none), see [`CowTracker::pin_handler`].
    handler_tid: Arc<std::sync::atomic::AtomicI32>,
    pinned: std::sync::atomic::AtomicI32,
    /// Written to stop the handler thread.
    stop: OwnedFd,
    handler: Option<JoinHandle<()>>,
}

impl CowTracker {
    /// Track `[start, start + len)` (page aligned; parts may be
    /// `PROT_NONE`), with the first `protect_len` bytes protected at once:
    /// this call is the first barrier.
    ///
    /// # Errors
    /// When the kernel lacks the mechanism or forbids it; the caller falls
    /// back to copying during the pause.
    pub(crate) fn new(start: *mut u8, len: usize, protect_len: usize) -> io::Result<CowTracker> {
        let uffd = super::uffd::open_registered(
            UFFD_FEATURE_WP_UNPOPULATED,
            start as u64,
            len as u64,
            UFFDIO_REGISTER_MODE_WP,
        )?;
        // SAFETY: plain system call; the fd is owned right away.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let shared = Arc::new(Shared {
            uffd,
            start: start as u64,
            len: len as u64,
            current: Mutex::new(Preimages::default()),
            epoch: RwLock::new(0),
        });
        if protect_len > 0 {
            shared.protect(0, protect_len.min(len) as u64, true)?;
        }
        let handler_tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let handler = {
            let shared = shared.clone();
            let stop = stop.as_raw_fd();
            let tid = handler_tid.clone();
            std::thread::Builder::new()
                .name("memento-cow".into())
                .spawn(move || {
                    // SAFETY: plain system call.
                    tid.store(unsafe { libc::gettid() }, std::sync::atomic::Ordering::Release);
                    shared.serve(stop)
                })?
        };
        Ok(CowTracker {
            shared,
            handler_tid,
            pinned: std::sync::atomic::AtomicI32::new(-1),
            stop,
            handler: Some(handler),
        })
    }

    /// A barrier, while the guest does not run: returns the preimages of
    /// the interval that ends here (the pages written since the previous
    /// barrier, as they were then) and protects those pages again, so the
    /// next interval starts. `accessible` is how much of the range is
    /// mapped (writes beyond it are impossible).
    ///
    /// # Errors
    /// I/O errors of the ioctl; the tracker is then unusable for deltas
    /// (some pages may be unprotected) and the caller falls back to full
    /// copies.
    pub(crate) fn barrier(&self, accessible: usize) -> io::Result<(u64, Preimages)> {
        let mut epoch = self.shared.epoch.write().unwrap();
        *epoch += 1;
        let taken = std::mem::take(&mut *self.shared.current.lock().unwrap());
        let accessible = (accessible as u64).min(self.shared.len);
        let whole = WHOLE_RANGE_PAGES_PER_GIB as u64 * accessible.max(1) / (1 << 30);
        if taken.len() as u64 > whole {
            self.shared.protect(0, accessible, true)?;
        } else {
            for (first, count) in runs(&taken.indices()) {
                let offset = u64::from(first) * COW_PAGE as u64;
                if offset < accessible {
                    let len = (u64::from(count) * COW_PAGE as u64).min(accessible - offset);
                    self.shared.protect(offset, len, true)?;
                }
            }
        }
        Ok((*epoch, taken))
    }

    /// The number of the last barrier (0: the one `new` made).
    pub(crate) fn epoch(&self) -> u64 {
        *self.shared.epoch.read().unwrap()
    }

    /// Keep the handler thread on `cpu`, the CPU the guest's thread runs
    /// on for a call (see `instance/calls.rs`): a fault then switches
    /// between the two threads on one CPU (~10 µs here) instead of waking a
    /// halted virtual CPU and back (~50 µs on this VM when idle).
    pub(crate) fn pin_handler(&self, cpu: i32) {
        use std::sync::atomic::Ordering;
        let tid = self.handler_tid.load(Ordering::Acquire);
        if tid == 0 || self.pinned.load(Ordering::Relaxed) == cpu {
            return;
        }
        if set_affinity(tid, cpu) {
            self.pinned.store(cpu, Ordering::Relaxed);
        }
    }

    /// Protect `[offset, offset + len)` (pages growth made accessible).
    /// Writes to them before this call are not seen: the caller counts such
    /// pages as written, with zero preimages.
    pub(crate) fn protect(&self, offset: usize, len: usize) -> io::Result<()> {
        self.shared.protect(offset as u64, len as u64, true)
    }

    /// Bytes `[offset, offset + out.len())` (page aligned) as they were at
    /// barrier `epoch`, read from the range except pages the guest has
    /// written since, which come from their preimages; [`StaleBarrier`]
    /// once a later barrier happened.
    ///
    /// # Safety
    /// The bytes must have been readable at that barrier (within the
    /// accessible size then; memories only grow).
    pub(crate) unsafe fn read_at_barrier(
        &self,
        epoch: u64,
        offset: usize,
        out: &mut [u8],
    ) -> Result<(), StaleBarrier> {
        debug_assert!(offset.is_multiple_of(COW_PAGE) && out.len().is_multiple_of(COW_PAGE));
        let now = self.shared.epoch.read().unwrap();
        if *now != epoch {
            return Err(StaleBarrier);
        }
        // SAFETY: the caller guarantees the range is mapped readable. A
        // racing guest write may tear this copy; the pass below replaces
        // every page written since the barrier, and a write proceeds only
        // after its page's preimage is in `current`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.shared.start as *const u8).add(offset),
                out.as_mut_ptr(),
                out.len(),
            );
        }
        let current = self.shared.current.lock().unwrap();
        if current.len() > 0 {
            let first = (offset / COW_PAGE) as u32;
            for (i, page) in out.chunks_exact_mut(COW_PAGE).enumerate() {
                if let Some(pre) = current.get(first + i as u32) {
                    page.copy_from_slice(&pre[..]);
                }
            }
        }
        drop(current);
        drop(now);
        Ok(())
    }

    /// Pages written since the last barrier (their preimages held).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.shared.current.lock().unwrap().len()
    }
}

impl Drop for CowTracker {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our own eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&raw const one).cast(), 8) };
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        // Dropping the uffd unregisters the range and wakes any waiter.
    }
}

impl Shared {
    fn protect(&self, offset: u64, len: u64, on: bool) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: self.start + offset,
                len,
            },
            mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp).map(|_| ())
    }

    /// The handler thread: take each faulting page's preimage, then let
    /// the write through. Ends when `stop` becomes readable.
    fn serve(&self, stop: libc::c_int) {
        let mut msgs = [UffdMsg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            flags: 0,
            address: 0,
            ptid: 0,
            pad: 0,
        }; 64];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            // SAFETY: reading whole messages into our own buffer.
            let n = unsafe {
                libc::read(
                    self.uffd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msgs),
                )
            };
            if n <= 0 {
                continue; // EAGAIN: another wake-up raced us
            }
            for m in &msgs[..n as usize / std::mem::size_of::<UffdMsg>()] {
                if m.event == UFFD_EVENT_PAGEFAULT {
                    self.take_preimage(m.address);
                }
            }
        }
    }

    fn take_preimage(&self, address: u64) {
        let offset = (address - self.start) & !(COW_PAGE as u64 - 1);
        let index = (offset / COW_PAGE as u64) as u32;
        {
            let mut current = self.current.lock().unwrap();
            current.pages.entry(index).or_insert_with(|| {
                let mut page: PageBytes = Box::new([0; COW_PAGE]);
                // SAFETY: the page is mapped (it just faulted on a write, not
                // on access) and nobody writes it until we unprotect it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (self.start + offset) as *const u8,
                        page.as_mut_ptr(),
                        COW_PAGE,
                    );
                }
                page
            });
        }
        // Unprotecting wakes the writer. Failing here would leave it stuck
        // forever; there is nothing better to do than retry, and the ioctl
        // fails only on a range that is not registered, which cannot be.
        while self.protect(offset, COW_PAGE as u64, false).is_err() {
            std::thread::yield_now();
        }
    }
}

/// Restrict thread `tid` (0: the calling thread) to `cpu`; whether the
/// kernel agreed.
pub(crate) fn set_affinity(tid: libc::pid_t, cpu: i32) -> bool {
    if cpu < 0 || cpu as usize >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; the macro and the call
    // only touch the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Runs of consecutive indices in an ascending list: (first, count).
fn runs(sorted: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &i in sorted {
        match out.last_mut() {
            Some((first, count)) if *first + *count == i => *count += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Map(*mut u8, usize);
    impl Drop for Map {
        fn drop(&mut self) {
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }
    fn map(len: usize) -> Map {
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Map(p.cast(), len)
    }

    fn tracker(m: &Map, protect: usize) -> Option<CowTracker> {
        match CowTracker::new(m.0, m.1, protect) {
            Ok(t) => Some(t),
            Err(e) => {
                crate::tracking_unavailable(&format!("copy-on-write capture is not tested ({e})"));
                None
            }
        }
    }

    #[test]
    fn runs_coalesce() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        assert!(runs(&[]).is_empty());
    }

    /// The preimages of an interval are the pages it wrote, as they were at
    /// the barrier that began it; the next interval starts clean.
    #[test]
    fn preimages_are_the_written_pages_as_they_were() {
        let m = map(16 << 20);
        unsafe { std::ptr::write_bytes(m.0, 1, 4 << 20) };
        let Some(t) = tracker(&m, m.1) else { return };
        unsafe {
            *m.0.add(3 * COW_PAGE + 5) = 9; // populated page, was all 1
            *m.0.add(3 * COW_PAGE + 6) = 9; // same page again: no new preimage
            *m.0.add((8 << 20) + 1) = 7; // never-touched page, was all 0
        }
        let (epoch, pre) = t.barrier(m.1).unwrap();
        assert_eq!(epoch, 1);
        assert_eq!(pre.indices(), vec![3, ((8 << 20) / COW_PAGE) as u32]);
        assert!(pre.get(3).unwrap().iter().all(|&b| b == 1));
        assert!(
            pre.get(((8 << 20) / COW_PAGE) as u32)
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );
        assert_eq!(t.pending(), 0);
        unsafe { *m.0.add(3 * COW_PAGE) = 4 };
        let (_, pre) = t.barrier(m.1).unwrap();
        assert_eq!(pre.indices(), vec![3], "protected again by the barrier");
        let p = pre.get(3).unwrap();
        assert_eq!((p[0], p[5], p[6], p[7]), (1, 9, 9, 1));
    }

    /// The image at a barrier is read correctly while a writer keeps
    /// changing the memory: pages written before they are read come from
    /// their preimages.
    #[test]
    fn the_barrier_image_survives_concurrent_writes() {
        const PAGES: usize = 2048;
        let m = map(PAGES * COW_PAGE);
        for i in 0..PAGES {
            unsafe { std::ptr::write_bytes(m.0.add(i * COW_PAGE), (i % 251) as u8, COW_PAGE) };
        }
        let Some(t) = tracker(&m, m.1) else { return };
        let expected: Vec<u8> = unsafe { std::slice::from_raw_parts(m.0, m.1) }.to_vec();
        let base = m.0 as usize;
        let writer = std::thread::spawn(move || {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for _ in 0..20_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % (PAGES * COW_PAGE / 8) * 8;
                unsafe { std::ptr::write_volatile((base + at) as *mut u64, x) };
            }
        });
        let mut image = vec![0u8; m.1];
        for (i, page) in image.chunks_exact_mut(COW_PAGE).enumerate() {
            unsafe { t.read_at_barrier(0, i * COW_PAGE, page) }.unwrap();
        }
        writer.join().unwrap();
        assert!(image == expected, "the image read during writes is the barrier's");
        assert!(t.pending() > 0, "the writer did write");
        t.barrier(m.1).unwrap();
        let mut page = [0u8; COW_PAGE];
        assert_eq!(
            unsafe { t.read_at_barrier(0, 0, &mut page) },
            Err(StaleBarrier),
            "a later barrier happened"
        );
        assert!(unsafe { t.read_at_barrier(1, 0, &mut page) }.is_ok());
    }
}
