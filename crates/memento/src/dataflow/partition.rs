//! Routing events between stages through key groups.
//!
//! A key belongs to key group `key_hash(key) % key_groups`, and key group
//! `g` to task `g * parallelism / key_groups` (Flink's assignment: each
//! task owns one contiguous range of groups). The number of key groups is
//! fixed for a job's life (`max_parallelism`, recorded in every manifest),
//! so a key's group never changes; only which task owns a group could.
//!
//! Both functions are part of memento's behaviour, not implementation
//! details: which task owns a key must not change between runs or versions,
//! or a restored task would receive keys whose state another task holds.
//! With `key_groups == parallelism` the assignment is `key_hash % parallelism`,
//! exactly the routing of snapshots taken before key groups existed, which
//! is why such snapshots restore with `key_groups = parallelism`.

use crate::runtime::Event;

/// FNV-1a over the key, then a 64-bit finalizer to spread short keys.
/// Stable across platforms and versions.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// The key group of `key` among `key_groups` (at least 1).
pub fn key_group(key: &[u8], key_groups: u32) -> u32 {
    (key_hash(key) % u64::from(key_groups.max(1))) as u32
}

/// The task (of `parallelism`) that owns key group `group` of `key_groups`.
pub fn task_for_group(group: u32, parallelism: usize, key_groups: u32) -> usize {
    (u64::from(group) * parallelism as u64 / u64::from(key_groups.max(1))) as usize
}

/// The key groups task `task` (of `parallelism`) owns: those `g` with
/// `task_for_group(g) == task`, a contiguous range.
pub fn owned_groups(task: u32, parallelism: u32, key_groups: u32) -> std::ops::Range<u32> {
    // The smallest g with g * P / K >= t is ceil(t * K / P).
    let first =
        |t: u32| (u64::from(t) * u64::from(key_groups)).div_ceil(u64::from(parallelism.max(1))) as u32;
    first(task)..first(task + 1).min(key_groups)
}

/// The task (of `parallelism`) that owns `key` when the job has
/// `key_groups` key groups.
pub fn task_for_key(key: &[u8], parallelism: usize, key_groups: u32) -> usize {
    if parallelism <= 1 {
        0
    } else {
        task_for_group(key_group(key, key_groups), parallelism, key_groups)
    }
}

/// Split a batch into one batch per task, keeping the order of events
/// within each.
pub fn partition(events: Vec<Event>, parallelism: usize, key_groups: u32) -> Vec<Vec<Event>> {
    if parallelism <= 1 {
        return vec![events];
    }
    // Room for an even share and some: growing each part by doubling cost
    // the routing thread a reallocation and copy every few events.
    let share = events.len() / parallelism + events.len() / (4 * parallelism) + 1;
    let mut parts: Vec<Vec<Event>> = (0..parallelism).map(|_| Vec::with_capacity(share)).collect();
    for e in events {
        let t = task_for_key(&e.key, parallelism, key_groups);
        parts[t].push(e);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable() {
        // Pinned values: changing them breaks restoring existing snapshots.
        let pinned: Vec<usize> = [&b"a"[..], b"b", b"key-1", b"hello world"]
            .iter()
            .map(|k| task_for_key(k, 7, 7))
            .collect();
        assert_eq!(pinned, PINNED);
    }

    const PINNED: [usize; 4] = [0, 2, 4, 2];

    #[test]
    fn key_groups_as_many_as_tasks_route_as_before_key_groups() {
        // The routing of snapshots taken before key groups: hash % P.
        for p in 1..=9usize {
            for i in 0..500 {
                let key = format!("key-{i}");
                let legacy = if p == 1 {
                    0
                } else {
                    (key_hash(key.as_bytes()) % p as u64) as usize
                };
                assert_eq!(task_for_key(key.as_bytes(), p, p as u32), legacy, "{key} at {p}");
            }
        }
    }

    #[test]
    fn key_groups_are_pinned() {
        // Pinned values: a key's group must never change (rescaling moves
        // groups between tasks, never keys between groups).
        let groups: Vec<u32> = [&b"a"[..], b"b", b"key-1", b"hello world"]
            .iter()
            .map(|k| key_group(k, 128))
            .collect();
        assert_eq!(groups, PINNED_GROUPS);
    }

    const PINNED_GROUPS: [u32; 4] = [77, 28, 115, 55];

    #[test]
    fn owned_ranges_are_pinned() {
        // Pinned: a rescale restores each task from the snapshotted tasks
        // whose ranges overlap its own, as a snapshot recorded them.
        let ranges = |p: u32, k: u32| (0..p).map(|t| owned_groups(t, p, k)).collect::<Vec<_>>();
        assert_eq!(ranges(3, 128), [0..43, 43..86, 86..128]);
        assert_eq!(ranges(4, 128), [0..32, 32..64, 64..96, 96..128]);
        assert_eq!(ranges(2, 7), [0..4, 4..7]);
        assert_eq!(ranges(3, 7), [0..3, 3..5, 5..7]);
    }

    #[test]
    fn the_guest_sdk_computes_the_same_key_groups() {
        // Operators put state in the group the host routes the key to.
        for k in [1, 7, 128, 1000, 32_768] {
            for i in 0..2000 {
                let key = format!("k{i}");
                assert_eq!(
                    memento_guest::key_group(key.as_bytes(), k),
                    key_group(key.as_bytes(), k)
                );
            }
        }
    }

    #[test]
    fn each_task_owns_a_contiguous_range_and_together_all_groups() {
        for (p, k) in [
            (1, 1),
            (1, 128),
            (2, 128),
            (3, 128),
            (7, 128),
            (5, 7),
            (128, 128),
            (100, 32768),
        ] {
            let mut next = 0;
            for t in 0..p {
                let owned = owned_groups(t, p, k);
                assert_eq!(owned.start, next, "task {t} of {p} over {k}");
                for g in owned.clone() {
                    assert_eq!(task_for_group(g, p as usize, k), t as usize);
                }
                next = owned.end;
            }
            assert_eq!(next, k, "{p} tasks over {k} groups");
        }
    }

    #[test]
    fn partition_spreads_keys_and_keeps_order() {
        let events: Vec<Event> = (0..1000)
            .map(|i| Event {
                key: format!("k{}", i % 50).into_bytes(),
                value: i.to_string().into_bytes(),
                timestamp: i,
            })
            .collect();
        let parts = partition(events, 4, 128);
        assert!(parts.iter().all(|p| !p.is_empty()));
        for p in &parts {
            assert!(p.windows(2).all(|w| w[0].timestamp < w[1].timestamp));
            let owners: std::collections::BTreeSet<_> =
                p.iter().map(|e| task_for_key(&e.key, 4, 128)).collect();
            assert_eq!(owners.len(), 1);
        }
    }
}
