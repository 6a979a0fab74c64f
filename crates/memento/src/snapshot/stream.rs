//! Canonical state streamed into the store while the operator writes it:
//! the pieces go through a bounded channel to an upload thread, which
//! frames them (`framing`), cuts the stream into content-defined chunks
//! and stores each as soon as it is cut. Neither side ever holds the whole
//! state: the task thread holds the piece in flight, the upload thread at
//! most two of the largest chunks; a full channel makes the guest wait
//! (backpressure) rather than the host buffer.

use std::thread;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::runtime::{Piece, StateSink};
use crate::store::{BlobWriter, CDC_AVG, CDC_MAX, CDC_MIN, ChunkRef, StoreError};

use super::framing::header;

/// Pieces in flight between the task and its upload thread: 16 of the
/// SDK's 64 KiB, a few MiB at worst with the contract's 1 MiB pieces.
const IN_FLIGHT: usize = 16;

/// What an upload produced: the framed stream's length and its chunks.
pub(crate) type Uploaded = Result<(u64, Vec<ChunkRef>), StoreError>;

/// The task's end of an upload: a [`StateSink`] that hands pieces to the
/// upload thread. Dropping it ends the stream.
pub(crate) struct UploadSink {
    pieces: Sender<Piece>,
}

impl StateSink for UploadSink {
    fn write(&mut self, key_group: Option<u32>, bytes: Vec<u8>) -> Result<(), String> {
        self.pieces
            .send((key_group, bytes))
            .map_err(|_| "the host's upload of the state stopped".to_string())
    }
}

/// Start an upload into `writer`'s snapshot; the receiver gets its result
/// once the sink is dropped and every chunk is stored.
pub(crate) fn start(writer: BlobWriter) -> std::io::Result<(UploadSink, Receiver<Uploaded>)> {
    let (pieces_tx, pieces) = bounded::<Piece>(IN_FLIGHT);
    let (done_tx, done) = bounded(1);
    let name = format!("state {}", writer.id());
    thread::Builder::new().name(name).spawn(move || {
        let mut chunker = Chunker::new(writer);
        let mut failed = None;
        for (group, bytes) in pieces {
            if failed.is_some() {
                // Keep draining so the guest is not blocked; the snapshot
                // fails with the first error when the stream ends.
                continue;
            }
            let (h, n) = header(group, bytes.len());
            if let Err(e) = chunker.push(&h[..n]).and_then(|()| chunker.push(&bytes)) {
                failed = Some(e);
            }
        }
        let result = match failed {
            Some(e) => Err(e),
            None => chunker.finish(),
        };
        let _ = done_tx.send(result);
    })?;
    Ok((UploadSink { pieces: pieces_tx }, done))
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
