//! Who may write a series -- the snapshots of one job name -- and which of
//! its snapshots are still restore points.
//!
//! The store knows no jobs: a series is a name under which snapshots are
//! numbered. Its users (the library's `Job::run`) take the lease for as
//! long as they write the series, and raise the fence when they start the
//! series over, so that [`TenantStore::latest`] no longer offers what came
//! before.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::{LockGuard, LockMode};
use crate::lease::{LeaseState, Wait};
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
    held: Held,
}

#[derive(Debug)]
enum Held {
    /// A local directory: an advisory file lock.
    Lock(#[allow(dead_code)] Box<dyn LockGuard>),
    /// Object storage: a lease object (crate `lease`).
    Object {
        state: Arc<LeaseState>,
        tenant: TenantStore,
        series: JobName,
    },
}

impl SeriesLease {
    /// Whether the lease was lost: on object storage, another host took it
    /// over after it went unrenewed for its time to live. A run holding a
    /// lost lease can take no number and commit nothing; it should stop.
    pub fn is_lost(&self) -> bool {
        match &self.held {
            Held::Lock(_) => false,
            Held::Object { state, .. } => state.is_lost(),
        }
    }

    #[cfg(all(test, feature = "s3"))]
    pub(crate) fn pause_renewals(&self) {
        if let Held::Object { state, .. } = &self.held {
            state
                .renewals_paused
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for SeriesLease {
    fn drop(&mut self) {
        if let Held::Object {
            state,
            tenant,
            series,
        } = &self.held
        {
            state.release();
            let mut leases = tenant.inner.leases.lock().unwrap();
            if leases
                .get(series)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(state)))
            {
                leases.remove(series);
            }
        }
    }
}

impl TenantStore {
    /// Takes the lease of `series`: while it lives, a second lease of the
    /// same series on this store -- from another process or this one -- is
    /// refused. On a local directory it is an advisory file lock, released
    /// when dropped or when the process dies. On object storage it is a
    /// lease object (`docs/STORAGE.md`, "Job leases and fencing"): a live
    /// holder is recognised as soon as it renews, and a dead one's lease is
    /// taken over once it went unrenewed for its time to live, so this
    /// call may take that long.
    ///
    /// Returns `None` if someone else holds the lease.
    ///
    /// # Errors
    /// I/O errors.
    pub fn lease_series(&self, series: &JobName) -> Result<Option<SeriesLease>, StoreError> {
        if self.lease_ttl().is_some() {
            if self.active_lease(series).is_some_and(|l| !l.is_lost()) {
                return Ok(None);
            }
            return self.lease_object(series, Wait::IfFree);
        }
        let guard = self.lock(
            &format!("job.{series}"),
            LockMode::Exclusive,
            Some(Duration::ZERO),
        )?;
        Ok(guard.map(|g| SeriesLease { held: Held::Lock(g) }))
    }

    /// Like [`TenantStore::lease_series`], but waits up to `timeout` for a
    /// live holder to let go or die (a host taking over another's job).
    ///
    /// # Errors
    /// I/O errors.
    pub fn lease_series_wait(
        &self,
        series: &JobName,
        timeout: Duration,
    ) -> Result<Option<SeriesLease>, StoreError> {
        if self.lease_ttl().is_some() {
            return self.lease_object(series, Wait::Upto(timeout));
        }
        let guard = self.lock(&format!("job.{series}"), LockMode::Exclusive, Some(timeout))?;
        Ok(guard.map(|g| SeriesLease { held: Held::Lock(g) }))
    }

    fn lease_object(&self, series: &JobName, wait: Wait) -> Result<Option<SeriesLease>, StoreError> {
        let Some(state) = self.acquire_lease(series, wait)? else {
            return Ok(None);
        };
        self.inner
            .leases
            .lock()
            .unwrap()
            .insert(series.clone(), Arc::downgrade(&state));
        Ok(Some(SeriesLease {
            held: Held::Object {
                state,
                tenant: self.clone(),
                series: series.clone(),
            },
        }))
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
