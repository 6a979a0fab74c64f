//! A tenant's packed blobs: the merged index (refreshed from `index/`),
//! finding and reading a blob (in a pack, or loose in a layout-1 store),
//! and publishing new packs with their index in the write order of
//! docs/STORAGE.md.

use std::collections::HashSet;
use std::io;

use crate::backend::Staged;
use crate::blob::{self, BlobHash, BlobProblem};
use crate::index::{IndexFile, MAX_INDEX_LEN, MergedIndex, index_path, pack_path};
use crate::pack::{self, Entry, SealedPack};
use crate::{StoreError, TenantStore};

/// Where a blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// A record in a pack.
    Packed { pack: BlobHash, entry: Entry },
    /// A layout-1 blob file of this many bytes.
    Loose { size: u64 },
}

impl Found {
    /// Bytes it occupies on disk (what a quota counts).
    pub(crate) fn stored_size(&self) -> u64 {
        match self {
            Found::Packed { entry, .. } => entry.record_len(),
            Found::Loose { size } => *size,
        }
    }
}

impl TenantStore {
    pub(crate) fn pack_key(&self, name: &BlobHash) -> String {
        self.key(&pack_path(name))
    }

    pub(crate) fn index_key(&self, name: &BlobHash) -> String {
        self.key(&index_path(name))
    }

    /// Names of the files in `index/` that are named like index files.
    pub(crate) fn list_index_files(&self) -> Result<Vec<BlobHash>, StoreError> {
        let key = self.key("index");
        let names = self
            .backend()
            .list(&key)
            .map_err(|e| StoreError::io("list", key, e))?;
        Ok(names.iter().filter_map(|n| BlobHash::parse(n).ok()).collect())
    }

