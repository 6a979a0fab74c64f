//! Sources and sinks: where a job's events come from and where its output
//! goes. The built-in ones (`file` and `generator` sources; `file`,
//! `stdout` and `null` sinks, chosen by the job file) and an embedder's own
//! are the same traits, driven by the same coordinator.
//!
//! # The exactly-once contract
//!
//! A [`Source`] opens a [`SourceReader`] for every attempt of a job. The
//! coordinator records the reader's [`SourceReader::position`] in every
//! snapshot at the barrier, and an attempt that restores a snapshot first
//! [`SourceReader::seek`]s back to it: the input after the position is read
//! again, the input before it never. A source that cannot go back says so
//! ([`Source::can_seek`]); a job over it that asks for periodic checkpoints
//! or savepoints is refused when it is loaded, and a manual snapshot of it
//! is refused when triggered.
//!
//! A [`Sink`] is two-phase. Each task of the last operator writes through
//! its [`SinkWriter`]; at a barrier the writer *pre-commits*: what it wrote
//! becomes durable but stays invisible, and the writer returns a
//! [`SinkCommit`] naming it, which the coordinator records in the
//! snapshot's manifest. Only once the manifest is durable does the
//! coordinator call [`Sink::commit`], which makes it visible. After a crash
//! or a failure, [`Sink::recover`] brings the output to the snapshot the
//! next attempt restores: it redoes that snapshot's commit (which the crash
//! may have cut short) and aborts -- discards -- every pre-committed unit
//! the snapshot does not list. Both must be idempotent: either may be
//! interrupted and run again.
//!
//! # For services: the push source and the callback sink
//!
//! [`PushSource`] lets a service hand a running job its own events through
//! a bounded [`PushHandle`] that blocks when the job falls behind. Each
//! batch carries the service's offset for it (its queue's sequence number,
//! increasing). Every snapshot records the offset after the last batch it
//! covers; when a job restores one, the handle's next `push` answers
//! [`PushError::Replay`] with that offset, and the service pushes again
//! from there (batches below it are dropped, so replaying from further back
//! is harmless). [`CallbackSink`] delivers each task's committed output to
//! the service once the snapshot covering it is durable, keeping it in
//! files of its own until then, so a crash between the two loses nothing.
//! Each [`Delivery`] carries its task and sequence number; the only
//! delivery that can come twice is one whose callback had returned when the
//! process died and was not yet marked delivered, with the same task and
//! sequence number, so a service that stores the highest sequence number
//! per task with the output it derives from it sees every delivery exactly
//! once. Resuming from a snapshot older than the newest rewinds the output,
//! as the file sink does: the service drops what it kept from deliveries
//! of later snapshots ([`Delivery::snapshot`]), whose sequence numbers
//! come again.
//!
//! `push` is the push source, `callback` the callback sink; the built-in
//! file and generator sources and file, stdout and null sinks live in
//! [`crate::dataflow::source`] and [`crate::dataflow::sink`].

mod callback;
mod push;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::runtime::Event;
use crate::store::SnapshotId;

pub use callback::{CallbackSink, Delivery, DeliveryError};
pub use push::{PushError, PushHandle, PushSource};

/// A job's source: opens a reader for every attempt of the job.
pub trait Source: Send + Sync {
    /// What the source is, for messages ("push source", "file in.txt").
    fn describe(&self) -> String;

    /// Whether its readers can [`SourceReader::seek`] back to a recorded
    /// position. A source that cannot refuses checkpoints and savepoints:
    /// restoring one would lose or repeat input.
    fn can_seek(&self) -> bool {
        true
    }

    /// A reader positioned at the start of the input; an attempt that
    /// restores a snapshot seeks it before reading.
    ///
    /// # Errors
    /// [`SourceError`] naming the input that cannot be opened.
    fn open(&self) -> Result<Box<dyn SourceReader>, SourceError>;
}

/// Reads one attempt's input on the source thread.
pub trait SourceReader: Send {
    /// The next batch, or `None` at the end of a bounded input. An empty
    /// batch means "nothing yet": a reader that waits returns one now and
    /// then (every 50 ms or so), so that the source thread can take
    /// barriers, stop and cancel.
    ///
    /// # Errors
    /// [`SourceError`] naming the input and the record that could not be read.
    fn next_batch(&mut self) -> Result<Option<Vec<Event>>, SourceError>;

    /// The position to resume from: everything before it has been returned
    /// by [`SourceReader::next_batch`], nothing after it.
    fn position(&self) -> u64;

