//! When failed checkpoints fail the job: more than `tolerable_failures` in
//! a row.

use crate::dataflow::JobError;
use crate::store::SnapshotKind;

/// Consecutive failed checkpoints of a run.
#[derive(Debug, Default)]
pub(super) struct FailureCounter {
    consecutive: u32,
}

impl FailureCounter {
    /// A snapshot of `kind` completed: a checkpoint ends the series.
    pub(super) fn completed(&mut self, kind: SnapshotKind) {
        if kind == SnapshotKind::Checkpoint {
            self.consecutive = 0;
        }
    }

    /// A snapshot of `kind` failed for `reason`. Checkpoint failures count
    /// against `tolerable`; savepoint failures are only reported to whoever
    /// asked.
    ///
    /// # Errors
    /// [`JobError::Snapshots`] when this failure is one more than
    /// `tolerable` in a row (the count starts over).
    pub(super) fn failed(
        &mut self,
        kind: SnapshotKind,
        tolerable: u32,
        reason: &str,
    ) -> Result<(), JobError> {
        if kind != SnapshotKind::Checkpoint {
            return Ok(());
        }
        self.consecutive += 1;
        if self.consecutive > tolerable {
            let n = std::mem::take(&mut self.consecutive);
            return Err(JobError::Snapshots(format!(
                "{n} consecutive checkpoints failed (tolerable_failures = {tolerable}); last: {reason}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_tolerable_checkpoint_failures_in_a_row_fail_the_job() {
        let mut f = FailureCounter::default();
        f.failed(SnapshotKind::Checkpoint, 2, "a").unwrap();
        f.failed(SnapshotKind::Checkpoint, 2, "b").unwrap();
        let err = f.failed(SnapshotKind::Checkpoint, 2, "timed out").unwrap_err();
        assert_eq!(
            err.to_string(),
            "3 consecutive checkpoints failed (tolerable_failures = 2); last: timed out"
        );
        // The count starts over.
        f.failed(SnapshotKind::Checkpoint, 2, "c").unwrap();
    }

    #[test]
    fn zero_tolerable_fails_at_the_first() {
        let mut f = FailureCounter::default();
        assert!(f.failed(SnapshotKind::Checkpoint, 0, "declined").is_err());
    }

    #[test]
    fn a_completed_checkpoint_ends_the_series_and_savepoints_do_not_count() {
        let mut f = FailureCounter::default();
        f.failed(SnapshotKind::Checkpoint, 1, "a").unwrap();
        f.completed(SnapshotKind::Savepoint);
        for _ in 0..5 {
            f.failed(SnapshotKind::Savepoint, 1, "savepoint").unwrap();
        }
        assert!(
            f.failed(SnapshotKind::Checkpoint, 1, "b").is_err(),
            "a savepoint neither resets nor adds"
        );
        f.failed(SnapshotKind::Checkpoint, 1, "c").unwrap();
        f.completed(SnapshotKind::Checkpoint);
        f.failed(SnapshotKind::Checkpoint, 1, "d").unwrap();
    }
}
