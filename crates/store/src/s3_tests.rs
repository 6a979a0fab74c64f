//! The store against a real S3-protocol server: `moto` on loopback,
//! started here (or the one `MEMENTO_TEST_S3_ENDPOINT` names, as
//! `.ci/run` provides). These tests fail, never skip, when neither is
//! there: object storage support is not tested by not testing it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::*;

/// The endpoint of the test server, started once per test process.
fn endpoint() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT.get_or_init(|| {
        if let Ok(e) = std::env::var("MEMENTO_TEST_S3_ENDPOINT") {
            return e;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Spawned from a thread that lives as long as the process, with a
        // parent-death signal, so the server never outlives the tests.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::os::unix::process::CommandExt;
            let mut cmd = std::process::Command::new("moto_server");
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            // SAFETY: prctl is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn();
            let ok = child.is_ok();
            tx.send(child.map(|_| ()).map_err(|e| e.to_string())).unwrap();
            if ok {
                loop {
                    std::thread::park();
                }
            }
        });
        if let Err(e) = rx.recv().unwrap() {
            panic!(
                "cannot start moto_server ({e}): install it with `pip install 'moto[server]'` \
                 or set MEMENTO_TEST_S3_ENDPOINT"
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        format!("http://127.0.0.1:{port}")
    })
}

/// Creates a bucket with a plain HTTP request (object_store creates none).
fn create_bucket(name: &str) {
    let ep = endpoint();
    let host = ep.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).unwrap();
    write!(
        s,
        "PUT /{name} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "create bucket {name}: {answer}"
    );
}

fn s3_options(ttl: Duration) -> S3Options {
    S3Options {
        lock_ttl: ttl,
        config: vec![
            ("aws_endpoint".into(), endpoint().into()),
            ("aws_allow_http".into(), "true".into()),
            ("aws_access_key_id".into(), "test".into()),
            ("aws_secret_access_key".into(), "test".into()),
            ("aws_region".into(), "us-east-1".into()),
        ],
        ..Default::default()
    }
}

/// A fresh bucket for one test.
fn bucket() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!("t{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    create_bucket(&name);
    name
}

fn opts() -> StoreOptions {
    StoreOptions {
        pack_size: 1 << 20,
        ..Default::default()
    }
}

fn open_store(bucket: &str, ttl: Duration) -> (Store, std::sync::Arc<S3Backend>) {
    open_store_with(bucket, s3_options(ttl))
}

/// GC grace of the tests that wait it out: long enough for a 1 MiB
/// request on a loaded machine (requests get a quarter of it).
const GRACE: Duration = Duration::from_secs(6);

