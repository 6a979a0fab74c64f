//! Capture of a task's state at a barrier, on the task's thread between
//! two calls: the pause of a snapshot.

use crate::runtime::{RuntimeError, TaskInstance};
use crate::spec::SnapshotFormat;
use crate::store::BlobWriter;

use super::base::NativeBase;
use super::captured::{CaptureError, Captured, CapturedState, Streamed, native_error};
use super::stream;

/// Capture the task's state in `format` (task thread, instance quiescent)
/// for the snapshot `writer` writes, copying the whole memory for native;
/// `auto` means canonical here (it needs a task's base: see
/// [`capture_at_barrier`]).
///
/// Canonical state streams into `writer`'s snapshot while the operator
/// writes it (chunked and stored on an upload thread): the pause is the
/// serialization, and neither guest nor host holds the state twice.
/// Native format copies the linear memories and runs no guest code, so it
/// works for operators whose `snapshot-state` fails.
///
/// # Errors
/// [`CaptureError::Declined`] when the operator refuses or the format is not
/// possible for this instance (the reason names the component or the host
/// resources the guest holds); [`CaptureError::Failed`] when the instance
/// traps.
pub fn capture(
    instance: &mut TaskInstance,
    format: SnapshotFormat,
    writer: &BlobWriter,
) -> Result<Captured, CaptureError> {
    let started = std::time::Instant::now();
    let mut globals = None;
    let state = match format {
        SnapshotFormat::Canonical | SnapshotFormat::Auto => {
            let (sink, upload) = stream::start(writer.clone())
                .map_err(|e| CaptureError::Declined(format!("cannot start the state upload: {e}")))?;
            let unkeyed = sink.unkeyed();
            match instance.snapshot_state_to(Box::new(sink)) {
                Ok(written) => CapturedState::Canonical(Streamed {
                    written,
                    unkeyed: unkeyed.load(std::sync::atomic::Ordering::Relaxed),
                    upload,
                }),
                Err(RuntimeError::Guest { message, task, .. }) => {
                    return Err(CaptureError::Declined(format!(
                        "{task}: snapshot-state declined: {message}"
                    )));
                }
                Err(e) => return Err(CaptureError::Failed(Box::new(e))),
            }
        }
        SnapshotFormat::Native => {
            let memories = instance.capture_memories().map_err(native_error)?;
            globals = instance.capture_globals().map_err(native_error)?;
            CapturedState::Native(memories)
        }
    };
    Ok(Captured {
        state,
        pause: started.elapsed(),
        globals,
        record: None,
    })
}

/// Capture the task's state for the snapshot `writer` writes in `format`, the way a
/// task does at a barrier: native captures go through the task's `base`
/// (incremental); `auto` captures natively where the component allows it
/// and, when the guest holds host resources right now (or the component
/// cannot be imaged at all), canonically instead. `aborted` is the highest
/// snapshot number the coordinator gave up on.
///
/// # Errors
/// As [`capture`]; for `auto`, a decline names both reasons.
pub fn capture_at_barrier(
    instance: &mut TaskInstance,
    format: SnapshotFormat,
    base: &NativeBase,
    writer: &BlobWriter,
    aborted: u64,
) -> Result<Captured, CaptureError> {
    match format {
        SnapshotFormat::Native => base.capture(instance, writer, aborted),
        SnapshotFormat::Canonical => capture(instance, SnapshotFormat::Canonical, writer),
        SnapshotFormat::Auto => {
            let native = match instance.component().native_support() {
                Ok(()) => base.capture(instance, writer, aborted),
                Err(why) => Err(CaptureError::Declined(why.to_string())),
            };
            match native {
                Err(CaptureError::Declined(why)) => {
                    base.forget();
                    capture(instance, SnapshotFormat::Canonical, writer).map_err(|e| match e {
                        CaptureError::Declined(c) => {
                            CaptureError::Declined(format!("native: {why}; canonical: {c}"))
                        }
                        e => e,
                    })
                }
                other => other,
            }
        }
    }
}
