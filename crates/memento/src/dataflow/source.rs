//! The built-in sources, `file` and `generator`, on the public
//! [`crate::io::Source`] traits, and the source a job spec names (built-in
//! or the embedder's own). Each reports its position so that recovery can
//! resume from it.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::io::{Source, SourceError, SourceReader};
use crate::runtime::Event;
use crate::spec::{FileFormat, SourceSpec};

/// The longest line a file source reads: a record is held whole by the
/// host, so its size must not be the input's to choose.
pub const MAX_LINE: usize = 16 << 20;

/// A file source's batch ends once its records hold this many bytes (and at
/// `batch` records at the latest), so that a batch of long lines is not a
/// batch-count multiple of them.
pub const MAX_BATCH_BYTES: u64 = super::budget::INPUT_BYTES;

/// Opens `path` for reading if it is a regular file. Non-blocking, so that
/// a FIFO (which would block the source thread until someone writes, out of
/// reach of stop and cancel) is refused at once.
fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// The source a job spec names: a built-in one (paths resolve against
/// `base`) or the embedder's own.
pub fn of(spec: &SourceSpec, base: &Path) -> Arc<dyn Source> {
    match spec {
        SourceSpec::Custom(custom) => custom.0.clone(),
        builtin => Arc::new(Builtin {
            spec: builtin.clone(),
            base: base.to_path_buf(),
        }),
    }
}

/// A `file` or `generator` source of a job file.
struct Builtin {
    spec: SourceSpec,
    base: PathBuf,
}

impl Source for Builtin {
    fn describe(&self) -> String {
        self.spec.describe()
    }

    fn open(&self) -> Result<Box<dyn SourceReader>, SourceError> {
        reader(&self.spec, &self.base)
    }
}

/// Open a reader of the source `spec` names; paths resolve against `base`.
///
/// # Errors
/// When the input cannot be opened; the message names it.
pub fn reader(spec: &SourceSpec, base: &Path) -> Result<Box<dyn SourceReader>, SourceError> {
    match spec {
        SourceSpec::Custom(custom) => custom.0.open(),
        SourceSpec::File {
            path,
            format,
            key_field,
            timestamp_field,
            key_separator,
            batch,
        } => {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                base.join(path)
            };
            let file = match open_regular(&path) {
                Ok(f) => f,
                Err(source) => return Err(SourceError::Open { path, source }),
            };
            Ok(Box::new(FileSource {
                reader: BufReader::with_capacity(1 << 16, file),
                path,
                format: *format,
                key_field: key_field.clone(),
                timestamp_field: timestamp_field.clone(),
                key_separator: key_separator.clone(),
                batch: *batch,
                line_no: 0,
                line: Vec::new(),
            }))
        }
        SourceSpec::Generator {
            count,
            rate,
            keys,
            seed,
            batch,
        } => Ok(Box::new(Generator::new(*count, *rate, *keys, *seed, *batch))),
    }
}

/// Lines or JSON lines of a file.
struct FileSource {
    reader: BufReader<File>,
    path: PathBuf,
    format: FileFormat,
    key_field: Option<String>,
    timestamp_field: Option<String>,
    key_separator: Option<String>,
    batch: usize,
    line_no: u64,
    line: Vec<u8>,
}

