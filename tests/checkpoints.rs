//! End-to-end tests of the checkpoint coordinator (issue 4): exactly-once
//! output under real SIGKILLs, restart strategies, savepoints with and
//! without periodic checkpoints, savepoint expiry, checkpoint retention,
//! persistent checkpoints, stop-with-savepoint, timeouts and declined
//! snapshots, restoring a canonical savepoint into a newer plugin version,
//! and the refusals of `--from`.
//!
//! They drive the real `memento` binary (and, where a test triggers
//! snapshots itself, the library API) with the real plugins built by
//! crates/plugins/build.rs. Timing only shapes the runs (rate-limited inputs so that
//! kills and signals land mid-run); correctness assertions never depend on
//! it: output is compared per key, in order, with an uninterrupted run.

mod common;

use common::output::{
    Committed, assert_prefix, assert_same_output, committed, passthrough_output, total_lines,
    wordcount_output,
};
use common::{memento, plugin, toml_path};

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

// ---------------------------------------------------------------- helpers

/// A small xorshift PRNG: seeded, so kill moments are reproducible.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

/// Poll `cond` every 20 ms until it holds; panic after `timeout`.
fn poll(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- job files

/// `[source]`: the deterministic generator.
fn generator(count: u64, keys: u64, seed: u64, rate: Option<u64>, batch: u64) -> String {
    let rate = rate.map(|r| format!("rate = {r}\n")).unwrap_or_default();
    format!(
        "[source]\ntype = \"generator\"\ncount = {count}\nkeys = {keys}\nseed = {seed}\nbatch = {batch}\n{rate}"
    )
}

/// One `[[operators]]` entry.
fn operator(name: &str, plugin_name: &str, parallelism: u32, config: &[(&str, &str)]) -> String {
    let mut s = format!(
        "[[operators]]\nname = \"{name}\"\nplugin = \"{}\"\nparallelism = {parallelism}\n",
        toml_path(&plugin(plugin_name))
    );
    if !config.is_empty() {
        s.push_str("[operators.config]\n");
        for (k, v) in config {
            s.push_str(&format!("{k} = \"{v}\"\n"));
        }
    }
    s
}

/// A job file: name, source, operators, a `file` sink into `out/`, and any
/// further sections (`[checkpoints]`, `[savepoints]`, `[restart]`).
fn job_toml(name: &str, source: &str, operators: &[String], extra: &str) -> String {
    format!(
        "name = \"{name}\"\n{source}\n{}\n[sink]\ntype = \"file\"\npath = \"out\"\n\n{extra}\n",
        operators.join("\n")
    )
}

// ---- running the binary

/// A job file and a state directory in a temporary directory.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    job: PathBuf,
    state: PathBuf,
    name: String,
}

/// A finished `memento` process.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(&self) -> &Self {
        assert!(
            self.status.success(),
            "memento failed ({}):\n{}",
            self.status,
            self.stderr
        );
        self
    }

    /// The `--json` report.
    fn report(&self) -> Value {
        self.ok();
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not a JSON report ({e}):\n{}", self.stdout))
    }

    /// The final state of the `--json` report: `finished`, `stopped`, ...
    fn state(&self) -> String {
        self.report()["state"]["state"].as_str().unwrap().to_string()
    }

    /// A failed run's error: exactly one line, `error: ...`, the last one.
    fn error(&self) -> String {
        assert!(
            !self.status.success(),
            "memento should have failed:\n{}\n{}",
            self.stderr,
            self.stdout
        );
        assert!(
            !self
                .stderr
                .lines()
                .any(|l| l.contains("thread '") && l.contains("panicked at")),
            "memento panicked:\n{}",
            self.stderr
        );
        let errors: Vec<&str> = self.stderr.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(errors.len(), 1, "expected one error line in:\n{}", self.stderr);
        assert_eq!(
            self.stderr.lines().rfind(|l| !l.trim().is_empty()),
            Some(errors[0]),
            "the error is not the last line:\n{}",
            self.stderr
        );
        errors[0].to_string()
    }
}

/// A running `memento run`, its output going to files (never blocks on a
/// full pipe, whatever it logs).
struct Running {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Running {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Wait up to `d` for the process to exit.
    fn wait_for(&mut self, d: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait (at most `timeout`, then kill and panic) for the exit.
    fn finish(mut self, timeout: Duration) -> Ran {
        let Some(status) = self.wait_for(timeout) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "memento did not exit within {timeout:?}:\n{}",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            );
        };
        self.collect(status)
    }

