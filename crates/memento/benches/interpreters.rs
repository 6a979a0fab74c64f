//! Native snapshots of interpreters: the keyed running count in Python
//! (`plugins/python-wordcount`) and JavaScript (`plugins/js-wordcount`),
//! whose core modules keep mutable globals that the host reaches through
//! load-time instrumentation (`crates/runtime/src/instrument.rs`).
//!
//! Run: `cargo bench -p memento --bench interpreters` (rounds via
//! `MEMENTO_BENCH_ROUNDS`, default 7; `MEMENTO_BENCH_OPERATORS`, default
//! `python,javascript`, picks the rows). Needs the Python and JavaScript
//! examples built (see the README); without them their rows say so.
//!
//! Two tables:
//!
//! * **The zero-cost rule**: records/s through `process` (200,000 records,
//!   10,000 keys, batches of 256) of the instrumented component against the
//!   same component loaded with `RuntimeOptions::instrument_globals` off,
//!   alternating in each round; the ratio is the median of per-round ratios
//!   (1.00 = no difference); and what instrumenting adds to a cached
//!   start: `load_file` in a new runtime from a warm disk cache, both ways.
//! * **Native checkpoints**: a task that processed 50,000 records takes
//!   native checkpoints as at a barrier (through its `NativeBase`:
//!   copy-on-write, page deltas against the last committed one), with 20
//!   batches of 256 records between two; *pause* is the task's stop
//!   (barrier, globals read included), *globals* the part of it reading
//!   the globals, *new bytes* what the checkpoint wrote to the store
//!   (uncompressed) and *memory* the size of the image. The first
//!   checkpoint, a full image, is reported apart. Beside them, the
//!   canonical checkpoint of the same state (`snapshot-state`), pause and
//!   bytes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memento::dataflow::source::Generator;
use memento::runtime::{
    Context, Event, KeyGroupRange, LoadedComponent, Runtime, RuntimeOptions, SandboxLimits, TaskInstance,
};
use memento::snapshot::{self, NativeBase};
use memento::spec::SnapshotFormat;
use memento::store::{
    JobName, Manifest, SnapshotKind, StateFormat, Store, StoreOptions, TaskKey, TaskState, TenantStore,
    Trigger,
};

mod common;
use common::{label, median, ms};

const RECORDS: u64 = 200_000;
const KEYS: u64 = 10_000;
const BATCH: usize = 256;
const WARM: u64 = 50_000;
const BETWEEN: usize = 20;
const CHECKPOINTS: usize = 10;

