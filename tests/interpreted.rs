//! End-to-end tests of the Python and JavaScript example operators
//! (`plugins/python-wordcount`, `plugins/js-wordcount`) through `memento
//! run`: they count exactly like the Rust `wordcount`, resume exactly-once
//! from canonical checkpoints after SIGKILLs, and an exception that fails a
//! task shows its type and message.
//!
//! They need componentize-py and componentize-js (crates/plugins builds the
//! examples only where those are installed). Without them each test says so
//! in one line and passes, unless `MEMENTO_REQUIRE_INTERPRETED=1` (CI sets
//! it), where it fails instead: CI must not go green without running them.
//!
//! Every run shares one compiled-component cache directory under cargo's
//! test scratch directory, so each component is compiled once per engine
//! configuration, not once per run (a 12–18 MB interpreter takes 10–40 s to
//! compile); concurrent tests writing the same entry is part of what the
//! cache must survive.

mod common;

use common::memento;
use common::output::{Committed, assert_prefix, assert_same_output, committed, wordcount_output};

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memento::runtime::{
    Context, Event, KeyGroupRange, LoadedComponent, Runtime, RuntimeOptions, SandboxLimits, TaskInstance,
    TaskLabel,
};
use memento::snapshot::{self, RestoreError};
use memento::spec::SnapshotFormat;
use memento::store::{
    JobName, Manifest, SnapshotKind, StateFormat, Store, StoreOptions, TaskKey, TaskState, TaskStateData,
    TenantStore, Trigger,
};

/// Set to `1` to make these tests fail, instead of skipping, where the
/// Python and JavaScript examples were not built.
const REQUIRE_ENV: &str = "MEMENTO_REQUIRE_INTERPRETED";

/// The built example, or `None` after one line saying why it is skipped;
/// panics instead under `MEMENTO_REQUIRE_INTERPRETED=1`.
fn component(name: &str, test: &str) -> Option<PathBuf> {
    match memento_plugins::interpreted(name) {
        Ok(path) => Some(path),
        Err(why) => {
            if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
                panic!("{name} was not built ({why}) but {REQUIRE_ENV}=1 requires it");
            }
            eprintln!("skipped {test}: {name} was not built: {why}");
            None
        }
    }
}

fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("interpreted-component-cache")
}

struct XorShift(u64);

impl XorShift {
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        Duration::from_millis(lo + x % (hi - lo + 1))
    }
}

/// A job file in a temporary directory, run by `memento run`.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

/// One generated-input job through `component` (parallelism 1) into a
/// `file` sink, with checkpoints in `format` every 300 ms.
fn fixture(
    name: &str,
    component: &Path,
    (count, keys, seed): (u64, u64, u64),
    rate: Option<u64>,
    config: &str,
    format: &str,
) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let rate = rate.map(|r| format!("rate = {r}\n")).unwrap_or_default();
    std::fs::write(
        dir.join("job.toml"),
        format!(
            "name = \"{name}\"\n\
             [source]\ntype = \"generator\"\ncount = {count}\nkeys = {keys}\nseed = {seed}\nbatch = 100\n{rate}\
             [[operators]]\nname = \"count\"\nplugin = \"{}\"\n{config}\n\
             [sink]\ntype = \"file\"\npath = \"out\"\n\
             [checkpoints]\ninterval = \"300ms\"\nformat = \"{format}\"\n\
             [restart]\nstrategy = \"none\"\n",
            common::toml_path(component),
        ),
    )
    .unwrap();
    Fixture { _tmp: tmp, dir }
}

/// A finished run: exit status, stdout (the `--json` report), stderr.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn state(&self) -> String {
        let report: serde_json::Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr: {}", self.stderr));
        report["state"]["state"].as_str().unwrap_or_default().to_string()
    }
}

impl Fixture {
    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    fn spawn(&self, args: &[&str]) -> Child {
        memento()
            .arg("run")
            .arg(self.dir.join("job.toml"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--cache-dir")
            .arg(cache_dir())
            .arg("--json")
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.dir.join("stdout.txt")).unwrap())
            .stderr(std::fs::File::create(self.dir.join("stderr.txt")).unwrap())
            .spawn()
            .unwrap()
    }

