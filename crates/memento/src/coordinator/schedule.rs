//! When periodic savepoints are due: every `interval`, or at the instants a
//! cron expression names (UTC).

use std::time::{Duration, Instant};

use crate::spec::{SavepointSpec, parse_cron};

/// The periodic-savepoint timer of one attempt.
pub struct Schedule {
    kind: Kind,
    next: Option<Instant>,
}

enum Kind {
    None,
    Every(Duration),
    Cron(Box<croner::Cron>),
}

impl Schedule {
    /// The schedule a job file's `[savepoints]` asks for (validated there).
    pub fn from_spec(spec: &SavepointSpec) -> Schedule {
        Schedule::from_spec_at(spec, Instant::now())
    }

    /// As [`Schedule::from_spec`], starting at `now`.
    pub(crate) fn from_spec_at(spec: &SavepointSpec, now: Instant) -> Schedule {
        let kind = if let Some(i) = spec.interval {
            Kind::Every(i.0)
        } else if let Some(expr) = &spec.cron {
            match parse_cron(expr) {
                Ok(c) => Kind::Cron(Box::new(c)),
                Err(_) => Kind::None, // rejected when the job file was read
            }
        } else {
            Kind::None
        };
        let mut s = Schedule { kind, next: None };
        s.next = s.after(now);
        s
    }

    /// The next instant a savepoint is due, if any.
    pub fn next(&self) -> Option<Instant> {
        self.next
    }

    /// Whether a savepoint is due at `now`; if so, arms the next one.
    pub fn due(&mut self, now: Instant) -> bool {
        match self.next {
            Some(t) if t <= now => {
                self.next = match self.kind {
                    // From due instant to due instant, so a late wake-up does
                    // not shift every later savepoint; missed ones are not
                    // made up.
                    Kind::Every(d) if t + d > now => Some(t + d),
                    _ => self.after(now),
                };
                true
            }
            _ => false,
        }
    }

    fn after(&self, now: Instant) -> Option<Instant> {
        match &self.kind {
            Kind::None => None,
            Kind::Every(d) => Some(now + *d),
            Kind::Cron(c) => {
                let utc =
                    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(crate::store::now_ms() as i64)?;
                let next = c.find_next_occurrence(&utc, false).ok()?;
                let wait = (next - utc).to_std().ok()?;
                Some(now + wait)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::HumanDuration;

    #[test]
    fn interval_schedule_rearms() {
        let spec = SavepointSpec {
            interval: Some(HumanDuration(Duration::from_millis(50))),
            ..Default::default()
        };
        let mut s = Schedule::from_spec(&spec);
        let first = s.next().unwrap();
        assert!(!s.due(first - Duration::from_millis(1)));
        assert!(s.due(first + Duration::from_millis(5)));
        assert_eq!(s.next().unwrap(), first + Duration::from_millis(50), "no drift");
        let later = first + Duration::from_millis(500);
        assert!(s.due(later));
        assert_eq!(s.next().unwrap(), later + Duration::from_millis(50), "no backlog");
    }

    #[test]
    fn cron_schedule_is_within_a_minute() {
        let spec = SavepointSpec {
            cron: Some("* * * * *".into()),
            ..Default::default()
        };
        let s = Schedule::from_spec(&spec);
        let wait = s.next().unwrap() - Instant::now();
        assert!(wait <= Duration::from_secs(61), "{wait:?}");
        assert!(Schedule::from_spec(&SavepointSpec::default()).next().is_none());
    }
}
