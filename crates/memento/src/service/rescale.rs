//! Rescaling a submitted job in one call: stop it with a savepoint, then
//! submit it again, its job file changed only in every operator's
//! `parallelism`, from that savepoint. Whether the state can be divided
//! among the new number of tasks is the coordinator's check
//! (`compat::check_fits`); when it cannot, the job is started again as it
//! was, from the same savepoint, so a refused rescale leaves it running.

use std::sync::Arc;

use super::{Service, ServiceError, ServiceJob, Submission};
use crate::coordinator::JobState;
use crate::spec::JobSpec;
use crate::store::SnapshotId;

/// A rescale that happened: the savepoint it went through and the job now
/// running at the new parallelism.
pub struct Rescaled {
    /// The savepoint the job was stopped with and resumed from.
    pub savepoint: SnapshotId,
    /// The job, running again.
    pub job: Arc<ServiceJob>,
}

impl Service {
    /// Stop the tenant's running job `name` with a savepoint and start it
    /// again from it with every operator at `parallelism`. Blocks until the
    /// savepoint completes and the job is started again (call it off the
    /// async executor).
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] for an unknown job;
    /// [`ServiceError::Elsewhere`] for a job another host of the pool runs;
    /// [`ServiceError::Conflict`] for a job that is not running, was
    /// started from the host's configuration (change it there), or did not
    /// stop with a savepoint; [`ServiceError::BadRequest`] for a
    /// parallelism the job file cannot have (checked before the job is
    /// stopped) or a state that cannot be divided among `parallelism`
    /// tasks (code `incompatible_snapshot`; the job then runs again as it
    /// was, from the savepoint, and the message says so).
    pub fn rescale(&self, tenant: &str, name: &str, parallelism: u32) -> Result<Rescaled, ServiceError> {
        let job = self.job_here(tenant, name)?;
        if job.has_ended() {
            return Err(ServiceError::Conflict(format!(
                "job `{name}` is not running: submit it with `from` and the parallelism you want"
            )));
        }
        let record = self.job_record(tenant, name)?.ok_or_else(|| {
            ServiceError::Conflict(format!(
                "job `{name}` was started from the host's configuration, not submitted: change its \
                 parallelism in its job file"
            ))
        })?;
        let text = with_parallelism(&record.job, parallelism)?;
        // Everything about the new job file that can be checked without the
        // savepoint is, before the job is stopped.
        JobSpec::from_toml(
            &text,
            std::path::Path::new("<submitted>"),
            std::path::Path::new("."),
        )
        .map_err(|e| ServiceError::bad("invalid_job", e.to_string()))?;
        let mut plugins = std::collections::BTreeMap::new();
        for (upload, hash) in &record.plugins {
            plugins.insert(upload.clone(), self.stored_component(hash)?);
        }

        job.stop()?;
        job.join();
        let savepoint = match job.state() {
            JobState::Stopped { savepoint } => savepoint,
            other => {
                return Err(ServiceError::Conflict(format!(
                    "job `{name}` did not stop with a savepoint ({other:?}); it was not started again"
                )));
            }
        };
        let submit = |job: String| {
            self.submit(
                tenant,
                Submission {
                    job,
                    plugins: plugins.clone(),
                    from: Some(savepoint.to_string()),
                },
            )
        };
        match submit(text) {
            Ok(job) => {
                tracing::info!(tenant, job = %name, parallelism, %savepoint, "job rescaled");
                Ok(Rescaled { savepoint, job })
            }
            Err(ServiceError::BadRequest { code, message }) => {
                let again = submit(record.job.clone());
                let state = match &again {
                    Ok(_) => format!("it runs again as before, from savepoint {savepoint}"),
                    Err(e) => format!("starting it again as before failed too: {e}"),
                };
                Err(ServiceError::BadRequest {
                    code,
                    message: format!("{message}; {state}"),
                })
            }
            Err(e) => Err(e),
        }
    }
}

/// `text` (a job file) with every operator's `parallelism` set to `n`.
/// Comments and layout are not kept: the result is what is recorded and
/// submitted again after a restart.
fn with_parallelism(text: &str, n: u32) -> Result<String, ServiceError> {
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e| ServiceError::Internal(format!("the recorded job file does not parse: {e}")))?;
    let Some(toml::Value::Array(ops)) = doc.get_mut("operators") else {
        return Err(ServiceError::Internal(
            "the recorded job file has no operators".into(),
        ));
    };
    for op in ops.iter_mut() {
        if let toml::Value::Table(t) = op {
            t.insert("parallelism".into(), toml::Value::Integer(i64::from(n)));
        }
    }
    toml::to_string(&doc).map_err(|e| ServiceError::Internal(format!("write the job file: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operator_gets_the_parallelism() {
        let text = "name = \"j\" # the job\n[source]\ntype = \"generator\"\n\
                    [[operators]]\nname = \"a\"\nplugin = \"a.wasm\"\n\
                    [[operators]]\nname = \"b\"\nplugin = \"b.wasm\"\nparallelism = 2\n\
                    [operators.config]\nk = \"v\"\n[sink]\ntype = \"null\"\n";
        let out = with_parallelism(text, 3).unwrap();
        let spec = JobSpec::from_toml(&out, "j.toml".as_ref(), ".".as_ref()).unwrap();
        assert_eq!(
            spec.operators.iter().map(|o| o.parallelism).collect::<Vec<_>>(),
            [3, 3]
        );
        assert_eq!(spec.operators[1].config["k"], "v");
        let err = JobSpec::from_toml(
            &with_parallelism(text, 0).unwrap(),
            "j.toml".as_ref(),
            ".".as_ref(),
        );
        assert!(err.is_err(), "parallelism 0 is the job file's to refuse");
    }
}
