//! The CLI as a client of a running host's REST API: `memento serve`, or the
//! single-job API of `memento run --listen` (which answers the job-scoped
//! paths the same way). `memento jobs`, `checkpoints`, `cancel`, `stop`,
//! `savepoint trigger` and `savepoint dispose --host`. Tables by default, the
//! server's JSON with `--json`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::views::{
    CancelResponse, CheckpointsView, DisposeResponse, ErrorBody, JobsView, OutcomeView, RecordView, Stats,
    TriggerResponse,
};
use memento::coordinator::RequestStatus;
use memento::spec::SnapshotFormat;
use memento::spec::format_size;

/// Where the CLI looks for a host when neither `--host` nor `MEMENTO_HOST`
/// is given (`memento serve`'s default listen address).
pub const DEFAULT_HOST: &str = "http://127.0.0.1:8081";

/// A connection to one host as one caller.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    /// `?tenant=` on every request: the admin token acts in one tenant only
    /// when it names it.
    tenant: Option<String>,
}

#[derive(Clone, Copy)]
enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

/// A path segment with everything but the characters names may hold
/// percent-encoded, so a mistyped name reaches the server as one segment
/// (and gets its "no job" answer) instead of another endpoint.
fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

impl Client {
    /// A client of the host at `host` (e.g. `http://127.0.0.1:8081`).
    pub fn new(host: &str, token: Option<&str>, tenant: Option<&str>) -> Client {
        let agent = ureq::Agent::config_builder()
            // Error statuses are answers to print, not transport failures.
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        let host = host.trim_end_matches('/');
        // `--host 127.0.0.1:8081` means http, as curl would read it.
        let base = if host.contains("://") {
            host.to_string()
        } else {
            format!("http://{host}")
        };
        Client {
            agent,
            base,
            token: token.map(str::to_string),
            tenant: tenant.map(str::to_string),
        }
    }

