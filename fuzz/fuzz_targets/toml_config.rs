//! TOML config files, parsed and validated as `awd check --config` does.
//!
//! Input: the file's text. Checks: no panic, and a config that checks prints and starts an
//! engine per watchdog (`awd_fuzz::build_and_check`).
#![no_main]

use std::path::Path;

use awd::config::file;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let raw = match file::parse(text, Path::new("/etc/awd/fuzz.toml")) {
        Ok(raw) => raw,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    if let Err(e) = awd_fuzz::build_and_check(raw) {
        let _ = e.to_string();
    }
});
