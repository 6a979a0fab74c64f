//! What a native image records besides its memories, and the checks that
//! decide whether it can restore into a job: the identical component, the
//! image layout this host reads, and the operator config it was opened with.

use std::collections::BTreeMap;

use crate::store::{TaskKey, TaskState, TaskStateData};

/// Version of the native image layout written in `extra.image_version`.
/// A reader refuses other versions: the meaning of the chunks would differ.
pub const NATIVE_IMAGE_VERSION: u64 = 1;

/// What a native image records besides its memories: the layout version
/// (checked on restore), the digest of the operator config the task was
/// opened with (checked on restore, when known) and the engine that took it
/// (for diagnostics; the guest's memory does not depend on it).
pub(super) fn native_extra(config: Option<&str>) -> serde_json::Value {
    let mut extra = serde_json::json!({
        "image_version": NATIVE_IMAGE_VERSION,
        "engine": "wasmtime 48",
    });
    if let Some(config) = config {
        extra["config"] = config.into();
    }
    extra
}

/// blake3 hex of an operator config (keys in order, each key and value
/// length-prefixed, so no two configs share a digest by concatenation).
pub fn config_digest(config: &BTreeMap<String, String>) -> String {
    let mut h = blake3::Hasher::new();
    for (k, v) in config {
        for part in [k, v] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    h.finalize().to_hex().to_string()
}

/// Why a native image cannot restore into a job as it is now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageMismatch {
    /// The image was taken with another component than the job runs.
    #[error(
        "it holds a native image of operator `{operator}` taken with component {snapshot_component}, but the \
         job now runs component {component}: native snapshots restore only into the identical component; \
         to change the plugin, resume from a canonical savepoint (format = \"canonical\")"
    )]
    Component {
        /// The operator.
        operator: String,
        /// blake3 hex of the component in the snapshot (or "unknown").
        snapshot_component: String,
        /// blake3 hex of the component the job runs.
        component: String,
    },
    /// The image's layout version is not the one this host reads.
    #[error(
        "task {task}: native image version {found} is not the version this host reads ({NATIVE_IMAGE_VERSION})"
    )]
    Version {
        /// The task.
        task: TaskKey,
        /// The recorded version, or "missing".
        found: String,
    },
    /// The operator's config changed since the image was taken.
    #[error(
        "task {task}: the operator's config changed since this native snapshot was taken, and a native \
         image holds the operator built from the old config; run with the old config, or resume from \
         a canonical savepoint (format = \"canonical\")"
    )]
    Config {
        /// The task.
        task: TaskKey,
    },
}

/// Whether `state` can restore into a task running the component whose
/// blake3 hex is `component`, opened with `config`, when the snapshot
/// recorded `recorded` as the operator's component. Canonical state always
/// can (the plugin decides what it reads).
///
/// A native image holds the operator that `open` built from the config of
/// its time, and `open` does not run again on restore, so it restores only
/// under the same config (images that did not record their config pass).
///
/// # Errors
/// [`ImageMismatch`]: what differs, naming the task or operator and the way
/// out.
pub fn check_image(
    state: &TaskState,
    recorded: Option<&str>,
    component: &str,
    config: &BTreeMap<String, String>,
) -> Result<(), ImageMismatch> {
    let TaskStateData::Native { extra, .. } = &state.state else {
        return Ok(());
    };
    check_component(state, recorded, component)?;
    check_version(state, extra)?;
    match extra.get("config").and_then(serde_json::Value::as_str) {
        Some(digest) if digest != config_digest(config) => Err(ImageMismatch::Config {
            task: state.key.clone(),
        }),
        _ => Ok(()),
    }
}

/// The identical component, or [`ImageMismatch::Component`].
pub(super) fn check_component(
    state: &TaskState,
    recorded: Option<&str>,
    component: &str,
) -> Result<(), ImageMismatch> {
    if recorded == Some(component) {
        return Ok(());
    }
    Err(ImageMismatch::Component {
        operator: state.key.operator.clone(),
        snapshot_component: recorded.unwrap_or("unknown").to_string(),
        component: component.to_string(),
    })
}

/// The layout version this host reads, or [`ImageMismatch::Version`].
pub(super) fn check_version(state: &TaskState, extra: &serde_json::Value) -> Result<(), ImageMismatch> {
    match extra.get("image_version").and_then(serde_json::Value::as_u64) {
        Some(NATIVE_IMAGE_VERSION) => Ok(()),
        found => Err(ImageMismatch::Version {
            task: state.key.clone(),
            found: found.map_or("missing".to_string(), |v| v.to_string()),
        }),
    }
}
