//! The on-disk cache of compiled components: what lets a second process
//! start a plugin without compiling it again (an 18 MB Python component
//! takes 10 s to compile and well under a second to load from here).
//!
//! One file per (component, engine configuration), named by
//! `blake3(engine fingerprint ‖ component hash)`, holding wasmtime's
//! `Component::serialize` output behind a header (format in
//! `docs/STORAGE.md`, "Compiled-component cache"). Files are written to a
//! temporary name and renamed into place, never modified, so concurrent
//! processes sharing the directory see either no entry or a whole one. The
//! directory is bounded in bytes; the least recently used entries (by file
//! modification time, which a hit refreshes) are deleted first.
//!
//! # Why deserializing is sound here
//!
//! `Component::deserialize` is `unsafe`: it maps the bytes as executable
//! code without validating them, so it must only see bytes that
//! `Component::serialize` produced for a compatible engine. An entry is
//! deserialized only when (1) its header has this cache's magic and format
//! version, (2) the key in its header equals the key computed for *this*
//! engine's fingerprint and *this* component's bytes, (3) its length is
//! exactly header + payload length, and (4) the blake3 of the payload equals
//! the one in the header. Only this code writes such headers, and it writes
//! them around `Component::serialize` output of the engine whose
//! fingerprint is in the key; a truncated, corrupted or foreign file fails
//! one of the checks and is deleted and recompiled, never trusted. What the
//! checks cannot exclude is someone with write access to the directory
//! forging a matching header on purpose — the same trust the host already
//! places in its state directory, which is where the cache lives by
//! default. wasmtime additionally refuses an artifact of another wasmtime
//! version or engine configuration.

use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use wasmtime::Engine;
use wasmtime::component::Component;

use crate::error::RuntimeError;

/// Magic of an entry file.
const MAGIC: [u8; 8] = *b"MMCCWASM";
/// Entry format version; a reader refuses (and replaces) any other.
const FORMAT_VERSION: u32 = 1;
/// magic, version, key, payload blake3, payload length.
const HEADER_LEN: usize = 8 + 4 + 32 + 32 + 8;
/// Extension of entry files; anything else in the directory but our
/// temporary files is left alone.
const ENTRY_EXT: &str = "cwasm";
/// A temporary file older than this belongs to a process that died while
/// writing it; eviction deletes it.
const STALE_TMP: Duration = Duration::from_secs(600);

/// What the cache did since the runtime started: how a test (or an
/// operator reading logs) sees that a load hit it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskCacheStats {
    /// Components loaded from the cache instead of compiled.
    pub hits: u64,
    /// Lookups that found no entry (the component was compiled).
    pub misses: u64,
    /// Entries found but refused (truncated, corrupt, foreign, of another
    /// engine configuration): deleted, and the component compiled.
    pub rejected: u64,
    /// Entries written.
    pub written: u64,
    /// Entries deleted to keep the directory within its bound.
    pub evicted: u64,
    /// Writes or deletions that failed (the cache is an optimisation: the
    /// load goes on, with a warning in the log).
    pub io_errors: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    rejected: AtomicU64,
    written: AtomicU64,
    evicted: AtomicU64,
    io_errors: AtomicU64,
}

/// A directory of compiled components for one engine configuration.
pub(crate) struct DiskCache {
    dir: PathBuf,
    max_bytes: u64,
    /// blake3 of everything about the engine that changes compiled code.
    fingerprint: [u8; 32],
    counters: Counters,
}

/// Feeds `std::hash::Hash` output into blake3, so wasmtime's own
/// compatibility hash (which is only exposed as `impl Hash`) becomes part
/// of a stable 256-bit key.
struct Blake3Hasher(blake3::Hasher);

