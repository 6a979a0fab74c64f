//! Native snapshots of the `ballast` operator at 64 MiB, 256 MiB and 1 GiB
//! of state with 0%, 1%, 10% and 100% of its pages written between two
//! snapshots, beside the physical limits for the same bytes and the
//! canonical format of the same state; then what native snapshots cost
//! `process` calls. Prints the tables of docs/PERFORMANCE.md ("Native
//! snapshots") and a verdict per target.
//!
//! Run: `cargo bench -p memento --bench native` (sizes in MiB via
//! `MEMENTO_BENCH_SIZES`, default `64,256,1024`; repetitions via
//! `MEMENTO_BENCH_REPS`, default 3; the store's directory via
//! `MEMENTO_BENCH_DIR`, default under `CARGO_TARGET_TMPDIR`, the disk of
//! the repository). Every figure is the median of the repetitions.
//!
//! Per size and repetition, in a fresh store: a *full* snapshot (no base),
//! then, each against the previous committed one as a task's `NativeBase`
//! does at a barrier, one after the host wrote one byte in none (0%),
//! every 100th (1%), every 10th (10%) and every (100%) 4 KiB page, spread
//! evenly over the memory. *Pause* is the task's stop (write-protecting the
//! pages written since the previous barrier); *end to end* is capture +
//! persist (read the barrier's image, encode a page delta or hash a full
//! image, write, fsync) + commit, one after the other here, while in a job
//! the task goes on after the pause;
//! *restore* instantiates a fresh instance from the snapshot. *Changed* is
//! the bytes of the 256 KiB chunks holding a written page, counted by the
//! benchmark itself: what the store wrote before page deltas.
//! Canonical rows are `snapshot-state` of the same state, persisted the
//! same way, and `restore-state` into a fresh instance.
//!
//! The limits, per size and repetition: memcpy of the memory into a new
//! buffer (page faults included, as a restore into a fresh memory pays
//! them) and into a pre-faulted one (as a capture copies), blake3 of it on
//! one thread, and writing it to one file in the store's directory with
//! fsync.
//!
//! Last, `process` calls: `wordcount` over the same records with write
//! tracking off and no snapshots, against write tracking on and a native
//! snapshot every 50 batches (only the calls are timed); and a guest loop
//! over 16 MiB on host-owned memories against wasmtime's own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memento::dataflow::source::Generator;
use memento::runtime::{
    Context, Event, HostMemoryCreator, LoadedComponent, PAGE, Runtime, SandboxLimits, TaskInstance,
};
use memento::snapshot::{self, NativeBase};
use memento::spec::SnapshotFormat;
use memento::store::{
    DEFAULT_FIXED_CHUNK as CHUNK, JobName, Manifest, SnapshotKind, StateFormat, Store, StoreOptions, TaskKey,
    TaskState, TenantStore, Trigger,
};

mod common;
use common::{env_list, label, median, ms};

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Room for the state and, for canonical snapshots, its serialized copy.
fn limits() -> SandboxLimits {
    SandboxLimits {
        memory_bytes: 3 << 30,
        call_timeout: Duration::from_secs(600),
        ..SandboxLimits::default()
    }
}

fn opened(rt: &Runtime, component: &Arc<LoadedComponent>, config: &[(&str, String)]) -> TaskInstance {
    let mut instance = rt.instantiate(component, label(), &limits()).unwrap();
    instance
        .open(&Context {
            job: "bench".into(),
            operator_name: "b".into(),
            task_index: 0,
            parallelism: 1,
            key_groups: 1,
            owned: memento::runtime::KeyGroupRange { start: 0, end: 1 },
            config: config.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        })
        .unwrap();
    instance
}

fn fresh_store(dir: &Path, name: &str) -> TenantStore {
    Store::open(&dir.join(name), StoreOptions::default())
        .unwrap()
        .tenant("default")
        .unwrap()
}

/// One snapshot as a task takes it at a barrier and the coordinator
/// commits it: capture through `base` (or canonically), persist, commit,
/// notify the base. Returns the manifest, the pause and the bytes copied
/// in it.
fn snapshot(
    tenant: &TenantStore,
    instance: &mut TaskInstance,
    component: &LoadedComponent,
    base: Option<&NativeBase>,
) -> (Manifest, Duration, u64) {
    let job = JobName::new("bench").unwrap();
    let number = tenant.next_snapshot_number(&job).unwrap();
    let writer = tenant.begin(&job, number).unwrap();
    let captured = match base {
        Some(base) => base.capture(instance, &writer.blob_writer(), 0).unwrap(),
        None => snapshot::capture(instance, SnapshotFormat::Canonical, &writer.blob_writer()).unwrap(),
    };
    let state = snapshot::persist(&captured, &writer.blob_writer()).unwrap();
    let format = if base.is_some() {
        StateFormat::Native
    } else {
        StateFormat::Canonical
    };
    let mut m = writer.manifest(SnapshotKind::Checkpoint, Trigger::Manual, format);
    m.components.insert("b".into(), component.hash_hex());
    m.canonical_framing = Some(snapshot::FRAMING_VERSION);
    m.tasks.push(TaskState {
        key: TaskKey::new("b", 0),
        state,
    });
    let id = writer.commit(m).unwrap();
    if let Some(base) = base {
        base.committed(number);
    }
    (tenant.get(&id).unwrap(), captured.pause, captured.copied_bytes())
}

