//! Calls into the guest: each with its deadline, fuel and copy budget
//! armed, and its failure mapped to a [`RuntimeError`] naming the task,
//! the phase and the limit or trap.

use std::time::Instant;

use wasmtime::component::Resource;
use wasmtime::{Store, Trap};

use crate::batch::{self, Event};
use crate::bindings::{Batch, Context, v1};
use crate::data::{InstanceData, LimitHit};
use crate::error::{RuntimeError, one_line};
use crate::label::{Phase, TaskLabel};
use crate::state::{MAX_PIECE, Piece, Refusal, StateReader, StateSink, StateSource, StateWriter};

use super::capture::CallPin;
use super::stderr::last_stderr_message;
use super::{Bindings, TaskInstance};

/// What a 0.2.0 guest may pass the host in one call during `snapshot-state`:
/// a state piece, with room for a log line beside it.
const PIECE_CALL_BUDGET: usize = MAX_PIECE + (64 << 10);

impl TaskInstance {
    /// Run one export call with the deadline armed and map its outcome:
    /// trap, deadline, memory limit, or the guest's own error value.
    fn call<R>(
        &mut self,
        phase: Phase,
        f: impl FnOnce(&Bindings, &mut Store<InstanceData>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, RuntimeError> {
        if self.poisoned {
            return Err(RuntimeError::Poisoned {
                task: (*self.label).clone(),
            });
        }
        self.store.set_epoch_deadline(self.deadline_ticks);
        if let Some(fuel) = self.fuel {
            // Per call, not per instance: the limit bounds one call's CPU
            // like the deadline does, deterministically.
            self.store
                .set_fuel(fuel)
                .expect("the engine meters fuel when `fuel` is set");
        }
        self.store.set_hostcall_fuel(self.copy_budget(phase));
        let pin = CallPin::new(&self.tracking);
        let started = Instant::now();
        let result = f(&self.plugin, &mut self.store);
        self.stats.time_in_plugin += started.elapsed();
        drop(pin);
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(RuntimeError::Guest {
                task: (*self.label).clone(),
                phase,
                message,
            }),
            Err(e) => {
                self.poisoned = true;
                Err(self.trap_error(phase, &e))
            }
        }
    }

    /// Bytes the host copies out of the result of a call in `phase` at
    /// most (see `new`).
    fn copy_budget(&self, phase: Phase) -> usize {
        match phase {
            Phase::Process | Phase::Close => self.max_output,
            // A 0.2.0 guest passes its state in pieces, each a host call
            // of its own; the running total is the writer's to check.
            Phase::SnapshotState if matches!(self.plugin, Bindings::V2(_)) => PIECE_CALL_BUDGET,
            Phase::SnapshotState => self.max_snapshot,
            _ => self.max_other,
        }
    }

    pub(super) fn trap_error(&mut self, phase: Phase, e: &wasmtime::Error) -> RuntimeError {
        let task = (*self.label).clone();
        match self.store.data_mut().take_limit_hit() {
            Some(LimitHit::Memory(detail)) => return RuntimeError::MemoryLimit { task, phase, detail },
            Some(LimitHit::Table(detail)) => return RuntimeError::ResourceLimit { task, phase, detail },
            None => {}
        }
        let trap = e.downcast_ref::<Trap>();
        if trap == Some(&Trap::Interrupt) {
            return RuntimeError::DeadlineExceeded {
                task,
                phase,
                timeout: self.call_timeout,
            };
        }
        if trap == Some(&Trap::OutOfFuel) && self.fuel_limited {
            return RuntimeError::FuelExhausted {
                task,
                phase,
                fuel: self.fuel.unwrap_or(0),
            };
        }
        // wasmtime reports these through its error chain only (the types
        // are private); the texts are pinned by tests/sandbox.rs.
        let chain = one_line(e);
        if chain.contains("fuel allocated for hostcalls has been exhausted") {
            if phase == Phase::SnapshotState && matches!(self.plugin, Bindings::V2(_)) {
                return RuntimeError::StateRefused {
                    task,
                    phase,
                    reason: format!(
                        "a call to the host passed more than {PIECE_CALL_BUDGET} bytes \
                         (a state piece is at most {MAX_PIECE} bytes)"
                    ),
                };
            }
            let (key, limit) = match phase {
                Phase::Process | Phase::Close => ("max_output", self.max_output),
                Phase::SnapshotState => ("max_snapshot", self.max_snapshot),
                _ => ("memory", self.max_other),
            };
            return RuntimeError::OutputLimit {
                task,
                phase,
                key,
                limit: limit as u64,
            };
        }
        if chain.contains("resource table has no free keys") || chain.contains("store handle limit exceeded")
        {
            return RuntimeError::ResourceLimit {
                task,
                phase,
                detail: format!(
                    "more than {} live host resources (limits.max_resources)",
                    self.max_resources
                ),
            };
        }
        let mut message = match trap {
            Some(Trap::StackOverflow) => {
                "call stack exhausted (stack overflow: too deep a recursion)".to_string()
            }
            Some(trap) => trap.to_string(),
            None => e.root_cause().to_string(),
        };
        if let Some(panic) = last_stderr_message(&self.stderr.contents()) {
            message = format!("{message} ({panic})");
        }
        RuntimeError::Trap { task, phase, message }
    }

    /// Call `open` with the task's context. A 0.1.0 component gets the
    /// fields its contract has (no key groups).
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `open`.
    pub fn open(&mut self, ctx: &Context) -> Result<(), RuntimeError> {
        self.owned = ctx.owned.start..ctx.owned.end;
        self.call(Phase::Open, |p, s| match p {
            Bindings::V2(p) => p.memento_operator_operator().call_open(s, ctx),
            Bindings::V1(p) => {
                let ctx = v1::Context {
                    job: ctx.job.clone(),
                    operator_name: ctx.operator_name.clone(),
                    task_index: ctx.task_index,
                    parallelism: ctx.parallelism,
                    config: ctx.config.clone(),
                };
                p.memento_operator_operator().call_open(s, &ctx)
            }
        })
    }

    /// Call `process` with a batch; returns the emitted events.
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `process`.
    pub fn process(&mut self, events: &[Event]) -> Result<Vec<Event>, RuntimeError> {
        self.stats.process_calls += 1;
        let batch = batch::pack(events);
        let out = self.call(Phase::Process, |p, s| match p {
            Bindings::V2(p) => p.memento_operator_operator().call_process(s, &batch),
            Bindings::V1(p) => p
                .memento_operator_operator()
                .call_process(s, &to_v1(batch))
                .map(|r| r.map(from_v1)),
        })?;
        self.unpack(Phase::Process, out)
    }

    /// Unpack a batch the guest returned.
    fn unpack(&self, phase: Phase, out: Batch) -> Result<Vec<Event>, RuntimeError> {
        unpack_output(&self.label, phase, out)
    }

    /// Call `close`; returns the final events.
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `close`.
    pub fn close(&mut self) -> Result<Vec<Event>, RuntimeError> {
        let out = self.call(Phase::Close, |p, s| match p {
            Bindings::V2(p) => p.memento_operator_operator().call_close(s),
            Bindings::V1(p) => p
                .memento_operator_operator()
                .call_close(s)
                .map(|r| r.map(from_v1)),
        })?;
        self.unpack(Phase::Close, out)
    }

    /// Call `snapshot-state`, handing the state to `sink` piece by piece as
    /// the guest writes it; returns the bytes written. A 0.2.0 guest
    /// streams its pieces; a 0.1.0 guest returns one `list<u8>`, which
    /// reaches `sink` as unkeyed pieces of at most [`MAX_PIECE`] bytes.
    /// Either way the total is bounded by `max_snapshot`, pieces of key
    /// groups the task does not own are refused, and `sink` is dropped
    /// before this returns (its end of stream).
    ///
    /// # Errors
    /// [`RuntimeError::Guest`] when the operator declines;
    /// [`RuntimeError::OutputLimit`] past `max_snapshot`;
    /// [`RuntimeError::StateRefused`] for a piece the contract forbids or a
    /// failed sink; a trap's error otherwise.
    pub fn snapshot_state_to(&mut self, sink: Box<dyn StateSink>) -> Result<u64, RuntimeError> {
        let writer = StateWriter::new(sink, self.max_snapshot as u64, self.owned.clone());
        let (guest, writer) = match &self.plugin {
            Bindings::V2(_) => {
                let handle = self.push_resource(Phase::SnapshotState, writer)?;
                let rep = handle.rep();
                let guest = self.call(Phase::SnapshotState, |p, s| match p {
                    Bindings::V2(p) => p
                        .memento_operator_snapshot()
                        .call_snapshot_state(s, Resource::new_borrow(rep)),
                    Bindings::V1(_) => unreachable!("matched V2 above"),
                });
                (guest, self.take_resource(Phase::SnapshotState, handle)?)
            }
            Bindings::V1(_) => {
                let mut writer = writer;
                let guest = self
                    .call(Phase::SnapshotState, |p, s| match p {
                        Bindings::V1(p) => p.memento_operator_snapshot().call_snapshot_state(s),
                        Bindings::V2(_) => unreachable!("matched V1 above"),
                    })
                    .map(|bytes| {
                        for piece in bytes.chunks(MAX_PIECE) {
                            if writer.write(None, piece.to_vec()).is_err() {
                                break;
                            }
                        }
                    });
                (guest, writer)
            }
        };
        // A trap first (the instance is poisoned), then the host's refusal
        // (whatever the guest made of it), then the guest's own answer.
        if let Err(e @ RuntimeError::Trap { .. } | e @ RuntimeError::DeadlineExceeded { .. }) = guest {
            return Err(e);
        }
        let written = match writer.finish() {
            Ok((_sink, written)) => written,
            Err(Refusal::TooMuch { limit }) => {
                return Err(RuntimeError::OutputLimit {
                    task: (*self.label).clone(),
                    phase: Phase::SnapshotState,
                    key: "max_snapshot",
                    limit,
                });
            }
            Err(r) => {
                return Err(RuntimeError::StateRefused {
                    task: (*self.label).clone(),
                    phase: Phase::SnapshotState,
                    reason: r.message(),
                });
            }
        };
        guest.map(|()| written)
    }

    /// Call `restore-state` with the pieces `source` yields. A 0.2.0 guest
    /// reads them through a `state-reader`; a 0.1.0 guest gets the unkeyed
    /// pieces joined into one `list<u8>` (at most the memory limit), and
    /// keyed pieces, which it could not understand, are refused.
    ///
    /// # Errors
    /// [`RuntimeError::StateUnreadable`] when `source` fails;
    /// [`RuntimeError::StateRefused`] for keyed state and a 0.1.0 guest;
    /// otherwise as any call, naming `restore-state`.
    pub fn restore_state_from(&mut self, mut source: Box<dyn StateSource>) -> Result<(), RuntimeError> {
        let unreadable = |task: &TaskLabel, reason: String| RuntimeError::StateUnreadable {
            task: task.clone(),
            reason,
        };
        if let Bindings::V1(_) = self.plugin {
            let mut bytes = Vec::new();
            while let Some((group, piece)) = source.read().map_err(|e| unreadable(&self.label, e))? {
                if let Some(g) = group {
                    return Err(RuntimeError::StateRefused {
                        task: (*self.label).clone(),
                        phase: Phase::RestoreState,
                        reason: format!(
                            "the snapshot holds keyed state (key group {g}), which a memento:operator@0.1.0 \
                             component cannot restore; resume with a build of the plugin on 0.2.0"
                        ),
                    });
                }
                if bytes.len() + piece.len() > self.max_other {
                    return Err(RuntimeError::StateRefused {
                        task: (*self.label).clone(),
                        phase: Phase::RestoreState,
                        reason: format!(
                            "the state is larger than the memory limit of {} bytes, which a \
                             memento:operator@0.1.0 component must hold whole",
                            self.max_other
                        ),
                    });
                }
                bytes.extend_from_slice(&piece);
            }
            return self.call(Phase::RestoreState, |p, s| match p {
                Bindings::V1(p) => p.memento_operator_snapshot().call_restore_state(s, &bytes),
                Bindings::V2(_) => unreachable!("matched V1 above"),
            });
        }
        let handle = self.push_resource(Phase::RestoreState, StateReader::new(source))?;
        let rep = handle.rep();
        let guest = self.call(Phase::RestoreState, |p, s| match p {
            Bindings::V2(p) => p
                .memento_operator_snapshot()
                .call_restore_state(s, Resource::new_borrow(rep)),
            Bindings::V1(_) => unreachable!("matched V2 above"),
        });
        let reader = self.take_resource(Phase::RestoreState, handle)?;
        if let Err(e @ RuntimeError::Trap { .. } | e @ RuntimeError::DeadlineExceeded { .. }) = guest {
            return Err(e);
        }
        if let Some(reason) = reader.failure() {
            return Err(unreadable(&self.label, reason));
        }
        guest
    }

    /// All state bytes `snapshot-state` writes, pieces joined in order
    /// whatever their key group: for tests and benchmarks that look at a
    /// whole state.
    ///
    /// # Errors
    /// As [`TaskInstance::snapshot_state_to`].
    pub fn snapshot_state(&mut self) -> Result<Vec<u8>, RuntimeError> {
        let joined = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        self.snapshot_state_to(Box::new(Join(joined.clone())))?;
        let bytes = std::mem::take(&mut *joined.lock().expect("not poisoned"));
        Ok(bytes)
    }

    /// Restore from bytes as one unkeyed stream (for tests and benchmarks).
    ///
    /// # Errors
    /// As [`TaskInstance::restore_state_from`].
    pub fn restore_state(&mut self, state: &[u8]) -> Result<(), RuntimeError> {
        let pieces: Vec<Piece> = state.chunks(MAX_PIECE).map(|p| (None, p.to_vec())).collect();
        self.restore_state_from(Box::new(pieces.into_iter()))
    }

    /// Lend `value` to the guest for one call, as a host resource.
    fn push_resource<T: Send + 'static>(
        &mut self,
        phase: Phase,
        value: T,
    ) -> Result<Resource<T>, RuntimeError> {
        self.store
            .data_mut()
            .table()
            .push(value)
            .map_err(|e| RuntimeError::ResourceLimit {
                task: (*self.label).clone(),
                phase,
                detail: e.to_string(),
            })
    }