fn open_store_with(bucket: &str, o: S3Options) -> (Store, std::sync::Arc<S3Backend>) {
    let backend = std::sync::Arc::new(S3Backend::open(bucket, "state/x", o).unwrap());
    let store = Store::with_backend(backend.clone(), opts(), &format!("s3://{bucket}/state/x")).unwrap();
    (store, backend)
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

fn job(name: &str) -> JobName {
    JobName::new(name).unwrap()
}

fn commit(t: &TenantStore, j: &JobName, state: &[u8]) -> Result<(SnapshotId, Vec<ChunkRef>), StoreError> {
    let n = t.next_snapshot_number(j)?;
    let mut w = t.begin(j, n)?;
    let chunks = w.put_chunks_cdc(state)?;
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
    Ok((w.commit(m)?, chunks))
}

#[test]
fn snapshots_commit_list_read_back_and_survive_reopening() {
    let b = bucket();
    let (store, backend) = open_store(&b, Duration::from_secs(5));
    let t = store.tenant("acme").unwrap();
    let j = job("wc");
    let first = noise(1, 3 << 20);
    let (id1, chunks1) = commit(&t, &j, &first).unwrap();
    let mut second = first.clone();
    second[100] ^= 1;
    let before = backend.request_counts();
    let (id2, chunks2) = commit(&t, &j, &second).unwrap();
    let after = backend.request_counts();
    assert!(id2.number() > id1.number());
    // Only the changed chunk is new: one small pack, one index, one manifest.
    assert!(after.puts - before.puts < 20, "{before:?} -> {after:?}");
    drop((t, store, backend));

    let (store, _) = open_store(&b, Duration::from_secs(5));
    let t = store.tenant("acme").unwrap();
    assert_eq!(t.latest(&j).unwrap().unwrap().id, id2);
    assert_eq!(t.list(&ListFilter::job(&j)).unwrap().len(), 2);
    assert_eq!(
        t.read_chunks(&id1, &TaskKey::new("op", 0), &chunks1).unwrap(),
        first
    );
    assert_eq!(
        t.read_chunks(&id2, &TaskKey::new("op", 0), &chunks2).unwrap(),
        second
    );
    assert_eq!(store.tenants().unwrap(), vec![TenantName::new("acme").unwrap()]);
    let report = t.fsck().unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[test]
fn gc_deletes_what_no_manifest_references_and_fsck_stays_clean() {
    let b = bucket();
    let (store, _) = open_store_with(
        &b,
        S3Options {
            gc_grace: GRACE,
            ..s3_options(Duration::from_secs(5))
        },
    );
    let t = store.tenant("t").unwrap();
    let j = job("g");
    let (old, _) = commit(&t, &j, &noise(7, 2 << 20)).unwrap();
    let (keep, chunks) = commit(&t, &j, &noise(8, 2 << 20)).unwrap();
    t.delete(&old).unwrap();
    // The first GC condemns, a GC after the grace period deletes.
    let report = t.gc().unwrap();
    assert_eq!(report.blobs_removed, 0, "{report:?}");
    assert!(t.fsck().unwrap().is_clean());
    let report = t.gc().unwrap();
    assert_eq!(report.blobs_removed, 0, "within the grace period: {report:?}");
    std::thread::sleep(GRACE + Duration::from_secs(2));
    let report = t.gc().unwrap();
    assert!(report.blobs_removed > 0 && report.bytes_freed > 0, "{report:?}");
    assert_eq!(
        t.read_chunks(&keep, &TaskKey::new("op", 0), &chunks).unwrap(),
        noise(8, 2 << 20)
    );
    assert!(t.fsck().unwrap().is_clean());
}

#[test]
fn export_import_and_quota_work_on_object_storage() {
    let b = bucket();
    let (store, _) = open_store(&b, Duration::from_secs(5));
    let t = store.tenant("src").unwrap();
    let j = job("e");
    let state = noise(3, 1 << 20);
    let (id, _) = commit(&t, &j, &state).unwrap();
    let mut archive = Vec::new();
    t.export(&id, &mut archive, "a", &mut |_| {}).unwrap();
    let dst = store.tenant("dst").unwrap();
    let imported = dst
        .import(&mut archive.as_slice(), "a", None, &mut |_| {})
        .unwrap()
        .id;
    let m = dst.get(&imported).unwrap();
    let TaskStateData::Canonical { chunks, .. } = &m.tasks[0].state else {
        panic!("canonical")
    };
    assert_eq!(
        dst.read_chunks(&imported, &TaskKey::new("op", 0), chunks)
            .unwrap(),
        state
    );

    let small = Store::with_backend(
        std::sync::Arc::new(S3Backend::open(&b, "quota", s3_options(Duration::from_secs(5))).unwrap()),
        StoreOptions {
            quota_bytes: Some(100_000),
            ..opts()
        },
        "quota",
    )
    .unwrap();
    let err = commit(&small.tenant("q").unwrap(), &j, &noise(4, 1 << 20)).unwrap_err();
    assert!(matches!(err, StoreError::QuotaExceeded { .. }), "{err}");
    assert!(small.tenant("q").unwrap().latest(&j).unwrap().is_none());
}

#[test]
fn two_writers_of_one_number_commit_once() {
    let b = bucket();
    let (s1, _) = open_store(&b, Duration::from_secs(5));
    let (s2, _) = open_store(&b, Duration::from_secs(5));
    let (t1, t2) = (s1.tenant("t").unwrap(), s2.tenant("t").unwrap());
    let j = job("race");
    let n = t1.next_snapshot_number(&j).unwrap();
    let w1 = t1.begin(&j, n).unwrap();
    let w2 = t2.begin(&j, n).unwrap();
    let m1 = w1.manifest(
        SnapshotKind::Checkpoint,
        Trigger::Periodic,
        StateFormat::Canonical,
    );
    let m2 = w2.manifest(
        SnapshotKind::Checkpoint,
        Trigger::Periodic,
        StateFormat::Canonical,
    );
    w1.commit(m1).unwrap();
    let err = w2.commit(m2).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
}

#[test]
fn lock_objects_exclude_and_a_dead_holders_lock_goes_stale() {
    let b = bucket();
    let ttl = Duration::from_millis(600);
    let a = S3Backend::open(&b, "locks", s3_options(ttl)).unwrap();
    let c = S3Backend::open(&b, "locks", s3_options(ttl)).unwrap();
    let shared = a.lock("l/w", LockMode::Shared, None).unwrap().unwrap();
    let none = c
        .lock("l/w", LockMode::Exclusive, Some(Duration::from_millis(100)))
        .unwrap();
    assert!(none.is_none(), "a shared holder keeps an exclusive one out");
    let shared2 = c
        .lock("l/w", LockMode::Shared, Some(Duration::from_millis(500)))
        .unwrap();
    assert!(shared2.is_some(), "shared holders coexist");
    drop((shared, shared2));
    let excl = a
        .lock("l/w", LockMode::Exclusive, Some(Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    // Held and renewed: still held well past its ttl.
    std::thread::sleep(ttl * 2);
    assert!(
        c.lock("l/w", LockMode::Shared, Some(Duration::from_millis(200)))
            .unwrap()
            .is_none()
    );
    drop(excl);
    assert!(
        c.lock("l/w", LockMode::Exclusive, Some(Duration::from_secs(2)))
            .unwrap()
            .is_some()
    );

    // A holder that dies without releasing: its object stops changing and
    // is taken over after one ttl.
    // (A killed process leaves exactly this: its last write of the object.)
    let body = br#"{"holder":"1-dead","ttl_ms":600,"seq":7}"#;
    assert!(a.put("l/dead", body, PutMode::NoReplace, true).unwrap());
    let start = Instant::now();
    let taken = c
        .lock("l/dead", LockMode::Exclusive, Some(Duration::from_secs(10)))
        .unwrap();
    assert!(taken.is_some());
    assert!(
        start.elapsed() >= ttl,
        "taken before it was stale: {:?}",
        start.elapsed()
    );
}

#[test]
fn a_paused_lease_holder_cannot_commit_after_its_successor_took_over() {
    let b = bucket();
    let ttl = Duration::from_millis(900);
    let (old_store, _) = open_store(&b, ttl);
    let (new_store, _) = open_store(&b, ttl);
    let (old, new) = (old_store.tenant("t").unwrap(), new_store.tenant("t").unwrap());
    let j = job("fenced");
    commit(&old, &j, &noise(1, 100_000)).unwrap();

    let old_lease = old.lease_series(&j).unwrap().expect("free");
    let (done, _) = commit(&old, &j, &noise(2, 100_000)).unwrap();
    // A live holder is recognised: the successor gives up.
    assert!(new.lease_series(&j).unwrap().is_none());

    // The old holder takes a number and writes, then "pauses": no more
    // renewals, as if SIGSTOPped.
    let n = old.next_snapshot_number(&j).unwrap();
    let mut w = old.begin(&j, n).unwrap();
    let state = noise(3, 100_000);
    let chunks = w.put_chunks_cdc(&state).unwrap();
    let mut m = w.manifest(
        SnapshotKind::Checkpoint,
        Trigger::Periodic,
        StateFormat::Canonical,
    );
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical {
            len: state.len() as u64,
            chunks,
        },
    });
    old_lease.pause_renewals();

    let start = Instant::now();
    let new_lease = new
        .lease_series_wait(&j, Duration::from_secs(10))
        .unwrap()
        .expect("taken over");
    assert!(start.elapsed() >= ttl);
    // The successor resumes from the old holder's last commit.
    assert_eq!(new.latest(&j).unwrap().unwrap().id, done);

    // The old holder "resumes": its commit is refused by the void at its
    // manifest key, whatever its own view of the lease.
    let err = w.commit(m).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert!(
        new.get(&SnapshotId::new(j.clone(), n))
            .unwrap_err()
            .is_not_found()
    );
    // Its next number is refused by the lease's conditional write.
    let err = old.next_snapshot_number(&j).unwrap_err();
    assert!(matches!(err, StoreError::LeaseLost { .. }), "{err}");
    assert!(old_lease.is_lost());

    let (latest, _) = commit(&new, &j, &noise(4, 100_000)).unwrap();
    assert!(latest.number() > n);
    assert_eq!(new.latest(&j).unwrap().unwrap().id, latest);
    assert!(new.fsck().unwrap().is_clean());
    drop(new_lease);
    // Released: the next run takes it at once.
    assert!(
        old_store
            .tenant("t")
            .unwrap()
            .lease_series(&job("other"))
            .unwrap()
            .is_some()
    );
}

#[test]
fn unreachable_endpoint_and_missing_bucket_are_one_line_errors() {
    let mut o = s3_options(Duration::from_secs(5));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    o.config[0].1 = format!("http://127.0.0.1:{port}");
    o.max_retries = 0;
    let e = S3Backend::open("nobucket", "p", o).unwrap_err().to_string();
    assert!(e.starts_with("s3://nobucket/p: open"), "{e}");
    assert!(e.contains("unreachable"), "{e}");
    assert!(!e.contains('\n'));

    let e = S3Backend::open("no-such-bucket-here", "", s3_options(Duration::from_secs(5)))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("s3://no-such-bucket-here: open"), "{e}");
    assert!(e.contains("bucket does not exist"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn large_objects_go_up_in_parts_and_read_back() {
    let b = bucket();
    let backend = S3Backend::open(&b, "big", s3_options(Duration::from_secs(5))).unwrap();
    let data = noise(9, 30 << 20);
    let mut app = backend.stage_append().unwrap();
    for piece in data.chunks(1 << 20) {
        app.append(piece).unwrap();
    }
    let staged = app.finish(true).unwrap();
    backend.publish(&[(staged, "packs/one".into())], true).unwrap();
    assert_eq!(backend.size("packs/one").unwrap(), Some(data.len() as u64));
    let mut mid = vec![0; 1000];
    backend.read_at("packs/one", 20 << 20, &mut mid).unwrap();
    assert_eq!(mid, data[20 << 20..(20 << 20) + 1000]);
    assert_eq!(backend.read("packs/one").unwrap(), data);
    let counts = backend.request_counts();
    assert!(counts.puts >= 4 + 2, "multipart: {counts:?}");
}

/// A checkpoint as the coordinator makes one: a number, a writer, a
/// memory image of fixed chunks (unchanged ones found in the index), the
/// manifest.
fn checkpoint_image(t: &TenantStore, j: &JobName, image: &[u8]) -> Result<SnapshotId, StoreError> {
    let n = t.next_snapshot_number(j)?;
    let mut w = t.begin(j, n)?;
    let chunks = w.put_chunks_fixed(image, 256 << 10)?;
    let mut m = w.manifest(
        SnapshotKind::Checkpoint,
        Trigger::Periodic,
        StateFormat::Canonical,
    );
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical {
            len: image.len() as u64,
            chunks,
        },
    });
    w.commit(m)
}

fn total(c: RequestCounts) -> u64 {
    c.puts + c.gets + c.lists + c.deletes
}

#[test]
fn an_incremental_checkpoint_makes_at_most_three_requests_per_task() {
    let b = bucket();
    // A long ttl: no renewal of the lease falls into a measured checkpoint.
    let (store, backend) = open_store(&b, Duration::from_secs(120));
    let t = store.tenant("acme").unwrap();
    let j = job("inc");
    let lease = t.lease_series(&j).unwrap().expect("free");
    let mut image = noise(11, 4 << 20);
    checkpoint_image(&t, &j, &image).unwrap();
    let mut last = None;
    for round in 0..6 {
        // 1 of 16 chunks changed.
        image[round * 700_000] ^= 0x5a;
        let before = backend.request_counts();
        let id = checkpoint_image(&t, &j, &image).unwrap();
        let after = backend.request_counts();
        let made = RequestCounts {
            puts: after.puts - before.puts,
            gets: after.gets - before.gets,
            lists: after.lists - before.lists,
            deletes: after.deletes - before.deletes,
        };
        // The lease (the number), the pack (with its index), the manifest.
        assert!(
            total(made) <= 3,
            "incremental checkpoint {round} of one task made {made:?}"
        );
        eprintln!("incremental checkpoint {round}: {made:?}");
        // Retention as the coordinator runs it after a checkpoint: one
        // LIST (manifests read before are kept), and a HEAD and a DELETE
        // for the one snapshot it expires.
        let before = backend.request_counts();
        for old in t.expired(&j, SnapshotKind::Checkpoint, Some(3), None, 0).unwrap() {
            t.delete(&old).unwrap();
        }
        let retention = total(backend.request_counts()) - total(before);
        assert!(
            retention <= 3,
            "retention after checkpoint {round}: {retention} requests"
        );
        last = Some(id);
    }
    drop(lease);
    // All of it reads back, from another handle that knows nothing cached.
    let (store2, _) = open_store(&b, Duration::from_secs(120));
    let t2 = store2.tenant("acme").unwrap();
    let latest = t2.latest(&j).unwrap().unwrap();
    assert_eq!(Some(latest.id.clone()), last);
    let TaskStateData::Canonical { chunks, .. } = &latest.tasks[0].state else {
        panic!("canonical")
    };
    assert_eq!(
        t2.read_chunks(&latest.id, &TaskKey::new("op", 0), chunks)
            .unwrap(),
        image
    );
    assert!(t2.fsck().unwrap().is_clean(), "{:?}", t2.fsck().unwrap());
    // The released lease left the counter above every number it gave.
    let n = t2.next_snapshot_number(&j).unwrap();
    assert!(n > latest.id.number());
}

#[test]
fn gc_on_object_storage_never_sweeps_what_a_writer_relies_on() {
    let b = bucket();
    let o = || S3Options {
        gc_grace: GRACE,
        ..s3_options(Duration::from_secs(5))
    };
    let (store, _) = open_store_with(&b, o());
    let (gc_store, _) = open_store_with(&b, o());
    let t = store.tenant("t").unwrap();
    let g = gc_store.tenant("t").unwrap();
    let j = job("w");
    let dead = noise(21, 1 << 20);
    let (old, _) = commit(&t, &j, &dead).unwrap();
    t.delete(&old).unwrap();

    // A writer whose view predates the condemnation references the dead
    // blobs without storing them again, and commits after it.
    let n = t.next_snapshot_number(&j).unwrap();
    let mut w = t.begin(&j, n).unwrap();
    let chunks = w.put_chunks_cdc(&dead).unwrap();
    let report = g.gc().unwrap();
    assert_eq!(report.packs_removed, 0, "{report:?}");
    let mut m = w.manifest(
        SnapshotKind::Checkpoint,
        Trigger::Periodic,
        StateFormat::Canonical,
    );
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical {
            len: dead.len() as u64,
            chunks: chunks.clone(),
        },
    });
    let revived = w.commit(m).unwrap();
    assert_eq!(t.get(&revived).unwrap().figures.new_bytes, 0, "deduplicated");

    // A writer whose view is newer than the condemnation does not rely on
    // the condemned pack: it stores the blobs again.
    std::thread::sleep(GRACE / 4);
    let n = t.next_snapshot_number(&j).unwrap();
    let w2 = t.begin(&j, n).unwrap();
    let first = &dead[..chunks[0].len() as usize];
    let (_, stored) = w2.blob_writer().store_chunk(first).unwrap();
    assert!(stored, "a blob in a condemned pack was deduplicated against");
    drop(w2);

    // A writer that outlives half the grace period after a GC condemned
    // what it references is refused, not committed over a deleted pack.
    let (other, _) = commit(&t, &job("x"), &noise(22, 300_000)).unwrap();
    t.delete(&other).unwrap();
    std::thread::sleep(GRACE + Duration::from_secs(2));
    let n = t.next_snapshot_number(&j).unwrap();
    let mut slow = t.begin(&j, n).unwrap();
    let slow_chunks = slow.put_chunks_cdc(&noise(22, 300_000)).unwrap();
    // This GC sweeps what the first condemned (keeping the pack the
    // writer revived) and condemns the other job's pack, which the slow
    // writer found in its view.
    let report = g.gc().unwrap();
    assert_eq!(report.packs_removed, 0, "{report:?}");
    assert_eq!(
        t.read_chunks(&revived, &TaskKey::new("op", 0), &chunks).unwrap(),
        dead
    );
    std::thread::sleep(GRACE / 2);
    let mut m = slow.manifest(
        SnapshotKind::Checkpoint,
        Trigger::Periodic,
        StateFormat::Canonical,
    );
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical {
            len: 300_000,
            chunks: slow_chunks,
        },
    });
    let err = slow.commit(m).unwrap_err();
    assert!(err.to_string().contains("grace period"), "{err}");
    assert!(g.fsck().unwrap().is_clean(), "{:?}", g.fsck().unwrap());
}

