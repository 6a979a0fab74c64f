//! Unit tests of the store through its public API (format, chunking, GC,
//! tenancy, quotas, integrity errors).

use super::*;
use std::collections::HashSet;
use std::path::PathBuf;

fn opts() -> StoreOptions {
    // No fsync: these tests are about logic, not power loss.
    StoreOptions {
        sync: false,
        threads: 2,
        ..StoreOptions::default()
    }
}

fn open(dir: &Path) -> TenantStore {
    Store::open(dir, opts()).unwrap().tenant("t1").unwrap()
}

fn job(name: &str) -> JobName {
    JobName::new(name).unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
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

/// Commits one canonical task with `state` as snapshot of `job`.
fn commit_canonical(t: &TenantStore, job_name: &str, state: &[u8]) -> (SnapshotId, Vec<ChunkRef>) {
    let j = job(job_name);
    let n = t.next_snapshot_number(&j).unwrap();
    let mut w = t.begin(&j, n).unwrap();
    let chunks = w.put_chunks_cdc(state).unwrap();
    let mut m = w.manifest(
        SnapshotKind::Checkpoint,
        Trigger::Periodic,
        StateFormat::Canonical,
    );
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical {
            len: state.len() as u64,
            chunks: chunks.clone(),
        },
    });
    (w.commit(m).unwrap(), chunks)
}

/// One stored blob as found on disk: its hash, the file holding it, and
/// where its record (pack) or file (loose) is.
#[derive(Debug, Clone)]
struct OnDisk {
    hash: BlobHash,
    file: PathBuf,
    offset: u64,
    len: u64,
}

/// Every blob on disk, found by reading the pack files' records directly
/// (not through the store's index) and listing loose blob files.
fn stored_blobs(dir: &Path, tenant: &str) -> Vec<OnDisk> {
    let mut out = Vec::new();
    let root = dir.join("tenants").join(tenant);
    for f in std::fs::read_dir(root.join("packs")).into_iter().flatten() {
        let path = f.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let mut at = 8usize;
        while at + 44 <= bytes.len() {
            let hash = BlobHash(bytes[at..at + 32].try_into().unwrap());
            let stored = u32::from_le_bytes(bytes[at + 40..at + 44].try_into().unwrap()) as usize;
            out.push(OnDisk {
                hash,
                file: path.clone(),
                offset: at as u64,
                len: 44 + stored as u64,
            });
            at += 44 + stored;
        }
    }
    for fan in std::fs::read_dir(root.join("blobs")).into_iter().flatten() {
        for f in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            let path = f.unwrap().path();
            let len = std::fs::metadata(&path).unwrap().len();
            let hash = BlobHash::parse(&path.file_name().unwrap().to_string_lossy()).unwrap();
            out.push(OnDisk {
                hash,
                file: path,
                offset: 0,
                len,
            });
        }
    }
    out
}

/// Distinct blobs stored.
fn blob_count(dir: &Path, tenant: &str) -> usize {
    stored_blobs(dir, tenant)
        .iter()
        .map(|b| b.hash)
        .collect::<HashSet<_>>()
        .len()
}

/// Where `hash` is stored (the first copy).
fn on_disk(dir: &Path, tenant: &str, hash: BlobHash) -> OnDisk {
    stored_blobs(dir, tenant)
        .into_iter()
        .find(|b| b.hash == hash)
        .expect("blob on disk")
}

/// Flips the last byte of the stored blob (its payload).
fn corrupt_blob(dir: &Path, tenant: &str, hash: BlobHash) {
    let b = on_disk(dir, tenant, hash);
    let mut bytes = std::fs::read(&b.file).unwrap();
    bytes[(b.offset + b.len - 1) as usize] ^= 0x55;
    std::fs::write(&b.file, &bytes).unwrap();
}

#[test]
fn commit_then_read_back_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let state = noise(1, 3 << 20);
    let (id, chunks) = commit_canonical(&t, "j", &state);
    assert_eq!(id.to_string(), "j-000001");
    assert!(chunks.len() > 3, "FastCDC should cut 3 MiB into several chunks");
    let back = t.read_chunks(&id, &TaskKey::new("op", 0), &chunks).unwrap();
    assert_eq!(back, state);
    let m = t.get(&id).unwrap();
    assert_eq!(m.figures.logical_bytes, state.len() as u64);
    assert_eq!(m.figures.new_bytes, state.len() as u64);
    assert_eq!(m.figures.chunks_new, chunks.len() as u64);
    let (id2, _) = commit_canonical(&t, "j", &state);
    assert_eq!(id2.number(), 2);
    assert_eq!(
        t.get(&id2).unwrap().figures.new_bytes,
        0,
        "identical state dedupes"
    );
    let listed: Vec<_> = t
        .list(&ListFilter::all())
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(listed, vec![id.clone(), id2.clone()]);
    assert_eq!(t.latest(&job("j")).unwrap().unwrap().id, id2);
    assert!(t.latest(&job("other")).unwrap().is_none());
}

