//! Sinks: where the last operator's output goes. One writer per task of the
//! last operator; the `file` sink writes one part file per task.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::runtime::Event;
use crate::spec::SinkSpec;

/// Writes one task's output.
pub trait SinkWriter: Send {
    /// Write a batch of events, one line each.
    ///
    /// # Errors
    /// I/O errors, naming the output.
    fn write(&mut self, events: &[Event]) -> Result<(), String>;

    /// Flush and make the output durable.
    ///
    /// # Errors
    /// I/O errors, naming the output.
    fn finish(&mut self) -> Result<(), String>;
}

/// The name of task `task`'s part file in a `file` sink's directory.
pub fn part_file_name(task: u32) -> String {
    format!("part-{task:05}")
}

/// Create the writer of task `task`; relative paths resolve against `base`.
///
/// # Errors
/// When the output cannot be created; the message names it.
pub fn open(spec: &SinkSpec, base: &Path, task: u32) -> Result<Box<dyn SinkWriter>, String> {
    match spec {
        SinkSpec::File { path } => {
            let dir = if path.is_absolute() {
                path.clone()
            } else {
                base.join(path)
            };
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create sink directory {}: {e}", dir.display()))?;
            let path = dir.join(part_file_name(task));
            let file = File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            Ok(Box::new(FileSink {
                out: BufWriter::with_capacity(1 << 16, file),
                path,
                line: Vec::new(),
            }))
        }
        SinkSpec::Stdout => Ok(Box::new(StdoutSink { line: Vec::new() })),
        SinkSpec::Null => Ok(Box::new(NullSink)),
    }
}

/// Append one output line: key, a tab, value, a newline. Bytes that are not
/// UTF-8 become `\xNN`; backslash, tab, CR and LF are escaped so that every
/// event is exactly one line.
pub fn format_line(event: &Event, out: &mut Vec<u8>) {
    escape(&event.key, out);
    out.push(b'\t');
    escape(&event.value, out);
    out.push(b'\n');
}

fn escape(bytes: &[u8], out: &mut Vec<u8>) {
    for chunk in bytes.utf8_chunks() {
        for &b in chunk.valid().as_bytes() {
            match b {
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                _ => out.push(b),
            }
        }
        for &b in chunk.invalid() {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
    }
}

struct FileSink {
    out: BufWriter<File>,
    path: PathBuf,
    line: Vec<u8>,
}

impl SinkWriter for FileSink {
    fn write(&mut self, events: &[Event]) -> Result<(), String> {
        self.line.clear();
        for e in events {
            format_line(e, &mut self.line);
        }
        self.out
            .write_all(&self.line)
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))
    }

    fn finish(&mut self) -> Result<(), String> {
        let err = |e: std::io::Error| format!("cannot write {}: {e}", self.path.display());
        self.out.flush().map_err(err)?;
        self.out.get_ref().sync_all().map_err(err)
    }
}

struct StdoutSink {
    line: Vec<u8>,
}

impl SinkWriter for StdoutSink {
    fn write(&mut self, events: &[Event]) -> Result<(), String> {
        self.line.clear();
        for e in events {
            format_line(e, &mut self.line);
        }
        // One locked write per batch keeps lines of parallel tasks whole.
        std::io::stdout()
            .lock()
            .write_all(&self.line)
            .map_err(|e| format!("cannot write to stdout: {e}"))
    }

    fn finish(&mut self) -> Result<(), String> {
        std::io::stdout()
            .flush()
            .map_err(|e| format!("cannot write to stdout: {e}"))
    }
}

struct NullSink;

impl SinkWriter for NullSink {
    fn write(&mut self, _events: &[Event]) -> Result<(), String> {
        Ok(())
    }
    fn finish(&mut self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_escape_what_would_break_them() {
        let mut out = Vec::new();
        format_line(
            &Event {
                key: b"a\tb".to_vec(),
                value: vec![b'x', 0xff, b'\n', b'\\', 0xc3, 0xa9],
                timestamp: 0,
            },
            &mut out,
        );
        assert_eq!(String::from_utf8(out).unwrap(), "a\\tb\tx\\xff\\n\\\\é\n");
    }
}
