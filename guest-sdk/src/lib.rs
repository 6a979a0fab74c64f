//! Write memento stream operators in Rust.
//!
//! An operator is a state struct that derives serde's traits and implements
//! [`Operator`]; [`export_operator!`] turns it into a component implementing
//! the `memento:operator/plugin@0.2.0` world. Build it with
//! `cargo build --target wasm32-wasip2 --release` and point a job file at the
//! `.wasm` file.
//!
//! ```
//! use memento_guest::{Context, Error, Event, Operator, Output};
//! use serde::{Deserialize, Serialize};
//! use std::collections::BTreeMap;
//!
//! /// Counts events per key.
//! #[derive(Default, Serialize, Deserialize)]
//! struct Count {
//!     counts: BTreeMap<Vec<u8>, u64>,
//! }
//!
//! impl Operator for Count {
//!     fn open(_ctx: &Context) -> Result<Self, Error> {
//!         Ok(Count::default())
//!     }
//!
//!     fn process(&mut self, event: Event, out: &mut Output) -> Result<(), Error> {
//!         let n = self.counts.entry(event.key.clone()).or_default();
//!         *n += 1;
//!         out.emit(event.key, n.to_string(), event.timestamp);
//!         Ok(())
//!     }
//! }
//!
//! memento_guest::export_operator!(Count);
//! # fn main() {}
//! ```
//!
//! # State and snapshots
//!
//! The host asks for the operator's state at every checkpoint or savepoint
//! in the *canonical* format (`snapshot-state`). By default the whole struct
//! is serialized as MessagePack with field names inside a small versioned
//! envelope (see [`write_state`]), so a later version of the operator that
//! adds a field marked `#[serde(default)]` still restores an older snapshot.
//! The bytes stream to the host in pieces of [`state::PIECE`] bytes as they
//! are serialized ([`StateWriter`]) and come back the same way
//! ([`StateReader`]): a snapshot of any size leaves the guest's memory where
//! it was. Override [`Operator::snapshot`] and [`Operator::restore`] to use a
//! format of your own.
//!
//! # Keys and key groups
//!
//! Between stages the host routes each event by its key's group,
//! [`key_group`]`(key, ctx.key_groups)`; the task owns the groups
//! `ctx.owned`. State written per key group
//! ([`StateWriter::write_piece`]) is what lets a job resume at another
//! parallelism; [`KeyedState`] keeps a value per key and writes it so.
//!
//! # Determinism
//!
//! After a failure the host restores the last snapshot and replays the input
//! that followed it; results are exactly-once only if an operator emits the
//! same output for the same state and input. Do not base output on clocks,
//! randomness or the iteration order of a `HashMap` (keep per-key state in
//! [`KeyedState`], which iterates only in key order; other ordered state
//! in a `BTreeMap`).

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit/operator.wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "memento_guest::bindings",
    });
}

pub use bindings::memento::operator::log::Level;

mod batch;
// Only in guests: a native build keeps the platform's (vectorised) memcmp.
#[cfg(any(target_arch = "wasm32", test))]
mod mem;

mod envelope;
pub use envelope::{STATE_ENCODING_MSGPACK, decode_state, encode_state, read_state, write_state};

pub mod state;
pub use state::{StateReader, StateWriter};

mod keyed;
pub use keyed::{KEYED_FORMAT, KeyedState, MAX_KEY, MAX_VALUE};

#[doc(hidden)]
pub mod __rt;

/// An error returned to the host; it fails the task and is shown to the user
/// with the job, operator and task it came from.
///
/// Anything printable converts into it, so `?` works on most errors and
/// `Err("reason".into())` on strings.
pub struct Error(String);

impl Error {
    /// The message the host will report.
    pub fn message(&self) -> &str {
        &self.0
    }
}

