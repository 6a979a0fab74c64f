//! A job assembled in code rather than read from a job file: how an
//! embedder gives a job its own source and sink.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{
    CheckpointSpec, JobSpec, LimitsSpec, OperatorSpec, RestartSpec, SavepointSpec, SinkSpec, SourceSpec,
    SpecError,
};

/// Builds a [`JobSpec`] in code; [`JobBuilder::build`] validates it as a
/// job file would be.
///
/// ```no_run
/// use memento::io::{CallbackSink, PushSource};
/// use memento::spec::{CheckpointSpec, HumanDuration, JobSpec, SinkSpec, SourceSpec};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (source, handle) = PushSource::new(64);
/// let sink = CallbackSink::new("state/clicks-out", |d: &memento::io::Delivery| {
///     println!("{} events of task {}", d.events.len(), d.task);
///     Ok(())
/// });
/// let spec = JobSpec::builder("clicks")
///     .source(SourceSpec::custom(source))
///     .operator("count", "wordcount.wasm", 2)
///     .sink(SinkSpec::custom(sink))
///     .checkpoints(CheckpointSpec {
///         interval: Some(HumanDuration(std::time::Duration::from_secs(1))),
///         ..CheckpointSpec::default()
///     })
///     .build()?;
/// # drop((spec, handle)); Ok(()) }
/// ```
pub struct JobBuilder {
    /// The job; its source and sink are placeholders until set.
    spec: JobSpec,
    has_source: bool,
    has_sink: bool,
}

impl JobSpec {
    /// Start building job `name` in code; [`JobBuilder::build`] refuses it
    /// until its source and sink are set.
    pub fn builder(name: impl Into<String>) -> JobBuilder {
        JobBuilder {
            spec: JobSpec {
                name: name.into(),
                source: SourceSpec::Generator {
                    count: Some(0),
                    rate: None,
                    keys: 1,
                    seed: 0,
                    batch: 1,
                },
                operators: Vec::new(),
                sink: SinkSpec::Null {},
                checkpoints: CheckpointSpec::default(),
                savepoints: SavepointSpec::default(),
                restart: RestartSpec::default(),
                limits: LimitsSpec::default(),
                base_dir: PathBuf::new(),
            },
            has_source: false,
            has_sink: false,
        }
    }
}

impl JobBuilder {
    /// Where events come from: [`SourceSpec::custom`] or a built-in one.
    pub fn source(mut self, source: SourceSpec) -> Self {
        self.spec.source = source;
        self.has_source = true;
        self
    }

    /// Where the output goes: [`SinkSpec::custom`] or a built-in one.
    pub fn sink(mut self, sink: SinkSpec) -> Self {
        self.spec.sink = sink;
        self.has_sink = true;
        self
    }

    /// Append an operator running `plugin` as `parallelism` tasks, with no
    /// config and no grants ([`JobBuilder::operator_spec`] for those).
    pub fn operator(self, name: impl Into<String>, plugin: impl Into<PathBuf>, parallelism: u32) -> Self {
        self.operator_spec(OperatorSpec {
            name: name.into(),
            plugin: plugin.into(),
            parallelism,
            max_parallelism: None,
            config: BTreeMap::new(),
            grants: Vec::new(),
        })
    }

    /// Append an operator.
    pub fn operator_spec(mut self, operator: OperatorSpec) -> Self {
        self.spec.operators.push(operator);
        self
    }

    /// `[checkpoints]`.
    pub fn checkpoints(mut self, checkpoints: CheckpointSpec) -> Self {
        self.spec.checkpoints = checkpoints;
        self
    }

    /// `[savepoints]`.
    pub fn savepoints(mut self, savepoints: SavepointSpec) -> Self {
        self.spec.savepoints = savepoints;
        self
    }

    /// `[restart]`.
    pub fn restart(mut self, restart: RestartSpec) -> Self {
        self.spec.restart = restart;
        self
    }

    /// `[limits]`.
    pub fn limits(mut self, limits: LimitsSpec) -> Self {
        self.spec.limits = limits;
        self
    }

    /// The directory relative paths (plugins, grants, built-in files)
    /// resolve against; the current directory if unset.
    pub fn base_dir(mut self, dir: &Path) -> Self {
        self.spec.base_dir = dir.to_path_buf();
        self
    }

    /// The validated job.
    ///
    /// # Errors
    /// [`SpecError::Invalid`] naming the field and the reason, as for a job
    /// file (`<NAME built in code>` stands in for the file's path).
    pub fn build(self) -> Result<JobSpec, SpecError> {
        let invalid = |(field, reason): (String, String)| SpecError::Invalid {
            path: PathBuf::from(format!("<{} built in code>", self.spec.name)),
            field,
            reason,
        };
        for (set, field) in [(self.has_source, "source"), (self.has_sink, "sink")] {
            if !set {
                return Err(invalid((field.into(), "not set: a job needs one".into())));
            }
        }
        self.spec.validate().map_err(invalid)?;
        Ok(self.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_needs_a_source_a_sink_and_what_a_job_file_needs() {
        let e = JobSpec::builder("j")
            .operator("count", "count.wasm", 1)
            .sink(SinkSpec::Null {})
            .build()
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "job file <j built in code>: source: not set: a job needs one"
        );
        let e = JobSpec::builder("j")
            .source(SourceSpec::Generator {
                count: Some(1),
                rate: None,
                keys: 1,
                seed: 0,
                batch: 1,
            })
            .operator("count", "count.wasm", 0)
            .sink(SinkSpec::Null {})
            .build()
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "job file <j built in code>: operators[0].parallelism: must be at least 1"
        );
    }
}
