//! Canonical checkpoints of the `ballast` operator at 16 MiB, 256 MiB and
//! 1 GiB of state, beside the physical limits for the same bytes, and the
//! throughput of `wordcount` with 1 s checkpoints versus none. The jobs pin
//! `format = "canonical"` (the default, `auto`, would image memory
//! natively; native figures: `cargo bench -p memento --bench native`).
//!
//! Run: `cargo bench -p memento --bench checkpoint [-- SIZES]`
//! where SIZES (or env `MEMENTO_BENCH_SIZES`) is a comma-separated list of
//! state sizes in MiB, default `16,256,1024`. `MEMENTO_BENCH_WORDCOUNT=0`
//! skips the wordcount part.
//!
//! Everything happens in one process, in fresh state directories under
//! `CARGO_TARGET_TMPDIR` (the disk of the repository):
//!
//! - Per size, a few job runs (each in a fresh store): a rate-limited
//!   generator (200 events/s, batches of 1, so barriers wait at most 5 ms
//!   at the source), `ballast` changing 0.01% of its pages per second, a
//!   null sink. The first checkpoint of a run finds an empty store and
//!   writes everything (*full*); the following ones deduplicate against it
//!   and write only the chunks that changed (*incremental*), but still
//!   serialize, copy out, cut and hash all of the state. Checkpoints are
//!   triggered one after another through the library API; the figures come
//!   from the job report (`pause_ms`, `duration_ms`, `new_bytes`).
//! - The same state measured piece by piece outside a job: the guest's
//!   `snapshot-state` call, FastCDC cutting and zstd-1 of its bytes.
//! - The limits for the same number of bytes: memcpy, single-threaded
//!   blake3, and write + `sync_all` of fresh incompressible bytes to a file
//!   in the same directory.
//! - wordcount (parallelism 1) over 3 million generated events, with
//!   `[checkpoints] interval = "1s"` and without, alternately.
//!
//! All figures are medians.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memento::runtime::{Context, Runtime, SandboxLimits, TaskLabel};
use memento::spec::JobSpec;
use memento::store::{CDC_AVG, CDC_MAX, CDC_MIN};
use memento::{Host, JobReport, RunOptions};

const MIB: u64 = 1 << 20;
/// Events per second of the ballast jobs' source.
const RATE: f64 = 200.0;
/// Fraction of the ballast's pages changed per second.
const DIRTY_PER_SECOND: f64 = 0.0001;
/// Events of one wordcount run.
const WORDCOUNT_EVENTS: u64 = 3_000_000;
/// Runs of each wordcount configuration.
const WORDCOUNT_ROUNDS: usize = 4;

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: f64) -> f64 {
    bytes / MIB as f64
}

fn plugin(name: &str) -> PathBuf {
    Path::new(memento_plugins::DIR).join(format!("{name}.wasm"))
}

fn bench_root() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("checkpoint-bench");
    std::fs::create_dir_all(&root).unwrap();
    root
}

/// Incompressible, non-zero-ish pseudo-random bytes (SplitMix64), different
/// per seed.
fn fill(buf: &mut [u8], seed: u64) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x1234_5678;
    for word in buf.chunks_mut(8) {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        word.copy_from_slice(&z.to_le_bytes()[..word.len()]);
    }
}

// ------------------------------------------------------------ limits

/// Medians (ms) of the physical limits for `bytes` bytes.
struct Limits {
    memcpy: f64,
    blake3: f64,
    write_fsync: f64,
}

fn limits(dir: &Path, bytes: usize, reps: usize) -> Limits {
    let mut src = vec![0u8; bytes];
    let mut dst = vec![0u8; bytes]; // touched: no page faults in the copy
    let (mut copy, mut hash, mut write) = (vec![], vec![], vec![]);
    for rep in 0..reps {
        fill(&mut src, rep as u64 + 1);
        let t = Instant::now();
        dst.copy_from_slice(&src);
        copy.push(ms(t.elapsed()));
        std::hint::black_box(&dst);

        let t = Instant::now();
        std::hint::black_box(blake3::hash(std::hint::black_box(&src)));
        hash.push(ms(t.elapsed()));

        // Fresh bytes for the disk: nothing deduplicated or cached.
        fill(&mut src, 1000 + rep as u64);
        let path = dir.join(format!("limit-{rep}"));
        let t = Instant::now();
        let mut f = File::create(&path).unwrap();
        f.write_all(&src).unwrap();
        f.sync_all().unwrap();
        write.push(ms(t.elapsed()));
        drop(f);
        std::fs::remove_file(&path).unwrap();
    }
    Limits {
        memcpy: median(&copy),
        blake3: median(&hash),
        write_fsync: median(&write),
    }
}

