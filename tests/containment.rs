//! End-to-end tests that one tenant's job cannot hurt the host that runs
//! it: a panic of the host inside a job's run fails that job alone (its
//! slot freed, the server serving), and a job that produces as fast as it
//! can keeps the server's memory within what the README's security model
//! says a job may cost.
//!
//! The panics are provoked through the library's test-only
//! `fault-injection` feature (enabled for tests by memento-cli's
//! dev-dependency): an operator config key names where the host panics.

mod common;

use common::{Serve, TOKEN_A, TOKEN_B, endless_job, two_tenants};

/// The job file of an endless job whose host panics at `site`.
fn panicking_job(name: &str, site: &str, extra: &str) -> String {
    endless_job(
        name,
        &format!("{extra}\n[operators.config]\n\"memento.fault-injection.panic\" = \"{site}\"\n"),
    )
}

/// A panic in a task thread, the source thread or the coordinator fails
/// that job (state `failed`, the error naming the panic and where), frees
/// its tenant's only `max_jobs` slot for the next submission, and leaves
/// the server and another tenant's job running. A panic in a snapshot's
/// upload fails that snapshot, named as the host's failure. Before, the
/// job stayed `running` for ever and later submissions got 429.
#[test]
fn a_panic_in_a_job_fails_that_job_alone_and_frees_its_slot() {
    let s = Serve::start(&two_tenants("max_jobs = 1", ""));
    s.submit(TOKEN_B, &endless_job("bystander", ""));
    s.wait_running(TOKEN_B, "bystander");

    for (site, thread) in [
        ("task", "count[0]"),
        ("source", "the source"),
        ("coordinator", "the coordinator"),
    ] {
        // Tenant a has one slot: this submission succeeds only if the
        // previous panicking job gave it back.
        s.submit(TOKEN_A, &panicking_job("boom", site, ""));
        let mut job = serde_json::Value::Null;
        s.wait(&format!("the job panicking in the {site} to fail"), || {
            job = s.json("GET", "/v1/jobs/boom", Some(TOKEN_A), "", 200);
            job["state"] != "running" && job["state"] != "created"
        });
        assert_eq!(job["state"], "failed", "{site}: {job}");
        let error = job["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&format!("the host panicked in {thread}")) && error.contains("fault injection"),
            "{site}: {error}"
        );
        assert_eq!(s.call("GET", "/healthz", None, ""), (200, "ok\n".to_string()));
        let bystander = s.json("GET", "/v1/jobs/bystander", Some(TOKEN_B), "", 200);
        assert_eq!(bystander["state"], "running", "{bystander}");
    }

    // A panic while uploading a checkpoint fails the checkpoint, not the
    // job, and says it was the host.
    s.submit(
        TOKEN_A,
        &panicking_job(
            "upload",
            "upload",
            "[checkpoints]\ninterval = \"200ms\"\ntolerable_failures = 1000",
        ),
    );
    let mut failed = serde_json::Value::Null;
    s.wait("a checkpoint failed by the upload's panic", || {
        let v = s.json("GET", "/v1/jobs/upload/checkpoints", Some(TOKEN_A), "", 200);
        failed = v["latest"]["failed"].clone();
        !failed.is_null()
    });
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the host panicked in the upload of count[0]"),
        "{failed}"
    );
    let job = s.json("GET", "/v1/jobs/upload", Some(TOKEN_A), "", 200);
    assert_eq!(job["state"], "running", "{job}");
    s.json("POST", "/v1/jobs/upload/cancel", Some(TOKEN_A), "", 202);
}

/// Resident memory of process `pid` in bytes (`VmRSS` of /proc/PID/status).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}

const MIB: u64 = 1 << 20;

