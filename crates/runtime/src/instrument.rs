//! Load-time instrumentation that lets native snapshots read and write the
//! mutable globals of every core instance of a component.
//!
//! A component does not let its host reach the globals of its core
//! instances, and interpreters compiled to Wasm (CPython, SpiderMonkey)
//! keep hundreds of them. So before compiling, each top-level core module
//! with mutable globals gets one more export per such global, and an
//! *accessor* core module is appended that imports them all and defines
//! `get(index) -> i64` and `set(index, i64)` (a `br_table` over the
//! globals, values as their bit patterns). Both are lifted and exported
//! by the component as [`GET_EXPORT`] and [`SET_EXPORT`].
//!
//! The operator's own code is copied byte for byte: only export sections
//! grow, so `process` runs the same machine code (measured in
//! `docs/PERFORMANCE.md`). Components whose only mutable global is the
//! shadow stack pointer are not instrumented at all.

use std::ops::Range;

use wasm_encoder::{
    Alias, BlockType, CanonicalFunctionSection, CodeSection, Component, ComponentAliasSection,
    ComponentExportKind, ComponentExportSection, ComponentTypeSection, ComponentValType, EntityType,
    ExportKind, ExportSection, Function, FunctionSection, GlobalType, ImportSection, InstanceSection,
    Instruction, Module, ModuleArg, ModuleSection, PrimitiveValType, RawSection, TypeSection,
};
use wasmtime::wasmparser::{
    self, CanonicalFunction, ComponentAlias, ComponentExternalKind, ComponentOuterAliasKind, Encoding,
    Instance, Parser, Payload, TypeRef, ValType,
};

/// The component export that reads global `index` of the layout.
pub(crate) const GET_EXPORT: &str = "memento-globals-get";
/// The component export that writes global `index` of the layout.
pub(crate) const SET_EXPORT: &str = "memento-globals-set";
/// Prefix of the core exports added to instrumented modules.
const CORE_EXPORT_PREFIX: &str = "memento:global:";
/// Version of the instrumentation: part of the layout digest, so an image
/// taken under another scheme is refused rather than misread.
const INSTRUMENTATION_VERSION: u32 = 1;
/// Most globals instrumented: the accessors dispatch over all of them in
/// one `br_table`, and a hostile component must not make that unbounded
/// (CPython has about 500).
const MAX_GLOBALS: usize = 65_536;

/// The value type of one captured global.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalKind {
    /// `i32`, held as its 32 bits zero-extended.
    I32,
    /// `i64`.
    I64,
    /// `f32`, held as its bit pattern zero-extended.
    F32,
    /// `f64`, held as its bit pattern.
    F64,
}

/// One mutable global the instrumentation reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalSlot {
    /// The top-level core module that defines it.
    pub module: u32,
    /// The core instance of that module (a module instantiated twice has
    /// two sets of globals).
    pub instance: u32,
    /// Its index in the module's global index space.
    pub global: u32,
    /// Its type.
    pub kind: GlobalKind,
}

/// The mutable globals of an instrumented component, in the order the
/// accessors number them, and a digest that identifies this layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalLayout {
    slots: Vec<GlobalSlot>,
    digest: [u8; 32],
}

impl GlobalLayout {
    fn new(slots: Vec<GlobalSlot>) -> GlobalLayout {
        let mut h = blake3::Hasher::new();
        h.update(&INSTRUMENTATION_VERSION.to_le_bytes());
        for s in &slots {
            h.update(&s.module.to_le_bytes());
            h.update(&s.instance.to_le_bytes());
            h.update(&s.global.to_le_bytes());
            h.update(&[s.kind as u8]);
        }
        GlobalLayout {
            slots,
            digest: *h.finalize().as_bytes(),
        }
    }

    /// The globals, in accessor order.
    pub fn slots(&self) -> &[GlobalSlot] {
        &self.slots
    }

    /// Number of globals.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// blake3 hex of the layout and the instrumentation version: what an
    /// image records so that it restores only into the same layout.
    pub fn digest_hex(&self) -> String {
        blake3::Hash::from_bytes(self.digest).to_hex().to_string()
    }
}