    /// Take a lent resource back after the call.
    fn take_resource<T: 'static>(&mut self, phase: Phase, handle: Resource<T>) -> Result<T, RuntimeError> {
        self.store
            .data_mut()
            .table()
            .delete(handle)
            .map_err(|e| RuntimeError::StateRefused {
                task: (*self.label).clone(),
                phase,
                reason: format!("the host lost the resource it lent: {e}"),
            })
    }
}

/// A sink joining every piece into one buffer.
struct Join(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl StateSink for Join {
    fn write(&mut self, _key_group: Option<u32>, bytes: Vec<u8>) -> Result<(), String> {
        self.0.lock().expect("not poisoned").extend_from_slice(&bytes);
        Ok(())
    }
}

/// Pieces held in memory are a source.
impl StateSource for std::vec::IntoIter<Piece> {
    fn read(&mut self) -> Result<Option<Piece>, String> {
        Ok(self.next())
    }
}

fn to_v1(b: Batch) -> v1::Batch {
    v1::Batch {
        data: b.data,
        lengths: b.lengths,
        timestamps: b.timestamps,
    }
}

fn from_v1(b: v1::Batch) -> Batch {
    Batch {
        data: b.data,
        lengths: b.lengths,
        timestamps: b.timestamps,
    }
}

/// The events of a batch the guest returned, or the host's refusal of a
/// batch that breaks the contract's layout: the plugin ran fine, so this is
/// no error it returned.
fn unpack_output(label: &TaskLabel, phase: Phase, out: Batch) -> Result<Vec<Event>, RuntimeError> {
    batch::unpack(out).map_err(|source| RuntimeError::MalformedOutput {
        task: label.clone(),
        phase,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label() -> TaskLabel {
        TaskLabel {
            job: "j".into(),
            operator: "op".into(),
            task: 3,
        }
    }

    #[test]
    fn a_malformed_batch_is_the_hosts_refusal_not_the_plugins_error() {
        let batch = Batch {
            data: b"kv".to_vec(),
            lengths: vec![1, 1, 0],
            timestamps: vec![0],
        };
        let err = unpack_output(&label(), Phase::Process, batch).unwrap_err();
        assert!(matches!(err, RuntimeError::MalformedOutput { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "job `j`, operator `op`, task 3: the host rejected the output of `process`: \
             malformed batch: 3 lengths for 1 event (two per event: key and value)"
        );
        let batch = Batch {
            data: b"k".to_vec(),
            lengths: vec![1, 5],
            timestamps: vec![0],
        };
        let err = unpack_output(&label(), Phase::Close, batch)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(
                "the host rejected the output of `close`: malformed batch: event 0's key and value \
                 lengths run past the 1 bytes of data"
            ),
            "{err}"
        );
        assert!(!err.contains("returned an error"), "{err}");
    }
}
