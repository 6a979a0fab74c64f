//! Self-contained snapshot archives for `savepoint export` / `import`.
//!
//! Layout (all integers little-endian; specified in docs/STORAGE.md):
//!
//! ```text
//! "MEMENTO-ARCHIVE\0"  16 bytes magic
//! version              u32 (1)
//! 'M' len:u64 json     the manifest, first, so an importer knows the job
//!                      before any blob arrives
//! 'B' hash:[u8;32] plain_len:u64 file_len:u64 file
//!                      one per distinct blob: the blob file as stored
//!                      (header + possibly compressed payload)
//! 'E' count:u64 digest:[u8;32]
//!                      number of 'B' records and blake3 of every byte
//!                      from the magic up to and including the 'E';
//!                      detects truncation and corruption
//! ```
//!
//! Import verifies every blob against its hash (and the digest at the end)
//! before the manifest is committed; a damaged archive leaves only garbage
//! blobs behind, never a snapshot.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use super::blob::MAX_CHUNK;
use super::blob::{self, BLOB_HEADER_LEN, BlobHash};
use super::error::StoreError;
use super::manifest::{Manifest, Trigger};
use super::name::SnapshotId;
use super::packed::Found;
use super::{BadChunk, TenantStore};

/// Archive magic.
pub const ARCHIVE_MAGIC: &[u8; 16] = b"MEMENTO-ARCHIVE\0";
/// Archive format version written by this build.
pub const ARCHIVE_VERSION: u32 = 1;

/// Progress of an export or import, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Archive bytes written or read so far.
    pub done_bytes: u64,
    /// Total archive bytes, if known.
    pub total_bytes: Option<u64>,
}

/// What an export or import did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ArchiveSummary {
    /// Snapshot exported, or the id the import committed.
    pub id: SnapshotId,
    /// Id in the archive (the source store's id).
    pub source_id: SnapshotId,
    /// Distinct blobs in the archive.
    pub blobs: usize,
    /// Blobs the import actually wrote (the rest were already present).
    pub blobs_new: usize,
    /// Archive size in bytes.
    pub archive_bytes: u64,
}

/// Counts and hashes everything that passes through.
struct Tee<T> {
    inner: T,
    hasher: blake3::Hasher,
    count: u64,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

fn arch_err(name: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Archive {
        name: name.to_string(),
        reason: reason.into(),
    }
}

impl TenantStore {
    /// Bytes blob `hash` takes in an archive (its blob file), for the
    /// progress total; 0 if it is missing (the export then fails on it).
    fn archived_blob_len(&self, hash: &BlobHash) -> Result<u64, StoreError> {
        Ok(match self.find_blob(hash)? {
            Some(Found::Packed { entry, .. }) => u64::from(entry.stored) + BLOB_HEADER_LEN as u64,
            Some(Found::Loose { size }) => size,
            None => 0,
        })
    }

