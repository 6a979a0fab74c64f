//! Checkpoint cost under random updates, the workload of the side-by-side
//! measurement with Flink 2.3 (docs/PERFORMANCE.md, "Checkpoints under
//! random updates"): an operator holding 64 MiB, 256 MiB and 1 GiB of
//! state, 10,000 updates of a 100-byte value per second at uniformly random
//! places, a checkpoint every 5 s — so 50,000 updates between two
//! checkpoints.
//!
//! The operator is `ballast` with `value_bytes = 100` and one changed page
//! per event: each event overwrites one 100-byte slot of a random page of
//! its state, in the guest. Per size: a first (full) checkpoint, then
//! `MEMENTO_BENCH_ROUNDS` (default 5) steady rounds of 50,000 events and a
//! checkpoint through the task's `NativeBase`, each committed and the
//! previous one deleted (retained = 1), as a job does. Then a savepoint
//! right after the last checkpoint, a restore through the chain against a
//! restore of a full image of the same state, the store's size after GC
//! against the state's, and the events' processing time with write
//! tracking on (the first write to a page after a barrier faults) against
//! off.
//!
//! Figures per checkpoint: *pause* (the task stopped: protecting the pages
//! written since the previous barrier), *end to end* (capture, reading the
//! barrier's image and writing the delta, commit; one after the other here,
//! while in a job the task goes on after the pause), *written* (bytes the
//! checkpoint added to the store, compressed as stored) and *changed* (the
//! bytes the events changed: 100 per distinct slot). Medians over the
//! rounds. Flink's figures are those measured on this machine for the same
//! workload (RocksDB, incremental checkpoints).
//!
//! Run: `cargo bench -p memento --bench deltas` (sizes in MiB via
//! `MEMENTO_BENCH_SIZES`, default `64,256,1024`; the store under
//! `MEMENTO_BENCH_DIR`, default `CARGO_TARGET_TMPDIR`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memento::runtime::{Context, Event, LoadedComponent, PAGE, Runtime, SandboxLimits, TaskInstance};
use memento::snapshot::{self, NativeBase};
use memento::store::{
    JobName, Manifest, SnapshotKind, StateFormat, Store, StoreOptions, TaskKey, TaskState, TaskStateData,
    TenantStore, Trigger,
};

mod common;
use common::{env_list, label, median, ms};

const EVENTS_PER_CHECKPOINT: u64 = 50_000;
const BATCH: u64 = 1_000;
const VALUE: u64 = 100;

/// Flink 2.3, RocksDB incremental checkpoints, same workload and machine:
/// (MiB written per checkpoint, duration ms, synchronous phase ms), as
/// ranges over the three sizes.
const FLINK: &str = "5.5-5.8 MiB written, 116-150 ms end to end, 79-118 ms synchronous";

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1 << 20) as f64)
}

fn limits() -> SandboxLimits {
    SandboxLimits {
        memory_bytes: 3 << 30,
        call_timeout: Duration::from_secs(600),
        ..SandboxLimits::default()
    }
}

fn opened(rt: &Runtime, component: &Arc<LoadedComponent>, state_mib: u64) -> TaskInstance {
    let pages = state_mib * (1 << 20) / PAGE as u64;
    let config = [
        ("state_mib", state_mib.to_string()),
        // One changed page per event.
        ("dirty_fraction", format!("{:e}", 1.0 / pages as f64)),
        ("value_bytes", VALUE.to_string()),
    ];
    let mut instance = rt.instantiate(component, label(), &limits()).unwrap();
    instance
        .open(&Context {
            job: "bench".into(),
            operator_name: "b".into(),
            task_index: 0,
            parallelism: 1,
            config: config.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            key_groups: 1,
            owned: memento::runtime::KeyGroupRange { start: 0, end: 1 },
        })
        .unwrap();
    instance
}

