//! End-to-end tests of the CLI against a running host: `memento jobs`,
//! `checkpoints`, `savepoint trigger|dispose`, `cancel`, `stop` driving a
//! real `memento serve` over HTTP (tables, `--json`, environment variables,
//! tenancy through the CLI), and a restarted `memento serve` resuming its
//! jobs from the state directory with exactly-once output.

mod common;

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use common::output::committed;
use common::{ADMIN, Serve, TOKEN_A, TOKEN_B, endless_job, memento, plugin_b64, two_tenants};
use serde_json::{Value, json};

/// A `memento serve` of tenants `a` and `b` and an admin, with what the
/// CLI tests ask of it.
struct Host(Serve);

impl std::ops::Deref for Host {
    type Target = Serve;
    fn deref(&self) -> &Serve {
        &self.0
    }
}

impl std::ops::DerefMut for Host {
    fn deref_mut(&mut self) -> &mut Serve {
        &mut self.0
    }
}

impl Host {
    fn new() -> Host {
        Host(Serve::start(&two_tenants("", "")))
    }

    /// `memento ARGS --host URL --token TOKEN`, with no MEMENTO_* variable
    /// of the environment leaking in.
    fn cli(&self, token: &str, args: &[&str]) -> Output {
        memento()
            .args(args)
            .args(["--host", &self.url(), "--token", token])
            .output()
            .unwrap()
    }

