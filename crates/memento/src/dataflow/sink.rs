//! The built-in sinks, `file`, `stdout` and `null`, on the public
//! [`crate::io::Sink`] traits, and the sink a job spec names (built-in or
//! the embedder's own). One writer per task of the last operator.
//!
//! The `file` sink is transactional, which is what makes output
//! exactly-once: a task writes into a staging file
//! (`<dir>/.staging/part-TTTTT-SSSSSS`), which is flushed and fsynced when a
//! snapshot barrier passes the task (pre-commit) and becomes visible under
//! its final name (`<dir>/part-TTTTT-SSSSSS`, by rename) only after that
//! snapshot is complete. On restore, the pre-committed files of the restored
//! snapshot are committed (idempotently) and every other staged file is
//! discarded. `stdout` and `null` are not transactional.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::io::{Sink, SinkCommit, SinkError, SinkWriter, part_file_name};
use crate::io::{check_part_files, parse_part_file_name};
use crate::runtime::Event;
use crate::spec::SinkSpec;
use crate::store::{Manifest, SnapshotId};

mod s3;

/// Name of the directory, inside a `file` sink's directory, of staged files.
pub const STAGING_DIR: &str = ".staging";

/// The sink commits a snapshot's manifest records, each checked by the
/// sink that will act on it ([`Sink::check`]): the names come from the
/// store, and a crafted one (`../../x`) must not move a file outside the
/// output directory.
///
/// # Errors
/// [`SinkError::BadCommit`] naming the snapshot and the first bad entry.
pub fn commits_of(m: &Manifest, sink: &dyn Sink) -> Result<Vec<SinkCommit>, SinkError> {
    let bad = |reason: String| SinkError::BadCommit {
        snapshot: m.id.clone(),
        reason,
    };
    let Some(tasks) = m.sink_commit.get("tasks") else {
        return Ok(Vec::new());
    };
    let commits: Vec<SinkCommit> = serde_json::from_value(tasks.clone()).map_err(|e| bad(e.to_string()))?;
    for c in &commits {
        sink.check(c).map_err(bad)?;
    }
    Ok(commits)
}

fn sink_dir(path: &Path, base: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// The sink a job spec names: a built-in one (relative paths resolve
/// against `base`) or the embedder's own.
pub fn of(spec: &SinkSpec, base: &Path) -> Arc<dyn Sink> {
    match spec {
        SinkSpec::File { path } if s3::is_s3(path) => Arc::new(s3::S3FileSink::new(path)),
        SinkSpec::File { path } => Arc::new(FileSink {
            dir: sink_dir(path, base),
        }),
        SinkSpec::Stdout {} => Arc::new(StdoutSink),
        SinkSpec::Null {} => Arc::new(NullSink),
        SinkSpec::Custom(custom) => custom.0.clone(),
    }
}

/// The `file` sink: a directory of part files, staged until committed.
pub struct FileSink {
    dir: PathBuf,
}

impl FileSink {
    /// A file sink writing into `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> FileSink {
        FileSink { dir: dir.into() }
    }

    /// As [`Sink::commit`], for the files snapshot `snapshot` lists when a
    /// run resumes from it. Returns the files it warned about: those
    /// neither staged nor committed in a directory that has staged output
    /// (the job ran here and they are gone). A directory without staged
    /// output is new, emptied or moved: the snapshot's output was committed
    /// where it was written, and nothing is missing.
    ///
    /// # Errors
    /// I/O errors, naming the file.
    pub fn commit_restored(
        &self,
        snapshot: &SnapshotId,
        commits: &[SinkCommit],
    ) -> Result<Vec<String>, SinkError> {
        let dir = &self.dir;
        let staged_here = dir.join(STAGING_DIR).is_dir();
        let missing = commit_files(dir, commits)?;
        if missing.is_empty() {
            return Ok(missing);
        }
        if !staged_here {
            tracing::info!(
                target: "memento::sink",
                "{} holds no staged output: resuming from {snapshot} into a new or emptied directory; \
                 the output committed up to {snapshot} stays where it was written",
                dir.display()
            );
            return Ok(Vec::new());
        }
        for name in &missing {
            warn_missing(dir, name);
        }
        Ok(missing)
    }
}