    fn collect(&self, status: ExitStatus) -> Ran {
        Ran {
            status,
            stdout: std::fs::read_to_string(&self.stdout).unwrap(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap(),
        }
    }

    /// SIGTERM (stop-with-savepoint or cancel, as `--on-sigterm` says).
    fn sigterm(&self) {
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed assertion must not leave a process behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Fixture {
    fn new(name: &str, toml: &str) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let f = Fixture {
            job: dir.join("job.toml"),
            state: dir.join("state"),
            dir,
            _tmp: tmp,
            name: name.to_string(),
        };
        f.write(toml);
        f
    }

    fn write(&self, toml: &str) {
        std::fs::write(&self.job, toml).unwrap();
    }

    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = memento();
        cmd.arg("run")
            .arg(&self.job)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--json")
            .args(args)
            .current_dir(&self.dir);
        cmd
    }

    /// `memento run job.toml --json ARGS` to its end.
    fn run(&self, args: &[&str]) -> Ran {
        self.spawn(args).finish(Duration::from_secs(120))
    }

    fn spawn(&self, args: &[&str]) -> Running {
        let (stdout, stderr) = (self.dir.join("stdout.txt"), self.dir.join("stderr.txt"));
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Running {
            child,
            stdout,
            stderr,
        }
    }

    fn store_command(&self, args: &[&str]) -> Value {
        let out = memento()
            .args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "memento {args:?} failed: {stderr}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `memento snapshots list --job NAME --json`: the job's manifests.
    fn snapshots(&self) -> Vec<Value> {
        let list = self.store_command(&["snapshots", "list", "--job", &self.name, "--json"]);
        list.as_array().unwrap().clone()
    }

    /// The job's snapshots of one kind, oldest first.
    fn snapshots_of(&self, kind: &str) -> Vec<Value> {
        let mut v: Vec<Value> = self
            .snapshots()
            .into_iter()
            .filter(|m| m["kind"] == kind)
            .collect();
        v.sort_by_key(|m| m["number"].as_u64());
        v
    }

    /// `memento snapshots show ID --json`.
    fn show(&self, id: &str) -> Value {
        self.store_command(&["snapshots", "show", id, "--json"])
    }

    /// Wait until the job's dataflow runs (the sink made its staging
    /// directory), which is after the signal handlers are installed.
    fn wait_running(&self) {
        let staging = self.out().join(".staging");
        poll("the job to start", Duration::from_secs(60), || staging.exists());
    }

    /// Wait until some output is committed (a snapshot completed).
    fn wait_committed(&self) {
        let out = self.out();
        poll("a first committed part file", Duration::from_secs(60), || {
            total_lines(&committed(&out)) > 0
        });
    }
}

/// The committed output of an uninterrupted run of `toml` (in a fresh
/// directory; `name` is the job's name).
fn uninterrupted(name: &str, toml: &str) -> Committed {
    let f = Fixture::new(name, toml);
    assert_eq!(f.run(&[]).state(), "finished");
    committed(&f.out())
}

fn ids(report: &Value, kind: &str) -> Vec<String> {
    report["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == kind)
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

// ------------------------------------------------ exactly-once under kills

/// What a crash-and-resume loop did.
#[derive(Debug, Default)]
struct CrashStats {
    kills: usize,
    runs: usize,
    /// Runs started from scratch (the first, and after kills that landed
    /// before any snapshot completed).
    fresh_starts: usize,
    /// Runs that resumed from a snapshot.
    resumes: usize,
    /// Time from spawn until the first run's dataflow ran; added to the
    /// first run's kill delay so that a slow machine still gets kills
    /// mid-run.
    startup: Duration,
    /// Time from spawn until the first resumed run committed its first
    /// snapshot: the same for resumed runs, which start faster (their
    /// compiled components are cached). Using the first run's start-up for
    /// them let each eat more than its share of the input, and the job
    /// ended before its last kill on a loaded machine.
    resume_startup: Option<Duration>,
}

/// The highest snapshot number of the fixture's job in its store.
fn newest_snapshot(f: &Fixture) -> u64 {
    let dir = f.state.join("tenants/default/snapshots").join(&f.name);
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    name.strip_suffix(".json")?.rsplit_once('-')?.1.parse().ok()
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Run the job, SIGKILL it after random delays (`lo..=hi` ms after each
/// start, plus the measured start-up time of a first or a resumed run) until `kills` kills landed mid-run, resume each time with
/// `--from latest` (from scratch when there is no snapshot yet), then let
/// the last run finish. After every kill the committed output must be a
/// per-key prefix of `expected`; at the end it must equal it. The callers'
/// rates make an uninterrupted run outlast `kills × hi`, so that every kill
/// lands before the input ends.
fn crash_until_done(
    f: &Fixture,
    kills: usize,
    (lo, hi): (u64, u64),
    seed: u64,
    expected: &Committed,
) -> CrashStats {
    let mut rng = XorShift(seed);
    let mut stats = CrashStats::default();
    let mut from_scratch = true;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "no end in sight after {stats:?} (seed {seed:#x})"
        );
        assert!(stats.runs < kills * 4 + 20, "too many runs: {stats:?}");
        stats.runs += 1;
        let args: &[&str] = if from_scratch { &[] } else { &["--from", "latest"] };
        stats.fresh_starts += usize::from(from_scratch);
        let spawned = Instant::now();
        let mut running = f.spawn(args);
        if stats.runs == 1 {
            let staging = f.out().join(".staging");
            poll("the first run to start", Duration::from_secs(60), || {
                staging.exists() || matches!(running.child.try_wait(), Ok(Some(_)))
            });
            stats.startup = spawned.elapsed();
        } else if !from_scratch && stats.resume_startup.is_none() {
            let before = newest_snapshot(f);
            poll("the first resumed run to commit", Duration::from_secs(60), || {
                newest_snapshot(f) > before || matches!(running.child.try_wait(), Ok(Some(_)))
            });
            stats.resume_startup = Some(spawned.elapsed());
        }
        let startup = match (from_scratch, stats.resume_startup) {
            (false, Some(resume)) => resume,
            _ => stats.startup,
        };
        let status = if stats.kills < kills {
            let delay = (spawned + startup + rng.millis(lo, hi)).saturating_duration_since(Instant::now());
            match running.wait_for(delay) {
                Some(s) => s,
                None => {
                    running.child.kill().unwrap(); // SIGKILL
                    running.child.wait().unwrap()
                }
            }
        } else {
            running
                .wait_for(Duration::from_secs(120))
                .expect("the last run hangs")
        };
        if status.signal() == Some(libc::SIGKILL) {
            stats.kills += 1;
            stats.resumes += usize::from(!from_scratch);
            from_scratch = false;
            assert_prefix(
                &committed(&f.out()),
                expected,
                &format!("after kill {} (seed {seed:#x})", stats.kills),
            );
            continue;
        }
        let ran = running.collect(status);
        if !ran.status.success() && ran.stderr.contains("no snapshot of job") {
            // Killed before the first checkpoint completed: start over.
            from_scratch = true;
            continue;
        }
        if !from_scratch {
            stats.resumes += 1;
        }
        let state = ran.state();
        assert!(
            state == "finished" || state == "already_finished",
            "unexpected end state {state}"
        );
        assert_same_output(
            &committed(&f.out()),
            expected,
            &format!("after {stats:?} (seed {seed:#x})"),
        );
        // The store survived every crash intact.
        let fsck = memento()
            .args(["fsck", "--state-dir"])
            .arg(&f.state)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "fsck after crashes: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        eprintln!("{}: {stats:?}", f.name);
        assert!(
            stats.resumes * 2 >= stats.kills,
            "most kills should land after a checkpoint, so that runs resume: {stats:?}"
        );
        return stats;
    }
}

/// Exactly-once under real crashes, one operator: `wordcount` over a
/// bounded generated input with 300 ms checkpoints, SIGKILLed 12 times at
/// random moments and resumed with `--from latest` each time, commits
/// exactly the output of an uninterrupted run (per key, in order), and no
/// crash ever makes committed output run ahead of, or disagree with, it.
#[test]
fn exactly_once_under_sigkill_one_operator() {
    let (count, keys, seed) = (24_000, 40, 11);
    let ops = [operator("count", "wordcount", 1, &[])];
    let expected = uninterrupted(
        "eo1",
        &job_toml("eo1", &generator(count, keys, seed, None, 100), &ops, ""),
    );
    assert_same_output(
        &expected,
        &wordcount_output(count, keys, seed),
        "the uninterrupted run",
    );
    let f = Fixture::new(
        "eo1",
        &job_toml(
            "eo1",
            &generator(count, keys, seed, Some(1_000), 100),
            &ops,
            "[checkpoints]\ninterval = \"300ms\"\n",
        ),
    );
    let stats = crash_until_done(&f, 12, (250, 1800), 0x9e37_79b9_7f4a_7c15, &expected);
    assert_eq!(stats.kills, 12);
}

/// Exactly-once under real crashes with parallelism 2 and two chained
/// stateful operators: `dedup` (p = 2, a small FIFO so its state matters) →
/// `wordcount` (p = 2: two sink tasks, each aligning barriers from two
/// inputs), 250 ms checkpoints, 10 SIGKILLs.
#[test]
fn exactly_once_under_sigkill_parallel_chain() {
    let (count, keys, seed) = (24_000, 50, 5);
    let ops = [
        operator("dedup", "dedup", 2, &[("max_keys", "20")]),
        operator("count", "wordcount", 2, &[]),
    ];
    let expected = uninterrupted(
        "eo2",
        &job_toml("eo2", &generator(count, keys, seed, None, 100), &ops, ""),
    );
    assert!(total_lines(&expected) > 1000, "dedup lets enough through");
    let f = Fixture::new(
        "eo2",
        &job_toml(
            "eo2",
            &generator(count, keys, seed, Some(1_200), 100),
            &ops,
            "[checkpoints]\ninterval = \"250ms\"\n",
        ),
    );
    let stats = crash_until_done(&f, 10, (250, 1800), 0x2545_f491_4f6c_dd1d, &expected);
    assert_eq!(stats.kills, 10);
}

/// Exactly-once with the 1-second checkpoints: `wordcount` (p = 2)
/// → a pass-through (p = 1, aligning two inputs), 5 SIGKILLs late enough
/// that checkpoints complete in between.
#[test]
fn exactly_once_under_sigkill_one_second_checkpoints() {
    let (count, keys, seed) = (25_000, 30, 7);
    let ops = [
        operator("count", "wordcount", 2, &[]),
        operator("pass", "misbehave", 1, &[("mode", "none")]),
    ];
    let expected = uninterrupted(
        "eo3",
        &job_toml("eo3", &generator(count, keys, seed, None, 100), &ops, ""),
    );
    assert_same_output(
        &expected,
        &wordcount_output(count, keys, seed),
        "the uninterrupted run",
    );
    let f = Fixture::new(
        "eo3",
        &job_toml(
            "eo3",
            &generator(count, keys, seed, Some(1_400), 100),
            &ops,
            "[checkpoints]\ninterval = \"1s\"\n",
        ),
    );
    let stats = crash_until_done(&f, 5, (1300, 3000), 0x1234_5678_9abc_def1, &expected);
    assert_eq!(stats.kills, 5);
}

// ------------------------------------------------------- restart strategy

/// The plugin's call counter is not part of its canonical state, so each
/// restart gets 2,000 fresh calls; a native image would bring the count
/// back (and fail again at once), hence `format = "canonical"`.
fn failing_job(name: &str, restart: &str) -> String {
    job_toml(
        name,
        &generator(5_000, 20, 3, Some(2_500), 50),
        &[operator(
            "pass",
            "misbehave",
            1,
            &[("mode", "fail-after"), ("calls", "2000")],
        )],
        &format!("[checkpoints]\ninterval = \"200ms\"\nformat = \"canonical\"\n\n[restart]\n{restart}\n"),
    )
}

/// A plugin that traps on its 2001st call (counting from every restart)
/// makes the job restart from its newest checkpoint (`fixed`, 3 attempts);
/// the job finishes, and the pass-through output is the input exactly once.
#[test]
fn restart_strategy_fixed_resumes_from_the_checkpoint() {
    let f = Fixture::new(
        "restarts",
        &failing_job("restarts", "strategy = \"fixed\"\nattempts = 3\ndelay = \"50ms\""),
    );
    let ran = f.run(&[]);
    let report = ran.report();
    assert_eq!(report["state"]["state"], "finished", "{}", ran.stdout);
    assert!(report["restarts"].as_u64().unwrap() >= 1, "{}", ran.stdout);
    assert!(ran.stderr.contains("restarting"), "{}", ran.stderr);
    assert_same_output(
        &committed(&f.out()),
        &passthrough_output(5_000, 20, 3),
        "after restarts",
    );
}

/// With `strategy = "none"` the same trap fails the job: non-zero exit, an
/// error naming the task and the trap, the command to resume; and the
/// checkpoint it names is still in the store.
#[test]
fn restart_strategy_none_fails_and_keeps_the_checkpoint() {
    let f = Fixture::new("norestart", &failing_job("norestart", "strategy = \"none\""));
    let ran = f.run(&[]);
    let err = ran.error();
    assert!(err.contains("operator `pass`, task 0"), "{err}");
    assert!(err.contains("plugin trapped"), "{err}");
    assert!(err.contains("failing after 2000 calls"), "{err}");
    assert!(err.contains("resume with: memento run"), "{err}");
    // The error ends with the command to resume: `... --from ID`.
    let (_, id) = err
        .rsplit_once(" --from ")
        .unwrap_or_else(|| panic!("no --from in {err}"));
    let id = id.to_string();
    assert!(id.starts_with("norestart-"), "{err}");
    let checkpoints = f.snapshots_of("checkpoint");
    assert!(
        checkpoints.iter().any(|m| m["id"] == id.as_str()),
        "{id} not listed: {checkpoints:?}"
    );
    // The kept checkpoint is a working restore point and the printed
    // command works: resumed from it with a restart strategy (the operator
    // counts its calls afresh after every restore, so it gets through), the
    // job finishes with the input exactly once.
    f.write(&failing_job(
        "norestart",
        "strategy = \"fixed\"\nattempts = 3\ndelay = \"50ms\"",
    ));
    let report = f.run(&["--from", &id]).report();
    assert_eq!(report["state"]["state"], "finished");
    assert_eq!(report["restored_from"], id.as_str());
    assert_same_output(
        &committed(&f.out()),
        &passthrough_output(5_000, 20, 3),
        "resumed after the failure",
    );
}

// ------------------------------------------------------------- savepoints

/// Savepoints without periodic checkpoints, through the library API: the
/// coordinator exists although `[checkpoints]` has no interval; a manual
/// savepoint, a manual checkpoint and then a stop-with-savepoint complete
/// (one counter for all), the run ends `Stopped`, and resuming from the
/// newest snapshot (CLI, `--from latest`) gives exactly-once output; so
/// does going back to the first savepoint after the job finished.
#[test]
fn savepoints_without_periodic_checkpoints_library_api() {
    use memento::store::{SnapshotId, SnapshotKind, Trigger};
    let (count, keys, seed) = (20_000, 25, 9);
    let toml = job_toml(
        "lib",
        &generator(count, keys, seed, Some(5_000), 100),
        &[operator("count", "wordcount", 2, &[])],
        "",
    );
    let f = Fixture::new("lib", &toml);
    let host = memento::Host::open(&f.state).unwrap();
    let spec = memento::spec::JobSpec::from_toml(&toml, &f.job, &f.dir).unwrap();
    assert!(spec.checkpoints.interval.is_none());
    let job = host.load_job(spec, "default").unwrap();
    let control = job.control();
    let run = std::thread::spawn(move || job.run(memento::RunOptions::default()));
    std::thread::sleep(Duration::from_millis(300)); // mid-run (correctness does not depend on it)
    let wait = Duration::from_secs(60);
    let answer =
        |rx: crossbeam_channel::Receiver<memento::coordinator::TriggerResult>, what: &str| -> SnapshotId {
            rx.recv_timeout(wait)
                .unwrap_or_else(|e| panic!("no answer to the {what}: {e}"))
                .unwrap_or_else(|e| panic!("the {what} failed: {e}"))
        };
    let savepoint = answer(control.trigger_savepoint(None), "savepoint");
    let checkpoint = answer(control.trigger_checkpoint(), "checkpoint");
    let stop = answer(control.stop_with_savepoint(), "stop-with-savepoint");
    let report = run.join().unwrap().expect("the job stops");
    assert_eq!(
        report.state,
        Some(memento::FinalState::Stopped {
            savepoint: stop.clone()
        })
    );
    assert!(savepoint.number() < checkpoint.number() && checkpoint.number() < stop.number());
    let summary = |id: &SnapshotId| {
        let s = report.snapshots.iter().find(|s| &s.id == id);
        let s = s.unwrap_or_else(|| panic!("{id} not in the report: {:?}", report.snapshots));
        (s.kind, s.trigger)
    };
    assert_eq!(summary(&savepoint), (SnapshotKind::Savepoint, Trigger::Manual));
    assert_eq!(summary(&checkpoint), (SnapshotKind::Checkpoint, Trigger::Manual));
    assert_eq!(summary(&stop), (SnapshotKind::Savepoint, Trigger::Stop));
    assert_eq!(
        report.snapshots.len(),
        3,
        "no periodic snapshots: {:?}",
        report.snapshots
    );
    let tenant = host.store().tenant("default").unwrap();
    for id in [&savepoint, &checkpoint, &stop] {
        let m = tenant.get(id).unwrap();
        assert_eq!(m.tasks.len(), 2, "{id} has both tasks' state");
    }
    assert_eq!(tenant.get(&savepoint).unwrap().kind, SnapshotKind::Savepoint);
    let position = tenant.get(&stop).unwrap().source_positions[0].position;
    assert!(position < count, "stopped mid-run ({position})");
    let expected = wordcount_output(count, keys, seed);
    assert_prefix(&committed(&f.out()), &expected, "after the stop");
    drop(host);

    let resumed = f.run(&["--from", "latest"]);
    let report = resumed.report();
    assert_eq!(report["state"]["state"], "finished");
    assert_eq!(report["restored_from"], stop.to_string());
    assert_eq!(report["source_records"].as_u64(), Some(count - position));
    assert_same_output(&committed(&f.out()), &expected, "resumed after the stop");

    // Savepoints outlive the run: going back to the first one (taken
    // before the stop) rewinds the output committed after it, and the run
    // from there commits the uninterrupted run's output again.
    let rewound = f.run(&["--from", &savepoint.to_string()]).report();
    assert_eq!(rewound["state"]["state"], "finished");
    assert_eq!(rewound["restored_from"], savepoint.to_string());
    assert_same_output(
        &committed(&f.out()),
        &expected,
        "resumed from the first savepoint",
    );
}

fn periodic_savepoints(name: &str, policy: &str) -> Fixture {
    Fixture::new(
        name,
        &job_toml(
            name,
            &generator(10_000, 10, 1, Some(4_000), 100),
            &[operator("count", "wordcount", 1, &[])],
            &format!("[savepoints]\ninterval = \"250ms\"\n{policy}\n"),
        ),
    )
}

/// Periodic savepoints expire by count: with `max_count = 2` many are taken
/// but at most two remain, the newest among them.
#[test]
fn periodic_savepoints_expire_by_count() {
    let f = periodic_savepoints("spcount", "max_count = 2");
    let report = f.run(&[]).report();
    let taken = ids(&report, "savepoint");
    assert!(
        taken.len() >= 3,
        "only {} savepoints taken: {report}",
        taken.len()
    );
    let kept = f.snapshots_of("savepoint");
    assert!(!kept.is_empty() && kept.len() <= 2, "kept {kept:?}");
    assert!(kept.iter().all(|m| m["trigger"] == "periodic"));
    assert_eq!(
        kept.last().unwrap()["id"],
        taken.last().unwrap().as_str(),
        "the newest is kept"
    );
    // The kept ones are the newest ones.
    let newest: Vec<&str> = taken
        .iter()
        .rev()
        .take(kept.len())
        .rev()
        .map(String::as_str)
        .collect();
    let kept_ids: Vec<&str> = kept.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(kept_ids, newest);
}

/// Periodic savepoints expire by age: with `max_age = "500ms"` old ones are
/// disposed, none older than max_age (relative to the newest) remains, and
/// the newest is always kept.
#[test]
fn periodic_savepoints_expire_by_age() {
    let f = periodic_savepoints("spage", "max_age = \"500ms\"");
    let report = f.run(&[]).report();
    let taken = ids(&report, "savepoint");
    assert!(
        taken.len() >= 4,
        "only {} savepoints taken: {report}",
        taken.len()
    );
    let kept = f.snapshots_of("savepoint");
    assert!(
        !kept.is_empty() && kept.len() < taken.len(),
        "kept {} of {}",
        kept.len(),
        taken.len()
    );
    let newest = kept.last().unwrap();
    assert_eq!(newest["id"], taken.last().unwrap().as_str(), "the newest is kept");
    let newest_at = newest["created_at_ms"].as_u64().unwrap();
    for m in &kept {
        let age = newest_at - m["created_at_ms"].as_u64().unwrap();
        assert!(age <= 500, "{} is {age} ms older than the newest", m["id"]);
    }
}

/// Retention of checkpoints: with `retained = 2` a run taking many
/// checkpoints keeps exactly 2 — the newest periodic one and the
/// end-of-input record (which counts as a checkpoint).
#[test]
fn retained_checkpoints() {
    let f = Fixture::new(
        "retain",
        &job_toml(
            "retain",
            &generator(8_000, 10, 2, Some(4_000), 100),
            &[operator("count", "wordcount", 1, &[])],
            "[checkpoints]\ninterval = \"100ms\"\nretained = 2\n",
        ),
    );
    let report = f.run(&[]).report();
    let taken = ids(&report, "checkpoint");
    assert!(taken.len() >= 5, "only {} checkpoints: {report}", taken.len());
    let kept = f.snapshots_of("checkpoint");
    assert_eq!(kept.len(), 2, "{kept:#?}");
    assert_eq!(
        kept[0]["id"],
        taken.last().unwrap().as_str(),
        "the newest periodic one"
    );
    assert_eq!(kept[1]["trigger"], "end_of_input");
    assert_eq!(kept[1]["extra"]["finished"], true);
}

/// Persistent checkpoints survive cancel: SIGTERM with `--on-sigterm
/// cancel` mid-run ends the job (exit 0, state cancelled), its checkpoints
/// stay listed, and `--from latest` then finishes with exactly-once output.
#[test]
fn persistent_checkpoints_survive_cancel() {
    let (count, keys, seed) = (16_000, 20, 4);
    let f = Fixture::new(
        "persist",
        &job_toml(
            "persist",
            &generator(count, keys, seed, Some(4_000), 100),
            &[operator("count", "wordcount", 1, &[])],
            "[checkpoints]\ninterval = \"200ms\"\npersistent = true\n",
        ),
    );
    let running = f.spawn(&["--on-sigterm", "cancel"]);
    f.wait_committed();
    running.sigterm();
    let ran = running.finish(Duration::from_secs(60));
    assert_eq!(ran.state(), "cancelled", "{}", ran.stdout);
    let checkpoints = f.snapshots_of("checkpoint");
    assert!(!checkpoints.is_empty(), "checkpoints are gone after cancel");
    assert!(checkpoints.iter().all(|m| m["extra"].get("finished").is_none()));
    let resumed = f.run(&["--from", "latest"]);
    let report = resumed.report();
    assert_eq!(report["state"]["state"], "finished");
    assert_eq!(report["restored_from"], checkpoints.last().unwrap()["id"]);
    assert_same_output(
        &committed(&f.out()),
        &wordcount_output(count, keys, seed),
        "resumed after cancel",
    );
}

/// Without `persistent`, a cancel deletes the job's checkpoints.
#[test]
fn non_persistent_checkpoints_go_with_cancel() {
    let f = Fixture::new(
        "ephemeral",
        &job_toml(
            "ephemeral",
            &generator(16_000, 20, 4, Some(4_000), 100),
            &[operator("count", "wordcount", 1, &[])],
            "[checkpoints]\ninterval = \"200ms\"\npersistent = false\n",
        ),
    );
    let running = f.spawn(&["--on-sigterm", "cancel"]);
    f.wait_committed();
    running.sigterm();
    let ran = running.finish(Duration::from_secs(60));
    assert_eq!(ran.state(), "cancelled", "{}", ran.stdout);
    assert!(
        !ids(&ran.report(), "checkpoint").is_empty(),
        "checkpoints were taken"
    );
    assert_eq!(f.snapshots_of("checkpoint"), Vec::<Value>::new());
    let err = f.run(&["--from", "latest"]).error();
    assert!(err.contains("no snapshot of job `ephemeral`"), "{err}");
}

/// Stop-with-savepoint: SIGTERM (the default action) stops the sources and
/// takes a final savepoint: exit 0, state `stopped` naming a savepoint with
/// trigger `stop`; resuming from it completes with the output of an
/// uninterrupted run. No periodic checkpoints are configured.
#[test]
fn stop_with_savepoint_on_sigterm_and_resume() {
    let (count, keys, seed) = (16_000, 30, 8);
    let f = Fixture::new(
        "stop",
        &job_toml(
            "stop",
            &generator(count, keys, seed, Some(4_000), 100),
            &[operator("count", "wordcount", 2, &[])],
            "",
        ),
    );
    let running = f.spawn(&[]);
    f.wait_running();
    std::thread::sleep(Duration::from_millis(300)); // some progress first
    running.sigterm();
    let ran = running.finish(Duration::from_secs(60));
    let report = ran.report();
    assert_eq!(report["state"]["state"], "stopped", "{}", ran.stdout);
    let id = report["state"]["savepoint"].as_str().unwrap().to_string();
    let m = f.show(&id);
    assert_eq!(m["kind"], "savepoint");
    assert_eq!(m["trigger"], "stop");
    let position = m["source_positions"][0]["position"].as_u64().unwrap();
    assert!(
        position < count,
        "stopped before the end of the input ({position})"
    );
    // What was committed by the stop is consistent, and resuming finishes.
    let expected = wordcount_output(count, keys, seed);
    assert_prefix(&committed(&f.out()), &expected, "after the stop");
    let resumed = f.run(&["--from", &id]).report();
    assert_eq!(resumed["state"]["state"], "finished");
    assert_eq!(resumed["restored_from"], id.as_str());
    assert_same_output(&committed(&f.out()), &expected, "resumed from the stop savepoint");
}

/// A savepoint resumes into a new, missing output directory (the job moved,
/// or the old output was archived): the run creates it and writes what
/// comes after the savepoint; the old directory and the new one together
/// hold exactly the uninterrupted run's output.
#[test]
fn resume_into_a_new_output_directory() {
    let (count, keys, seed) = (12_000, 20, 9);
    let f = Fixture::new(
        "moved",
        &job_toml(
            "moved",
            &generator(count, keys, seed, Some(4_000), 100),
            &[operator("count", "wordcount", 2, &[])],
            "",
        ),
    );
    let running = f.spawn(&[]);
    f.wait_running();
    std::thread::sleep(Duration::from_millis(300));
    running.sigterm();
    let report = running.finish(Duration::from_secs(60)).report();
    let id = report["state"]["savepoint"].as_str().unwrap().to_string();
    let archived = f.dir.join("out-before");
    std::fs::rename(f.out(), &archived).unwrap();
    let ran = f.run(&["--from", &id]);
    let resumed = ran.report();
    assert_eq!(resumed["state"]["state"], "finished");
    // The savepoint's output was committed in the old directory: nothing
    // is missing from the new one.
    assert!(
        !ran.stderr.contains("pre-committed output is missing"),
        "{}",
        ran.stderr
    );
    for entry in std::fs::read_dir(&archived).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), f.out().join(entry.file_name())).unwrap();
        }
    }
    let expected = wordcount_output(count, keys, seed);
    assert_same_output(
        &committed(&f.out()),
        &expected,
        "archived output and the resumed run's",
    );
}

