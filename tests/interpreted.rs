//! End-to-end tests of the Python and JavaScript example operators
//! (`plugins/python-wordcount`, `plugins/js-wordcount`) through `memento
//! run`: they count exactly like the Rust `wordcount`, resume exactly-once
//! from canonical checkpoints after SIGKILLs, and an exception that fails a
//! task shows its type and message.
//!
//! They need componentize-py and componentize-js (crates/plugins builds the
//! examples only where those are installed). Without them each test says so
//! in one line and passes, unless `MEMENTO_REQUIRE_INTERPRETED=1` (CI sets
//! it), where it fails instead: CI must not go green without running them.
//!
//! Every run shares one compiled-component cache directory under cargo's
//! test scratch directory, so each component is compiled once per engine
//! configuration, not once per run (a 12–18 MB interpreter takes 10–40 s to
//! compile); concurrent tests writing the same entry is part of what the
//! cache must survive.

mod common;

use common::memento;
use common::output::{Committed, assert_prefix, assert_same_output, committed, wordcount_output};

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Set to `1` to make these tests fail, instead of skipping, where the
/// Python and JavaScript examples were not built.
const REQUIRE_ENV: &str = "MEMENTO_REQUIRE_INTERPRETED";

/// The built example, or `None` after one line saying why it is skipped;
/// panics instead under `MEMENTO_REQUIRE_INTERPRETED=1`.
fn component(name: &str, test: &str) -> Option<PathBuf> {
    match memento_plugins::interpreted(name) {
        Ok(path) => Some(path),
        Err(why) => {
            if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
                panic!("{name} was not built ({why}) but {REQUIRE_ENV}=1 requires it");
            }
            eprintln!("skipped {test}: {name} was not built: {why}");
            None
        }
    }
}

fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("interpreted-component-cache")
}

struct XorShift(u64);

impl XorShift {
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        Duration::from_millis(lo + x % (hi - lo + 1))
    }
}

/// A job file in a temporary directory, run by `memento run`.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

/// One generated-input job through `component` (parallelism 1) into a
/// `file` sink, with canonical checkpoints every 300 ms.
fn fixture(
    name: &str,
    component: &Path,
    (count, keys, seed): (u64, u64, u64),
    rate: Option<u64>,
    config: &str,
) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let rate = rate.map(|r| format!("rate = {r}\n")).unwrap_or_default();
    std::fs::write(
        dir.join("job.toml"),
        format!(
            "name = \"{name}\"\n\
             [source]\ntype = \"generator\"\ncount = {count}\nkeys = {keys}\nseed = {seed}\nbatch = 100\n{rate}\
             [[operators]]\nname = \"count\"\nplugin = \"{}\"\n{config}\n\
             [sink]\ntype = \"file\"\npath = \"out\"\n\
             [checkpoints]\ninterval = \"300ms\"\nformat = \"canonical\"\n\
             [restart]\nstrategy = \"none\"\n",
            common::toml_path(component)
        ),
    )
    .unwrap();
    Fixture { _tmp: tmp, dir }
}

/// A finished run: exit status, stdout (the `--json` report), stderr.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn state(&self) -> String {
        let report: serde_json::Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr: {}", self.stderr));
        report["state"]["state"].as_str().unwrap_or_default().to_string()
    }
}

impl Fixture {
    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    fn spawn(&self, args: &[&str]) -> Child {
        memento()
            .arg("run")
            .arg(self.dir.join("job.toml"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--cache-dir")
            .arg(cache_dir())
            .arg("--json")
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.dir.join("stdout.txt")).unwrap())
            .stderr(std::fs::File::create(self.dir.join("stderr.txt")).unwrap())
            .spawn()
            .unwrap()
    }

    fn collect(&self, status: ExitStatus) -> Ran {
        Ran {
            status,
            stdout: std::fs::read_to_string(self.dir.join("stdout.txt")).unwrap(),
            stderr: std::fs::read_to_string(self.dir.join("stderr.txt")).unwrap(),
        }
    }

    /// Run to the end (at most `timeout`, which covers a first compile).
    fn run(&self, args: &[&str], timeout: Duration) -> Ran {
        let mut child = self.spawn(args);
        let status = wait(&mut child, timeout).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("memento run did not end within {timeout:?}")
        });
        self.collect(status)
    }
}