fn rounds() -> usize {
    std::env::var("MEMENTO_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7)
}

fn runtime(cache: &Path, instrument: bool) -> Runtime {
    Runtime::with_options(RuntimeOptions {
        cache_dir: Some(cache.to_path_buf()),
        instrument_globals: instrument,
        ..RuntimeOptions::default()
    })
    .unwrap()
}

fn limits() -> SandboxLimits {
    SandboxLimits {
        memory_bytes: 1 << 30,
        call_timeout: Duration::from_secs(600),
        ..SandboxLimits::default()
    }
}

fn opened(rt: &Runtime, component: &Arc<LoadedComponent>) -> TaskInstance {
    let mut task = rt.instantiate(component, label(), &limits()).unwrap();
    task.open(&Context {
        job: "bench".into(),
        operator_name: "count".into(),
        task_index: 0,
        parallelism: 1,
        config: vec![],
        key_groups: 1,
        owned: KeyGroupRange { start: 0, end: 1 },
    })
    .unwrap();
    task
}

fn events(n: u64) -> Vec<Event> {
    let g = Generator::new(Some(n), None, KEYS, 1, 1024);
    (0..n).map(|i| g.event(i)).collect()
}

fn rate(task: &mut TaskInstance, events: &[Event]) -> f64 {
    let started = Instant::now();
    for chunk in events.chunks(BATCH) {
        std::hint::black_box(task.process(chunk).unwrap());
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

fn mid(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn kib(bytes: f64) -> String {
    if bytes >= f64::from(1 << 20) {
        format!("{:.2} MiB", bytes / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", bytes / 1024.0)
    }
}

/// One checkpoint as a task takes it and the coordinator commits it.
fn checkpoint(
    tenant: &TenantStore,
    task: &mut TaskInstance,
    component: &LoadedComponent,
    base: Option<&NativeBase>,
) -> (Manifest, Duration) {
    let job = JobName::new("bench").unwrap();
    let number = tenant.next_snapshot_number(&job).unwrap();
    let writer = tenant.begin(&job, number).unwrap();
    let captured = match base {
        Some(base) => base.capture(task, &writer.blob_writer(), 0).unwrap(),
        None => snapshot::capture(task, SnapshotFormat::Canonical, &writer.blob_writer()).unwrap(),
    };
    let state = snapshot::persist(&captured, &writer.blob_writer()).unwrap();
    let format = match base {
        Some(_) => StateFormat::Native,
        None => StateFormat::Canonical,
    };
    let mut m = writer.manifest(SnapshotKind::Checkpoint, Trigger::Manual, format);
    m.components.insert("count".into(), component.hash_hex());
    m.canonical_framing = Some(snapshot::FRAMING_VERSION);
    m.tasks.push(TaskState {
        key: TaskKey::new("count", 0),
        state,
    });
    let id = writer.commit(m).unwrap();
    if let Some(base) = base {
        base.committed(number);
    }
    (tenant.get(&id).unwrap(), captured.pause)
}

fn zero_cost(name: &str, path: &Path, cache: &Path, events: &[Event]) {
    let on = runtime(cache, true);
    let off = runtime(cache, false);
    let (with, without) = (on.load_file(path).unwrap(), off.load_file(path).unwrap());
    let globals = with.native_globals().map_or(0, |l| l.len());
    assert!(globals > 0, "{name}: instrumented");
    assert!(without.native_support().is_err(), "{name}: not instrumented");
    let (mut a, mut b, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds() {
        // Alternate which goes first: neither always gets the warmer CPU.
        let (x, y) = if round % 2 == 0 {
            let x = rate(&mut opened(&on, &with), events);
            (x, rate(&mut opened(&off, &without), events))
        } else {
            let y = rate(&mut opened(&off, &without), events);
            (rate(&mut opened(&on, &with), events), y)
        };
        a.push(x);
        b.push(y);
        ratios.push(x / y);
    }
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
    // What instrumenting costs a cached start: `load_file` in a new
    // runtime from the warm disk cache (scan, instrument, hash, map).
    let (mut load_on, mut load_off) = (Vec::new(), Vec::new());
    for _ in 0..rounds() {
        for (instrument, into) in [(true, &mut load_on), (false, &mut load_off)] {
            let rt = runtime(cache, instrument);
            let t = Instant::now();
            std::hint::black_box(rt.load_file(path).unwrap());
            into.push(t.elapsed());
        }
    }
    println!(
        "{name:<11} {globals:>8} {:>14.0} {:>14.0} {:>8.3} {:>15} {:>12} {:>12}",
        mid(a),
        mid(b),
        mid(ratios),
        format!("{lo:.3}–{hi:.3}"),
        ms(median(load_on)),
        ms(median(load_off))
    );
}

fn checkpoints(name: &str, path: &Path, cache: &Path) {
    let rt = runtime(cache, true);
    let component = rt.load_file(path).unwrap();
    let all = events(WARM + (BETWEEN * BATCH * (CHECKPOINTS + 1)) as u64);
    let (warm, rest) = all.split_at(WARM as usize);
    let dir = tempfile::tempdir().unwrap();
    let tenant = Store::open(&dir.path().join("state"), StoreOptions::default())
        .unwrap()
        .tenant("default")
        .unwrap();
    let mut task = opened(&rt, &component);
    for chunk in warm.chunks(BATCH) {
        task.process(chunk).unwrap();
    }
    let base = NativeBase::new();
    let mut batches = rest.chunks(BATCH);
    let (first, first_pause) = checkpoint(&tenant, &mut task, &component, Some(&base));
    let (mut pauses, mut globals, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..CHECKPOINTS {
        for chunk in batches.by_ref().take(BETWEEN) {
            task.process(chunk).unwrap();
        }
        let (m, pause) = checkpoint(&tenant, &mut task, &component, Some(&base));
        pauses.push(pause);
        bytes.push(m.figures.new_bytes as f64);
        // The globals' share of the pause, timed alone right after.
        let t = Instant::now();
        std::hint::black_box(task.capture_globals().unwrap());
        globals.push(t.elapsed());
    }
    let memory: u64 = task.memory_sizes().iter().sum();
    let (canonical, canonical_pause) = checkpoint(&tenant, &mut task, &component, None);
    println!(
        "{name:<11} {:>10} {:>12} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12}",
        kib(memory as f64),
        ms(first_pause),
        kib(first.figures.new_bytes as f64),
        ms(median(pauses)),
        format!("{:.3} ms", median(globals).as_secs_f64() * 1e3),
        kib(mid(bytes)),
        ms(canonical_pause),
        kib(canonical.figures.new_bytes as f64),
    );
}

fn main() {
    let wanted = std::env::var("MEMENTO_BENCH_OPERATORS").unwrap_or_else(|_| "python,javascript".into());
    let operators: Vec<_> = [("python", "python-wordcount"), ("javascript", "js-wordcount")]
        .into_iter()
        .filter(|(name, _)| wanted.split(',').any(|w| w.trim() == *name))
        .map(|(name, example)| (name, memento_plugins::interpreted(example)))
        .collect();
    // One cache for the run: each component compiles once per variant.
    let cache = tempfile::tempdir().unwrap();
    let events = events(RECORDS);
    println!(
        "zero-cost rule: records/s through `process`, instrumented vs not ({RECORDS} records, {KEYS} keys, \
         batches of {BATCH}, median of {} rounds)",
        rounds()
    );
    println!(
        "{:<11} {:>8} {:>14} {:>14} {:>8} {:>15} {:>12} {:>12}",
        "operator",
        "globals",
        "instrumented",
        "uninstrumented",
        "ratio",
        "ratio range",
        "cached load",
        "uninstr."
    );
    for (name, path) in &operators {
        match path {
            Ok(p) => zero_cost(name, p, cache.path(), &events),
            Err(why) => println!("{name:<11} not built: {why}"),
        }
    }
    println!();
    println!(
        "native checkpoints after {WARM} records, {BETWEEN} batches of {BATCH} between two \
         (median of {CHECKPOINTS}; the first, a full image, apart); canonical of the same state"
    );
    println!(
        "{:<11} {:>10} {:>12} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "operator",
        "memory",
        "first pause",
        "first new",
        "pause",
        "of it globals",
        "new bytes",
        "canon. pause",
        "canon. bytes"
    );
    for (name, path) in &operators {
        match path {
            Ok(p) => checkpoints(name, p, cache.path()),
            Err(why) => println!("{name:<11} not built: {why}"),
        }
    }
}
