//! Which state each task restores when an operator resumes at another
//! parallelism than its snapshot was taken at: its key groups, wherever
//! they were.
//!
//! Canonical state is framed pieces, each of one key group, laid end to
//! end with no header or trailer (`snapshot::framing`), so the state of
//! several snapshotted tasks laid end to end is itself a framed stream.
//! A task at the new parallelism is given the chunks of every snapshotted
//! task whose key groups overlap its own, in task order; while restoring,
//! it skips the pieces of groups it does not own (`snapshot::restore`).
//! Nothing is copied in the store, and each group's pieces arrive in the
//! order they were written, since a group belonged to one task.
//! `compat::check_fits` has already made sure such state is all keyed.

use std::collections::BTreeMap;

use crate::dataflow::partition::owned_groups;
use crate::spec::JobSpec;
use crate::store::{Manifest, TaskKey, TaskState, TaskStateData};

use super::compat::recorded_key_groups;

/// The state to restore into each task of `spec` from snapshot `m`, which
/// `compat::check_fits` accepted: a task's own where the parallelism is
/// unchanged, its key groups gathered from the snapshotted tasks where it
/// changed.
///
/// # Errors
/// A damaged key-group record (as `compat::recorded_key_groups`).
pub(crate) fn restore_states(spec: &JobSpec, m: &Manifest) -> Result<BTreeMap<TaskKey, TaskState>, String> {
    let mut states = BTreeMap::new();
    for op in &spec.operators {
        let mut old: Vec<&TaskState> = m.tasks.iter().filter(|t| t.key.operator == op.name).collect();
        old.sort_by_key(|t| t.key.task_index);
        if old.len() == op.parallelism as usize {
            for t in old {
                states.insert(t.key.clone(), t.clone());
            }
            continue;
        }
        let groups = recorded_key_groups(m, &op.name)?;
        let was = old.len() as u32;
        for index in 0..op.parallelism {
            let mine = owned_groups(index, op.parallelism, groups);
            let (mut len, mut chunks) = (0, Vec::new());
            for (j, t) in old.iter().enumerate() {
                let theirs = owned_groups(j as u32, was, groups);
                if theirs.start >= mine.end || mine.start >= theirs.end {
                    continue;
                }
                if let TaskStateData::Canonical { len: l, chunks: c } = &t.state {
                    len += l;
                    chunks.extend(c.iter().cloned());
                }
            }
            let key = TaskKey::new(op.name.clone(), index);
            states.insert(
                key.clone(),
                TaskState {
                    key,
                    state: TaskStateData::Canonical { len, chunks },
                },
            );
        }
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChunkRef;

    /// Chunk lists are told apart by their lengths here.
    fn task(index: u32, tag: u64) -> TaskState {
        TaskState {
            key: TaskKey::new("count", index),
            state: TaskStateData::Canonical {
                len: tag,
                chunks: vec![ChunkRef::Zero { zero: tag }],
            },
        }
    }

    fn spec(parallelism: u32) -> JobSpec {
        let toml = format!(
            "name = \"j\"\n[source]\ntype = \"generator\"\n[[operators]]\nname = \"count\"\n\
             plugin = \"count.wasm\"\nparallelism = {parallelism}\n[sink]\ntype = \"null\"\n"
        );
        JobSpec::from_toml(&toml, "job.toml".as_ref(), ".".as_ref()).unwrap()
    }

    fn tags(states: &BTreeMap<TaskKey, TaskState>) -> Vec<Vec<u64>> {
        states
            .values()
            .map(|t| match &t.state {
                TaskStateData::Canonical { chunks, len } => {
                    let tags: Vec<u64> = chunks.iter().map(ChunkRef::len).collect();
                    assert_eq!(*len, tags.iter().sum::<u64>());
                    tags
                }
                TaskStateData::Native { .. } => unreachable!(),
            })
            .collect()
    }

    /// Each new task reads the snapshotted tasks whose key groups overlap
    /// its own, in task order; at the same parallelism, its own state.
    #[test]
    fn each_task_gathers_the_tasks_that_held_its_groups() {
        let (_dir, store) = crate::coordinator::tests::store();
        let w = store.begin(&crate::store::JobName::new("j").unwrap(), 1).unwrap();
        let mut m = w.manifest(
            crate::store::SnapshotKind::Savepoint,
            crate::store::Trigger::Manual,
            crate::store::StateFormat::Canonical,
        );
        w.abort();
        m.extra.insert(
            super::super::compat::KEY_GROUPS.into(),
            serde_json::json!({ "count": 128 }),
        );
        m.tasks = vec![task(1, 20), task(0, 10)];
        // 2 → 3: groups 0..43 were task 0's, 43..86 both, 86..128 task 1's.
        assert_eq!(
            tags(&restore_states(&spec(3), &m).unwrap()),
            [vec![10], vec![10, 20], vec![20]]
        );
        // 2 → 1 and 2 → 4.
        assert_eq!(tags(&restore_states(&spec(1), &m).unwrap()), [vec![10, 20]]);
        assert_eq!(
            tags(&restore_states(&spec(4), &m).unwrap()),
            [vec![10], vec![10], vec![20], vec![20]]
        );
        assert_eq!(tags(&restore_states(&spec(2), &m).unwrap()), [vec![10], vec![20]]);
    }
}
