//! Sandbox and scale on one host: what fuel metering costs, what a task and
//! an idle job cost, how long instantiation takes, and how many jobs with
//! 16 MiB of state and 1-second checkpoints one host sustains.
//!
//! Run: `cargo bench -p memento --bench scale`. Environment:
//! - `MEMENTO_SCALE_JOBS`: comma-separated job counts of the checkpoint
//!   part (default `10,25,50,75,100`);
//! - `MEMENTO_SCALE_SECS`: measured seconds per job count (default 20);
//! - `MEMENTO_SCALE_PARTS`: which parts to run, any of `fuel,instances,idle,
//!   checkpoints,checkpoints-per-tenant` (default all).
//!
//! Parts:
//! - **fuel**: `wordcount` over 200 000 events in batches of 1024, on an
//!   engine without and with fuel metering (unlimited fuel), alternating,
//!   median of 7 rounds of each and of the per-round ratios.
//! - **instances**: instantiate + `open` of `wordcount` 300 times (median
//!   and 99th percentile), then hold 300 instances and divide the growth of
//!   the process's resident memory by 300.
//! - **idle**: 50 running jobs (generator at 1 event/s, `wordcount`, null
//!   sink, no checkpoints) in one host; resident memory and threads per job.
//! - **checkpoints**: N jobs of `ballast` with 16 MiB of state (checkpoints
//!   every second in `MEMENTO_SCALE_FORMAT`, default `auto`, i.e. native;
//!   `MEMENTO_SCALE_SYNC=off` drops the store's fsyncs, to see their cost;
//!   10 events/s changing 0.1% of the pages per event, null sink) in one
//!   host, sharing one store. After a warm-up in
//!   which every job completes a first checkpoint, the measured window
//!   counts each job's completed and failed checkpoints and their
//!   durations (trigger to commit). The coordinator arms the next periodic
//!   checkpoint when one ends, so an unhindered job checkpoints every
//!   `1 s + duration` (about 0.9 per second here); a job *keeps up* when
//!   none failed, it completed at least 0.85 checkpoints per second, and
//!   every checkpoint took less than the 1 s interval.
//!   Reported: jobs keeping up, checkpoints per job and second, median,
//!   95th percentile and worst duration, CPU use of the process, resident
//!   memory. `checkpoints-per-tenant` repeats it with every job in its own
//!   tenant: the store's garbage collection after each checkpoint scans the
//!   whole tenant, so sharing one tenant makes its cost grow with the jobs.
//!
//! Resident memory is `VmRSS` from `/proc/self/status` (Linux only).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memento::coordinator::JobState;
use memento::runtime::{Context, Event, Runtime, RuntimeOptions, SandboxLimits, TaskLabel};
use memento::spec::JobSpec;
use memento::{Host, RunOptions};

fn plugin(name: &str) -> PathBuf {
    Path::new(memento_plugins::DIR).join(format!("{name}.wasm"))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A field of `/proc/self/status` in kB (VmRSS, Threads, ...).
fn proc_status(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn rss_mib() -> f64 {
    proc_status("VmRSS") as f64 / 1024.0
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn label(job: &str) -> TaskLabel {
    TaskLabel {
        job: job.into(),
        operator: "count".into(),
        task: 0,
    }
}

fn context() -> Context {
    Context {
        job: "bench".into(),
        operator_name: "count".into(),
        task_index: 0,
        parallelism: 1,
        key_groups: 1,
        owned: memento::runtime::KeyGroupRange { start: 0, end: 1 },
        config: vec![],
    }
}

fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            key: format!("k{}", i % 1000).into_bytes(),
            value: b"to be or not to be".to_vec(),
            timestamp: i as i64,
        })
        .collect()
}

