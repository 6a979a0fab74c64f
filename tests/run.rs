//! End-to-end tests of `memento run`, `memento inspect` and `memento demo`:
//! they drive the real binary with the real plugins (built by crates/plugins/build.rs).

mod common;

use common::{memento, plugin, toml_path};

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Run `memento run` on a job file written into `dir`.
fn run_job(dir: &Path, toml: &str) -> Output {
    let job = dir.join("job.toml");
    std::fs::write(&job, toml).unwrap();
    memento().arg("run").arg(&job).current_dir(dir).output().unwrap()
}

/// Run a job that must fail; return its one-line error.
fn job_error(dir: &Path, toml: &str) -> String {
    let out = run_job(dir, toml);
    assert!(!out.status.success(), "job should fail; stderr: {}", stderr(&out));
    let err = stderr(&out);
    let line = err
        .lines()
        .rfind(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(
        !err.contains("thread 'main' panicked"),
        "the host panicked: {err}"
    );
    line.to_string()
}

/// Every line of every part file in a `file` sink directory, per part.
fn parts(dir: &Path) -> BTreeMap<String, Vec<(String, String)>> {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with('.') {
            continue; // the sink's staging directory
        }
        let lines = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                let (k, v) = l.split_once('\t').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        all.insert(path.file_name().unwrap().to_string_lossy().into_owned(), lines);
    }
    all
}

const TEXT: &str = "to be or not to be\nthat is the question\nto be or not to be\nwhether tis nobler in the mind\nthat is the question\nor to take arms\n";

/// The demonstration the foundation promises: a file through two operators,
/// one with parallelism 2, gives exactly the expected output.
#[test]
fn two_operators_one_parallel_reading_a_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("input.txt"), TEXT).unwrap();
    let toml = format!(
        r#"
name = "words"
[source]
type = "file"
path = "input.txt"
batch = 2
[[operators]]
name = "dedup"
plugin = "{dedup}"
parallelism = 2
[[operators]]
name = "count"
plugin = "{wordcount}"
[operators.config]
split = "words"
[sink]
type = "file"
path = "out"
"#,
        dedup = toml_path(&plugin("dedup")),
        wordcount = toml_path(&plugin("wordcount")),
    );
    let out = run_job(dir.path(), &toml);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = stderr(&out);
    assert!(summary.contains("job `words` finished"), "{summary}");
    assert!(summary.contains("dedup"), "{summary}");

    // Expected: word counts over the distinct lines, each update in order.
    let mut seen = std::collections::BTreeSet::new();
    let mut expected_final: BTreeMap<String, u64> = BTreeMap::new();
    for line in TEXT.lines() {
        if seen.insert(line) {
            for w in line.split_whitespace() {
                *expected_final.entry(w.to_string()).or_default() += 1;
            }
        }
    }
    let parts = parts(&dir.path().join("out"));
    assert_eq!(parts.keys().collect::<Vec<_>>(), vec!["part-00000-000000"]);
    let lines = &parts["part-00000-000000"];
    let total: u64 = expected_final.values().sum();
    assert_eq!(lines.len() as u64, total);
    let mut progress: BTreeMap<String, u64> = BTreeMap::new();
    for (word, count) in lines {
        let n = progress.entry(word.clone()).or_default();
        *n += 1;
        assert_eq!(count, &n.to_string(), "updates of {word} out of order");
    }
    assert_eq!(progress, expected_final);
}

/// With parallelism 2 every key is owned by exactly one task, and the counts
/// equal those of the generated input.
#[test]
fn parallel_wordcount_partitions_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
name = "gen"
[source]
type = "generator"
count = 20000
keys = 50
seed = 3
batch = 100
[[operators]]
name = "count"
plugin = "{}"
parallelism = 2
[sink]
type = "file"
path = "out"
"#,
        toml_path(&plugin("wordcount"))
    );
    let out = run_job(dir.path(), &toml);
    assert!(out.status.success(), "{}", stderr(&out));
    let parts = parts(&dir.path().join("out"));
    assert_eq!(parts.len(), 2);
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut finals: BTreeMap<String, u64> = BTreeMap::new();
    for (part, lines) in &parts {
        assert!(!lines.is_empty(), "{part} is empty");
        for (k, v) in lines {
            let prev = owner.insert(k.clone(), part.clone());
            assert!(prev.is_none_or(|p| &p == part), "key {k} in two part files");
            finals.insert(k.clone(), v.parse().unwrap());
        }
    }
    let generator = memento::dataflow::source::Generator::new(Some(20000), None, 50, 3, 100);
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..20000 {
        *expected
            .entry(String::from_utf8(generator.event(i).key).unwrap())
            .or_default() += 1;
    }
    assert_eq!(finals, expected);
}