#[test]
fn snapshot_numbers_are_monotonic_across_deletes_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let (a, _) = commit_canonical(&t, "j", b"a");
    let (b, _) = commit_canonical(&t, "j", b"b");
    t.delete(&b).unwrap();
    t.delete(&a).unwrap();
    let t = open(dir.path());
    assert_eq!(t.next_snapshot_number(&job("j")).unwrap(), 3);
    assert_eq!(t.next_snapshot_number(&job("k")).unwrap(), 1);
    // A number committed without the counter (as import may) is not reissued.
    let w = t.begin(&job("k"), 10).unwrap();
    let m = w.manifest(SnapshotKind::Savepoint, Trigger::Manual, StateFormat::Canonical);
    w.commit(m).unwrap();
    assert_eq!(t.next_snapshot_number(&job("k")).unwrap(), 11);
}

#[test]
fn a_series_at_the_last_number_is_refused_not_wrapped() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    // The counter file says the next number is u64::MAX: that one is issued,
    // then numbering stops (it wrapped to 1 and named a snapshot that did
    // not exist).
    let counter = dir.path().join("tenants/t1/counters/j");
    std::fs::create_dir_all(counter.parent().unwrap()).unwrap();
    std::fs::write(&counter, format!("{}\n", u64::MAX - 1)).unwrap();
    assert_eq!(t.next_snapshot_number(&job("j")).unwrap(), u64::MAX - 1);
    let e = t.next_snapshot_number(&job("j")).unwrap_err().to_string();
    assert_eq!(
        e,
        "job `j` has used every snapshot number (tenant t1); run it under another name"
    );
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap().trim(),
        u64::MAX.to_string(),
        "left as it was"
    );
    // A committed id at u64::MAX (as an import may bring) stops it too.
    let w = t.begin(&job("k"), u64::MAX).unwrap();
    let m = w.manifest(SnapshotKind::Savepoint, Trigger::Manual, StateFormat::Canonical);
    w.commit(m).unwrap();
    assert!(t.next_snapshot_number(&job("k")).is_err());
}

#[test]
fn list_filters_by_job_and_kind_and_orders_numerically() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    for (j, kind) in [
        ("b", SnapshotKind::Checkpoint),
        ("a", SnapshotKind::Savepoint),
        ("a", SnapshotKind::Checkpoint),
        ("b", SnapshotKind::Savepoint),
    ] {
        let jn = job(j);
        let n = t.next_snapshot_number(&jn).unwrap();
        let w = t.begin(&jn, n).unwrap();
        let m = w.manifest(kind, Trigger::Manual, StateFormat::Canonical);
        w.commit(m).unwrap();
    }
    let ids =
        |f: &ListFilter| -> Vec<String> { t.list(f).unwrap().iter().map(|m| m.id.to_string()).collect() };
    assert_eq!(
        ids(&ListFilter::all()),
        ["a-000001", "a-000002", "b-000001", "b-000002"]
    );
    assert_eq!(ids(&ListFilter::job(&job("b"))), ["b-000001", "b-000002"]);
    assert_eq!(
        ids(&ListFilter::all().kind(SnapshotKind::Savepoint)),
        ["a-000001", "b-000002"]
    );
}

#[test]
fn expired_answers_count_and_age_and_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let j = job("j");
    for age_days in [40u64, 30, 20, 10, 0] {
        let n = t.next_snapshot_number(&j).unwrap();
        let w = t.begin(&j, n).unwrap();
        let mut m = w.manifest(SnapshotKind::Savepoint, Trigger::Periodic, StateFormat::Canonical);
        m.created_at_ms = 100 * 86_400_000 - age_days * 86_400_000;
        w.commit(m).unwrap();
    }
    let now = 100 * 86_400_000;
    let names = |v: Vec<SnapshotId>| v.iter().map(|i| i.number()).collect::<Vec<_>>();
    let by_count = t
        .expired(&j, SnapshotKind::Savepoint, Some(2), None, now)
        .unwrap();
    assert_eq!(names(by_count), [1, 2, 3]);
    let day = Duration::from_secs(86_400);
    let by_age = t
        .expired(&j, SnapshotKind::Savepoint, None, Some(day * 25), now)
        .unwrap();
    assert_eq!(names(by_age), [1, 2]);
    let all_old = t
        .expired(&j, SnapshotKind::Savepoint, None, Some(Duration::ZERO), now + 1)
        .unwrap();
    assert_eq!(names(all_old), [1, 2, 3, 4], "the newest is always kept");
    assert!(
        t.expired(&j, SnapshotKind::Checkpoint, Some(1), None, now)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn fastcdc_insertion_shares_later_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let state = noise(7, 4 << 20);
    let (_, before) = commit_canonical(&t, "j", &state);
    let mut edited = state.clone();
    let at = state.len() / 3;
    edited.splice(at..at, b"inserted bytes".iter().copied());
    let (id, after) = commit_canonical(&t, "j", &edited);
    let old: HashSet<_> = before.iter().collect();
    let shared = after.iter().filter(|c| old.contains(c)).count();
    assert!(
        shared + 3 >= after.len(),
        "an insertion should rewrite at most ~2 chunks; shared {shared} of {}",
        after.len()
    );
    let m = t.get(&id).unwrap();
    assert!(m.figures.new_bytes < (3 * CDC_MAX) as u64, "{:?}", m.figures);
}