/// A component rewritten to expose its globals.
pub(crate) struct Instrumented {
    pub(crate) bytes: Vec<u8>,
    pub(crate) layout: GlobalLayout,
}

/// Why a component cannot be instrumented (its globals stay unreachable).
type Refusal = String;

/// What the scan of one top-level core module found.
struct ModuleInfo {
    /// The module's bytes (header included) within the component.
    range: Range<usize>,
    /// Its sections: id and the range of the contents.
    sections: Vec<(u8, Range<usize>)>,
    /// Defined mutable globals: index and kind.
    mutable: Vec<(u32, GlobalKind)>,
    /// Names of its exports (new names must not collide).
    export_names: Vec<String>,
}

/// A top-level section of the component.
enum Section {
    Raw(u8, Range<usize>),
    Module(usize),
}

/// Index-space sizes of the top-level component that the appended
/// sections number after.
#[derive(Default)]
struct Counts {
    core_modules: u32,
    core_instances: u32,
    core_funcs: u32,
    funcs: u32,
    types: u32,
}

impl Counts {
    fn external(&mut self, kind: ComponentExternalKind, what: &str) -> Result<(), Refusal> {
        match kind {
            ComponentExternalKind::Func => self.funcs += 1,
            ComponentExternalKind::Type => self.types += 1,
            ComponentExternalKind::Instance | ComponentExternalKind::Component => {}
            ComponentExternalKind::Module => return Err(format!("it has module {what}")),
            ComponentExternalKind::Value => return Err(format!("it has value {what}")),
        }
        Ok(())
    }
}