#[test]
fn gc_running_beside_a_writer_on_object_storage_keeps_every_snapshot_readable() {
    let b = bucket();
    let o = || S3Options {
        gc_grace: GRACE,
        ..s3_options(Duration::from_secs(5))
    };
    let (store, _) = open_store_with(&b, o());
    let (gc_store, _) = open_store_with(&b, o());
    let t = store.tenant("t").unwrap();
    let g = gc_store.tenant("t").unwrap();
    let j = job("busy");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut removed = 0;
            while !stop.load(Ordering::Relaxed) {
                removed += g.gc().unwrap().packs_removed;
                std::thread::sleep(Duration::from_millis(300));
            }
            removed
        })
    };
    // Each round keeps the newest two snapshots: older ones become garbage
    // while the writer keeps deduplicating against what is left.
    let started = Instant::now();
    let mut kept: Vec<(SnapshotId, Vec<u8>, Vec<ChunkRef>)> = Vec::new();
    let mut round = 0u64;
    while started.elapsed() < GRACE * 3 {
        let state = noise(100 + round % 5, 400_000);
        let (id, chunks) = commit(&t, &j, &state).unwrap();
        kept.push((id, state, chunks));
        if kept.len() > 2 {
            let (old, _, _) = kept.remove(0);
            t.delete(&old).unwrap();
        }
        for (id, state, chunks) in &kept {
            let got = t.read_chunks(id, &TaskKey::new("op", 0), chunks);
            if let Err(e) = &got {
                let (fresh, _) = open_store_with(&b, o());
                let again = fresh
                    .tenant("t")
                    .unwrap()
                    .read_chunks(id, &TaskKey::new("op", 0), chunks);
                eprintln!("DEBUG fresh read: {:?}", again.map(|v| v.len()));
                eprintln!(
                    "DEBUG manifest new_bytes {:?}",
                    t.get(id).map(|m| m.figures.new_bytes)
                );
                panic!("{id} after {round} rounds: {e}");
            }
            assert_eq!(&got.unwrap(), state, "{id} after {round} rounds");
        }
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let removed = collector.join().unwrap();
    assert!(removed > 0, "GC deleted nothing in {round} rounds");
    let (fresh, _) = open_store_with(&b, o());
    let f = fresh.tenant("t").unwrap();
    for (id, state, chunks) in &kept {
        assert_eq!(&f.read_chunks(id, &TaskKey::new("op", 0), chunks).unwrap(), state);
    }
    assert!(f.fsck().unwrap().is_clean(), "{:?}", f.fsck().unwrap());
}

