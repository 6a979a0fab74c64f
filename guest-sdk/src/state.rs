//! Canonical state in pieces: the [`StateWriter`] an operator's snapshot
//! writes into and the [`StateReader`] its restore reads from.
//!
//! In a component they stand for the host's `state-writer` and
//! `state-reader` (contract 0.2.0): the writer buffers up to [`PIECE`]
//! bytes and hands each full piece to the host, so a snapshot of any size
//! needs [`PIECE`] bytes of guest memory beside the state, not a second
//! copy of it. In native unit tests both are backed by memory
//! ([`StateWriter::memory`], [`StateReader::memory`]).

use std::io;

use crate::Error;

/// How much the writer buffers before it hands a piece to the host: big
/// enough that the per-call cost vanishes, small enough not to matter in a
/// guest's memory.
pub const PIECE: usize = 64 << 10;

/// One piece: its key group (`None`: state that is not keyed) and bytes.
pub type Piece = (Option<u32>, Vec<u8>);

enum Sink<'a> {
    #[cfg(target_family = "wasm")]
    Host(&'a crate::bindings::memento::operator::state::StateWriter),
    Memory(&'a mut Vec<Piece>),
}

/// Where an operator's snapshot goes. Implements [`io::Write`] for state
/// that is not keyed (serializers write straight into it);
/// [`StateWriter::write_piece`] writes a key group's state.
pub struct StateWriter<'a> {
    sink: Sink<'a>,
    /// Unkeyed bytes not yet handed over; at most [`PIECE`].
    buffer: Vec<u8>,
}

impl<'a> StateWriter<'a> {
    #[cfg(target_family = "wasm")]
    pub(crate) fn host(
        writer: &'a crate::bindings::memento::operator::state::StateWriter,
    ) -> StateWriter<'a> {
        StateWriter {
            sink: Sink::Host(writer),
            buffer: Vec::new(),
        }
    }

    /// A writer that collects the pieces in `pieces` (for unit tests).
    pub fn memory(pieces: &'a mut Vec<Piece>) -> StateWriter<'a> {
        StateWriter {
            sink: Sink::Memory(pieces),
            buffer: Vec::new(),
        }
    }

    fn send(&mut self, key_group: Option<u32>, bytes: &[u8]) -> Result<(), Error> {
        if bytes.is_empty() {
            return Ok(());
        }
        match &mut self.sink {
            #[cfg(target_family = "wasm")]
            Sink::Host(w) => w.write(key_group, bytes).map_err(Error),
            Sink::Memory(pieces) => {
                pieces.push((key_group, bytes.to_vec()));
                Ok(())
            }
        }
    }

    /// Hand over the buffered unkeyed bytes.
    fn flush_buffer(&mut self) -> Result<(), Error> {
        let buffer = std::mem::take(&mut self.buffer);
        let sent = self.send(None, &buffer);
        self.buffer = buffer;
        self.buffer.clear();
        sent
    }

    /// Write `bytes` of key group `key_group` (`None`: unkeyed), in pieces
    /// of at most [`PIECE`] bytes, after any buffered unkeyed bytes.
    ///
    /// # Errors
    /// When the host refuses the state (a key group this task does not
    /// own, more than the job's `max_snapshot`).
    pub fn write_piece(&mut self, key_group: Option<u32>, bytes: &[u8]) -> Result<(), Error> {
        self.flush_buffer()?;
        for piece in bytes.chunks(PIECE) {
            self.send(key_group, piece)?;
        }
        Ok(())
    }

    /// One piece exactly as given, however long: for test plugins that
    /// check how the host bounds pieces.
    #[doc(hidden)]
    pub fn write_piece_unsplit(&mut self, key_group: Option<u32>, bytes: &[u8]) -> Result<(), Error> {
        self.flush_buffer()?;
        self.send(key_group, bytes)
    }

    /// Hand over what is still buffered; the SDK calls it after
    /// [`crate::Operator::snapshot`].
    ///
    /// # Errors
    /// As [`StateWriter::write_piece`].
    pub fn finish(&mut self) -> Result<(), Error> {
        self.flush_buffer()
    }
}

impl io::Write for StateWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let to_io = |e: Error| io::Error::other(e.0);
        if self.buffer.is_empty() && bytes.len() >= PIECE {
            // Large writes go out as they are, without a copy.
            self.send(None, &bytes[..PIECE]).map_err(to_io)?;
            return Ok(PIECE);
        }
        if self.buffer.capacity() < PIECE {
            self.buffer.reserve_exact(PIECE - self.buffer.len());
        }
        let n = bytes.len().min(PIECE - self.buffer.len());
        self.buffer.extend_from_slice(&bytes[..n]);
        if self.buffer.len() == PIECE {
            self.flush_buffer().map_err(to_io)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_buffer().map_err(|e| io::Error::other(e.0))
    }
}

