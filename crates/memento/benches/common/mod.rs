//! Shared by the benchmarks: synthetic data and medians.

#![allow(dead_code)] // each benchmark uses a part

use std::time::Duration;

/// One mebibyte.
pub const MIB: usize = 1 << 20;

/// xorshift64.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A synthetic linear-memory image: 4 KiB pages, 25 % never touched (zero),
/// 25 % high-entropy (hashes, compressed payloads), 50 % structured heap data
/// (short strings, small integers, pointers) that compresses like a real
/// operator heap.
pub fn memory_image(len: usize, seed: u64) -> Vec<u8> {
    let words: [&[u8]; 16] = [
        b"the", b"quick", b"brown", b"fox", b"jumps", b"over", b"lazy", b"dog", b"memento", b"stream",
        b"window", b"count", b"key", b"value", b"event", b"user",
    ];
    let mut rng = Rng(seed | 1);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let page = (len - out.len()).min(4096);
        match rng.next() % 4 {
            0 => out.extend(std::iter::repeat_n(0u8, page)),
            1 => {
                for _ in 0..page / 8 {
                    out.extend_from_slice(&rng.next().to_le_bytes());
                }
            }
            _ => {
                let end = out.len() + page;
                while out.len() < end {
                    let r = rng.next();
                    out.extend_from_slice(words[(r % 16) as usize]);
                    out.extend_from_slice(&((r >> 8) as u32 % 1000).to_le_bytes());
                    out.extend_from_slice(&(0x0010_0000u32 + ((r >> 20) as u32 % 65536) * 16).to_le_bytes());
                }
                out.truncate(end);
            }
        }
    }
    out.truncate(len);
    out
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A comma-separated list of numbers from environment variable `name`.
pub fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: comma-separated numbers"))
        })
        .collect()
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The task the single-instance benchmarks run.
pub fn label() -> memento::runtime::TaskLabel {
    memento::runtime::TaskLabel {
        job: "bench".into(),
        operator: "b".into(),
        task: 0,
    }
}
