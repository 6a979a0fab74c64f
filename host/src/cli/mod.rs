//! The `memento` command line: argument parsing and printing only. Every
//! command calls the library's public API.

mod client;
#[cfg(feature = "plugins")]
mod demo;
mod serve;
pub mod store;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand, ValueEnum};

use crate::coordinator::{FinalState, JobReport};
use crate::host::{Host, HostError, RunOptions, StartFrom};
use crate::runtime::Runtime;
use crate::store::SnapshotId;
use store::{SavepointFileCommand, SnapshotsCommand, StoreArgs};

/// memento — a WebAssembly plugin host for stateful stream operators with
/// unified checkpoints and savepoints.
#[derive(Debug, Parser)]
#[command(name = "memento", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the example jobs with the plugins built into this binary.
    Demo,
    /// Run a job file until its input ends (or it is stopped), taking
    /// checkpoints and savepoints into the state directory.
    Run {
        /// The job file (TOML).
        job: PathBuf,
        /// Resume from a snapshot id, or `latest` (the job's newest).
        #[arg(long, value_name = "SNAPSHOT|latest")]
        from: Option<String>,
        /// What SIGTERM and SIGINT do: stop with a savepoint, or cancel.
        #[arg(long, value_enum, default_value_t = OnSignal::Savepoint)]
        on_sigterm: OnSignal,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Serve the REST API for this job on this address (e.g. 127.0.0.1:8081).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Bearer token the API requires (required on a non-loopback address).
        #[arg(long, env = "MEMENTO_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show a component's imports and exports and whether it fits the contract.
    Inspect {
        /// The component file (.wasm).
        component: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List and show checkpoints and savepoints.
    Snapshots {
        #[command(subcommand)]
        command: SnapshotsCommand,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Trigger, export, import and dispose savepoints.
    Savepoint {
        #[command(subcommand)]
        command: SavepointCommand,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Check every manifest and blob of the store; non-zero exit if damaged.
    Fsck {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove blobs that no snapshot references.
    Gc {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run a long-lived multi-tenant host with the REST API and dashboard.
    Serve {
        /// The host config (TOML): listen address, state directory, tenants.
        #[arg(long, value_name = "HOST.toml")]
        config: PathBuf,
    },
    /// Make and hash bearer tokens for `serve`'s config.
    Token {
        #[command(subcommand)]
        command: serve::TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SavepointCommand {
    /// Trigger a savepoint of a running job (started with `memento run --listen`).
    Trigger {
        /// The job's name.
        job: String,
        /// Wait until the savepoint completes and print its id.
        #[arg(long)]
        wait: bool,
        /// The job's API address.
        #[arg(long, env = "MEMENTO_URL", default_value = "http://127.0.0.1:8081")]
        url: String,
        /// Bearer token, if the job requires one.
        #[arg(long, env = "MEMENTO_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    #[command(flatten)]
    File(SavepointFileCommand),
}

/// What a termination signal does to a running job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnSignal {
    /// Stop the source, take a final savepoint, exit 0.
    Savepoint,
    /// Cancel at once (checkpoints stay if persistent).
    Cancel,
}

/// Parse the command line, run the command, and turn errors into a one-line
/// message and a non-zero exit code.
pub fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMENTO_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,memento::plugin=info,memento::snapshot=info")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo => {
            #[cfg(feature = "plugins")]
            return demo::run().map(|()| ExitCode::SUCCESS);
            #[cfg(not(feature = "plugins"))]
            anyhow::bail!("this memento was built without the example plugins (feature `plugins`)");
        }
        Command::Run {
            job,
            from,
            on_sigterm,
            json,
            listen,
            token,
            store,
        } => run(
            &job,
            from.as_deref(),
            on_sigterm,
            json,
            listen.as_deref(),
            token,
            &store,
        ),
        Command::Inspect { component, json } => inspect(&component, json),
        Command::Snapshots { command, store } => {
            store::run_snapshots(&store, command).map(|()| ExitCode::SUCCESS)
        }
        Command::Savepoint {
            command:
                SavepointCommand::Trigger {
                    job,
                    wait,
                    url,
                    token,
                },
            ..
        } => {
            let id = client::trigger_savepoint(&url, token.as_deref(), &job, wait)?;
            if wait {
                println!("{id}");
            } else {
                println!("triggered savepoint of job `{job}`: request {id}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Savepoint {
            command: SavepointCommand::File(command),
            store,
        } => store::run_savepoint(&store, command).map(|()| ExitCode::SUCCESS),
        Command::Fsck { store } => store::run_fsck(&store),
        Command::Gc { store } => store::run_gc(&store).map(|()| ExitCode::SUCCESS),
        Command::Serve { config } => serve::serve(&config),
        Command::Token { command } => serve::token(command),
    }
}

fn run(
    job_file: &Path,
    from: Option<&str>,
    on_signal: OnSignal,
    json: bool,
    listen: Option<&str>,
    token: Option<String>,
    store: &StoreArgs,
) -> anyhow::Result<ExitCode> {
    // Read the job file first: a bad one should not create a state directory.
    let spec = crate::spec::JobSpec::from_file(job_file)?;
    let host = Host::open(&store.state_dir)?;
    let job = host.load_job(spec, &store.tenant)?;
    let from = match from {
        None => StartFrom::Scratch,
        Some("latest") => StartFrom::Latest,
        Some(id) => StartFrom::Snapshot(SnapshotId::parse(id)?),
    };
    watch_signals(job.control(), on_signal)?;
    let name = job.spec().name.clone();
    let _server = match listen {
        Some(addr) => {
            let server = crate::api::serve_job(addr, &name, job.control(), token)?;
            eprintln!("memento: job `{name}` API on http://{}", server.local_addr());
            Some(server)
        }
        None => None,
    };
    match job.run(RunOptions { from }) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                eprint!("{}", format_report(&name, &report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(HostError::Job(failed)) => {
            let hint = failed
                .resume_from
                .as_ref()
                .map(|id| format!("; resume with: memento run {} --from {id}", job_file.display()))
                .unwrap_or_default();
            Err(anyhow::anyhow!("{failed}{hint}"))
        }
        Err(e) => Err(e.into()),
    }
}

/// Turn SIGTERM/SIGINT into a stop-with-savepoint or a cancel; a second
/// signal cancels.
fn watch_signals(control: crate::coordinator::JobControl, on_signal: OnSignal) -> anyhow::Result<()> {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let hits = hits.clone();
        // SAFETY: the handler only increments an atomic counter.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                hits.fetch_add(1, Ordering::SeqCst);
            })
        }?;
    }
    let seen = Arc::new(AtomicBool::new(false));
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut handled = 0;
            loop {
                std::thread::sleep(std::time::Duration::from_millis(20));
                let n = hits.load(Ordering::SeqCst);
                if n == handled {
                    continue;
                }
                handled = n;
                if on_signal == OnSignal::Savepoint && !seen.swap(true, Ordering::SeqCst) {
                    eprintln!("memento: signal received, stopping with a savepoint (signal again to cancel)");
                    let _ = control.stop_with_savepoint();
                } else {
                    eprintln!("memento: signal received, cancelling");
                    control.cancel();
                }
            }
        })?;
    Ok(())
}

fn inspect(component: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let info = Runtime::new()?.inspect_file(component)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("component {}", info.path.display());
        println!("  size     {} bytes", info.size);
        println!("  blake3   {}", info.hash);
        println!("  imports");
        for i in &info.imports {
            println!("    {i}");
        }
        println!("  exports");
        for e in &info.exports {
            println!("    {e}");
        }
        match &info.fits_contract {
            Ok(()) => println!("  contract memento:operator/plugin@0.1.0: yes"),
            Err(why) => println!("  contract memento:operator/plugin@0.1.0: no — {why}"),
        }
        println!("  native snapshots: {}", info.native_summary());
    }
    Ok(if info.fits_contract.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The human summary printed after a run.
pub fn format_report(job: &str, r: &JobReport) -> String {
    use std::fmt::Write;
    let secs = r.elapsed.as_secs_f64();
    let mut s = String::new();
    let how = match &r.state {
        Some(FinalState::Finished) | None => "finished".to_string(),
        Some(FinalState::Stopped { savepoint }) => format!("stopped with savepoint {savepoint}"),
        Some(FinalState::Cancelled) => "was cancelled".to_string(),
        Some(FinalState::AlreadyFinished { snapshot }) => {
            format!("had already finished (snapshot {snapshot}); output committed")
        }
    };
    let _ = writeln!(s, "job `{job}` {how} in {secs:.3} s");
    if let Some(from) = &r.restored_from {
        let _ = writeln!(s, "  resumed from {from}");
    }
    let _ = writeln!(s, "  source     {:>12} records", r.source_records);
    let _ = writeln!(
        s,
        "  {:<16} {:>5} {:>12} {:>12} {:>12}",
        "operator", "tasks", "in", "out", "in plugin"
    );
    for op in &r.operators {
        let _ = writeln!(
            s,
            "  {:<16} {:>5} {:>12} {:>12} {:>9.1} ms",
            op.name,
            op.parallelism,
            op.records_in,
            op.records_out,
            op.time_in_plugin.as_secs_f64() * 1e3
        );
    }
    let _ = writeln!(s, "  sink       {:>12} records", r.sink_records);
    if secs > 0.0 {
        let _ = writeln!(
            s,
            "  throughput {:>12.0} records/s",
            r.source_records as f64 / secs
        );
    }
    s
}