/// Rewrite `bytes` so that every mutable global of every top-level core
/// instance can be read and written through [`GET_EXPORT`]/[`SET_EXPORT`],
/// or say why that is not possible.
pub(crate) fn instrument(bytes: &[u8]) -> Result<Instrumented, Refusal> {
    let mut counts = Counts::default();
    let mut sections = Vec::new();
    let mut modules: Vec<ModuleInfo> = Vec::new();
    // Instances of each top-level module, by module index.
    let mut instantiations: Vec<(u32, u32)> = Vec::new();
    // Encoding of each open frame; `true` for the top-level component.
    let mut stack: Vec<(Encoding, bool)> = Vec::new();
    let mut current: Option<ModuleInfo> = None;
    let mut imported_globals = 0u32;
    let mut pending_module: Option<Range<usize>> = None;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| format!("cannot parse it: {e}"))?;
        if let Payload::Version { encoding, .. } = payload {
            let top = stack.is_empty();
            let parent_top = stack.last().is_some_and(|(e, t)| *e == Encoding::Component && *t);
            if encoding == Encoding::Module && parent_top {
                current = Some(ModuleInfo {
                    range: pending_module.take().unwrap_or(0..0),
                    sections: Vec::new(),
                    mutable: Vec::new(),
                    export_names: Vec::new(),
                });
                imported_globals = 0;
            }
            stack.push((encoding, top));
            continue;
        }
        if let Payload::End(_) = payload {
            if let Some((Encoding::Module, _)) = stack.pop()
                && stack.len() == 1
                && let Some(m) = current.take()
            {
                modules.push(m);
            }
            continue;
        }
        let depth = stack.len();
        let in_module = stack.last().is_some_and(|(e, _)| *e == Encoding::Module);
        if in_module {
            if depth == 2 {
                let m = current.as_mut().expect("a top-level module is open");
                scan_module(m, &payload, &mut imported_globals)?;
            } else if let Payload::GlobalSection(reader) = &payload
                && reader.clone().into_iter().any(|g| g.is_ok_and(|g| g.ty.mutable))
            {
                return Err("a nested component has a core module with mutable globals".into());
            }
            continue;
        }
        if depth != 1 {
            continue;
        }
        match &payload {
            Payload::ModuleSection { unchecked_range, .. } => {
                pending_module = Some(unchecked_range.clone());
                sections.push(Section::Module(modules.len()));
                counts.core_modules += 1;
            }
            Payload::InstanceSection(reader) => {
                for instance in reader.clone() {
                    let instance = instance.map_err(|e| e.to_string())?;
                    if let Instance::Instantiate { module_index, .. } = instance {
                        instantiations.push((module_index, counts.core_instances));
                    }
                    counts.core_instances += 1;
                }
            }
            Payload::ComponentAliasSection(reader) => {
                for alias in reader.clone() {
                    match alias.map_err(|e| e.to_string())? {
                        ComponentAlias::CoreInstanceExport { kind, .. } => {
                            if kind == wasmparser::ExternalKind::Func {
                                counts.core_funcs += 1;
                            }
                        }
                        ComponentAlias::InstanceExport { kind, .. } => counts.external(kind, "aliases")?,
                        ComponentAlias::Outer { kind, .. } => match kind {
                            ComponentOuterAliasKind::Type => counts.types += 1,
                            ComponentOuterAliasKind::CoreType | ComponentOuterAliasKind::Component => {}
                            ComponentOuterAliasKind::CoreModule => {
                                return Err("it aliases core modules".into());
                            }
                        },
                    }
                }
            }
            Payload::ComponentCanonicalSection(reader) => {
                for f in reader.clone() {
                    match f.map_err(|e| e.to_string())? {
                        CanonicalFunction::Lift { .. } => counts.funcs += 1,
                        _ => counts.core_funcs += 1,
                    }
                }
            }
            Payload::ComponentImportSection(reader) => {
                for import in reader.clone() {
                    counts.external(import.map_err(|e| e.to_string())?.ty.kind(), "imports")?;
                }
            }
            Payload::ComponentExportSection(reader) => {
                for export in reader.clone() {
                    let export = export.map_err(|e| e.to_string())?;
                    if export.name.name == GET_EXPORT || export.name.name == SET_EXPORT {
                        return Err(format!("it already exports `{}`", export.name.name));
                    }
                    counts.external(export.kind, "exports")?;
                }
            }
            Payload::ComponentTypeSection(reader) => counts.types += reader.count(),
            Payload::ComponentStartSection { .. } => return Err("it has a component start function".into()),
            _ => {}
        }
        if !matches!(payload, Payload::ModuleSection { .. })
            && let Some((id, range)) = payload.as_section()
        {
            sections.push(Section::Raw(id, range));
        }
    }

    // Every instance of a module with mutable globals, in instance order.
    let mut slots = Vec::new();
    let mut imports_of: Vec<(u32, u32)> = Vec::new();
    for &(module, instance) in &instantiations {
        let Some(info) = modules.get(module as usize) else {
            continue;
        };
        if info.mutable.is_empty() {
            continue;
        }
        imports_of.push((module, instance));
        for &(global, kind) in &info.mutable {
            slots.push(GlobalSlot {
                module,
                instance,
                global,
                kind,
            });
        }
    }
    if slots.len() > MAX_GLOBALS {
        return Err(format!(
            "it has {} mutable globals in its core instances, more than the {MAX_GLOBALS} the host instruments",
            slots.len()
        ));
    }
    for (i, info) in modules.iter().enumerate() {
        if !info.mutable.is_empty() && !instantiations.iter().any(|(m, _)| *m as usize == i) {
            return Err(format!(
                "core module {i} has mutable globals but is not instantiated at the top level"
            ));
        }
    }

    let mut out = Component::new();
    for section in &sections {
        match section {
            Section::Raw(id, range) => {
                out.section(&RawSection {
                    id: *id,
                    data: &bytes[range.clone()],
                });
            }
            Section::Module(i) => {
                let info = &modules[*i];
                let data = if info.mutable.is_empty() {
                    bytes[info.range.clone()].to_vec()
                } else {
                    export_globals(bytes, info)?
                };
                out.section(&RawSection {
                    id: wasm_encoder::ComponentSectionId::CoreModule as u8,
                    data: &data,
                });
            }
        }
    }
    append_accessors(&mut out, &counts, &imports_of, &slots);
    Ok(Instrumented {
        bytes: out.finish(),
        layout: GlobalLayout::new(slots),
    })
}

