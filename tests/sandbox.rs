//! The hostile-plugin suite: each test runs the `hostile` test plugin doing
//! one bad thing and asserts exactly how the host contains it -- the error
//! (naming job, operator, task, phase and limit), or what the plugin saw
//! when it tried a forbidden capability.
//!
//! Every in-process hostile job shares one [`Host`] (one engine, one
//! component cache, one store) with a well-behaved *bystander* job that
//! runs for the whole test process; [`contained`] asserts that the
//! bystander kept making progress while the hostile job ran.

mod common;

use common::{plugin, toml_path};

use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use memento::coordinator::{JobState, StatusHandle};
use memento::runtime::{Context, Runtime, RuntimeError, RuntimeOptions, SandboxLimits, TaskLabel};
use memento::spec::JobSpec;
use memento::store::SnapshotId;
use memento::{Host, Job, RunOptions, StartFrom};

/// The host every in-process test shares, with its state directory.
fn host() -> &'static Host {
    static HOST: OnceLock<(Host, tempfile::TempDir)> = OnceLock::new();
    &HOST
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            (Host::open(dir.path()).unwrap(), dir)
        })
        .0
}

/// A job file running the hostile plugin in `mode` with extra operator
/// config lines, extra top-level sections (`[limits]`, ...) and an
/// unbounded, rate-limited generator source.
fn hostile_job(name: &str, mode: &str, config: &str, sections: &str) -> String {
    format!(
        r#"
name = "{name}"
[source]
type = "generator"
rate = 2000.0
batch = 10
[[operators]]
name = "hostile"
plugin = "{plugin}"
[operators.config]
mode = "{mode}"
{config}
[sink]
type = "null"
{sections}
"#,
        plugin = toml_path(&plugin("hostile"))
    )
}

fn load(toml: &str, base: &Path) -> Job {
    let spec = JobSpec::from_toml(toml, Path::new("job.toml"), base).unwrap();
    host().load_job(spec, "default").unwrap()
}

/// Status of the bystander: a pass-through job on the shared host that
/// runs until the test process exits.
fn bystander() -> &'static StatusHandle {
    static STATUS: OnceLock<StatusHandle> = OnceLock::new();
    STATUS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let job = load(&hostile_job("bystander", "none", "", ""), &dir);
        let status = job.status_handle();
        std::thread::spawn(move || job.run(RunOptions::default()));
        let started = Instant::now();
        while status.get().records_in == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the bystander never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        status
    })
}

/// Run `f` (a hostile job) while sampling the bystander every 20 ms;
/// assert that the bystander kept running and making progress throughout:
/// its record count grew and never stalled for more than 2 s.
fn contained<R>(f: impl FnOnce() -> R) -> R {
    let status = bystander();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut samples = vec![(Instant::now(), status.get().records_in)];
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                samples.push((Instant::now(), status.get().records_in));
            }
            samples
        });
        let result = f();
        // One more stretch after the hostile job ended: still going.
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let samples = sampler.join().unwrap();
        let (first, last) = (samples[0].1, samples.last().unwrap().1);
        assert!(
            last > first,
            "the bystander made no progress ({first} records throughout)"
        );
        let mut since = samples[0].0;
        for w in samples.windows(2) {
            if w[1].1 > w[0].1 {
                since = w[1].0;
            }
            assert!(
                w[1].0 - since < Duration::from_secs(2),
                "the bystander stalled for {:?}",
                w[1].0 - since
            );
        }
        assert_eq!(status.get().state, JobState::Running);
        result
    })
}

/// Run a hostile job that must fail; its error as one string.
fn failure(name: &str, mode: &str, config: &str, sections: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let job = load(&hostile_job(name, mode, config, sections), dir.path());
    let started = Instant::now();
    let err = contained(|| job.run(RunOptions::default()))
        .err()
        .unwrap_or_else(|| panic!("{name} should fail"))
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{name} took {:?}",
        started.elapsed()
    );
    err
}

/// Run a job until it has processed some records, take `n` checkpoints
/// one after the other, cancel it; the checkpoints' ids.
fn checkpoints_then_cancel(job: &Job, n: usize) -> Vec<SnapshotId> {
    let control = job.control();
    let status = job.status_handle();
    std::thread::scope(|s| {
        let run = s.spawn(|| job.run(RunOptions::default()));
        let mut ids = Vec::new();
        for _ in 0..n {
            let seen = status.get().records_in;
            while status.get().records_in <= seen {
                std::thread::sleep(Duration::from_millis(5));
            }
            let id = control
                .trigger_checkpoint()
                .recv_timeout(Duration::from_secs(30))
                .expect("checkpoint reply")
                .expect("checkpoint completes");
            ids.push(id);
        }
        control.cancel();
        run.join().unwrap().expect("cancelled cleanly");
        ids
    })
}