    /// Reads and checks one index file.
    pub(crate) fn read_index_file(&self, name: &BlobHash) -> Result<Result<IndexFile, String>, StoreError> {
        let key = self.index_key(name);
        // Bounded before it is read whole: the store is shared by tenants.
        match self.backend().size(&key) {
            Ok(Some(len)) if len > MAX_INDEX_LEN => {
                return Ok(Err(format!(
                    "is {len} bytes, more than an index may hold ({MAX_INDEX_LEN})"
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(StoreError::io("stat index", key, e)),
        }
        match self.backend().read(&key) {
            Ok(bytes) => Ok(IndexFile::parse(&bytes, name)),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(Err(e.to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Err("gone".into())),
            Err(e) => Err(StoreError::io("read index", key, e)),
        }
    }

    /// Brings the merged index up to date with `index/`: adds files that
    /// appeared; rebuilds it if any disappeared (GC consolidated them, and
    /// the packs they named may be gone). One directory listing when
    /// nothing changed.
    ///
    /// # Errors
    /// I/O errors listing or reading.
    pub(crate) fn refresh_index(&self) -> Result<(), StoreError> {
        if self.gc_grace().is_some() {
            return self.refresh_index_remote();
        }
        let listed: HashSet<BlobHash> = self.list_index_files()?.into_iter().collect();
        let (rebuild, new): (bool, Vec<BlobHash>) = {
            let idx = self.inner.index.read().unwrap();
            let rebuild = !idx.files.is_subset(&listed);
            let known = |n: &&BlobHash| {
                !rebuild && (idx.files.contains(n) || idx.damaged.iter().any(|(d, _)| *d == n.to_hex()))
            };
            (rebuild, listed.iter().filter(|n| !known(n)).copied().collect())
        };
        if !rebuild && new.is_empty() {
            return Ok(());
        }
        let mut loaded = Vec::with_capacity(new.len());
        for name in new {
            loaded.push((name, self.read_index_file(&name)?));
        }
        let mut idx = self.inner.index.write().unwrap();
        if rebuild {
            *idx = MergedIndex::default();
        }
        self.merge_loaded(&mut idx, loaded);
        Ok(())
    }

    /// Merge index files just read into `idx`; a damaged one is recorded
    /// (fsck reports it) and skipped, one that vanished meanwhile ignored.
    fn merge_loaded(&self, idx: &mut MergedIndex, loaded: Vec<(BlobHash, Result<IndexFile, String>)>) {
        for (name, file) in loaded {
            match file {
                Ok(file) => idx.merge(name, &file),
                Err(reason) if reason == "gone" => {}
                Err(reason) => {
                    tracing::warn!(tenant = %self.inner.name, index = %name, "index file skipped: {reason}");
                    idx.damaged.push((name.to_hex(), reason));
                }
            }
        }
    }

    /// The refresh on object storage: index objects, and the packs that
    /// carry their index in a trailer, and the packs a GC condemned (read
    /// after both listings, so the view is at least as new as its start).
    /// Notes when the listing started: what a writer's dedup relies on.
    fn refresh_index_remote(&self) -> Result<(), StoreError> {
        let _one = self.inner.refreshing.lock().unwrap();
        let view = std::time::Instant::now();
        let listed: HashSet<BlobHash> = self.list_index_files()?.into_iter().collect();
        let packs = self.list_packs()?;
        let condemned = self.read_condemned()?;
        let (rebuild, new) = {
            let idx = self.inner.index.read().unwrap();
            let rebuild = !idx.files.is_subset(&listed)
                || !idx.trailers.is_subset(&packs)
                || idx.condemned != condemned;
            let known = |n: &&BlobHash| {
                !rebuild && (idx.files.contains(n) || idx.damaged.iter().any(|(d, _)| *d == n.to_hex()))
            };
            let new: Vec<BlobHash> = listed.iter().filter(|n| !known(n)).copied().collect();
            (rebuild, new)
        };
        let mut loaded = Vec::with_capacity(new.len());
        for name in new {
            loaded.push((name, self.read_index_file(&name)?));
        }
        let described: HashSet<BlobHash> = {
            let idx = self.inner.index.read().unwrap();
            let mut d: HashSet<BlobHash> = HashSet::new();
            if !rebuild {
                d.extend(idx.packs.iter().map(|p| p.0));
                d.extend(idx.no_trailer.iter().copied());
            }
            for (_, file) in &loaded {
                if let Ok(file) = file {
                    d.extend(file.packs.iter().map(|p| p.0));
                }
            }
            d
        };
        let mut trailers = Vec::new();
        for name in packs.iter().filter(|p| !described.contains(*p)) {
            let key = self.pack_key(name);
            let Some(len) = self
                .backend()
                .size(&key)
                .map_err(|e| StoreError::io("stat pack", key.clone(), e))?
            else {
                continue;
            };
            match pack::read_trailer(self.backend(), &key, name, len) {
                Ok(t) => trailers.push((*name, len, t)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("read pack", key, e)),
            }
        }
        let mut idx = self.inner.index.write().unwrap();
        if rebuild {
            *idx = MergedIndex::default();
            idx.condemned = condemned;
        }
        self.merge_loaded(&mut idx, loaded);
        for (name, len, trailer) in trailers {
            match trailer {
                Ok(entries) => idx.merge_trailer(name, len, entries),
                // A layout-2 pack of format 1 whose index object is lost,
                // or a damaged one: GC and fsck walk it.
                Err(reason) => {
                    tracing::warn!(tenant = %self.inner.name, pack = %name, "pack has no usable trailer: {reason}");
                    idx.no_trailer.insert(name);
                }
            }
        }
        idx.view = Some(view);
        Ok(())
    }

    /// Key of the list of packs a GC on object storage is about to delete.
    pub(crate) fn condemned_key(&self) -> String {
        self.key("gc/condemned")
    }

    /// The packs a GC on object storage condemned (empty if none).
    pub(crate) fn read_condemned(&self) -> Result<HashSet<BlobHash>, StoreError> {
        let key = self.condemned_key();
        match self.backend().read(&key) {
            Ok(bytes) => {
                let damaged = |why: String| {
                    StoreError::io(
                        "read condemned packs",
                        key.clone(),
                        io::Error::new(io::ErrorKind::InvalidData, why),
                    )
                };
                if bytes.len() > crate::index::MAX_INDEX_LEN as usize {
                    return Err(damaged(format!("{} bytes", bytes.len())));
                }
                let names: Vec<String> =
                    serde_json::from_slice(&bytes).map_err(|e| damaged(format!("damaged: {e}")))?;
                names
                    .iter()
                    .map(|n| BlobHash::parse(n).map_err(|_| damaged(format!("{n:?} is not a pack name"))))
                    .collect()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashSet::new()),
            Err(e) => Err(StoreError::io("read condemned packs", key, e)),
        }
    }

    /// Where blob `hash` is, by the cached index, then (layout 1) its loose
    /// file. Does not refresh.
    pub(crate) fn find_blob(&self, hash: &BlobHash) -> Result<Option<Found>, StoreError> {
        self.find_blob_in(hash, false)
    }

    /// As [`TenantStore::find_blob`], but never in a condemned pack: what
    /// a writer may reference without storing the blob again.
    pub(crate) fn find_blob_live(&self, hash: &BlobHash) -> Result<Option<Found>, StoreError> {
        self.find_blob_in(hash, true)
    }

    fn find_blob_in(&self, hash: &BlobHash, live: bool) -> Result<Option<Found>, StoreError> {
        let found = {
            let idx = self.inner.index.read().unwrap();
            if live { idx.get_live(hash) } else { idx.get(hash) }
        };
        if let Some((pack, entry)) = found {
            return Ok(Some(Found::Packed { pack, entry }));
        }
        if !self.has_loose_blobs() {
            return Ok(None);
        }
        let key = self.blob_key(hash);
        Ok(self
            .backend()
            .size(&key)
            .map_err(|e| StoreError::io("stat blob", key, e))?
            .map(|size| Found::Loose { size }))
    }

    /// Whether the tenant may hold loose (layout-1) blobs: its `blobs/`
    /// directory has anything in it. Checked once per handle unless a
    /// migration or GC empties it.
    pub(crate) fn has_loose_blobs(&self) -> bool {
        use std::sync::atomic::Ordering;
        match self.inner.loose.load(Ordering::Relaxed) {
            0 => false,
            1 => true,
            _ => {
                let key = self.key("blobs");
                let any = self.backend().list(&key).map_or(true, |l| !l.is_empty());
                self.inner.loose.store(u8::from(any), Ordering::Relaxed);
                any
            }
        }
    }

    /// Forgets whether loose blobs exist (after deleting some).
    pub(crate) fn recheck_loose_blobs(&self) {
        self.inner.loose.store(2, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reads blob `hash` into `out` (its exact plaintext length) and
    /// verifies it. A miss, or a pack gone since the index was read,
    /// refreshes the index once and tries again.
    pub(crate) fn read_blob_into(&self, hash: &BlobHash, out: &mut [u8]) -> Result<(), BlobProblem> {
        let first = self.read_blob_once(hash, out);
        if !matches!(first, Err(BlobProblem::Missing)) {
            return first;
        }
        if self.refresh_index().is_err() {
            return first;
        }
        self.read_blob_once(hash, out)
    }

    fn read_blob_once(&self, hash: &BlobHash, out: &mut [u8]) -> Result<(), BlobProblem> {
        let found = self
            .find_blob(hash)
            .map_err(|e| BlobProblem::Unreadable(e.to_string()))?;
        match found {
            None => Err(BlobProblem::Missing),
            Some(Found::Packed { pack, entry }) => {
                pack::read_blob_into(self.backend(), &self.pack_key(&pack), &entry, out)
            }
            Some(Found::Loose { .. }) => self.read_loose_into(hash, out),
        }
    }

    /// Reads a layout-1 blob file into `out` and verifies it.
    fn read_loose_into(&self, hash: &BlobHash, out: &mut [u8]) -> Result<(), BlobProblem> {
        let key = self.blob_key(hash);
        let io_problem = |e: io::Error| match e.kind() {
            io::ErrorKind::NotFound => BlobProblem::Missing,
            _ => BlobProblem::Unreadable(e.to_string()),
        };
        let mut head = [0u8; blob::BLOB_HEADER_LEN];
        if self
            .backend()
            .read_split(&key, &mut head, out)
            .map_err(io_problem)?
            && blob::is_raw(&head)?
        {
            return blob::verify(out, hash);
        }
        let file = self.backend().read(&key).map_err(io_problem)?;
        blob::decode_into(&file, hash, out)
    }

    /// The blob as a layout-1 blob file (header and payload as stored),
    /// verified against `hash` and `plain_len`: what an archive carries.
    pub(crate) fn read_blob_file(&self, hash: &BlobHash, plain_len: u64) -> Result<Vec<u8>, BlobProblem> {
        let mut refreshed = false;
        loop {
            let found = self
                .find_blob(hash)
                .map_err(|e| BlobProblem::Unreadable(e.to_string()))?;
            let result = match found {
                None => Err(BlobProblem::Missing),
                Some(Found::Packed { pack, entry }) => {
                    if u64::from(entry.plain) != plain_len {
                        return Err(BlobProblem::LengthMismatch {
                            expected: plain_len,
                            actual: u64::from(entry.plain),
                        });
                    }
                    pack::read_blob_file(self.backend(), &self.pack_key(&pack), &entry)
                }
                Some(Found::Loose { .. }) => match self.backend().read(&self.blob_key(hash)) {
                    Ok(file) => blob::decode(&file, hash, Some(plain_len)).map(|_| file),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BlobProblem::Missing),
                    Err(e) => Err(BlobProblem::Unreadable(e.to_string())),
                },
            };
            if matches!(result, Err(BlobProblem::Missing)) && !refreshed && self.refresh_index().is_ok() {
                refreshed = true;
                continue;
            }
            return result;
        }
    }

    /// Publishes sealed packs and their index in the write order: the
    /// packs' and the index's bytes made durable in one round, the packs
    /// renamed into `packs/`, then the index into `index/`, both
    /// directories synced; then the index joins the merged index. Returns
    /// the index's name (`None` if there were no packs). Temporary packs
    /// are discarded on error.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn publish_packs(&self, packs: Vec<SealedPack>) -> Result<Option<BlobHash>, StoreError> {
        let backend = self.backend();
        let sync = self.options().sync;
        if packs.is_empty() {
            return Ok(None);
        }
        if self.gc_grace().is_some() {
            return self.publish_packs_remote(packs).map(|()| None);
        }
        let file = IndexFile {
            packs: packs.iter().map(|p| (p.name, p.len, p.entries.clone())).collect(),
        };
        let (bytes, name) = file.encode();
        let discard_all = |packs: &[SealedPack]| {
            for p in packs {
                backend.discard(&p.staged);
            }
        };
        let staged_index = match backend.stage(&bytes, sync) {
            Ok(s) => s,
            Err(e) => {
                discard_all(&packs);
                return Err(StoreError::io("write index", self.index_key(&name), e));
            }
        };
        let result = (|| {
            if sync {
                let mut all: Vec<&Staged> = packs.iter().map(|p| &p.staged).collect();
                all.push(&staged_index);
                backend
                    .sync_staged(&all)
                    .map_err(|e| StoreError::io("sync packs", self.key("packs"), e))?;
            }
            let items: Vec<(Staged, String)> = packs
                .iter()
                .map(|p| (p.staged.clone(), self.pack_key(&p.name)))
                .collect();
            backend
                .publish(&items, false)
                .map_err(|e| StoreError::io("publish packs", self.key("packs"), e))?;
            backend
                .publish(&[(staged_index.clone(), self.index_key(&name))], false)
                .map_err(|e| StoreError::io("publish index", self.index_key(&name), e))?;
            if sync {
                backend
                    .flush()
                    .map_err(|e| StoreError::io("sync", self.key("index"), e))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            discard_all(&packs);
            backend.discard(&staged_index);
            return Err(e);
        }
        self.inner.index.write().unwrap().merge(name, &file);
        Ok(Some(name))
    }

    /// On object storage a pack carries its index (format 2): one PUT per
    /// pack, concurrently, and they join the merged index in memory.
    fn publish_packs_remote(&self, packs: Vec<SealedPack>) -> Result<(), StoreError> {
        let backend = self.backend();
        let items: Vec<(Staged, String)> = packs
            .iter()
            .map(|p| (p.staged.clone(), self.pack_key(&p.name)))
            .collect();
        if let Err(e) = backend.publish(&items, false) {
            for p in &packs {
                backend.discard(&p.staged);
            }
            return Err(StoreError::io("publish packs", self.key("packs"), e));
        }
        let mut idx = self.inner.index.write().unwrap();
        for p in packs {
            idx.merge_trailer(p.name, p.len, p.entries);
        }
        Ok(())
    }
}
