//! End-to-end tests of `memento serve`: the multi-tenant REST API against the
//! real binary over real HTTP — submission, snapshots, tenancy on every
//! endpoint, limits, bad input, metrics, the OpenAPI document.

mod common;

use std::collections::BTreeSet;

use base64::Engine as _;
use common::openapi::Doc;
use common::wasm::with_extra_global;
use common::{ADMIN, Serve, TOKEN_A, TOKEN_B, endless_job, plugin, plugin_b64, raw, toml_path, two_tenants};
use serde_json::{Value, json};

/// The value of the series `name{labels}` in a Prometheus text answer.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Tenancy on every endpoint: a job and savepoint of tenant `a` are
/// invisible to tenant `b` (404, as if absent), every `/v1` endpoint and
/// `/metrics` need a valid token (401), the admin sees all and acts with
/// `?tenant=`; then `a` uses every endpoint for real, ending with stop.
#[test]
fn tenants_see_only_their_own_jobs_and_snapshots_on_every_endpoint() {
    let s = Serve::start(&two_tenants("", ""));
    let a = Some(TOKEN_A);
    let b = Some(TOKEN_B);
    s.submit(
        TOKEN_A,
        &endless_job("clicks", "[checkpoints]\ninterval = \"300ms\"\nretained = 2"),
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
        for token in [None, Some("wrong"), Some(""), Some("token-of-a-")] {
            let v = s.json(method, path, token, body, 401);
            assert_eq!(v["error"], "unauthorized", "{method} {path} with {token:?}: {v}");
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
    // Quantiles in seconds, typed; no quota series for a tenant without one.
    let p99 = metric(
        &metrics_a,
        "memento_snapshot_duration_seconds{tenant=\"a\",job=\"clicks\",quantile=\"0.99\"}",
    )
    .expect("a duration p99 once snapshots completed");
    assert!(p99 > 0.0 && p99 < 60.0, "seconds, not ms: {p99}");
    for line in [
        "# TYPE memento_snapshot_duration_seconds gauge",
        "# TYPE memento_snapshots_completed_total counter",
        "# TYPE memento_tenant_storage_bytes gauge",
    ] {
        assert!(metrics_a.lines().any(|l| l == line), "{line}:\n{metrics_a}");
    }
    assert!(!metrics_a.contains("memento_tenant_quota_bytes{"), "{metrics_a}");
    assert!(metric(&metrics_a, "memento_tenant_storage_bytes{tenant=\"a\"}").unwrap() > 0.0);
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
        "job": endless_job("clicks", ""),
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
    let s = Serve::start(&two_tenants(
        "max_jobs = 1\nmemory = \"64MiB\"\ncall_timeout = \"2s\"",
        "quota = 1",
    ));
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
        submit(&endless_job("x", "[limits]\nspeed = 1"), plugins.clone()),
        400,
        "invalid_job",
        "unknown field `speed`",
    );
    expect(
        submit(&endless_job("x", ""), json!({})),
        400,
        "invalid_job",
        "\"wordcount.wasm\" was not uploaded",
    );
    expect(
        submit(&endless_job("x", ""), json!({ "wordcount.wasm": "!!!" })),
        400,
        "bad_request",
        "invalid base64",
    );
    let garbage = base64::engine::general_purpose::STANDARD.encode(b"\0asm but not really");
    expect(
        submit(&endless_job("x", ""), json!({ "wordcount.wasm": garbage })),
        400,
        "invalid_plugin",
        // Named as uploaded, not by the host's path for it.
        "operator `count`: wordcount.wasm: ",
    );
    expect(
        submit(
            &endless_job("x", "").replace("plugin = \"wordcount.wasm\"", "plugin = \"../wordcount.wasm\""),
            plugins.clone(),
        ),
        400,
        "invalid_job",
        "operators[0].plugin",
    );
    let file_sink =
        endless_job("x", "").replace("type = \"null\"", "type = \"file\"\npath = \"../../escape\"");
    expect(
        submit(&file_sink, plugins.clone()),
        400,
        "invalid_job",
        "sink.path",
    );
    let abs_source = endless_job("x", "").replace(
        "type = \"generator\"\nrate = 2000\nbatch = 100",
        "type = \"file\"\npath = \"/etc/passwd\"",
    );
    expect(
        submit(&abs_source, plugins.clone()),
        400,
        "invalid_job",
        "source.path",
    );
    // A symlink in the tenant's directory leads nowhere outside it.
    let files = s.state().join("files/a");
    std::fs::create_dir_all(&files).unwrap();
    std::os::unix::fs::symlink("/etc", files.join("etc")).unwrap();
    let via_link = endless_job("x", "").replace(
        "type = \"generator\"\nrate = 2000\nbatch = 100",
        "type = \"file\"\npath = \"etc/passwd\"",
    );
    expect(
        submit(&via_link, plugins.clone()),
        400,
        "invalid_job",
        "source.path: etc/passwd: leads to /etc through a symlink, outside the tenant's directory",
    );
    let stdout = endless_job("x", "").replace("type = \"null\"", "type = \"stdout\"");
    expect(submit(&stdout, plugins.clone()), 400, "invalid_job", "stdout");
    // Native snapshots asked of a component that cannot be imaged: refused
    // at submission, not at the first checkpoint.
    let imageless = base64::engine::general_purpose::STANDARD
        .encode(with_extra_global(&std::fs::read(plugin("wordcount")).unwrap()));
    expect(
        submit(
            &endless_job("x", "[checkpoints]\nformat = \"native\""),
            json!({ "wordcount.wasm": imageless }),
        ),
        400,
        "invalid_job",
        "operator `count`: [checkpoints] format = \"native\" needs a component whose state is all in its memories",
    );
    expect(
        submit(
            &endless_job("x", "[limits]\nmemory = \"128MiB\""),
            plugins.clone(),
        ),
        400,
        "limit_exceeded",
        "limits.memory",
    );
    expect(
        submit(
            &endless_job("x", "[limits]\ncall_timeout = \"1m\""),
            plugins.clone(),
        ),
        400,
        "limit_exceeded",
        "limits.call_timeout",
    );
    let from_missing =
        json!({ "job": endless_job("x", ""), "plugins": plugins, "from": "x-000009" }).to_string();
    expect(from_missing, 404, "not_found", "x-000009");
    let from_bad = json!({ "job": endless_job("x", ""), "plugins": plugins, "from": "../x" }).to_string();
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
    let v = s.submit(TOKEN_A, &endless_job("first", ""));
    assert_eq!(v["limits"]["memory"], 64 << 20, "{v}");
    assert_eq!(v["limits"]["call_timeout_ms"], 2000, "{v}");
    // The same name again while it runs: 409. Another job: a runs 1 at most.
    expect(
        submit(&endless_job("first", ""), plugins.clone()),
        409,
        "conflict",
        "already running",
    );
    expect(
        submit(&endless_job("second", ""), plugins.clone()),
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
    s.submit(
        TOKEN_B,
        &endless_job("tiny", "[checkpoints]\ntolerable_failures = 100"),
    );
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
    // Nothing completed: no quantiles at all (not zeros); the failure counts.
    let (status, metrics_b) = s.call("GET", "/metrics", Some(TOKEN_B), "");
    assert_eq!(status, 200);
    assert!(
        !metrics_b.contains("memento_snapshot_duration_seconds{"),
        "{metrics_b}"
    );
    assert!(
        metric(
            &metrics_b,
            "memento_snapshots_failed_total{tenant=\"b\",job=\"tiny\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        metric(&metrics_b, "memento_tenant_quota_bytes{tenant=\"b\"}"),
        Some(1.0)
    );
    assert!(!s.log().contains("panicked"), "{}", s.log());
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
        endless_job("boot", "[checkpoints]\ninterval = \"200ms\"")
            .replace("wordcount.wasm", &toml_path(&plugin("wordcount"))),
    )
    .unwrap();
    let s = Serve::start(&two_tenants(
        "",
        &format!("[[jobs]]\ntenant = \"a\"\nfile = \"{}\"\n", job.display()),
    ));
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
    assert_eq!(text, memento_cli::api::multi::OPENAPI);
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
    let routed: std::collections::BTreeSet<(String, String)> = memento_cli::api::multi::routes()
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

    // Every route really answers, with a body that matches its documented
    // schema: a savepoint and a checkpoint first, so that every route has
    // something to show; the admin acts with ?tenant=a. Stop and cancel
    // come last (they end the job); cancel after stop is a 409.
    let a = Some(TOKEN_A);
    let r = s.json("POST", "/v1/jobs/boot/savepoints", a, "", 202);
    let request = r["request_id"].as_str().unwrap().to_string();
    let savepoint = s.wait_request(TOKEN_A, "boot", &request)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let cps = s.json("GET", "/v1/jobs/boot/checkpoints", a, "", 200);
    let number = cps["history"][0]["number"].as_u64().unwrap().to_string();
    let submit =
        json!({ "job": endless_job("fresh", ""), "plugins": { "wordcount.wasm": plugin_b64("wordcount") } })
            .to_string();
    let mut exercised = BTreeSet::new();
    let cases: Vec<(&str, &str, String, &str, u16)> = vec![
        ("get", "/", "/".into(), "", 200),
        ("get", "/healthz", "/healthz".into(), "", 200),
        ("get", "/metrics", "/metrics".into(), "", 200),
        ("get", "/v1/openapi.json", "/v1/openapi.json".into(), "", 200),
        ("get", "/v1/jobs", "/v1/jobs".into(), "", 200),
        ("post", "/v1/jobs", "/v1/jobs".into(), &submit, 201),
        ("get", "/v1/jobs/{job}", "/v1/jobs/boot".into(), "", 200),
        (
            "get",
            "/v1/jobs/{job}/checkpoints",
            "/v1/jobs/boot/checkpoints".into(),
            "",
            200,
        ),
        (
            "post",
            "/v1/jobs/{job}/checkpoints",
            "/v1/jobs/boot/checkpoints".into(),
            "",
            202,
        ),
        (
            "get",
            "/v1/jobs/{job}/checkpoints/config",
            "/v1/jobs/boot/checkpoints/config".into(),
            "",
            200,
        ),
        (
            "get",
            "/v1/jobs/{job}/checkpoints/{number}",
            format!("/v1/jobs/boot/checkpoints/{number}"),
            "",
            200,
        ),
        (
            "get",
            "/v1/jobs/{job}/checkpoints/requests/{request}",
            format!("/v1/jobs/boot/checkpoints/requests/{request}"),
            "",
            200,
        ),
        (
            "post",
            "/v1/jobs/{job}/savepoints",
            "/v1/jobs/boot/savepoints".into(),
            "{\"format\": \"native\"}",
            202,
        ),
        (
            "get",
            "/v1/jobs/{job}/savepoints/{request}",
            format!("/v1/jobs/boot/savepoints/{request}"),
            "",
            200,
        ),
        ("get", "/v1/snapshots", "/v1/snapshots".into(), "", 200),
        (
            "delete",
            "/v1/snapshots/{id}",
            format!("/v1/snapshots/{savepoint}"),
            "",
            200,
        ),
        // A boot job's parallelism is its job file's: 409.
        (
            "post",
            "/v1/jobs/{job}/rescale",
            "/v1/jobs/boot/rescale".into(),
            "{\"parallelism\": 2}",
            409,
        ),
        (
            "post",
            "/v1/jobs/{job}/stop",
            "/v1/jobs/boot/stop".into(),
            "",
            202,
        ),
        (
            "post",
            "/v1/jobs/{job}/cancel",
            "/v1/jobs/boot/cancel".into(),
            "",
            409,
        ),
        (
            "post",
            "/v1/jobs/{job}/cancel",
            "/v1/jobs/fresh/cancel".into(),
            "",
            202,
        ),
    ];
    for (method, template, path, body, want) in &cases {
        assert_eq!(Doc::get().template(method, path), Some(*template), "{path}");
        let sep = if path.contains('?') { '&' } else { '?' };
        let path = format!("{path}{sep}tenant=a");
        let (status, text) = s.call(&method.to_uppercase(), &path, Some(ADMIN), body);
        assert_eq!(status, *want, "{method} {path}: {text}\nlog:\n{}", s.log());
        Doc::get()
            .check_response(method, &path, status, &text)
            .unwrap_or_else(|e| panic!("{method} {path}: {text}\ndoes not match openapi.json: {e}"));
        if *template == "/v1/jobs/{job}/stop" {
            s.wait("boot stopped", || {
                s.json("GET", "/v1/jobs/boot", a, "", 200)["state"] == "stopped"
            });
        }
        exercised.insert((method.to_string(), template.to_string()));
    }
    let unexercised: Vec<_> = routed.difference(&exercised).collect();
    assert!(
        unexercised.is_empty(),
        "routes without a checked answer: {unexercised:?}"
    );
}

/// The checker the tests above rely on refuses what does not match: a
/// missing required field, an unknown one, a value outside an enum, a
/// wrong type, a null that is not allowed, an undocumented status.
#[test]
fn the_openapi_checker_refuses_bodies_that_do_not_match() {
    let doc = Doc::get();
    let ok = json!({"request_id": "1"});
    let job = Value::Object(serde_json::Map::new());
    let check = |method: &str, path: &str, status: u16, body: &Value| {
        doc.check_response(method, path, status, &body.to_string())
    };
    check("POST", "/v1/jobs/x/stop", 202, &ok).unwrap();
    for (status, body, why) in [
        (202, json!({}), "required field `request_id`"),
        (202, json!({"request_id": "1", "extra": 1}), "not in the schema"),
        (202, json!({"request_id": 1}), "expected string"),
        (404, json!({"error": "not_found"}), "required field `message`"),
        (418, ok.clone(), "not documented"),
    ] {
        let e = check("POST", "/v1/jobs/x/stop", status, &body).unwrap_err();
        assert!(e.contains(why), "{e}");
    }
    let e = check("GET", "/v1/jobs/x", 200, &job).unwrap_err();
    assert!(e.contains("required field"), "{e}");
    let e = check("GET", "/v1/jobs/x/savepoints/1", 200, &json!({"status": "done"})).unwrap_err();
    assert!(e.contains("is not one of"), "{e}");
    let latest_null = json!({"completed": null, "savepoint": null, "failed": null, "restored": null});
    let schema = &doc.value()["components"]["schemas"]["Checkpoints"]["properties"]["latest"];
    doc.check(schema, &latest_null, "$").unwrap();
    let e = doc
        .check(
            schema,
            &json!({"completed": {"number": 1}, "savepoint": null, "failed": null, "restored": null}),
            "$",
        )
        .unwrap_err();
    assert!(e.contains("$.completed: required field"), "{e}");
    let e = check("GET", "/v1/snapshots", 200, &json!({"snapshots": null})).unwrap_err();
    assert!(e.contains("not nullable"), "{e}");
}