#[test]
fn window_sum_closes_every_window() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
name = "win"
[source]
type = "generator"
count = 10000
keys = 3
[[operators]]
name = "sum"
plugin = "{}"
parallelism = 2
[operators.config]
window = "1s"
[sink]
type = "file"
path = "out"
"#,
        toml_path(&plugin("window-sum"))
    );
    let out = run_job(dir.path(), &toml);
    assert!(out.status.success(), "{}", stderr(&out));
    let generator = memento::dataflow::source::Generator::new(Some(10000), None, 3, 0, 1024);
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..10000 {
        let e = generator.event(i);
        let v: i64 = String::from_utf8(e.value).unwrap().parse().unwrap();
        *expected.entry(String::from_utf8(e.key).unwrap()).or_default() += v;
    }
    let mut got: BTreeMap<String, i64> = BTreeMap::new();
    let mut windows = 0;
    for lines in parts(&dir.path().join("out")).values() {
        for (k, v) in lines {
            windows += 1;
            *got.entry(k.clone()).or_default() += v.parse::<i64>().unwrap();
        }
    }
    assert_eq!(got, expected, "window sums add up to the input");
    assert_eq!(windows, 3 * 10, "3 keys x 10 one-second windows");
}

#[test]
fn demo_runs() {
    let out = memento().arg("demo").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("demo-words"), "{text}");
    assert!(text.contains("most frequent words"), "{text}");
    assert!(text.contains("window sums emitted: 20000"), "{text}");
    // The third job snapshots while it runs: checkpoints and a savepoint
    // side by side in the store.
    assert!(text.contains("savepoint  demo-clicks-"), "{text}");
    let listed = text
        .split("the store now holds")
        .nth(1)
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        listed.contains(" savepoint ") && listed.contains(" checkpoint "),
        "{listed}"
    );
    let end = listed
        .lines()
        .find(|l| l.contains("end_of_input"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        end.contains("- logical") && end.contains("- new"),
        "the end-of-input record holds no state: {end}"
    );
}

#[test]
fn inspect_describes_a_plugin() {
    let out = memento()
        .arg("inspect")
        .arg(plugin("wordcount"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("memento:operator/operator@0.2.0"), "{text}");
    assert!(text.contains("memento:operator/snapshot@0.2.0"), "{text}");
    assert!(text.contains("memento:operator/state@0.2.0"), "{text}");
    assert!(
        text.contains("contract memento:operator/plugin@0.2.0: yes"),
        "{text}"
    );
    // A plugin built against the previous contract is described as such.
    let out = memento()
        .arg("inspect")
        .arg(plugin("wordcount-v010"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("contract memento:operator/plugin@0.1.0: yes"),
        "{text}"
    );
}

// ---- bad inputs: each gets a one-line error naming the thing and the reason

fn job_with_plugin(plugin: &Path) -> String {
    format!(
        r#"
name = "bad"
[source]
type = "generator"
count = 10
[[operators]]
name = "op"
plugin = "{}"
[sink]
type = "null"
"#,
        toml_path(plugin)
    )
}

#[test]
fn missing_job_file() {
    let out = memento().args(["run", "/nonexistent/job.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("error: cannot read job file /nonexistent/job.toml: No such file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_job_files_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = job_with_plugin(&plugin("wordcount"));
    let cases = [
        (
            good.replace("count = 10", "count = 10\ncolour = \"red\""),
            "unknown field `colour`",
        ),
        (
            format!("{good}\n[checkpoints]\ninterval = \"soon\""),
            "invalid duration \"soon\"",
        ),
        (
            format!("{good}\n[limits]\nmemory = \"12 elephants\""),
            "invalid size \"12 elephants\"",
        ),
        (
            good.replace("name = \"op\"", "name = \"op\"\nparallelism = 0"),
            "operators[0].parallelism: must be at least 1",
        ),
        (
            good.replace("[sink]\ntype = \"null\"", ""),
            "missing field `sink`",
        ),
        ("name = [".to_string(), "job.toml"),
    ];
    for (toml, expected) in cases {
        let err = job_error(dir.path(), &toml);
        assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        assert!(err.contains("job.toml"), "error does not name the file: {err}");
    }
}

#[test]
fn missing_plugin_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = job_error(dir.path(), &job_with_plugin(&dir.path().join("nope.wasm")));
    assert!(err.contains("operator `op`: cannot read component"), "{err}");
    assert!(err.contains("nope.wasm: No such file"), "{err}");
}

#[test]
fn plugins_that_are_not_operator_components_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "text.wasm",
            b"hello, I am not wasm",
            "not a WebAssembly file (expected a component implementing memento:operator@0.2.0)",
        ),
        (
            "core.wasm",
            b"\0asm\x01\0\0\0",
            "is a core WebAssembly module, not a component",
        ),
        (
            "empty.wasm",
            b"\0asm\x0d\0\x01\0",
            "does not export memento:operator/operator@0.2.0 or memento:operator/operator@0.1.0 (found exports: none)",
        ),
        ("broken.wasm", b"\0asm\x0d\0\x01\0\xff\xff", "invalid component"),
    ];
    for (file, bytes, expected) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, bytes).unwrap();
        let err = job_error(dir.path(), &job_with_plugin(&path));
        assert!(err.contains(expected), "{file}: expected {expected:?} in {err:?}");
        assert!(err.contains(file), "{file}: error does not name the file: {err}");
    }
    // A directory is not a component file either.
    let err = job_error(dir.path(), &job_with_plugin(dir.path()));
    assert!(err.contains("not a file"), "{err}");
}

