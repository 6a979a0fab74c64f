//! Embedding memento in your own service, exactly-once end to end: the
//! service keeps its own event log, feeds it to a job through a push
//! source, receives the job's committed output through a callback sink,
//! takes a savepoint -- and survives being killed.
//!
//! ```sh
//! cargo run -p memento --example embed                 # start the service, SIGKILL it, restart it, check
//! cargo run -p memento --example embed -- serve DIR    # the service alone, its state in DIR
//! ```
//!
//! The exactly-once contract, from the service's side:
//! - every batch it pushes carries its offset in the service's log; when the
//!   job resumes from a snapshot, `push` answers `Replay { from }` and the
//!   service pushes again from that offset;
//! - every delivery carries its task and sequence number; the service keeps
//!   each one as a file named by them, written whole, so the one delivery
//!   that can come again after a crash finds its file and is skipped.
//!
//! Threading: [`memento::Job::run`] blocks until the job ends, so it gets
//! the main thread here and the feeder a thread of its own;
//! [`memento::JobControl`], the status handle and the push handle are
//! cheap clones usable from any thread.

use std::error::Error;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use memento::coordinator::JobState;
use memento::io::{CallbackSink, Delivery, DeliveryError, Event, PushError, PushHandle, PushSource};
use memento::spec::{CheckpointSpec, HumanDuration, JobSpec, SinkSpec, SourceSpec};
use memento::store::{JobName, ListFilter};
use memento::{Host, RunOptions, StartFrom};

/// Events in the service's log, and per pushed batch.
const EVENTS: u64 = 60_000;
const BATCH: u64 = 100;

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, dir] if cmd == "serve" => serve(Path::new(dir)),
        [] => demo(),
        _ => Err("usage: embed [serve DIR]".into()),
    }
}

/// Start the service, kill it mid-run, start it again and check that its
/// output log holds exactly one update per event.
fn demo() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let me = std::env::current_exe()?;
    let mut first = Command::new(&me).arg("serve").arg(dir.path()).spawn()?;
    std::thread::sleep(Duration::from_millis(2500));
    first.kill()?; // SIGKILL: no chance to clean up
    println!("demo: killed the service: {}", first.wait()?);
    let status = Command::new(&me).arg("serve").arg(dir.path()).status()?;
    if !status.success() {
        return Err(format!("the restarted service failed: {status}").into());
    }
    let updates = output_lines(&dir.path().join("output"))?;
    println!("demo: {updates} updates delivered for {EVENTS} events");
    if updates != EVENTS {
        return Err("output lost or delivered twice".into());
    }
    Ok(())
}

fn output_lines(dir: &Path) -> Result<u64, Box<dyn Error>> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            n += std::fs::read_to_string(entry.path())?.lines().count() as u64;
        }
    }
    Ok(n)
}

/// The service: its event log, the job over it, its output log.
fn serve(dir: &Path) -> Result<(), Box<dyn Error>> {
    let log = EventLog::open(&dir.join("events.log"))?;
    let output = dir.join("output");
    std::fs::create_dir_all(&output)?;

    // One Host per process: a wasm engine with its component cache and the
    // unified snapshot store.
    let host = Host::open(&dir.join("memento"))?;

    // The job's source is fed by the service; its sink calls the service
    // back with committed output, keeping it in `staged/` until then.
    let (source, feed) = PushSource::new(16);
    let sink = CallbackSink::new(dir.join("staged"), move |d: &Delivery| keep(&output, d));
    let spec = JobSpec::builder("clicks")
        .source(SourceSpec::custom(source))
        .operator("count", Path::new(memento_plugins::DIR).join("wordcount.wasm"), 2)
        .sink(SinkSpec::custom(sink))
        .checkpoints(CheckpointSpec {
            interval: Some(HumanDuration(Duration::from_millis(200))),
            ..CheckpointSpec::default()
        })
        .build()?;
    let job = host.load_job(spec, "acme")?;
    let control = job.control();
    let status = job.status_handle();

    std::thread::spawn(move || feed_from(&log, &feed));
    std::thread::spawn(move || {
        while status.get().state != JobState::Running {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(700));
        // Triggers answer on a channel once the snapshot is committed.
        match control.trigger_savepoint(None).recv() {
            Ok(Ok(id)) => println!("service: savepoint {id} taken"),
            Ok(Err(e)) => println!("service: no savepoint: {e}"),
            Err(_) => {}
        }
    });

    // Resume from the newest snapshot if the service ran before.
    let resume = job.store().latest(&JobName::new("clicks")?)?.is_some();
    let from = if resume {
        StartFrom::Latest
    } else {
        StartFrom::Scratch
    };
    println!("service: starting ({from:?})");
    let report = job.run(RunOptions { from })?;
    println!(
        "service: job ended {:?}: {} records in this run, {} snapshots",
        report.state,
        report.source_records,
        report.snapshots.len()
    );
    for m in job.store().list(&ListFilter::all())? {
        println!("service: stored {} ({:?}, {:?})", m.id, m.kind, m.trigger);
    }
    Ok(())
}

/// The service's own log of events: one key per line, written once.
struct EventLog {
    keys: Vec<String>,
}

impl EventLog {
    fn open(path: &Path) -> Result<EventLog, Box<dyn Error>> {
        if !path.exists() {
            let mut text = String::new();
            for i in 0..EVENTS {
                text.push_str(&format!("user-{}\n", i * 7 % 113));
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, path)?;
        }
        let keys: Vec<String> = std::fs::read_to_string(path)?
            .lines()
            .map(str::to_string)
            .collect();
        Ok(EventLog { keys })
    }

    /// Batch number `offset` of the log.
    fn batch(&self, offset: u64) -> Vec<Event> {
        let start = (offset * BATCH) as usize;
        let end = (start + BATCH as usize).min(self.keys.len());
        (start..end)
            .map(|i| Event {
                key: self.keys[i].clone().into_bytes(),
                value: Vec::new(),
                timestamp: i as i64,
            })
            .collect()
    }

    fn batches(&self) -> u64 {
        (self.keys.len() as u64).div_ceil(BATCH)
    }
}

/// Push the log, paced like live traffic, from wherever the job asks.
fn feed_from(log: &EventLog, feed: &PushHandle) {
    let mut offset = 0;
    loop {
        if offset < log.batches() {
            match feed.push(offset, log.batch(offset)) {
                Ok(()) => offset += 1,
                Err(PushError::Replay { from }) => {
                    println!("service: the job resumed; replaying from offset {from}");
                    offset = from;
                }
                // The job is over and dropped: nothing more to feed.
                Err(PushError::Gone) => return,
            }
            std::thread::sleep(Duration::from_millis(5));
        } else {
            feed.close();
            match feed.replay(Duration::from_millis(200)) {
                Ok(Some(from)) => offset = from,
                Ok(None) => {}
                Err(_) => return,
            }
        }
    }
}

/// Keep a delivery as one file named by its task and sequence number,
/// written whole; one that comes again finds its file and is skipped.
fn keep(output: &Path, d: &Delivery) -> Result<(), DeliveryError> {
    let name: PathBuf = output.join(format!("{:05}-{:06}", d.task, d.seq));
    if name.exists() {
        return Ok(());
    }
    let tmp = output.join(".incoming");
    let mut f = std::fs::File::create(&tmp)?;
    for e in &d.events {
        writeln!(
            f,
            "{}\t{}",
            String::from_utf8_lossy(&e.key),
            String::from_utf8_lossy(&e.value)
        )?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, &name)?;
    std::fs::File::open(output)?.sync_all()?;
    Ok(())
}
