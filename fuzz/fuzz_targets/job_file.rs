//! A job file (TOML) parsed and validated as `memento run` and the REST
//! API take it: bad input is an error naming the key, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use memento::spec::JobSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = JobSpec::from_toml(text, Path::new("<fuzz>"), Path::new("/nonexistent/fuzz"));
});
