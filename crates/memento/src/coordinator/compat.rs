//! Whether a snapshot can start a job as its job file and components are
//! now, and which older snapshot can when one cannot.

use std::collections::BTreeMap;

use crate::dataflow::JobError;
use crate::snapshot;
use crate::spec::JobSpec;
use crate::store::{JobName, Manifest, SnapshotId, TaskStateData, TenantStore};

/// Key in a manifest's `extra` marking the record of a finished job.
pub(super) const FINISHED: &str = "finished";

/// Key in a manifest's `extra` recording each operator's number of key
/// groups (`{"operator": 128}`); absent in snapshots from before key
/// groups, whose routing is that of key groups = parallelism.
pub(super) const KEY_GROUPS: &str = "key_groups";

/// Key in a manifest's `extra` recording, per operator whose tasks all
/// wrote canonical state, the bytes of it in no key group
/// (`{"operator": 0}`); absent for an operator with a native image and in
/// snapshots from before it was recorded. An operator recorded with 0
/// keeps all its state in key groups, and its snapshot can resume at
/// another parallelism.
pub(super) const UNKEYED_BYTES: &str = "unkeyed_bytes";

/// Why operator `op`'s state in `m` cannot be divided among another number
/// of tasks, or `None` when it can: canonical and framed (the format of
/// this build), with every byte in a key group.
fn why_not_rescalable(m: &Manifest, op: &str) -> Option<String> {
    let native = m
        .tasks
        .iter()
        .any(|t| t.key.operator == op && matches!(t.state, TaskStateData::Native { .. }));
    if native {
        return Some(
            "it is a native image, which cannot be divided by key; take a canonical savepoint \
             (savepoints format = \"canonical\") and rescale from that"
                .into(),
        );
    }
    let recorded = m
        .extra
        .get(UNKEYED_BYTES)
        .and_then(|u| u.get(op))
        .and_then(serde_json::Value::as_u64);
    match recorded {
        _ if m.canonical_framing.is_none() => Some(
            "the snapshot was taken before state was kept in key groups; resume at its parallelism \
             and take a new savepoint first"
                .into(),
        ),
        None => Some(
            "the snapshot does not record whether its state is all keyed (taken by an older memento); \
             resume at its parallelism and take a new savepoint first"
                .into(),
        ),
        Some(0) => None,
        Some(n) => Some(format!(
            "the operator keeps {n} bytes of state that belong to no key group (task-wide state no \
             rescale can divide; an operator keeps its state in memento_guest::KeyedState to rescale)"
        )),
    }
}

/// The key groups snapshot `m` recorded for operator `op`, or, for a
/// snapshot from before key groups, its number of tasks (the routing it
/// was taken with).
///
/// # Errors
/// A recorded value that is not a number of key groups the operator's
/// tasks can hold.
pub(crate) fn recorded_key_groups(m: &Manifest, op: &str) -> Result<u32, String> {
    let tasks = m.tasks.iter().filter(|t| t.key.operator == op).count() as u64;
    let Some(recorded) = m.extra.get(KEY_GROUPS) else {
        return Ok(tasks.max(1) as u32);
    };
    let value = recorded.get(op);
    match value.and_then(serde_json::Value::as_u64) {
        Some(n) if n >= tasks.max(1) && n <= u64::from(crate::spec::MAX_KEY_GROUPS) => Ok(n as u32),
        _ => Err(format!(
            "its record of operator `{op}`'s key groups ({}) is not a number from {} to {}",
            value.map_or_else(
                || "missing".to_string(),
                |v| crate::spec::excerpt(&v.to_string(), 40)
            ),
            tasks.max(1),
            crate::spec::MAX_KEY_GROUPS
        )),
    }
}

/// The key groups each operator runs with when the job starts from `m`
/// (what it recorded) or from scratch (the job file's).
///
/// # Errors
/// As [`recorded_key_groups`].
pub(crate) fn key_groups(spec: &JobSpec, m: Option<&Manifest>) -> Result<BTreeMap<String, u32>, String> {
    spec.operators
        .iter()
        .map(|op| {
            let n = match m {
                Some(m) if !m.extra.contains_key(FINISHED) => recorded_key_groups(m, &op.name)?,
                _ => op.key_groups(),
            };
            Ok((op.name.clone(), n))
        })
        .collect()
}