#[test]
fn zero_chunks_are_not_stored_and_read_back_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let j = job("j");
    let mut w = t.begin(&j, 1).unwrap();
    let mut image = vec![0u8; 1 << 20];
    image[300_000] = 1; // one non-zero byte in the second 256 KiB chunk
    let chunks = w.put_chunks_fixed(&image, 256 * 1024).unwrap();
    assert_eq!(chunks.len(), 4);
    assert_eq!(chunks.iter().filter(|c| c.blob().is_some()).count(), 1);
    assert_eq!(chunks[0], ChunkRef::Zero { zero: 256 * 1024 });
    let mut m = w.manifest(SnapshotKind::Checkpoint, Trigger::Periodic, StateFormat::Native);
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Native {
            memories: vec![MemoryImage {
                index: 0,
                size: image.len() as u64,
                chunk_size: 256 * 1024,
                chunks: chunks.clone(),
                new_chunks: None,
                base_size: None,
                deltas: Vec::new(),
            }],
            extra: serde_json::Value::Null,
        },
    });
    let id = w.commit(m).unwrap();
    assert_eq!(blob_count(dir.path(), "t1"), 1);
    assert_eq!(
        t.read_chunks(&id, &TaskKey::new("op", 0), &chunks).unwrap(),
        image
    );
}

#[test]
fn incremental_change_of_one_chunk_writes_one_blob() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let j = job("j");
    let chunk = 64 * 1024;
    let mut image = noise(3, 64 * chunk);
    let mut w = t.begin(&j, 1).unwrap();
    w.put_chunks_fixed(&image, chunk).unwrap();
    let m = w.manifest(SnapshotKind::Checkpoint, Trigger::Periodic, StateFormat::Native);
    w.commit(m).unwrap();
    image[10 * chunk + 5] ^= 0xff;
    let mut w = t.begin(&j, 2).unwrap();
    let refs = w.put_chunks_fixed(&image, chunk).unwrap();
    assert_eq!(refs.len(), 64);
    let m = w.manifest(SnapshotKind::Checkpoint, Trigger::Periodic, StateFormat::Native);
    w.commit(m).unwrap();
    let m = t.get(&SnapshotId::new(j, 2)).unwrap();
    assert_eq!(m.figures.chunks_new, 1);
    assert_eq!(m.figures.new_bytes, chunk as u64);
}

#[test]
fn gc_removes_unreferenced_keeps_referenced_and_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    // Below CDC_MIN: one blob each.
    let (keep, keep_chunks) = commit_canonical(&t, "j", &noise(1, 50_000));
    let (gone, _) = commit_canonical(&t, "j", &noise(2, 50_000));
    t.delete(&gone).unwrap();
    assert_eq!(blob_count(dir.path(), "t1"), 2);
    // An aborted writer leaves nothing behind: its blobs were only staged.
    let mut w = t.begin(&job("j"), 50).unwrap();
    w.put_chunk(b"aborted").unwrap();
    w.abort();
    assert_eq!(blob_count(dir.path(), "t1"), 2);
    let tmp: Vec<_> = std::fs::read_dir(dir.path().join("tmp")).unwrap().collect();
    assert_eq!(tmp.len(), 1, "only the owner file: {tmp:?}");
    // An in-progress writer that dedupes against the deleted snapshot's
    // (garbage) blob, and stages a new one: both must survive GC.
    let mut pending = t.begin(&job("j"), 60).unwrap();
    let reused = pending.put_chunk(&noise(2, 50_000)).unwrap();
    let staged = pending.put_chunk(b"in progress").unwrap();
    // GC would wait for `pending`; shorten the wait to see it refuse.
    let hurried = Store::open(
        dir.path(),
        StoreOptions {
            gc_wait: Duration::from_millis(100),
            ..opts()
        },
    )
    .unwrap()
    .tenant("t1")
    .unwrap();
    let err = hurried.gc().unwrap_err();
    assert!(err.to_string().contains("waited"), "{err}");
    assert_eq!(blob_count(dir.path(), "t1"), 2, "nothing deleted");

    // Commit on another thread once GC is waiting: GC must keep its blobs.
    let committer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let mut m = pending.manifest(SnapshotKind::Checkpoint, Trigger::Manual, StateFormat::Canonical);
        m.tasks.push(TaskState {
            key: TaskKey::new("op", 0),
            state: TaskStateData::Canonical {
                len: reused.len() + staged.len(),
                chunks: vec![reused, staged],
            },
        });
        pending.commit(m).unwrap()
    });
    let report = t.gc().unwrap();
    let pending_id = committer.join().unwrap();
    assert_eq!(report.blobs_removed, 0, "{report:?}");
    assert_eq!(report.snapshots, 2, "{report:?}");
    let mut expected = noise(2, 50_000);
    expected.extend_from_slice(b"in progress");
    assert_eq!(
        t.read_chunks(&pending_id, &TaskKey::new("op", 0), &[reused, staged])
            .unwrap(),
        expected
    );
    // Unreferenced blobs go; referenced ones stay.
    t.delete(&pending_id).unwrap();
    let report = t.gc().unwrap();
    assert_eq!(report.blobs_removed, 2, "{report:?}");
    assert!(report.bytes_freed > 0);
    assert_eq!(
        t.read_chunks(&keep, &TaskKey::new("op", 0), &keep_chunks)
            .unwrap(),
        noise(1, 50_000)
    );
    assert!(t.fsck().unwrap().is_clean());
    assert_eq!(t.gc().unwrap().blobs_removed, 0);
}

