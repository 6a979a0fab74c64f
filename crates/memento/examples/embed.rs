//! Embedding memento in your own service, without HTTP: the same library
//! calls `memento serve` makes.
//!
//! It opens a [`Host`] on a state directory, loads a job for a tenant, runs
//! it on its own thread, takes a savepoint while it runs, reads the job's
//! status (counts and the snapshot history with per-task figures), lists the
//! tenant's stored snapshots, and finally stops the job with a savepoint.
//!
//! ```sh
//! cargo run -p memento --example embed                  # uses the built wordcount plugin
//! cargo run -p memento --example embed -- my-op.wasm    # or any operator component
//! ```
//!
//! Threading: [`memento::Job::run`] blocks until the job ends, so it gets a
//! thread of its own; [`memento::JobControl`] and the status handle are
//! cheap clones usable from any thread (an async service would call them
//! from its handlers as they never block).

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use memento::coordinator::JobState;
use memento::spec::JobSpec;
use memento::store::ListFilter;
use memento::{Host, RunOptions};

fn main() -> Result<(), Box<dyn Error>> {
    let plugin: PathBuf = match std::env::args().nth(1) {
        Some(p) => p.into(),
        // This repository's build of the example plugin; an embedder passes
        // its own component.
        None => Path::new(memento_plugins::DIR).join("wordcount.wasm"),
    };
    let state = tempfile::tempdir()?;

    // One Host per process: a wasm engine with its component cache and the
    // unified snapshot store.
    let host = Host::open(state.path())?;

    // A job file may come from anywhere; here it is text. Relative paths in
    // it would resolve against the directory given as `base_dir`.
    let text = format!(
        r#"
name = "clicks"
[source]
type = "generator"
rate = 20000
batch = 500
[[operators]]
name = "count"
plugin = "{}"
parallelism = 2
[sink]
type = "null"
[checkpoints]
interval = "200ms"
"#,
        plugin.display()
    );
    let spec = JobSpec::from_toml(&text, Path::new("embedded.toml"), state.path())?;

    // Load (validate and compile) the plugins; the job's snapshots go to the
    // namespace of tenant "acme".
    let job = Arc::new(host.load_job(spec, "acme")?);
    let control = job.control();
    let status = job.status_handle();
    let runner = {
        let job = job.clone();
        std::thread::spawn(move || job.run(RunOptions::default()))
    };

    while status.get().state != JobState::Running {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500)); // let a few checkpoints happen

    // Triggers answer on a channel once the snapshot is committed (or failed).
    let savepoint = control.trigger_savepoint(None).recv()??;
    println!("savepoint {savepoint} taken");

    let st = status.get();
    println!(
        "job {}: {} records in, {} snapshots completed, {} failed",
        st.name, st.records_in, st.counts.completed, st.counts.failed
    );
    for r in &st.history {
        let tasks: Vec<String> = r
            .tasks
            .iter()
            .map(|t| format!("{} paused {} ms", t.task, t.pause_ms))
            .collect();
        println!(
            "  #{} {:?} {:?} {} ms, {} bytes [{}]",
            r.number,
            r.kind,
            r.trigger,
            r.duration_ms,
            r.logical_bytes,
            tasks.join(", ")
        );
    }

    // Everything the tenant has stored: checkpoints and savepoints side by side.
    for m in job.store().list(&ListFilter::all())? {
        println!("stored {} ({:?}, {:?})", m.id, m.kind, m.trigger);
    }

    // Stop with a final savepoint and wait for the run to end.
    let last = control.stop_with_savepoint().recv()??;
    let report = runner.join().map_err(|_| "the job thread panicked")??;
    println!("stopped with savepoint {last}; state {:?}", report.state);
    Ok(())
}