/// A run started from scratch discards earlier runs' output, so their
/// snapshots must stop being restore points for `latest`: a fresh run that
/// fails before its first snapshot leaves nothing to resume (not the old,
/// finished run's record, which would "resume" to no output at all), and
/// offers no old snapshot in its error. The old snapshots stay listed.
#[test]
fn starting_over_fences_off_earlier_runs() {
    let (count, keys, seed) = (6_000, 20, 4);
    let good = job_toml(
        "over",
        &generator(count, keys, seed, Some(6_000), 100),
        &[operator("count", "wordcount", 2, &[])],
        "[checkpoints]\ninterval = \"200ms\"\n",
    );
    let f = Fixture::new("over", &good);
    assert_eq!(f.run(&[]).state(), "finished");
    let before = f.snapshots();
    assert!(!before.is_empty());
    // A fresh run with a config `open` refuses: it fails at once, after
    // discarding the first run's output.
    f.write(&job_toml(
        "over",
        &generator(count, keys, seed, Some(6_000), 100),
        &[operator("count", "wordcount", 2, &[("split", "bogus")])],
        "[checkpoints]\ninterval = \"200ms\"\n",
    ));
    let err = f.run(&[]).error();
    assert!(err.contains("config `split`"), "{err}");
    assert!(!err.contains("--from"), "offers an earlier run's snapshot: {err}");
    f.write(&good);
    let err = f.run(&["--from", "latest"]).error();
    assert!(err.contains("no snapshot of job `over` to resume from"), "{err}");
    assert!(
        f.snapshots().len() >= before.len(),
        "earlier snapshots stay listed"
    );
    // Started over properly, it finishes with the whole output.
    assert_eq!(f.run(&[]).state(), "finished");
    assert_same_output(
        &committed(&f.out()),
        &wordcount_output(count, keys, seed),
        "started over",
    );
}

