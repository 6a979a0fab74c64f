//! End-to-end tests of rescaling (issue 14): a job whose operator keeps
//! its state in `memento_guest::KeyedState` resumes from savepoints and
//! checkpoints at another parallelism, killed at random moments on the
//! way, and commits exactly the counts of an uninterrupted run at
//! parallelism 1; task-wide state, native images and too many tasks are
//! refused with one line; snapshots from before keyed state still restore
//! at their own parallelism; `memento rescale` does it in one call.
//!
//! They drive the real `memento` binary with the real plugins. Timing only
//! shapes the runs (rate-limited inputs so that kills land mid-run); the
//! assertions never depend on it.

mod common;

use common::output::{Committed, committed, total_lines, wordcount_output};
use common::{memento, plugin, toml_path};

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Seeded, so kill moments are reproducible.
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

/// A job of one operator over the deterministic generator into a `file`
/// sink `out/`, canonical checkpoints every 150 ms and canonical
/// savepoints.
fn job(
    name: &str,
    plugin_name: &str,
    parallelism: u32,
    (count, keys, rate): (u64, u64, Option<u64>),
) -> String {
    let rate = rate.map(|r| format!("rate = {r}\n")).unwrap_or_default();
    format!(
        "name = \"{name}\"\n[source]\ntype = \"generator\"\ncount = {count}\nkeys = {keys}\nseed = 7\nbatch = 100\n{rate}\n\
         [[operators]]\nname = \"count\"\nplugin = \"{}\"\nparallelism = {parallelism}\n\n\
         [sink]\ntype = \"file\"\npath = \"out\"\n\n\
         [checkpoints]\ninterval = \"150ms\"\nretained = 3\nformat = \"canonical\"\n\
         [savepoints]\nformat = \"canonical\"\n",
        toml_path(&plugin(plugin_name))
    )
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    job: PathBuf,
    state: PathBuf,
}

struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn report(&self) -> Value {
        assert!(
            self.status.success(),
            "memento failed ({}):\n{}",
            self.status,
            self.stderr
        );
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{}", self.stdout))
    }

    /// A failed run's error: one line, `error: ...`, the last one; no panic.
    fn error(&self) -> String {
        assert!(
            !self.status.success(),
            "memento should have failed:\n{}",
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked at"),
            "memento panicked:\n{}",
            self.stderr
        );
        let errors: Vec<&str> = self.stderr.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(errors.len(), 1, "expected one error line in:\n{}", self.stderr);
        errors[0].to_string()
    }
}

struct Running {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Running {
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

