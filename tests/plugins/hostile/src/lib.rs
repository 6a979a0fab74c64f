//! A test plugin that does one hostile thing, chosen by config `mode`, so
//! that `tests/sandbox.rs` can assert how the host contains it. Otherwise
//! (mode `none`) it passes events through and keeps a counter as state.
//!
//! Config `mode`:
//! - `none` (default): pass events through.
//! - `loop-in-open`, `loop-in-process`, `loop-in-snapshot`,
//!   `loop-in-restore`: spin forever in that export (deadline and fuel).
//! - `panic-in-open`: panic in `open`.
//! - `alloc`: in `process`, allocate (and touch) 1 MiB after 1 MiB until
//!   the host's memory limit stops it.
//! - `recurse`: in `process`, recurse without end on the wasm stack (values
//!   in wasm locals only): wasmtime's stack limit stops it.
//! - `recurse-shadow`: recurse without end with a frame in linear memory
//!   (Rust's shadow stack), which runs off the bottom of memory.
//! - `huge-output`: every `process` call returns `output_mib` MiB (default
//!   64) of events with 64 KiB values.
//! - `huge-snapshot`: `snapshot-state` streams `snapshot_mib` MiB (default
//!   64) in 64 KiB pieces.
//! - `huge-piece`: `snapshot-state` writes one piece of `piece_bytes` bytes
//!   (default 1 MiB + 1), past the contract's bound.
//! - `foreign-key-group`: `snapshot-state` writes a piece of a key group the
//!   task does not own.
//! - `garbage-snapshot`: the first `good_snapshots` (default 1) calls of
//!   `snapshot-state` return real state, later ones random bytes, which
//!   `restore-state` later refuses.
//! - `trap-in-restore`: `restore-state` panics.
//! - `leak-handles`: in `process`, create WASI pollables and never drop
//!   them, until the host's resource-table cap stops it.
//! - `probe`: in `open`, try each capability listed in config `probes`
//!   (separated by `;`) and emit one event per probe from the first
//!   `process` call: key = the probe, value = `ok: …` or `err: …` with the
//!   exact error the guest got. Probes: `read:PATH`, `list:PATH`,
//!   `write:PATH`, `connect:HOST:PORT`, `resolve:HOST:PORT`, `env:NAME`,
//!   `environ` (counts of environment variables and arguments).

use memento_guest::{Context, Error, Event, Operator, Output};
use serde::{Deserialize, Serialize};

#[derive(Default, Serialize, Deserialize)]
pub struct Hostile {
    /// Events seen; the only real state.
    count: u64,
    #[serde(skip)]
    mode: String,
    #[serde(skip)]
    output_mib: usize,
    #[serde(skip)]
    snapshot_mib: usize,
    #[serde(skip)]
    piece_bytes: usize,
    /// `ctx.key_groups`: one past the last key group there is.
    #[serde(skip)]
    key_groups: u32,
    #[serde(skip)]
    good_snapshots: u64,
    #[serde(skip)]
    snapshots: std::cell::Cell<u64>,
    /// Outcomes of the probes, emitted by the first `process` call.
    #[serde(skip)]
    probes: Vec<(String, String)>,
    #[serde(skip)]
    hoard: Vec<Vec<u8>>,
}

fn spin() -> ! {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// Recurse without end, keeping everything in wasm locals: only the
/// engine's own stack grows.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if std::hint::black_box(depth) == u64::MAX {
        return 0;
    }
    recurse(depth + 1).wrapping_mul(3) ^ depth
}

/// Recurse without end with an array on Rust's shadow stack (in linear
/// memory) that the optimiser cannot remove.
#[inline(never)]
fn recurse_shadow(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 16]);
    if std::hint::black_box(true) {
        recurse_shadow(depth + 1).wrapping_add(frame[depth as usize % 16])
    } else {
        0
    }
}

/// One line, whatever the error text holds.
fn oneline(s: impl std::fmt::Display) -> String {
    s.to_string().replace(['\n', '\t'], " ")
}

fn probe(what: &str) -> String {
    let (kind, arg) = what.split_once(':').unwrap_or((what, ""));
    let outcome: Result<String, String> = match kind {
        "read" => std::fs::read_to_string(arg)
            .map(|text| format!("{} bytes: {}", text.len(), text.lines().next().unwrap_or("")))
            .map_err(oneline),
        "list" => std::fs::read_dir(arg)
            .and_then(|dir| {
                let mut names = dir
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<Result<Vec<_>, _>>()?;
                names.sort();
                Ok(names.join(","))
            })
            .map_err(oneline),
        "write" => std::fs::write(arg, b"written by a plugin")
            .map(|()| "written".to_string())
            .map_err(oneline),
        "connect" => std::net::TcpStream::connect(arg)
            .map(|_| "connected".to_string())
            .map_err(oneline),
        "resolve" => std::net::ToSocketAddrs::to_socket_addrs(arg)
            .map(|a| format!("{} addresses", a.count()))
            .map_err(oneline),
        "env" => std::env::var(arg).map_err(oneline),
        "environ" => Ok(format!(
            "{} variables, {} arguments",
            std::env::vars_os().count(),
            std::env::args_os().count()
        )),
        _ => Err(format!("unknown probe {kind:?}")),
    };
    match outcome {
        Ok(v) => format!("ok: {v}"),
        Err(e) => format!("err: {e}"),
    }
}