/// One run of a job per store: a second `memento run` of the same job on
/// the same state directory is refused while the first runs, and the
/// first's output is unharmed.
#[test]
fn a_second_run_of_a_running_job_is_refused() {
    let (count, keys, seed) = (12_000, 20, 6);
    let f = Fixture::new(
        "twice",
        &job_toml(
            "twice",
            &generator(count, keys, seed, Some(4_000), 100),
            &[operator("count", "wordcount", 2, &[])],
            "[checkpoints]\ninterval = \"300ms\"\n",
        ),
    );
    let first = f.spawn(&[]);
    f.wait_running();
    for args in [&[][..], &["--from", "latest"][..]] {
        // Not `f.run`: its stdout and stderr files are the first run's.
        let second = f.command(args).output().unwrap();
        let err = String::from_utf8_lossy(&second.stderr);
        assert!(!second.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("error: job `twice` is already running on this store"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(first.finish(Duration::from_secs(60)).state(), "finished");
    assert_same_output(
        &committed(&f.out()),
        &wordcount_output(count, keys, seed),
        "the first run",
    );
}

/// Every trigger gets an answer, even one sent while the job fails or after
/// it ended: savepoints requested in a tight loop around the failure of a
/// job all resolve (completed, or failed with a reason), none waits forever.
#[test]
fn triggers_around_the_end_of_a_job_are_all_answered() {
    let toml = failing_job("answered", "strategy = \"none\"");
    let f = Fixture::new("answered", &toml);
    let host = memento::Host::open(&f.state).unwrap();
    let spec = memento::spec::JobSpec::from_toml(&toml, &f.job, &f.dir).unwrap();
    let job = host.load_job(spec, "default").unwrap();
    let control = job.control();
    let run = std::thread::spawn(move || job.run(memento::RunOptions::default()));
    let mut pending = Vec::new();
    while !run.is_finished() {
        pending.push(control.trigger_savepoint(None));
        std::thread::sleep(Duration::from_millis(5));
    }
    for _ in 0..10 {
        pending.push(control.trigger_savepoint(None));
    }
    assert!(run.join().unwrap().is_err(), "the job fails");
    let (mut completed, mut failed) = (0, 0);
    let after_the_end = pending.len() - 10;
    for (i, rx) in pending.into_iter().enumerate() {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(_)) => completed += 1,
            Ok(Err(reason)) => {
                if i >= after_the_end {
                    assert_eq!(reason, memento::coordinator::TriggerError::NotRunning);
                }
                failed += 1;
            }
            Err(e) => panic!("trigger {i} was never answered: {e}"),
        }
    }
    assert!(
        failed >= 10,
        "the triggers after the end fail ({completed} completed, {failed} failed)"
    );
}

// ------------------------------------------ timeouts and tolerable failures

/// `snapshot-state` is slow or declines: canonical checkpoints call it.
fn slow_or_declining(name: &str, config: (&str, &str), interval: &str, tolerable: u32) -> Fixture {
    Fixture::new(
        name,
        &job_toml(
            name,
            &generator(6_000, 10, 6, Some(3_000), 100),
            &[operator("pass", "misbehave", 1, &[("mode", "none"), config])],
            &format!(
                "[checkpoints]\ninterval = \"{interval}\"\nformat = \"canonical\"\ntimeout = \"100ms\"\ntolerable_failures = {tolerable}\n\n\
                 [restart]\nstrategy = \"none\"\n"
            ),
        ),
    )
}

/// A snapshot slower than `timeout` (and one the operator declines) fails
/// the job when `tolerable_failures = 0`, with an error that says why.
#[test]
fn snapshot_timeouts_and_declines_fail_the_job_beyond_tolerable_failures() {
    let f = slow_or_declining("slow", ("snapshot_ms", "400"), "200ms", 0);
    let err = f.run(&[]).error();
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains("tolerable_failures = 0"), "{err}");

    let f = slow_or_declining("declining", ("decline", "true"), "200ms", 0);
    let err = f.run(&[]).error();
    assert!(err.contains("declined"), "{err}");
    assert!(err.contains("declining on purpose"), "{err}");
    assert!(err.contains("tolerable_failures = 0"), "{err}");
}