fn kind_of(ty: ValType) -> Result<GlobalKind, Refusal> {
    Ok(match ty {
        ValType::I32 => GlobalKind::I32,
        ValType::I64 => GlobalKind::I64,
        ValType::F32 => GlobalKind::F32,
        ValType::F64 => GlobalKind::F64,
        ValType::V128 => return Err("it has a mutable v128 global".into()),
        ValType::Ref(_) => return Err("it has a mutable reference global".into()),
    })
}

fn scan_module(m: &mut ModuleInfo, payload: &Payload<'_>, imported: &mut u32) -> Result<(), Refusal> {
    let err = |e: wasmparser::BinaryReaderError| e.to_string();
    match payload {
        Payload::ImportSection(reader) => {
            for imports in reader.clone() {
                match imports.map_err(err)? {
                    wasmparser::Imports::Single(_, import) => {
                        *imported += u32::from(matches!(import.ty, TypeRef::Global(_)));
                    }
                    wasmparser::Imports::Compact1 { items, .. } => {
                        for item in items {
                            *imported += u32::from(matches!(item.map_err(err)?.ty, TypeRef::Global(_)));
                        }
                    }
                    wasmparser::Imports::Compact2 { ty, names, .. } => {
                        if matches!(ty, TypeRef::Global(_)) {
                            *imported += names.count();
                        }
                    }
                }
            }
        }
        Payload::GlobalSection(reader) => {
            for (i, global) in reader.clone().into_iter().enumerate() {
                let global = global.map_err(err)?;
                if global.ty.mutable {
                    m.mutable
                        .push((*imported + i as u32, kind_of(global.ty.content_type)?));
                }
            }
        }
        Payload::ExportSection(reader) => {
            for export in reader.clone() {
                m.export_names.push(export.map_err(err)?.name.to_string());
            }
        }
        _ => {}
    }
    if let Some((id, range)) = payload.as_section() {
        m.sections.push((id, range));
    }
    Ok(())
}

/// The module's bytes with one more export per mutable global; every
/// other section copied as it is.
fn export_globals(bytes: &[u8], m: &ModuleInfo) -> Result<Vec<u8>, Refusal> {
    const EXPORT: u8 = 7;
    // Sections that must come after the export section.
    const AFTER_EXPORT: [u8; 5] = [8, 9, 12, 10, 11];
    let name = |g: u32| format!("{CORE_EXPORT_PREFIX}{g}");
    if let Some(taken) = m
        .mutable
        .iter()
        .map(|(g, _)| name(*g))
        .find(|n| m.export_names.contains(n))
    {
        return Err(format!("a core module already exports `{taken}`"));
    }
    let mut entries = Vec::new();
    for (g, _) in &m.mutable {
        let n = name(*g);
        leb(&mut entries, n.len() as u64);
        entries.extend_from_slice(n.as_bytes());
        entries.push(0x03); // global
        leb(&mut entries, u64::from(*g));
    }
    let new_count = (m.export_names.len() + m.mutable.len()) as u64;
    let mut out = Vec::with_capacity(m.range.len() + entries.len() + 16);
    out.extend_from_slice(&bytes[m.range.start..m.range.start + 8]);
    let mut written = false;
    let section = |out: &mut Vec<u8>, id: u8, data: &[u8]| {
        out.push(id);
        leb(out, data.len() as u64);
        out.extend_from_slice(data);
    };
    let fresh = |old: &[u8]| -> Vec<u8> {
        let mut d = Vec::new();
        leb(&mut d, new_count);
        d.extend_from_slice(old);
        d.extend_from_slice(&entries);
        d
    };
    for (id, range) in &m.sections {
        let data = &bytes[range.clone()];
        if *id == EXPORT {
            let (_, skip) = read_leb(data).ok_or("a core module's export section is malformed")?;
            section(&mut out, EXPORT, &fresh(&data[skip..]));
            written = true;
            continue;
        }
        if !written && AFTER_EXPORT.contains(id) {
            section(&mut out, EXPORT, &fresh(&[]));
            written = true;
        }
        section(&mut out, *id, data);
    }
    if !written {
        section(&mut out, EXPORT, &fresh(&[]));
    }
    Ok(out)
}

