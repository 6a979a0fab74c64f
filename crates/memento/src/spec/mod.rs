//! The job file (TOML): parsing, defaults and validation.
//!
//! Unknown keys and bad values are rejected with the field named. Paths in a
//! job file are relative to the file's directory.

mod builder;
pub mod host_config;
mod units;

pub use builder::JobBuilder;

pub use units::{UnitError, excerpt, format_size, parse_cron, parse_duration, parse_size};

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};

use crate::io::{Custom, Sink, Source};

/// A job file could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read job file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// The TOML does not parse or a value is of the wrong shape.
    #[error("job file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// A value parses but is not allowed.
    #[error("job file {path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

/// A duration written as a human string ("2s", "500ms", "1h").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct HumanDuration(pub Duration);

impl From<HumanDuration> for String {
    fn from(d: HumanDuration) -> String {
        format!("{}ms", d.0.as_millis())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// A size written as a human string ("512MiB") or a plain number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HumanSize(pub u64);

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(HumanSize(n)),
            Raw::Text(s) => parse_size(&s).map(HumanSize).map_err(serde::de::Error::custom),
        }
    }
}

/// A parsed, validated job file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Job name: letters, digits, `_`, `-`, `.`; unique within a tenant.
    pub name: String,
    /// Where records come from.
    pub source: SourceSpec,
    /// The chain of operators, in order.
    pub operators: Vec<OperatorSpec>,
    /// Where records go.
    pub sink: SinkSpec,
    /// Checkpoint settings (`[checkpoints]`).
    #[serde(default)]
    pub checkpoints: CheckpointSpec,
    /// Savepoint settings (`[savepoints]`).
    #[serde(default)]
    pub savepoints: SavepointSpec,
    /// What to do when a task fails (`[restart]`).
    #[serde(default)]
    pub restart: RestartSpec,
    /// Sandbox limits per task (`[limits]`).
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Directory that relative paths are resolved against (the job file's).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[source]`: one of the source types.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceSpec {
    /// Lines of a text file.
    File {
        /// The input file.
        path: PathBuf,
        /// `lines` (default) or `jsonl`.
        #[serde(default)]
        format: FileFormat,
        /// `jsonl`: the field whose value is the key (strings as-is, other
        /// values as JSON text). Absent: the key is empty.
        #[serde(default)]
        key_field: Option<String>,
        /// `jsonl`: an integer field holding the event time in ms. Absent:
        /// the event time is the line number.
        #[serde(default)]
        timestamp_field: Option<String>,
        /// `lines`: split each line at the first occurrence of this string
        /// into key and value. Absent: key and value are the whole line.
        #[serde(default)]
        key_separator: Option<String>,
        /// Events per batch (default 1024).
        #[serde(default = "default_batch")]
        batch: usize,
    },
    /// Deterministic synthetic events.
    Generator {
        /// Number of events; absent means unbounded.
        #[serde(default)]
        count: Option<u64>,
        /// Events per second; absent means as fast as possible.
        #[serde(default)]
        rate: Option<f64>,
        /// Number of distinct keys (default 1000).
        #[serde(default = "default_keys")]
        keys: u64,
        /// Seed of the pseudo-random key sequence (default 0).
        #[serde(default)]
        seed: u64,
        /// Events per batch (default 1024).
        #[serde(default = "default_batch")]
        batch: usize,
    },
    /// An embedder's own source, given through the library
    /// ([`SourceSpec::custom`]); never in a job file.
    #[serde(skip)]
    Custom(Custom<dyn Source>),
}

impl SourceSpec {
    /// An embedder's own source, such as a [`crate::io::PushSource`].
    pub fn custom(source: impl Source + 'static) -> SourceSpec {
        SourceSpec::Custom(Custom(Arc::new(source)))
    }

    /// Whether the source can go back to a snapshot's position (see
    /// [`Source::can_seek`]); the built-in ones can.
    pub fn can_seek(&self) -> bool {
        match self {
            SourceSpec::Custom(c) => c.0.can_seek(),
            SourceSpec::File { .. } | SourceSpec::Generator { .. } => true,
        }
    }

    /// What the source is, for messages.
    pub fn describe(&self) -> String {
        match self {
            SourceSpec::Custom(c) => c.0.describe(),
            SourceSpec::File { path, .. } => format!("file source {}", path.display()),
            SourceSpec::Generator { .. } => "generator".into(),
        }
    }
}

fn default_batch() -> usize {
    1024
}
fn default_keys() -> u64 {
    1000
}

