//! Loading a component and checking it against the contract, with errors
//! that say what was expected and what was found.

use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use crate::bindings::PluginPre;
use crate::data::InstanceData;
use crate::error::{RuntimeError, one_line};
use crate::native::{self, NativeUnsupported};

/// The WIT package version this host implements.
pub const CONTRACT_PACKAGE: &str = "memento:operator@0.1.0";
/// The interface every plugin must export.
pub const OPERATOR_INTERFACE: &str = "memento:operator/operator@0.1.0";
/// The interface that carries canonical snapshots.
pub const SNAPSHOT_INTERFACE: &str = "memento:operator/snapshot@0.1.0";

/// A compiled component that implements the contract, ready to instantiate.
pub struct LoadedComponent {
    /// Where it came from (file path or a label for embedded bytes).
    pub origin: PathBuf,
    /// blake3 of the component's bytes: its identity in snapshots.
    pub hash: [u8; 32],
    /// Size of the component in bytes.
    pub size: usize,
    pub(crate) pre: PluginPre<InstanceData>,
    /// Bytes of compiled code and metadata the engine keeps for it: what
    /// the runtime's component cache is bounded by.
    compiled_size: usize,
    /// Whether native snapshots can capture this component faithfully;
    /// decided at load time from its core modules (see `native.rs`).
    native: Result<(), NativeUnsupported>,
}

impl LoadedComponent {
    /// The component's blake3 hash as lowercase hex.
    pub fn hash_hex(&self) -> String {
        blake3::Hash::from_bytes(self.hash).to_hex().to_string()
    }

    /// `Ok(())` when native snapshots (images of linear memory) capture
    /// this component's state faithfully; otherwise why not, e.g. "core
    /// module 0 has mutable globals other than the stack pointer (`x`)".
    ///
    /// # Errors
    /// Why native snapshots are refused.
    pub fn native_support(&self) -> Result<(), NativeUnsupported> {
        self.native.clone()
    }

    /// Bytes of compiled code and metadata held for this component (what
    /// it costs to keep it in the runtime's cache).
    pub fn compiled_size(&self) -> usize {
        self.compiled_size
    }

    /// A short name for messages: the file name without extension.
    pub fn name(&self) -> String {
        self.origin
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.origin.display().to_string())
    }
}

/// What `memento inspect` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ComponentInfo {
    /// The file inspected.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: usize,
    /// blake3 of the bytes, hex.
    pub hash: String,
    /// Names of the component's imports.
    pub imports: Vec<String>,
    /// Names of the component's exports.
    pub exports: Vec<String>,
    /// `Ok(())` when the component implements `memento:operator/plugin@0.1.0`
    /// with only imports the host provides; otherwise why not.
    pub fits_contract: Result<(), String>,
    /// `Ok(())` when native snapshots are possible; otherwise why not.
    pub native_snapshots: Result<(), String>,
}

impl ComponentInfo {
    /// `yes`, or `no — <reason>`: whether native snapshots are possible.
    pub fn native_summary(&self) -> String {
        match &self.native_snapshots {
            Ok(()) => "yes".into(),
            Err(why) => format!("no — {why}"),
        }
    }
}

/// The preamble of a core module (`\0asm`, version 1) and of a component
/// (`\0asm`, version 0x0d, layer 1).
const CORE_MODULE_HEADER: [u8; 8] = [0, b'a', b's', b'm', 1, 0, 0, 0];
const WASM_MAGIC: [u8; 4] = [0, b'a', b's', b'm'];
const COMPONENT_LAYER: [u8; 2] = [1, 0];

