//! Where the bytes live: a small trait and the local-directory implementation.
//!
//! Everything above this module speaks in *keys*: relative `/`-separated
//! paths such as `tenants/acme/blobs/ab/ab12...`. A backend stores whole
//! objects under keys, atomically, and offers advisory locks. The contract is
//! deliberately the intersection of a POSIX directory and an S3-compatible
//! object store (put-if-absent, whole-object reads, prefix listing), so that
//! a remote backend can be added without touching callers.
//!
//! [`LocalDir`] is the local implementation (`S3Backend`, in `s3`, the
//! remote one): all access goes through a
//! `cap-std` directory handle, so no key can reach outside the store root
//! (`..` and absolute paths are refused by the handle itself, and by
//! [`check_key`] before that).

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cap_std::ambient_authority;
use cap_std::fs::{Dir, File, OpenOptions};

/// How [`Backend::put`] treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace it (used for content-addressed blobs, whose content is equal by
    /// construction, and for counters).
    Replace,
    /// Leave it and report `false` (used for manifests: a committed snapshot
    /// is never overwritten).
    NoReplace,
}

/// Lock modes of [`Backend::lock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders at once.
    Shared,
    /// One holder, no shared holders.
    Exclusive,
}

/// A held lock; released when dropped (or when the process dies).
pub trait LockGuard: Send + Sync + fmt::Debug {}

