//! `window-sum`: per-key sums over tumbling event-time windows.
//!
//! Each event's value is a decimal integer (`i64`, surrounding whitespace
//! ignored) and is added to the window of its key that contains the event's
//! timestamp. Windows are `[start, start + window)` with `start` a multiple
//! of the window size (counted from the Unix epoch).
//!
//! The watermark is the largest event timestamp this task has seen. When it
//! reaches a window's end the window closes and the operator emits
//! `(key, sum)`: the key unchanged, the sum as decimal text, and timestamp
//! `end - 1` (the last millisecond inside the window, as Flink does).
//! Windows closed by one event come out ordered by window end, then key.
//! An event whose window has already closed is late: it is dropped and
//! counted. `close` (end of a bounded input) emits every window still open,
//! in the same order.
//!
//! # State
//!
//! The open windows are keyed state ([`KeyedState`]): per key, its open
//! windows' sums, the window size they were opened with, and the task's
//! watermark when the key last got an event. That is the whole snapshot,
//! per key group, so a savepoint resumes at any parallelism. What is
//! task-wide is derived from it on restore: the index of open windows by
//! end (the emission order), and the watermark, the largest watermark
//! recorded with any restored key. At the same parallelism that is the
//! watermark the task had (the event that set it is in a window still open,
//! and its key recorded it), unless that event was an invalid value that
//! was skipped. After a rescale a task's watermark is the largest of its
//! own keys': an event for a window that another task had already closed
//! (late there) may open that window again and emit it a second time. In
//! order input never meets either case. The counts of late and skipped
//! events are this run's (they are diagnostics, not state).
//!
//! Config:
//! - `window`: window size, milliseconds or a duration such as `"500ms"`,
//!   `"1s"`, `"2m"`; default `"1s"`.
//! - `on_invalid`: what to do with a value that is not a decimal integer:
//!   `"error"` (fail the task, naming the value; default) or `"skip"` (drop
//!   and count the event).

use memento_guest::{Context, Error, Event, KeyedState, Operator, Output, StateReader, StateWriter};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Default window size: one second.
pub const DEFAULT_WINDOW_MS: u64 = 1_000;

/// The operator: configuration, the keyed windows, and what is derived
/// from them. Nothing is serialized through serde's derive; the snapshot
/// is the keyed state alone.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WindowSum {
    /// Window size in milliseconds (config `window`), at least 1.
    #[serde(skip)]
    window_ms: i64,
    /// Drop events with an unparsable value instead of failing (config
    /// `on_invalid = "skip"`).
    #[serde(skip)]
    skip_invalid: bool,
    /// Per key, its open windows: the snapshot.
    #[serde(skip)]
    windows: KeyedState<KeyWindows>,
    /// Open windows by start, each with its keys in key order: iterating
    /// it gives the emission order (window end, then key). Rebuilt from
    /// `windows` on restore.
    #[serde(skip)]
    pending: BTreeMap<i64, BTreeSet<Vec<u8>>>,
    /// Largest event timestamp seen so far; `None` before the first event
    /// (and after a restore with no open window).
    #[serde(skip)]
    watermark: Option<i64>,
    /// Events dropped in this run because their window had already closed.
    #[serde(skip)]
    late_dropped: u64,
    /// Events dropped in this run because their value was not a decimal
    /// integer.
    #[serde(skip)]
    invalid_skipped: u64,
}

/// One key's open windows: its value in the keyed state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KeyWindows {
    /// Window size (ms) the windows were opened with: a restore under
    /// another size refuses them.
    size: i64,
    /// The task's watermark after this key's last event.
    seen: i64,
    /// Window start → running sum.
    sums: BTreeMap<i64, i64>,
}

/// The state as versions before keyed state wrote it (the SDK's envelope
/// around the whole operator): still restored, at its own parallelism.
#[derive(Deserialize)]
struct Legacy {
    window_ms: i64,
    windows: BTreeMap<i64, BTreeMap<Vec<u8>, i64>>,
    watermark: Option<i64>,
}

impl WindowSum {
    /// Start of the window containing `timestamp`.
    fn window_start(&self, timestamp: i64) -> i64 {
        // Saturating: only a timestamp within one window of i64::MIN is affected.
        timestamp.saturating_sub(timestamp.rem_euclid(self.window_ms))
    }