// Tests of `snapshot-state` / `restore-state` behaviour pin
// `format = "canonical"`: by default checkpoints image memory natively and
// never call them.
const SHORT_DEADLINE: &str = "[limits]\ncall_timeout = \"200ms\"";

#[test]
fn endless_loop_in_open_process_and_snapshot_hits_the_deadline() {
    for (mode, phase, sections) in [
        ("loop-in-open", "open", SHORT_DEADLINE.to_string()),
        ("loop-in-process", "process", SHORT_DEADLINE.to_string()),
        (
            "loop-in-snapshot",
            "snapshot-state",
            format!("{SHORT_DEADLINE}\n[checkpoints]\ninterval = \"50ms\"\nformat = \"canonical\""),
        ),
    ] {
        let name = format!("deadline-{mode}");
        let err = failure(&name, mode, "", &sections);
        assert!(
            err.starts_with(&format!(
                "job `{name}`, operator `hostile`, task 0: deadline exceeded in `{phase}` (call timeout 200ms)"
            )),
            "{err}"
        );
    }
}

/// Restoring into a plugin that loops in `restore-state` fails with the
/// deadline, naming the snapshot and offering the next older one that can
/// start the job.
#[test]
fn endless_loop_in_restore_hits_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let ids = checkpoints_then_cancel(
        &load(
            &hostile_job(
                "deadline-restore",
                "none",
                "",
                "[checkpoints]\nretained = 2\nformat = \"canonical\"",
            ),
            dir.path(),
        ),
        2,
    );
    let job = load(
        &hostile_job("deadline-restore", "loop-in-restore", "", SHORT_DEADLINE),
        dir.path(),
    );
    let err = contained(|| {
        job.run(RunOptions {
            from: StartFrom::Latest,
        })
    })
    .unwrap_err()
    .to_string();
    // The way out offered is the older snapshot, not the one that failed.
    assert_eq!(
        err,
        format!(
            "hostile[0]: restoring snapshot {}: job `deadline-restore`, operator `hostile`, task 0: \
             deadline exceeded in `restore-state` (call timeout 200ms); the newest older snapshot that can \
             start the job as it is now is {}",
            ids[1], ids[0]
        )
    );
}

#[test]
fn allocating_without_end_stops_at_the_memory_limit() {
    let err = failure("alloc", "alloc", "", "[limits]\nmemory = \"32MiB\"");
    assert!(
        err.starts_with("job `alloc`, operator `hostile`, task 0: memory limit exceeded in `process`: growing a memory from"),
        "{err}"
    );
    assert!(err.contains("limit 33554432 bytes"), "{err}");
}

/// Recursion without end traps, whichever stack runs out first: the
/// engine's (wasm locals) or the guest's shadow stack in linear memory.
#[test]
fn deep_recursion_traps_cleanly() {
    let err = failure("recurse", "recurse", "", "");
    assert!(
        err.starts_with(
            "job `recurse`, operator `hostile`, task 0: plugin trapped in `process`: \
             call stack exhausted (stack overflow: too deep a recursion)"
        ),
        "{err}"
    );
    let err = failure("recurse-shadow", "recurse-shadow", "", "");
    assert!(
        err.starts_with(
            "job `recurse-shadow`, operator `hostile`, task 0: plugin trapped in `process`: \
             wasm trap: out of bounds memory access"
        ),
        "{err}"
    );
}

#[test]
fn huge_output_batch_is_refused_while_copied() {
    let err = failure(
        "huge-output",
        "huge-output",
        "output_mib = \"4\"",
        "[limits]\nmax_output = \"1MiB\"",
    );
    assert!(
        err.starts_with(
            "job `huge-output`, operator `hostile`, task 0: `process` returned more than 1048576 bytes (limits.max_output)"
        ),
        "{err}"
    );
    // The default (64 MiB) lets 4 MiB through.
    let dir = tempfile::tempdir().unwrap();
    let job = load(
        &hostile_job("huge-output-ok", "huge-output", "output_mib = \"4\"", "")
            .replace("rate = 2000.0", "count = 3"),
        dir.path(),
    );
    let report = contained(|| job.run(RunOptions::default())).unwrap();
    assert_eq!(report.source_records, 3);
}

