//! A snapshot manifest as read from a store or an archive: parsed and
//! validated by `Manifest::from_json`, then every figure computed from its
//! lengths. Must never panic, abort or allocate by an untrusted length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memento::store::Manifest;

fuzz_target!(|data: &[u8]| {
    // A manifest is read under its file's name, which must be its id: take
    // the id it claims, so that inputs get past that check to the rest.
    let name = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("id")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "fuzz-000001".to_string());
    let Ok(m) = Manifest::from_json(&name, data) else {
        return;
    };
    let _ = m.chunk_refs().count();
    let _ = m.figures.duration_ms();
    for t in &m.tasks {
        let _ = t.state.chunks().count();
        let _ = t.state.native_new_chunks();
        let _ = t.state.logical_bytes();
    }
    // What the store writes back reads back.
    Manifest::from_json(&name, &m.to_json()).expect("a manifest the store accepted reads back");
});
