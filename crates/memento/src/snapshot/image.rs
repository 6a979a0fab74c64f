//! What a native image records besides its memories, and the checks that
//! decide whether it can restore into a job: the identical component, the
//! image layout this host reads, and the operator config it was opened with.

use std::collections::BTreeMap;

use crate::runtime::{GlobalLayout, GlobalValues};
use crate::store::{TaskKey, TaskState, TaskStateData};

/// Version of the native image layout written in `extra.image_version`
/// for components whose memories hold all their state. A reader refuses
/// versions it does not know: the meaning of the chunks would differ.
pub const NATIVE_IMAGE_VERSION: u64 = 1;

/// Version of images that also carry the values of the component's
/// mutable globals (`extra.globals`, see docs/STORAGE.md): hosts that read
/// only version 1 refuse them instead of dropping the globals.
pub const NATIVE_IMAGE_VERSION_WITH_GLOBALS: u64 = 2;

/// What a native image records besides its memories: the layout version
/// (checked on restore), the digest of the operator config the task was
/// opened with (checked on restore, when known), the engine that took it
/// (for diagnostics; the guest's memory does not depend on it) and, for
/// an instrumented component, its globals.
pub(super) fn native_extra(config: Option<&str>, globals: Option<&GlobalValues>) -> serde_json::Value {
    let version = match globals {
        Some(_) => NATIVE_IMAGE_VERSION_WITH_GLOBALS,
        None => NATIVE_IMAGE_VERSION,
    };
    let mut extra = serde_json::json!({
        "image_version": version,
        "engine": "wasmtime 48",
    });
    if let Some(config) = config {
        extra["config"] = config.into();
    }
    if let Some(g) = globals {
        extra["globals"] = serde_json::json!({
            "layout": g.layout,
            "count": g.values.len(),
            "values": hex(&g.to_bytes()),
        });
    }
    extra
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|d| u8::from_str_radix(d, 16).ok()))
        .collect()
}

/// The globals a native image carries for a component with `layout`
/// (`None`: one whose memories hold all its state), checked against it:
/// `Ok(None)` when neither has globals.
///
/// # Errors
/// One line naming the task: a version-2 image whose globals are missing,
/// malformed or of another layout, or a version-1 image of a component
/// that has globals.
pub(super) fn image_globals(
    task: &TaskKey,
    extra: &serde_json::Value,
    layout: Option<&GlobalLayout>,
) -> Result<Option<GlobalValues>, String> {
    let version = extra.get("image_version").and_then(serde_json::Value::as_u64);
    let Some(layout) = layout else {
        if version == Some(NATIVE_IMAGE_VERSION_WITH_GLOBALS) {
            return Err(format!(
                "task {task}: the native image carries mutable globals, but the component has none to restore"
            ));
        }
        return Ok(None);
    };
    if version != Some(NATIVE_IMAGE_VERSION_WITH_GLOBALS) {
        return Err(format!(
            "task {task}: the native image has no mutable globals (image version {}), but the component \
             keeps {} of them outside its memories",
            version.map_or("missing".to_string(), |v| v.to_string()),
            layout.len()
        ));
    }
    let malformed = |what: &str| format!("task {task}: the native image's globals are malformed ({what})");
    let g = extra.get("globals").ok_or_else(|| malformed("missing"))?;
    let digest = g
        .get("layout")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| malformed("no layout"))?;
    let count = g
        .get("count")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| malformed("no count"))?;
    let values = g
        .get("values")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| malformed("no values"))?;
    if digest != layout.digest_hex() || count != layout.len() as u64 {
        return Err(format!(
            "task {task}: the native image's {count} globals follow another layout than the component's {} globals \
             (the component or the host's instrumentation differs)",
            layout.len()
        ));
    }
    if values.len() as u64 != count * 16 {
        return Err(malformed("values are not 16 hex digits per global"));
    }
    let bytes = unhex(values).ok_or_else(|| malformed("values are not hex"))?;
    GlobalValues::from_bytes(digest.to_string(), &bytes)
        .map(Some)
        .ok_or_else(|| malformed("values"))
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
    /// The image's layout version is not one this host reads.
    #[error(
        "task {task}: native image version {found} is not a version this host reads \
         ({NATIVE_IMAGE_VERSION} or {NATIVE_IMAGE_VERSION_WITH_GLOBALS})"
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
        Some(NATIVE_IMAGE_VERSION | NATIVE_IMAGE_VERSION_WITH_GLOBALS) => Ok(()),
        found => Err(ImageMismatch::Version {
            task: state.key.clone(),
            found: found.map_or("missing".to_string(), |v| v.to_string()),
        }),
    }
}
