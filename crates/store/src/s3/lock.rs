//! Locks on object storage: lock objects that their holder keeps renewing
//! (`docs/STORAGE.md`, "Locks on object storage").
//!
//! There is no `flock` and no way to learn that a holder died, so a lock
//! object counts as held while it keeps changing: its holder rewrites it
//! every `ttl / 3`, and an observer that sees the same ETag for a whole
//! `ttl` on its own monotonic clock treats it as stale and takes it over
//! with a conditional write. No wall clocks are compared between hosts.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::{PutMode as ObjPutMode, UpdateVersion};

use super::Shared;
use crate::backend::{LockGuard, LockMode};

/// Default time to live of a lock object or job lease.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(10);

/// Longest pause between two attempts at a busy lock.
const MAX_PAUSE: Duration = Duration::from_millis(200);

/// The locks one backend holds, renewed by one thread.
pub(super) struct Locks {
    shared: Arc<Shared>,
    ttl: Duration,
    /// `<pid>-<nonce>`: names this backend's shared-lock objects and is
    /// written into every lock object it holds.
    holder: String,
    held: Mutex<HashMap<u64, Held>>,
    next: AtomicU64,
    renewals: AtomicU64,
}

/// One held lock object.
struct Held {
    key: String,
    /// Exclusive locks: the ETag of our last write, renewed with `If-Match`
    /// on it so a lock taken over is noticed instead of overwritten.
    /// Shared locks: `None` (each holder owns its own object).
    tag: Option<String>,
}

impl Locks {
    /// Starts the renewer thread; it ends when the backend is dropped.
    pub(super) fn start(shared: Arc<Shared>, ttl: Duration) -> Arc<Locks> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let locks = Arc::new(Locks {
            shared,
            ttl,
            holder: format!("{}-{nanos:x}", std::process::id()),
            held: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&locks);
        let period = ttl / 3;
        let spawned = std::thread::Builder::new()
            .name("memento-s3-locks".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(period);
                    let Some(locks) = weak.upgrade() else { return };
                    locks.renew_all();
                }
            });
        if let Err(e) = spawned {
            // Without renewals every lock goes stale after one ttl: say so
            // loudly rather than fail every store operation.
            tracing::error!("cannot start the lock renewer thread: {e}");
        }
        locks
    }

    pub(super) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// What a lock object holds; the sequence number makes every renewal
    /// a new ETag.
    fn body(&self) -> Bytes {
        let n = self.renewals.fetch_add(1, Ordering::Relaxed);
        Bytes::from(format!(
            "{{\"holder\":\"{}\",\"ttl_ms\":{},\"seq\":{n}}}\n",
            self.holder,
            self.ttl.as_millis()
        ))
    }

    fn renew_all(&self) {
        let held: Vec<(u64, String, Option<String>)> = self
            .held
            .lock()
            .unwrap()
            .iter()
            .map(|(id, h)| (*id, h.key.clone(), h.tag.clone()))
            .collect();
        for (id, key, tag) in held {
            let mode = match &tag {
                Some(t) => ObjPutMode::Update(UpdateVersion {
                    e_tag: Some(t.clone()),
                    version: None,
                }),
                None => ObjPutMode::Overwrite,
            };
            match self.shared.put(&key, self.body(), mode) {
                Ok(Some(new)) => {
                    if let Some(h) = self.held.lock().unwrap().get_mut(&id)
                        && h.tag.is_some()
                    {
                        h.tag = Some(new);
                    }
                }
                Ok(None) => {
                    tracing::warn!(lock = %key, "lock lost: it went stale and was taken over");
                    self.held.lock().unwrap().remove(&id);
                }
                Err(e) => tracing::warn!(lock = %key, "cannot renew lock: {e}"),
            }
        }
    }

    fn register(self: &Arc<Self>, key: String, tag: Option<String>) -> Box<dyn LockGuard> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.held.lock().unwrap().insert(id, Held { key, tag });
        Box::new(S3Lock {
            locks: self.clone(),
            id,
        })
    }

    fn release(&self, id: u64) {
        let Some(held) = self.held.lock().unwrap().remove(&id) else {
            return;
        };
        if let Err(e) = self.shared.delete(&held.key) {
            // It goes stale and others take it after one ttl.
            tracing::warn!(lock = %held.key, "cannot release lock: {e}");
        }
    }

    pub(super) fn lock(
        self: &Arc<Self>,
        key: &str,
        mode: LockMode,
        timeout: Option<Duration>,
    ) -> io::Result<Option<Box<dyn LockGuard>>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        match mode {
            LockMode::Exclusive => self.exclusive(key, deadline),
            LockMode::Shared => self.shared_lock(key, deadline),
        }
    }

    fn exclusive(
        self: &Arc<Self>,
        key: &str,
        deadline: Option<Instant>,
    ) -> io::Result<Option<Box<dyn LockGuard>>> {
        let mut watch = Watch::new(self.ttl);
        let mut pause = Pause::new(deadline);
        let tag = loop {
            if let Some(tag) = self.shared.put(key, self.body(), ObjPutMode::Create)? {
                break tag;
            }
            if let Some((_, Some(etag))) = self.shared.head(key)?
                && watch.stale(key, &etag)
            {
                let over = ObjPutMode::Update(UpdateVersion {
                    e_tag: Some(etag),
                    version: None,
                });
                if let Some(tag) = self.shared.put(key, self.body(), over)? {
                    break tag;
                }
            }
            if !pause.wait() {
                return Ok(None);
            }
        };
        let guard = self.register(key.to_string(), Some(tag));
        // Ours now; wait until no shared holder is left. Ours was written
        // before this listing, so a shared holder that wrote its object
        // after the listing sees ours and backs off.
        loop {
            let prefix = format!("{key}.shared");
            let mut live = false;
            for name in self.shared.list(&prefix)? {
                let k = format!("{prefix}/{name}");
                match self.shared.head(&k)? {
                    Some((_, Some(etag))) if watch.stale(&k, &etag) => self.shared.delete(&k)?,
                    Some(_) => live = true,
                    None => {}
                }
            }
            if !live {
                return Ok(Some(guard));
            }
            if !pause.wait() {
                return Ok(None);
            }
        }
    }

    fn shared_lock(
        self: &Arc<Self>,
        key: &str,
        deadline: Option<Instant>,
    ) -> io::Result<Option<Box<dyn LockGuard>>> {
        let own = format!(
            "{key}.shared/{}-{}",
            self.holder,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let mut watch = Watch::new(self.ttl);
        let mut pause = Pause::new(deadline);
        loop {
            self.shared.put(&own, self.body(), ObjPutMode::Overwrite)?;
            match self.shared.head(key)? {
                None => return Ok(Some(self.register(own, None))),
                Some((_, Some(etag))) if watch.stale(key, &etag) => {
                    // A dead exclusive holder: take its object over (one
                    // contender wins) and remove it.
                    let over = ObjPutMode::Update(UpdateVersion {
                        e_tag: Some(etag),
                        version: None,
                    });
                    if self.shared.put(key, self.body(), over)?.is_some() {
                        self.shared.delete(key)?;
                    }
                    continue;
                }
                Some(_) => {}
            }
            // An exclusive holder is there: step back so it can proceed.
            self.shared.delete(&own)?;
            if !pause.wait() {
                return Ok(None);
            }
        }
    }
}

