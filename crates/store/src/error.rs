//! The one error type of the store.
//!
//! Every variant names the thing that failed (tenant, snapshot, task, chunk,
//! blob, file) and the reason, so that a message printed by the CLI or the
//! REST API is enough to act on without a debugger.

use std::fmt;
use std::io;

use super::blob::{BlobHash, BlobProblem};
use super::name::{InvalidName, SnapshotId};

/// Errors of the snapshot store.
///
/// Errors a caller can act on are distinct variants (`NotFound`,
/// `QuotaExceeded`, `Busy`, `BadChunk`); plain I/O failures carry the action
/// and the store-relative path they failed on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A tenant name, job name, snapshot id or blob hash was rejected.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// Which kind of name ("tenant name", "job name", "snapshot id", ...).
        what: &'static str,
        /// The rejected input, escaped by `{:?}` so control bytes show.
        value: String,
        /// Why it was rejected.
        reason: String,
    },

    /// The tenant has no snapshot with this id (other tenants' snapshots are
    /// never visible, so this is also the answer for them).
    #[error("snapshot {id} not found (tenant {tenant})")]
    NotFound {
        /// Tenant that was asked.
        tenant: String,
        /// The id asked for.
        id: SnapshotId,
    },

    /// A snapshot with this id is already committed.
    #[error("snapshot {id} already exists (tenant {tenant})")]
    AlreadyExists {
        /// Tenant of the writer.
        tenant: String,
        /// The id that is taken.
        id: SnapshotId,
    },

    /// A manifest file is not valid JSON or violates the format.
    #[error("manifest of snapshot {id} is corrupt: {reason}")]
    CorruptManifest {
        /// Snapshot whose manifest is damaged (derived from the file name).
        id: String,
        /// Parser or validation message.
        reason: String,
    },

    /// A manifest was written by a newer (or unknown) version of the format.
    #[error(
        "manifest of snapshot {id} has schema version {found}; this build of memento reads versions 1 to {supported}"
    )]
    UnsupportedSchema {
        /// Snapshot whose manifest it is.
        id: String,
        /// Version found in the file.
        found: u64,
        /// Version this build understands.
        supported: u32,
    },

    /// A chunk of a snapshot could not be read back intact (boxed: it is
    /// the largest variant and errors travel through every `Result`).
    #[error("{0}")]
    BadChunk(Box<BadChunk>),

    /// A blob is damaged, outside the context of one snapshot (import, fsck).
    #[error("blob {hash}: {problem}")]
    BadBlob {
        /// The blob.
        hash: BlobHash,
        /// What is wrong with it.
        problem: BlobProblem,
    },

    /// A file in the manifests' directory looks like a manifest but is not
    /// where one belongs, so nothing lists it: GC would delete the blobs
    /// it may reference.
    #[error(
        "{path} looks like a manifest but is not where one belongs \
         (snapshots/<job>/<job>-<number>.json); gc deletes nothing until it is moved there or removed"
    )]
    MisplacedManifest {
        /// The file, relative to the store root.
        path: String,
    },

    /// Committing would reference a blob that is not in the store.
    #[error(
        "cannot commit snapshot {id}: task {task}, chunk {index} references blob {hash}, which is not in the store"
    )]
    MissingBlobAtCommit {
        /// Snapshot being committed.
        id: SnapshotId,
        /// Task holding the reference.
        task: String,
        /// Chunk position within the task's list.
        index: usize,
        /// The missing blob.
        hash: BlobHash,
    },

    /// The manifest handed to `commit` does not belong to the writer.
    #[error("cannot commit snapshot {id}: {reason}")]
    ManifestMismatch {
        /// Id of the writer.
        id: SnapshotId,
        /// What does not match.
        reason: String,
    },

    /// Committing would put the tenant over its quota. Nothing was committed;
    /// the blobs the writer stored are garbage for the next GC.
    #[error(
        "quota exceeded for tenant {tenant}: committing snapshot {id} would use {would_use} bytes, the quota is {quota} bytes (delete snapshots and run gc)"
    )]
    QuotaExceeded {
        /// Tenant over quota.
        tenant: String,
        /// Snapshot that was refused.
        id: SnapshotId,
        /// Bytes the tenant's manifests would reference after the commit.
        would_use: u64,
        /// The configured quota.
        quota: u64,
    },

    /// A series has used every snapshot number (its counter, or a
    /// committed id, is at `u64::MAX`): numbering on would wrap around to
    /// ids that are taken or gone.
    #[error(
        "job `{job}` has used every snapshot number (tenant {tenant}); \
         run it under another name"
    )]
    NumbersExhausted {
        /// Tenant of the job.
        tenant: String,
        /// The job.
        job: String,
    },

    /// Garbage collection could not get the store to itself in time
    /// (snapshot writers were active throughout).
    #[error("store busy: {0}")]
    Busy(String),

    /// A store location (`--state-dir`, `HOST.toml`) was rejected before
    /// anything was opened.
    #[error("invalid store location {location}: {reason}")]
    InvalidLocation {
        /// The location as given, escaped and shortened.
        location: String,
        /// Why it was rejected.
        reason: String,
    },

    /// Object storage failed: the message names the URL, the operation
    /// and the reason (unreachable, missing bucket, access denied, full).
    #[error("{0}")]
    Remote(String),

    /// This run's lease of its job was taken over (it expired while the
    /// run could not renew it): the run must stop, it can no longer commit.
    #[error("lease of job {job} (tenant {tenant}) lost: another host has taken the job over")]
    LeaseLost {
        /// Tenant of the job.
        tenant: String,
        /// The job.
        job: String,
    },

    /// The store directory is not a memento store or of an unknown version.
    #[error("store at {root}: {reason}")]
    StoreFormat {
        /// Root directory as given to `Store::open`.
        root: String,
        /// What is wrong.
        reason: String,
    },

    /// An export archive is malformed or truncated.
    #[error("archive {name}: {reason}")]
    Archive {
        /// File name (or "<stream>").
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// An I/O operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("write blob", "read manifest", ...).
        action: &'static str,
        /// Path relative to the store root (never absolute, so messages are
        /// the same wherever the store lives).
        path: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// A chunk of a snapshot that could not be read back intact.
#[derive(Debug)]
pub struct BadChunk {
    /// The snapshot being read.
    pub snapshot: SnapshotId,
    /// The task whose state was being read (`operator[index]`).
    pub task: String,
    /// Position of the chunk in the list passed to the read.
    pub index: usize,
    /// The blob the chunk refers to.
    pub hash: BlobHash,
    /// What is wrong with it.
    pub problem: BlobProblem,
    /// The newest older snapshot of the same job whose manifest reads and
    /// whose blobs are all present, if any: where a restore can go instead.
    pub next_intact: Option<SnapshotId>,
}

impl fmt::Display for BadChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "snapshot {}, task {}, chunk {} (blob {}): {}",
            self.snapshot, self.task, self.index, self.hash, self.problem
        )?;
        match &self.next_intact {
            Some(id) => write!(f, "; the next older intact snapshot is {id}"),
            None => write!(f, "; no older intact snapshot of this job exists"),
        }
    }
}

impl StoreError {
    /// Wraps an I/O error with the action and store-relative path.
    pub(crate) fn io(action: &'static str, path: impl Into<String>, source: io::Error) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// True if the error means "this does not exist" (unknown snapshot).
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

impl From<InvalidName> for StoreError {
    fn from(e: InvalidName) -> Self {
        StoreError::InvalidName {
            what: e.what,
            value: e.value,
            reason: e.reason,
        }
    }
}
