//! The `memento` command line: argument parsing and printing only. Every
//! command calls the library's public API.

#[cfg(feature = "plugins")]
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::dataflow::JobReport;
use crate::host::Host;

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
    /// Run an example job with the plugins built into this binary.
    Demo,
    /// Run a job file to completion and print a summary.
    Run {
        /// The job file (TOML).
        job: PathBuf,
        /// The state directory (snapshots).
        #[arg(long, env = "MEMENTO_STATE_DIR", default_value = "memento-state")]
        state_dir: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a component's imports and exports and whether it fits the contract.
    Inspect {
        /// The component file (.wasm).
        component: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMENTO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,memento::plugin=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
            state_dir: _,
            json,
        } => {
            let host = Host::new()?;
            let job = host.load_job_file(&job)?;
            let name = job.spec().name.clone();
            let report = job.run()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                eprint!("{}", format_report(&name, &report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { component, json } => {
            let host = Host::new()?;
            let info = host.inspect(&component)?;
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
            }
            Ok(if info.fits_contract.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// The human summary printed after a run.
pub fn format_report(job: &str, r: &JobReport) -> String {
    use std::fmt::Write;
    let secs = r.elapsed.as_secs_f64();
    let mut s = String::new();
    let _ = writeln!(s, "job `{job}` finished in {secs:.3} s");
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