/// Write one byte in every `step`-th page (a different byte each time, so
/// the memory never returns to an earlier image the store would dedupe);
/// returns the bytes of the chunks touched.
fn write_pages(instance: &mut TaskInstance, step: usize, salt: usize) -> u64 {
    let memory = instance.memory_mut(0).unwrap();
    let mut chunks = BTreeSet::new();
    for page in (0..memory.len() / PAGE).step_by(step) {
        memory[page * PAGE + salt % PAGE] ^= 0x5a;
        chunks.insert(page * PAGE / CHUNK);
    }
    let len = memory.len();
    chunks.iter().map(|c| (len - c * CHUNK).min(CHUNK) as u64).sum()
}

/// Medians of one table row over the repetitions.
#[derive(Default)]
struct Row {
    pause: Vec<Duration>,
    end_to_end: Vec<Duration>,
    copied: Vec<u64>,
    changed: Vec<u64>,
    written: Vec<u64>,
    restore: Vec<Duration>,
}

impl Row {
    fn record(&mut self, pause: Duration, copied: u64, changed: u64, m: &Manifest) {
        self.pause.push(pause);
        self.copied.push(copied);
        self.changed.push(changed);
        self.written.push(m.figures.new_bytes);
    }
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort();
    v[v.len() / 2]
}

struct Limits {
    memcpy: Vec<Duration>,
    memcpy_warm: Vec<Duration>,
    blake3: Vec<Duration>,
    fsync: Vec<Duration>,
}

fn measure_limits(bytes: &[u8], dir: &Path, limits: &mut Limits) {
    let t = Instant::now();
    let copy = bytes.to_vec();
    limits.memcpy.push(t.elapsed());
    let mut warm = memento::runtime::prefaulted_buffer(bytes.len());
    let t = Instant::now();
    warm.extend_from_slice(bytes);
    limits.memcpy_warm.push(t.elapsed());
    drop(warm);
    let t = Instant::now();
    std::hint::black_box(blake3::hash(&copy));
    limits.blake3.push(t.elapsed());
    let path = dir.join("limit");
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut f, &copy).unwrap();
    f.sync_all().unwrap();
    limits.fsync.push(t.elapsed());
    std::fs::remove_file(&path).unwrap();
}

const NATIVE_ROWS: [(&str, Option<usize>); 5] = [
    ("full", None),
    ("0%", Some(0)),
    ("1%", Some(100)),
    ("10%", Some(10)),
    ("100%", Some(1)),
];
const CANONICAL_ROWS: [(&str, Option<usize>); 2] = [("full", None), ("1%", Some(100))];

