//! End-to-end tests of `memento serve`: the multi-tenant REST API against the
//! real binary over real HTTP — submission, snapshots, tenancy on every
//! endpoint, limits, bad input, metrics, the OpenAPI document.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use memento::spec::host_config::hash_token;
use serde_json::{Value, json};

const ADMIN: &str = "admin-token";
const TOKEN_A: &str = "token-of-a";
const TOKEN_B: &str = "token-of-b";

fn plugin_path(name: &str) -> PathBuf {
    Path::new(memento_plugins::DIR).join(format!("{name}.wasm"))
}

fn plugin_b64(name: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(plugin_path(name)).unwrap())
}

/// A `memento serve` process on 127.0.0.1:0 with tenants `a` and `b` and an
/// admin; `extra` is appended to HOST.toml (more tenant keys for `b`, jobs).
struct Served {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
    stderr: Arc<Mutex<String>>,
}

impl Served {
    fn start(tenant_a: &str, extra: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("host.toml");
        std::fs::write(
            &config,
            format!(
                r#"listen = "127.0.0.1:0"
state_dir = "state"
max_upload = "1MiB"
admin_token_blake3 = "{}"
[[tenants]]
name = "a"
token_blake3 = "{}"
{tenant_a}
[[tenants]]
name = "b"
token_blake3 = "{}"
{extra}
"#,
                hash_token(ADMIN),
                hash_token(TOKEN_A),
                hash_token(TOKEN_B)
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_memento"))
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("MEMENTO_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("API on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                sink.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!("memento serve did not start:\n{}", log.lock().unwrap());
            }
        };
        Served {
            child,
            addr,
            _dir: dir,
            stderr: log,
        }
    }

    fn call(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
        http(&self.addr, method, path, token, body)
    }

    /// A JSON call that must answer `want`.
    fn json(&self, method: &str, path: &str, token: Option<&str>, body: &str, want: u16) -> Value {
        let (status, text) = self.call(method, path, token, body);
        assert_eq!(
            status,
            want,
            "{method} {path}: {text}\nserver log:\n{}",
            self.stderr.lock().unwrap()
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Submit the slow job `name` as `token`; must answer 201.
    fn submit(&self, token: &str, name: &str, extra_toml: &str) -> Value {
        let body = json!({ "job": job_toml(name, extra_toml), "plugins": { "wordcount.wasm": plugin_b64("wordcount") } });
        self.json("POST", "/v1/jobs", Some(token), &body.to_string(), 201)
    }

    fn wait_running(&self, token: &str, job: &str) {
        self.wait(&format!("job {job} running"), || {
            self.json("GET", &format!("/v1/jobs/{job}"), Some(token), "", 200)["state"] == "running"
        });
    }

    /// Poll trigger request `request` of `job` until it is no longer in
    /// progress; returns its final status.
    fn wait_request(&self, token: &str, job: &str, request: &str) -> Value {
        let mut last = Value::Null;
        self.wait(&format!("request {request} of {job}"), || {
            last = self.json(
                "GET",
                &format!("/v1/jobs/{job}/savepoints/{request}"),
                Some(token),
                "",
                200,
            );
            last["status"] != "in_progress"
        });
        last
    }

    fn wait(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nserver log:\n{}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An unbounded, rate-limited job: it runs until stopped.
fn job_toml(name: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
[source]
type = "generator"
rate = 2000
batch = 100
[[operators]]
name = "count"
plugin = "wordcount.wasm"
[sink]
type = "null"
{extra}
"#
    )
}

/// A minimal HTTP/1.1 request; returns (status, body).
fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw(addr, request.as_bytes())
}

fn raw(addr: &str, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request).unwrap();
    let mut response = Vec::new();
    // The server may close after answering without reading all of a body.
    let _ = s.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// Tenancy on every endpoint: a job and savepoint of tenant `a` are
/// invisible to tenant `b` (404, as if absent), every `/v1` endpoint and
/// `/metrics` need a valid token (401), the admin sees all and acts with
/// `?tenant=`; then `a` uses every endpoint for real, ending with stop.
#[test]
fn tenants_see_only_their_own_jobs_and_snapshots_on_every_endpoint() {
    let s = Served::start("", "");
    let a = Some(TOKEN_A);
    let b = Some(TOKEN_B);
    s.submit(
        TOKEN_A,
        "clicks",
        "[checkpoints]\ninterval = \"300ms\"\nretained = 2",
    );
    s.wait_running(TOKEN_A, "clicks");

    // A savepoint of a's job, to have a snapshot id and a request id.
    let r = s.json("POST", "/v1/jobs/clicks/savepoints", a, "", 202);
    let request = r["request_id"].as_str().unwrap().to_string();
    let done = s.wait_request(TOKEN_A, "clicks", &request);
    assert_eq!(done["status"], "completed", "{done}");
    let savepoint = done["snapshot"].as_str().unwrap().to_string();
    assert!(savepoint.starts_with("clicks-"), "{savepoint}");

    // Every endpoint that names a's job or snapshot, with a body that would
    // be valid for a.
    let endpoints: Vec<(&str, String, &str)> = vec![
        ("GET", "/v1/jobs/clicks".into(), ""),
        ("GET", "/v1/jobs/clicks/checkpoints".into(), ""),
        ("POST", "/v1/jobs/clicks/checkpoints".into(), ""),
        ("GET", "/v1/jobs/clicks/checkpoints/config".into(), ""),
        ("GET", "/v1/jobs/clicks/checkpoints/1".into(), ""),
        (
            "GET",
            format!("/v1/jobs/clicks/checkpoints/requests/{request}"),
            "",
        ),
        (
            "POST",
            "/v1/jobs/clicks/savepoints".into(),
            "{\"format\": \"canonical\"}",
        ),
        ("GET", format!("/v1/jobs/clicks/savepoints/{request}"), ""),
        ("POST", "/v1/jobs/clicks/cancel".into(), ""),
        ("POST", "/v1/jobs/clicks/stop".into(), ""),
        ("DELETE", format!("/v1/snapshots/{savepoint}"), ""),
    ];
    for (method, path, body) in &endpoints {
        let v = s.json(method, path, b, body, 404);
        assert_eq!(v["error"], "not_found", "{method} {path}: {v}");
        // b naming a's tenant explicitly is no better.
        let v = s.json(method, &format!("{path}?tenant=a"), b, body, 404);
        assert_eq!(v["error"], "not_found", "{method} {path}?tenant=a: {v}");
    }
    // The listings of b are empty; a's show the job and the savepoint.
    assert_eq!(s.json("GET", "/v1/jobs", b, "", 200)["jobs"], json!([]));
    assert_eq!(s.json("GET", "/v1/snapshots", b, "", 200)["snapshots"], json!([]));
    let (status, metrics_b) = s.call("GET", "/metrics", b, "");
    assert_eq!(status, 200);
    assert!(!metrics_b.contains("tenant=\"a\""), "{metrics_b}");
    assert!(
        metrics_b.contains("memento_tenant_storage_bytes{tenant=\"b\"} 0"),
        "{metrics_b}"
    );
    let snaps = s.json("GET", "/v1/snapshots", a, "", 200);
    assert!(
        snaps["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == savepoint && x["kind"] == "savepoint"),
        "{snaps}"
    );

    // No token or a wrong one: 401 everywhere under /v1 and on /metrics,
    // also on listings and submission.
    let mut all: Vec<(&str, String, &str)> = endpoints.clone();
    all.extend([
        ("GET", "/v1/jobs".to_string(), ""),
        ("POST", "/v1/jobs".to_string(), "{}"),
        ("GET", "/v1/snapshots".to_string(), ""),
        ("GET", "/metrics".to_string(), ""),
    ]);
    for (method, path, body) in &all {
        for token in [None, Some("wrong"), Some("")] {
            let (status, text) = s.call(method, path, token, body);
            assert_eq!(status, 401, "{method} {path} with {token:?}: {text}");
            assert!(text.contains("\"unauthorized\""), "{text}");
        }
    }

    // The admin lists everything and addresses a's job with ?tenant=a.
    let jobs = s.json("GET", "/v1/jobs", Some(ADMIN), "", 200);
    assert_eq!(jobs["jobs"][0]["tenant"], "a", "{jobs}");
    let v = s.json("GET", "/v1/jobs/clicks", Some(ADMIN), "", 400);
    assert_eq!(v["error"], "tenant_required", "{v}");
    s.json("GET", "/v1/jobs/clicks?tenant=b", Some(ADMIN), "", 404);
    s.json("GET", "/v1/jobs/clicks?tenant=nobody", Some(ADMIN), "", 404);
    let v = s.json("GET", "/v1/jobs/clicks?tenant=a", Some(ADMIN), "", 200);
    assert_eq!(v["name"], "clicks");
    let all_snaps = s.json("GET", "/v1/snapshots", Some(ADMIN), "", 200);
    assert!(
        all_snaps["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["tenant"] == "a"),
        "{all_snaps}"
    );
    let (_, metrics_admin) = s.call("GET", "/metrics", Some(ADMIN), "");
    assert!(
        metrics_admin.contains("memento_snapshots_completed_total{tenant=\"a\",job=\"clicks\"}"),
        "{metrics_admin}"
    );

    // a uses every endpoint for real.
    let r = s.json("POST", "/v1/jobs/clicks/checkpoints", a, "", 202);
    let cp = s.wait_request(TOKEN_A, "clicks", r["request_id"].as_str().unwrap());
    assert_eq!(cp["status"], "completed", "{cp}");
    let cps = s.json("GET", "/v1/jobs/clicks/checkpoints", a, "", 200);
    assert!(cps["counts"]["completed"].as_u64().unwrap() >= 2, "{cps}");
    assert!(cps["summary"]["completed"].as_u64().unwrap() >= 2, "{cps}");
    assert!(
        cps["summary"]["duration_ms"]["max"].as_u64().unwrap()
            >= cps["summary"]["duration_ms"]["min"].as_u64().unwrap()
    );
    assert_eq!(cps["latest"]["savepoint"]["id"], savepoint, "{cps}");
    assert_eq!(cps["latest"]["completed"]["kind"], "checkpoint", "{cps}");
    let number = cps["history"][0]["number"].as_u64().unwrap();
    let detail = s.json(
        "GET",
        &format!("/v1/jobs/clicks/checkpoints/{number}"),
        a,
        "",
        200,
    );
    assert_eq!(detail["number"], number);
    if detail["status"] == "completed" {
        assert_eq!(detail["tasks"][0]["task"]["operator"], "count", "{detail}");
    }
    let config = s.json("GET", "/v1/jobs/clicks/checkpoints/config", a, "", 200);
    assert_eq!(config["checkpoints"]["retained"], 2, "{config}");
    let (status, metrics_a) = s.call("GET", "/metrics", a, "");
    assert_eq!(status, 200);
    assert!(
        metrics_a.contains("memento_job_records_in_total{tenant=\"a\",job=\"clicks\"}"),
        "{metrics_a}"
    );
    assert!(
        metrics_a.contains("memento_snapshot_duration_seconds{tenant=\"a\",job=\"clicks\",quantile=\"0.99\"}")
    );
    // Dispose of the savepoint: gone from the list, a second dispose is 404.
    let v = s.json("DELETE", &format!("/v1/snapshots/{savepoint}"), a, "", 200);
    assert_eq!(v["disposed"], savepoint);
    s.json("DELETE", &format!("/v1/snapshots/{savepoint}"), a, "", 404);
    // Stop with a savepoint: the job ends `stopped` and names it.
    let r = s.json("POST", "/v1/jobs/clicks/stop", a, "", 202);
    let stopped = s.wait_request(TOKEN_A, "clicks", r["request_id"].as_str().unwrap());
    assert_eq!(stopped["status"], "completed", "{stopped}");
    s.wait("job stopped", || {
        s.json("GET", "/v1/jobs/clicks", a, "", 200)["state"] == "stopped"
    });
    let v = s.json("GET", "/v1/jobs/clicks", a, "", 200);
    assert_eq!(v["savepoint"], stopped["snapshot"], "{v}");
    // An ended job takes no more triggers.
    let v = s.json("POST", "/v1/jobs/clicks/savepoints", a, "", 409);
    assert_eq!(v["error"], "conflict");
    // It can be resubmitted under the same name, resuming from its savepoint.
    let body = json!({
        "job": job_toml("clicks", ""),
        "plugins": { "wordcount.wasm": plugin_b64("wordcount") },
        "from": stopped["snapshot"],
    });
    s.json("POST", "/v1/jobs", a, &body.to_string(), 201);
    s.wait("restored", || {
        s.json("GET", "/v1/jobs/clicks", a, "", 200)["restored_from"] == stopped["snapshot"]
    });
    s.json("POST", "/v1/jobs/clicks/cancel", a, "", 202);
    s.wait("cancelled", || {
        s.json("GET", "/v1/jobs/clicks", a, "", 200)["state"] == "cancelled"
    });
}

/// Limits and bad input: every malformed or refused request is a 4xx with
/// the reason (never a 500): bad JSON, invalid job files and components,
/// paths leaving the tenant, limits above the tenant's caps (refused when
/// explicit, clamped when defaulted), too many jobs, a running name twice,
/// malformed and unknown ids, oversize uploads, and a storage quota that
/// fails snapshots with "quota exceeded".
#[test]
fn limits_and_bad_requests_answer_4xx_with_the_reason() {
    let s = Served::start(
        "max_jobs = 1\nmemory = \"64MiB\"\ncall_timeout = \"2s\"",
        "quota = 1",
    );
    let a = Some(TOKEN_A);
    let wasm = plugin_b64("wordcount");
    let submit = |job: &str, plugins: Value| json!({ "job": job, "plugins": plugins }).to_string();
    let expect = |body: String, status: u16, code: &str, needle: &str| {
        let v = s.json("POST", "/v1/jobs", a, &body, status);
        assert_eq!(v["error"], code, "{v}");
        assert!(
            v["message"].as_str().unwrap().contains(needle),
            "wanted {needle:?} in {v}"
        );
    };
    let plugins = json!({ "wordcount.wasm": wasm });
    expect("{not json".into(), 400, "bad_request", "invalid JSON body");
    expect(
        json!({"job": "x", "colour": 1}).to_string(),
        400,
        "bad_request",
        "unknown field `colour`",
    );
    expect(
        submit("name = \"x\"", plugins.clone()),
        400,
        "invalid_job",
        "missing field",
    );
    expect(
        submit(&job_toml("x", "[limits]\nspeed = 1"), plugins.clone()),
        400,
        "invalid_job",
        "unknown field `speed`",
    );
    expect(
        submit(&job_toml("x", ""), json!({})),
        400,
        "invalid_job",
        "\"wordcount.wasm\" was not uploaded",
    );
    expect(
        submit(&job_toml("x", ""), json!({ "wordcount.wasm": "!!!" })),
        400,
        "bad_request",
        "invalid base64",
    );
    let garbage = base64::engine::general_purpose::STANDARD.encode(b"\0asm but not really");
    expect(
        submit(&job_toml("x", ""), json!({ "wordcount.wasm": garbage })),
        400,
        "invalid_plugin",
        // Named as uploaded, not by the host's path for it.
        "operator `count`: wordcount.wasm: ",
    );
    expect(
        submit(
            &job_toml("x", "").replace("plugin = \"wordcount.wasm\"", "plugin = \"../wordcount.wasm\""),
            plugins.clone(),
        ),
        400,
        "invalid_job",
        "operators[0].plugin",
    );
    let file_sink = job_toml("x", "").replace("type = \"null\"", "type = \"file\"\npath = \"../../escape\"");
    expect(
        submit(&file_sink, plugins.clone()),
        400,
        "invalid_job",
        "sink.path",
    );
    let abs_source = job_toml("x", "").replace(
        "type = \"generator\"\nrate = 2000\nbatch = 100",
        "type = \"file\"\npath = \"/etc/passwd\"",
    );
    expect(
        submit(&abs_source, plugins.clone()),
        400,
        "invalid_job",
        "source.path",
    );
    let stdout = job_toml("x", "").replace("type = \"null\"", "type = \"stdout\"");
    expect(submit(&stdout, plugins.clone()), 400, "invalid_job", "stdout");
    expect(
        submit(&job_toml("x", "[limits]\nmemory = \"128MiB\""), plugins.clone()),
        400,
        "limit_exceeded",
        "limits.memory",
    );
    expect(
        submit(&job_toml("x", "[limits]\ncall_timeout = \"1m\""), plugins.clone()),
        400,
        "limit_exceeded",
        "limits.call_timeout",
    );
    let from_missing =
        json!({ "job": job_toml("x", ""), "plugins": plugins, "from": "x-000009" }).to_string();
    expect(from_missing, 404, "not_found", "x-000009");
    let from_bad = json!({ "job": job_toml("x", ""), "plugins": plugins, "from": "../x" }).to_string();
    expect(from_bad, 400, "bad_request", "from:");

    // An oversize upload is refused with the limit, before being read.
    let announced = 2 << 20;
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\nContent-Type: application/json\r\nContent-Length: {announced}\r\nConnection: close\r\n\r\n{{\"job\": \""
    );
    let (status, text) = raw(&s.addr, head.as_bytes());
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("1048576 bytes (max_upload)"), "{text}");

    // Defaults above the caps are lowered to them.
    let v = s.submit(TOKEN_A, "first", "");
    assert_eq!(v["limits"]["memory"], 64 << 20, "{v}");
    assert_eq!(v["limits"]["call_timeout_ms"], 2000, "{v}");
    // The same name again while it runs: 409. Another job: a runs 1 at most.
    expect(
        submit(&job_toml("first", ""), plugins.clone()),
        409,
        "conflict",
        "already running",
    );
    expect(
        submit(&job_toml("second", ""), plugins.clone()),
        429,
        "too_many_jobs",
        "max_jobs",
    );

    // Malformed and unknown ids.
    for (path, status) in [
        ("/v1/jobs/..%2Fx", 400),
        (&format!("/v1/jobs/{}", "j".repeat(300)), 400),
        ("/v1/jobs/nope", 404),
        ("/v1/jobs/first/checkpoints/abc", 400),
        ("/v1/jobs/first/checkpoints/99999", 404),
        ("/v1/jobs/first/savepoints/abc", 400),
        ("/v1/jobs/first/savepoints/77", 404),
        ("/v1/jobs/nope/checkpoints", 404),
        ("/v1/no/such/endpoint", 404),
    ] {
        let (got, text) = s.call("GET", path, a, "");
        assert_eq!(got, status, "GET {path}: {text}");
        assert!(
            serde_json::from_str::<Value>(&text).unwrap()["message"].is_string(),
            "{text}"
        );
    }
    for (path, status) in [
        ("/v1/snapshots/..%2Fx", 400),
        ("/v1/snapshots/first", 400),
        (&format!("/v1/snapshots/{}-1", "j".repeat(300)), 400),
        ("/v1/snapshots/first-000777", 404),
    ] {
        let (got, text) = s.call("DELETE", path, a, "");
        assert_eq!(got, status, "DELETE {path}: {text}");
    }
    let (got, text) = s.call("POST", "/v1/jobs/first/savepoints", a, "{\"format\": \"zip\"}");
    assert_eq!(got, 400, "{text}");
    let (got, text) = s.call("PUT", "/v1/jobs", a, "");
    assert_eq!(got, 405, "{text}");

    // b's quota (1 byte) is smaller than any snapshot: it fails, and says why.
    s.submit(TOKEN_B, "tiny", "[checkpoints]\ntolerable_failures = 100");
    s.wait_running(TOKEN_B, "tiny");
    let r = s.json("POST", "/v1/jobs/tiny/savepoints", Some(TOKEN_B), "", 202);
    let failed = s.wait_request(TOKEN_B, "tiny", r["request_id"].as_str().unwrap());
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("quota exceeded"),
        "{failed}"
    );
    let cps = s.json("GET", "/v1/jobs/tiny/checkpoints", Some(TOKEN_B), "", 200);
    assert!(
        cps["latest"]["failed"]["reason"]
            .as_str()
            .unwrap()
            .contains("quota"),
        "{cps}"
    );
    assert!(
        !s.stderr.lock().unwrap().contains("panicked"),
        "{}",
        s.stderr.lock().unwrap()
    );
}

/// Boot jobs from HOST.toml start with the host; `/healthz` answers without
/// a token; the OpenAPI document is valid JSON describing exactly the
/// routes the router serves (both ways), and every documented route is
/// really routed (no fallback answer).
#[test]
fn boot_jobs_health_and_the_openapi_document_matches_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("boot.toml");
    std::fs::write(
        &job,
        job_toml("boot", "[checkpoints]\ninterval = \"200ms\"")
            .replace("wordcount.wasm", &plugin_path("wordcount").display().to_string()),
    )
    .unwrap();
    let s = Served::start(
        "",
        &format!("[[jobs]]\ntenant = \"a\"\nfile = \"{}\"\n", job.display()),
    );
    assert_eq!(s.call("GET", "/healthz", None, ""), (200, "ok\n".to_string()));
    s.wait_running(TOKEN_A, "boot");
    s.wait("a periodic checkpoint", || {
        s.json("GET", "/v1/jobs/boot/checkpoints", Some(TOKEN_A), "", 200)["counts"]["completed"]
            .as_u64()
            .unwrap()
            > 0
    });

    let (status, text) = s.call("GET", "/v1/openapi.json", None, "");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&text).expect("openapi.json is JSON");
    assert_eq!(text, memento_cli::api::service::OPENAPI);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "not OpenAPI 3"
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            assert!(op["responses"].is_object(), "{method} {path} has no responses");
            documented.insert((method.clone(), path.clone()));
        }
    }
    let routed: std::collections::BTreeSet<(String, String)> = memento_cli::api::service::routes()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = routed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&routed).collect();
    assert!(missing.is_empty(), "routes not in openapi.json: {missing:?}");
    assert!(
        extra.is_empty(),
        "openapi.json documents routes that do not exist: {extra:?}"
    );
    // Every documented $ref resolves.
    for r in text.match_indices("\"$ref\": \"#/components/schemas/") {
        let name: String = text[r.0 + 30..].chars().take_while(|c| *c != '"').collect();
        assert!(
            doc["components"]["schemas"][&name].is_object(),
            "dangling $ref {name}"
        );
    }
    // Every route is really served: with the admin's token and sample
    // parameters, no answer is the router's fallback (404 "no such
    // endpoint" / 405).
    for (method, path) in &routed {
        if method == "post" && (path.ends_with("/stop") || path.ends_with("/cancel")) {
            continue; // would end the job; covered by the tenancy test
        }
        let concrete = path
            .replace("{job}", "boot")
            .replace("{number}", "1")
            .replace("{request}", "1")
            .replace("{id}", "boot-000999");
        let sep = if concrete.contains('?') { '&' } else { '?' };
        let (status, text) = s.call(
            &method.to_uppercase(),
            &format!("{concrete}{sep}tenant=a"),
            Some(ADMIN),
            "",
        );
        assert!(
            status != 405 && !text.contains("no such endpoint"),
            "{method} {concrete}: {status} {text}"
        );
        assert!(status < 500, "{method} {concrete}: {status} {text}");
    }
}