#[test]
fn gc_refuses_when_a_manifest_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let (id, _) = commit_canonical(&t, "j", b"state");
    let path = dir.path().join("tenants/t1/snapshots/j/j-000001.json");
    std::fs::write(&path, b"{ not json").unwrap();
    let err = t.gc().unwrap_err();
    assert!(
        err.to_string()
            .starts_with("manifest of snapshot j-000001 is corrupt"),
        "{err}"
    );
    assert_eq!(blob_count(dir.path(), "t1"), 1, "nothing deleted");
    let err = t.get(&id).unwrap_err();
    assert!(matches!(err, StoreError::CorruptManifest { .. }), "{err}");
}

#[test]
fn commit_refuses_references_to_missing_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let w = t.begin(&job("j"), 1).unwrap();
    let mut m = w.manifest(SnapshotKind::Checkpoint, Trigger::Manual, StateFormat::Canonical);
    let ghost = BlobHash::of(b"never written");
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 3),
        state: TaskStateData::Canonical {
            len: 13,
            chunks: vec![ChunkRef::Blob { blob: ghost, len: 13 }],
        },
    });
    let err = w.commit(m).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot commit snapshot j-000001: task op[3], chunk 0 references blob {ghost}, which is not in the store"
        )
    );
    assert!(t.list(&ListFilter::all()).unwrap().is_empty());
}

#[test]
fn commit_refuses_a_foreign_manifest_and_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let w = t.begin(&job("j"), 1).unwrap();
    let m = Manifest::new(
        job("j"),
        2,
        SnapshotKind::Checkpoint,
        Trigger::Manual,
        StateFormat::Canonical,
    );
    let err = w.commit(m).unwrap_err();
    assert!(err.to_string().contains("manifest is for j-000002"), "{err}");
    commit_canonical(&t, "j", b"x");
    let err = t.begin(&job("j"), 1).unwrap_err();
    assert_eq!(err.to_string(), "snapshot j-000001 already exists (tenant t1)");
}

#[test]
fn tenants_cannot_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let a = store.tenant("alice").unwrap();
    let b = store.tenant("bob").unwrap();
    let (id, chunks) = commit_canonical(&a, "j", b"alice's secret");
    assert!(b.list(&ListFilter::all()).unwrap().is_empty());
    assert!(b.latest(&job("j")).unwrap().is_none());
    let err = b.get(&id).unwrap_err();
    assert_eq!(err.to_string(), "snapshot j-000001 not found (tenant bob)");
    assert!(b.delete(&id).unwrap_err().is_not_found());
    // Even knowing the exact chunk hashes, bob reads nothing of alice's.
    assert!(
        b.read_chunks(&id, &TaskKey::new("op", 0), &chunks)
            .unwrap_err()
            .is_not_found()
    );
    let w = b.begin(&job("j"), 1).unwrap();
    let mut m = w.manifest(SnapshotKind::Checkpoint, Trigger::Manual, StateFormat::Canonical);
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical {
            len: 14,
            chunks: chunks.clone(),
        },
    });
    assert!(matches!(
        w.commit(m).unwrap_err(),
        StoreError::MissingBlobAtCommit { .. }
    ));
    assert_eq!(b.gc().unwrap().blobs_removed, 0);
    a.read_chunks(&id, &TaskKey::new("op", 0), &chunks).unwrap();
    assert_eq!(
        store.tenants().unwrap(),
        [TenantName::new("alice").unwrap(), TenantName::new("bob").unwrap()]
    );
    assert!(store.tenant("../alice").is_err());
}