/// Whether snapshot `m` can start job `job` as `spec` and `components`
/// (operator → blake3 hex of the component it runs) describe it: the same job, the same operators at the same
/// parallelism, and native images taken with the identical component and
/// under the same operator config. Checked before a run touches anything
/// (so that a submission is refused at once, and no output directory is
/// changed for a snapshot that cannot restore) and again by the coordinator
/// before each attempt.
///
/// # Errors
/// [`JobError::Incompatible`] with the reason.
pub(crate) fn check_fits(
    spec: &JobSpec,
    job: &JobName,
    components: &BTreeMap<String, String>,
    m: &Manifest,
) -> Result<(), JobError> {
    let incompatible = |reason: String| JobError::Incompatible {
        id: m.id.clone(),
        reason,
    };
    if m.job != *job {
        return Err(incompatible(format!(
            "it belongs to job `{}`, not `{}`",
            m.job, job
        )));
    }
    if m.extra.contains_key(FINISHED) {
        // The record of a finished run holds no state: it only commits.
        return Ok(());
    }
    for op in &spec.operators {
        let n = m.tasks.iter().filter(|t| t.key.operator == op.name).count();
        if n == 0 {
            return Err(incompatible(format!(
                "it has no state for operator `{}`",
                op.name
            )));
        }
        if n != op.parallelism as usize {
            if let Some(why) = why_not_rescalable(m, &op.name) {
                return Err(incompatible(format!(
                    "operator `{}` has {n} tasks in the snapshot but parallelism {} in the job file, \
                     and its state cannot be divided among another number of tasks: {why} \
                     (or set parallelism = {n})",
                    op.name, op.parallelism
                )));
            }
            let groups = recorded_key_groups(m, &op.name).map_err(incompatible)?;
            if op.parallelism > groups {
                return Err(incompatible(format!(
                    "operator `{}` has {groups} key groups, fewer than parallelism {}: a task would own \
                     no key group (key groups are fixed for a job's life; run at most {groups} tasks)",
                    op.name, op.parallelism
                )));
            }
        }
    }
    if let Some(t) = m
        .tasks
        .iter()
        .find(|t| !spec.operators.iter().any(|o| o.name == t.key.operator))
    {
        return Err(incompatible(format!(
            "it has state for operator `{}`, which the job does not have",
            t.key.operator
        )));
    }
    for op in &spec.operators {
        let groups = recorded_key_groups(m, &op.name).map_err(incompatible)?;
        if let Some(asked) = op.max_parallelism.filter(|&asked| asked != groups) {
            return Err(incompatible(format!(
                "operator `{}` has {groups} key groups in the snapshot but max_parallelism {asked} in the \
                 job file (key groups are fixed for a job's life: remove max_parallelism or set it to {groups})",
                op.name
            )));
        }
    }
    for op in &spec.operators {
        let recorded = m.components.get(&op.name).map(String::as_str);
        let running = components.get(&op.name).map_or("unknown", String::as_str);
        for t in m.tasks.iter().filter(|t| t.key.operator == op.name) {
            snapshot::check_image(t, recorded, running, &op.config)
                .map_err(|e| incompatible(e.to_string()))?;
        }
    }
    Ok(())
}

