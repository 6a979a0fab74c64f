//! `memento` with its store on S3-compatible object storage (issue 13),
//! against a real S3-protocol server (`moto`, see `common::s3`): a
//! `--state-dir s3://…` is a store, not a directory named `s3:`; bad
//! locations and unreachable or missing buckets are one-line errors; and a
//! job SIGKILLed at random instants (mid-upload, mid-commit) twenty times
//! resumes each time from its latest snapshot with exactly-once output and
//! a store that `fsck` finds clean.

mod common;

use common::output::{
    Committed, assert_prefix, assert_same_output, committed, total_lines, wordcount_output,
};
use common::{memento, plugin, s3, toml_path};
use memento::store::{Backend, S3Backend, S3Options};

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A wordcount job over the deterministic generator into a `file` sink
/// `out/`, with checkpoints every `interval`.
fn job(name: &str, count: u64, rate: Option<u64>, interval: &str) -> String {
    job_into(name, count, rate, interval, "out")
}

/// As [`job`], the `file` sink writing to `sink` (a directory or a URL).
fn job_into(name: &str, count: u64, rate: Option<u64>, interval: &str, sink: &str) -> String {
    let rate = rate.map(|r| format!("rate = {r}\n")).unwrap_or_default();
    format!(
        "name = \"{name}\"\n[source]\ntype = \"generator\"\ncount = {count}\nkeys = 40\nseed = 3\nbatch = 100\n{rate}\n\
         [[operators]]\nname = \"count\"\nplugin = \"{}\"\nparallelism = 2\n\n\
         [sink]\ntype = \"file\"\npath = \"{sink}\"\n\n[checkpoints]\ninterval = \"{interval}\"\n",
        toml_path(&plugin("wordcount"))
    )
}

fn cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = memento();
    s3::configure(&mut c).args(args).current_dir(dir);
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    cmd(dir, args).stdin(Stdio::null()).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `memento run` to its end on `s3://` writes snapshots there, creates no
/// local directory for the URL, and the store commands read them back.
#[test]
fn a_job_checkpoints_into_a_bucket_and_the_store_commands_read_it() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("s3://{}/prod/state", s3::bucket());
    std::fs::write(tmp.path().join("job.toml"), job("wc", 3000, None, "100ms")).unwrap();
    let out = run(tmp.path(), &["run", "job.toml", "--state-dir", &url, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!tmp.path().join("s3:").exists(), "the URL became a directory");
    assert_same_output(
        &committed(&tmp.path().join("out")),
        &wordcount_output(3000, 40, 3),
        "a run on object storage",
    );
    let list = run(
        tmp.path(),
        &["snapshots", "list", "--job", "wc", "--json", "--state-dir", &url],
    );
    assert!(list.status.success(), "{}", text(&list));
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert!(!listed.as_array().unwrap().is_empty(), "{listed}");
    let fsck = run(tmp.path(), &["fsck", "--state-dir", &url]);
    assert!(fsck.status.success(), "{}", text(&fsck));
    // Starting over from the latest snapshot of a finished job works too.
    let again = run(
        tmp.path(),
        &[
            "run",
            "job.toml",
            "--state-dir",
            &url,
            "--from",
            "latest",
            "--json",
        ],
    );
    assert!(again.status.success(), "{}", text(&again));
}

/// Locations that cannot be a store fail before anything is created, with
/// one line naming the location (or URL) and the reason.
#[test]
fn bad_locations_and_unreachable_buckets_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("job.toml"), job("wc", 100, None, "1s")).unwrap();
    let cases: [(Vec<String>, &str); 3] = [
        (
            vec!["--state-dir".into(), "gs://b/x".into()],
            "unsupported scheme \"gs\"",
        ),
        (
            vec!["--state-dir".into(), "s3://no-such-bucket-at-all/x".into()],
            "s3://no-such-bucket-at-all/x: open: the bucket does not exist",
        ),
        (
            vec!["--state-dir".into(), "s3://Bad_Bucket".into()],
            "bucket name",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["run".to_string(), "job.toml".into()];
        all.extend(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = run(tmp.path(), &all);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{all:?} succeeded");
        // One error line naming the location and the reason (clap adds
        // its usage hint below a bad argument).
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "{all:?}: {err}");
        assert!(errors[0].contains(want), "{all:?}: {err}");
    }
    // An endpoint nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = cmd(tmp.path(), &["snapshots", "list", "--state-dir", "s3://bkt/p"])
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("s3://bkt/p: open: endpoint unreachable"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!tmp.path().join("s3:").exists());
}