fn invalid(path: &Path, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Check the header and compile; shared by `load` and `inspect`.
pub(crate) fn compile(engine: &Engine, path: &Path, bytes: &[u8]) -> Result<Component, RuntimeError> {
    let expected = format!("expected a component implementing {CONTRACT_PACKAGE}");
    if bytes.len() < 8 || bytes[..4] != WASM_MAGIC {
        return Err(invalid(path, format!("not a WebAssembly file ({expected})")));
    }
    if bytes[..8] == CORE_MODULE_HEADER {
        return Err(invalid(
            path,
            format!(
                "is a core WebAssembly module, not a component ({expected}; build with `--target wasm32-wasip2`)"
            ),
        ));
    }
    if bytes[6..8] != COMPONENT_LAYER {
        return Err(invalid(path, format!("unknown WebAssembly layer ({expected})")));
    }
    Component::new(engine, bytes).map_err(|e| invalid(path, format!("invalid component: {}", one_line(&e))))
}

/// Why `exports` do not include the operator contract, if they do not.
fn check_exports(exports: &[String]) -> Result<(), String> {
    for wanted in [OPERATOR_INTERFACE, SNAPSHOT_INTERFACE] {
        if exports.iter().any(|e| e == wanted) {
            continue;
        }
        // Same interface at another version: say which.
        let unversioned = wanted.split('@').next().unwrap_or(wanted);
        let other: Vec<&String> = exports
            .iter()
            .filter(|e| e.split('@').next() == Some(unversioned))
            .collect();
        return Err(if let Some(found) = other.first() {
            format!("exports {found}, but this host implements {wanted}")
        } else {
            format!(
                "does not export {wanted} (found exports: {})",
                if exports.is_empty() {
                    "none".to_string()
                } else {
                    exports.join(", ")
                }
            )
        });
    }
    Ok(())
}

fn names(engine: &Engine, component: &Component) -> (Vec<String>, Vec<String>) {
    let ty = component.component_type();
    let imports = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let exports = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    (imports, exports)
}

/// Check `component`, compiled from `bytes` (by [`compile`], or found in
/// the disk cache under their hash), against the contract.
pub(crate) fn load(
    engine: &Engine,
    linker: &Linker<InstanceData>,
    path: &Path,
    bytes: &[u8],
    hash: [u8; 32],
    component: Component,
) -> Result<LoadedComponent, RuntimeError> {
    let (_, exports) = names(engine, &component);
    check_exports(&exports).map_err(|r| invalid(path, r))?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| invalid(path, format!("cannot link: {}", one_line(&e))))?;
    let pre = PluginPre::new(pre)
        .map_err(|e| invalid(path, format!("does not fit the contract: {}", one_line(&e))))?;
    let image = component.image_range();
    let compiled_size = (image.end as usize).saturating_sub(image.start as usize);
    Ok(LoadedComponent {
        origin: path.to_path_buf(),
        hash,
        size: bytes.len(),
        compiled_size,
        pre,
        native: native::native_support(bytes),
    })
}

pub(crate) fn inspect(
    engine: &Engine,
    linker: &Linker<InstanceData>,
    path: &Path,
    bytes: &[u8],
) -> Result<ComponentInfo, RuntimeError> {
    let component = compile(engine, path, bytes)?;
    let (imports, exports) = names(engine, &component);
    let fits_contract = check_exports(&exports).and_then(|()| {
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| format!("cannot link: {}", one_line(&e)))?;
        PluginPre::new(pre)
            .map(|_| ())
            .map_err(|e| format!("does not fit the contract: {}", one_line(&e)))
    });
    Ok(ComponentInfo {
        path: path.to_path_buf(),
        size: bytes.len(),
        hash: blake3::hash(bytes).to_hex().to_string(),
        imports,
        exports,
        fits_contract,
        native_snapshots: native::native_support(bytes).map_err(|e| e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_are_checked_with_versions() {
        let ok = vec![OPERATOR_INTERFACE.to_string(), SNAPSHOT_INTERFACE.to_string()];
        assert!(check_exports(&ok).is_ok());
        let other = vec!["memento:operator/operator@0.2.0".to_string()];
        let err = check_exports(&other).unwrap_err();
        assert!(err.contains("exports memento:operator/operator@0.2.0"), "{err}");
        assert!(
            err.contains("implements memento:operator/operator@0.1.0"),
            "{err}"
        );
        let err = check_exports(&["wasi:cli/run@0.2.0".to_string()]).unwrap_err();
        assert!(
            err.contains("does not export memento:operator/operator@0.1.0"),
            "{err}"
        );
        assert!(err.contains("found exports: wasi:cli/run@0.2.0"), "{err}");
    }
}
