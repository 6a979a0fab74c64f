//! Load on `memento serve`: 10 jobs with 1-second checkpoints in one host
//! while 1,000 API requests arrive from 25 concurrent clients. No request
//! may fail, no checkpoint may fail, none may be missed (each job has
//! completed about one per second it ran). Prints request latency
//! percentiles (see docs/PERFORMANCE.md, "Service under load"):
//!
//! ```sh
//! cargo test -p memento-cli --test load -- --nocapture
//! ```

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Serve, endless_job, hash_token, plugin_b64};
use serde_json::{Value, json};

const TENANTS: [(&str, &str); 2] = [("a", "token-of-a"), ("b", "token-of-b")];
const JOBS_PER_TENANT: usize = 5;
const CLIENTS: usize = 25;
const REQUESTS: usize = 1000;
/// Checkpoints a job may be behind one per elapsed second: the first comes
/// a second after the start, and one may be in flight when counted.
const SLACK: u64 = 2;

/// `memento serve` with the two tenants, each allowed its five jobs.
fn serve() -> Serve {
    let mut toml = "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n".to_string();
    for (name, token) in TENANTS {
        toml += &format!(
            "[[tenants]]\nname = \"{name}\"\ntoken_blake3 = \"{}\"\nmax_jobs = {JOBS_PER_TENANT}\n",
            hash_token(token)
        );
    }
    Serve::start(&toml)
}

fn new_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent()
}

/// GET `path` as `token`: (status, body).
fn get(agent: &ureq::Agent, base: &str, path: &str, token: &str) -> (u16, String) {
    match agent
        .get(format!("{base}{path}"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
    {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

struct Burst {
    /// Sorted.
    latencies: Vec<Duration>,
    errors: Vec<String>,
    took: Duration,
}

/// [`REQUESTS`] GETs from [`CLIENTS`] threads at once, each on its own
/// keep-alive connection: the API mix (jobs list, one job, its
/// checkpoints, metrics, the stored snapshots), or `/healthz` only.
fn burst(base: &str, jobs: &Arc<Vec<(&'static str, &'static str, String)>>, mix: bool) -> Burst {
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let base = base.to_string();
            let jobs = jobs.clone();
            std::thread::spawn(move || {
                let agent = new_agent();
                let mut latencies = Vec::new();
                let mut errors = Vec::new();
                for i in 0..REQUESTS / CLIENTS {
                    let n = c * (REQUESTS / CLIENTS) + i;
                    let (_, token, job) = &jobs[n % jobs.len()];
                    let path = match n % 5 {
                        _ if !mix => "/healthz".to_string(),
                        0 => "/v1/jobs".to_string(),
                        1 => format!("/v1/jobs/{job}"),
                        2 => format!("/v1/jobs/{job}/checkpoints"),
                        3 => "/metrics".to_string(),
                        _ => "/v1/snapshots".to_string(),
                    };
                    let t = Instant::now();
                    let (status, body) = get(&agent, &base, &path, token);
                    latencies.push(t.elapsed());
                    if status != 200 {
                        errors.push(format!("GET {path}: {status}: {body}"));
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut b = Burst {
        latencies: Vec::new(),
        errors: Vec::new(),
        took: Duration::ZERO,
    };
    for c in clients {
        let (l, e) = c.join().unwrap();
        b.latencies.extend(l);
        b.errors.extend(e);
    }
    b.took = started.elapsed();
    b.latencies.sort();
    b
}

fn report(what: &str, b: &Burst) {
    let l = &b.latencies;
    println!(
        "load: {what}: {} requests from {CLIENTS} clients in {:.2} s ({:.0} req/s); latency p50 {:.1} ms, \
         p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        l.len(),
        b.took.as_secs_f64(),
        l.len() as f64 / b.took.as_secs_f64(),
        ms(percentile(l, 0.5)),
        ms(percentile(l, 0.9)),
        ms(percentile(l, 0.99)),
        ms(l[l.len() - 1]),
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One of the hundred jobs: 1,000 records/s, a checkpoint a second.
fn load_job(name: &str) -> String {
    endless_job(name, "[checkpoints]\ninterval = \"1s\"").replace("rate = 2000", "rate = 1000")
}

#[test]
fn ten_jobs_with_1s_checkpoints_under_1000_concurrent_requests() {
    let served = serve();
    let base = served.url();
    let wasm = plugin_b64("wordcount");
    let agent = new_agent();
    let mut jobs = Vec::new();
    for (tenant, token) in TENANTS {
        for i in 0..JOBS_PER_TENANT {
            let name = format!("load{i}");
            let body = json!({ "job": load_job(&name), "plugins": { "wordcount.wasm": wasm } });
            let mut r = agent
                .post(format!("{base}/v1/jobs"))
                .header("Authorization", format!("Bearer {token}"))
                .send_json(body)
                .unwrap();
            let text = r.body_mut().read_to_string().unwrap();
            assert_eq!(r.status().as_u16(), 201, "{text}\n{}", served.log());
            jobs.push((tenant, token, name));
        }
    }

    // Steady state first: the burst should land on jobs that checkpoint.
    let started = Instant::now();
    for (_, token, job) in &jobs {
        loop {
            let (_, body) = get(&agent, &base, &format!("/v1/jobs/{job}"), token);
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if v["counts"]["completed"].as_u64().unwrap_or(0) >= 1 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{job} never checkpointed: {body}\n{}",
                served.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // The load: every client keeps one connection alive and cycles
    // through the endpoints a dashboard and a monitoring system poll. The
    // same burst of `/healthz` first is the floor: what HTTP itself costs
    // on this machine with these clients, no service work.
    let jobs = Arc::new(jobs);
    let floor = burst(&base, &jobs, false);
    report("/healthz (floor)", &floor);
    assert!(floor.errors.is_empty(), "{:#?}", floor.errors);
    let load = burst(&base, &jobs, true);
    report("API mix", &load);
    assert!(
        load.errors.is_empty(),
        "{} failed requests: {:#?}",
        load.errors.len(),
        load.errors
    );
    assert_eq!(load.latencies.len(), REQUESTS);

    // Let the jobs run long enough for the checkpoint counts to mean
    // something, then check each: none failed, none missed.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(started.elapsed()));
    let mut summary = Vec::new();
    for (_, token, job) in jobs.iter() {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let (status, body) = get(&agent, &base, &format!("/v1/jobs/{job}"), token);
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["state"], "running", "{v}\n{}", served.log());
        let (status, body) = get(&agent, &base, &format!("/v1/jobs/{job}/checkpoints"), token);
        assert_eq!(status, 200, "{body}");
        let cps: Value = serde_json::from_str(&body).unwrap();
        let counts = &cps["counts"];
        assert_eq!(counts["failed"], 0, "failed checkpoints: {cps}");
        let ran_s = now_ms.saturating_sub(v["started_at_ms"].as_u64().unwrap()) / 1000;
        let completed = counts["completed"].as_u64().unwrap();
        assert!(
            completed + SLACK >= ran_s,
            "job {job} missed checkpoints: {completed} completed in {ran_s} s\n{cps}"
        );
        summary.push(format!("{completed}/{ran_s}s"));
    }
    println!(
        "load: completed checkpoints per job / seconds run: {}",
        summary.join(" ")
    );
}