#[test]
fn quota_is_enforced_at_commit_and_counts_shared_blobs_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            quota_bytes: Some(300_000),
            compression: Compression::None,
            ..opts()
        },
    )
    .unwrap();
    let t = store.tenant("small").unwrap();
    let state = noise(1, 200_000);
    commit_canonical(&t, "j", &state);
    let used = t.usage_bytes().unwrap();
    assert!((200_000..201_000).contains(&used), "{used}");
    // The same state again shares every blob: no extra usage.
    commit_canonical(&t, "j", &state);
    assert_eq!(t.usage_bytes().unwrap(), used);
    // New state of 200 KB does not fit.
    let j = job("j");
    let n = t.next_snapshot_number(&j).unwrap();
    let mut w = t.begin(&j, n).unwrap();
    let bytes = noise(2, 200_000);
    let chunks = w.put_chunks_cdc(&bytes).unwrap();
    let mut m = w.manifest(SnapshotKind::Savepoint, Trigger::Manual, StateFormat::Canonical);
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical { len: 200_000, chunks },
    });
    let err = w.commit(m).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("quota exceeded for tenant small: committing snapshot j-000003 would use 4"),
        "{msg}"
    );
    assert!(msg.contains("the quota is 300000 bytes"), "{msg}");
    assert_eq!(t.list(&ListFilter::all()).unwrap().len(), 2);
    // Deleting frees quota.
    for m in t.list(&ListFilter::all()).unwrap() {
        t.delete(&m.id).unwrap();
    }
    assert_eq!(t.usage_bytes().unwrap(), 0);
}

#[test]
fn corrupt_and_missing_blobs_name_snapshot_task_chunk_and_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let (older, _) = commit_canonical(&t, "j", &noise(1, 50_000));
    let state = noise(2, 600_000);
    let (id, chunks) = commit_canonical(&t, "j", &state);
    let victim = chunks[1].blob().unwrap();
    corrupt_blob(dir.path(), "t1", victim);
    let err = t.read_chunks(&id, &TaskKey::new("op", 0), &chunks).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "snapshot j-000002, task op[0], chunk 1 (blob {victim}): "
        )),
        "{msg}"
    );
    assert!(
        msg.ends_with("; the next older intact snapshot is j-000001"),
        "{msg}"
    );
    assert!(msg.contains("corrupt") || msg.contains("decompress"), "{msg}");

    let report = t.fsck().unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].id, "j-000002");
    assert!(
        report.damaged[0].problems[0].contains("task op[0], chunk 1"),
        "{report:?}"
    );
    assert_eq!(report.damaged_packs.len(), 1, "{report:?}");
    assert!(
        report.damaged_packs[0].contains(&format!("record of blob {victim}")),
        "{report:?}"
    );

    // The whole pack gone: every chunk of the snapshot is missing.
    std::fs::remove_file(on_disk(dir.path(), "t1", victim).file).unwrap();
    let err = t.read_chunks(&id, &TaskKey::new("op", 0), &chunks).unwrap_err();
    assert!(err.to_string().contains("chunk 0 (blob"), "{err}");
    assert!(err.to_string().contains("blob is missing"), "{err}");
    let report = t.fsck().unwrap();
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].id, "j-000002");
    assert!(report.dangling_index_entries > 0, "{report:?}");
    assert_eq!(t.next_intact_before(&id).unwrap(), Some(older));
}

#[test]
fn fsck_reports_corrupt_manifests_and_stray_files() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    commit_canonical(&t, "j", b"one");
    commit_canonical(&t, "j", b"two");
    assert!(t.fsck().unwrap().is_clean());
    let snap = dir.path().join("tenants/t1/snapshots/j");
    std::fs::write(snap.join("j-000002.json"), br#"{"schema_version": 9}"#).unwrap();
    std::fs::write(snap.join("notes.txt"), b"hi").unwrap();
    let report = t.fsck().unwrap();
    assert_eq!(report.snapshots_checked, 2);
    assert_eq!(report.damaged.len(), 1);
    assert!(
        report.damaged[0].problems[0].contains("schema version 9"),
        "{report:?}"
    );
    assert!(report.stray_files.iter().any(|f| f.ends_with("notes.txt")));
    assert_eq!(report.unreferenced_blobs, 1, "two's blob is unreferenced now");
    // list skips what does not read; latest falls back to the older one.
    assert_eq!(t.list(&ListFilter::all()).unwrap().len(), 1);
    assert_eq!(t.latest(&job("j")).unwrap().unwrap().number, 1);
}

/// A manifest renamed (`j-2.json`) or moved under another job's directory
/// is listed by nothing: fsck calls it misplaced (not clean), and gc
/// refuses to run rather than delete the blobs it references.
#[test]
fn misplaced_manifests_stop_gc_and_fail_fsck() {
    for (what, to) in [
        ("renamed", "j/j-2.json"),
        ("moved", "k/j-000002.json"),
        ("flat", "j-000002.json"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let t = open(dir.path());
        commit_canonical(&t, "j", b"one");
        let (two, chunks) = commit_canonical(&t, "j", &noise(7, 200_000));
        commit_canonical(&t, "k", b"other job");
        let snap = dir.path().join("tenants/t1/snapshots");
        std::fs::rename(snap.join("j/j-000002.json"), snap.join(to)).unwrap();
        let report = t.fsck().unwrap();
        assert!(!report.is_clean(), "{what}: {report:?}");
        assert_eq!(
            report.misplaced_manifests,
            [format!("tenants/t1/snapshots/{to}")],
            "{what}"
        );
        assert!(report.stray_files.is_empty(), "{what}: {report:?}");
        let e = t.gc().unwrap_err().to_string();
        assert!(
            e.contains(&format!("tenants/t1/snapshots/{to} looks like a manifest")),
            "{what}: {e}"
        );
        // Put back, nothing was lost.
        std::fs::rename(snap.join(to), snap.join("j/j-000002.json")).unwrap();
        assert!(t.fsck().unwrap().is_clean(), "{what}");
        t.gc().unwrap();
        t.read_chunks(&two, &TaskKey::new("op", 0), &chunks).unwrap();
    }
}

#[test]
fn reopening_removes_temp_files_of_dead_writers_only() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    commit_canonical(&t, "j", b"x");
    std::fs::write(dir.path().join("tmp/999-gone.owner"), b"999").unwrap();
    std::fs::write(dir.path().join("tmp/999-gone-0.tmp"), b"half a blob").unwrap();
    let _t2 = open(dir.path());
    assert!(!dir.path().join("tmp/999-gone-0.tmp").exists());
}