/// Copies every file of a local store into the bucket under `prefix`: a
/// store as a build of the locking protocol wrote it (layout 2, packs of
/// format 1 with index objects, the same keys as in a directory).
fn upload_dir(backend: &S3Backend, root: &std::path::Path, dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let key = path.strip_prefix(root).unwrap().to_str().unwrap().to_string();
        if key.starts_with("tmp") || key.contains("/locks") || key == "reserve" {
            continue;
        }
        if path.is_dir() {
            upload_dir(backend, root, &path);
        } else {
            let bytes = std::fs::read(&path).unwrap();
            assert!(backend.put(&key, &bytes, PutMode::Replace, true).unwrap());
        }
    }
}

#[test]
fn a_store_of_the_locking_protocol_opens_reads_and_is_raised_to_layout_3() {
    let dir = tempfile::tempdir().unwrap();
    let j = job("old");
    let state = noise(31, 2 << 20);
    let (old_id, old_chunks) = {
        let local = Store::open(dir.path(), opts()).unwrap();
        commit(&local.tenant("t").unwrap(), &j, &state).unwrap()
    };
    let b = bucket();
    let o = S3Options {
        gc_grace: GRACE,
        ..s3_options(Duration::from_secs(5))
    };
    let raw = S3Backend::open(&b, "state/x", o.clone()).unwrap();
    upload_dir(&raw, dir.path(), dir.path());
    assert!(
        raw.read("store.json")
            .unwrap()
            .windows(11)
            .any(|w| w == b"\"version\": ")
    );

    let (store, _) = open_store_with(&b, o.clone());
    assert_eq!(store.layout_version(), 2);
    let t = store.tenant("t").unwrap();
    assert_eq!(
        t.read_chunks(&old_id, &TaskKey::new("op", 0), &old_chunks)
            .unwrap(),
        state
    );
    assert!(t.fsck().unwrap().is_clean(), "{:?}", t.fsck().unwrap());
    // A write raises the layout, so builds of the locking protocol refuse
    // the store from then on; unchanged chunks are found in the old pack.
    let mut next = state.clone();
    next[10] ^= 1;
    let (new_id, new_chunks) = commit(&t, &j, &next).unwrap();
    assert!(t.get(&new_id).unwrap().figures.new_bytes < state.len() as u64 / 2);
    assert_eq!(store.layout_version(), STORE_VERSION_REMOTE);
    let json: serde_json::Value = serde_json::from_slice(&raw.read("store.json").unwrap()).unwrap();
    assert_eq!(json["version"], 3);
    // A directory refuses that layout in one line naming it.
    let copy = tempfile::tempdir().unwrap();
    std::fs::write(copy.path().join("store.json"), raw.read("store.json").unwrap()).unwrap();
    let err = Store::open(copy.path(), opts()).unwrap_err().to_string();
    assert!(
        err.contains("store layout version 3 (this build reads 1 and 2)"),
        "{err}"
    );
    t.delete(&old_id).unwrap();
    t.gc().unwrap();
    let (fresh, _) = open_store_with(&b, o);
    let f = fresh.tenant("t").unwrap();
    assert_eq!(
        f.read_chunks(&new_id, &TaskKey::new("op", 0), &new_chunks)
            .unwrap(),
        next
    );
    assert!(f.fsck().unwrap().is_clean(), "{:?}", f.fsck().unwrap());
}

