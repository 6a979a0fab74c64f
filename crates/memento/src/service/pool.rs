//! The pool: several services on one `s3://` store share their submitted
//! jobs (`docs/STORAGE.md`, "Pool records"). A job's record and its
//! components live in the tenant's namespace of the store, so any host can
//! run it; its lease decides which one does. Each host scans the records
//! every `pool_scan`, and takes over a job that should run but whose lease
//! went unrenewed (its host died): the lease takeover fences the old host,
//! and the job resumes from its latest snapshot.
//!
//! Which host runs a job is told by its placement object (advisory: the
//! host id and API URL of the host that last started it); requests for a
//! job another host runs are refused with that host named
//! ([`ServiceError::Elsewhere`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::record::JobRecord;
use super::{Service, ServiceError, ServiceJob, Submission};
use crate::spec::JobSpec;
use crate::store::{JobName, LeaseView, SeriesLease, SnapshotId, TenantStore};

/// Pool record format (`docs/STORAGE.md`, "Pool records").
const POOL_RECORD_VERSION: u32 = 1;
/// The largest record or placement read.
const MAX_RECORD: usize = 1 << 20;

/// What the user wants of a pool job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    /// Run it: a host takes it over when its host dies.
    Running,
    /// Stopped or cancelled by a user: nobody takes it over.
    Stopped,
}

/// `service/jobs/<job>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolRecord {
    version: u32,
    tenant: String,
    job: String,
    plugins: BTreeMap<String, String>,
    desired: Desired,
}

/// `service/placement/<job>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Placement {
    version: u32,
    host: String,
    url: String,
    since_ms: u64,
}

/// A pool job as the store tells it, for a host that does not run it.
#[derive(Clone, Debug)]
pub struct RemoteJob {
    /// Owning tenant.
    pub tenant: String,
    /// Job name.
    pub name: String,
    /// What the user wants of it.
    pub desired: Desired,
    /// Whether some host holds its lease now: it exists, and this host's
    /// scans have not seen it unchanged for a whole ttl (a dead holder's).
    pub leased: bool,
    /// The host that last started it and its API URL, if known.
    pub host: Option<(String, String)>,
    /// When that host started it, unix ms (0 if unknown).
    pub since_ms: u64,
    /// Its latest snapshot.
    pub latest: Option<SnapshotId>,
    /// Its job file, parsed (`None` if the record's does not parse).
    pub spec: Option<JobSpec>,
    /// The blake3 of each operator's component, in chain order.
    pub components: Vec<String>,
}

