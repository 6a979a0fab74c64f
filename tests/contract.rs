//! The operator contract across its two versions: 0.1.0 components still
//! load, run, checkpoint and restore; 0.2.0 components stream their
//! canonical state, within the contract's bounds, without growing their
//! memory; snapshots move between the versions where they can and are
//! refused with one line where they cannot; key groups are recorded in
//! every manifest and fixed for a job's life.
//!
//! They use the library (`memento::Host`, `memento::runtime`,
//! `memento::snapshot`) with the real plugins built by
//! crates/plugins/build.rs; `wordcount-v010` is built against
//! `wit/0.1.0/operator.wit` with raw wit-bindgen, no SDK.

mod common;

use common::output::{assert_same_output, committed, wordcount_output};
use common::{plugin, toml_path};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use memento::runtime::{
    Context, ContractVersion, Event, KeyGroupRange, LoadedComponent, Runtime, RuntimeError, SandboxLimits,
    TaskInstance, TaskLabel,
};
use memento::snapshot::{self, CaptureError, RestoreError};
use memento::spec::{JobSpec, SnapshotFormat};
use memento::store::{
    JobName, Manifest, SnapshotId, SnapshotKind, StateFormat, Store, StoreOptions, TaskKey, TaskState,
    TaskStateData, TenantStore, Trigger,
};
use memento::{Host, RunOptions, StartFrom};

// ---------------------------------------------------------------- helpers

fn store() -> (tempfile::TempDir, TenantStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let tenant = store.tenant("default").unwrap();
    (dir, tenant)
}

fn load(rt: &Runtime, name: &str) -> Arc<LoadedComponent> {
    rt.load_file(&plugin(name)).unwrap()
}

fn label() -> TaskLabel {
    TaskLabel {
        job: "contract".into(),
        operator: "op".into(),
        task: 0,
    }
}

/// An opened instance of task 0 of 1, owning all of `key_groups`.
fn opened(
    rt: &Runtime,
    component: &Arc<LoadedComponent>,
    limits: &SandboxLimits,
    config: &[(&str, &str)],
) -> TaskInstance {
    let mut instance = rt.instantiate(component, label(), limits).unwrap();
    instance
        .open(&Context {
            job: "contract".into(),
            operator_name: "op".into(),
            task_index: 0,
            parallelism: 1,
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            key_groups: 128,
            owned: KeyGroupRange { start: 0, end: 128 },
        })
        .unwrap();
    instance
}

fn events(keys: &[&str]) -> Vec<Event> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| Event {
            key: k.as_bytes().to_vec(),
            value: Vec::new(),
            timestamp: i as i64,
        })
        .collect()
}

fn values(out: &[Event]) -> Vec<String> {
    out.iter()
        .map(|e| {
            format!(
                "{}={}",
                String::from_utf8_lossy(&e.key),
                String::from_utf8_lossy(&e.value)
            )
        })
        .collect()
}

/// Take a canonical snapshot of `instance` the way a task does (streamed
/// into the store) and commit it as snapshot `number` of job `contract`.
fn canonical_snapshot(tenant: &TenantStore, instance: &mut TaskInstance) -> Result<Manifest, CaptureError> {
    let job = JobName::new("contract").unwrap();
    let number = tenant.next_snapshot_number(&job).unwrap();
    let writer = tenant.begin(&job, number).unwrap();
    let captured = snapshot::capture(instance, SnapshotFormat::Canonical, &writer.blob_writer())?;
    let state = snapshot::persist(&captured, &writer.blob_writer()).unwrap();
    let mut m = writer.manifest(SnapshotKind::Savepoint, Trigger::Manual, StateFormat::Canonical);
    m.canonical_framing = Some(snapshot::FRAMING_VERSION);
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state,
    });
    let id = writer.commit(m).unwrap();
    Ok(tenant.get(&id).unwrap())
}

