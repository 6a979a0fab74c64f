//! A pool of real `memento serve` processes on one bucket of a real
//! S3-protocol server (`moto`, see `common::s3`), with a lease ttl of
//! 1 s: a job submitted to host A moves to host B when A is SIGKILLed,
//! resumes from its latest snapshot and its output is exactly that of an
//! uninterrupted run; B answers for the job before and after; a restarted
//! A does not take it back; a job the user stopped is never taken over;
//! of two surviving hosts racing for a job, exactly one runs it.
//!
//! Both hosts' tenant files (the `file` sink's directory) are one local
//! directory: each host's `work/files` is a symlink to it, as a shared
//! mount would be.

mod common;

use common::output::{assert_same_output, committed, total_lines, wordcount_output};
use common::{TOKEN_A, memento, plugin_b64, s3};

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// How often the test's hosts scan for jobs to take over.
const SCAN_MS: u64 = 200;
/// The job's checkpoint interval.
const INTERVAL_MS: u64 = 200;

/// A wordcount job over the deterministic generator (40 keys, seed 3)
/// into the file sink `out`, checkpointing every [`INTERVAL_MS`].
fn job(name: &str, count: u64, rate: u64) -> String {
    format!(
        "name = \"{name}\"\n[source]\ntype = \"generator\"\ncount = {count}\nkeys = 40\nseed = 3\nbatch = 100\n\
         rate = {rate}\n\n[[operators]]\nname = \"count\"\nplugin = \"wordcount.wasm\"\nparallelism = 2\n\n\
         [sink]\ntype = \"file\"\npath = \"out\"\n\n[checkpoints]\ninterval = \"{INTERVAL_MS}ms\"\n"
    )
}

/// One `memento serve` of the pool, in its own directory.
struct Host {
    dir: PathBuf,
    child: Option<Child>,
    addr: String,
}

impl Host {
    /// A host on `bucket_url` whose `work/files` is `shared`.
    fn new(dir: &Path, bucket_url: &str, shared: &Path) -> Host {
        Host::with(dir, bucket_url, shared, "")
    }

