//! Consistency check: every manifest parses and every blob it references is
//! present and hashes to its name; every index file is intact and agrees
//! with the packs; every pack's records verify. And the repair of lost or
//! damaged index files from the packs' own headers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use super::backend::{LockMode, PutMode};
use super::blob::BlobHash;
use super::blob::BlobProblem;
use super::error::StoreError;
use super::index::{IndexFile, MAX_ENTRIES, MAX_PACKS};
use super::pack::{self, Entry};
use super::tenant::manifest_at;
use super::{SnapshotId, TenantStore};

/// A snapshot fsck found damaged, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DamagedSnapshot {
    /// The snapshot (as found on disk; may not parse as an id if the file
    /// name itself is bad).
    pub id: String,
    /// One line per problem: the manifest's error, or
    /// `task <t>, chunk <i> (blob <h>): <problem>`.
    pub problems: Vec<String>,
}

/// What `fsck` checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FsckReport {
    /// Manifests examined.
    pub snapshots_checked: usize,
    /// Distinct blobs read and verified.
    pub blobs_checked: usize,
    /// Uncompressed bytes verified.
    pub bytes_checked: u64,
    /// Damaged snapshots, in id order. Empty when the store is healthy.
    pub damaged: Vec<DamagedSnapshot>,
    /// Blobs no manifest references (harmless; `gc` removes them).
    pub unreferenced_blobs: usize,
    /// Files that do not belong among blobs or manifests (harmless, reported
    /// so they can be looked at).
    pub stray_files: Vec<String>,
    /// Files named like manifests that are not where a manifest belongs:
    /// not harmless, as nothing lists them (GC refuses to run while any
    /// exist). Moved to their place or removed, they are gone from here.
    pub misplaced_manifests: Vec<String>,
    /// Pack files walked (every record verified).
    pub packs_checked: usize,
    /// Index files read.
    pub index_files_checked: usize,
    /// Packs with a damaged record or header, one line each with the
    /// first problems (`memento fsck --repair-index` indexes what is intact).
    pub damaged_packs: Vec<String>,
    /// Index files that do not parse or disagree with their packs
    /// (`memento fsck --repair-index` replaces them).
    pub damaged_indexes: Vec<String>,
    /// Intact packs no intact index describes: their blobs are invisible
    /// to readers (`memento fsck --repair-index` indexes them; garbage of
    /// an interrupted writer otherwise, which `gc` removes).
    pub unindexed_packs: Vec<String>,
    /// Index entries naming a pack that does not exist (harmless; left by
    /// an interrupted writer or GC; `gc` drops them).
    pub dangling_index_entries: usize,
    /// Time taken in milliseconds.
    pub duration_ms: u64,
}

impl FsckReport {
    /// True if no snapshot, pack or index is damaged and no manifest is
    /// misplaced.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty()
            && self.misplaced_manifests.is_empty()
            && self.damaged_packs.is_empty()
            && self.damaged_indexes.is_empty()
    }
}

/// What `repair_index` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RepairReport {
    /// Packs the new index describes.
    pub packs_indexed: usize,
    /// Blobs the new index describes.
    pub blobs_indexed: usize,
    /// Damaged records left out.
    pub records_skipped: usize,
    /// Damaged index files removed after the new index was durable.
    pub indexes_removed: usize,
}

/// What walking and verifying one pack found.
struct PackCheck {
    /// Records whose header and content verify.
    good: Vec<Entry>,
    /// Problems, one line each.
    problems: Vec<String>,
    /// A pack with an intact trailer: it needs no index file.
    self_indexed: bool,
}