/// With enough `tolerable_failures` the same jobs finish, report their
/// failed snapshots, and lose no output (files of failed snapshots are
/// committed by a later one). The interval leaves the task time to process
/// between two (slow) captures; see the next test for when it does not.
#[test]
fn tolerated_snapshot_failures_let_the_job_finish() {
    for (name, config) in [
        ("slowok", ("snapshot_ms", "400")),
        ("declineok", ("decline", "true")),
    ] {
        let f = slow_or_declining(name, config, "500ms", 1000);
        let ran = f.run(&[]);
        let report = ran.report();
        assert_eq!(report["state"]["state"], "finished", "{name}");
        assert!(
            report["failed_snapshots"].as_u64().unwrap() > 0,
            "{name}: {}",
            ran.stdout
        );
        assert!(
            ids(&report, "checkpoint").len() <= 1,
            "{name}: only the final record completes"
        );
        assert_same_output(&committed(&f.out()), &passthrough_output(6_000, 10, 6), name);
    }
}

/// Snapshots that time out keep failing, tolerated, while the job goes on:
/// here a capture takes 400 ms, the timeout is 100 ms and the next
/// checkpoint is triggered 200 ms after a failure. The aborted snapshots'
/// barriers must not keep the task busy capturing state nobody will use;
/// the job must still get through its 2 s of input.
#[test]
fn timed_out_snapshots_do_not_starve_the_job() {
    let f = slow_or_declining("starve", ("snapshot_ms", "400"), "200ms", 1000);
    let ran = f.spawn(&[]).finish(Duration::from_secs(60));
    let report = ran.report();
    assert_eq!(report["state"]["state"], "finished");
    assert!(report["failed_snapshots"].as_u64().unwrap() > 0);
    assert_same_output(&committed(&f.out()), &passthrough_output(6_000, 10, 6), "starve");
}

