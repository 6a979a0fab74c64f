//! The snapshot store on S3-compatible object storage (a local `moto`
//! server) beside the same store on the local disk, in the same run: full
//! and incremental checkpoints of a memory image, restore, the requests
//! each costs (PUT, GET, LIST, DELETE: what object storage bills), and
//! failover: a lease holder SIGKILLed, then the job's lease taken over by
//! another process.
//!
//! Run: `cargo bench -p memento --features s3 --bench s3` (sizes in MiB via
//! `MEMENTO_BENCH_SIZES`, default 256; repetitions via `MEMENTO_BENCH_REPS`,
//! default 3; lease ttl via `MEMENTO_BENCH_TTL_MS`, default 2000). Needs
//! `moto_server` on PATH, or an endpoint in `MEMENTO_TEST_S3_ENDPOINT`.
//! Prints Markdown tables for docs/PERFORMANCE.md.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memento::store::*;

mod common;
use common::{MIB, env_list, median, memory_image};

const CHUNK: usize = DEFAULT_FIXED_CHUNK;

fn main() {
    if let Ok(spec) = std::env::var("MEMENTO_BENCH_LEASE_HOLDER") {
        hold_lease(&spec);
    }
    let endpoint = endpoint();
    let sizes = env_list("MEMENTO_BENCH_SIZES", "256");
    let reps = env_list("MEMENTO_BENCH_REPS", "3")[0] as usize;
    let ttl = Duration::from_millis(env_list("MEMENTO_BENCH_TTL_MS", "2000")[0]);
    println!(
        "| state | where | full checkpoint | incremental (1 % of chunks) | restore | requests per incremental (PUT/GET/LIST/DELETE) | limit: one PUT / write of the whole state |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &mib in &sizes {
        let len = mib as usize * MIB;
        let image = memory_image(len, 7);
        let changed = change_one_percent(&image);
        // Local disk.
        let mut local = Vec::new();
        for _ in 0..reps {
            let dir = tempfile::tempdir_in(bench_dir()).unwrap();
            let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
            local.push(one_round(&store, &image, &changed, || (0, 0, 0, 0)));
        }
        let disk_limit = median(
            (0..reps)
                .map(|_| {
                    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
                    let start = Instant::now();
                    let mut f = std::fs::File::create(dir.path().join("x")).unwrap();
                    f.write_all(&image).unwrap();
                    f.sync_all().unwrap();
                    start.elapsed()
                })
                .collect(),
        );
        print_row(mib, "local disk", &local, None, disk_limit);

        let mut remote = Vec::new();
        let mut counts = Vec::new();
        let mut put_limit = Vec::new();
        for _ in 0..reps {
            let bucket = create_bucket(&endpoint);
            // A lease ttl long enough that no renewal falls into the
            // incremental checkpoint whose requests are counted.
            let options = s3_options(&endpoint, Duration::from_secs(120));
            let backend = Arc::new(S3Backend::open(&bucket, "bench", options).unwrap());
            let b = backend.clone();
            let store = Store::with_backend(backend.clone(), StoreOptions::default(), "bench").unwrap();
            let counter = move || {
                let c = b.request_counts();
                (c.puts, c.gets, c.lists, c.deletes)
            };
            let round = one_round(&store, &image, &changed, counter);
            counts.push(round.3);
            remote.push(round);
            let start = Instant::now();
            backend
                .put("limit/whole", &image, PutMode::Replace, true)
                .unwrap();
            put_limit.push(start.elapsed());
        }
        print_row(mib, "moto (S3)", &remote, Some(counts[0]), median(put_limit));
    }
    println!();
    failover(&endpoint, ttl, reps);
}

/// The image with 1 % of its chunks changed (spread evenly).
/// Where the local-disk rounds write: `MEMENTO_BENCH_DIR`, else the
/// target directory's scratch space (a real disk, not a tmpfs `/tmp`;
/// benches run in the package's directory, which has no `target/`).
fn bench_dir() -> String {
    std::env::var("MEMENTO_BENCH_DIR").unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").into())
}

fn change_one_percent(image: &[u8]) -> Vec<u8> {
    let mut out = image.to_vec();
    let chunks = image.len() / CHUNK;
    let step = 100;
    for c in (0..chunks).step_by(step) {
        out[c * CHUNK + 17] ^= 0x5a;
    }
    out
}

type Round = (Duration, Duration, Duration, (u64, u64, u64, u64));

/// A full checkpoint, an incremental one, and a restore of the latter;
/// the requests the incremental one made.
fn one_round(
    store: &Store,
    image: &[u8],
    changed: &[u8],
    counts: impl Fn() -> (u64, u64, u64, u64),
) -> Round {
    let t = store.tenant("bench").unwrap();
    let job = JobName::new("img").unwrap();
    // As a running job holds it: on object storage, numbers come from it.
    let _lease = t.lease_series(&job).unwrap().expect("free");
    let start = Instant::now();
    checkpoint(&t, &job, image);
    let full = start.elapsed();
    let before = counts();
    let start = Instant::now();
    let (id, chunks) = checkpoint(&t, &job, changed);
    let incremental = start.elapsed();
    let after = counts();
    let start = Instant::now();
    let back = t.read_chunks(&id, &TaskKey::new("m", 0), &chunks).unwrap();
    let restore = start.elapsed();
    assert!(back == changed, "restored bytes differ");
    let delta = (
        after.0 - before.0,
        after.1 - before.1,
        after.2 - before.2,
        after.3 - before.3,
    );
    (full, incremental, restore, delta)
}