// `Error` deliberately does not implement `Display`: that keeps this blanket
// conversion coherent (no overlap with `From<T> for T`).
impl<E: fmt::Display> From<E> for Error {
    fn from(e: E) -> Self {
        Error(e.to_string())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Where a task sits in its job and the operator's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// Name of the job.
    pub job: String,
    /// Name of this operator within the job.
    pub operator: String,
    /// Index of this task, `0..parallelism`.
    pub task_index: u32,
    /// Number of tasks of this operator.
    pub parallelism: u32,
    /// The `[operators.config]` table of the job file.
    pub config: BTreeMap<String, String>,
    /// Number of key groups of the operator (its `max_parallelism`).
    pub key_groups: u32,
    /// The key groups this task owns (the events of their keys come here).
    pub owned: std::ops::Range<u32>,
}

impl Context {
    /// A context for unit tests of operator logic.
    pub fn for_test<'a>(config: impl IntoIterator<Item = (&'a str, &'a str)>) -> Context {
        Context {
            job: "test".into(),
            operator: "test".into(),
            task_index: 0,
            parallelism: 1,
            key_groups: 128,
            owned: 0..128,
            config: config
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The raw value of a config key, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.config.get(key).map(String::as_str)
    }

    /// Parse a config key, or return `default` when it is absent.
    ///
    /// # Errors
    /// When the value does not parse; the message names the key and value.
    pub fn parse_or<T>(&self, key: &str, default: T) -> Result<T, Error>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        match self.get(key) {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|e| {
                Error(format!(
                    "operator `{}`: config `{key}` = {raw:?}: {e}",
                    self.operator
                ))
            }),
        }
    }

    /// Parse a config key as a duration in milliseconds (see
    /// [`parse_duration_ms`]), or return `default` (milliseconds) when it is
    /// absent.
    ///
    /// # Errors
    /// When the value is not a duration; the message names the key and value.
    pub fn duration_ms_or(&self, key: &str, default: u64) -> Result<u64, Error> {
        match self.get(key) {
            None => Ok(default),
            Some(raw) => parse_duration_ms(raw).map_err(|e| {
                Error(format!(
                    "operator `{}`: config `{key}` = {raw:?}: {}",
                    self.operator, e.0
                ))
            }),
        }
    }
}

/// The host's key hash: FNV-1a (64-bit) over the key, then a finalizer
/// that spreads short keys. Frozen: which task owns a key depends on it.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// The key group of `key` among `key_groups` (`ctx.key_groups`), exactly as
/// the host computes it to route the key's events.
///
/// ```
/// let g = memento_guest::key_group(b"user-42", 128);
/// assert!(g < 128);
/// assert_eq!(g, memento_guest::key_group(b"user-42", 128));
/// ```
pub fn key_group(key: &[u8], key_groups: u32) -> u32 {
    (key_hash(key) % u64::from(key_groups.max(1))) as u32
}

