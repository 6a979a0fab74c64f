//! The Wasm side of the host: one wasmtime engine, component loading and
//! validation against the `memento:operator` contract, and sandboxed task
//! instances with a memory limit and a per-call deadline.
//!
//! This module knows nothing of the store, of jobs or of dataflow: it turns
//! component bytes into [`TaskInstance`]s and reports what went wrong in
//! terms a plugin author can act on ([`RuntimeError`]).

mod batch;
mod bindings;
mod cache;
mod component;
mod cow;
mod data;
mod disk_cache;
mod engine;
mod error;
mod host_state;
mod instance;
mod instrument;
mod label;
mod limits;
mod memory;
mod native;
mod state;
#[doc(hidden)]
pub mod uffd;

pub use batch::{Event, MalformedBatch};
pub use bindings::{Context, KeyGroupRange};
pub use component::{
    CONTRACT_PACKAGE, ComponentInfo, ContractVersion, LoadedComponent, OPERATOR_INTERFACE, SNAPSHOT_INTERFACE,
};
pub use cow::{PageBytes, StaleBarrier};
pub use disk_cache::DiskCacheStats;
pub use engine::{Runtime, RuntimeOptions};
pub use error::{NativeRefusal, RuntimeError};
pub use instance::{
    CallStats, CapturedMemory, CowCapture, CowMemory, DISABLE_TRACKING_ENV, GlobalValues, PAGE, TaskInstance,
    WrittenPages,
};
pub use instrument::{GlobalKind, GlobalLayout, GlobalSlot};
pub use label::{Phase, TaskLabel};
pub use limits::{DirGrant, EVENT_OVERHEAD, SandboxLimits};
#[doc(hidden)]
pub use memory::HostMemoryCreator;
pub use memory::prefaulted_buffer;
pub use native::NativeUnsupported;
pub use state::{MAX_PIECE, Piece, StateSink, StateSource};

/// Set to `1` (`.ci/run` does) to make a test fail, instead of skipping its
/// incremental part, where write tracking is unavailable: CI must never
/// go green without exercising incremental capture.
pub const REQUIRE_TRACKING_ENV: &str = "MEMENTO_REQUIRE_UFFD";

/// For tests: says that write tracking is unavailable and what is
/// therefore not tested; panics instead when [`REQUIRE_TRACKING_ENV`] is `1`.
#[doc(hidden)]
pub fn tracking_unavailable(consequence: &str) {
    let why = "copy-on-write tracking (userfaultfd write-protect of anonymous memory, unprivileged) is unavailable here";
    if std::env::var(REQUIRE_TRACKING_ENV).is_ok_and(|v| v == "1") {
        panic!("{why} but {REQUIRE_TRACKING_ENV}=1 requires it");
    }
    eprintln!("{why}: {consequence}");
}
