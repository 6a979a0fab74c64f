//! Whether a component can be snapshotted natively, decided once at load
//! time by reading its core modules.
//!
//! A native snapshot saves linear memories and, for components that need
//! it, the values of their mutable globals. It is faithful when all of an
//! instance's mutable state between two calls lives there, and everything
//! else is either rebuilt identically by a fresh instantiation (tables
//! filled by element segments, immutable globals, data segments -- then
//! overwritten by the image) or back at its starting value. So we refuse
//! components whose core modules
//!
//! * mutate a table at run time (`table.set/grow/fill/copy/init`,
//!   `elem.drop`): a fresh instance would hold the original table;
//! * drop a data segment at run time (`data.drop`): a fresh instance would
//!   still have it;
//!
//! and report whether any defines a mutable global other than the shadow
//! stack pointer: such components are instrumented at load time so that
//! their globals can be read and written (`instrument.rs`), or refused if
//! that is not possible.
//!
//! The stack pointer alone needs no instrumentation: LLVM's shadow stack
//! pointer is restored by every function before it returns, so between two
//! exported calls it holds its initial value again, which instantiation
//! sets. It is recognised by its name (`__stack_pointer`) when the module
//! keeps a name section, or else as the module's only mutable `i32`/`i64`
//! global that is not exported.

use crate::instrument::{self, GlobalLayout};
use wasmtime::wasmparser::{self, KnownCustom, Name, Operator, Parser, Payload, TypeRef, ValType};

/// What the scan of one core module found.
#[derive(Default)]
struct ModuleScan {
    /// Index of the module among the component's core modules.
    index: usize,
    /// Number of imported globals (defined globals are numbered after them).
    imported_globals: u32,
    /// Defined mutable globals: (global index, value type).
    mutable: Vec<(u32, ValType)>,
    /// Exported global indices.
    exported: Vec<u32>,
    /// Names from the name section, by global index.
    names: Vec<(u32, String)>,
    /// Instructions that change tables or segments at run time, with counts.
    mutations: Vec<(&'static str, usize)>,
}

impl ModuleScan {
    fn note(&mut self, what: &'static str) {
        match self.mutations.iter_mut().find(|(w, _)| *w == what) {
            Some((_, n)) => *n += 1,
            None => self.mutations.push((what, 1)),
        }
    }

    /// Why this module cannot be snapshotted natively, if it cannot;
    /// otherwise its mutable globals other than the stack pointer, named.
    fn verdict(&self) -> Result<Vec<String>, NativeUnsupported> {
        if let Some((instruction, times)) = self.mutations.first() {
            return Err(NativeUnsupported::MutatesTables {
                module: self.index,
                instruction,
                times: *times,
            });
        }
        let name_of = |g: u32| self.names.iter().find(|(i, _)| *i == g).map(|(_, n)| n.as_str());
        let globals: Vec<String> = self
            .mutable
            .iter()
            .filter(|(g, ty)| {
                let is_sp = match name_of(*g) {
                    Some(name) => name == "__stack_pointer",
                    None => {
                        self.mutable.len() == 1
                            && matches!(ty, ValType::I32 | ValType::I64)
                            && !self.exported.contains(g)
                    }
                };
                !is_sp
            })
            .map(|(g, _)| match name_of(*g) {
                Some(name) => format!("`{name}`"),
                None => format!("global {g}"),
            })
            .collect();
        Ok(globals)
    }
}

/// Why a component cannot be snapshotted natively.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NativeUnsupported {
    /// The bytes do not parse (a component that compiled always does).
    #[error("cannot parse the component: {0}")]
    Unparsable(String),
    /// A core module changes tables or segments at run time.
    #[error(
        "core module {module} mutates its tables or segments at run time ({instruction}, {times} times), \
         which a memory image does not capture"
    )]
    MutatesTables {
        /// Index of the core module.
        module: usize,
        /// The first such instruction found.
        instruction: &'static str,
        /// How often it occurs.
        times: usize,
    },
    /// The instrumented component did not compile (a host bug, reported
    /// rather than hidden: the component itself runs uninstrumented).
    #[error("the component instrumented to reach its mutable globals does not compile: {0}")]
    Instrumentation(String),
    /// A core module has mutable globals besides the stack pointer, and
    /// instrumentation cannot reach them.
    #[error(
        "core module {module} has {} mutable {} other than the stack pointer ({}), which cannot be \
         captured: {reason}",
        .globals.len(),
        if .globals.len() == 1 { "global" } else { "globals" },
        few(.globals)
    )]
    MutableGlobals {
        /// Index of the core module.
        module: usize,
        /// The globals, by name where the module names them.
        globals: Vec<String>,
        /// Why the instrumentation that exposes globals refused.
        reason: String,
    },
}

