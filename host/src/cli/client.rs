//! `memento savepoint trigger`: the CLI as a client of a running job's REST
//! API (`memento run --listen`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::api::{RequestStatus, TriggerResponse};

/// Trigger a savepoint of `job` at `url`; with `wait`, poll until it is done
/// and return the snapshot id, else the request id.
pub fn trigger_savepoint(url: &str, token: Option<&str>, job: &str, wait: bool) -> anyhow::Result<String> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let base = url.trim_end_matches('/');
    let auth = token.map(|t| format!("Bearer {t}")).unwrap_or_default();
    let post_url = format!("{base}/v1/jobs/{job}/savepoints");
    let mut resp = agent
        .post(&post_url)
        .header("Authorization", &auth)
        .send_empty()
        .with_context(|| format!("cannot reach the job at {base} (is `memento run --listen` running?)"))?;
    if !resp.status().is_success() {
        bail!(
            "{post_url}: {}: {}",
            resp.status(),
            error_message(resp.body_mut().read_to_string().unwrap_or_default())
        );
    }
    let trigger: TriggerResponse = resp
        .body_mut()
        .read_json()
        .context("unexpected answer from the job")?;
    if !wait {
        return Ok(trigger.request_id);
    }
    let status_url = format!("{base}/v1/jobs/{job}/savepoints/{}", trigger.request_id);
    let started = Instant::now();
    loop {
        let mut resp = agent
            .get(&status_url)
            .header("Authorization", &auth)
            .call()
            .with_context(|| format!("cannot reach {base}"))?;
        if !resp.status().is_success() {
            bail!("{status_url}: {}", resp.status());
        }
        match resp
            .body_mut()
            .read_json::<RequestStatus>()
            .context("unexpected answer from the job")?
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

/// The `message` of an API error body, or the body itself.
fn error_message(body: String) -> String {
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or(body)
}
