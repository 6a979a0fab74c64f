//! Where a store lives: a local directory or a prefix of an S3-compatible
//! bucket, parsed from what a user typed (`--state-dir`, `HOST.toml`).
//!
//! Parsing comes before anything is opened, so that `s3://bucket/x` can
//! never become a local directory named `s3:` and a typo'd scheme is an
//! error naming it rather than a path.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::StoreError;

/// A store's location (see `docs/STORAGE.md`, "Object storage").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A local directory (created if missing).
    Local(PathBuf),
    /// `s3://<bucket>/<prefix>`: objects under `<prefix>/` (no prefix: the
    /// bucket's root) of an S3-compatible bucket, configured from the
    /// standard `AWS_*` environment variables.
    S3 {
        /// Bucket name, checked against S3's rules.
        bucket: String,
        /// Key prefix without leading or trailing `/`; may be empty.
        prefix: String,
    },
}

/// Longest prefix accepted (S3 keys are at most 1024 bytes; the store's
/// own keys need the rest).
const MAX_PREFIX: usize = 512;

impl StoreLocation {
    /// Parses `s3://bucket[/prefix]` or a plain path. Other `scheme://`
    /// forms are refused.
    ///
    /// # Errors
    /// [`StoreError::InvalidLocation`] naming the location and the reason.
    pub fn parse(input: &str) -> Result<StoreLocation, StoreError> {
        let bad = |reason: String| StoreError::InvalidLocation {
            location: shorten(input),
            reason,
        };
        let Some((scheme, rest)) = input.split_once("://") else {
            if input.is_empty() {
                return Err(bad("empty".into()));
            }
            return Ok(StoreLocation::Local(PathBuf::from(input)));
        };
        if scheme != "s3" {
            return Err(bad(format!(
                "unsupported scheme {scheme:?} (a store is a local path or s3://bucket/prefix)"
            )));
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && !bucket.starts_with(['.', '-'])
            && !bucket.ends_with(['.', '-']);
        if !bucket_ok {
            return Err(bad(
                "the bucket name must be 3-63 characters of a-z, 0-9, '.' and '-'".into(),
            ));
        }
        let prefix = prefix.trim_end_matches('/');
        if prefix.len() > MAX_PREFIX {
            return Err(bad(format!("the prefix is longer than {MAX_PREFIX} bytes")));
        }
        if !prefix.is_empty() {
            let component_ok = |c: &str| {
                !c.is_empty()
                    && c != "."
                    && c != ".."
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            };
            if !prefix.split('/').all(component_ok) {
                return Err(bad(
                    "prefix components must be non-empty, not '.' or '..', of A-Z a-z 0-9 - _ .".into(),
                ));
            }
        }
        Ok(StoreLocation::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The local directory, if this is one.
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            StoreLocation::Local(p) => Some(p),
            StoreLocation::S3 { .. } => None,
        }
    }
}

// Borrowed paths only: `Host::open(&dir)` has always taken a reference,
// and an owned `From` would make clippy ask every caller to drop the `&`.
impl From<&Path> for StoreLocation {
    fn from(p: &Path) -> Self {
        StoreLocation::Local(p.to_path_buf())
    }
}

impl From<&PathBuf> for StoreLocation {
    fn from(p: &PathBuf) -> Self {
        StoreLocation::Local(p.clone())
    }
}

impl From<&StoreLocation> for StoreLocation {
    fn from(l: &StoreLocation) -> Self {
        l.clone()
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Local(p) => write!(f, "{}", p.display()),
            StoreLocation::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// The input as errors show it: escaped, and cut if long.
fn shorten(input: &str) -> String {
    let mut s: String = input.chars().take(80).collect();
    if s.len() < input.len() {
        s.push('…');
    }
    format!("{s:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_s3_urls_parse() {
        assert_eq!(
            StoreLocation::parse("memento-state").unwrap(),
            StoreLocation::Local("memento-state".into())
        );
        assert_eq!(
            StoreLocation::parse("s3://my-bucket/a/b/").unwrap(),
            StoreLocation::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        let root = StoreLocation::parse("s3://bkt").unwrap();
        assert_eq!(root.to_string(), "s3://bkt");
        assert_eq!(
            StoreLocation::parse("s3://bkt/x").unwrap().to_string(),
            "s3://bkt/x"
        );
    }

    #[test]
    fn bad_locations_are_refused_with_the_reason() {
        for (input, why) in [
            ("gs://bkt/x", "unsupported scheme \"gs\""),
            ("s3://", "bucket name"),
            ("s3://Upper/x", "bucket name"),
            ("s3://bkt/a/../b", "prefix components"),
            ("s3://bkt/a//b", "prefix components"),
            ("", "empty"),
        ] {
            let e = StoreLocation::parse(input).unwrap_err().to_string();
            assert!(e.contains(why), "{input}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
