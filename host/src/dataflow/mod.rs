//! Running a job: a source thread, one thread per operator task, bounded
//! channels between them (backpressure), events travelling in batches and
//! routed between stages by a hash of their key.
//!
//! ```text
//! source ──partition──▶ op0[0..p0] ──partition──▶ op1[0..p1] … ──▶ sink part per last task
//! ```
//!
//! Each task owns its plugin instance and calls it synchronously; nothing is
//! shared between task threads but channels and the failure slot.

pub mod partition;
pub mod sink;
pub mod source;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::runtime::{Context, Event, LoadedComponent, Runtime, RuntimeError, SandboxLimits, TaskLabel};
use crate::spec::JobSpec;
use sink::SinkWriter;

/// Batches in flight per channel before the sender blocks.
const CHANNEL_CAPACITY: usize = 4;

/// Why a job run failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The source failed (unreadable input, malformed record).
    #[error("source: {0}")]
    Source(String),
    /// The sink failed (I/O).
    #[error("sink: {0}")]
    Sink(String),
    /// A task failed: trap, deadline, memory limit or an error from the plugin.
    #[error(transparent)]
    Task(#[from] RuntimeError),
    /// The job was cancelled.
    #[error("job `{0}` was cancelled")]
    Cancelled(String),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(String),
}

/// What one run of a job did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct JobReport {
    /// Records read from the source.
    pub source_records: u64,
    /// Records written to the sink.
    pub sink_records: u64,
    /// Per operator, in chain order.
    pub operators: Vec<OperatorReport>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Figures of one operator, summed over its tasks.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct OperatorReport {
    /// Operator name.
    pub name: String,
    /// Number of tasks.
    pub parallelism: u32,
    /// Events passed to `process`.
    pub records_in: u64,
    /// Events returned from `process` and `close`.
    pub records_out: u64,
    /// `process` calls made.
    pub process_calls: u64,
    /// Wall time inside the plugin, all tasks together.
    pub time_in_plugin: Duration,
}

enum Msg {
    Batch(Vec<Event>),
    End,
}

/// Where a task sends what its operator emits.
enum Downstream {
    Next(Vec<Sender<Msg>>),
    Sink(Box<dyn SinkWriter>),
}

impl Downstream {
    /// Route a batch onward. `Err(())` means the receiving side is gone
    /// (it failed; its error is already recorded).
    fn send(&mut self, events: Vec<Event>, sink_records: &mut u64) -> Result<(), JobError> {
        if events.is_empty() {
            return Ok(());
        }
        match self {
            Downstream::Next(next) => {
                for (task, part) in partition::partition(events, next.len()).into_iter().enumerate() {
                    if !part.is_empty() && next[task].send(Msg::Batch(part)).is_err() {
                        return Err(JobError::Cancelled(String::new()));
                    }
                }
                Ok(())
            }
            Downstream::Sink(sink) => {
                *sink_records += events.len() as u64;
                sink.write(&events).map_err(JobError::Sink)
            }
        }
    }

    fn finish(&mut self) -> Result<(), JobError> {
        match self {
            Downstream::Next(next) => {
                for tx in next.iter() {
                    if tx.send(Msg::End).is_err() {
                        return Err(JobError::Cancelled(String::new()));
                    }
                }
                Ok(())
            }
            Downstream::Sink(sink) => sink.finish().map_err(JobError::Sink),
        }
    }
}

/// The first real failure of a run; later ones are consequences of it.
#[derive(Default)]
struct FailureSlot {
    failed: AtomicBool,
    first: Mutex<Option<JobError>>,
}

