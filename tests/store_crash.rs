//! Crash safety of the snapshot store (layout 2: packs and indexes), for
//! real: a child process writes, deletes and garbage-collects (and
//! repacks) snapshots in a loop and is SIGKILLed at random instants. After
//! every kill the store must open, `fsck` must be clean (every manifest
//! parses, every blob it references is in an intact pack an intact index
//! describes), and every snapshot must read back byte-identical to what was
//! written (the expected bytes are derived from the snapshot number, so the
//! parent can recompute them).
//!
//! The child is this test binary itself, re-executed to run only the ignored
//! test `child_writer`, with the store directory in `MEMENTO_CRASH_DIR`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use memento::store::*;

const DIR_ENV: &str = "MEMENTO_CRASH_DIR";
const CHUNK: usize = 64 * 1024;
const IMAGE_CHUNKS: usize = 24;

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

/// The memory image of snapshot `n`: some chunks zero, some constant, some
/// changing every third snapshot (so snapshots share blobs and GC has both
/// live and dead blobs to tell apart).
fn image(n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(IMAGE_CHUNKS * CHUNK);
    for i in 0..IMAGE_CHUNKS as u64 {
        if (i + n).is_multiple_of(5) {
            out.extend(std::iter::repeat_n(0u8, CHUNK));
        } else if i % 2 == 0 {
            out.extend(noise(i, CHUNK));
        } else {
            out.extend(noise(i * 1_000 + n / 3, CHUNK));
        }
    }
    out
}

/// The canonical state of snapshot `n`: shared bytes with an `n`-dependent
/// insertion in the middle (FastCDC keeps the chunks after it).
fn canonical(n: u64) -> Vec<u8> {
    let mut out = noise(7, 400_000);
    let insert = noise(n, (n % 50) as usize * 100);
    out.splice(200_000..200_000, insert);
    out
}

fn job() -> JobName {
    JobName::new("crashy").unwrap()
}

/// Runs in the child: write snapshots forever (until killed).
#[test]
#[ignore = "child process of sigkill_at_random_instants_leaves_the_store_consistent"]
fn child_writer() {
    let Ok(dir) = std::env::var(DIR_ENV) else {
        return; // run by hand without a parent: nothing to do
    };
    let store = Store::open(Path::new(&dir), StoreOptions::default()).unwrap();
    let t = store.tenant("crash").unwrap();
    let job = job();
    loop {
        let n = t.next_snapshot_number(&job).unwrap();
        let mut w = t.begin(&job, n).unwrap();
        let img = image(n);
        let mem_chunks = w.put_chunks_fixed(&img, CHUNK).unwrap();
        let state = canonical(n);
        let state_chunks = w.put_chunks_cdc(&state).unwrap();
        let kind = if n.is_multiple_of(4) {
            SnapshotKind::Savepoint
        } else {
            SnapshotKind::Checkpoint
        };
        let mut m = w.manifest(kind, Trigger::Periodic, StateFormat::Native);
        m.tasks.push(TaskState {
            key: TaskKey::new("mem", 0),
            state: TaskStateData::Native {
                memories: vec![MemoryImage {
                    index: 0,
                    size: img.len() as u64,
                    chunk_size: CHUNK as u64,
                    chunks: mem_chunks,
                    new_chunks: None,
                    base_size: None,
                    deltas: Vec::new(),
                }],
                extra: serde_json::Value::Null,
            },
        });
        m.tasks.push(TaskState {
            key: TaskKey::new("op", 0),
            state: TaskStateData::Canonical {
                len: state.len() as u64,
                chunks: state_chunks,
            },
        });
        w.commit(m).unwrap();
        // Retention and GC, so kills also land in deletes and sweeps.
        for old in t
            .expired(&job, SnapshotKind::Checkpoint, Some(3), None, 0)
            .unwrap()
        {
            t.delete(&old).unwrap();
        }
        for old in t
            .expired(&job, SnapshotKind::Savepoint, Some(2), None, 0)
            .unwrap()
        {
            t.delete(&old).unwrap();
        }
        if n.is_multiple_of(3) {
            t.gc().unwrap();
        }
    }
}

fn check_snapshot(t: &TenantStore, m: &Manifest) {
    let n = m.number;
    for task in &m.tasks {
        let chunks: Vec<ChunkRef> = task.state.chunks().copied().collect();
        let bytes = t.read_chunks(&m.id, &task.key, &chunks).unwrap();
        let expected = if task.key.operator == "mem" {
            image(n)
        } else {
            canonical(n)
        };
        assert!(bytes == expected, "snapshot {} task {} differs", m.id, task.key);
    }
}

#[test]
fn sigkill_at_random_instants_leaves_the_store_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill schedule seed {seed}");
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let started = Instant::now();
    let mut kills = 0;
    let mut newest_seen = 0;
    let mut last_next = 0;
    while kills < 30 || newest_seen < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "took too long: {kills} kills, newest snapshot {newest_seen}"
        );
        let mut child = Command::new(&exe)
            .args(["--exact", "child_writer", "--nocapture", "--ignored"])
            .env(DIR_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Process start-up takes a few ms; kill anywhere from during start-up
        // to several snapshots in.
        let delay = Duration::from_millis(5 + next() % 300);
        std::thread::sleep(delay);
        if let Ok(Some(status)) = child.try_wait() {
            panic!("child exited by itself ({status}): it must loop until killed");
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        kills += 1;

        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let t = store.tenant("crash").unwrap();
        let report = t.fsck().unwrap();
        assert!(report.is_clean(), "after kill {kills} ({delay:?}): {report:?}");
        assert!(report.stray_files.is_empty(), "{report:?}");
        // Nothing references a missing blob: every snapshot reads back.
        for m in t.list(&ListFilter::all()).unwrap() {
            check_snapshot(&t, &m);
        }
        if let Some(latest) = t.latest(&job()).unwrap() {
            assert!(latest.number >= newest_seen, "snapshots went backwards");
            newest_seen = latest.number;
            // Numbers are never reissued, whatever the kill interrupted.
            let n = t.next_snapshot_number(&job()).unwrap();
            assert!(n > latest.number && n > last_next, "number {n} reissued");
            last_next = n;
        }
    }
    eprintln!(
        "{kills} kills in {:?}, newest snapshot {newest_seen}",
        started.elapsed()
    );
    // It was layout 2 that survived: packs and indexes, no loose blob.
    let store_json = std::fs::read_to_string(dir.path().join("store.json")).unwrap();
    assert!(store_json.contains("\"version\": 2"), "{store_json}");
    let tenant = dir.path().join("tenants/crash");
    assert!(std::fs::read_dir(tenant.join("packs")).unwrap().count() > 0);
    assert!(std::fs::read_dir(tenant.join("index")).unwrap().count() > 0);
    assert!(!tenant.join("blobs").exists());
    // No temporary file of a dead child survives a reopen.
    let _store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
