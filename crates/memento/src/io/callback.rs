//! The callback sink: each task's output goes to a staging file of the
//! host's (`<dir>/.staging/part-TTTTT-SSSSSS`), fsynced at the barrier, and
//! is handed to the service's callback once the snapshot covering it is
//! durable; the file is removed when the callback has taken it.
//!
//! A staged file holds events framed as `key length (u32 LE), key, value
//! length (u32 LE), value, timestamp (i64 LE)`, one after another; it is
//! read back whole before delivery, every length checked against what is
//! left of the file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    BoxError, Event, Sink, SinkCommit, SinkError, SinkWriter, check_part_files, parse_part_file_name,
    part_file_name,
};
use crate::store::SnapshotId;

/// The directory, inside the sink's, of staged files.
const STAGING_DIR: &str = ".staging";

/// The most a staged file may hold: it is read whole before delivery.
const MAX_FILE: u64 = 1 << 30;

/// One task's committed output of one snapshot, handed to the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The sink task (task index of the last operator).
    pub task: u32,
    /// The task's sequence number of this delivery: increasing by one from
    /// delivery to delivery of a task, the same when a delivery comes again.
    pub seq: u64,
    /// The snapshot whose completion made it visible.
    pub snapshot: SnapshotId,
    /// The events, in the order the task wrote them.
    pub events: Vec<Event>,
}

/// A service callback's refusal of a delivery.
pub type DeliveryError = BoxError;

type Callback = dyn Fn(&Delivery) -> Result<(), DeliveryError> + Send + Sync;

/// Delivers committed output to a callback of the service, exactly once
/// as the [module docs](super) say.
pub struct CallbackSink {
    dir: PathBuf,
    deliver: Arc<Callback>,
}

impl CallbackSink {
    /// A sink that keeps pre-committed output in `dir` (created if
    /// missing; give each job a directory of its own, on a disk that
    /// survives the process) and hands committed output to `deliver`. The
    /// callback runs on the job's coordinator thread: while it runs, no
    /// snapshot completes. An error from it fails the attempt, and the
    /// delivery comes again after the restart.
    pub fn new(
        dir: impl Into<PathBuf>,
        deliver: impl Fn(&Delivery) -> Result<(), DeliveryError> + Send + Sync + 'static,
    ) -> CallbackSink {
        CallbackSink {
            dir: dir.into(),
            deliver: Arc::new(deliver),
        }
    }

    fn staging(&self) -> PathBuf {
        self.dir.join(STAGING_DIR)
    }

