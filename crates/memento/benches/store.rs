//! Benchmarks of the snapshot store, beside the physical limits measured in
//! the same run on the same machine: memcpy and blake3 of the same bytes,
//! and writing them to the same disk with fsync.
//!
//! Run: `cargo bench -p memento --bench store` (sizes in MiB via
//! `MEMENTO_BENCH_SIZES=64,256,1024`, repetitions via `MEMENTO_BENCH_REPS`,
//! default 3; medians are reported). Prints Markdown tables for
//! docs/PERFORMANCE.md.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memento::store::*;

mod common;
use common::{MIB, Rng, median, memory_image};

fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..reps {
        let start = Instant::now();
        let out = f();
        times.push(start.elapsed());
        last = Some(out);
    }
    (median(times), last.unwrap())
}

/// Like `time`, but `setup` (untimed) runs before each repetition: deleting
/// the previous repetition's files must not count (with `discard` mounts it
/// costs as much as writing).
fn time_with<S, T>(reps: usize, mut setup: impl FnMut() -> S, mut f: impl FnMut(S) -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..reps {
        let input = setup();
        let start = Instant::now();
        let out = f(input);
        times.push(start.elapsed());
        last = Some(out);
    }
    (median(times), last.unwrap())
}

fn open_fresh(base: &Path, name: &str, compression: Compression) -> TenantStore {
    let dir = fresh_dir(base, name);
    Store::open(&dir, options(compression))
        .unwrap()
        .tenant("bench")
        .unwrap()
}