impl TenantStore {
    /// Reads every manifest and verifies every referenced blob (read,
    /// decompress, hash, length). Blobs shared by several snapshots are
    /// verified once. Never modifies the store.
    ///
    /// # Errors
    /// Only I/O errors that stop the scan itself (listing directories);
    /// damage is reported in the [`FsckReport`].
    pub fn fsck(&self) -> Result<FsckReport, StoreError> {
        let start = Instant::now();
        self.refresh_index()?;
        let mut report = FsckReport::default();
        let backend = self.backend();

        // Manifests, including files whose names are not valid ids.
        let mut manifests = Vec::new();
        let mut damaged: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let snap_root = self.key("snapshots");
        for job_dir in backend
            .list(&snap_root)
            .map_err(|e| StoreError::io("list", snap_root.clone(), e))?
        {
            let dir = format!("{snap_root}/{job_dir}");
            let names = match backend.list(&dir) {
                Ok(n) => n,
                Err(_) if dir.ends_with(".json") => {
                    report.misplaced_manifests.push(dir);
                    continue;
                }
                Err(_) => {
                    report.stray_files.push(dir);
                    continue;
                }
            };
            for name in names {
                let Some(id) = manifest_at(&job_dir, &name) else {
                    let path = format!("{dir}/{name}");
                    if name.ends_with(".json") {
                        report.misplaced_manifests.push(path);
                    } else {
                        report.stray_files.push(path);
                    }
                    continue;
                };
                report.snapshots_checked += 1;
                match self.get(&id) {
                    Ok(m) => manifests.push(m),
                    Err(StoreError::NotFound { .. }) => report.snapshots_checked -= 1,
                    Err(e) => damaged.entry(id.to_string()).or_default().push(e.to_string()),
                }
            }
        }

        report.misplaced_manifests.sort();

        // Distinct blobs with the length the first reference gives.
        let mut wanted: HashMap<BlobHash, u64> = HashMap::new();
        for m in &manifests {
            for (_, _, c) in m.chunk_refs() {
                if let Some(h) = c.blob() {
                    wanted.entry(h).or_insert(c.len());
                }
            }
        }
        let bad = self.verify_blobs(&wanted);
        report.blobs_checked = wanted.len();
        report.bytes_checked = wanted
            .iter()
            .filter(|(h, _)| !bad.contains_key(h))
            .map(|(_, len)| len)
            .sum();
        for m in &manifests {
            for (task, index, c) in m.chunk_refs() {
                let Some(h) = c.blob() else { continue };
                if let Some(problem) = bad.get(&h) {
                    damaged
                        .entry(m.id.to_string())
                        .or_default()
                        .push(format!("task {task}, chunk {index} (blob {h}): {problem}"));
                }
            }
        }
        // A snapshot deleted while we verified (its blobs collected by a
        // concurrent GC) is not damaged, just gone.
        damaged.retain(|id, _| {
            SnapshotId::parse(id).map_or(true, |id| self.manifest_exists(&id).unwrap_or(true))
        });
        report.damaged = damaged
            .into_iter()
            .map(|(id, problems)| DamagedSnapshot { id, problems })
            .collect();

        let (blobs, stray) = self.scan_blobs()?;
        let mut stored: HashSet<BlobHash> = blobs.into_iter().collect();

        // Packs: every record verified.
        let mut checked: HashMap<BlobHash, PackCheck> = HashMap::new();
        for name in self.list_packs()? {
            let check = self.check_pack(&name)?;
            if !check.problems.is_empty() {
                let shown: Vec<&str> = check.problems.iter().take(3).map(String::as_str).collect();
                let more = check.problems.len().saturating_sub(3);
                let tail = if more > 0 {
                    format!("; and {more} more")
                } else {
                    String::new()
                };
                report
                    .damaged_packs
                    .push(format!("{}: {}{tail}", self.pack_key(&name), shown.join("; ")));
            }
            stored.extend(check.good.iter().map(|e| e.hash));
            checked.insert(name, check);
        }
        report.packs_checked = checked.len();

        // Index files: intact, and each entry a verified record of its pack.
        let mut indexed: HashSet<BlobHash> = HashSet::new();
        for name in self.list_index_files()? {
            report.index_files_checked += 1;
            let key = self.index_key(&name);
            let file = match self.read_index_file(&name)? {
                Ok(f) => f,
                Err(reason) => {
                    report.damaged_indexes.push(format!("{key}: {reason}"));
                    continue;
                }
            };
            let mut problems = Vec::new();
            for (pack, _, entries) in &file.packs {
                let Some(check) = checked.get(pack) else {
                    report.dangling_index_entries += entries.len();
                    continue;
                };
                indexed.insert(*pack);
                let good: HashSet<(BlobHash, u64)> = check.good.iter().map(|e| (e.hash, e.offset)).collect();
                for e in entries {
                    if !good.contains(&(e.hash, e.offset)) && problems.len() < 3 {
                        problems.push(format!(
                            "entry of blob {} is not an intact record of pack {pack} at offset {}",
                            e.hash, e.offset
                        ));
                    }
                }
            }
            if !problems.is_empty() {
                report
                    .damaged_indexes
                    .push(format!("{key}: {}", problems.join("; ")));
            }
        }
        let mut unindexed: Vec<String> = checked
            .iter()
            .filter(|(n, c)| !indexed.contains(*n) && !c.self_indexed && c.problems.is_empty())
            .map(|(n, _)| self.pack_key(n))
            .collect();
        unindexed.sort();
        report.unindexed_packs = unindexed;
        report.damaged_packs.sort();
        report.damaged_indexes.sort();
        for name in self.backend().list(&self.key("index")).unwrap_or_default() {
            if BlobHash::parse(&name).is_err() {
                report.stray_files.push(self.key(&format!("index/{name}")));
            }
        }
        for name in self.backend().list(&self.key("packs")).unwrap_or_default() {
            if BlobHash::parse(&name).is_err() {
                report.stray_files.push(self.key(&format!("packs/{name}")));
            }
        }

        report.unreferenced_blobs = stored.iter().filter(|h| !wanted.contains_key(h)).count();
        report.stray_files.extend(stray);
        report.duration_ms = start.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Walks pack `name` and verifies every record's content.
    fn check_pack(&self, name: &BlobHash) -> Result<PackCheck, StoreError> {
        let key = self.pack_key(name);
        let mut check = PackCheck {
            good: Vec::new(),
            problems: Vec::new(),
            self_indexed: false,
        };
        let len = match self.backend().size(&key) {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(check),
            Err(e) => return Err(StoreError::io("stat pack", key, e)),
        };
        let walk = match pack::walk(self.backend(), &key, len) {
            Ok(w) => w,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                check.problems.push(e.to_string());
                return Ok(check);
            }
            Err(e) => return Err(StoreError::io("read pack", key, e)),
        };
        if let Some(p) = &walk.problem {
            check.problems.push(p.clone());
        } else if walk.name != *name {
            check
                .problems
                .push(format!("its headers hash to {}, not to its name", walk.name));
        }
        check.self_indexed = walk.self_indexed;
        for e in walk.entries {
            let mut out = vec![0u8; e.plain as usize];
            match pack::read_blob_into(self.backend(), &key, &e, &mut out) {
                Ok(()) => check.good.push(e),
                Err(p) => check
                    .problems
                    .push(format!("record of blob {} at offset {}: {p}", e.hash, e.offset)),
            }
        }
        Ok(check)
    }

