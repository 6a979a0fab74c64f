//! Tests of layout 2 through the public API: packs and indexes on disk,
//! fsyncs per checkpoint, repack, index repair, and reading and migrating
//! a layout-1 store.

use super::*;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;

fn opts() -> StoreOptions {
    StoreOptions {
        sync: false,
        threads: 2,
        ..StoreOptions::default()
    }
}

fn job() -> JobName {
    JobName::new("j").unwrap()
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Commits `chunks` (each stored as one blob) as one canonical task.
fn commit_blobs(t: &TenantStore, pieces: &[Vec<u8>]) -> (SnapshotId, Vec<ChunkRef>) {
    let n = t.next_snapshot_number(&job()).unwrap();
    let mut w = t.begin(&job(), n).unwrap();
    let chunks: Vec<ChunkRef> = pieces.iter().map(|p| w.put_chunk(p).unwrap()).collect();
    let mut m = w.manifest(
        SnapshotKind::Checkpoint,
        Trigger::Periodic,
        StateFormat::Canonical,
    );
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical {
            len: pieces.iter().map(|p| p.len() as u64).sum(),
            chunks: chunks.clone(),
        },
    });
    (w.commit(m).unwrap(), chunks)
}

fn read(t: &TenantStore, id: &SnapshotId, chunks: &[ChunkRef]) -> Vec<u8> {
    t.read_chunks(id, &TaskKey::new("op", 0), chunks).unwrap()
}

fn files(dir: &std::path::Path, sub: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("tenants/t1").join(sub))
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn a_snapshot_is_one_pack_and_one_index_and_blobs_are_found_through_them() {
    let dir = tempfile::tempdir().unwrap();
    let t = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    let pieces: Vec<Vec<u8>> = (0..20).map(|i| noise(i, 30_000)).collect();
    let (id, chunks) = commit_blobs(&t, &pieces);
    assert_eq!(files(dir.path(), "packs").len(), 1);
    assert_eq!(files(dir.path(), "index").len(), 1);
    assert!(!dir.path().join("tenants/t1/blobs").exists());
    assert_eq!(read(&t, &id, &chunks), pieces.concat());
    // Another handle (another process) finds them through the index files.
    let other = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    assert_eq!(read(&other, &id, &chunks), pieces.concat());
    // Dedup: the same blobs again write nothing but the manifest.
    let (id2, _) = commit_blobs(&other, &pieces);
    assert_eq!(other.get(&id2).unwrap().figures.chunks_new, 0);
    assert_eq!(files(dir.path(), "packs").len(), 1);
    assert!(other.fsck().unwrap().is_clean());
    let store = std::fs::read_to_string(dir.path().join("store.json")).unwrap();
    assert!(store.contains("\"version\": 2"), "{store}");
    // A fresh handle's first question is answered from the index files too.
    let third = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    assert_eq!(third.next_intact_before(&id2).unwrap(), Some(id));
    let fourth = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    // The quota counts each blob's record in its pack: header and payload.
    assert_eq!(fourth.usage_bytes().unwrap(), 20 * (44 + 30_000));
}

#[test]
fn packs_are_sealed_at_the_target_size() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        pack_size: 100_000,
        ..opts()
    };
    let t = Store::open(dir.path(), options).unwrap().tenant("t1").unwrap();
    let pieces: Vec<Vec<u8>> = (0..10).map(|i| noise(i, 30_000)).collect();
    let (id, chunks) = commit_blobs(&t, &pieces);
    // 10 × 30 KB at 100 KB per pack (a pack exceeds it by at most one blob).
    let packs = files(dir.path(), "packs");
    assert_eq!(packs.len(), 3, "{packs:?}");
    for p in &packs {
        assert!(std::fs::metadata(p).unwrap().len() < 100_000 + 30_000 + 44);
    }
    assert_eq!(files(dir.path(), "index").len(), 1, "one index per writer");
    assert_eq!(read(&t, &id, &chunks), pieces.concat());
}

