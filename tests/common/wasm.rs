//! Components made for tests by rewriting built plugins.

/// `component` with one more mutable `v128` global in the core module that
/// defines a memory (the guest's own): a component that still fulfils the
/// contract, but whose state is no longer all in its memories and globals
/// the host can reach (its instrumentation reads and writes scalar
/// globals only).
pub fn with_extra_global(component: &[u8]) -> Vec<u8> {
    with_extra_global_of(
        component,
        wasm_encoder::ValType::V128,
        wasm_encoder::ConstExpr::v128_const(0),
    )
}

/// `component` with one more mutable global of type `ty`, initialised by
/// `init`, in the core module that defines a memory.
pub fn with_extra_global_of(
    component: &[u8],
    ty: wasm_encoder::ValType,
    init: wasm_encoder::ConstExpr,
) -> Vec<u8> {
    use wasm_encoder::reencode::{Error, Reencode, ReencodeComponent, component_utils, utils};

    let mut modules = 0usize;
    let mut target = None;
    for payload in wasmparser::Parser::new(0).parse_all(component) {
        match payload.unwrap() {
            wasmparser::Payload::Version {
                encoding: wasmparser::Encoding::Module,
                ..
            } => modules += 1,
            wasmparser::Payload::MemorySection(s) if s.count() > 0 => {
                target = target.or(Some(modules - 1));
            }
            _ => {}
        }
    }
    let target = target.expect("a core module defines a memory");

    struct AddGlobal {
        target: usize,
        modules: usize,
        added: bool,
        ty: wasm_encoder::ValType,
        init: wasm_encoder::ConstExpr,
    }
    impl Reencode for AddGlobal {
        type Error = std::convert::Infallible;

        fn parse_global_section(
            &mut self,
            globals: &mut wasm_encoder::GlobalSection,
            section: wasmparser::GlobalSectionReader<'_>,
        ) -> Result<(), Error<Self::Error>> {
            utils::parse_global_section(self, globals, section)?;
            // Numbered after every existing global: no index changes.
            if self.modules == self.target + 1 {
                let ty = wasm_encoder::GlobalType {
                    val_type: self.ty,
                    mutable: true,
                    shared: false,
                };
                globals.global(ty, &self.init);
                self.added = true;
            }
            Ok(())
        }
    }
    impl ReencodeComponent for AddGlobal {
        fn parse_component_submodule(
            &mut self,
            component: &mut wasm_encoder::Component,
            parser: wasmparser::Parser,
            submodule: &[u8],
        ) -> Result<(), Error<Self::Error>> {
            self.modules += 1;
            component_utils::parse_component_submodule(self, component, parser, submodule)
        }
    }

    let mut rewriter = AddGlobal {
        target,
        modules: 0,
        added: false,
        ty,
        init,
    };
    let mut out = wasm_encoder::Component::new();
    rewriter
        .parse_component(&mut out, wasmparser::Parser::new(0), component)
        .unwrap();
    assert!(rewriter.added, "core module {target} has a global section");
    out.finish()
}
