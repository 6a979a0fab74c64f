//! Garbage collection: mark, repack and sweep of a tenant's packs (and
//! loose layout-1 blobs).
//!
//! Mark reads every manifest and index file without any lock (writers keep
//! going), and walks the headers of any pack no index describes. Repack,
//! pinned like a writer, copies the referenced blobs of mostly dead packs
//! into new packs and publishes them with their index. Sweep then closes
//! the gate to new writers, waits for the writers in progress to finish
//! (their pins are shared locks, the sweep needs it exclusively), re-reads
//! the manifests and index files committed meanwhile, writes one index for
//! every pack it keeps, and only then deletes the other index files, the
//! dead and repacked packs and the unreferenced loose blobs. Writers that
//! were waiting at the gate start after the sweep, refresh their index and
//! find deleted blobs missing, so they write them again.
//!
//! A manifest that does not parse stops GC: its references are unknown, and
//! deleting blobs it might use could destroy a snapshot that a newer build
//! (or a repaired manifest) could still restore.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::backend::{LockGuard, LockMode, is_disk_full};
use super::blob::BlobHash;
use super::error::StoreError;
use super::index::{IndexFile, MAX_ENTRIES, MAX_PACKS};
use super::name::SnapshotId;
use super::pack::{self, Entry, PackWriter, SealedPack};
use super::{TenantStore, unique_blobs};

/// A pack whose referenced bytes are below this fraction of its blob bytes
/// is rewritten with its referenced blobs only.
pub const REPACK_LIVE_FRACTION: f64 = 0.5;

/// A pack smaller than the target size over this is *small*.
pub const SMALL_PACK_DIVISOR: u64 = 4;
/// GC merges the small packs' referenced blobs into full-size packs once
/// there are at least this many small packs.
pub const SMALL_PACKS_TO_MERGE: usize = 32;

/// What a GC run found, freed and rewrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Manifests read (the live snapshots).
    pub snapshots: usize,
    /// Distinct blobs found (in packs and loose).
    pub blobs_scanned: usize,
    /// Blobs referenced by at least one manifest (kept).
    pub blobs_referenced: usize,
    /// Blobs no longer stored anywhere after the run.
    pub blobs_removed: usize,
    /// Bytes on disk freed: deleted packs and loose blobs, less the bytes
    /// repacking wrote.
    pub bytes_freed: u64,
    /// Pack files examined.
    pub packs_scanned: usize,
    /// Pack files deleted (dead, or rewritten).
    pub packs_removed: usize,
    /// Packs rewritten with their live blobs only.
    pub packs_rewritten: usize,
    /// Bytes of the new packs repacking wrote.
    pub bytes_rewritten: u64,
    /// Index files replaced by the one consolidated index.
    pub index_files_merged: usize,
    /// Time spent, including waiting for writers, in milliseconds.
    pub duration_ms: u64,
    /// Time new writers were held back at the gate, in milliseconds.
    pub exclusive_ms: u64,
}

/// A pack as GC sees it: its length and every blob in it.
#[derive(Debug, Clone)]
struct PackInfo {
    len: u64,
    entries: Vec<Entry>,
}

impl PackInfo {
    fn add(&mut self, entries: &[Entry]) {
        let mut have: HashSet<BlobHash> = self.entries.iter().map(|e| e.hash).collect();
        for e in entries {
            if have.insert(e.hash) {
                self.entries.push(*e);
            }
        }
    }

    fn live_bytes(&self, referenced: &HashSet<BlobHash>) -> u64 {
        self.entries
            .iter()
            .filter(|e| referenced.contains(&e.hash))
            .map(Entry::record_len)
            .sum()
    }

    fn total_bytes(&self) -> u64 {
        self.entries.iter().map(Entry::record_len).sum()
    }
}

impl TenantStore {
    /// Delete the `doomed` packs; their blobs not `available` in another
    /// pack join `gone`. Returns the bytes the deleted packs held.
    fn delete_packs(
        &self,
        packs: &HashMap<BlobHash, PackInfo>,
        doomed: &HashSet<BlobHash>,
        available: &HashSet<BlobHash>,
        gone: &mut HashSet<BlobHash>,
        report: &mut GcReport,
    ) -> Result<u64, StoreError> {
        let mut freed = 0;
        for name in doomed {
            let key = self.pack_key(name);
            if self
                .backend()
                .delete(&key)
                .map_err(|e| StoreError::io("delete pack", key, e))?
            {
                report.packs_removed += 1;
                freed += packs[name].len;
                gone.extend(
                    packs[name]
                        .entries
                        .iter()
                        .map(|e| e.hash)
                        .filter(|h| !available.contains(h)),
                );
            }
        }
        Ok(freed)
    }

