//! The `file` sink on object storage (`path = "s3://bucket/prefix"`):
//! the same part files, exactly-once, as objects (docs/STORAGE.md,
//! "Sink output on object storage").
//!
//! A task buffers its lines in memory and, when a snapshot barrier passes
//! it (pre-commit), PUTs them as the staged object
//! `<prefix>/.staging/part-TTTTT-SSSSSS` (durable when the PUT returns).
//! After the snapshot is complete, commit copies each staged object to
//! `<prefix>/part-TTTTT-SSSSSS` (a server-side copy) and deletes the
//! staged one; both steps are idempotent, so a commit interrupted by a
//! crash is redone by recovery, which also discards every other staged
//! object and rewinds parts committed after the restored snapshot. There
//! is no rename on object storage: a committed part is visible only once
//! its copy is complete, and it is never written again.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use super::{STAGING_DIR, format_line};
use crate::io::{
    Sink, SinkCommit, SinkError, SinkWriter, check_part_files, parse_part_file_name, part_file_name,
};
use crate::runtime::Event;
use crate::store::{Backend, PutMode, SnapshotId, StoreLocation};

/// Whether a sink path names object storage rather than a directory.
pub(super) fn is_s3(path: &std::path::Path) -> bool {
    path.to_str().is_some_and(|p| p.starts_with("s3://"))
}

/// The `file` sink writing objects under one prefix of a bucket.
pub(super) struct S3FileSink {
    /// The URL as written in the job file, for messages.
    url: String,
    /// The backend, opened at first use (opening makes a request, and a
    /// bad location is the run's error, not the job file's parse error).
    backend: OnceLock<Result<Arc<dyn Backend>, String>>,
    /// The last component of the prefix: keys are `<dir>/part-…` and
    /// `<dir>/.staging/part-…` in a backend opened at the parent prefix.
    dir: String,
}

impl S3FileSink {
    pub(super) fn new(path: &std::path::Path) -> S3FileSink {
        let url = path.to_string_lossy().into_owned();
        let dir = url
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        S3FileSink {
            url,
            backend: OnceLock::new(),
            dir,
        }
    }

    fn io_err(&self, action: &'static str, key: &str, e: io::Error) -> SinkError {
        SinkError::Io {
            action,
            path: PathBuf::from(format!("{}/{key}", self.url.trim_end_matches('/'))),
            source: e,
        }
    }

    fn backend(&self) -> Result<&Arc<dyn Backend>, SinkError> {
        self.backend
            .get_or_init(|| open(&self.url))
            .as_ref()
            .map_err(|reason| SinkError::Io {
                action: "cannot open the sink's bucket",
                path: PathBuf::from(&self.url),
                source: io::Error::other(reason.clone()),
            })
    }

    fn staged_key(&self, name: &str) -> String {
        format!("{}/{STAGING_DIR}/{name}", self.dir)
    }

    fn final_key(&self, name: &str) -> String {
        format!("{}/{name}", self.dir)
    }

    /// Copies the staged objects of `commits` to their final keys and
    /// deletes the staged ones; returns the parts neither staged nor
    /// committed. Idempotent.
    fn commit_parts(&self, commits: &[SinkCommit]) -> Result<Vec<String>, SinkError> {
        let b = self.backend()?;
        let mut missing = Vec::new();
        for c in commits {
            for name in &c.files {
                if parse_part_file_name(name).is_none() {
                    return Err(self.io_err(
                        "refusing to commit",
                        name,
                        io::Error::new(io::ErrorKind::InvalidInput, "a name that is not a part file"),
                    ));
                }
                let (staged, target) = (self.staged_key(name), self.final_key(name));
                match b.copy(&staged, &target) {
                    Ok(()) => {
                        b.delete(&staged)
                            .map_err(|e| self.io_err("cannot remove", &staged, e))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        let committed = b
                            .size(&target)
                            .map_err(|e| self.io_err("cannot stat", &target, e))?;
                        if committed.is_none() {
                            missing.push(name.clone());
                        }
                    }
                    Err(e) => return Err(self.io_err("cannot commit", &staged, e)),
                }
            }
        }
        Ok(missing)
    }

    /// Part objects directly under the prefix, as (name, task, seq).
    fn committed_parts(&self) -> Result<Vec<(String, u32, u64)>, SinkError> {
        let b = self.backend()?;
        let names = b.list(&self.dir).map_err(|e| self.io_err("cannot list", "", e))?;
        Ok(names
            .into_iter()
            .filter_map(|n| parse_part_file_name(&n).map(|(t, s)| (n, t, s)))
            .collect())
    }

    fn warn_missing(&self, name: &str) {
        tracing::warn!(
            target: "memento::sink",
            object = %format!("{}/{name}", self.url.trim_end_matches('/')),
            "pre-committed output is missing; it cannot be committed"
        );
    }
}

