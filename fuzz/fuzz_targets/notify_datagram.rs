//! The guest agent's notify socket: any datagram a guest program may send to it, through the
//! agent's real translation of systemd's notify protocol (`awd::agent::notify::translate`).
//!
//! Input: one datagram, as sent.
//! Checks: no panic; a datagram is taken whole or refused whole; every message it gives
//! encodes, and its line decodes as the same message, so the host acts on exactly what the
//! agent meant; nothing is relayed that the host would take for a pulse or drop as rejected;
//! more messages plus ignored assignments than lines is impossible.
#![no_main]

use awd::agent::limits::MAX_DATAGRAM;
use awd::agent::notify::translate;
use awd::protocol::{Decoder, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|dgram: &[u8]| {
    let Ok(t) = translate(dgram, Some("ready")) else {
        return;
    };
    assert!(dgram.len() <= MAX_DATAGRAM, "an oversized datagram was taken");
    let lines = dgram.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
    assert_eq!(t.messages.len() + t.ignored, lines, "one outcome per assignment");
    for m in &t.messages {
        assert!(
            !matches!(m, Message::Rejected(_) | Message::Pulse | Message::PulseReply),
            "translated into {m:?}"
        );
        let bytes = m.encode().expect("a translated message encodes");
        let mut back = Vec::new();
        Decoder::new().feed(&bytes, |d| back.push(d));
        assert_eq!(back, [m.clone()], "the host would read something else");
    }
});