    /// [`Host::new`] with `tenant` appended to tenant `a`'s table.
    fn with(dir: &Path, bucket_url: &str, shared: &Path, tenant: &str) -> Host {
        std::fs::create_dir_all(dir.join("work")).unwrap();
        std::os::unix::fs::symlink(shared, dir.join("work/files")).unwrap();
        std::fs::write(
            dir.join("host.toml"),
            format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = \"{bucket_url}\"\nwork_dir = \"work\"\n\
                 pool_scan = \"{SCAN_MS}ms\"\n\
                 [[tenants]]\nname = \"a\"\ntoken_blake3 = \"{}\"\n{tenant}\n",
                common::hash_token(TOKEN_A)
            ),
        )
        .unwrap();
        let mut host = Host {
            dir: dir.to_path_buf(),
            child: None,
            addr: String::new(),
        };
        host.start();
        host
    }

    fn start(&mut self) {
        let addr_file = self.dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.log"))
            .unwrap();
        let mut cmd = memento();
        s3::configure(&mut cmd)
            .env("MEMENTO_LOG", "info")
            .args(["serve", "--config", "host.toml", "--addr-file", "addr"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = cmd.spawn().unwrap();
        self.addr = common::await_addr_file(&addr_file, &mut child, &common::Log::default());
        self.child = Some(child);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let (code, body) = common::http(&self.addr, "GET", path, Some(TOKEN_A), "");
        (
            code,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    fn post(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (code, body) = common::http(&self.addr, "POST", path, Some(TOKEN_A), body);
        (
            code,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Two hosts A and B on one fresh bucket, and the shared files directory.
fn pool(tmp: &Path) -> (Host, Host, PathBuf) {
    let url = format!("s3://{}/pool", s3::bucket());
    let shared = tmp.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let a = Host::new(&tmp.join("a"), &url, &shared);
    let b = Host::new(&tmp.join("b"), &url, &shared);
    (a, b, shared)
}

fn submit(host: &Host, job: &str) {
    let body = serde_json::json!({ "job": job, "plugins": { "wordcount.wasm": plugin_b64("wordcount") } });
    let (code, v) = host.post("/v1/jobs", &body.to_string());
    assert_eq!(code, 201, "submit: {v}\n{}", host.log());
}

fn logs(hosts: &[&Host]) -> String {
    hosts
        .iter()
        .map(|h| format!("--- {}:\n{}", h.dir.display(), h.log()))
        .collect()
}

#[test]
fn a_killed_hosts_job_resumes_on_another_host_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, b, shared) = pool(tmp.path());
    let (count, rate) = (40_000, 2_000);
    submit(&a, &job("clicks", count, rate));

    common::wait_for(
        "checkpoints on host A",
        Duration::from_secs(60),
        || logs(&[&a, &b]),
        || {
            let (code, v) = a.get("/v1/jobs/clicks/checkpoints");
            code == 200 && v["counts"]["completed"].as_u64().is_some_and(|n| n >= 3)
        },
    );
    // B answers for A's job from the store, and forwards to A what only
    // the running host can do.
    let (code, v) = b.get("/v1/jobs/clicks");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["host_url"], a.url().as_str(), "{v}");
    assert!(
        v["latest_snapshot"]
            .as_str()
            .is_some_and(|s| s.starts_with("clicks-")),
        "{v}"
    );
    let (code, v) = b.get("/v1/jobs");
    assert_eq!(code, 200, "{v}");
    assert!(
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["name"] == "clicks" && j["host_url"] == a.url().as_str()),
        "B lists the job A runs: {v}"
    );
    let (code, v) = b.post("/v1/jobs/clicks/savepoints", r#"{"format": "canonical"}"#);
    assert_eq!(code, 202, "forwarded to A: {v}");
    let request = v["request_id"].as_str().unwrap().to_string();
    common::wait_for(
        "the savepoint asked of B to complete on A",
        Duration::from_secs(60),
        || logs(&[&a, &b]),
        || {
            let (code, v) = b.get(&format!("/v1/jobs/clicks/savepoints/{request}"));
            code == 200 && v["status"] == "completed"
        },
    );
    assert!(a.log().contains("kind=Savepoint"), "A took it: {}", a.log());
    let (code, v) = b.get("/v1/jobs/clicks/checkpoints");
    assert_eq!(code, 200, "forwarded to A: {v}");
    assert!(
        v["counts"]["completed"].as_u64().is_some_and(|n| n >= 3),
        "A's history: {v}"
    );
    // A second submission of the name the pool runs, on the other host.
    let body = serde_json::json!({ "job": job("clicks", 10, 10), "plugins": { "wordcount.wasm": plugin_b64("wordcount") } });
    let (code, v) = b.post("/v1/jobs", &body.to_string());
    assert_eq!(code, 409, "{v}");
    let (code, v) = a.get("/v1/jobs/clicks");
    assert_eq!(
        (code, v["host_url"].as_str()),
        (200, Some(a.url().as_str())),
        "{v}"
    );

    let out = shared.join("a/out");
    let before = total_lines(&committed(&out));
    a.kill();
    let killed = Instant::now();
    // Taken over after the lease went unrenewed for its ttl, found by a
    // scan, resumed from the latest snapshot (plus compiling the plugin
    // on B, and a loaded machine's slack).
    let bound =
        Duration::from_millis(s3::TEST_LOCK_TTL_MS + 2 * SCAN_MS + INTERVAL_MS) + Duration::from_secs(20);
    common::wait_for(
        "host B to take the job over",
        bound,
        || logs(&[&a, &b]),
        || {
            let (code, v) = b.get("/v1/jobs/clicks");
            code == 200
                && v["host_url"] == b.url().as_str()
                && v["state"] == "running"
                && v["restored_from"].as_str().is_some()
        },
    );
    let took = killed.elapsed();
    eprintln!("failover: host killed → job running on B in {took:?}");
    // Resumed, not restarted: B's run did not start from scratch.
    let (_, v) = b.get("/v1/jobs/clicks");
    assert!(v["restored_from"].as_str().unwrap().starts_with("clicks-"), "{v}");

    // A comes back while B holds the job: it does not take it back, and
    // answers for it naming B.
    a.start();
    std::thread::sleep(Duration::from_millis(3 * s3::TEST_LOCK_TTL_MS + 5 * SCAN_MS));
    let (code, v) = a.get("/v1/jobs/clicks");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["host_url"], b.url().as_str(), "A names B: {v}\n{}", a.log());
    assert_eq!(v["state"], "running", "{v}");
    let (_, v) = b.get("/v1/jobs/clicks");
    assert_eq!(v["host_url"], b.url().as_str(), "still on B: {v}");
    assert!(!a.log().contains("took the job over"), "{}", a.log());

    common::wait_for(
        "the job to finish on B",
        Duration::from_secs(120),
        || logs(&[&a, &b]),
        || b.get("/v1/jobs/clicks").1["state"] == "finished",
    );
    let expected = wordcount_output(count, 40, 3);
    assert!(
        total_lines(&expected) > before,
        "killed mid-run: {before} lines before"
    );
    assert_same_output(&committed(&out), &expected, "after host A was killed");
    // Ended for good: its record is gone, so nobody runs it again.
    std::thread::sleep(Duration::from_millis(2 * s3::TEST_LOCK_TTL_MS + 5 * SCAN_MS));
    let (code, v) = a.get("/v1/jobs/clicks");
    assert_eq!(code, 404, "{v}");
    assert_eq!(b.get("/v1/jobs/clicks").1["state"], "finished");
}

#[test]
fn a_job_the_user_stopped_is_not_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, b, _shared) = pool(tmp.path());
    submit(&a, &job("halt", 1_000_000, 2_000));
    common::wait_for(
        "a checkpoint on host A",
        Duration::from_secs(60),
        || logs(&[&a, &b]),
        || {
            let (code, v) = a.get("/v1/jobs/halt/checkpoints");
            code == 200 && v["counts"]["completed"].as_u64().is_some_and(|n| n >= 1)
        },
    );
    // Accepted means the wish is in the store; the host dies before (or
    // while) the job stops.
    let (code, v) = a.post("/v1/jobs/halt/stop", "");
    assert_eq!(code, 202, "{v}");
    a.kill();
    std::thread::sleep(Duration::from_millis(4 * s3::TEST_LOCK_TTL_MS + 10 * SCAN_MS));
    let (code, v) = b.get("/v1/jobs/halt");
    assert!(
        code == 404 || (code == 200 && v["state"] == "stopped"),
        "B must not run it: {code} {v}\n{}",
        b.log()
    );
    assert!(!b.log().contains("took the job over"), "{}", b.log());
    let (code, v) = b.post("/v1/jobs/halt/stop", "");
    assert_eq!(code, if code == 404 { 404 } else { 409 }, "{v}");
    // What is left of it (the host died while stopping it) is cancelled
    // from the other host, and then gone.
    if code == 409 {
        let (code, v) = b.post("/v1/jobs/halt/cancel", "");
        assert_eq!(code, 202, "{v}");
        assert_eq!(b.get("/v1/jobs/halt").0, 404);
    }
}

