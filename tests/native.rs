//! End-to-end tests of native snapshots (issue 5): images of the guests'
//! linear memories, taken without guest code and restored into the
//! identical component.
//!
//! The library-level tests drive `runtime` + `snapshot` + `store` directly
//! with the real plugins; the job-level tests drive the `memento` binary
//! (exactly-once under SIGKILL with `[checkpoints] format = "native"`,
//! `memento inspect`).

mod common;

use common::output::{assert_prefix, committed, wordcount_output};
use common::wasm::{with_extra_global, with_extra_global_of};
use common::{memento, plugin};

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memento::runtime::{Context, Event, LoadedComponent, Runtime, SandboxLimits, TaskInstance, TaskLabel};
use memento::snapshot::{self, CaptureError, RestoreError};
use memento::spec::SnapshotFormat;
use memento::store::{
    JobName, ListFilter, Manifest, SnapshotKind, StateFormat, Store, StoreOptions, TaskKey, TaskState,
    TaskStateData, TenantStore, Trigger,
};

// ------------------------------------------------------------ library helpers

fn load(rt: &Runtime, name: &str) -> Arc<LoadedComponent> {
    rt.load_file(&plugin(name)).unwrap()
}

fn label(operator: &str) -> TaskLabel {
    TaskLabel {
        job: "native".into(),
        operator: operator.into(),
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

/// Instantiate and open `component` as task 0 of operator `operator`.
fn opened(
    rt: &Runtime,
    component: &Arc<LoadedComponent>,
    operator: &str,
    config: &[(&str, &str)],
) -> TaskInstance {
    let mut instance = rt.instantiate(component, label(operator), &limits()).unwrap();
    instance
        .open(&Context {
            job: "native".into(),
            operator_name: operator.into(),
            task_index: 0,
            parallelism: 1,
            key_groups: 1,
            owned: memento::runtime::KeyGroupRange { start: 0, end: 1 },
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .unwrap();
    instance
}

fn events(range: std::ops::Range<u64>) -> Vec<Event> {
    range
        .map(|i| Event {
            key: format!("key-{}", i % 7).into_bytes(),
            value: format!("value-{i}").into_bytes(),
            timestamp: i as i64,
        })
        .collect()
}

/// A writer of snapshot 1 of job `scratch` in a store of its own, for
/// captures whose state the test does not persist.
fn scratch() -> (tempfile::TempDir, memento::store::SnapshotWriter) {
    let (dir, tenant) = store();
    let writer = tenant.begin(&JobName::new("scratch").unwrap(), 1).unwrap();
    (dir, writer)
}

fn store() -> (tempfile::TempDir, TenantStore) {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        sync: false,
        ..StoreOptions::default()
    };
    let store = Store::open(&dir.path().join("state"), options).unwrap();
    let tenant = store.tenant("default").unwrap();
    (dir, tenant)
}

/// Take a native snapshot of `instance` (operator `operator`, task 0) into
/// the store, the way a checkpoint does: capture, persist, commit.
fn native_snapshot(
    tenant: &TenantStore,
    instance: &mut TaskInstance,
    component: &LoadedComponent,
    operator: &str,
) -> Manifest {
    let job = JobName::new("native").unwrap();
    let number = tenant.next_snapshot_number(&job).unwrap();
    let writer = tenant.begin(&job, number).unwrap();
    let captured = snapshot::capture(instance, SnapshotFormat::Native, &writer.blob_writer())
        .unwrap_or_else(|e| panic!("capture: {e}"));
    let state = snapshot::persist(&captured, &writer.blob_writer()).unwrap();
    let mut m = writer.manifest(SnapshotKind::Checkpoint, Trigger::Manual, StateFormat::Native);
    m.components.insert(operator.into(), component.hash_hex());
    m.tasks.push(TaskState {
        key: TaskKey::new(operator, 0),
        state,
    });
    let id = writer.commit(m).unwrap();
    tenant.get(&id).unwrap()
}

/// What an incremental snapshot should do after the capture.
#[derive(PartialEq)]
enum Outcome {
    /// Commit and send the task its `Complete` notice.
    Committed,
    /// Commit, but the notice is lost.
    NoticeMissed,
    /// The coordinator aborts the snapshot: nothing is committed.
    Aborted,
}

/// Take an incremental native snapshot through `base` (as a task does at a
/// barrier); returns the manifest (if committed) and the bytes copied
/// during the pause and the pause.
fn incremental_snapshot(
    tenant: &TenantStore,
    instance: &mut TaskInstance,
    component: &LoadedComponent,
    base: &snapshot::NativeBase,
    aborted: u64,
    outcome: Outcome,
) -> (Option<Manifest>, u64, Duration) {
    let job = JobName::new("native").unwrap();
    let number = tenant.next_snapshot_number(&job).unwrap();
    let writer = tenant.begin(&job, number).unwrap();
    let captured = base
        .capture(instance, &writer.blob_writer(), aborted)
        .unwrap_or_else(|e| panic!("capture: {e}"));
    let copied = captured.copied_bytes();
    let state = snapshot::persist(&captured, &writer.blob_writer()).unwrap();
    if outcome == Outcome::Aborted {
        writer.abort();
        return (None, copied, captured.pause);
    }
    let mut m = writer.manifest(SnapshotKind::Checkpoint, Trigger::Manual, StateFormat::Native);
    m.components.insert("b".into(), component.hash_hex());
    m.tasks.push(TaskState {
        key: TaskKey::new("b", 0),
        state,
    });
    let id = writer.commit(m).unwrap();
    if outcome == Outcome::Committed {
        base.committed(number);
    }
    (Some(tenant.get(&id).unwrap()), copied, captured.pause)
}

fn restore(
    rt: &Runtime,
    tenant: &TenantStore,
    m: &Manifest,
    component: &Arc<LoadedComponent>,
    operator: &str,
) -> Result<TaskInstance, RestoreError> {
    snapshot::restore_native(
        rt,
        component,
        label(operator),
        &limits(),
        tenant,
        &m.id,
        &m.tasks[0],
    )
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

// ------------------------------------------------------------ library tests

/// The guard against wasmtime issue #12053: with host-owned memories the
/// host must see what guest code wrote. `ballast` fills `state_mib` MiB with
/// pseudo-random bytes in `open` -- written by guest code, after growing
/// the memory -- so the host's view must hold that many non-zero bytes.
#[test]
fn host_sees_the_guests_writes() {
    let rt = Runtime::new().unwrap();
    let ballast = load(&rt, "ballast");
    let instance = opened(&rt, &ballast, "b", &[("state_mib", "4")]);
    let sizes = instance.memory_sizes();
    assert_eq!(sizes.len(), 1, "one linear memory in a wit-bindgen component");
    assert!(
        sizes[0] >= 4 << 20,
        "the memory grew to hold the ballast: {sizes:?}"
    );
    let memory = instance.memory(0).unwrap();
    let nonzero = memory.iter().filter(|&&b| b != 0).count();
    assert!(
        nonzero > (4 << 20) * 9 / 10,
        "the host sees only {nonzero} non-zero bytes of the guest's 4 MiB ballast"
    );
}

/// Every example plugin and the test plugin are accepted for native
/// snapshots at load time (one memory, only the stack pointer mutable, no
/// table mutation).
#[test]
fn example_plugins_support_native_snapshots() {
    let rt = Runtime::new().unwrap();
    for name in ["wordcount", "window-sum", "dedup", "ballast", "misbehave"] {
        assert_eq!(load(&rt, name).native_support(), Ok(()), "{name}");
    }
}

/// Byte-exact round trips at several sizes: capture, persist, restore into
/// a fresh instance (pre-sized, filled before any call, not opened), then
/// both instances process the same events and must emit the same output
/// and hold identical memories again.
#[test]
fn round_trip_is_byte_exact_at_several_sizes() {
    let rt = Runtime::new().unwrap();
    let ballast = load(&rt, "ballast");
    let (_dir, tenant) = store();
    for mib in ["0.25", "3", "24"] {
        let mut original = opened(
            &rt,
            &ballast,
            "b",
            &[("state_mib", mib), ("dirty_fraction", "0.01")],
        );
        original.process(&events(0..50)).unwrap();
        let m = native_snapshot(&tenant, &mut original, &ballast, "b");
        let TaskStateData::Native { memories, .. } = &m.tasks[0].state else {
            panic!("native state expected")
        };
        assert_eq!(memories.len(), 1);
        assert_eq!(memories[0].size, original.memory_sizes()[0]);
        let mut restored = restore(&rt, &tenant, &m, &ballast, "b").unwrap();
        assert_same_memories(&original, &restored, &format!("{mib} MiB right after restore"));
        let a = original.process(&events(50..80)).unwrap();
        let b = restored.process(&events(50..80)).unwrap();
        assert_eq!(a, b, "{mib} MiB: same output after restore");
        assert_eq!(
            String::from_utf8_lossy(&b.last().unwrap().value),
            "80",
            "the restored operator continued from step 50 without `open`"
        );
        assert_same_memories(&original, &restored, &format!("{mib} MiB after more events"));
    }
}

/// A restored memory keeps growing like the original: `misbehave` in
/// `grow-in-process` mode allocates 1 MiB per event.
#[test]
fn restored_memories_grow() {
    let rt = Runtime::new().unwrap();
    let misbehave = load(&rt, "misbehave");
    let (_dir, tenant) = store();
    let mut original = opened(&rt, &misbehave, "m", &[("mode", "grow-in-process")]);
    original.process(&events(0..3)).unwrap();
    let m = native_snapshot(&tenant, &mut original, &misbehave, "m");
    let mut restored = restore(&rt, &tenant, &m, &misbehave, "m").unwrap();
    let before = restored.memory_sizes()[0];
    for batch in 0..4 {
        let evs = events(10 + batch * 2..12 + batch * 2);
        assert_eq!(original.process(&evs).unwrap(), restored.process(&evs).unwrap());
    }
    assert!(
        restored.memory_sizes()[0] >= before + (8 << 20),
        "grew by 8 MiB after the restore"
    );
    assert_same_memories(&original, &restored, "after growth");
    // And the grown image round-trips again.
    let m2 = native_snapshot(&tenant, &mut restored, &misbehave, "m");
    let again = restore(&rt, &tenant, &m2, &misbehave, "m").unwrap();
    assert_same_memories(&restored, &again, "second generation");
}

/// Incremental by content: a second snapshot after the host changed one
/// page writes exactly one chunk (256 KiB), and one after a real `process`
/// call writes only a handful (the changed page, the stack, the heap).
#[test]
fn second_snapshot_writes_only_changed_chunks() {
    let rt = Runtime::new().unwrap();
    let ballast = load(&rt, "ballast");
    let (_dir, tenant) = store();
    // 16 MiB = 4096 pages; one page per event.
    let config = [("state_mib", "16"), ("dirty_fraction", "0.000244140625")];
    let mut instance = opened(&rt, &ballast, "b", &config);
    let first = native_snapshot(&tenant, &mut instance, &ballast, "b");
    assert!(
        first.figures.chunks_new >= 64,
        "the first snapshot writes the ballast: {:?}",
        first.figures
    );

    let unchanged = native_snapshot(&tenant, &mut instance, &ballast, "b");
    assert_eq!(
        unchanged.figures.chunks_new, 0,
        "nothing changed: {:?}",
        unchanged.figures
    );

    let len = instance.memory_sizes()[0] as usize;
    let memory = instance.memory_mut(0).unwrap();
    let at = len / 2 + 123;
    memory[at] = memory[at].wrapping_add(1);
    let one = native_snapshot(&tenant, &mut instance, &ballast, "b");
    assert_eq!(
        one.figures.chunks_new, 1,
        "one changed page, one chunk: {:?}",
        one.figures
    );
    assert_eq!(one.figures.new_bytes, 256 * 1024);

    instance.process(&events(0..1)).unwrap();
    let step = native_snapshot(&tenant, &mut instance, &ballast, "b");
    eprintln!("chunks written after one ballast step: {:?}", step.figures);
    assert!(
        (1..=6).contains(&step.figures.chunks_new),
        "one event changes one ballast page plus stack and heap: {:?}",
        step.figures
    );
}

/// The chain of memory 0 of task 0: (deltas, pages of the last, its length).
fn chain(m: &Manifest) -> (usize, u64, u64) {
    let TaskStateData::Native { memories, .. } = &m.tasks[0].state else {
        panic!("native state")
    };
    let image = &memories[0];
    let last = image.deltas.last();
    (
        image.deltas.len(),
        last.map_or(0, |d| d.pages),
        last.map_or(0, |d| d.len),
    )
}

/// Page deltas: after a committed base, a checkpoint stores the changed
/// bytes of the written pages (a one-byte change costs a few dozen bytes,
/// not a chunk); chains grow with each checkpoint and restore byte-exact;
/// nothing written adds nothing to the chain.
#[test]
fn page_deltas_store_what_changed() {
    const PAGE: usize = 4096;
    const CHUNK: usize = 256 * 1024;
    let rt = Runtime::new().unwrap();
    let ballast = load(&rt, "ballast");
    let (_dir, tenant) = store();
    let mut instance = opened(&rt, &ballast, "b", &[("state_mib", "16")]);
    let base = snapshot::NativeBase::new();
    let (m, _, _) = incremental_snapshot(&tenant, &mut instance, &ballast, &base, 0, Outcome::Committed);
    assert_eq!(chain(&m.unwrap()).0, 0, "no base yet: a full image");
    if !instance.tracks_writes() {
        memento::runtime::tracking_unavailable("only the full path is tested");
        return;
    }
    let len = instance.memory_sizes()[0] as usize;
    let memory = instance.memory_mut(0).unwrap();
    memory[len / 2 + 123] ^= 0x5a;
    let (m, copied, _) = incremental_snapshot(&tenant, &mut instance, &ballast, &base, 0, Outcome::Committed);
    let m = m.unwrap();
    assert_eq!(copied, 0, "copy-on-write: nothing copied in the pause");
    let (deltas, pages, bytes) = chain(&m);
    assert_eq!((deltas, pages), (1, 1), "one changed page, one delta");
    assert!(bytes <= 28 + 8 + 8, "a one-byte change costs {bytes} bytes");
    assert_eq!(m.schema_version, 2, "a chain needs schema 2");
    let restored = restore(&rt, &tenant, &m, &ballast, "b").unwrap();
    assert_same_memories(&instance, &restored, "base and one delta");
    // Three pages of one chunk (two of them adjacent), the memory's last
    // page, and one chunk written whole.
    let memory = instance.memory_mut(0).unwrap();
    for at in [
        3 * CHUNK + PAGE,
        3 * CHUNK + 2 * PAGE + 7,
        3 * CHUNK + 40 * PAGE,
        len - 1,
    ] {
        memory[at] = memory[at].wrapping_add(1);
    }
    memory[5 * CHUNK..6 * CHUNK].fill(0x77);
    let (m, _, _) = incremental_snapshot(&tenant, &mut instance, &ballast, &base, 0, Outcome::Committed);
    let m = m.unwrap();
    let (deltas, pages, bytes) = chain(&m);
    assert_eq!((deltas, pages), (2, 4 + 64), "{bytes} bytes");
    assert!(
        bytes < (CHUNK + 4 * PAGE) as u64,
        "runs, not pages: {bytes} bytes"
    );
    let restored = restore(&rt, &tenant, &m, &ballast, "b").unwrap();
    assert_same_memories(&instance, &restored, "a chain of two");
    // Nothing written: the chain as it was, no blob written.
    let (m, _, _) = incremental_snapshot(&tenant, &mut instance, &ballast, &base, 0, Outcome::Committed);
    let m = m.unwrap();
    assert_eq!(chain(&m).0, 2);
    assert_eq!(m.figures.chunks_new, 0, "{:?}", m.figures);
    let restored = restore(&rt, &tenant, &m, &ballast, "b").unwrap();
    assert_same_memories(&instance, &restored, "unchanged image");
    // A quarter of the memory rewritten: larger than a chain may grow, so
    // a full image starts a new chain.
    instance.memory_mut(0).unwrap()[..len / 4].fill(0x33);
    let (m, _, _) = incremental_snapshot(&tenant, &mut instance, &ballast, &base, 0, Outcome::Committed);
    let m = m.unwrap();
    assert_eq!(chain(&m).0, 0, "a new base");
    let restored = restore(&rt, &tenant, &m, &ballast, "b").unwrap();
    assert_same_memories(&instance, &restored, "the new base");
    instance.memory_mut(0).unwrap()[7] ^= 1;
    let (m, _, _) = incremental_snapshot(&tenant, &mut instance, &ballast, &base, 0, Outcome::Committed);
    assert_eq!(chain(&m.unwrap()).0, 1, "the new chain grows from the new base");
}

/// An aborted snapshot never becomes a base, and a missed `Complete`
/// notice keeps the older base with the writes since it accumulated:
/// either way the next image restores byte-exact.
#[test]
fn incremental_capture_survives_aborts_and_missed_notices() {
    let rt = Runtime::new().unwrap();
    let ballast = load(&rt, "ballast");
    let (_dir, tenant) = store();
    let mut instance = opened(
        &rt,
        &ballast,
        "b",
        &[("state_mib", "8"), ("dirty_fraction", "0.01")],
    );
    let base = snapshot::NativeBase::new();
    incremental_snapshot(&tenant, &mut instance, &ballast, &base, 0, Outcome::Committed);
    // Aborted: its blobs are discarded.
    instance.process(&events(0..1)).unwrap();
    incremental_snapshot(&tenant, &mut instance, &ballast, &base, 0, Outcome::Aborted);
    let aborted = tenant
        .next_snapshot_number(&JobName::new("native").unwrap())
        .unwrap()
        - 1;
    instance.process(&events(1..2)).unwrap();
    let (m, _, _) = incremental_snapshot(
        &tenant,
        &mut instance,
        &ballast,
        &base,
        aborted,
        Outcome::Committed,
    );
    let restored = restore(&rt, &tenant, &m.unwrap(), &ballast, "b").unwrap();
    assert_same_memories(&instance, &restored, "after an aborted snapshot");
    if !instance.tracks_writes() {
        memento::runtime::tracking_unavailable("the incremental path is not tested");
        return;
    }
    let committed = base.base();
    assert!(committed.is_some());
    // Missed notice: the next captures build on the older base, with the
    // writes of both intervals.
    instance.process(&events(2..3)).unwrap();
    let (one, _, _) = incremental_snapshot(
        &tenant,
        &mut instance,
        &ballast,
        &base,
        aborted,
        Outcome::NoticeMissed,
    );
    assert_eq!(base.base(), committed, "an unnoticed snapshot is not the base");
    instance.process(&events(3..4)).unwrap();
    let len = instance.memory_sizes()[0] as usize;
    instance.memory_mut(0).unwrap()[len - 1] ^= 1;
    let (m, _, _) = incremental_snapshot(
        &tenant,
        &mut instance,
        &ballast,
        &base,
        aborted,
        Outcome::Committed,
    );
    let m = m.unwrap();
    let (_, two, _) = chain(&m);
    assert!(
        two > chain(one.as_ref().unwrap()).1,
        "the pages of both intervals are in the delta"
    );
    let restored = restore(&rt, &tenant, &m, &ballast, "b").unwrap();
    assert_same_memories(&instance, &restored, "after a missed notice");
}

/// Growth between incremental captures (new pages count as written), and
/// after a restore (tracking restarts from the restored image).
#[test]
fn incremental_capture_follows_growth_and_restore() {
    let rt = Runtime::new().unwrap();
    let misbehave = load(&rt, "misbehave");
    let (_dir, tenant) = store();
    let mut original = opened(&rt, &misbehave, "m", &[("mode", "grow-in-process")]);
    let base = snapshot::NativeBase::new();
    original.process(&events(0..3)).unwrap();
    incremental_snapshot(&tenant, &mut original, &misbehave, &base, 0, Outcome::Committed);
    original.process(&events(3..6)).unwrap();
    let (m, _, _) = incremental_snapshot(&tenant, &mut original, &misbehave, &base, 0, Outcome::Committed);
    let m = m.unwrap();
    let mut restored = restore(&rt, &tenant, &m, &misbehave, "m").unwrap();
    assert_same_memories(&original, &restored, "grown image");
    // Continue from the restored instance, its snapshot as the base.
    let TaskStateData::Native { memories, .. } = &m.tasks[0].state else {
        panic!("native state")
    };
    let after = snapshot::NativeBase::new();
    if !restored.tracks_writes() {
        memento::runtime::tracking_unavailable("restored images are not tested incrementally");
    }
    if restored.tracks_writes() {
        after.restored(m.id.number(), memories.clone());
    }
    restored.memory_mut(0).unwrap()[9] ^= 1;
    let (m1, _, _) = incremental_snapshot(&tenant, &mut restored, &misbehave, &after, 0, Outcome::Committed);
    let m1 = m1.unwrap();
    if restored.tracks_writes() {
        assert_eq!(
            chain(&m1),
            (chain(&m).0 + 1, 1, chain(&m1).2),
            "a delta on the restored image"
        );
    }
    let again = restore(&rt, &tenant, &m1, &misbehave, "m").unwrap();
    assert_same_memories(&restored, &again, "a delta after restore");
    restored.process(&events(6..9)).unwrap();
    let (m2, _, _) = incremental_snapshot(&tenant, &mut restored, &misbehave, &after, 0, Outcome::Committed);
    let again = restore(&rt, &tenant, &m2.unwrap(), &misbehave, "m").unwrap();
    assert_same_memories(&restored, &again, "grown after restore");
}

/// With tracking off (the portable path, as where the kernel refuses it)
/// every capture copies whole memories and is still correct.
#[test]
fn capture_without_tracking_copies_everything() {
    let rt = Runtime::new().unwrap();
    let ballast = load(&rt, "ballast");
    let (_dir, tenant) = store();
    let mut instance = opened(
        &rt,
        &ballast,
        "b",
        &[("state_mib", "4"), ("dirty_fraction", "0.01")],
    );
    instance.disable_write_tracking();
    let base = snapshot::NativeBase::new();
    for round in 0..3 {
        instance.process(&events(round..round + 1)).unwrap();
        let (m, copied, _) =
            incremental_snapshot(&tenant, &mut instance, &ballast, &base, 0, Outcome::Committed);
        assert_eq!(copied, instance.memory_sizes()[0], "round {round}: full copy");
        let restored = restore(&rt, &tenant, &m.unwrap(), &ballast, "b").unwrap();
        assert_same_memories(&instance, &restored, "full path");
    }
    assert!(!instance.tracks_writes());
}

/// `snapshot-state` plays no part in native snapshots: `misbehave` with
/// `decline = "true"` refuses canonical snapshots but snapshots and
/// restores natively, call counter included.
#[test]
fn declining_operator_snapshots_natively() {
    let rt = Runtime::new().unwrap();
    let misbehave = load(&rt, "misbehave");
    let (_dir, tenant) = store();
    let config = [("decline", "true"), ("mode", "fail-after"), ("calls", "10")];
    let mut original = opened(&rt, &misbehave, "m", &config);
    let (_scratch, writer) = scratch();
    assert!(matches!(
        snapshot::capture(&mut original, SnapshotFormat::Canonical, &writer.blob_writer()),
        Err(CaptureError::Declined(_))
    ));
    for i in 0..8 {
        original.process(&events(i..i + 1)).unwrap();
    }
    let m = native_snapshot(&tenant, &mut original, &misbehave, "m");
    let mut restored = restore(&rt, &tenant, &m, &misbehave, "m").unwrap();
    // The call counter came back: calls 9 and 10 pass, 11 fails.
    restored.process(&events(8..9)).unwrap();
    restored.process(&events(9..10)).unwrap();
    let err = restored.process(&events(10..11)).unwrap_err();
    assert!(err.to_string().contains("failing after 10 calls"), "{err}");
}

/// A component with a mutable global besides the stack pointer (as
/// interpreters have) is instrumented at load time: its native images
/// carry the globals (image version 2) and a restore sets them from the
/// image, memories and globals byte-exact. Without the Python and
/// JavaScript tools, this is what covers the globals' path.
#[test]
fn a_component_with_an_extra_global_is_imaged_with_it() {
    let rt = Runtime::new().unwrap();
    let original = std::fs::read(plugin("wordcount")).unwrap();
    let bytes = with_extra_global_of(
        &original,
        wasm_encoder::ValType::I64,
        wasm_encoder::ConstExpr::i64_const(-5),
    );
    let c = rt.load_bytes(Path::new("wordcount-global.wasm"), &bytes).unwrap();
    assert_eq!(c.native_support(), Ok(()));
    let layout = c.native_globals().expect("instrumented").clone();
    assert_eq!(layout.len(), 2, "the stack pointer and the added global");
    let mut a = opened(&rt, &c, "count", &[]);
    a.process(&events(0..500)).unwrap();
    let (_dir, tenant) = store();
    let m = native_snapshot(&tenant, &mut a, &c, "count");
    let TaskStateData::Native { extra, .. } = &m.tasks[0].state else {
        panic!("native state expected")
    };
    assert_eq!(
        extra["image_version"],
        snapshot::NATIVE_IMAGE_VERSION_WITH_GLOBALS
    );
    assert_eq!(extra["globals"]["count"], 2);
    let globals = a.capture_globals().unwrap().expect("globals");
    assert_eq!(globals.values[1], (-5i64) as u64);

    let mut b = restore(&rt, &tenant, &m, &c, "count").unwrap();
    assert_same_memories(&a, &b, "right after restore");
    assert_eq!(b.capture_globals().unwrap().as_ref(), Some(&globals));
    assert_eq!(
        a.process(&events(500..600)).unwrap(),
        b.process(&events(500..600)).unwrap()
    );
    assert_same_memories(&a, &b, "after more events");

    // The value comes from the image: an image holding another value for
    // the added global restores with that value.
    let mut state = m.tasks[0].clone();
    let TaskStateData::Native { extra, .. } = &mut state.state else {
        unreachable!()
    };
    let mut values = globals.values.clone();
    values[1] = 42;
    let hex: String = values
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .map(|b| format!("{b:02x}"))
        .collect();
    extra["globals"]["values"] = hex.into();
    let mut tampered =
        snapshot::restore_native(&rt, &c, label("count"), &limits(), &tenant, &m.id, &state).unwrap();
    assert_eq!(tampered.capture_globals().unwrap().unwrap().values, values);

    // Only into the identical component: the original without the added
    // global is another component, refused as always.
    let plain = load(&rt, "wordcount");
    let err = snapshot::restore_native(
        &rt,
        &plain,
        label("count"),
        &limits(),
        &tenant,
        &m.id,
        &m.tasks[0],
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("native image of operator `count`"), "{err}");
}

/// Refusal: a native image restores only into the identical component; the
/// error names both components and points to canonical savepoints.
#[test]
fn restoring_into_another_component_is_refused() {
    let rt = Runtime::new().unwrap();
    let v1 = load(&rt, "wordcount");
    let v2 = load(&rt, "wordcount-v2");
    let (_dir, tenant) = store();
    let mut instance = opened(&rt, &v1, "count", &[]);
    instance.process(&events(0..20)).unwrap();
    let m = native_snapshot(&tenant, &mut instance, &v1, "count");
    let err = restore(&rt, &tenant, &m, &v2, "count").err().expect("refused");
    assert!(matches!(err, RestoreError::ComponentMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&v1.hash_hex()) && text.contains(&v2.hash_hex()),
        "{text}"
    );
    assert!(text.contains("identical component"), "{text}");
    assert!(text.contains("canonical savepoint"), "{text}");
    // The same component restores fine.
    restore(&rt, &tenant, &m, &v1, "count").unwrap();
}

/// Refusal: a guest that printed holds its stdout stream across calls; a
/// native image would carry a dead handle, so the snapshot is declined
/// with the resource named -- before and after further printing calls --
/// while canonical snapshots of the same instance still work.
#[test]
fn held_wasi_resources_are_refused_at_snapshot_time() {
    let rt = Runtime::new().unwrap();
    let misbehave = load(&rt, "misbehave");
    let mut instance = opened(&rt, &misbehave, "m", &[("print", "true")]);
    let (_scratch, scratch) = scratch();
    for round in 0..2 {
        let err = match snapshot::capture(&mut instance, SnapshotFormat::Native, &scratch.blob_writer()) {
            Err(CaptureError::Declined(reason)) => reason,
            Err(e) => panic!("round {round}: should decline, failed: {e}"),
            Ok(_) => panic!("round {round}: a native snapshot of a printing guest was taken"),
        };
        assert!(err.contains("native snapshot refused"), "{err}");
        assert!(err.contains("wasi:io/streams output-stream"), "{err}");
        assert!(err.contains("format = \"canonical\""), "{err}");
        snapshot::capture(&mut instance, SnapshotFormat::Canonical, &scratch.blob_writer()).unwrap();
        instance.process(&events(0..3)).unwrap();
    }
    // With `auto` the snapshot goes canonical instead, and the task's
    // native base is forgotten: retention may delete it once this snapshot
    // commits, so the next native capture must not reference it.
    let base = snapshot::NativeBase::new();
    base.restored(1, Vec::new());
    let (_dir, tenant) = store();
    let writer = tenant.begin(&JobName::new("native").unwrap(), 2).unwrap();
    let captured = snapshot::capture_at_barrier(
        &mut instance,
        SnapshotFormat::Auto,
        &base,
        &writer.blob_writer(),
        0,
    )
    .unwrap();
    assert!(matches!(captured.state, snapshot::CapturedState::Canonical(_)));
    assert_eq!(base.base(), None);
    // Without printing the same plugin snapshots natively.
    let mut quiet = opened(&rt, &misbehave, "m", &[]);
    quiet.process(&events(0..3)).unwrap();
    assert!(snapshot::capture(&mut quiet, SnapshotFormat::Native, &scratch.blob_writer()).is_ok());
}

/// A native savepoint becomes the task's base; disposing it (and collecting
/// its blobs) must not make the next checkpoint reference it: the task
/// notices the base is gone and copies everything, and that checkpoint
/// restores.
#[test]
fn a_disposed_native_base_is_not_built_on() {
    let dir = tempfile::tempdir().unwrap();
    let host = memento::Host::open(&dir.path().join("state")).unwrap();
    let toml = format!(
        "name = \"disposed\"\n[source]\ntype = \"generator\"\nrate = 2000.0\nbatch = 10\n\
         [[operators]]\nname = \"b\"\nplugin = \"{}\"\n[operators.config]\nstate_mib = \"4\"\n\
         dirty_fraction = \"0.001\"\n[sink]\ntype = \"null\"\n",
        plugin("ballast").display()
    );
    let load = || {
        let spec = memento::spec::JobSpec::from_toml(&toml, Path::new("job.toml"), dir.path()).unwrap();
        host.load_job(spec, "default").unwrap()
    };
    let tenant = host.store().tenant("default").unwrap();
    let job = load();
    let (control, status) = (job.control(), job.status_handle());
    let checkpoint = std::thread::scope(|s| {
        let run = s.spawn(|| job.run(memento::RunOptions::default()));
        while status.get().records_in == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let savepoint = control
            .trigger_savepoint(Some(SnapshotFormat::Native))
            .recv_timeout(Duration::from_secs(60))
            .unwrap()
            .expect("native savepoint");
        assert_eq!(tenant.get(&savepoint).unwrap().format, StateFormat::Native);
        tenant.delete(&savepoint).unwrap();
        assert!(tenant.gc().unwrap().blobs_removed > 0);
        let checkpoint = control
            .trigger_checkpoint()
            .recv_timeout(Duration::from_secs(60))
            .unwrap()
            .expect("the checkpoint after the disposal completes");
        control.cancel();
        run.join().unwrap().expect("cancelled cleanly");
        checkpoint
    });
    let m = tenant.get(&checkpoint).unwrap();
    assert_eq!(m.format, StateFormat::Native);
    let job = load();
    let control = job.control();
    let status = job.status_handle();
    std::thread::scope(|s| {
        let run = s.spawn(|| {
            job.run(memento::RunOptions {
                from: memento::StartFrom::Snapshot(checkpoint.clone()),
            })
        });
        while status.get().records_in == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        control.cancel();
        let report = run.join().unwrap().expect("restored and cancelled");
        assert_eq!(report.restored_from, Some(checkpoint.clone()));
    });
}

// ------------------------------------------------------------ binary helpers

/// Refusal at load time: `memento inspect` says whether a component
/// supports native snapshots and, if not, why.
#[test]
fn inspect_reports_native_support() {
    let out = memento()
        .arg("inspect")
        .arg(plugin("wordcount"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("native snapshots: yes"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("globals.wasm");
    let inspect = |counter: &str| {
        let wasm = wat::parse_str(format!(
            r#"(component (core module $m
                 (memory 1)
                 (global $__stack_pointer (mut i32) (i32.const 1024))
                 (global $counter (mut {counter})))
               (core instance (instantiate $m)))"#
        ))
        .unwrap();
        std::fs::write(&path, wasm).unwrap();
        let out = memento().arg("inspect").arg(&path).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A scalar global is reached by instrumentation...
    let text = inspect("i64) (i64.const 0");
    assert!(text.contains("native snapshots: yes"), "{text}");
    // ...a vector one is not.
    let text = inspect("v128) (v128.const i64x2 0 0");
    assert!(
        text.contains(
            "native snapshots: no — core module 0 has 1 mutable global other than the stack pointer (`counter`), \
             which cannot be captured: it has a mutable v128 global"
        ),
        "{text}"
    );
}

fn wait_for(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
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

/// Exactly-once with native checkpoints under real crashes: `misbehave`
/// (pass-through whose `snapshot-state` always declines, so only native
/// snapshots can work) → `wordcount` (p = 2), 300 ms native checkpoints,
/// SIGKILLed 6 times at random moments and resumed with `--from latest`;
/// the committed output equals an uninterrupted run's, and the store
/// passes fsck.
#[test]
fn exactly_once_under_sigkill_with_native_checkpoints() {
    let (count, keys, seed) = (20_000u64, 30u64, 13u64);
    let dir = tempfile::tempdir().unwrap();
    let ops = format!(
        "[[operators]]\nname = \"pass\"\nplugin = \"{}\"\nparallelism = 1\n[operators.config]\ndecline = \"true\"\n\n\
         [[operators]]\nname = \"count\"\nplugin = \"{}\"\nparallelism = 2\n",
        plugin("misbehave").display(),
        plugin("wordcount").display()
    );
    let toml = format!(
        "name = \"nat\"\n[source]\ntype = \"generator\"\ncount = {count}\nkeys = {keys}\nseed = {seed}\nbatch = 100\nrate = 1400\n\n\
         {ops}\n[sink]\ntype = \"file\"\npath = \"out\"\n\n[checkpoints]\ninterval = \"300ms\"\nformat = \"native\"\n"
    );
    let job = dir.path().join("job.toml");
    std::fs::write(&job, toml).unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("out");
    let expected = wordcount_output(count, keys, seed);

    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (mut kills, mut resumes, mut from_scratch, mut native_checkpoints) = (0, 0, true, 0);
    let mut chains = std::collections::BTreeSet::new();
    let started = Instant::now();
    let mut startup: Option<Duration> = None;
    loop {
        assert!(started.elapsed() < Duration::from_secs(180), "no end in sight");
        let mut cmd = memento();
        cmd.arg("run").arg(&job).arg("--state-dir").arg(&state);
        // Chains of at most 3 page deltas: kills land on every chain
        // length, and on checkpoints that close a chain (write a full image).
        cmd.env(memento::snapshot::DELTA_CHAIN_ENV, "3");
        if !from_scratch {
            cmd.args(["--from", "latest"]);
        }
        let spawned = Instant::now();
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        if startup.is_none() {
            // Start-up (compiling the plugins) is slow on a loaded machine:
            // measure it once so that kills land mid-run, after checkpoints.
            let staging = out.join(".staging");
            while !staging.exists() && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            startup = Some(spawned.elapsed());
        }
        let status = if kills < 6 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let delay = (spawned + startup.unwrap_or_default() + Duration::from_millis(600 + rng % 1500))
                .saturating_duration_since(Instant::now());
            match wait_for(&mut child, delay) {
                Some(s) => s,
                None => {
                    child.kill().unwrap();
                    child.wait().unwrap()
                }
            }
        } else {
            wait_for(&mut child, Duration::from_secs(120)).expect("the last run hangs")
        };
        if status.signal() == Some(libc::SIGKILL) {
            kills += 1;
            resumes += usize::from(!from_scratch);
            from_scratch = false;
            assert_prefix(&committed(&out), &expected, &format!("after kill {kills}"));
            // What the next run resumes from is a native checkpoint.
            if let Ok(store) = Store::open(&state, StoreOptions::default())
                && let Some(m) = store
                    .tenant("default")
                    .unwrap()
                    .latest(&JobName::new("nat").unwrap())
                    .unwrap()
            {
                assert_eq!(m.format, StateFormat::Native, "{}", m.id);
                native_checkpoints += 1;
                for t in &m.tasks {
                    if let TaskStateData::Native { memories, .. } = &t.state {
                        chains.extend(memories.iter().map(|i| i.deltas.len()));
                    }
                }
            }
            continue;
        }
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !status.success() && stderr.contains("no snapshot of job") {
            from_scratch = true;
            continue;
        }
        assert!(status.success(), "memento failed: {stderr}");
        break;
    }
    assert_eq!(
        committed(&out),
        expected,
        "after {kills} kills and {resumes} resumes"
    );
    assert!(
        resumes * 2 >= kills,
        "most runs resumed from a native checkpoint ({resumes} of {kills})"
    );
    let fsck = memento()
        .args(["fsck", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
    assert!(
        native_checkpoints * 2 >= kills,
        "most kills should leave a native checkpoint to resume from ({native_checkpoints} of {kills})"
    );
    assert!(
        chains.iter().any(|&n| n > 0),
        "resumed through chains of page deltas (lengths seen: {chains:?})"
    );
}

/// The default checkpoint format, `auto`, from the job file: a task whose
/// guest holds a WASI stream (it prints) is snapshotted canonically, the
/// other natively, so the checkpoints are `mixed`; such a checkpoint
/// restores with exactly-once output, and restoring its native image under
/// a changed operator config is refused with the way out.
#[test]
fn auto_format_mixes_per_task_and_guards_the_config() {
    let (count, keys, seed) = (6_000u64, 20u64, 5u64);
    let dir = tempfile::tempdir().unwrap();
    let toml = |split: &str| {
        format!(
            "name = \"auto\"\n[source]\ntype = \"generator\"\ncount = {count}\nkeys = {keys}\nseed = {seed}\n\
             batch = 100\nrate = 6000\n\n[[operators]]\nname = \"pass\"\nplugin = \"{}\"\n[operators.config]\n\
             print = \"true\"\n\n[[operators]]\nname = \"count\"\nplugin = \"{}\"\n[operators.config]\n\
             split = \"{split}\"\n\n[sink]\ntype = \"file\"\npath = \"out\"\n\n[checkpoints]\n\
             interval = \"150ms\"\nretained = 50\n",
            plugin("misbehave").display(),
            plugin("wordcount").display()
        )
    };
    let job = dir.path().join("job.toml");
    let state = dir.path().join("state");
    let run = |split: &str, from: Option<&str>| {
        std::fs::write(&job, toml(split)).unwrap();
        let mut cmd = memento();
        cmd.arg("run").arg(&job).arg("--state-dir").arg(&state);
        if let Some(id) = from {
            cmd.args(["--from", id]);
        }
        cmd.output().unwrap()
    };
    let first = run("keys", None);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let expected = wordcount_output(count, keys, seed);
    assert_eq!(committed(&dir.path().join("out")), expected);

    let tenant = Store::open(&state, StoreOptions::default())
        .unwrap()
        .tenant("default")
        .unwrap();
    let periodic: Vec<_> = tenant
        .list(&ListFilter::job(&JobName::new("auto").unwrap()))
        .unwrap()
        .into_iter()
        .filter(|m| m.trigger == Trigger::Periodic)
        .collect();
    let m = periodic
        .get(periodic.len() / 2)
        .expect("periodic checkpoints were taken");
    assert_eq!(m.format, StateFormat::Mixed, "{}", m.id);
    for t in &m.tasks {
        let native = matches!(t.state, TaskStateData::Native { .. });
        assert_eq!(native, t.key.operator == "count", "{}: {:?}", t.key, m.format);
    }

    let id = m.id.to_string();
    // `snapshots show` tells the formats apart and lists the native memory.
    let show = memento()
        .args(["snapshots", "show", &id, "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("mixed"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("memory 0") && l.contains(" new)")),
        "{text}"
    );
    let refused = run("words", Some(&id));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("count[0]")
            && stderr.contains("the operator's config changed since this native snapshot"),
        "{stderr}"
    );
    assert!(stderr.contains("format = \"canonical\""), "{stderr}");

    let resumed = run("keys", Some(&id));
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(committed(&dir.path().join("out")), expected, "resumed from {id}");
}

/// `format = "native"` is refused when the job loads, for an operator whose
/// component has a mutable global besides the stack pointer: one error
/// line naming the operator and the setting, and nothing runs. With
/// `auto` the same component runs, snapshotted canonically.
#[test]
fn native_format_is_refused_at_load_for_a_component_it_cannot_image() {
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read(plugin("wordcount")).unwrap();
    let rewritten = dir.path().join("wordcount-global.wasm");
    std::fs::write(&rewritten, with_extra_global(&original)).unwrap();

    // Still a memento operator; no longer imageable.
    let out = memento().arg("inspect").arg(&rewritten).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("contract memento:operator/plugin@0.2.0: yes"),
        "{text}"
    );
    assert!(
        text.contains("native snapshots: no — core module")
            && text.contains("has 1 mutable global other than the stack pointer"),
        "{text}"
    );

    let (count, keys, seed) = (3_000u64, 10u64, 3u64);
    let job = dir.path().join("job.toml");
    let state = dir.path().join("state");
    let run = |format: &str| {
        std::fs::write(
            &job,
            format!(
                "name = \"global\"\n[source]\ntype = \"generator\"\ncount = {count}\nkeys = {keys}\nseed = {seed}\n\
                 batch = 100\nrate = 6000\n\n[[operators]]\nname = \"count\"\nplugin = \"{}\"\n\n\
                 [sink]\ntype = \"file\"\npath = \"out\"\n\n[checkpoints]\ninterval = \"100ms\"\nretained = 50\n\
                 format = \"{format}\"\n",
                rewritten.display()
            ),
        )
        .unwrap();
        memento()
            .arg("run")
            .arg(&job)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap()
    };

    let refused = run("native");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line:\n{stderr}");
    assert!(lines[0].starts_with("error: operator `count`: "), "{stderr}");
    assert!(lines[0].contains("[checkpoints] format = \"native\""), "{stderr}");
    assert!(
        lines[0].contains("has 1 mutable global other than the stack pointer"),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists(), "nothing ran");

    let ran = run("auto");
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    assert_eq!(
        committed(&dir.path().join("out")),
        wordcount_output(count, keys, seed)
    );
    let tenant = Store::open(&state, StoreOptions::default())
        .unwrap()
        .tenant("default")
        .unwrap();
    let snapshots = tenant
        .list(&ListFilter::job(&JobName::new("global").unwrap()))
        .unwrap();
    let periodic: Vec<&Manifest> = snapshots
        .iter()
        .filter(|m| m.trigger == Trigger::Periodic)
        .collect();
    assert!(!periodic.is_empty(), "checkpoints were taken");
    for m in &snapshots {
        assert_eq!(m.format, StateFormat::Canonical, "{}", m.id);
    }
}

/// The end-of-input record of a finished job holds no state: its manifest
/// records the job's checkpoint format, and `snapshots list` shows neither
/// a format nor a size for it.
#[test]
fn the_end_of_input_record_shows_no_state() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &job,
        format!(
            "name = \"eoi\"\n[source]\ntype = \"generator\"\ncount = 2000\nkeys = 10\n\n[[operators]]\n\
             name = \"count\"\nplugin = \"{}\"\n\n[sink]\ntype = \"null\"\n\n[checkpoints]\nformat = \"native\"\n",
            plugin("wordcount").display()
        ),
    )
    .unwrap();
    let ran = memento()
        .arg("run")
        .arg(&job)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let list = |json: bool| {
        let mut cmd = memento();
        cmd.args(["snapshots", "list", "--job", "eoi", "--state-dir"])
            .arg(&state);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let manifests: serde_json::Value = serde_json::from_str(&list(true)).unwrap();
    let record = manifests
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["trigger"] == "end_of_input")
        .expect("an end-of-input record");
    assert_eq!(record["format"], "native", "{record}");
    assert_eq!(record["tasks"], serde_json::json!([]), "{record}");

    let text = list(false);
    let row = text
        .lines()
        .find(|l| l.contains("end-of-input"))
        .unwrap_or_else(|| panic!("no end-of-input row:\n{text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    // ID KIND TRIGGER FORMAT STATUS LOGICAL NEW DURATION(n ms) RETENTION
    assert_eq!(
        (cells[3], cells[5], cells[6]),
        ("-", "-", "-"),
        "no format, no size:\n{text}"
    );
}

/// Copy-on-write barriers: the image of a barrier is read after the guest
/// went on processing and still is the barrier's; the next barrier reports
/// exactly the pages written in between, with their contents at the
/// earlier barrier; an image is unreadable once a later barrier happened.
#[test]
fn copy_on_write_barrier_images_survive_the_guest_running_on() {
    const PAGE: usize = 4096;
    let rt = Runtime::new().unwrap();
    let ballast = load(&rt, "ballast");
    let mut instance = opened(
        &rt,
        &ballast,
        "b",
        &[("state_mib", "8"), ("dirty_fraction", "0.05")],
    );
    instance.process(&events(0..1)).unwrap();
    let Some(first) = instance.cow_barrier().unwrap() else {
        memento::runtime::tracking_unavailable("copy-on-write capture is not tested");
        return;
    };
    let at_first: Vec<Vec<u8>> = (0..instance.memory_sizes().len())
        .map(|i| instance.memory(i).unwrap().to_vec())
        .collect();
    assert!(
        first.memories.iter().all(|m| m.written.is_none()),
        "the first barrier knows no past"
    );
    // The guest writes 5% of its state per event.
    instance.process(&events(1..4)).unwrap();
    for (m, expected) in first.memories.iter().zip(&at_first) {
        // Page by page, and in one read.
        let mut image = vec![0u8; m.size as usize];
        for (p, page) in image.chunks_exact_mut(PAGE).enumerate() {
            m.read((p * PAGE) as u64, page).unwrap();
        }
        let mut whole = vec![0u8; m.size as usize];
        m.read(0, &mut whole).unwrap();
        assert!(whole == image);
        assert!(
            image == *expected,
            "memory {}: the image is the barrier's",
            m.index
        );
    }
    let second = instance.cow_barrier().unwrap().expect("tracking stays on");
    assert!(
        first.memories[0].read(0, &mut [0u8; PAGE]).is_err(),
        "a later barrier ends the earlier image"
    );
    let mut written_somewhere = false;
    for (m, before) in second.memories.iter().zip(&at_first) {
        let now = instance.memory(m.index as usize).unwrap();
        let written = m.written.as_ref().expect("known since the first barrier");
        let indices = written.indices(m.size);
        written_somewhere |= !indices.is_empty();
        for p in 0..now.len() / PAGE {
            let range = p * PAGE..(p + 1) * PAGE;
            let was = before.get(range.clone());
            if indices.binary_search(&(p as u32)).is_ok() {
                let pre = written.before(p as u32).map(|b| b.to_vec());
                let zero = vec![0u8; PAGE];
                assert_eq!(
                    pre.as_deref().unwrap_or(&zero),
                    was.unwrap_or(&zero),
                    "preimage of page {p}"
                );
            } else {
                assert_eq!(Some(&now[range]), was, "page {p} not reported yet changed");
            }
        }
    }
    assert!(written_somewhere, "the events wrote pages");
}