/// This host's part in the pool.
pub(super) struct Pool {
    /// `<hostname>-<pid>-<nonce>`: how placements name this host.
    host_id: String,
    url: Mutex<Option<String>>,
    scan: Duration,
    /// Jobs this host is taking over right now.
    taking: Mutex<HashSet<(String, String)>>,
    /// Each pool job's lease as the scans saw it: its ETag ("" for none)
    /// and since when this host has seen that ETag.
    seen: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl Pool {
    pub(super) fn new(scan: Duration) -> Pool {
        Pool {
            host_id: crate::store::holder_name(),
            url: Mutex::new(None),
            scan,
            taking: Mutex::new(HashSet::new()),
            seen: Mutex::new(HashMap::new()),
        }
    }
}

fn job_rel(name: &str) -> String {
    format!("jobs/{name}.json")
}

fn placement_rel(name: &str) -> String {
    format!("placement/{name}.json")
}

fn component_rel(hash: &str) -> String {
    format!("components/{hash}.wasm")
}

fn is_hash(hash: &str) -> bool {
    hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn internal(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Internal(e.to_string())
}

/// Parse a small JSON object read from the store, naming it on failure.
fn parse<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, ServiceError> {
    if bytes.len() > MAX_RECORD {
        return Err(internal(format!(
            "{what}: {} bytes, over the limit of {MAX_RECORD}",
            bytes.len()
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| internal(format!("{what}: {e}")))
}

impl Service {
    fn pool(&self) -> Option<&Pool> {
        self.inner.pool.as_ref()
    }

    /// Whether this service is a host of a pool (its store is on object
    /// storage).
    pub fn in_pool(&self) -> bool {
        self.pool().is_some()
    }

    /// This host's id and API URL in the pool, once [`Service::start_pool`]
    /// ran.
    pub fn pool_host(&self) -> Option<(String, String)> {
        let pool = self.pool()?;
        let url = pool.url.lock().unwrap().clone()?;
        Some((pool.host_id.clone(), url))
    }

    /// Join the pool: advertise `url` as this host's API and start looking
    /// for jobs to take over every `pool_scan`. Does nothing on a local
    /// store. Call it once the API listens.
    pub fn start_pool(&self, url: &str) {
        let Some(pool) = self.pool() else { return };
        *pool.url.lock().unwrap() = Some(url.to_string());
        let service = self.clone();
        let spawned = std::thread::Builder::new()
            .name("memento-pool".into())
            .spawn(move || {
                while !service.inner.shutting_down.load(Ordering::SeqCst) {
                    service.scan();
                    std::thread::sleep(service.pool().map_or(Duration::from_secs(1), |p| p.scan));
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the pool's scan: {e}");
        }
        tracing::info!(host = %pool.host_id, url, "joined the pool");
    }

    /// Store a component in the tenant's namespace (put-if-absent: one
    /// already there has the same bytes, its key being their hash).
    pub(super) fn pool_put_component(&self, store: &TenantStore, bytes: &[u8]) -> Result<(), ServiceError> {
        if bytes.len() as u64 > crate::store::MAX_SERVICE_OBJECT {
            return Err(ServiceError::bad(
                "invalid_plugin",
                format!(
                    "a component of {} bytes is over the pool's limit of {} bytes",
                    bytes.len(),
                    crate::store::MAX_SERVICE_OBJECT
                ),
            ));
        }
        let hash = blake3::hash(bytes).to_hex().to_string();
        store
            .write_service_object(&component_rel(&hash), bytes, false)
            .map(|_| ())
            .map_err(|e| internal(format!("store component {hash}: {e}")))
    }

    /// A component from the tenant's namespace, checked against its hash.
    pub(super) fn pool_get_component(&self, tenant: &str, hash: &str) -> Result<Vec<u8>, ServiceError> {
        if !is_hash(hash) {
            return Err(internal(format!(
                "component {:?}: not a blake3 hash",
                crate::spec::excerpt(hash, 80)
            )));
        }
        let store = &self.tenant(tenant)?.store;
        let bytes = store
            .read_service_object(&component_rel(hash))
            .map_err(|e| internal(format!("component {hash}: {e}")))?
            .ok_or_else(|| internal(format!("component {hash}: not in the store")))?;
        if blake3::hash(&bytes).to_hex().as_str() != hash {
            return Err(internal(format!(
                "component {hash}: damaged (its bytes do not hash to its name)"
            )));
        }
        Ok(bytes)
    }

    fn read_pool_record(&self, tenant: &str, name: &str) -> Result<Option<PoolRecord>, ServiceError> {
        let store = &self.tenant(tenant)?.store;
        let Some(bytes) = store.read_service_object(&job_rel(name)).map_err(internal)? else {
            return Ok(None);
        };
        let what = format!("pool record of job `{name}`");
        let record: PoolRecord = parse(&what, &bytes)?;
        if record.version != POOL_RECORD_VERSION {
            return Err(internal(format!(
                "{what}: version {} (this host reads {POOL_RECORD_VERSION})",
                record.version
            )));
        }
        if record.tenant != tenant {
            return Err(internal(format!("{what}: names tenant {:?}", record.tenant)));
        }
        Ok(Some(record))
    }

    /// The record of a pool job, as [`JobRecord`] (rescaling reads it).
    pub(super) fn pool_job_record(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<JobRecord>, ServiceError> {
        Ok(self.read_pool_record(tenant, name)?.map(|r| JobRecord {
            tenant: r.tenant,
            job: r.job,
            plugins: r.plugins,
        }))
    }

    /// Record a submitted job in the store, `desired: running`, refusing
    /// it when another host runs (or is to run) a job of that name.
    pub(super) fn pool_write_record(&self, record: &JobRecord, name: &str) -> Result<(), ServiceError> {
        let store = &self.tenant(&record.tenant)?.store;
        let job = JobName::new(name).map_err(|e| ServiceError::bad("bad_request", e.to_string()))?;
        let existing = self.read_pool_record(&record.tenant, name).ok().flatten();
        let lease = store.read_lease(&job).map_err(internal)?;
        if lease.is_some() || existing.is_some_and(|r| r.desired == Desired::Running) {
            return Err(self.elsewhere_error(&record.tenant, name));
        }
        self.put_pool_record(store, record, name, Desired::Running)
    }

    fn put_pool_record(
        &self,
        store: &TenantStore,
        record: &JobRecord,
        name: &str,
        desired: Desired,
    ) -> Result<(), ServiceError> {
        let doc = PoolRecord {
            version: POOL_RECORD_VERSION,
            tenant: record.tenant.clone(),
            job: record.job.clone(),
            plugins: record.plugins.clone(),
            desired,
        };
        let bytes = serde_json::to_vec_pretty(&doc).map_err(internal)?;
        if bytes.len() > MAX_RECORD {
            return Err(ServiceError::bad(
                "invalid_job",
                format!("the job file is too large to record ({} bytes)", bytes.len()),
            ));
        }
        store
            .write_service_object(&job_rel(name), &bytes, true)
            .map(|_| ())
            .map_err(|e| internal(format!("write pool record of job `{name}`: {e}")))
    }

    /// Say in the store that this host runs the tenant's job `name`.
    pub(super) fn pool_place(&self, tenant: &str, name: &str) {
        let Some(pool) = self.pool() else { return };
        let Ok(entry) = self.tenant(tenant) else { return };
        let placement = Placement {
            version: POOL_RECORD_VERSION,
            host: pool.host_id.clone(),
            url: pool.url.lock().unwrap().clone().unwrap_or_default(),
            since_ms: crate::store::now_ms(),
        };
        let bytes = serde_json::to_vec(&placement).expect("serializable");
        if let Err(e) = entry
            .store
            .write_service_object(&placement_rel(name), &bytes, true)
        {
            tracing::warn!(tenant, job = name, "cannot write the job's placement: {e}");
        }
    }

    /// A user stops or cancels the job: nobody may take it over from now.
    pub(super) fn pool_set_stopped(&self, tenant: &str, name: &str) -> Result<(), ServiceError> {
        let store = &self.tenant(tenant)?.store;
        let Some(r) = self.read_pool_record(tenant, name)? else {
            return Ok(());
        };
        let record = JobRecord {
            tenant: r.tenant,
            job: r.job,
            plugins: r.plugins,
        };
        self.put_pool_record(store, &record, name, Desired::Stopped)
    }

    /// Cancel a pool job that no host runs (it waits to be taken over,
    /// e.g. because no host can load it, or its host died while stopping
    /// it): it is recorded `stopped` first,
    /// so a takeover that comes meanwhile leaves it alone; then its lease
    /// is taken (waiting up to a ttl, fencing a dead holder) and its record
    /// goes. Blocks on the store.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] without a record; [`ServiceError::Elsewhere`]
    /// when a host runs it after all (it is left as it was); store errors.
    pub fn cancel_unplaced(&self, tenant: &str, name: &str) -> Result<(), ServiceError> {
        let store = &self.tenant(tenant)?.store;
        let job = JobName::new(name).map_err(|e| ServiceError::bad("bad_request", e.to_string()))?;
        let Some(r) = self.read_pool_record(tenant, name)? else {
            return Err(ServiceError::NotFound(format!("no job `{name}`")));
        };
        let record = JobRecord {
            tenant: r.tenant,
            job: r.job,
            plugins: r.plugins,
        };
        self.put_pool_record(store, &record, name, Desired::Stopped)?;
        // Taking the lease fences a holder that only seemed dead: once it
        // is ours, no one else can commit for the job.
        let Some(lease) = store.lease_series(&job).map_err(internal)? else {
            self.put_pool_record(store, &record, name, r.desired)?;
            return Err(self.elsewhere_error(tenant, name));
        };
        for rel in [job_rel(name), placement_rel(name)] {
            store.delete_service_object(&rel).map_err(internal)?;
        }
        drop(lease);
        tracing::info!(tenant, job = name, "cancelled a pool job no host ran");
        Ok(())
    }

    /// A pool job's run on this host returned. Its record goes when the
    /// job ended here for good; it stays when the run never got the lease
    /// (`busy`) or another host holds the lease now (it lost it).
    pub(super) fn pool_job_ended(&self, tenant: &str, name: &str, busy: bool) {
        if busy {
            return;
        }
        let Ok(entry) = self.tenant(tenant) else { return };
        let Ok(job) = JobName::new(name) else { return };
        match entry.store.read_lease(&job) {
            Ok(None) => {}
            Ok(Some(_)) => {
                tracing::info!(
                    tenant,
                    job = name,
                    "another host holds the job now: its record stays"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(
                    tenant,
                    job = name,
                    "cannot read the job's lease, its record stays: {e}"
                );
                return;
            }
        }
        for rel in [job_rel(name), placement_rel(name)] {
            if let Err(e) = entry.store.delete_service_object(&rel) {
                tracing::warn!(tenant, job = name, "cannot remove {rel}: {e}");
            }
        }
    }

    fn placement(&self, store: &TenantStore, name: &str) -> Option<Placement> {
        let bytes = store.read_service_object(&placement_rel(name)).ok()??;
        parse::<Placement>("placement", &bytes).ok()
    }

    fn elsewhere_error(&self, tenant: &str, name: &str) -> ServiceError {
        let placed = self
            .tenant(tenant)
            .ok()
            .and_then(|e| self.placement(&e.store, name));
        match placed {
            Some(p) => ServiceError::Elsewhere {
                job: name.to_string(),
                host: p.host,
                url: p.url,
            },
            None => ServiceError::Conflict(format!(
                "job `{name}` is running on another host of the pool (cancel or stop it first)"
            )),
        }
    }

    /// The tenant's pool job `name` when this host does not run it: what
    /// the store says of it. `None` on a local store, when this host runs
    /// it, or when it has no record.
    ///
    /// # Errors
    /// Store I/O errors.
    pub fn elsewhere(&self, tenant: &str, name: &str) -> Result<Option<RemoteJob>, ServiceError> {
        if self.pool().is_none() {
            return Ok(None);
        }
        if self.job(tenant, name).is_ok_and(|j| !j.has_ended()) {
            return Ok(None);
        }
        let Some(record) = self.read_pool_record(tenant, name)? else {
            return Ok(None);
        };
        let entry = self.tenant(tenant)?;
        let job = JobName::new(name).map_err(|e| ServiceError::bad("bad_request", e.to_string()))?;
        let lease = entry.store.read_lease(&job).map_err(internal)?;
        let leased = lease.is_some_and(|l| !self.seen_stale(tenant, name, &l.tag));
        let placement = self.placement(&entry.store, name);
        let latest = entry
            .store
            .latest(&job)
            .map_err(ServiceError::from_store)?
            .map(|m| m.id);
        let spec = JobSpec::from_toml(
            &record.job,
            std::path::Path::new("<submitted>"),
            std::path::Path::new("."),
        )
        .ok();
        let components = spec
            .iter()
            .flat_map(|s| &s.operators)
            .map(|op| {
                record
                    .plugins
                    .get(&*op.plugin.to_string_lossy())
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        Ok(Some(RemoteJob {
            tenant: tenant.to_string(),
            name: name.to_string(),
            desired: record.desired,
            leased,
            since_ms: placement.as_ref().map_or(0, |p| p.since_ms),
            host: placement.map(|p| (p.host, p.url)),
            latest,
            spec,
            components,
        }))
    }

    /// The pool jobs in `scope` that this host does not run, as the store
    /// tells them ([`Service::elsewhere`] of each record): empty on a
    /// local store. A record that cannot be read is left out, with a
    /// warning, rather than failing the whole list.
    ///
    /// # Errors
    /// When a tenant's records cannot be listed.
    pub fn elsewhere_all(&self, scope: &super::Scope) -> Result<Vec<RemoteJob>, ServiceError> {
        if self.pool().is_none() {
            return Ok(Vec::new());
        }
        let mut jobs = Vec::new();
        for entry in self.tenants_in(scope) {
            let tenant = entry.config.name.as_str();
            let files = entry.store.list_service_objects("jobs").map_err(internal)?;
            for name in files.iter().filter_map(|f| f.strip_suffix(".json")) {
                match self.elsewhere(tenant, name) {
                    Ok(Some(job)) => jobs.push(job),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(tenant, job = name, "listing pool jobs: {e}"),
                }
            }
        }
        Ok(jobs)
    }

    /// Whether this host's scans have seen the job's lease at `tag` for a
    /// whole ttl: its holder is dead (or cut off), and a takeover is due.
    fn seen_stale(&self, tenant: &str, name: &str, tag: &str) -> bool {
        let (Some(pool), Ok(entry)) = (self.pool(), self.tenant(tenant)) else {
            return false;
        };
        let Some(ttl) = entry.store.job_lease_ttl() else {
            return false;
        };
        pool.seen
            .lock()
            .unwrap()
            .get(&(tenant.to_string(), name.to_string()))
            .is_some_and(|(t, since)| t == tag && since.elapsed() >= ttl)
    }

    /// The tenant's job `name` if it runs here; [`ServiceError::Elsewhere`]
    /// naming the host when another host of the pool runs it. Blocks on
    /// the store in a pool.
    ///
    /// # Errors
    /// As [`Service::job`], and [`ServiceError::Elsewhere`].
    pub fn job_here(&self, tenant: &str, name: &str) -> Result<Arc<ServiceJob>, ServiceError> {
        match self.job(tenant, name) {
            Ok(j) if !j.has_ended() => return Ok(j),
            Err(e @ ServiceError::BadRequest { .. }) => return Err(e),
            _ => {}
        }
        match self.elsewhere(tenant, name)? {
            Some(r) if r.leased && r.desired == Desired::Running => Err(self.elsewhere_error(tenant, name)),
            _ => self.job(tenant, name),
        }
    }

    /// One look at every tenant's pool jobs: a job recorded as running
    /// that this host does not run, whose lease was absent or unchanged
    /// since the previous look, is worth trying to take over.
    fn scan(&self) {
        let Some(pool) = self.pool() else { return };
        let mut now_seen = HashMap::new();
        let mut candidates = Vec::new();
        for (tenant, entry) in &self.inner.tenants {
            let names = match entry.store.list_service_objects("jobs") {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(tenant, "pool scan: cannot list job records: {e}");
                    continue;
                }
            };
            for file in names {
                let Some(name) = file.strip_suffix(".json") else {
                    continue;
                };
                let Ok(job) = JobName::new(name) else { continue };
                let key = (tenant.clone(), name.to_string());
                if self.job(tenant, name).is_ok_and(|j| !j.has_ended())
                    || pool.taking.lock().unwrap().contains(&key)
                {
                    continue;
                }
                let lease = match entry.store.read_lease(&job) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(tenant, job = name, "pool scan: {e}");
                        continue;
                    }
                };
                let tag = lease.map(|LeaseView { tag, .. }| tag).unwrap_or_default();
                let since = match pool.seen.lock().unwrap().get(&key) {
                    Some((t, since)) if *t == tag => {
                        candidates.push((key.clone(), tag.clone()));
                        *since
                    }
                    _ => Instant::now(),
                };
                now_seen.insert(key, (tag, since));
            }
        }
        *pool.seen.lock().unwrap() = now_seen;
        for (key, tag) in candidates {
            if self.inner.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            // Only jobs the user wants running, and only as many as this
            // host may run.
            match self.read_pool_record(&key.0, &key.1) {
                Ok(Some(r)) if r.desired == Desired::Running => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(tenant = %key.0, job = %key.1, "pool scan: {e}");
                    continue;
                }
            }
            if self.check_capacity(&key.0, &key.1).is_err() {
                continue;
            }
            pool.taking.lock().unwrap().insert(key.clone());
            let service = self.clone();
            let spawned = std::thread::Builder::new()
                .name("memento-takeover".into())
                .spawn(move || {
                    service.take_over(&key.0, &key.1, !tag.is_empty());
                    if let Some(p) = service.pool() {
                        p.taking.lock().unwrap().remove(&key);
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start a takeover: {e}");
            }
        }
    }

    /// Try to take the tenant's job `name` over: take its lease (waits up
    /// to the lease's ttl for a live holder to renew), then run it here
    /// from its latest snapshot. `was_leased`: the scan saw a lease, so
    /// only taking over that lease (a dead holder's) counts; a lease that
    /// meanwhile went away was released by its holder, maybe a host
    /// handing it to its own run (see `resume_pool_job`), and finding it
    /// absent is no reason to run the job: the next scans decide.
    fn take_over(&self, tenant: &str, name: &str, was_leased: bool) {
        let Ok(entry) = self.tenant(tenant) else { return };
        let Ok(job) = JobName::new(name) else { return };
        let lease = match entry.store.lease_series(&job) {
            Ok(Some(l)) => l,
            Ok(None) => return, // its holder is alive
            Err(e) => {
                tracing::warn!(tenant, job = name, "takeover: cannot take the lease: {e}");
                return;
            }
        };
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        if was_leased {
            match entry.store.read_lease(&job) {
                // Generation 1: created where there was none, not taken over.
                Ok(Some(l)) if l.generation > 1 => {}
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(tenant, job = name, "takeover: {e}");
                    return;
                }
            }
        }
        // Read again under the lease: a stop that came meanwhile wins.
        let record = match self.read_pool_record(tenant, name) {
            Ok(Some(r)) if r.desired == Desired::Running => r,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(tenant, job = name, "takeover: {e}");
                return;
            }
        };
        match self.resume_pool_job(tenant, record, lease) {
            Ok(j) => tracing::info!(
                tenant,
                job = name,
                from = ?j.status().restored_from,
                "took the job over from a host of the pool"
            ),
            Err(e) => tracing::error!(tenant, job = name, "takeover: cannot run the job: {e}"),
        }
    }

    /// Run a pool job recorded in the store on this host, from its latest
    /// snapshot (from scratch when it has none); `lease` is handed over to
    /// the run.
    fn resume_pool_job(
        &self,
        tenant: &str,
        record: PoolRecord,
        lease: SeriesLease,
    ) -> Result<Arc<ServiceJob>, ServiceError> {
        let mut plugins = BTreeMap::new();
        for (upload, hash) in &record.plugins {
            plugins.insert(upload.clone(), self.pool_get_component(tenant, hash)?);
        }
        let submission = Submission {
            job: record.job,
            plugins,
            from: Some("latest".into()),
        };
        let handoff = Arc::new(Mutex::new(Some(lease)));
        match self.submit_with(tenant, submission.clone(), Some(handoff.clone())) {
            Err(ServiceError::NotFound(m)) if m.starts_with("no snapshot") => self.submit_with(
                tenant,
                Submission {
                    from: None,
                    ..submission
                },
                Some(handoff),
            ),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_placements_round_trip_and_refuse_unknown_fields() {
        let r = PoolRecord {
            version: 1,
            tenant: "acme".into(),
            job: "name = \"j\"\n".into(),
            plugins: BTreeMap::from([("w.wasm".into(), "ab".repeat(32))]),
            desired: Desired::Stopped,
        };
        let bytes = serde_json::to_vec(&r).unwrap();
        let back: PoolRecord = parse("r", &bytes).unwrap();
        assert_eq!(back.desired, Desired::Stopped);
        assert!(
            String::from_utf8(bytes)
                .unwrap()
                .contains("\"desired\":\"stopped\"")
        );
        let e = parse::<PoolRecord>(
            "r",
            br#"{"version":1,"tenant":"a","job":"","plugins":{},"desired":"running","x":1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field"), "{e}");
        let e = parse::<Placement>("placement", &vec![b' '; MAX_RECORD + 1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("over the limit"), "{e}");
        assert!(is_hash(&"ab".repeat(32)));
        assert!(!is_hash("../x") && !is_hash(&"AB".repeat(32)));
    }
}
