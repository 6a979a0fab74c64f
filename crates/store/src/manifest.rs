//! Snapshot manifests: one JSON document per committed snapshot.
//!
//! A manifest is the only thing that makes a snapshot exist. It references
//! blobs by hash only and holds no absolute path, so a store directory can be
//! copied or moved and still restores. Readers check `schema_version` before
//! anything else (see [`Manifest::from_json`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::blob::MAX_CHUNK;
use super::chunk::ChunkRef;
use super::error::StoreError;
use super::name::{JobName, SnapshotId};

/// Newest version of the manifest schema this build reads and writes.
/// Bumped on any change an older reader would misinterpret; additive
/// optional fields do not bump it. Version 2 added page-delta chains to
/// native images; a manifest without one is still written as version 1, so
/// older builds keep reading what they can read correctly.
pub const MANIFEST_SCHEMA_VERSION: u32 = 2;

/// The oldest manifest schema this build reads.
pub const OLDEST_MANIFEST_SCHEMA: u32 = 1;

/// What a voided manifest key holds (object storage, `docs/STORAGE.md`,
/// "Job leases and fencing"): no snapshot, and never one, since manifests
/// are never replaced.
pub(crate) const VOID_MANIFEST: &[u8] = b"void\n";

/// Why a snapshot exists: for recovery or for operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Taken for recovery; subsumed by newer checkpoints per retention.
    Checkpoint,
    /// Taken for operations; never subsumed by checkpoints.
    Savepoint,
}

/// What started a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Trigger {
    /// The periodic timer (checkpoint interval or savepoint schedule).
    Periodic,
    /// A user request (CLI or REST).
    Manual,
    /// Taken while stopping the job.
    Stop,
    /// Written right after a restore, as the base of later incrementals.
    RestoreBase,
    /// Added by `savepoint import` from an archive.
    Import,
    /// Written when a bounded job's input ended and every task finished:
    /// records the final output commit; resuming from it does nothing more.
    EndOfInput,
}

/// How task state is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateFormat {
    /// Byte images of the producer's memories; restorable only by the
    /// identical producer (see [`Manifest::components`]).
    Native,
    /// The operator's own `snapshot-state` bytes; portable across versions.
    Canonical,
    /// Some tasks native, some canonical (each task's state says which):
    /// the native ones restore only into their identical producer.
    Mixed,
}

impl fmt::Display for StateFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StateFormat::Native => "native",
            StateFormat::Canonical => "canonical",
            StateFormat::Mixed => "mixed",
        })
    }
}

impl StateFormat {
    /// The format of a snapshot made of these task states: `Native` or
    /// `Canonical` if all agree (`Canonical` for none), else `Mixed`.
    pub fn of_tasks<'a>(tasks: impl IntoIterator<Item = &'a TaskStateData>) -> StateFormat {
        let (mut native, mut canonical) = (false, false);
        for t in tasks {
            match t {
                TaskStateData::Native { .. } => native = true,
                TaskStateData::Canonical { .. } => canonical = true,
            }
        }
        match (native, canonical) {
            (true, false) => StateFormat::Native,
            (true, true) => StateFormat::Mixed,
            _ => StateFormat::Canonical,
        }
    }
}

/// State of a snapshot as recorded in its manifest. Only complete snapshots
/// get a manifest, so this is `Complete` today; the field exists so that a
/// future writer can record other states without a schema bump for readers
/// that filter on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SnapshotStatus {
    /// Every task acknowledged and every blob was durable before the manifest.
    Complete,
}

/// The retention settings in force when the snapshot was taken. The store
/// records them for display and for the coordinator; it decides nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// For checkpoints: how many of the newest are retained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained: Option<u32>,
    /// For checkpoints: kept when the job is cancelled or fails for good.
    #[serde(default)]
    pub persistent: bool,
    /// For savepoints: the policy's maximum count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u32>,
    /// For savepoints: the policy's maximum age in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    /// Absolute expiry (unix ms) if one was computed when taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

