//! The store on a full and on a read-only disk, for real: a tmpfs mounted
//! in a private mount namespace (`unshare -rm`, no privileges needed),
//! filled to the last block, then remounted read-only. The commands that
//! only read must work on both; `savepoint dispose` and `gc`, the way out
//! of a full disk, must free space on it; a command that fails must leave
//! nothing behind, and nothing stored may be lost.

use std::path::Path;
use std::process::Command;

use memento::store::*;

/// A store with three savepoints of job `wc`, 1 MiB of incompressible state
/// each (no blob shared), collected once so that one index file covers
/// every pack, as on a store that has run for a while.
fn populated(dir: &Path) {
    let t = Store::open(dir, StoreOptions::default())
        .unwrap()
        .tenant("default")
        .unwrap();
    let job = JobName::new("wc").unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    for _ in 0..3 {
        let state: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let n = t.next_snapshot_number(&job).unwrap();
        let mut w = t.begin(&job, n).unwrap();
        let chunks = w.put_chunks_cdc(&state).unwrap();
        let mut m = w.manifest(SnapshotKind::Savepoint, Trigger::Manual, StateFormat::Canonical);
        m.tasks.push(TaskState {
            key: TaskKey::new("count", 0),
            state: TaskStateData::Canonical {
                len: state.len() as u64,
                chunks,
            },
        });
        w.commit(m).unwrap();
    }
    t.gc().unwrap();
}

/// Runs `script` with `sh -eu` in a private user and mount namespace, with
/// `$M` the memento binary, `$SRC` the populated store and `$WORK` a
/// scratch directory on the ordinary disk; returns its stdout.
fn in_namespace(src: &Path, work: &Path, script: &str) -> String {
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-eu", "-c", script])
        .env("M", env!("CARGO_BIN_EXE_memento"))
        .env("SRC", src)
        .env("WORK", work)
        .env_remove("MEMENTO_STATE_DIR")
        .output()
        .expect("this test needs `unshare` (util-linux) and unprivileged user namespaces");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the namespace script failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The section of `out` after the line `== name`, up to the next `==` line.
fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let start = out
        .find(&format!("== {name}\n"))
        .unwrap_or_else(|| panic!("no section {name} in:\n{out}"))
        + name.len()
        + 4;
    let rest = &out[start..];
    &rest[..rest.find("\n== ").map_or(rest.len(), |e| e + 1)]
}

/// Mounts a tmpfs with 256 KiB more than the store needs at `$WORK/disk`,
/// copies the store there as `$S` and fills the rest.
const FULL_DISK: &str = r#"
D="$WORK/disk"; mkdir -p "$D"
KB=$(du -sk "$SRC" | cut -f1)
mount -t tmpfs -o size=$((KB + 256))k tmpfs "$D"
cp -a "$SRC" "$D/state"; S="$D/state"
dd if=/dev/zero of="$D/fill" bs=4k 2>/dev/null || true
echo "== avail"; df -k "$D" | awk 'NR == 2 { print $4 }'
run() { name=$1; shift; echo "== $name"; "$M" "$@" --state-dir "$S" 2>&1 && echo "exit 0" || echo "exit $?"; }
"#;

#[test]
fn read_only_commands_dispose_and_gc_work_on_a_full_disk() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("state");
    populated(&src);
    let script = format!(
        "{FULL_DISK}{}",
        r#"
run list snapshots list
run show snapshots show wc-000003
run fsck fsck
run export savepoint export wc-000002 "$WORK/wc-2.tar"
run import savepoint import "$WORK/wc-2.tar"
echo "== owners"; ls "$S/tmp" | grep -c owner || true
run dispose savepoint dispose wc-000001
run gc gc
echo "== avail after"; df -k "$D" | awk 'NR == 2 { print $4 }'
run fsck-after fsck
echo "== owners after"; ls "$S/tmp" | grep -c owner || true
"#
    );
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = in_namespace(&src, &work, &script);

    let avail: u64 = section(&out, "avail").trim().parse().unwrap();
    assert_eq!(avail, 0, "the disk is not full:\n{out}");
    let list = section(&out, "list");
    assert!(list.contains("wc-000003") && list.contains("exit 0"), "{out}");
    assert!(section(&out, "show").contains("exit 0"), "{out}");
    assert!(section(&out, "fsck").contains("0 damaged"), "{out}");
    assert!(section(&out, "export").contains("exit 0"), "{out}");
    assert!(work.join("wc-2.tar").metadata().unwrap().len() > 1 << 20);
    // Importing needs space: a one-line error naming the reason, and no
    // owner file (nor anything else) left behind by the failed attempt.
    let import = section(&out, "import");
    assert!(
        import.contains("No space left on device") && import.contains("exit 1"),
        "{out}"
    );
    assert_eq!(import.lines().count(), 2, "{out}");
    assert_eq!(section(&out, "owners").trim(), "0", "{out}");

    assert!(section(&out, "dispose").contains("disposed wc-000001"), "{out}");
    assert!(section(&out, "gc").contains("exit 0"), "{out}");
    let freed: u64 = section(&out, "avail after").trim().parse().unwrap();
    assert!(freed >= 1024, "dispose and gc freed only {freed} KiB:\n{out}");
    let fsck = section(&out, "fsck-after");
    assert!(
        fsck.contains("checked 2 snapshots") && fsck.contains("0 damaged"),
        "{out}"
    );
    assert_eq!(section(&out, "owners after").trim(), "0", "{out}");
}

#[test]
fn read_only_commands_work_on_a_read_only_disk_and_changes_fail_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("state");
    populated(&src);
    let script = format!(
        "{FULL_DISK}{}",
        r#"
rm "$D/fill"
mount -o remount,ro "$D"
run list snapshots list
run show snapshots show wc-000002
run fsck fsck
run export savepoint export wc-000002 "$WORK/wc-2.tar"
run dispose savepoint dispose wc-000001
run gc gc
run import savepoint import "$WORK/wc-2.tar"
echo "== snapshots"; ls "$S/tenants/default/snapshots/wc"
"#
    );
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = in_namespace(&src, &work, &script);

    for read in ["list", "show", "export"] {
        assert!(section(&out, read).contains("exit 0"), "{read}:\n{out}");
    }
    assert!(section(&out, "fsck").contains("checked 3 snapshots, "), "{out}");
    assert!(section(&out, "fsck").contains("0 damaged"), "{out}");
    for change in ["dispose", "gc", "import"] {
        let s = section(&out, change);
        assert!(
            s.contains("Read-only file system") && s.contains("exit 1"),
            "{change}:\n{out}"
        );
        assert_eq!(s.lines().count(), 2, "{change}: not one line:\n{out}");
    }
    let snapshots = section(&out, "snapshots");
    assert_eq!(snapshots.lines().count(), 3, "{out}");
}
