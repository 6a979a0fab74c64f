//! Who may write a series -- the snapshots of one job name -- and which of
//! its snapshots are still restore points.
//!
//! The store knows no jobs: a series is a name under which snapshots are
//! numbered. Its users (the library's `Job::run`) take the lease for as
//! long as they write the series, and raise the fence when they start the
//! series over, so that [`TenantStore::latest`] no longer offers what came
//! before.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::SnapshotId;
use crate::backend::{LockGuard, LockMode, PutMode};
use crate::lease::{LeaseDoc, LeaseState, holder_name};
use crate::manifest::VOID_MANIFEST;

/// Most numbers a successor voids; a lease claiming more is damaged.
const MAX_VOID: u64 = 100_000;

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
            // Numbers come from the lease alone while it is held: the
            // counter learns the lease's `next` here, so that no number it
            // gave is reissued after the lease object is gone.
            if !state.is_lost() {
                let next = state.next();
                let raised = tenant.read_counter(series).and_then(|c| {
                    if c < next {
                        tenant.write_counter(series, next)
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = raised {
                    tracing::warn!(job = %series, "cannot raise the counter at lease release: {e}");
                }
            }
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

/// How [`acquire`] treats a lease held by someone alive.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    /// Give up as soon as the holder is seen renewing.
    IfFree,
    /// Wait until it is free or stale, at most this long.
    Upto(Duration),
}

impl TenantStore {
    /// The time to live of leases on this store (`None`: not object
    /// storage; the job lock is a `flock` there).
    pub(crate) fn lease_ttl(&self) -> Option<Duration> {
        self.backend().lease_ttl()
    }

    /// The number a new holder's `next` starts from: above the counter and
    /// every committed (or voided) number.
    fn first_free_number(&self, job: &JobName) -> Result<u64, StoreError> {
        let counter = self.read_counter(job)?;
        let above = self
            .list_ids(job)?
            .last()
            .map_or(1, |id| id.number().saturating_add(1));
        Ok(counter.max(above))
    }

    /// Takes `job`'s lease (see the module doc); `None` if a live holder
    /// keeps it (as `wait` says). Starts the renewer.
    pub(crate) fn acquire_lease(
        &self,
        job: &JobName,
        wait: Wait,
    ) -> Result<Option<Arc<LeaseState>>, StoreError> {
        let ttl = self.lease_ttl().expect("leases need a versioned backend");
        let key = self.key(&format!("leases/{job}"));
        let backend = self.inner.store.backend.clone();
        let holder = holder_name();
        let io = |what: &'static str| {
            let key = key.clone();
            move |e| StoreError::io(what, key, e)
        };
        let started = Instant::now();
        let mut seen: Option<(String, Instant)> = None;
        let (doc, tag, voids) = loop {
            let current = backend.read_versioned(&key).map_err(io("read lease"))?;
            let fresh = |generation: u64, next: u64| LeaseDoc {
                holder: holder.clone(),
                generation,
                ttl_ms: ttl.as_millis() as u64,
                next,
                low: next,
                seq: 0,
            };
            match current {
                None => {
                    let doc = fresh(1, self.first_free_number(job)?);
                    let bytes = serde_json::to_vec(&doc).expect("serializable");
                    if let Some(tag) = backend
                        .put_versioned(&key, &bytes, None)
                        .map_err(io("write lease"))?
                    {
                        break (doc, tag, None);
                    }
                }
                Some((bytes, tag)) => {
                    let old: LeaseDoc = serde_json::from_slice(&bytes).map_err(|e| {
                        StoreError::io(
                            "read lease",
                            key.clone(),
                            std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("damaged lease: {e}"),
                            ),
                        )
                    })?;
                    let now = Instant::now();
                    match &seen {
                        Some((t, since)) if *t == tag && now.duration_since(*since) >= ttl => {
                            let next = self.first_free_number(job)?.max(old.next);
                            let doc = fresh(old.generation + 1, next);
                            let bytes = serde_json::to_vec(&doc).expect("serializable");
                            if let Some(new_tag) = backend
                                .put_versioned(&key, &bytes, Some(&tag))
                                .map_err(io("take over lease"))?
                            {
                                break (doc, new_tag, Some(old));
                            }
                        }
                        Some((t, _)) if *t == tag => {}
                        Some(_) if matches!(wait, Wait::IfFree) => return Ok(None),
                        _ => seen = Some((tag, now)),
                    }
                }
            }
            if let Wait::Upto(limit) = wait
                && started.elapsed() >= limit
            {
                return Ok(None);
            }
            std::thread::sleep((ttl / 20).clamp(Duration::from_millis(10), Duration::from_millis(500)));
        };
        if let Some(old) = voids {
            tracing::info!(lease = %key, generation = doc.generation, previous = %old.holder, "took over a stale lease");
            self.void_numbers(job, old.low, old.next)?;
        }
        Ok(Some(LeaseState::start(
            backend,
            key,
            self.name().to_string(),
            job.clone(),
            doc,
            tag,
            ttl,
        )))
    }

    /// Voids every number in `[low, next)` that has no manifest, so the
    /// previous holder can never commit it.
    fn void_numbers(&self, job: &JobName, low: u64, next: u64) -> Result<(), StoreError> {
        if next.saturating_sub(low) > MAX_VOID {
            return Err(StoreError::io(
                "take over lease",
                self.key(&format!("leases/{job}")),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("damaged lease: {} numbers in flight", next - low),
                ),
            ));
        }
        for n in low..next {
            let key = self.manifest_key(&SnapshotId::new(job.clone(), n));
            let voided = self
                .backend()
                .put(&key, VOID_MANIFEST, PutMode::NoReplace, true)
                .map_err(|e| StoreError::io("void snapshot number", key.clone(), e))?;
            if voided {
                tracing::info!(snapshot = %key, "voided a number the previous holder had not committed");
            }
        }
        Ok(())
    }
}