impl Sink for FileSink {
    fn describe(&self) -> String {
        format!("file sink {}", self.dir.display())
    }

    fn writer(&self, task: u32, next_seq: u64) -> Result<Box<dyn SinkWriter>, SinkError> {
        let staging = self.dir.join(STAGING_DIR);
        std::fs::create_dir_all(&staging).map_err(SinkError::io("cannot create sink directory", &staging))?;
        Ok(Box::new(FileWriter {
            dir: self.dir.clone(),
            task,
            seq: next_seq,
            current: None,
            pending: Vec::new(),
            line: Vec::new(),
        }))
    }

    /// Make the part files listed in `commits` visible after their
    /// snapshot completed: rename each staged file to its final name, then
    /// fsync the directory. Idempotent: a file already moved is skipped, so
    /// a commit interrupted by a crash can be redone. A file neither staged
    /// nor committed was removed behind the job's back: a warning names it.
    fn commit(&self, _snapshot: &SnapshotId, commits: &[SinkCommit]) -> Result<(), SinkError> {
        for name in commit_files(&self.dir, commits)? {
            warn_missing(&self.dir, &name);
        }
        Ok(())
    }

    /// Bring the directory to the state of a snapshot before a run: commit
    /// its pre-committed files (see [`FileSink::commit_restored`]), discard
    /// every other staged file, and return each task's next part number.
    /// Starting without a snapshot (`None`) removes the part files of
    /// earlier runs.
    fn recover(
        &self,
        restored: Option<(&SnapshotId, &[SinkCommit])>,
    ) -> Result<BTreeMap<u32, u64>, SinkError> {
        let dir = &self.dir;
        let mut next = BTreeMap::new();
        match restored {
            Some((snapshot, commits)) => {
                self.commit_restored(snapshot, commits)?;
                for c in commits {
                    next.insert(c.task, c.next_seq);
                }
                // Output committed after the snapshot (when resuming from an
                // older one) is rewound: the run will write it again. A missing
                // directory (the output was moved away) has nothing to rewind;
                // the run creates it.
                let entries = match std::fs::read_dir(dir) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                    listed => listed
                        .and_then(|l| l.collect::<Result<Vec<_>, _>>())
                        .map_err(SinkError::io("cannot list", dir))?,
                };
                for entry in entries {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if let Some((task, seq)) = parse_part_file_name(&name)
                        && next.get(&task).is_some_and(|n| seq >= *n)
                    {
                        std::fs::remove_file(entry.path())
                            .map_err(SinkError::io("cannot remove", &entry.path()))?;
                    }
                }
            }
            None if dir.exists() => {
                for entry in std::fs::read_dir(dir).map_err(SinkError::io("cannot list", dir))? {
                    let entry = entry.map_err(SinkError::io("cannot list", dir))?;
                    if entry.file_name().to_string_lossy().starts_with("part-") {
                        std::fs::remove_file(entry.path())
                            .map_err(SinkError::io("cannot remove", &entry.path()))?;
                    }
                }
            }
            None => {}
        }
        let staging = dir.join(STAGING_DIR);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(SinkError::io("cannot clean", &staging))?;
        }
        Ok(next)
    }

    fn check(&self, commit: &SinkCommit) -> Result<(), String> {
        check_part_files(commit)
    }

    /// Remove the staging directory once a job has finished (it is empty
    /// then).
    fn finished(&self) {
        let _ = std::fs::remove_dir(self.dir.join(STAGING_DIR));
    }
}

fn warn_missing(dir: &Path, name: &str) {
    tracing::warn!(
        target: "memento::sink",
        file = %dir.join(name).display(),
        "pre-committed output is missing; it cannot be committed"
    );
}

