//! `ballast`: a benchmark operator that holds a configurable amount of
//! state and changes a configurable fraction of it as events arrive.
//!
//! The state is one buffer of `state_mib` MiB, filled with deterministic
//! pseudo-random bytes at `open` (so it does not compress), and seen as
//! 4 KiB pages. Every input event is one *step*: the step counter goes up by
//! one and `dirty_fraction` of the pages are changed (the step counter,
//! repeated, is written over `value_bytes` of each, at a slot the PRNG
//! picks: an update of one value of a keyed state). The pages of a step are picked by a
//! PRNG seeded with the step counter, one in each of equal stretches of the
//! buffer, so they are distinct and spread over the whole state, and a
//! restored operator changes exactly the pages the original would have.
//! When `dirty_fraction × pages` is not whole, steps change either its floor
//! or its ceiling so the long-run average is exact. The work of a step is
//! proportional to the pages it changes, not to the state size.
//!
//! A step is one event, not one host batch: the SDK hands the operator
//! events one at a time, and counting per event keeps the state independent
//! of how the host cuts batches. For a target dirty fraction per checkpoint,
//! divide it by the events per checkpoint interval.
//!
//! The state is snapshotted as raw bytes (MessagePack `bin` inside the SDK
//! envelope), so a snapshot is the buffer plus a few dozen bytes.
//!
//! Config:
//! - `state_mib`: state size in MiB (2^20 bytes), a decimal such as `"0.5"`
//!   allowed; default 16.
//! - `dirty_fraction`: fraction of the pages changed per event, 0.0 to 1.0;
//!   default 0.01.
//! - `value_bytes`: bytes written into each changed page, 1 to 4096;
//!   default 8.
//!
//! Output: one event per input event, with the key and timestamp unchanged
//! and the step counter (1 for the first event) as decimal text for value.

use memento_guest::{Context, Error, Event, Operator, Output};
use serde::{Deserialize, Serialize};

/// Size of the units in which the state is dirtied.
pub const PAGE_SIZE: usize = 4096;
/// Default for config `state_mib`.
pub const DEFAULT_STATE_MIB: f64 = 16.0;
/// Default for config `dirty_fraction`.
pub const DEFAULT_DIRTY_FRACTION: f64 = 0.01;
/// Default for config `value_bytes`.
pub const DEFAULT_VALUE_BYTES: usize = 8;

const MIB: f64 = 1024.0 * 1024.0;

/// SplitMix64: tiny, fast and good enough to pick pages; deterministic.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`); the modulo bias is irrelevant here.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The operator's state: the ballast buffer, the step counter and the
/// configured dirty fraction.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ballast {
    /// Config `dirty_fraction`.
    dirty_fraction: f64,
    /// Config `value_bytes` (from this run's config, not the snapshot).
    #[serde(skip)]
    value_bytes: usize,
    /// Steps (input events) processed so far.
    steps: u64,
    /// The ballast, `state_mib` MiB; serialized as one byte string.
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

/// Read `state_mib` (as bytes), `dirty_fraction` and `value_bytes` from
/// the config.
fn config(ctx: &Context) -> Result<(usize, f64, usize), Error> {
    let state_mib: f64 = ctx.parse_or("state_mib", DEFAULT_STATE_MIB)?;
    let bytes = (state_mib * MIB).round();
    // `isize::MAX` is the most a Vec may hold (2 GiB on wasm32).
    if !(0.0..=isize::MAX as f64).contains(&bytes) {
        return Err(format!(
            "config `state_mib` = {:?}: must be a size between 0 and {} MiB",
            ctx.get("state_mib").unwrap_or_default(),
            (isize::MAX as f64 / MIB).floor()
        )
        .into());
    }
    let dirty_fraction: f64 = ctx.parse_or("dirty_fraction", DEFAULT_DIRTY_FRACTION)?;
    if !(0.0..=1.0).contains(&dirty_fraction) {
        return Err(format!(
            "config `dirty_fraction` = {:?}: must be between 0.0 and 1.0",
            ctx.get("dirty_fraction").unwrap_or_default()
        )
        .into());
    }
    let value_bytes: usize = ctx.parse_or("value_bytes", DEFAULT_VALUE_BYTES)?;
    if !(1..=PAGE_SIZE).contains(&value_bytes) {
        return Err(format!(
            "config `value_bytes` = {:?}: must be between 1 and {PAGE_SIZE}",
            ctx.get("value_bytes").unwrap_or_default()
        )
        .into());
    }
    Ok((bytes as usize, dirty_fraction, value_bytes))
}