    fn collect(&self, status: ExitStatus) -> Ran {
        Ran {
            status,
            stdout: std::fs::read_to_string(&self.stdout).unwrap(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap(),
        }
    }

    fn finish(mut self, timeout: Duration) -> Ran {
        let status = self
            .wait_for(timeout)
            .unwrap_or_else(|| panic!("memento did not exit within {timeout:?}"));
        self.collect(status)
    }

    fn signal(&self, signal: i32) {
        // SAFETY: a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Fixture {
    fn new(toml: &str) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let f = Fixture {
            job: dir.join("job.toml"),
            state: dir.join("state"),
            dir,
            _tmp: tmp,
        };
        f.write(toml);
        f
    }

    fn write(&self, toml: &str) {
        std::fs::write(&self.job, toml).unwrap();
    }

    fn out(&self) -> Committed {
        committed(&self.dir.join("out"))
    }

    fn spawn(&self, args: &[&str]) -> Running {
        let (stdout, stderr) = (self.dir.join("stdout.txt"), self.dir.join("stderr.txt"));
        let child = memento()
            .arg("run")
            .arg(&self.job)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--json")
            .args(args)
            .current_dir(&self.dir)
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

    fn run(&self, args: &[&str]) -> Ran {
        self.spawn(args).finish(Duration::from_secs(120))
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        memento()
            .args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .output()
            .unwrap()
    }

    fn show(&self, id: &str) -> Value {
        let out = self.cli(&["snapshots", "show", id, "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Stop the running job with a savepoint (SIGTERM) once it has run a
    /// while; the savepoint's id.
    fn stop_with_savepoint(&self, running: Running, after: Duration) -> String {
        // The dataflow runs (so the signal handlers are installed) once the
        // sink has made its staging directory.
        let staging = self.dir.join("out").join(".staging");
        poll("the job to start", Duration::from_secs(60), || staging.exists());
        std::thread::sleep(after);
        running.signal(libc::SIGTERM);
        let report = running.finish(Duration::from_secs(60)).report();
        assert_eq!(report["state"]["state"], "stopped", "{report}");
        report["state"]["savepoint"].as_str().unwrap().to_string()
    }
}

/// Per key, the committed counts sorted: after a rescale a key's updates
/// are in another task's part files, so file order is not update order;
/// the counts themselves say whether an update was lost or repeated.
fn counts(c: &Committed) -> BTreeMap<String, Vec<u64>> {
    c.iter()
        .map(|(k, vs)| {
            let mut n: Vec<u64> = vs.iter().map(|v| v.parse().unwrap()).collect();
            n.sort_unstable();
            (k.clone(), n)
        })
        .collect()
}

/// Every key's committed counts are exactly 1..=m for some m: no update
/// lost, none committed twice, whatever the tasks that counted them.
fn assert_whole_counts(c: &Committed, when: &str) {
    for (k, n) in counts(c) {
        let whole = n.iter().enumerate().all(|(i, &v)| v == i as u64 + 1);
        assert!(
            whole,
            "{when}: key {k} has counts {:?}…, not 1..={}",
            &n[..n.len().min(12)],
            n.len()
        );
    }
}

/// Exactly-once across rescales: `wordcount` at parallelism 1, 3, 2 and
/// 4 in turn, each phase killed (SIGKILL) or stopped with a savepoint
/// (SIGTERM) at a random moment and the next resumed with `--from latest`
/// at the next parallelism — from a checkpoint after a kill, from the
/// savepoint after a stop — then a last run at 4 to the end. After every
/// phase each key's committed counts are whole (1..=m); at the end they
/// are those of an uninterrupted run at parallelism 1.
#[test]
fn exactly_once_across_rescales_under_kills() {
    let (count, keys) = (60_000, 500);
    let expected = counts(&wordcount_output(count, keys, 7));
    let f = Fixture::new(&job("scaled", "wordcount", 1, (count, keys, Some(8_000))));
    let mut rng = XorShift(0x5eed_1234);
    // (parallelism, how the phase ends); the last phase runs to the end.
    let phases = [
        (1, libc::SIGKILL),
        (3, libc::SIGTERM),
        (3, libc::SIGKILL),
        (2, libc::SIGKILL),
        (2, libc::SIGTERM),
        (4, 0),
    ];
    let mut resumed = false;
    let mut rescales = 0;
    let mut previous = 1;
    for (p, end) in phases {
        f.write(&job("scaled", "wordcount", p, (count, keys, Some(8_000))));
        rescales += usize::from(p != previous);
        previous = p;
        let args: &[&str] = if resumed { &["--from", "latest"] } else { &[] };
        let mut running = f.spawn(args);
        if end == 0 {
            let ran = running.finish(Duration::from_secs(120));
            assert_eq!(ran.report()["state"]["state"], "finished", "{}", ran.stderr);
            break;
        }
        // Let a checkpoint of this phase commit output before it ends, so
        // that every phase moves the job on.
        let before = total_lines(&f.out());
        poll("a checkpoint of this phase", Duration::from_secs(60), || {
            total_lines(&f.out()) > before || matches!(running.child.try_wait(), Ok(Some(_)))
        });
        std::thread::sleep(rng.millis(0, 400));
        running.signal(end);
        let status = running.wait_for(Duration::from_secs(60)).expect("the run ends");
        let ran = running.collect(status);
        if end == libc::SIGTERM {
            assert_eq!(ran.report()["state"]["state"], "stopped", "{}", ran.stderr);
        } else {
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", ran.stderr);
        }
        resumed = true;
        let got = f.out();
        assert!(
            total_lines(&got) > 0,
            "phase at parallelism {p} committed nothing"
        );
        assert_whole_counts(&got, &format!("after the phase at parallelism {p}"));
    }
    assert_eq!(rescales, 3, "1 → 3 → 2 → 4");
    assert_eq!(
        counts(&f.out()),
        expected,
        "counts after 1 → 3 → 2 → 4 with kills"
    );
    let fsck = f.cli(&["fsck"]);
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stderr));
}

/// A savepoint at parallelism 2 restores at 4 and back at 1: each task
/// gets exactly its key groups (every key counted on from its own count,
/// none twice), and the final output equals the uninterrupted run's.
#[test]
fn per_key_counts_survive_each_rescale() {
    let (count, keys) = (30_000, 2_000);
    let spec = |p, rate| job("groups", "wordcount", p, (count, keys, rate));
    let f = Fixture::new(&spec(2, Some(10_000)));
    let first = f.stop_with_savepoint(f.spawn(&[]), Duration::from_millis(900));
    let m = f.show(&first);
    assert_eq!(
        m["extra"]["unkeyed_bytes"]["count"], 0,
        "wordcount's state is all keyed: {m}"
    );
    assert_eq!(m["extra"]["key_groups"]["count"], 128);
    assert_whole_counts(&f.out(), "at 2");

    f.write(&spec(4, Some(10_000)));
    let second = f.stop_with_savepoint(f.spawn(&["--from", &first]), Duration::from_millis(900));
    assert_eq!(f.show(&second)["tasks"].as_array().unwrap().len(), 4);
    assert_whole_counts(&f.out(), "at 4");

    f.write(&spec(1, None));
    let ran = f.run(&["--from", &second]);
    assert_eq!(ran.report()["state"]["state"], "finished");
    assert_eq!(counts(&f.out()), counts(&wordcount_output(count, keys, 7)));
}

/// What cannot be divided among another number of tasks is refused before
/// the run starts, in one line that says why and what to do: task-wide
/// state (`wordcount-v2`'s total), a native image, more tasks than key
/// groups. The refused snapshot still restores at its own parallelism.
#[test]
fn refusals() {
    let (count, keys) = (20_000, 100);
    // Task-wide state.
    let f = Fixture::new(&job("wide", "wordcount-v2", 1, (count, keys, Some(8_000))));
    let id = f.stop_with_savepoint(f.spawn(&[]), Duration::from_millis(700));
    f.write(&job("wide", "wordcount-v2", 2, (count, keys, None)));
    let err = f.run(&["--from", &id]).error();
    assert!(
        err.contains("operator `count` has 1 tasks in the snapshot but parallelism 2 in the job file"),
        "{err}"
    );
    assert!(
        err.contains("bytes of state that belong to no key group"),
        "{err}"
    );
    assert!(err.contains("(or set parallelism = 1)"), "{err}");
    f.write(&job("wide", "wordcount-v2", 1, (count, keys, None)));
    assert_eq!(f.run(&["--from", &id]).report()["state"]["state"], "finished");

    // A native image.
    let native = job("img", "wordcount", 1, (count, keys, Some(8_000))).replace(
        "[savepoints]\nformat = \"canonical\"",
        "[savepoints]\nformat = \"native\"",
    );
    let f = Fixture::new(&native);
    let id = f.stop_with_savepoint(f.spawn(&[]), Duration::from_millis(700));
    assert_eq!(f.show(&id)["format"], "native");
    f.write(&native.replace("parallelism = 1", "parallelism = 3"));
    let err = f.run(&["--from", &id]).error();
    assert!(
        err.contains("it is a native image, which cannot be divided by key"),
        "{err}"
    );

    // More tasks than the snapshot's key groups.
    let f = Fixture::new(&job("few", "wordcount", 1, (count, keys, Some(8_000))));
    let id = f.stop_with_savepoint(f.spawn(&[]), Duration::from_millis(700));
    f.write(&job("few", "wordcount", 200, (count, keys, None)));
    let err = f.run(&["--from", &id]).error();
    assert!(
        err.contains("has 128 key groups, fewer than parallelism 200"),
        "{err}"
    );
}

/// A savepoint of `wordcount` as built before keyed state (the 0.1.0
/// plugin, whose state is one BTreeMap in the SDK's envelope) restores
/// into today's `wordcount` at its own parallelism, counting on; at
/// another it is refused.
#[test]
fn snapshots_from_before_keyed_state_restore() {
    let (count, keys) = (20_000, 50);
    let f = Fixture::new(&job("old", "wordcount-v010", 1, (count, keys, Some(8_000))));
    let id = f.stop_with_savepoint(f.spawn(&[]), Duration::from_millis(700));
    f.write(&job("old", "wordcount", 2, (count, keys, None)));
    let err = f.run(&["--from", &id]).error();
    assert!(err.contains("belong to no key group"), "{err}");
    f.write(&job("old", "wordcount", 1, (count, keys, None)));
    assert_eq!(f.run(&["--from", &id]).report()["state"]["state"], "finished");
    assert_eq!(counts(&f.out()), counts(&wordcount_output(count, keys, 7)));
}

/// `POST /v1/jobs/{job}/rescale` and `memento rescale JOB N` on `memento
/// serve`: the job is stopped with a savepoint and runs again at the new
/// parallelism, in one call; its counts go on from the savepoint. A bad
/// body, an unknown job and a parallelism the job file cannot have are
/// refused without stopping the job; task-wide state is refused after the
/// savepoint, and the job runs again as it was.
#[test]
fn rescale_over_rest_and_the_cli() {
    use common::{Serve, TOKEN_A, plugin_b64, two_tenants};
    let serve = Serve::start(&two_tenants("", ""));
    let submit = |name: &str, plugin_name: &str| {
        let body = serde_json::json!({
            "job": common::endless_job(name, ""),
            "plugins": { "wordcount.wasm": plugin_b64(plugin_name) },
        });
        serve.json("POST", "/v1/jobs", Some(TOKEN_A), &body.to_string(), 201);
        serve.wait_running(TOKEN_A, name);
    };
    let parallelism = |name: &str| {
        serve.json("GET", &format!("/v1/jobs/{name}"), Some(TOKEN_A), "", 200)["operators"][0]["parallelism"]
            .clone()
    };
    submit("keyed", "wordcount");
    std::thread::sleep(Duration::from_millis(500));

    let answer = serve.json(
        "POST",
        "/v1/jobs/keyed/rescale",
        Some(TOKEN_A),
        r#"{"parallelism": 3}"#,
        200,
    );
    let savepoint = answer["savepoint"].as_str().unwrap().to_string();
    assert!(savepoint.starts_with("keyed-"), "{answer}");
    serve.wait_running(TOKEN_A, "keyed");
    assert_eq!(parallelism("keyed"), 3);

    let out = memento()
        .args([
            "rescale",
            "keyed",
            "2",
            "--host",
            &serve.url(),
            "--token",
            TOKEN_A,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.starts_with("job `keyed` runs at parallelism 2, resumed from savepoint keyed-"),
        "{stdout}"
    );
    serve.wait_running(TOKEN_A, "keyed");
    assert_eq!(parallelism("keyed"), 2);

    // Refused before anything stops.
    for (body, want) in [
        (r#"{"parallelism": "x"}"#, 400),
        (r#"{"tasks": 2}"#, 400),
        (r#"{"parallelism": 0}"#, 400),
    ] {
        let v = serve.json("POST", "/v1/jobs/keyed/rescale", Some(TOKEN_A), body, want);
        assert!(!v["message"].as_str().unwrap().contains('\n'), "{v}");
    }
    serve.json(
        "POST",
        "/v1/jobs/nope/rescale",
        Some(TOKEN_A),
        r#"{"parallelism": 2}"#,
        404,
    );
    assert_eq!(
        serve.json("GET", "/v1/jobs/keyed", Some(TOKEN_A), "", 200)["state"],
        "running"
    );

    // Task-wide state: refused after the savepoint; the job runs on as it was.
    submit("wide", "wordcount-v2");
    std::thread::sleep(Duration::from_millis(500));
    let v = serve.json(
        "POST",
        "/v1/jobs/wide/rescale",
        Some(TOKEN_A),
        r#"{"parallelism": 2}"#,
        400,
    );
    let message = v["message"].as_str().unwrap();
    assert_eq!(v["error"], "incompatible_snapshot", "{v}");
    assert!(message.contains("belong to no key group"), "{message}");
    assert!(
        message.contains("it runs again as before, from savepoint wide-"),
        "{message}"
    );
    serve.wait_running(TOKEN_A, "wide");
    assert_eq!(parallelism("wide"), 1);
}

/// What `window-sum` (window 100 ms) commits over the generator: per key,
/// the sum of each window it had events in, in window order.
fn window_sum_output(count: u64, keys: u64, seed: u64) -> Committed {
    let g = memento::dataflow::source::Generator::new(Some(count), None, keys, seed, 1);
    let mut sums: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for i in 0..count {
        let e = g.event(i);
        let v: i64 = String::from_utf8(e.value).unwrap().parse().unwrap();
        *sums
            .entry((String::from_utf8(e.key).unwrap(), e.timestamp / 100))
            .or_default() += v;
    }
    let mut out = Committed::new();
    for ((k, _), sum) in sums {
        out.entry(k).or_default().push(sum.to_string());
    }
    out
}

/// Per key, the committed window sums sorted: after a rescale a key's
/// windows are in several tasks' part files.
fn sorted_values(c: &Committed) -> Committed {
    c.iter()
        .map(|(k, vs)| {
            let mut vs = vs.clone();
            vs.sort_unstable();
            (k.clone(), vs)
        })
        .collect()
}

/// `window-sum` keeps its open windows in keyed state, so it rescales:
/// 1 → 3 → 2, killed at parallelism 1 (resumed at 3 from a checkpoint),
/// stopped with a savepoint at 3 (resumed at 2 from it) and run to the end;
/// every snapshot's state is all keyed, and the committed windows are
/// those of an uninterrupted run, none lost, none emitted twice.
#[test]
fn window_sum_exactly_once_across_rescales() {
    let (count, keys) = (40_000, 50);
    let expected = sorted_values(&window_sum_output(count, keys, 7));
    let spec = |p, rate| {
        job("windows", "window-sum", p, (count, keys, rate)).replace(
            "parallelism = ",
            "config = { window = \"100ms\" }\nparallelism = ",
        )
    };
    let f = Fixture::new(&spec(1, Some(8_000)));
    let mut rng = XorShift(0x0717_5eed);

    // Parallelism 1, killed after a checkpoint has committed output.
    let mut running = f.spawn(&[]);
    poll("a checkpoint at parallelism 1", Duration::from_secs(60), || {
        total_lines(&f.out()) > 0
    });
    std::thread::sleep(rng.millis(0, 300));
    running.signal(libc::SIGKILL);
    let status = running.wait_for(Duration::from_secs(60)).expect("the run ends");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let after_one = f.out();
    assert!(total_lines(&after_one) > 0);

    // Parallelism 3 from the latest checkpoint, stopped with a savepoint.
    f.write(&spec(3, Some(8_000)));
    let savepoint = f.stop_with_savepoint(f.spawn(&["--from", "latest"]), rng.millis(600, 1200));
    let m = f.show(&savepoint);
    assert_eq!(m["tasks"].as_array().unwrap().len(), 3);
    assert_eq!(
        m["extra"]["unkeyed_bytes"]["count"], 0,
        "window-sum's state is all keyed: {m}"
    );
    assert!(
        total_lines(&f.out()) > total_lines(&after_one),
        "the phase at 3 committed windows"
    );

    // Parallelism 2 from the savepoint, to the end.
    f.write(&spec(2, None));
    let ran = f.run(&["--from", &savepoint]);
    assert_eq!(ran.report()["state"]["state"], "finished", "{}", ran.stderr);
    common::output::assert_same_output(&sorted_values(&f.out()), &expected, "window sums after 1 → 3 → 2");
    let fsck = f.cli(&["fsck"]);
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stderr));
}
