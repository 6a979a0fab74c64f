//! A word-at-a-time `memcmp` for guests.
//!
//! On `wasm32-wasip2`, `memcmp` comes from wasi-libc (musl), which compares
//! one byte per loop iteration. Every ordered comparison of byte strings
//! goes through it (`[u8]::cmp`, `BTreeMap<Vec<u8>, _>`, `String` keys), and
//! in the throughput benchmark it was the guest's largest single cost.
//! Defining the symbol here keeps libc's copy out of the link (an archive
//! member is only pulled in for a symbol still undefined) and compares
//! eight or four bytes at a time.

/// `memcmp(3)`: the sign of the difference of the first differing bytes
/// (as unsigned), or 0 if the `n` bytes are equal.
///
/// Words are compared big-endian, which orders them as their bytes; the
/// last word of a range overlaps the one before rather than falling back
/// to single bytes.
///
/// # Safety
/// `a` and `b` must be valid for reads of `n` bytes.
#[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: every read below is within the `n` bytes the caller vouches
    // for; unaligned reads are allowed on wasm.
    unsafe {
        let word64 = |p: *const u8, at: usize| p.add(at).cast::<u64>().read_unaligned().swap_bytes();
        let word32 = |p: *const u8, at: usize| p.add(at).cast::<u32>().read_unaligned().swap_bytes();
        if n >= 8 {
            let mut i = 0;
            loop {
                let at = i.min(n - 8);
                let (x, y) = (word64(a, at), word64(b, at));
                if x != y {
                    return if x < y { -1 } else { 1 };
                }
                if at == n - 8 {
                    return 0;
                }
                i += 8;
            }
        }
        if n >= 4 {
            for at in [0, n - 4] {
                let (x, y) = (word32(a, at), word32(b, at));
                if x != y {
                    return if x < y { -1 } else { 1 };
                }
            }
            return 0;
        }
        for i in 0..n {
            let (x, y) = (*a.add(i), *b.add(i));
            if x != y {
                return x as i32 - y as i32;
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(v: i32) -> i32 {
        v.signum()
    }

    #[test]
    fn agrees_with_slice_ordering() {
        let samples: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"a".to_vec(),
            b"key-1".to_vec(),
            b"key-10".to_vec(),
            b"key-9999".to_vec(),
            b"key-99990".to_vec(),
            vec![0xff; 13],
            vec![0x00; 13],
            b"abcdefghijklmnopq".to_vec(),
            b"abcdefghijklmnopr".to_vec(),
            b"abcdefgXijklmnopq".to_vec(),
            b"abcXefghijklmnopq".to_vec(),
        ];
        // Every length up to 20, differing at every position.
        let mut samples = samples;
        for len in 0..=20usize {
            for at in 0..len {
                let base: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
                let mut up = base.clone();
                up[at] = up[at].wrapping_add(1);
                samples.push(base);
                samples.push(up);
            }
        }
        for x in &samples {
            for y in &samples {
                let n = x.len().min(y.len());
                // SAFETY: both are valid for `n` bytes.
                let got = unsafe { memcmp(x.as_ptr(), y.as_ptr(), n) };
                let want = x[..n].cmp(&y[..n]) as i32;
                assert_eq!(sign(got), want, "{x:?} {y:?}");
            }
        }
    }
}