// ------------------------------------------------- pieces outside a job

/// The ballast's config for `size_mib` MiB.
fn ballast_config(size_mib: u64) -> Vec<(String, String)> {
    vec![
        ("state_mib".into(), size_mib.to_string()),
        (
            "dirty_fraction".into(),
            format!("{:.12}", DIRTY_PER_SECOND / RATE),
        ),
    ]
}

/// Times (ms) of the pieces of a canonical checkpoint, measured directly.
struct Pieces {
    open: f64,
    snapshot_state: f64,
    cdc: f64,
    zstd1: f64,
    state_len: usize,
    /// Guest memory (MiB) after `open` and after the last `snapshot-state`.
    memory_mib: (f64, f64),
}

fn pieces(runtime: &Runtime, size_mib: u64, reps: usize) -> Result<Pieces, String> {
    let component = runtime.load_file(&plugin("ballast")).map_err(|e| e.to_string())?;
    let label = TaskLabel {
        job: "bench".into(),
        operator: "ballast".into(),
        task: 0,
    };
    let limits = SandboxLimits {
        memory_bytes: 4 << 30,
        call_timeout: Duration::from_secs(60),
        ..SandboxLimits::default()
    };
    let mut task = runtime
        .instantiate(&component, label, &limits)
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    task.open(&Context {
        job: "bench".into(),
        operator_name: "ballast".into(),
        task_index: 0,
        parallelism: 1,
        key_groups: 1,
        owned: memento::runtime::KeyGroupRange { start: 0, end: 1 },
        config: ballast_config(size_mib),
    })
    .map_err(|e| e.to_string())?;
    let open = ms(t.elapsed());
    let (mut snap, mut cdc, mut zstd1) = (vec![], vec![], vec![]);
    let mut state_len = 0;
    let mib = |task: &memento::runtime::TaskInstance| task.memory_sizes()[0] as f64 / (1 << 20) as f64;
    let memory_before = mib(&task);
    for _ in 0..reps {
        let t = Instant::now();
        let bytes = task.snapshot_state().map_err(|e| e.to_string())?;
        snap.push(ms(t.elapsed()));
        state_len = bytes.len();

        let t = Instant::now();
        let cuts = fastcdc::v2020::FastCDC::new(&bytes, CDC_MIN, CDC_AVG, CDC_MAX).count();
        cdc.push(ms(t.elapsed()));
        std::hint::black_box(cuts);

        let t = Instant::now();
        let z = zstd::bulk::compress(&bytes, 1).map_err(|e| e.to_string())?;
        zstd1.push(ms(t.elapsed()));
        std::hint::black_box(z.len());
    }
    Ok(Pieces {
        open,
        snapshot_state: median(&snap),
        cdc: median(&cdc),
        zstd1: median(&zstd1),
        state_len,
        memory_mib: (memory_before, mib(&task)),
    })
}

// ------------------------------------------------------- ballast jobs

fn ballast_job(size_mib: u64) -> String {
    let config: String = ballast_config(size_mib)
        .iter()
        .map(|(k, v)| format!("{k} = {v:?}\n"))
        .collect();
    format!(
        r#"name = "ckpt-ballast-{size_mib}"

[source]
type = "generator"
rate = {RATE:.1}
batch = 1
keys = 16

[[operators]]
name = "ballast"
plugin = {plugin:?}
[operators.config]
{config}
[sink]
type = "null"

[limits]
memory = "4GiB"
call_timeout = "60s"

[checkpoints]
timeout = "10m"
format = "canonical"
"#,
        plugin = plugin("ballast").display().to_string(),
    )
}

