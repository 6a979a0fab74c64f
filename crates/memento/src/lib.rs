//! memento: a WebAssembly plugin host for stateful stream operators with
//! unified checkpoints and savepoints.
//!
//! Start at [`Host`]: it loads a job file and its plugins into a [`Job`],
//! which runs them as a sandboxed dataflow while its coordinator takes
//! checkpoints and savepoints into the unified [`store`].
//!
//! A job's source and sink come from its job file or from the embedder:
//! [`io`] holds the traits both kinds implement, the push source and
//! callback sink a service feeds and reads in-process, and the
//! exactly-once contract between them.
//!
//! The store ([`store`], crate `memento-store`) and the Wasm runtime
//! ([`runtime`], crate `memento-runtime`) are crates of their own, re-exported
//! here so that an embedder needs only this one.
//!
//! # Features
//!
//! - `fault-injection` (off): test-only. An operator config key
//!   `memento.fault-injection.panic` (`task`, `source`, `upload`,
//!   `coordinator`) makes the host panic there, so tests can prove a panic
//!   fails only its job. Never enable it in a build you ship.
pub mod coordinator;
pub mod dataflow;
mod host;
pub mod io;
pub mod service;
pub mod snapshot;
pub mod spec;

pub use memento_runtime as runtime;
pub use memento_store as store;

pub use coordinator::{FinalState, JobControl, JobFailed, JobReport};
pub use host::{DEFAULT_TENANT, Host, HostError, Job, RunOptions, StartFrom, default_cache_dir};