    /// Writes snapshot `id` with all its blobs to `out` as an archive. Every
    /// blob is verified while being exported, so a damaged snapshot fails
    /// here rather than at import.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], [`StoreError::BadChunk`], I/O errors writing
    /// `out` (reported as [`StoreError::Archive`] named `name`).
    pub fn export(
        &self,
        id: &SnapshotId,
        out: &mut dyn Write,
        name: &str,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ArchiveSummary, StoreError> {
        let manifest = self.get(id)?;
        let json = manifest.to_json();
        // Distinct blobs in reference order, with the stored file sizes for
        // the progress total.
        let mut order: Vec<(BlobHash, u64, String, usize)> = Vec::new();
        let mut seen: HashMap<BlobHash, ()> = HashMap::new();
        for (task, index, c) in manifest.chunk_refs() {
            if let Some(h) = c.blob()
                && seen.insert(h, ()).is_none()
            {
                order.push((h, c.len(), task.to_string(), index));
            }
        }
        let mut total = 16 + 4 + 9 + json.len() as u64 + 41;
        self.refresh_index()?;
        for (h, ..) in &order {
            total += 49 + self.archived_blob_len(h)?;
        }
        let io_err = |e: io::Error| arch_err(name, format!("write failed: {e}"));
        let mut w = Tee {
            inner: BufWriter::with_capacity(1 << 20, out),
            hasher: blake3::Hasher::new(),
            count: 0,
        };
        w.write_all(ARCHIVE_MAGIC).map_err(io_err)?;
        w.write_all(&ARCHIVE_VERSION.to_le_bytes()).map_err(io_err)?;
        w.write_all(b"M").map_err(io_err)?;
        w.write_all(&(json.len() as u64).to_le_bytes()).map_err(io_err)?;
        w.write_all(&json).map_err(io_err)?;
        for (hash, len, task, index) in &order {
            let bad = |problem| {
                StoreError::BadChunk(Box::new(BadChunk {
                    snapshot: id.clone(),
                    task: task.clone(),
                    index: *index,
                    hash: *hash,
                    problem,
                    next_intact: self.next_intact_before(id).unwrap_or(None),
                }))
            };
            // As a layout-1 blob file, whether it is packed or loose: an
            // archive holds exactly the snapshot's blobs, never whole packs.
            let file = self.read_blob_file(hash, *len).map_err(bad)?;
            w.write_all(b"B").map_err(io_err)?;
            w.write_all(&hash.0).map_err(io_err)?;
            w.write_all(&len.to_le_bytes()).map_err(io_err)?;
            w.write_all(&(file.len() as u64).to_le_bytes()).map_err(io_err)?;
            w.write_all(&file).map_err(io_err)?;
            progress(Progress {
                done_bytes: w.count,
                total_bytes: Some(total),
            });
        }
        w.write_all(b"E").map_err(io_err)?;
        let digest = w.hasher.finalize();
        w.inner
            .write_all(&(order.len() as u64).to_le_bytes())
            .map_err(io_err)?;
        w.inner.write_all(digest.as_bytes()).map_err(io_err)?;
        w.inner.flush().map_err(io_err)?;
        let archive_bytes = w.count + 40;
        progress(Progress {
            done_bytes: archive_bytes,
            total_bytes: Some(archive_bytes),
        });
        Ok(ArchiveSummary {
            id: id.clone(),
            source_id: id.clone(),
            blobs: order.len(),
            blobs_new: 0,
            archive_bytes,
        })
    }

    /// Exports to a new file at `path` (synced before returning). The file
    /// is written under a temporary name and renamed, so a failed export
    /// leaves no partial archive behind.
    ///
    /// # Errors
    /// As [`TenantStore::export`]; an existing file at `path` is an error.
    pub fn export_to_file(
        &self,
        id: &SnapshotId,
        path: &Path,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ArchiveSummary, StoreError> {
        let name = path.display().to_string();
        if path.exists() {
            return Err(arch_err(&name, "already exists; not overwriting it"));
        }
        // A temporary file of our own (created exclusively, unique name)
        // beside the target: concurrent exports never share one, and a file
        // that merely looks like ours is never touched.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let file_name = path.file_name().map_or("export".into(), |n| n.to_string_lossy());
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{file_name}."))
            .suffix(".partial")
            .tempfile_in(dir)
            .map_err(|e| arch_err(&name, format!("cannot create a temporary file beside it: {e}")))?;
        let summary = self.export(id, tmp.as_file_mut(), &name, progress)?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| arch_err(&name, format!("cannot write: {e}")))?;
        // Linked into place only if nothing took the name meanwhile; on any
        // error the temporary file is removed when dropped.
        tmp.persist_noclobber(path).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                arch_err(&name, "already exists; not overwriting it")
            } else {
                arch_err(&name, format!("cannot write: {}", e.error))
            }
        })?;
        Ok(summary)
    }

    /// Adds the snapshot in the archive `input` to this tenant as a new
    /// snapshot of the same job and kind, numbered by this store's counter
    /// (ids differ between stores; the original id is kept in the manifest's
    /// `extra.imported_from`). Blobs already present are not written again;
    /// every blob is verified against its hash before the manifest commits.
    ///
    /// # Errors
    /// [`StoreError::Archive`] naming `name` and what is wrong (bad magic,
    /// unknown version, truncation, digest mismatch, a blob that does not
    /// match its hash); manifest errors; quota and I/O errors.
    pub fn import(
        &self,
        input: &mut dyn Read,
        name: &str,
        total_bytes: Option<u64>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ArchiveSummary, StoreError> {
        let mut r = Tee {
            inner: BufReader::with_capacity(1 << 20, input),
            hasher: blake3::Hasher::new(),
            count: 0,
        };
        let truncated = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                arch_err(name, "truncated (ends before the end record)")
            } else {
                arch_err(name, format!("read failed: {e}"))
            }
        };
        let mut magic = [0u8; 16];
        r.read_exact(&mut magic).map_err(truncated)?;
        if &magic != ARCHIVE_MAGIC {
            return Err(arch_err(name, "not a memento snapshot archive (bad magic)"));
        }
        let version = read_u32(&mut r).map_err(truncated)?;
        if version != ARCHIVE_VERSION {
            return Err(arch_err(
                name,
                format!("archive format version {version}; this build reads {ARCHIVE_VERSION}"),
            ));
        }
        if read_u8(&mut r).map_err(truncated)? != b'M' {
            return Err(arch_err(name, "expected the manifest record first"));
        }
        let len = read_u64(&mut r).map_err(truncated)?;
        if len > 256 << 20 {
            return Err(arch_err(
                name,
                format!("manifest record of {len} bytes is implausible"),
            ));
        }
        let mut json = vec![0u8; len as usize];
        r.read_exact(&mut json).map_err(truncated)?;
        // The name check in from_json needs the id; take it from the JSON.
        let source_id = serde_json::from_slice::<serde_json::Value>(&json)
            .ok()
            .and_then(|v| v.get("id")?.as_str().map(str::to_string))
            .unwrap_or_default();
        let source =
            Manifest::from_json(&source_id, &json).map_err(|e| arch_err(name, format!("manifest: {e}")))?;

        let number = self.next_snapshot_number(&source.job)?;
        let writer = self.begin(&source.job, number)?;
        let blobs = writer.blob_writer();
        let mut count = 0u64;
        let mut new = 0usize;
        loop {
            match read_u8(&mut r).map_err(truncated)? {
                b'B' => {
                    let mut hash = [0u8; 32];
                    r.read_exact(&mut hash).map_err(truncated)?;
                    let hash = BlobHash(hash);
                    let plain_len = read_u64(&mut r).map_err(truncated)?;
                    let file_len = read_u64(&mut r).map_err(truncated)?;
                    let limit = (MAX_CHUNK + MAX_CHUNK / 64 + BLOB_HEADER_LEN + 1024) as u64;
                    if plain_len > MAX_CHUNK as u64 || file_len > limit {
                        return Err(arch_err(name, format!("blob {hash} record is too large")));
                    }
                    let mut file = vec![0u8; file_len as usize];
                    r.read_exact(&mut file).map_err(truncated)?;
                    blob::decode(&file, &hash, Some(plain_len))
                        .map_err(|p| arch_err(name, format!("blob {hash}: {p}")))?;
                    if blobs.store_blob(hash, plain_len, || file)? {
                        new += 1;
                    }
                    count += 1;
                    progress(Progress {
                        done_bytes: r.count,
                        total_bytes,
                    });
                }
                b'E' => {
                    let digest = r.hasher.finalize();
                    let mut expected_count = [0u8; 8];
                    r.inner.read_exact(&mut expected_count).map_err(truncated)?;
                    let mut expected = [0u8; 32];
                    r.inner.read_exact(&mut expected).map_err(truncated)?;
                    if u64::from_le_bytes(expected_count) != count {
                        return Err(arch_err(name, "blob count in the end record does not match"));
                    }
                    if digest.as_bytes() != &expected {
                        return Err(arch_err(name, "digest mismatch: the archive is corrupt"));
                    }
                    break;
                }
                other => {
                    return Err(arch_err(name, format!("unknown record type {other:#04x}")));
                }
            }
        }
        let archive_bytes = r.count + 40;

        let mut manifest = source.clone();
        manifest.id = writer.id().clone();
        manifest.number = number;
        manifest.trigger = Trigger::Import;
        manifest.figures.async_ms = 0;
        manifest.extra.insert(
            "imported_from".into(),
            serde_json::json!({ "id": source.id.to_string(), "trigger": source.trigger }),
        );
        let id = writer.commit(manifest)?;
        progress(Progress {
            done_bytes: archive_bytes,
            total_bytes: Some(archive_bytes),
        });
        Ok(ArchiveSummary {
            id,
            source_id: source.id,
            blobs: count as usize,
            blobs_new: new,
            archive_bytes,
        })
    }

    /// Imports the archive file at `path`; see [`TenantStore::import`].
    ///
    /// # Errors
    /// As there; a file that cannot be opened is [`StoreError::Archive`].
    pub fn import_file(
        &self,
        path: &Path,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ArchiveSummary, StoreError> {
        let name = path.display().to_string();
        let mut file = std::fs::File::open(path).map_err(|e| arch_err(&name, format!("cannot open: {e}")))?;
        let total = file.metadata().ok().map(|m| m.len());
        self.import(&mut file, &name, total, progress)
    }
}

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}