    /// End (exclusive) of the window starting at `start`.
    fn window_end(&self, start: i64) -> i64 {
        start.saturating_add(self.window_ms)
    }

    /// Events dropped as late in this run.
    pub fn late_dropped(&self) -> u64 {
        self.late_dropped
    }

    /// Events dropped for an invalid value in this run (`on_invalid = "skip"`).
    pub fn invalid_skipped(&self) -> u64 {
        self.invalid_skipped
    }

    /// Number of open (key, window) pairs.
    pub fn open_windows(&self) -> usize {
        self.pending.values().map(BTreeSet::len).sum()
    }

    /// Emit and forget every window whose end is at or before `watermark`
    /// (all windows with `None`).
    fn close_windows(&mut self, watermark: Option<i64>, out: &mut Output) {
        while let Some((&start, _)) = self.pending.first_key_value() {
            let end = self.window_end(start);
            if watermark.is_some_and(|wm| wm < end) {
                break;
            }
            let keys = self.pending.pop_first().map(|(_, keys)| keys).unwrap_or_default();
            for key in keys {
                let mut sum = None;
                self.windows.update(&key, |windows| {
                    let mut windows = windows?;
                    sum = windows.sums.remove(&start);
                    (!windows.sums.is_empty()).then_some(windows)
                });
                if let Some(sum) = sum {
                    out.emit(key, sum.to_string(), end - 1);
                }
            }
        }
    }

    /// The event's value as an integer; `Ok(None)` when it is invalid and
    /// configured to be skipped.
    fn parse_value(&mut self, event: &Event) -> Result<Option<i64>, Error> {
        let parsed = std::str::from_utf8(&event.value)
            .map_err(|e| e.to_string())
            .and_then(|text| text.trim().parse::<i64>().map_err(|e| e.to_string()));
        match parsed {
            Ok(v) => Ok(Some(v)),
            Err(_) if self.skip_invalid => {
                if self.invalid_skipped == 0 {
                    memento_guest::warn!(
                        "window-sum: skipping events whose value is not a decimal integer, first {:?} (key {:?})",
                        String::from_utf8_lossy(&event.value),
                        String::from_utf8_lossy(&event.key)
                    );
                }
                self.invalid_skipped += 1;
                Ok(None)
            }
            Err(e) => Err(format!(
                "window-sum: value {:?} of the event with key {:?} at timestamp {} is not a decimal integer: {e} \
                 (set config `on_invalid` = \"skip\" to drop such events)",
                String::from_utf8_lossy(&event.value),
                String::from_utf8_lossy(&event.key),
                event.timestamp
            )
            .into()),
        }
    }

    /// Add `value` to `key`'s window starting at `start`, recording the
    /// watermark `seen`.
    fn add(&mut self, key: &[u8], start: i64, value: i64, seen: i64) -> Result<(), Error> {
        let size = self.window_ms;
        let windows = self.windows.get_or_insert_with(key, || KeyWindows {
            size,
            seen,
            sums: BTreeMap::new(),
        });
        let old = windows.sums.get(&start).copied();
        let sum = old.unwrap_or(0).checked_add(value).ok_or_else(|| {
            format!(
                "window-sum: the sum for key {:?} in window [{start}, {}) overflows i64",
                String::from_utf8_lossy(key),
                start.saturating_add(size)
            )
        })?;
        windows.sums.insert(start, sum);
        windows.seen = seen;
        if old.is_none() {
            self.pending.entry(start).or_default().insert(key.to_vec());
        }
        Ok(())
    }

    /// Rebuild what is derived from the keyed windows (the index by window
    /// and the watermark), refusing windows opened with another size.
    fn derive(&mut self, ctx: &Context) -> Result<(), Error> {
        self.pending.clear();
        let mut other_size = None;
        for (key, windows) in self.windows.sorted() {
            if windows.size != self.window_ms {
                other_size = Some(windows.size);
            }
            self.watermark = Some(self.watermark.map_or(windows.seen, |wm| wm.max(windows.seen)));
            for &start in windows.sums.keys() {
                self.pending.entry(start).or_default().insert(key.to_vec());
            }
        }
        if let Some(size) = other_size {
            return Err(format!(
                "config `window` = {:?} ({}ms) differs from the snapshot's {size}ms, which has open windows",
                ctx.get("window").unwrap_or_default(),
                self.window_ms,
            )
            .into());
        }
        Ok(())
    }
}