/// The newest snapshot of `job` older than `id` that can start it as it is
/// now: its manifest reads and its blobs are present, it fits
/// ([`check_fits`]: a native image of another component does not), and it
/// holds state (the record of a finished run only commits its output).
/// `None` if there is none. Where to resume when starting from `id` failed.
pub(crate) fn resume_point_before(
    store: &TenantStore,
    spec: &JobSpec,
    job: &JobName,
    components: &BTreeMap<String, String>,
    id: &SnapshotId,
) -> Option<SnapshotId> {
    let mut at = id.clone();
    while let Ok(Some(older)) = store.next_intact_before(&at) {
        if let Ok(m) = store.get(&older)
            && !m.extra.contains_key(FINISHED)
            && check_fits(spec, job, components, &m).is_ok()
        {
            return Some(older);
        }
        at = older;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::tests::store;
    use crate::snapshot::NATIVE_IMAGE_VERSION;
    use crate::store::{SnapshotKind, StateFormat, TaskKey, TaskState, Trigger};

    const V1: &str = "1111";
    const V2: &str = "2222";

    fn spec(parallelism: u32) -> JobSpec {
        let toml = format!(
            "name = \"j\"\n[source]\ntype = \"generator\"\n[[operators]]\nname = \"count\"\n\
             plugin = \"count.wasm\"\nparallelism = {parallelism}\n[sink]\ntype = \"null\"\n"
        );
        JobSpec::from_toml(&toml, "job.toml".as_ref(), ".".as_ref()).unwrap()
    }

    fn running(hash: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("count".to_string(), hash.to_string())])
    }

    fn native() -> TaskStateData {
        TaskStateData::Native {
            memories: Vec::new(),
            extra: serde_json::json!({ "image_version": NATIVE_IMAGE_VERSION }),
        }
    }

    fn canonical() -> TaskStateData {
        TaskStateData::Canonical {
            len: 0,
            chunks: Vec::new(),
        }
    }

    /// Commit a snapshot of job `j` whose one task has `state`, taken with
    /// component `hash`.
    fn commit(store: &TenantStore, state: TaskStateData, hash: &str, finished: bool) -> SnapshotId {
        let job = JobName::new("j").unwrap();
        let n = store.next_snapshot_number(&job).unwrap();
        let w = store.begin(&job, n).unwrap();
        let format = StateFormat::of_tasks([&state]);
        let mut m = w.manifest(SnapshotKind::Checkpoint, Trigger::Periodic, format);
        m.components = running(hash);
        if finished {
            m.extra.insert(FINISHED.into(), true.into());
        } else {
            m.tasks.push(TaskState {
                key: TaskKey::new("count", 0),
                state,
            });
        }
        w.commit(m).unwrap()
    }

    #[test]
    fn a_native_image_fits_only_the_identical_component() {
        let (_dir, store) = store();
        let job = JobName::new("j").unwrap();
        let id = commit(&store, native(), V1, false);
        let m = store.get(&id).unwrap();
        check_fits(&spec(1), &job, &running(V1), &m).unwrap();
        let err = check_fits(&spec(1), &job, &running(V2), &m)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "cannot start from snapshot {id}: it holds a native image of operator `count` taken with \
                 component {V1}, but the job now runs component {V2}"
            )),
            "{err}"
        );
        // Canonical state fits any component: the plugin reads it.
        let id = commit(&store, canonical(), V1, false);
        check_fits(&spec(1), &job, &running(V2), &store.get(&id).unwrap()).unwrap();
    }

    /// A snapshot without a key-group record was routed with key groups =
    /// parallelism: it fits a job file that names that, or none, and no
    /// other; a recorded count must match an explicit one; a damaged
    /// record is refused, quoting at most an excerpt.
    #[test]
    fn key_groups_are_fixed_for_a_jobs_life() {
        let (_dir, store) = store();
        let job = JobName::new("j").unwrap();
        let with_max = |max: u32| {
            let mut s = spec(1);
            s.operators[0].max_parallelism = Some(max);
            s
        };
        let legacy = store.get(&commit(&store, canonical(), V1, false)).unwrap();
        assert_eq!(recorded_key_groups(&legacy, "count"), Ok(1));
        assert_eq!(key_groups(&spec(1), Some(&legacy)).unwrap()["count"], 1);
        assert_eq!(key_groups(&spec(1), None).unwrap()["count"], 128);
        check_fits(&spec(1), &job, &running(V1), &legacy).unwrap();
        check_fits(&with_max(1), &job, &running(V1), &legacy).unwrap();
        let err = check_fits(&with_max(128), &job, &running(V1), &legacy)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(
                "operator `count` has 1 key groups in the snapshot but max_parallelism 128 in the job file \
                 (key groups are fixed for a job's life: remove max_parallelism or set it to 1)"
            ),
            "{err}"
        );

        let mut recorded = legacy.clone();
        recorded
            .extra
            .insert(KEY_GROUPS.into(), serde_json::json!({ "count": 256 }));
        assert_eq!(key_groups(&spec(1), Some(&recorded)).unwrap()["count"], 256);
        check_fits(&with_max(256), &job, &running(V1), &recorded).unwrap();
        assert!(check_fits(&with_max(128), &job, &running(V1), &recorded).is_err());

        recorded
            .extra
            .insert(KEY_GROUPS.into(), serde_json::json!({ "count": "x".repeat(500) }));
        let err = check_fits(&spec(1), &job, &running(V1), &recorded)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("its record of operator `count`'s key groups ("),
            "{err}"
        );
        assert!(err.contains("is not a number from 1 to 32768"), "{err}");
        assert!(err.len() < 300, "quotes an excerpt only: {err}");
    }

    /// State all in key groups fits any parallelism up to its key groups;
    /// task-wide state, native images and snapshots that do not say are
    /// refused, each saying why and what to do instead.
    #[test]
    fn only_keyed_canonical_state_changes_parallelism() {
        let (_dir, store) = store();
        let job = JobName::new("j").unwrap();
        let mut m = store.get(&commit(&store, canonical(), V1, false)).unwrap();
        m.canonical_framing = Some(crate::snapshot::FRAMING_VERSION);
        m.extra
            .insert(KEY_GROUPS.into(), serde_json::json!({ "count": 128 }));
        m.extra
            .insert(UNKEYED_BYTES.into(), serde_json::json!({ "count": 0 }));
        for p in [1, 2, 3, 128] {
            check_fits(&spec(p), &job, &running(V1), &m).unwrap();
        }
        let err = |m: &Manifest, p: u32| {
            check_fits(&spec(p), &job, &running(V1), m)
                .unwrap_err()
                .to_string()
        };
        let e = err(&m, 200);
        assert!(
            e.contains("has 128 key groups, fewer than parallelism 200"),
            "{e}"
        );

        let mut task_wide = m.clone();
        task_wide
            .extra
            .insert(UNKEYED_BYTES.into(), serde_json::json!({ "count": 5 }));
        check_fits(&spec(1), &job, &running(V1), &task_wide).unwrap();
        let e = err(&task_wide, 3);
        assert!(
            e.contains("operator `count` has 1 tasks in the snapshot but parallelism 3 in the job file"),
            "{e}"
        );
        assert!(e.contains("5 bytes of state that belong to no key group"), "{e}");
        assert!(e.ends_with("(or set parallelism = 1)"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");

        let mut unrecorded = m.clone();
        unrecorded.extra.remove(UNKEYED_BYTES);
        assert!(err(&unrecorded, 2).contains("does not record whether its state is all keyed"));
        let mut unframed = m.clone();
        unframed.canonical_framing = None;
        assert!(err(&unframed, 2).contains("taken before state was kept in key groups"));
        let mut image = m.clone();
        image.tasks[0].state = native();
        assert!(err(&image, 2).contains("it is a native image, which cannot be divided by key"));
    }

    #[test]
    fn the_resume_point_skips_what_cannot_start_the_job() {
        let (_dir, store) = store();
        let job = JobName::new("j").unwrap();
        let canonical_v1 = commit(&store, canonical(), V1, false);
        let _native_v1 = commit(&store, native(), V1, false);
        let _finished = commit(&store, canonical(), V1, true);
        let native_v2 = commit(&store, native(), V2, false);
        let failed = commit(&store, native(), V1, false);
        // Running v2: the newest older snapshot that restores into it is
        // the native image of v2.
        assert_eq!(
            resume_point_before(&store, &spec(1), &job, &running(V2), &failed),
            Some(native_v2.clone())
        );
        // Running v3: no native image fits; the finished record holds no
        // state; the canonical snapshot does.
        assert_eq!(
            resume_point_before(&store, &spec(1), &job, &running("3333"), &failed),
            Some(canonical_v1.clone())
        );
        // Nothing older than the oldest, and nothing at another parallelism.
        assert_eq!(
            resume_point_before(&store, &spec(1), &job, &running(V1), &canonical_v1),
            None
        );
        assert_eq!(
            resume_point_before(&store, &spec(2), &job, &running(V1), &failed),
            None
        );
    }
}
