//! The CLI as a client of a running host's REST API: `memento serve`, or the
//! single-job API of `memento run --listen` (which answers the job-scoped
//! paths the same way). `memento jobs`, `checkpoints`, `cancel`, `stop`,
//! `savepoint trigger` and `savepoint dispose --host`. Tables by default, the
//! server's JSON with `--json`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::store::human_bytes;
use memento::coordinator::RequestStatus;
use memento::spec::SnapshotFormat;

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
    /// method, URL, status and the server's message.
    fn call(&self, method: Method, path: &str, subject: &str) -> anyhow::Result<Value> {
        self.call_with(method, path, subject, None)
    }

    /// As `call`, with a JSON body for a POST.
    fn call_with(
        &self,
        method: Method,
        path: &str,
        subject: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
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
        if body.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&body).with_context(|| format!("{m} {url}: {status}: the answer is not JSON"))
    }

    /// `GET /v1/jobs`: `{"jobs": [...]}`.
    pub fn jobs(&self) -> anyhow::Result<Value> {
        self.call(Method::Get, "/v1/jobs", "the host")
    }

    /// `GET /v1/jobs/{job}/checkpoints`.
    pub fn checkpoints(&self, job: &str) -> anyhow::Result<Value> {
        self.call(
            Method::Get,
            &format!("/v1/jobs/{}/checkpoints", segment(job)),
            "the host",
        )
    }

    /// `POST /v1/jobs/{job}/cancel`.
    pub fn cancel(&self, job: &str) -> anyhow::Result<Value> {
        self.call(
            Method::Post,
            &format!("/v1/jobs/{}/cancel", segment(job)),
            "the job",
        )
    }

    /// `POST /v1/jobs/{job}/stop`: the request id of the final savepoint.
    pub fn stop(&self, job: &str) -> anyhow::Result<String> {
        let v = self.call(
            Method::Post,
            &format!("/v1/jobs/{}/stop", segment(job)),
            "the job",
        )?;
        request_id(&v)
    }

    /// `POST /v1/jobs/{job}/savepoints`, in `format` if given (else the
    /// job's savepoint format): the request id.
    pub fn trigger_savepoint(&self, job: &str, format: Option<SnapshotFormat>) -> anyhow::Result<String> {
        let body = format.map(|f| serde_json::json!({ "format": f }));
        let v = self.call_with(
            Method::Post,
            &format!("/v1/jobs/{}/savepoints", segment(job)),
            "the job",
            body.as_ref(),
        )?;
        request_id(&v)
    }

    /// Poll `GET /v1/jobs/{job}/savepoints/{request}` until the savepoint
    /// (or the stop's final savepoint) is done; its snapshot id.
    pub fn wait_savepoint(&self, job: &str, request: &str) -> anyhow::Result<String> {
        let path = format!("/v1/jobs/{}/savepoints/{}", segment(job), segment(request));
        let started = Instant::now();
        loop {
            let v = self.call(Method::Get, &path, "the job")?;
            match serde_json::from_value::<RequestStatus>(v.clone())
                .with_context(|| format!("unexpected answer to GET {path}: {v}"))?
            {
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
    pub fn dispose(&self, id: &str) -> anyhow::Result<Value> {
        self.call(
            Method::Delete,
            &format!("/v1/snapshots/{}", segment(id)),
            "the host",
        )
    }
}

fn request_id(v: &Value) -> anyhow::Result<String> {
    v.get("request_id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("unexpected answer without a request_id: {v}"))
}

/// The `message` of an API error body, or the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string())
        .replace('\n', " ")
}

/// Left-aligned columns as wide as their widest cell, two spaces apart.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(l, "{cell:<w$}  ");
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// A field as text: strings bare, numbers as they are, absent or null `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn bytes_cell(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".into(), human_bytes)
}

/// The `memento jobs` table. The single-job API of `memento run --listen`
/// knows only names and states, so every other column may be `-`.
pub fn format_jobs(v: &Value) -> String {
    let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
    if jobs.is_empty() {
        return "no jobs\n".into();
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                cell(&j["name"]),
                cell(&j["tenant"]),
                cell(&j["state"]),
                cell(&j["records_in"]),
                cell(&j["counts"]["completed"]),
                cell(&j["counts"]["failed"]),
                cell(&j["restarts"]),
                cell(&j["restored_from"]),
            ]
        })
        .collect();
    table(
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
        &rows,
    )
}

/// The `memento checkpoints JOB` view: counts, summary, latest, history.
pub fn format_checkpoints(job: &str, v: &Value) -> String {
    let mut s = String::new();
    let c = &v["counts"];
    let _ = writeln!(
        s,
        "job `{job}`: {} completed, {} failed, {} in progress, {} restored",
        cell(&c["completed"]),
        cell(&c["failed"]),
        cell(&c["in_progress"]),
        cell(&c["restored"])
    );
    let sum = &v["summary"];
    let stats = |st: &Value, f: &dyn Fn(&Value) -> String| {
        ["min", "p50", "p90", "p99", "max"]
            .iter()
            .map(|k| format!("{k} {}", f(&st[*k])))
            .collect::<Vec<_>>()
            .join("  ")
    };
    if sum["completed"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(s, "  duration ms   {}", stats(&sum["duration_ms"], &cell));
        let _ = writeln!(s, "  logical size  {}", stats(&sum["logical_bytes"], &bytes_cell));
        let _ = writeln!(s, "  new bytes     {}", stats(&sum["new_bytes"], &bytes_cell));
    }
    let latest = &v["latest"];
    let _ = writeln!(
        s,
        "  latest checkpoint {}, savepoint {}, restored from {}",
        cell(&latest["completed"]["id"]),
        cell(&latest["savepoint"]["id"]),
        cell(&latest["restored"])
    );
    if let Some(f) = latest["failed"].as_object() {
        let _ = writeln!(
            s,
            "  latest failure #{}: {}",
            cell(&f["number"]),
            cell(&f["reason"])
        );
    }
    let history = v["history"].as_array().cloned().unwrap_or_default();
    if history.is_empty() {
        let _ = writeln!(s, "no snapshots yet");
        return s;
    }
    let rows: Vec<Vec<String>> = history
        .iter()
        .map(|r| {
            vec![
                cell(&r["number"]),
                cell(&r["id"]),
                cell(&r["kind"]),
                cell(&r["trigger"]),
                cell(&r["format"]),
                cell(&r["status"]),
                cell(&r["duration_ms"]),
                cell(&r["pause_ms"]),
                bytes_cell(&r["logical_bytes"]),
                bytes_cell(&r["new_bytes"]),
            ]
        })
        .collect();
    s.push_str(&table(
        &[
            "#", "ID", "KIND", "TRIGGER", "FORMAT", "STATUS", "MS", "PAUSE MS", "SIZE", "NEW",
        ],
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
        let v = serde_json::json!({"jobs": [{"name": "a", "state": "running"},
            {"name": "longer", "tenant": "t", "state": "failed", "counts": {"completed": 3}}]});
        let t = format_jobs(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("JOB     TENANT  STATE"), "{t}");
        assert!(lines[1].starts_with("a       -       running"), "{t}");
        assert!(lines[2].contains("failed   -        3"), "{t}");
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
