//! `HOST.toml` of `memento serve` parsed and validated: bad input is an
//! error naming the field, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use memento::spec::host_config::HostConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = HostConfig::from_toml(text, Path::new("<fuzz>"), Path::new("/nonexistent/fuzz"));
});
