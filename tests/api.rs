//! End-to-end tests of a running job's REST API (`memento run --listen`) and
//! of `memento savepoint trigger`, against the real binary over real HTTP.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::openapi::Doc;
use common::{Listening, Serve, hash_token, memento, plugin, plugin_b64, request, toml_path};
use serde_json::{Value, json};

/// A slow job (rate-limited generator) so the API has time to answer;
/// `plugin` as the job file names it.
fn job_toml(plugin: &str) -> String {
    format!(
        r#"name = "api"
[source]
type = "generator"
count = 1000000
rate = 2000
batch = 100
[[operators]]
name = "count"
plugin = "{plugin}"
[sink]
type = "null"
"#
    )
}

fn job_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(&path, job_toml(&toml_path(&plugin("wordcount")))).unwrap();
    path
}

/// `memento run --listen` on the job of [`job_file`] in `dir`.
fn running(dir: &Path, extra: &[&str]) -> Listening {
    Listening::start(dir, &job_file(dir), extra)
}

fn http(job: &Listening, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let (status, text) = job.call(method, path, token, body);
    Doc::get()
        .check_response(method, path, status, &text)
        .unwrap_or_else(|e| panic!("{method} {path}: {status} {text}\ndoes not match openapi.json: {e}"));
    (status, text)
}

#[test]
fn savepoint_trigger_over_http_waits_for_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let job = running(dir.path(), &[]);
    let out = memento()
        .args(["savepoint", "trigger", "api", "--wait", "--url", &job.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(id.starts_with("api-"), "{id}");
    // The savepoint is in the store, as a savepoint.
    let out = memento()
        .args(["snapshots", "show", &id, "--json", "--state-dir"])
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(manifest["kind"], "savepoint");
    assert_eq!(manifest["trigger"], "manual");
}

#[test]
fn request_status_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let job = running(dir.path(), &[]);
    let (status, body) = http(&job, "POST", "/v1/jobs/api/savepoints", None, "");
    assert_eq!(status, 202, "{body}");
    let request: serde_json::Value = serde_json::from_str(&body).unwrap();
    let request = request["request_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http(
            &job,
            "GET",
            &format!("/v1/jobs/api/savepoints/{request}"),
            None,
            "",
        );
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["status"] == "completed" {
            assert!(v["snapshot"].as_str().unwrap().starts_with("api-"));
            break;
        }
        assert_eq!(v["status"], "in_progress", "{body}");
        assert!(Instant::now() < deadline, "savepoint never completed");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Unknown job, unknown request, malformed id, bad JSON: 4xx with a reason.
    let (status, body) = http(&job, "POST", "/v1/jobs/other/savepoints", None, "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("\"error\":\"not_found\""), "{body}");
    let (status, _) = http(&job, "GET", "/v1/jobs/api/savepoints/999", None, "");
    assert_eq!(status, 404);
    let (status, body) = http(&job, "GET", "/v1/jobs/api/savepoints/x%2F..", None, "");
    assert_eq!(status, 400, "{body}");
    let (status, body) = http(&job, "POST", "/v1/jobs/api/savepoints", None, "{not json");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid JSON body"), "{body}");
    let (status, body) = http(&job, "GET", "/healthz", None, "");
    assert_eq!((status, body.trim()), (200, "ok"));
    // What a single job's API does not serve is a JSON error too.
    let (status, body) = http(&job, "GET", "/v1/snapshots", None, "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("memento run --listen"), "{body}");
    let (status, body) = http(&job, "DELETE", "/v1/jobs/api", None, "");
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("\"error\":\"method_not_allowed\""), "{body}");
    // The job and its checkpoints, as `memento serve` shapes them.
    let (status, body) = http(&job, "GET", "/v1/jobs/api", None, "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["name"].as_str(), v["state"].as_str()),
        (Some("api"), Some("running")),
        "{body}"
    );
    let (status, body) = http(&job, "GET", "/v1/jobs/api/checkpoints", None, "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["counts"]["completed"].as_u64().unwrap() >= 1, "{body}");
}

#[test]
fn stop_over_http_ends_the_run_with_a_savepoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = running(dir.path(), &["--json"]);
    // `memento stop --wait` gets the final savepoint's id although the job
    // (and its API) ends with the stop: the API stays up until it is read.
    let out = memento()
        .args(["stop", "api", "--wait", "--url", &job.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let savepoint = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(savepoint.starts_with("api-"), "{savepoint}");
    let mut stdout = String::new();
    job.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(job.child.wait().unwrap().success());
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["state"]["state"], "stopped", "{stdout}");
    assert_eq!(report["state"]["savepoint"], savepoint.as_str(), "{stdout}");
}