    /// What GC does with each pack: those with nothing live go (the set),
    /// those mostly dead are rewritten, and so are small ones once there
    /// are many (the list).
    fn classify_packs(
        &self,
        packs: &HashMap<BlobHash, PackInfo>,
        referenced: &HashSet<BlobHash>,
    ) -> (HashSet<BlobHash>, Vec<BlobHash>) {
        let mut dead = HashSet::new();
        let mut to_repack = Vec::new();
        let mut small = Vec::new();
        for (name, info) in packs {
            let live = info.live_bytes(referenced);
            if live == 0 {
                dead.insert(*name);
            } else if (live as f64) < info.total_bytes() as f64 * REPACK_LIVE_FRACTION {
                to_repack.push(*name);
            } else if info.len < self.options().pack_size / SMALL_PACK_DIVISOR {
                small.push(*name);
            }
        }
        // Every incremental checkpoint of every task leaves a small pack;
        // merged once there are many, each blob is rewritten about once.
        if small.len() >= SMALL_PACKS_TO_MERGE {
            small.sort();
            to_repack.extend(small);
        }
        (dead, to_repack)
    }

    /// Like [`TenantStore::gc`], but only if no GC of this tenant started in
    /// this process within `min_interval`; returns `None` when skipped. A
    /// GC marks over all of the tenant's snapshots and holds new writers
    /// back while it deletes, so many jobs of one tenant must not each run
    /// one after every checkpoint.
    ///
    /// # Errors
    /// As [`TenantStore::gc`].
    pub fn gc_if_due(&self, min_interval: std::time::Duration) -> Result<Option<GcReport>, StoreError> {
        {
            let mut last = self.inner.last_gc.lock().unwrap();
            if last.is_some_and(|t| t.elapsed() < min_interval) {
                return Ok(None);
            }
            // Claim the slot before running, so concurrent callers skip.
            *last = Some(std::time::Instant::now());
        }
        self.gc().map(Some)
    }