    /// Go to `position` (a value [`SourceReader::position`] returned,
    /// possibly in another process), so that the next batch starts there.
    ///
    /// # Errors
    /// When the input ends before `position`, cannot be read, or the
    /// source cannot seek ([`SourceError::CannotSeek`]).
    fn seek(&mut self, position: u64) -> Result<(), SourceError>;
}

/// A job's sink: a writer per task of the last operator, and the commit
/// and recovery of what they pre-committed. See the module docs for the
/// protocol.
pub trait Sink: Send + Sync {
    /// What the sink is, for messages.
    fn describe(&self) -> String;

    /// The writer of sink task `task`, numbering its pre-committed units
    /// from `next_seq` (what [`Sink::recover`] returned for it, else 0).
    ///
    /// # Errors
    /// When the output cannot be created; the message names it.
    fn writer(&self, task: u32, next_seq: u64) -> Result<Box<dyn SinkWriter>, SinkError>;

    /// Snapshot `snapshot`'s manifest is durable: make what `commits`
    /// lists visible. Idempotent: a unit already committed is skipped.
    ///
    /// # Errors
    /// [`SinkError`] naming the output; the job then follows its restart
    /// strategy, and the next attempt's [`Sink::recover`] commits again.
    fn commit(&self, snapshot: &SnapshotId, commits: &[SinkCommit]) -> Result<(), SinkError>;

    /// Before an attempt: with `Some((snapshot, commits))`, redo the commit
    /// of the snapshot the attempt restores and discard every other
    /// pre-committed unit (and, where the sink can, output committed after
    /// that snapshot); with `None`, start over (the output of earlier runs
    /// goes). Returns each task's next sequence number. Idempotent.
    ///
    /// # Errors
    /// [`SinkError`] naming the output.
    fn recover(
        &self,
        restored: Option<(&SnapshotId, &[SinkCommit])>,
    ) -> Result<BTreeMap<u32, u64>, SinkError>;

    /// Check a commit record read from a manifest before anything acts on
    /// it (the store is input too). The default accepts unit names that
    /// are plain file names; sinks that name files stricter still.
    ///
    /// # Errors
    /// The reason, one line.
    fn check(&self, commit: &SinkCommit) -> Result<(), String> {
        for name in &commit.files {
            if name.is_empty()
                || name.len() > 255
                || name.starts_with('.')
                || name.contains(['/', '\\', '\0'])
            {
                let shown: String = name.chars().take(80).collect();
                return Err(format!("{shown:?} is not a plain unit name"));
            }
        }
        Ok(())
    }

    /// The job finished and its last output is committed: tidy up.
    fn finished(&self) {}
}

/// Writes one sink task's output.
pub trait SinkWriter: Send {
    /// Write a batch of events (invisible until committed).
    ///
    /// # Errors
    /// [`SinkError`], naming the output.
    fn write(&mut self, events: &[Event]) -> Result<(), SinkError>;

    /// Barrier `snapshot` passes: make what was written so far durable and
    /// return what to commit when the snapshot completes (`None` for sinks
    /// that are not transactional). The list includes units pre-committed
    /// for earlier snapshots not known to be committed yet, so a failed
    /// snapshot loses no output.
    ///
    /// # Errors
    /// [`SinkError`], naming the output.
    fn precommit(&mut self, snapshot: u64) -> Result<Option<SinkCommit>, SinkError>;

    /// Snapshot `snapshot` completed: its units are committed and need not
    /// be listed again.
    fn committed(&mut self, snapshot: u64) {
        let _ = snapshot;
    }
}

/// What one sink task pre-committed at a barrier: recorded in the snapshot
/// manifest, applied when the snapshot completes or is restored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkCommit {
    /// The sink task (= task index of the last operator).
    pub task: u32,
    /// Sequence number of the task's next unit.
    pub next_seq: u64,
    /// The pre-committed units to make visible, by name (the built-in
    /// sinks' part files, `part-TTTTT-SSSSSS`).
    pub files: Vec<String>,
}

/// A source or sink given by the embedder rather than the job file, held
/// in [`crate::spec::SourceSpec::Custom`] or
/// [`crate::spec::SinkSpec::Custom`]. Cloning shares it.
pub struct Custom<T: ?Sized>(pub Arc<T>);

impl<T: ?Sized> Clone for Custom<T> {
    fn clone(&self) -> Self {
        Custom(self.0.clone())
    }
}