// ------------------------------------------------- plugin version upgrade

/// A canonical savepoint restores into a newer plugin version: wordcount v1
/// is stopped with a savepoint (SIGTERM), the job file switched to
/// `wordcount-v2` (an extra state field `total`, state version 2), resumed
/// from the savepoint: per-key counts continue exactly where v1 left off,
/// and v2's new field starts from its serde default.
#[test]
fn canonical_savepoint_restores_into_a_newer_plugin() {
    let (count, keys, seed) = (16_000, 30, 12);
    let v1 = |rate| {
        job_toml(
            "upgrade",
            &generator(count, keys, seed, rate, 100),
            &[operator("count", "wordcount", 1, &[])],
            "",
        )
    };
    let expected = uninterrupted("upgrade", &v1(None));
    let f = Fixture::new("upgrade", &v1(Some(4_000)));
    let running = f.spawn(&[]);
    f.wait_running();
    std::thread::sleep(Duration::from_millis(500));
    running.sigterm();
    let report = running.finish(Duration::from_secs(60)).report();
    assert_eq!(report["state"]["state"], "stopped");
    let id = report["state"]["savepoint"].as_str().unwrap().to_string();
    let m = f.show(&id);
    assert_eq!(m["format"], "canonical");
    let position = m["source_positions"][0]["position"].as_u64().unwrap();
    assert!(position > 0 && position < count, "savepoint mid-run ({position})");

    f.write(&v1(None).replace(
        &toml_path(&plugin("wordcount")),
        &toml_path(&plugin("wordcount-v2")),
    ));
    let ran = f.run(&["--from", &id]);
    let report = ran.report();
    assert_eq!(report["state"]["state"], "finished");
    assert_same_output(&committed(&f.out()), &expected, "v1 savepoint resumed by v2");
    assert!(
        ran.stderr
            .contains(&format!("wordcount-v2 total {}", count - position)),
        "v2's new field counts the events since the restore:\n{}",
        ran.stderr
    );
}