/// The durable-file count of an incremental checkpoint's write and commit
/// that wrote one new blob, with fsyncs on: pack, index and manifest, plus
/// the directories `packs/`, `index/` and the manifest's. (Taking the
/// number from the counter before `begin` costs one more file and
/// directory, counted by the store benchmark.)
#[test]
fn an_incremental_commit_costs_three_file_and_three_directory_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(LocalDir::open(dir.path()).unwrap());
    let options = StoreOptions { sync: true, ..opts() };
    let store = Store::with_backend(backend.clone(), options, "test").unwrap();
    let t = store.tenant("t1").unwrap();
    let mut image = noise(1, 64 * 65_536);
    let commit = |image: &[u8], n: u64| {
        let w = t.begin(&job(), n).unwrap();
        (w, image.to_vec())
    };
    let finish = |(mut w, image): (SnapshotWriter, Vec<u8>)| {
        let image = &image;
        let chunks = w.put_chunks_fixed(image, 65_536).unwrap();
        let mut m = w.manifest(SnapshotKind::Checkpoint, Trigger::Periodic, StateFormat::Native);
        m.tasks.push(TaskState {
            key: TaskKey::new("op", 0),
            state: TaskStateData::Native {
                memories: vec![MemoryImage::new(0, image.len() as u64, 65_536, chunks)],
                extra: serde_json::Value::Null,
            },
        });
        w.commit(m).unwrap();
    };
    let n = t.next_snapshot_number(&job()).unwrap();
    finish(commit(&image, n));
    image[5 * 65_536] ^= 1;
    let n = t.next_snapshot_number(&job()).unwrap();
    let before = backend.sync_counts();
    finish(commit(&image, n));
    let after = backend.sync_counts();
    assert_eq!(after.files - before.files, 3, "{before:?} → {after:?}");
    assert_eq!(after.dirs - before.dirs, 3, "{before:?} → {after:?}");
    // Unchanged state (a savepoint after a checkpoint): the manifest only.
    let n = t.next_snapshot_number(&job()).unwrap();
    let before = backend.sync_counts();
    finish(commit(&image, n));
    let after = backend.sync_counts();
    assert_eq!((after.files - before.files, after.dirs - before.dirs), (1, 1));
}

#[test]
fn gc_repacks_a_mostly_dead_pack_and_consolidates_the_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let t = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    let pieces: Vec<Vec<u8>> = (0..10).map(|i| noise(i, 40_000)).collect();
    let (all, _) = commit_blobs(&t, &pieces);
    // A later snapshot keeps 2 of the 10 blobs (20 % live: repacked).
    let (few, few_chunks) = commit_blobs(&t, &[pieces[3].clone(), pieces[7].clone(), noise(99, 1000)]);
    let (_, dead_chunks) = commit_blobs(&t, &[noise(100, 5000)]);
    t.delete(&all).unwrap();
    t.delete(&SnapshotId::new(job(), 3)).unwrap();
    assert_eq!(files(dir.path(), "packs").len(), 3);
    assert_eq!(files(dir.path(), "index").len(), 3);
    let report = t.gc().unwrap();
    assert_eq!(report.packs_rewritten, 1, "{report:?}");
    assert_eq!(
        report.packs_removed, 2,
        "the repacked one and the dead one: {report:?}"
    );
    assert_eq!(
        report.blobs_removed, 9,
        "8 of the first, 1 of the third: {report:?}"
    );
    assert!(
        report.bytes_rewritten > 80_000 && report.bytes_rewritten < 90_000,
        "{report:?}"
    );
    assert!(report.bytes_freed > 300_000, "{report:?}");
    assert_eq!(
        report.index_files_merged, 4,
        "3 writers' and the repack's: {report:?}"
    );
    assert_eq!(files(dir.path(), "index").len(), 1);
    assert_eq!(files(dir.path(), "packs").len(), 2);
    assert_eq!(
        read(&t, &few, &few_chunks),
        [&pieces[3][..], &pieces[7], &noise(99, 1000)].concat()
    );
    assert!(dead_chunks[0].blob().is_some());
    let fsck = t.fsck().unwrap();
    assert!(fsck.is_clean(), "{fsck:?}");
    assert_eq!(fsck.unreferenced_blobs, 0, "{fsck:?}");
    // Nothing more to do: the next GC changes nothing.
    let again = t.gc().unwrap();
    assert_eq!(
        (
            again.packs_removed,
            again.packs_rewritten,
            again.index_files_merged
        ),
        (0, 0, 0)
    );
}