/// A snapshot over `max_snapshot` fails the task, and nothing of it becomes
/// visible in the store.
#[test]
fn huge_snapshot_is_refused_and_never_visible() {
    let err = failure(
        "huge-snapshot",
        "huge-snapshot",
        "snapshot_mib = \"4\"",
        "[limits]\nmax_snapshot = \"1MiB\"\n[checkpoints]\ninterval = \"50ms\"\nformat = \"canonical\"",
    );
    assert!(
        err.starts_with(
            "job `huge-snapshot`, operator `hostile`, task 0: `snapshot-state` returned more than 1048576 bytes \
             (limits.max_snapshot)"
        ),
        "{err}"
    );
    let store = host().store().tenant("default").unwrap();
    let job = memento::store::JobName::new("huge-snapshot").unwrap();
    assert_eq!(store.list_ids(&job).unwrap(), Vec::<SnapshotId>::new());
}

/// A plugin whose snapshot is garbage: the restore fails with the plugin's
/// own error, names the snapshot and offers the next older one, which
/// restores.
#[test]
fn garbage_state_fails_restore_and_the_older_snapshot_is_offered() {
    let dir = tempfile::tempdir().unwrap();
    let sections = "[checkpoints]\nretained = 2\nformat = \"canonical\"";
    let ids = checkpoints_then_cancel(
        &load(
            &hostile_job("garbage", "garbage-snapshot", "good_snapshots = \"1\"", sections),
            dir.path(),
        ),
        2,
    );
    let job = load(&hostile_job("garbage", "none", "", sections), dir.path());
    let err = contained(|| {
        job.run(RunOptions {
            from: StartFrom::Latest,
        })
    })
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        format!(
            "hostile[0]: restoring snapshot {}: job `garbage`, operator `hostile`, task 0: `restore-state` \
             returned an error: state is not a memento-guest snapshot (bad magic); the newest older \
             snapshot that can start the job as it is now is {}",
            ids[1], ids[0]
        )
    );
    // The offered snapshot restores.
    let job = load(&hostile_job("garbage", "none", "", sections), dir.path());
    let control = job.control();
    let status = job.status_handle();
    std::thread::scope(|s| {
        let run = s.spawn(|| {
            job.run(RunOptions {
                from: StartFrom::Snapshot(ids[0].clone()),
            })
        });
        while status.get().state != JobState::Running {
            std::thread::sleep(Duration::from_millis(5));
        }
        control.cancel();
        let report = run.join().unwrap().unwrap();
        assert_eq!(report.restored_from, Some(ids[0].clone()));
    });
}

