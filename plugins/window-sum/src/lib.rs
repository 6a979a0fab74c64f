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
//! Config:
//! - `window`: window size, milliseconds or a duration such as `"500ms"`,
//!   `"1s"`, `"2m"`; default `"1s"`.
//! - `on_invalid`: what to do with a value that is not a decimal integer:
//!   `"error"` (fail the task, naming the value; default) or `"skip"` (drop
//!   and count the event).

use memento_guest::{Context, Error, Event, Operator, Output};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Default window size: one second.
pub const DEFAULT_WINDOW_MS: u64 = 1_000;

/// The operator's state: open windows and counters, plus its configuration.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WindowSum {
    /// Window size in milliseconds (config `window`), at least 1.
    window_ms: i64,
    /// Drop events with an unparsable value instead of failing (config
    /// `on_invalid = "skip"`).
    skip_invalid: bool,
    /// Open windows: window start, then key, to the running sum. Iterating
    /// it gives the emission order (window end, then key).
    windows: BTreeMap<i64, BTreeMap<Vec<u8>, i64>>,
    /// Largest event timestamp seen so far; `None` before the first event.
    watermark: Option<i64>,
    /// Events dropped because their window had already closed.
    late_dropped: u64,
    /// Events dropped because their value was not a decimal integer.
    invalid_skipped: u64,
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

    /// Events dropped as late so far.
    pub fn late_dropped(&self) -> u64 {
        self.late_dropped
    }

    /// Events dropped for an invalid value so far (`on_invalid = "skip"`).
    pub fn invalid_skipped(&self) -> u64 {
        self.invalid_skipped
    }

    /// Number of open (key, window) pairs.
    pub fn open_windows(&self) -> usize {
        self.windows.values().map(BTreeMap::len).sum()
    }

    /// Emit and forget every window whose end is at or before `watermark`
    /// (all windows with `None`).
    fn close_windows(&mut self, watermark: Option<i64>, out: &mut Output) {
        while let Some((&start, _)) = self.windows.first_key_value() {
            let end = self.window_end(start);
            if watermark.is_some_and(|wm| wm < end) {
                break;
            }
            let sums = self.windows.pop_first().map(|(_, sums)| sums).unwrap_or_default();
            for (key, sum) in sums {
                out.emit(key, sum.to_string(), end - 1);
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
        // A skipped invalid event still advances the watermark: it did happen.
        if let Some(value) = self.parse_value(&event)? {
            let sums = self.windows.entry(start).or_default();
            let sum = match sums.get_mut(event.key.as_slice()) {
                Some(sum) => sum,
                None => sums.entry(event.key.clone()).or_insert(0),
            };
            *sum = sum.checked_add(value).ok_or_else(|| {
                format!(
                    "window-sum: the sum for key {:?} in window [{start}, {end}) overflows i64",
                    String::from_utf8_lossy(&event.key)
                )
            })?;
        }
        self.watermark = Some(
            self.watermark
                .map_or(event.timestamp, |wm| wm.max(event.timestamp)),
        );
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

    /// Windows, watermark and counters come from the snapshot, `on_invalid`
    /// from this run's config. The window size may change only while no
    /// window is open: open windows cannot be re-bucketed.
    fn restore(&mut self, ctx: &Context, from: &mut memento_guest::StateReader<'_>) -> Result<(), Error> {
        let (_, restored) = memento_guest::read_state::<WindowSum>(Self::STATE_VERSION, from)?;
        if restored.window_ms != self.window_ms && !restored.windows.is_empty() {
            return Err(format!(
                "config `window` = {:?} ({}ms) differs from the snapshot's {}ms, which has open windows",
                ctx.get("window").unwrap_or_default(),
                self.window_ms,
                restored.window_ms
            )
            .into());
        }
        self.windows = restored.windows;
        self.watermark = restored.watermark;
        self.late_dropped = restored.late_dropped;
        self.invalid_skipped = restored.invalid_skipped;
        Ok(())
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
        run(&mut first, &[("x", "1", 3)]); // late: counted, survives the snapshot
        let state = memento_guest::snapshot_bytes(&first).unwrap();
        let ctx = Context::for_test([]);
        let mut second = WindowSum::open(&ctx).unwrap();
        memento_guest::restore_bytes(&mut second, &ctx, &state).unwrap();
        assert_eq!(second.late_dropped(), 1);
        got.extend(run(&mut second, &events[3..]));
        got.extend(finish(&mut second));
        assert_eq!(got, expected);
    }

    #[test]
    fn restore_refuses_a_changed_window_size_with_open_windows() {
        let mut op = open(&[("window", "1s")]);
        run(&mut op, &[("a", "1", 0)]);
        let state = memento_guest::snapshot_bytes(&op).unwrap();
        let ctx = Context::for_test([("window", "2s")]);
        let mut other = WindowSum::open(&ctx).unwrap();
        let err = memento_guest::restore_bytes(&mut other, &ctx, &state).unwrap_err();
        assert!(err.message().contains("config `window` = \"2s\""), "{err:?}");

        // With no open window the size may change.
        finish(&mut op);
        let state = memento_guest::snapshot_bytes(&op).unwrap();
        let mut other = WindowSum::open(&ctx).unwrap();
        memento_guest::restore_bytes(&mut other, &ctx, &state).unwrap();
        assert_eq!(other.window_ms, 2_000);
    }

    #[test]
    fn restore_takes_on_invalid_from_the_new_config() {
        let op = open(&[]);
        let state = memento_guest::snapshot_bytes(&op).unwrap();
        let ctx = Context::for_test([("on_invalid", "skip")]);
        let mut other = WindowSum::open(&ctx).unwrap();
        memento_guest::restore_bytes(&mut other, &ctx, &state).unwrap();
        assert!(other.skip_invalid);
    }
}
