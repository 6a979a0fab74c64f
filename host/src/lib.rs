//! memento: a WebAssembly plugin host for stateful stream operators with
//! unified checkpoints and savepoints.
//!
//! Start at [`Host`]: it loads a job file and its plugins into a [`Job`],
//! which runs them as a sandboxed dataflow while its coordinator takes
//! checkpoints and savepoints into the unified [`store`].
pub mod api;
pub mod cli;
pub mod coordinator;
pub mod dataflow;
mod host;
pub mod runtime;
pub mod service;
pub mod snapshot;
pub mod spec;
pub mod store;

pub use coordinator::{FinalState, JobControl, JobFailed, JobReport};
pub use host::{DEFAULT_TENANT, Host, HostError, Job, RunOptions, StartFrom};
