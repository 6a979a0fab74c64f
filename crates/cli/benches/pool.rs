//! Failover of a pool of hosts (issue 13): two real `memento serve`
//! processes on one bucket of a local `moto` server; the host running a
//! job is SIGKILLed, and the time until the job runs on the other host
//! (taken over, restored from its latest snapshot) is measured, several
//! times over, beside the target `ttl + 2 s`.
//!
//! `cargo bench -p memento-cli --bench pool` (`--profile dev` measures the
//! debug build: failover is waiting on leases and scans, not computing).
//! `MEMENTO_BENCH_TTL_MS` (default 10000, the default lease ttl),
//! `MEMENTO_BENCH_REPS` (default 3), `MEMENTO_BENCH_SCAN` (the hosts'
//! `pool_scan`, default `500ms`, the hosts' default).

#[path = "../../../tests/common/s3.rs"]
#[allow(dead_code)]
mod s3;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

const TOKEN: &str = "bench-token";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Host {
    dir: PathBuf,
    child: Option<Child>,
    addr: String,
    ttl_ms: u64,
}

impl Host {
    fn new(dir: &Path, url: &str, shared: &Path, scan: &str, ttl_ms: u64) -> Host {
        std::fs::create_dir_all(dir.join("work")).unwrap();
        std::os::unix::fs::symlink(shared, dir.join("work/files")).unwrap();
        std::fs::write(
            dir.join("host.toml"),
            format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = \"{url}\"\nwork_dir = \"work\"\npool_scan = \"{scan}\"\n\
                 [[tenants]]\nname = \"a\"\ntoken_blake3 = \"{}\"\n",
                memento::spec::host_config::hash_token(TOKEN)
            ),
        )
        .unwrap();
        let mut h = Host {
            dir: dir.to_path_buf(),
            child: None,
            addr: String::new(),
            ttl_ms,
        };
        h.start();
        h
    }

    fn start(&mut self) {
        let addr_file = self.dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_memento"));
        s3::configure(&mut cmd)
            .env("MEMENTO_S3_LOCK_TTL_MS", self.ttl_ms.to_string())
            .args(["serve", "--config", "host.toml", "--addr-file", "addr"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        self.addr = loop {
            if let Ok(t) = std::fs::read_to_string(&addr_file)
                && t.ends_with('\n')
            {
                break t.trim().to_string();
            }
            assert!(child.try_wait().unwrap().is_none(), "serve exited");
            assert!(Instant::now() < deadline, "serve did not listen");
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child = Some(child);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn call(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let Ok(mut s) = TcpStream::connect(&self.addr) else {
            return (0, serde_json::Value::Null);
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let resp = String::from_utf8_lossy(&resp);
        let code = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map_or("", |x| x.1);
        (
            code,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
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

fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let ttl_ms = env_u64("MEMENTO_BENCH_TTL_MS", 10_000);
    let reps = env_u64("MEMENTO_BENCH_REPS", 3).max(1);
    let scan = std::env::var("MEMENTO_BENCH_SCAN").unwrap_or_else(|_| "500ms".into());
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("s3://{}/pool", s3::bucket());
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let mut hosts = [
        Host::new(&tmp.path().join("h0"), &url, &shared, &scan, ttl_ms),
        Host::new(&tmp.path().join("h1"), &url, &shared, &scan, ttl_ms),
    ];
    let plugin = std::fs::read(memento_plugins::path("wordcount")).unwrap();
    let job = "name = \"bench\"\n[source]\ntype = \"generator\"\nrate = 2000\nbatch = 100\n\
               [[operators]]\nname = \"count\"\nplugin = \"wordcount.wasm\"\nparallelism = 2\n\
               [sink]\ntype = \"null\"\n[checkpoints]\ninterval = \"500ms\"\n";
    let body = serde_json::json!({
        "job": job,
        "plugins": { "wordcount.wasm": base64::engine::general_purpose::STANDARD.encode(&plugin) },
    });
    let (code, v) = hosts[0].call("POST", "/v1/jobs", &body.to_string());
    assert_eq!(code, 201, "{v}");
    let mut on = 0;
    let mut times = Vec::new();
    for rep in 0..reps {
        let other = 1 - on;
        wait("a checkpoint", Duration::from_secs(120), || {
            let (c, v) = hosts[on].call("GET", "/v1/jobs/bench/checkpoints", "");
            c == 200 && v["counts"]["completed"].as_u64().is_some_and(|n| n >= 2)
        });
        hosts[on].kill();
        let killed = Instant::now();
        let want = hosts[other].url();
        wait("the takeover", Duration::from_millis(ttl_ms * 4 + 60_000), || {
            let (c, v) = hosts[other].call("GET", "/v1/jobs/bench", "");
            c == 200
                && v["host_url"] == want.as_str()
                && v["state"] == "running"
                && !v["restored_from"].is_null()
        });
        let took = killed.elapsed();
        eprintln!("round {rep}: host killed → job running on the other host in {took:?}");
        times.push(took);
        hosts[on].start();
        on = other;
    }
    times.sort();
    let median = times[times.len() / 2];
    let target = Duration::from_millis(ttl_ms) + Duration::from_secs(2);
    println!(
        "| pool failover (lease ttl {ttl_ms} ms, pool_scan {scan}) | median of {reps} | ratio to target |"
    );
    println!("|---|---|---|");
    println!(
        "| host SIGKILLed → job running on the other host | {:.2} s (min {:.2}, max {:.2}) | {:.2} of ttl + 2 s = {:.1} s |",
        median.as_secs_f64(),
        times[0].as_secs_f64(),
        times[times.len() - 1].as_secs_f64(),
        median.as_secs_f64() / target.as_secs_f64(),
        target.as_secs_f64()
    );
}