#[test]
fn a_lost_or_damaged_index_is_rebuilt_from_the_packs() {
    let dir = tempfile::tempdir().unwrap();
    let t = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    let (one, one_chunks) = commit_blobs(&t, &[noise(1, 10_000), noise(2, 10_000)]);
    let (two, two_chunks) = commit_blobs(&t, &[noise(3, 10_000)]);
    let indexes = files(dir.path(), "index");
    std::fs::remove_file(&indexes[0]).unwrap();
    let mut bytes = std::fs::read(&indexes[1]).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&indexes[1], &bytes).unwrap();
    let fresh = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    let report = fresh.fsck().unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.damaged.len(), 2, "{report:?}");
    assert_eq!(report.damaged_indexes.len(), 1, "{report:?}");
    assert!(
        report.damaged_indexes[0].contains("does not hash to its name"),
        "{report:?}"
    );
    assert_eq!(report.unindexed_packs.len(), 2, "{report:?}");
    // GC refuses nothing but must not delete the unindexed live packs.
    let gc = fresh.gc().unwrap();
    assert_eq!(gc.packs_removed, 0, "{gc:?}");
    let repaired = fresh.repair_index().unwrap();
    assert_eq!(repaired.packs_indexed, 0, "gc already indexed them: {repaired:?}");
    assert!(fresh.fsck().unwrap().is_clean());

    // Without a GC in between: repair does it.
    for f in files(dir.path(), "index") {
        std::fs::remove_file(f).unwrap();
    }
    let fresh = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    assert!(
        fresh
            .read_chunks(&one, &TaskKey::new("op", 0), &one_chunks)
            .is_err()
    );
    let repaired = fresh.repair_index().unwrap();
    assert_eq!(
        (repaired.packs_indexed, repaired.blobs_indexed),
        (2, 3),
        "{repaired:?}"
    );
    assert!(fresh.fsck().unwrap().is_clean());
    assert_eq!(
        read(&fresh, &one, &one_chunks),
        [noise(1, 10_000), noise(2, 10_000)].concat()
    );
    assert_eq!(read(&fresh, &two, &two_chunks), noise(3, 10_000));
}

/// Writes a layout-1 store by hand: `store.json` version 1, loose blob
/// files, one manifest.
fn layout1_store(dir: &std::path::Path, pieces: &[Vec<u8>]) -> (SnapshotId, Vec<ChunkRef>) {
    std::fs::write(
        dir.join("store.json"),
        br#"{"format":"memento-store","version":1}"#,
    )
    .unwrap();
    let tenant = dir.join("tenants/t1");
    let mut chunks = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        let hash = BlobHash::of(p);
        let path = tenant.join(hash.rel_path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let codec = if i % 2 == 0 {
            Compression::None
        } else {
            Compression::Zstd { level: 1 }
        };
        std::fs::write(path, blob::encode(p, codec)).unwrap();
        chunks.push(ChunkRef::Blob {
            blob: hash,
            len: p.len() as u64,
        });
    }
    let mut m = Manifest::new(
        job(),
        1,
        SnapshotKind::Savepoint,
        Trigger::Manual,
        StateFormat::Canonical,
    );
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical {
            len: pieces.iter().map(|p| p.len() as u64).sum(),
            chunks: chunks.clone(),
        },
    });
    std::fs::create_dir_all(tenant.join("snapshots/j")).unwrap();
    std::fs::write(tenant.join("snapshots/j/j-000001.json"), m.to_json()).unwrap();
    (m.id, chunks)
}

