//! Throughput of the `wordcount` operator through Wasm versus the same Rust
//! code compiled natively, with small records at batch sizes 1, 64 and 1024.
//!
//! Run: `cargo bench -p memento --bench throughput` (batch sizes via
//! `MEMENTO_BENCH_BATCHES`, default `1,64,1024`)
//!
//! Prints records/s medians over several rounds and the Wasm/native ratio.
//! The native side is the plugin crate itself, linked as an rlib, so both
//! sides run identical operator code; the Wasm side includes everything a
//! task pays per batch (lowering the batch into the guest, the call, lifting
//! the output).

use std::path::Path;
use std::time::{Duration, Instant};

use memento::dataflow::source::Generator;
use memento::runtime::{Context, Event, Runtime, SandboxLimits, TaskLabel};
use memento_guest::{Operator, Output};

const RECORDS: u64 = 300_000;
const KEYS: u64 = 10_000;
const ROUNDS: usize = 9;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn events() -> Vec<Event> {
    let g = Generator::new(Some(RECORDS), None, KEYS, 1, 1024);
    (0..RECORDS).map(|i| g.event(i)).collect()
}

fn native_round(events: &[Event], batch: usize) -> Duration {
    let ctx = memento_guest::Context::for_test([]);
    let mut op = wordcount::WordCount::open(&ctx).unwrap();
    let started = Instant::now();
    let mut emitted = 0usize;
    for chunk in events.chunks(batch) {
        // Same shape as the guest: events borrowed from their batch in, the
        // SDK's packed output out (handed over as is; the guest returns it
        // to the host the same way).
        let mut out = Output::new();
        for e in chunk {
            let e = memento_guest::EventRef {
                key: &e.key,
                value: &e.value,
                timestamp: e.timestamp,
            };
            op.process_ref(e, &mut out).unwrap();
        }
        emitted += std::hint::black_box(&out).len();
    }
    assert_eq!(emitted as u64, RECORDS);
    started.elapsed()
}

fn wasm_round(runtime: &Runtime, events: &[Event], batch: usize) -> Duration {
    let component = runtime
        .load_file(&Path::new(memento_plugins::DIR).join("wordcount.wasm"))
        .unwrap();
    let label = TaskLabel {
        job: "bench".into(),
        operator: "count".into(),
        task: 0,
    };
    let mut task = runtime
        .instantiate(&component, label, &SandboxLimits::default())
        .unwrap();
    task.open(&Context {
        job: "bench".into(),
        operator_name: "count".into(),
        task_index: 0,
        parallelism: 1,
        key_groups: 1,
        owned: memento::runtime::KeyGroupRange { start: 0, end: 1 },
        config: vec![],
    })
    .unwrap();
    let started = Instant::now();
    let mut emitted = 0usize;
    for chunk in events.chunks(batch) {
        emitted += std::hint::black_box(task.process(chunk).unwrap()).len();
    }
    assert_eq!(emitted as u64, RECORDS);
    started.elapsed()
}

fn main() {
    let events = events();
    let runtime = Runtime::new().unwrap();
    println!("wordcount, {RECORDS} records over {KEYS} keys, median of {ROUNDS} rounds");
    println!("(native and wasm alternate within each round; the ratio is the median of per-round ratios)");
    println!(
        "{:>6} {:>16} {:>16} {:>11}",
        "batch", "native rec/s", "wasm rec/s", "wasm/native"
    );
    let batches: Vec<usize> = std::env::var("MEMENTO_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,64,1024".into())
        .split(',')
        .map(|s| s.trim().parse().expect("MEMENTO_BENCH_BATCHES: batch sizes"))
        .collect();
    for batch in batches {
        let (mut native, mut wasm, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            // Alternating keeps both sides under the same background load,
            // which on a shared machine drifts more than the effect measured.
            let n = RECORDS as f64 / native_round(&events, batch).as_secs_f64();
            let w = RECORDS as f64 / wasm_round(&runtime, &events, batch).as_secs_f64();
            native.push(n);
            wasm.push(w);
            ratio.push(w / n);
        }
        println!(
            "{batch:>6} {:>16.0} {:>16.0} {:>10.1}%",
            median(native),
            median(wasm),
            100.0 * median(ratio)
        );
    }
}