impl<T: ?Sized> PartialEq for Custom<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for Custom<dyn Source> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Custom({})", self.0.describe())
    }
}

impl fmt::Debug for Custom<dyn Sink> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Custom({})", self.0.describe())
    }
}

/// An embedder's own error, carried through [`SourceError::Other`] or
/// [`SinkError::Other`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a source failed, naming the input and the record.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The input file cannot be opened.
    #[error("cannot open source file {}: {source}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The input file cannot be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A record does not parse.
    #[error("{}:{line}: {reason}", .path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// Its line (from 1).
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A line is longer than the most a record may be.
    #[error("{}:{line}: the line is longer than {max} bytes, the most a record may be", .path.display())]
    LongLine {
        /// The file.
        path: PathBuf,
        /// Its line (from 1).
        line: u64,
        /// The limit.
        max: usize,
    },
    /// The input is shorter than a snapshot's position: it changed since.
    #[error(
        "{} has {lines} lines, fewer than the snapshot's position {position} (did the input change?)",
        .path.display()
    )]
    Shorter {
        /// The file.
        path: PathBuf,
        /// Its lines.
        lines: u64,
        /// The position to resume from.
        position: u64,
    },
    /// A snapshot's position is past the generator's count.
    #[error("generator position {position} is past its count {count}")]
    PastCount {
        /// The position to resume from.
        position: u64,
        /// The generator's count.
        count: u64,
    },
    /// The source cannot go back to a snapshot's position.
    #[error("{source_name} cannot seek, so it cannot resume from a snapshot")]
    CannotSeek {
        /// The source ([`Source::describe`]).
        source_name: String,
    },
    /// An embedder's source failed.
    #[error("{source_name}: {error}")]
    Other {
        /// The source ([`Source::describe`]).
        source_name: String,
        /// Why.
        error: BoxError,
    },
}

/// Why a sink failed, naming the output.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A file or directory of a sink.
    #[error("{action} {}: {source}", .path.display())]
    Io {
        /// What failed, e.g. "cannot write".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Standard output.
    #[error("cannot write to stdout: {0}")]
    Stdout(#[source] io::Error),
    /// A snapshot's record of what to commit is not what this sink writes.
    #[error("snapshot {snapshot}: its sink commit is damaged: {reason}")]
    BadCommit {
        /// The snapshot whose manifest holds it.
        snapshot: SnapshotId,
        /// What is wrong.
        reason: String,
    },
    /// A pre-committed file of the callback sink is not what it wrote.
    #[error("{}: pre-committed output is damaged: {reason}", .path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The service's callback refused a delivery; it comes again after the
    /// restart.
    #[error("delivery of task {task}'s output #{seq} failed: {error}")]
    Delivery {
        /// The sink task.
        task: u32,
        /// The delivery's sequence number.
        seq: u64,
        /// The callback's error.
        error: DeliveryError,
    },
    /// An embedder's sink failed.
    #[error("{sink_name}: {error}")]
    Other {
        /// The sink ([`Sink::describe`]).
        sink_name: String,
        /// Why.
        error: BoxError,
    },
}

impl SinkError {
    /// A closure turning an I/O error into [`SinkError::Io`] for `path`.
    pub fn io(action: &'static str, path: &std::path::Path) -> impl FnOnce(io::Error) -> SinkError {
        let path = path.to_path_buf();
        move |source| SinkError::Io { action, path, source }
    }
}

/// The name of a pre-committed part file: task and sequence number,
/// sortable.
pub fn part_file_name(task: u32, seq: u64) -> String {
    format!("part-{task:05}-{seq:06}")
}

/// Task and sequence number of a part file name.
pub fn parse_part_file_name(name: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix("part-")?;
    let (task, seq) = rest.split_once('-')?;
    if !(task.bytes().all(|b| b.is_ascii_digit()) && seq.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    Some((task.parse().ok()?, seq.parse().ok()?))
}

/// The check of sinks whose units are part files: each name a part file
/// of the commit's own task, so a crafted one (`../../x`) cannot move a
/// file outside the output.
///
/// # Errors
/// The reason, naming the first bad entry.
pub fn check_part_files(commit: &SinkCommit) -> Result<(), String> {
    for name in &commit.files {
        if parse_part_file_name(name).is_none_or(|(task, _)| task != commit.task) {
            let shown: String = name.chars().take(80).collect();
            return Err(format!(
                "{shown:?} is not a part file of sink task {}",
                commit.task
            ));
        }
    }
    Ok(())
}
