//! A QMP monitor as QEMU could answer: greetings, capability negotiation, replies and events,
//! through awd's real greeting, classification and QMP client, on an in-memory stream.
//!
//! Input: see `awd_fuzz::monitor_input` (script lines, remembered kind, then the monitor's
//! output cut into reads at 0xFF). Checks: each script line gets an outcome; what awd writes
//! to a QMP monitor is the negotiation and then one JSON command per line with ids counting
//! from 1; to HMP and raw nodes, the lines as written.
#![no_main]

use std::time::Duration;

use awd::action::monitor::{Kind, Outcome};
use awd::fuzzing::monitor_session;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|input: &[u8]| {
    let m = awd_fuzz::monitor_input(input);
    let s = monitor_session(m.reads, m.known, &m.lines, Duration::from_secs(5));
    let kind = match &s.kind {
        Ok(kind) => *kind,
        Err(e) => {
            let _ = awd::util::error_chain(e);
            assert!(s.outcomes.is_empty());
            return;
        }
    };
    assert_eq!(s.outcomes.len(), m.lines.len(), "one outcome per line");
    for o in &s.outcomes {
        match o {
            Ok(Outcome::Ok(t) | Outcome::Error(t)) => assert!(kind != Kind::Raw, "{t}"),
            Ok(Outcome::Written) => assert_eq!(kind, Kind::Raw),
            Err(e) => assert!(kind != Kind::Raw, "{e}"),
        }
    }
    if kind == Kind::Qmp {
        let lines: Vec<&[u8]> = s.written.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(
            lines.len(),
            1 + m.lines.len(),
            "{:?}",
            String::from_utf8_lossy(&s.written)
        );
        assert_eq!(lines[0], b"{\"execute\":\"qmp_capabilities\",\"id\":0}\r\n");
        for (i, l) in lines.iter().enumerate().skip(1) {
            let v: Value = serde_json::from_slice(l).expect("awd writes JSON commands");
            assert!(v["execute"].is_string(), "{v}");
            assert_eq!(v["id"].as_u64(), Some(i as u64), "{v}");
        }
    } else {
        let want: String = m.lines.iter().map(|l| format!("{}\n", l.text)).collect();
        assert_eq!(s.written, want.as_bytes(), "{kind} lines go as written");
    }
});