/// Two surviving hosts race for the dead host's job: the lease's
/// conditional write lets exactly one of them run it, the other names the
/// winner, and the output is exactly-once.
#[test]
fn two_survivors_race_and_exactly_one_runs_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, b, shared) = pool(tmp.path());
    let bucket_url = std::fs::read_to_string(tmp.path().join("a/host.toml"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("state_dir = \"")
                .map(|u| u.trim_end_matches('"').to_string())
        })
        .unwrap();
    let c = Host::new(&tmp.path().join("c"), &bucket_url, &shared);
    let (count, rate) = (30_000, 2_000);
    submit(&a, &job("race", count, rate));
    common::wait_for(
        "checkpoints on host A",
        Duration::from_secs(60),
        || logs(&[&a, &b, &c]),
        || {
            let (code, v) = a.get("/v1/jobs/race/checkpoints");
            code == 200 && v["counts"]["completed"].as_u64().is_some_and(|n| n >= 2)
        },
    );
    a.kill();
    // A host runs the job when it names itself (its run may be restoring
    // or restarting after a failure: it is still the one holding it).
    let runs_here = |h: &Host| {
        let (code, v) = h.get("/v1/jobs/race");
        code == 200
            && v["host_url"] == h.url().as_str()
            && ["created", "running", "restarting"].contains(&v["state"].as_str().unwrap_or(""))
    };
    common::wait_for(
        "a survivor to take the job over",
        Duration::from_secs(30),
        || logs(&[&b, &c]),
        || runs_here(&b) || runs_here(&c),
    );
    let (winner, loser) = if runs_here(&b) { (&b, &c) } else { (&c, &b) };
    // For a while (several scans and ttls), the job stays with the winner
    // and the loser names it.
    let until = Instant::now() + Duration::from_millis(3 * s3::TEST_LOCK_TTL_MS + 5 * SCAN_MS);
    while Instant::now() < until {
        assert!(
            !runs_here(loser),
            "both hosts run the job: winner {} says {}, loser {} says {}\n{}",
            winner.url(),
            winner.get("/v1/jobs/race").1,
            loser.url(),
            loser.get("/v1/jobs/race").1,
            logs(&[&a, &b, &c])
        );
        let (code, v) = loser.get("/v1/jobs/race");
        assert_eq!(code, 200, "{v}");
        if v["state"] == "running" {
            assert_eq!(v["host_url"], winner.url().as_str(), "{v}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    common::wait_for(
        "the job to finish",
        Duration::from_secs(120),
        || logs(&[&b, &c]),
        || winner.get("/v1/jobs/race").1["state"] == "finished",
    );
    assert_same_output(
        &committed(&shared.join("a/out")),
        &wordcount_output(count, 40, 3),
        "after two hosts raced for the job",
    );
}

/// A job whose host died and that no other host may run (there, the
/// tenant may run no job) waits: every host answers for it, and a cancel
/// on any host ends it for good.
#[test]
fn a_job_no_host_can_take_waits_and_is_cancelled_from_any_host() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("s3://{}/pool", s3::bucket());
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let mut a = Host::new(&tmp.path().join("a"), &url, &shared);
    let b = Host::with(&tmp.path().join("b"), &url, &shared, "max_jobs = 0");
    submit(&a, &job("stuck", 1_000_000, 2_000));
    common::wait_for(
        "a checkpoint on host A",
        Duration::from_secs(60),
        || logs(&[&a, &b]),
        || {
            let (code, v) = a.get("/v1/jobs/stuck/checkpoints");
            code == 200 && v["counts"]["completed"].as_u64().is_some_and(|n| n >= 1)
        },
    );
    a.kill();
    common::wait_for(
        "B to see the job waiting",
        Duration::from_secs(30),
        || b.log(),
        || b.get("/v1/jobs/stuck").1["state"] == "restarting",
    );
    std::thread::sleep(Duration::from_millis(2 * SCAN_MS));
    let (code, v) = b.get("/v1/jobs/stuck");
    assert_eq!((code, v["state"].as_str()), (200, Some("restarting")), "{v}");
    let (code, v) = b.post("/v1/jobs/stuck/stop", "");
    assert_eq!(code, 409, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("waiting to be taken over"),
        "{v}"
    );
    let (code, v) = b.post("/v1/jobs/stuck/cancel", "");
    assert_eq!(code, 202, "{v}");
    let (code, v) = b.get("/v1/jobs/stuck");
    assert_eq!(code, 404, "{v}");
    // A host that could run it comes back: there is nothing to take over.
    a.start();
    std::thread::sleep(Duration::from_millis(3 * s3::TEST_LOCK_TTL_MS + 5 * SCAN_MS));
    assert_eq!(a.get("/v1/jobs/stuck").0, 404, "{}", a.log());
}
