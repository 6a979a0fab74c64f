//! What a guest wrote to stderr before it failed, on one line: the reason a
//! trap error shows.

/// What the guest wrote to stderr to explain its failure, on one line: for
/// a Rust guest the panic message; for a guest that printed a stack trace
/// first (an uncaught Python or JavaScript exception) the exception line
/// too, since the panic or trap that follows it only says that something
/// was thrown.
pub(super) fn last_stderr_message(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note:"))
        .collect();
    // A Rust panic prints "thread '…' panicked at FILE:LINE:COL:\nMESSAGE".
    let panic_at = lines.iter().rposition(|l| l.contains("panicked at"));
    let before = &lines[..panic_at.unwrap_or(lines.len())];
    let panic = panic_at.map(|i| {
        let first = lines[i];
        let first = &first[first.find("panicked at").unwrap_or(0)..];
        std::iter::once(first)
            .chain(lines[i + 1..].iter().map(|l| l.trim()))
            .collect::<Vec<_>>()
            .join(" ")
    });
    let exception = exception_line(before);
    let msg = match (exception, panic) {
        (Some(e), Some(p)) => format!("{e}; {p}"),
        (Some(e), None) => e.to_string(),
        (None, Some(p)) => p,
        (None, None) => before.last()?.trim().to_string(),
    };
    Some(format!("guest stderr: {}", truncate(&msg, 500)))
}

/// The line naming an exception in a stack trace, if `lines` end with one:
/// the last unindented line next to indented ones (Python puts it after
/// its `  File …` lines, JavaScript before its `    at …` lines).
fn exception_line<'a>(lines: &[&'a str]) -> Option<&'a str> {
    let indented = |i: usize| lines.get(i).is_some_and(|l| l.starts_with(char::is_whitespace));
    (0..lines.len())
        .rev()
        .take(32)
        .find(|&i| {
            !indented(i)
                && !lines[i].starts_with("Traceback")
                && ((i > 0 && indented(i - 1)) || indented(i + 1))
        })
        .map(|i| lines[i])
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_message_is_extracted_from_stderr() {
        let err =
            b"\nthread '<unnamed>' panicked at src/lib.rs:10:5:\nboom\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(
            last_stderr_message(err).unwrap(),
            "guest stderr: panicked at src/lib.rs:10:5: boom"
        );
        assert_eq!(last_stderr_message(b"  \n"), None);
        assert_eq!(
            last_stderr_message(b"loaded 3 keys\nthread '<unnamed>' panicked at src/lib.rs:1:1:\nboom\n")
                .unwrap(),
            "guest stderr: panicked at src/lib.rs:1:1: boom",
            "an unrelated earlier line is not an exception"
        );
    }

    #[test]
    fn an_uncaught_python_exception_keeps_its_type_and_message() {
        let err = b"Traceback (most recent call last):\n  File \"/app/app.py\", line 12, in process\n    \
            raise ValueError(f\"bad record {key}\")\nValueError: bad record k7\n\
            thread '<unnamed>' panicked at src/lib.rs:95:22:\nPython function threw an unexpected exception\n\
            note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            last_stderr_message(err).unwrap(),
            "guest stderr: ValueError: bad record k7; panicked at src/lib.rs:95:22: \
             Python function threw an unexpected exception"
        );
    }

    #[test]
    fn an_uncaught_javascript_error_keeps_its_message() {
        let err = b"starting\nError: no state for key k1\n    at process (app.js:14:11)\n    at main (app.js:40:3)\n";
        assert_eq!(
            last_stderr_message(err).unwrap(),
            "guest stderr: Error: no state for key k1"
        );
    }
}
