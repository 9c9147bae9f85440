//! The seed's QEMU option syntax: `--chardev socket,…`/`vhost-user-vsock,…` and `--object
//! advanced-watchdog,…`/`iothread,…` arguments, parsed and validated as `awd check` does.
//!
//! Input: one argument per line, `chardev ARG` or `object ARG` (a leading `-`/`--` is allowed);
//! any other line is parsed both ways on its own. Checks: no panic, and a config that checks
//! prints and starts an engine per watchdog (`awd_fuzz::build_and_check`).
#![no_main]

use awd::config::{RawConfig, seed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let (mut chardevs, mut objects) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let arg = line.trim_start_matches('-');
        if let Some(a) = arg.strip_prefix("chardev ") {
            chardevs.push(a.to_owned());
        } else if let Some(a) = arg.strip_prefix("object ") {
            objects.push(a.to_owned());
        } else {
            if let Err(e) = seed::parse_chardev(line) {
                let _ = e.to_string();
            }
            if let Err(e) = seed::parse_object(line) {
                let _ = e.to_string();
            }
        }
    }
    let mut raw = RawConfig::default();
    if let Err(e) = raw.add_seed_args(&chardevs, &objects) {
        let _ = e.to_string();
        return;
    }
    if let Err(e) = awd_fuzz::build_and_check(raw) {
        let _ = e.to_string();
    }
});