    /// One request. `subject` names what is unreachable in that message
    /// ("the host", "the job"). A non-2xx answer becomes one line with the
    /// method, URL, status and the server's message; a 2xx answer is read
    /// as `T`, and comes back with the JSON as the server sent it.
    fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        subject: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Answer<T>> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match method {
            Method::Get => {
                let mut r = self.agent.get(&url);
                if let Some(t) = &self.tenant {
                    r = r.query("tenant", t);
                }
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            Method::Delete => {
                let mut r = self.agent.delete(&url);
                if let Some(t) = &self.tenant {
                    r = r.query("tenant", t);
                }
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            Method::Post => {
                let mut r = self.agent.post(&url);
                if let Some(t) = &self.tenant {
                    r = r.query("tenant", t);
                }
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                match body {
                    Some(b) => r.header("Content-Type", "application/json").send(b.to_string()),
                    None => r.send_empty(),
                }
            }
        };
        let mut resp = result.with_context(|| {
            format!(
                "cannot reach {subject} at {} (is `memento serve` or `memento run --listen` running there? \
                 set --host or MEMENTO_HOST)",
                self.base
            )
        })?;
        let status = resp.status();
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        let m = method.as_str();
        if !status.is_success() {
            bail!("{m} {url}: {status}: {}", error_message(&body));
        }
        let json: Value = serde_json::from_str(&body)
            .with_context(|| format!("{m} {url}: {status}: the answer is not JSON"))?;
        let value = T::deserialize(&json)
            .with_context(|| format!("{m} {url}: {status}: unexpected answer {json}"))?;
        Ok(Answer { value, json })
    }

    /// `GET /v1/jobs`.
    pub fn jobs(&self) -> anyhow::Result<Answer<JobsView>> {
        self.call(Method::Get, "/v1/jobs", "the host", None)
    }

    /// `GET /v1/jobs/{job}/checkpoints`.
    pub fn checkpoints(&self, job: &str) -> anyhow::Result<Answer<CheckpointsView>> {
        self.call(
            Method::Get,
            &format!("/v1/jobs/{}/checkpoints", segment(job)),
            "the host",
            None,
        )
    }

    /// `POST /v1/jobs/{job}/cancel`.
    pub fn cancel(&self, job: &str) -> anyhow::Result<Answer<CancelResponse>> {
        self.call(
            Method::Post,
            &format!("/v1/jobs/{}/cancel", segment(job)),
            "the job",
            None,
        )
    }

    /// `POST /v1/jobs/{job}/rescale`: `{"savepoint", "job"}` once the job
    /// runs again at `parallelism`.
    pub fn rescale(&self, job: &str, parallelism: u32) -> anyhow::Result<Answer<Value>> {
        self.call(
            Method::Post,
            &format!("/v1/jobs/{}/rescale", segment(job)),
            "the host",
            Some(&serde_json::json!({ "parallelism": parallelism })),
        )
    }

    /// `POST /v1/jobs/{job}/stop`: the request id of the final savepoint.
    pub fn stop(&self, job: &str) -> anyhow::Result<String> {
        let a: Answer<TriggerResponse> = self.call(
            Method::Post,
            &format!("/v1/jobs/{}/stop", segment(job)),
            "the job",
            None,
        )?;
        Ok(a.value.request_id)
    }

    /// `POST /v1/jobs/{job}/savepoints`, in `format` if given (else the
    /// job's savepoint format): the request id.
    pub fn trigger_savepoint(&self, job: &str, format: Option<SnapshotFormat>) -> anyhow::Result<String> {
        let body = format.map(|f| serde_json::json!({ "format": f }));
        let a: Answer<TriggerResponse> = self.call(
            Method::Post,
            &format!("/v1/jobs/{}/savepoints", segment(job)),
            "the job",
            body.as_ref(),
        )?;
        Ok(a.value.request_id)
    }

    /// Poll `GET /v1/jobs/{job}/savepoints/{request}` until the savepoint
    /// (or the stop's final savepoint) is done; its snapshot id.
    pub fn wait_savepoint(&self, job: &str, request: &str) -> anyhow::Result<String> {
        let path = format!("/v1/jobs/{}/savepoints/{}", segment(job), segment(request));
        let started = Instant::now();
        loop {
            let a: Answer<RequestStatus> = self.call(Method::Get, &path, "the job", None)?;
            match a.value {
                RequestStatus::InProgress => {}
                RequestStatus::Completed { snapshot } => return Ok(snapshot),
                RequestStatus::Failed { error } => bail!("savepoint of job `{job}` failed: {error}"),
            }
            if started.elapsed() > Duration::from_secs(3600) {
                bail!("savepoint of job `{job}` did not complete within an hour");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `DELETE /v1/snapshots/{id}`.
    pub fn dispose(&self, id: &str) -> anyhow::Result<Answer<DisposeResponse>> {
        self.call(
            Method::Delete,
            &format!("/v1/snapshots/{}", segment(id)),
            "the host",
            None,
        )
    }
}

/// A server's answer: as the API's type, and as the JSON it sent (what
/// `--json` prints).
pub struct Answer<T> {
    /// The answer read as its type.
    pub value: T,
    /// The answer as sent.
    pub json: Value,
}

/// The `message` of an API error body, or the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| body.trim().to_string())
        .replace('\n', " ")
}

/// An optional field as text: `-` when absent.
fn opt(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// A value as its JSON text, strings bare (`checkpoint`, `manual`).
fn text<T: serde::Serialize>(x: &T) -> String {
    match serde_json::to_value(x) {
        Ok(Value::String(s)) => s,
        Ok(v) => v.to_string(),
        Err(_) => "-".into(),
    }
}

/// The `memento jobs` table.
pub fn format_jobs(v: &JobsView) -> String {
    if v.jobs.is_empty() {
        return "no jobs\n".into();
    }
    let rows: Vec<Vec<String>> = v
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.name.clone(),
                j.tenant.clone(),
                j.state.as_str().to_string(),
                j.records_in.to_string(),
                j.counts.completed.to_string(),
                j.counts.failed.to_string(),
                j.restarts.to_string(),
                opt(j.restored_from.as_ref()),
            ]
        })
        .collect();
    super::table::render(
        &[
            "JOB",
            "TENANT",
            "STATE",
            "RECORDS",
            "COMPLETED",
            "FAILED",
            "RESTARTS",
            "RESTORED FROM",
        ],
        &["RECORDS", "COMPLETED", "FAILED", "RESTARTS"],
        &rows,
    )
}

/// The `memento checkpoints JOB` view: counts, summary, latest, history.
pub fn format_checkpoints(job: &str, v: &CheckpointsView) -> String {
    let mut s = String::new();
    let c = &v.counts;
    let _ = writeln!(
        s,
        "job `{job}`: {} completed, {} failed, {} in progress, {} restored",
        c.completed, c.failed, c.in_progress, c.restored
    );
    let stats = |st: &Stats, f: &dyn Fn(u64) -> String| {
        [
            ("min", st.min),
            ("p50", st.p50),
            ("p90", st.p90),
            ("p99", st.p99),
            ("max", st.max),
        ]
        .iter()
        .map(|(k, x)| format!("{k} {}", f(*x)))
        .collect::<Vec<_>>()
        .join("  ")
    };
    let sum = &v.summary;
    if sum.completed > 0 {
        let _ = writeln!(
            s,
            "  duration ms   {}",
            stats(&sum.duration_ms, &|x| x.to_string())
        );
        let _ = writeln!(s, "  logical size  {}", stats(&sum.logical_bytes, &format_size));
        let _ = writeln!(s, "  new bytes     {}", stats(&sum.new_bytes, &format_size));
    }
    let id = |r: &Option<RecordView>| opt(r.as_ref().and_then(|r| r.id.as_ref()));
    let _ = writeln!(
        s,
        "  latest checkpoint {}, savepoint {}, restored from {}",
        id(&v.latest.completed),
        id(&v.latest.savepoint),
        opt(v.latest.restored.as_ref())
    );
    if let Some(f) = &v.latest.failed {
        let reason = match &f.outcome {
            OutcomeView::Failed { reason } => reason.as_str(),
            _ => "-",
        };
        let _ = writeln!(s, "  latest failure #{}: {reason}", f.number);
    }
    if v.history.is_empty() {
        let _ = writeln!(s, "no snapshots yet");
        return s;
    }
    let rows: Vec<Vec<String>> = v
        .history
        .iter()
        .map(|r| {
            let status = match r.outcome {
                OutcomeView::InProgress => "in_progress",
                OutcomeView::Completed => "completed",
                OutcomeView::Failed { .. } => "failed",
            };
            vec![
                r.number.to_string(),
                opt(r.id.as_ref()),
                text(&r.kind),
                text(&r.trigger),
                text(&r.format),
                status.to_string(),
                r.duration_ms.to_string(),
                r.pause_ms.to_string(),
                format_size(r.logical_bytes),
                format_size(r.new_bytes),
            ]
        })
        .collect();
    s.push_str(&super::table::render(
        &[
            "#", "ID", "KIND", "TRIGGER", "FORMAT", "STATUS", "MS", "PAUSE MS", "SIZE", "NEW",
        ],
        &["#", "MS", "PAUSE MS", "SIZE", "NEW"],
        &rows,
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cannot_leave_their_place() {
        assert_eq!(segment("clicks-000004"), "clicks-000004");
        assert_eq!(segment("../x y"), "..%2Fx%20y");
    }

    #[test]
    fn tables_align_and_fill_gaps() {
        let job = |name: &str, tenant: &str, state: &str, completed: u64, restored: Option<&str>| {
            serde_json::json!({
                "tenant": tenant, "name": name, "state": state, "restarts": 0,
                "restored_from": restored, "records_in": 12,
                "counts": {"completed": completed, "failed": 0, "in_progress": 0, "restored": 0},
                "submitted_at_ms": 1, "started_at_ms": 2, "operators": [],
                "limits": {"memory": 1, "call_timeout_ms": 1},
            })
        };
        let v: JobsView = serde_json::from_value(serde_json::json!({"jobs": [
            job("a", "t", "running", 0, None),
            job("longer", "t", "failed", 3, Some("longer-000002")),
        ]}))
        .unwrap();
        let t = format_jobs(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("JOB     TENANT  STATE"), "{t}");
        assert_eq!(
            lines[1], "a       t       running       12          0       0         0  -",
            "{t}"
        );
        assert!(lines[2].contains("failed        12          3 "), "{t}");
        assert!(lines[2].ends_with("longer-000002"), "{t}");
        assert_eq!(format_jobs(&JobsView { jobs: vec![] }), "no jobs\n");
    }

    #[test]
    fn error_bodies_become_their_message() {
        assert_eq!(
            error_message(r#"{"error":"not_found","message":"no job `x`"}"#),
            "no job `x`"
        );
        assert_eq!(error_message("plain\ntext\n"), "plain text");
    }
}