/// A checkpoint as a task takes it and the coordinator commits it; the
/// pause, the end-to-end time and the manifest.
fn checkpoint(
    tenant: &TenantStore,
    instance: &mut TaskInstance,
    component: &LoadedComponent,
    base: &NativeBase,
    kind: SnapshotKind,
) -> (Manifest, Duration, Duration) {
    let started = Instant::now();
    let job = JobName::new("bench").unwrap();
    let number = tenant.next_snapshot_number(&job).unwrap();
    let writer = tenant.begin(&job, number).unwrap();
    let captured = base.capture(instance, &writer.blob_writer(), 0).unwrap();
    let state = snapshot::persist(&captured, &writer.blob_writer()).unwrap();
    let mut m = writer.manifest(kind, Trigger::Manual, StateFormat::Native);
    m.components.insert("b".into(), component.hash_hex());
    m.tasks.push(TaskState {
        key: TaskKey::new("b", 0),
        state,
    });
    let id = writer.commit(m).unwrap();
    base.committed(number);
    let e2e = started.elapsed();
    (tenant.get(&id).unwrap(), captured.pause, e2e)
}

/// Process `n` events in batches; the time spent in `process`.
fn process(instance: &mut TaskInstance, from: u64, n: u64) -> Duration {
    let mut spent = Duration::ZERO;
    for start in (from..from + n).step_by(BATCH as usize) {
        let events: Vec<Event> = (start..start + BATCH)
            .map(|i| Event {
                key: format!("k{}", i % 1024).into_bytes(),
                value: Vec::new(),
                timestamp: i as i64,
            })
            .collect();
        let t = Instant::now();
        instance.process(&events).unwrap();
        spent += t.elapsed();
    }
    spent
}

/// The bytes that differ between two images, and the 4 KiB pages they
/// lie in: what the events changed, the bound for what a checkpoint must
/// write (the operator's data is not page aligned in the guest's memory,
/// so a 100-byte value may straddle two pages).
fn changed(before: &[u8], after: &[u8]) -> (u64, u64) {
    let (mut bytes, mut pages) = (0u64, 0u64);
    for (a, b) in before.chunks(PAGE).zip(after.chunks(PAGE)) {
        if a != b {
            pages += 1;
            bytes += a.iter().zip(b).filter(|(x, y)| x != y).count() as u64;
        }
    }
    (bytes, pages)
}