/// The child's exit status if it ends within `d`.
fn wait(child: &mut Child, d: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + d;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Same input, same output as the Rust `wordcount` (which
/// `wordcount_output` describes), with canonical checkpoints taken on the
/// way.
fn counts_like_rust(name: &str, test: &str) {
    let Some(component) = component(name, test) else {
        return;
    };
    let input = (6_000, 40, 3);
    let f = fixture("same", &component, input, None, "");
    let ran = f.run(&[], Duration::from_secs(300));
    assert!(ran.status.success(), "{name}: {}", ran.stderr);
    assert_eq!(ran.state(), "finished");
    let (count, keys, seed) = input;
    assert_same_output(&committed(&f.out()), &wordcount_output(count, keys, seed), name);
}

#[test]
fn python_counts_like_the_rust_wordcount() {
    counts_like_rust("python-wordcount", "python_counts_like_the_rust_wordcount");
}

#[test]
fn js_counts_like_the_rust_wordcount() {
    counts_like_rust("js-wordcount", "js_counts_like_the_rust_wordcount");
}

/// SIGKILL a rate-limited run `kills` times at random moments, resuming
/// with `--from latest` each time (from scratch while no checkpoint
/// exists), then let it finish: committed output is a per-key prefix of
/// the expected one after every kill and equal to it at the end, and fsck
/// finds the store intact.
fn exactly_once_under_sigkill(name: &str, test: &str, seed: u64) {
    let Some(component) = component(name, test) else {
        return;
    };
    let (count, keys, gen_seed) = (12_000, 30, 9);
    let expected: Committed = wordcount_output(count, keys, gen_seed);
    // Compile once (or hit the shared cache) before the clock matters.
    let warm = fixture("warm", &component, (10, 2, 1), None, "");
    assert!(warm.run(&[], Duration::from_secs(300)).status.success());

    let f = fixture("eo", &component, (count, keys, gen_seed), Some(1_000), "");
    let kills_wanted = 8;
    let mut rng = XorShift(seed);
    let (mut kills, mut resumes, mut runs) = (0, 0, 0);
    let mut from_scratch = true;
    let mut startup = Duration::ZERO;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "{name}: no end in sight"
        );
        runs += 1;
        assert!(runs < kills_wanted * 4 + 20, "{name}: too many runs");
        let args: &[&str] = if from_scratch { &[] } else { &["--from", "latest"] };
        let spawned = Instant::now();
        let mut child = f.spawn(args);
        if runs == 1 {
            let staging = f.out().join(".staging");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !staging.exists() && child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "{name}: the first run does not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            startup = spawned.elapsed();
        }
        let status = if kills < kills_wanted {
            let delay =
                (spawned + startup + rng.millis(300, 1_500)).saturating_duration_since(Instant::now());
            match wait(&mut child, delay) {
                Some(s) => s,
                None => {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap()
                }
            }
        } else {
            wait(&mut child, Duration::from_secs(120)).expect("the last run hangs")
        };
        if status.signal() == Some(libc::SIGKILL) {
            kills += 1;
            resumes += usize::from(!from_scratch);
            from_scratch = false;
            assert_prefix(
                &committed(&f.out()),
                &expected,
                &format!("{name}: after kill {kills}"),
            );
            continue;
        }
        let ran = f.collect(status);
        if !ran.status.success() && ran.stderr.contains("no snapshot of job") {
            from_scratch = true;
            continue;
        }
        assert!(ran.status.success(), "{name}: {}", ran.stderr);
        let state = ran.state();
        assert!(
            state == "finished" || state == "already_finished",
            "{name}: end state {state}"
        );
        break;
    }
    assert_same_output(
        &committed(&f.out()),
        &expected,
        &format!("{name} after {kills} kills, {resumes} resumes"),
    );
    let fsck = memento()
        .args(["fsck", "--state-dir"])
        .arg(f.dir.join("state"))
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    eprintln!("{name}: {kills} kills, {resumes} resumes, {runs} runs, start-up {startup:?}");
    assert_eq!(kills, kills_wanted);
    assert!(
        resumes * 2 >= kills,
        "{name}: most kills should land after a checkpoint ({resumes} resumes)"
    );
}

#[test]
fn python_exactly_once_under_sigkill() {
    exactly_once_under_sigkill(
        "python-wordcount",
        "python_exactly_once_under_sigkill",
        0x51ed_270b_2a4c_9e11,
    );
}

#[test]
fn js_exactly_once_under_sigkill() {
    exactly_once_under_sigkill(
        "js-wordcount",
        "js_exactly_once_under_sigkill",
        0x2f6b_d8a1_7c3e_5b09,
    );
}

/// An exception thrown in `process` fails the task with an error line that
/// names its type and message (config `fail_on` makes the examples throw).
fn exception_shows_type_and_message(name: &str, test: &str, expected: &str) {
    let Some(component) = component(name, test) else {
        return;
    };
    let f = fixture(
        "fails",
        &component,
        (500, 10, 1),
        None,
        "[operators.config]\nfail_on = \"key-7\"\n",
    );
    let ran = f.run(&[], Duration::from_secs(300));
    assert!(!ran.status.success(), "{name}: the job should fail");
    let line = ran
        .stderr
        .lines()
        .rfind(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{name}: no error line in {}", ran.stderr));
    assert!(line.contains("operator `count`, task 0"), "{line}");
    assert!(line.contains(expected), "{name}: {line}");
}

#[test]
fn python_exception_shows_its_type_and_message() {
    exception_shows_type_and_message(
        "python-wordcount",
        "python_exception_shows_its_type_and_message",
        "ValueError: fail_on key 'key-7' arrived",
    );
}

#[test]
fn js_exception_shows_its_type_and_message() {
    exception_shows_type_and_message(
        "js-wordcount",
        "js_exception_shows_its_type_and_message",
        "TypeError: fail_on key \"key-7\" arrived",
    );
}
