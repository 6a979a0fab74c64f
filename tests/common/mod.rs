//! Helpers shared by the end-to-end tests of the REST API and the remote
//! CLI: the `memento` command, plugins, `memento serve` and `memento run
//! --listen` processes found through `--addr-file`, raw HTTP, and the
//! OpenAPI checker ([`openapi`]).

// Each test target uses its own part of these.
#![allow(dead_code)]

pub mod openapi;
pub mod output;
pub mod s3;
pub mod wasm;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
pub use memento::spec::host_config::hash_token;
use serde_json::Value;

pub const ADMIN: &str = "admin-token";
pub const TOKEN_A: &str = "token-of-a";
pub const TOKEN_B: &str = "token-of-b";

/// `memento` with no MEMENTO_* variable of the environment leaking in.
pub fn memento() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_memento"));
    for var in [
        "MEMENTO_HOST",
        "MEMENTO_URL",
        "MEMENTO_TOKEN",
        "MEMENTO_STATE_DIR",
        "MEMENTO_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// The path of a built plugin (example or test plugin, `-` or `_`).
pub fn plugin(name: &str) -> PathBuf {
    memento_plugins::path(name)
}

/// A path as a TOML basic string's content.
pub fn toml_path(p: &Path) -> String {
    p.display().to_string().replace('\\', "\\\\")
}

/// A built plugin, base64, as `POST /v1/jobs` takes it.
pub fn plugin_b64(name: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(plugin(name)).unwrap())
}

/// An unbounded, rate-limited job (it runs until stopped) with the
/// `wordcount` plugin by upload name; `extra` is appended.
pub fn endless_job(name: &str, extra: &str) -> String {
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

/// Poll `done` every 50 ms for up to `timeout`; on timeout, fail naming
/// `what` with `log()`.
pub fn wait_for(what: &str, timeout: Duration, log: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\nlog:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child's stderr, collected line by line while it runs.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<String>>);

impl Log {
    fn follow(&self, child: &mut Child) {
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

/// Port discovery: wait until `child` wrote its API's address to
/// `addr_file` (`--addr-file`); fail with its log if it exits first.
pub fn await_addr_file(addr_file: &Path, child: &mut Child, log: &Log) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(text) = std::fs::read_to_string(addr_file) {
            assert!(text.ends_with('\n'), "a whole line: {text:?}");
            let addr = text.trim().to_string();
            assert!(
                addr.parse::<std::net::SocketAddr>().is_ok(),
                "HOST:PORT: {addr:?}"
            );
            return addr;
        }
        if let Some(status) = child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(100));
            panic!("memento exited ({status}) before listening:\n{}", log.text());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("memento did not write {}:\n{}", addr_file.display(), log.text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// HOST.toml of tenants `a` and `b` (tokens [`TOKEN_A`], [`TOKEN_B`]) and
/// an admin ([`ADMIN`]) on 127.0.0.1:0; `tenant_a` is appended to `a`'s
/// table, `extra` at the end (more keys of `b`, `[[jobs]]`).
pub fn two_tenants(tenant_a: &str, extra: &str) -> String {
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
    )
}

/// A HOST.toml in a temporary directory and, while started, the `memento
/// serve` process running it (restartable on the same state directory).
pub struct Serve {
    pub dir: tempfile::TempDir,
    config: PathBuf,
    child: Option<Child>,
    pub addr: String,
    pub log: Log,
}

impl Serve {
    /// Write `host_toml` and start `memento serve` on it.
    pub fn start(host_toml: &str) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("host.toml");
        std::fs::write(&config, host_toml).unwrap();
        let mut s = Serve {
            dir,
            config,
            child: None,
            addr: String::new(),
            log: Log::default(),
        };
        s.restart();
        s
    }

    /// Start (again, after [`Serve::terminate`] or [`Serve::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already started");
        let addr_file = self.dir.path().join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut child = memento()
            .args(["serve", "--config"])
            .arg(&self.config)
            .arg("--addr-file")
            .arg(&addr_file)
            .env("MEMENTO_LOG", "warn,memento::service=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.log.follow(&mut child);
        self.addr = await_addr_file(&addr_file, &mut child, &self.log);
        self.child = Some(child);
    }

    /// SIGTERM, and wait for a successful exit (serve cancels its jobs).
    pub fn terminate(&mut self) {
        let mut child = self.child.take().expect("not started");
        // SAFETY: signalling our own child process.
        let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "serve exited with {status}:\n{}", self.log());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "serve ignored SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown at all, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        self.log.text()
    }

    /// The server's process id (while started).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not started").id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
        http(&self.addr, method, path, token, body)
    }

    /// A JSON call that must answer `want`, its body checked against
    /// `openapi.json`.
    pub fn json(&self, method: &str, path: &str, token: Option<&str>, body: &str, want: u16) -> Value {
        let (status, text) = self.call(method, path, token, body);
        assert_eq!(
            status,
            want,
            "{method} {path}: {text}\nserver log:\n{}",
            self.log()
        );
        openapi::Doc::get()
            .check_response(method, path, status, &text)
            .unwrap_or_else(|e| panic!("{method} {path}: {status} {text}\ndoes not match openapi.json: {e}"));
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Submit `job_toml` (plugin `wordcount.wasm`) as `token`; must answer 201.
    pub fn submit(&self, token: &str, job_toml: &str) -> Value {
        let body =
            serde_json::json!({ "job": job_toml, "plugins": { "wordcount.wasm": plugin_b64("wordcount") } });
        self.json("POST", "/v1/jobs", Some(token), &body.to_string(), 201)
    }

    pub fn wait(&self, what: &str, done: impl FnMut() -> bool) {
        wait_for(what, Duration::from_secs(60), || self.log(), done)
    }

    pub fn wait_running(&self, token: &str, job: &str) {
        self.wait(&format!("job {job} running"), || {
            self.json("GET", &format!("/v1/jobs/{job}"), Some(token), "", 200)["state"] == "running"
        });
    }

    /// Poll trigger request `request` of `job` until it is no longer in
    /// progress; its final status.
    pub fn wait_request(&self, token: &str, job: &str, request: &str) -> Value {
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
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A job run with `memento run JOB --listen 127.0.0.1:0 --addr-file …`.
pub struct Listening {
    pub child: Child,
    pub addr: String,
    pub log: Log,
}

impl Listening {
    /// Run `job_file` with its state under `dir`; `extra` arguments after.
    pub fn start(dir: &Path, job_file: &Path, extra: &[&str]) -> Listening {
        let addr_file = dir.join("run-addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut child = memento()
            .arg("run")
            .arg(job_file)
            .args(["--listen", "127.0.0.1:0", "--addr-file"])
            .arg(&addr_file)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Log::default();
        log.follow(&mut child);
        let addr = await_addr_file(&addr_file, &mut child, &log);
        Listening { child, addr, log }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
        http(&self.addr, method, path, token, body)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 request with `Authorization: Bearer <token>`;
/// returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    request(addr, method, path, auth.as_deref(), body)
}

/// A minimal HTTP/1.1 request with the `Authorization` header as given.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw(addr, request.as_bytes())
}

/// Send `request` as is; (status, body).
pub fn raw(addr: &str, request: &[u8]) -> (u16, String) {
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
