//! The compiled-component cache of a [`crate::Runtime`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::component::LoadedComponent;

/// The compiled-component cache: blake3 of the bytes → compiled component,
/// bounded by compiled bytes, least recently used dropped first.
///
/// A linear scan finds the oldest entry; the cache holds a handful of
/// plugins (each several MiB compiled), so that is cheaper than keeping a
/// second index. Dropping an entry only drops the cache's handle: jobs
/// running the component keep theirs.
pub(crate) struct ComponentCache {
    entries: HashMap<[u8; 32], (Arc<LoadedComponent>, u64)>,
    bytes: usize,
    max_bytes: usize,
    clock: u64,
}

impl ComponentCache {
    pub(crate) fn new(max_bytes: usize) -> ComponentCache {
        ComponentCache {
            entries: HashMap::new(),
            bytes: 0,
            max_bytes,
            clock: 0,
        }
    }

    /// Entries and their compiled bytes.
    pub(crate) fn usage(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }

    pub(crate) fn get(&mut self, hash: &[u8; 32]) -> Option<Arc<LoadedComponent>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(hash).map(|(c, used)| {
            *used = clock;
            c.clone()
        })
    }

    pub(crate) fn insert(&mut self, hash: [u8; 32], component: Arc<LoadedComponent>) {
        self.clock += 1;
        let size = component.compiled_size();
        if let Some((old, _)) = self.entries.insert(hash, (component, self.clock)) {
            self.bytes -= old.compiled_size();
        }
        self.bytes += size;
        // Never evict the entry just added, even if it alone is too big: the
        // caller is about to use it.
        while self.bytes > self.max_bytes && self.entries.len() > 1 {
            let oldest = *self
                .entries
                .iter()
                .filter(|(h, _)| **h != hash)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(h, _)| h)
                .expect("more than one entry");
            let (gone, _) = self.entries.remove(&oldest).expect("present");
            self.bytes -= gone.compiled_size();
        }
    }
}
