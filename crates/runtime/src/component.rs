//! Loading a component and checking it against the contract, with errors
//! that say what was expected and what was found.

use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use crate::bindings::{v1, v2};
use crate::data::InstanceData;
use crate::error::{RuntimeError, one_line};
use crate::instrument::GlobalLayout;
use crate::native::{self, NativeUnsupported};

/// The current WIT package version, what new plugins are built against.
pub const CONTRACT_PACKAGE: &str = "memento:operator@0.2.0";
/// The interface every plugin must export (current version).
pub const OPERATOR_INTERFACE: &str = "memento:operator/operator@0.2.0";
/// The interface that carries canonical snapshots (current version).
pub const SNAPSHOT_INTERFACE: &str = "memento:operator/snapshot@0.2.0";

/// A version of the contract this host implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContractVersion {
    /// `memento:operator@0.1.0`: `snapshot-state` returns one `list<u8>`,
    /// no key groups. Still loaded and run.
    V0_1,
    /// `memento:operator@0.2.0`: state streams in pieces through host
    /// resources, pieces belong to key groups.
    V0_2,
}

impl ContractVersion {
    /// Every version this host implements, newest first.
    pub const ALL: [ContractVersion; 2] = [ContractVersion::V0_2, ContractVersion::V0_1];

    /// The WIT package, e.g. `memento:operator@0.2.0`.
    pub fn package(self) -> &'static str {
        match self {
            ContractVersion::V0_1 => "memento:operator@0.1.0",
            ContractVersion::V0_2 => CONTRACT_PACKAGE,
        }
    }

    /// The world a component implements, e.g. `memento:operator/plugin@0.2.0`.
    pub fn world(self) -> &'static str {
        match self {
            ContractVersion::V0_1 => "memento:operator/plugin@0.1.0",
            ContractVersion::V0_2 => "memento:operator/plugin@0.2.0",
        }
    }

    fn exports(self) -> [&'static str; 2] {
        match self {
            ContractVersion::V0_1 => [
                "memento:operator/operator@0.1.0",
                "memento:operator/snapshot@0.1.0",
            ],
            ContractVersion::V0_2 => [OPERATOR_INTERFACE, SNAPSHOT_INTERFACE],
        }
    }
}

/// The pre-linked component, typed by the contract version it implements.
pub(crate) enum PluginPre {
    V1(v1::PluginPre<InstanceData>),
    V2(v2::PluginPre<InstanceData>),
}

