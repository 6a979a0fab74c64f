//! Small objects a host service keeps beside a tenant's snapshots, under
//! `service/` in the tenant's namespace (`docs/STORAGE.md`, "Pool
//! records"), and a look at a job's lease without taking it. The store
//! gives them no meaning: GC, fsck, export and quotas leave `service/`
//! alone.

use std::io;

use crate::lease::LeaseDoc;
use crate::{JobName, PutMode, StoreError, TenantStore};

/// The largest service object read: records and components are small, and
/// a damaged or hostile object must not be read into memory whole.
pub const MAX_SERVICE_OBJECT: u64 = 64 << 20;

/// What a job's lease object says, read without taking it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    /// Who holds it (`<host>-<pid>-<nonce>`).
    pub holder: String,
    /// Holders so far.
    pub generation: u64,
    /// Changes with every write of the lease: the holder is alive while it
    /// changes within the ttl.
    pub tag: String,
}

/// `rel` as a key below `service/`: components of `[A-Za-z0-9._-]`, none
/// `.` or `..`, at most four.
fn checked(rel: &str) -> Result<(), StoreError> {
    let ok = !rel.is_empty()
        && rel.split('/').count() <= 4
        && rel.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.len() <= 255
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::io(
            "service object",
            "service/…",
            io::Error::new(io::ErrorKind::InvalidInput, "not a valid service object name"),
        ))
    }
}

impl TenantStore {
    fn service_key(&self, rel: &str) -> Result<String, StoreError> {
        checked(rel)?;
        Ok(self.key(&format!("service/{rel}")))
    }

    /// Service object `rel` (a path below `service/`), `None` if absent.
    ///
    /// # Errors
    /// A bad name, an object over [`MAX_SERVICE_OBJECT`], I/O errors.
    pub fn read_service_object(&self, rel: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.service_key(rel)?;
        match self.backend().size(&key) {
            Ok(None) => return Ok(None),
            Ok(Some(n)) if n > MAX_SERVICE_OBJECT => {
                return Err(StoreError::io(
                    "read service object",
                    key,
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{n} bytes, over the limit of {MAX_SERVICE_OBJECT}"),
                    ),
                ));
            }
            Ok(Some(_)) => {}
            Err(e) => return Err(StoreError::io("read service object", key, e)),
        }
        match self.backend().read(&key) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("read service object", key, e)),
        }
    }

    /// Write service object `rel`, durably; with `replace` false only if it
    /// is absent. Whether it was written.
    ///
    /// # Errors
    /// A bad name, I/O errors.
    pub fn write_service_object(&self, rel: &str, bytes: &[u8], replace: bool) -> Result<bool, StoreError> {
        let key = self.service_key(rel)?;
        let mode = if replace {
            PutMode::Replace
        } else {
            PutMode::NoReplace
        };
        self.backend()
            .put(&key, bytes, mode, true)
            .map_err(|e| StoreError::io("write service object", key, e))
    }

    /// Delete service object `rel` (absent already is fine).
    ///
    /// # Errors
    /// A bad name, I/O errors.
    pub fn delete_service_object(&self, rel: &str) -> Result<(), StoreError> {
        let key = self.service_key(rel)?;
        match self.backend().delete(&key) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("delete service object", key, e)),
        }
    }

    /// Names in service directory `dir`, sorted.
    ///
    /// # Errors
    /// A bad name, I/O errors.
    pub fn list_service_objects(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let key = self.service_key(dir)?;
        match self.backend().list(&key) {
            Ok(mut names) => {
                names.sort();
                Ok(names)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(StoreError::io("list service objects", key, e)),
        }
    }

    /// The lease of `job` as it is now, `None` when no one holds it or the
    /// store has no leases (a local directory).
    ///
    /// # Errors
    /// I/O errors; a lease that does not parse.
    pub fn read_lease(&self, job: &JobName) -> Result<Option<LeaseView>, StoreError> {
        if self.lease_ttl().is_none() {
            return Ok(None);
        }
        let key = self.key(&format!("leases/{job}"));
        let Some((bytes, tag)) = self
            .backend()
            .read_versioned(&key)
            .map_err(|e| StoreError::io("read lease", key.clone(), e))?
        else {
            return Ok(None);
        };
        let doc: LeaseDoc = serde_json::from_slice(&bytes).map_err(|e| {
            StoreError::io(
                "read lease",
                key,
                io::Error::new(io::ErrorKind::InvalidData, format!("damaged lease: {e}")),
            )
        })?;
        Ok(Some(LeaseView {
            holder: doc.holder,
            generation: doc.generation,
            tag,
        }))
    }

    /// The time to live of this store's job leases; `None` on a local
    /// directory (its job lock is a `flock`).
    pub fn job_lease_ttl(&self) -> Option<std::time::Duration> {
        self.lease_ttl()
    }
}

#[cfg(test)]
mod tests {
    use super::checked;
    use crate::{JobName, Store, StoreOptions};

    /// Written, read, listed and deleted by name; put-if-absent refuses a
    /// second write; GC keeps them and fsck finds nothing wrong with them.
    #[test]
    fn service_objects_live_beside_snapshots_untouched_by_gc_and_fsck() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let t = store.tenant("acme").unwrap();
        assert_eq!(t.read_service_object("jobs/a.json").unwrap(), None);
        assert!(t.list_service_objects("jobs").unwrap().is_empty());
        assert!(t.write_service_object("jobs/a.json", b"one", false).unwrap());
        assert!(!t.write_service_object("jobs/a.json", b"two", false).unwrap());
        assert_eq!(t.read_service_object("jobs/a.json").unwrap().unwrap(), b"one");
        assert!(t.write_service_object("jobs/a.json", b"three", true).unwrap());
        t.write_service_object("jobs/b.json", b"b", true).unwrap();
        t.write_service_object("components/c.wasm", b"c", true).unwrap();
        assert_eq!(t.list_service_objects("jobs").unwrap(), ["a.json", "b.json"]);
        t.gc().unwrap();
        let report = t.fsck().unwrap();
        assert!(
            report.stray_files.iter().all(|f| !f.contains("service")),
            "{report:?}"
        );
        assert!(report.damaged.is_empty(), "{report:?}");
        assert_eq!(t.read_service_object("jobs/a.json").unwrap().unwrap(), b"three");
        assert_eq!(t.read_service_object("components/c.wasm").unwrap().unwrap(), b"c");
        t.delete_service_object("jobs/a.json").unwrap();
        t.delete_service_object("jobs/a.json").unwrap();
        assert_eq!(t.list_service_objects("jobs").unwrap(), ["b.json"]);
        assert!(t.read_service_object("../x").is_err());
        // A local directory has no leases: its job lock is a flock.
        assert_eq!(t.read_lease(&JobName::new("a").unwrap()).unwrap(), None);
        assert_eq!(t.job_lease_ttl(), None);
    }

    #[test]
    fn service_object_names_stay_below_service() {
        for ok in ["jobs/a.json", "components/ab12.wasm", "placement/x-y_z.json"] {
            assert!(checked(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "jobs/../../x",
            "a//b",
            "/abs",
            "jobs/a b",
            "a/b/c/d/e",
            "jobs/.",
        ] {
            assert!(checked(bad).is_err(), "{bad}");
        }
    }
}
