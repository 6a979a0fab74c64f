//! memento: a WebAssembly plugin host for stateful stream operators.
pub mod cli;
pub mod dataflow;
mod host;
pub mod runtime;
pub mod spec;
pub mod store;

pub use host::{Host, HostError, Job};
