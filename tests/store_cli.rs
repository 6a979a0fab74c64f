//! End-to-end tests of the store commands of the `memento` binary:
//! `snapshots list|show`, `fsck` (and `--repair-index`), `gc`,
//! `store migrate`, `savepoint export|import|dispose`,
//! and their errors on bad input. Snapshots are written through the library
//! (no job needs to run); the binary is driven like a user would.

use std::path::Path;
use std::process::{Command, Output};

use memento::store::*;

fn memento(state_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memento"))
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .env_remove("MEMENTO_STATE_DIR")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}\n{}", stderr(&o), stdout(&o));
    stdout(&o)
}

/// Asserts failure with `message` on stderr.
fn fails_with(o: Output, message: &str) {
    assert!(!o.status.success(), "should fail: {}", stdout(&o));
    assert!(
        stderr(&o).contains(message),
        "stderr lacks {message:?}:\n{}",
        stderr(&o)
    );
}

/// The pack file holding blob `hash` and where its record's payload ends,
/// found by reading the packs' records directly.
fn record_of(dir: &Path, hash: BlobHash) -> (std::path::PathBuf, usize) {
    for f in std::fs::read_dir(dir.join("tenants/default/packs")).unwrap() {
        let path = f.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let mut at = 8usize;
        while at + 44 <= bytes.len() {
            let stored = u32::from_le_bytes(bytes[at + 40..at + 44].try_into().unwrap()) as usize;
            if bytes[at..at + 32] == hash.0 {
                return (path, at + 44 + stored);
            }
            at += 44 + stored;
        }
    }
    panic!("blob {hash} is in no pack");
}

/// A store with a checkpoint (2 tasks) and a savepoint of job `wordcount`.
fn populated(dir: &Path) -> (TenantStore, Vec<ChunkRef>) {
    let t = Store::open(dir, StoreOptions::default())
        .unwrap()
        .tenant("default")
        .unwrap();
    let job = JobName::new("wordcount").unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    let state: Vec<u8> = (0..600_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut chunks = Vec::new();
    for (kind, trigger) in [
        (SnapshotKind::Checkpoint, Trigger::Periodic),
        (SnapshotKind::Savepoint, Trigger::Manual),
    ] {
        let n = t.next_snapshot_number(&job).unwrap();
        let mut w = t.begin(&job, n).unwrap();
        chunks = w.put_chunks_cdc(&state).unwrap();
        let mut m = w.manifest(kind, trigger, StateFormat::Canonical);
        m.retention.retained = Some(3);
        m.tasks.push(TaskState {
            key: TaskKey::new("count", 0),
            state: TaskStateData::Canonical {
                len: state.len() as u64,
                chunks: chunks.clone(),
            },
        });
        w.commit(m).unwrap();
    }
    (t, chunks)
}

#[test]
fn list_and_show_print_tables_and_json() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path());
    let out = ok(memento(dir.path(), &["snapshots", "list"]));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID"), "{out}");
    for col in [
        "KIND",
        "TRIGGER",
        "FORMAT",
        "STATUS",
        "LOGICAL",
        "NEW",
        "DURATION",
        "RETENTION",
    ] {
        assert!(lines[0].contains(col), "{out}");
    }
    assert!(
        lines[1].starts_with("wordcount-000001  checkpoint  periodic"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("wordcount-000002  savepoint   manual"),
        "{out}"
    );
    assert!(
        lines[1].contains("retain 3") && lines[1].contains("585.9 KiB"),
        "{out}"
    );

    let json = ok(memento(
        dir.path(),
        &["snapshots", "list", "--json", "--job", "wordcount"],
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[1]["kind"], "savepoint");

    let out = ok(memento(dir.path(), &["snapshots", "show", "wordcount-2"]));
    assert!(out.starts_with("snapshot   wordcount-000002\n"), "{out}");
    assert!(out.contains("count[0]"), "{out}");
    let json = ok(memento(
        dir.path(),
        &["snapshots", "show", "wordcount-000001", "--json"],
    ));
    let m: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(m["schema_version"], 1);
}

#[test]
fn bad_ids_and_missing_store_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(
        memento(&dir.path().join("nope"), &["snapshots", "list"]),
        "no snapshot store at",
    );
    populated(dir.path());
    fails_with(
        memento(dir.path(), &["snapshots", "show", "../etc-1"]),
        "invalid snapshot id \"../etc-1\": job name \"../etc\" must not start with '.'",
    );
    fails_with(
        memento(dir.path(), &["snapshots", "show", "wordcount"]),
        "invalid snapshot id \"wordcount\": expected <job>-<number>",
    );
    fails_with(
        memento(dir.path(), &["snapshots", "show", "wordcount-99"]),
        "snapshot wordcount-000099 not found (tenant default)",
    );
    fails_with(
        memento(dir.path(), &["snapshots", "list", "--job", "a/b"]),
        "invalid job name \"a/b\": contains a path separator",
    );
    // Another tenant sees nothing of the default tenant's snapshots.
    let o = memento(
        dir.path(),
        &["snapshots", "show", "wordcount-1", "--tenant", "other"],
    );
    fails_with(o, "snapshot wordcount-000001 not found (tenant other)");
    fails_with(
        memento(dir.path(), &["savepoint", "dispose", "wordcount-1"]),
        "wordcount-000001 is a checkpoint, not a savepoint",
    );
}

