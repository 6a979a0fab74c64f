//! How long to wait before restart number n of a failed job.

use std::time::Duration;

use crate::spec::{RestartSpec, RestartStrategy};

/// The delay before the restart that follows `restarts` earlier ones, with
/// `unit` (in 0..1) choosing the jitter.
///
/// The exponential delay is capped before it is turned back into a
/// `Duration`: `delay × multiplier^n` overflows a `Duration` (and `f64`
/// overflows to infinity) long before `attempts` runs out.
pub(super) fn delay(r: &RestartSpec, restarts: u32, unit: f64) -> Duration {
    match r.strategy {
        RestartStrategy::None | RestartStrategy::Fixed => r.delay.0,
        RestartStrategy::Exponential => {
            let cap = r.max_delay.0;
            let exponent = i32::try_from(restarts).unwrap_or(i32::MAX);
            let grown = r.delay.0.as_secs_f64() * r.multiplier.powi(exponent);
            let base = capped(grown, cap);
            let jittered = base.as_secs_f64() * (1.0 + r.jitter * unit.clamp(0.0, 1.0));
            capped(jittered, cap)
        }
    }
}

/// `secs` as a duration, at most `cap` (also when `secs` is infinite or NaN).
fn capped(secs: f64, cap: Duration) -> Duration {
    if secs.is_finite() && secs < cap.as_secs_f64() {
        Duration::from_secs_f64(secs.max(0.0))
    } else {
        cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::HumanDuration;

    fn exponential(multiplier: f64, jitter: f64) -> RestartSpec {
        RestartSpec {
            strategy: RestartStrategy::Exponential,
            attempts: u32::MAX,
            delay: HumanDuration(Duration::from_secs(1)),
            max_delay: HumanDuration(Duration::from_secs(60)),
            multiplier,
            jitter,
        }
    }

    #[test]
    fn exponential_grows_then_caps() {
        let r = exponential(2.0, 0.0);
        let secs: Vec<u64> = (0..8).map(|n| delay(&r, n, 0.0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn late_restarts_neither_panic_nor_exceed_the_cap() {
        // delay × multiplier^n overflowed a Duration at restart 64 (×2) and
        // restart 20 (×10).
        for (multiplier, jitter) in [(2.0, 0.0), (10.0, 0.0), (10.0, 1.0), (1e300, 0.5)] {
            let r = exponential(multiplier, jitter);
            for n in [19, 20, 63, 64, 65, 1_000, 100_000, u32::MAX] {
                for unit in [0.0, 0.5, 0.999_999] {
                    assert_eq!(
                        delay(&r, n, unit),
                        Duration::from_secs(60),
                        "×{multiplier} restart {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn jitter_adds_at_most_its_fraction() {
        let r = exponential(2.0, 0.5);
        assert_eq!(delay(&r, 0, 0.0), Duration::from_secs(1));
        assert_eq!(delay(&r, 1, 0.5), Duration::from_millis(2500));
        assert_eq!(delay(&r, 2, 1.0), Duration::from_secs(6));
    }

    #[test]
    fn fixed_ignores_the_count() {
        let r = RestartSpec {
            strategy: RestartStrategy::Fixed,
            delay: HumanDuration(Duration::from_millis(250)),
            ..exponential(2.0, 0.1)
        };
        assert_eq!(delay(&r, 0, 0.7), Duration::from_millis(250));
        assert_eq!(delay(&r, u32::MAX, 0.7), Duration::from_millis(250));
    }

    #[test]
    fn max_delay_caps_even_the_first_delay() {
        let mut r = exponential(2.0, 0.0);
        r.max_delay = HumanDuration(Duration::from_millis(500));
        assert_eq!(delay(&r, 0, 0.0), Duration::from_millis(500));
        assert_eq!(delay(&r, 30, 0.0), Duration::from_millis(500));
    }
}