/// Storage for the snapshot store.
///
/// Guarantees every implementation must give:
/// * `put` is atomic: a reader sees the whole object or none of it, never a
///   prefix, even if the process dies mid-write.
/// * After `flush` returns, every `put` that returned before the call is
///   durable (survives power loss), including the object's name.
/// * Locks are released when their holder dies.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Reads the whole object. An absent object is an error of kind
    /// `NotFound`.
    fn read(&self, key: &str) -> io::Result<Vec<u8>>;

    /// Reads the object into `head` and then `body` if its size is exactly
    /// their combined length, and says so; `Ok(false)` (buffers
    /// unspecified) if the size differs. Saves a copy when the caller knows
    /// where the bytes go. The default reads the whole object and copies.
    fn read_split(&self, key: &str, head: &mut [u8], body: &mut [u8]) -> io::Result<bool> {
        let all = self.read(key)?;
        if all.len() != head.len() + body.len() {
            return Ok(false);
        }
        let (h, b) = all.split_at(head.len());
        head.copy_from_slice(h);
        body.copy_from_slice(b);
        Ok(true)
    }

    /// Size of the object in bytes, `None` if absent.
    fn size(&self, key: &str) -> io::Result<Option<u64>>;

    /// Reads exactly `buf.len()` bytes of the object starting at `offset`
    /// (a range of a pack). A range past the end is an error of kind
    /// `UnexpectedEof`. The default reads the whole object.
    fn read_at(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let all = self.read(key)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let piece = start
            .checked_add(buf.len())
            .and_then(|end| all.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "range past the end"))?;
        buf.copy_from_slice(piece);
        Ok(())
    }

    /// Opens a staged object that is written by appending (a pack, blob by
    /// blob), so a writer never holds a whole pack in memory. Finished, it
    /// is published like any [`Staged`] object.
    fn stage_append(&self) -> io::Result<Box<dyn StagedAppend>>;

    /// Makes the bytes of staged objects durable, all at once (one round
    /// of disk barriers rather than one per object).
    fn sync_staged(&self, items: &[&Staged]) -> io::Result<()>;

    /// Makes one staged object (whose bytes are already durable, see
    /// [`Backend::sync_staged`]) visible under `key` unless an object is
    /// there; `false` (and the staged object dropped) if one was.
    fn publish_new(&self, staged: &Staged, key: &str) -> io::Result<bool>;

    /// Stores `data` under `key` atomically. With `sync`, the bytes are durable
    /// before the object becomes visible (its name becomes durable at the
    /// next `flush`). Returns `false` if `mode` is `NoReplace` and the object
    /// existed (nothing written).
    fn put(&self, key: &str, data: &[u8], mode: PutMode, sync: bool) -> io::Result<bool>;

    /// Writes `data` as a *staged* object: stored, not yet visible under any
    /// key, its write-back started but not waited for. Staging many objects
    /// and then publishing them makes their durability one batch instead of
    /// one barrier each (see [`Backend::publish`]).
    fn stage(&self, data: &[u8], sync: bool) -> io::Result<Staged>;

    /// Makes each staged object visible under its key (replacing any object
    /// there), after making its bytes durable if `sync`. Names become
    /// durable at the next `flush`.
    fn publish(&self, items: &[(Staged, String)], sync: bool) -> io::Result<()>;

    /// Drops a staged object that will not be published.
    fn discard(&self, staged: &Staged);

    /// Makes every earlier `put`, `publish` and `delete` durable.
    fn flush(&self) -> io::Result<()>;

    /// Deletes the object; `false` if it did not exist.
    fn delete(&self, key: &str) -> io::Result<bool>;

    /// Copies the object `from` to `to` (replacing it), atomically: a
    /// reader sees the whole copy or nothing. An absent `from` is an error
    /// of kind `NotFound`. The default reads and writes it; object storage
    /// copies on the server.
    fn copy(&self, from: &str, to: &str) -> io::Result<()> {
        let data = self.read(from)?;
        self.put(to, &data, PutMode::Replace, true)?;
        self.flush()
    }

    /// Removes the "directory" `key` if it is empty; `false` if it is not
    /// (or does not exist). Object stores have no directories: the default
    /// does nothing.
    fn remove_empty_dir(&self, key: &str) -> io::Result<bool> {
        let _ = key;
        Ok(false)
    }

    /// Names directly under the "directory" `prefix` (no trailing `/`), in no
    /// particular order; empty if there is none.
    fn list(&self, prefix: &str) -> io::Result<Vec<String>>;

    /// Takes an advisory lock named `key`; with `timeout` `None` it waits
    /// indefinitely, otherwise it gives up after the timeout and returns
    /// `Ok(None)`.
    fn lock(
        &self,
        key: &str,
        mode: LockMode,
        timeout: Option<Duration>,
    ) -> io::Result<Option<Box<dyn LockGuard>>>;

    /// Removes temporary files left behind by dead writers (this process's
    /// live writers and other live processes are left alone). Returns how
    /// many were removed.
    fn remove_stale_temp(&self) -> io::Result<usize>;

    /// Frees the space kept in reserve for a full disk, if there is any
    /// (`true`): what lets garbage collection write the index it needs
    /// before it may delete anything. A backend without a notion of a full
    /// disk has none.
    fn release_reserve(&self) -> io::Result<bool> {
        Ok(false)
    }

    /// Puts the reserve back if it was released and there is room again.
    /// Best effort: a disk still full only leaves it missing.
    fn restore_reserve(&self) {}

    /// Whether [`Backend::read_versioned`] and [`Backend::put_versioned`]
    /// work: object storage has them, a directory does not (it has
    /// `flock`, which object storage lacks).
    fn has_versions(&self) -> bool {
        false
    }

    /// How long a lease written with [`Backend::put_versioned`] lives
    /// without renewal; `None` where there are no versions.
    fn lease_ttl(&self) -> Option<Duration> {
        None
    }

    /// The grace period of garbage collection on object storage: writers
    /// take no locks there, and GC deletes a pack only after it has
    /// announced so for this long (docs/STORAGE.md, "Garbage collection
    /// on object storage"). `None`: writers pin with locks (a directory).
    fn gc_grace(&self) -> Option<Duration> {
        None
    }

    /// When the object was last written, by the clock of whoever stores it
    /// (the server's, on object storage: only compared with other times of
    /// the same server); `None` if absent.
    fn modified(&self, key: &str) -> io::Result<Option<std::time::SystemTime>> {
        let _ = key;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "modification times are used on object storage only",
        ))
    }

    /// Reads the object and its version (an opaque token that changes with
    /// every write: the ETag on object storage); `None` if absent.
    fn read_versioned(&self, key: &str) -> io::Result<Option<(Vec<u8>, String)>> {
        let _ = key;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "versioned reads need object storage",
        ))
    }

    /// Stores `data` under `key` only if the object's version is still
    /// `expected` (`None`: only if there is no object), in one atomic
    /// conditional write. Returns the new version, or `None` (nothing
    /// written) if the condition did not hold.
    fn put_versioned(&self, key: &str, data: &[u8], expected: Option<&str>) -> io::Result<Option<String>> {
        let _ = (key, data, expected);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "conditional writes need object storage",
        ))
    }
}

/// Whether `e` says the disk (or the user's quota on it) is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::EDQUOT)
}

/// A staged object (see [`Backend::stage`]): an opaque backend-specific
/// handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged(pub String);

/// A staged object being written by appending (see
/// [`Backend::stage_append`]).
pub trait StagedAppend: Send + fmt::Debug {
    /// Appends `data`.
    ///
    /// # Errors
    /// Any I/O error; the object is then unusable (discard it).
    fn append(&mut self, data: &[u8]) -> io::Result<()>;

    /// Ends the writing and, with `sync`, starts the write-back without
    /// waiting; the object is then published or discarded as a [`Staged`].
    ///
    /// # Errors
    /// Any I/O error.
    fn finish(self: Box<Self>, sync: bool) -> io::Result<Staged>;