/// One checkpoint as reported.
#[derive(Clone, Copy)]
struct Ckpt {
    pause_ms: f64,
    duration_ms: f64,
    new_bytes: f64,
    logical_bytes: f64,
}

/// One job run: wait `warm` for the task to open, trigger `1 + incremental`
/// checkpoints one after another, cancel. Returns the report's checkpoints
/// in order.
fn ballast_run(size_mib: u64, warm: Duration, incremental: usize) -> Result<Vec<Ckpt>, String> {
    let dir = tempfile::tempdir_in(bench_root()).unwrap();
    let host = Host::open(&dir.path().join("state")).map_err(|e| e.to_string())?;
    let text = ballast_job(size_mib);
    let spec = JobSpec::from_toml(&text, Path::new("checkpoint-bench.toml"), dir.path())
        .map_err(|e| e.to_string())?;
    let job = host.load_job(spec, "default").map_err(|e| e.to_string())?;
    let control = job.control();
    let driver = std::thread::spawn(move || -> Result<(), String> {
        std::thread::sleep(warm);
        let result = (0..=incremental).try_for_each(|_| {
            control
                .trigger_checkpoint()
                .recv()
                .map_err(|e| e.to_string())?
                .map(|_| ())
                .map_err(|e| format!("checkpoint failed: {e}"))
        });
        control.cancel();
        result
    });
    let report: Result<JobReport, String> = job.run(RunOptions::default()).map_err(|e| e.to_string());
    let driven = driver.join().expect("driver thread panicked");
    let report = report?;
    driven?;
    Ok(report
        .snapshots
        .iter()
        .map(|s| Ckpt {
            pause_ms: s.pause_ms as f64,
            duration_ms: s.duration_ms as f64,
            new_bytes: s.new_bytes as f64,
            logical_bytes: s.logical_bytes as f64,
        })
        .collect())
}

struct SizeResult {
    size_mib: u64,
    pieces: Option<Pieces>,
    limits: Limits,
    full: Vec<Ckpt>,
    incr: Vec<Ckpt>,
    errors: Vec<String>,
}

fn bench_size(runtime: &Runtime, size_mib: u64) -> SizeResult {
    let big = size_mib >= 1024;
    let (runs, incremental, reps) = if big { (2, 3, 3) } else { (3, 5, 5) };
    println!(
        "\n== ballast {size_mib} MiB: {runs} job runs x (1 full + {incremental} incremental checkpoints)"
    );
    let (mut full, mut incr, mut errors) = (vec![], vec![], vec![]);
    let pieces = match pieces(runtime, size_mib, reps) {
        Ok(p) => {
            println!(
                "   outside a job: open {:.0} ms, snapshot-state {:.1} ms ({} bytes), FastCDC {:.1} ms, zstd-1 {:.1} ms, \
                 guest memory {:.2} -> {:.2} MiB",
                p.open, p.snapshot_state, p.state_len, p.cdc, p.zstd1, p.memory_mib.0, p.memory_mib.1
            );
            Some(p)
        }
        Err(e) => {
            let e = format!("outside a job: {e}");
            println!("   FAILED {e}");
            errors.push(e);
            None
        }
    };
    // The first checkpoint must not wait for `open`: give the task ample
    // time (without a measured open, about 10 ms per MiB).
    let open_ms = pieces.as_ref().map_or(size_mib as f64 * 10.0, |p| p.open);
    let warm = Duration::from_secs_f64(open_ms * 2.0 / 1000.0 + 1.0);
    for run in 0..runs {
        match ballast_run(size_mib, warm, incremental) {
            Ok(ckpts) => {
                for (i, c) in ckpts.iter().enumerate() {
                    println!(
                        "   run {run} ckpt {i}: pause {:>6.0} ms  duration {:>7.0} ms  new {:>9.2} MiB  logical {:>9.2} MiB",
                        c.pause_ms,
                        c.duration_ms,
                        mib(c.new_bytes),
                        mib(c.logical_bytes)
                    );
                }
                if let Some((first, rest)) = ckpts.split_first() {
                    full.push(*first);
                    incr.extend_from_slice(rest);
                }
            }
            Err(e) => {
                println!("   run {run} FAILED: {e}");
                errors.push(e);
            }
        }
    }
    let bytes = pieces.as_ref().map_or((size_mib * MIB) as usize, |p| p.state_len);
    let limits = limits(&bench_root(), bytes, reps);
    println!(
        "   limits for {bytes} bytes: memcpy {:.1} ms, blake3 {:.1} ms, write+fsync {:.1} ms",
        limits.memcpy, limits.blake3, limits.write_fsync
    );
    SizeResult {
        size_mib,
        pieces,
        limits,
        full,
        incr,
        errors,
    }
}