impl fmt::Display for Retention {
    /// Short human form for tables, e.g. `retain 3, persistent` or
    /// `max 5, 7d`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.retained {
            parts.push(format!("retain {n}"));
        }
        if self.persistent {
            parts.push("persistent".to_string());
        }
        if let Some(n) = self.max_count {
            parts.push(format!("max {n}"));
        }
        if let Some(ms) = self.max_age_ms {
            parts.push(format!("max age {}", human_ms(ms)));
        }
        if let Some(at) = self.expires_at_ms {
            parts.push(format!("expires @{at}"));
        }
        if parts.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

fn human_ms(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1000, "s")];
    for (unit, suffix) in UNITS {
        if ms >= unit && ms.is_multiple_of(unit) {
            return format!("{}{suffix}", ms / unit);
        }
    }
    format!("{ms}ms")
}

/// Identifies a task: an operator and its parallel instance index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskKey {
    /// Operator name from the job file.
    pub operator: String,
    /// Index among the operator's parallel tasks.
    pub task_index: u32,
}

impl TaskKey {
    /// A task key.
    pub fn new(operator: impl Into<String>, task_index: u32) -> Self {
        TaskKey {
            operator: operator.into(),
            task_index,
        }
    }
}

impl fmt::Display for TaskKey {
    /// `operator[index]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.operator, self.task_index)
    }
}

/// One memory's byte image in a native snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryImage {
    /// Index of the memory within its producer.
    #[serde(default)]
    pub index: u32,
    /// Size of the memory in bytes; the chunks cover exactly this many.
    pub size: u64,
    /// Fixed chunk size used to cut the image (the last chunk may be shorter).
    pub chunk_size: u64,
    /// The chunks in order.
    pub chunks: Vec<ChunkRef>,
    /// How many of the chunks this snapshot wrote as new blobs (the rest
    /// were in the store already or are zero). Informational; absent when
    /// not recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_chunks: Option<u64>,
    /// With `deltas`: the bytes `chunks` cover (the base image's size, at
    /// most `size`); absent means `size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_size: Option<u64>,
    /// Page deltas applied in order over the base image (schema 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<PageDeltaRef>,
}

impl MemoryImage {
    /// A plain image of `size` bytes in `chunk_size` chunks, no deltas.
    pub fn new(index: u32, size: u64, chunk_size: u64, chunks: Vec<ChunkRef>) -> MemoryImage {
        MemoryImage {
            index,
            size,
            chunk_size,
            chunks,
            new_chunks: None,
            base_size: None,
            deltas: Vec::new(),
        }
    }

    /// The bytes the base chunks cover.
    pub fn base_len(&self) -> u64 {
        self.base_size.unwrap_or(self.size)
    }

    /// Every chunk reference: the base image's, then each delta's.
    pub fn all_chunks(&self) -> impl Iterator<Item = &ChunkRef> + '_ {
        self.chunks
            .iter()
            .chain(self.deltas.iter().flat_map(|d| d.chunks.iter()))
    }
}

/// One page delta of a native memory image: its encoded bytes, chunked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageDeltaRef {
    /// Length of the encoded delta; the chunks add up to it.
    pub len: u64,
    /// Pages it changes (informational).
    #[serde(default)]
    pub pages: u64,
    /// The chunks in order.
    pub chunks: Vec<ChunkRef>,
}

/// A task's state, tagged by format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum TaskStateData {
    /// The operator's own bytes, FastCDC-chunked.
    Canonical {
        /// Total length of the state bytes.
        len: u64,
        /// The chunks in order.
        chunks: Vec<ChunkRef>,
    },
    /// Byte images of memories plus whatever else the native snapshotter
    /// needs (globals, table sizes, ...) as free-form JSON.
    Native {
        /// One image per memory.
        memories: Vec<MemoryImage>,
        /// Free-form data of the native snapshotter (small; not chunked).
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
        extra: serde_json::Value,
    },
}

