//! `wordcount-v010`: the `wordcount` example as a plugin built before
//! contract 0.2.0 would have been: raw wit-bindgen bindings of
//! `wit/0.1.0/operator.wit`, `snapshot-state` returning the whole state as
//! one `list<u8>`. The host must keep loading, running, checkpointing and
//! restoring it (tests/contract.rs).
//!
//! Behaviour: for every event the count of its key goes up by one and it
//! emits `(key, count)`, the count as decimal text. Its state is the SDK's
//! envelope (magic `MGST`, envelope 1, MessagePack with field names, state
//! version 1) around the same struct as `wordcount`'s, so a savepoint of
//! this plugin also restores into the 0.2.0 `wordcount`: the upgrade path
//! of a plugin from 0.1.0 to 0.2.0.

// Only in the component: a native build (the workspace's `cargo test`)
// has no host to link the contract's imports against.
#[cfg(target_family = "wasm")]
mod guest {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    wit_bindgen::generate!({
        path: "../../../wit/0.1.0/operator.wit",
        world: "plugin",
    });

    use exports::memento::operator::operator::Guest as OperatorGuest;
    use exports::memento::operator::snapshot::Guest as SnapshotGuest;
    use memento::operator::types::{Batch, Context};

    /// The same layout as `plugins/wordcount`'s state.
    #[derive(Default, Serialize, Deserialize)]
    struct WordCount {
        counts: BTreeMap<Vec<u8>, u64>,
        split_words: bool,
    }

    const MAGIC: &[u8; 4] = b"MGST";

    thread_local! {
        static STATE: RefCell<Option<WordCount>> = const { RefCell::new(None) };
    }

    struct Plugin;

    fn with<R>(f: impl FnOnce(&mut WordCount) -> Result<R, String>) -> Result<R, String> {
        STATE.with(|s| match s.borrow_mut().as_mut() {
            Some(state) => f(state),
            None => Err("called before `open`".into()),
        })
    }

    impl OperatorGuest for Plugin {
        fn open(_ctx: Context) -> Result<(), String> {
            STATE.with(|s| *s.borrow_mut() = Some(WordCount::default()));
            Ok(())
        }

        fn process(events: Batch) -> Result<Batch, String> {
            with(|state| {
                let mut out = Batch {
                    data: Vec::new(),
                    lengths: Vec::new(),
                    timestamps: Vec::new(),
                };
                let mut at = 0usize;
                for (i, &ts) in events.timestamps.iter().enumerate() {
                    let key_len = *events.lengths.get(2 * i).ok_or("malformed batch")? as usize;
                    let value_len = *events.lengths.get(2 * i + 1).ok_or("malformed batch")? as usize;
                    let key = events.data.get(at..at + key_len).ok_or("malformed batch")?;
                    at += key_len + value_len;
                    let n = state.counts.entry(key.to_vec()).or_insert(0);
                    *n += 1;
                    let value = n.to_string();
                    out.data.extend_from_slice(key);
                    out.data.extend_from_slice(value.as_bytes());
                    out.lengths.push(key.len() as u32);
                    out.lengths.push(value.len() as u32);
                    out.timestamps.push(ts);
                }
                Ok(out)
            })
        }

        fn close() -> Result<Batch, String> {
            Ok(Batch {
                data: Vec::new(),
                lengths: Vec::new(),
                timestamps: Vec::new(),
            })
        }
    }

    impl SnapshotGuest for Plugin {
        fn snapshot_state() -> Result<Vec<u8>, String> {
            with(|state| {
                let mut out = MAGIC.to_vec();
                out.extend_from_slice(&[1, 1]);
                out.extend_from_slice(&1u32.to_le_bytes());
                let mut ser = rmp_serde::Serializer::new(&mut out).with_struct_map();
                state.serialize(&mut ser).map_err(|e| e.to_string())?;
                Ok(out)
            })
        }

        fn restore_state(bytes: Vec<u8>) -> Result<(), String> {
            if bytes.len() < 10 || &bytes[..4] != MAGIC || bytes[4..6] != [1, 1] {
                return Err("state is not a wordcount snapshot".into());
            }
            let restored: WordCount = rmp_serde::from_slice(&bytes[10..]).map_err(|e| e.to_string())?;
            with(|state| {
                *state = restored;
                Ok(())
            })
        }
    }

    export!(Plugin);
}