impl Ballast {
    /// The state buffer.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Steps (input events) processed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Number of pages in the state, the last one possibly partial.
    pub fn pages(&self) -> usize {
        self.data.len().div_ceil(PAGE_SIZE)
    }

    /// How many pages steps `1..=step` change in total.
    fn pages_through(&self, step: u64) -> u64 {
        let pages = self.pages() as u64;
        let total = (step as f64 * self.dirty_fraction * pages as f64).floor();
        // Saturating float-to-int conversion: huge step counts stay sane.
        total as u64
    }

    /// Change the pages of step `step`: distinct, one in each of `k` equal
    /// stretches of the buffer; O(k) work.
    fn dirty(&mut self, step: u64) {
        let pages = self.pages() as u64;
        if pages == 0 {
            return;
        }
        let k = self
            .pages_through(step)
            .saturating_sub(self.pages_through(step - 1))
            .min(pages);
        let mut rng = SplitMix64(step ^ 0x6261_6c6c_6173_7421);
        let stamp = step.to_le_bytes();
        for i in 0..k {
            let lo = i * pages / k;
            let hi = (i + 1) * pages / k;
            let page = (lo + rng.below(hi - lo)) as usize;
            let page_start = page * PAGE_SIZE;
            let page_len = (self.data.len() - page_start).min(PAGE_SIZE);
            let len = self.value_bytes.min(page_len);
            let slot = rng.below((page_len / len) as u64) as usize;
            let start = page_start + slot * len;
            for (b, s) in self.data[start..start + len].iter_mut().zip(stamp.iter().cycle()) {
                *b = *s;
            }
        }
    }
}

/// Allocate `bytes` of deterministic pseudo-random content, with a clear
/// error instead of an abort when memory runs out.
fn filled(bytes: usize) -> Result<Vec<u8>, Error> {
    let mut data = Vec::new();
    data.try_reserve_exact(bytes).map_err(|e| {
        format!("ballast: cannot allocate config `state_mib` worth of state ({bytes} bytes): {e}")
    })?;
    data.resize(bytes, 0xa5);
    let mut rng = SplitMix64(0x5eed);
    for word in data.chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next().to_le_bytes());
    }
    Ok(data)
}

impl Operator for Ballast {
    fn open(ctx: &Context) -> Result<Self, Error> {
        let (bytes, dirty_fraction, value_bytes) = config(ctx)?;
        Ok(Ballast {
            dirty_fraction,
            value_bytes,
            steps: 0,
            data: filled(bytes)?,
        })
    }

    fn process(&mut self, event: Event, out: &mut Output) -> Result<(), Error> {
        self.steps += 1;
        self.dirty(self.steps);
        out.emit(event.key, self.steps.to_string(), event.timestamp);
        Ok(())
    }

    /// The buffer and step counter come from the snapshot (even when
    /// `state_mib` changed), `dirty_fraction` from this run's config.
    fn restore(&mut self, _ctx: &Context, from: &mut memento_guest::StateReader<'_>) -> Result<(), Error> {
        // Free the buffer `open` made first: the peak is then the snapshot
        // plus one buffer, not two.
        let configured = std::mem::take(&mut self.data).len();
        let (_, restored) = memento_guest::read_state::<Ballast>(Self::STATE_VERSION, from)?;
        if restored.data.len() != configured {
            memento_guest::warn!(
                "ballast: restored {} bytes of state; config `state_mib` asks for {configured}; keeping the snapshot's",
                restored.data.len()
            );
        }
        self.data = restored.data;
        self.steps = restored.steps;
        Ok(())
    }
}

