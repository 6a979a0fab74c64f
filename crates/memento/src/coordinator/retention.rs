//! What stays in the store: completed checkpoints subsume older ones
//! (`retained`), savepoints expire by count and age (the newest stays),
//! and the blobs of deleted snapshots are collected.

use std::time::Duration;

use super::Coordinator;
use crate::spec::JobSpec;
use crate::store::{
    JobName, ListFilter, Manifest, Retention, SnapshotId, SnapshotKind, StoreError, TenantStore, now_ms,
};

/// Least time between two garbage collections of a running job.
const GC_INTERVAL: Duration = Duration::from_secs(10);

/// The retention settings recorded with a snapshot of `kind`.
pub(super) fn settings(spec: &JobSpec, kind: SnapshotKind) -> Retention {
    match kind {
        SnapshotKind::Checkpoint => Retention {
            retained: Some(spec.checkpoints.retained),
            persistent: spec.checkpoints.persistent,
            ..Default::default()
        },
        SnapshotKind::Savepoint => Retention {
            max_count: spec.savepoints.max_count,
            max_age_ms: spec.savepoints.max_age.map(|a| a.0.as_millis() as u64),
            ..Default::default()
        },
    }
}

/// The snapshots of `kind` of `job` that retention removes at `now_ms`,
/// oldest first: checkpoints beyond the newest `retained`; savepoints
/// beyond `max_count` or older than `max_age`. The newest of a kind always
/// stays, and one kind never expires the other.
///
/// # Errors
/// Store errors listing the job.
pub(super) fn expired(
    store: &TenantStore,
    job: &JobName,
    spec: &JobSpec,
    kind: SnapshotKind,
    now_ms: u64,
) -> Result<Vec<SnapshotId>, StoreError> {
    match kind {
        SnapshotKind::Checkpoint => {
            store.expired(job, kind, Some(spec.checkpoints.retained as usize), None, now_ms)
        }
        SnapshotKind::Savepoint => store.expired(
            job,
            kind,
            spec.savepoints.max_count.map(|n| n as usize),
            spec.savepoints.max_age.map(|a| a.0),
            now_ms,
        ),
    }
}