impl Hasher for Blake3Hasher {
    fn finish(&self) -> u64 {
        let h = self.0.finalize();
        u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// blake3 of the engine settings that affect compiled code: wasmtime's
/// compatibility hash (target triple, compiler and ISA flags, tunables such
/// as fuel, epochs and memory reservations, wasm features, wasmtime
/// version), plus what this crate configures around it (the host-owned
/// memories with copy-on-write off) and this crate's version.
pub(crate) fn engine_fingerprint(engine: &Engine, extra: &[(&str, String)]) -> [u8; 32] {
    let mut h = Blake3Hasher(blake3::Hasher::new());
    h.write(b"memento compiled-component cache\0");
    h.write(env!("CARGO_PKG_VERSION").as_bytes());
    h.write(std::env::consts::ARCH.as_bytes());
    h.write(std::env::consts::OS.as_bytes());
    engine.precompile_compatibility_hash().hash(&mut h);
    for (k, v) in extra {
        h.write(k.as_bytes());
        h.write(&[0]);
        h.write(v.as_bytes());
        h.write(&[0]);
    }
    *h.0.finalize().as_bytes()
}

impl DiskCache {
    /// Use `dir` (created if missing) for components compiled by an engine
    /// whose fingerprint is `fingerprint`, keeping it within `max_bytes`.
    ///
    /// # Errors
    /// [`RuntimeError::CacheDir`] when the directory cannot be created or
    /// is not a directory.
    pub(crate) fn open(dir: &Path, max_bytes: u64, fingerprint: [u8; 32]) -> Result<DiskCache, RuntimeError> {
        let bad = |reason: String| RuntimeError::CacheDir {
            path: dir.to_path_buf(),
            reason,
        };
        fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
        let meta = fs::metadata(dir).map_err(|e| bad(e.to_string()))?;
        if !meta.is_dir() {
            return Err(bad("not a directory".into()));
        }
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            max_bytes,
            fingerprint,
            counters: Counters::default(),
        })
    }

    /// The directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn stats(&self) -> DiskCacheStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DiskCacheStats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            rejected: get(&c.rejected),
            written: get(&c.written),
            evicted: get(&c.evicted),
            io_errors: get(&c.io_errors),
        }
    }

    /// The key of `component_hash` under this engine.
    fn key(&self, component_hash: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&self.fingerprint);
        h.update(component_hash);
        *h.finalize().as_bytes()
    }

    fn entry_path(&self, key: &[u8; 32]) -> PathBuf {
        self.dir
            .join(format!("{}.{ENTRY_EXT}", blake3::Hash::from_bytes(*key).to_hex()))
    }

    /// The compiled component for `component_hash`, if a valid entry is
    /// there. A bad entry is deleted (the caller compiles and `put`s a new
    /// one); a hit refreshes the entry's place in the LRU order.
    pub(crate) fn get(&self, engine: &Engine, component_hash: &[u8; 32]) -> Option<Component> {
        let key = self.key(component_hash);
        let path = self.entry_path(&key);
        let payload = match read_entry(&path, &key) {
            Ok(Some(p)) => p,
            Ok(None) => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(reason) => {
                self.reject(&path, &reason);
                return None;
            }
        };
        // SAFETY: `read_entry` returned the payload only after checking the
        // header's magic, version and key (this engine's fingerprint and
        // this component's hash), the exact length and the payload's
        // blake3: these are bytes `put` wrote from `Component::serialize`
        // of an engine with this fingerprint (module docs, "Why
        // deserializing is sound here").
        match unsafe { Component::deserialize(engine, &payload) } {
            Ok(component) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                // LRU order is modification time; a failure only makes
                // this entry look older than it is.
                if let Ok(f) = OpenOptions::new().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                tracing::debug!(entry = %path.display(), "compiled component loaded from the disk cache");
                Some(component)
            }
            Err(e) => {
                self.reject(&path, &format!("wasmtime refused it: {e}"));
                None
            }
        }
    }

    fn reject(&self, path: &Path, reason: &str) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(entry = %path.display(), "compiled-component cache entry refused, recompiling: {reason}");
        if let Err(e) = fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            self.io_error("delete", path, &e);
        }
    }

    fn io_error(&self, what: &str, path: &Path, e: &std::io::Error) {
        self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %path.display(), "compiled-component cache: cannot {what}: {e}");
    }

    /// Store `component` (compiled from bytes hashing to `component_hash`)
    /// and evict beyond the bound. Failures are logged and counted, never
    /// returned: the caller has its component either way.
    pub(crate) fn put(&self, component_hash: &[u8; 32], component: &Component) {
        let payload = match component.serialize() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("compiled-component cache: cannot serialize: {e}");
                self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if (HEADER_LEN + payload.len()) as u64 > self.max_bytes {
            tracing::info!(
                bytes = payload.len(),
                bound = self.max_bytes,
                "compiled component larger than the whole disk cache: not cached"
            );
            return;
        }
        let key = self.key(component_hash);
        let path = self.entry_path(&key);
        let tmp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            blake3::Hash::from_bytes(key).to_hex(),
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        // No fsync: after a power loss a torn entry fails its checksum and
        // is recompiled, which is all a cache owes.
        let written = File::create_new(&tmp).and_then(|mut f| {
            f.write_all(&header(&key, &payload))?;
            f.write_all(&payload)
        });
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, &path)) {
            self.io_error("write", &path, &e);
            let _ = fs::remove_file(&tmp);
            return;
        }
        self.counters.written.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(entry = %path.display(), bytes = payload.len(), "compiled component written to the disk cache");
        self.evict(&path);
    }

    /// Delete the least recently used entries until the directory is within
    /// its bound, never `keep` (the entry just written, about to be used),
    /// and temporary files of processes that died mid-write. Races with
    /// other processes doing the same are harmless: a file already gone is
    /// skipped.
    fn evict(&self, keep: &Path) {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => return self.io_error("list", &self.dir, &e),
        };
        let now = SystemTime::now();
        let mut files = Vec::new();
        let mut total = 0u64;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                if now.duration_since(modified).is_ok_and(|age| age > STALE_TMP) {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != ENTRY_EXT) {
                continue;
            }
            total += meta.len();
            if path != keep {
                files.push((modified, meta.len(), path));
            }
        }
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    self.counters.evicted.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(entry = %path.display(), "compiled component evicted from the disk cache");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.io_error("evict", &path, &e);
                    continue;
                }
            }
            total -= len;
        }
    }
}