    fn collect(&self, status: ExitStatus) -> Ran {
        Ran {
            status,
            stdout: std::fs::read_to_string(self.dir.join("stdout.txt")).unwrap(),
            stderr: std::fs::read_to_string(self.dir.join("stderr.txt")).unwrap(),
        }
    }

    /// Run to the end (at most `timeout`, which covers a first compile).
    fn run(&self, args: &[&str], timeout: Duration) -> Ran {
        let mut child = self.spawn(args);
        let status = wait(&mut child, timeout).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("memento run did not end within {timeout:?}")
        });
        self.collect(status)
    }
}

/// The child's exit status if it ends within `d`.
fn wait(child: &mut Child, d: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + d;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Same input, same output as the Rust `wordcount` (which
/// `wordcount_output` describes), with canonical checkpoints taken on the
/// way.
fn counts_like_rust(name: &str, test: &str) {
    let Some(component) = component(name, test) else {
        return;
    };
    let input = (6_000, 40, 3);
    let f = fixture("same", &component, input, None, "", "canonical");
    let ran = f.run(&[], Duration::from_secs(300));
    assert!(ran.status.success(), "{name}: {}", ran.stderr);
    assert_eq!(ran.state(), "finished");
    let (count, keys, seed) = input;
    assert_same_output(&committed(&f.out()), &wordcount_output(count, keys, seed), name);
}

#[test]
fn python_counts_like_the_rust_wordcount() {
    counts_like_rust("python-wordcount", "python_counts_like_the_rust_wordcount");
}

#[test]
fn js_counts_like_the_rust_wordcount() {
    counts_like_rust("js-wordcount", "js_counts_like_the_rust_wordcount");
}

/// SIGKILL a rate-limited run `kills_wanted` times at random moments,
/// resuming with `--from latest` each time (from scratch while no
/// checkpoint exists), then let it finish: committed output is a per-key
/// prefix of the expected one after every kill and equal to it at the end,
/// and fsck finds the store intact. Checkpoints are in `format`; native
/// ones must be what the kills leave to resume from, carrying the
/// interpreter's globals (image version 2).
fn exactly_once_under_sigkill(name: &str, test: &str, seed: u64, format: &str, kills_wanted: usize) {
    let Some(component) = component(name, test) else {
        return;
    };
    let (count, keys, gen_seed) = (12_000, 30, 9);
    let expected: Committed = wordcount_output(count, keys, gen_seed);
    // Compile once (or hit the shared cache) before the clock matters.
    let warm = fixture("warm", &component, (10, 2, 1), None, "", format);
    assert!(warm.run(&[], Duration::from_secs(300)).status.success());

    let f = fixture("eo", &component, (count, keys, gen_seed), Some(1_000), "", format);
    let mut native_checkpoints = 0;
    let mut rng = XorShift(seed);
    let (mut kills, mut resumes, mut runs) = (0, 0, 0);
    let mut from_scratch = true;
    let mut startup = Duration::ZERO;
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "{name}: no end in sight"
        );
        runs += 1;
        assert!(runs < kills_wanted * 4 + 20, "{name}: too many runs");
        let args: &[&str] = if from_scratch { &[] } else { &["--from", "latest"] };
        let spawned = Instant::now();
        let mut child = f.spawn(args);
        if runs == 1 {
            let staging = f.out().join(".staging");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !staging.exists() && child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "{name}: the first run does not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            startup = spawned.elapsed();
        }
        let status = if kills < kills_wanted {
            let delay =
                (spawned + startup + rng.millis(300, 1_500)).saturating_duration_since(Instant::now());
            match wait(&mut child, delay) {
                Some(s) => s,
                None => {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap()
                }
            }
        } else {
            wait(&mut child, Duration::from_secs(120)).expect("the last run hangs")
        };
        if status.signal() == Some(libc::SIGKILL) {
            kills += 1;
            resumes += usize::from(!from_scratch);
            from_scratch = false;
            assert_prefix(
                &committed(&f.out()),
                &expected,
                &format!("{name}: after kill {kills}"),
            );
            if format == "native" {
                native_checkpoints += usize::from(latest_is_native_with_globals(&f, name));
            }
            continue;
        }
        let ran = f.collect(status);
        if !ran.status.success() && ran.stderr.contains("no snapshot of job") {
            from_scratch = true;
            continue;
        }
        assert!(ran.status.success(), "{name}: {}", ran.stderr);
        let state = ran.state();
        assert!(
            state == "finished" || state == "already_finished",
            "{name}: end state {state}"
        );
        break;
    }
    assert_same_output(
        &committed(&f.out()),
        &expected,
        &format!("{name} after {kills} kills, {resumes} resumes"),
    );
    let fsck = memento()
        .args(["fsck", "--state-dir"])
        .arg(f.dir.join("state"))
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    eprintln!("{name}: {kills} kills, {resumes} resumes, {runs} runs, start-up {startup:?}");
    assert_eq!(kills, kills_wanted);
    assert!(
        resumes * 2 >= kills,
        "{name}: most kills should land after a checkpoint ({resumes} resumes)"
    );
    if format == "native" {
        assert!(
            native_checkpoints * 2 >= kills,
            "{name}: most kills should leave a native checkpoint to resume from ({native_checkpoints} of {kills})"
        );
    }
}