/// Read `window` and `on_invalid` from the config.
fn config(ctx: &Context) -> Result<(i64, bool), Error> {
    let window = ctx.duration_ms_or("window", DEFAULT_WINDOW_MS)?;
    let window_ms = match i64::try_from(window) {
        Ok(ms) if ms > 0 => ms,
        _ => {
            return Err(format!(
                "config `window` = {:?}: the window must be between 1ms and {}ms",
                ctx.get("window").unwrap_or_default(),
                i64::MAX
            )
            .into());
        }
    };
    let skip_invalid = match ctx.get("on_invalid") {
        None | Some("error") => false,
        Some("skip") => true,
        Some(other) => {
            return Err(format!("config `on_invalid` = {other:?}: expected \"error\" or \"skip\"").into());
        }
    };
    Ok((window_ms, skip_invalid))
}

impl Operator for WindowSum {
    fn open(ctx: &Context) -> Result<Self, Error> {
        let (window_ms, skip_invalid) = config(ctx)?;
        Ok(WindowSum {
            window_ms,
            skip_invalid,
            windows: KeyedState::new(ctx),
            ..WindowSum::default()
        })
    }

    fn process(&mut self, event: Event, out: &mut Output) -> Result<(), Error> {
        let start = self.window_start(event.timestamp);
        let end = self.window_end(start);
        if self.watermark.is_some_and(|wm| wm >= end) {
            if self.late_dropped == 0 {
                memento_guest::warn!(
                    "window-sum: dropping late events, first at timestamp {} (watermark {})",
                    event.timestamp,
                    self.watermark.unwrap_or_default()
                );
            }
            self.late_dropped += 1;
            return Ok(());
        }
        let watermark = self
            .watermark
            .map_or(event.timestamp, |wm| wm.max(event.timestamp));
        // A skipped invalid event still advances the watermark: it did happen.
        if let Some(value) = self.parse_value(&event)? {
            self.add(&event.key, start, value, watermark)?;
        }
        self.watermark = Some(watermark);
        self.close_windows(self.watermark, out);
        Ok(())
    }

    fn close(&mut self, out: &mut Output) -> Result<(), Error> {
        self.close_windows(None, out);
        if self.late_dropped > 0 || self.invalid_skipped > 0 {
            memento_guest::info!(
                "window-sum: dropped {} late events and skipped {} invalid ones",
                self.late_dropped,
                self.invalid_skipped
            );
        }
        Ok(())
    }

    /// The open windows, per key group.
    fn snapshot(&self, out: &mut StateWriter<'_>) -> Result<(), Error> {
        self.windows.snapshot(out)
    }

    /// The windows come from the snapshot (keyed pieces, or one unkeyed
    /// envelope from a version before keyed state), `window` and
    /// `on_invalid` from this run's config; the window size may change
    /// only while no window is open, since open windows cannot be
    /// re-bucketed.
    fn restore(&mut self, ctx: &Context, from: &mut StateReader<'_>) -> Result<(), Error> {
        let unkeyed = self.windows.restore(from)?;
        if !unkeyed.is_empty() {
            let (_, legacy) = memento_guest::decode_state::<Legacy>(Self::STATE_VERSION, &unkeyed)?;
            let seen = legacy.watermark.unwrap_or(i64::MIN);
            for (start, sums) in legacy.windows {
                for (key, sum) in sums {
                    let windows = self.windows.get_or_insert_with(&key, || KeyWindows {
                        size: legacy.window_ms,
                        seen,
                        sums: BTreeMap::new(),
                    });
                    windows.sums.insert(start, sum);
                }
            }
            self.watermark = legacy.watermark;
        }
        self.derive(ctx)
    }
}

memento_guest::export_operator!(WindowSum);

#[cfg(test)]
mod tests {
    use super::*;

    type Row = (String, String, i64);

    fn open(config: &[(&str, &str)]) -> WindowSum {
        WindowSum::open(&Context::for_test(config.iter().copied())).unwrap()
    }