#[test]
fn fsck_names_damaged_snapshots_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (_, chunks) = populated(dir.path());
    let out = ok(memento(dir.path(), &["fsck"]));
    assert!(out.contains("checked 2 snapshots"), "{out}");
    assert!(out.contains("0 damaged"), "{out}");

    // Corrupt a blob both snapshots share.
    let hash = chunks[0].blob().unwrap();
    let (pack, end) = record_of(dir.path(), hash);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[end - 1] ^= 0xff;
    std::fs::write(&pack, bytes).unwrap();
    let o = memento(dir.path(), &["fsck"]);
    assert!(!o.status.success());
    let out = stdout(&o);
    assert!(out.contains("DAMAGED wordcount-000001"), "{out}");
    assert!(out.contains("DAMAGED wordcount-000002"), "{out}");
    assert!(
        out.contains(&format!("task count[0], chunk 0 (blob {hash})")),
        "{out}"
    );
    assert!(
        stderr(&o).contains("damaged snapshots: wordcount-000001, wordcount-000002"),
        "{}",
        stderr(&o)
    );
    // Exporting the damaged snapshot fails naming the chunk.
    let file = dir.path().join("x.arc");
    fails_with(
        memento(
            dir.path(),
            &["savepoint", "export", "wordcount-2", file.to_str().unwrap()],
        ),
        &format!("snapshot wordcount-000002, task count[0], chunk 0 (blob {hash})"),
    );
    assert!(!file.exists());
}

#[test]
fn corrupt_manifest_is_reported_stops_gc_and_can_be_disposed() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path());
    let path = dir
        .path()
        .join("tenants/default/snapshots/wordcount/wordcount-000001.json");
    std::fs::write(&path, b"{\"schema_version\": 1, \"id\": ").unwrap();
    let o = memento(dir.path(), &["snapshots", "list"]);
    let out = ok(o);
    assert!(out.contains("wordcount-000001  -"), "{out}");
    assert!(out.contains("damaged"), "{out}");
    fails_with(
        memento(dir.path(), &["snapshots", "show", "wordcount-1"]),
        "manifest of snapshot wordcount-000001 is corrupt",
    );
    let o = memento(dir.path(), &["fsck"]);
    assert!(stdout(&o).contains("DAMAGED wordcount-000001"), "{}", stdout(&o));
    fails_with(o, "damaged snapshots: wordcount-000001");
    let o = memento(dir.path(), &["gc"]);
    let err = stderr(&o);
    fails_with(o, "manifest of snapshot wordcount-000001 is corrupt");
    assert!(
        err.contains("memento savepoint dispose wordcount-000001"),
        "gc names the way out: {err}"
    );
    // The way out: dispose removes the damaged snapshot (its kind unknown,
    // with a warning), and gc runs again.
    let o = memento(dir.path(), &["savepoint", "dispose", "wordcount-000001"]);
    assert!(
        stderr(&o).contains("removing the damaged snapshot"),
        "{}",
        stderr(&o)
    );
    assert!(ok(o).contains("disposed wordcount-000001"));
    ok(memento(dir.path(), &["fsck"]));
    ok(memento(dir.path(), &["gc"]));
}

#[test]
fn export_import_dispose_and_gc() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let (_, chunks) = populated(src.path());
    let file = src.path().join("sp.arc");
    let out = ok(memento(
        src.path(),
        &["savepoint", "export", "wordcount-000002", file.to_str().unwrap()],
    ));
    assert!(out.starts_with("exported wordcount-000002 to "), "{out}");
    fails_with(
        memento(
            src.path(),
            &["savepoint", "export", "wordcount-2", file.to_str().unwrap()],
        ),
        "already exists",
    );

    let out = ok(memento(
        dst.path(),
        &["savepoint", "import", file.to_str().unwrap()],
    ));
    assert!(
        out.starts_with(&format!(
            "imported wordcount-000002 as wordcount-000001 ({} blobs, {} new)",
            chunks.len(),
            chunks.len()
        )),
        "{out}"
    );
    assert!(ok(memento(dst.path(), &["fsck"])).contains("0 damaged"));
    let listed = ok(memento(dst.path(), &["snapshots", "list"]));
    let row: Vec<&str> = listed.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..3], ["wordcount-000001", "savepoint", "import"], "{listed}");

    // A truncated archive is refused and commits nothing.
    let bytes = std::fs::read(&file).unwrap();
    let cut = src.path().join("cut.arc");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        memento(dst.path(), &["savepoint", "import", cut.to_str().unwrap()]),
        "truncated",
    );

    // Dispose the savepoint at the source; the checkpoint keeps the shared blobs.
    let out = ok(memento(src.path(), &["savepoint", "dispose", "wordcount-2"]));
    assert!(
        out.starts_with("disposed wordcount-000002; freed 0 B (0 blobs)"),
        "{out}"
    );
    let out = ok(memento(src.path(), &["gc"]));
    assert!(out.starts_with("removed 0 blobs"), "{out}");
    assert!(out.contains("referenced by 1 snapshots"), "{out}");
    // Delete the checkpoint too (library), then gc frees everything.
    let t = Store::open(src.path(), StoreOptions::default())
        .unwrap()
        .tenant("default")
        .unwrap();
    t.delete(&SnapshotId::parse("wordcount-1").unwrap()).unwrap();
    let out = ok(memento(src.path(), &["gc"]));
    assert!(
        out.starts_with(&format!("removed {} blobs", chunks.len())),
        "{out}"
    );
}