/// Commit `bytes` as a task's canonical state as it was stored before
/// framing (no `canonical_framing`): the snapshots older hosts wrote.
fn legacy_snapshot(tenant: &TenantStore, bytes: &[u8]) -> Manifest {
    let job = JobName::new("contract").unwrap();
    let number = tenant.next_snapshot_number(&job).unwrap();
    let writer = tenant.begin(&job, number).unwrap();
    let chunks = writer.blob_writer().put_chunks_cdc(bytes).unwrap();
    let mut m = writer.manifest(SnapshotKind::Savepoint, Trigger::Manual, StateFormat::Canonical);
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical {
            len: bytes.len() as u64,
            chunks,
        },
    });
    let id = writer.commit(m).unwrap();
    tenant.get(&id).unwrap()
}

/// Commit framed pieces written by hand (the layout docs/STORAGE.md
/// specifies), e.g. keyed state a 0.1.0 component cannot take.
fn framed_snapshot(tenant: &TenantStore, pieces: &[(Option<u32>, &[u8])]) -> Manifest {
    let mut bytes = Vec::new();
    for (group, piece) in pieces {
        match group {
            None => bytes.push(0),
            Some(g) => {
                bytes.push(1);
                bytes.extend_from_slice(&g.to_le_bytes());
            }
        }
        bytes.extend_from_slice(&(piece.len() as u32).to_le_bytes());
        bytes.extend_from_slice(piece);
    }
    let mut m = legacy_snapshot(tenant, &bytes);
    // Rewrite as framed: same chunks, the manifest says how to read them.
    let job = JobName::new("contract").unwrap();
    let number = tenant.next_snapshot_number(&job).unwrap();
    let writer = tenant.begin(&job, number).unwrap();
    let mut framed = writer.manifest(SnapshotKind::Savepoint, Trigger::Manual, StateFormat::Canonical);
    framed.canonical_framing = Some(snapshot::FRAMING_VERSION);
    framed.tasks = std::mem::take(&mut m.tasks);
    let id = writer.commit(framed).unwrap();
    tenant.get(&id).unwrap()
}

fn restore_into(
    rt: &Runtime,
    component: &Arc<LoadedComponent>,
    tenant: &TenantStore,
    m: &Manifest,
) -> Result<TaskInstance, RestoreError> {
    let mut instance = opened(rt, component, &SandboxLimits::default(), &[]);
    snapshot::restore(&mut instance, tenant, &m.id, &m.tasks[0])?;
    Ok(instance)
}

// ---------------------------------------------------------------- 0.1.0 and 0.2.0 side by side

/// A 0.1.0 component loads as one, runs, takes a canonical snapshot
/// (framed by the host as unkeyed pieces) and restores from it, counting
/// on where it left off; so does the 0.2.0 `wordcount`; and the 0.1.0
/// savepoint restores into the 0.2.0 plugin (the upgrade path). The 0.2.0
/// `wordcount` keeps its counts as keyed state, which a 0.1.0 component
/// has no way to read: that downgrade is refused, saying so.
#[test]
fn components_of_both_versions_run_snapshot_and_restore_across_versions() {
    let rt = Runtime::new().unwrap();
    let old = load(&rt, "wordcount-v010");
    let new = load(&rt, "wordcount");
    assert_eq!(old.contract(), ContractVersion::V0_1);
    assert_eq!(new.contract(), ContractVersion::V0_2);
    let (_dir, tenant) = store();
    let limits = SandboxLimits::default();

    for (from, to) in [(&old, &old), (&new, &new), (&old, &new)] {
        let mut first = opened(&rt, from, &limits, &[]);
        assert_eq!(
            values(&first.process(&events(&["a", "b", "a"])).unwrap()),
            ["a=1", "b=1", "a=2"]
        );
        let m = canonical_snapshot(&tenant, &mut first).unwrap();
        assert_eq!(m.canonical_framing, Some(1));
        let mut second = restore_into(&rt, to, &tenant, &m)
            .unwrap_or_else(|e| panic!("{:?} -> {:?}: {e}", from.contract(), to.contract()));
        assert_eq!(
            values(&second.process(&events(&["a", "c", "b"])).unwrap()),
            ["a=3", "c=1", "b=2"],
            "{:?} -> {:?}",
            from.contract(),
            to.contract()
        );
    }
    let mut keyed = opened(&rt, &new, &limits, &[]);
    keyed.process(&events(&["a"])).unwrap();
    let m = canonical_snapshot(&tenant, &mut keyed).unwrap();
    let err = restore_into(&rt, &old, &tenant, &m)
        .err()
        .expect("a 0.1.0 component cannot restore keyed state");
    assert!(
        err.to_string()
            .contains("which a memento:operator@0.1.0 component cannot restore; resume with a build of the plugin on 0.2.0"),
        "{err}"
    );
}

