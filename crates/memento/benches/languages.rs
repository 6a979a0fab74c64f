//! One operator — the keyed running count — in Rust (`plugins/wordcount`),
//! Python (`plugins/python-wordcount`) and JavaScript
//! (`plugins/js-wordcount`): how long a task takes to start, compiling the
//! component or loading it from the on-disk cache, and records/s through
//! `process`, beside the same Rust logic compiled natively.
//!
//! Run: `cargo bench -p memento --bench languages`
//! (`MEMENTO_BENCH_FIRST_ROUNDS`, default 3: a first start compiles for
//! 10–40 s; cached starts and throughput use 7 rounds).
//!
//! A start is what a new `memento run` or a resume pays before the first
//! record: a new engine (`Runtime`, as in a new process), `load_file`
//! (compile, or read + verify + deserialize the cache entry), instantiate
//! and `open`. Its physical floor printed beside it is reading the entry
//! file and hashing it with blake3 (what loading from the cache cannot
//! avoid). The Python and JavaScript operators need their tools at build
//! time (see the README); without them their rows say "not built".

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memento::dataflow::source::Generator;
use memento::runtime::{Context, Event, Runtime, RuntimeOptions, SandboxLimits, TaskInstance, TaskLabel};
use memento_guest::{Operator, Output};

mod common;
use common::median;

const RECORDS: u64 = 200_000;
const KEYS: u64 = 10_000;
const BATCH: usize = 256;
const ROUNDS: usize = 7;

fn runtime(cache: &Path) -> Runtime {
    Runtime::with_options(RuntimeOptions {
        cache_dir: Some(cache.to_path_buf()),
        ..RuntimeOptions::default()
    })
    .unwrap()
}

/// New engine, load, instantiate, open: a task's start.
fn start(cache: &Path, component: &Path) -> (Duration, TaskInstance, Runtime) {
    let started = Instant::now();
    let rt = runtime(cache);
    let loaded = rt.load_file(component).unwrap();
    let label = TaskLabel {
        job: "bench".into(),
        operator: "count".into(),
        task: 0,
    };
    let mut task = rt.instantiate(&loaded, label, &SandboxLimits::default()).unwrap();
    task.open(&Context {
        job: "bench".into(),
        operator_name: "count".into(),
        task_index: 0,
        parallelism: 1,
        config: vec![],
        key_groups: 1,
        owned: memento::runtime::KeyGroupRange { start: 0, end: 1 },
    })
    .unwrap();
    (started.elapsed(), task, rt)
}

fn entry(cache: &Path) -> PathBuf {
    std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("a cache entry")
}

fn events() -> Vec<Event> {
    let g = Generator::new(Some(RECORDS), None, KEYS, 1, 1024);
    (0..RECORDS).map(|i| g.event(i)).collect()
}

fn wasm_rate(task: &mut TaskInstance, events: &[Event]) -> f64 {
    let started = Instant::now();
    let mut emitted = 0usize;
    for chunk in events.chunks(BATCH) {
        emitted += std::hint::black_box(task.process(chunk).unwrap()).len();
    }
    assert_eq!(emitted as u64, RECORDS);
    RECORDS as f64 / started.elapsed().as_secs_f64()
}

fn native_rate(events: &[Event]) -> f64 {
    let ctx = memento_guest::Context::for_test([]);
    let mut op = wordcount::WordCount::open(&ctx).unwrap();
    let started = Instant::now();
    let mut emitted = 0usize;
    for chunk in events.chunks(BATCH) {
        let mut out = Output::new();
        for e in chunk {
            op.process_ref(
                memento_guest::EventRef {
                    key: &e.key,
                    value: &e.value,
                    timestamp: e.timestamp,
                },
                &mut out,
            )
            .unwrap();
        }
        emitted += std::hint::black_box(&out).len();
    }
    assert_eq!(emitted as u64, RECORDS);
    RECORDS as f64 / started.elapsed().as_secs_f64()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let first_rounds: usize = std::env::var("MEMENTO_BENCH_FIRST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let operators = [
        ("rust", Ok(memento_plugins::path("wordcount"))),
        ("python", memento_plugins::interpreted("python-wordcount")),
        ("javascript", memento_plugins::interpreted("js-wordcount")),
    ];
    let events = events();
    println!(
        "keyed count: start of one task (median of {first_rounds} first / {ROUNDS} cached), \
         records/s through `process` ({RECORDS} records, {KEYS} keys, batches of {BATCH}, median of {ROUNDS})"
    );
    println!(
        "{:<11} {:>9} {:>12} {:>12} {:>9} {:>14} {:>12} {:>13} {:>9}",
        "operator",
        "component",
        "first start",
        "cached start",
        "speed-up",
        "floor (read+",
        "records/s",
        "native Rust",
        "of native"
    );
    println!(
        "{:<11} {:>9} {:>12} {:>12} {:>9} {:>14} {:>12} {:>13} {:>9}",
        "", "", "", "", "", "blake3 entry)", "", "records/s", ""
    );
    for (name, path) in operators {
        let path = match path {
            Ok(p) => p,
            Err(why) => {
                println!("{name:<11} not built: {why}");
                continue;
            }
        };
        let size = std::fs::metadata(&path).unwrap().len();
        let mut first = Vec::new();
        for _ in 0..first_rounds {
            let cache = tempfile::tempdir().unwrap();
            first.push(start(cache.path(), &path).0);
        }
        let cache = tempfile::tempdir().unwrap();
        start(cache.path(), &path);
        let entry = entry(cache.path());
        let (mut cached, mut floor, mut rates, mut natives) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let bytes = std::fs::read(&entry).unwrap();
            std::hint::black_box(blake3::hash(&bytes));
            floor.push(t.elapsed());
            let (took, mut task, _rt) = start(cache.path(), &path);
            cached.push(took);
            rates.push(wasm_rate(&mut task, &events));
            natives.push(native_rate(&events));
        }
        let entry_mib = std::fs::metadata(&entry).unwrap().len() as f64 / f64::from(1 << 20);
        let (first, cached) = (median(first), median(cached));
        let ratio = |v: &[f64], n: &[f64]| {
            let mut r: Vec<f64> = v.iter().zip(n).map(|(a, b)| a / b).collect();
            r.sort_by(|a, b| a.partial_cmp(b).unwrap());
            r[r.len() / 2]
        };
        let of_native = ratio(&rates, &natives);
        let mid = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        println!(
            "{name:<11} {:>6.1} MB {:>12} {:>12} {:>8.0}x {:>14} {:>12.0} {:>13.0} {:>8.1}%",
            size as f64 / 1e6,
            ms(first),
            ms(cached),
            first.as_secs_f64() / cached.as_secs_f64(),
            format!("{} ({entry_mib:.0} MiB)", ms(median(floor))),
            mid(rates),
            mid(natives),
            100.0 * of_native
        );
    }
}
