//! Submission and confinement: a job submitted over the API is kept inside
//! its tenant (uploaded plugins only, paths inside the tenant's directory,
//! no stdout), held to the tenant's caps, and its components are stored
//! once by content. Recorded jobs are submitted again when the service
//! starts.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::record::JobRecord;
use super::{Handoff, Service, ServiceError, ServiceJob};
use crate::spec::host_config::TenantConfig;
use crate::spec::{HumanDuration, HumanSize, JobSpec, SinkSpec, SourceSpec, validate_name};

/// A job submission: the job file's text and the uploaded components.
#[derive(Clone, Debug, Default)]
pub struct Submission {
    /// The job file (TOML). Its operators' `plugin` keys name entries of
    /// `plugins`.
    pub job: String,
    /// Uploaded components by name (e.g. `wordcount.wasm`).
    pub plugins: BTreeMap<String, Vec<u8>>,
    /// `None` from scratch, `Some("latest")`, or a snapshot id.
    pub from: Option<String>,
}

impl Service {
    /// Submit a job over the API: confine it to the tenant, store its
    /// components, load (compile) its plugins and start it on its own
    /// thread. Blocks while compiling: call it off the async executor.
    ///
    /// # Errors
    /// [`ServiceError::BadRequest`] for an invalid job file, a plugin that
    /// was not uploaded or is not a valid component, a limit above the
    /// tenant's cap, a path leaving the tenant's directory, a malformed
    /// `from`; [`ServiceError::Conflict`] if a job of that name is running;
    /// [`ServiceError::TooManyJobs`]; [`ServiceError::NotFound`] for a
    /// `from` snapshot the tenant does not have.
    pub fn submit(&self, tenant: &str, submission: Submission) -> Result<Arc<ServiceJob>, ServiceError> {
        self.submit_with(tenant, submission, None)
    }

    /// [`Service::submit`], for a pool's takeover handing its lease over to
    /// the run (the job's record is already in the store).
    pub(super) fn submit_with(
        &self,
        tenant: &str,
        submission: Submission,
        handoff: Option<Handoff>,
    ) -> Result<Arc<ServiceJob>, ServiceError> {
        let entry = self.tenant(tenant)?;
        let base_dir = self.inner.files_dir.join(tenant);
        let mut spec = JobSpec::from_toml(&submission.job, Path::new("<submitted>"), &base_dir)
            .map_err(|e| ServiceError::bad("invalid_job", e.to_string()))?;
        // Cheap checks first: do not compile plugins for a job that cannot run.
        self.check_capacity(tenant, &spec.name)?;
        confine(&mut spec)?;
        apply_caps(&mut spec, &submission.job, &entry.config)?;
        for name in submission.plugins.keys() {
            validate_name(name).map_err(|r| ServiceError::bad("bad_request", format!("plugin name {r}")))?;
        }
        let mut plugins = BTreeMap::new();
        for (i, op) in spec.operators.iter_mut().enumerate() {
            let name = op.plugin.to_string_lossy().into_owned();
            let bytes = submission.plugins.get(&name).ok_or_else(|| {
                let uploaded: Vec<&str> = submission.plugins.keys().map(String::as_str).collect();
                ServiceError::bad(
                    "invalid_job",
                    format!(
                        "operators[{i}].plugin: {name:?} was not uploaded (uploaded: {})",
                        if uploaded.is_empty() {
                            "none".to_string()
                        } else {
                            uploaded.join(", ")
                        }
                    ),
                )
            })?;
            // Validate before storing: the error names the uploaded name, and
            // what is no component is never kept (compiled once: the cache
            // is by content, so loading the stored file later hits it).
            entry
                .host
                .runtime()
                .load_bytes(Path::new(&name), bytes)
                .map_err(|e| ServiceError::bad("invalid_plugin", format!("operator `{}`: {e}", op.name)))?;
            op.plugin = self.store_component(bytes)?;
            if self.in_pool() && handoff.is_none() {
                self.pool_put_component(&entry.store, bytes)?;
            }
            plugins.insert(name, blake3::hash(bytes).to_hex().to_string());
        }
        std::fs::create_dir_all(&base_dir)
            .map_err(|e| ServiceError::Internal(format!("create {}: {e}", base_dir.display())))?;
        let record = JobRecord {
            tenant: tenant.to_string(),
            job: submission.job.clone(),
            plugins,
        };
        self.launch(
            tenant,
            entry,
            spec,
            submission.from.as_deref(),
            Some(record),
            handoff,
        )
    }