/// Append the accessor module, its instance, the lifted `get`/`set` and
/// their exports.
fn append_accessors(out: &mut Component, counts: &Counts, instances: &[(u32, u32)], slots: &[GlobalSlot]) {
    let mut types = TypeSection::new();
    types
        .ty()
        .function([wasm_encoder::ValType::I32], [wasm_encoder::ValType::I64]);
    types
        .ty()
        .function([wasm_encoder::ValType::I32, wasm_encoder::ValType::I64], []);
    let mut imports = ImportSection::new();
    for s in slots {
        imports.import(
            &s.instance.to_string(),
            &format!("{CORE_EXPORT_PREFIX}{}", s.global),
            EntityType::Global(GlobalType {
                val_type: match s.kind {
                    GlobalKind::I32 => wasm_encoder::ValType::I32,
                    GlobalKind::I64 => wasm_encoder::ValType::I64,
                    GlobalKind::F32 => wasm_encoder::ValType::F32,
                    GlobalKind::F64 => wasm_encoder::ValType::F64,
                },
                mutable: true,
                shared: false,
            }),
        );
    }
    let mut functions = FunctionSection::new();
    functions.function(0);
    functions.function(1);
    let mut exports = ExportSection::new();
    exports.export("get", ExportKind::Func, 0);
    exports.export("set", ExportKind::Func, 1);
    let mut code = CodeSection::new();
    code.function(&dispatch(slots, |k, g, f| {
        f.instruction(&Instruction::GlobalGet(g));
        match k {
            GlobalKind::I32 => {
                f.instruction(&Instruction::I64ExtendI32U);
            }
            GlobalKind::I64 => {}
            GlobalKind::F32 => {
                f.instruction(&Instruction::I32ReinterpretF32);
                f.instruction(&Instruction::I64ExtendI32U);
            }
            GlobalKind::F64 => {
                f.instruction(&Instruction::I64ReinterpretF64);
            }
        }
    }));
    code.function(&dispatch(slots, |k, g, f| {
        f.instruction(&Instruction::LocalGet(1));
        match k {
            GlobalKind::I32 => {
                f.instruction(&Instruction::I32WrapI64);
            }
            GlobalKind::I64 => {}
            GlobalKind::F32 => {
                f.instruction(&Instruction::I32WrapI64);
                f.instruction(&Instruction::F32ReinterpretI32);
            }
            GlobalKind::F64 => {
                f.instruction(&Instruction::F64ReinterpretI64);
            }
        }
        f.instruction(&Instruction::GlobalSet(g));
    }));
    let mut module = Module::new();
    module.section(&types);
    module.section(&imports);
    module.section(&functions);
    module.section(&exports);
    module.section(&code);
    out.section(&ModuleSection(&module));

    let mut instance = InstanceSection::new();
    let names: Vec<String> = instances.iter().map(|(_, i)| i.to_string()).collect();
    instance.instantiate(
        counts.core_modules,
        instances
            .iter()
            .zip(&names)
            .map(|((_, i), n)| (n.as_str(), ModuleArg::Instance(*i))),
    );
    out.section(&instance);
    let accessor = counts.core_instances;

    let mut aliases = ComponentAliasSection::new();
    for name in ["get", "set"] {
        aliases.alias(Alias::CoreInstanceExport {
            instance: accessor,
            kind: ExportKind::Func,
            name,
        });
    }
    out.section(&aliases);
    let mut ctypes = ComponentTypeSection::new();
    ctypes
        .function()
        .params([("index", PrimitiveValType::U32)])
        .result(Some(ComponentValType::Primitive(PrimitiveValType::U64)));
    ctypes
        .function()
        .params([("index", PrimitiveValType::U32), ("value", PrimitiveValType::U64)])
        .result(None);
    out.section(&ctypes);
    let mut canon = CanonicalFunctionSection::new();
    canon.lift(counts.core_funcs, counts.types, []);
    canon.lift(counts.core_funcs + 1, counts.types + 1, []);
    out.section(&canon);
    let mut export = ComponentExportSection::new();
    export.export(GET_EXPORT, ComponentExportKind::Func, counts.funcs, None);
    export.export(SET_EXPORT, ComponentExportKind::Func, counts.funcs + 1, None);
    out.section(&export);
}

