//! Validated names: tenants, jobs and snapshot ids.
//!
//! Names become path components under the store root, so they are checked
//! once, here, and carried as types afterwards: a `JobName` can never be
//! `../x`, absolute, contain NUL or a separator, or be too long.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A tenant name, job name, snapshot id or blob hash that was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct InvalidName {
    /// Which kind of name (`tenant name`, `job name`, `snapshot id`, …).
    pub what: &'static str,
    /// The rejected input, cut to its first 80 characters (it may come
    /// from the network).
    pub value: String,
    /// Why it was rejected.
    pub reason: String,
}

impl InvalidName {
    pub(crate) fn new(what: &'static str, value: &str, reason: String) -> Self {
        let value = match value.char_indices().nth(80) {
            Some((cut, _)) => format!("{}…", &value[..cut]),
            None => value.to_string(),
        };
        InvalidName { what, value, reason }
    }
}

/// Longest tenant or job name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Digits the snapshot number is zero-padded to in ids, so ids of one job
/// sort by number in a plain listing up to 999,999 snapshots.
pub const ID_NUMBER_WIDTH: usize = 6;

/// Checks a tenant or job name: 1..=64 bytes of `[A-Za-z0-9_.-]`, not
/// starting with `.` (which also excludes `.` and `..`).
fn check_name(what: &'static str, value: &str) -> Result<(), InvalidName> {
    let reject = |reason: String| InvalidName::new(what, value, reason);
    if value.is_empty() {
        return Err(reject("must not be empty".into()));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(reject(format!(
            "is {} bytes long, at most {MAX_NAME_LEN} are allowed",
            value.len()
        )));
    }
    if value.starts_with('.') {
        return Err(reject("must not start with '.'".into()));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        let what_char = match c {
            '/' | '\\' => "a path separator".to_string(),
            '\0' => "a NUL byte".to_string(),
            c => format!("{c:?}"),
        };
        return Err(reject(format!(
            "contains {what_char}; only ASCII letters, digits, '_', '.' and '-' are allowed"
        )));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `value`.
            ///
            /// # Errors
            /// [`InvalidName`] naming the input and the reason.
            pub fn new(value: &str) -> Result<Self, InvalidName> {
                check_name($what, value)?;
                Ok(Self(value.to_string()))
            }

            /// The name as a string (always a safe path component).
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A tenant's name: the namespace all of its jobs and snapshots live in.
    TenantName,
    "tenant name"
);
name_type!(
    /// A job's name, unique within a tenant.
    JobName,
    "job name"
);

/// Identifies one snapshot of one job within a tenant: `<job>-<number>`,
/// the number zero-padded to [`ID_NUMBER_WIDTH`] digits (e.g.
/// `wordcount-000042`).
///
/// Parsing reads the number from the right (job names may contain `-`) and
/// accepts unpadded numbers (`wordcount-42`), normalising them; `Display`
/// always prints the canonical padded form.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SnapshotId {
    job: JobName,
    number: u64,
}

impl SnapshotId {
    /// The id of snapshot `number` of `job`.
    pub fn new(job: JobName, number: u64) -> Self {
        SnapshotId { job, number }
    }

    /// Parses `<job>-<number>`.
    ///
    /// # Errors
    /// [`InvalidName`] naming the id and what is wrong with it.
    pub fn parse(value: &str) -> Result<Self, InvalidName> {
        let reject = |reason: String| InvalidName::new("snapshot id", value, reason);
        let Some((job, digits)) = value.rsplit_once('-') else {
            return Err(reject("expected <job>-<number>, e.g. wordcount-000042".into()));
        };
        if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(reject(format!(
                "{digits:?} after the last '-' is not a snapshot number"
            )));
        }
        let number: u64 = digits
            .parse()
            .map_err(|_| reject(format!("snapshot number {digits} is too large")))?;
        let job = JobName::new(job).map_err(|e| reject(format!("job name {job:?} {}", e.reason)))?;
        Ok(SnapshotId { job, number })
    }

    /// The job this snapshot belongs to.
    pub fn job(&self) -> &JobName {
        &self.job
    }

    /// The snapshot number (one counter per job).
    pub fn number(&self) -> u64 {
        self.number
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{:0width$}", self.job, self.number, width = ID_NUMBER_WIDTH)
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

impl PartialOrd for SnapshotId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Orders by job, then number (numerically, not as text).
impl Ord for SnapshotId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.job, self.number).cmp(&(&other.job, other.number))
    }
}

impl FromStr for SnapshotId {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        Self::parse(s)
    }
}

impl Serialize for SnapshotId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SnapshotId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(e: InvalidName) -> String {
        e.to_string()
    }

    #[test]
    fn good_names_pass() {
        for ok in ["a", "word-count", "job_1.v2", "A-Z", &"x".repeat(64)] {
            JobName::new(ok).unwrap();
            TenantName::new(ok).unwrap();
        }
    }

    #[test]
    fn bad_names_are_rejected_with_the_reason() {
        let cases = [
            ("", "must not be empty"),
            ("../x", "must not start with '.'"),
            ("..", "must not start with '.'"),
            (".hidden", "must not start with '.'"),
            ("/etc/passwd", "a path separator"),
            ("a/b", "a path separator"),
            ("a\\b", "a path separator"),
            ("a\0b", "a NUL byte"),
            ("a b", "' '"),
            ("é", "'é'"),
        ];
        for (input, expected) in cases {
            let msg = reason(JobName::new(input).unwrap_err());
            assert!(msg.contains("invalid job name"), "{msg}");
            assert!(msg.contains(expected), "{input:?}: {msg}");
        }
        let long = "x".repeat(65);
        let msg = reason(TenantName::new(&long).unwrap_err());
        assert!(msg.contains("65 bytes long, at most 64"), "{msg}");
    }

    #[test]
    fn snapshot_ids_parse_from_the_right_and_normalise() {
        let id = SnapshotId::parse("word-count-42").unwrap();
        assert_eq!(id.job().as_str(), "word-count");
        assert_eq!(id.number(), 42);
        assert_eq!(id.to_string(), "word-count-000042");
        assert_eq!(SnapshotId::parse("word-count-000042").unwrap(), id);
        let big = SnapshotId::parse("j-12345678").unwrap();
        assert_eq!(big.to_string(), "j-12345678");
    }

    #[test]
    fn bad_snapshot_ids_are_rejected_with_the_reason() {
        let cases = [
            ("nodash", "expected <job>-<number>"),
            ("job-", "is not a snapshot number"),
            ("job-12a", "is not a snapshot number"),
            ("-12", "job name \"\" must not be empty"),
            ("../x-1", "must not start with '.'"),
            ("a/b-1", "a path separator"),
            ("..-1", "must not start with '.'"),
            ("/abs-1", "a path separator"),
            ("a\0-1", "a NUL byte"),
            ("j-99999999999999999999", "too large"),
            ("j-123456789012345678901", "is not a snapshot number"),
        ];
        for (input, expected) in cases {
            let msg = reason(SnapshotId::parse(input).unwrap_err());
            assert!(msg.contains("invalid snapshot id"), "{msg}");
            assert!(msg.contains(expected), "{input:?}: {msg}");
        }
    }

    #[test]
    fn ids_order_numerically() {
        let a = SnapshotId::parse("j-9").unwrap();
        let b = SnapshotId::parse("j-1000000").unwrap();
        assert!(a < b);
    }
}