/// Rename the staged files of `commits` in `dir` to their final names;
/// returns the files neither staged nor committed.
fn commit_files(dir: &Path, commits: &[SinkCommit]) -> Result<Vec<String>, SinkError> {
    let mut renamed = false;
    let mut missing = Vec::new();
    for c in commits {
        for name in &c.files {
            // Checked where commits are read (`commits_of`); again here, as
            // the last line before a rename.
            if parse_part_file_name(name).is_none() {
                return Err(SinkError::io("refusing to commit", &dir.join(STAGING_DIR))(
                    io::Error::new(io::ErrorKind::InvalidInput, "a name that is not a part file"),
                ));
            }
            let staged = dir.join(STAGING_DIR).join(name);
            let target = dir.join(name);
            match std::fs::rename(&staged, &target) {
                Ok(()) => renamed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound && target.exists() => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(name.clone()),
                Err(e) => return Err(SinkError::io("cannot commit", &staged)(e)),
            }
        }
    }
    if renamed {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(SinkError::io("cannot sync", dir))?;
    }
    Ok(missing)
}

/// Append one output line: key, a tab, value, a newline. Bytes that are not
/// UTF-8 become `\xNN`; backslash, tab, CR and LF are escaped so that every
/// event is exactly one line.
pub fn format_line(event: &Event, out: &mut Vec<u8>) {
    escape(&event.key, out);
    out.push(b'\t');
    escape(&event.value, out);
    out.push(b'\n');
}