/// Whether the job has a checkpoint to resume from (`false` if not yet),
/// which then must be a native one whose image carries the globals.
fn latest_is_native_with_globals(f: &Fixture, name: &str) -> bool {
    let Ok(store) = Store::open(&f.dir.join("state"), StoreOptions::default()) else {
        return false;
    };
    let Some(m) = store
        .tenant("default")
        .unwrap()
        .latest(&JobName::new("eo").unwrap())
        .unwrap()
    else {
        return false;
    };
    assert_eq!(m.format, StateFormat::Native, "{name}: {}", m.id);
    let TaskStateData::Native { extra, .. } = &m.tasks[0].state else {
        panic!("{name}: {}: native task state expected", m.id)
    };
    assert_eq!(
        extra["image_version"],
        snapshot::NATIVE_IMAGE_VERSION_WITH_GLOBALS,
        "{name}: {}",
        m.id
    );
    true
}

#[test]
fn python_exactly_once_under_sigkill() {
    exactly_once_under_sigkill(
        "python-wordcount",
        "python_exactly_once_under_sigkill",
        0x51ed_270b_2a4c_9e11,
        "canonical",
        8,
    );
}

#[test]
fn python_exactly_once_under_sigkill_with_native_checkpoints() {
    exactly_once_under_sigkill(
        "python-wordcount",
        "python_exactly_once_under_sigkill_with_native_checkpoints",
        0x7a31_c4e9_0b5d_2f68,
        "native",
        10,
    );
}

#[test]
fn js_exactly_once_under_sigkill() {
    exactly_once_under_sigkill(
        "js-wordcount",
        "js_exactly_once_under_sigkill",
        0x2f6b_d8a1_7c3e_5b09,
        "canonical",
        8,
    );
}

#[test]
fn js_exactly_once_under_sigkill_with_native_checkpoints() {
    exactly_once_under_sigkill(
        "js-wordcount",
        "js_exactly_once_under_sigkill_with_native_checkpoints",
        0x1c8e_5a70_d3f2_4b96,
        "native",
        10,
    );
}