/// Format of a `file` source.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// One event per line.
    #[default]
    Lines,
    /// One JSON object per line.
    Jsonl,
}

/// `[[operators]]`: one stage of the chain.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OperatorSpec {
    /// Operator name, unique in the job.
    pub name: String,
    /// Path of the component (`.wasm`), relative to the job file.
    pub plugin: PathBuf,
    /// Number of tasks (default 1).
    #[serde(default = "one")]
    pub parallelism: u32,
    /// Number of key groups (`max_parallelism`): keys map to key groups,
    /// key groups to tasks in contiguous ranges. Fixed for the job's life:
    /// every snapshot records it and a restore with another value is
    /// refused. `None`: [`default_max_parallelism`] of `parallelism` (or,
    /// resuming from a snapshot, the value the snapshot recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallelism: Option<u32>,
    /// Passed to the operator's `open` as its config.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Directories the operator may read (`[[operators.grants]]`); none by
    /// default: a plugin gets no filesystem at all.
    #[serde(default)]
    pub grants: Vec<GrantSpec>,
}

/// The most key groups an operator may have (Flink's limit).
pub const MAX_KEY_GROUPS: u32 = 32_768;

/// Flink's default number of key groups for `parallelism` tasks:
/// `parallelism × 1.5` rounded up to a power of two, at least 128 and at
/// most [`MAX_KEY_GROUPS`]. Room to scale up later without hot spots.
pub fn default_max_parallelism(parallelism: u32) -> u32 {
    let wanted = u64::from(parallelism) + u64::from(parallelism).div_ceil(2);
    wanted.next_power_of_two().clamp(128, u64::from(MAX_KEY_GROUPS)) as u32
}

impl OperatorSpec {
    /// The key groups of a fresh run: `max_parallelism` if set, else
    /// [`default_max_parallelism`].
    pub fn key_groups(&self) -> u32 {
        self.max_parallelism
            .unwrap_or_else(|| default_max_parallelism(self.parallelism))
    }
}

/// `[[operators.grants]]`: a directory the operator may read, for lookup
/// data. Read-only: output goes through the sink, state through snapshots.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    /// The directory, relative to the job file's directory and inside it
    /// (no absolute paths, no `..`; symlinks leading out are refused when
    /// the job is loaded).
    pub dir: PathBuf,
    /// Where the plugin sees it: an absolute guest path such as `/data`.
    pub guest: String,
    /// Must be `true` (the default): write grants are not offered.
    #[serde(default = "yes")]
    pub read_only: bool,
}

impl GrantSpec {
    /// The granted directory on the host, canonical, checked to lie inside
    /// `base_dir` (the job file's directory) after following symlinks.
    ///
    /// # Errors
    /// [`GrantError`]: why the directory cannot be granted.
    pub fn resolve(&self, base_dir: &Path) -> Result<PathBuf, GrantError> {
        let base = base_dir.canonicalize().map_err(|source| GrantError::Base {
            dir: base_dir.to_path_buf(),
            source,
        })?;
        let dir = base
            .join(&self.dir)
            .canonicalize()
            .map_err(|source| GrantError::Unreadable {
                dir: base_dir.join(&self.dir),
                source,
            })?;
        if !dir.starts_with(&base) {
            return Err(GrantError::Outside {
                dir: self.dir.clone(),
                target: dir,
                base,
            });
        }
        if !dir.is_dir() {
            return Err(GrantError::NotADirectory(dir));
        }
        Ok(dir)
    }
}

/// Why a `[[operators.grants]]` directory cannot be granted.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The job file's own directory does not resolve.
    #[error("cannot resolve the job file's directory {}: {source}", dir.display())]
    Base {
        /// The job file's directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The granted directory does not resolve (missing, unreadable).
    #[error("{}: {source}", dir.display())]
    Unreadable {
        /// The directory as the job file names it, joined to its directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It leads outside the job file's directory (through `..` or a
    /// symlink).
    #[error("{} leads to {}, outside the job file's directory {}", dir.display(), target.display(), base.display())]
    Outside {
        /// The directory as the job file names it.
        dir: PathBuf,
        /// Where it leads.
        target: PathBuf,
        /// The job file's directory.
        base: PathBuf,
    },
    /// It is a file, not a directory.
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
}

fn one() -> u32 {
    1
}

/// `[sink]`: where the output goes.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkSpec {
    /// A directory of part files, one per task of the last operator.
    File {
        /// The output directory (created if missing).
        path: PathBuf,
    },
    // Struct variants, not unit ones: serde ignores unknown keys beside the
    // tag of a unit variant even under `deny_unknown_fields`.
    /// Standard output.
    Stdout {},
    /// Discard everything.
    Null {},
    /// An embedder's own sink, given through the library
    /// ([`SinkSpec::custom`]); never in a job file.
    #[serde(skip)]
    Custom(Custom<dyn Sink>),
}

