//! The `memento` command line: argument parsing and printing only. Every
//! command calls the library's public API.

mod client;
#[cfg(feature = "demo")]
mod demo;
mod serve;
pub mod store;
mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use memento::coordinator::{FinalState, JobReport};
use memento::runtime::{Runtime, RuntimeOptions};
use memento::service::ServiceJob;
use memento::spec::SnapshotFormat;
use memento::store::{SnapshotId, StoreOptions};
use memento::{Host, HostError, RunOptions, StartFrom};
use store::{SavepointFileCommand, SnapshotsCommand, StoreArgs, StoreCommand};

/// memento — a WebAssembly plugin host for stateful stream operators with
/// unified checkpoints and savepoints.
#[derive(Debug, Parser)]
#[command(
    name = "memento",
    version,
    about = "A WebAssembly plugin host for stateful stream operators with unified checkpoints and savepoints",
    long_about = None
)]
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
        /// Once the API listens, write its address (`HOST:PORT` and a
        /// newline) to this file, replacing it whole: how a script finds
        /// the port of `--listen 127.0.0.1:0`.
        #[arg(long, value_name = "PATH", requires = "listen")]
        addr_file: Option<PathBuf>,
        /// Where compiled components are cached across runs (default:
        /// `cache` inside the state directory). A component is compiled
        /// once per engine configuration; later runs and resumes load it
        /// from here.
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
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
    },
    /// Check every manifest, pack, index and blob of the store; non-zero
    /// exit if damaged.
    Fsck {
        /// Rebuild lost or damaged index files from the packs' own headers
        /// (after the check; then check again).
        #[arg(long)]
        repair_index: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove blobs that no snapshot references; rewrite mostly dead packs.
    Gc {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Store maintenance: `migrate` a layout-1 store's loose blobs into packs.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run a long-lived multi-tenant host with the REST API and dashboard.
    Serve {
        /// The host config (TOML): listen address, state directory, tenants.
        #[arg(long, value_name = "HOST.toml")]
        config: PathBuf,
        /// Once the API listens, write its address (`HOST:PORT` and a
        /// newline) to this file, replacing it whole: how a script finds
        /// the port of `listen = "127.0.0.1:0"`.
        #[arg(long, value_name = "PATH")]
        addr_file: Option<PathBuf>,
    },
    /// Make and hash bearer tokens for `serve`'s config.
    Token {
        #[command(subcommand)]
        command: serve::TokenCommand,
    },
    /// List the jobs on a running host.
    Jobs {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Show a job's checkpoint counts, summary and history on a running host.
    Checkpoints {
        /// The job's name.
        job: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Cancel a job on a running host (its checkpoints stay if persistent).
    Cancel {
        /// The job's name.
        job: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Stop a job on a running host with a final savepoint.
    Stop {
        /// The job's name.
        job: String,
        /// Wait until the final savepoint completes and print its id.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Change a job's parallelism on a running `memento serve`: stop it
    /// with a savepoint and start it again from it with every operator at
    /// N tasks. Only state in key groups (KeyedState) can be divided; other
    /// state is refused and the job runs on as it was.
    Rescale {
        /// The job's name.
        job: String,
        /// The new parallelism of every operator.
        parallelism: u32,
        #[command(flatten)]
        host: HostArgs,
    },
}

/// Where a running host is (`memento serve`, or `memento run --listen`) and
/// who is asking: flattened into every command that talks to one.
#[derive(Debug, Clone, Args)]
struct HostArgs {
    /// The host's API URL (default http://127.0.0.1:8081; `savepoint
    /// dispose` without it uses the local store instead).
    #[arg(long, visible_alias = "url", env = "MEMENTO_HOST", value_name = "URL")]
    host: Option<String>,
    /// Bearer token (a tenant's, or the admin's).
    #[arg(long, env = "MEMENTO_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The tenant to act in: needed with the admin token (sent as
    /// `?tenant=`); for a local `savepoint dispose`, the store's tenant
    /// (default `default`).
    #[arg(long)]
    tenant: Option<String>,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl HostArgs {
    fn client(&self) -> client::Client {
        // MEMENTO_URL is what `savepoint trigger` read before `--host`
        // existed; still honoured so old scripts keep working.
        let host = self
            .host
            .clone()
            .or_else(|| std::env::var("MEMENTO_URL").ok())
            .unwrap_or_else(|| client::DEFAULT_HOST.to_string());
        client::Client::new(&host, self.token.as_deref(), self.tenant.as_deref())
    }
}

#[derive(Debug, Subcommand)]
enum SavepointCommand {
    /// Trigger a savepoint of a job on a running host (`memento serve` or
    /// `memento run --listen`).
    Trigger {
        /// The job's name.
        job: String,
        /// Wait until the savepoint completes and print its id.
        #[arg(long)]
        wait: bool,
        /// Snapshot format: canonical (portable across plugin versions),
        /// native (memory images) or auto (native where possible); default:
        /// the job's `[savepoints] format`.
        #[arg(long, value_parser = parse_format)]
        format: Option<SnapshotFormat>,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Delete a savepoint: on the running host given by `--host` (or
    /// MEMENTO_HOST), else in the local store of `--state-dir`.
    Dispose {
        /// The savepoint id.
        id: String,
        #[command(flatten)]
        host: HostArgs,
        /// Without a host: the state directory holding the snapshot store
        /// (a path or s3://bucket/prefix).
        #[arg(long, env = "MEMENTO_STATE_DIR", default_value = "memento-state", value_parser = store::parse_location)]
        state_dir: memento::store::StoreLocation,
    },
    /// Write a snapshot and all its blobs to a self-contained archive file.
    Export {
        /// The snapshot id.
        id: String,
        /// The archive file to create (must not exist).
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Add the snapshot in an archive file to this store.
    Import {
        /// The archive file.
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
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

/// The error and its causes on one line; a cause whose text the message
/// already includes (library errors often embed their source) is not
/// repeated. At most 2,000 characters: a message may quote an input.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    memento::spec::excerpt(&line.replace('\n', " "), 2000)
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
            #[cfg(feature = "demo")]
            return demo::run().map(|()| ExitCode::SUCCESS);
            #[cfg(not(feature = "demo"))]
            anyhow::bail!("this memento was built without the example plugins (feature `demo`)");
        }
        Command::Run {
            job,
            from,
            on_sigterm,
            json,
            listen,
            token,
            addr_file,
            cache_dir,
            store,
        } => run(
            &job,
            from.as_deref(),
            on_sigterm,
            json,
            listen.as_deref().map(|addr| Listen {
                addr,
                token: token.as_deref(),
                addr_file: addr_file.as_deref(),
            }),
            cache_dir.as_deref(),
            &store,
        ),
        Command::Inspect { component, json } => inspect(&component, json),
        Command::Snapshots { command, store } => {
            store::run_snapshots(&store, command).map(|()| ExitCode::SUCCESS)
        }
        Command::Savepoint { command } => savepoint(command),
        Command::Fsck { store, repair_index } => store::run_fsck(&store, repair_index),
        Command::Store { command, store } => store::run_store(&store, command).map(|()| ExitCode::SUCCESS),
        Command::Gc { store } => store::run_gc(&store).map(|()| ExitCode::SUCCESS),
        Command::Serve { config, addr_file } => serve::serve(&config, addr_file.as_deref()),
        Command::Token { command } => serve::token(command),
        Command::Jobs { host } => {
            let a = host.client().jobs()?;
            print_or_json(host.json, &a.json, || client::format_jobs(&a.value))
        }
        Command::Checkpoints { job, host } => {
            let a = host.client().checkpoints(&job)?;
            print_or_json(host.json, &a.json, || client::format_checkpoints(&job, &a.value))
        }
        Command::Cancel { job, host } => {
            let a = host.client().cancel(&job)?;
            print_or_json(host.json, &a.json, || {
                format!("cancelling job `{}`\n", a.value.job)
            })
        }
        Command::Rescale {
            job,
            parallelism,
            host,
        } => {
            let a = host.client().rescale(&job, parallelism)?;
            print_or_json(host.json, &a.json, || {
                format!(
                    "job `{job}` runs at parallelism {parallelism}, resumed from savepoint {}\n",
                    a.json["savepoint"].as_str().unwrap_or("?")
                )
            })
        }
        Command::Stop { job, wait, host } => {
            let client = host.client();
            let request = client.stop(&job)?;
            if !wait {
                let v = serde_json::json!({ "request_id": request });
                return print_or_json(host.json, &v, || {
                    format!("stopping job `{job}` with a savepoint: request {request}\n")
                });
            }
            let id = client.wait_savepoint(&job, &request)?;
            let v = serde_json::json!({ "status": "completed", "snapshot": id });
            print_or_json(host.json, &v, || format!("{id}\n"))
        }
    }
}

/// Print `v` as JSON, or the human form `text` makes.
fn print_or_json(
    json: bool,
    v: &serde_json::Value,
    text: impl FnOnce() -> String,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", text());
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_format(s: &str) -> Result<SnapshotFormat, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?} is not a snapshot format: expected canonical, native or auto"))
}

fn savepoint(command: SavepointCommand) -> anyhow::Result<ExitCode> {
    match command {
        SavepointCommand::Trigger {
            job,
            wait,
            format,
            host,
        } => {
            let client = host.client();
            let request = client.trigger_savepoint(&job, format)?;
            if !wait {
                let v = serde_json::json!({ "request_id": request });
                return print_or_json(host.json, &v, || {
                    format!("triggered savepoint of job `{job}`: request {request}\n")
                });
            }
            let id = client.wait_savepoint(&job, &request)?;
            let v = serde_json::json!({ "status": "completed", "snapshot": id });
            print_or_json(host.json, &v, || format!("{id}\n"))
        }
        // Remote only when a host is named explicitly: a bare `dispose ID`
        // has always meant the local store, and must not start deleting on
        // whatever listens on the default address.
        SavepointCommand::Dispose { id, host, .. } if host.host.is_some() => {
            let a = host.client().dispose(&id)?;
            print_or_json(host.json, &a.json, || format!("disposed {}\n", a.value.disposed))
        }
        SavepointCommand::Dispose { id, host, state_dir } => {
            if host.json {
                anyhow::bail!("--json is for a host's API: name the host with --host or MEMENTO_HOST");
            }
            let store = StoreArgs {
                state_dir,
                tenant: host.tenant.unwrap_or_else(|| "default".into()),
            };
            store::run_savepoint(&store, SavepointFileCommand::Dispose { id }).map(|()| ExitCode::SUCCESS)
        }
        SavepointCommand::Export { id, file, store } => {
            store::run_savepoint(&store, SavepointFileCommand::Export { id, file })
                .map(|()| ExitCode::SUCCESS)
        }
        SavepointCommand::Import { file, store } => {
            store::run_savepoint(&store, SavepointFileCommand::Import { file }).map(|()| ExitCode::SUCCESS)
        }
    }
}

/// `memento run --listen`: where the job's API listens and how.
struct Listen<'a> {
    addr: &'a str,
    token: Option<&'a str>,
    addr_file: Option<&'a Path>,
}

fn run(
    job_file: &Path,
    from: Option<&str>,
    on_signal: OnSignal,
    json: bool,
    listen: Option<Listen>,
    cache_dir: Option<&Path>,
    store: &StoreArgs,
) -> anyhow::Result<ExitCode> {
    // Read the job file first: a bad one should not create a state directory.
    let spec = memento::spec::JobSpec::from_file(job_file)?;
    // The cache is local and trusted: beside a local store by default, and
    // only where asked for when the store is on object storage.
    let runtime = RuntimeOptions {
        cache_dir: cache_dir
            .map(Path::to_path_buf)
            .or_else(|| store.state_dir.local_path().map(memento::default_cache_dir)),
        ..RuntimeOptions::default()
    };
    let host = Host::open_with_runtime(&store.state_dir, StoreOptions::default(), runtime)?;
    let job = host.load_job(spec, &store.tenant)?;
    let from = match from {
        None => StartFrom::Scratch,
        Some("latest") => StartFrom::Latest,
        Some(id) => StartFrom::Snapshot(SnapshotId::parse(id)?),
    };
    watch_signals(job.control(), on_signal)?;
    let name = job.spec().name.clone();
    // The API and this thread share the job through its handle, so both
    // APIs answer from the same state (and a failed start shows as failed).
    let job = Arc::new(ServiceJob::new(job));
    let server = match listen {
        Some(listen) => {
            // Read as the API reads a presented token: without surrounding
            // whitespace; an empty one would protect nothing.
            let token = listen.token.map(str::trim);
            if token == Some("") {
                anyhow::bail!("--token is empty: give the bearer token the API should require");
            }
            let server = crate::api::serve_job(listen.addr, job.clone(), token)?;
            eprintln!("memento: job `{name}` API on http://{}", server.local_addr());
            if let Some(path) = listen.addr_file {
                serve::write_addr_file(path, server.local_addr())?;
            }
            Some(server)
        }
        None => None,
    };
    let result = job.run(RunOptions { from });
    if let Some(server) = &server {
        // A client that stopped the job over HTTP polls for its savepoint.
        server.linger(std::time::Duration::from_secs(3));
    }
    match result {
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
fn watch_signals(control: memento::coordinator::JobControl, on_signal: OnSignal) -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut stopping = false;
            for _ in signals.forever() {
                if on_signal == OnSignal::Savepoint && !stopping {
                    stopping = true;
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
            Ok(()) => println!("  contract {}: yes", info.contract),
            Err(why) => println!("  contract {}: no — {why}", info.contract),
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
    if !r.snapshots.is_empty() || r.failed_snapshots > 0 {
        let _ = writeln!(
            s,
            "  snapshots  {:>12} completed, {} failed",
            r.snapshots.len(),
            r.failed_snapshots
        );
        if let Some(last) = r.snapshots.last() {
            let _ = writeln!(s, "  latest     {:>12}", last.id.to_string());
        }
    }
    if r.restarts > 0 {
        let _ = writeln!(s, "  restarts   {:>12}", r.restarts);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_does_not_repeat_embedded_causes() {
        let e =
            anyhow::Error::new(std::io::Error::other("disk on fire")).context("cannot write x: disk on fire");
        assert_eq!(one_line(&e), "cannot write x: disk on fire");
        let e = anyhow::Error::new(std::io::Error::other("root cause")).context("outer\nline");
        assert_eq!(one_line(&e), "outer line: root cause");
    }
}