#[test]
fn a_layout1_store_is_read_written_in_packs_and_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let pieces: Vec<Vec<u8>> = (0..6).map(|i| noise(i, 20_000)).collect();
    let (old, old_chunks) = layout1_store(dir.path(), &pieces);
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(store.layout_version(), 1, "opening alone changes nothing");
    let t = store.tenant("t1").unwrap();
    assert_eq!(read(&t, &old, &old_chunks), pieces.concat());
    assert!(t.fsck().unwrap().is_clean());
    // The quota counts the loose files as they are on disk.
    let on_disk: u64 = (0..6)
        .map(|i| {
            std::fs::metadata(
                dir.path()
                    .join("tenants/t1")
                    .join(BlobHash::of(&pieces[i]).rel_path()),
            )
        })
        .map(|m| m.unwrap().len())
        .sum();
    assert_eq!(t.usage_bytes().unwrap(), on_disk);

    // A loose snapshot exports as it is, and imports into packs.
    let mut archive = Vec::new();
    t.export(&old, &mut archive, "mem", &mut |_| {}).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let other = Store::open(elsewhere.path(), opts())
        .unwrap()
        .tenant("t1")
        .unwrap();
    let imported = other
        .import(&mut archive.as_slice(), "mem", None, &mut |_| {})
        .unwrap();
    assert_eq!(read(&other, &imported.id, &old_chunks), pieces.concat());

    // The first write raises the layout and dedupes against loose blobs.
    let (new, new_chunks) = commit_blobs(&t, &[pieces[0].clone(), noise(50, 7000)]);
    assert_eq!(store.layout_version(), 2);
    let json = std::fs::read_to_string(dir.path().join("store.json")).unwrap();
    assert!(json.contains("\"version\": 2"), "{json}");
    assert_eq!(t.get(&new).unwrap().figures.chunks_new, 1);
    assert_eq!(files(dir.path(), "packs").len(), 1);

    // The migration packs every loose blob, with progress, and removes them.
    let mut progress = Vec::new();
    let report = store.migrate(&mut |p| progress.push(p)).unwrap();
    assert_eq!(report.loose_blobs, 6, "{report:?}");
    assert_eq!(report.blobs_packed, 6, "{report:?}");
    assert_eq!(report.loose_removed, 6, "{report:?}");
    assert!(report.damaged.is_empty());
    assert!(!dir.path().join("tenants/t1/blobs").exists());
    let last = progress.last().unwrap();
    assert_eq!(Some(last.done_bytes), last.total_bytes);
    assert!(progress.windows(2).all(|w| w[0].done_bytes <= w[1].done_bytes));

    let fresh = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    let fsck = fresh.fsck().unwrap();
    assert!(fsck.is_clean(), "{fsck:?}");
    assert!(fsck.unindexed_packs.is_empty());
    assert_eq!(read(&fresh, &old, &old_chunks), pieces.concat());
    assert_eq!(
        read(&fresh, &new, &new_chunks),
        [pieces[0].clone(), noise(50, 7000)].concat()
    );
    // Again: nothing left to do.
    let again = fresh.migrate_loose(&mut |_| {}).unwrap();
    assert_eq!((again.loose_blobs, again.blobs_packed), (0, 0));
    // GC after migration keeps everything referenced.
    fresh.gc().unwrap();
    assert_eq!(read(&fresh, &old, &old_chunks), pieces.concat());
}