#[test]
fn other_contract_version_is_refused_with_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3.wat");
    // A component exporting the operator interface at a version this host
    // does not implement.
    std::fs::write(
        &path,
        r#"(component
  (core module $m (func (export "f")))
  (core instance $i (instantiate $m))
  (type $ft (func))
  (func $f (type $ft) (canon lift (core func $i "f")))
  (instance $inst (export "close" (func $f)))
  (export "memento:operator/operator@0.3.0" (instance $inst))
)"#,
    )
    .unwrap();
    let wasm = dir.path().join("v3.wasm");
    std::fs::write(&wasm, wat::parse_file(&path).unwrap()).unwrap();
    let err = job_error(dir.path(), &job_with_plugin(&wasm));
    assert!(
        err.contains(
            "exports memento:operator/operator@0.3.0, but this host implements \
             memento:operator/operator@0.2.0 or memento:operator/operator@0.1.0"
        ),
        "{err}"
    );
    let out = memento().arg("inspect").arg(&wasm).output().unwrap();
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("contract memento:operator/plugin@0.2.0: no"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn missing_source_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let toml = job_with_plugin(&plugin("wordcount")).replace(
        "type = \"generator\"\ncount = 10",
        "type = \"file\"\npath = \"missing.txt\"",
    );
    let err = job_error(dir.path(), &toml);
    assert!(err.contains("source: cannot open source file"), "{err}");
    assert!(err.contains("missing.txt"), "{err}");
}

/// An error never echoes an input whole: a 1 MiB source path is quoted
/// in part (the error output was as long as the input).
#[test]
fn errors_quote_a_long_input_in_part() {
    let dir = tempfile::tempdir().unwrap();
    let long = "d/".repeat(1 << 19);
    let toml = job_with_plugin(&plugin("wordcount")).replace(
        "type = \"generator\"\ncount = 10",
        &format!("type = \"file\"\npath = \"{long}x.txt\""),
    );
    let out = run_job(dir.path(), &toml);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.len() < 4096, "{} bytes of error output", err.len());
    assert!(
        err.contains("error: ") && err.contains("source"),
        "{}",
        &err[..err.len().min(300)]
    );
}

// ---- misbehaving plugins: clear errors naming job, operator, task and phase

fn misbehave_job(mode: &str, limits: &str) -> String {
    format!(
        r#"
name = "misbehave"
[source]
type = "generator"
count = 100
batch = 10
[[operators]]
name = "bad"
plugin = "{}"
[operators.config]
mode = "{mode}"
[sink]
type = "null"
{limits}
"#,
        toml_path(&plugin("misbehave"))
    )
}

