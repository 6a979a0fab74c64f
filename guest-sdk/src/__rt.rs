//! Glue between the generated bindings and an [`Operator`]; used by
//! [`export_operator!`](crate::export_operator) only.

use crate::batch;
use crate::bindings::memento::operator::types::{Batch, Context as WitContext};
use crate::{Context, Operator, Output};
use std::cell::RefCell;

/// The one operator instance of this component and its context.
pub struct Slot<T> {
    ctx: Option<Context>,
    op: Option<T>,
}

impl<T> Slot<T> {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Slot<T> {
        Slot { ctx: None, op: None }
    }
}

fn not_open() -> String {
    "operator called before `open`".to_string()
}

pub fn open<T: Operator>(slot: &RefCell<Slot<T>>, ctx: WitContext) -> Result<(), String> {
    let ctx = Context {
        job: ctx.job,
        operator: ctx.operator_name,
        task_index: ctx.task_index,
        parallelism: ctx.parallelism,
        config: ctx.config.into_iter().collect(),
        key_groups: ctx.key_groups,
        owned: ctx.owned.start..ctx.owned.end,
    };
    let op = T::open(&ctx).map_err(|e| e.0)?;
    let mut slot = slot.borrow_mut();
    slot.ctx = Some(ctx);
    slot.op = Some(op);
    Ok(())
}

pub fn process<T: Operator>(slot: &RefCell<Slot<T>>, events: Batch) -> Result<Batch, String> {
    let mut slot = slot.borrow_mut();
    let op = slot.op.as_mut().ok_or_else(not_open)?;
    let mut out = Output::new();
    // As much as came in: what a one-to-one operator emits, and what the
    // buffer would otherwise reach by doubling, copying as it goes.
    out.reserve(events.timestamps.len(), events.data.len());
    op.process_batch(&batch::refs(&events)?, &mut out)
        .map_err(|e| e.0)?;
    Ok(out.take_batch())
}

pub fn close<T: Operator>(slot: &RefCell<Slot<T>>) -> Result<Batch, String> {
    let mut slot = slot.borrow_mut();
    let op = slot.op.as_mut().ok_or_else(not_open)?;
    let mut out = Output::new();
    op.close(&mut out).map_err(|e| e.0)?;
    Ok(out.take_batch())
}

#[cfg(target_family = "wasm")]
pub fn snapshot<T: Operator>(
    slot: &RefCell<Slot<T>>,
    out: &crate::bindings::memento::operator::state::StateWriter,
) -> Result<(), String> {
    let slot = slot.borrow();
    let op = slot.op.as_ref().ok_or_else(not_open)?;
    let mut out = crate::StateWriter::host(out);
    op.snapshot(&mut out).map_err(|e| e.0)?;
    out.finish().map_err(|e| e.0)
}

#[cfg(target_family = "wasm")]
pub fn restore<T: Operator>(
    slot: &RefCell<Slot<T>>,
    from: &crate::bindings::memento::operator::state::StateReader,
) -> Result<(), String> {
    let mut slot = slot.borrow_mut();
    let Slot { ctx, op } = &mut *slot;
    let (ctx, op) = ctx.as_ref().zip(op.as_mut()).ok_or_else(not_open)?;
    op.restore(ctx, &mut crate::StateReader::host(from))
        .map_err(|e| e.0)
}