    /// The staged object, to discard if writing fails half-way.
    fn staged(&self) -> Staged;
}

/// `fsync` calls a [`LocalDir`] made, for the benchmarks' counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncCounts {
    /// `fsync`/`fdatasync` of files.
    pub files: u64,
    /// `fsync` of directories.
    pub dirs: u64,
}

/// Rejects keys that are empty, absolute or contain `.`/`..`/empty
/// components or NUL. Callers build keys from validated names; this is the
/// second line of defence.
pub fn check_key(key: &str) -> io::Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\0')
        || key.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid store key {key:?}"),
        ));
    }
    Ok(())
}

/// Threads `publish` uses to `fdatasync` staged files (I/O-bound waits,
/// so more than the cores).
const PUBLISH_SYNC_THREADS: usize = 8;

/// Directory of temporary files, relative to the root.
const TMP_DIR: &str = "tmp";

/// Space set aside at the store root, released when garbage collection
/// finds the disk full (see `Backend::release_reserve`).
const RESERVE_FILE: &str = "reserve";

/// Size of [`RESERVE_FILE`]: room for an index of about 160,000 blobs.
pub const RESERVE_SIZE: u64 = 8 << 20;

/// The local-directory backend.
///
/// Temporary files go to `tmp/` under the root (same filesystem, so `rename`
/// is atomic) and are named after this instance's *owner lock*
/// `tmp/<pid>-<nonce>.owner`, which it holds exclusively for its lifetime.
/// [`Backend::remove_stale_temp`] deletes temporaries only of owners whose
/// lock it can take, i.e. owners that are gone.
pub struct LocalDir {
    root: Dir,
    /// Prefix of this instance's temporary file names (`<pid>-<nonce>`).
    owner: String,
    /// The owner file, created and locked with the first temporary file and
    /// held from then on (see the type's doc). Not at open: a store on a
    /// full or read-only disk must still open, to be read or to free space.
    owner_lock: Mutex<Option<std::fs::File>>,
    /// Opened by [`LocalDir::open_read_only`]: every change is refused.
    read_only: bool,
    next_tmp: AtomicU64,
    /// Directories with renames or deletes not yet fsynced.
    dirty_dirs: Mutex<BTreeSet<String>>,
    file_syncs: AtomicU64,
    dir_syncs: AtomicU64,
}

impl fmt::Debug for LocalDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalDir").field("owner", &self.owner).finish()
    }
}