#[test]
fn an_interrupted_migration_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let pieces: Vec<Vec<u8>> = (0..4).map(|i| noise(i, 20_000)).collect();
    let (old, old_chunks) = layout1_store(dir.path(), &pieces);
    let store = Store::open(
        dir.path(),
        StoreOptions {
            pack_size: 30_000,
            ..opts()
        },
    )
    .unwrap();
    let t = store.tenant("t1").unwrap();
    store.migrate(&mut |_| {}).unwrap();
    // As if killed after the packs and index were durable but before the
    // loose files went: put the loose files back.
    for (i, p) in pieces.iter().enumerate() {
        let path = dir.path().join("tenants/t1").join(BlobHash::of(p).rel_path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            path,
            blob::encode(
                p,
                if i == 0 {
                    Compression::Zstd { level: 1 }
                } else {
                    Compression::None
                },
            ),
        )
        .unwrap();
    }
    let packs_before: HashSet<PathBuf> = files(dir.path(), "packs").into_iter().collect();
    let fresh = Store::open(dir.path(), opts()).unwrap();
    let report = fresh.migrate(&mut |_| {}).unwrap();
    assert_eq!(report.blobs_already_packed, 4, "{report:?}");
    assert_eq!((report.blobs_packed, report.loose_removed), (0, 4), "{report:?}");
    assert_eq!(
        files(dir.path(), "packs").into_iter().collect::<HashSet<_>>(),
        packs_before
    );
    let t2 = fresh.tenant("t1").unwrap();
    assert!(t2.fsck().unwrap().is_clean());
    assert_eq!(read(&t2, &old, &old_chunks), pieces.concat());
    drop(t);
}

#[test]
fn a_newer_layout_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("store.json"),
        br#"{"format":"memento-store","version":3}"#,
    )
    .unwrap();
    let err = Store::open(dir.path(), opts()).unwrap_err().to_string();
    assert!(
        err.ends_with("store layout version 3 (this build reads 1 and 2)"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
}

#[test]
fn export_of_a_packed_snapshot_holds_exactly_its_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let t = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    // One pack holding blobs of two snapshots.
    let n = t.next_snapshot_number(&job()).unwrap();
    let mut w = t.begin(&job(), n).unwrap();
    let a = w.put_chunk(&noise(1, 50_000)).unwrap();
    let _other = w.put_chunk(&noise(2, 50_000)).unwrap();
    let mut m = w.manifest(SnapshotKind::Savepoint, Trigger::Manual, StateFormat::Canonical);
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical {
            len: 50_000,
            chunks: vec![a],
        },
    });
    let id = w.commit(m).unwrap();
    let mut archive = Vec::new();
    let summary = t.export(&id, &mut archive, "mem", &mut |_| {}).unwrap();
    assert_eq!(summary.blobs, 1);
    assert!(
        archive.len() < 50_000 + 2_000,
        "one blob, not the pack: {}",
        archive.len()
    );
    let dst = tempfile::tempdir().unwrap();
    let t2 = Store::open(dst.path(), opts()).unwrap().tenant("t1").unwrap();
    let imported = t2
        .import(&mut archive.as_slice(), "mem", None, &mut |_| {})
        .unwrap();
    assert_eq!(read(&t2, &imported.id, &[a]), noise(1, 50_000));
    assert!(t2.fsck().unwrap().is_clean());
}

/// A snapshot kept to the end, its chunks and its bytes.
type Kept = (SnapshotId, Vec<ChunkRef>, Vec<u8>);

