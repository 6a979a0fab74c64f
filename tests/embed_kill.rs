//! An embedding service -- its own event log fed through the push source,
//! committed output received through the callback sink -- killed with
//! SIGKILL at 22 random moments and restarted each time, delivers in all
//! exactly the output of an uninterrupted run: nothing lost, nothing twice.
//!
//! A test binary of its own (`harness = false`): run with an environment
//! variable naming a directory, it is the service; without, it is the test,
//! which starts the service as a child process and kills it.
//!
//! Run: `cargo test --test embed_kill` (`MEMENTO_EMBED_SEED=N` repeats a
//! run's kill times).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use memento::io::{CallbackSink, Delivery, Event, PushError, PushHandle, PushSource};
use memento::spec::{CheckpointSpec, HumanDuration, JobSpec, SinkSpec, SourceSpec};
use memento::store::JobName;
use memento::{Host, RunOptions, StartFrom};

/// Set in the child: the service's directory.
const SERVICE_ENV: &str = "MEMENTO_EMBED_SERVICE";
/// Batches in the service's event log, and events per batch.
const BATCHES: u64 = 2500;
const EVENTS_PER_BATCH: u64 = 40;
/// Time between pushes: the job runs for a few seconds, so kills land
/// inside it.
const PACE: Duration = Duration::from_millis(6);
const KILLS: usize = 22;

fn main() {
    if let Some(dir) = std::env::var_os(SERVICE_ENV) {
        service(Path::new(&dir));
    }
    let reference = tempfile::tempdir().unwrap();
    let status = run_to_end(reference.path());
    assert!(status.success(), "the uninterrupted run failed: {status}");
    let expected = output(reference.path());
    assert_eq!(
        expected.len() as u64,
        BATCHES * EVENTS_PER_BATCH,
        "one output event per input event"
    );

    let seed = std::env::var("MEMENTO_EMBED_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("embed_kill: seed {seed} (MEMENTO_EMBED_SEED={seed} repeats it)");
    let mut rng = seed;
    let dir = tempfile::tempdir().unwrap();
    let mut landed = 0;
    for i in 0..KILLS {
        let running = dir.path().join("running");
        let _ = std::fs::remove_file(&running);
        let mut child = spawn(dir.path());
        // Every fourth kill at a random moment from the start (loading,
        // restoring); the others at a random moment of the running job.
        if i % 4 != 0 {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !running.exists() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let wait = Duration::from_millis(next(&mut rng) % 700);
        std::thread::sleep(wait);
        if child.try_wait().unwrap().is_none() {
            landed += 1;
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        println!("embed_kill: kill {i} after {wait:?}: {status}");
    }
    let status = run_to_end(dir.path());
    assert!(status.success(), "the last run failed: {status}");
    assert!(
        landed >= 20,
        "only {landed} of {KILLS} kills found the service running (seed {seed})"
    );
    // The kills must have cut runs that resumed from snapshots, not only
    // runs that started over.
    let starts = std::fs::read_to_string(dir.path().join("starts")).unwrap();
    let resumed = starts.lines().filter(|l| *l == "latest").count();
    assert!(
        resumed >= KILLS / 2,
        "only {resumed} of {} runs resumed from a snapshot (seed {seed})",
        starts.lines().count()
    );
    let got = output(dir.path());
    assert_eq!(got.len(), expected.len(), "as many output events (seed {seed})");
    assert!(got == expected, "the same output events (seed {seed})");
    println!(
        "embed_kill: ok, {landed} kills mid-run, {resumed} runs resumed, {} output events as uninterrupted",
        got.len()
    );
}

fn next(state: &mut u64) -> u64 {
    // SplitMix64: enough randomness for kill times.
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn spawn(dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env(SERVICE_ENV, dir)
        .env("RUST_LOG", "off")
        .spawn()
        .unwrap()
}

fn run_to_end(dir: &Path) -> ExitStatus {
    let mut child = spawn(dir);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the service did not finish in 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every delivered output line, sorted (tasks interleave differently from
/// run to run; each key's counts do not).
fn output(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir.join("out")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        lines.extend(text.lines().map(str::to_string));
    }
    lines.sort();
    lines
}

/// The service's event log: batch `i`, deterministic.
fn batch(i: u64) -> Vec<Event> {
    (i * EVENTS_PER_BATCH..(i + 1) * EVENTS_PER_BATCH)
        .map(|n| Event {
            key: format!("user-{}", n * 7 % 61).into_bytes(),
            value: Vec::new(),
            timestamp: n as i64,
        })
        .collect()
}

/// The service: runs the job over its log until it ends, resuming from
/// its newest snapshot when there is one.
fn service(dir: &Path) -> ! {
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let host = Host::open(&dir.join("state")).unwrap();
    let (source, handle) = PushSource::new(8);
    let sink = CallbackSink::new(dir.join("staged"), move |d: &Delivery| store_delivery(&out, d));
    let spec = JobSpec::builder("clicks")
        .source(SourceSpec::custom(source))
        .operator("count", memento_plugins::path("wordcount"), 2)
        .sink(SinkSpec::custom(sink))
        .checkpoints(CheckpointSpec {
            interval: Some(HumanDuration(Duration::from_millis(100))),
            ..CheckpointSpec::default()
        })
        .build()
        .unwrap();
    let job = host.load_job(spec, "default").unwrap();
    std::thread::spawn(move || feed(&handle));
    let status = job.status_handle();
    let running = dir.join("running");
    std::thread::spawn(move || {
        while status.get().state != memento::coordinator::JobState::Running {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::fs::write(running, b"").unwrap();
    });
    let resumable = job
        .store()
        .latest(&JobName::new("clicks").unwrap())
        .unwrap()
        .is_some();
    let from = if resumable {
        StartFrom::Latest
    } else {
        StartFrom::Scratch
    };
    let mut starts = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("starts"))
        .unwrap();
    writeln!(starts, "{}", if resumable { "latest" } else { "scratch" }).unwrap();
    match job.run(RunOptions { from }) {
        Ok(_) => std::process::exit(0),
        Err(e) => {
            eprintln!("service: {e}");
            std::process::exit(1)
        }
    }
}

/// Push the log from wherever the job asks.
fn feed(handle: &PushHandle) {
    let mut next = 0;
    loop {
        if next < BATCHES {
            match handle.push(next, batch(next)) {
                Ok(()) => next += 1,
                Err(PushError::Replay { from }) => next = from,
                Err(PushError::Gone) => return,
            }
            std::thread::sleep(PACE);
        } else {
            handle.close();
            match handle.replay(Duration::from_millis(100)) {
                Ok(Some(from)) => next = from,
                Ok(None) => {}
                Err(_) => return,
            }
        }
    }
}

/// Keep a delivery as one file named by its task and sequence number,
/// written whole (temporary file, fsync, rename): a delivery that comes
/// again after a crash finds its file and is skipped.
fn store_delivery(out: &Path, d: &Delivery) -> Result<(), memento::io::DeliveryError> {
    let name: PathBuf = out.join(format!("{:05}-{:06}", d.task, d.seq));
    if name.exists() {
        return Ok(());
    }
    let tmp = out.join(".delivery");
    let mut f = std::fs::File::create(&tmp)?;
    for e in &d.events {
        writeln!(
            f,
            "{}\t{}\t{}",
            String::from_utf8_lossy(&e.key),
            String::from_utf8_lossy(&e.value),
            e.timestamp
        )?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, &name)?;
    std::fs::File::open(out)?.sync_all()?;
    Ok(())
}