fn mibs(bytes: usize, d: Duration) -> String {
    format!("{:.0} MiB/s", bytes as f64 / MIB as f64 / d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn fresh_dir(base: &Path, name: &str) -> PathBuf {
    let dir = base.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn options(compression: Compression) -> StoreOptions {
    StoreOptions {
        compression,
        ..StoreOptions::default()
    }
}

/// Writes `image` as a native snapshot; returns its manifest.
fn write_snapshot(t: &TenantStore, job: &JobName, image: &[u8], chunk: usize) -> Manifest {
    let n = t.next_snapshot_number(job).unwrap();
    let mut w = t.begin(job, n).unwrap();
    let chunks = w.put_chunks_fixed(image, chunk).unwrap();
    let mut m = w.manifest(SnapshotKind::Checkpoint, Trigger::Periodic, StateFormat::Native);
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Native {
            memories: vec![MemoryImage {
                index: 0,
                size: image.len() as u64,
                chunk_size: chunk as u64,
                chunks,
                new_chunks: None,
                base_size: None,
                deltas: Vec::new(),
            }],
            extra: serde_json::Value::Null,
        },
    });
    let id = w.commit(m).unwrap();
    t.get(&id).unwrap()
}

fn chunks_of(m: &Manifest) -> Vec<ChunkRef> {
    m.tasks[0].state.chunks().copied().collect()
}

/// Changes one byte in `fraction` of the chunks (spread evenly); returns the
/// number of chunks changed.
fn dirty(image: &mut [u8], chunk: usize, fraction: f64, rng: &mut Rng) -> usize {
    let n = image.len() / chunk;
    let changed = ((n as f64 * fraction).round() as usize).max(1);
    let step = n / changed;
    for i in 0..changed {
        let at = (i * step) * chunk + (rng.next() as usize % chunk);
        image[at] = image[at].wrapping_add(1) | 1;
    }
    changed
}

fn main() {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("store-bench");
    let sizes: Vec<usize> = std::env::var("MEMENTO_BENCH_SIZES")
        .unwrap_or_else(|_| "64,256,1024".into())
        .split(',')
        .map(|s| s.trim().parse::<usize>().expect("sizes in MiB"))
        .collect();
    let reps: usize = std::env::var("MEMENTO_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let threads = StoreOptions::default().threads;
    println!("# store benchmark: {reps} repetitions, medians; {threads} store threads");
    println!("# disk: {}", base.display());
    println!();

    println!("## Full and incremental snapshots (256 KiB chunks, default codec: none)");
    println!();
    println!(
        "| state | memcpy | blake3 | write+fsync | full write | full / limit | read back | incr 1 % written/changed | incr 1 % time | incr 10 % written/changed | incr 10 % time | unchanged again |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &size_mib in &sizes {
        let len = size_mib * MIB;
        let image = memory_image(len, 42);
        let mut copy = vec![0u8; len];
        let (t_memcpy, _) = time(reps, || copy.copy_from_slice(&image));
        drop(copy);
        let (t_blake3, _) = time(reps, || blake3::hash(&image));
        let raw_dir = fresh_dir(&base, "raw");
        let path = raw_dir.join("image");
        let (t_disk, _) = time_with(
            reps,
            || {
                let _ = std::fs::remove_file(&path);
            },
            |()| {
                let mut f = std::fs::File::create(&path).unwrap();
                f.write_all(&image).unwrap();
                f.sync_all().unwrap();
            },
        );
        let _ = std::fs::remove_file(&path);
        let limit = t_blake3.max(t_disk);

        // Full writes: a fresh store each repetition (nothing to dedupe).
        let (t_full, m) = time_with(
            reps,
            || open_fresh(&base, "full", Compression::default()),
            |t| write_snapshot(&t, &JobName::new("j").unwrap(), &image, DEFAULT_FIXED_CHUNK),
        );
        let dir = base.join("full");
        let t = Store::open(&dir, options(Compression::default()))
            .unwrap()
            .tenant("bench")
            .unwrap();
        let chunks = chunks_of(&m);
        let (t_read, _) = time(reps, || {
            t.read_chunks(&m.id, &TaskKey::new("op", 0), &chunks).unwrap()
        });

        let job = JobName::new("j").unwrap();
        let mut rng = Rng(7);
        let mut incr = Vec::new();
        for fraction in [0.01, 0.10] {
            let mut samples = Vec::new();
            let mut ratio = 0.0;
            for _ in 0..reps {
                let mut next = image.clone();
                let changed = dirty(&mut next, DEFAULT_FIXED_CHUNK, fraction, &mut rng);
                let start = Instant::now();
                let m2 = write_snapshot(&t, &job, &next, DEFAULT_FIXED_CHUNK);
                samples.push(start.elapsed());
                ratio = m2.figures.new_bytes as f64 / (changed * DEFAULT_FIXED_CHUNK) as f64;
            }
            incr.push((ratio, median(samples)));
        }
        let start = Instant::now();
        let again = write_snapshot(&t, &job, &image, DEFAULT_FIXED_CHUNK);
        let t_again = start.elapsed();
        println!(
            "| {size_mib} MiB | {} | {} | {} | {} ({}) | {:.2} | {} | {:.2} | {} | {:.2} | {} | {} new bytes, {} |",
            mibs(len, t_memcpy),
            mibs(len, t_blake3),
            mibs(len, t_disk),
            mibs(len, t_full),
            ms(t_full),
            t_full.as_secs_f64() / limit.as_secs_f64(),
            mibs(len, t_read),
            incr[0].0,
            ms(incr[0].1),
            incr[1].0,
            ms(incr[1].1),
            again.figures.new_bytes,
            ms(t_again),
        );
    }
    println!();

    // Durable files per checkpoint, counted at the backend.
    println!("## fsyncs per checkpoint (fsyncs on, 64 MiB image, 1 % of chunks changed)");
    println!();
    println!("| checkpoint | file fsyncs | directory fsyncs | of which the counter's |");
    println!("|---|---|---|---|");
    {
        let dir = fresh_dir(&base, "fsyncs");
        let backend = std::sync::Arc::new(LocalDir::open(&dir).unwrap());
        let store = Store::with_backend(backend.clone(), options(Compression::default()), "bench").unwrap();
        let t = store.tenant("bench").unwrap();
        let job = JobName::new("j").unwrap();
        let mut image = memory_image(64 * MIB, 11);
        write_snapshot(&t, &job, &image, DEFAULT_FIXED_CHUNK);
        let mut rng = Rng(5);
        for (what, fraction) in [
            ("incremental, 1 % changed", Some(0.01)),
            ("unchanged (a savepoint after a checkpoint)", None),
        ] {
            if let Some(f) = fraction {
                dirty(&mut image, DEFAULT_FIXED_CHUNK, f, &mut rng);
            }
            let before = backend.sync_counts();
            let n = t.next_snapshot_number(&job).unwrap();
            let counter = backend.sync_counts();
            let mut w = t.begin(&job, n).unwrap();
            let chunks = w.put_chunks_fixed(&image, DEFAULT_FIXED_CHUNK).unwrap();
            let mut m = w.manifest(SnapshotKind::Checkpoint, Trigger::Periodic, StateFormat::Native);
            m.tasks.push(TaskState {
                key: TaskKey::new("op", 0),
                state: TaskStateData::Native {
                    memories: vec![MemoryImage::new(
                        0,
                        image.len() as u64,
                        DEFAULT_FIXED_CHUNK as u64,
                        chunks,
                    )],
                    extra: serde_json::Value::Null,
                },
            });
            w.commit(m).unwrap();
            let after = backend.sync_counts();
            println!(
                "| {what} | {} | {} | {} + {} |",
                after.files - before.files,
                after.dirs - before.dirs,
                counter.files - before.files,
                counter.dirs - before.dirs
            );
        }
    }
    println!();

    // Pack size: full writes at several targets (the default's reason).
    let pack_len = sizes.iter().copied().max().unwrap_or(256).min(1024) * MIB;
    let pack_image = memory_image(pack_len, 42);
    let pack_path = fresh_dir(&base, "raw").join("image");
    let (t_pack_disk, _) = time_with(
        reps,
        || {
            let _ = std::fs::remove_file(&pack_path);
        },
        |()| {
            let mut f = std::fs::File::create(&pack_path).unwrap();
            f.write_all(&pack_image).unwrap();
            f.sync_all().unwrap();
        },
    );
    let _ = std::fs::remove_file(&pack_path);
    let (t_pack_blake3, _) = time(reps, || blake3::hash(&pack_image));
    let pack_limit = t_pack_blake3.max(t_pack_disk);
    println!(
        "## Pack size ({} MiB image, full write with fsync; limit {} in the same run)",
        pack_len / MIB,
        ms(pack_limit)
    );
    println!();
    println!("| pack size | packs | full write | full / limit | read back |");
    println!("|---|---|---|---|---|");
    for pack_mib in [1u64, 4, 16, 64] {
        let opts = StoreOptions {
            pack_size: pack_mib << 20,
            ..options(Compression::default())
        };
        let (t_write, m) = time_with(
            reps,
            || {
                let dir = fresh_dir(&base, "packsize");
                Store::open(&dir, opts.clone()).unwrap().tenant("bench").unwrap()
            },
            |t| write_snapshot(&t, &JobName::new("j").unwrap(), &pack_image, DEFAULT_FIXED_CHUNK),
        );
        let packs = std::fs::read_dir(base.join("packsize/tenants/bench/packs"))
            .unwrap()
            .count();
        let t = Store::open(&base.join("packsize"), opts.clone())
            .unwrap()
            .tenant("bench")
            .unwrap();
        let chunks = chunks_of(&m);
        let (t_read, _) = time(reps, || {
            t.read_chunks(&m.id, &TaskKey::new("op", 0), &chunks).unwrap()
        });
        println!(
            "| {pack_mib} MiB | {packs} | {} ({}) | {:.2} | {} |",
            mibs(pack_len, t_write),
            ms(t_write),
            t_write.as_secs_f64() / pack_limit.as_secs_f64(),
            mibs(pack_len, t_read)
        );
    }
    drop(pack_image);
    println!();

    // Codec and chunk size choices, on 256 MiB (or the smallest size given).
    let len = sizes.iter().copied().find(|&s| s >= 256).unwrap_or(sizes[0]) * MIB;
    let image = memory_image(len, 42);
    println!(
        "## Compression ({} MiB image, 256 KiB chunks, full write with fsync)",
        len / MIB
    );
    println!();
    println!("| codec | write | stored bytes | ratio | read back |");
    println!("|---|---|---|---|---|");
    for (name, c) in [
        ("none", Compression::None),
        ("zstd -3", Compression::Zstd { level: -3 }),
        ("zstd 1", Compression::Zstd { level: 1 }),
        ("zstd 3", Compression::Zstd { level: 3 }),
    ] {
        let (t_write, m) = time_with(
            reps,
            || open_fresh(&base, "codec", c),
            |t| write_snapshot(&t, &JobName::new("j").unwrap(), &image, DEFAULT_FIXED_CHUNK),
        );
        let t = Store::open(&base.join("codec"), options(c))
            .unwrap()
            .tenant("bench")
            .unwrap();
        let chunks = chunks_of(&m);
        let (t_read, _) = time(reps, || {
            t.read_chunks(&m.id, &TaskKey::new("op", 0), &chunks).unwrap()
        });
        println!(
            "| {name} | {} | {} | {:.2} | {} |",
            mibs(len, t_write),
            m.figures.stored_bytes,
            len as f64 / m.figures.stored_bytes as f64,
            mibs(len, t_read)
        );
    }
    println!();

    println!("## Fixed chunk size ({} MiB image, no compression)", len / MIB);
    println!();
    println!(
        "| chunk | full write | incremental, 0.1 % of 4 KiB pages dirty: bytes written | written / dirty bytes | manifest bytes |"
    );
    println!("|---|---|---|---|---|");
    for chunk in [64 * 1024, 256 * 1024, 1024 * 1024] {
        let (t_write, _) = time_with(
            reps,
            || open_fresh(&base, "chunk", Compression::default()),
            |t| write_snapshot(&t, &JobName::new("j").unwrap(), &image, chunk),
        );
        let t = Store::open(&base.join("chunk"), options(Compression::default()))
            .unwrap()
            .tenant("bench")
            .unwrap();
        // Scattered page writes, as a running operator makes them.
        let mut next = image.clone();
        let pages = len / 4096;
        let dirty_pages = pages / 1000;
        let mut rng = Rng(99);
        for _ in 0..dirty_pages {
            let at = (rng.next() as usize % pages) * 4096;
            next[at] = next[at].wrapping_add(1) | 1;
        }
        let m2 = write_snapshot(&t, &JobName::new("j").unwrap(), &next, chunk);
        let manifest_bytes = m2.to_json().len();
        println!(
            "| {} KiB | {} | {} | {:.1} | {} |",
            chunk / 1024,
            mibs(len, t_write),
            m2.figures.new_bytes,
            m2.figures.new_bytes as f64 / (dirty_pages * 4096) as f64,
            manifest_bytes
        );
    }
    println!();

    println!(
        "## FastCDC (canonical state, {} MiB, insert 100 bytes in the middle)",
        len / MIB / 4
    );
    println!();
    let state = memory_image(len / 4, 5);
    let dir = fresh_dir(&base, "cdc");
    let t = Store::open(&dir, options(Compression::default()))
        .unwrap()
        .tenant("bench")
        .unwrap();
    let job = JobName::new("j").unwrap();
    let start = Instant::now();
    let mut w = t.begin(&job, 1).unwrap();
    let first = w.put_chunks_cdc(&state).unwrap();
    let mut m = w.manifest(
        SnapshotKind::Checkpoint,
        Trigger::Periodic,
        StateFormat::Canonical,
    );
    m.tasks.push(TaskState {
        key: TaskKey::new("op", 0),
        state: TaskStateData::Canonical {
            len: state.len() as u64,
            chunks: first,
        },
    });
    w.commit(m).unwrap();
    let t_cdc = start.elapsed();
    let mut edited = state.clone();
    let mid = edited.len() / 2;
    edited.splice(mid..mid, std::iter::repeat_n(7u8, 100));
    let mut w = t.begin(&job, 2).unwrap();
    let start = Instant::now();
    let chunks = w.put_chunks_cdc(&edited).unwrap();
    let t_edit = start.elapsed();
    let m = w.manifest(
        SnapshotKind::Checkpoint,
        Trigger::Periodic,
        StateFormat::Canonical,
    );
    let id = w.commit(m).unwrap();
    let figures = t.get(&id).unwrap().figures;
    println!("| first write | after insertion | chunks | bytes rewritten |");
    println!("|---|---|---|---|");
    println!(
        "| {} | {} | {} (avg {} KiB) | {} |",
        mibs(state.len(), t_cdc),
        ms(t_edit),
        chunks.len(),
        state.len() / chunks.len() / 1024,
        figures.new_bytes
    );
    println!();

    println!("## GC with 1,000 snapshots");
    println!();
    let dir = fresh_dir(&base, "gc");
    let setup = StoreOptions {
        sync: false,
        ..StoreOptions::default()
    };
    let t = Store::open(&dir, setup).unwrap().tenant("bench").unwrap();
    let job = JobName::new("j").unwrap();
    let mut rng = Rng(3);
    let mut small = memory_image(16 * 64 * 1024, 9);
    let mut ids = Vec::new();
    for _ in 0..1000 {
        dirty(&mut small, 64 * 1024, 0.125, &mut rng);
        ids.push(write_snapshot(&t, &job, &small, 64 * 1024).id);
    }
    for id in ids.iter().step_by(2) {
        t.delete(id).unwrap();
    }
    let t = Store::open(&dir, StoreOptions::default())
        .unwrap()
        .tenant("bench")
        .unwrap();
    let start = Instant::now();
    let report = t.gc().unwrap();
    let t_gc = start.elapsed();
    let start = Instant::now();
    let again = t.gc().unwrap();
    let t_gc_again = start.elapsed();
    println!(
        "| snapshots | blobs | packs | removed | freed | packs removed / rewritten | bytes rewritten | gc | writers held back | gc, nothing to free |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} / {} | {} | {} | {} ms | {} ({} removed) |",
        report.snapshots,
        report.blobs_scanned,
        report.packs_scanned,
        report.blobs_removed,
        report.bytes_freed,
        report.packs_removed,
        report.packs_rewritten,
        report.bytes_rewritten,
        ms(t_gc),
        report.exclusive_ms,
        ms(t_gc_again),
        again.blobs_removed
    );
    let _ = std::fs::remove_dir_all(&base);
}
