//! Routing events between stages by a hash of their key.
//!
//! The hash is part of memento's behaviour, not an implementation detail:
//! which task owns a key must not change between runs or versions, or a
//! restored task would receive keys whose state another task holds.

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

/// The task (of `parallelism`) that owns `key`.
pub fn task_for_key(key: &[u8], parallelism: usize) -> usize {
    if parallelism <= 1 {
        0
    } else {
        (key_hash(key) % parallelism as u64) as usize
    }
}

/// Split a batch into one batch per task, keeping the order of events
/// within each.
pub fn partition(events: Vec<Event>, parallelism: usize) -> Vec<Vec<Event>> {
    if parallelism <= 1 {
        return vec![events];
    }
    let mut parts: Vec<Vec<Event>> = (0..parallelism).map(|_| Vec::new()).collect();
    for e in events {
        let t = task_for_key(&e.key, parallelism);
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
            .map(|k| task_for_key(k, 7))
            .collect();
        assert_eq!(pinned, PINNED);
    }

    const PINNED: [usize; 4] = [0, 2, 4, 2];

    #[test]
    fn partition_spreads_keys_and_keeps_order() {
        let events: Vec<Event> = (0..1000)
            .map(|i| Event {
                key: format!("k{}", i % 50).into_bytes(),
                value: i.to_string().into_bytes(),
                timestamp: i,
            })
            .collect();
        let parts = partition(events, 4);
        assert!(parts.iter().all(|p| !p.is_empty()));
        for p in &parts {
            assert!(p.windows(2).all(|w| w[0].timestamp < w[1].timestamp));
            let owners: std::collections::BTreeSet<_> = p.iter().map(|e| task_for_key(&e.key, 4)).collect();
            assert_eq!(owners.len(), 1);
        }
    }
}