/// Writers that keep one blob of each earlier snapshot (so the packs of
/// deleted snapshots become 25 % live and get repacked) race a GC looping
/// on another handle (another process's view of the index files). Every
/// snapshot kept reads back through a fresh handle, fsck is clean, and GC
/// did rewrite packs.
#[test]
fn gc_with_repacks_concurrent_with_writers_on_another_handle_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let writers = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    let collector = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    let piece = |w: u64, i: u64, k: u64| noise(w * 10_000 + i * 10 + k, 20_000);
    let kept: Mutex<Vec<Kept>> = Mutex::new(Vec::new());
    let rewritten = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for w in 0..2u64 {
            let (t, kept, done) = (&writers, &kept, &done);
            s.spawn(move || {
                let j = JobName::new(&format!("job{w}")).unwrap();
                let mut previous: Option<SnapshotId> = None;
                for i in 0..20u64 {
                    let mut pieces: Vec<Vec<u8>> = (0..4).map(|k| piece(w, i, k)).collect();
                    if i > 0 {
                        pieces.push(piece(w, i - 1, 0));
                    }
                    let n = t.next_snapshot_number(&j).unwrap();
                    let mut wr = t.begin(&j, n).unwrap();
                    let chunks: Vec<ChunkRef> = pieces.iter().map(|p| wr.put_chunk(p).unwrap()).collect();
                    let mut m = wr.manifest(
                        SnapshotKind::Checkpoint,
                        Trigger::Periodic,
                        StateFormat::Canonical,
                    );
                    m.tasks.push(TaskState {
                        key: TaskKey::new("op", 0),
                        state: TaskStateData::Canonical {
                            len: pieces.iter().map(|p| p.len() as u64).sum(),
                            chunks: chunks.clone(),
                        },
                    });
                    let id = wr.commit(m).unwrap();
                    if let Some(old) = previous.take() {
                        t.delete(&old).unwrap();
                    }
                    previous = Some(id.clone());
                    if i == 19 {
                        kept.lock().unwrap().push((id, chunks, pieces.concat()));
                    }
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        s.spawn(|| {
            let mut runs = 0;
            while done.load(std::sync::atomic::Ordering::SeqCst) < 2 || runs < 3 {
                let r = collector.gc().unwrap();
                rewritten.fetch_add(r.packs_rewritten, std::sync::atomic::Ordering::SeqCst);
                runs += 1;
            }
        });
    });
    let r = collector.gc().unwrap();
    rewritten.fetch_add(r.packs_rewritten, std::sync::atomic::Ordering::SeqCst);
    assert!(
        rewritten.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "no pack was rewritten"
    );
    let fresh = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    let kept = kept.into_inner().unwrap();
    assert_eq!(kept.len(), 2);
    for (id, chunks, expected) in &kept {
        assert!(read(&fresh, id, chunks) == *expected, "{id} differs");
    }
    let fsck = fresh.fsck().unwrap();
    assert!(fsck.is_clean(), "{fsck:?}");
    // Dead blobs may remain in packs still at least half live.
    assert!(fsck.unreferenced_blobs <= 4, "{fsck:?}");
    assert!(fsck.unindexed_packs.is_empty(), "{fsck:?}");
    assert_eq!(fsck.index_files_checked, 1, "{fsck:?}");
}

/// Many incremental checkpoints leave many small packs, all live: GC
/// merges them into full-size packs once there are enough, and the
/// snapshots still read back.
#[test]
fn gc_merges_many_small_live_packs() {
    let dir = tempfile::tempdir().unwrap();
    let t = Store::open(dir.path(), opts()).unwrap().tenant("t1").unwrap();
    let mut snapshots = Vec::new();
    for i in 0..SMALL_PACKS_TO_MERGE as u64 {
        let piece = noise(1000 + i, 10_000);
        let (id, chunks) = commit_blobs(&t, std::slice::from_ref(&piece));
        snapshots.push((id, chunks, piece));
    }
    assert_eq!(files(dir.path(), "packs").len(), SMALL_PACKS_TO_MERGE);
    let report = t.gc().unwrap();
    assert_eq!(report.packs_rewritten, SMALL_PACKS_TO_MERGE, "{report:?}");
    assert_eq!(report.blobs_removed, 0, "{report:?}");
    assert_eq!(files(dir.path(), "packs").len(), 1);
    for (id, chunks, piece) in &snapshots {
        assert_eq!(read(&t, id, chunks), *piece);
    }
    assert!(t.fsck().unwrap().is_clean());
    // One merged pack is no longer "many": the next GC leaves it.
    assert_eq!(t.gc().unwrap().packs_rewritten, 0);
}
