//! End-to-end tests of a running job's REST API (`memento run --listen`) and
//! of `memento savepoint trigger`, against the real binary over real HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn memento() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_memento"));
    cmd.env_remove("MEMENTO_LOG")
        .env_remove("MEMENTO_STATE_DIR")
        .env_remove("MEMENTO_TOKEN")
        .env_remove("MEMENTO_URL");
    cmd
}

fn plugin(name: &str) -> String {
    Path::new(memento_plugins::DIR)
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

/// A slow job (rate-limited generator) so the API has time to answer.
fn job_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
name = "api"
[source]
type = "generator"
count = 1000000
rate = 2000
batch = 100
[[operators]]
name = "count"
plugin = "{}"
[sink]
type = "null"
"#,
            plugin("wordcount")
        ),
    )
    .unwrap();
    path
}

/// A job run with `--listen 127.0.0.1:0`; its address is read from stderr.
struct Running {
    child: Child,
    addr: String,
}

impl Running {
    fn start(dir: &Path, extra: &[&str]) -> Running {
        let mut child = memento()
            .arg("run")
            .arg(job_file(dir))
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.join("state"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("API on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the job printed its API address");
        Running { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 request; returns (status, body).
fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn savepoint_trigger_over_http_waits_for_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let job = Running::start(dir.path(), &[]);
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
    let job = Running::start(dir.path(), &[]);
    let (status, body) = http(&job.addr, "POST", "/v1/jobs/api/savepoints", None, "");
    assert_eq!(status, 202, "{body}");
    let request: serde_json::Value = serde_json::from_str(&body).unwrap();
    let request = request["request_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http(
            &job.addr,
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
    let (status, body) = http(&job.addr, "POST", "/v1/jobs/other/savepoints", None, "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("\"error\":\"not_found\""), "{body}");
    let (status, _) = http(&job.addr, "GET", "/v1/jobs/api/savepoints/999", None, "");
    assert_eq!(status, 404);
    let (status, body) = http(&job.addr, "GET", "/v1/jobs/api/savepoints/x%2F..", None, "");
    assert_eq!(status, 400, "{body}");
    let (status, body) = http(&job.addr, "POST", "/v1/jobs/api/savepoints", None, "{not json");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid JSON body"), "{body}");
    let (status, body) = http(&job.addr, "GET", "/healthz", None, "");
    assert_eq!((status, body.trim()), (200, "ok"));
    // What a single job's API does not serve is a JSON error too.
    let (status, body) = http(&job.addr, "GET", "/v1/snapshots", None, "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("memento run --listen"), "{body}");
    let (status, body) = http(&job.addr, "DELETE", "/v1/jobs/api", None, "");
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("\"error\":\"method_not_allowed\""), "{body}");
    // The job and its checkpoints, as `memento serve` shapes them.
    let (status, body) = http(&job.addr, "GET", "/v1/jobs/api", None, "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["name"].as_str(), v["state"].as_str()),
        (Some("api"), Some("running")),
        "{body}"
    );
    let (status, body) = http(&job.addr, "GET", "/v1/jobs/api/checkpoints", None, "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["counts"]["completed"].as_u64().unwrap() >= 1, "{body}");
}

#[test]
fn stop_over_http_ends_the_run_with_a_savepoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = Running::start(dir.path(), &["--json"]);
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
    let job = Running::start(dir.path(), &["--token", "s3cret"]);
    let (status, body) = http(&job.addr, "POST", "/v1/jobs/api/savepoints", None, "");
    assert_eq!(status, 401, "{body}");
    let (status, _) = http(&job.addr, "POST", "/v1/jobs/api/savepoints", Some("wrong"), "");
    assert_eq!(status, 401);
    let (status, _) = http(&job.addr, "POST", "/v1/jobs/api/checkpoints", Some("s3cret"), "");
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