    /// Deletes blobs no manifest references: packs with nothing
    /// referenced are deleted, packs with little referenced are rewritten
    /// with their referenced blobs only, every index file is replaced by one,
    /// and unreferenced loose (layout-1) blobs are deleted. Blobs of
    /// snapshots in progress are kept (see the module docs for the protocol).
    ///
    /// # Errors
    /// [`StoreError::CorruptManifest`] / [`StoreError::UnsupportedSchema`]
    /// naming a manifest that does not read, [`StoreError::MisplacedManifest`]
    /// naming a manifest-like file that is not where a manifest belongs
    /// (nothing is deleted);
    /// [`StoreError::Busy`] if writers stayed active for longer than
    /// `StoreOptions::gc_wait` (e.g. `gc` called by a thread that holds a
    /// `SnapshotWriter`); I/O errors.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        if let Some(grace) = self.gc_grace() {
            return self.gc_remote(grace);
        }
        let start = Instant::now();
        let mut report = GcReport::default();
        let wait = self.options().gc_wait;
        let deadline = start + wait;
        let busy = || {
            StoreError::Busy(format!(
                "gc of tenant {} waited {wait:?} for snapshots in progress to finish",
                self.name()
            ))
        };
        // One GC per tenant at a time: two would each delete what the other
        // just wrote into its consolidated index.
        let _gc = self
            .lock("gc", LockMode::Exclusive, Some(remaining(deadline)))?
            .ok_or_else(busy)?;
        let (listed, misplaced) = self.scan_manifests()?;
        if let Some(path) = misplaced.into_iter().next() {
            return Err(StoreError::MisplacedManifest { path });
        }

        // Mark, while writers keep working.
        let mut ids: HashSet<SnapshotId> = listed.into_iter().collect();
        let mut referenced: HashSet<BlobHash> = HashSet::new();
        for id in &ids {
            if let Some(m) = self.get_if_present(id)? {
                referenced.extend(unique_blobs(&m));
            }
        }
        let (mut packs, mut seen_index) = self.packs_as_indexed()?;
        self.add_unindexed_packs(&mut packs)?;
        report.packs_scanned = packs.len();
        let loose: Vec<BlobHash> = self.all_blobs()?;
        let mut candidates: Vec<BlobHash> = loose
            .iter()
            .filter(|h| !referenced.contains(h))
            .copied()
            .collect();

        let (mut doomed, to_repack) = self.classify_packs(&packs, &referenced);

        // Repack, pinned like a writer: the new packs and their index are
        // durable before any old pack can go.
        if !to_repack.is_empty() {
            let pin = self.writer_pin(deadline).ok_or_else(busy)??;
            let (sealed, rewritten) = match self.repack(&packs, &to_repack, &referenced) {
                // On a full disk, free what can be freed without writing
                // and leave the rewriting to a later GC.
                Err(StoreError::Io { source, .. }) if is_disk_full(&source) => {
                    tracing::warn!(tenant = %self.name(), "the disk is full: not repacking this time");
                    (Vec::new(), Vec::new())
                }
                other => other?,
            };
            report.bytes_rewritten = sealed.iter().map(|p| p.len).sum();
            let new_packs: Vec<(BlobHash, PackInfo)> = sealed
                .iter()
                .map(|p| {
                    (
                        p.name,
                        PackInfo {
                            len: p.len,
                            entries: p.entries.clone(),
                        },
                    )
                })
                .collect();
            if let Some(index) = self.publish_packs(sealed)? {
                seen_index.insert(index);
            }
            drop(pin);
            for (name, info) in new_packs {
                packs
                    .entry(name)
                    .or_insert(PackInfo {
                        len: info.len,
                        entries: Vec::new(),
                    })
                    .add(&info.entries);
            }
            report.packs_rewritten = rewritten.len();
            doomed.extend(rewritten);
        }

        // Sweep, alone.
        let _gate = self
            .lock("gate", LockMode::Exclusive, Some(remaining(deadline)))?
            .ok_or_else(busy)?;
        let exclusive_start = Instant::now();
        let _writers = self
            .lock("writers", LockMode::Exclusive, Some(remaining(deadline)))?
            .ok_or_else(busy)?;
        for id in self.all_ids()? {
            if !ids.contains(&id) {
                if let Some(m) = self.get_if_present(&id)? {
                    referenced.extend(unique_blobs(&m));
                }
                ids.insert(id);
            }
        }
        candidates.retain(|h| !referenced.contains(h));
        // Packs that writers published meanwhile are theirs, whatever the
        // mark thought of them.
        for name in self.list_index_files()? {
            if seen_index.contains(&name) {
                continue;
            }
            if let Ok(file) = self.read_index_file(&name)? {
                for (pack, len, entries) in &file.packs {
                    doomed.remove(pack);
                    packs
                        .entry(*pack)
                        .or_insert(PackInfo {
                            len: *len,
                            entries: Vec::new(),
                        })
                        .add(entries);
                }
            }
            seen_index.insert(name);
        }
        // A doomed pack holding a blob referenced since the mark, with no
        // copy in a kept pack, is kept after all.
        loop {
            let available: HashSet<BlobHash> = packs
                .iter()
                .filter(|(n, _)| !doomed.contains(*n))
                .flat_map(|(_, p)| p.entries.iter().map(|e| e.hash))
                .collect();
            let rescued: Vec<BlobHash> = doomed
                .iter()
                .filter(|n| {
                    packs[*n]
                        .entries
                        .iter()
                        .any(|e| referenced.contains(&e.hash) && !available.contains(&e.hash))
                })
                .copied()
                .collect();
            if rescued.is_empty() {
                break;
            }
            for n in rescued {
                doomed.remove(&n);
            }
        }

        // One index for every kept pack, durable before any other index
        // file or any pack goes.
        let backend = self.backend();
        let sync = self.options().sync;
        let mut kept: Vec<(&BlobHash, &PackInfo)> =
            packs.iter().filter(|(n, _)| !doomed.contains(*n)).collect();
        kept.sort_by_key(|(n, _)| **n);
        let consolidated = IndexFile {
            packs: kept
                .iter()
                .map(|(n, p)| (**n, p.len, p.entries.clone()))
                .collect(),
        };
        let encoded: Vec<(Vec<u8>, BlobHash)> = consolidated
            .split(MAX_PACKS as usize, MAX_ENTRIES as usize)
            .iter()
            .map(IndexFile::encode)
            .collect();
        let new_index: HashSet<BlobHash> = encoded.iter().map(|(_, n)| *n).collect();
        let old_index: HashSet<BlobHash> = self.list_index_files()?.into_iter().collect();
        // Nothing changed since the last GC: its index files are the ones.
        if old_index != new_index {
            for (bytes, name) in &encoded {
                let key = self.index_key(name);
                let put = || backend.put(&key, bytes, super::backend::PutMode::Replace, sync);
                // Nothing may be deleted before this index is durable, so on
                // a full disk it is written into the store's reserve.
                let written = match put() {
                    Err(e) if is_disk_full(&e) && backend.release_reserve().unwrap_or(false) => put(),
                    other => other,
                };
                written.map_err(|e| StoreError::io("write index", key, e))?;
            }
            if sync {
                backend
                    .flush()
                    .map_err(|e| StoreError::io("sync", self.key("index"), e))?;
            }
        }
        for name in old_index.difference(&new_index) {
            let key = self.index_key(name);
            if backend
                .delete(&key)
                .map_err(|e| StoreError::io("delete index", key, e))?
            {
                report.index_files_merged += 1;
            }
        }
        if sync {
            backend
                .flush()
                .map_err(|e| StoreError::io("sync", self.key("index"), e))?;
        }
        let available: HashSet<BlobHash> = kept
            .iter()
            .flat_map(|(_, p)| p.entries.iter().map(|e| e.hash))
            .collect();
        let mut gone: HashSet<BlobHash> = HashSet::new();
        let mut freed = 0u64;
        freed += self.delete_packs(&packs, &doomed, &available, &mut gone, &mut report)?;
        for hash in &candidates {
            let key = self.blob_key(hash);
            let size = backend.size(&key).ok().flatten().unwrap_or(0);
            if backend
                .delete(&key)
                .map_err(|e| StoreError::io("delete blob", key, e))?
                && !available.contains(hash)
            {
                gone.insert(*hash);
                freed += size;
            }
        }
        backend
            .flush()
            .map_err(|e| StoreError::io("sync", self.key("packs"), e))?;
        backend.restore_reserve();
        self.recheck_loose_blobs();
        self.refresh_index()?;
        report.exclusive_ms = exclusive_start.elapsed().as_millis() as u64;
        report.snapshots = ids.len();
        let mut all: HashSet<BlobHash> = loose.into_iter().collect();
        all.extend(packs.values().flat_map(|p| p.entries.iter().map(|e| e.hash)));
        report.blobs_scanned = all.len();
        report.blobs_referenced = all.iter().filter(|h| referenced.contains(h)).count();
        report.blobs_removed = gone.len();
        report.bytes_freed = freed.saturating_sub(report.bytes_rewritten);
        report.duration_ms = start.elapsed().as_millis() as u64;
        tracing::info!(tenant = %self.name(), ?report, "gc done");
        Ok(report)
    }

    /// The shared `writers` lock, taken through the gate as a writer does;
    /// `None` if it did not come by `deadline`.
    fn writer_pin(&self, deadline: Instant) -> Option<Result<Box<dyn LockGuard>, StoreError>> {
        let gate = match self.lock("gate", LockMode::Shared, Some(remaining(deadline))) {
            Ok(Some(g)) => g,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let pin = match self.lock("writers", LockMode::Shared, Some(remaining(deadline))) {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        drop(gate);
        Some(Ok(pin))
    }

    /// Every pack that an intact index file names and that exists, with
    /// every blob the index files give it; and the index files read.
    fn packs_as_indexed(&self) -> Result<(HashMap<BlobHash, PackInfo>, HashSet<BlobHash>), StoreError> {
        let mut packs: HashMap<BlobHash, PackInfo> = HashMap::new();
        let mut read = HashSet::new();
        for name in self.list_index_files()? {
            read.insert(name);
            let Ok(file) = self.read_index_file(&name)? else {
                continue;
            };
            for (pack, len, entries) in &file.packs {
                packs
                    .entry(*pack)
                    .or_insert(PackInfo {
                        len: *len,
                        entries: Vec::new(),
                    })
                    .add(entries);
            }
        }
        // Listed after the index files: a pack published meanwhile then
        // looks unindexed (and is walked), never indexed-but-absent. A pack
        // an index names that does not exist is dropped.
        let present = self.list_packs()?;
        packs.retain(|name, _| present.contains(name));
        Ok((packs, read))
    }

    /// Adds the intact packs no index names, from their own headers (a lost
    /// index must not make live blobs look dead). Damaged ones are left
    /// alone for fsck to report.
    fn add_unindexed_packs(&self, packs: &mut HashMap<BlobHash, PackInfo>) -> Result<(), StoreError> {
        for name in self.list_packs()? {
            if packs.contains_key(&name) {
                continue;
            }
            let key = self.pack_key(&name);
            let Some(len) = self
                .backend()
                .size(&key)
                .map_err(|e| StoreError::io("stat pack", key.clone(), e))?
            else {
                continue;
            };
            // A pack with a trailer indexes itself in two ranged reads.
            match pack::read_trailer(self.backend(), &key, &name, len) {
                Ok(Ok(entries)) => {
                    packs.insert(name, PackInfo { len, entries });
                    continue;
                }
                Ok(Err(_)) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("read pack", key, e)),
            }
            let walk = match pack::walk(self.backend(), &key, len) {
                Ok(w) => w,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("read pack", key, e)),
            };
            if walk.problem.is_none() && walk.name == name {
                packs.insert(
                    name,
                    PackInfo {
                        len,
                        entries: walk.entries,
                    },
                );
            }
        }
        Ok(())
    }

    /// Names of the files in `packs/` that are named like packs.
    pub(crate) fn list_packs(&self) -> Result<HashSet<BlobHash>, StoreError> {
        let key = self.key("packs");
        let names = self
            .backend()
            .list(&key)
            .map_err(|e| StoreError::io("list", key, e))?;
        Ok(names.iter().filter_map(|n| BlobHash::parse(n).ok()).collect())
    }

    /// Copies the referenced blobs of `victims` into new packs (sealed, not
    /// yet published), each verified on the way. A victim with a blob that
    /// does not read back is left as it is (not rewritten). Returns the
    /// packs and the victims rewritten.
    fn repack(
        &self,
        packs: &HashMap<BlobHash, PackInfo>,
        victims: &[BlobHash],
        referenced: &HashSet<BlobHash>,
    ) -> Result<(Vec<SealedPack>, Vec<BlobHash>), StoreError> {
        let backend = self.backend();
        let io = |e| StoreError::io("write pack", self.key("packs"), e);
        let mut sealed = Vec::new();
        let mut open: Option<PackWriter> = None;
        let mut copied: HashSet<BlobHash> = HashSet::new();
        let mut rewritten = Vec::new();
        let result = (|| {
            for victim in victims {
                let key = self.pack_key(victim);
                let live: Vec<&Entry> = packs[victim]
                    .entries
                    .iter()
                    .filter(|e| referenced.contains(&e.hash) && !copied.contains(&e.hash))
                    .collect();
                let mut files = Vec::with_capacity(live.len());
                let mut intact = true;
                for e in &live {
                    match pack::read_blob_file(backend, &key, e) {
                        Ok(file) => files.push((**e, file)),
                        Err(problem) => {
                            tracing::warn!(tenant = %self.name(), pack = %victim, blob = %e.hash,
                                "not repacking a pack with a damaged blob: {problem}");
                            intact = false;
                            break;
                        }
                    }
                }
                if !intact {
                    continue;
                }
                for (e, file) in files {
                    if open.is_none() {
                        open = Some(PackWriter::new(backend).map_err(io)?);
                    }
                    let w = open.as_mut().expect("just opened");
                    w.append_file(e.hash, u64::from(e.plain), &file).map_err(io)?;
                    copied.insert(e.hash);
                    if w.len() >= self.options().pack_size {
                        sealed.push(open.take().expect("open").seal(self.options().sync).map_err(io)?);
                    }
                }
                rewritten.push(*victim);
            }
            if let Some(w) = open.take() {
                sealed.push(w.seal(self.options().sync).map_err(io)?);
            }
            Ok(())
        })();
        if let Err(e) = result {
            if let Some(w) = open {
                w.discard(backend);
            }
            for p in &sealed {
                backend.discard(&p.staged);
            }
            return Err(e);
        }
        Ok((sealed, rewritten))
    }

    /// Every blob file with a valid name in the right fan-out directory.
    pub(crate) fn all_blobs(&self) -> Result<Vec<BlobHash>, StoreError> {
        let (good, _stray) = self.scan_blobs()?;
        Ok(good)
    }

    /// Blob files with valid names, and store-relative paths of other files
    /// found among the blobs.
    pub(crate) fn scan_blobs(&self) -> Result<(Vec<BlobHash>, Vec<String>), StoreError> {
        let backend = self.backend();
        let root = self.key("blobs");
        let mut good = Vec::new();
        let mut stray = Vec::new();
        let fans = backend
            .list(&root)
            .map_err(|e| StoreError::io("list", root.clone(), e))?;
        for fan in fans {
            let dir = format!("{root}/{fan}");
            let names = match backend.list(&dir) {
                Ok(names) => names,
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    stray.push(dir);
                    continue;
                }
                Err(e) => return Err(StoreError::io("list", dir, e)),
            };
            for name in names {
                match BlobHash::parse(&name) {
                    Ok(h) if name.starts_with(&fan) && fan.len() == 2 => good.push(h),
                    _ => stray.push(format!("{dir}/{name}")),
                }
            }
        }
        Ok((good, stray))
    }
}