fn header(key: &[u8; 32], payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..44].copy_from_slice(key);
    h[44..76].copy_from_slice(blake3::hash(payload).as_bytes());
    h[76..84].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h
}

/// The payload of the entry at `path` if it is a valid entry for `key`;
/// `None` if there is none; why not if it is bad.
fn read_entry(path: &Path, key: &[u8; 32]) -> Result<Option<Vec<u8>>, String> {
    // Not following links: an entry is a file this cache wrote.
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut file = match File::open(path) {
        Ok(f) => f,
        // Evicted by another process in between.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut h = [0u8; HEADER_LEN];
    file.read_exact(&mut h)
        .map_err(|_| format!("shorter than its {HEADER_LEN}-byte header"))?;
    if h[..8] != MAGIC {
        return Err("not a compiled-component cache entry (bad magic)".into());
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!(
            "entry format version {version} (this build reads {FORMAT_VERSION})"
        ));
    }
    if h[12..44] != key[..] {
        return Err("its key is not this component's under this engine configuration".into());
    }
    let len = u64::from_le_bytes(h[76..84].try_into().expect("8 bytes"));
    // The file's own length bounds the allocation, never the header's.
    let actual = meta.len() - HEADER_LEN as u64;
    if len != actual {
        return Err(format!(
            "payload is {actual} bytes, its header says {len} (truncated?)"
        ));
    }
    let mut payload = Vec::with_capacity(usize::try_from(actual).map_err(|_| "too large".to_string())?);
    file.read_to_end(&mut payload).map_err(|e| e.to_string())?;
    if payload.len() as u64 != len {
        return Err("changed while being read".into());
    }
    if blake3::hash(&payload).as_bytes()[..] != h[44..76] {
        return Err("payload checksum mismatch (corrupt)".into());
    }
    Ok(Some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(fuel: bool) -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.consume_fuel(fuel);
        Engine::new(&config).unwrap()
    }

    /// A small component with a core module inside, so the artifact has
    /// real code.
    fn component(engine: &Engine, n: u32) -> (Component, [u8; 32]) {
        let wat = format!(
            r#"(component
                 (core module $m (func (export "f") (result i32) i32.const {n}))
                 (core instance (instantiate $m)))"#
        );
        let bytes = wat::parse_str(&wat).unwrap();
        (
            Component::new(engine, &bytes).unwrap(),
            *blake3::hash(&bytes).as_bytes(),
        )
    }

    fn cache(dir: &Path, engine: &Engine, max: u64) -> DiskCache {
        DiskCache::open(dir, max, engine_fingerprint(engine, &[])).unwrap()
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == ENTRY_EXT))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_second_cache_on_the_same_directory_hits() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(false);
        let (c, hash) = component(&e, 1);
        let first = cache(dir.path(), &e, 1 << 30);
        assert!(first.get(&e, &hash).is_none());
        first.put(&hash, &c);
        assert_eq!(first.stats().written, 1);
        // Another process: a new cache (and engine) over the same directory.
        let e2 = engine(false);
        let second = cache(dir.path(), &e2, 1 << 30);
        let hit = second.get(&e2, &hash).expect("a hit");
        assert_eq!(hit.serialize().unwrap(), c.serialize().unwrap());
        assert_eq!(
            second.stats(),
            DiskCacheStats {
                hits: 1,
                ..DiskCacheStats::default()
            }
        );
    }

    #[test]
    fn corrupt_truncated_and_foreign_entries_are_refused_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(false);
        let (c, hash) = component(&e, 2);
        let cache = cache(dir.path(), &e, 1 << 30);
        type Damage = fn(&mut Vec<u8>);
        let damages: [(&str, Damage); 5] = [
            ("flipped payload byte", |b| {
                let last = b.len() - 1;
                b[last] ^= 1
            }),
            ("truncated", |b| b.truncate(b.len() - 10)),
            ("shorter than the header", |b| b.truncate(20)),
            ("bad magic", |b| b[0] = b'X'),
            ("another version", |b| b[8] = 9),
        ];
        for (i, (what, damage)) in damages.iter().enumerate() {
            cache.put(&hash, &c);
            let path = entries(dir.path()).pop().unwrap();
            let mut bytes = fs::read(&path).unwrap();
            damage(&mut bytes);
            fs::write(&path, &bytes).unwrap();
            assert!(cache.get(&e, &hash).is_none(), "{what}: refused");
            assert_eq!(cache.stats().rejected, i as u64 + 1, "{what}");
            assert!(!path.exists(), "{what}: the bad entry is deleted");
        }
        // A file of the right name that is some other entry (the key in its
        // header is another component's) is refused too.
        let (other, other_hash) = component(&e, 3);
        cache.put(&other_hash, &other);
        let other_path = cache.entry_path(&cache.key(&other_hash));
        fs::rename(&other_path, cache.entry_path(&cache.key(&hash))).unwrap();
        assert!(cache.get(&e, &hash).is_none());
        assert_eq!(cache.stats().rejected, 6);
        // A good entry after all that loads again.
        cache.put(&hash, &c);
        assert!(cache.get(&e, &hash).is_some());
    }

    #[test]
    fn another_engine_configuration_does_not_reuse_an_entry() {
        let dir = tempfile::tempdir().unwrap();
        let plain = engine(false);
        let fuel = engine(true);
        assert_ne!(engine_fingerprint(&plain, &[]), engine_fingerprint(&fuel, &[]));
        let (c, hash) = component(&plain, 4);
        cache(dir.path(), &plain, 1 << 30).put(&hash, &c);
        let metered = cache(dir.path(), &fuel, 1 << 30);
        assert!(metered.get(&fuel, &hash).is_none());
        assert_eq!(
            metered.stats().misses,
            1,
            "another key: a miss, not a corrupt entry"
        );
        // Even a file renamed to the other engine's key is refused (its
        // header names the plain engine's key).
        let from = entries(dir.path()).pop().unwrap();
        fs::rename(&from, metered.entry_path(&metered.key(&hash))).unwrap();
        assert!(metered.get(&fuel, &hash).is_none());
        assert_eq!(metered.stats().rejected, 1);
    }

    #[test]
    fn the_size_bound_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(false);
        let comps: Vec<_> = (10..13).map(|n| component(&e, n)).collect();
        let one = {
            let probe = cache(dir.path(), &e, 1 << 30);
            probe.put(&comps[0].1, &comps[0].0);
            let len = fs::metadata(entries(dir.path()).pop().unwrap()).unwrap().len();
            fs::remove_file(entries(dir.path()).pop().unwrap()).unwrap();
            len
        };
        // Room for two entries (they are the same size give or take a few
        // bytes), not three.
        let cache = cache(dir.path(), &e, one * 2 + one / 2);
        let set_age = |hash: &[u8; 32], secs_ago: u64| {
            let f = OpenOptions::new()
                .write(true)
                .open(cache.entry_path(&cache.key(hash)))
                .unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(secs_ago))
                .unwrap();
        };
        cache.put(&comps[0].1, &comps[0].0);
        set_age(&comps[0].1, 100);
        cache.put(&comps[1].1, &comps[1].0);
        set_age(&comps[1].1, 50);
        // A hit makes entry 0 the most recently used.
        assert!(cache.get(&e, &comps[0].1).is_some());
        cache.put(&comps[2].1, &comps[2].0);
        assert_eq!(cache.stats().evicted, 1);
        assert_eq!(entries(dir.path()).len(), 2);
        assert!(cache.get(&e, &comps[1].1).is_none(), "1 was least recently used");
        assert!(cache.get(&e, &comps[0].1).is_some());
        assert!(cache.get(&e, &comps[2].1).is_some());
    }

    #[test]
    fn an_entry_larger_than_the_bound_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(false);
        let (c, hash) = component(&e, 5);
        let cache = cache(dir.path(), &e, 100);
        cache.put(&hash, &c);
        assert_eq!(cache.stats().written, 0);
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn a_cache_directory_that_is_a_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let e = engine(false);
        let err = DiskCache::open(&file, 1 << 20, engine_fingerprint(&e, &[]))
            .err()
            .unwrap();
        assert!(err.to_string().contains(&file.display().to_string()), "{err}");
    }
}