/// The first few of `names`, and how many more (interpreters compiled to
/// Wasm have hundreds of globals).
fn few(names: &[String]) -> String {
    const NAMED: usize = 4;
    let mut named = names[..names.len().min(NAMED)].join(", ");
    if names.len() > NAMED {
        named.push_str(&format!(", … {} more", names.len() - NAMED));
    }
    named
}

/// Mutable globals besides the stack pointer: the first module that has
/// them (index, names), for messages.
pub(crate) type OtherGlobals = Option<(usize, Vec<String>)>;

/// The result of scanning a component: whether native snapshots are
/// possible, and if so whether (and where first) there are mutable globals
/// other than the stack pointer, which need instrumentation.
pub(crate) fn native_support(bytes: &[u8]) -> Result<OtherGlobals, NativeUnsupported> {
    let mut first: OtherGlobals = None;
    let mut stack: Vec<Option<ModuleScan>> = Vec::new();
    let mut modules = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| NativeUnsupported::Unparsable(e.to_string()))?;
        match payload {
            Payload::Version { encoding, .. } => {
                stack.push(match encoding {
                    wasmparser::Encoding::Module => {
                        modules += 1;
                        Some(ModuleScan {
                            index: modules - 1,
                            ..Default::default()
                        })
                    }
                    wasmparser::Encoding::Component => None,
                });
            }
            Payload::End(_) => {
                if let Some(Some(scan)) = stack.pop() {
                    let globals = scan.verdict()?;
                    if first.is_none() && !globals.is_empty() {
                        first = Some((scan.index, globals));
                    }
                }
            }
            other => {
                if let Some(Some(scan)) = stack.last_mut() {
                    scan_module_payload(scan, other).map_err(|e| {
                        NativeUnsupported::Unparsable(format!("core module {}: {e}", scan.index))
                    })?;
                }
            }
        }
    }
    Ok(first)
}

/// How a component is compiled and snapshotted natively.
pub(crate) struct NativePlan {
    /// The bytes to compile: instrumented when globals must be reached,
    /// else `None` (the component's own bytes).
    pub(crate) instrumented: Option<Vec<u8>>,
    /// The globals native images carry (`None`: memories alone suffice),
    /// or why native snapshots are refused.
    pub(crate) native: Result<Option<GlobalLayout>, NativeUnsupported>,
}

/// Scan `bytes` and, where mutable globals other than the stack pointer
/// need it and `instrument` allows it, instrument the component to reach
/// them.
pub(crate) fn plan(bytes: &[u8], instrument: bool) -> NativePlan {
    let refused = |native| NativePlan {
        instrumented: None,
        native,
    };
    let (module, globals) = match native_support(bytes) {
        Ok(None) => return refused(Ok(None)),
        Ok(Some(first)) => first,
        Err(e) => return refused(Err(e)),
    };
    let instrumented = match instrument {
        true => instrument::instrument(bytes),
        false => Err("instrumentation is turned off (RuntimeOptions::instrument_globals)".into()),
    };
    match instrumented {
        Ok(done) => NativePlan {
            instrumented: Some(done.bytes),
            native: Ok(Some(done.layout)),
        },
        Err(reason) => refused(Err(NativeUnsupported::MutableGlobals {
            module,
            globals,
            reason,
        })),
    }
}

