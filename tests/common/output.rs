//! What a job's `file` sink committed, and what it should have: the
//! deterministic generator's output through `wordcount` or a pass-through.

use std::collections::BTreeMap;
use std::path::Path;

/// Committed output of a `file` sink: per key, its values in order. Reads
/// the visible part files (not the hidden staging directory) sorted by name.
pub type Committed = BTreeMap<String, Vec<String>>;

pub fn committed(dir: &Path) -> Committed {
    let mut out = Committed::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    for name in names {
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        for line in text.lines() {
            let (k, v) = line
                .split_once('\t')
                .unwrap_or_else(|| panic!("{name}: line without a tab: {line:?}"));
            out.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    out
}

pub fn total_lines(c: &Committed) -> usize {
    c.values().map(Vec::len).sum()
}

/// Every key's committed values are a prefix of the expected ones: nothing
/// duplicated, reordered or invented (output may only be behind).
pub fn assert_prefix(got: &Committed, expected: &Committed, when: &str) {
    for (k, vs) in got {
        let want = expected.get(k).map_or(&[][..], Vec::as_slice);
        assert!(
            vs.len() <= want.len() && vs[..] == want[..vs.len()],
            "{when}: committed output of key {k} is not a prefix of the uninterrupted run's \
             ({} values committed, {} expected; first difference at {:?})",
            vs.len(),
            want.len(),
            vs.iter().zip(want).position(|(a, b)| a != b)
        );
    }
}

/// Per-key comparison with a readable message on mismatch.
pub fn assert_same_output(got: &Committed, expected: &Committed, what: &str) {
    if got == expected {
        return;
    }
    let mut diffs = Vec::new();
    for k in got
        .keys()
        .chain(expected.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (g, e) = (got.get(k), expected.get(k));
        if g != e {
            let (g, e) = (g.map_or(&[][..], Vec::as_slice), e.map_or(&[][..], Vec::as_slice));
            let at = g
                .iter()
                .zip(e)
                .position(|(a, b)| a != b)
                .unwrap_or(g.len().min(e.len()));
            diffs.push(format!(
                "key {k}: {} values, expected {}, first difference at index {at}",
                g.len(),
                e.len()
            ));
        }
    }
    panic!(
        "{what}: committed output differs from the uninterrupted run ({} vs {} lines):\n  {}",
        total_lines(got),
        total_lines(expected),
        diffs.into_iter().take(10).collect::<Vec<_>>().join("\n  ")
    );
}

/// The deterministic generator's events, as (key, value) text.
pub fn generated(count: u64, keys: u64, seed: u64) -> Vec<(String, String)> {
    let g = memento::dataflow::source::Generator::new(Some(count), None, keys, seed, 1);
    (0..count)
        .map(|i| {
            let e = g.event(i);
            (
                String::from_utf8(e.key).unwrap(),
                String::from_utf8(e.value).unwrap(),
            )
        })
        .collect()
}

/// Output of a pass-through operator over the generator.
pub fn passthrough_output(count: u64, keys: u64, seed: u64) -> Committed {
    let mut out = Committed::new();
    for (k, v) in generated(count, keys, seed) {
        out.entry(k).or_default().push(v);
    }
    out
}

/// Output of `wordcount` over the generator: per key 1, 2, 3, ...
pub fn wordcount_output(count: u64, keys: u64, seed: u64) -> Committed {
    let mut out = Committed::new();
    for (k, _) in generated(count, keys, seed) {
        let vs = out.entry(k).or_default();
        vs.push((vs.len() + 1).to_string());
    }
    out
}
