//! What native snapshots read and write of an instance besides its
//! memories: the values of the mutable globals of its core instances,
//! through the accessors that load-time instrumentation added
//! (`instrument.rs`).

use wasmtime::Store;
use wasmtime::component::{Instance, TypedFunc};

use crate::data::InstanceData;
use crate::error::{NativeRefusal, RuntimeError};
use crate::instrument::{GET_EXPORT, SET_EXPORT};
use crate::label::Phase;

use super::TaskInstance;

/// The instrumented component's global accessors in one instance.
pub(crate) struct Accessors {
    get: TypedFunc<(u32,), (u64,)>,
    set: TypedFunc<(u32, u64), ()>,
}

impl Accessors {
    pub(crate) fn new(store: &mut Store<InstanceData>, instance: &Instance) -> wasmtime::Result<Accessors> {
        Ok(Accessors {
            get: instance.get_typed_func(&mut *store, GET_EXPORT)?,
            set: instance.get_typed_func(&mut *store, SET_EXPORT)?,
        })
    }
}

/// The values of an instance's mutable globals, in the order of its
/// component's [`crate::GlobalLayout`], each as its bit pattern
/// (`i32`/`f32` zero-extended).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalValues {
    /// [`crate::GlobalLayout::digest_hex`] of the layout they follow.
    pub layout: String,
    /// One value per global.
    pub values: Vec<u64>,
}

impl GlobalValues {
    /// The values as little-endian bytes, 8 per global.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Values from [`GlobalValues::to_bytes`]; `None` unless the length is
    /// a multiple of 8.
    pub fn from_bytes(layout: String, bytes: &[u8]) -> Option<GlobalValues> {
        if !bytes.len().is_multiple_of(8) {
            return None;
        }
        let values = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Some(GlobalValues { layout, values })
    }
}

impl TaskInstance {
    /// Read every mutable global the component's layout lists; `Ok(None)`
    /// for a component whose memories hold all its state.
    ///
    /// # Errors
    /// [`RuntimeError::Poisoned`] after a trap, or the trap of an accessor
    /// (which poisons the instance).
    pub fn capture_globals(&mut self) -> Result<Option<GlobalValues>, RuntimeError> {
        let Some(layout) = self.component.native_globals() else {
            return Ok(None);
        };
        let (count, digest) = (layout.len(), layout.digest_hex());
        let get = self
            .globals
            .as_ref()
            .expect("instrumented components have accessors")
            .get;
        let mut values = Vec::with_capacity(count);
        for index in 0..count as u32 {
            let (value,) = self.accessor_call(Phase::SnapshotState, |store| get.call(store, (index,)))?;
            values.push(value);
        }
        Ok(Some(GlobalValues {
            layout: digest,
            values,
        }))
    }

    /// Write the globals of a native image, before any other call.
    ///
    /// # Errors
    /// [`RuntimeError::NativeSnapshot`] when the values follow another
    /// layout than this component's (or it has none); the trap of an
    /// accessor otherwise.
    pub fn restore_globals(&mut self, globals: &GlobalValues) -> Result<(), RuntimeError> {
        let refuse = |reason: String| RuntimeError::NativeSnapshot {
            task: (*self.label).clone(),
            reason: NativeRefusal::Globals(reason),
        };
        let Some(layout) = self.component.native_globals() else {
            return Err(refuse(format!(
                "the image carries {} global values but {} keeps no globals to restore",
                globals.values.len(),
                self.component.name()
            )));
        };
        if globals.layout != layout.digest_hex() || globals.values.len() != layout.len() {
            return Err(refuse(format!(
                "the image's {} global values follow layout {}, but {} has {} globals in layout {}",
                globals.values.len(),
                short(&globals.layout),
                self.component.name(),
                layout.len(),
                short(&layout.digest_hex())
            )));
        }
        let set = self
            .globals
            .as_ref()
            .expect("instrumented components have accessors")
            .set;
        for (index, &value) in globals.values.iter().enumerate() {
            self.accessor_call(Phase::RestoreState, |store| {
                set.call(store, (index as u32, value))
            })?;
        }
        Ok(())
    }

    /// One call of an accessor, with the deadline and fuel armed like any
    /// call; a trap poisons the instance.
    fn accessor_call<R>(
        &mut self,
        phase: Phase,
        f: impl FnOnce(&mut Store<InstanceData>) -> wasmtime::Result<R>,
    ) -> Result<R, RuntimeError> {
        if self.poisoned {
            return Err(RuntimeError::Poisoned {
                task: (*self.label).clone(),
            });
        }
        self.store.set_epoch_deadline(self.deadline_ticks);
        if let Some(fuel) = self.fuel {
            self.store
                .set_fuel(fuel)
                .expect("the engine meters fuel when `fuel` is set");
        }
        f(&mut self.store).map_err(|e| {
            self.poisoned = true;
            self.trap_error(phase, &e)
        })
    }
}

/// The first 12 hex digits of a digest, enough to tell two apart.
fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}