fn median_bytes(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn chain_len(m: &Manifest) -> usize {
    match &m.tasks[0].state {
        TaskStateData::Native { memories, .. } => memories.iter().map(|i| i.deltas.len()).max().unwrap_or(0),
        TaskStateData::Canonical { .. } => 0,
    }
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_size(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn restore_time(
    rt: &Runtime,
    component: &Arc<LoadedComponent>,
    tenant: &TenantStore,
    m: &Manifest,
) -> Duration {
    let times: Vec<Duration> = (0..3)
        .map(|_| {
            let t = Instant::now();
            let instance =
                snapshot::restore_native(rt, component, label(), &limits(), tenant, &m.id, &m.tasks[0])
                    .unwrap();
            let d = t.elapsed();
            drop(instance);
            d
        })
        .collect();
    median(times)
}

fn main() {
    let sizes = env_list("MEMENTO_BENCH_SIZES", "64,256,1024");
    let rounds = env_list("MEMENTO_BENCH_ROUNDS", "5")[0].max(1) as usize;
    let root = std::env::var_os("MEMENTO_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-deltas"));
    let rt = Runtime::new().unwrap();
    let ballast = rt
        .load_file(&Path::new(memento_plugins::DIR).join("ballast.wasm"))
        .unwrap();
    println!(
        "checkpoints under random updates: {EVENTS_PER_CHECKPOINT} updates of {VALUE} bytes between checkpoints"
    );
    println!("Flink 2.3 on the same work: {FLINK}\n");
    for &size in &sizes {
        let _ = std::fs::remove_dir_all(&root);
        let store_dir = root.join("store");
        let tenant = Store::open(&store_dir, StoreOptions::default())
            .unwrap()
            .tenant("default")
            .unwrap();
        let mut instance = opened(&rt, &ballast, size);
        let base = NativeBase::new();
        let (first, first_pause, first_e2e) =
            checkpoint(&tenant, &mut instance, &ballast, &base, SnapshotKind::Checkpoint);
        if !instance.tracks_writes() {
            println!("{size} MiB: copy-on-write tracking unavailable on this kernel; nothing to measure");
            continue;
        }
        let state = instance.memory_sizes()[0];
        let first_written = first.figures.stored_bytes;
        let mut previous = first;
        let (mut pauses, mut e2es, mut written, mut changes, mut processing, mut chains) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for r in 0..rounds {
            let before = instance.memory(0).unwrap().to_vec();
            processing.push(process(
                &mut instance,
                r as u64 * EVENTS_PER_CHECKPOINT,
                EVENTS_PER_CHECKPOINT,
            ));
            changes.push(changed(&before, instance.memory(0).unwrap()));
            drop(before);
            let (m, pause, e2e) =
                checkpoint(&tenant, &mut instance, &ballast, &base, SnapshotKind::Checkpoint);
            pauses.push(pause);
            e2es.push(e2e);
            written.push(m.figures.stored_bytes);
            chains.push(chain_len(&m));
            tenant.delete(&previous.id).unwrap();
            previous = m;
        }
        let (savepoint, _, _) = checkpoint(&tenant, &mut instance, &ballast, &base, SnapshotKind::Savepoint);
        let savepoint_bytes = savepoint.figures.stored_bytes;
        tenant.delete(&savepoint.id).unwrap();
        tenant.gc().unwrap();
        let space = dir_size(&store_dir.join("tenants"));
        let chained = restore_time(&rt, &ballast, &tenant, &previous);
        let full_base = NativeBase::new();
        let mut fresh = snapshot::restore_native(
            &rt,
            &ballast,
            label(),
            &limits(),
            &tenant,
            &previous.id,
            &previous.tasks[0],
        )
        .unwrap();
        fresh.disable_write_tracking();
        let (full, _, _) = checkpoint(
            &tenant,
            &mut fresh,
            &ballast,
            &full_base,
            SnapshotKind::Checkpoint,
        );
        assert_eq!(chain_len(&full), 0);
        let full_restore = restore_time(&rt, &ballast, &tenant, &full);
        drop(fresh);
        instance.disable_write_tracking();
        let untracked = process(&mut instance, 1 << 40, EVENTS_PER_CHECKPOINT);
        let tracked = median(processing);
        // Steady checkpoints extend a chain; the others close one with a
        // full image. Both reported: the median of the steady ones, and the
        // mean over all rounds (what the disk sees over time).
        let steady: Vec<u64> = written
            .iter()
            .zip(&chains)
            .filter(|(_, c)| **c > 0)
            .map(|(w, _)| *w)
            .collect();
        let written_median = median_bytes(if steady.is_empty() {
            written.clone()
        } else {
            steady.clone()
        });
        let written_mean = written.iter().sum::<u64>() / written.len() as u64;
        let changed_median = median_bytes(changes.iter().map(|c| c.0).collect());
        let pages_median = median_bytes(changes.iter().map(|c| c.1).collect());
        println!(
            "{size} MiB of state ({} memory), first checkpoint {} in {} (pause {}):",
            mib(state),
            mib(first_written),
            ms(first_e2e),
            ms(first_pause)
        );
        println!(
            "  steady checkpoint ({} of {rounds} extended a chain, chains {chains:?}): written {} for {} changed in {} pages: \
             {:.2}x the changed bytes, {:.1} bytes a page beyond them; end to end {}, pause {}",
            steady.len(),
            mib(written_median),
            mib(changed_median),
            pages_median,
            written_median as f64 / changed_median.max(1) as f64,
            (written_median as f64 - changed_median as f64) / pages_median.max(1) as f64,
            ms(median(e2es)),
            ms(median(pauses)),
        );
        println!(
            "  mean over all {rounds} checkpoints (full images that close chains included): {}",
            mib(written_mean)
        );
        println!(
            "  savepoint right after: {} written ({:.3}% of the state)",
            mib(savepoint_bytes),
            savepoint_bytes as f64 * 100.0 / state as f64
        );
        println!(
            "  restore through the chain {} vs a full image {}: ratio {:.2}",
            ms(chained),
            ms(full_restore),
            chained.as_secs_f64() / full_restore.as_secs_f64()
        );
        println!(
            "  store after GC with retained = 1: {} = {:.2}x the state",
            mib(space),
            space as f64 / state as f64
        );
        println!(
            "  {EVENTS_PER_CHECKPOINT} events: {} with tracking, {} without: {:.2}x",
            ms(tracked),
            ms(untracked),
            tracked.as_secs_f64() / untracked.as_secs_f64()
        );
    }
}
