//! Canonical state streamed into the store while the operator writes it:
//! the pieces go through a bounded channel to an upload thread, which
//! frames them (`framing`), cuts the stream into content-defined chunks
//! and stores each as soon as it is cut. Neither side ever holds the whole
//! state twice: the guest holds its state and a piece, the host at most
//! [`IN_FLIGHT_BYTES`] of pieces not yet chunked plus two of the largest
//! chunks. Up to that budget the pause is the serialization alone (the
//! upload catches up after it); beyond it the guest waits for the upload
//! (backpressure) rather than the host buffer more.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use crate::runtime::{Piece, StateSink};
use crate::store::{BlobWriter, CDC_AVG, CDC_MAX, CDC_MIN, ChunkRef, StoreError};

use super::framing::header;

/// Bytes of pieces in flight between a task and its upload thread: what a
/// snapshot may cost the host beyond the chunker's buffer, and how much
/// state the guest can write before it waits for the store.
pub const IN_FLIGHT_BYTES: usize = 64 << 20;

/// Bytes handed to the upload thread and not yet taken into chunks.
#[derive(Default)]
struct InFlight {
    bytes: Mutex<usize>,
    drained: Condvar,
}

/// What an upload produced: the framed stream's length and its chunks.
pub(crate) type Uploaded = Result<(u64, Vec<ChunkRef>), StoreError>;

/// The task's end of an upload: a [`StateSink`] that hands pieces to the
/// upload thread. Dropping it ends the stream.
pub(crate) struct UploadSink {
    pieces: Sender<Piece>,
    in_flight: Arc<InFlight>,
    /// Bytes of pieces of no key group: state a rescale cannot move.
    unkeyed: Arc<AtomicU64>,
}

impl UploadSink {
    /// Where the bytes of unkeyed pieces are counted, read once the
    /// guest's snapshot has returned.
    pub(crate) fn unkeyed(&self) -> Arc<AtomicU64> {
        self.unkeyed.clone()
    }
}

impl StateSink for UploadSink {
    fn write(&mut self, key_group: Option<u32>, bytes: Vec<u8>) -> Result<(), String> {
        let len = bytes.len();
        if key_group.is_none() {
            self.unkeyed.fetch_add(len as u64, Ordering::Relaxed);
        }
        {
            let mut queued = self.in_flight.bytes.lock().expect("not poisoned");
            // A piece always goes when nothing is queued: the budget
            // bounds the backlog, it never stops the stream.
            while *queued > 0 && *queued + len > IN_FLIGHT_BYTES {
                queued = self.in_flight.drained.wait(queued).expect("not poisoned");
            }
            *queued += len;
        }
        self.pieces
            .send((key_group, bytes))
            .map_err(|_| "the host's upload of the state stopped".to_string())
    }
}

/// Start an upload into `writer`'s snapshot; the receiver gets its result
/// once the sink is dropped and every chunk is stored.
pub(crate) fn start(writer: BlobWriter) -> std::io::Result<(UploadSink, Receiver<Uploaded>)> {
    let (pieces_tx, pieces) = unbounded::<Piece>();
    let (done_tx, done) = bounded(1);
    let in_flight = Arc::new(InFlight::default());
    let drained = in_flight.clone();
    let name = format!("state {}", writer.id());
    thread::Builder::new().name(name).spawn(move || {
        let mut chunker = Chunker::new(writer);
        let mut failed = None;
        for (group, bytes) in pieces {
            let len = bytes.len();
            let took = |n: usize| {
                *drained.bytes.lock().expect("not poisoned") -= n;
                drained.drained.notify_one();
            };
            if failed.is_some() {
                took(len);
                // Keep draining so the guest is not blocked; the snapshot
                // fails with the first error when the stream ends.
                continue;
            }
            let (h, n) = header(group, len);
            let pushed = chunker.push(&h[..n]).and_then(|()| chunker.push(&bytes));
            drop(bytes);
            took(len);
            if let Err(e) = pushed {
                failed = Some(e);
            }
        }
        let result = match failed {
            Some(e) => Err(e),
            None => chunker.finish(),
        };
        let _ = done_tx.send(result);
    })?;
    Ok((
        UploadSink {
            pieces: pieces_tx,
            in_flight,
            unkeyed: Arc::default(),
        },
        done,
    ))
}

/// FastCDC over a stream: cuts exactly where FastCDC over the whole stream
/// would. A cut before the end of the buffered bytes depends only on the
/// bytes up to it, so every chunk but the buffer's last is final; the last
/// waits for more bytes unless the stream has ended.
struct Chunker {
    writer: BlobWriter,
    buf: Vec<u8>,
    len: u64,
    chunks: Vec<ChunkRef>,
}

impl Chunker {
    fn new(writer: BlobWriter) -> Chunker {
        Chunker {
            writer,
            buf: Vec::with_capacity(2 * CDC_MAX),
            len: 0,
            chunks: Vec::new(),
        }
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.buf.extend_from_slice(bytes);
        self.len += bytes.len() as u64;
        if self.buf.len() >= 2 * CDC_MAX {
            self.cut(false)?;
        }
        Ok(())
    }

    /// Store the chunks cut so far (all of them at the end of the stream).
    fn cut(&mut self, end: bool) -> Result<(), StoreError> {
        let cuts: Vec<(usize, usize)> = fastcdc::v2020::FastCDC::new(&self.buf, CDC_MIN, CDC_AVG, CDC_MAX)
            .map(|c| (c.offset, c.length))
            .collect();
        let keep = if end {
            cuts.len()
        } else {
            cuts.len().saturating_sub(1)
        };
        let mut used = 0;
        for &(offset, length) in &cuts[..keep] {
            let (chunk, _) = self.writer.store_chunk(&self.buf[offset..offset + length])?;
            self.chunks.push(chunk);
            used = offset + length;
        }
        self.buf.drain(..used);
        Ok(())
    }

    fn finish(mut self) -> Uploaded {
        if !self.buf.is_empty() {
            self.cut(true)?;
        }
        Ok((self.len, self.chunks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{JobName, Store, StoreOptions};

    fn writer() -> (tempfile::TempDir, crate::store::SnapshotWriter) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let tenant = store.tenant("default").unwrap();
        let w = tenant.begin(&JobName::new("j").unwrap(), 1).unwrap();
        (dir, w)
    }

    /// Streamed chunking cuts where FastCDC over the whole framed stream
    /// cuts, whatever the piece sizes: canonical state dedupes the same
    /// whether it arrives in pieces or whole.
    #[test]
    fn streamed_chunks_are_those_of_the_whole_stream() {
        let (_dir, w) = writer();
        // 7 MiB of varied bytes in pieces of uneven sizes, keyed and not.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut pieces: Vec<Piece> = Vec::new();
        for i in 0..200usize {
            let len = (i * 7919) % (64 << 10) + 1;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            pieces.push(((i % 3 == 0).then_some(i as u32), bytes));
        }
        let mut whole = Vec::new();
        for (g, bytes) in &pieces {
            let (h, n) = header(*g, bytes.len());
            whole.extend_from_slice(&h[..n]);
            whole.extend_from_slice(bytes);
        }
        let expected = w.blob_writer().put_chunks_cdc(&whole).unwrap();

        let (mut sink, done) = start(w.blob_writer()).unwrap();
        for (g, bytes) in pieces {
            sink.write(g, bytes).unwrap();
        }
        drop(sink);
        let (len, chunks) = done.recv().unwrap().unwrap();
        assert_eq!(len, whole.len() as u64);
        assert!(chunks.len() > 5, "{} chunks", chunks.len());
        assert_eq!(chunks, expected);
    }
}