/// Make one WASI pollable and forget its handle: the host keeps the
/// resource in the store's table until the guest drops it, which it never
/// does.
#[cfg(target_family = "wasm")]
fn leak_one_handle() {
    #[link(wasm_import_module = "wasi:clocks/monotonic-clock@0.2.6")]
    unsafe extern "C" {
        #[link_name = "subscribe-duration"]
        fn subscribe_duration(nanos: i64) -> i32;
    }
    // SAFETY: the import takes a u64 and returns a handle; nothing else.
    std::hint::black_box(unsafe { subscribe_duration(1_000_000_000) });
}

#[cfg(not(target_family = "wasm"))]
fn leak_one_handle() {}

impl Operator for Hostile {
    fn open(ctx: &Context) -> Result<Self, Error> {
        let mode = ctx.get("mode").unwrap_or("none").to_string();
        match mode.as_str() {
            "loop-in-open" => spin(),
            "panic-in-open" => panic!("hostile plugin refuses to open"),
            _ => {}
        }
        let probes = if mode == "probe" {
            ctx.get("probes")
                .unwrap_or("")
                .split(';')
                .filter(|p| !p.is_empty())
                .map(|p| (p.to_string(), probe(p)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Hostile {
            output_mib: ctx.parse_or("output_mib", 64)?,
            snapshot_mib: ctx.parse_or("snapshot_mib", 64)?,
            key_groups: ctx.key_groups,
            piece_bytes: ctx.parse_or("piece_bytes", (1 << 20) + 1)?,
            good_snapshots: ctx.parse_or("good_snapshots", 1)?,
            probes,
            mode,
            ..Default::default()
        })
    }

    fn process(&mut self, event: Event, out: &mut Output) -> Result<(), Error> {
        self.count += 1;
        match self.mode.as_str() {
            "loop-in-process" => spin(),
            "alloc" => loop {
                self.hoard.push(vec![1u8; 1 << 20]);
            },
            "recurse" => {
                std::hint::black_box(recurse(0));
            }
            "recurse-shadow" => {
                std::hint::black_box(recurse_shadow(0));
            }
            "huge-output" => {
                for i in 0..self.output_mib * 16 {
                    out.emit(i.to_string(), vec![b'x'; 64 << 10], 0);
                }
            }
            "leak-handles" => loop {
                leak_one_handle();
            },
            "probe" => {
                for (what, outcome) in self.probes.drain(..) {
                    out.emit(what, outcome, 0);
                }
            }
            _ => out.push(event),
        }
        Ok(())
    }

    fn snapshot(&self, out: &mut memento_guest::StateWriter<'_>) -> Result<(), Error> {
        let n = self.snapshots.get() + 1;
        self.snapshots.set(n);
        match self.mode.as_str() {
            "loop-in-snapshot" => spin(),
            "huge-snapshot" => {
                // Streamed: the guest never holds it, the host must stop it.
                let piece = vec![7u8; memento_guest::state::PIECE];
                for _ in 0..(self.snapshot_mib << 20) / piece.len() {
                    out.write_piece(None, &piece)?;
                }
                Ok(())
            }
            // One piece past the contract's 1 MiB bound.
            "huge-piece" => out.write_piece_unsplit(None, &vec![7u8; self.piece_bytes]),
            // State of a key group outside the task's range.
            "foreign-key-group" => out.write_piece(Some(self.key_groups), b"not mine"),
            "garbage-snapshot" if n > self.good_snapshots => {
                // Deterministic noise: no magic, no envelope.
                let noise: Vec<u8> = (0..4096u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect();
                out.write_piece(None, &noise)
            }
            _ => memento_guest::write_state(out, Self::STATE_VERSION, self),
        }
    }

    fn restore(&mut self, _ctx: &Context, from: &mut memento_guest::StateReader<'_>) -> Result<(), Error> {
        match self.mode.as_str() {
            "loop-in-restore" => spin(),
            "trap-in-restore" => panic!("hostile plugin traps in restore-state"),
            _ => {}
        }
        let (_version, restored): (u32, Hostile) = memento_guest::read_state(Self::STATE_VERSION, from)?;
        self.count = restored.count;
        Ok(())
    }
}

memento_guest::export_operator!(Hostile);