impl SinkSpec {
    /// An embedder's own sink, such as a [`crate::io::CallbackSink`].
    pub fn custom(sink: impl Sink + 'static) -> SinkSpec {
        SinkSpec::Custom(Custom(Arc::new(sink)))
    }
}

/// Snapshot format.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotFormat {
    /// The operator's own bytes from `snapshot-state`: portable across
    /// plugin versions.
    Canonical,
    /// The host's image of the linear memories: no guest code runs, but the
    /// snapshot restores only into the identical component.
    Native,
    /// Per task, native where the component allows it (see
    /// `LoadedComponent::native_support`) and the guest holds no host
    /// resources at that moment; canonical otherwise.
    Auto,
}

/// `[checkpoints]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Time between the triggers of periodic checkpoints (as in Flink: not
    /// from the end of the previous one); absent means none.
    #[serde(default)]
    pub interval: Option<HumanDuration>,
    /// A checkpoint not complete within this is aborted (default 10m).
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Minimum pause between the end of one checkpoint and the start of the
    /// next; a checkpoint that outlasts the interval is followed this long
    /// after it ends.
    #[serde(default = "zero")]
    pub min_pause: HumanDuration,
    /// Consecutive failed checkpoints tolerated before the job fails.
    #[serde(default)]
    pub tolerable_failures: u32,
    /// Number of completed checkpoints kept (default 1).
    #[serde(default = "one")]
    pub retained: u32,
    /// Keep checkpoints when the job is cancelled or fails (default true).
    #[serde(default = "yes")]
    pub persistent: bool,
    /// Snapshot format (default auto: native where the component allows it).
    #[serde(default = "auto")]
    pub format: SnapshotFormat,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            interval: None,
            timeout: default_timeout(),
            min_pause: zero(),
            tolerable_failures: 0,
            retained: 1,
            persistent: true,
            format: SnapshotFormat::Auto,
        }
    }
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}
fn zero() -> HumanDuration {
    HumanDuration(Duration::ZERO)
}
fn yes() -> bool {
    true
}
fn auto() -> SnapshotFormat {
    SnapshotFormat::Auto
}
fn canonical() -> SnapshotFormat {
    SnapshotFormat::Canonical
}

/// `[savepoints]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SavepointSpec {
    /// Time between periodic savepoints.
    #[serde(default)]
    pub interval: Option<HumanDuration>,
    /// Cron expression for periodic savepoints (instead of `interval`).
    #[serde(default)]
    pub cron: Option<String>,
    /// Keep at most this many savepoints (the newest is always kept).
    #[serde(default)]
    pub max_count: Option<u32>,
    /// Dispose savepoints older than this (the newest is always kept).
    #[serde(default)]
    pub max_age: Option<HumanDuration>,
    /// Snapshot format (default canonical: portable across plugin versions).
    #[serde(default = "canonical")]
    pub format: SnapshotFormat,
}

impl Default for SavepointSpec {
    fn default() -> Self {
        SavepointSpec {
            interval: None,
            cron: None,
            max_count: None,
            max_age: None,
            format: SnapshotFormat::Canonical,
        }
    }
}

/// Restart strategy.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RestartStrategy {
    /// Fail the job on the first task failure.
    #[default]
    None,
    /// Restart up to `attempts` times with a fixed `delay`.
    Fixed,
    /// Restart with exponentially growing delays.
    Exponential,
}

/// The most events a source may put in one batch: batches sit in bounded
/// channels between every two stages, so their size is host memory a job
/// holds beyond its plugins' (a 30-million-event batch grew a host by 3 GiB).
pub const MAX_BATCH: usize = 65_536;

/// The most restarts `[restart] attempts` may allow: a job that failed this
/// often is not going to recover by itself.
pub const MAX_RESTART_ATTEMPTS: u32 = 10_000;

/// `[restart]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RestartSpec {
    /// The strategy (default none).
    #[serde(default)]
    pub strategy: RestartStrategy,
    /// Maximum number of restarts (default 3).
    #[serde(default = "three")]
    pub attempts: u32,
    /// Delay before a restart (default 1s); the first delay when exponential.
    #[serde(default = "one_second")]
    pub delay: HumanDuration,
    /// Upper bound of the exponential delay (default 1m).
    #[serde(default = "one_minute")]
    pub max_delay: HumanDuration,
    /// Growth factor of the exponential delay (default 2.0).
    #[serde(default = "two")]
    pub multiplier: f64,
    /// Random fraction added to each delay, 0.0–1.0 (default 0.1).
    #[serde(default = "tenth")]
    pub jitter: f64,
}