// ---------------------------------------------------------------- refusals

/// `--from` is refused, with a one-line error and a non-zero exit, for a
/// snapshot of another job, a snapshot taken with another parallelism,
/// `latest` when the job has no snapshot, a malformed id and an unknown id.
#[test]
fn resume_refusals() {
    let ops = |p| [operator("count", "wordcount", p, &[])];
    let checkpointed = |name: &str, p| {
        job_toml(
            name,
            &generator(3_000, 10, 1, Some(3_000), 100),
            &ops(p),
            "[checkpoints]\ninterval = \"100ms\"\nretained = 10\n",
        )
    };
    let f = Fixture::new("alpha", &checkpointed("alpha", 1));
    f.run(&[]).ok();
    let checkpoints = f.snapshots_of("checkpoint");
    let periodic = checkpoints
        .iter()
        .find(|m| m["trigger"] == "periodic")
        .unwrap_or_else(|| panic!("no periodic checkpoint: {checkpoints:?}"))["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Another job, same store.
    let other = f.dir.join("other.toml");
    std::fs::write(&other, checkpointed("beta", 1)).unwrap();
    let beta = |args: &[&str]| {
        let out = memento()
            .arg("run")
            .arg(&other)
            .arg("--state-dir")
            .arg(&f.state)
            .args(args)
            .current_dir(&f.dir)
            .output()
            .unwrap();
        Ran {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    let err = beta(&["--from", &periodic]).error();
    assert!(err.contains("belongs to job `alpha`"), "{err}");
    assert!(err.contains(&periodic), "{err}");

    // Same job, other parallelism.
    f.write(&checkpointed("alpha", 2));
    let err = f.run(&["--from", &periodic]).error();
    assert!(err.contains("parallelism"), "{err}");
    assert!(err.contains(&periodic), "{err}");
    assert!(
        !err.contains("resume with"),
        "no hint that would fail the same way: {err}"
    );
    // Through the library the same refusal comes before anything runs.
    let host = memento::Host::open(&f.state).unwrap();
    let spec = memento::spec::JobSpec::from_toml(&checkpointed("alpha", 2), &f.job, &f.dir).unwrap();
    let job = host.load_job(spec, "default").unwrap();
    let id = memento::store::SnapshotId::parse(&periodic).unwrap();
    let err = job
        .resolve_start(&memento::StartFrom::Snapshot(id))
        .unwrap_err()
        .to_string();
    assert!(err.contains("parallelism 2 in the job file"), "{err}");

    // No snapshot at all.
    let err = beta(&["--from", "latest"]).error();
    assert!(err.contains("no snapshot of job `beta`"), "{err}");

    // A malformed id and an unknown one.
    let err = f.run(&["--from", "nonsense-id!"]).error();
    assert!(err.contains("nonsense-id!"), "{err}");
    assert!(err.contains("snapshot id"), "{err}");
    let err = f.run(&["--from", "alpha-999999"]).error();
    assert!(err.contains("alpha-999999"), "{err}");
}

/// A native checkpoint cannot start the job once its plugin changed: the
/// refusal comes before the (new) output directory is touched, and offers
/// the newest older snapshot that can start it -- the canonical savepoint
/// behind the native checkpoints, not the next native one -- which then
/// resumes with exactly-once output and no warning about output it does
/// not hold. Without such a snapshot the error says so.
#[test]
fn a_changed_plugin_is_offered_a_snapshot_that_can_restore() {
    let (count, keys, seed) = (12_000, 20, 21);
    let job = |plugin_name: &str, checkpoints: &str| {
        job_toml(
            "native-upgrade",
            &generator(count, keys, seed, Some(4_000), 100),
            &[operator("count", plugin_name, 1, &[])],
            &format!("[checkpoints]\n{checkpoints}retained = 100\nformat = \"native\"\n"),
        )
    };
    let v1 = job("wordcount", "interval = \"100ms\"\n");
    let f = Fixture::new("native-upgrade", &v1);
    // A canonical savepoint (the stop's), then native checkpoints after it.
    let running = f.spawn(&[]);
    f.wait_committed();
    running.sigterm();
    let savepoint = running.finish(Duration::from_secs(60)).report()["state"]["savepoint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(f.show(&savepoint)["format"], "canonical");
    let savepoint_number = f.show(&savepoint)["number"].as_u64();
    let after = |m: &Value| m["number"].as_u64() > savepoint_number;
    let running = f.spawn(&["--from", &savepoint, "--on-sigterm", "cancel"]);
    poll(
        "two native checkpoints after the savepoint",
        Duration::from_secs(60),
        || {
            f.snapshots_of("checkpoint")
                .iter()
                .filter(|m| after(m) && m["format"] == "native")
                .count()
                >= 2
        },
    );
    running.sigterm();
    assert_eq!(running.finish(Duration::from_secs(60)).state(), "cancelled");
    let newest = f
        .snapshots()
        .into_iter()
        .max_by_key(|m| m["number"].as_u64())
        .unwrap();
    assert_eq!(newest["format"], "native", "{newest}");
    let newest = newest["id"].as_str().unwrap().to_string();

    // The plugin changes and the output moves away.
    let archived = f.dir.join("out-before");
    std::fs::rename(f.out(), &archived).unwrap();
    f.write(&job("wordcount-v2", ""));
    let refused = f.run(&["--from", "latest"]);
    let err = refused.error();
    assert!(
        err.starts_with(&format!(
            "error: cannot start from snapshot {newest}: it holds a native image of operator `count`"
        )),
        "{err}"
    );
    assert!(
        err.ends_with(&format!(
            "; the newest older snapshot that can start the job as it is now is {savepoint}; \
             resume with: memento run {} --from {savepoint}",
            f.job.display()
        )),
        "{err}"
    );
    assert!(
        !refused.stderr.contains("pre-committed output is missing"),
        "{}",
        refused.stderr
    );
    assert!(!f.out().exists(), "the refused run left the output alone");

    // The offered snapshot restores: archived and new output together are
    // the uninterrupted run's, and nothing was reported missing.
    let resumed = f.run(&["--from", &savepoint]);
    assert_eq!(resumed.state(), "finished");
    assert!(
        !resumed.stderr.contains("pre-committed output is missing"),
        "{}",
        resumed.stderr
    );
    // What the savepoint committed (the archive also holds the output of
    // the cancelled run after it, which the resumed run wrote again).
    let next_seq: BTreeMap<u64, u64> = f.show(&savepoint)["sink_commit"]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["task"].as_u64().unwrap(), t["next_seq"].as_u64().unwrap()))
        .collect();
    for entry in std::fs::read_dir(&archived).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let Some((task, seq)) = name
            .strip_prefix("part-")
            .and_then(|r| r.split_once('-'))
            .map(|(t, s)| (t.parse::<u64>().unwrap(), s.parse::<u64>().unwrap()))
        else {
            continue;
        };
        if next_seq.get(&task).is_some_and(|n| seq < *n) {
            std::fs::copy(archived.join(&name), f.out().join(&name)).unwrap();
        }
    }
    assert_same_output(
        &committed(&f.out()),
        &wordcount_output(count, keys, seed),
        "the savepoint's archived output and the run resumed by v2",
    );

    // Without the savepoint no older snapshot can start the job.
    let disposed = memento()
        .args(["savepoint", "dispose", &savepoint, "--state-dir"])
        .arg(&f.state)
        .output()
        .unwrap();
    assert!(
        disposed.status.success(),
        "{}",
        String::from_utf8_lossy(&disposed.stderr)
    );
    let err = f.run(&["--from", &newest]).error();
    assert!(
        err.ends_with("; no older snapshot can start the job as it is now"),
        "{err}"
    );
}

/// The end-of-input record of one job is no restore point for another: a
/// job resumed `--from` another job's finished record is refused like any
/// other snapshot of a different job (and commits nothing of it).
#[test]
fn resume_refuses_another_jobs_finished_record() {
    let job = |name: &str| {
        job_toml(
            name,
            &generator(1_000, 10, 1, None, 100),
            &[operator("count", "wordcount", 1, &[])],
            "",
        )
    };
    let f = Fixture::new("gamma", &job("gamma"));
    f.run(&[]).ok();
    let finished = f.snapshots_of("checkpoint");
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["extra"]["finished"], true);
    let id = finished[0]["id"].as_str().unwrap().to_string();
    f.write(&job("delta"));
    let err = f.run(&["--from", &id]).error();
    assert!(err.contains("belongs to job `gamma`"), "{err}");
}

