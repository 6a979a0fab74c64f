//! One attempt of a job: a source thread, one thread per operator task,
//! bounded channels between them (backpressure), events travelling in
//! batches and routed between stages by their key's key group, and snapshot
//! barriers flowing with the data.
//!
//! ```text
//! source ──partition──▶ op0[0..p0] ──partition──▶ op1[0..p1] … ──▶ sink part per last task
//!   ▲ barriers injected here        tasks align, capture, forward, ack ──▶ coordinator
//! ```
//!
//! Each task owns its plugin instance and calls it synchronously. Tasks talk
//! to the coordinator only through messages (`Report`s); besides the
//! channels, the only thing threads share is each edge's byte budget (a
//! counter under a lock, see `budget`).

//!
//! `attempt` starts and stops the threads, `task` runs one operator task
//! (its barrier alignment is `align`), `messages` is what they exchange and
//! `budget` bounds it in bytes, `source` and `sink` are the ends,
//! `partition` routes keys to tasks, `fault` is test-only panics.

mod align;
mod attempt;
mod budget;
mod error;
pub(crate) mod fault;
mod messages;
pub mod partition;
pub mod sink;
pub mod source;
mod task;

pub(crate) use attempt::{Attempt, InjectError, KeyGroups, RestorePoint};
pub use budget::{INPUT_BYTES, MIN_EDGE_BYTES, edge_capacity};
pub use error::JobError;
pub(crate) use messages::Report;
pub use messages::{Barrier, TaskFigures};