/// Snapshots written before framing (the operator's bytes as they are)
/// restore into components of both versions.
#[test]
fn snapshots_from_before_framing_restore_into_both_versions() {
    let rt = Runtime::new().unwrap();
    let old = load(&rt, "wordcount-v010");
    let (_dir, tenant) = store();
    let mut first = opened(&rt, &old, &SandboxLimits::default(), &[]);
    first.process(&events(&["x", "x", "y"])).unwrap();
    let legacy = legacy_snapshot(&tenant, &first.snapshot_state().unwrap());
    assert_eq!(legacy.canonical_framing, None);
    for name in ["wordcount-v010", "wordcount"] {
        let mut restored = restore_into(&rt, &load(&rt, name), &tenant, &legacy).unwrap();
        assert_eq!(
            values(&restored.process(&events(&["x", "y"])).unwrap()),
            ["x=3", "y=2"],
            "{name}"
        );
    }
}

/// Keyed state cannot go into a 0.1.0 component: one line saying why and
/// what to do; unkeyed pieces of a 0.2.0 snapshot join into its one list.
#[test]
fn keyed_state_is_refused_by_a_010_component_with_one_line() {
    let rt = Runtime::new().unwrap();
    let old = load(&rt, "wordcount-v010");
    let (_dir, tenant) = store();
    let m = framed_snapshot(&tenant, &[(None, b"MGST"), (Some(3), b"counts of group 3")]);
    let err = restore_into(&rt, &old, &tenant, &m)
        .err()
        .expect("refused")
        .to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(
        err.contains(
            "the snapshot holds keyed state (key group 3), which a memento:operator@0.1.0 component cannot restore"
        ),
        "{err}"
    );
    assert!(err.contains("build of the plugin on 0.2.0"), "{err}");
}

/// Damaged framing is refused naming the snapshot, the task and the byte.
#[test]
fn damaged_framing_is_refused_with_one_line() {
    let rt = Runtime::new().unwrap();
    let new = load(&rt, "wordcount");
    let (_dir, tenant) = store();
    let m = framed_snapshot(&tenant, &[(None, b"MGST")]);
    // Same chunks, read as framing version 1, but cut one byte short.
    let TaskStateData::Canonical { chunks, len } = &m.tasks[0].state else {
        unreachable!()
    };
    let bytes = tenant.read_chunks(&m.id, &m.tasks[0].key, chunks).unwrap();
    assert_eq!(bytes.len() as u64, *len);
    let short = framed_from_bytes(&tenant, &bytes[..bytes.len() - 1]);
    let err = restore_into(&rt, &new, &tenant, &short)
        .err()
        .expect("refused")
        .to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(
        err.contains(&format!(
            "snapshot {}, task op[0]: the state ends inside a piece (8 bytes after the last whole piece)",
            short.id
        )),
        "{err}"
    );
}

