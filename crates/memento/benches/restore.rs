//! Restoring a native memory image: *eager* (every chunk copied in before
//! the first call -- what `snapshot::restore_native` does) against *lazy*
//! (nothing copied up front; a chunk is mapped in by a userfaultfd handler
//! the first time the guest touches it), beside memcpy of the same bytes
//! into a fresh mapping, measured in the same run.
//!
//! Run: `cargo bench -p memento --bench restore` (sizes in MiB via
//! `MEMENTO_BENCH_SIZES`, default `64,256,1024`; repetitions via
//! `MEMENTO_BENCH_REPS`, default 3; medians). Linux only: the lazy variant
//! needs `userfaultfd` (with `UFFD_USER_MODE_ONLY`, no privileges). Prints
//! the Markdown table of docs/PERFORMANCE.md.
//!
//! The image is the store benchmark's synthetic memory (25% zero pages),
//! stored as 256 KiB chunks without compression; both variants read the
//! blobs from the page cache, verify them, and place them in an anonymous
//! mapping the size of the memory, as a restore does.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use memento::runtime::uffd::{
    self, UFFD_EVENT_PAGEFAULT, UFFDIO_COPY, UFFDIO_REGISTER_MODE_MISSING, UFFDIO_ZEROPAGE, UffdioCopy,
    UffdioRange, UffdioZeropage, ioctl,
};
use memento::store::*;

mod common;
use common::{MIB, median, memory_image};

const CHUNK: usize = 256 * 1024;
const PAGE: usize = 4096;

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; the benchmark coordinates access.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> Mapping {
        // SAFETY: a fresh anonymous mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        Mapping { ptr: ptr.cast(), len }
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes(&self) -> &mut [u8] {
        // SAFETY: the mapping lives as long as `self`; callers do not alias.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Registers `m` for missing-page faults.
fn register_missing(m: &Mapping) -> io::Result<OwnedFd> {
    uffd::open_registered(0, m.ptr as u64, m.len as u64, UFFDIO_REGISTER_MODE_MISSING)
}

/// Serves missing-page faults on `m` until `stop`: the whole 256 KiB chunk
/// around the fault is read from the store (verified) and copied in, or
/// mapped as zero pages for a zero chunk.
fn serve_faults(
    uffd: &OwnedFd,
    m: &Mapping,
    stop: &AtomicBool,
    read: &dyn Fn(usize, &mut [u8]),
    zero: &dyn Fn(usize) -> bool,
) {
    let mut bounce = vec![0u8; CHUNK];
    let mut msg = [0u8; 32];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
            continue;
        }
        // SAFETY: reading one `struct uffd_msg` (32 bytes) into `msg`.
        let n = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if n != 32 || msg[0] != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let address = u64::from_ne_bytes(msg[16..24].try_into().unwrap()) as usize;
        let chunk = (address - m.ptr as usize) / CHUNK;
        let start = m.ptr as u64 + (chunk * CHUNK) as u64;
        let len = (m.len - chunk * CHUNK).min(CHUNK);
        let done = if zero(chunk) {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start,
                    len: len as u64,
                },
                mode: 0,
                zeropage: 0,
            };
            ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z)
        } else {
            read(chunk, &mut bounce[..len]);
            let mut c = UffdioCopy {
                dst: start,
                src: bounce.as_ptr() as u64,
                len: len as u64,
                mode: 0,
                copy: 0,
            };
            ioctl(uffd.as_raw_fd(), UFFDIO_COPY, &mut c)
        };
        // EEXIST: another fault on the same chunk was served first.
        if let Err(e) = done {
            assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "serving a fault: {e}");
        }
    }
}