fn scan_module_payload(scan: &mut ModuleScan, payload: Payload<'_>) -> wasmparser::Result<()> {
    match payload {
        Payload::ImportSection(reader) => {
            for imports in reader {
                match imports? {
                    wasmparser::Imports::Single(_, import) => {
                        if matches!(import.ty, TypeRef::Global(_)) {
                            scan.imported_globals += 1;
                        }
                    }
                    wasmparser::Imports::Compact1 { items, .. } => {
                        for item in items {
                            if matches!(item?.ty, TypeRef::Global(_)) {
                                scan.imported_globals += 1;
                            }
                        }
                    }
                    wasmparser::Imports::Compact2 { ty, names, .. } => {
                        if matches!(ty, TypeRef::Global(_)) {
                            scan.imported_globals += names.count();
                        }
                    }
                }
            }
        }
        Payload::GlobalSection(reader) => {
            for (i, global) in reader.into_iter().enumerate() {
                let global = global?;
                if global.ty.mutable {
                    scan.mutable
                        .push((scan.imported_globals + i as u32, global.ty.content_type));
                }
            }
        }
        Payload::ExportSection(reader) => {
            for export in reader {
                let export = export?;
                if export.kind == wasmparser::ExternalKind::Global {
                    scan.exported.push(export.index);
                }
            }
        }
        Payload::CustomSection(reader) => {
            if let KnownCustom::Name(names) = reader.as_known() {
                for name in names {
                    // A malformed name section is only a missing hint.
                    let Ok(Name::Global(map)) = name else { continue };
                    for naming in map.into_iter().flatten() {
                        scan.names.push((naming.index, naming.name.to_string()));
                    }
                }
            }
        }
        Payload::CodeSectionEntry(body) => {
            let mut ops = body.get_operators_reader()?;
            while !ops.eof() {
                match ops.read()? {
                    Operator::TableSet { .. } => scan.note("table.set"),
                    Operator::TableGrow { .. } => scan.note("table.grow"),
                    Operator::TableFill { .. } => scan.note("table.fill"),
                    Operator::TableCopy { .. } => scan.note("table.copy"),
                    Operator::TableInit { .. } => scan.note("table.init"),
                    Operator::ElemDrop { .. } => scan.note("elem.drop"),
                    Operator::DataDrop { .. } => scan.note("data.drop"),
                    _ => {}
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(core: &str) -> Vec<u8> {
        // A component embedding one core module is enough for the scan.
        wat::parse_str(format!("(component (core module {core}))")).unwrap()
    }

    #[test]
    fn stack_pointer_alone_is_fine() {
        let named = component(
            r#"(memory 1) (global $__stack_pointer (mut i32) (i32.const 1024))
               (func (global.set $__stack_pointer (i32.const 8)))"#,
        );
        assert_eq!(native_support(&named), Ok(None));
        // Without names: one unexported mutable i32 is the stack pointer.
        let anonymous =
            wat::parse_str("(component (core module (memory 1) (global (mut i32) (i32.const 1024))))")
                .unwrap();
        assert_eq!(native_support(&anonymous), Ok(None));
    }

    #[test]
    fn other_mutable_globals_are_found_by_name() {
        let c = component(
            r#"(memory 1) (global $__stack_pointer (mut i32) (i32.const 1024))
               (global $counter (mut i64) (i64.const 0))"#,
        );
        assert_eq!(native_support(&c), Ok(Some((0, vec!["`counter`".to_string()]))));
    }

    #[test]
    fn unreachable_globals_are_refused_with_the_reason() {
        // A mutable v128 global has no accessor.
        let c = component(r#"(global $v (mut v128) (v128.const i64x2 0 0))"#);
        let err = plan(&c, true).native.unwrap_err().to_string();
        assert!(
            err.contains(
                "core module 0 has 1 mutable global other than the stack pointer (`v`), which cannot be \
                 captured: it has a mutable v128 global"
            ),
            "{err}"
        );
    }

    #[test]
    fn many_mutable_globals_are_counted_and_a_few_named() {
        let globals: String = (0..490)
            .map(|i| format!("(global $g{i} (mut i32) (i32.const 0))"))
            .collect();
        let c = component(&format!(
            "(memory 1) (global $__stack_pointer (mut i32) (i32.const 1024)) {globals}"
        ));
        let (module, globals) = native_support(&c).unwrap().unwrap();
        let err = NativeUnsupported::MutableGlobals {
            module,
            globals,
            reason: "why".into(),
        }
        .to_string();
        assert!(
            err.contains(
                "has 490 mutable globals other than the stack pointer (`g0`, `g1`, `g2`, `g3`, … 486 more)"
            ),
            "{err}"
        );
        assert!(err.len() < 300, "one readable line: {err}");
    }

    #[test]
    fn table_mutation_is_refused() {
        let c = component(
            r#"(table 1 funcref) (func $f)
               (func (table.set 0 (i32.const 0) (ref.func $f))) (elem declare func $f)"#,
        );
        let err = native_support(&c).unwrap_err().to_string();
        assert!(
            err.contains("mutates its tables or segments at run time (table.set, 1 times)"),
            "{err}"
        );
    }
}