/// Opens the backend at the parent of the URL's prefix.
#[cfg(feature = "s3")]
fn open(url: &str) -> Result<Arc<dyn Backend>, String> {
    let location = StoreLocation::parse(url).map_err(|e| e.to_string())?;
    let StoreLocation::S3 { bucket, prefix } = location else {
        return Err(format!("{url}: not an s3:// location"));
    };
    if prefix.is_empty() {
        return Err(format!(
            "{url}: a file sink needs a prefix (s3://bucket/prefix), not a whole bucket"
        ));
    }
    let parent = prefix.rsplit_once('/').map_or("", |(p, _)| p);
    let options = crate::store::S3Options::from_env()?;
    let backend = crate::store::S3Backend::open(&bucket, parent, options).map_err(|e| e.to_string())?;
    Ok(Arc::new(backend))
}

#[cfg(not(feature = "s3"))]
fn open(url: &str) -> Result<Arc<dyn Backend>, String> {
    let _ = StoreLocation::parse(url).map_err(|e| e.to_string())?;
    Err(format!(
        "{url}: this build has no object storage support (cargo feature `s3`)"
    ))
}

impl Sink for S3FileSink {
    fn describe(&self) -> String {
        format!("file sink {}", self.url)
    }

    fn writer(&self, task: u32, next_seq: u64) -> Result<Box<dyn SinkWriter>, SinkError> {
        let backend = self.backend()?.clone();
        Ok(Box::new(S3Writer {
            backend,
            url: self.url.trim_end_matches('/').to_string(),
            staging: format!("{}/{STAGING_DIR}", self.dir),
            task,
            seq: next_seq,
            open: false,
            buf: Vec::new(),
            pending: Vec::new(),
        }))
    }

    fn commit(&self, _snapshot: &SnapshotId, commits: &[SinkCommit]) -> Result<(), SinkError> {
        for name in self.commit_parts(commits)? {
            self.warn_missing(&name);
        }
        Ok(())
    }

    /// As the directory's `file` sink: commit the restored snapshot's
    /// parts, rewind parts committed after it, discard every staged
    /// object; without a snapshot, remove the parts of earlier runs.
    fn recover(
        &self,
        restored: Option<(&SnapshotId, &[SinkCommit])>,
    ) -> Result<BTreeMap<u32, u64>, SinkError> {
        let b = self.backend()?;
        let mut next = BTreeMap::new();
        if let Some((_, commits)) = restored {
            for name in self.commit_parts(commits)? {
                self.warn_missing(&name);
            }
            for c in commits {
                next.insert(c.task, c.next_seq);
            }
        }
        for (name, task, seq) in self.committed_parts()? {
            let rewind = restored.is_none() || next.get(&task).is_some_and(|n| seq >= *n);
            if rewind {
                let key = self.final_key(&name);
                b.delete(&key)
                    .map_err(|e| self.io_err("cannot remove", &key, e))?;
            }
        }
        let staging = format!("{}/{STAGING_DIR}", self.dir);
        let staged = b
            .list(&staging)
            .map_err(|e| self.io_err("cannot list", STAGING_DIR, e))?;
        for name in staged {
            let key = format!("{staging}/{name}");
            b.delete(&key).map_err(|e| self.io_err("cannot clean", &key, e))?;
        }
        Ok(next)
    }

    fn check(&self, commit: &SinkCommit) -> Result<(), String> {
        check_part_files(commit)
    }
}

/// One task's writer: lines in memory until the barrier, then one PUT.
struct S3Writer {
    backend: Arc<dyn Backend>,
    url: String,
    staging: String,
    task: u32,
    seq: u64,
    /// Written to since the last barrier (a part is staged even if empty,
    /// as the directory's sink creates its file at the first write).
    open: bool,
    buf: Vec<u8>,
    pending: Vec<(u64, String)>,
}

impl SinkWriter for S3Writer {
    fn write(&mut self, events: &[Event]) -> Result<(), SinkError> {
        self.open = true;
        for e in events {
            format_line(e, &mut self.buf);
        }
        Ok(())
    }

    fn precommit(&mut self, snapshot: u64) -> Result<Option<SinkCommit>, SinkError> {
        if self.open {
            let name = part_file_name(self.task, self.seq);
            let key = format!("{}/{name}", self.staging);
            self.backend
                .put(&key, &self.buf, PutMode::Replace, true)
                .map_err(|e| SinkError::Io {
                    action: "cannot write",
                    path: PathBuf::from(format!("{}/{STAGING_DIR}/{name}", self.url)),
                    source: e,
                })?;
            self.buf.clear();
            self.open = false;
            self.pending.push((snapshot, name));
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
