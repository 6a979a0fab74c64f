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
