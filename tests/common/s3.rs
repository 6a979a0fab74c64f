//! A real S3-protocol server for the object-storage tests: `moto` on
//! loopback, started once per test process (or the one
//! `MEMENTO_TEST_S3_ENDPOINT` names, as `.ci/run` provides), and a fresh
//! bucket per test. The tests fail, never skip, when moto is missing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lock and lease time to live the tests give `memento`: short, so that a
/// killed run's lease is taken over quickly by the next.
pub const TEST_LOCK_TTL_MS: u64 = 1000;

/// The endpoint URL of the test server.
pub fn endpoint() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT.get_or_init(|| {
        if let Ok(e) = std::env::var("MEMENTO_TEST_S3_ENDPOINT") {
            return e;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // From a thread that lives as long as the process, with a
        // parent-death signal: the server never outlives the tests.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::os::unix::process::CommandExt;
            let mut cmd = Command::new("moto_server");
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            // SAFETY: prctl is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let spawned = cmd.spawn();
            let ok = spawned.is_ok();
            tx.send(spawned.map(|_| ()).map_err(|e| e.to_string())).unwrap();
            if ok {
                loop {
                    std::thread::park();
                }
            }
        });
        if let Err(e) = rx.recv().unwrap() {
            panic!(
                "cannot start moto_server ({e}): install it with `pip install 'moto[server]'` \
                 or set MEMENTO_TEST_S3_ENDPOINT"
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        format!("http://127.0.0.1:{port}")
    })
}

/// A new, empty bucket.
pub fn bucket() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!("it{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    let host = endpoint().trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&host).unwrap();
    write!(
        s,
        "PUT /{name} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "create bucket {name}: {answer}"
    );
    name
}

/// Points `cmd` at the test server the standard way (`AWS_*`).
pub fn configure(cmd: &mut Command) -> &mut Command {
    cmd.env("AWS_ENDPOINT_URL", endpoint())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true")
        .env("MEMENTO_S3_LOCK_TTL_MS", TEST_LOCK_TTL_MS.to_string())
}
