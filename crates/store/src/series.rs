//! Who may write a series -- the snapshots of one job name -- and which of
//! its snapshots are still restore points.
//!
//! The store knows no jobs: a series is a name under which snapshots are
//! numbered. Its users (the library's `Job::run`) take the lease for as
//! long as they write the series, and raise the fence when they start the
//! series over, so that [`TenantStore::latest`] no longer offers what came
//! before.

use std::time::Duration;

use crate::backend::{LockGuard, LockMode};
use crate::{JobName, NumberFile, StoreError, TenantStore};

const FENCE: NumberFile = NumberFile {
    read: "read fence",
    parse: "parse fence",
    write: "write fence",
};

/// The exclusive right to write one series, held until dropped (see
/// [`TenantStore::lease_series`]).
#[derive(Debug)]
pub struct SeriesLease {
    _guard: Box<dyn LockGuard>,
}

impl TenantStore {
    /// Takes the lease of `series`: while it lives, a second lease of the
    /// same series on this store -- from another process or this one -- is
    /// refused. Released when dropped or when the process dies (an advisory
    /// file lock), so a crash never leaves a series stuck.
    ///
    /// Returns `None` if someone else holds the lease.
    ///
    /// # Errors
    /// I/O errors.
    pub fn lease_series(&self, series: &JobName) -> Result<Option<SeriesLease>, StoreError> {
        let guard = self.lock(
            &format!("job.{series}"),
            LockMode::Exclusive,
            Some(Duration::ZERO),
        )?;
        Ok(guard.map(|g| SeriesLease { _guard: g }))
    }

    /// Raises the fence of `series` to its next snapshot number and returns
    /// it: from now on [`TenantStore::latest`] ignores every snapshot of the
    /// series numbered below the fence. They stay listed and restorable by
    /// id. Durable when it returns.
    ///
    /// # Errors
    /// I/O errors.
    pub fn fence_series(&self, series: &JobName) -> Result<u64, StoreError> {
        let fence = self.next_snapshot_number(series)?;
        self.write_number(self.key(&format!("fences/{series}")), FENCE, fence)?;
        Ok(fence)
    }

    /// The fence of `series`; 0 if it was never raised.
    pub(crate) fn fence(&self, series: &JobName) -> Result<u64, StoreError> {
        Ok(self
            .read_number(self.key(&format!("fences/{series}")), FENCE)?
            .unwrap_or(0))
    }
}