/// What the fault proxy answers to PUTs (and completions of uploads):
/// 0 passes everything through.
static FAULT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A loopback HTTP proxy in front of the test server that, while `FAULT`
/// is set, answers every PUT and POST itself with that status and an S3
/// error body: a real fault on the wire (a full bucket, denied access)
/// with the real server behind it for everything else. One request per
/// connection.
fn fault_proxy() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = endpoint().trim_start_matches("http://").to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                let _ = proxy_one(client, &upstream);
            });
        }
    });
    format!("http://{addr}")
}

fn proxy_one(mut client: TcpStream, upstream: &str) -> std::io::Result<()> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let fault = FAULT.load(Ordering::SeqCst);
    let writes = head.starts_with(b"PUT ") || head.starts_with(b"POST ");
    if fault != 0 && writes {
        let (code, reason, text) = match fault {
            403 => ("AccessDenied", "Forbidden", "Access Denied"),
            _ => (
                "QuotaExceeded",
                "Insufficient Storage",
                "The bucket quota is exceeded",
            ),
        };
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{text}</Message></Error>"
        );
        write!(
            client,
            "HTTP/1.1 {fault} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
            xml.len()
        )?;
        return client.flush();
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&head)?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    client.write_all(&answer)?;
    client.flush()
}

#[test]
fn a_full_bucket_and_denied_access_are_one_line_errors_and_lose_nothing() {
    let b = bucket();
    let mut o = s3_options(Duration::from_secs(5));
    o.config[0].1 = fault_proxy();
    o.max_retries = 1;
    let url = format!("s3://{b}/state/x");
    let (store, _) = open_store_with(&b, o.clone());
    let t = store.tenant("t").unwrap();
    let j = job("f");
    let state = noise(41, 1 << 20);
    let (kept, chunks) = commit(&t, &j, &state).unwrap();

    for (fault, reason) in [
        (507, "the bucket is full (quota exceeded)"),
        (403, "access denied"),
    ] {
        FAULT.store(fault, Ordering::SeqCst);
        let err = commit(&t, &j, &noise(42 + u64::from(fault), 1 << 20))
            .unwrap_err()
            .to_string();
        FAULT.store(0, Ordering::SeqCst);
        assert!(err.contains(&format!("{url}: write ")), "{fault}: {err}");
        assert!(err.contains(reason), "{fault}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        // Nothing stored is lost: the last snapshot restores, fsck is
        // clean, and the store takes the next snapshot.
        let (fresh, _) = open_store_with(&b, o.clone());
        let f = fresh.tenant("t").unwrap();
        assert_eq!(f.latest(&j).unwrap().unwrap().id, kept);
        assert_eq!(
            f.read_chunks(&kept, &TaskKey::new("op", 0), &chunks).unwrap(),
            state
        );
        assert!(f.fsck().unwrap().is_clean(), "{:?}", f.fsck().unwrap());
    }
    commit(&t, &j, &noise(43, 1 << 20)).unwrap();
}