memento_guest::export_operator!(Ballast);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn open(config: &[(&str, &str)]) -> Ballast {
        Ballast::open(&Context::for_test(config.iter().copied())).unwrap()
    }

    fn step(op: &mut Ballast, key: &str, timestamp: i64) -> Event {
        let mut out = Output::new();
        op.process(Event::new(key, "ignored", timestamp), &mut out)
            .unwrap();
        let mut events = out.take();
        assert_eq!(events.len(), 1);
        events.pop().unwrap()
    }

    /// Pages whose content differs between two buffers.
    fn changed_pages(before: &[u8], after: &[u8]) -> BTreeSet<usize> {
        assert_eq!(before.len(), after.len());
        before
            .chunks(PAGE_SIZE)
            .zip(after.chunks(PAGE_SIZE))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn state_has_the_configured_size() {
        let op = open(&[]);
        assert_eq!(op.data().len(), 16 << 20);
        assert_eq!(op.pages(), 4096);
        assert_eq!(open(&[("state_mib", "0.5")]).data().len(), 512 << 10);
        assert_eq!(open(&[("state_mib", "2")]).data().len(), 2 << 20);
        assert_eq!(open(&[("state_mib", "0")]).data().len(), 0);
        // A partial last page counts as a page.
        let odd = open(&[("state_mib", "0.001")]);
        assert_eq!(odd.data().len(), 1049);
        assert_eq!(odd.pages(), 1);
    }

    /// `value_bytes` of one slot per changed page: an update of one value.
    #[test]
    fn each_change_writes_value_bytes_in_one_slot() {
        let mut op = open(&[
            ("state_mib", "1"),
            ("dirty_fraction", "0.00390625"),
            ("value_bytes", "100"),
        ]);
        for t in 0..20 {
            let before = op.data().to_vec();
            step(&mut op, "k", t);
            let changed: Vec<usize> = (0..before.len()).filter(|&i| before[i] != op.data()[i]).collect();
            let (first, last) = (changed[0], *changed.last().unwrap());
            assert_eq!(changed_pages(&before, op.data()).len(), 1, "step {t}: one page");
            assert!(last - first < 100, "step {t}: within one 100-byte slot");
            assert_eq!(
                first % PAGE_SIZE / 100,
                last % PAGE_SIZE / 100,
                "step {t}: slot-aligned in its page"
            );
        }
        let err = Ballast::open(&Context::for_test([("value_bytes", "0")])).unwrap_err();
        assert!(format!("{err:?}").contains("`value_bytes`"), "{err:?}");
    }

    #[test]
    fn content_is_not_trivially_compressible() {
        let op = open(&[("state_mib", "0.25")]);
        let distinct: BTreeSet<u8> = op.data().iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn each_event_changes_the_configured_fraction_of_pages() {
        for (mib, fraction) in [
            ("1", "0.01"),
            ("1", "0.1"),
            ("1", "0.5"),
            ("1", "1"),
            ("0.3", "0.07"),
            ("16", "0.01"),
        ] {
            let mut op = open(&[("state_mib", mib), ("dirty_fraction", fraction)]);
            let expected = fraction.parse::<f64>().unwrap() * op.pages() as f64;
            for i in 0..20 {
                let before = op.data().to_vec();
                step(&mut op, "k", i);
                let n = changed_pages(&before, op.data()).len() as f64;
                assert!(
                    (n - expected).abs() <= 1.0,
                    "{mib} MiB, {fraction}: {n} pages changed, expected {expected}"
                );
            }
        }
    }

    #[test]
    fn zero_fraction_changes_nothing() {
        let mut op = open(&[("state_mib", "1"), ("dirty_fraction", "0")]);
        let before = op.data().to_vec();
        for i in 0..10 {
            step(&mut op, "k", i);
        }
        assert_eq!(op.data(), &before[..]);
        assert_eq!(op.steps(), 10);
    }

    #[test]
    fn tiny_fractions_average_out_exactly() {
        // 256 pages at 0.001: 0.256 pages per event, 256 pages per 1000 events.
        let mut op = open(&[("state_mib", "1"), ("dirty_fraction", "0.001")]);
        let mut total = 0;
        for i in 0..1000 {
            let before = op.data().to_vec();
            step(&mut op, "k", i);
            let n = changed_pages(&before, op.data()).len();
            assert!(n <= 1, "{n}");
            total += n;
        }
        assert_eq!(total, 256);
    }

    #[test]
    fn changed_pages_spread_over_the_whole_state() {
        let mut op = open(&[("state_mib", "4"), ("dirty_fraction", "0.01")]);
        let original = op.data().to_vec();
        for i in 0..10 {
            step(&mut op, "k", i);
        }
        let changed = changed_pages(&original, op.data());
        // Every tenth of the buffer got some of the changes.
        let pages = op.pages();
        for tenth in 0..10 {
            let range = tenth * pages / 10..(tenth + 1) * pages / 10;
            assert!(changed.range(range.clone()).count() >= 5, "{range:?}");
        }
        // And steps do not keep hitting the same pages.
        assert!(changed.len() > 9 * 10, "{}", changed.len());
    }

    #[test]
    fn emits_one_event_per_input_with_the_step_counter() {
        let mut op = open(&[("state_mib", "0.1")]);
        let mut out = Output::new();
        for (i, key) in ["a", "b", "a"].iter().enumerate() {
            op.process(Event::new(*key, "x", 100 + i as i64), &mut out)
                .unwrap();
        }
        let got: Vec<(Vec<u8>, Vec<u8>, i64)> = out
            .take()
            .into_iter()
            .map(|e| (e.key, e.value, e.timestamp))
            .collect();
        assert_eq!(
            got,
            vec![
                (b"a".to_vec(), b"1".to_vec(), 100),
                (b"b".to_vec(), b"2".to_vec(), 101),
                (b"a".to_vec(), b"3".to_vec(), 102)
            ]
        );
    }

    #[test]
    fn identical_input_gives_identical_state() {
        let config = [("state_mib", "1"), ("dirty_fraction", "0.05")];
        let mut a = open(&config);
        let mut b = open(&config);
        for i in 0..50 {
            step(&mut a, "k", i);
            step(&mut b, "other key", -i);
        }
        assert_eq!(a.steps(), b.steps());
        assert!(a.data() == b.data());
        assert_eq!(
            memento_guest::snapshot_bytes(&a).unwrap(),
            memento_guest::snapshot_bytes(&b).unwrap()
        );
    }

    #[test]
    fn snapshot_is_raw_bytes_and_restores_exactly() {
        let config = [("state_mib", "1"), ("dirty_fraction", "0.02")];
        let ctx = Context::for_test(config);
        let mut original = open(&config);
        for i in 0..7 {
            step(&mut original, "k", i);
        }
        let state = memento_guest::snapshot_bytes(&original).unwrap();
        // Envelope (10) + map with three fields + bin32 header: a few dozen
        // bytes on top of the buffer. A sequence of integers would need about
        // 1.5 bytes per random byte.
        assert!(state.len() < original.data().len() + 100, "{}", state.len());

        let mut restored = Ballast::open(&ctx).unwrap();
        memento_guest::restore_bytes(&mut restored, &ctx, &state).unwrap();
        assert_eq!(restored.steps(), 7);
        assert!(restored.data() == original.data());
        assert_eq!(memento_guest::snapshot_bytes(&restored).unwrap(), state);

        // Recovery is deterministic: both go on identically.
        for i in 7..20 {
            assert_eq!(
                step(&mut original, "k", i).value,
                step(&mut restored, "k", i).value
            );
        }
        assert!(restored.data() == original.data());
    }

    #[test]
    fn restore_keeps_the_snapshot_size_and_the_new_fraction() {
        let mut op = open(&[("state_mib", "0.5")]);
        step(&mut op, "k", 0);
        let state = memento_guest::snapshot_bytes(&op).unwrap();
        let ctx = Context::for_test([("state_mib", "1"), ("dirty_fraction", "0.5")]);
        let mut other = Ballast::open(&ctx).unwrap();
        memento_guest::restore_bytes(&mut other, &ctx, &state).unwrap();
        assert_eq!(other.data().len(), 512 << 10);
        assert_eq!(other.dirty_fraction, 0.5);
    }

    #[test]
    fn bad_config_is_rejected_naming_key_and_value() {
        for (key, value) in [
            ("dirty_fraction", "1.5"),
            ("dirty_fraction", "-0.1"),
            ("dirty_fraction", "NaN"),
            ("dirty_fraction", "a lot"),
            ("state_mib", "-1"),
            ("state_mib", "inf"),
            ("state_mib", "NaN"),
            ("state_mib", "1e30"),
            ("state_mib", "sixteen"),
        ] {
            let err = Ballast::open(&Context::for_test([(key, value)])).unwrap_err();
            let msg = err.message();
            assert!(
                msg.contains(&format!("config `{key}`")) && msg.contains(&format!("{value:?}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn garbage_snapshot_is_refused() {
        let ctx = Context::for_test([("state_mib", "0")]);
        let mut op = Ballast::open(&ctx).unwrap();
        assert!(memento_guest::restore_bytes(&mut op, &ctx, b"not a snapshot").is_err());
    }
}