    /// A JSON API call that must succeed (checked against openapi.json).
    fn api(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Value {
        let want = match (method, path) {
            ("POST", "/v1/jobs") => 201,
            ("POST", _) => 202,
            _ => 200,
        };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.json(method, path, Some(token), &body, want)
    }

    fn submit_a(&self, toml: &str) -> Value {
        let body = json!({ "job": toml, "plugins": { "wordcount.wasm": plugin_b64("wordcount") } });
        self.api("POST", "/v1/jobs", TOKEN_A, Some(body))
    }

    fn job(&self, name: &str) -> Value {
        self.api("GET", &format!("/v1/jobs/{name}"), TOKEN_A, None)
    }

    fn wait_long(&self, what: &str, timeout: Duration, done: impl FnMut() -> bool) {
        common::wait_for(what, timeout, || self.log(), done)
    }

    /// Wait until job `name` of tenant `a` runs restored from a snapshot;
    /// that snapshot's id.
    fn wait_restored(&self, name: &str) -> String {
        let mut id = String::new();
        self.wait(&format!("{name} to run restored"), || {
            let v = self.job(name);
            match v["restored_from"].as_str() {
                Some(s) if v["state"] == "running" => {
                    id = s.to_string();
                    true
                }
                _ => false,
            }
        });
        assert!(id.starts_with(&format!("{name}-")), "{id}");
        id
    }

    /// Wait until job `name` of tenant `a` has `n` completed checkpoints in
    /// this process.
    fn wait_checkpoints(&self, name: &str, n: u64) {
        self.wait(&format!("{n} checkpoints of {name}"), || {
            self.job(name)["counts"]["completed"].as_u64().unwrap_or(0) >= n
        });
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        stdout(&o)
    );
    stdout(&o)
}

fn ok_json(o: Output) -> Value {
    let text = ok(o);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Fails with exactly one stderr line, `error: …`, containing every needle.
fn fails(o: Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "should fail: {}", stdout(&o));
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

#[test]
fn every_command_against_a_running_host() {
    let host = Host::new();
    host.submit_a(&endless_job("clicks", "[checkpoints]\ninterval = \"300ms\""));
    host.wait_checkpoints("clicks", 1);

    // jobs: a table with a header and the job; JSON as the API answers.
    let table = ok(host.cli(TOKEN_A, &["jobs"]));
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for col in [
        "JOB",
        "TENANT",
        "STATE",
        "RECORDS",
        "COMPLETED",
        "FAILED",
        "RESTORED FROM",
    ] {
        assert!(header.contains(col), "{table}");
    }
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["clicks", "a", "running"], "{table}");
    let v = ok_json(host.cli(TOKEN_A, &["jobs", "--json"]));
    assert_eq!(v["jobs"][0]["name"], "clicks", "{v}");
    assert!(v["jobs"][0]["counts"]["completed"].as_u64().unwrap() >= 1, "{v}");

    // The environment variables stand for --host and --token; --url is an
    // alias of --host.
    let v = ok_json(
        memento()
            .args(["jobs", "--json"])
            .env("MEMENTO_HOST", host.url())
            .env("MEMENTO_TOKEN", TOKEN_A)
            .output()
            .unwrap(),
    );
    assert_eq!(v["jobs"][0]["name"], "clicks", "{v}");
    let v = ok_json(
        memento()
            .args(["jobs", "--json", "--url", &host.url(), "--token", TOKEN_A])
            .output()
            .unwrap(),
    );
    assert_eq!(v["jobs"][0]["name"], "clicks", "{v}");

    // checkpoints: counts line, summary, history table; JSON.
    let text = ok(host.cli(TOKEN_A, &["checkpoints", "clicks"]));
    assert!(text.starts_with("job `clicks`: "), "{text}");
    assert!(text.contains(" completed, 0 failed"), "{text}");
    assert!(text.contains("duration ms"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("clicks-") && l.contains("checkpoint") && l.contains("completed")),
        "{text}"
    );
    let v = ok_json(host.cli(TOKEN_A, &["checkpoints", "clicks", "--json"]));
    assert!(v["counts"]["completed"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["counts"]["failed"], 0, "{v}");
    assert!(v["latest"]["completed"]["id"].is_string(), "{v}");

    // savepoint trigger: without --wait the request id, with it the id.
    let text = ok(host.cli(TOKEN_A, &["savepoint", "trigger", "clicks"]));
    assert!(
        text.starts_with("triggered savepoint of job `clicks`: request "),
        "{text}"
    );
    let v = ok_json(host.cli(TOKEN_A, &["savepoint", "trigger", "clicks", "--json"]));
    assert!(v["request_id"].is_string(), "{v}");
    let sp1 = ok(host.cli(TOKEN_A, &["savepoint", "trigger", "clicks", "--wait"]));
    let sp1 = sp1.trim().to_string();
    assert!(sp1.starts_with("clicks-"), "{sp1}");
    let v = ok_json(host.cli(TOKEN_A, &["savepoint", "trigger", "clicks", "--wait", "--json"]));
    assert_eq!(v["status"], "completed", "{v}");
    let sp2 = v["snapshot"].as_str().unwrap().to_string();
    // The admin acts in a tenant with --tenant.
    let sp3 = ok(host.cli(
        ADMIN,
        &["savepoint", "trigger", "clicks", "--wait", "--tenant", "a"],
    ));
    let sp3 = sp3.trim().to_string();
    assert!(sp3.starts_with("clicks-"), "{sp3}");
    // --format overrides the job's savepoint format (canonical by default).
    let native = ok(host.cli(
        TOKEN_A,
        &["savepoint", "trigger", "clicks", "--wait", "--format", "native"],
    ));
    let formats: BTreeMap<String, String> = host.api("GET", "/v1/snapshots", TOKEN_A, None)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["format"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(formats[native.trim()], "native", "{formats:?}");
    assert_eq!(formats[&sp1], "canonical", "{formats:?}");

    // Another tenant: every command answers 404 as if the job or savepoint
    // did not exist; one error line with the status and the reason.
    for args in [
        vec!["checkpoints", "clicks"],
        vec!["savepoint", "trigger", "clicks"],
        vec!["cancel", "clicks"],
        vec!["stop", "clicks"],
    ] {
        fails(host.cli(TOKEN_B, &args), &["404 Not Found", "no job `clicks`"]);
    }
    fails(
        host.cli(TOKEN_B, &["savepoint", "dispose", &sp1]),
        &["DELETE", "404 Not Found", &format!("no snapshot {sp1}")],
    );
    let table = ok(host.cli(TOKEN_B, &["jobs"]));
    assert_eq!(table.trim(), "no jobs", "{table}");
    // A wrong token: 401 on every command.
    for args in [
        vec!["jobs"],
        vec!["checkpoints", "clicks"],
        vec!["savepoint", "trigger", "clicks"],
        vec!["savepoint", "dispose", &sp1],
        vec!["cancel", "clicks"],
        vec!["stop", "clicks"],
    ] {
        fails(
            host.cli("wrong", &args),
            &["401 Unauthorized", "missing or wrong bearer token"],
        );
    }
    // The admin without --tenant on a job: the server says what is missing.
    fails(
        host.cli(ADMIN, &["checkpoints", "clicks"]),
        &["400 Bad Request", "?tenant=NAME"],
    );
    let v = ok_json(host.cli(ADMIN, &["checkpoints", "clicks", "--tenant", "a", "--json"]));
    assert!(v["counts"]["completed"].as_u64().unwrap() >= 1, "{v}");

    // savepoint dispose with a host: over HTTP, in the caller's tenant.
    let text = ok(host.cli(TOKEN_A, &["savepoint", "dispose", &sp1]));
    assert_eq!(text.trim(), format!("disposed {sp1}"));
    let v = ok_json(host.cli(TOKEN_A, &["savepoint", "dispose", &sp2, "--json"]));
    assert_eq!(v["disposed"], sp2.as_str(), "{v}");
    let listed = host.api("GET", "/v1/snapshots", TOKEN_A, None);
    let ids: Vec<&str> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(
        !ids.contains(&sp1.as_str()) && !ids.contains(&sp2.as_str()),
        "{ids:?}"
    );
    assert!(ids.contains(&sp3.as_str()), "{ids:?}");
    fails(
        host.cli(TOKEN_A, &["savepoint", "dispose", &sp1]),
        &["404 Not Found", "no snapshot"],
    );

    // cancel: a second job, cancelled, shows as cancelled.
    host.submit_a(&endless_job("other", "[checkpoints]\ninterval = \"300ms\""));
    host.wait_long("other running", Duration::from_secs(60), || {
        host.job("other")["state"] == "running"
    });
    let text = ok(host.cli(TOKEN_A, &["cancel", "other"]));
    assert_eq!(text.trim(), "cancelling job `other`");
    host.wait_long("other cancelled", Duration::from_secs(60), || {
        host.job("other")["state"] == "cancelled"
    });
    fails(
        host.cli(TOKEN_A, &["cancel", "other"]),
        &["409 Conflict", "job `other` has ended (cancelled)"],
    );

    // stop --wait: the final savepoint's id; the job is stopped with it.
    let stopped = ok(host.cli(TOKEN_A, &["stop", "clicks", "--wait"]));
    let stopped = stopped.trim().to_string();
    assert!(stopped.starts_with("clicks-"), "{stopped}");
    host.wait_long("clicks stopped", Duration::from_secs(60), || {
        host.job("clicks")["state"] == "stopped"
    });
    let v = ok_json(host.cli(TOKEN_A, &["jobs", "--json"]));
    let clicks = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "clicks")
        .unwrap();
    assert_eq!(clicks["savepoint"], stopped.as_str(), "{v}");
    // stop without --wait on a fresh job: the request id.
    host.submit_a(&endless_job("third", "[checkpoints]\ninterval = \"300ms\""));
    host.wait_checkpoints("third", 1);
    let v = ok_json(host.cli(TOKEN_A, &["stop", "third", "--json"]));
    assert!(v["request_id"].is_string(), "{v}");

    // savepoint dispose without a host: the local store of --state-dir
    // (the running host shares it; the store coordinates through locks).
    let text = ok(memento()
        .args(["savepoint", "dispose", &sp3, "--tenant", "a", "--state-dir"])
        .arg(host.state())
        .output()
        .unwrap());
    assert!(text.starts_with(&format!("disposed {sp3}")), "{text}");
    fails(
        memento()
            .args(["savepoint", "dispose", &sp3, "--tenant", "a", "--state-dir"])
            .arg(host.state())
            .output()
            .unwrap(),
        &[&sp3, "not found"],
    );
}

#[test]
fn an_unreachable_host_is_a_clear_error() {
    for args in [
        vec!["jobs"],
        vec!["checkpoints", "x"],
        vec!["savepoint", "dispose", "x-1"],
    ] {
        let o = memento()
            .args(&args)
            .args(["--host", "http://127.0.0.1:9"])
            .output()
            .unwrap();
        fails(o, &["cannot reach the host at http://127.0.0.1:9", "refused"]);
    }
    let o = memento()
        .args(["cancel", "x", "--host", "127.0.0.1:9"])
        .output()
        .unwrap();
    fails(o, &["cannot reach the job at http://127.0.0.1:9"]);
}

/// Restarting `memento serve` resumes every job that was running, from its
/// latest checkpoint: after a SIGTERM (serve cancels its jobs) and after a
/// SIGKILL (no shutdown at all). A job cancelled by its tenant is not
/// resumed. The resumed job's output is exactly-once: wordcount emits
/// 1, 2, … per key, so any lost or repeated record shows as a gap or a
/// repeat, and the total must be the generator's count.
#[test]
fn restarting_serve_resumes_its_jobs_from_their_latest_checkpoint() {
    const COUNT: u64 = 9000;
    let mut host = Host::new();
    let job = format!(
        r#"name = "resumed"
[source]
type = "generator"
count = {COUNT}
rate = 1500
keys = 40
batch = 50
[[operators]]
name = "count"
plugin = "wordcount.wasm"
parallelism = 2
[sink]
type = "file"
path = "out"
[checkpoints]
interval = "300ms"
"#
    );
    host.submit_a(&job);
    host.submit_a(&endless_job("cancelled", "[checkpoints]\ninterval = \"300ms\""));
    host.wait_checkpoints("resumed", 2);
    ok(host.cli(TOKEN_A, &["cancel", "cancelled"]));
    host.wait_long("cancelled to end", Duration::from_secs(60), || {
        host.job("cancelled")["state"] == "cancelled"
    });
    let records = host.state().join("service/jobs/a");
    assert!(records.join("resumed.json").is_file());
    assert!(!records.join("cancelled.json").exists());

    // SIGTERM: serve cancels the job, keeps its record; the next start
    // resumes it from its latest checkpoint.
    host.terminate();
    host.restart();
    let v = ok_json(host.cli(TOKEN_A, &["jobs", "--json"]));
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "only the running job comes back: {v}");
    assert_eq!(jobs[0]["name"], "resumed");
    let first = host.wait_restored("resumed");
    host.wait_checkpoints("resumed", 2);

    // SIGKILL: nothing runs at exit; the record alone brings it back.
    host.kill();
    host.restart();
    let second = host.wait_restored("resumed");
    assert!(
        second > first,
        "resumed from a newer checkpoint: {first} then {second}"
    );
    let table = ok(host.cli(TOKEN_A, &["jobs"]));
    assert!(table.contains(&second), "{table}");

    host.wait_long("resumed to finish", Duration::from_secs(120), || {
        let v = host.job("resumed");
        assert_ne!(v["state"], "failed", "{v}");
        v["state"] == "finished"
    });
    let out = committed(&host.state().join("files/a/out"));
    for (key, values) in &out {
        let expected: Vec<String> = (1..=values.len()).map(|n| n.to_string()).collect();
        assert_eq!(values, &expected, "key {key}: lost or repeated records");
    }
    let total: usize = out.values().map(Vec::len).sum();
    assert_eq!(total as u64, COUNT, "every record exactly once");

    // Finished for good: its record is gone and a restart starts nothing.
    host.wait_long("the record removed", Duration::from_secs(10), || {
        !records.join("resumed.json").exists()
    });
    host.terminate();
    host.restart();
    let v = ok_json(host.cli(TOKEN_A, &["jobs", "--json"]));
    assert_eq!(v["jobs"], json!([]), "{v}");
}