fn framed_from_bytes(tenant: &TenantStore, bytes: &[u8]) -> Manifest {
    let mut m = legacy_snapshot(tenant, bytes);
    let job = JobName::new("contract").unwrap();
    let number = tenant.next_snapshot_number(&job).unwrap();
    let writer = tenant.begin(&job, number).unwrap();
    let mut framed = writer.manifest(SnapshotKind::Savepoint, Trigger::Manual, StateFormat::Canonical);
    framed.canonical_framing = Some(snapshot::FRAMING_VERSION);
    framed.tasks = std::mem::take(&mut m.tasks);
    let id = writer.commit(framed).unwrap();
    tenant.get(&id).unwrap()
}

// ---------------------------------------------------------------- bounds

fn hostile_snapshot(config: &[(&str, &str)], limits: &SandboxLimits) -> (CaptureError, TaskInstance) {
    let rt = Runtime::new().unwrap();
    let hostile = load(&rt, "hostile");
    let (_dir, tenant) = store();
    let mut instance = opened(&rt, &hostile, limits, config);
    let err = canonical_snapshot(&tenant, &mut instance).expect_err("refused");
    (err, instance)
}

/// The running total of a streamed snapshot is bounded by `max_snapshot`
/// (the guest streams 64 MiB in 64 KiB pieces, the host stops it at 8 MiB
/// without ever holding more than a few pieces), a piece longer than the
/// contract's 1 MiB is refused (and one far longer traps before it is
/// copied), and a piece of a key group the task does not own is refused:
/// each a one-line error naming the task and the phase.
#[test]
fn piece_length_and_total_bounds_are_enforced_with_one_line() {
    let limits = SandboxLimits {
        max_snapshot: Some(8 << 20),
        ..SandboxLimits::default()
    };
    let (err, _) = hostile_snapshot(&[("mode", "huge-snapshot"), ("snapshot_mib", "64")], &limits);
    let CaptureError::Failed(e) = err else {
        panic!("not a failure: {err}")
    };
    assert!(
        matches!(
            *e,
            RuntimeError::OutputLimit {
                key: "max_snapshot",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "job `contract`, operator `op`, task 0: `snapshot-state` returned more than 8388608 bytes (limits.max_snapshot)"
    );

    let (err, mut instance) = hostile_snapshot(&[("mode", "huge-piece")], &SandboxLimits::default());
    assert_eq!(
        err.to_string(),
        "job `contract`, operator `op`, task 0: the host refused the state of `snapshot-state`: \
         a state piece of 1048577 bytes is longer than the contract's 1048576"
    );
    // Refused, not trapped: the task could go on.
    instance.process(&events(&["a"])).unwrap();

    let eight_mib = (8 << 20).to_string();
    let (err, mut instance) = hostile_snapshot(
        &[("mode", "huge-piece"), ("piece_bytes", &eight_mib)],
        &SandboxLimits::default(),
    );
    let text = err.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.contains("the host refused the state of `snapshot-state`: a call to the host passed more than"),
        "{text}"
    );
    assert!(text.contains("a state piece is at most 1048576 bytes"), "{text}");
    // The piece trapped the instance: it is not called again.
    assert!(matches!(
        instance.process(&events(&["a"])),
        Err(RuntimeError::Poisoned { .. })
    ));

    let (err, _) = hostile_snapshot(&[("mode", "foreign-key-group")], &SandboxLimits::default());
    assert_eq!(
        err.to_string(),
        "job `contract`, operator `op`, task 0: the host refused the state of `snapshot-state`: \
         a state piece of key group 128, which the task does not own (it owns 0..128)"
    );
}

// ---------------------------------------------------------------- memory

/// Ten canonical savepoints of an operator holding 128 MiB of state leave
/// its memory where it was: the SDK streams the state in 64 KiB pieces
/// instead of serializing it into a second buffer (which 0.1.0 forced,
/// growing the memory by the state's size for good). The state restores.
#[test]
fn ten_canonical_savepoints_of_a_large_state_leave_guest_memory_unchanged() {
    let rt = Runtime::new().unwrap();
    let ballast = load(&rt, "ballast");
    let (_dir, tenant) = store();
    let limits = SandboxLimits {
        memory_bytes: 1 << 30,
        call_timeout: Duration::from_secs(120),
        ..SandboxLimits::default()
    };
    let mut instance = opened(
        &rt,
        &ballast,
        &limits,
        &[("state_mib", "128"), ("dirty_fraction", "0.001")],
    );
    let before = instance.memory_sizes();
    assert!(before[0] >= 128 << 20, "{before:?}");
    let mut after = Vec::new();
    let mut last = None;
    for i in 0..10 {
        instance.process(&events(&["step"])).unwrap();
        let m = canonical_snapshot(&tenant, &mut instance).unwrap();
        let TaskStateData::Canonical { len, .. } = m.tasks[0].state else {
            unreachable!()
        };
        assert!(len > 128 << 20, "savepoint {i} holds the state ({len} bytes)");
        after.push(instance.memory_sizes()[0]);
        last = Some(m);
    }
    // The first savepoint may grow the memory by the SDK's one piece
    // buffer (64 KiB, a wasm page); after that, not a byte, and never by
    // anything like the state's 128 MiB.
    assert!(
        after[0] - before[0] <= 2 * memento_guest_piece(),
        "the first savepoint grew memory from {} to {} bytes",
        before[0],
        after[0]
    );
    assert!(
        after.iter().all(|&a| a == after[0]),
        "memory after each savepoint: {after:?}"
    );
    let last = last.unwrap();
    let mut restored = opened(&rt, &ballast, &limits, &[("state_mib", "0")]);
    snapshot::restore(&mut restored, &tenant, &last.id, &last.tasks[0]).unwrap();
    let out = restored.process(&events(&["next"])).unwrap();
    assert_eq!(values(&out), ["next=11"], "the step counter came back");
}

/// The SDK's piece buffer (`memento_guest::state::PIECE`; the host does
/// not link the SDK).
fn memento_guest_piece() -> u64 {
    64 << 10
}

// ---------------------------------------------------------------- key groups

struct Job {
    dir: tempfile::TempDir,
    state: PathBuf,
}

impl Job {
    fn new() -> Job {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        Job { dir, state }
    }

    fn toml(&self, plugin_name: &str, parallelism: u32, extra_op: &str, count: u64) -> String {
        format!(
            "name = \"kg\"\n[source]\ntype = \"generator\"\ncount = {count}\nkeys = 40\nseed = 5\nbatch = 100\n\
             rate = 20000\n\n[[operators]]\nname = \"count\"\nplugin = \"{}\"\nparallelism = {parallelism}\n\
             {extra_op}\n[sink]\ntype = \"file\"\npath = \"out\"\n\n[checkpoints]\ninterval = \"100ms\"\nretained = 100\n",
            toml_path(&plugin(plugin_name))
        )
    }

    fn run(&self, toml: &str, from: StartFrom) -> Result<memento::JobReport, String> {
        let host = Host::open(&self.state).unwrap();
        let spec = JobSpec::from_toml(toml, &self.dir.path().join("job.toml"), self.dir.path())
            .map_err(|e| e.to_string())?;
        let job = host.load_job(spec, "default").map_err(|e| e.to_string())?;
        job.run(RunOptions { from }).map_err(|e| e.to_string())
    }

    fn manifests(&self) -> Vec<Manifest> {
        let store = Store::open(&self.state, StoreOptions::default()).unwrap();
        let tenant = store.tenant("default").unwrap();
        let mut all: Vec<Manifest> = tenant.list(&Default::default()).unwrap();
        all.sort_by_key(|m| m.number);
        all
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }
}

fn periodic(j: &Job) -> SnapshotId {
    j.manifests()
        .into_iter()
        .find(|m| m.trigger == Trigger::Periodic && !m.tasks.is_empty())
        .expect("a periodic checkpoint with state")
        .id
}

/// Every manifest records each operator's key groups (the default, 128,
/// here); a 0.1.0 plugin runs in a keyed parallel job and a run resumed
/// from one of its checkpoints commits the uninterrupted output; resuming
/// with another max_parallelism is refused with one line.
#[test]
fn key_groups_are_recorded_and_fixed_for_the_jobs_life() {
    let (count, keys, seed) = (6_000, 40, 5);
    let expected = wordcount_output(count, keys, seed);
    let j = Job::new();
    let toml = j.toml("wordcount-v010", 3, "", count);
    j.run(&toml, StartFrom::Scratch).unwrap();
    assert_same_output(&committed(&j.out()), &expected, "0.1.0 plugin, 3 tasks");
    let checkpoint = periodic(&j);
    for m in j.manifests().iter().filter(|m| !m.tasks.is_empty()) {
        assert_eq!(
            m.extra["key_groups"],
            serde_json::json!({ "count": 128 }),
            "{}",
            m.id
        );
        assert_eq!(m.canonical_framing, Some(1), "{}", m.id);
    }

    // Resumed from a mid-run checkpoint: the same output.
    j.run(&toml, StartFrom::Snapshot(checkpoint.clone())).unwrap();
    assert_same_output(&committed(&j.out()), &expected, "resumed from a checkpoint");

    // The job file may name the recorded value, but no other.
    let same = j.toml("wordcount-v010", 3, "max_parallelism = 128", count);
    j.run(&same, StartFrom::Snapshot(checkpoint.clone())).unwrap();
    let other = j.toml("wordcount-v010", 3, "max_parallelism = 64", count);
    let err = j.run(&other, StartFrom::Snapshot(checkpoint)).unwrap_err();
    assert!(!err.contains('\n'), "{err}");
    assert!(
        err.contains(
            "operator `count` has 128 key groups in the snapshot but max_parallelism 64 in the job file \
             (key groups are fixed for a job's life: remove max_parallelism or set it to 128)"
        ),
        "{err}"
    );
}

/// A snapshot from before key groups (no record) restores with key groups
/// = parallelism: routing `hash % parallelism`, as it was taken. The
/// legacy snapshot is made by a run with `max_parallelism = parallelism`
/// (the same routing) whose records are then removed; the resumed run
/// commits the uninterrupted output and records parallelism from then on.
#[test]
fn snapshots_without_key_groups_restore_with_key_groups_equal_to_parallelism() {
    let (count, keys, seed) = (6_000, 40, 5);
    let expected = wordcount_output(count, keys, seed);
    let j = Job::new();
    let legacy_routing = j.toml("wordcount", 3, "max_parallelism = 3", count);
    j.run(&legacy_routing, StartFrom::Scratch).unwrap();
    let checkpoint = periodic(&j);
    // Make it a snapshot of an older host: no key-group record.
    let path = manifest_path(&j.state, &checkpoint);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(m["extra"]["key_groups"]["count"], 3);
    m["extra"].as_object_mut().unwrap().remove("key_groups");
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();

    // The job file without max_parallelism (default 128) resumes it with 3.
    let default = j.toml("wordcount", 3, "", count);
    let report = j.run(&default, StartFrom::Snapshot(checkpoint.clone())).unwrap();
    assert_eq!(report.restored_from, Some(checkpoint.clone()));
    assert_same_output(
        &committed(&j.out()),
        &expected,
        "resumed a snapshot without key groups",
    );
    let newest = j
        .manifests()
        .into_iter()
        .rev()
        .find(|m| !m.tasks.is_empty())
        .unwrap();
    assert!(newest.number > checkpoint.number());
    assert_eq!(newest.extra["key_groups"], serde_json::json!({ "count": 3 }));
}

/// The manifest file of `id` in the store at `state` (the layout
/// docs/STORAGE.md specifies).
fn manifest_path(state: &Path, id: &SnapshotId) -> PathBuf {
    let found: Vec<PathBuf> = walk(state)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&id.to_string()))
        })
        .collect();
    assert_eq!(found.len(), 1, "one manifest file for {id}: {found:?}");
    found.into_iter().next().unwrap()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