/// Parse a duration into milliseconds.
///
/// Accepts a bare integer, meaning milliseconds (`"1500"`), or one or more
/// terms of a number and a unit, largest unit first: `"500ms"`, `"1s"`,
/// `"1.5s"`, `"2m"`, `"1h30m"`, `"7d"`. Units: `ms`, `s`, `m`, `h`, `d`.
/// Numbers may have a decimal fraction as long as the total is a whole
/// number of milliseconds. Surrounding whitespace is ignored.
///
/// ```
/// use memento_guest::parse_duration_ms;
/// assert_eq!(parse_duration_ms("1500").unwrap(), 1500);
/// assert_eq!(parse_duration_ms("1.5s").unwrap(), 1500);
/// assert_eq!(parse_duration_ms("1h30m").unwrap(), 5_400_000);
/// assert!(parse_duration_ms("soon").is_err());
/// ```
///
/// # Errors
/// When the text is empty, has an unknown unit, is not a whole number of
/// milliseconds or overflows `u64`.
pub fn parse_duration_ms(s: &str) -> Result<u64, Error> {
    const EXPECTED: &str = "expected a duration such as \"500ms\", \"1s\", \"2m\", \"1h30m\" or milliseconds";
    let text = s.trim();
    if text.is_empty() {
        return Err(Error(format!("empty duration: {EXPECTED}")));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| Error(format!("duration {text:?} is out of range")));
    }
    let overflow = || Error(format!("duration {text:?} is out of range"));
    let mut rest = text;
    let mut total: u64 = 0;
    let mut last_unit = u64::MAX;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..num_len];
        rest = rest[num_len..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let unit_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(Error(format!("bad duration {text:?}: {EXPECTED}"))),
        };
        if unit_ms >= last_unit {
            return Err(Error(format!(
                "bad duration {text:?}: units must go from largest to smallest, each once"
            )));
        }
        last_unit = unit_ms;
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        let digits_ok = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() && frac.is_empty() || !digits_ok(int) || !digits_ok(frac) {
            return Err(Error(format!("bad duration {text:?}: {EXPECTED}")));
        }
        let whole: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| overflow())?
        };
        let mut ms = whole.checked_mul(unit_ms).ok_or_else(overflow)?;
        // The fraction, exactly: frac / 10^len * unit_ms must be whole.
        let frac = frac.trim_end_matches('0');
        if !frac.is_empty() {
            let scale = u32::try_from(frac.len())
                .ok()
                .and_then(|n| 10u128.checked_pow(n))
                .ok_or_else(overflow)?;
            let numerator = frac
                .parse::<u128>()
                .ok()
                .and_then(|f| f.checked_mul(u128::from(unit_ms)))
                .ok_or_else(overflow)?;
            if numerator % scale != 0 {
                return Err(Error(format!(
                    "bad duration {text:?}: not a whole number of milliseconds"
                )));
            }
            let part = u64::try_from(numerator / scale).map_err(|_| overflow())?;
            ms = ms.checked_add(part).ok_or_else(overflow)?;
        }
        total = total.checked_add(ms).ok_or_else(overflow)?;
    }
    Ok(total)
}

/// One record flowing through a job: a key (partitions between stages), a
/// value (the payload) and an event time in milliseconds since the epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Event {
    /// Partitioning key.
    pub key: Vec<u8>,
    /// Payload.
    pub value: Vec<u8>,
    /// Event time, ms since the Unix epoch.
    pub timestamp: i64,
}

impl Event {
    /// An event from anything byte-like.
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, timestamp: i64) -> Event {
        Event {
            key: key.into(),
            value: value.into(),
            timestamp,
        }
    }
}

/// An event borrowed from the batch it arrived in: what
/// [`Operator::process_ref`] gets, without the two allocations an owned
/// [`Event`] costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventRef<'a> {
    /// Partitioning key.
    pub key: &'a [u8],
    /// Payload.
    pub value: &'a [u8],
    /// Event time, ms since the Unix epoch.
    pub timestamp: i64,
}

impl EventRef<'_> {
    /// An owned copy.
    pub fn to_event(self) -> Event {
        Event::new(self.key, self.value, self.timestamp)
    }
}

impl Event {
    /// This event, borrowed.
    pub fn as_ref(&self) -> EventRef<'_> {
        EventRef {
            key: &self.key,
            value: &self.value,
            timestamp: self.timestamp,
        }
    }
}

/// Collects the events an operator emits during one call, in order, packed
/// the way they leave the component (emitting copies the bytes, nothing
/// is allocated per event).
#[derive(Debug, Default)]
pub struct Output {
    packed: batch::Packer,
}

impl Output {
    /// An empty output buffer.
    pub fn new() -> Output {
        Output::default()
    }

    /// Room for `events` more events of `bytes` bytes (keys and values) in
    /// all, so that emitting them does not grow the buffer step by step.
    pub fn reserve(&mut self, events: usize, bytes: usize) {
        self.packed.reserve(events, bytes);
    }

    /// Emit an event; `key` and `value` are anything byte-like (`&str`,
    /// `String`, `&[u8]`, `Vec<u8>`, ...).
    #[inline]
    pub fn emit(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, timestamp: i64) {
        self.packed.push(key.as_ref(), value.as_ref(), timestamp);
    }

    /// Emit an event that is already built.
    pub fn push(&mut self, event: Event) {
        self.emit(&event.key, &event.value, event.timestamp);
    }

