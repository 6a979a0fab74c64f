//! The library's extension points for embedders, through the public API:
//! a custom source that cannot seek is refused for checkpointed jobs, and a
//! custom sink whose commit fails makes the job restart and lose nothing.
//! (SIGKILLs of an embedding service: `tests/embed_kill.rs`.)

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use memento::dataflow::sink::FileSink;
use memento::io::{Event, Sink, SinkCommit, SinkError, SinkWriter, Source, SourceError, SourceReader};
use memento::spec::{
    CheckpointSpec, HumanDuration, JobSpec, RestartSpec, RestartStrategy, SinkSpec, SourceSpec,
};
use memento::store::SnapshotId;
use memento::{Host, HostError, RunOptions};

fn wordcount() -> std::path::PathBuf {
    memento_plugins::path("wordcount")
}

fn every(ms: u64) -> CheckpointSpec {
    CheckpointSpec {
        interval: Some(HumanDuration(Duration::from_millis(ms))),
        ..CheckpointSpec::default()
    }
}

/// A source over a socket-like stream: it cannot go back.
struct Firehose;

struct FirehoseReader {
    sent: u64,
}

impl Source for Firehose {
    fn describe(&self) -> String {
        "firehose".into()
    }
    fn can_seek(&self) -> bool {
        false
    }
    fn open(&self) -> Result<Box<dyn SourceReader>, SourceError> {
        Ok(Box::new(FirehoseReader { sent: 0 }))
    }
}

impl SourceReader for FirehoseReader {
    fn next_batch(&mut self) -> Result<Option<Vec<Event>>, SourceError> {
        if self.sent == 100 {
            return Ok(None);
        }
        // Slow enough that a trigger finds the job running.
        std::thread::sleep(Duration::from_millis(20));
        self.sent += 1;
        Ok(Some(vec![Event {
            key: b"k".to_vec(),
            value: Vec::new(),
            timestamp: self.sent as i64,
        }]))
    }
    fn position(&self) -> u64 {
        self.sent
    }
    fn seek(&mut self, _position: u64) -> Result<(), SourceError> {
        Err(SourceError::CannotSeek {
            source_name: "firehose".into(),
        })
    }
}

#[test]
fn a_source_that_cannot_seek_is_refused_for_checkpointed_jobs() {
    let state = tempfile::tempdir().unwrap();
    let host = Host::open(state.path()).unwrap();
    let job = |checkpoints| {
        JobSpec::builder("firehose")
            .source(SourceSpec::custom(Firehose))
            .operator("count", wordcount(), 1)
            .sink(SinkSpec::Null {})
            .checkpoints(checkpoints)
            .build()
            .unwrap()
    };
    let e = host
        .load_job(job(every(100)), "default")
        .err()
        .expect("a checkpointed job over a source that cannot seek is refused");
    assert!(matches!(e, HostError::SourceCannotSeek { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "job `firehose`: its firehose cannot seek, so it cannot take exactly-once snapshots; \
         remove [checkpoints] interval or give the job a source that can seek"
    );

    // Without periodic snapshots it runs, and a manual one is refused.
    let job = host.load_job(job(CheckpointSpec::default()), "default").unwrap();
    let control = job.control();
    let status = job.status_handle();
    let report = std::thread::scope(|s| {
        let run = s.spawn(|| job.run(RunOptions::default()));
        while status.get().state != memento::coordinator::JobState::Running {
            std::thread::sleep(Duration::from_millis(5));
        }
        let e = control
            .trigger_checkpoint()
            .recv()
            .unwrap()
            .expect_err("a snapshot of a job whose source cannot seek was taken");
        assert_eq!(
            e.to_string(),
            "firehose cannot seek, so a snapshot of this job could not be restored"
        );
        run.join().unwrap().unwrap()
    });
    assert_eq!(report.source_records, 100);
    assert!(report.snapshots.is_empty());
    // Its end-of-input record is a snapshot too: no run starts from it.
    let e = job
        .run(RunOptions {
            from: memento::StartFrom::Latest,
        })
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "source: firehose cannot seek, so it cannot resume from a snapshot"
    );
}

/// The file sink, whose commit fails the first `failures` times.
struct FlakyCommit {
    inner: FileSink,
    failures: AtomicU32,
}

impl Sink for FlakyCommit {
    fn describe(&self) -> String {
        "flaky sink".into()
    }
    fn writer(&self, task: u32, next_seq: u64) -> Result<Box<dyn SinkWriter>, SinkError> {
        self.inner.writer(task, next_seq)
    }
    fn commit(&self, snapshot: &SnapshotId, commits: &[SinkCommit]) -> Result<(), SinkError> {
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SinkError::Other {
                sink_name: self.describe(),
                error: "the output store is down".into(),
            });
        }
        self.inner.commit(snapshot, commits)
    }
    fn recover(
        &self,
        restored: Option<(&SnapshotId, &[SinkCommit])>,
    ) -> Result<BTreeMap<u32, u64>, SinkError> {
        self.inner.recover(restored)
    }
    fn check(&self, commit: &SinkCommit) -> Result<(), String> {
        self.inner.check(commit)
    }
    fn finished(&self) {
        self.inner.finished();
    }
}

fn lines(dir: &Path) -> Vec<String> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with("part-") {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            all.extend(text.lines().map(str::to_string));
        }
    }
    all.sort();
    all
}

#[test]
fn a_sink_whose_commit_fails_restarts_the_job_and_loses_nothing() {
    let generator = || SourceSpec::Generator {
        count: Some(20_000),
        rate: Some(20_000.0),
        keys: 50,
        seed: 3,
        batch: 200,
    };
    let state = tempfile::tempdir().unwrap();
    let host = Host::open(state.path()).unwrap();

    let plain_out = state.path().join("plain");
    let plain = JobSpec::builder("plain")
        .source(generator())
        .operator("count", wordcount(), 2)
        .sink(SinkSpec::File {
            path: plain_out.clone(),
        })
        .build()
        .unwrap();
    host.load_job(plain, "default")
        .unwrap()
        .run(RunOptions::default())
        .unwrap();
    let expected = lines(&plain_out);
    assert_eq!(expected.len(), 20_000);

    let flaky_out = state.path().join("flaky");
    let sink = FlakyCommit {
        inner: FileSink::new(&flaky_out),
        failures: AtomicU32::new(3),
    };
    let sink = Arc::new(sink);
    let spec = JobSpec::builder("flaky")
        .source(generator())
        .operator("count", wordcount(), 2)
        .sink(SinkSpec::Custom(memento::io::Custom(sink.clone())))
        .checkpoints(every(50))
        .restart(RestartSpec {
            strategy: RestartStrategy::Fixed,
            attempts: 10,
            delay: HumanDuration(Duration::from_millis(10)),
            ..RestartSpec::default()
        })
        .build()
        .unwrap();
    let report = host
        .load_job(spec, "default")
        .unwrap()
        .run(RunOptions::default())
        .unwrap();
    assert_eq!(sink.failures.load(Ordering::SeqCst), 0, "every failure was met");
    assert_eq!(report.restarts, 3, "one restart per failed commit");
    assert!(
        lines(&flaky_out) == expected,
        "the same output as without failures"
    );
}