// ------------------------------------------------------------ wordcount

fn wordcount_job(interval: Option<&str>) -> String {
    let checkpoints = match interval {
        Some(i) => format!("[checkpoints]\ninterval = {i:?}\nformat = \"canonical\"\n"),
        None => String::new(),
    };
    format!(
        r#"name = "ckpt-wordcount-{suffix}"

[source]
type = "generator"
count = {WORDCOUNT_EVENTS}
keys = 10000

[[operators]]
name = "count"
plugin = {plugin:?}

[sink]
type = "null"

{checkpoints}"#,
        suffix = if interval.is_some() { "1s" } else { "none" },
        plugin = plugin("wordcount").display().to_string(),
    )
}

struct WordcountResult {
    none: Vec<f64>,
    with: Vec<f64>,
    ckpts: Vec<Ckpt>,
}

fn bench_wordcount() -> Result<WordcountResult, String> {
    println!(
        "\n== wordcount: {WORDCOUNT_EVENTS} events, checkpoints every 1 s vs none, {WORDCOUNT_ROUNDS} rounds each"
    );
    let dir = tempfile::tempdir_in(bench_root()).unwrap();
    let host = Host::open(&dir.path().join("state")).map_err(|e| e.to_string())?;
    let mut result = WordcountResult {
        none: vec![],
        with: vec![],
        ckpts: vec![],
    };
    for round in 0..WORDCOUNT_ROUNDS {
        // Alternate which goes first so drift on a shared machine evens out.
        let order: [Option<&str>; 2] = if round % 2 == 0 {
            [None, Some("1s")]
        } else {
            [Some("1s"), None]
        };
        for interval in order {
            let text = wordcount_job(interval);
            let spec = JobSpec::from_toml(&text, Path::new("wordcount-bench.toml"), dir.path())
                .map_err(|e| e.to_string())?;
            let job = host.load_job(spec, "default").map_err(|e| e.to_string())?;
            let report = job.run(RunOptions::default()).map_err(|e| e.to_string())?;
            let rate = report.source_records as f64 / report.elapsed.as_secs_f64();
            println!(
                "   round {round} checkpoints {:<4}: {:>10.0} records/s ({} records in {:.2} s, {} checkpoints)",
                interval.unwrap_or("none"),
                rate,
                report.source_records,
                report.elapsed.as_secs_f64(),
                report.snapshots.len()
            );
            if interval.is_some() {
                result.with.push(rate);
                result.ckpts.extend(report.snapshots.iter().map(|s| Ckpt {
                    pause_ms: s.pause_ms as f64,
                    duration_ms: s.duration_ms as f64,
                    new_bytes: s.new_bytes as f64,
                    logical_bytes: s.logical_bytes as f64,
                }));
            } else {
                result.none.push(rate);
            }
        }
    }
    Ok(result)
}

// ----------------------------------------------------------------- main

fn sizes() -> Vec<u64> {
    let arg = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let text = arg
        .or_else(|| std::env::var("MEMENTO_BENCH_SIZES").ok())
        .unwrap_or_else(|| "16,256,1024".into());
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad size {s:?} in {text:?}: expected MiB, e.g. 16,256,1024"))
        })
        .collect()
}

fn command(sizes: &[u64]) -> String {
    let list: Vec<String> = sizes.iter().map(u64::to_string).collect();
    let list = list.join(",");
    if list == "16,256,1024" {
        "cargo bench -p memento --bench checkpoint".into()
    } else {
        format!("cargo bench -p memento --bench checkpoint -- {list}")
    }
}