    /// How many events were emitted so far.
    pub fn len(&self) -> usize {
        self.packed.len()
    }

    /// Whether nothing was emitted so far.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take the emitted events, leaving the buffer empty (for tests; the
    /// export glue hands the packed batch over as it is).
    pub fn take(&mut self) -> Vec<Event> {
        batch::unpack(self.packed.take()).expect("a batch packed here is well formed")
    }

    pub(crate) fn take_batch(&mut self) -> bindings::memento::operator::types::Batch {
        self.packed.take()
    }
}

/// A stream operator. Implement this for your state struct and export it
/// with [`export_operator!`].
///
/// The host calls `open` once, then possibly `restore` (when resuming from a
/// snapshot), then `process_batch` per batch of input events (by default,
/// `process` once per event), `snapshot` between events whenever a checkpoint or
/// savepoint is taken, and `close` when a bounded input ends.
pub trait Operator: Serialize + DeserializeOwned + Sized + 'static {
    /// Version of the state layout written by [`Operator::snapshot`]. Raise it
    /// when a change is not backwards compatible through serde defaults; a
    /// snapshot with a higher version than this is refused on restore.
    const STATE_VERSION: u32 = 1;

    /// Create the initial state from the task's context.
    fn open(ctx: &Context) -> Result<Self, Error>;

    /// Handle one input event; emit any number of events to `out`.
    fn process(&mut self, event: Event, out: &mut Output) -> Result<(), Error>;

    /// Handle one input event borrowed from its batch. The SDK calls this
    /// one; the default copies the event and calls [`Operator::process`].
    /// Override it (and let `process` call it with [`Event::as_ref`]) to
    /// save the two allocations per event that copy costs in a guest.
    fn process_ref(&mut self, event: EventRef<'_>, out: &mut Output) -> Result<(), Error> {
        self.process(event.to_event(), out)
    }

    /// Handle a batch of input events, borrowed from it, in order. The SDK
    /// calls this one; the default calls [`Operator::process_ref`] per
    /// event. Override it to work on the batch as a whole, for example
    /// with [`KeyedState::get_or_insert_each`], which overlaps the lookups
    /// of several keys.
    fn process_batch(&mut self, events: &[EventRef<'_>], out: &mut Output) -> Result<(), Error> {
        for &event in events {
            self.process_ref(event, out)?;
        }
        Ok(())
    }

    /// The input has ended: emit whatever is still pending.
    fn close(&mut self, out: &mut Output) -> Result<(), Error> {
        let _ = out;
        Ok(())
    }

    /// Write the state (canonical format) to `out`, which streams it to
    /// the host in pieces. Default: the whole struct as MessagePack with
    /// field names, in the SDK's envelope ([`write_state`]).
    fn snapshot(&self, out: &mut StateWriter<'_>) -> Result<(), Error> {
        write_state(out, Self::STATE_VERSION, self)
    }

    /// Replace the state opened by [`Operator::open`] with a snapshot read
    /// from `from`, possibly written by an older version of this operator
    /// (or by a build on contract 0.1.0: its bytes read the same). Default:
    /// decode the whole struct ([`read_state`]). Override to keep fields
    /// derived from configuration rather than from the snapshot.
    fn restore(&mut self, ctx: &Context, from: &mut StateReader<'_>) -> Result<(), Error> {
        let _ = ctx;
        let (_version, restored) = read_state::<Self>(Self::STATE_VERSION, from)?;
        *self = restored;
        Ok(())
    }
}

/// The state `op` snapshots, as one byte string (for unit tests of
/// operator logic).
///
/// # Errors
/// As [`Operator::snapshot`].
pub fn snapshot_bytes<T: Operator>(op: &T) -> Result<Vec<u8>, Error> {
    let mut pieces = Vec::new();
    let mut out = StateWriter::memory(&mut pieces);
    op.snapshot(&mut out)?;
    out.finish()?;
    Ok(pieces.into_iter().flat_map(|(_, p)| p).collect())
}