/// Twenty SIGKILLs at random instants of a run checkpointing every 200 ms
/// into a bucket (so kills land during pack uploads and manifest commits):
/// after each, the committed output is a per-key prefix of the right one;
/// each resume (`--from latest`) first takes over the killed run's lease;
/// at the end the output is exactly the uninterrupted one and fsck is
/// clean.
#[test]
fn exactly_once_under_twenty_sigkills_on_object_storage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("s3://{}/eo", s3::bucket());
    let (count, rate) = (40_000, 2_000);
    std::fs::write(dir.join("job.toml"), job("eo", count, Some(rate), "200ms")).unwrap();
    let expected = wordcount_output(count, 40, 3);
    let out_dir = dir.join("out");
    let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
    let (mut kills, mut runs, mut resumes) = (0, 0, 0);
    let mut from_scratch = true;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no end in sight: {kills} kills, {runs} runs"
        );
        runs += 1;
        let mut args = vec!["run", "job.toml", "--state-dir", &url, "--json"];
        if !from_scratch {
            args.extend(["--from", "latest"]);
        }
        let spawned = Instant::now();
        let mut child = cmd(dir, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = if kills < 20 {
            // Past start-up (a resume waits up to a lease ttl for the
            // killed run's lease), then a random instant of the run.
            let staging = out_dir.join(".staging");
            while !staging.exists() && spawned.elapsed() < Duration::from_secs(60) {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let delay = Duration::from_millis(300 + rng % 1200);
            let until = Instant::now() + delay;
            let mut exited = None;
            while Instant::now() < until {
                if let Some(s) = child.try_wait().unwrap() {
                    exited = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            match exited {
                Some(s) => s,
                None => {
                    child.kill().unwrap();
                    child.wait().unwrap()
                }
            }
        } else {
            child.wait().unwrap()
        };
        if status.signal() == Some(libc::SIGKILL) {
            kills += 1;
            resumes += usize::from(!from_scratch);
            from_scratch = false;
            assert_prefix(&committed(&out_dir), &expected, &format!("after kill {kills}"));
            continue;
        }
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !status.success() && stderr.contains("no snapshot of job") {
            from_scratch = true;
            continue;
        }
        assert!(status.success(), "run {runs} failed ({status}): {stderr}");
        break;
    }
    assert_same_output(
        &committed(&out_dir),
        &expected,
        &format!("after {kills} kills, {runs} runs"),
    );
    assert!(total_lines(&expected) > 0);
    assert!(
        resumes * 2 >= kills,
        "most kills should land after a checkpoint: {resumes} of {kills}"
    );
    let fsck = run(dir, &["fsck", "--state-dir", &url]);
    assert!(fsck.status.success(), "fsck after {kills} kills: {}", text(&fsck));
}

/// `memento serve` with `state_dir = "s3://…"` and a local `work_dir`:
/// a boot job checkpoints into the bucket, the REST API answers for it, and
/// the store commands see its snapshots in the bucket.
#[test]
fn serve_keeps_its_store_in_a_bucket() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = format!("s3://{}/pool", s3::bucket());
    std::fs::write(
        dir.join("job.toml"),
        job("clicks", 1_000_000, Some(2_000), "200ms"),
    )
    .unwrap();
    std::fs::write(
        dir.join("host.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"{url}\"\nwork_dir = \"work\"\n\
             [[tenants]]\nname = \"a\"\ntoken_blake3 = \"{}\"\n\
             [[jobs]]\ntenant = \"a\"\nfile = \"job.toml\"\n",
            common::hash_token(common::TOKEN_A)
        ),
    )
    .unwrap();
    let addr_file = dir.join("addr");
    let mut child = cmd(dir, &["serve", "--config", "host.toml", "--addr-file", "addr"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let addr = common::await_addr_file(&addr_file, &mut child, &common::Log::default());
    let log = || std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
    let bearer = format!("Bearer {}", common::TOKEN_A);
    common::wait_for("a checkpoint in the bucket", Duration::from_secs(60), log, || {
        let (code, body) = common::request(&addr, "GET", "/v1/jobs/clicks/checkpoints", Some(&bearer), "");
        code == 200
            && serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["counts"]["completed"].as_u64())
                .is_some_and(|n| n >= 1)
    });
    let list = run(
        dir,
        &[
            "snapshots",
            "list",
            "--tenant",
            "a",
            "--job",
            "clicks",
            "--json",
            "--state-dir",
            &url,
        ],
    );
    assert!(list.status.success(), "{}", text(&list));
    assert!(
        !serde_json::from_slice::<serde_json::Value>(&list.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(dir.join("work/service").exists(), "records live in work_dir");
    assert!(!dir.join("s3:").exists());
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}: {}", log());
}

/// The bucket's root, as the test server is configured.
fn bucket_root(bucket: &str) -> S3Backend {
    let options = S3Options {
        config: vec![
            ("aws_endpoint".into(), s3::endpoint().into()),
            ("aws_allow_http".into(), "true".into()),
            ("aws_access_key_id".into(), "test".into()),
            ("aws_secret_access_key".into(), "test".into()),
            ("aws_region".into(), "us-east-1".into()),
        ],
        ..Default::default()
    };
    S3Backend::open(bucket, "", options).unwrap()
}

/// What a `file` sink committed under `prefix` of a bucket: the part
/// objects (not the staged ones), by name, as [`committed`] reads a
/// directory.
fn committed_objects(root: &S3Backend, prefix: &str) -> Committed {
    let mut out = Committed::new();
    let mut names: Vec<String> = root
        .list(prefix)
        .unwrap()
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    for name in names {
        let bytes = root.read(&format!("{prefix}/{name}")).unwrap();
        for line in String::from_utf8(bytes).unwrap().lines() {
            let (k, v) = line
                .split_once('\t')
                .unwrap_or_else(|| panic!("{name}: line without a tab: {line:?}"));
            out.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    out
}

/// The `file` sink with `path = "s3://…"`: a run to its end commits part
/// objects; then runs SIGKILLed at random instants (mid-upload of staged
/// parts, mid-commit of their copies) at least twelve times resume each
/// time with the committed objects a per-key prefix of the right output,
/// and at the end they are exactly the uninterrupted run's output, with no
/// staged object left over and a clean store.
#[test]
fn the_file_sink_writes_exactly_once_to_a_bucket_under_sigkills() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bucket = s3::bucket();
    let root = bucket_root(&bucket);
    let url = format!("s3://{bucket}/state");

    // Uninterrupted.
    let (count, rate) = (30_000, 2_000);
    let expected = wordcount_output(count, 40, 3);
    std::fs::write(
        dir.join("whole.toml"),
        job_into("whole", count, None, "100ms", &format!("s3://{bucket}/whole/out")),
    )
    .unwrap();
    let out = run(dir, &["run", "whole.toml", "--state-dir", &url, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_same_output(
        &committed_objects(&root, "whole/out"),
        &expected,
        "an uninterrupted run",
    );
    assert!(root.list("whole/out/.staging").unwrap().is_empty());
    assert!(!dir.join("s3:").exists(), "the URL became a directory");

    // Killed again and again.
    std::fs::write(
        dir.join("job.toml"),
        job_into("eo", count, Some(rate), "200ms", &format!("s3://{bucket}/eo/out")),
    )
    .unwrap();
    let mut rng = 0x2545_F491_4F6C_DD1D_u64;
    let (mut kills, mut runs) = (0, 0);
    let mut from_scratch = true;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no end in sight: {kills} kills, {runs} runs"
        );
        runs += 1;
        let mut args = vec!["run", "job.toml", "--state-dir", &url, "--json"];
        if !from_scratch {
            args.extend(["--from", "latest"]);
        }
        let spawned = Instant::now();
        let mut child = cmd(dir, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = if kills < 12 {
            // Past start-up: a staged part object is there.
            while root.list("eo/out/.staging").unwrap().is_empty()
                && spawned.elapsed() < Duration::from_secs(60)
            {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let until = Instant::now() + Duration::from_millis(100 + rng % 1000);
            let mut exited = None;
            while Instant::now() < until {
                if let Some(s) = child.try_wait().unwrap() {
                    exited = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            match exited {
                Some(s) => s,
                None => {
                    child.kill().unwrap();
                    child.wait().unwrap()
                }
            }
        } else {
            child.wait().unwrap()
        };
        if status.signal() == Some(libc::SIGKILL) {
            kills += 1;
            from_scratch = false;
            assert_prefix(
                &committed_objects(&root, "eo/out"),
                &expected,
                &format!("after kill {kills}"),
            );
            continue;
        }
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !status.success() && stderr.contains("no snapshot of job") {
            from_scratch = true;
            continue;
        }
        assert!(status.success(), "run {runs} failed ({status}): {stderr}");
        break;
    }
    assert!(kills >= 12, "{kills} kills");
    assert_same_output(
        &committed_objects(&root, "eo/out"),
        &expected,
        &format!("after {kills} kills, {runs} runs"),
    );
    assert!(
        root.list("eo/out/.staging").unwrap().is_empty(),
        "staged objects left over"
    );
    let fsck = run(dir, &["fsck", "--state-dir", &url]);
    assert!(fsck.status.success(), "fsck after {kills} kills: {}", text(&fsck));
}
