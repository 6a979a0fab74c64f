//! CLI commands over the snapshot store: `snapshots list|show`, `fsck`,
//! `gc`, `store migrate`, `savepoint export|import|dispose`. Parsing and printing only; all
//! work is done by `memento::store`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use memento::spec::format_size;
use memento::store::{
    JobName, Manifest, Progress, SnapshotId, SnapshotKind, Store, StoreError, StoreLocation, StoreOptions,
    TaskStateData, TenantStore,
};

/// Where the store is: flattened into every store command.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// The state directory holding the snapshot store: a local path, or
    /// s3://bucket/prefix on S3-compatible object storage (configured by
    /// AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_REGION, AWS_ALLOW_HTTP).
    #[arg(
        long,
        env = "MEMENTO_STATE_DIR",
        default_value = "memento-state",
        global = true,
        value_parser = parse_location
    )]
    pub state_dir: StoreLocation,
    /// The tenant whose snapshots to use.
    #[arg(long, default_value = "default", global = true)]
    pub tenant: String,
}

/// `memento snapshots ...`
#[derive(Debug, Clone, Subcommand)]
pub enum SnapshotsCommand {
    /// List checkpoints and savepoints side by side.
    List {
        /// Only snapshots of this job.
        #[arg(long)]
        job: Option<String>,
        /// Print JSON (an array of manifests) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot's manifest.
    Show {
        /// The snapshot id, e.g. wordcount-000042 (or wordcount-42).
        id: String,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `memento store ...`
#[derive(Debug, Clone, Subcommand)]
pub enum StoreCommand {
    /// Move a layout-1 store's loose blobs (one file each) into packs, for
    /// every tenant; resumable after a crash (run it again).
    Migrate,
}

/// Runs a [`StoreCommand`].
///
/// # Errors
/// No store at the state dir, a GC holding a tenant, I/O errors.
pub fn run_store(args: &StoreArgs, cmd: StoreCommand) -> anyhow::Result<()> {
    match cmd {
        StoreCommand::Migrate => {
            let store = open_store(args)?;
            let before = store.layout_version();
            let bar = progress_bar("migrate");
            let report = store.migrate(&mut on_progress(&bar));
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let r = report?;
            for d in &r.damaged {
                eprintln!("warning: damaged loose blob left in place: {d}");
            }
            println!(
                "store layout {before} -> {}: packed {} loose blobs ({}) into {} packs, {} were packed already; removed {} loose files",
                store.layout_version(),
                r.blobs_packed,
                format_size(r.bytes),
                r.packs_written,
                r.blobs_already_packed,
                r.loose_removed
            );
            if !r.damaged.is_empty() {
                bail!(
                    "{} damaged loose blobs were not migrated (see `memento fsck`)",
                    r.damaged.len()
                );
            }
            Ok(())
        }
    }
}

/// `memento savepoint export|import|dispose` (the store side of
/// `memento savepoint`; `trigger` needs a running job and is not here).
#[derive(Debug, Clone, Subcommand)]
pub enum SavepointFileCommand {
    /// Write a snapshot and all its blobs to a self-contained archive file.
    Export {
        /// The snapshot id.
        id: String,
        /// The archive file to create (must not exist).
        file: PathBuf,
    },
    /// Add the snapshot in an archive file to this store.
    Import {
        /// The archive file.
        file: PathBuf,
    },
    /// Delete a savepoint and collect the blobs only it used.
    Dispose {
        /// The savepoint id.
        id: String,
    },
}

/// Runs a [`SavepointFileCommand`].
///
/// # Errors
/// As the individual `run_savepoint_*` functions.
pub fn run_savepoint(store: &StoreArgs, cmd: SavepointFileCommand) -> anyhow::Result<()> {
    match cmd {
        SavepointFileCommand::Export { id, file } => run_savepoint_export(store, &id, &file),
        SavepointFileCommand::Import { file } => run_savepoint_import(store, &file),
        SavepointFileCommand::Dispose { id } => run_savepoint_dispose(store, &id),
    }
}

/// Opens the tenant's store, refusing to create a store where there is none
/// (a mistyped `--state-dir` should not silently show an empty list).
fn open(args: &StoreArgs) -> anyhow::Result<TenantStore> {
    Ok(open_store(args)?.tenant(&args.tenant)?)
}

/// As [`open`], for commands that only read: nothing on disk changes, so
/// they work on a read-only or full disk. (On object storage there is no
/// such mode to ask for: the store opens as usual.)
fn open_read_only(args: &StoreArgs) -> anyhow::Result<TenantStore> {
    check_store_exists(args)?;
    let store = match args.state_dir.local_path() {
        Some(dir) => Store::open_read_only(dir, StoreOptions::default())?,
        None => Store::open_location(&args.state_dir, StoreOptions::default())?,
    };
    Ok(store.tenant(&args.tenant)?)
}

/// As [`open`], the whole store.
fn open_store(args: &StoreArgs) -> anyhow::Result<Store> {
    check_store_exists(args)?;
    Ok(Store::open_location(&args.state_dir, StoreOptions::default())?)
}

/// Refuses a local state dir without a store. On object storage the
/// bucket must exist (opening checks it); a prefix is created like a
/// directory's first file.
fn check_store_exists(args: &StoreArgs) -> anyhow::Result<()> {
    if let Some(dir) = args.state_dir.local_path()
        && !dir.join(memento::store::STORE_FILE).is_file()
    {
        bail!(
            "no snapshot store at {} (set --state-dir or MEMENTO_STATE_DIR)",
            dir.display()
        );
    }
    Ok(())
}

/// `--state-dir`: a path or `s3://bucket/prefix`, checked before use.
pub fn parse_location(s: &str) -> Result<StoreLocation, String> {
    StoreLocation::parse(s).map_err(|e| e.to_string())
}

/// `memento snapshots list|show`.
///
/// # Errors
/// No store at the state dir, invalid names or ids, unknown snapshot,
/// damaged manifest (for `show`), I/O errors.
pub fn run_snapshots(store: &StoreArgs, cmd: SnapshotsCommand) -> anyhow::Result<()> {
    let tenant = open_read_only(store)?;
    match cmd {
        SnapshotsCommand::List { job, json } => list(&tenant, job.as_deref(), json),
        SnapshotsCommand::Show { id, json } => {
            let id = SnapshotId::parse(&id)?;
            let m = tenant.get(&id)?;
            if json {
                println!("{}", String::from_utf8_lossy(&m.to_json()));
            } else {
                print!("{}", format_manifest(&m));
            }
            Ok(())
        }
    }
}

/// A listed snapshot: its manifest, or why it does not read.
enum Row {
    Ok(Box<Manifest>),
    Damaged(SnapshotId, StoreError),
}

fn list(tenant: &TenantStore, job: Option<&str>, json: bool) -> anyhow::Result<()> {
    let jobs = match job {
        Some(j) => vec![JobName::new(j)?],
        None => tenant.jobs()?,
    };
    let mut rows = Vec::new();
    for job in jobs {
        for id in tenant.list_ids(&job)? {
            match tenant.get(&id) {
                Ok(m) => rows.push(Row::Ok(Box::new(m))),
                Err(StoreError::NotFound { .. }) => {} // deleted meanwhile
                Err(e @ (StoreError::CorruptManifest { .. } | StoreError::UnsupportedSchema { .. })) => {
                    rows.push(Row::Damaged(id, e));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    if json {
        let values: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| match r {
                Row::Ok(m) => serde_json::to_value(m).expect("manifest serializes"),
                Row::Damaged(id, e) => serde_json::json!({
                    "id": id.to_string(), "status": "damaged", "error": e.to_string()
                }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&values)?);
        return Ok(());
    }
    if rows.is_empty() {
        eprintln!("no snapshots (tenant {})", tenant.name());
        return Ok(());
    }
    let mut table = Vec::new();
    for r in &rows {
        table.push(match r {
            // A record without task state (a finished job's end-of-input
            // record) has no format and no size to show.
            Row::Ok(m) if m.tasks.is_empty() => vec![
                m.id.to_string(),
                snake(&m.kind),
                snake(&m.trigger),
                "-".into(),
                snake(&m.status),
                "-".into(),
                "-".into(),
                format!("{} ms", m.figures.duration_ms()),
                m.retention.to_string(),
            ],
            Row::Ok(m) => vec![
                m.id.to_string(),
                snake(&m.kind),
                snake(&m.trigger),
                snake(&m.format),
                snake(&m.status),
                format_size(m.figures.logical_bytes),
                format_size(m.figures.new_bytes),
                format!("{} ms", m.figures.duration_ms()),
                m.retention.to_string(),
            ],
            Row::Damaged(id, _) => {
                let mut row = vec![id.to_string()];
                row.extend(["-", "-", "-", "damaged", "-", "-", "-", "-"].map(String::from));
                row
            }
        });
    }
    print!(
        "{}",
        super::table::render(
            &[
                "ID",
                "KIND",
                "TRIGGER",
                "FORMAT",
                "STATUS",
                "LOGICAL",
                "NEW",
                "DURATION",
                "RETENTION"
            ],
            &["LOGICAL", "NEW", "DURATION"],
            &table,
        )
    );
    for r in &rows {
        if let Row::Damaged(_, e) = r {
            eprintln!("warning: {e}");
        }
    }
    Ok(())
}

/// The serde (snake_case) name of an enum value.
fn snake<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s.replace('_', "-"),
        _ => "?".into(),
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || format!("{ms} ms after 1970"),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        )
}

/// The human form of `snapshots show`.
fn format_manifest(m: &Manifest) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let f = &m.figures;
    let _ = writeln!(s, "snapshot   {}", m.id);
    let _ = writeln!(s, "  job        {} (number {})", m.job, m.number);
    let _ = writeln!(
        s,
        "  kind       {} ({}), {} format, {}",
        snake(&m.kind),
        snake(&m.trigger),
        snake(&m.format),
        snake(&m.status)
    );
    let _ = writeln!(s, "  created    {}", utc(m.created_at_ms));
    if m.completed_at_ms > 0 {
        let _ = writeln!(s, "  completed  {}", utc(m.completed_at_ms));
    }
    let _ = writeln!(s, "  retention  {}", m.retention);
    let _ = writeln!(
        s,
        "  size       {} logical, {} new ({} stored), {} of {} chunks new",
        format_size(f.logical_bytes),
        format_size(f.new_bytes),
        format_size(f.stored_bytes),
        f.chunks_new,
        f.chunks_total
    );
    let _ = writeln!(
        s,
        "  duration   {} ms (sync {} ms, async {} ms, commit {} ms)",
        f.duration_ms(),
        f.sync_ms,
        f.async_ms,
        f.commit_ms
    );
    if !m.components.is_empty() {
        let _ = writeln!(s, "  components");
        for (op, hash) in &m.components {
            let _ = writeln!(s, "    {op:<16} {hash}");
        }
    }
    let _ = writeln!(s, "  tasks");
    for t in &m.tasks {
        let chunks = t.state.chunks().count();
        let zero = t.state.chunks().filter(|c| c.blob().is_none()).count();
        let what = match &t.state {
            TaskStateData::Canonical { .. } => "canonical".to_string(),
            TaskStateData::Native { memories, .. } => match memories.len() {
                1 => "native, 1 memory".to_string(),
                n => format!("native, {n} memories"),
            },
        };
        let _ = writeln!(
            s,
            "    {:<20} {what}, {}, {chunks} chunks ({zero} zero)",
            t.key.to_string(),
            format_size(t.state.logical_bytes())
        );
        if let TaskStateData::Native { memories, .. } = &t.state {
            for m in memories {
                let zero = m.chunks.iter().filter(|c| c.blob().is_none()).count();
                let new = m
                    .new_chunks
                    .map_or_else(|| "? new".to_string(), |n| format!("{n} new"));
                let chain = match m.deltas.len() {
                    0 => String::new(),
                    n => format!(
                        ", then {n} page deltas ({}, {} pages changed in the last)",
                        format_size(m.deltas.iter().map(|d| d.len).sum()),
                        m.deltas.last().map_or(0, |d| d.pages)
                    ),
                };
                let _ = writeln!(
                    s,
                    "      memory {:<13} {}, {} chunks of {} ({zero} zero, {new}){chain}",
                    m.index,
                    format_size(m.size),
                    m.chunks.len(),
                    format_size(m.chunk_size)
                );
            }
        }
    }
    if !m.source_positions.is_empty() {
        let _ = writeln!(s, "  sources");
        for p in &m.source_positions {
            let _ = writeln!(s, "    {}[{}] at {}", p.source, p.task_index, p.position);
        }
    }
    if !m.sink_commit.is_null() {
        let _ = writeln!(s, "  sink       {}", m.sink_commit);
    }
    s
}

/// `memento fsck`: verifies every manifest and blob of the tenant; exit code
/// 1 if any snapshot is damaged.
///
/// # Errors
/// No store at the state dir, I/O errors that stop the scan.
pub fn run_fsck(store: &StoreArgs, repair_index: bool) -> anyhow::Result<ExitCode> {
    let tenant = if repair_index {
        open(store)?
    } else {
        open_read_only(store)?
    };
    let mut r = tenant.fsck()?;
    if repair_index
        && (!r.damaged_indexes.is_empty() || !r.unindexed_packs.is_empty() || !r.damaged.is_empty())
    {
        let repaired = tenant.repair_index()?;
        println!(
            "repaired the index: {} blobs of {} packs indexed from the packs, {} damaged records left out, {} damaged index files removed",
            repaired.blobs_indexed,
            repaired.packs_indexed,
            repaired.records_skipped,
            repaired.indexes_removed
        );
        r = tenant.fsck()?;
    }
    for d in &r.damaged {
        println!("DAMAGED {}", d.id);
        for p in d.problems.iter().take(10) {
            println!("  {p}");
        }
        if d.problems.len() > 10 {
            println!("  ... and {} more problems", d.problems.len() - 10);
        }
    }
    for f in &r.misplaced_manifests {
        println!(
            "MISPLACED {f} (a manifest-like file that nothing lists; gc refuses to run until it is moved or removed)"
        );
    }
    for p in &r.damaged_packs {
        println!("DAMAGED PACK {p}");
    }
    for i in &r.damaged_indexes {
        println!("DAMAGED INDEX {i} (memento fsck --repair-index rebuilds it from the packs)");
    }
    for p in &r.unindexed_packs {
        println!(
            "UNINDEXED {p} (garbage of an interrupted writer, or a lost index: memento fsck --repair-index)"
        );
    }
    for f in &r.stray_files {
        eprintln!("warning: stray file {f}");
    }
    println!(
        "checked {} snapshots, {} blobs ({}), {} packs, {} index files in {} ms; {} damaged, {} unreferenced blobs",
        r.snapshots_checked,
        r.blobs_checked,
        format_size(r.bytes_checked),
        r.packs_checked,
        r.index_files_checked,
        r.duration_ms,
        r.damaged.len(),
        r.unreferenced_blobs
    );
    if r.is_clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        let ids: Vec<&str> = r.damaged.iter().map(|d| d.id.as_str()).collect();
        if !ids.is_empty() {
            eprintln!("error: damaged snapshots: {}", ids.join(", "));
        }
        if !r.misplaced_manifests.is_empty() {
            eprintln!("error: misplaced manifests: {}", r.misplaced_manifests.join(", "));
        }
        if !r.damaged_packs.is_empty() || !r.damaged_indexes.is_empty() {
            eprintln!(
                "error: {} damaged packs, {} damaged index files",
                r.damaged_packs.len(),
                r.damaged_indexes.len()
            );
        }
        Ok(ExitCode::FAILURE)
    }
}

/// `memento gc`: deletes unreferenced blobs and prints what it freed.
///
/// # Errors
/// A damaged manifest (GC refuses to guess), a store busy for too long, I/O
/// errors.
pub fn run_gc(store: &StoreArgs) -> anyhow::Result<()> {
    let tenant = open(store)?;
    let r = tenant.gc().map_err(|e| match &e {
        StoreError::CorruptManifest { id, .. } => anyhow::anyhow!(
            "{e}; gc deletes nothing while a manifest is unreadable (it may reference any blob): \
             restore the file, or remove the snapshot with `memento savepoint dispose {id}`"
        ),
        _ => e.into(),
    })?;
    println!(
        "removed {} blobs, freed {}; kept {} blobs referenced by {} snapshots ({} ms); \
         removed {} packs, rewrote {} ({} written), merged {} index files",
        r.blobs_removed,
        format_size(r.bytes_freed),
        r.blobs_referenced,
        r.snapshots,
        r.duration_ms,
        r.packs_removed,
        r.packs_rewritten,
        format_size(r.bytes_rewritten),
        r.index_files_merged
    );
    Ok(())
}

/// A progress bar on stderr when it is a terminal, nothing otherwise.
fn progress_bar(message: &'static str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(message);
    Some(bar)
}

fn on_progress(bar: &Option<indicatif::ProgressBar>) -> impl FnMut(Progress) + '_ {
    move |p: Progress| {
        if let Some(bar) = bar {
            if let Some(total) = p.total_bytes {
                bar.set_length(total);
            }
            bar.set_position(p.done_bytes);
        }
    }
}

/// `memento savepoint export ID FILE`.
///
/// # Errors
/// Invalid or unknown id, a damaged snapshot (the error names the chunk),
/// FILE exists or cannot be written.
pub fn run_savepoint_export(store: &StoreArgs, id: &str, file: &Path) -> anyhow::Result<()> {
    let tenant = open_read_only(store)?;
    let id = SnapshotId::parse(id)?;
    let bar = progress_bar("export");
    let summary = tenant.export_to_file(&id, file, &mut on_progress(&bar));
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = summary?;
    println!(
        "exported {} to {} ({} blobs, {})",
        summary.id,
        file.display(),
        summary.blobs,
        format_size(summary.archive_bytes)
    );
    Ok(())
}

/// `memento savepoint import FILE`: prints the id the snapshot got here.
///
/// # Errors
/// The archive is unreadable, malformed, truncated or fails verification
/// (nothing is committed then); quota; I/O errors.
pub fn run_savepoint_import(store: &StoreArgs, file: &Path) -> anyhow::Result<()> {
    // Importing into a fresh state dir is normal: create the store.
    let s = Store::open_location(&store.state_dir, StoreOptions::default())
        .with_context(|| format!("opening the store at {}", store.state_dir))?;
    let tenant = s.tenant(&store.tenant)?;
    let bar = progress_bar("import");
    let summary = tenant.import_file(file, &mut on_progress(&bar));
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = summary?;
    println!(
        "imported {} as {} ({} blobs, {} new)",
        summary.source_id, summary.id, summary.blobs, summary.blobs_new
    );
    Ok(())
}

/// `memento savepoint dispose ID`: deletes a savepoint (not a checkpoint)
/// and runs GC to free the blobs only it used.
///
/// # Errors
/// Invalid or unknown id, the id is a checkpoint, I/O errors. A GC failure
/// after the delete is reported as a warning (the savepoint is gone; the
/// next `memento gc` frees its blobs).
pub fn run_savepoint_dispose(store: &StoreArgs, id: &str) -> anyhow::Result<()> {
    let tenant = open(store)?;
    let id = SnapshotId::parse(id)?;
    match tenant.get(&id) {
        Ok(m) if m.kind != SnapshotKind::Savepoint => bail!(
            "{id} is a {}, not a savepoint; checkpoints are removed by their retention",
            snake(&m.kind)
        ),
        Ok(_) => {}
        // A damaged snapshot restores nothing and stops `gc`: let the user
        // remove it, whatever its kind was.
        Err(e @ StoreError::CorruptManifest { .. }) => {
            eprintln!("warning: {e}; removing the damaged snapshot")
        }
        Err(e) => return Err(e.into()),
    }
    tenant.delete(&id)?;
    match tenant.gc() {
        Ok(r) => println!(
            "disposed {id}; freed {} ({} blobs)",
            format_size(r.bytes_freed),
            r.blobs_removed
        ),
        Err(e) => {
            println!("disposed {id}");
            eprintln!("warning: its blobs were not collected yet: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_dates_print_as_humans_read_them() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(1 << 30), "1.0 GiB");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_709_210_096_000), "2024-02-29 12:34:56 UTC");
        assert_eq!(utc(u64::MAX), "18446744073709551615 ms after 1970");
    }
}
