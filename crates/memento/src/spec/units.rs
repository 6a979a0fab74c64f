//! Human-readable durations ("2s", "1m30s", "250ms") and sizes ("512MiB").

use std::time::Duration;

/// At most the first `max` characters of `text`, with `…` when cut: how
/// much of an input an error message may quote (an input can be megabytes).
pub fn excerpt(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// A duration, size or cron expression that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct UnitError {
    /// `duration`, `size` or `cron expression`.
    pub what: &'static str,
    /// The input, cut to its first 40 characters.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl UnitError {
    fn new(what: &'static str, input: &str, reason: impl Into<String>) -> Self {
        UnitError {
            what,
            input: excerpt(input, 40),
            reason: reason.into(),
        }
    }
}

/// Parse a duration: one or more `<number><unit>` parts with units `ms`, `s`,
/// `m`, `h`, `d` (e.g. `"1h30m"`, `"250ms"`, `"1.5s"`).
///
/// # Errors
/// [`UnitError`] naming the input and what is wrong with it.
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let bad = |reason: String| UnitError::new("duration", input, reason);
    let s = input.trim();
    if s.is_empty() {
        return Err(bad("empty (expected e.g. \"2s\", \"500ms\", \"1h\")".into()));
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(bad(format!("expected a number before {rest:?}")));
        }
        let number: f64 = rest[..num_len]
            .parse()
            .map_err(|_| bad(format!("bad number {:?}", &rest[..num_len])))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        let seconds = match unit {
            "ms" => 0.001,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "" => {
                return Err(bad("missing unit (use ms, s, m, h or d)".into()));
            }
            other => {
                return Err(bad(format!("unknown unit {other:?} (use ms, s, m, h or d)")));
            }
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > 1e12 {
        return Err(bad("too large".into()));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parse a size in bytes: a number with an optional unit `B`, `KiB`, `MiB`,
/// `GiB`, `TiB` (powers of 1024) or `KB`, `MB`, `GB`, `TB` (powers of 1000).
///
/// # Errors
/// [`UnitError`] naming the input and what is wrong with it.
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let bad = |reason: String| UnitError::new("size", input, reason);
    let s = input.trim();
    let num_len = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    if num_len == 0 {
        return Err(bad("expected a number first, e.g. \"512MiB\", \"2GiB\"".into()));
    }
    let number: f64 = s[..num_len].parse().map_err(|_| bad("bad number".into()))?;
    let factor: u64 = match s[num_len..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(bad(format!(
                "unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            )));
        }
    };
    let bytes = number * factor as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(bad("too large".into()));
    }
    Ok(bytes as u64)
}

/// Format a byte count for people: `1.5 MiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Parse a cron expression: five fields (minute hour day month weekday) or
/// six with seconds first.
///
/// # Errors
/// [`UnitError`] with the parser's message.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, UnitError> {
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map_err(|e| UnitError::new("cron expression", expr, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(
            parse_duration("10")
                .unwrap_err()
                .to_string()
                .contains("missing unit")
        );
        assert!(
            parse_duration("3 weeks")
                .unwrap_err()
                .to_string()
                .contains("unknown unit \"weeks\"")
        );
        assert!(parse_duration("").is_err());
        assert!(
            parse_duration("s")
                .unwrap_err()
                .to_string()
                .contains("expected a number")
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(
            parse_size("12 parsecs")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
        assert!(parse_size("MiB").is_err());
        let long = "9".repeat(10_000) + "parsecs";
        let e = parse_size(&long).unwrap_err().to_string();
        assert!(e.len() < 200, "the input is cut, not echoed whole: {e}");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(12), "12 B");
    }

    #[test]
    fn cron_expressions() {
        assert!(parse_cron("* * * * *").is_ok());
        assert!(parse_cron("0 0 * * * *").is_ok());
        assert!(
            parse_cron("every tuesday")
                .unwrap_err()
                .to_string()
                .contains("invalid cron expression")
        );
    }
}
