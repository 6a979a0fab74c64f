//! The host configuration of `memento serve` (`HOST.toml`): where to listen,
//! where state lives, the tenants with their hashed tokens and limits, and
//! jobs to start at boot.
//!
//! ```toml
//! listen = "127.0.0.1:8081"          # default
//! state_dir = "state"                # relative to this file, or s3://bucket/prefix
//! work_dir = "work"                  # only with an s3:// state_dir: the local part
//! max_upload = "64MiB"               # largest accepted request body (default)
//! max_jobs = 32                      # running jobs over all tenants (default)
//! cache_dir = "state/cache"          # compiled components (default: `cache` in state_dir)
//! cache_size = "2GiB"                # bound of cache_dir, LRU (default)
//! pool_scan = "500ms"                # s3:// only: how often to look for jobs to take over (default)
//! advertise_url = "http://10.0.0.5:8081"  # s3:// only: this host's API for the pool (default: http://<bound address>)
//! admin_token_blake3 = "…64 hex…"    # `memento token hash` of the admin token
//!
//! [[tenants]]
//! name = "acme"
//! token_blake3 = "…64 hex…"
//! max_jobs = 4                       # running jobs of this tenant (default 4)
//! memory = "256MiB"                  # cap of [limits] memory per instance
//! call_timeout = "5s"                # cap of [limits] call_timeout
//! quota = "10GiB"                    # bytes of snapshot blobs the tenant may keep
//!
//! [[jobs]]                           # started when the host starts
//! tenant = "acme"
//! file = "jobs/clicks.toml"          # relative to this file
//! from = "latest"                    # optional: a snapshot id or `latest`
//! ```
//!
//! Unknown keys and bad values are rejected with the field named, as in job
//! files. Tokens are never stored: only their blake3 hashes, so a leaked
//! config file does not leak access.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{HumanDuration, HumanSize};
use crate::store::{SnapshotId, StoreLocation, TenantName};

/// Default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";
/// Default `cache_size`: 2 GiB.
pub const DEFAULT_CACHE_SIZE: u64 = 2 << 30;
/// Default `max_upload`: 64 MiB.
pub const DEFAULT_MAX_UPLOAD: u64 = 64 << 20;
/// Default host-wide `max_jobs`.
pub const DEFAULT_MAX_JOBS: u32 = 32;
/// Default per-tenant `max_jobs`.
pub const DEFAULT_TENANT_MAX_JOBS: u32 = 4;
/// Default `pool_scan`: how often a pool host looks for jobs to take over.
pub const DEFAULT_POOL_SCAN: std::time::Duration = std::time::Duration::from_millis(500);

/// A host config could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum HostConfigError {
    /// The file could not be read.
    #[error("cannot read host config {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The TOML does not parse or a value is of the wrong shape.
    #[error("host config {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A value parses but is not allowed.
    #[error("host config {path}: {field}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending field, e.g. `tenants[1].token_blake3`.
        field: String,
        /// Why.
        reason: String,
    },
}

/// A parsed, validated `HOST.toml`.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where the snapshot store is: `state_dir` itself, or an
    /// `s3://bucket/prefix` (`docs/STORAGE.md`, "Object storage").
    pub store: StoreLocation,
    /// The local state directory: uploaded components, tenants' files, job
    /// records, the default cache, and the store when it is local. With an
    /// `s3://` store it is `work_dir`.
    pub state_dir: PathBuf,
    /// Where compiled components are cached across restarts (default
    /// `cache` inside `state_dir`).
    pub cache_dir: PathBuf,
    /// Bound of `cache_dir` in bytes (least recently used out).
    pub cache_size: u64,
    /// Largest request body accepted, bytes.
    pub max_upload: u64,
    /// Running jobs over all tenants.
    pub max_jobs: u32,
    /// blake3 of the admin token, if there is an admin.
    pub admin_token: Option<blake3::Hash>,
    /// The tenants, in file order.
    pub tenants: Vec<TenantConfig>,
    /// Jobs started at boot, in file order.
    pub jobs: Vec<BootJob>,
    /// With an `s3://` store: how often this host looks for pool jobs
    /// whose host died (README, "Running on object storage and several
    /// hosts").
    pub pool_scan: std::time::Duration,
    /// With an `s3://` store: the URL other hosts of the pool name for
    /// this host's API (`None`: `http://` and the address it listens on).
    pub advertise_url: Option<String>,
}

