//! A savepoint archive (`memento savepoint import`) imported from bytes
//! into a scratch store: every bad archive is refused with an error, never
//! a panic, an abort, a hang or an allocation by an untrusted length; an
//! archive it accepts lists, reads back and is disposed of again.
//!
//! One store for the whole run, as in a server (and faster than one per
//! input).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use memento::store::{Store, StoreOptions, TenantStore};

fn store() -> &'static TenantStore {
    static STORE: OnceLock<(tempfile::TempDir, TenantStore)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("scratch directory");
            let options = StoreOptions {
                sync: false,
                ..StoreOptions::default()
            };
            let tenant = Store::open(dir.path(), options)
                .and_then(|s| s.tenant("fuzz"))
                .expect("scratch store");
            (dir, tenant)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let tenant = store();
    let mut input = data;
    let Ok(summary) = tenant.import(&mut input, "fuzz.archive", Some(data.len() as u64), &mut |_| {}) else {
        return;
    };
    let m = tenant.get(&summary.id).expect("an imported snapshot reads back");
    assert_eq!(m.id, summary.id);
    tenant
        .delete(&summary.id)
        .expect("an imported snapshot can be disposed of");
    // Its blobs go too, so the scratch store does not grow run after run.
    tenant.gc().expect("gc after dispose");
});
