//! Arbitrary guest input through the tx path. Run alone (the case count honours
//! `PROPTEST_CASES`): `cargo test --lib -- fuzz_`.

use proptest::prelude::*;

use super::*;

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        (0u32..64, 0u32..64).prop_map(|(extra, short)| Layout::One { extra, short }),
        (0u32..100, 0u32..400, any::<bool>(), any::<bool>()).prop_map(
            |(head_len, data_len, head_write, data_write)| Layout::Two {
                head_len,
                data_len,
                head_write,
                data_write,
            }
        ),
        Just(Layout::Split),
        prop::collection::vec((0u32..200, 0u16..8, 0u16..6), 1..5).prop_map(Layout::Raw),
        (any::<u64>(), 0u32..100_000).prop_map(|(addr, len)| Layout::Outside { addr, len }),
    ]
}

fn header() -> impl Strategy<Value = Header> {
    (
        prop_oneof![Just(GUEST_CID), any::<u64>()],
        prop_oneof![Just(HOST_CID), any::<u64>()],
        prop_oneof![0u32..4, any::<u32>()],
        prop_oneof![Just(9009u32), Just(9010), any::<u32>()],
        prop_oneof![0u32..300, any::<u32>()],
        prop_oneof![Just(TYPE_STREAM), any::<u16>()],
        prop_oneof![0u16..9, any::<u16>()],
        any::<u32>(),
        prop_oneof![Just(0u32), Just(BUF_ALLOC), any::<u32>()],
        prop_oneof![Just(0u32), any::<u32>()],
    )
        .prop_map(
            |(src_cid, dst_cid, src_port, dst_port, len, type_, op, flags, buf_alloc, fwd_cnt)| {
                Header {
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len,
                    type_,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                }
            },
        )
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        "(WATCHDOG=1\n|STATUS=[a-z]{0,8}\n|WATCHDOG=trigger\n|x{0,20}){0,12}"
            .prop_map(String::into_bytes),
    ]
}

/// Counts what the watchdog would hear from `evs`: heartbeats, plus one per signal.
fn heard(evs: &[ChannelEvent]) -> u64 {
    evs.iter()
        .map(|e| match e {
            ChannelEvent::Heartbeats { count, .. } => u64::from(*count),
            ChannelEvent::Signal { .. } => 1,
            _ => 0,
        })
        .sum()
}

proptest! {
    /// A well-behaved guest whose packets are split anywhere over 1 to 8 descriptors
    /// (header included): every payload is fed to the watchdog exactly as an `Intake` fed
    /// the same bytes would hear it, nothing is counted malformed, and every byte is
    /// credited back.
    #[test]
    fn fuzz_tx_payload_splits_are_heard_and_credited(
        packets in prop::collection::vec(
            (
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 1..2000),
                    "(WATCHDOG=1\n|STATUS=[a-z]{0,8}\n|x{1,20}){1,300}"
                        .prop_map(String::into_bytes),
                    prop::collection::vec(Just(b'x'), 60_000..=MAX_PKT_PAYLOAD as usize),
                ],
                prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            ),
            1..12,
        ),
    ) {
        let mut d = Driver::new(4096);
        d.post_rx(4);
        d.send(&request(1000, 9009), &[]);
        let _connected = d.events(9009);
        let metrics = crate::metrics::Metrics::new().watchdog("oracle", "c");
        let mut oracle = Intake::new("oracle".into(), "c".into(), metrics);
        let (mut want, mut got, mut total) = (0u64, 0u64, 0u32);
        for (payload, cuts) in &packets {
            let len = HEADER_SIZE + payload.len();
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
            cuts.sort_unstable();
            let used = d.send_split(&rw(1000, 9009, payload), payload, &cuts);
            prop_assert_eq!(used.len(), 1);
            let mut evs = Vec::new();
            oracle.feed(0, payload, &mut evs);
            want += heard(&evs);
            got += heard(&d.events(9009));
            total = total.wrapping_add(payload.len() as u32);
        }
        let s = d.counters.snapshot();
        prop_assert_eq!(s.malformed_total(), 0);
        prop_assert_eq!(s.bytes_from_guest, u64::from(total));
        prop_assert_eq!(got, want);
        d.post_rx(64);
        d.send(&hdr(OP_CREDIT_REQUEST, 1000, 9009), &[]);
        let rx = d.take_rx();
        let update = rx.iter().rev().find(|(h, _)| h.op == OP_CREDIT_UPDATE);
        prop_assert_eq!(update.map(|(h, _)| h.fwd_cnt), Some(total));
    }

    #[test]
    fn fuzz_tx_path_never_panics_and_returns_every_descriptor(
        packets in prop::collection::vec((header(), payload(), layout()), 1..40),
        rx_buffers in 0usize..16,
        pulse_every in 1usize..5,
    ) {
        let mut d = Driver::new(8);
        d.post_rx(rx_buffers);
        let mut writers = Vec::new();
        for (i, (h, p, l)) in packets.iter().enumerate() {
            d.push_layout(h, p, l);
            d.event(TX_QUEUE);
            let tx = &mut d.rings[usize::from(TX_QUEUE)];
            let used = tx.used(&d.mem);
            prop_assert_eq!(used.len(), 1, "the chain came back");
            prop_assert_eq!(used[0].1, 0, "tx chains come back with length 0");
            prop_assert_eq!(tx.outstanding(&d.mem), 0);
            for port in [9009, 9010] {
                for ev in d.events(port) {
                    if let ChannelEvent::Connected { tx, .. } = ev {
                        writers.push(tx);
                    }
                }
            }
            if i % pulse_every == 0 {
                for w in &writers {
                    let _ = w.try_write(Bytes::from_static(b"\0\0\0\x17advanced-watchdog pulse"));
                }
                d.event(WAKE_EVENT);
            }
            d.event(RETRY_EVENT);
        }
        d.kick_rx(8);
        let rx = &d.rings[usize::from(RX_QUEUE)];
        prop_assert!(rx.outstanding(&d.mem) <= (rx_buffers + 8) as u16);
        prop_assert!(d.backend.connection_count() <= MAX_CONNECTIONS);
        d.backend.frontend_gone(CloseReason::Shutdown);
        prop_assert_eq!(d.backend.connection_count(), 0);
        prop_assert_eq!(d.counters.snapshot().connections_open, 0);
    }
}
