//! A test plugin that misbehaves in the way its config asks for; otherwise
//! it passes events through. Used by the end-to-end tests only.
//!
//! Config `mode`:
//! - `loop-in-process`: spin forever in `process` (deadline test)
//! - `trap-in-process`: panic in `process` with message "boom"
//! - `panic-in-open`: panic in `open`
//! - `error-in-process`: return an error from `process`
//! - `grow-in-process`: allocate 1 MiB more per call until the limit
//! - `fail-after`: with config `calls = N`, trap on call N+1 of `process`
//! - `none` (default): pass through
//!
//! Independent of `mode`:
//! - `snapshot_ms = N`: `snapshot-state` busy-waits N ms (timeout tests)
//! - `decline = "true"`: `snapshot-state` returns an error (declined)
//! - `print = "true"`: print a line to stdout in `open` and in every
//!   `process` call. The guest's libc then keeps the stdout stream handle
//!   between calls, which native snapshots must detect and refuse.
//!
//! The call counter is not part of the canonical state, so after a canonical
//! restore the operator counts from zero again (a native image keeps it).

use memento_guest::{Context, Error, Event, Operator, Output};
use serde::{Deserialize, Serialize};

#[derive(Default, Serialize, Deserialize)]
pub struct Misbehave {
    mode: String,
    #[serde(skip)]
    calls: u64,
    fail_after: u64,
    snapshot_ms: u64,
    decline: bool,
    #[serde(default)]
    print: bool,
    #[serde(skip)]
    hoard: Vec<Vec<u8>>,
}

impl Operator for Misbehave {
    fn open(ctx: &Context) -> Result<Self, Error> {
        let mode = ctx.get("mode").unwrap_or("none").to_string();
        if mode == "panic-in-open" {
            panic!("refusing to open");
        }
        memento_guest::info!("opened in mode {mode}");
        let print = ctx.parse_or("print", false)?;
        if print {
            println!("opened in mode {mode}");
        }
        Ok(Misbehave {
            print,
            fail_after: ctx.parse_or("calls", u64::MAX)?,
            snapshot_ms: ctx.parse_or("snapshot_ms", 0)?,
            decline: ctx.parse_or("decline", false)?,
            mode,
            ..Default::default()
        })
    }

    fn process(&mut self, event: Event, out: &mut Output) -> Result<(), Error> {
        self.calls += 1;
        if self.print {
            println!("call {}", self.calls);
        }
        match self.mode.as_str() {
            "loop-in-process" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "trap-in-process" => panic!("boom"),
            "error-in-process" => {
                return Err(format!("cannot handle event {}", event.timestamp).into());
            }
            "grow-in-process" => self.hoard.push(vec![1u8; 1 << 20]),
            "fail-after" if self.calls > self.fail_after => {
                panic!("failing after {} calls", self.fail_after)
            }
            _ => {}
        }
        out.push(event);
        Ok(())
    }

    fn snapshot(&self, out: &mut memento_guest::StateWriter<'_>) -> Result<(), Error> {
        if self.decline {
            return Err("declining on purpose".into());
        }
        let started = std::time::Instant::now();
        while started.elapsed().as_millis() < u128::from(self.snapshot_ms) {
            std::hint::spin_loop();
        }
        memento_guest::write_state(out, Self::STATE_VERSION, self)
    }
}

memento_guest::export_operator!(Misbehave);