impl FailureSlot {
    fn record(&self, e: JobError) {
        // A task that stopped because a neighbour vanished is not the cause.
        if matches!(e, JobError::Cancelled(_)) {
            return;
        }
        let mut first = self.first.lock().unwrap();
        if first.is_none() {
            *first = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct TaskFigures {
    records_in: u64,
    records_out: u64,
    sink_records: u64,
    process_calls: u64,
    time_in_plugin: Duration,
}

/// Run a bounded job to the end of its input (or until `cancel` is set).
///
/// `components[i]` is the loaded plugin of `spec.operators[i]`.
///
/// # Errors
/// The first failure of the run: source, sink, a task (naming job, operator,
/// task and phase), or cancellation.
pub fn run(
    runtime: &Runtime,
    spec: &JobSpec,
    components: &[Arc<LoadedComponent>],
    cancel: Arc<AtomicBool>,
) -> Result<JobReport, JobError> {
    assert_eq!(
        components.len(),
        spec.operators.len(),
        "one component per operator"
    );
    let started = Instant::now();
    let limits = SandboxLimits {
        memory_bytes: spec.limits.memory.0,
        call_timeout: spec.limits.call_timeout.0,
    };
    let mut source = source::open(&spec.source, &spec.base_dir).map_err(JobError::Source)?;
    // Open every sink writer before starting anything, so an unwritable
    // output fails the job before any work is done.
    let sink_tasks = spec.sink_parallelism();
    let mut sinks: Vec<Option<Box<dyn SinkWriter>>> = (0..sink_tasks)
        .map(|t| sink::open(&spec.sink, &spec.base_dir, t).map(Some))
        .collect::<Result<_, _>>()
        .map_err(JobError::Sink)?;

    // One channel per task; every task of the previous stage holds a sender.
    let channels: Vec<Vec<(Sender<Msg>, Receiver<Msg>)>> = spec
        .operators
        .iter()
        .map(|op| (0..op.parallelism).map(|_| bounded(CHANNEL_CAPACITY)).collect())
        .collect();
    let senders =
        |stage: usize| -> Vec<Sender<Msg>> { channels[stage].iter().map(|(tx, _)| tx.clone()).collect() };

    let failure = Arc::new(FailureSlot::default());
    let mut handles = Vec::new();
    for (stage, op) in spec.operators.iter().enumerate() {
        let upstreams = if stage == 0 {
            1
        } else {
            spec.operators[stage - 1].parallelism as usize
        };
        for task in 0..op.parallelism {
            let rx = channels[stage][task as usize].1.clone();
            let downstream = if stage + 1 < spec.operators.len() {
                Downstream::Next(senders(stage + 1))
            } else {
                Downstream::Sink(sinks[task as usize].take().expect("one sink per last task"))
            };
            let label = TaskLabel {
                job: spec.name.clone(),
                operator: op.name.clone(),
                task,
            };
            let ctx = Context {
                job: spec.name.clone(),
                operator_name: op.name.clone(),
                task_index: task,
                parallelism: op.parallelism,
                config: op.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            };
            let (runtime, component, limits, failure) = (
                runtime.clone(),
                components[stage].clone(),
                limits.clone(),
                failure.clone(),
            );
            let handle = thread::Builder::new()
                .name(format!("{}[{}]", op.name, task))
                .spawn(move || {
                    let mut figures = TaskFigures::default();
                    let result = run_task(
                        &runtime,
                        &component,
                        label,
                        &limits,
                        &ctx,
                        rx,
                        upstreams,
                        downstream,
                        &mut figures,
                    );
                    if let Err(e) = result {
                        failure.record(e);
                    }
                    (stage, figures)
                })
                .map_err(|e| JobError::Thread(e.to_string()))?;
            handles.push(handle);
        }
    }
    let first = senders(0);
    drop(channels);

    // The source runs on this thread.
    let mut source_records = 0u64;
    let source_result = (|| -> Result<(), JobError> {
        let mut out = Downstream::Next(first);
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(JobError::Cancelled(spec.name.clone()));
            }
            if failure.failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            match source.next_batch().map_err(JobError::Source)? {
                Some(batch) => {
                    source_records += batch.len() as u64;
                    let mut ignored = 0;
                    if out.send(batch, &mut ignored).is_err() {
                        return Ok(()); // a task failed; its error is recorded
                    }
                }
                None => return out.finish().or(Ok(())),
            }
        }
    })();
    // On error the senders are dropped here, so tasks see a disconnect.
    let mut cancelled = None;
    match source_result {
        Err(JobError::Cancelled(name)) => cancelled = Some(name),
        Err(e) => failure.record(e),
        Ok(()) => {}
    }

    let mut report = JobReport {
        source_records,
        operators: spec
            .operators
            .iter()
            .map(|op| OperatorReport {
                name: op.name.clone(),
                parallelism: op.parallelism,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    for handle in handles {
        let (stage, f) = handle
            .join()
            .map_err(|_| JobError::Thread("a task thread panicked".into()))?;
        let op = &mut report.operators[stage];
        op.records_in += f.records_in;
        op.records_out += f.records_out;
        op.process_calls += f.process_calls;
        op.time_in_plugin += f.time_in_plugin;
        report.sink_records += f.sink_records;
    }
    if let Some(e) = failure.first.lock().unwrap().take() {
        return Err(e);
    }
    if let Some(name) = cancelled {
        return Err(JobError::Cancelled(name));
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The life of one task: instantiate, open, process batches until every
/// upstream has ended, close, end downstream.
#[allow(clippy::too_many_arguments)]
fn run_task(
    runtime: &Runtime,
    component: &Arc<LoadedComponent>,
    label: TaskLabel,
    limits: &SandboxLimits,
    ctx: &Context,
    rx: Receiver<Msg>,
    upstreams: usize,
    mut downstream: Downstream,
    figures: &mut TaskFigures,
) -> Result<(), JobError> {
    let mut instance = runtime.instantiate(component, label, limits)?;
    instance.open(ctx)?;
    let mut ended = 0;
    while ended < upstreams {
        match rx.recv() {
            Ok(Msg::Batch(batch)) => {
                figures.records_in += batch.len() as u64;
                let out = instance.process(&batch)?;
                figures.records_out += out.len() as u64;
                downstream.send(out, &mut figures.sink_records)?;
            }
            Ok(Msg::End) => ended += 1,
            // Every sender is gone without ending: upstream failed.
            Err(_) => return Err(JobError::Cancelled(String::new())),
        }
    }
    let out = instance.close()?;
    figures.records_out += out.len() as u64;
    downstream.send(out, &mut figures.sink_records)?;
    downstream.finish()?;
    let stats = instance.stats();
    figures.process_calls = stats.process_calls;
    figures.time_in_plugin = stats.time_in_plugin;
    Ok(())
}
