//! Test-only fault injection: with the crate feature `fault-injection`, an
//! operator config key `memento.fault-injection.panic` names a place where
//! the host itself panics, so end-to-end tests can prove that a panic
//! anywhere in a job's run fails that job and nothing else. Without the feature, [`panic_if_asked`] is
//! empty and the key is an ordinary config entry handed to the plugin.

use std::collections::BTreeMap;

/// The operator config key naming where to panic.
#[cfg(feature = "fault-injection")]
const KEY: &str = "memento.fault-injection.panic";

/// Where a job's run can be made to panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Site {
    /// A task thread, at a batch (so at its first).
    Task,
    /// The source thread, before its first batch.
    Source,
    /// A snapshot's upload thread.
    Upload,
    /// The coordinator (the thread that called `Job::run`), as an attempt
    /// starts.
    Coordinator,
}

#[cfg(feature = "fault-injection")]
impl Site {
    fn name(self) -> &'static str {
        match self {
            Site::Task => "task",
            Site::Source => "source",
            Site::Upload => "upload",
            Site::Coordinator => "coordinator",
        }
    }
}

/// Panic at `site` when one of `configs` (operator configs) asks for it.
#[cfg(feature = "fault-injection")]
pub(crate) fn panic_if_asked<'a>(
    site: Site,
    mut configs: impl Iterator<Item = &'a BTreeMap<String, String>>,
) {
    if configs.any(|c| c.get(KEY).is_some_and(|v| v == site.name())) {
        panic!("fault injection: a panic in the {} as asked", site.name());
    }
}

/// Without the feature, nothing ever panics here.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn panic_if_asked<'a>(_site: Site, _configs: impl Iterator<Item = &'a BTreeMap<String, String>>) {}
