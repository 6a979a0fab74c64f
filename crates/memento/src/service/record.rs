//! Resume records: what is kept on disk about a running submitted job
//! (`<state_dir>/service/jobs/<tenant>/<name>.json`), written durably before
//! it runs and removed when it ends for good. Submitting them again when the
//! service starts is submission's (`submit.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ServiceError;

/// Enough to submit a job again, exactly as the tenant did, after a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct JobRecord {
    pub tenant: String,
    /// The job file's text as submitted.
    pub job: String,
    /// Upload name → blake3 hex of the component in `components/`.
    pub plugins: BTreeMap<String, String>,
}

impl JobRecord {
    /// Write the record of job `name` under `records_dir`, durably; its path.
    pub fn write(&self, records_dir: &Path, name: &str) -> Result<PathBuf, ServiceError> {
        let path = records_dir.join(&self.tenant).join(format!("{name}.json"));
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| ServiceError::Internal(format!("encode job record: {e}")))?;
        write_durably(&path, &bytes)
            .map_err(|e| ServiceError::Internal(format!("write job record {}: {e}", path.display())))?;
        Ok(path)
    }

    pub fn read(path: &Path) -> Result<JobRecord, ServiceError> {
        // A FIFO here would block the service's start (and so its API)
        // until someone writes to it: only regular files are read.
        let meta =
            std::fs::symlink_metadata(path).map_err(|e| ServiceError::Internal(format!("read: {e}")))?;
        if !meta.is_file() {
            return Err(ServiceError::Internal("read: not a regular file".into()));
        }
        let text = std::fs::read(path).map_err(|e| ServiceError::Internal(format!("read: {e}")))?;
        serde_json::from_slice(&text).map_err(|e| ServiceError::Internal(format!("parse: {e}")))
    }
}

/// Write `path` so that after a crash it holds either nothing or all of
/// `bytes`: a synced temporary file renamed into place, then the directory
/// synced so the rename itself survives.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Remove `path` (gone already is fine) and sync its directory.
pub(super) fn remove_durably(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_written_whole_and_removed_durably() {
        let dir = tempfile::tempdir().unwrap();
        let record = JobRecord {
            tenant: "acme".into(),
            job: "name = \"clicks\"\n".into(),
            plugins: BTreeMap::from([("w.wasm".to_string(), "ab".repeat(32))]),
        };
        let path = record.write(dir.path(), "clicks").unwrap();
        assert_eq!(path, dir.path().join("acme/clicks.json"));
        let back = JobRecord::read(&path).unwrap();
        assert_eq!(
            (back.tenant, back.job, back.plugins),
            (record.tenant, record.job, record.plugins)
        );
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path().join("acme")).unwrap().count(), 1);
        remove_durably(&path).unwrap();
        assert!(!path.exists());
        remove_durably(&path).unwrap();
    }

    #[test]
    fn a_fifo_where_a_record_belongs_is_refused_not_waited_on() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clicks.json");
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(JobRecord::read(&path).map(|_| ()).unwrap_err().to_string()));
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("reading it hangs");
        assert!(e.contains("not a regular file"), "{e}");
    }
}