fn col<F: Fn(&Ckpt) -> f64>(v: &[Ckpt], f: F) -> f64 {
    median(&v.iter().map(f).collect::<Vec<_>>())
}

fn main() {
    let sizes = sizes();
    let runtime = Runtime::new().unwrap();
    let mut results = vec![];
    for &size in &sizes {
        results.push(bench_size(&runtime, size));
    }
    let wordcount = if std::env::var("MEMENTO_BENCH_WORDCOUNT").as_deref() == Ok("0") {
        None
    } else {
        match bench_wordcount() {
            Ok(w) => Some(w),
            Err(e) => {
                println!("   wordcount FAILED: {e}");
                None
            }
        }
    };

    println!("\n== summary (medians; times in ms; sizes in MiB)");
    println!("command: {}", command(&sizes));
    println!(
        "\n{:>6} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7}",
        "state",
        "full dur",
        "pause",
        "written",
        "incr dur",
        "pause",
        "written",
        "memcpy",
        "blake3",
        "wr+sync",
        "full/lim",
        "incr/b3",
        "pause/f",
        "pause/i"
    );
    for r in &results {
        if r.full.is_empty() {
            println!("{:>6} | no checkpoint completed (errors below)", r.size_mib);
            continue;
        }
        let limit = r.limits.blake3.max(r.limits.write_fsync);
        let (fd, fp) = (col(&r.full, |c| c.duration_ms), col(&r.full, |c| c.pause_ms));
        let (id, ip) = (col(&r.incr, |c| c.duration_ms), col(&r.incr, |c| c.pause_ms));
        println!(
            "{:>6} | {:>8.0} {:>8.0} {:>8.1} | {:>8.0} {:>8.0} {:>8.2} | {:>7.1} {:>7.1} {:>7.1} | {:>7.2}x {:>6.2}x {:>6.0}% {:>6.0}%",
            r.size_mib,
            fd,
            fp,
            mib(col(&r.full, |c| c.new_bytes)),
            id,
            ip,
            mib(col(&r.incr, |c| c.new_bytes)),
            r.limits.memcpy,
            r.limits.blake3,
            r.limits.write_fsync,
            fd / limit,
            id / r.limits.blake3,
            100.0 * fp / fd,
            100.0 * ip / id,
        );
    }
    println!("\nfull/lim = full checkpoint duration / max(blake3, write+fsync) of the same bytes");
    println!("incr/b3  = incremental checkpoint duration / blake3 of the same bytes");
    println!("\npieces measured outside a job (ms):");
    println!(
        "{:>6} | {:>8} {:>14} {:>8} {:>8} | {:>12} | {:>22}",
        "state", "open", "snapshot-state", "FastCDC", "zstd-1", "state bytes", "guest memory MiB"
    );
    for r in &results {
        let Some(p) = &r.pieces else {
            println!("{:>6} | failed", r.size_mib);
            continue;
        };
        println!(
            "{:>6} | {:>8.0} {:>14.1} {:>8.1} {:>8.1} | {:>12} | {:>9.2} -> {:>9.2}",
            r.size_mib, p.open, p.snapshot_state, p.cdc, p.zstd1, p.state_len, p.memory_mib.0, p.memory_mib.1
        );
    }
    for r in &results {
        for e in &r.errors {
            println!("{} MiB: a run failed: {e}", r.size_mib);
        }
    }
    if let Some(w) = wordcount {
        let (none, with) = (median(&w.none), median(&w.with));
        println!(
            "\nwordcount: none {none:.0} records/s, 1 s checkpoints {with:.0} records/s, with/none {:.3} (overhead {:.1}%); \
             its checkpoints: {} taken, pause {:.0} ms, duration {:.0} ms, {:.2} MiB logical",
            with / none,
            100.0 * (1.0 - with / none),
            w.ckpts.len(),
            col(&w.ckpts, |c| c.pause_ms),
            col(&w.ckpts, |c| c.duration_ms),
            mib(col(&w.ckpts, |c| c.logical_bytes)),
        );
    }
    println!("\nreproduce: {}", command(&sizes));
}
