//! The raw `userfaultfd(2)` interface (linux/userfaultfd.h) that memento
//! uses: opening a descriptor for user-mode faults, registering a range,
//! and the ioctls of write protection (copy-on-write tracking, `cow.rs`) and of
//! missing-page handling (the lazy restore variant measured by
//! `benches/restore.rs`). Public but hidden: for the benchmark only.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;
/// Handle faults from user space only: allowed without privileges.
pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// Write-protect pages never touched, too.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Register for faults on missing pages.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Register for write-protect faults.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT` mode: protect (clear it to unprotect).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `uffd_msg.event` of a page fault.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `_IOWR(0xAA, nr, size)`.
const fn uffd_iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
/// `UFFDIO_API`.
pub const UFFDIO_API: u64 = uffd_iowr(0x3F, 24);
/// `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: u64 = uffd_iowr(0x00, 32);
/// `UFFDIO_COPY`.
pub const UFFDIO_COPY: u64 = uffd_iowr(0x03, 40);
/// `UFFDIO_ZEROPAGE`.
pub const UFFDIO_ZEROPAGE: u64 = uffd_iowr(0x04, 32);
/// `UFFDIO_WRITEPROTECT`.
pub const UFFDIO_WRITEPROTECT: u64 = uffd_iowr(0x06, 24);

/// `struct uffdio_api`.
#[repr(C)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

/// `ioctl(fd, request, arg)`, its result or the OS error.
pub fn ioctl<T>(fd: libc::c_int, request: u64, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: `arg` is the `repr(C)` struct the request expects.
    let rc = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A non-blocking userfaultfd for user-mode faults with `features`
/// negotiated, and `[start, start + len)` registered in `mode`.
///
/// # Errors
/// When the kernel lacks the mechanism or the features, or forbids it
/// (older kernels, seccomp, `vm.unprivileged_userfaultfd`).
pub fn open_registered(features: u64, start: u64, len: u64, mode: u64) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the fd is owned right away.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api)?;
    let mut register = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut register)?;
    Ok(uffd)
}