/// A canonical state larger than wasmtime's default 128 MiB per-call copy
/// budget checkpoints and restores: the budget follows the memory limit.
#[test]
fn canonical_state_above_128_mib_checkpoints_and_restores() {
    let toml = job_toml(
        "big",
        &generator(40, 4, 1, Some(20), 1),
        &[operator(
            "ballast",
            "ballast",
            1,
            &[("state_mib", "160"), ("dirty_fraction", "0.0001")],
        )],
        "[checkpoints]\ninterval = \"500ms\"\nformat = \"canonical\"\nretained = 100\n[limits]\nmemory = \"1GiB\"\ncall_timeout = \"60s\"\n",
    );
    let fx = Fixture::new("big", &toml);
    let report = fx.run(&[]).report();
    assert_eq!(report["failed_snapshots"], 0, "{report}");
    let snapshots = report["snapshots"].as_array().unwrap();
    let periodic: Vec<&Value> = snapshots.iter().filter(|s| s["trigger"] == "periodic").collect();
    assert!(!periodic.is_empty(), "no checkpoint completed: {report}");
    assert!(
        periodic[0]["logical_bytes"].as_u64().unwrap() > 160 << 20,
        "{report}"
    );
    // Restoring it copies the state back into a fresh instance.
    let id = periodic[0]["id"].as_str().unwrap().to_string();
    let again = fx.run(&["--from", &id]).report();
    assert_eq!(again["restored_from"], id.as_str(), "{again}");
    assert_eq!(again["state"]["state"], "finished", "{again}");
}

/// A source that waits (a generator at 0.001 events per second) still
/// takes the stop: SIGTERM stops the job with a savepoint at once instead
/// of after the source's next batch, 10,000 seconds away.
#[test]
fn a_waiting_source_still_stops_on_sigterm() {
    let f = Fixture::new(
        "slow",
        &job_toml(
            "slow",
            "[source]\ntype = \"generator\"\nrate = 0.001\nbatch = 10\n",
            &[operator("count", "wordcount", 1, &[])],
            "",
        ),
    );
    let running = f.spawn(&[]);
    f.wait_running();
    running.sigterm();
    let ran = running.finish(Duration::from_secs(60));
    let report = ran.report();
    assert_eq!(report["state"]["state"], "stopped", "{}", ran.stdout);
    let id = report["state"]["savepoint"].as_str().unwrap().to_string();
    let m = f.show(&id);
    assert_eq!(
        m["source_positions"][0]["position"], 10,
        "the first batch, nothing since"
    );
}