    /// Rebuilds the index of every pack no intact index file describes,
    /// from the packs' own headers (records that do not verify are left
    /// out), makes it durable, and then removes the damaged index files.
    /// Holds the GC lock, so no GC runs meanwhile; writers go on.
    ///
    /// # Errors
    /// [`StoreError::Busy`] if a GC held the tenant for `gc_wait`; I/O
    /// errors.
    pub fn repair_index(&self) -> Result<RepairReport, StoreError> {
        let wait = self.options().gc_wait;
        let _gc = self.lock("gc", LockMode::Exclusive, Some(wait))?.ok_or_else(|| {
            StoreError::Busy(format!(
                "repair of tenant {} waited {wait:?} for a gc",
                self.name()
            ))
        })?;
        let mut report = RepairReport::default();
        let mut covered: HashSet<BlobHash> = HashSet::new();
        let mut damaged = Vec::new();
        for name in self.list_index_files()? {
            match self.read_index_file(&name)? {
                Ok(file) => {
                    let mut intact = true;
                    for (pack, _, entries) in &file.packs {
                        let key = self.pack_key(pack);
                        if self.backend().size(&key).ok().flatten().is_none() {
                            continue;
                        }
                        let good: HashSet<(BlobHash, u64)> = self
                            .check_pack(pack)?
                            .good
                            .iter()
                            .map(|e| (e.hash, e.offset))
                            .collect();
                        if entries.iter().any(|e| !good.contains(&(e.hash, e.offset))) {
                            intact = false;
                        }
                    }
                    if intact {
                        covered.extend(file.packs.iter().map(|p| p.0));
                    } else {
                        damaged.push(name);
                    }
                }
                Err(_) => damaged.push(name),
            }
        }
        let mut file = IndexFile::default();
        for name in self.list_packs()? {
            if covered.contains(&name) {
                continue;
            }
            let key = self.pack_key(&name);
            let Some(len) = self
                .backend()
                .size(&key)
                .map_err(|e| StoreError::io("stat pack", key, e))?
            else {
                continue;
            };
            let check = self.check_pack(&name)?;
            report.records_skipped += check.problems.len();
            if check.good.is_empty() {
                continue;
            }
            report.blobs_indexed += check.good.len();
            report.packs_indexed += 1;
            file.packs.push((name, len, check.good));
        }
        let sync = self.options().sync;
        for part in file.split(MAX_PACKS as usize, MAX_ENTRIES as usize) {
            let (bytes, name) = part.encode();
            let key = self.index_key(&name);
            self.backend()
                .put(&key, &bytes, PutMode::Replace, sync)
                .and_then(|_| if sync { self.backend().flush() } else { Ok(()) })
                .map_err(|e| StoreError::io("write index", key, e))?;
        }
        for name in damaged {
            let key = self.index_key(&name);
            if self
                .backend()
                .delete(&key)
                .map_err(|e| StoreError::io("delete index", key, e))?
            {
                report.indexes_removed += 1;
            }
        }
        if sync {
            self.backend()
                .flush()
                .map_err(|e| StoreError::io("sync", self.key("index"), e))?;
        }
        self.refresh_index()?;
        Ok(report)
    }

    /// Verifies the blobs with up to `threads` threads; returns the bad ones.
    fn verify_blobs(&self, wanted: &HashMap<BlobHash, u64>) -> HashMap<BlobHash, BlobProblem> {
        let list: Vec<(&BlobHash, &u64)> = wanted.iter().collect();
        let bad = Mutex::new(HashMap::new());
        let check = |(hash, len): &(&BlobHash, &u64)| {
            let mut out = vec![0u8; usize::try_from(**len).unwrap_or(usize::MAX).min(super::MAX_CHUNK)];
            let problem = if out.len() as u64 != **len {
                Some(BlobProblem::LengthMismatch {
                    expected: **len,
                    actual: out.len() as u64,
                })
            } else {
                self.read_blob_into(hash, &mut out).err()
            };
            if let Some(p) = problem {
                bad.lock().unwrap().insert(**hash, p);
            }
        };
        let threads = self.options().threads.max(1);
        if list.is_empty() {
            return HashMap::new();
        }
        let per = list.len().div_ceil(threads);
        std::thread::scope(|s| {
            for group in list.chunks(per) {
                s.spawn(|| group.iter().for_each(check));
            }
        });
        bad.into_inner().unwrap()
    }
}
