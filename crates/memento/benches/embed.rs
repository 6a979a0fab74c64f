//! The push source's overhead: the same job -- `wordcount`, one task, a
//! null sink, no checkpoints -- over the built-in generator and over a push
//! source fed by a service thread generating the same events, records/s.
//! A third row pushes batches made before the clock starts: the job's
//! rate when the service's own work costs nothing. Beside them, in the
//! same run, the push handle alone (a thread pushing
//! the same batches, another reading them, no job): the most the push
//! source can carry on this machine.
//!
//! Run: `cargo bench -p memento --bench embed` (`MEMENTO_BENCH_RECORDS`,
//! default 1,000,000; `MEMENTO_BENCH_BATCH`, default 1024)
//!
//! Prints medians over several rounds and the push/generator ratio.

use std::path::Path;
use std::time::{Duration, Instant};

use memento::dataflow::source::Generator;
use memento::io::{PushError, PushHandle, PushSource, Source};
use memento::spec::{JobSpec, SinkSpec, SourceSpec};
use memento::{Host, RunOptions};

const ROUNDS: usize = 7;
const KEYS: u64 = 10_000;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn generator(records: u64, batch: u64) -> Generator {
    Generator::new(Some(records), None, KEYS, 1, batch as usize)
}

/// Push the generator's events in batches, as a service would.
fn feed(handle: &PushHandle, records: u64, batch: u64) {
    let g = generator(records, batch);
    let mut offset = 0;
    while offset * batch < records {
        let start = offset * batch;
        let events = (start..(start + batch).min(records))
            .map(|i| g.event(i))
            .collect();
        match handle.push(offset, events) {
            Ok(()) => offset += 1,
            Err(PushError::Replay { from }) => offset = from,
            Err(PushError::Gone) => return,
        }
    }
    handle.close();
}

/// Push batches made before the clock started: the push source's own cost,
/// without the service's work of making events.
fn feed_made(handle: &PushHandle, batches: Vec<Vec<memento::io::Event>>) {
    for (offset, events) in batches.into_iter().enumerate() {
        if let Err(e) = handle.push(offset as u64, events) {
            panic!("no restore in a benchmark: {e}");
        }
    }
    handle.close();
}

fn made(records: u64, batch: u64) -> Vec<Vec<memento::io::Event>> {
    let g = generator(records, batch);
    (0..records.div_ceil(batch))
        .map(|b| {
            (b * batch..((b + 1) * batch).min(records))
                .map(|i| g.event(i))
                .collect()
        })
        .collect()
}

enum Feeder {
    None,
    Generating(PushHandle, u64, u64),
    Made(PushHandle, Vec<Vec<memento::io::Event>>),
}

fn job_round(host: &Host, source: SourceSpec, feeder: Feeder) -> Duration {
    let spec = JobSpec::builder("bench")
        .source(source)
        .operator("count", Path::new(memento_plugins::DIR).join("wordcount.wasm"), 1)
        .sink(SinkSpec::Null {})
        .build()
        .unwrap();
    let job = host.load_job(spec, "default").unwrap();
    let started = Instant::now();
    let feeding = match feeder {
        Feeder::None => None,
        Feeder::Generating(h, records, batch) => Some(std::thread::spawn(move || feed(&h, records, batch))),
        Feeder::Made(h, batches) => Some(std::thread::spawn(move || feed_made(&h, batches))),
    };
    job.run(RunOptions::default()).unwrap();
    let elapsed = started.elapsed();
    if let Some(f) = feeding {
        f.join().unwrap();
    }
    elapsed
}

/// The handle alone: push on one thread, read on this one.
fn handle_round(records: u64, batch: u64) -> Duration {
    let (source, handle) = PushSource::new(4);
    let mut reader = source.open().unwrap();
    let started = Instant::now();
    let feeder = std::thread::spawn(move || feed(&handle, records, batch));
    let mut n = 0u64;
    while let Some(b) = reader.next_batch().unwrap() {
        n += b.len() as u64;
    }
    feeder.join().unwrap();
    assert_eq!(n, records);
    started.elapsed()
}

fn main() {
    let records = env("MEMENTO_BENCH_RECORDS", 1_000_000);
    let batch = env("MEMENTO_BENCH_BATCH", 1024);
    let state = tempfile::tempdir().unwrap();
    let host = Host::open(state.path()).unwrap();
    let rate = |d: Duration| records as f64 / d.as_secs_f64();
    let (mut gen_rates, mut push_rates, mut made_rates, mut handle_rates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Interleaved, so that a noisy neighbour costs both sides alike.
    for _ in 0..ROUNDS {
        let g = SourceSpec::Generator {
            count: Some(records),
            rate: None,
            keys: KEYS,
            seed: 1,
            batch: batch as usize,
        };
        gen_rates.push(rate(job_round(&host, g, Feeder::None)));
        let (source, handle) = PushSource::new(4);
        push_rates.push(rate(job_round(
            &host,
            SourceSpec::custom(source),
            Feeder::Generating(handle, records, batch),
        )));
        let (source, handle) = PushSource::new(4);
        let batches = made(records, batch);
        made_rates.push(rate(job_round(
            &host,
            SourceSpec::custom(source),
            Feeder::Made(handle, batches),
        )));
        handle_rates.push(rate(handle_round(records, batch)));
    }
    let (g, p, m, h) = (
        median(gen_rates),
        median(push_rates),
        median(made_rates),
        median(handle_rates),
    );
    println!(
        "push source vs generator: {records} records, batch {batch}, wordcount x1, null sink, {ROUNDS} rounds"
    );
    println!("| source | records/s (median) | ratio to generator |");
    println!("|---|---:|---:|");
    println!("| generator (job) | {:.0} | 1.00 |", g);
    println!(
        "| push source, service making events (job) | {:.0} | {:.2} |",
        p,
        p / g
    );
    println!(
        "| push source, events made beforehand (job) | {:.0} | {:.2} |",
        m,
        m / g
    );
    println!("| push handle alone (no job) | {:.0} | {:.2} |", h, h / g);
}
