//! `memento demo`: two small jobs over the example plugins built into this
//! binary, in a fresh temporary directory that is kept for inspection.

use std::path::Path;

use anyhow::Context as _;

use memento::Host;
use memento::spec::JobSpec;

const TEXT: &str = "\
the quick brown fox jumps over the lazy dog
a stream is a table in motion
a table is a stream at rest
the quick brown fox jumps over the lazy dog
state is what a stream remembers
a checkpoint is state you can return to
a savepoint is a checkpoint you chose to keep
a stream is a table in motion
";

const WORDS_JOB: &str = r#"
name = "demo-words"

[source]
type = "file"
path = "input.txt"

# Drop repeated lines: lines are the key, so duplicates meet in one task.
[[operators]]
name = "dedup"
plugin = "plugins/dedup.wasm"
parallelism = 2

# Count the words of the remaining lines.
[[operators]]
name = "count"
plugin = "plugins/wordcount.wasm"
[operators.config]
split = "words"

[sink]
type = "file"
path = "out/words"
"#;

const WINDOWS_JOB: &str = r#"
name = "demo-windows"

[source]
type = "generator"
count = 200000
keys = 100
seed = 7

# Sum the generated values per key over 1-second event-time windows.
[[operators]]
name = "sum"
plugin = "plugins/window-sum.wasm"
parallelism = 2
[operators.config]
window = "1s"

[sink]
type = "file"
path = "out/windows"
"#;

const CHECKPOINTS_JOB: &str = r#"
name = "demo-clicks"

# Two seconds of input, so that snapshots happen while it runs.
[source]
type = "generator"
count = 100000
keys = 500
rate = 50000
batch = 500

[[operators]]
name = "count"
plugin = "plugins/wordcount.wasm"
parallelism = 2

[sink]
type = "file"
path = "out/clicks"

[checkpoints]
interval = "400ms"
retained = 2
"#;

pub fn run() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("memento-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?
        .keep();
    println!("memento demo — working in {}", dir.display());
    std::fs::create_dir_all(dir.join("plugins"))?;
    for (name, bytes) in memento_plugins::EXAMPLES {
        std::fs::write(dir.join("plugins").join(format!("{name}.wasm")), bytes)?;
    }
    std::fs::write(dir.join("input.txt"), TEXT)?;

    let host = Host::open(&dir.join("state"))?;
    for (file, text) in [("words.toml", WORDS_JOB), ("windows.toml", WINDOWS_JOB)] {
        std::fs::write(dir.join(file), text)?;
        let spec = JobSpec::from_toml(text, &dir.join(file), &dir)?;
        let name = spec.name.clone();
        println!("\n== {name} ({file})");
        let job = host.load_job(spec, memento::DEFAULT_TENANT)?;
        let report = job.run(memento::RunOptions::default())?;
        print!("{}", super::format_report(&name, &report));
    }

    let words = final_values(&dir.join("out/words"))?;
    let mut top: Vec<(&String, u64)> = words.iter().map(|(k, v)| (k, v.parse().unwrap_or(0))).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    println!("\nmost frequent words in distinct lines:");
    for (word, n) in top.iter().take(5) {
        println!("  {word:<12} {n}");
    }
    let windows = std::fs::read_dir(dir.join("out/windows"))?
        .map(|e| Ok(std::fs::read_to_string(e?.path())?.lines().count()))
        .sum::<anyhow::Result<usize>>()?;
    println!("window sums emitted: {windows} (100 keys × 200 one-second windows)");

    checkpoints(&host, &dir)?;
    println!("\noutput is in {}", dir.join("out").display());
    println!(
        "snapshots are in {} (try: memento snapshots list --state-dir {})",
        dir.join("state").display(),
        dir.join("state").display()
    );
    Ok(())
}

/// A job with periodic checkpoints and a savepoint taken while it runs;
/// then the unified list of what the store holds.
fn checkpoints(host: &Host, dir: &Path) -> anyhow::Result<()> {
    let file = dir.join("clicks.toml");
    std::fs::write(&file, CHECKPOINTS_JOB)?;
    let spec = JobSpec::from_toml(CHECKPOINTS_JOB, &file, dir)?;
    println!("\n== demo-clicks (clicks.toml): checkpoints every 400 ms, a savepoint after 1 s");
    let job = host.load_job(spec, memento::DEFAULT_TENANT)?;
    let control = job.control();
    let savepoint = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(1));
        control.trigger_savepoint(None).recv().ok()
    });
    let report = job.run(memento::RunOptions::default())?;
    print!("{}", super::format_report("demo-clicks", &report));
    if let Some(Ok(id)) = savepoint.join().ok().flatten() {
        println!("  savepoint  {id:>12} (taken while running)");
    }
    println!("\nthe store now holds (checkpoints beyond `retained = 2` were subsumed):");
    let mut listed = job.store().list(&memento::store::ListFilter::all())?;
    listed.retain(|m| m.job.as_str() == "demo-clicks");
    for m in listed {
        // A record without task state (end of input) has no size to show.
        let size = |bytes: u64| {
            if m.tasks.is_empty() {
                "-".to_string()
            } else {
                memento::spec::format_size(bytes)
            }
        };
        println!(
            "  {:<20} {:<10} {:<13} {:>10} logical {:>10} new",
            m.id.to_string(),
            json_name(&m.kind),
            json_name(&m.trigger),
            size(m.figures.logical_bytes),
            size(m.figures.new_bytes),
        );
    }
    Ok(())
}

/// How a serde enum value is spelled in manifests (`end_of_input`).
fn json_name(v: &impl serde::Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The last value written per key across the part files of a `file` sink.
fn final_values(dir: &Path) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut last = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            continue;
        }
        for line in std::fs::read_to_string(path)?.lines() {
            if let Some((k, v)) = line.split_once('\t') {
                last.insert(k.to_string(), v.to_string());
            }
        }
    }
    Ok(last)
}
