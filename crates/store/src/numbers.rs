//! Small durable number files: each series' snapshot counter (and the
//! fence of `series.rs`).

use std::io;

use crate::backend::{LockGuard, LockMode, PutMode};
use crate::{JobName, StoreError, TenantStore};

/// The actions naming a small number file in errors.
#[derive(Clone, Copy)]
pub(crate) struct NumberFile {
    pub(crate) read: &'static str,
    pub(crate) parse: &'static str,
    pub(crate) write: &'static str,
}

pub(crate) const COUNTER: NumberFile = NumberFile {
    read: "read counter",
    parse: "parse counter",
    write: "write counter",
};

impl TenantStore {
    pub(crate) fn counter_key(&self, job: &JobName) -> String {
        self.key(&format!("counters/{job}"))
    }

    /// The lock of `job`'s counter: per job, so that jobs sharing a tenant
    /// do not queue behind each other's counter fsyncs.
    pub(crate) fn counter_lock(&self, job: &JobName) -> Result<Option<Box<dyn LockGuard>>, StoreError> {
        self.lock(&format!("counter.{job}"), LockMode::Exclusive, None)
    }

    /// Returns the number for the next snapshot of `job` and advances the
    /// job's counter durably. One counter per job, shared by checkpoints and
    /// savepoints; never reissues a number, even after deletes and restarts
    /// (it is also kept above every number committed).
    ///
    /// # Errors
    /// I/O errors, or a damaged counter file.
    pub fn next_snapshot_number(&self, job: &JobName) -> Result<u64, StoreError> {
        let exhausted = || StoreError::NumbersExhausted {
            tenant: self.name().to_string(),
            job: job.to_string(),
        };
        if let Some(lease) = self.active_lease(job) {
            // Object storage: the lease alone. Its `next` started above the
            // counter and every committed number, and its conditional write
            // is what stops a holder that lost it (docs/STORAGE.md, "Job
            // leases and fencing"); the counter is written on release.
            if lease.next() == u64::MAX {
                return Err(exhausted());
            }
            return lease.take_number(0);
        }
        // The lock makes read-increment-write atomic across threads and
        // processes.
        let _guard = self.counter_lock(job)?;
        let stored = self.read_counter(job)?;
        let above_existing = match self.list_ids(job)?.last() {
            Some(id) => id.number().checked_add(1).ok_or_else(exhausted)?,
            None => 1,
        };
        let n = stored.max(above_existing);
        self.write_counter(job, n.checked_add(1).ok_or_else(exhausted)?)?;
        Ok(n)
    }

    pub(crate) fn read_counter(&self, job: &JobName) -> Result<u64, StoreError> {
        Ok(self.read_number(self.counter_key(job), COUNTER)?.unwrap_or(1))
    }

    pub(crate) fn write_counter(&self, job: &JobName, next: u64) -> Result<(), StoreError> {
        self.write_number(self.counter_key(job), COUNTER, next)
    }

    /// A small file holding one decimal number (`None` if it is missing).
    pub(crate) fn read_number(&self, key: String, what: NumberFile) -> Result<Option<u64>, StoreError> {
        match self.backend().read(&key) {
            Ok(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Some)
                .ok_or_else(|| {
                    StoreError::io(
                        what.parse,
                        key,
                        io::Error::new(io::ErrorKind::InvalidData, "not a decimal number"),
                    )
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(what.read, key, e)),
        }
    }

    /// Replace such a file, durably when the store syncs.
    pub(crate) fn write_number(&self, key: String, what: NumberFile, n: u64) -> Result<(), StoreError> {
        let sync = self.options().sync;
        self.backend()
            .put(&key, format!("{n}\n").as_bytes(), PutMode::Replace, sync)
            .and_then(|_| if sync { self.backend().flush() } else { Ok(()) })
            .map_err(|e| StoreError::io(what.write, key, e))
    }
}