    fn rows(out: &mut Output) -> Vec<Row> {
        out.take()
            .into_iter()
            .map(|e| {
                (
                    String::from_utf8(e.key).unwrap(),
                    String::from_utf8(e.value).unwrap(),
                    e.timestamp,
                )
            })
            .collect()
    }

    fn run(op: &mut WindowSum, events: &[(&str, &str, i64)]) -> Vec<Row> {
        let mut out = Output::new();
        for &(k, v, t) in events {
            op.process(Event::new(k, v, t), &mut out).unwrap();
        }
        rows(&mut out)
    }

    fn finish(op: &mut WindowSum) -> Vec<Row> {
        let mut out = Output::new();
        op.close(&mut out).unwrap();
        rows(&mut out)
    }

    fn r(k: &str, v: &str, t: i64) -> Row {
        (k.to_string(), v.to_string(), t)
    }

    #[test]
    fn sums_per_key_and_window_and_closes_on_watermark() {
        let mut op = open(&[]);
        let out = run(&mut op, &[("a", "1", 0), ("b", "10", 500), ("a", "2", 999)]);
        assert!(out.is_empty(), "{out:?}");
        // Timestamp 1000 is the end of window [0, 1000): it closes.
        let out = run(&mut op, &[("a", "5", 1000)]);
        assert_eq!(out, vec![r("a", "3", 999), r("b", "10", 999)]);
        assert_eq!(op.open_windows(), 1);
        assert_eq!(finish(&mut op), vec![r("a", "5", 1999)]);
        assert_eq!(op.open_windows(), 0);
    }

    #[test]
    fn emission_order_is_window_end_then_key() {
        let mut op = open(&[("window", "100")]);
        let out = run(&mut op, &[("z", "1", 50), ("y", "1", 40), ("m", "7", 99)]);
        assert!(out.is_empty());
        let out = run(&mut op, &[("b", "2", 150), ("a", "3", 120), ("c", "4", 1000)]);
        assert_eq!(
            out,
            vec![
                r("m", "7", 99),
                r("y", "1", 99),
                r("z", "1", 99),
                r("a", "3", 199),
                r("b", "2", 199)
            ]
        );
        assert_eq!(finish(&mut op), vec![r("c", "4", 1099)]);
    }

    #[test]
    fn late_events_are_dropped_and_counted() {
        let mut op = open(&[("window", "1s")]);
        run(&mut op, &[("a", "1", 100), ("a", "1", 2500)]);
        // Window [0, 1000) closed when the watermark reached 2500.
        let out = run(&mut op, &[("a", "100", 999), ("a", "100", 5)]);
        assert!(out.is_empty());
        assert_eq!(op.late_dropped(), 2);
        // Out of order but inside the open window [2000, 3000): counted.
        run(&mut op, &[("a", "4", 2001)]);
        assert_eq!(op.late_dropped(), 2);
        assert_eq!(finish(&mut op), vec![r("a", "5", 2999)]);
    }

    #[test]
    fn negative_values_whitespace_and_negative_timestamps() {
        let mut op = open(&[("window", "10")]);
        // -11 is in [-20, -10); -10 and -3 are in [-10, 0).
        let out = run(
            &mut op,
            &[("k", "2", -11), ("k", " -4 ", -3), ("k", "+1\r\n", -10)],
        );
        assert_eq!(out, vec![r("k", "2", -11)]);
        assert_eq!(finish(&mut op), vec![r("k", "-3", -1)]);
    }

    #[test]
    fn human_durations_and_milliseconds() {
        assert_eq!(open(&[]).window_ms, 1_000);
        assert_eq!(open(&[("window", "500ms")]).window_ms, 500);
        assert_eq!(open(&[("window", "2m")]).window_ms, 120_000);
        assert_eq!(open(&[("window", "250")]).window_ms, 250);
    }

    #[test]
    fn bad_config_is_rejected_naming_key_and_value() {
        for (key, value) in [
            ("window", "0"),
            ("window", "soon"),
            ("window", "-5s"),
            ("on_invalid", "ignore"),
        ] {
            let err = WindowSum::open(&Context::for_test([(key, value)])).unwrap_err();
            let msg = err.message();
            assert!(
                msg.contains(&format!("config `{key}`")) && msg.contains(&format!("{value:?}")),
                "{msg}"
            );
        }
        let err = WindowSum::open(&Context::for_test([("window", "18446744073709551615")])).unwrap_err();
        assert!(err.message().contains("config `window`"), "{err:?}");
    }