impl TaskStateData {
    /// Every chunk reference, in order.
    pub fn chunks(&self) -> Box<dyn Iterator<Item = &ChunkRef> + '_> {
        match self {
            TaskStateData::Canonical { chunks, .. } => Box::new(chunks.iter()),
            TaskStateData::Native { memories, .. } => {
                Box::new(memories.iter().flat_map(MemoryImage::all_chunks))
            }
        }
    }

    /// For native state, how many chunks its snapshot wrote as new blobs,
    /// over all memories; `None` for canonical state or where not recorded.
    pub fn native_new_chunks(&self) -> Option<u64> {
        match self {
            TaskStateData::Canonical { .. } => None,
            TaskStateData::Native { memories, .. } => memories.iter().map(|m| m.new_chunks).sum(),
        }
    }

    /// Logical size of the state: the canonical bytes, or the memories'
    /// sizes (a chain's deltas are how they are stored, not more state).
    pub fn logical_bytes(&self) -> u64 {
        match self {
            TaskStateData::Canonical { len, .. } => *len,
            TaskStateData::Native { memories, .. } => memories.iter().map(|m| m.size).sum(),
        }
    }
}

/// The state of one task in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState {
    /// Which task.
    #[serde(flatten)]
    pub key: TaskKey,
    /// Its state.
    pub state: TaskStateData,
}

/// How far a source task had read when the barrier was injected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    /// Source name (or operator name) in the job.
    pub source: String,
    /// Index of the source task.
    pub task_index: u32,
    /// Opaque position (offset, record count, ...).
    pub position: u64,
}

/// Measurements of a snapshot. The store fills `new_bytes`, `stored_bytes`,
/// `chunks_*` and `commit_ms` at commit; the coordinator fills the phases it
/// timed. `logical_bytes` is computed from the tasks if left at 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    /// Sum of the lengths of all chunks (zero chunks included).
    #[serde(default)]
    pub logical_bytes: u64,
    /// Uncompressed bytes of blobs this snapshot wrote (not deduplicated).
    #[serde(default)]
    pub new_bytes: u64,
    /// On-disk bytes of blobs this snapshot wrote (after compression).
    #[serde(default)]
    pub stored_bytes: u64,
    /// Number of chunk references (zero chunks included).
    #[serde(default)]
    pub chunks_total: u64,
    /// Number of blobs this snapshot wrote.
    #[serde(default)]
    pub chunks_new: u64,
    /// Synchronous phase (task paused), milliseconds.
    #[serde(default)]
    pub sync_ms: u64,
    /// Asynchronous phase (hashing and writing), milliseconds.
    #[serde(default)]
    pub async_ms: u64,
    /// Commit (durability barrier + manifest), milliseconds.
    #[serde(default)]
    pub commit_ms: u64,
    /// From the trigger to the start of the commit, milliseconds: the
    /// phases plus the barrier's travel and alignment (0: not recorded).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub before_commit_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Figures {
    /// Trigger to commit in milliseconds, as the job's log and status
    /// report it; for snapshots that did not record it, the sum of the
    /// phases.
    pub fn duration_ms(&self) -> u64 {
        if self.before_commit_ms > 0 {
            self.before_commit_ms + self.commit_ms
        } else {
            self.sync_ms + self.async_ms + self.commit_ms
        }
    }
}