/// Restore `op` from state bytes as [`snapshot_bytes`] returns them (for
/// unit tests of operator logic).
///
/// # Errors
/// As [`Operator::restore`].
pub fn restore_bytes<T: Operator>(op: &mut T, ctx: &Context, state: &[u8]) -> Result<(), Error> {
    let pieces = state.chunks(state::PIECE).map(|p| (None, p.to_vec())).collect();
    op.restore(ctx, &mut StateReader::memory(pieces))
}

/// The pieces `op` snapshots, each with its key group (for unit tests of
/// operators with [`KeyedState`]).
///
/// # Errors
/// As [`Operator::snapshot`].
pub fn snapshot_pieces<T: Operator>(op: &T) -> Result<Vec<state::Piece>, Error> {
    let mut pieces = Vec::new();
    let mut out = StateWriter::memory(&mut pieces);
    op.snapshot(&mut out)?;
    out.finish()?;
    Ok(pieces)
}

/// Restore `op` from pieces as [`snapshot_pieces`] returns them; give it
/// the pieces of the key groups `ctx.owned` to test a rescale.
///
/// # Errors
/// As [`Operator::restore`].
pub fn restore_pieces<T: Operator>(
    op: &mut T,
    ctx: &Context,
    pieces: Vec<state::Piece>,
) -> Result<(), Error> {
    op.restore(ctx, &mut StateReader::memory(pieces))
}

/// Log a message at a level into the host's log (stderr in native unit tests).
pub fn log(level: Level, message: &str) {
    #[cfg(target_family = "wasm")]
    bindings::memento::operator::log::log(level, message);
    #[cfg(not(target_family = "wasm"))]
    eprintln!("[{level:?}] {message}");
}

/// Log at error level: `error!("lost {} events", n)`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log($crate::Level::Error, &::std::format!($($arg)*)) };
}
/// Log at warn level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log($crate::Level::Warn, &::std::format!($($arg)*)) };
}
/// Log at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log($crate::Level::Info, &::std::format!($($arg)*)) };
}
/// Log at debug level.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log($crate::Level::Debug, &::std::format!($($arg)*)) };
}
/// Log at trace level.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => { $crate::log($crate::Level::Trace, &::std::format!($($arg)*)) };
}