fn checkpoint(t: &TenantStore, job: &JobName, image: &[u8]) -> (SnapshotId, Vec<ChunkRef>) {
    let n = t.next_snapshot_number(job).unwrap();
    let mut w = t.begin(job, n).unwrap();
    let chunks = w.put_chunks_fixed(image, CHUNK).unwrap();
    let mut m = w.manifest(
        SnapshotKind::Checkpoint,
        Trigger::Periodic,
        StateFormat::Canonical,
    );
    m.tasks.push(TaskState {
        key: TaskKey::new("m", 0),
        state: TaskStateData::Canonical {
            len: image.len() as u64,
            chunks: chunks.clone(),
        },
    });
    (w.commit(m).unwrap(), chunks)
}

fn print_row(mib: u64, place: &str, rounds: &[Round], counts: Option<(u64, u64, u64, u64)>, limit: Duration) {
    let med = |f: fn(&Round) -> Duration| median(rounds.iter().map(f).collect());
    let (full, inc, restore) = (med(|r| r.0), med(|r| r.1), med(|r| r.2));
    let rate = |d: Duration| {
        format!(
            "{:.0} ms ({:.0} MiB/s)",
            d.as_secs_f64() * 1e3,
            mib as f64 / d.as_secs_f64()
        )
    };
    let counts = counts.map_or("–".into(), |c| format!("{}/{}/{}/{}", c.0, c.1, c.2, c.3));
    println!(
        "| {mib} MiB | {place} | {} | {:.0} ms | {} | {counts} | {} (full checkpoint {:.2}×) |",
        rate(full),
        inc.as_secs_f64() * 1e3,
        rate(restore),
        rate(limit),
        full.as_secs_f64() / limit.as_secs_f64()
    );
}

/// Failover: a child process takes the job's lease and keeps renewing it;
/// it is SIGKILLed; this process then takes the lease over. Reported: from
/// the kill until this process holds the lease, beside the ttl.
fn failover(endpoint: &str, ttl: Duration, reps: usize) {
    let mut times = Vec::new();
    for _ in 0..reps {
        let bucket = create_bucket(endpoint);
        let spec = format!("{endpoint} {bucket} {}", ttl.as_millis());
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .env("MEMENTO_BENCH_LEASE_HOLDER", &spec)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = [0u8; 5];
        child.stdout.as_mut().unwrap().read_exact(&mut ready).unwrap();
        assert_eq!(&ready, b"held\n");
        let backend = Arc::new(S3Backend::open(&bucket, "bench", s3_options(endpoint, ttl)).unwrap());
        let store = Store::with_backend(backend, StoreOptions::default(), "bench").unwrap();
        let t = store.tenant("bench").unwrap();
        let job = JobName::new("img").unwrap();
        assert!(t.lease_series(&job).unwrap().is_none(), "the child holds it");
        child.kill().unwrap();
        let killed = Instant::now();
        child.wait().unwrap();
        let lease = t.lease_series_wait(&job, ttl * 10).unwrap().expect("taken over");
        times.push(killed.elapsed());
        drop(lease);
    }
    let took = median(times);
    println!(
        "| failover (lease ttl {} ms) | median from SIGKILL to lease held elsewhere | target: ≤ ttl + 2 s |",
        ttl.as_millis()
    );
    println!("|---|---|---|");
    println!(
        "| {reps} runs | {:.0} ms | {} |",
        took.as_secs_f64() * 1e3,
        if took <= ttl + Duration::from_secs(2) {
            "met"
        } else {
            "not met"
        }
    );
}

/// Child mode: take the lease, say so, renew until killed.
fn hold_lease(spec: &str) -> ! {
    let mut parts = spec.split(' ');
    let (endpoint, bucket, ttl) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        Duration::from_millis(parts.next().unwrap().parse().unwrap()),
    );
    let backend = Arc::new(S3Backend::open(bucket, "bench", s3_options(endpoint, ttl)).unwrap());
    let store = Store::with_backend(backend, StoreOptions::default(), "bench").unwrap();
    let t = store.tenant("bench").unwrap();
    let _lease = t.lease_series(&JobName::new("img").unwrap()).unwrap().unwrap();
    let mut out = std::io::stdout();
    out.write_all(b"held\n").unwrap();
    out.flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn s3_options(endpoint: &str, ttl: Duration) -> S3Options {
    S3Options {
        lock_ttl: ttl,
        config: vec![
            ("aws_endpoint".into(), endpoint.into()),
            ("aws_allow_http".into(), "true".into()),
            ("aws_access_key_id".into(), "bench".into()),
            ("aws_secret_access_key".into(), "bench".into()),
            ("aws_region".into(), "us-east-1".into()),
        ],
        ..Default::default()
    }
}

/// `MEMENTO_TEST_S3_ENDPOINT`, or a `moto_server` started on a free port
/// (killed with this process).
fn endpoint() -> String {
    if let Ok(e) = std::env::var("MEMENTO_TEST_S3_ENDPOINT") {
        return e;
    }
    use std::os::unix::process::CommandExt;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = std::process::Command::new("moto_server");
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: prctl is async-signal-safe. The main thread lives as long as
    // the benchmark, so the server dies with it.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut server = cmd
        .spawn()
        .expect("moto_server not found: pip install 'moto[server]' or set MEMENTO_TEST_S3_ENDPOINT");
    // Reaped if it dies early; killed with this process otherwise.
    std::thread::spawn(move || server.wait());
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    format!("http://127.0.0.1:{port}")
}

fn create_bucket(endpoint: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!(
        "bench{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let host = endpoint.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).unwrap();
    write!(
        s,
        "PUT /{name} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "create bucket: {answer}");
    name
}
