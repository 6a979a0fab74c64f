//! Dirty-page tracking on Linux: which pages of a memory were written since
//! the last look, without scanning the memory.
//!
//! Mechanism (Linux ≥ 6.7, no privileges): a `userfaultfd` opened with
//! `UFFD_USER_MODE_ONLY` and the features `UFFD_FEATURE_WP_ASYNC` (a write
//! to a write-protected page is resolved by the kernel itself, which clears
//! the protection and marks the page written -- no fault handler thread)
//! and `UFFD_FEATURE_WP_UNPOPULATED` (pages never touched are protected
//! too). The `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` then returns the
//! written pages of a range and, in the same walk, protects them again
//! (`PM_SCAN_WP_MATCHING`), so "what changed since the last scan" is one
//! system call whose cost follows the number of page-table entries, not
//! the bytes.
//!
//! Soft-dirty bits (`/proc/self/clear_refs` + `pagemap`) would be the older
//! way; the kernels here never set them, so they are not used.
//!
//! Used by native capture (`TaskInstance::written_pages`): a memory's
//! whole reservation is registered once, so pages made accessible by
//! growth are covered without registering again; only the accessible
//! prefix is protected (protecting the never-accessible rest would cost
//! page tables for nothing).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::uffd::{
    UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED, UFFDIO_REGISTER_MODE_WP, UFFDIO_WRITEPROTECT,
    UFFDIO_WRITEPROTECT_MODE_WP, UffdioRange, UffdioWriteprotect, ioctl,
};

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | ((b'f' as u64) << 8) | 16;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// Write tracking of one address range (a memory's reservation).
pub(crate) struct DirtyTracker {
    uffd: OwnedFd,
    pagemap: File,
    start: u64,
    len: u64,
}

impl DirtyTracker {
    /// Track writes to `[start, start + len)` (page aligned, one private
    /// anonymous mapping, parts of it may be `PROT_NONE`). The first
    /// `protect_len` bytes start write-protected: the first scan of them
    /// reports what was written after this call.
    ///
    /// # Errors
    /// When the kernel lacks the mechanism or forbids it (older kernels,
    /// seccomp, `vm.unprivileged_userfaultfd` with `UFFD_USER_MODE_ONLY`
    /// refused): the caller falls back to comparing contents.
    pub(crate) fn new(start: *mut u8, len: usize, protect_len: usize) -> io::Result<DirtyTracker> {
        let uffd = super::uffd::open_registered(
            UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
            start as u64,
            len as u64,
            UFFDIO_REGISTER_MODE_WP,
        )?;
        let pagemap = File::open("/proc/self/pagemap")?;
        let tracker = DirtyTracker {
            uffd,
            pagemap,
            start: start as u64,
            len: len as u64,
        };
        if protect_len > 0 {
            tracker.protect(0, protect_len.min(len))?;
        }
        Ok(tracker)
    }

    /// Write-protect `[offset, offset + len)` of the range again (after
    /// growth made new pages accessible, for example).
    pub(crate) fn protect(&self, offset: usize, len: usize) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: self.start + offset as u64,
                len: len as u64,
            },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp).map(|_| ())
    }

    /// The page ranges (offsets from the start, end exclusive) written
    /// since the last scan within the first `len` bytes; protects them
    /// again in the same walk.
    ///
    /// # Errors
    /// I/O errors of the ioctl.
    pub(crate) fn scan(&self, len: usize) -> io::Result<Vec<(usize, usize)>> {
        let len = (len as u64).min(self.len);
        let mut out = Vec::new();
        let mut regions = vec![PageRegion::default(); 512];
        let mut from = self.start;
        let end = self.start + len;
        while from < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: from,
                end,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            let n = ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg)? as usize;
            for r in &regions[..n] {
                out.push(((r.start - self.start) as usize, (r.end - self.start) as usize));
            }
            if arg.walk_end <= from {
                break;
            }
            from = arg.walk_end;
        }
        Ok(out)
    }
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

    /// Written pages are reported once, exactly, then protected again. On
    /// kernels without the mechanism the test only says so.
    #[test]
    fn written_pages_are_found_and_reprotected() {
        let m = map(64 << 20);
        unsafe { std::ptr::write_bytes(m.0, 1, 8 << 20) }; // populated before tracking
        let tracker = match DirtyTracker::new(m.0, m.1, m.1) {
            Ok(t) => t,
            Err(e) => {
                crate::tracking_unavailable(&e.to_string());
                return;
            }
        };
        assert!(tracker.scan(m.1).unwrap().is_empty(), "nothing written yet");
        unsafe {
            *m.0.add(4096 * 3 + 5) = 9; // populated page
            *m.0.add((32 << 20) + 1) = 9; // never-touched page
            *m.0.add((32 << 20) + 4096) = 9; // its neighbour
        }
        let dirty = tracker.scan(m.1).unwrap();
        assert_eq!(
            dirty,
            vec![(3 * 4096, 4 * 4096), (32 << 20, (32 << 20) + 2 * 4096)]
        );
        assert!(
            tracker.scan(m.1).unwrap().is_empty(),
            "protected again by the scan"
        );
        unsafe { *m.0.add(4096 * 3) = 1 };
        assert_eq!(tracker.scan(m.1).unwrap(), vec![(3 * 4096, 4 * 4096)]);
    }

    /// A reservation registered while mostly `PROT_NONE` tracks the pages
    /// growth makes accessible once they are protected (how memories grow).
    #[test]
    fn grown_region_is_tracked_after_protect() {
        let m = map(16 << 20);
        unsafe { libc::mprotect(m.0.add(1 << 20).cast(), (16 << 20) - (1 << 20), libc::PROT_NONE) };
        let tracker = match DirtyTracker::new(m.0, m.1, 1 << 20) {
            Ok(t) => t,
            Err(e) => {
                crate::tracking_unavailable(&e.to_string());
                return;
            }
        };
        unsafe {
            *m.0.add(4096) = 1;
            libc::mprotect(
                m.0.add(1 << 20).cast(),
                1 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
            );
            *m.0.add((1 << 20) + 8192) = 1; // before protection: the caller counts it dirty
        }
        assert_eq!(tracker.scan(1 << 20).unwrap(), vec![(4096, 8192)]);
        tracker.protect(1 << 20, 1 << 20).unwrap();
        assert!(tracker.scan(2 << 20).unwrap().is_empty());
        unsafe { *m.0.add((1 << 20) + 3 * 4096) = 2 };
        assert_eq!(
            tracker.scan(2 << 20).unwrap(),
            vec![((1 << 20) + 3 * 4096, (1 << 20) + 4 * 4096)]
        );
    }
}