    #[test]
    fn invalid_value_is_an_error_naming_the_value() {
        let mut op = open(&[]);
        let mut out = Output::new();
        let err = op.process(Event::new("k", "12abc", 0), &mut out).unwrap_err();
        assert!(err.message().contains("\"12abc\""), "{err:?}");
        let err = op
            .process(Event::new("k", vec![0xff, 0xfe], 0), &mut out)
            .unwrap_err();
        assert!(err.message().contains("not a decimal integer"), "{err:?}");
        let err = op
            .process(Event::new("k", "99999999999999999999", 0), &mut out)
            .unwrap_err();
        assert!(err.message().contains("99999999999999999999"), "{err:?}");
    }

    #[test]
    fn invalid_values_can_be_skipped_and_still_advance_the_watermark() {
        let mut op = open(&[("on_invalid", "skip"), ("window", "10")]);
        let out = run(&mut op, &[("k", "1", 0), ("k", "x", 3), ("k", "", 25)]);
        assert_eq!(out, vec![r("k", "1", 9)]);
        assert_eq!(op.invalid_skipped(), 2);
        assert_eq!(op.open_windows(), 0);
        assert!(finish(&mut op).is_empty());
    }

    #[test]
    fn overflowing_sum_is_an_error() {
        let mut op = open(&[]);
        run(&mut op, &[("k", &i64::MAX.to_string(), 0)]);
        let err = op
            .process(Event::new("k", "1", 1), &mut Output::new())
            .unwrap_err();
        assert!(err.message().contains("overflows"), "{err:?}");
    }

    #[test]
    fn extreme_timestamps_do_not_panic() {
        let mut op = open(&[("window", "3")]);
        run(&mut op, &[("k", "1", i64::MIN), ("k", "1", i64::MAX)]);
        assert_eq!(op.open_windows(), 0);
    }

    #[test]
    fn snapshot_restore_continues_open_windows() {
        let events = [
            ("a", "1", 0),
            ("b", "2", 10),
            ("a", "3", 1500),
            ("c", "4", 1600),
            ("a", "1", 2100),
        ];
        let mut whole = open(&[]);
        let mut expected = run(&mut whole, &events);
        expected.extend(finish(&mut whole));

        let mut first = open(&[]);
        let mut got = run(&mut first, &events[..3]);
        run(&mut first, &[("x", "1", 3)]); // late: dropped, counted in this run
        assert_eq!(first.late_dropped(), 1);
        let state = memento_guest::snapshot_pieces(&first).unwrap();
        assert!(state.iter().all(|(g, _)| g.is_some()), "only keyed state");
        let ctx = Context::for_test([]);
        let mut second = WindowSum::open(&ctx).unwrap();
        memento_guest::restore_pieces(&mut second, &ctx, state).unwrap();
        // The watermark (1500) came back: an event of the closed window
        // [0, 1000) is still late.
        assert!(run(&mut second, &[("x", "1", 3)]).is_empty());
        assert_eq!(second.late_dropped(), 1, "this run's count");
        got.extend(run(&mut second, &events[3..]));
        got.extend(finish(&mut second));
        assert_eq!(got, expected);
    }

    #[test]
    fn restore_refuses_a_changed_window_size_with_open_windows() {
        let mut op = open(&[("window", "1s")]);
        run(&mut op, &[("a", "1", 0)]);
        let state = memento_guest::snapshot_pieces(&op).unwrap();
        let ctx = Context::for_test([("window", "2s")]);
        let mut other = WindowSum::open(&ctx).unwrap();
        let err = memento_guest::restore_pieces(&mut other, &ctx, state).unwrap_err();
        assert!(err.message().contains("config `window` = \"2s\""), "{err:?}");

        // With no open window the size may change.
        finish(&mut op);
        let state = memento_guest::snapshot_pieces(&op).unwrap();
        let mut other = WindowSum::open(&ctx).unwrap();
        memento_guest::restore_pieces(&mut other, &ctx, state).unwrap();
        assert_eq!(other.window_ms, 2_000);
    }

