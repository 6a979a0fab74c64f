//! Consistency check: every manifest parses and every blob it references is
//! present and hashes to its name.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Mutex;
use std::time::Instant;

use super::blob::BlobProblem;
use super::blob::{self, BlobHash};
use super::error::StoreError;
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
    /// Time taken in milliseconds.
    pub duration_ms: u64,
}

impl FsckReport {
    /// True if no snapshot is damaged and no manifest is misplaced.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.misplaced_manifests.is_empty()
    }
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
        report.unreferenced_blobs = blobs.iter().filter(|h| !wanted.contains_key(h)).count();
        report.stray_files.extend(stray);
        report.duration_ms = start.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Verifies the blobs with up to `threads` threads; returns the bad ones.
    fn verify_blobs(&self, wanted: &HashMap<BlobHash, u64>) -> HashMap<BlobHash, BlobProblem> {
        let list: Vec<(&BlobHash, &u64)> = wanted.iter().collect();
        let bad = Mutex::new(HashMap::new());
        let check = |(hash, len): &(&BlobHash, &u64)| {
            let problem = match self.backend().read(&self.blob_key(hash)) {
                Ok(file) => blob::decode(&file, hash, Some(**len)).err(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Some(BlobProblem::Missing),
                Err(e) => Some(BlobProblem::Unreadable(e.to_string())),
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