#[test]
fn token_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let job = running(dir.path(), &["--token", "s3cret"]);
    let (status, body) = http(&job, "POST", "/v1/jobs/api/savepoints", None, "");
    assert_eq!(status, 401, "{body}");
    let (status, _) = http(&job, "POST", "/v1/jobs/api/savepoints", Some("wrong"), "");
    assert_eq!(status, 401);
    let (status, _) = http(&job, "POST", "/v1/jobs/api/checkpoints", Some("s3cret"), "");
    assert_eq!(status, 202);
    let out = memento()
        .args([
            "savepoint",
            "trigger",
            "api",
            "--wait",
            "--url",
            &job.url(),
            "--token",
            "s3cret",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn non_loopback_listen_requires_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = memento()
        .arg("run")
        .arg(job_file(dir.path()))
        .args(["--listen", "0.0.0.0:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a loopback address: set a bearer token with --token"),
        "{err}"
    );
}

#[test]
fn trigger_without_a_running_job_is_a_clear_error() {
    let out = memento()
        .args(["savepoint", "trigger", "api", "--url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the job at http://127.0.0.1:9"),
        "{err}"
    );
}

/// The shape of a JSON value: objects by their keys (recursively), arrays
/// by their first element, scalars by their kind.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().take(1).map(shape).collect()),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => Value::Null,
    }
}