#[test]
fn store_file_version_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path(), opts()).unwrap();
    std::fs::write(
        dir.path().join("store.json"),
        br#"{"format":"memento-store","version":7}"#,
    )
    .unwrap();
    let err = Store::open(dir.path(), opts()).unwrap_err();
    assert!(
        err.to_string()
            .contains("store layout version 7 (this build reads 1 and 2)"),
        "{err}"
    );
}

#[test]
fn export_import_round_trip_dedupes_and_verifies() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let src = open(src_dir.path());
    let state = noise(5, 1 << 20);
    let (id, chunks) = commit_canonical(&src, "j", &state);
    let mut archive = Vec::new();
    let mut calls = 0;
    let summary = src
        .export(&id, &mut archive, "mem", &mut |p| {
            calls += 1;
            assert!(p.done_bytes <= p.total_bytes.unwrap());
        })
        .unwrap();
    assert_eq!(summary.archive_bytes, archive.len() as u64);
    assert!(calls >= chunks.len());

    let dst = open(dst_dir.path());
    commit_canonical(&dst, "j", b"something else first");
    let imported = dst
        .import(&mut archive.as_slice(), "mem", None, &mut |_| {})
        .unwrap();
    assert_eq!(imported.id.to_string(), "j-000002");
    assert_eq!(imported.blobs_new, chunks.len());
    let m = dst.get(&imported.id).unwrap();
    assert_eq!(m.trigger, Trigger::Import);
    assert_eq!(m.extra["imported_from"]["id"], "j-000001");
    assert_eq!(
        dst.read_chunks(&imported.id, &TaskKey::new("op", 0), &chunks)
            .unwrap(),
        state
    );
    // Importing again writes no blob.
    let again = dst
        .import(&mut archive.as_slice(), "mem", None, &mut |_| {})
        .unwrap();
    assert_eq!(again.blobs_new, 0);

    // Damage: truncated, flipped byte, wrong magic.
    let err = dst
        .import(&mut &archive[..archive.len() - 10], "cut.arc", None, &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().starts_with("archive cut.arc: truncated"), "{err}");
    let mut flipped = archive.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 1;
    let err = dst
        .import(&mut flipped.as_slice(), "bad.arc", None, &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().starts_with("archive bad.arc: "), "{err}");
    let err = dst
        .import(&mut &b"hello world, not an archive"[..], "x", None, &mut |_| {})
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "archive x: not a memento snapshot archive (bad magic)"
    );
    assert_eq!(
        dst.list(&ListFilter::all()).unwrap().len(),
        3,
        "no snapshot from bad archives"
    );
}

