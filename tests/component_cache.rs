//! End-to-end tests of the on-disk cache of compiled components through
//! `memento run`: a second process loads what the first compiled, a
//! damaged entry is recompiled and replaced (never trusted), and
//! `--cache-dir` moves the cache. The cache's own unit tests
//! (`memento-runtime`, `disk_cache::tests`) cover foreign engine
//! configurations and the size bound.
//!
//! What the cache did is observed through its debug log lines
//! (`MEMENTO_LOG=memento_runtime::disk_cache=debug`).

mod common;

use common::output::{assert_same_output, committed, wordcount_output};
use common::{memento, plugin, toml_path};

use std::path::{Path, PathBuf};

const HIT: &str = "compiled component loaded from the disk cache";
const WRITTEN: &str = "compiled component written to the disk cache";
const REFUSED: &str = "compiled-component cache entry refused, recompiling";

/// A `wordcount` job over 3,000 generated events into `out/`.
fn job(dir: &Path) -> PathBuf {
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"cached\"\n[source]\ntype = \"generator\"\ncount = 3000\nkeys = 10\nseed = 3\n\
             [[operators]]\nname = \"count\"\nplugin = \"{}\"\n[sink]\ntype = \"file\"\npath = \"out\"\n",
            toml_path(&plugin("wordcount"))
        ),
    )
    .unwrap();
    job
}

/// `memento run` from scratch; its stderr. Checks the output each time: a
/// component from the cache must behave as a compiled one.
fn run(dir: &Path, extra: &[&str]) -> String {
    let out = memento()
        .arg("run")
        .arg(job(dir))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(extra)
        .env("MEMENTO_LOG", "warn,memento_runtime::disk_cache=debug")
        .current_dir(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "memento run failed: {stderr}");
    assert_same_output(
        &committed(&dir.join("out")),
        &wordcount_output(3000, 10, 3),
        "a run with the compiled-component cache",
    );
    stderr
}

fn entries(cache: &Path) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(cache) else {
        return Vec::new();
    };
    dir.map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect()
}

/// The first run compiles and writes the entry (in `cache/` inside the
/// state directory by default); the second loads it and writes nothing.
#[test]
fn a_second_run_loads_the_compiled_component_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let first = run(dir.path(), &[]);
    assert!(first.contains(WRITTEN) && !first.contains(HIT), "{first}");
    let cache = dir.path().join("state").join("cache");
    assert_eq!(entries(&cache).len(), 1, "one entry for one component");
    let second = run(dir.path(), &[]);
    assert!(second.contains(HIT), "second run: {second}");
    assert!(!second.contains(WRITTEN), "second run compiled again: {second}");
    assert_eq!(entries(&cache).len(), 1);
}

/// A damaged entry — one flipped byte in the compiled code, or cut short —
/// is refused with a warning, recompiled and replaced; the run's output is
/// right; the run after that hits the new entry.
#[test]
fn a_damaged_entry_is_recompiled_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), &[]);
    let cache = dir.path().join("state").join("cache");
    let entry = entries(&cache).pop().expect("an entry");
    let good = std::fs::read(&entry).unwrap();
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let truncated = good[..good.len() - 4096].to_vec();
    for (what, bytes) in [("a flipped byte", flipped), ("truncated", truncated)] {
        std::fs::write(&entry, &bytes).unwrap();
        let stderr = run(dir.path(), &[]);
        assert!(stderr.contains(REFUSED), "{what}: {stderr}");
        assert!(stderr.contains(WRITTEN), "{what}: not rewritten: {stderr}");
        assert_eq!(
            std::fs::read(&entry).unwrap(),
            good,
            "{what}: the entry is whole again"
        );
        let again = run(dir.path(), &[]);
        assert!(again.contains(HIT) && !again.contains(REFUSED), "{what}: {again}");
    }
}

/// `--cache-dir` puts the cache elsewhere, and nothing goes into the state
/// directory's default one.
#[test]
fn cache_dir_moves_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere");
    let flag = ["--cache-dir", elsewhere.to_str().unwrap()];
    run(dir.path(), &flag);
    assert_eq!(entries(&elsewhere).len(), 1);
    assert!(entries(&dir.path().join("state").join("cache")).is_empty());
    assert!(run(dir.path(), &flag).contains(HIT));
}

/// A cache directory that cannot be one is a one-line error naming it.
#[test]
fn a_cache_dir_that_is_a_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let out = memento()
        .arg("run")
        .arg(job(dir.path()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--cache-dir")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .rfind(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        line.contains("compiled-component cache directory") && line.contains("not-a-dir"),
        "{line}"
    );
}