#[test]
fn endless_loop_hits_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let err = job_error(
        dir.path(),
        &misbehave_job("loop-in-process", "[limits]\ncall_timeout = \"200ms\""),
    );
    assert!(
        err.contains(
            "job `misbehave`, operator `bad`, task 0: deadline exceeded in `process` (call timeout 200ms)"
        ),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn trap_reports_the_panic_message() {
    let dir = tempfile::tempdir().unwrap();
    let err = job_error(dir.path(), &misbehave_job("trap-in-process", ""));
    assert!(
        err.contains("operator `bad`, task 0: plugin trapped in `process`"),
        "{err}"
    );
    assert!(err.contains("boom"), "{err}");
    let err = job_error(dir.path(), &misbehave_job("panic-in-open", ""));
    assert!(err.contains("plugin trapped in `open`"), "{err}");
    assert!(err.contains("refusing to open"), "{err}");
}

#[test]
fn guest_error_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let err = job_error(dir.path(), &misbehave_job("error-in-process", ""));
    assert!(
        err.contains("`process` returned an error: cannot handle event 0"),
        "{err}"
    );
}

#[test]
fn memory_limit_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let err = job_error(
        dir.path(),
        &misbehave_job("grow-in-process", "[limits]\nmemory = \"8MiB\""),
    );
    assert!(err.contains("memory limit exceeded in `process`"), "{err}");
    assert!(err.contains("limit 8388608 bytes"), "{err}");
}

/// The job files in `examples/` stay valid and run.
#[test]
fn example_jobs_run() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let state = tempfile::tempdir().unwrap();
    for name in ["words.toml", "clicks.toml", "windows.toml"] {
        let out = memento()
            .arg("run")
            .arg(examples.join(name))
            .arg("--state-dir")
            .arg(state.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        if name == "clicks.toml" {
            // 40 distinct events, 8 of them delivered twice.
            assert_eq!(stdout(&out).lines().count(), 40, "{}", stdout(&out));
        }
    }
}

/// Guest log lines reach the host's log with the task's coordinates.
#[test]
fn plugin_logs_carry_job_operator_and_task() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("job.toml"), misbehave_job("none", "")).unwrap();
    let out = memento()
        .arg("run")
        .arg(dir.path().join("job.toml"))
        .current_dir(dir.path())
        .env("MEMENTO_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    let line = log
        .lines()
        .find(|l| l.contains("opened in mode none"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("INFO"), "{line}");
    assert!(
        line.contains("job=\"misbehave\"") || line.contains("job=misbehave"),
        "{line}"
    );
    assert!(
        line.contains("operator=\"bad\"") || line.contains("operator=bad"),
        "{line}"
    );
    assert!(line.contains("task=0"), "{line}");
}

/// `memento token hash` hashes what it is given, without a trailing newline,
/// and refuses an empty token (its hash would lock the tenant out).
#[test]
fn token_hash_refuses_an_empty_token() {
    let hash = |arg: Option<&str>, stdin: &str| {
        let mut cmd = memento();
        cmd.args(["token", "hash"]).args(arg);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let by_arg = hash(Some("abc"), "");
    let by_stdin = hash(None, "abc\n");
    assert!(by_arg.status.success() && by_stdin.status.success());
    assert_eq!(stdout(&by_arg), stdout(&by_stdin));
    assert_eq!(stdout(&by_arg).trim(), blake3::hash(b"abc").to_hex().as_str());
    for (arg, stdin) in [(Some(""), ""), (None, ""), (None, "\n")] {
        let o = hash(arg, stdin);
        assert!(!o.status.success(), "{arg:?} {stdin:?}");
        assert!(stderr(&o).contains("error: the token is empty"), "{}", stderr(&o));
    }
}

/// `memento --help` says what memento is (the binary crate's own
/// description is about its parts, not the product) and lists the commands.
#[test]
fn help_says_what_memento_is() {
    let out = memento().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(
            "A WebAssembly plugin host for stateful stream operators with unified checkpoints and savepoints\n"
        ),
        "{text}"
    );
    for command in [
        "demo",
        "run",
        "snapshots",
        "savepoint",
        "serve",
        "fsck",
        "gc",
        "inspect",
    ] {
        assert!(text.contains(&format!("\n  {command} ")), "{command} in {text}");
    }
}