/// Export an [`Operator`] type as the component's `operator` and `snapshot`
/// interfaces. Use it exactly once per plugin crate (a `cdylib`).
#[macro_export]
macro_rules! export_operator {
    ($ty:ty) => {
        // Native builds (unit tests of operator logic) get no exports: the
        // component-model export names do not link into a native library.
        #[cfg(not(target_family = "wasm"))]
        const _: fn() = || {
            fn assert_operator<T: $crate::Operator>() {}
            assert_operator::<$ty>();
        };

        #[cfg(target_family = "wasm")]
        const _: () = {
            struct __MementoExport;

            ::std::thread_local! {
                static __MEMENTO_SLOT: ::core::cell::RefCell<$crate::__rt::Slot<$ty>> =
                    ::core::cell::RefCell::new($crate::__rt::Slot::new());
            }

            impl $crate::bindings::exports::memento::operator::operator::Guest for __MementoExport {
                fn open(
                    ctx: $crate::bindings::memento::operator::types::Context,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    __MEMENTO_SLOT.with(|slot| $crate::__rt::open::<$ty>(slot, ctx))
                }
                fn process(
                    events: $crate::bindings::memento::operator::types::Batch,
                ) -> ::core::result::Result<
                    $crate::bindings::memento::operator::types::Batch,
                    ::std::string::String,
                > {
                    __MEMENTO_SLOT.with(|slot| $crate::__rt::process::<$ty>(slot, events))
                }
                fn close() -> ::core::result::Result<
                    $crate::bindings::memento::operator::types::Batch,
                    ::std::string::String,
                > {
                    __MEMENTO_SLOT.with(|slot| $crate::__rt::close::<$ty>(slot))
                }
            }

            impl $crate::bindings::exports::memento::operator::snapshot::Guest for __MementoExport {
                fn snapshot_state(
                    out: &$crate::bindings::memento::operator::state::StateWriter,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    __MEMENTO_SLOT.with(|slot| $crate::__rt::snapshot::<$ty>(slot, out))
                }
                fn restore_state(
                    from: &$crate::bindings::memento::operator::state::StateReader,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    __MEMENTO_SLOT.with(|slot| $crate::__rt::restore::<$ty>(slot, from))
                }
            }

    $crate::bindings::__export_plugin!(__MementoExport with_types_in $crate::bindings);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An operator that implements only `process` sees, through the
    /// `process_batch` the SDK calls and its default `process_ref`,
    /// exactly the events of the batch, in order; an error stops the batch.
    #[test]
    fn process_ref_defaults_to_process() {
        #[derive(Default, Serialize, serde::Deserialize)]
        struct Echo;
        impl Operator for Echo {
            fn open(_: &Context) -> Result<Self, Error> {
                Ok(Echo)
            }
            fn process(&mut self, event: Event, out: &mut Output) -> Result<(), Error> {
                if event.key == b"stop" {
                    return Err("stop".into());
                }
                out.push(event);
                Ok(())
            }
        }
        let events = vec![Event::new("k", "v", 3), Event::new("", vec![0u8, 255], -1)];
        let batch = batch::pack(events.clone());
        let mut op = Echo;
        let mut out = Output::new();
        op.process_batch(&batch::refs(&batch).unwrap(), &mut out).unwrap();
        assert_eq!(out.take(), events);
        let stopping = batch::pack(vec![
            Event::new("a", "", 0),
            Event::new("stop", "", 1),
            Event::new("b", "", 2),
        ]);
        let err = op
            .process_batch(&batch::refs(&stopping).unwrap(), &mut out)
            .unwrap_err();
        assert_eq!(err.message(), "stop");
        assert_eq!(out.take(), [Event::new("a", "", 0)]);
    }

    #[test]
    fn durations_parse() {
        let cases = [
            ("0", 0),
            ("1500", 1500),
            (" 250 ", 250),
            ("500ms", 500),
            ("1s", 1_000),
            ("2m", 120_000),
            ("3h", 10_800_000),
            ("1d", 86_400_000),
            ("1.5s", 1_500),
            ("0.25m", 15_000),
            (".5s", 500),
            ("1.000s", 1_000),
            ("10 m", 600_000),
            ("1h30m", 5_400_000),
            ("1m 30s 250ms", 90_250),
        ];
        for (text, ms) in cases {
            assert_eq!(parse_duration_ms(text).unwrap(), ms, "{text:?}");
        }
    }

    #[test]
    fn bad_durations_are_refused() {
        for text in [
            "", " ", "s", "1x", "1.5", "-1s", "1.2.3s", "1.0005s", "0.5ms", "1s1m", "1s2s", "soon", "1e3ms",
        ] {
            assert!(parse_duration_ms(text).is_err(), "{text:?} parsed");
        }
        let err = parse_duration_ms("1x").unwrap_err();
        assert!(err.message().contains("\"1x\""), "{err:?}");
    }

    #[test]
    fn huge_durations_overflow_cleanly() {
        assert!(parse_duration_ms("99999999999999999999999").is_err());
        assert!(parse_duration_ms("999999999999999999d").is_err());
        assert!(parse_duration_ms("1.123456789012345678901234567890123456789012345d").is_err());
        assert_eq!(parse_duration_ms("18446744073709551615").unwrap(), u64::MAX);
    }

    #[test]
    fn context_duration_ms_or() {
        let ctx = Context::for_test([("window", "2s"), ("bad", "2 parsecs")]);
        assert_eq!(ctx.duration_ms_or("window", 7).unwrap(), 2_000);
        assert_eq!(ctx.duration_ms_or("absent", 7).unwrap(), 7);
        let err = ctx.duration_ms_or("bad", 7).unwrap_err();
        assert!(err.message().contains("config `bad` = \"2 parsecs\""), "{err:?}");
    }
}