#[test]
fn blob_writer_is_usable_from_many_threads() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let mut w = t.begin(&job("j"), 1).unwrap();
    let bw = w.blob_writer();
    let refs: Vec<Vec<ChunkRef>> = std::thread::scope(|s| {
        (0..4u64)
            .map(|i| {
                let bw = bw.clone();
                s.spawn(move || bw.put_chunks_fixed(&noise(i, 1 << 20), 128 * 1024).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    });
    let mut m = w.manifest(SnapshotKind::Checkpoint, Trigger::Periodic, StateFormat::Native);
    for (i, chunks) in refs.iter().enumerate() {
        m.tasks.push(TaskState {
            key: TaskKey::new("op", i as u32),
            state: TaskStateData::Native {
                memories: vec![MemoryImage {
                    index: 0,
                    size: 1 << 20,
                    chunk_size: 128 * 1024,
                    chunks: chunks.clone(),
                    new_chunks: None,
                    base_size: None,
                    deltas: Vec::new(),
                }],
                extra: serde_json::Value::Null,
            },
        });
    }
    let id = w.put_chunk(b"x").and_then(|_| w.commit(m)).unwrap();
    assert!(bw.put_chunk(b"late").is_err(), "puts after commit fail");
    for (i, chunks) in refs.iter().enumerate() {
        let back = t.read_chunks(&id, &TaskKey::new("op", i as u32), chunks).unwrap();
        assert_eq!(back, noise(i as u64, 1 << 20));
    }
}

#[test]
fn gc_concurrent_with_writers_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let committed: Mutex<Vec<(SnapshotId, Vec<ChunkRef>, u64)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for w in 0..3u64 {
            let (t, committed) = (&t, &committed);
            s.spawn(move || {
                let j = job(&format!("job{w}"));
                for i in 0..25u64 {
                    let seed = w * 1000 + i;
                    // Half the state repeats across snapshots (dedup against
                    // blobs that GC sees as candidates), half is new.
                    let mut state = noise(w, 300_000);
                    state.extend(noise(seed, 100_000));
                    let n = t.next_snapshot_number(&j).unwrap();
                    let mut wr = t.begin(&j, n).unwrap();
                    let chunks = wr.put_chunks_fixed(&state, 64 * 1024).unwrap();
                    let mut m = wr.manifest(SnapshotKind::Checkpoint, Trigger::Periodic, StateFormat::Native);
                    m.tasks.push(TaskState {
                        key: TaskKey::new("op", 0),
                        state: TaskStateData::Native {
                            memories: vec![MemoryImage {
                                index: 0,
                                size: state.len() as u64,
                                chunk_size: 64 * 1024,
                                chunks: chunks.clone(),
                                new_chunks: None,
                                base_size: None,
                                deltas: Vec::new(),
                            }],
                            extra: serde_json::Value::Null,
                        },
                    });
                    let id = wr.commit(m).unwrap();
                    // Keep only every other snapshot: deleted ones give GC work.
                    if i % 2 == 0 {
                        t.delete(&id).unwrap();
                    } else {
                        committed.lock().unwrap().push((id, chunks, seed));
                    }
                }
            });
        }
        s.spawn(|| {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || runs < 3 {
                t.gc().unwrap();
                runs += 1;
            }
        });
        // Writers are the first three spawns; stop GC once they are done.
        while committed.lock().unwrap().len() < 3 * 12 {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    t.gc().unwrap();
    let committed = committed.into_inner().unwrap();
    assert_eq!(committed.len(), 36);
    for (id, chunks, seed) in committed {
        let w = seed / 1000;
        let mut state = noise(w, 300_000);
        state.extend(noise(seed, 100_000));
        let back = t.read_chunks(&id, &TaskKey::new("op", 0), &chunks).unwrap();
        assert!(back == state, "{id} differs");
    }
    assert!(t.fsck().unwrap().is_clean());
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Store>();
    check::<TenantStore>();
    check::<BlobWriter>();
    fn send<T: Send>() {}
    send::<SnapshotWriter>();
}

/// Reading into place: raw blobs go straight into the caller's buffer,
/// compressed ones through a buffer, zero chunks are left alone when asked,
/// and a truncated raw blob is caught by its length.
#[test]
fn read_chunks_into_fills_place_and_checks_every_blob() {
    let dir = tempfile::tempdir().unwrap();
    let zstd = StoreOptions {
        compression: Compression::Zstd { level: 1 },
        ..opts()
    };
    let t_raw = open(dir.path());
    let t_zstd = Store::open(dir.path(), zstd).unwrap().tenant("t2").unwrap();
    // Compressible text, a zero stretch, noise.
    let mut state = b"memento ".repeat(40_000);
    state.extend(vec![0u8; 3 << 20]);
    state.extend(noise(3, 200_000));
    for t in [&t_raw, &t_zstd] {
        let (id, chunks) = commit_canonical(t, "j", &state);
        assert!(chunks.iter().any(|c| c.blob().is_none()), "a zero chunk");
        let mut out = vec![0xAAu8; state.len()];
        t.read_chunks_into(&id, &TaskKey::new("op", 0), &chunks, &mut out, true)
            .unwrap();
        assert!(out == state);
        // Without zero filling, zero chunks keep what was there.
        let mut out = vec![0xAAu8; state.len()];
        t.read_chunks_into(&id, &TaskKey::new("op", 0), &chunks, &mut out, false)
            .unwrap();
        let (mut offset, mut kept) = (0, 0);
        for c in &chunks {
            let piece = &out[offset..offset + c.len() as usize];
            if c.blob().is_none() {
                assert!(piece.iter().all(|b| *b == 0xAA));
                kept += 1;
            } else {
                assert!(piece == &state[offset..offset + c.len() as usize]);
            }
            offset += c.len() as usize;
        }
        assert!(kept > 0);
    }
    // A raw blob cut short is reported, not read as a shorter chunk.
    let (id, chunks) = commit_canonical(&t_raw, "k", &noise(4, 100_000));
    let victim = on_disk(dir.path(), "t1", chunks[0].blob().unwrap());
    let bytes = std::fs::read(&victim.file).unwrap();
    std::fs::write(&victim.file, &bytes[..(victim.offset + victim.len - 10) as usize]).unwrap();
    let err = t_raw
        .read_chunks(&id, &TaskKey::new("op", 0), &chunks)
        .unwrap_err();
    assert!(err.to_string().contains("chunk 0 (blob"), "{err}");
}

/// Exports write through temporary files of their own: two at once beside
/// each other (`x.a`, `x.b`: both were written through `x.partial`) each
/// produce the archive of their own snapshot, and an unrelated `x.partial`
/// is left alone (it was truncated, then deleted on error).
#[test]
fn concurrent_exports_share_nothing_and_touch_no_other_file() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(&dir.path().join("store"));
    let states: Vec<Vec<u8>> = (0..2).map(|i| noise(40 + i, 300_000)).collect();
    let ids: Vec<SnapshotId> = states.iter().map(|s| commit_canonical(&t, "j", s).0).collect();
    let bystander = dir.path().join("x.partial");
    std::fs::write(&bystander, b"not ours").unwrap();
    for _round in 0..3 {
        let files = [dir.path().join("x.a"), dir.path().join("x.b")];
        std::thread::scope(|s| {
            for (id, file) in ids.iter().zip(&files) {
                let t = t.clone();
                s.spawn(move || t.export_to_file(id, file, &mut |_| {}).unwrap());
            }
        });
        let other = open(&dir.path().join("other"));
        for (state, file) in states.iter().zip(&files) {
            let summary = other.import_file(file, &mut |_| {}).unwrap();
            let m = other.latest(&job("j")).unwrap().unwrap();
            let TaskStateData::Canonical { chunks, .. } = &m.tasks[0].state else {
                panic!("canonical")
            };
            let bytes = other.read_chunks(&m.id, &TaskKey::new("op", 0), chunks).unwrap();
            assert!(
                &bytes == state,
                "{} holds another snapshot ({summary:?})",
                file.display()
            );
            std::fs::remove_file(file).unwrap();
        }
        assert_eq!(std::fs::read(&bystander).unwrap(), b"not ours");
    }
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial") && n != "x.partial")
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    // The target is never overwritten.
    std::fs::write(dir.path().join("x.a"), b"mine").unwrap();
    let e = t
        .export_to_file(&ids[0], &dir.path().join("x.a"), &mut |_| {})
        .unwrap_err();
    assert!(
        e.to_string().contains("already exists; not overwriting it"),
        "{e}"
    );
    assert_eq!(std::fs::read(dir.path().join("x.a")).unwrap(), b"mine");
}

/// Replaces `path` by a FIFO: opening it for reading blocks until a writer
/// comes, which nobody will.
fn plant_fifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    std::fs::remove_file(path).unwrap();
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Runs `f` on a thread and fails the test if it has not returned in 30 s.
fn within_30s<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()));
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("{what} hangs"))
}