/// One tenant: its name, hashed token and limits.
#[derive(Clone, Debug)]
pub struct TenantConfig {
    /// The tenant's name (its store namespace).
    pub name: String,
    /// blake3 of its bearer token.
    pub token: blake3::Hash,
    /// Running jobs at once.
    pub max_jobs: u32,
    /// Cap of a job's `[limits] memory` per instance; `None`: no cap.
    pub memory: Option<u64>,
    /// Cap of a job's `[limits] call_timeout`; `None`: no cap.
    pub call_timeout: Option<std::time::Duration>,
    /// Bytes of snapshot blobs the tenant may keep; `None`: unlimited.
    pub quota: Option<u64>,
}

/// A job to start when the host starts.
#[derive(Clone, Debug)]
pub struct BootJob {
    /// Whose job it is.
    pub tenant: String,
    /// The job file (resolved against the config's directory).
    pub file: PathBuf,
    /// Where to start: `None` from scratch, `Some("latest")` or a snapshot id.
    pub from: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    listen: Option<String>,
    state_dir: String,
    #[serde(default)]
    work_dir: Option<PathBuf>,
    #[serde(default)]
    cache_dir: Option<PathBuf>,
    #[serde(default)]
    cache_size: Option<HumanSize>,
    #[serde(default)]
    max_upload: Option<HumanSize>,
    #[serde(default)]
    max_jobs: Option<u32>,
    #[serde(default)]
    admin_token_blake3: Option<String>,
    #[serde(default)]
    tenants: Vec<RawTenant>,
    #[serde(default)]
    jobs: Vec<RawJob>,
    #[serde(default)]
    pool_scan: Option<HumanDuration>,
    #[serde(default)]
    advertise_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    token_blake3: String,
    #[serde(default)]
    max_jobs: Option<u32>,
    #[serde(default)]
    memory: Option<HumanSize>,
    #[serde(default)]
    call_timeout: Option<HumanDuration>,
    #[serde(default)]
    quota: Option<HumanSize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    tenant: String,
    file: PathBuf,
    #[serde(default)]
    from: Option<String>,
}