impl Default for RestartSpec {
    fn default() -> Self {
        RestartSpec {
            strategy: RestartStrategy::None,
            attempts: three(),
            delay: one_second(),
            max_delay: one_minute(),
            multiplier: two(),
            jitter: tenth(),
        }
    }
}

fn three() -> u32 {
    3
}
fn one_second() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn one_minute() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn two() -> f64 {
    2.0
}
fn tenth() -> f64 {
    0.1
}

/// `[limits]`: sandbox limits of each task. Every limit bounds one task
/// instance; exceeding one fails the task with an error naming the limit,
/// and the job follows its restart strategy.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Maximum linear memory per instance (default 512MiB).
    #[serde(default = "default_memory")]
    pub memory: HumanSize,
    /// Deadline of one call into a plugin (default 10s).
    #[serde(default = "default_call_timeout")]
    pub call_timeout: HumanDuration,
    /// Wasm instructions per call (wasmtime fuel); absent: unmetered. Needs
    /// a host with fuel metering on.
    #[serde(default)]
    pub fuel: Option<u64>,
    /// Bytes one `process` or `close` call may return: keys and values plus
    /// 56 per event (default 64MiB).
    #[serde(default = "default_max_output")]
    pub max_output: HumanSize,
    /// Bytes one `snapshot-state` call may return (default: `memory`).
    #[serde(default)]
    pub max_snapshot: Option<HumanSize>,
    /// Core instances per task (default 64; a component is several).
    #[serde(default = "sixty_four")]
    pub max_instances: u32,
    /// Tables per task (default 64).
    #[serde(default = "sixty_four")]
    pub max_tables: u32,
    /// Linear memories per task (default 16).
    #[serde(default = "sixteen")]
    pub max_memories: u32,
    /// Elements of one table (default 100000).
    #[serde(default = "default_table_elements")]
    pub max_table_elements: u32,
    /// Live host resources (WASI streams, pollables, ...) per task
    /// (default 1024).
    #[serde(default = "default_resources")]
    pub max_resources: u32,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            memory: default_memory(),
            call_timeout: default_call_timeout(),
            fuel: None,
            max_output: default_max_output(),
            max_snapshot: None,
            max_instances: sixty_four(),
            max_tables: sixty_four(),
            max_memories: sixteen(),
            max_table_elements: default_table_elements(),
            max_resources: default_resources(),
        }
    }
}

fn default_max_output() -> HumanSize {
    HumanSize(64 << 20)
}
fn sixty_four() -> u32 {
    64
}
fn sixteen() -> u32 {
    16
}
fn default_table_elements() -> u32 {
    100_000
}
fn default_resources() -> u32 {
    1024
}

fn default_memory() -> HumanSize {
    HumanSize(512 << 20)
}
fn default_call_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// A job, operator or plugin name that is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} {reason}")]
pub struct NameError {
    /// The name, cut to its first 80 characters.
    pub name: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Names of jobs and operators: they end up in snapshot ids and file names.
///
/// # Errors
/// [`NameError`] saying what is wrong.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let bad = |reason: String| NameError {
        name: excerpt(name, 80),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("must be 1 to 64 characters long".into()));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(bad("must not start with '.' or '-'".into()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(bad(format!(
            "contains {c:?} (allowed: letters, digits, '_', '-', '.')"
        )));
    }
    Ok(())
}

