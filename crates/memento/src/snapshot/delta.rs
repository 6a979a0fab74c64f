//! Page deltas: the pages of a memory that changed between two snapshots,
//! each stored as the runs of bytes that differ from the same page before.
//!
//! A page is XORed with its earlier content; what remains is zero except
//! where the guest wrote, and is written as alternating runs — a count of
//! unchanged bytes, then the changed bytes themselves (the XOR, which
//! applying XORs back). That is XBZRLE's idea (QEMU's live migration),
//! without its cache: the earlier contents come from the copy-on-write
//! preimages. A 100-byte update costs about 104 bytes plus an 8-byte page
//! record, where storing the page would cost 4,096; the store's per-blob
//! compression runs on top.
//!
//! Byte layout of one delta (all integers little endian, `varint` = LEB128
//! of a u32): the header `MDLT` (4 bytes), format version (u32, 1), page
//! size (u32, 4096), memory size after applying (u64), page count (u64);
//! then for each changed page, in ascending index order: index (u32),
//! encoded length (u32), and the encoded page: runs of `varint unchanged,
//! varint changed, changed bytes` whose lengths add up to the page size.

use std::fmt;

/// Bytes per page of a delta.
pub const DELTA_PAGE: usize = 4096;
const MAGIC: &[u8; 4] = b"MDLT";
const VERSION: u32 = 1;
const HEADER: usize = 4 + 4 + 4 + 8 + 8;

/// Why a delta cannot be read or applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaError(String);

impl fmt::Display for DeltaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "damaged page delta: {}", self.0)
    }
}

impl std::error::Error for DeltaError {}

fn bad<T>(why: impl Into<String>) -> Result<T, DeltaError> {
    Err(DeltaError(why.into()))
}

/// Builds one delta, page by page, in ascending index order.
pub struct DeltaWriter {
    out: Vec<u8>,
    pages: u64,
    first: Option<u32>,
    last: Option<u32>,
}

impl DeltaWriter {
    /// A delta that leaves the memory `size` bytes long.
    pub fn new(size: u64) -> DeltaWriter {
        let mut out = Vec::with_capacity(HEADER);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(DELTA_PAGE as u32).to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        DeltaWriter {
            out,
            pages: 0,
            first: None,
            last: None,
        }
    }

