//! The dashboard (`GET /` of `memento serve`) in a real browser: headless
//! Chromium, driven directly (`--dump-dom`) and through chromedriver's
//! WebDriver protocol (plain HTTP, spoken with `ureq`).
//!
//! Chromium comes from the OS packages, so `cargo test` ignores these tests
//! (the reason says how to run them); `.ci/run` installs the browser and
//! runs them with `--ignored`. Asked for without a browser, they fail and
//! say how to install it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Serve, endless_job, hash_token};
use serde_json::{Value, json};

const TOKEN: &str = "dashboard-token";
const INSTALL: &str =
    "install it with `apt-get install -y chromium chromium-driver` (Debian; .ci/run does this)";

fn find(names: &[&str]) -> Option<PathBuf> {
    names.iter().map(PathBuf::from).find(|p| p.exists())
}

fn chromium() -> PathBuf {
    find(&[
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ])
    .unwrap_or_else(|| panic!("headless Chromium is needed for the dashboard tests: {INSTALL}"))
}

fn chromedriver() -> PathBuf {
    find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])
        .unwrap_or_else(|| panic!("chromedriver is needed for the dashboard tests: {INSTALL}"))
}

/// Flags for a browser that touches nothing but the page under test.
const BROWSER_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1400,1000",
];

/// `memento serve` with one tenant running the slow job `clicks`.
struct Served(Serve);

impl Served {
    fn start() -> Served {
        let served = Served(Serve::start(&format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n[[tenants]]\nname = \"t\"\ntoken_blake3 = \"{}\"\n",
            hash_token(TOKEN)
        )));
        served.0.submit(
            TOKEN,
            &endless_job("clicks", "[checkpoints]\ninterval = \"500ms\""),
        );
        served
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.0.url())
    }

    /// Trigger a savepoint over the API and wait for its id.
    fn savepoint(&self) -> String {
        let r = self
            .0
            .json("POST", "/v1/jobs/clicks/savepoints", Some(TOKEN), "", 202);
        let done = self
            .0
            .wait_request(TOKEN, "clicks", r["request_id"].as_str().unwrap());
        assert_eq!(done["status"], "completed", "{done}");
        done["snapshot"].as_str().unwrap().to_string()
    }
}

fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The page, loaded with `?token=` by a headless Chromium that runs its
/// scripts for a few (virtual) seconds, lists the running job and the id
/// of a savepoint taken through the API.
#[test]
#[ignore = "needs headless Chromium and chromedriver (apt-get install chromium chromium-driver); run: cargo test --test dashboard -- --ignored"]
fn dashboard_lists_the_job_and_its_savepoint_in_headless_chromium() {
    let chromium = chromium();
    let s = Served::start();
    let savepoint = s.savepoint();
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args(BROWSER_ARGS)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=8000", "--dump-dom"])
        .arg(s.url(&format!("/?token={TOKEN}")))
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "chromium failed: {:?}", out.status);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("data-name=\"clicks\""),
        "the job is not listed:\n{dom}"
    );
    assert!(
        dom.contains(&savepoint),
        "savepoint {savepoint} is not shown:\n{dom}"
    );
    assert!(
        dom.contains(">savepoint<"),
        "no snapshot of kind savepoint:\n{dom}"
    );
    assert!(!dom.contains(TOKEN), "the token leaked into the page");
}

/// A WebDriver session over chromedriver's HTTP protocol.
struct Driver {
    child: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        wait("chromedriver", || {
            ureq::get(format!("{base}/status")).call().ok().map(|_| ())
        });
        let profile = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = BROWSER_ARGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let mut driver = Driver {
            child,
            base,
            session: String::new(),
            _profile: profile,
        };
        let v = driver.post(
            "/session",
            json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": chromium(), "args": args },
            }}}),
        );
        driver.session = v["sessionId"].as_str().expect("a WebDriver session").to_string();
        driver
    }

    fn post(&self, path: &str, body: Value) -> Value {
        let path = path.replace("{s}", &self.session);
        let mut r = ureq::post(format!("{}{path}", self.base))
            .send_json(body)
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"));
        r.body_mut().read_json::<Value>().unwrap()["value"].clone()
    }

    fn script(&self, js: &str) -> Value {
        self.post("/session/{s}/execute/sync", json!({ "script": js, "args": [] }))
    }

    fn click(&self, css: &str) {
        let el = self.post(
            "/session/{s}/element",
            json!({ "using": "css selector", "value": css }),
        );
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_string();
        self.post(&format!("/session/{{s}}/element/{id}/click"), json!({}));
    }

    fn screenshot(&self, path: &Path) {
        let mut r = ureq::get(format!("{}/session/{}/screenshot", self.base, self.session))
            .call()
            .unwrap();
        let v: Value = r.body_mut().read_json().unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = ureq::delete(format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Load the page, see the job's checkpoints, click "Trigger savepoint" and
/// see the new savepoint appear in the stored list; a screenshot is saved
/// as a test artifact (`$CARGO_TARGET_TMPDIR/dashboard.png`).
#[test]
#[ignore = "needs headless Chromium and chromedriver (apt-get install chromium chromium-driver); run: cargo test --test dashboard -- --ignored"]
fn clicking_trigger_savepoint_shows_the_new_savepoint() {
    chromium();
    let s = Served::start();
    let d = Driver::start();
    d.post(
        "/session/{s}/url",
        json!({ "url": s.url(&format!("/?token={TOKEN}")) }),
    );
    // A periodic checkpoint shows up, and the button is enabled for a
    // running job.
    wait("a checkpoint on the page", || {
        let text = d.script("return document.getElementById('snapshots').innerText");
        text.as_str().filter(|t| t.contains("checkpoint")).map(|_| ())
    });
    wait("the button", || {
        d.script("return !document.getElementById('trigger-savepoint').disabled")
            .as_bool()
            .filter(|b| *b)
    });
    d.click("#trigger-savepoint");
    let id = wait("the savepoint to complete", || {
        let status = d.script("return document.getElementById('trigger-status').innerText");
        let status = status.as_str()?.to_string();
        assert!(!status.contains("failed"), "{status}");
        status
            .strip_prefix("savepoint ")?
            .split(' ')
            .next()
            .filter(|id| id.starts_with("clicks-"))
            .map(str::to_string)
    });
    wait("the savepoint in the stored list", || {
        let rows = d.script("return document.getElementById('snapshots').innerText");
        rows.as_str()
            .filter(|t| t.lines().any(|l| l.contains(&id) && l.contains("savepoint")))
            .map(|_| ())
    });
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    d.screenshot(&shot);
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);
    eprintln!("screenshot: {}", shot.display());
}