/// An exception thrown in `process` fails the task with an error line that
/// names its type and message (config `fail_on` makes the examples throw).
fn exception_shows_type_and_message(name: &str, test: &str, expected: &str) {
    let Some(component) = component(name, test) else {
        return;
    };
    let f = fixture(
        "fails",
        &component,
        (500, 10, 1),
        None,
        "[operators.config]\nfail_on = \"key-7\"\n",
        "canonical",
    );
    let ran = f.run(&[], Duration::from_secs(300));
    assert!(!ran.status.success(), "{name}: the job should fail");
    let line = ran
        .stderr
        .lines()
        .rfind(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{name}: no error line in {}", ran.stderr));
    assert!(line.contains("operator `count`, task 0"), "{line}");
    assert!(line.contains(expected), "{name}: {line}");
}

#[test]
fn python_exception_shows_its_type_and_message() {
    exception_shows_type_and_message(
        "python-wordcount",
        "python_exception_shows_its_type_and_message",
        "ValueError: fail_on key 'key-7' arrived",
    );
}

#[test]
fn js_exception_shows_its_type_and_message() {
    exception_shows_type_and_message(
        "js-wordcount",
        "js_exception_shows_its_type_and_message",
        "TypeError: fail_on key \"key-7\" arrived",
    );
}

// ------------------------------------------------------------ native images

/// A runtime sharing the tests' compiled-component cache.
fn runtime() -> Runtime {
    Runtime::with_options(RuntimeOptions {
        cache_dir: Some(cache_dir()),
        ..RuntimeOptions::default()
    })
    .unwrap()
}

fn label() -> TaskLabel {
    TaskLabel {
        job: "native".into(),
        operator: "count".into(),
        task: 0,
    }
}

fn limits() -> SandboxLimits {
    SandboxLimits {
        memory_bytes: 1 << 30,
        call_timeout: Duration::from_secs(60),
        ..SandboxLimits::default()
    }
}

fn opened(rt: &Runtime, component: &Arc<LoadedComponent>, config: &[(&str, &str)]) -> TaskInstance {
    let mut instance = rt.instantiate(component, label(), &limits()).unwrap();
    instance
        .open(&Context {
            job: "native".into(),
            operator_name: "count".into(),
            task_index: 0,
            parallelism: 1,
            key_groups: 1,
            owned: KeyGroupRange { start: 0, end: 1 },
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .unwrap();
    instance
}

/// Events `range` in batches of 100, over 37 keys.
fn batches(range: std::ops::Range<u64>) -> Vec<Vec<Event>> {
    let events: Vec<Event> = range
        .map(|i| Event {
            key: format!("key-{}", i % 37).into_bytes(),
            value: format!("value {i}").into_bytes(),
            timestamp: i as i64,
        })
        .collect();
    events.chunks(100).map(<[Event]>::to_vec).collect()
}

fn tenant() -> (tempfile::TempDir, TenantStore) {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        sync: false,
        ..StoreOptions::default()
    };
    let tenant = Store::open(&dir.path().join("state"), options)
        .unwrap()
        .tenant("default")
        .unwrap();
    (dir, tenant)
}

/// A native checkpoint of `instance` the way a task takes one at a barrier
/// (through its base: copy-on-write where the kernel allows it), committed.
fn native_checkpoint(
    tenant: &TenantStore,
    instance: &mut TaskInstance,
    component: &LoadedComponent,
) -> Manifest {
    let job = JobName::new("native").unwrap();
    let number = tenant.next_snapshot_number(&job).unwrap();
    let writer = tenant.begin(&job, number).unwrap();
    let captured = snapshot::NativeBase::new()
        .capture(instance, &writer.blob_writer(), 0)
        .unwrap_or_else(|e| panic!("capture: {e}"));
    let state = snapshot::persist(&captured, &writer.blob_writer()).unwrap();
    let mut m = writer.manifest(SnapshotKind::Checkpoint, Trigger::Manual, StateFormat::Native);
    m.components.insert("count".into(), component.hash_hex());
    m.tasks.push(TaskState {
        key: TaskKey::new("count", 0),
        state,
    });
    tenant.get(&writer.commit(m).unwrap()).unwrap()
}

fn restore(
    rt: &Runtime,
    tenant: &TenantStore,
    m: &Manifest,
    state: &TaskState,
    component: &Arc<LoadedComponent>,
) -> Result<TaskInstance, RestoreError> {
    snapshot::restore_native(rt, component, label(), &limits(), tenant, &m.id, state)
}

fn assert_same_memories(a: &TaskInstance, b: &TaskInstance, when: &str) {
    assert_eq!(a.memory_sizes(), b.memory_sizes(), "{when}: memory sizes");
    for i in 0..a.memory_sizes().len() {
        let (x, y) = (a.memory(i).unwrap(), b.memory(i).unwrap());
        if let Some(at) = x.iter().zip(y).position(|(p, q)| p != q) {
            panic!("{when}: memory {i} differs first at byte {at} of {}", x.len());
        }
    }
}

/// A native image of the interpreter restores byte-exact: every memory and
/// every mutable global of every core instance equal the original's right
/// after the restore (no `open`, no `restore-state`), and again after both
/// processed the same further input with the same output. Images whose
/// globals are missing, of another layout or of the wrong version are
/// refused with one line naming the task.
fn native_image_round_trip(name: &str, test: &str, min_globals: usize) {
    let Some(path) = component(name, test) else {
        return;
    };
    let rt = runtime();
    let c = rt.load_file(&path).unwrap();
    assert_eq!(c.native_support(), Ok(()), "{name}");
    let layout = c
        .native_globals()
        .expect("instrumented: it has mutable globals")
        .clone();
    assert!(layout.len() >= min_globals, "{name}: {} globals", layout.len());

    let mut a = opened(&rt, &c, &[]);
    for batch in batches(0..3_000) {
        a.process(&batch).unwrap();
    }
    let (_dir, tenant) = tenant();
    let m = native_checkpoint(&tenant, &mut a, &c);
    let TaskStateData::Native { extra, .. } = &m.tasks[0].state else {
        panic!("native state expected")
    };
    assert_eq!(
        extra["image_version"],
        snapshot::NATIVE_IMAGE_VERSION_WITH_GLOBALS
    );
    assert_eq!(extra["globals"]["count"], layout.len());
    assert_eq!(extra["globals"]["layout"], layout.digest_hex());
    let globals = a.capture_globals().unwrap().expect("globals");
    assert_eq!(globals.values.len(), layout.len());
    // For information: how many globals running the operator changed from
    // a fresh instance's values (these examples' interpreters keep their
    // state in memory; their globals are the linker's and the stack's).
    let fresh = opened(&rt, &c, &[]).capture_globals().unwrap().expect("globals");
    let changed = fresh
        .values
        .iter()
        .zip(&globals.values)
        .filter(|(x, y)| x != y)
        .count();
    eprintln!(
        "{name}: {changed} of {} globals differ from a fresh instance's",
        layout.len()
    );

    let mut b = restore(&rt, &tenant, &m, &m.tasks[0], &c).unwrap();
    assert_same_memories(&a, &b, &format!("{name} right after restore"));
    assert_eq!(
        b.capture_globals().unwrap().as_ref(),
        Some(&globals),
        "{name}: globals"
    );
    for batch in batches(3_000..6_000) {
        assert_eq!(a.process(&batch).unwrap(), b.process(&batch).unwrap(), "{name}");
    }
    assert_same_memories(&a, &b, &format!("{name} after more input"));
    assert_eq!(
        a.capture_globals().unwrap(),
        b.capture_globals().unwrap(),
        "{name}"
    );

    // The restore writes the image's values, not the fresh instance's: an
    // image whose last global holds another value restores with that value.
    let last = layout.len() - 1;
    let mut state = m.tasks[0].clone();
    let TaskStateData::Native { extra, .. } = &mut state.state else {
        unreachable!()
    };
    let mut values = globals.values.clone();
    values[last] ^= 0x10;
    let hex: String = values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .map(|b| format!("{b:02x}"))
        .collect();
    extra["globals"]["values"] = hex.into();
    let mut tampered = restore(&rt, &tenant, &m, &state, &c).unwrap();
    assert_eq!(
        tampered.capture_globals().unwrap().unwrap().values,
        values,
        "{name}"
    );

    // Images that do not fit are refused, naming the task and what differs.
    let refused = |edit: &dyn Fn(&mut serde_json::Value), expected: &str| {
        let mut state = m.tasks[0].clone();
        let TaskStateData::Native { extra, .. } = &mut state.state else {
            unreachable!()
        };
        edit(extra);
        let err = restore(&rt, &tenant, &m, &state, &c)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("task count[0]") && err.contains(expected),
            "{name}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    };
    refused(
        &|e| e["globals"]["layout"] = "0".repeat(64).into(),
        "globals follow another layout than the component's",
    );
    refused(
        &|e| e["globals"]["values"] = "zz".into(),
        "globals are malformed (values are not 16 hex digits per global)",
    );
    refused(
        &|e| {
            e.as_object_mut().unwrap().remove("globals");
        },
        "globals are malformed (missing)",
    );
    refused(
        &|e| e["image_version"] = 1.into(),
        "the native image has no mutable globals (image version 1)",
    );
}

#[test]
fn python_native_image_restores_memories_and_globals_byte_exact() {
    native_image_round_trip(
        "python-wordcount",
        "python_native_image_restores_memories_and_globals_byte_exact",
        400,
    );
}

#[test]
fn js_native_image_restores_memories_and_globals_byte_exact() {
    native_image_round_trip(
        "js-wordcount",
        "js_native_image_restores_memories_and_globals_byte_exact",
        2,
    );
}

/// An interpreter that printed and keeps its stdout stream across calls
/// (CPython does) is treated as a Rust guest is: a native capture is
/// refused naming the stream, and `auto` falls back to a canonical
/// snapshot. One that drops it after writing (SpiderMonkey does) holds
/// nothing and is imaged.
fn printing_interpreter(name: &str, test: &str, keeps_stream: bool) {
    let Some(path) = component(name, test) else {
        return;
    };
    let rt = runtime();
    let c = rt.load_file(&path).unwrap();
    let mut quiet = opened(&rt, &c, &[]);
    assert_eq!(quiet.held_resources(), Vec::<String>::new(), "{name}");
    let mut printing = opened(&rt, &c, &[("print", "hello from the guest")]);
    let held = printing.held_resources();
    assert_eq!(
        !held.is_empty(),
        keeps_stream,
        "{name}: after printing it holds {held:?}"
    );
    let (_dir, tenant) = tenant();
    let job = JobName::new("native").unwrap();
    let writer = tenant.begin(&job, 1).unwrap();
    let native = snapshot::capture(&mut printing, SnapshotFormat::Native, &writer.blob_writer());
    let auto = snapshot::capture_at_barrier(
        &mut printing,
        SnapshotFormat::Auto,
        &snapshot::NativeBase::new(),
        &writer.blob_writer(),
        0,
    )
    .unwrap();
    let quiet_auto = snapshot::capture_at_barrier(
        &mut quiet,
        SnapshotFormat::Auto,
        &snapshot::NativeBase::new(),
        &writer.blob_writer(),
        0,
    )
    .unwrap();
    assert!(
        !matches!(quiet_auto.state, snapshot::CapturedState::Canonical(_)),
        "{name}: a quiet interpreter is imaged"
    );
    match native {
        Err(snapshot::CaptureError::Declined(why)) => {
            assert!(!held.is_empty(), "{name}: refused though it holds nothing: {why}");
            assert!(why.contains("wasi:io/streams output-stream"), "{name}: {why}");
            assert!(
                matches!(auto.state, snapshot::CapturedState::Canonical(_)),
                "{name}: auto falls back to canonical"
            );
        }
        Err(e) => panic!("{name}: {e}"),
        Ok(_) => {
            assert!(held.is_empty(), "{name}: imaged though it holds {held:?}");
            assert!(
                !matches!(auto.state, snapshot::CapturedState::Canonical(_)),
                "{name}"
            );
        }
    }
}

#[test]
fn python_holding_a_wasi_stream_is_refused_like_a_rust_guest() {
    printing_interpreter(
        "python-wordcount",
        "python_holding_a_wasi_stream_is_refused_like_a_rust_guest",
        true,
    );
}

#[test]
fn js_printing_holds_no_wasi_stream_and_is_imaged() {
    printing_interpreter(
        "js-wordcount",
        "js_printing_holds_no_wasi_stream_and_is_imaged",
        false,
    );
}