impl JobSpec {
    /// Read and validate a job file; relative paths resolve against its
    /// directory.
    ///
    /// # Errors
    /// [`SpecError`] naming the file, the field and the reason.
    pub fn from_file(path: &Path) -> Result<JobSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_toml(&text, path, &base)
    }

    /// Parse and validate job-file text. `origin` names it in errors;
    /// `base_dir` anchors relative paths.
    ///
    /// # Errors
    /// [`SpecError`] naming `origin`, the field and the reason.
    pub fn from_toml(text: &str, origin: &Path, base_dir: &Path) -> Result<JobSpec, SpecError> {
        let mut spec: JobSpec = parse_toml(text).map_err(|reason| SpecError::Parse {
            path: origin.to_path_buf(),
            reason,
        })?;
        spec.base_dir = base_dir.to_path_buf();
        spec.validate().map_err(|(field, reason)| SpecError::Invalid {
            path: origin.to_path_buf(),
            field,
            reason,
        })?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, reason: String| Err((field.to_string(), reason));
        if let Err(r) = validate_name(&self.name) {
            return bad("name", r.to_string());
        }
        if self.operators.is_empty() {
            return bad("operators", "a job needs at least one [[operators]] entry".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, op) in self.operators.iter().enumerate() {
            let field = |f: &str| format!("operators[{i}].{f}");
            if let Err(r) = validate_name(&op.name) {
                return bad(&field("name"), r.to_string());
            }
            if !seen.insert(op.name.as_str()) {
                return bad(&field("name"), format!("{:?} is used by two operators", op.name));
            }
            if op.parallelism == 0 {
                return bad(&field("parallelism"), "must be at least 1".into());
            }
            if op.parallelism > 256 {
                return bad(
                    &field("parallelism"),
                    format!("{} is more than the maximum of 256", op.parallelism),
                );
            }
            if let Some(m) = op.max_parallelism {
                if m < op.parallelism {
                    return bad(
                        &field("max_parallelism"),
                        format!(
                            "{m} is less than the operator's parallelism of {}",
                            op.parallelism
                        ),
                    );
                }
                if m > MAX_KEY_GROUPS {
                    return bad(
                        &field("max_parallelism"),
                        format!("{m} is more than the maximum of {MAX_KEY_GROUPS}"),
                    );
                }
            }
            if op.plugin.as_os_str().is_empty() {
                return bad(&field("plugin"), "must name a component file".into());
            }
            let mut guests = std::collections::BTreeSet::new();
            for (j, g) in op.grants.iter().enumerate() {
                let field = |f: &str| format!("operators[{i}].grants[{j}].{f}");
                if !g.read_only {
                    return bad(
                        &field("read_only"),
                        "only read-only grants are offered (output goes through the sink)".into(),
                    );
                }
                if g.dir.as_os_str().is_empty()
                    || g.dir.is_absolute()
                    || g.dir
                        .components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
                {
                    return bad(
                        &field("dir"),
                        format!(
                            "{} must be a relative path inside the job file's directory (no `..`)",
                            g.dir.display()
                        ),
                    );
                }
                if !g.guest.starts_with('/') || g.guest.split('/').any(|c| c == "..") {
                    return bad(
                        &field("guest"),
                        format!("{:?} must be an absolute guest path such as \"/data\"", g.guest),
                    );
                }
                if !guests.insert(g.guest.as_str()) {
                    return bad(&field("guest"), format!("{:?} is granted twice", g.guest));
                }
            }
        }
        match &self.source {
            SourceSpec::File { batch, path, .. } => {
                if !(1..=MAX_BATCH).contains(batch) {
                    return bad(
                        "source.batch",
                        format!("{batch} is not within 1..={MAX_BATCH} events"),
                    );
                }
                if path.as_os_str().is_empty() {
                    return bad("source.path", "must name the input file".into());
                }
            }
            SourceSpec::Generator {
                batch, rate, keys, ..
            } => {
                if !(1..=MAX_BATCH).contains(batch) {
                    return bad(
                        "source.batch",
                        format!("{batch} is not within 1..={MAX_BATCH} events"),
                    );
                }
                if *keys == 0 {
                    return bad("source.keys", "must be at least 1".into());
                }
                if let Some(r) = rate
                    && !(r.is_finite() && *r > 0.0)
                {
                    return bad(
                        "source.rate",
                        format!("{r} is not a positive number of events per second"),
                    );
                }
            }
            SourceSpec::Custom(_) => {}
        }
        if self.checkpoints.retained == 0 {
            return bad("checkpoints.retained", "must be at least 1".into());
        }
        if let Some(i) = self.checkpoints.interval
            && i.0 < Duration::from_millis(10)
        {
            return bad("checkpoints.interval", "must be at least 10ms".into());
        }
        if self.savepoints.interval.is_some() && self.savepoints.cron.is_some() {
            return bad("savepoints", "set either `interval` or `cron`, not both".into());
        }
        if let Some(expr) = &self.savepoints.cron
            && let Err(e) = parse_cron(expr)
        {
            return bad("savepoints.cron", e.to_string());
        }
        if self.savepoints.max_count == Some(0) {
            return bad(
                "savepoints.max_count",
                "must be at least 1 (the newest savepoint is always kept)".into(),
            );
        }
        let r = &self.restart;
        if r.attempts > MAX_RESTART_ATTEMPTS {
            return bad(
                "restart.attempts",
                format!(
                    "{} is more than the most allowed, {MAX_RESTART_ATTEMPTS}",
                    r.attempts
                ),
            );
        }
        if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
            return bad(
                "restart.multiplier",
                format!("{} must be at least 1.0", r.multiplier),
            );
        }
        if !(0.0..=1.0).contains(&r.jitter) {
            return bad(
                "restart.jitter",
                format!("{} must be between 0.0 and 1.0", r.jitter),
            );
        }
        if self.limits.memory.0 < (1 << 16) {
            return bad(
                "limits.memory",
                format!(
                    "{} bytes is less than one wasm page (64KiB)",
                    self.limits.memory.0
                ),
            );
        }
        if self.limits.call_timeout.0 < Duration::from_millis(10) {
            return bad("limits.call_timeout", "must be at least 10ms".into());
        }
        let l = &self.limits;
        if l.fuel == Some(0) {
            return bad("limits.fuel", "must be at least 1".into());
        }
        if l.max_output.0 < 1024 {
            return bad("limits.max_output", "must be at least 1KiB".into());
        }
        if l.max_snapshot.is_some_and(|s| s.0 < 1024) {
            return bad("limits.max_snapshot", "must be at least 1KiB".into());
        }
        for (key, v) in [
            ("max_instances", l.max_instances),
            ("max_tables", l.max_tables),
            ("max_memories", l.max_memories),
            ("max_table_elements", l.max_table_elements),
            ("max_resources", l.max_resources),
        ] {
            if v == 0 {
                return bad(&format!("limits.{key}"), "must be at least 1".into());
            }
        }
        Ok(())
    }

    /// Resolve a path from the job file against the file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// Parallelism of the last operator: the number of sink part files.
    pub fn sink_parallelism(&self) -> u32 {
        self.operators.last().map_or(1, |o| o.parallelism)
    }
}