/// Margin on the server's clock, whose object times have a resolution of
/// one second.
const CLOCK_SLACK: Duration = Duration::from_secs(2);

impl TenantStore {
    /// GC on object storage, where writers take no locks (docs/STORAGE.md,
    /// "Garbage collection on object storage"): a pack is deleted only by
    /// a GC that finds it condemned by an earlier one at least the grace
    /// period ago (on the server's clock) and still holding nothing
    /// referenced; then the dead packs are condemned anew. Never waits for
    /// writers, and a pack is deleted by the second GC that finds it dead.
    fn gc_remote(&self, grace: Duration) -> Result<GcReport, StoreError> {
        let start = Instant::now();
        let mut report = GcReport::default();
        let wait = self.options().gc_wait;
        let _gc = self.lock("gc", LockMode::Exclusive, Some(wait))?.ok_or_else(|| {
            StoreError::Busy(format!(
                "gc of tenant {} waited {wait:?} for another gc to finish",
                self.name()
            ))
        })?;
        // From here on a build that knows only the locking protocol
        // refuses the store.
        self.inner.store.upgrade_layout()?;
        let condemned = self.read_condemned()?;
        // Before the manifests are listed: the listing is then at least
        // this old a view after the condemnation.
        let due = !condemned.is_empty() && self.condemned_age()? >= grace + CLOCK_SLACK;
        let (listed, misplaced) = self.scan_manifests()?;
        if let Some(path) = misplaced.into_iter().next() {
            return Err(StoreError::MisplacedManifest { path });
        }
        let mut referenced: HashSet<BlobHash> = HashSet::new();
        for id in &listed {
            if let Some(m) = self.get_if_present(id)? {
                referenced.extend(unique_blobs(&m));
            }
        }
        report.snapshots = listed.len();
        let (mut packs, _) = self.packs_as_indexed()?;
        self.add_unindexed_packs(&mut packs)?;
        report.packs_scanned = packs.len();
        let mut all: HashSet<BlobHash> = packs
            .values()
            .flat_map(|p| p.entries.iter().map(|e| e.hash))
            .collect();

        let backend = self.backend();
        let mut gone: HashSet<BlobHash> = HashSet::new();
        let mut freed = 0u64;
        if due {
            // A condemned pack holding a blob referenced now, with no copy
            // in a pack that is not condemned, is kept.
            let available: HashSet<BlobHash> = packs
                .iter()
                .filter(|(n, _)| !condemned.contains(*n))
                .flat_map(|(_, p)| p.entries.iter().map(|e| e.hash))
                .collect();
            let doomed: HashSet<BlobHash> = condemned
                .iter()
                .filter(|n| {
                    packs.get(*n).is_some_and(|p| {
                        p.entries
                            .iter()
                            .all(|e| !referenced.contains(&e.hash) || available.contains(&e.hash))
                    })
                })
                .copied()
                .collect();
            // The index without them first, then the packs.
            self.consolidate_remote(&packs, &doomed, &mut report)?;
            freed += self.delete_packs(&packs, &doomed, &available, &mut gone, &mut report)?;
            packs.retain(|n, _| !doomed.contains(n));
        }

        // Condemn anew, unless an earlier condemnation still waits out its
        // grace period (its clock must not be reset).
        if condemned.is_empty() || due {
            let (mut dead, to_repack) = self.classify_packs(&packs, &referenced);
            if !to_repack.is_empty() {
                let (sealed, rewritten) = self.repack(&packs, &to_repack, &referenced)?;
                report.bytes_rewritten = sealed.iter().map(|p| p.len).sum();
                let new_packs: Vec<(BlobHash, PackInfo)> = sealed
                    .iter()
                    .map(|p| {
                        (
                            p.name,
                            PackInfo {
                                len: p.len,
                                entries: p.entries.clone(),
                            },
                        )
                    })
                    .collect();
                self.publish_packs(sealed)?;
                packs.extend(new_packs);
                report.packs_rewritten = rewritten.len();
                dead.extend(rewritten);
            }
            let mut names: Vec<String> = dead.iter().map(BlobHash::to_hex).collect();
            names.sort();
            let key = self.condemned_key();
            if !names.is_empty() || !condemned.is_empty() {
                let bytes = serde_json::to_vec(&names).expect("serializable");
                backend
                    .put(&key, &bytes, super::backend::PutMode::Replace, true)
                    .map_err(|e| StoreError::io("write condemned packs", key, e))?;
            }
            // Readers find every pack through one index again.
            self.consolidate_remote(&packs, &HashSet::new(), &mut report)?;
        }
        self.refresh_index()?;
        all.extend(packs.values().flat_map(|p| p.entries.iter().map(|e| e.hash)));
        report.blobs_scanned = all.len();
        report.blobs_referenced = all.iter().filter(|h| referenced.contains(h)).count();
        report.blobs_removed = gone.len();
        report.bytes_freed = freed.saturating_sub(report.bytes_rewritten);
        report.duration_ms = start.elapsed().as_millis() as u64;
        tracing::info!(tenant = %self.name(), ?report, "gc done");
        Ok(report)
    }

