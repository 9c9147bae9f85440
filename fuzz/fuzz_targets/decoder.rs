//! The heartbeat protocol's decoder and the transports' intake, on arbitrary bytes.
//!
//! Input: two 2-byte cut positions, then the stream. Checks: the stream decodes to the same
//! messages whole, cut at the two positions, and (when short) a byte at a time; every accepted
//! message encodes to bytes that decode as itself; the intake fed the same reads gives one
//! `Heartbeats` first per read, then the signals, and the same signals however the stream is
//! cut (runs of `STATUS=`/`WATCHDOG_USEC=` within a read coalesce to their last, by design).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use awd::metrics::{Metrics, WatchdogMetrics};
use awd::protocol::{Decoder, EncodeError, Message};
use awd::transport::{ChannelEvent, Intake};
use libfuzzer_sys::fuzz_target;

fn decode(reads: &[&[u8]]) -> Vec<Message> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    for r in reads {
        d.feed(r, |m| out.push(m));
    }
    out
}

fn metrics() -> Arc<WatchdogMetrics> {
    static M: OnceLock<Arc<WatchdogMetrics>> = OnceLock::new();
    M.get_or_init(|| Metrics::new().watchdog("fuzz", "c"))
        .clone()
}

/// Messages the intake passes on one by one (never coalesced, never counted as heartbeats).
fn kept(m: &Message) -> bool {
    !matches!(
        m,
        Message::Heartbeat | Message::Rejected(_) | Message::Status(_) | Message::SetTimeout(_)
    )
}

/// What the intake makes of `reads`, checked read by read against a decoder fed the same reads.
fn intake(reads: &[&[u8]], rate: Option<u32>) -> (Vec<Message>, Option<Message>, Option<Message>) {
    let mut intake = Intake::new("fuzz".into(), "c".into(), metrics()).with_rate_limit(rate);
    let mut oracle = Decoder::new();
    let t0 = Instant::now();
    let (mut signals, mut last_status, mut last_timeout) = (Vec::new(), None, None);
    for (i, r) in reads.iter().enumerate() {
        let mut out = Vec::new();
        intake.feed_at(7, r, t0 + Duration::from_millis(i as u64 * 3), &mut out);
        if r.is_empty() {
            assert!(out.is_empty(), "an empty read gives no event");
            continue;
        }
        let Some(ChannelEvent::Heartbeats { conn: 7, count }) = out.first() else {
            panic!("a read did not start with Heartbeats: {out:?}");
        };
        let count = *count;
        let mut n = 0u32;
        for ev in &out[1..] {
            let ChannelEvent::Signal { conn: 7, signal } = ev else {
                panic!("a read gave more than Heartbeats then signals: {out:?}");
            };
            assert!(
                !matches!(signal, Message::Heartbeat | Message::Rejected(_)),
                "{signal:?} is counted, not signalled"
            );
            n += 1;
            match signal {
                Message::Status(_) => last_status = Some(signal.clone()),
                Message::SetTimeout(_) => last_timeout = Some(signal.clone()),
                m => signals.push(m.clone()),
            }
        }
        if rate.is_none() {
            let mut completed = 0u32;
            oracle.feed(r, |_| completed += 1);
            assert_eq!(
                count + n,
                completed.max(1),
                "the read's events account for each message it completed"
            );
        }
    }
    (signals, last_status, last_timeout)
}

fuzz_target!(|input: &[u8]| {
    let (cuts, data) = awd_fuzz::cuts(input, 2);
    let reads = awd_fuzz::pieces(data, &cuts);

    let whole = decode(&[data]);
    assert_eq!(
        decode(&reads),
        whole,
        "cutting the stream changed the messages"
    );
    if data.len() <= 512 {
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(
            decode(&bytes),
            whole,
            "a byte at a time changed the messages"
        );
    }

    for m in &whole {
        if matches!(m, Message::Rejected(_)) {
            assert_eq!(m.encode(), Err(EncodeError::NotAMessage));
            continue;
        }
        let bytes = match m.encode() {
            Ok(b) => b,
            Err(e) => panic!("the accepted message {m:?} does not encode: {e}"),
        };
        assert_eq!(
            decode(&[&bytes]),
            vec![m.clone()],
            "{m:?} encoded as {bytes:?} decodes as something else"
        );
    }

    let want: Vec<Message> = whole.iter().filter(|m| kept(m)).cloned().collect();
    let last = |f: fn(&Message) -> bool| whole.iter().rev().find(|m| f(m)).cloned();
    let want_status = last(|m| matches!(m, Message::Status(_)));
    let want_timeout = last(|m| matches!(m, Message::SetTimeout(_)));
    for r in [&[data][..], &reads[..]] {
        let (signals, status, timeout) = intake(r, None);
        assert_eq!(
            signals, want,
            "the intake's signals differ from the decoder's"
        );
        assert_eq!(status, want_status, "the last STATUS= differs");
        assert_eq!(timeout, want_timeout, "the last WATCHDOG_USEC= differs");
    }
    // A rate limit from the first cut's low bits: only the per-read shape is checked.
    let rate = u32::try_from(cuts.first().copied().unwrap_or(0) % 8).ok();
    let _ = intake(&reads, rate);
});