/// `memento run --listen` and `memento serve` answer the job routes alike:
/// the same job (same name, same tenant `default`, same token) on both, the
/// same requests, the same status, error code and body shape, and every
/// body as `openapi.json` documents it. Covers the drifts the two servers
/// once had: unknown fields in a trigger body, the bearer token's
/// whitespace and scheme case, the shape of `GET /v1/jobs/{job}`.
#[test]
fn both_servers_answer_the_job_routes_alike() {
    const TOKEN: &str = "tok-of-default";
    let dir = tempfile::tempdir().unwrap();
    let single = running(dir.path(), &["--token", TOKEN]);
    let serve = Serve::start(&format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n[[tenants]]\nname = \"default\"\ntoken_blake3 = \"{}\"\n",
        hash_token(TOKEN)
    ));
    let body = json!({ "job": job_toml("wordcount.wasm"), "plugins": { "wordcount.wasm": plugin_b64("wordcount") } });
    serve.json("POST", "/v1/jobs", Some(TOKEN), &body.to_string(), 201);
    let servers = [
        ("run --listen", single.addr.clone()),
        ("serve", serve.addr.clone()),
    ];
    // Both running, with a completed savepoint each: request 1.
    for (name, addr) in &servers {
        let (status, text) = request(
            addr,
            "POST",
            "/v1/jobs/api/savepoints",
            Some(&format!("Bearer {TOKEN}")),
            "",
        );
        assert_eq!(status, 202, "{name}: {text}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, text) = request(
                addr,
                "GET",
                "/v1/jobs/api/savepoints/1",
                Some(&format!("Bearer {TOKEN}")),
                "",
            );
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["status"] == "completed" {
                break;
            }
            assert_eq!(v["status"], "in_progress", "{name}: {text}");
            assert!(Instant::now() < deadline, "{name}: savepoint never completed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let bearer = format!("Bearer {TOKEN}");
    let padded = format!("bearer   {TOKEN}  ");
    let ok = Some(bearer.as_str());
    // (method, path, Authorization, body, status, error code)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, &'a str, u16, &'a str);
    // One byte over the trigger body limit: the server has read it all when
    // it refuses (a bigger body races the server's close: a broken pipe).
    let huge = "x".repeat((64 << 10) + 1);
    let cases: Vec<Case> = vec![
        ("GET", "/v1/jobs", ok, "", 200, ""),
        ("GET", "/v1/jobs?tenant=default", ok, "", 200, ""),
        ("GET", "/v1/jobs?tenant=other", ok, "", 404, "not_found"),
        ("GET", "/v1/jobs/api", ok, "", 200, ""),
        ("GET", "/v1/jobs/api", Some(padded.as_str()), "", 200, ""),
        ("GET", "/v1/jobs/api", None, "", 401, "unauthorized"),
        (
            "GET",
            "/v1/jobs/api",
            Some("Bearer wrong"),
            "",
            401,
            "unauthorized",
        ),
        ("GET", "/v1/jobs/api", Some("Bearer "), "", 401, "unauthorized"),
        ("GET", "/v1/jobs/api", Some(TOKEN), "", 401, "unauthorized"),
        ("GET", "/v1/jobs/nope", ok, "", 404, "not_found"),
        ("GET", "/v1/jobs/..%2Fx", ok, "", 400, "bad_request"),
        ("GET", "/v1/jobs/api?tenant=other", ok, "", 404, "not_found"),
        ("GET", "/v1/jobs/api/checkpoints", ok, "", 200, ""),
        ("GET", "/v1/jobs/api/checkpoints/config", ok, "", 200, ""),
        ("GET", "/v1/jobs/api/checkpoints/{n}", ok, "", 200, ""),
        ("GET", "/v1/jobs/api/checkpoints/abc", ok, "", 400, "bad_request"),
        ("GET", "/v1/jobs/api/checkpoints/99999", ok, "", 404, "not_found"),
        ("GET", "/v1/jobs/api/checkpoints/requests/1", ok, "", 200, ""),
        (
            "GET",
            "/v1/jobs/api/checkpoints/requests/77",
            ok,
            "",
            404,
            "not_found",
        ),
        ("GET", "/v1/jobs/api/savepoints/1", ok, "", 200, ""),
        ("GET", "/v1/jobs/api/savepoints/abc", ok, "", 400, "bad_request"),
        (
            "POST",
            "/v1/jobs/api/savepoints",
            ok,
            "{\"format\": \"canonical\"}",
            202,
            "",
        ),
        (
            "POST",
            "/v1/jobs/api/savepoints",
            ok,
            "{\"colour\": 1}",
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/jobs/api/savepoints",
            ok,
            "{\"format\": \"zip\"}",
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/jobs/api/savepoints",
            ok,
            "{not json",
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/jobs/api/savepoints",
            ok,
            huge.as_str(),
            413,
            "too_large",
        ),
        ("POST", "/v1/jobs/api/checkpoints", ok, "", 202, ""),
        ("POST", "/v1/jobs/nope/checkpoints", ok, "", 404, "not_found"),
        ("DELETE", "/v1/jobs/api", ok, "", 405, "method_not_allowed"),
        ("POST", "/v1/jobs/api/cancel", ok, "", 202, ""),
    ];
    // `{n}`: the number of the savepoint in each server's history.
    let numbers: Vec<String> = servers
        .iter()
        .map(|(_, addr)| {
            let (_, text) = request(addr, "GET", "/v1/jobs/api/checkpoints", ok, "");
            let v: Value = serde_json::from_str(&text).unwrap();
            v["history"][0]["number"].to_string()
        })
        .collect();
    for (method, path, auth, body, want, code) in &cases {
        let answers: Vec<(u16, Value)> = servers
            .iter()
            .zip(&numbers)
            .map(|((name, addr), n)| {
                let path = &path.replace("{n}", n);
                let (status, text) = request(addr, method, path, *auth, body);
                assert_eq!(status, *want, "{name}: {method} {path} ({auth:?}): {text}");
                Doc::get()
                    .check_response(method, path, status, &text)
                    .unwrap_or_else(|e| {
                        panic!("{name}: {method} {path}: {text}\ndoes not match openapi.json: {e}")
                    });
                let v: Value = serde_json::from_str(&text).unwrap();
                if !code.is_empty() {
                    assert_eq!(v["error"], *code, "{name}: {method} {path}: {text}");
                }
                (status, v)
            })
            .collect();
        assert_eq!(
            shape(&answers[0].1),
            shape(&answers[1].1),
            "{method} {path}: run --listen answered {}, serve {}",
            answers[0].1,
            answers[1].1
        );
    }
    // Cancelled on both: the job ends, a second cancel is a conflict.
    for (name, addr) in &servers {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, text) = request(addr, "POST", "/v1/jobs/api/cancel", ok, "");
            if status == 409 {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["error"], "conflict", "{name}: {text}");
                break;
            }
            assert_eq!(status, 202, "{name}: {text}");
            assert!(Instant::now() < deadline, "{name}: the job never ended");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
