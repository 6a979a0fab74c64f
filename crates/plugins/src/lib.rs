//! The plugins of this repository, built for `wasm32-wasip2` by this crate's
//! build script: the examples in `plugins/` (embedded here, for
//! `memento demo`) and the test plugins in `tests/plugins/` (on disk only, for
//! tests and benchmarks). Never a dependency of the `memento` library: an
//! embedder builds no plugins.

use std::path::PathBuf;

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));

/// The directory holding every built plugin as `NAME.wasm` (dashes in crate
/// names become underscores).
pub const DIR: &str = env!("MEMENTO_PLUGIN_DIR");

/// The built component of plugin crate `name` (`"window-sum"` or
/// `"window_sum"`).
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(DIR).join(format!("{}.wasm", name.replace('-', "_")))
}

/// The built component of the Python or JavaScript example `name` (e.g.
/// `"python-wordcount"`), or why it was not built (its tool is not
/// installed; the message says how to install it).
///
/// # Errors
/// When the example was not built, or there is no such example.
pub fn interpreted(name: &str) -> Result<PathBuf, String> {
    match INTERPRETED.iter().find(|(n, _)| *n == name) {
        Some((_, Ok(path))) => Ok(PathBuf::from(path)),
        Some((_, Err(why))) => Err((*why).to_string()),
        None => Err(format!(
            "no Python or JavaScript example named {name} in plugins/"
        )),
    }
}