fn fuel_cost() {
    let plain = Runtime::new().unwrap();
    let metered = Runtime::with_options(RuntimeOptions {
        fuel: true,
        ..RuntimeOptions::default()
    })
    .unwrap();
    let events = events(200_000);
    let round = |rt: &Runtime| {
        let c = rt.load_file(&plugin("wordcount")).unwrap();
        let mut task = rt
            .instantiate(&c, label("fuel"), &SandboxLimits::default())
            .unwrap();
        task.open(&context()).unwrap();
        let t = Instant::now();
        for chunk in events.chunks(1024) {
            std::hint::black_box(task.process(chunk).unwrap());
        }
        t.elapsed().as_secs_f64()
    };
    let (mut off, mut on, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..7 {
        let a = round(&plain);
        let b = round(&metered);
        off.push(a);
        on.push(b);
        ratio.push(b / a);
    }
    println!("## fuel metering (wordcount, 200k events, batches of 1024, median of 7)");
    println!(
        "without fuel {:.1} ms, with fuel {:.1} ms, ratio {:.3}",
        1e3 * median(&off),
        1e3 * median(&on),
        median(&ratio)
    );
}

fn instances() {
    const N: usize = 300;
    let rt = Runtime::new().unwrap();
    let c = rt.load_file(&plugin("wordcount")).unwrap();
    // Warm up: first instantiation pays one-time costs.
    let mut t = rt
        .instantiate(&c, label("warm"), &SandboxLimits::default())
        .unwrap();
    t.open(&context()).unwrap();
    drop(t);
    let mut times = Vec::new();
    for _ in 0..N {
        let s = Instant::now();
        let mut t = rt.instantiate(&c, label("i"), &SandboxLimits::default()).unwrap();
        t.open(&context()).unwrap();
        times.push(s.elapsed().as_secs_f64() * 1e6);
    }
    let before = rss_mib();
    let held: Vec<_> = (0..N)
        .map(|_| {
            let mut t = rt.instantiate(&c, label("h"), &SandboxLimits::default()).unwrap();
            t.open(&context()).unwrap();
            // One small batch: the operator's state exists, as in a task.
            t.process(&events(16)).unwrap();
            t
        })
        .collect();
    let after = rss_mib();
    println!("## instances (wordcount)");
    println!(
        "instantiate + open: median {:.0} µs, p99 {:.0} µs; resident memory per instance {:.2} MiB ({N} held)",
        median(&times),
        percentile(&times, 0.99),
        (after - before) / N as f64
    );
    drop(held);
}

fn job_toml(name: &str, body: &str) -> String {
    format!("name = \"{name}\"\n{body}")
}

/// Load each job (for tenant `default`) and run it on its own thread; its
/// status, control and thread.
fn run_jobs(
    host: &Host,
    dir: &Path,
    tomls: Vec<String>,
) -> Vec<(
    memento::coordinator::StatusHandle,
    memento::JobControl,
    std::thread::JoinHandle<()>,
)> {
    run_jobs_as(host, dir, tomls, |_| "default".to_string())
}

/// Like `run_jobs`, job `i` for tenant `tenant(i)`.
fn run_jobs_as(
    host: &Host,
    dir: &Path,
    tomls: Vec<String>,
    tenant: impl Fn(usize) -> String,
) -> Vec<(
    memento::coordinator::StatusHandle,
    memento::JobControl,
    std::thread::JoinHandle<()>,
)> {
    tomls
        .into_iter()
        .enumerate()
        .map(|(i, toml)| {
            let spec = JobSpec::from_toml(&toml, Path::new("job.toml"), dir).unwrap();
            let job = host.load_job(spec, &tenant(i)).unwrap();
            let (status, control) = (job.status_handle(), job.control());
            let handle = std::thread::spawn(move || {
                let _ = job.run(RunOptions::default());
            });
            (status, control, handle)
        })
        .collect()
}

fn idle_jobs() {
    const N: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let host = Host::open(&dir.path().join("state")).unwrap();
    let body = format!(
        "[source]\ntype = \"generator\"\nrate = 1.0\nbatch = 1\n[[operators]]\nname = \"count\"\nplugin = \"{}\"\n\
         [sink]\ntype = \"null\"\n",
        plugin("wordcount").display()
    );
    // One job first, so the compiled component and the runtime's one-time
    // costs are outside the measurement.
    let first = run_jobs(&host, dir.path(), vec![job_toml("idle-first", &body)]);
    while first[0].0.get().records_in == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (rss0, threads0) = (rss_mib(), proc_status("Threads"));
    let jobs = run_jobs(
        &host,
        dir.path(),
        (0..N).map(|i| job_toml(&format!("idle-{i}"), &body)).collect(),
    );
    for (status, _, _) in &jobs {
        while status.get().records_in == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let (rss1, threads1) = (rss_mib(), proc_status("Threads"));
    println!("## idle jobs (wordcount, 1 event/s, {N} jobs)");
    println!(
        "resident memory per idle job {:.2} MiB, threads per job {:.1}",
        (rss1 - rss0) / N as f64,
        (threads1 - threads0) as f64 / N as f64
    );
    for (_, control, handle) in jobs.into_iter().chain(first) {
        control.cancel();
        handle.join().unwrap();
    }
}

fn checkpoints(counts: &[usize], secs: u64, tenant_per_job: bool) {
    let format = std::env::var("MEMENTO_SCALE_FORMAT").unwrap_or_else(|_| "auto".into());
    println!(
        "## ballast 16 MiB, {format} checkpoints every 1 s, {secs} s measured per row, {}",
        if tenant_per_job {
            "one tenant (store namespace) per job"
        } else {
            "all jobs in one tenant"
        }
    );
    println!(
        "{:>5} {:>10} {:>11} {:>10} {:>8} {:>9} {:>7} {:>7} {:>8} {:>13}",
        "jobs",
        "keeping up",
        "ckpt/job/s",
        "median ms",
        "p95 ms",
        "worst ms",
        "failed",
        "CPU %",
        "RSS MiB",
        "written MiB/s"
    );
    for &n in counts {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        // MEMENTO_SCALE_SYNC=off: no fsync in the store (an experiment on
        // what durability costs; never a production setting).
        let sync = std::env::var("MEMENTO_SCALE_SYNC").map_or(true, |v| v != "off");
        let options = memento::store::StoreOptions {
            sync,
            ..Default::default()
        };
        let host = Host::open_with(&dir.path().join("state"), options).unwrap();
        let body = format!(
            "[source]\ntype = \"generator\"\nrate = 10.0\nbatch = 1\n[[operators]]\nname = \"ballast\"\nplugin = \"{}\"\n\
             [operators.config]\nstate_mib = \"16\"\ndirty_fraction = \"0.001\"\n[sink]\ntype = \"null\"\n\
             [checkpoints]\ninterval = \"1s\"\nformat = \"{format}\"\n[limits]\nmemory = \"64MiB\"\n",
            plugin("ballast").display()
        );
        let rss0 = rss_mib();
        let jobs = run_jobs_as(
            &host,
            dir.path(),
            (0..n).map(|i| job_toml(&format!("ballast-{i}"), &body)).collect(),
            |i| {
                if tenant_per_job {
                    format!("t{i}")
                } else {
                    "default".into()
                }
            },
        );
        // Warm-up: every job has completed a checkpoint.
        let warm = Instant::now();
        while jobs.iter().any(|(s, _, _)| s.get().counts.completed == 0) {
            if warm.elapsed() > Duration::from_secs(120) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let counts0: Vec<_> = jobs.iter().map(|(s, _, _)| s.get().counts).collect();
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        std::thread::sleep(Duration::from_secs(secs));
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = (cpu_seconds() - cpu0) / elapsed;
        let rss = rss_mib() - rss0;
        let mut durations = Vec::new();
        let (mut keeping_up, mut completed, mut failed, mut written) = (0, 0u64, 0u64, 0u64);
        let window_start = now_ms() - (elapsed * 1000.0) as u64;
        for ((s, _, _), c0) in jobs.iter().zip(&counts0) {
            let st = s.get();
            let done = st.counts.completed - c0.completed;
            let fails = st.counts.failed - c0.failed;
            completed += done;
            failed += fails;
            let window = st
                .history
                .iter()
                .filter(|r| r.id.is_some() && r.triggered_at_ms >= window_start);
            written += window.clone().map(|r| r.new_bytes).sum::<u64>();
            let mine: Vec<f64> = window.map(|r| r.duration_ms as f64).collect();
            let rate = done as f64 / elapsed;
            if fails == 0 && rate >= 0.85 && st.state == JobState::Running && mine.iter().all(|&d| d < 1000.0)
            {
                keeping_up += 1;
            }
            durations.extend(mine);
        }
        println!(
            "{n:>5} {:>10} {:>11.2} {:>10.0} {:>8.0} {:>9.0} {:>7} {:>6.0}% {:>8.0} {:>13.0}",
            format!("{keeping_up}/{n}"),
            completed as f64 / n as f64 / elapsed,
            median(&durations),
            percentile(&durations, 0.95),
            durations.iter().cloned().fold(0.0, f64::max),
            failed,
            100.0 * cpu,
            rss,
            written as f64 / (1 << 20) as f64 / elapsed
        );
        for (_, control, _) in &jobs {
            control.cancel();
        }
        for (_, _, handle) in jobs {
            handle.join().unwrap();
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn main() {
    let parts = std::env::var("MEMENTO_SCALE_PARTS")
        .unwrap_or_else(|_| "fuel,instances,idle,checkpoints,checkpoints-per-tenant".into());
    let counts: Vec<usize> = std::env::var("MEMENTO_SCALE_JOBS")
        .unwrap_or_else(|_| "10,25,50,75,100".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let secs: u64 = std::env::var("MEMENTO_SCALE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    println!(
        "{} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for part in parts.split(',') {
        match part.trim() {
            "fuel" => fuel_cost(),
            "instances" => instances(),
            "idle" => idle_jobs(),
            "checkpoints" => checkpoints(&counts, secs, false),
            "checkpoints-per-tenant" => checkpoints(&counts, secs, true),
            other => panic!("unknown part {other}"),
        }
    }
}
