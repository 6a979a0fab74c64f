//! A savepoint archive (`memento savepoint import`) imported from bytes
//! into a fresh scratch store: every bad archive is refused with an error,
//! never a panic, an abort, a hang or an allocation by an untrusted length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memento::store::{Store, StoreOptions};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("scratch directory");
    let options = StoreOptions {
        sync: false,
        ..StoreOptions::default()
    };
    let tenant = Store::open(dir.path(), options)
        .and_then(|s| s.tenant("fuzz"))
        .expect("scratch store");
    let mut input = data;
    let _ = tenant.import(&mut input, "fuzz.archive", Some(data.len() as u64), &mut |_| {});
});
