//! What a task instance may cost the host and what it is granted.

use std::path::PathBuf;
use std::time::Duration;

use crate::batch::Event;

/// Limits applied to every task instance, and the capabilities granted to
/// it (nothing unless `grants` says so).
///
/// Every limit bounds what one task can cost the host: a guest that hits
/// one traps (its instance is poisoned) with a [`crate::RuntimeError`] naming the
/// limit, the task and the phase; the host and other tasks are unaffected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Maximum size of each linear memory of an instance, in bytes.
    /// Growth beyond it traps the instance with a "memory limit" error.
    pub memory_bytes: u64,
    /// Maximum wall time of one call into the guest. An overrun traps the
    /// instance with a "deadline exceeded" error.
    pub call_timeout: Duration,
    /// Maximum wasm instructions (wasmtime fuel units, roughly one per
    /// instruction) of one call; `None`: unmetered. Needs a runtime created
    /// with [`crate::RuntimeOptions::fuel`] on.
    pub fuel: Option<u64>,
    /// Maximum bytes the host copies out of one `process` or `close` result:
    /// keys and values plus [`EVENT_OVERHEAD`] per event. Checked while the
    /// result is copied, before the host allocates it.
    pub max_output: u64,
    /// Maximum bytes of one `snapshot-state` result; `None`: the memory
    /// limit (a guest cannot return more than its memory anyway).
    pub max_snapshot: Option<u64>,
    /// Maximum core instances per store (a component is several).
    pub max_instances: usize,
    /// Maximum tables per store.
    pub max_tables: usize,
    /// Maximum linear memories per store.
    pub max_memories: usize,
    /// Maximum elements of one table.
    pub max_table_elements: usize,
    /// Maximum live host resources (WASI streams, pollables, descriptors,
    /// ...) and component handles per store.
    pub max_resources: usize,
    /// Directories the guest may read (preopened read-only); empty: no
    /// filesystem at all.
    pub grants: Vec<DirGrant>,
}

/// Host bytes counted per event of a `process`/`close` result beyond its key
/// and value: the size of the host's event record, which is what wasmtime
/// charges per list element while copying.
pub const EVENT_OVERHEAD: u64 = std::mem::size_of::<Event>() as u64;

/// A host directory the guest may read, at a path of its own.
///
/// Granted read-only (`FsPerms::ReadOnly`: no file opened for writing, no
/// entry created, renamed or removed) through wasmtime-wasi's preopens,
/// which resolve every guest path with `cap-std`: `..`, absolute paths and
/// symlinks cannot leave the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirGrant {
    /// The directory on the host (already confined by the caller).
    pub host: PathBuf,
    /// Where the guest sees it, e.g. `/data`.
    pub guest: String,
}

impl Default for SandboxLimits {
    /// 512 MiB of memory, 10 s per call, no fuel metering, 64 MiB of output
    /// per call, snapshots up to the memory limit, 64 instances, 64
    /// tables, 16 memories, 100 000 table elements, 1 024 host resources,
    /// nothing granted.
    fn default() -> Self {
        SandboxLimits {
            memory_bytes: 512 << 20,
            call_timeout: Duration::from_secs(10),
            fuel: None,
            max_output: 64 << 20,
            max_snapshot: None,
            max_instances: 64,
            max_tables: 64,
            max_memories: 16,
            max_table_elements: 100_000,
            max_resources: 1024,
            grants: Vec::new(),
        }
    }
}