fn main() {
    let sizes = env_list("MEMENTO_BENCH_SIZES", "64,256,1024");
    let reps = env_list("MEMENTO_BENCH_REPS", "3")[0].max(1) as usize;
    let parent: PathBuf = std::env::var_os("MEMENTO_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&parent).unwrap();
    let rt = Runtime::new().unwrap();
    let ballast = rt
        .load_file(&Path::new(memento_plugins::DIR).join("ballast.wasm"))
        .unwrap();
    println!(
        "native snapshots of ballast, median of {reps} repetitions, store in {}",
        parent.display()
    );

    let mut limit_rows = Vec::new();
    let mut rows = Vec::new();
    let mut verdicts = Vec::new();
    let mut salt = 0;
    for size in sizes {
        let mut instance = opened(&rt, &ballast, &[("state_mib", size.to_string())]);
        let memory = instance.memory_sizes()[0];
        let mut floor = Limits {
            memcpy: vec![],
            memcpy_warm: vec![],
            blake3: vec![],
            fsync: vec![],
        };
        let mut native: Vec<Row> = NATIVE_ROWS.iter().map(|_| Row::default()).collect();
        let mut canonical: Vec<Row> = CANONICAL_ROWS.iter().map(|_| Row::default()).collect();
        for rep in 0..reps {
            let dir = tempfile::tempdir_in(&parent).unwrap();
            measure_limits(instance.memory(0).unwrap(), dir.path(), &mut floor);
            let tenant = fresh_store(dir.path(), "native");
            let base = NativeBase::new();
            for ((_, step), row) in NATIVE_ROWS.iter().zip(&mut native) {
                salt += 1;
                let changed = match step {
                    None => memory,
                    Some(0) => 0,
                    Some(step) => write_pages(&mut instance, *step, salt),
                };
                let t = Instant::now();
                let (m, pause, copied) = snapshot(&tenant, &mut instance, &ballast, Some(&base));
                row.end_to_end.push(t.elapsed());
                let t = Instant::now();
                let restored =
                    snapshot::restore_native(&rt, &ballast, label(), &limits(), &tenant, &m.id, &m.tasks[0])
                        .unwrap();
                row.restore.push(t.elapsed());
                drop(restored);
                row.record(pause, copied, changed, &m);
            }
            eprintln!("  {size} MiB native: repetition {} of {reps} done", rep + 1);
        }
        drop(instance);
        // Canonical on an instance of its own: `snapshot-state` serializes
        // the state inside the guest, which grows the memory that the
        // native rows would then image.
        let mut instance = opened(&rt, &ballast, &[("state_mib", size.to_string())]);
        for rep in 0..reps {
            let dir = tempfile::tempdir_in(&parent).unwrap();
            let tenant = fresh_store(dir.path(), "canonical");
            for ((_, step), row) in CANONICAL_ROWS.iter().zip(&mut canonical) {
                salt += 1;
                let changed = match step {
                    Some(step) => write_pages(&mut instance, *step, salt),
                    None => memory,
                };
                let t = Instant::now();
                let (m, pause, copied) = snapshot(&tenant, &mut instance, &ballast, None);
                row.end_to_end.push(t.elapsed());
                let t = Instant::now();
                let mut fresh = opened(&rt, &ballast, &[("state_mib", "1".into())]);
                snapshot::restore(&mut fresh, &tenant, &m.id, &m.tasks[0]).unwrap();
                row.restore.push(t.elapsed());
                drop(fresh);
                row.record(pause, copied, changed, &m);
            }
            eprintln!("  {size} MiB canonical: repetition {} of {reps} done", rep + 1);
        }
        drop(instance);
        let (memcpy, blake3, fsync) = (median(floor.memcpy), median(floor.blake3), median(floor.fsync));
        let memcpy_warm = median(floor.memcpy_warm);
        limit_rows.push(format!(
            "| {size} MiB ({}) | {} | {} | {} | {} |",
            mib(memory),
            ms(memcpy),
            ms(memcpy_warm),
            ms(blake3),
            ms(fsync)
        ));
        let mut medians = Vec::new();
        for (format, names, table) in [
            ("native", &NATIVE_ROWS[..], native),
            ("canonical", &CANONICAL_ROWS[..], canonical),
        ] {
            for ((what, _), row) in names.iter().zip(table) {
                let m = (
                    median(row.pause),
                    median(row.end_to_end),
                    median_u64(row.copied),
                    median_u64(row.changed),
                    median_u64(row.written),
                    median(row.restore),
                );
                // Changed chunks bound native images; canonical state is
                // cut by content, so the column does not apply.
                let changed = if format == "native" { mib(m.3) } else { "-".into() };
                rows.push(format!(
                    "| {size} MiB | {format} | {what} | {} | {} | {} | {changed} | {} | {} |",
                    ms(m.0),
                    ms(m.1),
                    mib(m.2),
                    mib(m.4),
                    ms(m.5)
                ));
                if format == "native" {
                    medians.push((*what, m));
                }
            }
        }
        let get = |what: &str| medians.iter().find(|(w, _)| *w == what).unwrap().1;
        let worst_bytes = medians
            .iter()
            .filter(|(_, m)| m.3 > 0)
            .map(|(_, m)| m.4 as f64 / m.3 as f64)
            .fold(0.0f64, f64::max);
        let floor = blake3.max(fsync);
        verdicts.push(format!(
            "{size} MiB: pause at 1% {} (target 20 ms at 1 GiB); bytes written / changed chunks, worst row {worst_bytes:.2} \
             (target <= 1.1); full end to end / max(blake3, write+fsync) {:.2} (target <= 1.25); \
             restore (full) / memcpy {:.2} (target <= 2; {:.2} of a pre-faulted memcpy)",
            ms(get("1%").0),
            get("full").1.as_secs_f64() / floor.as_secs_f64(),
            get("full").5.as_secs_f64() / memcpy.as_secs_f64(),
            get("full").5.as_secs_f64() / memcpy_warm.as_secs_f64(),
        ));
    }
    println!(
        "\n| state (memory) | memcpy, fresh buffer | memcpy, pre-faulted | blake3 | write + fsync |\n|---|---|---|---|---|"
    );
    for l in limit_rows {
        println!("{l}");
    }
    println!(
        "\n| state | format | pages written | pause | end to end | copied in pause | changed chunks | written | restore |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        println!("{r}");
    }
    println!();
    for v in verdicts {
        println!("{v}");
    }
    process_calls(&rt);
    guest_loop();
}

/// `process` with native snapshots enabled against without: wordcount over
/// 300,000 records in batches of 1024, rounds alternating, only the calls
/// timed.
fn process_calls(rt: &Runtime) {
    const RECORDS: u64 = 300_000;
    const ROUNDS: usize = 9;
    const EVERY: usize = 50;
    let g = Generator::new(Some(RECORDS), None, 10_000, 1, 1024);
    let events: Vec<Event> = (0..RECORDS).map(|i| g.event(i)).collect();
    let wordcount = rt
        .load_file(&Path::new(memento_plugins::DIR).join("wordcount.wasm"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tenant = Store::open(
        &dir.path().join("state"),
        StoreOptions {
            sync: false,
            ..StoreOptions::default()
        },
    )
    .unwrap()
    .tenant("default")
    .unwrap();
    let round = |native: bool| {
        let mut instance = opened(rt, &wordcount, &[]);
        let base = NativeBase::new();
        if !native {
            instance.disable_write_tracking();
        }
        let mut calls = Duration::ZERO;
        for (i, batch) in events.chunks(1024).enumerate() {
            if native && i % EVERY == 0 {
                snapshot(&tenant, &mut instance, &wordcount, Some(&base));
            }
            let t = Instant::now();
            std::hint::black_box(instance.process(batch).unwrap());
            calls += t.elapsed();
        }
        assert!(
            !native || instance.tracks_writes(),
            "write tracking is unavailable here"
        );
        calls
    };
    let (mut off, mut on, mut ratio) = (vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let a = round(false);
        let b = round(true);
        off.push(a);
        on.push(b);
        ratio.push(b.as_secs_f64() / a.as_secs_f64());
    }
    ratio.sort_by(|a, b| a.total_cmp(b));
    println!(
        "\nprocess calls, wordcount, {RECORDS} records in batches of 1024, median of {ROUNDS} alternating rounds:\n\
         no tracking, no snapshots {}; write tracking + native snapshot every {EVERY} batches {}; \
         ratio {:.3} (min {:.3}, max {:.3})",
        ms(median(off)),
        ms(median(on)),
        ratio[ROUNDS / 2],
        ratio[0],
        ratio[ROUNDS - 1]
    );
}

/// Guest code on host-owned memories against wasmtime's own: a loop of
/// loads and stores over 16 MiB, 20 times, engines alternating.
fn guest_loop() {
    const ROUNDS: usize = 9;
    let wat = r#"(module (memory (export "m") 256)
        (func (export "run") (param $rounds i32)
          (local $i i32)
          (loop $r
            (local.set $i (i32.const 0))
            (loop $l
              (i32.store (local.get $i)
                (i32.add (i32.load (local.get $i)) (local.get $i)))
              (local.set $i (i32.add (local.get $i) (i32.const 4)))
              (br_if $l (i32.lt_u (local.get $i) (i32.const 16777216))))
            (local.set $rounds (i32.sub (local.get $rounds) (i32.const 1)))
            (br_if $r (local.get $rounds)))))"#;
    let engine = |host: bool| {
        let mut config = wasmtime::Config::new();
        if host {
            config.with_host_memory(Arc::new(HostMemoryCreator));
            config.memory_init_cow(false);
        }
        let engine = wasmtime::Engine::new(&config).unwrap();
        let module = wasmtime::Module::new(&engine, wat).unwrap();
        (engine, module)
    };
    let run = |(engine, module): &(wasmtime::Engine, wasmtime::Module)| {
        let mut store = wasmtime::Store::new(engine, ());
        let instance = wasmtime::Instance::new(&mut store, module, &[]).unwrap();
        let f = instance.get_typed_func::<i32, ()>(&mut store, "run").unwrap();
        let t = Instant::now();
        f.call(&mut store, 20).unwrap();
        t.elapsed()
    };
    let (own, host) = (engine(false), engine(true));
    let (mut a, mut b, mut ratio) = (vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let x = run(&own);
        let y = run(&host);
        a.push(x);
        b.push(y);
        ratio.push(y.as_secs_f64() / x.as_secs_f64());
    }
    ratio.sort_by(|a, b| a.total_cmp(b));
    println!(
        "guest loop over 16 MiB x 20, median of {ROUNDS} alternating rounds: wasmtime's memory {}, \
         host-owned memory {}; ratio {:.3} (min {:.3}, max {:.3})",
        ms(median(a)),
        ms(median(b)),
        ratio[ROUNDS / 2],
        ratio[0],
        ratio[ROUNDS - 1]
    );
}