    /// Deliver the staged files `commits` lists, then remove each; a file
    /// already gone was delivered.
    fn deliver_all(&self, snapshot: &SnapshotId, commits: &[SinkCommit]) -> Result<(), SinkError> {
        let staging = self.staging();
        let mut removed = false;
        for c in commits {
            check_part_files(c).map_err(|reason| SinkError::BadCommit {
                snapshot: snapshot.clone(),
                reason,
            })?;
            for name in &c.files {
                let path = staging.join(name);
                let events = match read_staged(&path) {
                    Ok(events) => events,
                    Err(SinkError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                let seq = parse_part_file_name(name).map_or(0, |(_, s)| s);
                let delivery = Delivery {
                    task: c.task,
                    seq,
                    snapshot: snapshot.clone(),
                    events,
                };
                (self.deliver)(&delivery).map_err(|error| SinkError::Delivery {
                    task: c.task,
                    seq,
                    error,
                })?;
                std::fs::remove_file(&path).map_err(SinkError::io("cannot remove", &path))?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&staging)?;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), SinkError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SinkError::io("cannot sync", dir))
}

/// Read a staged file back into events, checking every length.
fn read_staged(path: &Path) -> Result<Vec<Event>, SinkError> {
    let damaged = |reason: &str| SinkError::Damaged {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    // Non-blocking, so that a FIFO put in the staging directory is refused
    // instead of waited on.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(SinkError::io("cannot open", path))?
    };
    let meta = file.metadata().map_err(SinkError::io("cannot read", path))?;
    if !meta.is_file() {
        return Err(damaged("not a regular file"));
    }
    if meta.len() > MAX_FILE {
        return Err(damaged(
            "larger than 1 GiB, more than this sink writes in one file",
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(SinkError::io("cannot read", path))?;
    let mut rest = bytes.as_slice();
    let mut events = Vec::new();
    while !rest.is_empty() {
        let event = (|| {
            let key_len = u32::from_le_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
            let key = take(&mut rest, key_len)?.to_vec();
            let value_len = u32::from_le_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
            let value = take(&mut rest, value_len)?.to_vec();
            let timestamp = i64::from_le_bytes(take(&mut rest, 8)?.try_into().ok()?);
            Some(Event {
                key,
                value,
                timestamp,
            })
        })();
        events.push(event.ok_or_else(|| damaged("it ends inside an event"))?);
    }
    Ok(events)
}

/// The first `n` bytes of `rest`, moving it past them; `None` if shorter.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

impl Sink for CallbackSink {
    fn describe(&self) -> String {
        format!("callback sink staging in {}", self.dir.display())
    }

    fn writer(&self, task: u32, next_seq: u64) -> Result<Box<dyn SinkWriter>, SinkError> {
        let staging = self.staging();
        std::fs::create_dir_all(&staging).map_err(SinkError::io("cannot create sink directory", &staging))?;
        Ok(Box::new(CallbackWriter {
            staging,
            task,
            seq: next_seq,
            current: None,
            pending: Vec::new(),
            frame: Vec::new(),
        }))
    }

    fn commit(&self, snapshot: &SnapshotId, commits: &[SinkCommit]) -> Result<(), SinkError> {
        self.deliver_all(snapshot, commits)
    }

    fn recover(
        &self,
        restored: Option<(&SnapshotId, &[SinkCommit])>,
    ) -> Result<BTreeMap<u32, u64>, SinkError> {
        let mut next = BTreeMap::new();
        if let Some((snapshot, commits)) = restored {
            self.deliver_all(snapshot, commits)?;
            for c in commits {
                next.insert(c.task, c.next_seq);
            }
        }
        // What is still staged was never covered by a durable snapshot.
        let staging = self.staging();
        match std::fs::remove_dir_all(&staging) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(SinkError::io("cannot clean", &staging)(e));
            }
            _ => {}
        }
        Ok(next)
    }

    fn check(&self, commit: &SinkCommit) -> Result<(), String> {
        check_part_files(commit)
    }

    fn finished(&self) {
        let _ = std::fs::remove_dir(self.staging());
    }
}

struct CallbackWriter {
    staging: PathBuf,
    task: u32,
    /// Sequence number of the file being written (or to be written next).
    seq: u64,
    /// The open staging file, created at the first write after a barrier.
    current: Option<(BufWriter<File>, PathBuf)>,
    /// Pre-committed files not yet known delivered: (snapshot, name).
    pending: Vec<(u64, String)>,
    frame: Vec<u8>,
}

impl SinkWriter for CallbackWriter {
    fn write(&mut self, events: &[Event]) -> Result<(), SinkError> {
        self.frame.clear();
        for e in events {
            for part in [&e.key, &e.value] {
                let len = u32::try_from(part.len()).map_err(|_| {
                    SinkError::io("cannot write", &self.staging)(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "an event's key or value is 4 GiB or more",
                    ))
                })?;
                self.frame.extend_from_slice(&len.to_le_bytes());
                self.frame.extend_from_slice(part);
            }
            self.frame.extend_from_slice(&e.timestamp.to_le_bytes());
        }
        if self.current.is_none() {
            let path = self.staging.join(part_file_name(self.task, self.seq));
            let file = File::create(&path).map_err(SinkError::io("cannot create", &path))?;
            self.current = Some((BufWriter::with_capacity(1 << 16, file), path));
        }
        let (out, path) = self.current.as_mut().expect("just opened");
        out.write_all(&self.frame)
            .map_err(SinkError::io("cannot write", path))
    }

    fn precommit(&mut self, snapshot: u64) -> Result<Option<SinkCommit>, SinkError> {
        if let Some((mut out, path)) = self.current.take() {
            out.flush().map_err(SinkError::io("cannot write", &path))?;
            out.get_ref()
                .sync_all()
                .map_err(SinkError::io("cannot write", &path))?;
            self.pending.push((snapshot, part_file_name(self.task, self.seq)));
            self.seq += 1;
            // The file's name must be durable too, or a crash could lose it
            // after the manifest lists it.
            sync_dir(&self.staging)?;
        }
        Ok(Some(SinkCommit {
            task: self.task,
            next_seq: self.seq,
            files: self.pending.iter().map(|(_, f)| f.clone()).collect(),
        }))
    }

    fn committed(&mut self, snapshot: u64) {
        self.pending.retain(|(s, _)| *s > snapshot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn ev(k: &str, t: i64) -> Event {
        Event {
            key: k.as_bytes().to_vec(),
            value: vec![0, 255, b'\n'],
            timestamp: t,
        }
    }

    fn sink(dir: &Path) -> (CallbackSink, Arc<Mutex<Vec<Delivery>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        let s = CallbackSink::new(dir, move |d: &Delivery| {
            seen.lock().unwrap().push(d.clone());
            Ok(())
        });
        (s, got)
    }

    #[test]
    fn output_is_delivered_once_after_commit_and_redone_on_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let (s, got) = sink(dir.path());
        let id = |n| SnapshotId::parse(&format!("j-{n:06}")).unwrap();
        s.recover(None).unwrap();
        let mut w = s.writer(0, 0).unwrap();
        w.write(&[ev("a", 1), ev("b", 2)]).unwrap();
        let first = w.precommit(1).unwrap().unwrap();
        assert!(got.lock().unwrap().is_empty(), "nothing before the commit");
        s.commit(&id(1), std::slice::from_ref(&first)).unwrap();
        s.commit(&id(1), std::slice::from_ref(&first)).unwrap(); // idempotent
        {
            let got = got.lock().unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!((got[0].task, got[0].seq), (0, 0));
            assert_eq!(got[0].events, vec![ev("a", 1), ev("b", 2)]);
        }
        w.committed(1);
        w.write(&[ev("c", 3)]).unwrap();
        let second = w.precommit(2).unwrap().unwrap();
        w.write(&[ev("d", 4)]).unwrap();
        w.precommit(3).unwrap(); // snapshot 3 never completes
        drop(w);
        // A crash after snapshot 2's manifest, before its delivery:
        // recovery delivers it and drops snapshot 3's file.
        let next = s.recover(Some((&id(2), std::slice::from_ref(&second)))).unwrap();
        assert_eq!(next[&0], 2);
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[1].seq, got[1].events.clone()), (1, vec![ev("c", 3)]));
        assert!(!dir.path().join(STAGING_DIR).exists());
    }

    #[test]
    fn a_refused_delivery_stays_staged_and_comes_again() {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(Mutex::new(true));
        let got = Arc::new(Mutex::new(0));
        let (f, g) = (fail.clone(), got.clone());
        let s = CallbackSink::new(dir.path(), move |_: &Delivery| {
            if *f.lock().unwrap() {
                return Err("the service's store is down".into());
            }
            *g.lock().unwrap() += 1;
            Ok(())
        });
        let id = SnapshotId::parse("j-000001").unwrap();
        let mut w = s.writer(3, 7).unwrap();
        w.write(&[ev("a", 1)]).unwrap();
        let c = w.precommit(1).unwrap().unwrap();
        let e = s.commit(&id, std::slice::from_ref(&c)).unwrap_err().to_string();
        assert_eq!(
            e,
            "delivery of task 3's output #7 failed: the service's store is down"
        );
        *fail.lock().unwrap() = false;
        s.recover(Some((&id, std::slice::from_ref(&c)))).unwrap();
        assert_eq!(*got.lock().unwrap(), 1);
    }

    #[test]
    fn a_damaged_staged_file_is_named_not_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let (s, got) = sink(dir.path());
        let staging = dir.path().join(STAGING_DIR);
        std::fs::create_dir_all(&staging).unwrap();
        // A key length far past the end of the file.
        std::fs::write(staging.join("part-00000-000000"), [255, 255, 255, 255, 1]).unwrap();
        let id = SnapshotId::parse("j-000001").unwrap();
        let c = SinkCommit {
            task: 0,
            next_seq: 1,
            files: vec!["part-00000-000000".into()],
        };
        let e = s.commit(&id, &[c]).unwrap_err().to_string();
        assert!(
            e.ends_with("part-00000-000000: pre-committed output is damaged: it ends inside an event"),
            "{e}"
        );
        assert!(got.lock().unwrap().is_empty());
        let evil = SinkCommit {
            task: 0,
            next_seq: 1,
            files: vec!["../../x".into()],
        };
        assert!(s.check(&evil).is_err());
        assert!(matches!(s.commit(&id, &[evil]), Err(SinkError::BadCommit { .. })));
    }
}
