//! An HMP monitor as QEMU could answer: the greeting, then output read up to each `(qemu) `
//! prompt, through awd's real greeting, classification and HMP line client, on an in-memory
//! stream; and the output cleaner on its own.
//!
//! Input: as for the `qmp` target (`awd_fuzz::monitor_input`); the seeds are HMP sessions.
//! Checks: each script line gets an outcome; what awd writes is the lines as written; cleaned
//! HMP output holds no carriage return and no escape character.
#![no_main]

use std::time::Duration;

use awd::action::monitor::{Kind, Outcome, clean_hmp_output};
use awd::fuzzing::monitor_session;
use libfuzzer_sys::fuzz_target;

fn clean(t: &str) -> bool {
    !t.contains(['\r', '\u{1b}'])
}

fuzz_target!(|input: &[u8]| {
    let m = awd_fuzz::monitor_input(input);
    for r in &m.reads {
        let t = clean_hmp_output(r);
        assert!(clean(&t), "{t:?}");
    }
    let s = monitor_session(m.reads, m.known, &m.lines, Duration::from_secs(5));
    let kind = match &s.kind {
        Ok(kind) => *kind,
        Err(e) => {
            let _ = awd::util::error_chain(e);
            return;
        }
    };
    assert_eq!(s.outcomes.len(), m.lines.len(), "one outcome per line");
    if kind == Kind::Hmp {
        for o in s.outcomes.iter().flatten() {
            if let Outcome::Ok(t) | Outcome::Error(t) = o {
                assert!(clean(t), "{t:?}");
            }
        }
    }
    if kind != Kind::Qmp {
        let want: String = m.lines.iter().map(|l| format!("{}\n", l.text)).collect();
        assert_eq!(s.written, want.as_bytes(), "{kind} lines go as written");
    }
});
