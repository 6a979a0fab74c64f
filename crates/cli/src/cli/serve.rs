//! `memento serve` (the multi-tenant host) and `memento token` (making and
//! hashing bearer tokens for its config).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use memento::service::Service;
use memento::spec::host_config::{HostConfig, hash_token};

/// `memento token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new random token and, on stderr, its blake3 for HOST.toml.
    New,
    /// Print the blake3 of a token (the argument, or standard input) as
    /// `token_blake3` / `admin_token_blake3` expect it.
    Hash {
        /// The token; read from standard input when absent (keeps it out of
        /// the shell history).
        token: Option<String>,
    },
}

/// Run `memento token …`.
pub fn token(command: TokenCommand) -> anyhow::Result<ExitCode> {
    match command {
        TokenCommand::New => {
            let mut bytes = [0u8; 24];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut bytes))
                .context("read /dev/urandom")?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            println!("{token}");
            eprintln!("token_blake3 = \"{}\"", hash_token(&token));
        }
        TokenCommand::Hash { token } => {
            let token = match token {
                Some(t) => t,
                None => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("read the token from stdin")?;
                    s
                }
            };
            // A trailing newline from `echo` is not part of the token.
            let token = token.trim_end_matches(['\n', '\r']);
            if token.is_empty() {
                // Its hash would configure a tenant nobody can authenticate as.
                anyhow::bail!("the token is empty: give it as an argument or on standard input");
            }
            println!("{}", hash_token(token));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Write `addr` as `HOST:PORT` and a newline to `path`, replacing the file
/// whole (a temporary file renamed into place), so that whoever polls for
/// it never reads half an address.
pub(crate) fn write_addr_file(path: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let write = || -> std::io::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        writeln!(tmp, "{addr}")?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    };
    write().with_context(|| format!("--addr-file {}: cannot write the address", path.display()))
}

/// Run `memento serve --config HOST.toml` until SIGTERM or SIGINT, then
/// cancel every job (persistent checkpoints stay) and exit.
pub fn serve(config: &Path, addr_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = HostConfig::from_file(config)?;
    let tenants = config.tenants.len();
    let service = Service::start(config)?;
    let server = crate::api::multi::serve(service.clone())?;
    // On an s3:// store: join the pool once the API answers, so the URL
    // other hosts are given works.
    let url = service
        .config()
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", server.local_addr()));
    service.start_pool(&url);
    eprintln!(
        "memento: host for {tenants} tenant(s), {} job(s) started; API on http://{}",
        service.jobs(&memento::service::Scope::All).len(),
        server.local_addr()
    );
    if let Some(path) = addr_file
        && let Err(e) = write_addr_file(path, server.local_addr())
    {
        // Nobody could find the API: stop as at a signal, then say why.
        drop(server);
        service.shutdown();
        return Err(e);
    }
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    signals.forever().next();
    eprintln!("memento: signal received, cancelling jobs (persistent checkpoints are kept)");
    drop(server);
    service.shutdown();
    Ok(ExitCode::SUCCESS)
}