#[test]
fn trap_in_restore_fails_restore_and_the_older_snapshot_is_offered() {
    let dir = tempfile::tempdir().unwrap();
    let sections = "[checkpoints]\nretained = 2\nformat = \"canonical\"";
    let ids = checkpoints_then_cancel(
        &load(&hostile_job("trap-restore", "none", "", sections), dir.path()),
        2,
    );
    let job = load(
        &hostile_job("trap-restore", "trap-in-restore", "", sections),
        dir.path(),
    );
    let err = contained(|| {
        job.run(RunOptions {
            from: StartFrom::Latest,
        })
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(&format!(
            "hostile[0]: restoring snapshot {}: job `trap-restore`, operator `hostile`, task 0: plugin trapped \
             in `restore-state`: wasm trap: wasm `unreachable` instruction executed (guest stderr: panicked at",
            ids[1]
        )),
        "{err}"
    );
    assert!(
        err.ends_with(&format!(
            "hostile plugin traps in restore-state); the newest older snapshot that can start the job as it \
             is now is {}",
            ids[0]
        )),
        "{err}"
    );
}

#[test]
fn panic_in_open_is_reported_with_its_message() {
    let err = failure("panic-open", "panic-in-open", "", "");
    assert!(
        err.starts_with("job `panic-open`, operator `hostile`, task 0: plugin trapped in `open`: "),
        "{err}"
    );
    assert!(err.contains("hostile plugin refuses to open"), "{err}");
}

#[test]
fn leaking_host_resources_hits_the_resource_cap() {
    let err = failure("leak", "leak-handles", "", "[limits]\nmax_resources = 64");
    assert!(
        err.starts_with(
            "job `leak`, operator `hostile`, task 0: resource limit exceeded in `process`: \
             more than 64 live host resources (limits.max_resources)"
        ),
        "{err}"
    );
}

/// Instances, tables and memories per store are capped; a component needing
/// more than the cap fails to instantiate, naming the caps.
#[test]
fn store_caps_fail_instantiation_with_the_caps_named() {
    let err = failure("caps", "none", "", "[limits]\nmax_instances = 1");
    assert!(
        err.starts_with(
            "job `caps`, operator `hostile`, task 0: cannot instantiate hostile: resource limit exceeded: \
             instance count too high at 2 (limits: max_instances = 1, max_tables = 64, max_memories = 16)"
        ),
        "{err}"
    );
}

/// With fuel metering on, `[limits] fuel` stops a loop deterministically;
/// on a host without metering, asking for fuel is refused clearly.
#[test]
fn fuel_stops_an_endless_loop() {
    let label = TaskLabel {
        job: "fuel".into(),
        operator: "hostile".into(),
        task: 0,
    };
    let limits = SandboxLimits {
        fuel: Some(50_000_000),
        call_timeout: Duration::from_secs(60),
        ..SandboxLimits::default()
    };
    let ctx = Context {
        job: "fuel".into(),
        operator_name: "hostile".into(),
        task_index: 0,
        parallelism: 1,
        config: vec![("mode".into(), "loop-in-process".into())],
        key_groups: 1,
        owned: memento::runtime::KeyGroupRange { start: 0, end: 1 },
    };
    let metered = Runtime::with_options(RuntimeOptions {
        fuel: true,
        ..RuntimeOptions::default()
    })
    .unwrap();
    let component = metered.load_file(&plugin("hostile")).unwrap();
    let mut task = metered.instantiate(&component, label.clone(), &limits).unwrap();
    task.open(&ctx).unwrap();
    let started = Instant::now();
    let event = memento::runtime::Event {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        timestamp: 0,
    };
    let err = task.process(&[event]).unwrap_err();
    assert!(
        matches!(err, RuntimeError::FuelExhausted { fuel: 50_000_000, .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "job `fuel`, operator `hostile`, task 0: fuel exhausted in `process` (limit 50000000 per call)"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let plain = host().runtime();
    let component = plain.load_file(&plugin("hostile")).unwrap();
    let err = plain.instantiate(&component, label, &limits).err().unwrap();
    assert_eq!(
        err.to_string(),
        "job `fuel`, operator `hostile`, task 0: `[limits] fuel` is set but this host runs without fuel metering"
    );
}

/// The probes of a `probe` job, as written to its file sink: probe → outcome.
fn probe_outcomes(out: &Path) -> std::collections::BTreeMap<String, String> {
    let text = std::fs::read_to_string(out.join("part-00000-000000")).unwrap();
    text.lines()
        .map(|l| {
            let (k, v) = l.split_once('\t').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn probe_job(name: &str, probes: &str, extra: &str) -> String {
    format!(
        r#"
name = "{name}"
[source]
type = "generator"
count = 1
[[operators]]
name = "hostile"
plugin = "{plugin}"
{extra}
[operators.config]
mode = "probe"
probes = "{probes}"
[sink]
type = "file"
path = "out"
"#,
        plugin = toml_path(&plugin("hostile"))
    )
}

/// Run by the real binary with a secret in its environment and a listening
/// socket in this process: the plugin can open no file, list no directory,
/// reach no socket, resolve no name and read no environment variable.
#[test]
fn plugin_sees_no_filesystem_network_or_environment() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let probes = format!(
        "read:/etc/passwd;list:/;list:.;write:/tmp/memento-plugin-was-here;connect:127.0.0.1:{port};\
         resolve:localhost:80;env:MEMENTO_TEST_SECRET;environ"
    );
    std::fs::write(dir.path().join("job.toml"), probe_job("probe", &probes, "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memento"))
        .arg("run")
        .arg(dir.path().join("job.toml"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("MEMENTO_TEST_SECRET", "hunter2")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen = probe_outcomes(&dir.path().join("out"));
    let expect = |probe: &str, outcome: &str| {
        assert_eq!(
            seen.get(probe).map(String::as_str),
            Some(outcome),
            "probe {probe}: {seen:#?}"
        );
    };
    // WASI errno numbers as the guest's libc reports them: 44 ENOENT (no
    // preopened directory holds the path, so there is nothing to open it
    // through), 2 EACCES (the host denies every socket address).
    expect("read:/etc/passwd", "err: No such file or directory (os error 44)");
    expect("list:/", "err: No such file or directory (os error 44)");
    expect("list:.", "err: No such file or directory (os error 44)");
    expect(
        "write:/tmp/memento-plugin-was-here",
        "err: No such file or directory (os error 44)",
    );
    expect(
        &format!("connect:127.0.0.1:{port}"),
        "err: Permission denied (os error 2)",
    );
    expect(
        "resolve:localhost:80",
        "err: failed to lookup address information: Non-recoverable error",
    );
    expect("env:MEMENTO_TEST_SECRET", "err: environment variable not found");
    expect("environ", "ok: 0 variables, 0 arguments");
    assert_eq!(seen.len(), 8, "{seen:#?}");
    assert!(!Path::new("/tmp/memento-plugin-was-here").exists());
    assert_eq!(
        listener.accept().err().map(|e| e.kind()),
        Some(std::io::ErrorKind::WouldBlock),
        "nobody connected"
    );
}

/// A read-only grant: the plugin reads and lists the granted directory, and
/// can neither write there nor leave it through `..` or a symlink.
#[test]
fn granted_directory_is_readable_and_confined() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("lookup.txt"), "a=1\nb=2\n").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "hunter2\n").unwrap();
    std::os::unix::fs::symlink("../secret.txt", data.join("link")).unwrap();
    let probes = "read:/data/lookup.txt;list:/data;write:/data/new.txt;read:/data/../secret.txt;\
                  read:/data/link;read:/secret.txt";
    let grant = "[[operators.grants]]\ndir = \"data\"\nguest = \"/data\"\nread_only = true";
    let job = load(&probe_job("grant", probes, grant), dir.path());
    contained(|| job.run(RunOptions::default())).unwrap();
    let seen = probe_outcomes(&dir.path().join("out"));
    let expect = |probe: &str, outcome: &str| {
        assert_eq!(
            seen.get(probe).map(String::as_str),
            Some(outcome),
            "probe {probe}: {seen:#?}"
        );
    };
    expect("read:/data/lookup.txt", "ok: 8 bytes: a=1");
    expect("list:/data", "ok: link,lookup.txt");
    // 63 is WASI's EPERM: the preopen is read-only, and cap-std refuses
    // paths leaving it (`..`, a symlink out).
    expect(
        "write:/data/new.txt",
        "err: Operation not permitted (os error 63)",
    );
    expect(
        "read:/data/../secret.txt",
        "err: Operation not permitted (os error 63)",
    );
    expect("read:/data/link", "err: Operation not permitted (os error 63)");
    expect("read:/secret.txt", "err: No such file or directory (os error 44)");
    assert!(!data.join("new.txt").exists());

    // A grant outside the job file's directory is refused before anything
    // runs: lexically when parsing, through symlinks when loading.
    let e = JobSpec::from_toml(
        &probe_job(
            "grant",
            "",
            "[[operators.grants]]\ndir = \"../etc\"\nguest = \"/etc\"",
        ),
        Path::new("job.toml"),
        dir.path(),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "job file job.toml: operators[0].grants[0].dir: ../etc must be a relative path inside the job file's \
         directory (no `..`)"
    );
    std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
    let spec = JobSpec::from_toml(
        &probe_job(
            "grant",
            "",
            "[[operators.grants]]\ndir = \"etc\"\nguest = \"/etc\"",
        ),
        Path::new("job.toml"),
        dir.path(),
    )
    .unwrap();
    let e = host().load_job(spec, "default").err().unwrap().to_string();
    assert!(
        e.contains("operators[0].grants[0].dir: etc leads to /etc, outside the job file's directory"),
        "{e}"
    );
    let e = JobSpec::from_toml(
        &probe_job(
            "grant",
            "",
            "[[operators.grants]]\ndir = \"data\"\nguest = \"/data\"\nread_only = false",
        ),
        Path::new("job.toml"),
        dir.path(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.ends_with("operators[0].grants[0].read_only: only read-only grants are offered (output goes through the sink)"), "{e}");
}

/// The compiled-component cache is bounded: with room for one component,
/// loading a second evicts the first (which its holders keep using).
#[test]
fn component_cache_is_bounded() {
    let rt = Runtime::with_options(RuntimeOptions {
        component_cache_bytes: 1,
        ..RuntimeOptions::default()
    })
    .unwrap();
    let a = rt.load_file(&plugin("hostile")).unwrap();
    assert_eq!(rt.cached_components(), (1, a.compiled_size()));
    let b = rt.load_file(&plugin("misbehave")).unwrap();
    assert_eq!(rt.cached_components(), (1, b.compiled_size()));
    assert!(a.compiled_size() > 0);
    // Evicted but alive: still instantiable.
    let label = TaskLabel {
        job: "cache".into(),
        operator: "hostile".into(),
        task: 0,
    };
    rt.instantiate(&a, label, &SandboxLimits::default()).unwrap();
}