/// A function that branches on its first parameter to `case(kind,
/// global, f)` for that slot (then returns), trapping on any other index.
fn dispatch(slots: &[GlobalSlot], case: impl Fn(GlobalKind, u32, &mut Function)) -> Function {
    let mut f = Function::new([]);
    let n = slots.len() as u32;
    for _ in 0..=n {
        f.instruction(&Instruction::Block(BlockType::Empty));
    }
    f.instruction(&Instruction::LocalGet(0));
    f.instruction(&Instruction::BrTable((0..n).collect(), n));
    f.instruction(&Instruction::End);
    for (i, s) in slots.iter().enumerate() {
        case(s.kind, i as u32, &mut f);
        f.instruction(&Instruction::Return);
        f.instruction(&Instruction::End);
    }
    f.instruction(&Instruction::Unreachable);
    f.instruction(&Instruction::End);
    f
}

fn leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// An unsigned LEB128 at the start of `data` and its length in bytes.
fn read_leb(data: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, b) in data.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use wasmtime::component::{Component, Linker};
    use wasmtime::{Engine, Store};

    use super::*;

    /// A component whose core module keeps four mutable globals and a
    /// stack pointer, with lifted functions that change and read them.
    const COMPONENT: &str = r#"(component
      (core module $m
        (memory (export "mem") 1)
        (global $__stack_pointer (mut i32) (i32.const 1024))
        (global $a (mut i32) (i32.const 7))
        (global $b (mut i64) (i64.const -2))
        (global $c (mut f32) (f32.const 1.5))
        (global $d (mut f64) (f64.const -0.25))
        (global $k i32 (i32.const 3))
        (func (export "bump")
          (global.set $a (i32.add (global.get $a) (global.get $k)))
          (global.set $b (i64.mul (global.get $b) (i64.const 3)))
          (global.set $c (f32.add (global.get $c) (f32.const 1)))
          (global.set $d (f64.neg (global.get $d))))
        (func (export "sum") (result i64)
          (i64.add (i64.extend_i32_u (global.get $a)) (global.get $b))))
      (core instance $i (instantiate $m))
      (func (export "bump") (canon lift (core func $i "bump")))
      (func (export "sum") (result s64) (canon lift (core func $i "sum"))))"#;

    fn instantiate(bytes: &[u8]) -> (Store<()>, wasmtime::component::Instance) {
        let engine = Engine::default();
        let component = Component::new(&engine, bytes).expect("the instrumented component compiles");
        let mut store = Store::new(&engine, ());
        let instance = Linker::new(&engine).instantiate(&mut store, &component).unwrap();
        (store, instance)
    }

    #[test]
    fn globals_are_read_and_written_through_the_accessors() {
        let bytes = wat::parse_str(COMPONENT).unwrap();
        let done = instrument(&bytes).unwrap();
        let kinds: Vec<GlobalKind> = done.layout.slots().iter().map(|s| s.kind).collect();
        use GlobalKind::*;
        assert_eq!(kinds, [I32, I32, I64, F32, F64]);
        let (mut store, instance) = instantiate(&done.bytes);
        let get = instance
            .get_typed_func::<(u32,), (u64,)>(&mut store, GET_EXPORT)
            .unwrap();
        let set = instance
            .get_typed_func::<(u32, u64), ()>(&mut store, SET_EXPORT)
            .unwrap();
        let bump = instance.get_typed_func::<(), ()>(&mut store, "bump").unwrap();
        let sum = instance.get_typed_func::<(), (i64,)>(&mut store, "sum").unwrap();
        bump.call(&mut store, ()).unwrap();
        let read = |store: &mut Store<()>| -> Vec<u64> {
            (0..5).map(|i| get.call(&mut *store, (i,)).unwrap().0).collect()
        };
        let after_bump = read(&mut store);
        assert_eq!(
            after_bump,
            [
                1024,
                10,
                (-6i64) as u64,
                u64::from(2.5f32.to_bits()),
                0.25f64.to_bits()
            ]
        );
        // A fresh instance given these values behaves as the bumped one.
        let (mut fresh, other) = instantiate(&done.bytes);
        let set2 = other
            .get_typed_func::<(u32, u64), ()>(&mut fresh, SET_EXPORT)
            .unwrap();
        for (i, v) in after_bump.iter().enumerate() {
            set2.call(&mut fresh, (i as u32, *v)).unwrap();
        }
        let get2 = other
            .get_typed_func::<(u32,), (u64,)>(&mut fresh, GET_EXPORT)
            .unwrap();
        let copied: Vec<u64> = (0..5).map(|i| get2.call(&mut fresh, (i,)).unwrap().0).collect();
        assert_eq!(copied, after_bump);
        let sum2 = other.get_typed_func::<(), (i64,)>(&mut fresh, "sum").unwrap();
        assert_eq!(
            sum2.call(&mut fresh, ()).unwrap().0,
            sum.call(&mut store, ()).unwrap().0
        );
        // NaN payloads survive: values are bit patterns.
        let nan = 0x7fc0_1234u64;
        set.call(&mut store, (3, nan)).unwrap();
        assert_eq!(get.call(&mut store, (3,)).unwrap().0, nan);
        // An index beyond the layout traps rather than touching anything.
        assert!(get.call(&mut store, (5,)).is_err());
    }

    #[test]
    fn module_code_is_copied_unchanged() {
        let bytes = wat::parse_str(COMPONENT).unwrap();
        let done = instrument(&bytes).unwrap();
        let code = |b: &[u8]| -> Vec<Vec<u8>> {
            let mut v = Vec::new();
            for p in Parser::new(0).parse_all(b) {
                if let Ok(Payload::CodeSectionStart { range, .. }) = p {
                    v.push(b[range].to_vec());
                }
            }
            v
        };
        let (before, after) = (code(&bytes), code(&done.bytes));
        // The operator's code, then the accessor module's.
        assert_eq!(after.len(), before.len() + 1);
        assert_eq!(after[..before.len()], before[..]);
    }

    #[test]
    fn layouts_differ_when_globals_differ() {
        let a = instrument(&wat::parse_str(COMPONENT).unwrap()).unwrap();
        let other = COMPONENT.replace("(global $d (mut f64)", "(global $d f64");
        let b = instrument(&wat::parse_str(other).unwrap()).unwrap();
        assert_ne!(a.layout.digest_hex(), b.layout.digest_hex());
        assert_eq!(b.layout.len(), 4);
    }

    #[test]
    fn too_many_globals_are_refused() {
        let globals: String = (0..=MAX_GLOBALS)
            .map(|_| "(global (mut i32) (i32.const 0))")
            .collect();
        let c = format!("(component (core module $m {globals}) (core instance (instantiate $m)))");
        let err = instrument(&wat::parse_str(c).unwrap()).err().expect("refused");
        assert!(err.contains("more than the 65536 the host instruments"), "{err}");
    }

    #[test]
    fn a_module_without_export_section_gets_one_in_order() {
        let c = r#"(component
          (core module $m (global $g (mut i32) (i32.const 1)) (global $h (mut i32) (i32.const 2))
            (func $f (global.set $g (i32.const 5))) (start $f))
          (core instance $i (instantiate $m)))"#;
        let done = instrument(&wat::parse_str(c).unwrap()).unwrap();
        let (mut store, instance) = instantiate(&done.bytes);
        let get = instance
            .get_typed_func::<(u32,), (u64,)>(&mut store, GET_EXPORT)
            .unwrap();
        assert_eq!(get.call(&mut store, (0,)).unwrap().0, 5);
        assert_eq!(get.call(&mut store, (1,)).unwrap().0, 2);
    }
}