/// A FIFO where a manifest or a blob belongs is refused as "not a regular
/// file": get, list, latest, fsck, gc and reads answer instead of hanging.
#[test]
fn fifos_in_the_store_are_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    commit_canonical(&t, "j", b"one");
    let (two, _) = commit_canonical(&t, "j", b"two");
    let (three, chunks) = commit_canonical(&t, "k", &noise(9, 100_000));
    plant_fifo(&dir.path().join("tenants/t1/snapshots/j/j-000002.json"));
    let pack = on_disk(dir.path(), "t1", chunks[0].blob().unwrap()).file;
    plant_fifo(&pack);

    let t2 = t.clone();
    let e = within_30s("get", move || t2.get(&two).unwrap_err().to_string());
    assert!(e.contains("not a regular file"), "{e}");
    let t2 = t.clone();
    let latest = within_30s("latest", move || t2.latest(&JobName::new("j").unwrap()).unwrap());
    assert_eq!(
        latest.unwrap().number,
        1,
        "the older one, as for any damaged manifest"
    );
    let t2 = t.clone();
    let e = within_30s("read", move || {
        t2.read_chunks(&three, &TaskKey::new("op", 0), &chunks)
            .unwrap_err()
            .to_string()
    });
    assert!(e.contains("not a regular file"), "{e}");
    let t2 = t.clone();
    let report = within_30s("fsck", move || t2.fsck().unwrap());
    assert_eq!(report.damaged.len(), 2, "{report:?}");
    let t2 = t.clone();
    let e = within_30s("gc", move || t2.gc().unwrap_err().to_string());
    assert!(e.contains("j-000002"), "{e}");
}

/// A store whose handles are all dropped is freed, its owner lock with it,
/// even after it handed out a tenant (the tenant cache held its tenants
/// strongly and they held the store: an embedder opening stores again and
/// again kept every one of them, and its lock file, for ever). A freed
/// handle removes its own owner file; a new one makes none until it writes.
#[test]
fn a_dropped_store_releases_its_owner_lock() {
    let dir = tempfile::tempdir().unwrap();
    let owners = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir.join("tmp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".owner"))
            .collect()
    };
    let first = {
        let tenant = open(dir.path());
        commit_canonical(&tenant, "j", b"state");
        owners(dir.path())
    };
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(
        owners(dir.path()).is_empty(),
        "the first handle's lock was released"
    );
    let again = open(dir.path());
    assert!(
        owners(dir.path()).is_empty(),
        "a handle that has not written owns nothing"
    );
    commit_canonical(&again, "j", b"state 2");
    assert_eq!(owners(dir.path()).len(), 1);
    drop(again);
    assert!(owners(dir.path()).is_empty());
}
