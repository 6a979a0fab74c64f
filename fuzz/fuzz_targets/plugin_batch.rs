//! The packed batch a plugin returns, through the real call path: the
//! `rawbatch` test plugin returns whatever batch its input event spells
//! (see `tests/plugins/rawbatch`), and the host must either refuse it as
//! malformed or hand back exactly the events its layout describes — never
//! panic, read out of bounds or allocate by an untrusted length.
//!
//! Needs the built plugin: `cargo build -p memento-plugins` first (the
//! path below), or `MEMENTO_FUZZ_RAWBATCH=/path/to/rawbatch.wasm`.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use memento::runtime::{
    Context, Event, LoadedComponent, Runtime, RuntimeError, SandboxLimits, TaskInstance, TaskLabel,
};

const PLUGIN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/plugins/wasm32-wasip2/plugin/rawbatch.wasm"
);

struct Plugin {
    runtime: Runtime,
    component: std::sync::Arc<LoadedComponent>,
    instance: Option<TaskInstance>,
}

impl Plugin {
    fn instance(&mut self) -> &mut TaskInstance {
        self.instance.get_or_insert_with(|| {
            let label = TaskLabel {
                job: "fuzz".into(),
                operator: "rawbatch".into(),
                task: 0,
            };
            let limits = SandboxLimits {
                memory_bytes: 64 << 20,
                max_output: 1 << 20,
                ..SandboxLimits::default()
            };
            let mut instance = self
                .runtime
                .instantiate(&self.component, label, &limits)
                .expect("instantiate");
            instance
                .open(&Context {
                    job: "fuzz".into(),
                    operator_name: "rawbatch".into(),
                    task_index: 0,
                    parallelism: 1,
                    config: Vec::new(),
                    key_groups: 1,
                    owned: memento::runtime::KeyGroupRange { start: 0, end: 1 },
                })
                .expect("open");
            instance
        })
    }
}

fn plugin() -> &'static Mutex<Plugin> {
    static PLUGIN_INSTANCE: OnceLock<Mutex<Plugin>> = OnceLock::new();
    PLUGIN_INSTANCE.get_or_init(|| {
        let path = std::env::var("MEMENTO_FUZZ_RAWBATCH").unwrap_or_else(|_| PLUGIN.to_string());
        let runtime = Runtime::new().expect("runtime");
        let component = runtime
            .load_file(std::path::Path::new(&path))
            .unwrap_or_else(|e| panic!("{e} (build it with `cargo build -p memento-plugins`)"));
        Mutex::new(Plugin {
            runtime,
            component,
            instance: None,
        })
    })
}

/// The layout `rawbatch` spells from `bytes`: lengths, timestamps, data.
fn spelled(bytes: &[u8]) -> (Vec<u32>, Vec<i64>, Vec<u8>) {
    let mut at = 0;
    let mut take = |n: usize| {
        let mut out = vec![0u8; n];
        let end = (at + n).min(bytes.len());
        if at < end {
            out[..end - at].copy_from_slice(&bytes[at..end]);
        }
        at = (at + n).min(bytes.len());
        out
    };
    let lengths = u16::from_le_bytes(take(2).try_into().unwrap());
    let timestamps = u16::from_le_bytes(take(2).try_into().unwrap());
    let lengths: Vec<u32> = (0..lengths)
        .map(|_| u32::from_le_bytes(take(4).try_into().unwrap()))
        .collect();
    let timestamps: Vec<i64> = (0..timestamps)
        .map(|_| i64::from_le_bytes(take(8).try_into().unwrap()))
        .collect();
    let data = bytes[at..].to_vec();
    (lengths, timestamps, data)
}

fuzz_target!(|data: &[u8]| {
    let mut plugin = plugin().lock().unwrap();
    let input = [Event {
        key: Vec::new(),
        value: data.to_vec(),
        timestamp: 0,
    }];
    let result = plugin.instance().process(&input);
    let (lengths, timestamps, bytes) = spelled(data);
    match result {
        Ok(events) => {
            // Accepted: it must be exactly what the layout says.
            assert_eq!(lengths.len(), 2 * timestamps.len());
            assert_eq!(events.len(), timestamps.len());
            let mut at = 0usize;
            for (i, e) in events.iter().enumerate() {
                assert_eq!(e.key.len(), lengths[2 * i] as usize);
                assert_eq!(e.value.len(), lengths[2 * i + 1] as usize);
                assert_eq!(e.timestamp, timestamps[i]);
                assert_eq!(e.key, bytes[at..at + e.key.len()]);
                at += e.key.len();
                assert_eq!(e.value, bytes[at..at + e.value.len()]);
                at += e.value.len();
            }
            assert_eq!(at, bytes.len());
        }
        Err(RuntimeError::MalformedOutput { .. }) => {}
        // Over max_output: wasmtime's copy budget refused it while lifting;
        // the instance is poisoned, so the next input gets a fresh one.
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("max_output"), "unexpected error: {text}");
            plugin.instance = None;
        }
    }
});