/// Parse TOML `text` into `T`; an error is one line naming the key that is
/// wrong (`source.count`, `operators[0].parallelism`), its line and column
/// in `text`, and the reason.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error_one_line(&e, text))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let reason = toml_error_one_line(e.inner(), text);
        if path.is_empty() || path == "." {
            reason
        } else {
            format!("`{path}`: {reason}")
        }
    })
}

/// toml's errors span several lines (with a source excerpt); keep the
/// message and where it is.
fn toml_error_one_line(e: &toml::de::Error, text: &str) -> String {
    let msg = shorten_quotes(&e.message().trim().replace('\n', " "), 60);
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{msg} (line {line}, column {column})")
        }
        None => msg,
    }
}

/// `msg` with every quoted value longer than `max` characters cut to an
/// [`excerpt`]: serde's messages quote the offending value whole.
fn shorten_quotes(msg: &str, max: usize) -> String {
    let mut out = String::with_capacity(msg.len().min(1024));
    let mut rest = msg;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let mut close = None;
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    close = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(close) = close else { break };
        out.push_str(&excerpt(&rest[..close], max));
        out.push('"');
        rest = &rest[close + 1..];
    }
    out.push_str(&excerpt(rest, 1024));
    out
}

impl fmt::Display for SnapshotFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SnapshotFormat::Canonical => "canonical",
            SnapshotFormat::Native => "native",
            SnapshotFormat::Auto => "auto",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "wc"
