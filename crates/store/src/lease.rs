//! A held job lease on object storage (`docs/STORAGE.md`, "Job leases and
//! fencing"); taking one over is `series.rs`'s.
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
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::StoreError;
use crate::name::JobName;

/// The lease object's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LeaseDoc {
    pub(crate) holder: String,
    pub(crate) generation: u64,
    pub(crate) ttl_ms: u64,
    /// The next number the holder may take.
    pub(crate) next: u64,
    /// At most the lowest number the holder took and has not yet
    /// committed or aborted.
    pub(crate) low: u64,
    /// Changes with every write, so that every write has a new ETag.
    pub(crate) seq: u64,
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
    /// A lease just written as `doc` with ETag `tag`; starts its renewer.
    pub(crate) fn start(
        backend: Arc<dyn Backend>,
        key: String,
        tenant: String,
        job: JobName,
        doc: LeaseDoc,
        tag: String,
        ttl: Duration,
    ) -> Arc<LeaseState> {
        let state = Arc::new(LeaseState {
            backend,
            key,
            tenant,
            job,
            doc: Mutex::new((doc, tag)),
            in_flight: Mutex::new(BTreeSet::new()),
            lost: AtomicBool::new(false),
            released: AtomicBool::new(false),
            #[cfg(test)]
            renewals_paused: AtomicBool::new(false),
        });
        start_renewer(&state, ttl);
        state
    }

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

    /// Whether `n` was taken through this lease and is not yet committed
    /// or aborted.
    pub(crate) fn holds(&self, n: u64) -> bool {
        self.in_flight.lock().unwrap().contains(&n)
    }

    /// The next number the lease would give.
    pub(crate) fn next(&self) -> u64 {
        self.doc.lock().unwrap().0.next
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

/// `<host>-<pid>-<nonce>`: who holds a lease (or which host of a pool
/// this is), for people reading it.
pub fn holder_name() -> String {
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