impl Coordinator<'_> {
    /// Subsume old checkpoints / expire savepoints, then collect garbage.
    pub(super) fn apply_retention(&mut self, kind: SnapshotKind) {
        match expired(&self.store, &self.job, self.spec, kind, now_ms()) {
            Ok(ids) if !ids.is_empty() => {
                for id in &ids {
                    if let Err(e) = self.store.delete(id) {
                        tracing::warn!(target: "memento::snapshot", id = %id, "cannot delete expired snapshot: {e}");
                    }
                }
                self.collect_garbage();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(target: "memento::snapshot", job = %self.job, "retention skipped: {e}"),
        }
    }

    /// Delete the job's checkpoints for which `delete` says so (a cancelled
    /// or finished job that keeps no checkpoints).
    pub(super) fn delete_checkpoints(&mut self, delete: impl Fn(&Manifest) -> bool) {
        let list = self
            .store
            .list(&ListFilter::job(&self.job).kind(SnapshotKind::Checkpoint));
        if let Ok(list) = list {
            for m in list.iter().filter(|m| delete(m)) {
                let _ = self.store.delete(&m.id);
            }
            self.collect_garbage();
        }
    }

    /// Collect the blobs of deleted snapshots. GC marks over the whole
    /// tenant, so while jobs run it happens at most every [`GC_INTERVAL`]
    /// per tenant (garbage waits a little; checkpoints do not), and once
    /// when a job ends.
    pub(super) fn collect_garbage(&mut self) {
        self.gc_pending = true;
        match self.store.gc_if_due(GC_INTERVAL) {
            Ok(Some(r)) => {
                self.gc_pending = false;
                tracing::debug!(target: "memento::snapshot", "gc: {r:?}");
            }
            Ok(None) => {}
            Err(e) => {
                self.gc_pending = false;
                tracing::warn!(target: "memento::snapshot", "gc failed: {e}");
            }
        }
    }

    /// The final collection when a job ends (not throttled).
    pub(super) fn run_gc(&mut self) {
        self.gc_pending = false;
        match self.store.gc() {
            Ok(r) => tracing::debug!(target: "memento::snapshot", "gc: {r:?}"),
            Err(e) => tracing::warn!(target: "memento::snapshot", "gc failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::tests::store;
    use crate::store::{StateFormat, Trigger};

    fn spec(sections: &str) -> JobSpec {
        let toml = format!(
            "name = \"j\"\n[source]\ntype = \"generator\"\n[[operators]]\nname = \"count\"\n\
             plugin = \"count.wasm\"\n[sink]\ntype = \"null\"\n{sections}"
        );
        JobSpec::from_toml(&toml, "job.toml".as_ref(), ".".as_ref()).unwrap()
    }

    /// Snapshots of `kinds`, oldest first, created a minute apart ending at
    /// `NOW`.
    fn snapshots(store: &TenantStore, kinds: &[SnapshotKind]) -> Vec<SnapshotId> {
        let job = JobName::new("j").unwrap();
        kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let n = store.next_snapshot_number(&job).unwrap();
                let w = store.begin(&job, n).unwrap();
                let mut m = w.manifest(kind, Trigger::Periodic, StateFormat::Canonical);
                m.created_at_ms = NOW - 60_000 * (kinds.len() - 1 - i) as u64;
                w.commit(m).unwrap()
            })
            .collect()
    }

    const NOW: u64 = 1_000_000_000;

    use SnapshotKind::{Checkpoint as C, Savepoint as S};

    #[test]
    fn newer_checkpoints_subsume_older_ones_and_leave_savepoints() {
        let (_dir, store) = store();
        let job = JobName::new("j").unwrap();
        let ids = snapshots(&store, &[C, S, C, C, S, C]);
        let two = spec("[checkpoints]\nretained = 2\n");
        assert_eq!(
            expired(&store, &job, &two, C, NOW).unwrap(),
            [ids[0].clone(), ids[2].clone()]
        );
        assert_eq!(
            expired(&store, &job, &two, S, NOW).unwrap(),
            Vec::<SnapshotId>::new(),
            "savepoints have no count or age limit here"
        );
        let one = spec("");
        assert_eq!(
            expired(&store, &job, &one, C, NOW).unwrap(),
            [ids[0].clone(), ids[2].clone(), ids[3].clone()],
            "the default keeps the newest checkpoint only"
        );
    }

    #[test]
    fn savepoints_expire_by_count_and_age_but_the_newest_stays() {
        let (_dir, store) = store();
        let job = JobName::new("j").unwrap();
        let ids = snapshots(&store, &[S, S, C, S, S]);
        let by_count = spec("[savepoints]\nmax_count = 2\n");
        assert_eq!(
            expired(&store, &job, &by_count, S, NOW).unwrap(),
            [ids[0].clone(), ids[1].clone()]
        );
        let by_age = spec("[savepoints]\nmax_age = \"150s\"\n");
        assert_eq!(
            expired(&store, &job, &by_age, S, NOW).unwrap(),
            [ids[0].clone(), ids[1].clone()],
            "four and three minutes old"
        );
        let all_old = spec("[savepoints]\nmax_age = \"1s\"\n");
        assert_eq!(
            expired(&store, &job, &all_old, S, NOW + 3_600_000).unwrap(),
            [ids[0].clone(), ids[1].clone(), ids[3].clone()],
            "the newest savepoint stays however old"
        );
    }

    #[test]
    fn recorded_settings_follow_the_kind() {
        let spec = spec(
            "[checkpoints]\nretained = 3\npersistent = false\n[savepoints]\nmax_count = 4\nmax_age = \"2s\"\n",
        );
        let c = settings(&spec, C);
        assert_eq!((c.retained, c.persistent, c.max_count), (Some(3), false, None));
        let s = settings(&spec, S);
        assert_eq!(
            (s.retained, s.max_count, s.max_age_ms),
            (None, Some(4), Some(2000))
        );
    }
}