#[test]
fn fsck_repair_index_rebuilds_lost_index_files_from_the_packs() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path());
    for f in std::fs::read_dir(dir.path().join("tenants/default/index")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let o = memento(dir.path(), &["fsck"]);
    assert!(!o.status.success());
    let out = stdout(&o);
    assert!(out.contains("DAMAGED wordcount-000001"), "{out}");
    assert!(out.contains("UNINDEXED tenants/default/packs/"), "{out}");
    assert!(out.contains("blob is missing"), "{out}");
    let out = ok(memento(dir.path(), &["fsck", "--repair-index"]));
    assert!(out.contains("repaired the index: "), "{out}");
    assert!(out.contains("of 1 packs indexed from the packs"), "{out}");
    assert!(out.contains("0 damaged"), "{out}");
    let out = ok(memento(dir.path(), &["fsck"]));
    assert!(!out.contains("UNINDEXED"), "{out}");
}

#[test]
fn store_migrate_packs_a_layout1_store_and_a_fresh_store_needs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A layout-1 store as the previous build wrote it: loose blob files.
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("store.json"),
        br#"{"format":"memento-store","version":1}"#,
    )
    .unwrap();
    let tenant = dir.path().join("tenants/default");
    let job = JobName::new("wordcount").unwrap();
    let pieces: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i + 1; 10_000 + i as usize]).collect();
    let mut chunks = Vec::new();
    for p in &pieces {
        let hash = BlobHash::of(p);
        let hex = hash.to_hex();
        let path = tenant.join(format!("blobs/{}/{hex}", &hex[..2]));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut file = b"MBLB\x01\x00".to_vec();
        file.extend_from_slice(p);
        std::fs::write(path, file).unwrap();
        chunks.push(ChunkRef::Blob {
            blob: hash,
            len: p.len() as u64,
        });
    }
    let mut m = Manifest::new(
        job,
        1,
        SnapshotKind::Savepoint,
        Trigger::Manual,
        StateFormat::Canonical,
    );
    m.tasks.push(TaskState {
        key: TaskKey::new("count", 0),
        state: TaskStateData::Canonical {
            len: pieces.iter().map(|p| p.len() as u64).sum(),
            chunks,
        },
    });
    std::fs::create_dir_all(tenant.join("snapshots/wordcount")).unwrap();
    std::fs::write(
        tenant.join("snapshots/wordcount/wordcount-000001.json"),
        m.to_json(),
    )
    .unwrap();

    // Read as it is.
    assert!(ok(memento(dir.path(), &["snapshots", "list"])).contains("wordcount-000001"));
    assert!(ok(memento(dir.path(), &["fsck"])).contains("0 damaged"));
    let out = ok(memento(dir.path(), &["store", "migrate"]));
    assert!(
        out.starts_with("store layout 1 -> 2: packed 5 loose blobs"),
        "{out}"
    );
    assert!(out.contains("removed 5 loose files"), "{out}");
    assert!(!tenant.join("blobs").exists());
    let out = ok(memento(dir.path(), &["fsck"]));
    assert!(out.contains("checked 1 snapshots, 5 blobs"), "{out}");
    assert!(out.contains("1 packs"), "{out}");
    let file = dir.path().join("x.arc");
    ok(memento(
        dir.path(),
        &["savepoint", "export", "wordcount-1", file.to_str().unwrap()],
    ));
    // Again, and on a fresh store: nothing to do.
    let out = ok(memento(dir.path(), &["store", "migrate"]));
    assert!(
        out.starts_with("store layout 2 -> 2: packed 0 loose blobs"),
        "{out}"
    );
    let fresh = tempfile::tempdir().unwrap();
    populated(fresh.path());
    let out = ok(memento(fresh.path(), &["store", "migrate"]));
    assert!(
        out.starts_with("store layout 2 -> 2: packed 0 loose blobs"),
        "{out}"
    );
    assert!(ok(memento(fresh.path(), &["fsck"])).contains("0 damaged"));
}