enum Source<'a> {
    #[cfg(target_family = "wasm")]
    Host(&'a crate::bindings::memento::operator::state::StateReader),
    Memory(std::vec::IntoIter<Piece>, std::marker::PhantomData<&'a ()>),
}

/// Where an operator's restore reads its state from. Implements
/// [`io::Read`] over the unkeyed pieces (deserializers read straight from
/// it); [`StateReader::next_piece`] reads pieces one by one, keyed ones
/// included.
pub struct StateReader<'a> {
    source: Source<'a>,
    /// The unkeyed piece being read, and how far.
    current: Vec<u8>,
    at: usize,
}

impl<'a> StateReader<'a> {
    #[cfg(target_family = "wasm")]
    pub(crate) fn host(
        reader: &'a crate::bindings::memento::operator::state::StateReader,
    ) -> StateReader<'a> {
        StateReader {
            source: Source::Host(reader),
            current: Vec::new(),
            at: 0,
        }
    }

    /// A reader of `pieces` (for unit tests).
    pub fn memory(pieces: Vec<Piece>) -> StateReader<'a> {
        StateReader {
            source: Source::Memory(pieces.into_iter(), std::marker::PhantomData),
            current: Vec::new(),
            at: 0,
        }
    }

    /// The next piece from the host, or `None` at the end. Bytes of an
    /// unkeyed piece that [`io::Read`] began are not returned again.
    ///
    /// # Errors
    /// When the host cannot read the snapshot.
    pub fn next_piece(&mut self) -> Result<Option<Piece>, Error> {
        if self.at < self.current.len() {
            let rest = self.current.split_off(self.at);
            self.current.clear();
            self.at = 0;
            return Ok(Some((None, rest)));
        }
        match &mut self.source {
            #[cfg(target_family = "wasm")]
            Source::Host(r) => r.read().map_err(Error),
            Source::Memory(pieces, _) => Ok(pieces.next()),
        }
    }
}

impl io::Read for StateReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            match self.next_piece().map_err(|e| io::Error::other(e.0))? {
                None => return Ok(0),
                Some((None, piece)) => {
                    self.current = piece;
                    self.at = 0;
                }
                Some((Some(g), _)) => {
                    return Err(io::Error::other(format!(
                        "the state holds a piece of key group {g} where the operator reads unkeyed state"
                    )));
                }
            }
        }
        let n = out.len().min(self.current.len() - self.at);
        out[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn writes_stream_out_in_pieces_of_at_most_piece_bytes() {
        let mut pieces = Vec::new();
        let mut w = StateWriter::memory(&mut pieces);
        let data: Vec<u8> = (0..(3 * PIECE + 17)).map(|i| i as u8).collect();
        for part in data.chunks(1000) {
            w.write_all(part).unwrap();
        }
        w.write_all(&data).unwrap();
        w.finish().unwrap();
        assert!(
            pieces
                .iter()
                .all(|(g, p)| g.is_none() && p.len() <= PIECE && !p.is_empty())
        );
        let joined: Vec<u8> = pieces.iter().flat_map(|(_, p)| p.clone()).collect();
        assert_eq!(joined, [data.clone(), data].concat());
    }

    #[test]
    fn keyed_pieces_keep_their_group_and_follow_buffered_bytes() {
        let mut pieces = Vec::new();
        let mut w = StateWriter::memory(&mut pieces);
        w.write_all(b"head").unwrap();
        w.write_piece(Some(3), b"three").unwrap();
        w.finish().unwrap();
        assert_eq!(
            pieces,
            vec![(None, b"head".to_vec()), (Some(3), b"three".to_vec())]
        );
    }

    #[test]
    fn reads_unkeyed_pieces_as_one_stream_whatever_their_boundaries() {
        let pieces = vec![
            (None, b"ab".to_vec()),
            (None, Vec::new()),
            (None, b"cde".to_vec()),
        ];
        let mut r = StateReader::memory(pieces);
        let mut all = String::new();
        r.read_to_string(&mut all).unwrap();
        assert_eq!(all, "abcde");
        let mut r = StateReader::memory(vec![(None, b"a".to_vec()), (Some(1), b"k".to_vec())]);
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("key group 1"), "{err}");
    }
}