    /// How long ago (on the server's clock) the packs were condemned: the
    /// difference of the modification times of the condemned list and of
    /// an object written now.
    fn condemned_age(&self) -> Result<Duration, StoreError> {
        let backend = self.backend();
        let clock = self.key("gc/clock");
        backend
            .put(&clock, b"now\n", super::backend::PutMode::Replace, true)
            .map_err(|e| StoreError::io("write clock probe", clock.clone(), e))?;
        let time = |key: String| backend.modified(&key).map_err(|e| StoreError::io("stat", key, e));
        let now = time(clock)?;
        let then = time(self.condemned_key())?;
        Ok(match (now, then) {
            (Some(now), Some(then)) => now.duration_since(then).unwrap_or(Duration::ZERO),
            _ => Duration::ZERO,
        })
    }

    /// Replaces every index file by one (or several, within the maxima)
    /// covering `packs` except `skip`; the new ones are written before any
    /// old one is deleted.
    fn consolidate_remote(
        &self,
        packs: &HashMap<BlobHash, PackInfo>,
        skip: &HashSet<BlobHash>,
        report: &mut GcReport,
    ) -> Result<(), StoreError> {
        let backend = self.backend();
        let mut kept: Vec<(&BlobHash, &PackInfo)> =
            packs.iter().filter(|(n, _)| !skip.contains(*n)).collect();
        kept.sort_by_key(|(n, _)| **n);
        let encoded: Vec<(Vec<u8>, BlobHash)> = IndexFile {
            packs: kept
                .iter()
                .map(|(n, p)| (**n, p.len, p.entries.clone()))
                .collect(),
        }
        .split(MAX_PACKS as usize, MAX_ENTRIES as usize)
        .iter()
        .map(IndexFile::encode)
        .collect();
        let new_index: HashSet<BlobHash> = encoded.iter().map(|(_, n)| *n).collect();
        let old_index: HashSet<BlobHash> = self.list_index_files()?.into_iter().collect();
        for (bytes, name) in &encoded {
            if old_index.contains(name) {
                continue;
            }
            let key = self.index_key(name);
            backend
                .put(&key, bytes, super::backend::PutMode::Replace, true)
                .map_err(|e| StoreError::io("write index", key, e))?;
        }
        for name in old_index.difference(&new_index) {
            let key = self.index_key(name);
            if backend
                .delete(&key)
                .map_err(|e| StoreError::io("delete index", key, e))?
            {
                report.index_files_merged += 1;
            }
        }
        Ok(())
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}
