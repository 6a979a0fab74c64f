//! Host-side bindings generated from the two contract versions this host
//! implements: `wit/operator.wit` (`memento:operator@0.2.0`, current) and
//! `wit/0.1.0/operator.wit` (kept so that 0.1.0 components keep running).

/// `memento:operator@0.2.0`: streaming state, key groups.
pub(crate) mod v2 {
    wasmtime::component::bindgen!({
        path: "../../wit/operator.wit",
        world: "plugin",
        additional_derives: [PartialEq, Eq],
        imports: { "memento:operator/state": trappable },
        with: {
            "memento:operator/state.state-writer": crate::state::StateWriter,
            "memento:operator/state.state-reader": crate::state::StateReader,
        },
    });

    pub use self::memento::operator::types::{Batch, Context, KeyGroupRange};
}

/// `memento:operator@0.1.0`: state as one `list<u8>`, no key groups.
pub(crate) mod v1 {
    wasmtime::component::bindgen!({
        path: "../../wit/0.1.0/operator.wit",
        world: "plugin",
        additional_derives: [PartialEq, Eq],
    });

    pub use self::memento::operator::types::{Batch, Context};
}

pub use v2::{Batch, Context, KeyGroupRange};
