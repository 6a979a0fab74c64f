//! Resume records: what is kept on disk about a running submitted job
//! (`<state_dir>/service/jobs/<tenant>/<name>.json`), written durably before
//! it runs and removed when it ends for good, and the resumption of every
//! recorded job when the service starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Service, ServiceError, ServiceJob, Submission};

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

    fn read(path: &Path) -> Result<JobRecord, ServiceError> {
        let text = std::fs::read(path).map_err(|e| ServiceError::Internal(format!("read: {e}")))?;
        serde_json::from_slice(&text).map_err(|e| ServiceError::Internal(format!("parse: {e}")))
    }
}

impl Service {
    /// Submit again every job recorded under `service/jobs/`, from its
    /// latest snapshot (from scratch when it has none). A record that
    /// cannot be resumed (its tenant left the config, a component is gone,
    /// a cap was lowered below what it asks) is logged and kept, so the job
    /// resumes once the config is fixed; it does not stop the other
    /// tenants' jobs from starting.
    pub(super) fn resume_recorded(&self) {
        let mut records = Vec::new();
        let Ok(tenants) = std::fs::read_dir(&self.inner.records_dir) else {
            return;
        };
        for t in tenants.flatten() {
            for f in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
                let path = f.path();
                if path.extension().is_some_and(|e| e == "json") {
                    records.push(path);
                }
            }
        }
        records.sort();
        for path in records {
            match self.resume(&path) {
                Ok(job) => tracing::info!(
                    tenant = %job.tenant(),
                    job = %job.name(),
                    from = ?job.status().restored_from,
                    "job resumed from the state directory"
                ),
                Err(e) => tracing::error!(record = %path.display(), "cannot resume job: {e}"),
            }
        }
    }

    fn resume(&self, path: &Path) -> Result<Arc<ServiceJob>, ServiceError> {
        let record = JobRecord::read(path)?;
        let mut plugins = BTreeMap::new();
        for (name, hash) in &record.plugins {
            plugins.insert(name.clone(), self.stored_component(hash)?);
        }
        let submission = Submission {
            job: record.job,
            plugins,
            from: Some("latest".into()),
        };
        match self.submit(&record.tenant, submission.clone()) {
            // No snapshot yet: it had not checkpointed when the host went
            // down, so it starts over, as it would have on its first run.
            Err(ServiceError::NotFound(m)) if m.starts_with("no snapshot") => self.submit(
                &record.tenant,
                Submission {
                    from: None,
                    ..submission
                },
            ),
            r => r,
        }
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
}