/// A held lock: the open file whose lock it is. The lock belongs to the
/// open file description (`flock` on Linux), so two opens of the same file,
/// even in one process, exclude each other, and closing the file releases it.
#[derive(Debug)]
struct FileLockGuard(#[allow(dead_code)] std::fs::File);
impl LockGuard for FileLockGuard {}

/// Takes `mode` on `file`, waiting for it.
fn lock_file(file: &std::fs::File, mode: LockMode) -> io::Result<()> {
    match mode {
        LockMode::Shared => file.lock_shared(),
        LockMode::Exclusive => file.lock(),
    }
}

/// Takes `mode` on `file` if no other holder is in the way; `false` if one is.
fn try_lock_file(file: &std::fs::File, mode: LockMode) -> io::Result<bool> {
    let taken = match mode {
        LockMode::Shared => file.try_lock_shared(),
        LockMode::Exclusive => file.try_lock(),
    };
    match taken {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Asks the kernel to start writing the file's dirty pages now, without
/// waiting, so the later `fdatasync` finds little left to do.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    // SAFETY: a hint on a valid descriptor; failure is harmless.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

/// Allocates `len` bytes to `file` (blocks reserved, nothing written).
fn allocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::other("reserve too large"))?;
    // SAFETY: a valid descriptor; the call only allocates blocks to it.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

fn parent_of(key: &str) -> &str {
    key.rsplit_once('/').map_or("", |(p, _)| p)
}

impl LocalDir {
    /// Opens (creating if missing) the directory `path` as a store root.
    /// Writes nothing else until the first change: on a full disk the store
    /// opens, and deleting (which frees space) works.
    ///
    /// # Errors
    /// Any I/O error creating or opening the directory.
    pub fn open(path: &Path) -> io::Result<Self> {
        Dir::create_ambient_dir_all(path, ambient_authority())?;
        Self::with_root(Dir::open_ambient_dir(path, ambient_authority())?, false)
    }

    /// Opens the existing directory `path` as a store root that is only
    /// read: nothing is created, cleaned or locked, and every change fails
    /// with [`io::ErrorKind::ReadOnlyFilesystem`]. For commands that only
    /// read, so that they work on a read-only or full disk and never
    /// disturb a writer.
    ///
    /// # Errors
    /// Any I/O error opening the directory (`NotFound` if it is missing).
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        Self::with_root(Dir::open_ambient_dir(path, ambient_authority())?, true)
    }

    fn with_root(root: Dir, read_only: bool) -> io::Result<Self> {
        static NONCE: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let owner = format!(
            "{}-{:x}{:x}",
            std::process::id(),
            nanos,
            NONCE.fetch_add(1, Ordering::Relaxed)
        );
        Ok(LocalDir {
            root,
            owner,
            owner_lock: Mutex::new(None),
            read_only,
            next_tmp: AtomicU64::new(0),
            dirty_dirs: Mutex::new(BTreeSet::new()),
            file_syncs: AtomicU64::new(0),
            dir_syncs: AtomicU64::new(0),
        })
    }

    /// Fails if this handle was opened read-only.
    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::ReadOnlyFilesystem,
                "the store was opened read-only",
            ));
        }
        Ok(())
    }

    /// Creates and locks this instance's owner file if it has none yet. A
    /// failure (a full disk) leaves no owner file behind: an empty one
    /// would never be cleaned (see `remove_stale_temp`).
    fn own_temporaries(&self) -> io::Result<()> {
        self.writable()?;
        let mut held = self.owner_lock.lock().unwrap();
        if held.is_some() {
            return Ok(());
        }
        self.create_dirs(TMP_DIR)?;
        let path = format!("{TMP_DIR}/{}.owner", self.owner);
        let mut file = self
            .root
            .open_with(&path, OpenOptions::new().write(true).create_new(true))?
            .into_std();
        // Non-empty means "locked by its owner": a cleaner that takes the
        // lock of an *empty* owner file may have raced with our lock here,
        // so it must not treat it as dead.
        let locked = lock_file(&file, LockMode::Exclusive)
            .and_then(|()| file.write_all(std::process::id().to_string().as_bytes()));
        if let Err(e) = locked {
            drop(file);
            let _ = self.root.remove_file(&path);
            return Err(e);
        }
        *held = Some(file);
        drop(held);
        self.restore_reserve();
        Ok(())
    }

    /// How many `fsync`s this instance has made so far.
    pub fn sync_counts(&self) -> SyncCounts {
        SyncCounts {
            files: self.file_syncs.load(Ordering::Relaxed),
            dirs: self.dir_syncs.load(Ordering::Relaxed),
        }
    }

    fn sync_file(&self, f: &File) -> io::Result<()> {
        self.file_syncs.fetch_add(1, Ordering::Relaxed);
        f.sync_data()
    }

    fn new_temp_name(&self) -> io::Result<String> {
        self.own_temporaries()?;
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        Ok(format!("{TMP_DIR}/{}-{n}.tmp", self.owner))
    }

    fn mark_dirty(&self, dir: &str) {
        self.dirty_dirs.lock().unwrap().insert(dir.to_string());
    }

    fn fsync_dir(&self, dir: &str) -> io::Result<()> {
        // cap-std opens directories O_PATH, which cannot be fsynced; open the
        // directory for reading instead.
        let path = if dir.is_empty() { "." } else { dir };
        let d = self.root.open_with(path, OpenOptions::new().read(true))?;
        self.dir_syncs.fetch_add(1, Ordering::Relaxed);
        d.sync_all()
    }

    /// Creates `dir` and its missing parents, recording each created level's
    /// parent as dirty so the new names become durable at the next flush.
    fn create_dirs(&self, dir: &str) -> io::Result<()> {
        let mut at = String::new();
        for comp in dir.split('/') {
            let parent = at.clone();
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(comp);
            match self.root.create_dir(&at) {
                Ok(()) => self.mark_dirty(&parent),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_temp(&self, data: &[u8], sync: bool) -> io::Result<String> {
        self.write_temp_with(data, |f| if sync { self.sync_file(f) } else { Ok(()) })
    }

    fn write_temp_with(
        &self,
        data: &[u8],
        after: impl FnOnce(&File) -> io::Result<()>,
    ) -> io::Result<String> {
        let tmp = self.new_temp_name()?;
        let mut f = self
            .root
            .open_with(&tmp, OpenOptions::new().write(true).create_new(true))?;
        let result = f.write_all(data).and_then(|()| after(&f));
        if let Err(e) = result {
            let _ = self.root.remove_file(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }

    fn install(&self, tmp: &str, key: &str, mode: PutMode) -> io::Result<bool> {
        match mode {
            PutMode::Replace => self.root.rename(tmp, &self.root, key).map(|()| true),
            // link(2) fails if the target exists: an atomic put-if-absent.
            PutMode::NoReplace => match self.root.hard_link(tmp, &self.root, key) {
                Ok(()) => {
                    self.root.remove_file(tmp)?;
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    self.root.remove_file(tmp)?;
                    Ok(false)
                }
                Err(e) => Err(e),
            },
        }
    }
}

impl LocalDir {
    /// Opens `key` for reading if it is a regular file. Non-blocking, so
    /// that a FIFO planted where a blob or manifest belongs is refused
    /// instead of hanging the reader until someone writes to it.
    fn open_regular(&self, key: &str) -> io::Result<File> {
        use cap_std::fs::OpenOptionsExt;
        let mut options = OpenOptions::new();
        options.read(true).custom_flags(libc::O_NONBLOCK);
        let file = self.root.open_with(key, &options)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
        }
        Ok(file)
    }
}

impl Backend for LocalDir {
    fn release_reserve(&self) -> io::Result<bool> {
        self.writable()?;
        match self.root.remove_file(RESERVE_FILE) {
            Ok(()) => {
                tracing::warn!("the disk is full: released the store's reserve of {RESERVE_SIZE} bytes");
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn restore_reserve(&self) {
        if self.read_only || self.root.exists(RESERVE_FILE) {
            return;
        }
        // Allocated, not written: blocks set aside at no I/O cost. Made
        // under a temporary name so a half-made reserve is never taken for
        // space that can be freed.
        let made = self.new_temp_name().and_then(|tmp| {
            let f = self
                .root
                .open_with(&tmp, OpenOptions::new().write(true).create_new(true))?;
            let allocated =
                allocate(&f, RESERVE_SIZE).and_then(|()| self.root.rename(&tmp, &self.root, RESERVE_FILE));
            if allocated.is_err() {
                let _ = self.root.remove_file(&tmp);
            }
            allocated
        });
        if let Err(e) = made {
            tracing::debug!(error = %e, "no reserve for a full disk");
        }
    }

    fn read(&self, key: &str) -> io::Result<Vec<u8>> {
        use std::io::Read;
        check_key(key)?;
        let mut bytes = Vec::new();
        self.open_regular(key)?.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    fn read_split(&self, key: &str, head: &mut [u8], body: &mut [u8]) -> io::Result<bool> {
        use std::io::Read;
        check_key(key)?;
        let mut file = self.open_regular(key)?;
        if file.metadata()?.len() != (head.len() + body.len()) as u64 {
            return Ok(false);
        }
        file.read_exact(head)?;
        file.read_exact(body)?;
        Ok(true)
    }

    fn size(&self, key: &str) -> io::Result<Option<u64>> {
        check_key(key)?;
        match self.root.metadata(key) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn put(&self, key: &str, data: &[u8], mode: PutMode, sync: bool) -> io::Result<bool> {
        check_key(key)?;
        let tmp = self.write_temp(data, sync)?;
        let parent = parent_of(key);
        let installed = match self.install(&tmp, key, mode) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !parent.is_empty() => {
                self.create_dirs(parent)?;
                self.install(&tmp, key, mode)
            }
            other => other,
        };
        match installed {
            Ok(done) => {
                if done {
                    self.mark_dirty(parent);
                }
                Ok(done)
            }
            Err(e) => {
                let _ = self.root.remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn stage(&self, data: &[u8], sync: bool) -> io::Result<Staged> {
        self.write_temp_with(data, |f| {
            if sync {
                start_writeback(f);
            }
            Ok(())
        })
        .map(Staged)
    }

    fn publish(&self, items: &[(Staged, String)], sync: bool) -> io::Result<()> {
        for (_, key) in items {
            check_key(key)?;
        }
        if sync {
            let staged: Vec<&Staged> = items.iter().map(|(s, _)| s).collect();
            self.sync_staged(&staged)?;
        }
        for (staged, key) in items {
            let parent = parent_of(key);
            match self.install(&staged.0, key, PutMode::Replace) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && !parent.is_empty() => {
                    self.create_dirs(parent)?;
                    self.install(&staged.0, key, PutMode::Replace)?;
                }
                other => {
                    other?;
                }
            }
            self.mark_dirty(parent);
        }
        Ok(())
    }

    fn discard(&self, staged: &Staged) {
        let _ = self.root.remove_file(&staged.0);
    }

    fn read_at(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        check_key(key)?;
        self.open_regular(key)?.into_std().read_exact_at(buf, offset)
    }

    fn stage_append(&self) -> io::Result<Box<dyn StagedAppend>> {
        let tmp = self.new_temp_name()?;
        let file = self
            .root
            .open_with(&tmp, OpenOptions::new().write(true).create_new(true))?;
        Ok(Box::new(LocalAppend {
            file: io::BufWriter::with_capacity(64 << 10, file.into_std()),
            tmp,
        }))
    }

    fn sync_staged(&self, items: &[&Staged]) -> io::Result<()> {
        // Write-back started at stage time, so these mostly wait for the
        // disk's cache flush; issuing them from several threads lets the
        // filesystem share one journal commit and flush among many files
        // (measured in docs/PERFORMANCE.md: about 1.3x one big file's
        // fsync, against 5-7x for one-at-a-time fsync before the write of
        // the next blob). `syncfs` was measured too and rejected: it also
        // flushes every other dirty file on the filesystem.
        if items.is_empty() {
            return Ok(());
        }
        let per = items.len().div_ceil(PUBLISH_SYNC_THREADS).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = items
                .chunks(per)
                .map(|group| {
                    scope.spawn(move || {
                        group.iter().try_for_each(|staged| {
                            let f = self.root.open_with(&staged.0, OpenOptions::new().read(true))?;
                            self.sync_file(&f)
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("sync thread panicked"))
        })
    }

    fn publish_new(&self, staged: &Staged, key: &str) -> io::Result<bool> {
        check_key(key)?;
        let parent = parent_of(key);
        let installed = match self.install(&staged.0, key, PutMode::NoReplace) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !parent.is_empty() => {
                self.create_dirs(parent)?;
                self.install(&staged.0, key, PutMode::NoReplace)
            }
            other => other,
        };
        if let Ok(true) = installed {
            self.mark_dirty(parent);
        }
        installed
    }

    fn flush(&self) -> io::Result<()> {
        let dirs = std::mem::take(&mut *self.dirty_dirs.lock().unwrap());
        // Deepest first, so that a created directory is synced before the
        // entry naming it in its parent; directories of one depth are
        // independent and synced together (one round of disk barriers).
        let mut by_depth: Vec<Vec<&String>> = Vec::new();
        for dir in &dirs {
            let depth = if dir.is_empty() {
                0
            } else {
                dir.matches('/').count() + 1
            };
            if by_depth.len() <= depth {
                by_depth.resize(depth + 1, Vec::new());
            }
            by_depth[depth].push(dir);
        }
        for level in by_depth.iter().rev().filter(|l| !l.is_empty()) {
            let result = std::thread::scope(|scope| {
                let handles: Vec<_> = level
                    .iter()
                    .map(|dir| scope.spawn(move || self.fsync_dir(dir)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("sync thread panicked"))
                    // Removed meanwhile: nothing to make durable.
                    .find(|r| r.as_ref().is_err_and(|e| e.kind() != io::ErrorKind::NotFound))
                    .unwrap_or(Ok(()))
            });
            if let Err(e) = result {
                // Put them back so a later flush retries them.
                self.dirty_dirs.lock().unwrap().extend(dirs.iter().cloned());
                return Err(e);
            }
        }
        Ok(())
    }

    fn delete(&self, key: &str) -> io::Result<bool> {
        check_key(key)?;
        self.writable()?;
        match self.root.remove_file(key) {
            Ok(()) => {
                self.mark_dirty(parent_of(key));
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn remove_empty_dir(&self, key: &str) -> io::Result<bool> {
        check_key(key)?;
        self.writable()?;
        match self.root.remove_dir(key) {
            Ok(()) => {
                self.mark_dirty(parent_of(key));
                Ok(true)
            }
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.kind() == io::ErrorKind::DirectoryNotEmpty
                    || e.raw_os_error() == Some(libc::ENOTEMPTY) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        check_key(prefix)?;
        let entries = match self.root.read_dir(prefix) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn lock(
        &self,
        key: &str,
        mode: LockMode,
        timeout: Option<Duration>,
    ) -> io::Result<Option<Box<dyn LockGuard>>> {
        check_key(key)?;
        self.writable()?;
        let open = || {
            self.root
                .open_with(key, OpenOptions::new().write(true).create(true))
        };
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_dirs(parent_of(key))?;
                open()?
            }
            other => other?,
        }
        .into_std();
        let Some(timeout) = timeout else {
            lock_file(&file, mode)?;
            return Ok(Some(Box::new(FileLockGuard(file))));
        };
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if try_lock_file(&file, mode)? {
                return Ok(Some(Box::new(FileLockGuard(file))));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    fn remove_stale_temp(&self) -> io::Result<usize> {
        if self.read_only {
            return Ok(0);
        }
        let mut removed = 0;
        let names = self.list(TMP_DIR)?;
        let dead_owners: Vec<&str> = names
            .iter()
            .filter_map(|n| n.strip_suffix(".owner"))
            .filter(|owner| *owner != self.owner)
            .filter(|owner| {
                let path = format!("{TMP_DIR}/{owner}.owner");
                match self.root.open_with(&path, OpenOptions::new().write(true)) {
                    // Taking the lock of a non-empty owner file means its
                    // holder is gone (see `open`).
                    Ok(f) => {
                        let f = f.into_std();
                        try_lock_file(&f, LockMode::Exclusive).unwrap_or(false)
                            && f.metadata().is_ok_and(|m| m.len() > 0)
                    }
                    Err(_) => false,
                }
            })
            .collect();
        for name in &names {
            let Some(stem) = name.strip_suffix(".tmp") else {
                continue;
            };
            // `<owner>-<n>.tmp`: the owner is everything before the last '-'.
            let owner = stem.rsplit_once('-').map_or("", |(o, _)| o);
            if dead_owners.contains(&owner) && self.root.remove_file(format!("{TMP_DIR}/{name}")).is_ok() {
                removed += 1;
            }
        }
        for owner in dead_owners {
            let _ = self.root.remove_file(format!("{TMP_DIR}/{owner}.owner"));
        }
        Ok(removed)
    }
}

/// A handle that owned temporaries removes them and its owner file when it
/// goes, so a command that failed (a full disk) leaves nothing in `tmp/`.
/// Nothing staged can be published after this: publishing needs the handle.
impl Drop for LocalDir {
    fn drop(&mut self) {
        let Some(lock) = self.owner_lock.get_mut().ok().and_then(Option::take) else {
            return;
        };
        let mine = format!("{}-", self.owner);
        for name in self.list(TMP_DIR).unwrap_or_default() {
            if name.starts_with(&mine) && name.ends_with(".tmp") {
                let _ = self.root.remove_file(format!("{TMP_DIR}/{name}"));
            }
        }
        let _ = self.root.remove_file(format!("{TMP_DIR}/{}.owner", self.owner));
        drop(lock);
    }
}

/// A pack being appended to in `tmp/`.
#[derive(Debug)]
struct LocalAppend {
    file: io::BufWriter<std::fs::File>,
    tmp: String,
}

impl StagedAppend for LocalAppend {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)
    }

    fn finish(self: Box<Self>, sync: bool) -> io::Result<Staged> {
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        if sync {
            // SAFETY: a hint on a valid descriptor; failure is harmless.
            #[cfg(target_os = "linux")]
            unsafe {
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        Ok(Staged(self.tmp))
    }

    fn staged(&self) -> Staged {
        Staged(self.tmp.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        for bad in ["", "/abs", "a/../b", "..", "a//b", "a/./b", "a\0b", "a/"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        check_key("tenants/a/blobs/ab/cd").unwrap();
    }

    #[test]
    fn put_read_list_delete_and_no_replace() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::open(dir.path()).unwrap();
        assert!(b.put("x/y/z", b"one", PutMode::NoReplace, true).unwrap());
        assert!(!b.put("x/y/z", b"two", PutMode::NoReplace, true).unwrap());
        assert_eq!(b.read("x/y/z").unwrap(), b"one");
        assert!(b.put("x/y/z", b"three", PutMode::Replace, false).unwrap());
        assert_eq!(b.read("x/y/z").unwrap(), b"three");
        assert_eq!(b.size("x/y/z").unwrap(), Some(5));
        assert_eq!(b.size("x/y/q").unwrap(), None);
        b.flush().unwrap();
        assert_eq!(b.list("x/y").unwrap(), vec!["z".to_string()]);
        assert!(b.list("nope").unwrap().is_empty());
        assert!(b.delete("x/y/z").unwrap());
        assert!(!b.delete("x/y/z").unwrap());
        b.flush().unwrap();
        // Only this instance's owner file remains in tmp/.
        assert_eq!(b.list("tmp").unwrap().len(), 1);
    }

    #[test]
    fn staged_objects_appear_only_when_published() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::open(dir.path()).unwrap();
        let s1 = b.stage(b"one", true).unwrap();
        let s2 = b.stage(b"two", true).unwrap();
        assert_eq!(b.size("a/b/one").unwrap(), None);
        b.publish(&[(s1, "a/b/one".into())], true).unwrap();
        b.flush().unwrap();
        assert_eq!(b.read("a/b/one").unwrap(), b"one");
        b.discard(&s2);
        assert_eq!(b.list("tmp").unwrap().len(), 1, "only the owner file is left");
    }

    #[test]
    fn stale_temp_files_of_dead_owners_only_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let live = LocalDir::open(dir.path()).unwrap();
        let live_tmp = live.write_temp(b"in flight", false).unwrap();
        // A "dead" owner: an owner file nobody holds, plus its temporaries.
        std::fs::write(dir.path().join("tmp/1-dead.owner"), b"1").unwrap();
        // An empty owner file may be a live owner between create and lock.
        std::fs::write(dir.path().join("tmp/2-starting.owner"), b"").unwrap();
        std::fs::write(dir.path().join("tmp/2-starting-0.tmp"), b"x").unwrap();
        std::fs::write(dir.path().join("tmp/1-dead-0.tmp"), b"x").unwrap();
        std::fs::write(dir.path().join("tmp/1-dead-1.tmp"), b"x").unwrap();
        let other = LocalDir::open(dir.path()).unwrap();
        assert_eq!(other.remove_stale_temp().unwrap(), 2);
        assert!(dir.path().join(&live_tmp).exists());
        assert!(!dir.path().join("tmp/1-dead.owner").exists());
        assert!(dir.path().join("tmp/2-starting-0.tmp").exists());
    }

    #[test]
    fn exclusive_lock_excludes_shared_across_handles() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::open(dir.path()).unwrap();
        let shared = b.lock("locks/w", LockMode::Shared, None).unwrap().unwrap();
        let none = b
            .lock("locks/w", LockMode::Exclusive, Some(Duration::from_millis(20)))
            .unwrap();
        assert!(none.is_none());
        drop(shared);
        assert!(
            b.lock("locks/w", LockMode::Exclusive, Some(Duration::from_millis(20)))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn shared_locks_coexist_and_an_owner_lock_keeps_its_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::open(dir.path()).unwrap();
        let first = b.lock("locks/w", LockMode::Shared, None).unwrap().unwrap();
        let second = b
            .lock("locks/w", LockMode::Shared, Some(Duration::from_millis(20)))
            .unwrap();
        assert!(second.is_some(), "a second shared holder is let in");
        drop((first, second));
        let exclusive = b.lock("locks/w", LockMode::Exclusive, None).unwrap().unwrap();
        assert!(
            b.lock("locks/w", LockMode::Shared, Some(Duration::from_millis(20)))
                .unwrap()
                .is_none(),
            "an exclusive holder keeps shared ones out"
        );
        drop(exclusive);
        // A live handle's owner lock is held: another handle leaves its
        // temporaries alone.
        let tmp = b.write_temp(b"in flight", false).unwrap();
        let other = LocalDir::open(dir.path()).unwrap();
        assert_eq!(other.remove_stale_temp().unwrap(), 0);
        assert!(dir.path().join(&tmp).exists());
        drop(b);
        assert!(
            !dir.path().join(&tmp).exists(),
            "a handle removes its temporaries when it goes"
        );
        assert_eq!(other.remove_stale_temp().unwrap(), 0);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .flatten()
            .collect();
        assert!(names.is_empty(), "nothing left in tmp/: {names:?}");
    }

    #[test]
    fn a_handle_writes_nothing_until_it_changes_something() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalDir::open(dir.path()).unwrap();
        assert_eq!(b.read("a").unwrap_err().kind(), io::ErrorKind::NotFound);
        let names = || {
            let mut n: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            n.sort();
            n
        };
        assert!(names().is_empty(), "open created nothing");
        b.put("a", b"1", PutMode::Replace, false).unwrap();
        let names = names();
        assert_eq!(names, ["a", "reserve", "tmp"]);
        assert_eq!(
            std::fs::metadata(dir.path().join("reserve")).unwrap().len(),
            RESERVE_SIZE
        );
        assert!(b.release_reserve().unwrap());
        assert!(!b.release_reserve().unwrap(), "released once");
        b.restore_reserve();
        assert!(dir.path().join("reserve").exists());
    }

    #[test]
    fn a_read_only_handle_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            LocalDir::open_read_only(&dir.path().join("missing"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        LocalDir::open(dir.path())
            .unwrap()
            .put("a", b"1", PutMode::Replace, false)
            .unwrap();
        let before = std::fs::read_dir(dir.path()).unwrap().count();
        let b = LocalDir::open_read_only(dir.path()).unwrap();
        assert_eq!(b.read("a").unwrap(), b"1");
        let refused = |r: io::Result<bool>| {
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ReadOnlyFilesystem);
        };
        refused(b.put("b", b"2", PutMode::Replace, false));
        refused(b.delete("a"));
        refused(b.release_reserve());
        assert!(b.lock("locks/gc", LockMode::Shared, None).is_err());
        assert_eq!(b.remove_stale_temp().unwrap(), 0);
        drop(b);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), before);
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"1");
    }
}
