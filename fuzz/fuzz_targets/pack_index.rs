//! A tenant's pack and index files as found on disk (layout 2): whatever
//! their bytes, reading a blob through them, `fsck`, `fsck --repair-index`
//! and `gc` end in an answer or an error, never a panic, an abort, a hang
//! or an allocation by an untrusted length; after a repair, no index file
//! is damaged.
//!
//! Input: a little-endian u16 `n`, then `n` bytes of index file, then the
//! pack. The index is stored under its own hash (its name, which readers
//! check), the pack under the first pack name the index states (so that
//! the index can describe it), and the blob read is the index's first
//! entry, so that mutations of real files reach the record checks.
#![no_main]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use memento::store::{
    BlobHash, ChunkRef, JobName, SnapshotKind, StateFormat, Store, StoreOptions, TaskKey, TaskState, TaskStateData,
    TenantStore, Trigger,
};

fn store() -> &'static (tempfile::TempDir, Store) {
    static STORE: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("scratch directory");
        let options = StoreOptions {
            sync: false,
            ..StoreOptions::default()
        };
        let store = Store::open(dir.path(), options).expect("scratch store");
        (dir, store)
    })
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn hash_at(b: &[u8], at: usize) -> Option<BlobHash> {
    Some(BlobHash(b.get(at..at + 32)?.try_into().ok()?))
}

/// Commits a snapshot whose one chunk is `blob` (the commit finds it
/// through the index) and reads it back (through the pack); either may
/// refuse.
fn read_through_a_snapshot(tenant: &TenantStore, blob: BlobHash, len: u64) {
    let job = JobName::new("j").expect("job name");
    let Ok(n) = tenant.next_snapshot_number(&job) else {
        return;
    };
    let Ok(mut w) = tenant.begin(&job, n) else {
        return;
    };
    let mut m = w.manifest(SnapshotKind::Savepoint, Trigger::Manual, StateFormat::Canonical);
    let chunks = vec![ChunkRef::Blob { blob, len }];
    let key = TaskKey::new("t", 0);
    m.tasks.push(TaskState {
        key: key.clone(),
        state: TaskStateData::Canonical { len, chunks: chunks.clone() },
    });
    let id = m.id.clone();
    if w.commit(m).is_ok() {
        let _ = tenant.read_chunks(&id, &key, &chunks);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((n, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let n = usize::from(u16::from_le_bytes(*n)).min(rest.len());
    let (index, pack) = rest.split_at(n);
    let (dir, store) = store();
    // A tenant per input: nothing one input leaves can mask the next.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let root = dir.path().join("tenants").join(&name);
    let index_name = BlobHash::of(index);
    let pack_name = hash_at(index, 16).unwrap_or_else(|| BlobHash::of(pack));
    for (sub, file, bytes) in [("index", index_name, index), ("packs", pack_name, pack)] {
        std::fs::create_dir_all(root.join(sub)).expect("tenant directory");
        std::fs::write(root.join(sub).join(file.to_hex()), bytes).expect("write");
    }
    let tenant = store.tenant(&name).expect("tenant name");

    let packs = u32_at(index, 8).unwrap_or(0) as usize;
    let entry = 16usize.saturating_add(packs.saturating_mul(40));
    if let (Some(blob), Some(plain)) = (hash_at(index, entry), u32_at(index, entry.saturating_add(48))) {
        read_through_a_snapshot(&tenant, blob, u64::from(plain));
    }
    let _ = tenant.fsck();
    if tenant.repair_index().is_ok() {
        let after = tenant.fsck().expect("fsck after a repair");
        assert!(
            after.damaged_indexes.is_empty(),
            "a repaired tenant still has damaged index files: {:?}",
            after.damaged_indexes
        );
    }
    let _ = tenant.gc();
    drop(tenant);
    std::fs::remove_dir_all(&root).expect("remove the tenant");
});
