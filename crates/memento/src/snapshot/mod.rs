//! Capture and restore of one task's state: runtime → bytes → chunks in the
//! store, and back. The coordinator decides when; this module decides how.
//!
//! Capture is split in two so that the task is paused only for the first:
//! [`capture`] runs on the task's thread between two `process` calls and
//! returns the state's bytes; [`persist`] chunks and writes them to the store
//! on another thread while the task goes on processing.
//!
//! `captured` is what a capture produces, `capture` takes it (through the
//! task's [`NativeBase`], `base`, for native images: copy-on-write, full
//! or as a page delta, `delta`, against the last committed image;
//! canonical state streams through `stream` as the operator writes it,
//! laid out as `framing` says), `persist` writes it, `image` says what a
//! native image records and whether it fits a job, `restore` brings state
//! back (canonical pieces read through `source`).

mod base;
mod capture;
mod captured;
mod delta;
mod framing;
mod image;
mod persist;
mod restore;
mod source;
mod stream;

pub use base::{DELTA_CHAIN_ENV, NativeBase};
pub use capture::{capture, capture_at_barrier};
pub use captured::{CaptureError, Captured, CapturedState, MemoryPlan, Streamed};
pub use delta::{DELTA_PAGE, DeltaError, DeltaWriter, apply as apply_delta, delta_size};
pub use framing::{FRAMING_VERSION, FramingError};
pub use image::{
    ImageMismatch, NATIVE_IMAGE_VERSION, NATIVE_IMAGE_VERSION_WITH_GLOBALS, check_image, config_digest,
};
pub use persist::{PersistError, persist};
pub use restore::{RestoreError, restore, restore_native};

use crate::store::TaskKey;

/// The key of a task in manifests.
pub fn task_key(operator: &str, index: u32) -> TaskKey {
    TaskKey::new(operator, index)
}