    /// Start a job from a file of the operator's (a boot job): trusted, so
    /// its paths are used as written; the tenant's caps and limits apply.
    ///
    /// # Errors
    /// As [`Service::submit`], and an unreadable file.
    pub fn submit_file(
        &self,
        tenant: &str,
        path: &Path,
        from: Option<&str>,
    ) -> Result<Arc<ServiceJob>, ServiceError> {
        let entry = self.tenant(tenant)?;
        let text = std::fs::read_to_string(path).map_err(|e| {
            ServiceError::bad(
                "invalid_job",
                format!("cannot read job file {}: {e}", path.display()),
            )
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut spec = JobSpec::from_toml(&text, path, &base)
            .map_err(|e| ServiceError::bad("invalid_job", e.to_string()))?;
        self.check_capacity(tenant, &spec.name)?;
        apply_caps(&mut spec, &text, &entry.config)?;
        // Not recorded: the config starts boot jobs at every start anyway.
        self.launch(tenant, entry, spec, from, None, None)
    }

    /// Store a component under its blake3 hash (written once, atomically).
    fn store_component(&self, bytes: &[u8]) -> Result<PathBuf, ServiceError> {
        let path = self
            .inner
            .components_dir
            .join(format!("{}.wasm", blake3::hash(bytes).to_hex()));
        if path.exists() {
            return Ok(path);
        }
        let io =
            |e: std::io::Error| ServiceError::Internal(format!("store component {}: {e}", path.display()));
        let mut tmp = tempfile::NamedTempFile::new_in(&self.inner.components_dir).map_err(io)?;
        std::io::Write::write_all(&mut tmp, bytes).map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        Ok(path)
    }

    /// The stored component of blake3 `hash` (hex), as [`Service::submit`]
    /// stored it.
    pub(super) fn stored_component(&self, hash: &str) -> Result<Vec<u8>, ServiceError> {
        let file = self.inner.components_dir.join(format!("{hash}.wasm"));
        std::fs::read(&file).map_err(|e| ServiceError::Internal(format!("component {}: {e}", file.display())))
    }
}

/// A relative path of normal components only: it cannot leave its base.
fn is_confined(path: &Path) -> bool {
    !path.as_os_str().is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Keep a submitted job inside its tenant: plugins by bare upload name,
/// file paths relative and without `..`, no stdout sink.
fn confine(spec: &mut JobSpec) -> Result<(), ServiceError> {
    for (i, op) in spec.operators.iter().enumerate() {
        let name = op.plugin.to_string_lossy();
        if op.plugin.components().count() != 1 || !is_confined(&op.plugin) {
            return Err(ServiceError::bad(
                "invalid_job",
                format!(
                    "operators[{i}].plugin: {name:?} must be the name of an uploaded component, not a path"
                ),
            ));
        }
    }
    if let SourceSpec::File { path, .. } = &spec.source
        && !is_confined(path)
    {
        return Err(ServiceError::bad(
            "invalid_job",
            format!(
                "source.path: {} must be a relative path inside the tenant's directory",
                path.display()
            ),
        ));
    }
    match &spec.sink {
        // The host's credentials would write it: a bucket is not the
        // tenant's to choose.
        SinkSpec::File { path } if path.to_str().is_some_and(|p| p.starts_with("s3://")) => {
            return Err(ServiceError::bad(
                "invalid_job",
                "sink.path: `s3://` output is not available to a job submitted to a shared host \
                 (write to a relative path inside the tenant's directory)",
            ));
        }
        SinkSpec::File { path } if !is_confined(path) => {
            return Err(ServiceError::bad(
                "invalid_job",
                format!(
                    "sink.path: {} must be a relative path inside the tenant's directory",
                    path.display()
                ),
            ));
        }
        SinkSpec::Stdout {} => {
            return Err(ServiceError::bad(
                "invalid_job",
                "sink.type: `stdout` is not available on a shared host (use `file` or `null`)",
            ));
        }
        _ => {}
    }
    // Lexically inside is not enough: a symlink in the tenant's directory
    // could lead a source to a host file or a sink into another tenant's.
    let paths = [
        (
            "source.path",
            match &spec.source {
                SourceSpec::File { path, .. } => Some(path),
                _ => None,
            },
        ),
        (
            "sink.path",
            match &spec.sink {
                SinkSpec::File { path } => Some(path),
                _ => None,
            },
        ),
    ];
    for (field, path) in paths {
        if let Some(path) = path {
            stays_inside(&spec.base_dir, path).map_err(|why| {
                ServiceError::bad("invalid_job", format!("{field}: {}: {why}", path.display()))
            })?;
        }
    }
    Ok(())
}

/// Whether `path` (relative to `base`) stays inside `base` once symlinks
/// are followed: every part of it that exists and is a symlink must lead
/// inside (a dangling one is refused: creating through it would land
/// wherever it points). The parts that do not exist yet are created by the
/// job as plain directories and files.
fn stays_inside(base: &Path, path: &Path) -> Result<(), String> {
    let Ok(real_base) = base.canonicalize() else {
        return Ok(()); // not created yet: nothing in it can lead anywhere
    };
    let mut probe = base.to_path_buf();
    for part in path.components() {
        probe.push(part);
        match std::fs::symlink_metadata(&probe) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("cannot be resolved: {e}")),
            Ok(meta) if !meta.file_type().is_symlink() => {}
            Ok(_) => match probe.canonicalize() {
                Ok(real) if real.starts_with(&real_base) => {}
                Ok(real) => {
                    return Err(format!(
                        "leads to {} through a symlink, outside the tenant's directory",
                        real.display()
                    ));
                }
                Err(_) => return Err("goes through a symlink that leads nowhere".into()),
            },
        }
    }
    Ok(())
}

/// The most tasks (the operators' parallelism added up) one job of a
/// shared host may run: each task is a thread, an instance with up to the
/// tenant's memory cap and an input budget, so without a bound on tasks
/// the caps would bound nothing.
pub const MAX_TASKS: u64 = 1024;

/// Apply the tenant's caps to `[limits]`: an explicit value above a cap is
/// refused (the author asked for something the host will not give); a
/// default above it is lowered to the cap (the author asked for nothing).
/// A job of more than [`MAX_TASKS`] tasks is refused.
fn apply_caps(spec: &mut JobSpec, text: &str, tenant: &TenantConfig) -> Result<(), ServiceError> {
    let tasks: u64 = spec.operators.iter().map(|o| u64::from(o.parallelism)).sum();
    if tasks > MAX_TASKS {
        return Err(ServiceError::bad(
            "limit_exceeded",
            format!(
                "operators: the job runs {tasks} tasks (their parallelism added up), more than the \
                 {MAX_TASKS} a job may run on this host"
            ),
        ));
    }
    let explicit = |key: &str| {
        toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|t| t.get("limits").and_then(|l| l.get(key)).map(|_| ()))
            .is_some()
    };
    if let Some(cap) = tenant.memory
        && spec.limits.memory.0 > cap
    {
        if explicit("memory") {
            return Err(ServiceError::bad(
                "limit_exceeded",
                format!(
                    "limits.memory: {} bytes is above tenant {:?}'s cap of {cap} bytes",
                    spec.limits.memory.0, tenant.name
                ),
            ));
        }
        spec.limits.memory = HumanSize(cap);
    }
    if let Some(cap) = tenant.call_timeout
        && spec.limits.call_timeout.0 > cap
    {
        if explicit("call_timeout") {
            return Err(ServiceError::bad(
                "limit_exceeded",
                format!(
                    "limits.call_timeout: {} ms is above tenant {:?}'s cap of {} ms",
                    spec.limits.call_timeout.0.as_millis(),
                    tenant.name,
                    cap.as_millis()
                ),
            ));
        }
        spec.limits.call_timeout = HumanDuration(cap);
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confinement_rejects_paths_that_leave_the_tenant() {
        assert!(is_confined(Path::new("out/part")));
        for bad in ["/etc/passwd", "../x", "a/../../b", "", "./x"] {
            assert!(!is_confined(Path::new(bad)), "{bad}");
        }
    }

    /// A bucket is not the tenant's to choose: the host's credentials
    /// would write there.
    #[test]
    fn an_s3_sink_is_refused_to_a_submitted_job() {
        let text = r#"
            name = "j"
            [source]
            type = "generator"
            [[operators]]
            name = "wc"
            plugin = "wordcount"
            [sink]
            type = "file"
            path = "s3://someone-elses-bucket/out"
        "#;
        let mut spec = JobSpec::from_toml(text, Path::new("job.toml"), Path::new("/tmp/t")).unwrap();
        let e = confine(&mut spec).unwrap_err().to_string();
        assert!(e.contains("sink.path: `s3://` output is not available"), "{e}");
        assert!(!e.contains("someone-elses-bucket"), "{e}");
    }

    /// A symlink in the tenant's directory must not lead a source to a host
    /// file or a sink into another tenant's directory (it did: confinement
    /// was lexical only).
    #[test]
    fn symlinks_out_of_the_tenant_are_refused() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("files/a");
        let other = root.path().join("files/b/out");
        std::fs::create_dir_all(base.join("sub")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        symlink("/etc", base.join("etc")).unwrap();
        symlink(&other, base.join("peer")).unwrap();
        symlink(root.path().join("files/b/later"), base.join("dangling")).unwrap();
        symlink("sub", base.join("inner")).unwrap();
        for ok in ["out", "sub/out", "inner/out", "new/dir/out"] {
            assert_eq!(stays_inside(&base, Path::new(ok)), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("etc/passwd", "through a symlink, outside the tenant's directory"),
            ("peer", "through a symlink, outside the tenant's directory"),
            ("peer/part-00000-000000", "through a symlink, outside"),
            ("dangling/out", "a symlink that leads nowhere"),
        ] {
            let e = stays_inside(&base, Path::new(bad)).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
