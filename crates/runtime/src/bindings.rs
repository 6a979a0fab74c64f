//! Host-side bindings generated from `wit/operator.wit`.

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "plugin",
    additional_derives: [PartialEq, Eq],
});

pub use self::memento::operator::types::{Batch, Context};