/// Reads one byte of every `stride`-th page: a guest touching its state.
fn touch(m: &Mapping, stride: usize) -> u64 {
    let bytes = m.bytes();
    let mut sum = 0u64;
    for page in (0..m.len / PAGE).step_by(stride) {
        sum = sum.wrapping_add(bytes[page * PAGE + 1] as u64);
    }
    sum
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let sizes: Vec<usize> = std::env::var("MEMENTO_BENCH_SIZES")
        .unwrap_or_else(|_| "64,256,1024".into())
        .split(',')
        .map(|s| s.trim().parse().expect("MEMENTO_BENCH_SIZES: sizes in MiB"))
        .collect();
    let reps: usize = std::env::var("MEMENTO_BENCH_REPS")
        .ok()
        .map_or(3, |s| s.parse().expect("MEMENTO_BENCH_REPS"));
    let base = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-restore");
    let _ = std::fs::remove_dir_all(&base);
    println!(
        "| state | memcpy | eager: ready (= all in) | eager / memcpy | lazy: ready | lazy: 1% of pages touched | lazy: all touched | lazy all / eager |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for mib in sizes {
        let len = mib * MIB;
        let image = memory_image(len, mib as u64);
        let t = Store::open(&base.join(mib.to_string()), StoreOptions::default())
            .unwrap()
            .tenant("bench")
            .unwrap();
        let job = JobName::new("restore").unwrap();
        let mut w = t.begin(&job, 1).unwrap();
        let chunks = w.put_chunks_fixed(&image, CHUNK).unwrap();
        let key = TaskKey::new("op", 0);
        let mut m = w.manifest(SnapshotKind::Checkpoint, Trigger::Manual, StateFormat::Native);
        m.tasks.push(TaskState {
            key: key.clone(),
            state: TaskStateData::Native {
                memories: vec![MemoryImage {
                    index: 0,
                    size: len as u64,
                    chunk_size: CHUNK as u64,
                    chunks: chunks.clone(),
                    new_chunks: None,
                    base_size: None,
                    deltas: Vec::new(),
                }],
                extra: serde_json::Value::Null,
            },
        });
        let id = w.commit(m).unwrap();
        // Warm the page cache for both variants alike.
        let _ = t.read_chunks(&id, &key, &chunks).unwrap();

        let (mut copy, mut eager, mut ready, mut first, mut all) = (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..reps {
            let m = Mapping::new(len);
            let start = Instant::now();
            m.bytes().copy_from_slice(&image);
            copy.push(start.elapsed());
            drop(m);

            let m = Mapping::new(len);
            let start = Instant::now();
            t.read_chunks_into(&id, &key, &chunks, m.bytes(), false).unwrap();
            eager.push(start.elapsed());
            assert!(m.bytes() == image.as_slice(), "eager restore differs");
            drop(m);

            let m = Arc::new(Mapping::new(len));
            let stop = Arc::new(AtomicBool::new(false));
            let start = Instant::now();
            let uffd = register_missing(&m).expect("userfaultfd missing-page mode");
            let handler = {
                let (m, stop, t, id, key, chunks) = (
                    m.clone(),
                    stop.clone(),
                    t.clone(),
                    id.clone(),
                    key.clone(),
                    chunks.clone(),
                );
                std::thread::spawn(move || {
                    let read = |i: usize, out: &mut [u8]| {
                        t.read_chunks_into(&id, &key, &chunks[i..i + 1], out, true)
                            .unwrap();
                    };
                    let zero = |i: usize| chunks[i].blob().is_none();
                    serve_faults(&uffd, &m, &stop, &read, &zero);
                })
            };
            ready.push(start.elapsed());
            std::hint::black_box(touch(&m, 100));
            first.push(start.elapsed());
            std::hint::black_box(touch(&m, 1));
            all.push(start.elapsed());
            stop.store(true, Ordering::Relaxed);
            handler.join().unwrap();
            assert!(m.bytes() == image.as_slice(), "lazy restore differs");
        }
        let (copy, eager, ready, first, all) = (
            median(copy),
            median(eager),
            median(ready),
            median(first),
            median(all),
        );
        println!(
            "| {mib} MiB | {} | {} | {:.2} | {:.2} ms | {} | {} | {:.2} |",
            ms(copy),
            ms(eager),
            eager.as_secs_f64() / copy.as_secs_f64(),
            ready.as_secs_f64() * 1000.0,
            ms(first),
            ms(all),
            all.as_secs_f64() / eager.as_secs_f64()
        );
        let _ = std::fs::remove_dir_all(base.join(mib.to_string()));
    }
}
