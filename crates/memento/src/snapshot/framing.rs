//! The framing of canonical state: how the pieces an operator writes
//! (each of one key group or of none) are laid out as one byte stream,
//! which the store then cuts into content-defined chunks. Specified in
//! `docs/STORAGE.md` ("Canonical state framing"); a manifest says which
//! framing its canonical states use (`canonical_framing`).
//!
//! Version 1, per piece, integers little-endian:
//!
//! | size | field                                                 |
//! |------|-------------------------------------------------------|
//! | 1    | tag: 0 = no key group, 1 = a key group follows        |
//! | 4    | key group (only with tag 1)                           |
//! | 4    | length of the bytes, at most [`MAX_PIECE`]            |
//! | ..   | the bytes                                             |
//!
//! No header and no trailer: the stream is its pieces, and an empty state
//! is an empty stream.

use crate::runtime::{MAX_PIECE, Piece};

/// The framing this build writes (the manifest's `canonical_framing`).
pub const FRAMING_VERSION: u32 = 1;

const TAG_UNKEYED: u8 = 0;
const TAG_KEYED: u8 = 1;

/// The header of a piece of `len` bytes of `key_group`, and its length.
pub(crate) fn header(key_group: Option<u32>, len: usize) -> ([u8; 9], usize) {
    let mut h = [0u8; 9];
    let len = u32::try_from(len).expect("pieces are at most MAX_PIECE bytes");
    match key_group {
        None => {
            h[0] = TAG_UNKEYED;
            h[1..5].copy_from_slice(&len.to_le_bytes());
            (h, 5)
        }
        Some(g) => {
            h[0] = TAG_KEYED;
            h[1..5].copy_from_slice(&g.to_le_bytes());
            h[5..9].copy_from_slice(&len.to_le_bytes());
            (h, 9)
        }
    }
}

/// Why framed bytes do not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// A tag byte other than 0 or 1.
    #[error("state piece at byte {at} has an unknown tag {tag}")]
    Tag { at: u64, tag: u8 },
    /// A length past the contract's bound.
    #[error("state piece at byte {at} claims {len} bytes, more than the {MAX_PIECE} a piece may have")]
    TooLong { at: u64, len: u32 },
    /// The stream ends inside a piece.
    #[error("the state ends inside a piece ({left} bytes after the last whole piece)")]
    Truncated { left: usize },
}

/// Parses framed bytes as they arrive, in any cuts: holds at most one
/// piece plus what was fed after it.
#[derive(Default)]
pub(crate) struct Deframer {
    buf: Vec<u8>,
    at: usize,
    /// Stream offset of `buf[0]`, for messages.
    offset: u64,
}

impl Deframer {
    /// Append bytes of the stream.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        if self.at > 0 && self.at >= self.buf.len() / 2 {
            self.buf.drain(..self.at);
            self.offset += self.at as u64;
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole piece, or `None` until more is fed.
    pub(crate) fn next_piece(&mut self) -> Result<Option<Piece>, FramingError> {
        let rest = &self.buf[self.at..];
        let at = self.offset + self.at as u64;
        let Some(&tag) = rest.first() else { return Ok(None) };
        let (group, len_at) = match tag {
            TAG_UNKEYED => (None, 1),
            TAG_KEYED => {
                if rest.len() < 5 {
                    return Ok(None);
                }
                (
                    Some(u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes"))),
                    5,
                )
            }
            tag => return Err(FramingError::Tag { at, tag }),
        };
        if rest.len() < len_at + 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(rest[len_at..len_at + 4].try_into().expect("4 bytes"));
        if len as usize > MAX_PIECE {
            return Err(FramingError::TooLong { at, len });
        }
        let start = len_at + 4;
        let end = start + len as usize;
        if rest.len() < end {
            return Ok(None);
        }
        let bytes = rest[start..end].to_vec();
        self.at += end;
        Ok(Some((group, bytes)))
    }

    /// The stream ended: it must end between pieces.
    pub(crate) fn finish(&self) -> Result<(), FramingError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            left => Err(FramingError::Truncated { left }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(pieces: &[Piece]) -> Vec<u8> {
        let mut out = Vec::new();
        for (g, bytes) in pieces {
            let (h, n) = header(*g, bytes.len());
            out.extend_from_slice(&h[..n]);
            out.extend_from_slice(bytes);
        }
        out
    }

    #[test]
    fn pieces_round_trip_through_any_cuts() {
        let pieces: Vec<Piece> = vec![
            (None, b"head".to_vec()),
            (Some(7), vec![1; 3000]),
            (None, Vec::new()),
            (Some(0), b"x".to_vec()),
        ];
        let bytes = frame(&pieces);
        assert_eq!(&bytes[..5], &[0, 4, 0, 0, 0], "tag 0 and a little-endian length");
        for cut in [1, 2, 7, 100, 4096] {
            let mut d = Deframer::default();
            let mut back = Vec::new();
            for part in bytes.chunks(cut) {
                d.feed(part);
                while let Some(p) = d.next_piece().unwrap() {
                    back.push(p);
                }
            }
            d.finish().unwrap();
            assert_eq!(back, pieces, "cut {cut}");
        }
    }

    #[test]
    fn damaged_framing_is_refused_with_where_and_why() {
        let mut d = Deframer::default();
        d.feed(&[0, 1, 0, 0, 0, b'a', 9]);
        assert_eq!(d.next_piece().unwrap(), Some((None, b"a".to_vec())));
        assert_eq!(
            d.next_piece().unwrap_err().to_string(),
            "state piece at byte 6 has an unknown tag 9"
        );
        let mut d = Deframer::default();
        d.feed(&[1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            d.next_piece().unwrap_err(),
            FramingError::TooLong { at: 0, len: u32::MAX }
        );
        let mut d = Deframer::default();
        d.feed(&[0, 9, 0, 0, 0, 1, 2]);
        assert_eq!(d.next_piece().unwrap(), None);
        assert_eq!(
            d.finish().unwrap_err().to_string(),
            "the state ends inside a piece (7 bytes after the last whole piece)"
        );
    }
}