/// A compiled component that implements the contract, ready to instantiate.
pub struct LoadedComponent {
    /// Where it came from (file path or a label for embedded bytes).
    pub origin: PathBuf,
    /// blake3 of the component's bytes: its identity in snapshots.
    pub hash: [u8; 32],
    /// Size of the component in bytes.
    pub size: usize,
    pub(crate) pre: PluginPre,
    /// Bytes of compiled code and metadata the engine keeps for it: what
    /// the runtime's component cache is bounded by.
    compiled_size: usize,
    /// Whether native snapshots can capture this component faithfully, and
    /// the mutable globals they carry beside the memories when it was
    /// instrumented to reach them; decided at load time from its core
    /// modules (see `native.rs`, `instrument.rs`).
    native: Result<Option<GlobalLayout>, NativeUnsupported>,
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
        self.native.clone().map(|_| ())
    }

    /// The mutable globals a native image of this component carries beside
    /// its memories: `None` when memories alone hold its state (or native
    /// snapshots are refused).
    pub fn native_globals(&self) -> Option<&GlobalLayout> {
        self.native.as_ref().ok().and_then(Option::as_ref)
    }

    /// Bytes of compiled code and metadata held for this component (what
    /// it costs to keep it in the runtime's cache).
    pub fn compiled_size(&self) -> usize {
        self.compiled_size
    }

    /// The contract version the component implements.
    pub fn contract(&self) -> ContractVersion {
        match self.pre {
            PluginPre::V1(_) => ContractVersion::V0_1,
            PluginPre::V2(_) => ContractVersion::V0_2,
        }
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
    /// The contract world the component implements (by its exports), e.g.
    /// `memento:operator/plugin@0.2.0`; for one that implements none, the
    /// current world.
    pub contract: &'static str,
    /// `Ok(())` when the component implements [`ComponentInfo::contract`]
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

/// Check the header: a component, of the layer this host reads.
pub(crate) fn check_header(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
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
    Ok(())
}

/// Check the header and compile; shared by `load` and `inspect`.
pub(crate) fn compile(engine: &Engine, path: &Path, bytes: &[u8]) -> Result<Component, RuntimeError> {
    check_header(path, bytes)?;
    Component::new(engine, bytes).map_err(|e| invalid(path, format!("invalid component: {}", one_line(&e))))
}

/// The contract version whose interfaces `exports` include, or why none.
/// A component exporting an interface at a version this host does not
/// implement is told which versions it does.
fn check_exports(exports: &[String]) -> Result<ContractVersion, String> {
    let has = |name: &str| exports.iter().any(|e| e == name);
    if let Some(v) = ContractVersion::ALL
        .into_iter()
        .find(|v| v.exports().iter().all(|w| has(w)))
    {
        return Ok(v);
    }
    // Half of one version: name what is missing.
    for v in ContractVersion::ALL {
        let [operator, snapshot] = v.exports();
        match (has(operator), has(snapshot)) {
            (true, false) => return Err(format!("exports {operator} but not {snapshot}")),
            (false, true) => return Err(format!("exports {snapshot} but not {operator}")),
            _ => {}
        }
    }
    let implemented = ContractVersion::ALL.map(|v| v.exports()[0]).join(" or ");
    let unversioned = OPERATOR_INTERFACE.split('@').next().unwrap_or(OPERATOR_INTERFACE);
    // The same interface at another version: say which.
    if let Some(found) = exports.iter().find(|e| e.split('@').next() == Some(unversioned)) {
        return Err(format!("exports {found}, but this host implements {implemented}"));
    }
    Err(format!(
        "does not export {implemented} (found exports: {})",
        if exports.is_empty() {
            "none".to_string()
        } else {
            exports.join(", ")
        }
    ))
}

/// Pre-link `component` with the bindings of contract `version`.
fn prelink(
    linker: &Linker<InstanceData>,
    component: &Component,
    version: ContractVersion,
) -> Result<PluginPre, String> {
    let pre = linker
        .instantiate_pre(component)
        .map_err(|e| format!("cannot link: {}", one_line(&e)))?;
    let fit = |e: wasmtime::Error| format!("does not fit {}: {}", version.world(), one_line(&e));
    Ok(match version {
        ContractVersion::V0_1 => PluginPre::V1(v1::PluginPre::new(pre).map_err(fit)?),
        ContractVersion::V0_2 => PluginPre::V2(v2::PluginPre::new(pre).map_err(fit)?),
    })
}

fn names(engine: &Engine, component: &Component) -> (Vec<String>, Vec<String>) {
    let ty = component.component_type();
    let imports = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
    let exports = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    (imports, exports)
}

/// Check `component`, compiled from a component of `size` bytes whose
/// blake3 is `hash` (instrumented as `native` says), against the contract.
pub(crate) fn load(
    engine: &Engine,
    linker: &Linker<InstanceData>,
    path: &Path,
    size: usize,
    hash: [u8; 32],
    component: Component,
    native: Result<Option<GlobalLayout>, NativeUnsupported>,
) -> Result<LoadedComponent, RuntimeError> {
    let (_, exports) = names(engine, &component);
    let version = check_exports(&exports).map_err(|r| invalid(path, r))?;
    let pre = prelink(linker, &component, version).map_err(|r| invalid(path, r))?;
    let image = component.image_range();
    let compiled_size = (image.end as usize).saturating_sub(image.start as usize);
    Ok(LoadedComponent {
        origin: path.to_path_buf(),
        hash,
        size,
        compiled_size,
        pre,
        native,
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
    let version = check_exports(&exports);
    let contract = version.as_ref().map_or(ContractVersion::V0_2, |v| *v).world();
    let fits_contract = version.and_then(|v| prelink(linker, &component, v).map(|_| ()));
    Ok(ComponentInfo {
        path: path.to_path_buf(),
        size: bytes.len(),
        hash: blake3::hash(bytes).to_hex().to_string(),
        imports,
        exports,
        contract,
        fits_contract,
        native_snapshots: native::plan(bytes, true)
            .native
            .map(|_| ())
            .map_err(|e| e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_are_checked_with_versions() {
        let v2 = vec![OPERATOR_INTERFACE.to_string(), SNAPSHOT_INTERFACE.to_string()];
        assert_eq!(check_exports(&v2), Ok(ContractVersion::V0_2));
        let v1 = vec![
            "memento:operator/operator@0.1.0".to_string(),
            "memento:operator/snapshot@0.1.0".to_string(),
        ];
        assert_eq!(check_exports(&v1), Ok(ContractVersion::V0_1));
        let other = vec!["memento:operator/operator@0.3.0".to_string()];
        let err = check_exports(&other).unwrap_err();
        assert_eq!(
            err,
            "exports memento:operator/operator@0.3.0, but this host implements \
             memento:operator/operator@0.2.0 or memento:operator/operator@0.1.0"
        );
        let half = vec!["memento:operator/operator@0.1.0".to_string()];
        assert_eq!(
            check_exports(&half).unwrap_err(),
            "exports memento:operator/operator@0.1.0 but not memento:operator/snapshot@0.1.0"
        );
        let err = check_exports(&["wasi:cli/run@0.2.0".to_string()]).unwrap_err();
        assert!(
            err.contains(
                "does not export memento:operator/operator@0.2.0 or memento:operator/operator@0.1.0"
            ),
            "{err}"
        );
        assert!(err.contains("found exports: wasi:cli/run@0.2.0"), "{err}");
    }
}