    #[test]
    fn restore_takes_on_invalid_from_the_new_config() {
        let op = open(&[]);
        let state = memento_guest::snapshot_pieces(&op).unwrap();
        let ctx = Context::for_test([("on_invalid", "skip")]);
        let mut other = WindowSum::open(&ctx).unwrap();
        memento_guest::restore_pieces(&mut other, &ctx, state).unwrap();
        assert!(other.skip_invalid);
    }

    /// Events in order over many keys and windows.
    fn stream(n: i64) -> Vec<(String, String, i64)> {
        (0..n)
            .map(|i| (format!("k{}", i * 7 % 53), (i % 11 - 3).to_string(), i * 13))
            .collect()
    }

    fn feed(op: &mut WindowSum, events: &[(String, String, i64)]) -> Vec<Row> {
        let mut out = Output::new();
        for (k, v, t) in events {
            op.process(Event::new(k.as_str(), v.as_str(), *t), &mut out)
                .unwrap();
        }
        rows(&mut out)
    }

    /// Sorted, since tasks emit their own keys' windows.
    fn sorted(mut rows: Vec<Row>) -> Vec<Row> {
        rows.sort();
        rows
    }

    /// Rescaling: one task's snapshot split into two tasks (each given its
    /// key groups' pieces, as the host does) and the events routed by key
    /// group: together they emit exactly what the one task would have.
    #[test]
    fn key_groups_split_across_tasks() {
        let events = stream(3000);
        let mut whole = open(&[("window", "100")]);
        let expected = sorted([feed(&mut whole, &events), finish(&mut whole)].concat());

        let mut one = open(&[("window", "100")]);
        let mut got = feed(&mut one, &events[..1700]);
        let pieces = memento_guest::snapshot_pieces(&one).unwrap();
        assert!(pieces.iter().all(|(g, _)| g.is_some()), "only keyed state");
        for owned in [0..64u32, 64..128] {
            let ctx = Context {
                parallelism: 2,
                owned: owned.clone(),
                ..Context::for_test([("window", "100")])
            };
            let mine = pieces
                .iter()
                .filter(|(g, _)| owned.contains(&g.unwrap()))
                .cloned()
                .collect();
            let mut task = WindowSum::open(&ctx).unwrap();
            memento_guest::restore_pieces(&mut task, &ctx, mine).unwrap();
            let routed: Vec<_> = events[1700..]
                .iter()
                .filter(|(k, _, _)| owned.contains(&memento_guest::key_group(k.as_bytes(), 128)))
                .cloned()
                .collect();
            got.extend(feed(&mut task, &routed));
            got.extend(finish(&mut task));
        }
        assert_eq!(sorted(got), expected);
    }

    /// A snapshot from before keyed state (the whole operator in the SDK's
    /// envelope) restores: its windows and watermark go on.
    #[test]
    fn restores_snapshots_from_before_keyed_state() {
        #[derive(Serialize)]
        struct Old {
            window_ms: i64,
            skip_invalid: bool,
            windows: BTreeMap<i64, BTreeMap<Vec<u8>, i64>>,
            watermark: Option<i64>,
            late_dropped: u64,
            invalid_skipped: u64,
        }
        let old = Old {
            window_ms: 1000,
            skip_invalid: false,
            windows: BTreeMap::from([(1000, BTreeMap::from([(b"a".to_vec(), 3), (b"b".to_vec(), 10)]))]),
            watermark: Some(1500),
            late_dropped: 2,
            invalid_skipped: 0,
        };
        let bytes = memento_guest::encode_state(1, &old).unwrap();
        let ctx = Context::for_test([]);
        let mut op = WindowSum::open(&ctx).unwrap();
        memento_guest::restore_bytes(&mut op, &ctx, &bytes).unwrap();
        assert_eq!(op.open_windows(), 2);
        assert!(run(&mut op, &[("a", "1", 999)]).is_empty(), "late");
        assert_eq!(op.late_dropped(), 1);
        assert_eq!(
            run(&mut op, &[("b", "1", 2000)]),
            vec![r("a", "3", 1999), r("b", "10", 1999)]
        );
        assert_eq!(finish(&mut op), vec![r("b", "1", 2999)]);
    }
}