fn escape(bytes: &[u8], out: &mut Vec<u8>) {
    for chunk in bytes.utf8_chunks() {
        for &b in chunk.valid().as_bytes() {
            match b {
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                _ => out.push(b),
            }
        }
        for &b in chunk.invalid() {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
    }
}

/// One task's writer of a `file` sink.
struct FileWriter {
    dir: PathBuf,
    task: u32,
    /// Sequence number of the file being written (or to be written next).
    seq: u64,
    /// The open staging file, created at the first write after a barrier so
    /// that quiet intervals leave no empty files.
    current: Option<(BufWriter<File>, PathBuf)>,
    /// Pre-committed files not yet known committed: (snapshot, name).
    pending: Vec<(u64, String)>,
    line: Vec<u8>,
}

impl SinkWriter for FileWriter {
    fn write(&mut self, events: &[Event]) -> Result<(), SinkError> {
        self.line.clear();
        for e in events {
            format_line(e, &mut self.line);
        }
        if self.current.is_none() {
            let path = self
                .dir
                .join(STAGING_DIR)
                .join(part_file_name(self.task, self.seq));
            let file = File::create(&path).map_err(SinkError::io("cannot create", &path))?;
            self.current = Some((BufWriter::with_capacity(1 << 16, file), path));
        }
        let (out, path) = self.current.as_mut().expect("just opened");
        out.write_all(&self.line)
            .map_err(SinkError::io("cannot write", path))
    }

    fn precommit(&mut self, snapshot: u64) -> Result<Option<SinkCommit>, SinkError> {
        if let Some((mut out, path)) = self.current.take() {
            out.flush().map_err(SinkError::io("cannot write", &path))?;
            out.get_ref()
                .sync_all()
                .map_err(SinkError::io("cannot write", &path))?;
            self.pending.push((snapshot, part_file_name(self.task, self.seq)));
            self.seq += 1;
        }
        Ok(Some(SinkCommit {
            task: self.task,
            next_seq: self.seq,
            files: self.pending.iter().map(|(_, f)| f.clone()).collect(),
        }))
    }

    fn committed(&mut self, snapshot: u64) {
        self.pending.retain(|(s, _)| *s > snapshot);
    }
}

/// The `stdout` sink: lines as they come, not transactional.
struct StdoutSink;

impl Sink for StdoutSink {
    fn describe(&self) -> String {
        "stdout".into()
    }
    fn writer(&self, _task: u32, _next_seq: u64) -> Result<Box<dyn SinkWriter>, SinkError> {
        Ok(Box::new(StdoutWriter { line: Vec::new() }))
    }
    fn commit(&self, _snapshot: &SnapshotId, _commits: &[SinkCommit]) -> Result<(), SinkError> {
        Ok(())
    }
    fn recover(
        &self,
        _restored: Option<(&SnapshotId, &[SinkCommit])>,
    ) -> Result<BTreeMap<u32, u64>, SinkError> {
        Ok(BTreeMap::new())
    }
}

struct StdoutWriter {
    line: Vec<u8>,
}

impl SinkWriter for StdoutWriter {
    fn write(&mut self, events: &[Event]) -> Result<(), SinkError> {
        self.line.clear();
        for e in events {
            format_line(e, &mut self.line);
        }
        // One locked write per batch keeps lines of parallel tasks whole.
        io::stdout()
            .lock()
            .write_all(&self.line)
            .map_err(SinkError::Stdout)
    }

    fn precommit(&mut self, _snapshot: u64) -> Result<Option<SinkCommit>, SinkError> {
        io::stdout().flush().map_err(SinkError::Stdout)?;
        Ok(None)
    }
}

/// The `null` sink: discards everything.
struct NullSink;

impl Sink for NullSink {
    fn describe(&self) -> String {
        "null".into()
    }
    fn writer(&self, _task: u32, _next_seq: u64) -> Result<Box<dyn SinkWriter>, SinkError> {
        Ok(Box::new(NullSink))
    }
    fn commit(&self, _snapshot: &SnapshotId, _commits: &[SinkCommit]) -> Result<(), SinkError> {
        Ok(())
    }
    fn recover(
        &self,
        _restored: Option<(&SnapshotId, &[SinkCommit])>,
    ) -> Result<BTreeMap<u32, u64>, SinkError> {
        Ok(BTreeMap::new())
    }
}

impl SinkWriter for NullSink {
    fn write(&mut self, _events: &[Event]) -> Result<(), SinkError> {
        Ok(())
    }
    fn precommit(&mut self, _snapshot: u64) -> Result<Option<SinkCommit>, SinkError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(k: &str) -> Event {
        Event {
            key: k.as_bytes().to_vec(),
            value: b"v".to_vec(),
            timestamp: 0,
        }
    }

    fn visible(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn file_sink_stages_until_commit_and_recovers() {
        let base = tempfile::tempdir().unwrap();
        let spec = SinkSpec::File { path: "out".into() };
        let dir = base.path().join("out");
        of(&spec, base.path()).recover(None).unwrap();
        let mut w = of(&spec, base.path()).writer(1, 0).unwrap();
        w.write(&[ev("a")]).unwrap();
        let first = w.precommit(1).unwrap().unwrap();
        assert_eq!(
            first,
            SinkCommit {
                task: 1,
                next_seq: 1,
                files: vec!["part-00001-000000".into()]
            }
        );
        // Nothing visible before the snapshot completes.
        assert!(visible(&dir).is_empty());
        w.committed(1);
        // A quiet interval pre-commits nothing.
        assert_eq!(w.precommit(2).unwrap().unwrap().files, Vec::<String>::new());
        w.write(&[ev("b")]).unwrap();
        // Snapshot 3 fails: its file is listed again by snapshot 4.
        assert_eq!(
            w.precommit(3).unwrap().unwrap().files,
            vec!["part-00001-000001".to_string()]
        );
        let second = w.precommit(4).unwrap().unwrap();
        assert_eq!(second.files, vec!["part-00001-000001".to_string()]);
        w.write(&[ev("c")]).unwrap(); // staged, never pre-committed: lost in a crash
        of(&spec, base.path())
            .commit(
                &SnapshotId::parse("j-000001").unwrap(),
                std::slice::from_ref(&first),
            )
            .unwrap();
        of(&spec, base.path())
            .commit(
                &SnapshotId::parse("j-000001").unwrap(),
                std::slice::from_ref(&first),
            )
            .unwrap(); // idempotent
        assert_eq!(visible(&dir), vec!["part-00001-000000"]);
        drop(w);

        // Crash after snapshot 2 completed but before its commit: recovery
        // commits it and discards the rest.
        let id = SnapshotId::parse("j-000004").unwrap();
        let next = of(&spec, base.path())
            .recover(Some((&id, std::slice::from_ref(&second))))
            .unwrap();
        assert_eq!(next[&1], 2);
        assert_eq!(visible(&dir), vec!["part-00001-000000", "part-00001-000001"]);
        assert!(!dir.join(STAGING_DIR).exists());
        assert_eq!(
            std::fs::read_to_string(dir.join("part-00001-000001")).unwrap(),
            "b\tv\n"
        );

        // Resuming from the first snapshot rewinds the second's output.
        of(&spec, base.path())
            .recover(Some((&id, std::slice::from_ref(&first))))
            .unwrap();
        assert_eq!(visible(&dir), vec!["part-00001-000000"]);

        // A fresh start removes the output of earlier runs.
        of(&spec, base.path()).recover(None).unwrap();
        assert!(visible(&dir).is_empty());
    }

    #[test]
    fn missing_output_is_reported_only_where_it_was_staged() {
        let base = tempfile::tempdir().unwrap();
        let id = SnapshotId::parse("j-000002").unwrap();
        let listed = [SinkCommit {
            task: 0,
            next_seq: 2,
            files: vec!["part-00000-000000".into(), "part-00000-000001".into()],
        }];
        // A new directory, and an emptied one: the snapshot's output was
        // committed where it was written.
        assert!(
            FileSink::new(base.path().join("out"))
                .commit_restored(&id, &listed)
                .unwrap()
                .is_empty()
        );
        std::fs::create_dir(base.path().join("out")).unwrap();
        assert!(
            FileSink::new(base.path().join("out"))
                .commit_restored(&id, &listed)
                .unwrap()
                .is_empty()
        );
        // The job's own directory: one file committed, the other gone.
        let dir = base.path().join("out");
        std::fs::create_dir(dir.join(STAGING_DIR)).unwrap();
        std::fs::write(dir.join("part-00000-000000"), "a\tv\n").unwrap();
        assert_eq!(
            FileSink::new(base.path().join("out"))
                .commit_restored(&id, &listed)
                .unwrap(),
            vec!["part-00000-000001".to_string()]
        );
    }

    /// A manifest whose sink commit names `../../victim` (the store is
    /// input too): refused before anything moves; restoring from it moved
    /// a file from beside the output directory to above it.
    #[test]
    fn a_crafted_commit_moves_nothing_outside_the_output() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("jobs");
        let dir = root.join("out");
        std::fs::create_dir_all(dir.join(STAGING_DIR)).unwrap();
        std::fs::write(root.join("victim"), "keep me").unwrap();
        let spec = SinkSpec::File { path: "out".into() };
        let mut m = crate::store::Manifest::new(
            crate::store::JobName::new("j").unwrap(),
            3,
            crate::store::SnapshotKind::Checkpoint,
            crate::store::Trigger::Periodic,
            crate::store::StateFormat::Canonical,
        );
        for evil in [
            "../../victim",
            "part-00000-000001/../../../victim",
            "../victim",
            "part-00001-000001",
        ] {
            m.sink_commit = serde_json::json!({ "tasks": [{ "task": 0, "next_seq": 2, "files": [evil] }] });
            let e = commits_of(&m, &*of(&spec, &root)).unwrap_err().to_string();
            assert!(
                e.starts_with("snapshot j-000003: its sink commit is damaged: "),
                "{e}"
            );
            assert!(e.contains("is not a part file of sink task 0"), "{e}");
            // And were it to get past that, the rename itself refuses.
            let commits = [SinkCommit {
                task: 0,
                next_seq: 2,
                files: vec![evil.into()],
            }];
            if evil.contains('/') {
                assert!(
                    FileSink::new(root.join("out"))
                        .commit_restored(&m.id, &commits)
                        .is_err(),
                    "{evil}"
                );
            }
        }
        assert_eq!(std::fs::read_to_string(root.join("victim")).unwrap(), "keep me");
        assert!(!base.path().join("victim").exists());
        m.sink_commit =
            serde_json::json!({ "tasks": [{ "task": 0, "next_seq": 2, "files": ["part-00000-000001"] }] });
        assert_eq!(
            commits_of(&m, &*of(&spec, &root)).unwrap()[0].files,
            ["part-00000-000001"]
        );
        m.sink_commit = serde_json::Value::Null;
        assert!(commits_of(&m, &*of(&spec, &root)).unwrap().is_empty());
    }

    #[test]
    fn lines_escape_what_would_break_them() {
        let mut out = Vec::new();
        format_line(
            &Event {
                key: b"a\tb".to_vec(),
                value: vec![b'x', 0xff, b'\n', b'\\', 0xc3, 0xa9],
                timestamp: 0,
            },
            &mut out,
        );
        assert_eq!(String::from_utf8(out).unwrap(), "a\\tb\tx\\xff\\n\\\\é\n");
    }
}