/// A snapshot manifest (schema version [`MANIFEST_SCHEMA_VERSION`]).
///
/// Build one with [`Manifest::new`] (or `SnapshotWriter::manifest`), fill the
/// tasks and hand it to `SnapshotWriter::commit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always first in the file; checked before anything else is read.
    pub schema_version: u32,
    /// `<job>-<number>`; must agree with `job` and `number`.
    pub id: SnapshotId,
    /// The job.
    pub job: JobName,
    /// The snapshot number (one counter per job, shared by all kinds).
    pub number: u64,
    /// Checkpoint or savepoint.
    pub kind: SnapshotKind,
    /// What started it.
    pub trigger: Trigger,
    /// How the task state is encoded.
    pub format: StateFormat,
    /// Retention settings at the time it was taken.
    #[serde(default)]
    pub retention: Retention,
    /// Always `Complete` for a committed manifest.
    pub status: SnapshotStatus,
    /// Operator name -> blake3 hex of the code that produced its state
    /// (opaque to the store; readers compare it before a native restore).
    #[serde(default)]
    pub components: BTreeMap<String, String>,
    /// How canonical task state is laid out in its bytes: absent (legacy),
    /// the operator's bytes as they are; `1`, state pieces framed as
    /// `docs/STORAGE.md` ("Canonical state framing") says. Opaque to the
    /// store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canonical_framing: Option<u32>,
    /// Every task's state.
    #[serde(default)]
    pub tasks: Vec<TaskState>,
    /// Source positions at the barrier.
    #[serde(default)]
    pub source_positions: Vec<SourcePosition>,
    /// Data the sink needs to commit or roll back (opaque to the store).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub sink_commit: serde_json::Value,
    /// When the snapshot was triggered, unix milliseconds.
    pub created_at_ms: u64,
    /// When it was committed, unix milliseconds (set by the store).
    #[serde(default)]
    pub completed_at_ms: u64,
    /// Sizes and durations.
    #[serde(default)]
    pub figures: Figures,
    /// Extension point for the coordinator's own fields (kept verbatim).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    /// An empty complete manifest for snapshot `number` of `job`, created now.
    pub fn new(job: JobName, number: u64, kind: SnapshotKind, trigger: Trigger, format: StateFormat) -> Self {
        Manifest {
            schema_version: OLDEST_MANIFEST_SCHEMA,
            id: SnapshotId::new(job.clone(), number),
            job,
            number,
            kind,
            trigger,
            format,
            retention: Retention::default(),
            status: SnapshotStatus::Complete,
            components: BTreeMap::new(),
            canonical_framing: None,
            tasks: Vec::new(),
            source_positions: Vec::new(),
            sink_commit: serde_json::Value::Null,
            created_at_ms: now_ms(),
            completed_at_ms: 0,
            figures: Figures::default(),
            extra: BTreeMap::new(),
        }
    }

    /// The state of `task`, if the snapshot has one.
    pub fn task(&self, task: &TaskKey) -> Option<&TaskState> {
        self.tasks.iter().find(|t| &t.key == task)
    }

    /// The oldest schema that describes this manifest: 2 with framed
    /// canonical state or a page-delta chain (an older reader would take
    /// the frames for the operator's bytes, or restore a base without its
    /// chain), else 1, which older builds read too.
    pub fn required_schema(&self) -> u32 {
        let chained = self.tasks.iter().any(|t| match &t.state {
            TaskStateData::Native { memories, .. } => memories.iter().any(|m| !m.deltas.is_empty()),
            TaskStateData::Canonical { .. } => false,
        });
        let framed = self.canonical_framing.is_some()
            && self
                .tasks
                .iter()
                .any(|t| matches!(t.state, TaskStateData::Canonical { .. }));
        if chained || framed {
            2
        } else {
            OLDEST_MANIFEST_SCHEMA
        }
    }

    /// Every chunk reference of every task, with its task.
    pub fn chunk_refs(&self) -> impl Iterator<Item = (&TaskKey, usize, &ChunkRef)> + '_ {
        self.tasks
            .iter()
            .flat_map(|t| t.state.chunks().enumerate().map(move |(i, c)| (&t.key, i, c)))
    }

    /// Serializes to pretty JSON (manifests are small and read by humans).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("manifest serialization cannot fail")
    }

    /// Parses a manifest, checking the schema version first and then that the
    /// id agrees with job and number. `name` (the snapshot id derived from the
    /// file name) is used in errors.
    ///
    /// # Errors
    /// [`StoreError::UnsupportedSchema`] for another version,
    /// [`StoreError::CorruptManifest`] for anything malformed.
    pub fn from_json(name: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |reason: String| StoreError::CorruptManifest {
            id: name.to_string(),
            reason,
        };
        // Version first, from a minimal view, so a future format with other
        // fields gets a version error rather than a confusing field error.
        #[derive(Deserialize)]
        struct Version {
            schema_version: Option<u64>,
        }
        let version: Version =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not a JSON manifest: {e}")))?;
        match version.schema_version {
            None => return Err(corrupt("no schema_version field".into())),
            Some(v)
                if !(u64::from(OLDEST_MANIFEST_SCHEMA)..=u64::from(MANIFEST_SCHEMA_VERSION)).contains(&v) =>
            {
                return Err(StoreError::UnsupportedSchema {
                    id: name.to_string(),
                    found: v,
                    supported: MANIFEST_SCHEMA_VERSION,
                });
            }
            Some(_) => {}
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if manifest.id.job() != &manifest.job || manifest.id.number() != manifest.number {
            return Err(corrupt(format!(
                "id {} does not match job {} and number {}",
                manifest.id, manifest.job, manifest.number
            )));
        }
        if manifest.id.to_string() != name {
            return Err(corrupt(format!(
                "file holds snapshot {} (was it renamed?)",
                manifest.id
            )));
        }
        manifest.check_lengths().map_err(corrupt)?;
        Ok(manifest)
    }

    /// Checks every length the manifest states, before anything is
    /// allocated by them: each chunk at most [`MAX_CHUNK`], each task state
    /// and memory image at most [`MAX_STATE_LEN`], and the chunks adding up
    /// (without overflow) to the length the manifest gives.
    pub(crate) fn check_lengths(&self) -> Result<(), String> {
        for t in &self.tasks {
            match &t.state {
                TaskStateData::Canonical { len, chunks } => {
                    check_sum(chunks, *len).map_err(|e| format!("task {}: {e}, len says {len}", t.key))?;
                }
                TaskStateData::Native { memories, .. } => {
                    for m in memories {
                        let at = |e: String| format!("task {} memory {}: {e}", t.key, m.index);
                        if m.base_len() > m.size {
                            return Err(at(format!("base_size {} exceeds size {}", m.base_len(), m.size)));
                        }
                        if m.base_size.is_some() == m.deltas.is_empty() {
                            return Err(at("base_size and deltas come together".into()));
                        }
                        if m.deltas.len() > MAX_CHAIN {
                            return Err(at(format!(
                                "{} deltas, more than a chain may have ({MAX_CHAIN})",
                                m.deltas.len()
                            )));
                        }
                        check_sum(&m.chunks, m.base_len())
                            .map_err(|e| at(format!("{e}, size says {}", m.base_len())))?;
                        for (i, d) in m.deltas.iter().enumerate() {
                            check_sum(&d.chunks, d.len)
                                .map_err(|e| at(format!("delta {i}: {e}, len says {}", d.len)))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The most deltas a chain may have; writers start a new base well before
/// (see docs/STORAGE.md, "Page deltas").
pub const MAX_CHAIN: usize = 256;

/// The largest task state or memory image a manifest may describe: what a
/// 32-bit Wasm instance can hold (its memory, or `snapshot-state` bytes
/// returned from it). Restores allocate this much, so a manifest cannot ask
/// for more.
pub const MAX_STATE_LEN: u64 = 4 << 30;

/// Whether `chunks` are each a possible chunk and add up to `len`, itself
/// a possible state length.
fn check_sum(chunks: &[ChunkRef], len: u64) -> Result<(), String> {
    if len > MAX_STATE_LEN {
        return Err(format!(
            "{len} bytes is more than any state can hold ({MAX_STATE_LEN})"
        ));
    }
    let mut sum: u64 = 0;
    for (i, c) in chunks.iter().enumerate() {
        if c.len() > MAX_CHUNK as u64 {
            return Err(format!(
                "chunk {i} is {} bytes, more than the largest chunk ({MAX_CHUNK})",
                c.len()
            ));
        }
        sum = sum
            .checked_add(c.len())
            .filter(|s| *s <= MAX_STATE_LEN)
            .ok_or_else(|| format!("chunks add up to more than {MAX_STATE_LEN} bytes"))?;
    }
    if sum != len {
        return Err(format!("chunks add up to {sum} bytes"));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobHash;

    fn sample() -> Manifest {
        let mut m = Manifest::new(
            JobName::new("wordcount").unwrap(),
            7,
            SnapshotKind::Savepoint,
            Trigger::Manual,
            StateFormat::Canonical,
        );
        m.retention.max_count = Some(5);
        m.components.insert("count".into(), "ab".repeat(32));
        m.tasks.push(TaskState {
            key: TaskKey::new("count", 1),
            state: TaskStateData::Canonical {
                len: 15,
                chunks: vec![
                    ChunkRef::Blob {
                        blob: BlobHash::of(b"0123456789"),
                        len: 10,
                    },
                    ChunkRef::Zero { zero: 5 },
                ],
            },
        });
        m.tasks.push(TaskState {
            key: TaskKey::new("mem", 0),
            state: TaskStateData::Native {
                memories: vec![MemoryImage {
                    index: 0,
                    size: 4,
                    chunk_size: 4,
                    chunks: vec![ChunkRef::Zero { zero: 4 }],
                    new_chunks: None,
                    base_size: None,
                    deltas: Vec::new(),
                }],
                extra: serde_json::json!({"globals": [1, 2]}),
            },
        });
        m.source_positions.push(SourcePosition {
            source: "src".into(),
            task_index: 0,
            position: 1234,
        });
        m.sink_commit = serde_json::json!({"txn": 3});
        m.extra.insert("x".into(), serde_json::json!(true));
        m
    }

    #[test]
    fn manifest_round_trips_through_json() {
        let m = sample();
        let json = m.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.trim_start().starts_with("{\n  \"schema_version\": 1"),
            "{text}"
        );
        assert!(text.contains(r#""zero": 5"#), "{text}");
        let back = Manifest::from_json("wordcount-000007", &json).unwrap();
        assert_eq!(back, m);
    }

    /// A native image with a page-delta chain needs schema 2, round-trips,
    /// and has its lengths checked like the base's.
    #[test]
    fn chains_need_schema_2_and_are_checked() {
        let mut m = sample();
        assert_eq!(m.required_schema(), 1);
        let TaskStateData::Native { memories, .. } = &mut m.tasks[1].state else {
            panic!("sample's second task is native")
        };
        memories[0].size = 8;
        memories[0].base_size = Some(4);
        memories[0].deltas.push(PageDeltaRef {
            len: 3,
            pages: 1,
            chunks: vec![ChunkRef::Zero { zero: 3 }],
        });
        assert_eq!(m.required_schema(), 2);
        assert!(m.check_lengths().is_ok());
        assert_eq!(
            m.tasks[1].state.chunks().count(),
            2,
            "the delta's chunks are references too"
        );
        m.schema_version = m.required_schema();
        let back = Manifest::from_json("wordcount-000007", &m.to_json()).unwrap();
        assert_eq!(back, m);
        let bad = |m: &Manifest| m.check_lengths().unwrap_err();
        let mut wrong = m.clone();
        if let TaskStateData::Native { memories, .. } = &mut wrong.tasks[1].state {
            memories[0].deltas[0].len = 4;
        }
        assert!(
            bad(&wrong).contains("delta 0: chunks add up to 3 bytes"),
            "{}",
            bad(&wrong)
        );
        let mut wrong = m.clone();
        if let TaskStateData::Native { memories, .. } = &mut wrong.tasks[1].state {
            memories[0].base_size = Some(9);
        }
        assert!(
            bad(&wrong).contains("base_size 9 exceeds size 8"),
            "{}",
            bad(&wrong)
        );
        let mut wrong = m.clone();
        if let TaskStateData::Native { memories, .. } = &mut wrong.tasks[1].state {
            memories[0].deltas.clear();
        }
        assert!(bad(&wrong).contains("come together"), "{}", bad(&wrong));
    }

    /// Lengths a manifest states are bounded before anything is allocated
    /// by them: a 1 TiB zero chunk aborted a restore with a failed
    /// allocation, and lengths adding up past u64 panicked.
    #[test]
    fn absurd_lengths_are_refused_as_corrupt() {
        let tib = 1u64 << 40;
        let cases: Vec<(Vec<ChunkRef>, u64, &str)> = vec![
            (
                vec![ChunkRef::Zero { zero: tib }],
                tib,
                "more than any state can hold",
            ),
            (
                vec![ChunkRef::Zero { zero: 1 << 30 }],
                1 << 30,
                "more than the largest chunk",
            ),
            (
                vec![ChunkRef::Zero { zero: u64::MAX }, ChunkRef::Zero { zero: 2 }],
                1,
                "more than the largest chunk",
            ),
            (
                vec![ChunkRef::Zero { zero: 16 << 20 }; 300],
                1000,
                "chunks add up to more than 4294967296 bytes",
            ),
            (
                vec![ChunkRef::Zero { zero: 5 }],
                6,
                "chunks add up to 5 bytes, len says 6",
            ),
        ];
        for (chunks, len, reason) in cases {
            let mut m = sample();
            m.tasks[0].state = TaskStateData::Canonical { len, chunks };
            let e = Manifest::from_json("wordcount-000007", &m.to_json())
                .unwrap_err()
                .to_string();
            assert!(e.contains("is corrupt") && e.contains(reason), "{reason}: {e}");
            let mut m = sample();
            if let TaskStateData::Native { memories, .. } = &mut m.tasks[1].state {
                memories[0].size = tib;
                memories[0].chunks = vec![ChunkRef::Zero { zero: tib }];
            }
            let e = Manifest::from_json("wordcount-000007", &m.to_json())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("memory 0") && e.contains("more than any state can hold"),
                "{e}"
            );
        }
    }

    #[test]
    fn schema_version_mismatch_is_reported_before_anything_else() {
        let json = br#"{"schema_version": 3, "something": "new"}"#;
        let err = Manifest::from_json("j-000001", json).unwrap_err();
        assert_eq!(
            err.to_string(),
            "manifest of snapshot j-000001 has schema version 3; this build of memento reads versions 1 to 2"
        );
        let err = Manifest::from_json("j-000001", b"{\"id\": 1}").unwrap_err();
        assert!(err.to_string().contains("no schema_version field"), "{err}");
        let err = Manifest::from_json("j-000001", b"\0garbage").unwrap_err();
        assert!(
            err.to_string()
                .contains("manifest of snapshot j-000001 is corrupt"),
            "{err}"
        );
    }

    #[test]
    fn inconsistent_manifests_are_corrupt() {
        let mut m = sample();
        m.number = 8;
        let err = Manifest::from_json("wordcount-000007", &m.to_json()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        let m = sample();
        let err = Manifest::from_json("wordcount-000009", &m.to_json()).unwrap_err();
        assert!(err.to_string().contains("renamed"), "{err}");
        let mut m = sample();
        if let TaskStateData::Canonical { len, .. } = &mut m.tasks[0].state {
            *len = 99;
        }
        let err = Manifest::from_json("wordcount-000007", &m.to_json()).unwrap_err();
        assert!(
            err.to_string().contains("chunks add up to 15 bytes, len says 99"),
            "{err}"
        );
    }

    #[test]
    fn retention_displays_compactly() {
        let r = Retention {
            retained: Some(3),
            persistent: true,
            ..Default::default()
        };
        assert_eq!(r.to_string(), "retain 3, persistent");
        let r = Retention {
            max_count: Some(5),
            max_age_ms: Some(7 * 86_400_000),
            ..Default::default()
        };
        assert_eq!(r.to_string(), "max 5, max age 7d");
    }
}
