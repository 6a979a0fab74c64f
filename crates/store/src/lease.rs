//! Job leases on object storage, with fencing (`docs/STORAGE.md`, "Job
//! leases and fencing").
//!
//! A lease object `leases/<job>` says who holds a series, in which
//! generation, and which snapshot numbers the holder may still commit
//! (`[low, next)`). Every change is a conditional write on the object's
//! ETag, so a holder that lost the lease learns it from the refusal of its
//! next write, never from a read. A successor voids the numbers its
//! predecessor may still commit, each by a put-if-absent at the manifest's
//! own key: for each number exactly one of the two writes wins.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, PutMode};
use crate::{JobName, SnapshotId, StoreError, TenantStore};

/// What a voided manifest key holds: no snapshot, and never one.
pub(crate) const VOID: &[u8] = b"void\n";

/// Most numbers a successor voids; a lease claiming more is damaged.
const MAX_VOID: u64 = 100_000;

/// The lease object's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseDoc {
    holder: String,
    generation: u64,
    ttl_ms: u64,
    /// The next number the holder may take.
    next: u64,
    /// At most the lowest number the holder took and has not yet
    /// committed or aborted.
    low: u64,
    /// Changes with every write, so that every write has a new ETag.
    seq: u64,
}

/// A held lease: what the renewer and the number taker share.
pub(crate) struct LeaseState {
    backend: Arc<dyn Backend>,
    key: String,
    tenant: String,
    job: JobName,
    /// The document as last written and its ETag; the lock also orders
    /// this holder's conditional writes.
    doc: Mutex<(LeaseDoc, String)>,
    /// Numbers taken and not yet committed or aborted.
    in_flight: Mutex<BTreeSet<u64>>,
    lost: AtomicBool,
    released: AtomicBool,
    /// Tests stop renewals to play a paused holder.
    #[cfg(test)]
    pub(crate) renewals_paused: AtomicBool,
}

impl fmt::Debug for LeaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseState").field("key", &self.key).finish()
    }
}

impl LeaseState {
    fn lost_err(&self) -> StoreError {
        StoreError::LeaseLost {
            tenant: self.tenant.clone(),
            job: self.job.to_string(),
        }
    }

    /// Writes `change` applied to the document, conditional on our last
    /// ETag; a refusal marks the lease lost.
    fn update(&self, change: impl FnOnce(&mut LeaseDoc)) -> Result<(), StoreError> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(self.lost_err());
        }
        let mut guard = self.doc.lock().unwrap();
        let (doc, tag) = &mut *guard;
        let mut new = doc.clone();
        change(&mut new);
        new.seq += 1;
        let bytes = serde_json::to_vec(&new).expect("serializable");
        match self
            .backend
            .put_versioned(&self.key, &bytes, Some(tag))
            .map_err(|e| StoreError::io("renew lease", self.key.clone(), e))?
        {
            Some(new_tag) => {
                *doc = new;
                *tag = new_tag;
                Ok(())
            }
            None => {
                self.lost.store(true, Ordering::SeqCst);
                tracing::error!(lease = %self.key, "lease lost: another holder took it over");
                Err(self.lost_err())
            }
        }
    }

    fn low(&self, next: u64) -> u64 {
        self.in_flight.lock().unwrap().first().copied().unwrap_or(next)
    }

    fn renew(&self) -> Result<(), StoreError> {
        self.update(|d| d.low = self.low(d.next))
    }

    /// Takes snapshot number `candidate` (or the lease's next, if higher)
    /// by a conditional write; refused once the lease is lost.
    pub(crate) fn take_number(&self, candidate: u64) -> Result<u64, StoreError> {
        let mut taken = 0;
        // In flight before the write, so a renewal (ordered after it by
        // the document lock) never writes a `low` above it.
        let result = self.update(|d| {
            taken = candidate.max(d.next);
            d.next = taken.saturating_add(1);
            self.in_flight.lock().unwrap().insert(taken);
            d.low = self.low(d.next);
        });
        if result.is_err() && taken != 0 {
            self.done(taken);
        }
        result.map(|()| taken)
    }

    /// Number `n` was committed or aborted.
    pub(crate) fn done(&self, n: u64) {
        self.in_flight.lock().unwrap().remove(&n);
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Deletes the lease object if it is still ours (S3 has no conditional
    /// delete: the check and the delete are apart by one round trip, within
    /// which no one can take a lease that is being renewed).
    pub(crate) fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) || self.is_lost() {
            return;
        }
        let tag = self.doc.lock().unwrap().1.clone();
        match self.backend.read_versioned(&self.key) {
            Ok(Some((_, now))) if now == tag => {
                if let Err(e) = self.backend.delete(&self.key) {
                    tracing::warn!(lease = %self.key, "cannot release lease: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(lease = %self.key, "cannot release lease: {e}"),
        }
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
        let state = Arc::new(LeaseState {
            backend,
            key,
            tenant: self.name().to_string(),
            job: job.clone(),
            doc: Mutex::new((doc, tag)),
            in_flight: Mutex::new(BTreeSet::new()),
            lost: AtomicBool::new(false),
            released: AtomicBool::new(false),
            #[cfg(test)]
            renewals_paused: AtomicBool::new(false),
        });
        start_renewer(&state, ttl);
        Ok(Some(state))
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
                .put(&key, VOID, PutMode::NoReplace, true)
                .map_err(|e| StoreError::io("void snapshot number", key.clone(), e))?;
            if voided {
                tracing::info!(snapshot = %key, "voided a number the previous holder had not committed");
            }
        }
        Ok(())
    }
}

/// Renews every `ttl / 3` until the lease is released, lost or dropped.
fn start_renewer(state: &Arc<LeaseState>, ttl: Duration) {
    let weak = Arc::downgrade(state);
    let spawned = std::thread::Builder::new()
        .name("memento-lease".into())
        .spawn(move || {
            loop {
                std::thread::sleep(ttl / 3);
                let Some(s) = weak.upgrade() else { return };
                if s.released.load(Ordering::SeqCst) || s.is_lost() {
                    return;
                }
                #[cfg(test)]
                if s.renewals_paused.load(Ordering::SeqCst) {
                    continue;
                }
                if let Err(e) = s.renew()
                    && !s.is_lost()
                {
                    tracing::warn!(lease = %s.key, "cannot renew lease: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the lease renewer: {e}");
    }
}

/// `<host>-<pid>-<nonce>`: who holds a lease, for people reading it.
fn holder_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(64)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{host}-{}-{nanos:x}", std::process::id())
}
