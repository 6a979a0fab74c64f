//! Calls into the guest: each with its deadline, fuel and copy budget
//! armed, and its failure mapped to a [`RuntimeError`] naming the task,
//! the phase and the limit or trap.

use std::time::Instant;

use wasmtime::{Store, Trap};

use crate::batch::{self, Event};
use crate::bindings::{Batch, Context, Plugin};
use crate::data::{InstanceData, LimitHit};
use crate::error::{RuntimeError, one_line};
use crate::label::{Phase, TaskLabel};

use super::TaskInstance;
use super::stderr::last_stderr_message;

impl TaskInstance {
    /// Run one export call with the deadline armed and map its outcome:
    /// trap, deadline, memory limit, or the guest's own error value.
    fn call<R>(
        &mut self,
        phase: Phase,
        f: impl FnOnce(&Plugin, &mut Store<InstanceData>) -> wasmtime::Result<Result<R, String>>,
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
        let started = Instant::now();
        let result = f(&self.plugin, &mut self.store);
        self.stats.time_in_plugin += started.elapsed();
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
            Phase::SnapshotState => self.max_snapshot,
            _ => self.max_other,
        }
    }

    fn trap_error(&mut self, phase: Phase, e: &wasmtime::Error) -> RuntimeError {
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

    /// Call `open` with the task's context.
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `open`.
    pub fn open(&mut self, ctx: &Context) -> Result<(), RuntimeError> {
        self.call(Phase::Open, |p, s| {
            p.memento_operator_operator().call_open(s, ctx)
        })
    }

    /// Call `process` with a batch; returns the emitted events.
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `process`.
    pub fn process(&mut self, events: &[Event]) -> Result<Vec<Event>, RuntimeError> {
        self.stats.process_calls += 1;
        let batch = batch::pack(events);
        let out = self.call(Phase::Process, |p, s| {
            p.memento_operator_operator().call_process(s, &batch)
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
        let out = self.call(Phase::Close, |p, s| p.memento_operator_operator().call_close(s))?;
        self.unpack(Phase::Close, out)
    }

    /// Call `snapshot-state`; returns the canonical state bytes.
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `snapshot-state`.
    pub fn snapshot_state(&mut self) -> Result<Vec<u8>, RuntimeError> {
        self.call(Phase::SnapshotState, |p, s| {
            p.memento_operator_snapshot().call_snapshot_state(s)
        })
    }

    /// Call `restore-state` with canonical state bytes.
    ///
    /// # Errors
    /// A [`RuntimeError`] naming the task and `restore-state`.
    pub fn restore_state(&mut self, state: &[u8]) -> Result<(), RuntimeError> {
        self.call(Phase::RestoreState, |p, s| {
            p.memento_operator_snapshot().call_restore_state(s, state)
        })
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