/// Tells stale lock objects from live ones: stale once the same ETag has
/// been seen for a whole ttl.
struct Watch {
    ttl: Duration,
    seen: HashMap<String, (String, Instant)>,
}

impl Watch {
    fn new(ttl: Duration) -> Watch {
        Watch {
            ttl,
            seen: HashMap::new(),
        }
    }

    fn stale(&mut self, key: &str, etag: &str) -> bool {
        let now = Instant::now();
        match self.seen.get(key) {
            Some((tag, since)) if tag == etag => now.duration_since(*since) >= self.ttl,
            _ => {
                self.seen.insert(key.to_string(), (etag.to_string(), now));
                false
            }
        }
    }
}

/// Backoff between attempts, bounded by a deadline.
struct Pause {
    deadline: Option<Instant>,
    next: Duration,
}

impl Pause {
    fn new(deadline: Option<Instant>) -> Pause {
        Pause {
            deadline,
            next: Duration::from_millis(5),
        }
    }

    /// Sleeps before the next attempt; `false` if the deadline has passed.
    fn wait(&mut self) -> bool {
        let mut d = self.next;
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            d = d.min(left);
        }
        std::thread::sleep(d);
        self.next = (self.next * 2).min(MAX_PAUSE);
        true
    }
}

/// A held lock object, released (deleted) when dropped.
struct S3Lock {
    locks: Arc<Locks>,
    id: u64,
}

impl fmt::Debug for S3Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Lock").field("id", &self.id).finish()
    }
}

impl Drop for S3Lock {
    fn drop(&mut self) {
        self.locks.release(self.id);
    }
}

impl LockGuard for S3Lock {}