/// A tenant whose jobs are capped at 128 MiB submits a job that produces
/// as fast as it can: an unpaced endless generator into a plugin that
/// turns every event into 16 MiB of 64 KiB values, fanned out to two slower
/// tasks, with checkpoints aligning barriers on the way. The server's
/// resident memory stays within what the README's security model says such
/// a job may cost: its tasks' memory caps, one call's output per task, the
/// byte budget of each edge between stages and the source's batch, above
/// the idle server — while the job really moves data.
#[test]
fn a_job_producing_without_pause_costs_the_host_at_most_what_the_security_model_says() {
    let s = Serve::start(&two_tenants("memory = \"128MiB\"", ""));
    let job = r#"name = "flood"
[source]
type = "generator"
batch = 1
[[operators]]
name = "blow-up"
plugin = "hostile.wasm"
[operators.config]
mode = "huge-output"
output_mib = "16"
[[operators]]
name = "pass"
plugin = "hostile.wasm"
parallelism = 2
[sink]
type = "null"
[checkpoints]
interval = "500ms"
format = "canonical"
tolerable_failures = 1000
"#;
    let body =
        serde_json::json!({ "job": job, "plugins": { "hostile.wasm": common::plugin_b64("hostile") } });
    // The idle server, settled after its first requests.
    s.call("GET", "/healthz", None, "");
    let idle = rss_bytes(s.pid());
    s.json("POST", "/v1/jobs", Some(TOKEN_A), &body.to_string(), 201);
    s.wait_running(TOKEN_A, "flood");

    // What the security model allows this job: 3 tasks with 128 MiB of
    // plugin memory and one call's output each (max_output, 64 MiB by
    // default), its tasks' inputs (one edge each: source → blow-up,
    // blow-up → pass[0], pass[1]) of INPUT_BYTES plus one event over it, a
    // source batch of one event;
    // and 64 MiB for the instances' and threads' own structures and the
    // allocator's slack.
    let tasks = 3;
    let edges = 3;
    let allowed =
        tasks * (128 * MIB + 64 * MIB) + edges * (memento::dataflow::INPUT_BYTES + 64 * 1024 + 56) + 64 * MIB;
    let mut peak = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(8) {
        peak = peak.max(rss_bytes(s.pid()));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let v = s.json("GET", "/v1/jobs/flood", Some(TOKEN_A), "", 200);
    assert_eq!(v["state"], "running", "{v}");
    let moved = v["records_in"].as_u64().unwrap_or(0);
    assert!(moved >= 5, "the job hardly ran: {v}");
    eprintln!(
        "idle {} MiB, peak {} MiB, allowed above idle {} MiB, {moved} events of 16 MiB of output each",
        idle / MIB,
        peak / MIB,
        allowed / MIB
    );
    assert!(
        peak <= idle + allowed,
        "the server grew from {} MiB to {} MiB, more than the {} MiB the job may cost",
        idle / MIB,
        peak / MIB,
        allowed / MIB
    );
}

/// A submitted job runs at most `MAX_TASKS` tasks: each is a thread and an
/// instance with the tenant's memory cap, so a job of five operators at
/// parallelism 256 would make the caps bound nothing. It is refused before
/// anything is compiled or started.
#[test]
fn a_job_of_more_tasks_than_a_shared_host_allows_is_refused() {
    let s = Serve::start(&two_tenants("", ""));
    let mut job = String::from("name = \"wide\"\n[source]\ntype = \"generator\"\n[sink]\ntype = \"null\"\n");
    for i in 0..5 {
        job.push_str(&format!(
            "[[operators]]\nname = \"op{i}\"\nplugin = \"wordcount.wasm\"\nparallelism = 256\n"
        ));
    }
    let body =
        serde_json::json!({ "job": job, "plugins": { "wordcount.wasm": common::plugin_b64("wordcount") } });
    let v = s.json("POST", "/v1/jobs", Some(TOKEN_A), &body.to_string(), 400);
    assert_eq!(v["error"], "limit_exceeded", "{v}");
    assert_eq!(
        v["message"],
        format!(
            "operators: the job runs 1280 tasks (their parallelism added up), more than the {} a job may run on this host",
            memento::service::MAX_TASKS
        )
    );
    // Four of them are 1024 tasks: allowed.
    let four = job.replacen(
        "[[operators]]\nname = \"op4\"\nplugin = \"wordcount.wasm\"\nparallelism = 256\n",
        "",
        1,
    );
    let body =
        serde_json::json!({ "job": four, "plugins": { "wordcount.wasm": common::plugin_b64("wordcount") } });
    let v = s.json("POST", "/v1/jobs", Some(TOKEN_A), &body.to_string(), 201);
    assert_eq!(v["name"], "wide", "{v}");
    s.json("POST", "/v1/jobs/wide/cancel", Some(TOKEN_A), "", 202);
}