/// The blake3 hash of a bearer token, as `token_blake3` holds it (hex).
pub fn hash_token(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

impl HostConfig {
    /// Read and validate a host config; relative paths resolve against its
    /// directory.
    ///
    /// # Errors
    /// [`HostConfigError`] naming the file, the field and the reason.
    pub fn from_file(path: &Path) -> Result<HostConfig, HostConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| HostConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_toml(&text, path, &base)
    }

    /// Parse and validate config text. `origin` names it in errors;
    /// `base_dir` anchors relative paths.
    ///
    /// # Errors
    /// [`HostConfigError`] naming `origin`, the field and the reason.
    pub fn from_toml(text: &str, origin: &Path, base_dir: &Path) -> Result<HostConfig, HostConfigError> {
        let raw: Raw = super::parse_toml(text).map_err(|reason| HostConfigError::Parse {
            path: origin.to_path_buf(),
            reason,
        })?;
        let invalid = |field: String, reason: String| HostConfigError::Invalid {
            path: origin.to_path_buf(),
            field,
            reason,
        };
        let listen_text = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(
                "listen".into(),
                format!("{listen_text:?} is not an IP address and port (e.g. \"127.0.0.1:8081\")"),
            )
        })?;
        let hash = |field: String, hex: &str| {
            blake3::Hash::from_hex(hex.trim()).map_err(|_| {
                invalid(
                    field,
                    "must be the 64-hex-digit blake3 hash of the token (see `memento token hash`)".into(),
                )
            })
        };
        let admin_token = match &raw.admin_token_blake3 {
            Some(hex) => Some(hash("admin_token_blake3".into(), hex)?),
            None => None,
        };
        let mut tenants: Vec<TenantConfig> = Vec::new();
        for (i, t) in raw.tenants.into_iter().enumerate() {
            let field = |f: &str| format!("tenants[{i}].{f}");
            TenantName::new(&t.name).map_err(|e| invalid(field("name"), e.to_string()))?;
            if tenants.iter().any(|o| o.name == t.name) {
                return Err(invalid(
                    field("name"),
                    format!("tenant {:?} is listed twice", t.name),
                ));
            }
            let token = hash(field("token_blake3"), &t.token_blake3)?;
            // A shared token would make the caller's tenant ambiguous.
            if admin_token == Some(token) || tenants.iter().any(|o| o.token == token) {
                return Err(invalid(
                    field("token_blake3"),
                    "is the same token as another tenant's or the admin's".into(),
                ));
            }
            if let Some(m) = t.memory
                && m.0 < (1 << 16)
            {
                return Err(invalid(
                    field("memory"),
                    format!("{} bytes is less than one wasm page (64KiB)", m.0),
                ));
            }
            if let Some(d) = t.call_timeout
                && d.0 < std::time::Duration::from_millis(10)
            {
                return Err(invalid(field("call_timeout"), "must be at least 10ms".into()));
            }
            tenants.push(TenantConfig {
                name: t.name,
                token,
                max_jobs: t.max_jobs.unwrap_or(DEFAULT_TENANT_MAX_JOBS),
                memory: t.memory.map(|s| s.0),
                call_timeout: t.call_timeout.map(|d| d.0),
                quota: t.quota.map(|s| s.0),
            });
        }
        if admin_token.is_none() && tenants.is_empty() {
            let reason = if listen.ip().is_loopback() {
                "no tokens configured: add [[tenants]] or admin_token_blake3 (every request needs a bearer token)"
                    .to_string()
            } else {
                format!(
                    "{listen} is not a loopback address and no tokens are configured: add [[tenants]] or admin_token_blake3"
                )
            };
            return Err(invalid("listen".into(), reason));
        }
        let mut jobs = Vec::new();
        for (i, j) in raw.jobs.into_iter().enumerate() {
            let field = |f: &str| format!("jobs[{i}].{f}");
            if !tenants.iter().any(|t| t.name == j.tenant) {
                return Err(invalid(
                    field("tenant"),
                    format!("no tenant {:?} in [[tenants]]", j.tenant),
                ));
            }
            if let Some(from) = &j.from
                && from != "latest"
            {
                SnapshotId::parse(from).map_err(|e| invalid(field("from"), e.to_string()))?;
            }
            jobs.push(BootJob {
                tenant: j.tenant,
                file: base_dir.join(j.file),
                from: j.from,
            });
        }
        let max_upload = raw.max_upload.map_or(DEFAULT_MAX_UPLOAD, |s| s.0);
        if max_upload == 0 {
            return Err(invalid("max_upload".into(), "must be more than 0 bytes".into()));
        }
        let cache_size = raw.cache_size.map_or(DEFAULT_CACHE_SIZE, |s| s.0);
        let location =
            StoreLocation::parse(&raw.state_dir).map_err(|e| invalid("state_dir".into(), e.to_string()))?;
        let pool_scan = raw.pool_scan.map_or(DEFAULT_POOL_SCAN, |d| d.0);
        if !(std::time::Duration::from_millis(50)..=std::time::Duration::from_secs(3600)).contains(&pool_scan)
        {
            return Err(invalid("pool_scan".into(), "must be between 50ms and 1h".into()));
        }
        if let Some(url) = &raw.advertise_url {
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && url.len() <= 2048
                && !url.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                return Err(invalid(
                    "advertise_url".into(),
                    "must be an http:// or https:// URL without spaces, at most 2048 bytes".into(),
                ));
            }
        }
        let (store, state_dir) = match (location, raw.work_dir) {
            (StoreLocation::Local(p), None) => {
                let dir = base_dir.join(p);
                (StoreLocation::Local(dir.clone()), dir)
            }
            (StoreLocation::Local(_), Some(_)) => {
                return Err(invalid(
                    "work_dir".into(),
                    "is only for an s3:// state_dir (a local state_dir is the work directory)".into(),
                ));
            }
            (remote, Some(work)) => (remote, base_dir.join(work)),
            (_, None) => {
                return Err(invalid(
                    "work_dir".into(),
                    "an s3:// state_dir needs a local work_dir (uploaded components, tenants' files, job records)"
                        .into(),
                ));
            }
        };
        Ok(HostConfig {
            store,
            listen,
            cache_dir: raw.cache_dir.map_or_else(
                || crate::host::default_cache_dir(&state_dir),
                |d| base_dir.join(d),
            ),
            cache_size,
            state_dir,
            max_upload,
            max_jobs: raw.max_jobs.unwrap_or(DEFAULT_MAX_JOBS),
            admin_token,
            tenants,
            jobs,
            pool_scan,
            advertise_url: raw.advertise_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HostConfig, HostConfigError> {
        HostConfig::from_toml(text, Path::new("host.toml"), Path::new("/etc/memento"))
    }

    fn tenant(name: &str, token: &str) -> String {
        format!(
            "[[tenants]]\nname = \"{name}\"\ntoken_blake3 = \"{}\"\n",
            hash_token(token)
        )
    }

    #[test]
    fn the_component_cache_is_configurable() {
        let c = parse(&format!(
            "state_dir = \"state\"\ncache_dir = \"/var/cache/memento\"\ncache_size = \"100MiB\"\n{}",
            tenant("acme", "t1")
        ))
        .unwrap();
        assert_eq!(c.cache_dir, Path::new("/var/cache/memento"));
        assert_eq!(c.cache_size, 100 << 20);
        let c = parse(&format!(
            "state_dir = \"s\"\ncache_dir = \"c\"\n{}",
            tenant("acme", "t1")
        ))
        .unwrap();
        assert_eq!(c.cache_dir, Path::new("/etc/memento/c"));
    }

    #[test]
    fn defaults_and_relative_paths() {
        let err = |t: &str| parse(t).unwrap_err().to_string();
        let remote = parse(&format!(
            "state_dir = \"s3://bkt/pool\"\nwork_dir = \"w\"\n{}",
            tenant("acme", "t1")
        ))
        .unwrap();
        assert_eq!(remote.store.to_string(), "s3://bkt/pool");
        assert_eq!(remote.state_dir, Path::new("/etc/memento/w"));
        assert_eq!(remote.cache_dir, Path::new("/etc/memento/w/cache"));
        let e = err(&format!(
            "state_dir = \"s3://bkt/pool\"\n{}",
            tenant("acme", "t1")
        ));
        assert!(
            e.contains("work_dir") && e.contains("needs a local work_dir"),
            "{e}"
        );
        let e = err(&format!(
            "state_dir = \"s\"\nwork_dir = \"w\"\n{}",
            tenant("acme", "t1")
        ));
        assert!(e.contains("only for an s3://"), "{e}");
        let e = err(&format!("state_dir = \"gs://x/y\"\n{}", tenant("acme", "t1")));
        assert!(e.contains("state_dir") && e.contains("unsupported scheme"), "{e}");
        let c = parse(&format!("state_dir = \"state\"\n{}", tenant("acme", "t1"))).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.state_dir, Path::new("/etc/memento/state"));
        assert_eq!(c.max_upload, DEFAULT_MAX_UPLOAD);
        assert_eq!(c.cache_dir, Path::new("/etc/memento/state/cache"));
        assert_eq!(c.cache_size, DEFAULT_CACHE_SIZE);
        assert_eq!(c.tenants[0].max_jobs, DEFAULT_TENANT_MAX_JOBS);
        assert_eq!(c.tenants[0].token, blake3::hash(b"t1"));
        assert!(c.tenants[0].quota.is_none());
    }

    #[test]
    fn full_config_parses() {
        let text = format!(
            "listen = \"0.0.0.0:9000\"\nstate_dir = \"/var/lib/m\"\nmax_upload = \"1MiB\"\nmax_jobs = 3\n\
             admin_token_blake3 = \"{}\"\n{}max_jobs = 2\nmemory = \"64MiB\"\ncall_timeout = \"2s\"\nquota = \"1GiB\"\n\
             [[jobs]]\ntenant = \"acme\"\nfile = \"j.toml\"\nfrom = \"latest\"\n",
            hash_token("admin"),
            tenant("acme", "t1")
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.max_upload, 1 << 20);
        assert_eq!(c.tenants[0].memory, Some(64 << 20));
        assert_eq!(c.tenants[0].quota, Some(1 << 30));
        assert_eq!(c.jobs[0].file, Path::new("/etc/memento/j.toml"));
        assert_eq!(c.admin_token, Some(blake3::hash(b"admin")));
    }

    #[test]
    fn pool_settings_have_defaults_and_bounds() {
        let err = |t: &str| parse(t).unwrap_err().to_string();
        let base = "state_dir = \"s3://bkt/p\"\nwork_dir = \"w\"\n";
        let acme = tenant("acme", "t1");
        let c = parse(&format!("{base}{acme}")).unwrap();
        assert_eq!((c.pool_scan, c.advertise_url), (DEFAULT_POOL_SCAN, None));
        let c = parse(&format!(
            "{base}pool_scan = \"250ms\"\nadvertise_url = \"http://10.0.0.5:8081\"\n{acme}"
        ))
        .unwrap();
        assert_eq!(c.pool_scan, std::time::Duration::from_millis(250));
        assert_eq!(c.advertise_url.as_deref(), Some("http://10.0.0.5:8081"));
        let e = err(&format!("{base}pool_scan = \"1ms\"\n{acme}"));
        assert!(e.contains("pool_scan: must be between 50ms and 1h"), "{e}");
        for bad in ["ftp://x", "http://a b", "10.0.0.5:8081"] {
            let e = err(&format!("{base}advertise_url = \"{bad}\"\n{acme}"));
            assert!(
                e.contains("advertise_url: must be an http:// or https:// URL"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn bad_configs_name_the_field() {
        let err = |t: &str| parse(t).unwrap_err().to_string();
        let base = format!("state_dir = \"s\"\n{}", tenant("acme", "t1"));
        let e = err(&format!("{base}colour = \"red\"\n"));
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = err("state_dir = \"s\"\nlisten = \"0.0.0.0:80\"\n");
        assert!(e.contains("listen: 0.0.0.0:80 is not a loopback address"), "{e}");
        let e = err(&format!("listen = \"localhost\"\n{base}"));
        assert!(e.contains("listen:"), "{e}");
        let e = err("state_dir = \"s\"\n[[tenants]]\nname = \"a\"\ntoken_blake3 = \"secret\"\n");
        assert!(
            e.contains("tenants[0].token_blake3: must be the 64-hex-digit"),
            "{e}"
        );
        let e = err(&format!("{base}{}", tenant("acme", "t2")));
        assert!(
            e.contains("tenants[1].name: tenant \"acme\" is listed twice"),
            "{e}"
        );
        let e = err(&format!("{base}{}", tenant("other", "t1")));
        assert!(e.contains("tenants[1].token_blake3"), "{e}");
        let e = err(&format!(
            "{base}[[jobs]]\ntenant = \"nobody\"\nfile = \"j.toml\"\n"
        ));
        assert!(e.contains("jobs[0].tenant: no tenant \"nobody\""), "{e}");
        let e = err(&format!(
            "{base}[[jobs]]\ntenant = \"acme\"\nfile = \"j.toml\"\nfrom = \"../x\"\n"
        ));
        assert!(e.contains("jobs[0].from"), "{e}");
        let e = err(&format!("{base}memory = \"1KiB\"\n"));
        assert!(e.contains("tenants[0].memory"), "{e}");
        let e = err(&format!("state_dir = \"s\"\n{}", tenant("../x", "t1")));
        assert!(e.contains("tenants[0].name"), "{e}");
    }
}