impl FileSource {
    fn parse_line(&self, line: &[u8]) -> Result<Event, SourceError> {
        let bad = |reason: String| SourceError::Record {
            path: self.path.clone(),
            line: self.line_no,
            reason,
        };
        match self.format {
            FileFormat::Lines => {
                let (key, value) = match &self.key_separator {
                    Some(sep) if !sep.is_empty() => match find(line, sep.as_bytes()) {
                        Some(i) => (line[..i].to_vec(), line[i + sep.len()..].to_vec()),
                        None => (line.to_vec(), Vec::new()),
                    },
                    _ => (line.to_vec(), line.to_vec()),
                };
                Ok(Event {
                    key,
                    value,
                    timestamp: (self.line_no - 1) as i64,
                })
            }
            FileFormat::Jsonl => {
                let json: serde_json::Value =
                    serde_json::from_slice(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
                let key = match &self.key_field {
                    None => Vec::new(),
                    Some(field) => match json.get(field) {
                        Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
                        Some(other) => other.to_string().into_bytes(),
                        None => return Err(bad(format!("key field `{field}` is missing"))),
                    },
                };
                let timestamp = match &self.timestamp_field {
                    None => (self.line_no - 1) as i64,
                    Some(field) => json
                        .get(field)
                        .and_then(serde_json::Value::as_i64)
                        .ok_or_else(|| {
                            bad(format!("timestamp field `{field}` is missing or not an integer"))
                        })?,
                };
                Ok(Event {
                    key,
                    value: line.to_vec(),
                    timestamp,
                })
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl FileSource {
    /// Read the next line into `self.line` and count it; `false` at the end
    /// of the file.
    fn read_line(&mut self) -> Result<bool, SourceError> {
        use std::io::Read;
        self.line.clear();
        // One byte past the limit tells a long line from one at the limit.
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut self.line)
            .map_err(|source| SourceError::Read {
                path: self.path.clone(),
                source,
            })?;
        if n > 0 {
            self.line_no += 1;
        }
        let body = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
        if body.len() > MAX_LINE {
            return Err(SourceError::LongLine {
                path: self.path.clone(),
                line: self.line_no,
                max: MAX_LINE,
            });
        }
        Ok(n > 0)
    }
}

impl SourceReader for FileSource {
    fn next_batch(&mut self) -> Result<Option<Vec<Event>>, SourceError> {
        let mut out = Vec::with_capacity(self.batch.min(4096));
        let mut bytes = 0u64;
        while out.len() < self.batch && bytes < MAX_BATCH_BYTES {
            if !self.read_line()? {
                break;
            }
            let mut line = std::mem::take(&mut self.line);
            while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                line.pop();
            }
            if self.format == FileFormat::Jsonl && line.iter().all(u8::is_ascii_whitespace) {
                self.line = line;
                continue;
            }
            let event = self.parse_line(&line)?;
            bytes += super::budget::event_bytes(&event);
            out.push(event);
            self.line = line;
        }
        Ok(if out.is_empty() { None } else { Some(out) })
    }

    fn position(&self) -> u64 {
        self.line_no
    }

    fn seek(&mut self, position: u64) -> Result<(), SourceError> {
        // Positions count lines, so rewinding means reading from the start.
        use std::io::Seek;
        self.reader
            .seek(std::io::SeekFrom::Start(0))
            .map_err(|source| SourceError::Read {
                path: self.path.clone(),
                source,
            })?;
        self.line_no = 0;
        while self.line_no < position {
            if !self.read_line()? {
                return Err(SourceError::Shorter {
                    path: self.path.clone(),
                    lines: self.line_no,
                    position,
                });
            }
        }
        Ok(())
    }
}

/// Deterministic synthetic events: event `i` has key `key-<k>` with `k`
/// drawn from a seeded sequence over `keys` distinct keys, a value between
/// 1 and 100 as decimal text, and event time `i` ms.
pub struct Generator {
    count: Option<u64>,
    rate: Option<f64>,
    keys: u64,
    seed: u64,
    batch: usize,
    next: u64,
    /// When pacing started, and the position it started at: set by the
    /// first batch after creation or a seek, so a resumed generator paces
    /// from where it resumed instead of sleeping off the events it skipped.
    paced_since: Option<(Instant, u64)>,
}

impl Generator {
    /// A generator of `count` events (unbounded if `None`), at most `rate`
    /// per second.
    pub fn new(count: Option<u64>, rate: Option<f64>, keys: u64, seed: u64, batch: usize) -> Generator {
        Generator {
            count,
            rate,
            keys: keys.max(1),
            seed,
            batch: batch.max(1),
            next: 0,
            paced_since: None,
        }
    }

    /// Event number `i` of this generator.
    pub fn event(&self, i: u64) -> Event {
        let r = splitmix64(self.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let k = r % self.keys;
        let value = (r >> 40) % 100 + 1;
        // Written digit by digit into buffers of their exact size: the
        // source thread makes every event of a job, and `format!` was most
        // of what an event cost it.
        let mut key = Vec::with_capacity(4 + decimal_len(k));
        key.extend_from_slice(b"key-");
        push_decimal(&mut key, k);
        let mut text = Vec::with_capacity(decimal_len(value));
        push_decimal(&mut text, value);
        Event {
            key,
            value: text,
            timestamp: i as i64,
        }
    }
}

/// How many decimal digits `n` has.
fn decimal_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// Append `n` in decimal to `out`.
fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

impl Generator {
    /// How long to wait at `now` before emitting the batch that starts at
    /// `self.next`. Paced by schedule, not by sleeping per batch, so the
    /// rate holds however long the downstream took.
    fn pace(&mut self, now: Instant) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let (since, from) = *self.paced_since.get_or_insert((now, self.next));
        // A tiny rate puts the next batch beyond what an Instant can hold:
        // not due in any time worth counting.
        Duration::try_from_secs_f64((self.next - from) as f64 / rate)
            .ok()
            .and_then(|ahead| since.checked_add(ahead))
            .map_or(Duration::MAX, |due| due.saturating_duration_since(now))
    }
}

/// The longest a paced generator sleeps in one call: the source thread
/// takes barriers, stop and cancel between calls, whatever the rate.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// A fast, well-mixed 64-bit permutation (SplitMix64's finalizer).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SourceReader for Generator {
    fn next_batch(&mut self) -> Result<Option<Vec<Event>>, SourceError> {
        let end = match self.count {
            Some(c) => c.min(self.next + self.batch as u64),
            None => self.next + self.batch as u64,
        };
        if end <= self.next {
            return Ok(None);
        }
        let wait = self.pace(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait.min(MAX_WAIT));
            if wait > MAX_WAIT {
                return Ok(Some(Vec::new()));
            }
        }
        let batch = (self.next..end).map(|i| self.event(i)).collect();
        self.next = end;
        Ok(Some(batch))
    }

    fn position(&self) -> u64 {
        self.next
    }

    fn seek(&mut self, position: u64) -> Result<(), SourceError> {
        if let Some(count) = self.count.filter(|c| position > *c) {
            return Err(SourceError::PastCount { position, count });
        }
        self.next = position;
        self.paced_since = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn drain(mut s: Box<dyn SourceReader>) -> Vec<Event> {
        let mut all = Vec::new();
        while let Some(b) = s.next_batch().unwrap() {
            all.extend(b);
        }
        all
    }

    #[test]
    fn generator_is_deterministic_and_bounded() {
        let spec = SourceSpec::Generator {
            count: Some(2500),
            rate: None,
            keys: 7,
            seed: 42,
            batch: 1000,
        };
        let a = drain(reader(&spec, Path::new(".")).unwrap());
        let b = drain(reader(&spec, Path::new(".")).unwrap());
        assert_eq!(a.len(), 2500);
        assert_eq!(a, b);
        let distinct: std::collections::BTreeSet<_> = a.iter().map(|e| e.key.clone()).collect();
        assert_eq!(distinct.len(), 7);
        assert_eq!(a[1234].timestamp, 1234);
    }

    /// The generator's events are what they always were (`key-<k>`, the
    /// value in decimal): jobs and their saved positions depend on them.
    #[test]
    fn generated_events_keep_their_bytes() {
        for keys in [1, 7, 10, 1_000_000, u64::MAX] {
            let g = Generator::new(None, None, keys, 3, 100);
            for i in 0..3000 {
                let e = g.event(i);
                let r = splitmix64(3 ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                assert_eq!(e.key, format!("key-{}", r % keys).into_bytes());
                assert_eq!(e.value, ((r >> 40) % 100 + 1).to_string().into_bytes());
            }
        }
        assert_eq!(decimal_len(0), 1);
        assert_eq!(decimal_len(9), 1);
        assert_eq!(decimal_len(10), 2);
        assert_eq!(decimal_len(u64::MAX), 20);
    }

    #[test]
    fn a_line_past_the_limit_fails_the_source_and_long_lines_make_short_batches() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |batch| SourceSpec::File {
            path: "in.txt".into(),
            format: FileFormat::Lines,
            key_field: None,
            timestamp_field: None,
            key_separator: Some(",".into()),
            batch,
        };
        // Lines of 1 MiB: a batch of 1,000 records stops at the byte bound.
        let mut text = Vec::new();
        for _ in 0..20 {
            text.extend(std::iter::repeat_n(b'x', 1 << 20));
            text.push(b'\n');
        }
        std::fs::write(dir.path().join("in.txt"), &text).unwrap();
        let mut source = reader(&spec(1000), dir.path()).unwrap();
        let first = source.next_batch().unwrap().unwrap();
        let bytes: u64 = first.iter().map(crate::dataflow::budget::event_bytes).sum();
        assert!(first.len() < 20, "{} records in one batch", first.len());
        assert!(bytes < MAX_BATCH_BYTES + (1 << 20) + 100, "{bytes}");

        // A line at the limit is read; one byte more is refused, naming it.
        let mut text = vec![b'y'; MAX_LINE];
        text.extend(b"\n");
        text.extend(vec![b'z'; MAX_LINE + 1]);
        text.extend(b"\n");
        std::fs::write(dir.path().join("in.txt"), &text).unwrap();
        let mut source = reader(&spec(1), dir.path()).unwrap();
        assert_eq!(source.next_batch().unwrap().unwrap()[0].key.len(), MAX_LINE);
        let e = source.next_batch().unwrap_err().to_string();
        assert!(
            e.ends_with("in.txt:2: the line is longer than 16777216 bytes, the most a record may be"),
            "{e}"
        );
    }

    #[test]
    fn file_lines_and_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let lines = dir.path().join("in.txt");
        std::fs::File::create(&lines)
            .unwrap()
            .write_all(b"a,1\nb,2\r\nc\n")
            .unwrap();
        let spec = SourceSpec::File {
            path: "in.txt".into(),
            format: FileFormat::Lines,
            key_field: None,
            timestamp_field: None,
            key_separator: Some(",".into()),
            batch: 2,
        };
        let ev = drain(reader(&spec, dir.path()).unwrap());
        assert_eq!(ev.len(), 3);
        assert_eq!(
            (ev[1].key.as_slice(), ev[1].value.as_slice(), ev[1].timestamp),
            (&b"b"[..], &b"2"[..], 1)
        );
        assert_eq!(ev[2].value, b"");

        let json = dir.path().join("in.jsonl");
        std::fs::write(&json, "{\"u\":\"x\",\"t\":5}\n\n{\"u\":7,\"t\":9}\nnot json\n").unwrap();
        let spec = SourceSpec::File {
            path: json.clone(),
            format: FileFormat::Jsonl,
            key_field: Some("u".into()),
            timestamp_field: Some("t".into()),
            key_separator: None,
            batch: 10,
        };
        let err = reader(&spec, dir.path()).unwrap().next_batch().unwrap_err();
        let err = err.to_string();
        assert!(err.contains("in.jsonl:4: invalid JSON"), "{err}");
        std::fs::write(&json, "{\"u\":\"x\",\"t\":5}\n\n{\"u\":7,\"t\":9}\n").unwrap();
        let ev = drain(reader(&spec, dir.path()).unwrap());
        assert_eq!(
            ev.iter()
                .map(|e| (e.key.clone(), e.timestamp))
                .collect::<Vec<_>>(),
            vec![(b"x".to_vec(), 5), (b"7".to_vec(), 9)]
        );
    }

    #[test]
    fn a_paced_generator_resumes_without_waiting_for_the_skipped_events() {
        // A resume at event 118,000 of a 20,000/s job waited 5.9 s before
        // its first batch: pacing counted from event 0.
        let mut g = Generator::new(None, Some(20_000.0), 10, 1, 1000);
        g.seek(118_000).unwrap();
        let t0 = Instant::now();
        assert_eq!(g.pace(t0), Duration::ZERO, "first batch after a seek");
        g.next += 1000;
        assert_eq!(g.pace(t0), Duration::from_millis(50), "then at the rate");
        assert_eq!(
            g.pace(t0 + Duration::from_millis(80)),
            Duration::ZERO,
            "behind schedule"
        );
        g.seek(5).unwrap();
        assert_eq!(
            g.pace(t0 + Duration::from_secs(1)),
            Duration::ZERO,
            "a second seek restarts pacing"
        );
        assert_eq!(
            Generator::new(None, None, 1, 1, 1).pace(t0),
            Duration::ZERO,
            "unpaced"
        );
    }

    #[test]
    fn a_slow_generator_answers_with_empty_batches_and_never_panics() {
        // 1e-300 events per second: the next batch is due beyond any
        // representable instant (this panicked converting to a Duration).
        for rate in [1e-300, 0.001] {
            let mut g = Generator::new(None, Some(rate), 10, 1, 10);
            assert_eq!(
                g.next_batch().unwrap().unwrap().len(),
                10,
                "the first batch is due at once"
            );
            let t0 = Instant::now();
            assert_eq!(
                g.next_batch().unwrap(),
                Some(Vec::new()),
                "nothing yet, at rate {rate}"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "it came back instead of sleeping on"
            );
            assert_eq!(g.position(), 10);
        }
    }

    #[test]
    fn a_fifo_source_is_refused_at_once() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.txt");
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let spec = SourceSpec::File {
            path: "in.txt".into(),
            format: FileFormat::Lines,
            key_field: None,
            timestamp_field: None,
            key_separator: None,
            batch: 10,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let base = dir.path().to_path_buf();
        std::thread::spawn(move || tx.send(reader(&spec, &base).err().map(|e| e.to_string())));
        let e = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("opening a FIFO hangs");
        assert!(e.is_some_and(|e| e.contains("in.txt: not a regular file")));
    }

    #[test]
    fn seek_resumes_after_the_position() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.txt"), "a\nb\nc\nd\n").unwrap();
        let spec = SourceSpec::File {
            path: "in.txt".into(),
            format: FileFormat::Lines,
            key_field: None,
            timestamp_field: None,
            key_separator: None,
            batch: 3,
        };
        let mut s = reader(&spec, dir.path()).unwrap();
        s.next_batch().unwrap();
        assert_eq!(s.position(), 3);
        s.seek(1).unwrap();
        let rest: Vec<_> = drain(s).into_iter().map(|e| e.key).collect();
        assert_eq!(rest, vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]);
        let mut s = reader(&spec, dir.path()).unwrap();
        assert!(
            s.seek(9)
                .unwrap_err()
                .to_string()
                .contains("fewer than the snapshot's position 9")
        );

        let gen_spec = SourceSpec::Generator {
            count: Some(10),
            rate: None,
            keys: 3,
            seed: 1,
            batch: 4,
        };
        let all = drain(reader(&gen_spec, dir.path()).unwrap());
        let mut g = reader(&gen_spec, dir.path()).unwrap();
        g.seek(6).unwrap();
        assert_eq!(drain(g), all[6..].to_vec());
    }

    #[test]
    fn missing_file_is_named() {
        let spec = SourceSpec::File {
            path: "nope.txt".into(),
            format: FileFormat::Lines,
            key_field: None,
            timestamp_field: None,
            key_separator: None,
            batch: 1,
        };
        let err = reader(&spec, Path::new("/tmp/memento-none"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("cannot open source file /tmp/memento-none/nope.txt"),
            "{err}"
        );
    }
}