    /// Record page `index`, `before` → `after`; an unchanged page is left
    /// out. Indices must ascend.
    pub fn page(&mut self, index: u32, before: &[u8; DELTA_PAGE], after: &[u8; DELTA_PAGE]) {
        assert!(self.last.is_none_or(|l| index > l), "page indices must ascend");
        if before == after {
            return;
        }
        self.first = self.first.or(Some(index));
        self.last = Some(index);
        self.pages += 1;
        self.out.extend_from_slice(&index.to_le_bytes());
        let len_at = self.out.len();
        self.out.extend_from_slice(&0u32.to_le_bytes());
        let mut i = 0;
        while i < DELTA_PAGE {
            let same = before[i..]
                .iter()
                .zip(&after[i..])
                .take_while(|(a, b)| a == b)
                .count();
            let start = i + same;
            // A changed run ends at the first 8 equal bytes in a row: fewer
            // cost more as a new run header than as XOR bytes.
            let mut end = start;
            let mut equal = 0;
            while end < DELTA_PAGE && equal < 8 {
                if before[end] == after[end] {
                    equal += 1;
                } else {
                    equal = 0;
                }
                end += 1;
            }
            let end = end - equal;
            varint(&mut self.out, same as u32);
            varint(&mut self.out, (end - start) as u32);
            self.out.extend(
                before[start..end]
                    .iter()
                    .zip(&after[start..end])
                    .map(|(a, b)| a ^ b),
            );
            i = end;
        }
        let len = (self.out.len() - len_at - 4) as u32;
        self.out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Append the pages of `later`, a delta of the same memory size whose
    /// pages all come after this one's (built on another thread).
    pub fn append(&mut self, later: DeltaWriter) {
        if let (Some(last), Some(next)) = (self.last, later.first) {
            assert!(next > last, "page indices must ascend");
        }
        self.out.extend_from_slice(&later.out[HEADER..]);
        self.pages += later.pages;
        self.first = self.first.or(later.first);
        self.last = later.last.or(self.last);
    }

    /// Pages recorded so far.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The finished delta.
    pub fn finish(mut self) -> Vec<u8> {
        self.out[HEADER - 8..HEADER].copy_from_slice(&self.pages.to_le_bytes());
        self.out
    }
}

fn varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(b: &[u8], at: &mut usize) -> Result<u32, DeltaError> {
    let mut v: u32 = 0;
    for shift in (0..35).step_by(7) {
        let Some(&byte) = b.get(*at) else {
            return bad("a run length is cut off");
        };
        *at += 1;
        if shift == 28 && byte > 0x0f {
            return bad("a run length overflows");
        }
        v |= u32::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(v);
        }
    }
    bad("a run length overflows")
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The memory size a delta leaves, after checking its header against
/// `max_size`, the most a memory may hold.
pub fn delta_size(delta: &[u8], max_size: u64) -> Result<u64, DeltaError> {
    if delta.len() < HEADER || &delta[..4] != MAGIC {
        return bad("not a page delta");
    }
    let version = u32_at(delta, 4);
    if version != VERSION {
        return bad(format!("format version {version}, this build reads {VERSION}"));
    }
    let page = u32_at(delta, 8);
    if page as usize != DELTA_PAGE {
        return bad(format!("page size {page}, expected {DELTA_PAGE}"));
    }
    let size = u64_at(delta, 12);
    if size > max_size {
        return bad(format!("memory size {size} exceeds the limit of {max_size}"));
    }
    Ok(size)
}

/// Apply `delta` to `memory`, which must be at least the size the delta
/// leaves (a memory created at its final size; growth since the earlier
/// image reads as zeros). Every length and index is checked before it is
/// used; on error `memory` may be partly changed and must be discarded.
pub fn apply(delta: &[u8], memory: &mut [u8]) -> Result<(), DeltaError> {
    let size = delta_size(delta, memory.len() as u64)?;
    let memory = &mut memory[..size as usize];
    let count = u64_at(delta, 20);
    let mut at = HEADER;
    let mut last: Option<u32> = None;
    for _ in 0..count {
        if delta.len() - at < 8 {
            return bad("a page record is cut off");
        }
        let index = u32_at(delta, at);
        let len = u32_at(delta, at + 4) as usize;
        at += 8;
        if last.is_some_and(|l| index <= l) {
            return bad("page indices do not ascend");
        }
        last = Some(index);
        let offset = index as usize * DELTA_PAGE;
        if offset + DELTA_PAGE > memory.len() {
            return bad(format!("page {index} lies beyond the memory"));
        }
        if len > delta.len() - at {
            return bad(format!("page {index} is cut off"));
        }
        let encoded = &delta[at..at + len];
        at += len;
        let page = &mut memory[offset..offset + DELTA_PAGE];
        let mut pos = 0usize;
        let mut e = 0usize;
        while e < encoded.len() {
            let same = read_varint(encoded, &mut e)? as usize;
            let changed = read_varint(encoded, &mut e)? as usize;
            if same + changed > DELTA_PAGE - pos || changed > encoded.len() - e {
                return bad(format!("page {index} has runs beyond its end"));
            }
            pos += same;
            for (m, x) in page[pos..pos + changed].iter_mut().zip(&encoded[e..e + changed]) {
                *m ^= x;
            }
            pos += changed;
            e += changed;
        }
        if pos != DELTA_PAGE {
            return bad(format!("page {index} has runs of {pos} bytes, not {DELTA_PAGE}"));
        }
    }
    if at != delta.len() {
        return bad("bytes follow the last page");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Box<[u8; DELTA_PAGE]> {
        Box::new([fill; DELTA_PAGE])
    }

    #[test]
    fn a_small_update_costs_about_its_own_size() {
        let before = page(3);
        let mut after = page(3);
        after[1000..1100].copy_from_slice(&[7; 100]);
        let mut w = DeltaWriter::new(4 * DELTA_PAGE as u64);
        w.page(2, &before, &after);
        w.page(3, &before, &before); // unchanged: left out
        assert_eq!(w.pages(), 1);
        let d = w.finish();
        assert!(d.len() - HEADER <= 8 + 100 + 8, "{} bytes", d.len() - HEADER);
        let mut memory = vec![3u8; 4 * DELTA_PAGE];
        apply(&d, &mut memory).unwrap();
        assert_eq!(&memory[2 * DELTA_PAGE..3 * DELTA_PAGE], &after[..]);
        assert!(memory[..2 * DELTA_PAGE].iter().all(|&b| b == 3));
    }

    #[test]
    fn scattered_and_total_changes_round_trip() {
        let mut x: u64 = 1;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut before = vec![0u8; 8 * DELTA_PAGE];
        before.iter_mut().for_each(|b| *b = rnd() as u8);
        let mut after = before.clone();
        for _ in 0..300 {
            let i = rnd() as usize % after.len();
            after[i] = after[i].wrapping_add(1 + (rnd() % 200) as u8);
        }
        after[5 * DELTA_PAGE..6 * DELTA_PAGE]
            .iter_mut()
            .for_each(|b| *b = !*b);
        let mut w = DeltaWriter::new(after.len() as u64);
        for i in 0..8 {
            let r = i * DELTA_PAGE..(i + 1) * DELTA_PAGE;
            w.page(
                i as u32,
                before[r.clone()].try_into().unwrap(),
                after[r].try_into().unwrap(),
            );
        }
        let d = w.finish();
        let mut memory = before.clone();
        apply(&d, &mut memory).unwrap();
        assert!(memory == after);
    }

    #[test]
    fn damaged_deltas_are_refused_without_panicking() {
        let before = page(0);
        let mut after = page(0);
        after[10] = 1;
        after[4000] = 2;
        let mut w = DeltaWriter::new(2 * DELTA_PAGE as u64);
        w.page(1, &before, &after);
        let good = w.finish();
        let mut memory = vec![0u8; 2 * DELTA_PAGE];
        assert!(apply(&good, &mut memory).is_ok());
        // Every truncation and every single-byte corruption is either
        // refused or applied within bounds; none panics.
        for cut in 0..good.len() {
            let mut m = vec![0u8; 2 * DELTA_PAGE];
            assert!(apply(&good[..cut], &mut m).is_err(), "cut at {cut}");
        }
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut d = good.clone();
                d[i] = v;
                let mut m = vec![0u8; 2 * DELTA_PAGE];
                let _ = apply(&d, &mut m);
            }
        }
        // A larger memory (grown later in the chain) takes the delta; a
        // smaller one cannot.
        let mut larger = vec![0u8; 3 * DELTA_PAGE];
        apply(&good, &mut larger).unwrap();
        assert_eq!(larger[DELTA_PAGE + 4000], 2);
        let mut small = vec![0u8; DELTA_PAGE];
        let err = apply(&good, &mut small).unwrap_err().to_string();
        assert!(
            err.contains("memory size 8192 exceeds the limit of 4096"),
            "{err}"
        );
        let mut beyond = good.clone();
        beyond[HEADER..HEADER + 4].copy_from_slice(&9u32.to_le_bytes());
        assert!(
            apply(&beyond, &mut memory)
                .unwrap_err()
                .to_string()
                .contains("beyond the memory")
        );
    }
}