[source]
type = "generator"
count = 100
[[operators]]
name = "count"
plugin = "wordcount.wasm"
[sink]
type = "null"
"#;

    fn parse(text: &str) -> Result<JobSpec, SpecError> {
        JobSpec::from_toml(text, Path::new("job.toml"), Path::new("/jobs"))
    }

    /// A value of the wrong type names its key and where it is.
    #[test]
    fn type_errors_name_the_key_and_line() {
        let text = MINIMAL.replace(
            "plugin = \"wordcount.wasm\"",
            "plugin = \"wordcount.wasm\"\nparallelism = \"2\"",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("`operators[0].parallelism`: invalid type: string \"2\""),
            "{err}"
        );
        assert!(err.contains("(line 9, column 15)"), "{err}");
        let err = parse(&format!("{MINIMAL}[checkpoints]\ninterval = \"5xx\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`checkpoints.interval`: invalid duration \"5xx\""),
            "{err}"
        );
    }

    #[test]
    fn minimal_job_gets_defaults() {
        let spec = parse(MINIMAL).unwrap();
        assert_eq!(spec.operators[0].parallelism, 1);
        assert_eq!(spec.operators[0].max_parallelism, None);
        assert_eq!(spec.operators[0].key_groups(), 128);
        assert_eq!(spec.checkpoints.retained, 1);
        assert!(spec.checkpoints.persistent);
        assert_eq!(spec.limits.call_timeout.0, Duration::from_secs(10));
        assert_eq!(
            spec.resolve(&spec.operators[0].plugin),
            Path::new("/jobs/wordcount.wasm")
        );
        assert!(matches!(
            spec.source,
            SourceSpec::Generator {
                count: Some(100),
                keys: 1000,
                batch: 1024,
                ..
            }
        ));
    }

    #[test]
    fn full_job_parses() {
        let text = r#"
name = "clicks"
[source]
type = "file"
path = "in.jsonl"
format = "jsonl"
key_field = "user"
timestamp_field = "ts"
[[operators]]
name = "dedup"
plugin = "dedup.wasm"
parallelism = 2
[operators.config]
max_keys = "1000"
[[operators]]
name = "sum"
plugin = "window-sum.wasm"
[sink]
type = "file"
path = "out"
[checkpoints]
interval = "2s"
timeout = "1m"
retained = 3
format = "native"
[savepoints]
cron = "0 * * * *"
max_count = 5
max_age = "7d"
[restart]
strategy = "exponential"
delay = "100ms"
[limits]
memory = "64MiB"
call_timeout = "500ms"
"#;
        let spec = parse(text).unwrap();
        assert_eq!(spec.operators[0].config["max_keys"], "1000");
        assert_eq!(spec.checkpoints.interval.unwrap().0, Duration::from_secs(2));
        assert_eq!(spec.checkpoints.format, SnapshotFormat::Native);
        assert_eq!(spec.savepoints.max_age.unwrap().0, Duration::from_secs(7 * 86400));
        assert_eq!(spec.limits.memory.0, 64 << 20);
        assert_eq!(spec.restart.strategy, RestartStrategy::Exponential);
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = err(&MINIMAL.replace("count = 100", "count = 100\nspeed = 3"));
        assert!(e.contains("unknown field `speed`"), "{e}");
        let e = err(&format!("{MINIMAL}\n[checkpoints]\nintervall = \"1s\""));
        assert!(e.contains("unknown field `intervall`"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = err(&format!("{MINIMAL}\n[checkpoints]\ninterval = \"2 fortnights\""));
        assert!(e.contains("invalid duration \"2 fortnights\""), "{e}");
        let e = err(&format!("{MINIMAL}\n[limits]\nmemory = \"lots\""));
        assert!(e.contains("invalid size \"lots\""), "{e}");
        let e = err(&MINIMAL.replace(
            "plugin = \"wordcount.wasm\"",
            "plugin = \"wordcount.wasm\"\nparallelism = 0",
        ));
        assert!(e.contains("operators[0].parallelism: must be at least 1"), "{e}");
        let e = err(&MINIMAL.replace("plugin = \"wordcount.wasm\"\n", ""));
        assert!(e.contains("missing field `plugin`"), "{e}");
        let e = err(&MINIMAL.replace("name = \"wc\"", "name = \"../evil\""));
        assert!(e.contains("name: \"../evil\""), "{e}");
        let e = err(&MINIMAL.replace("type = \"null\"", "type = \"kafka\""));
        assert!(e.contains("unknown variant `kafka`"), "{e}");
        let e = err(&MINIMAL.replace("type = \"null\"", "type = \"null\"\npath = \"out\""));
        assert!(e.contains("unknown field `path`"), "{e}");
        let e = err(&MINIMAL.replace("type = \"null\"", "type = \"stdout\"\nformat = \"csv\""));
        assert!(e.contains("unknown field `format`"), "{e}");
        let huge = "x".repeat(1 << 20);
        let e = err(&MINIMAL.replace(
            "plugin = \"wordcount.wasm\"",
            &format!("plugin = \"wordcount.wasm\"\nparallelism = \"{huge}\""),
        ));
        assert!(
            e.contains("invalid type: string \"xxxx") && e.contains("…\", expected"),
            "{}",
            &e[..200.min(e.len())]
        );
        assert!(
            e.len() < 400,
            "a long value is cut, not echoed ({} bytes)",
            e.len()
        );
        let e = err(&MINIMAL.replace("name = \"wc\"", &format!("name = \"{huge}\"")));
        assert!(e.len() < 400, "a long name is cut ({} bytes)", e.len());
        let e = err(&MINIMAL.replace("count = 100", "count = 100\nbatch = 30000000"));
        assert!(
            e.contains("source.batch: 30000000 is not within 1..=65536 events"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}\n[restart]\njitter = 2.0"));
        assert!(e.contains("restart.jitter"), "{e}");
        let e = err(&format!("{MINIMAL}\n[restart]\nattempts = 4294967295"));
        assert!(
            e.contains("restart.attempts: 4294967295 is more than the most allowed, 10000"),
            "{e}"
        );
    }

    #[test]
    fn sandbox_limits_parse_with_defaults_and_bounds() {
        let spec = parse(MINIMAL).unwrap();
        assert_eq!(spec.limits, LimitsSpec::default());
        assert_eq!(spec.limits.max_output.0, 64 << 20);
        assert_eq!(spec.limits.max_snapshot, None);
        assert_eq!(spec.limits.fuel, None);
        let spec = parse(&format!(
            "{MINIMAL}\n[limits]\nfuel = 1000000\nmax_output = \"1MiB\"\nmax_snapshot = \"2MiB\"\n\
             max_instances = 8\nmax_tables = 9\nmax_memories = 2\nmax_table_elements = 500\nmax_resources = 10"
        ))
        .unwrap();
        let l = &spec.limits;
        assert_eq!(l.fuel, Some(1_000_000));
        assert_eq!((l.max_output.0, l.max_snapshot.unwrap().0), (1 << 20, 2 << 20));
        assert_eq!(
            (
                l.max_instances,
                l.max_tables,
                l.max_memories,
                l.max_table_elements,
                l.max_resources
            ),
            (8, 9, 2, 500, 10)
        );
        let e = err(&format!("{MINIMAL}\n[limits]\nmax_resources = 0"));
        assert!(e.ends_with("limits.max_resources: must be at least 1"), "{e}");
        let e = err(&format!("{MINIMAL}\n[limits]\nmax_output = 10"));
        assert!(e.ends_with("limits.max_output: must be at least 1KiB"), "{e}");
    }

    #[test]
    fn grants_are_read_only_relative_and_distinct() {
        let grant = |body: &str| {
            MINIMAL.replace(
                "plugin = \"wordcount.wasm\"\n",
                &format!("plugin = \"wordcount.wasm\"\n[[operators.grants]]\n{body}\n"),
            )
        };
        let spec = parse(&grant("dir = \"data\"\nguest = \"/data\"")).unwrap();
        assert_eq!(spec.operators[0].grants[0].dir, Path::new("data"));
        assert!(spec.operators[0].grants[0].read_only);
        for (body, why) in [
            (
                "dir = \"/etc\"\nguest = \"/etc\"",
                "grants[0].dir: /etc must be a relative path",
            ),
            (
                "dir = \"a/../../b\"\nguest = \"/b\"",
                "grants[0].dir: a/../../b must be a relative path",
            ),
            (
                "dir = \"data\"\nguest = \"data\"",
                "grants[0].guest: \"data\" must be an absolute guest path",
            ),
            (
                "dir = \"data\"\nguest = \"/data\"\nread_only = false",
                "grants[0].read_only: only read-only",
            ),
        ] {
            let e = err(&grant(body));
            assert!(e.contains(why), "{body}: {e}");
        }
    }

    #[test]
    fn default_max_parallelism_follows_flinks_rule() {
        for (p, k) in [
            (1, 128),
            (2, 128),
            (85, 128),
            (86, 256),
            (200, 512),
            (256, 512),
            (30_000, 32_768),
        ] {
            assert_eq!(default_max_parallelism(p), k, "parallelism {p}");
        }
    }

    #[test]
    fn max_parallelism_is_validated() {
        let job = |extra: &str| {
            format!(
                "name = \"j\"\n[source]\ntype = \"generator\"\n[[operators]]\nname = \"c\"\n\
                 plugin = \"c.wasm\"\nparallelism = 4\n{extra}\n[sink]\ntype = \"null\"\n"
            )
        };
        let spec =
            JobSpec::from_toml(&job("max_parallelism = 16"), "job.toml".as_ref(), ".".as_ref()).unwrap();
        assert_eq!(spec.operators[0].key_groups(), 16);
        let err = JobSpec::from_toml(&job("max_parallelism = 3"), "job.toml".as_ref(), ".".as_ref())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("operators[0].max_parallelism: 3 is less than the operator's parallelism of 4"),
            "{err}"
        );
        let err = JobSpec::from_toml(&job("max_parallelism = 40000"), "job.toml".as_ref(), ".".as_ref())
            .unwrap_err()
            .to_string();
        assert!(err.contains("40000 is more than the maximum of 32768"), "{err}");
    }
}
