//! Opening and closing connections: requests to served and other ports, the guest's shutdowns and
//! resets.

use super::*;

#[test]
fn a_request_to_a_configured_port_gets_a_response_and_a_connected_event() {
    let mut d = Driver::new(16);
    d.post_rx(2);
    let used = d.send(&request(1234, 9009), &[]);
    assert_eq!(used, vec![(0, 0)], "the tx chain is returned with length 0");
    let rx = d.take_rx();
    assert_eq!(rx.len(), 1);
    let (h, data) = &rx[0];
    assert!(data.is_empty());
    assert_eq!(
        *h,
        Header {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            src_port: 9009,
            dst_port: 1234,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RESPONSE,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        }
    );
    let evs = d.events(9009);
    assert!(
        matches!(&evs[..], [ChannelEvent::Connected { peer, .. }] if peer == "vsock:3:1234"),
        "{evs:?}"
    );
    assert!(d.events(9010).is_empty(), "the other port hears nothing");
    assert_eq!(d.watches[0].metrics.connections.get(), 1);
    let s = d.counters.snapshot();
    assert_eq!((s.connections_opened, s.connections_open), (1, 1));
    assert_eq!((s.packets_from_guest, s.packets_to_guest), (1, 1));
}

#[test]
fn a_request_to_another_port_is_reset_at_once() {
    let mut d = Driver::new(16);
    d.post_rx(1);
    d.send(&request(1234, 7777), &[]);
    let rx = d.take_rx();
    assert_eq!(rx.len(), 1);
    let h = rx[0].0;
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 7777, 1234));
    assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
    assert!(d.events(9009).is_empty() && d.events(9010).is_empty());
    let s = d.counters.snapshot();
    assert_eq!((s.connections_refused, s.resets_sent), (1, 1));
    assert_eq!(s.malformed_total(), 0, "a refusal is not malformed input");
}

#[test]
fn a_shutdown_is_answered_with_a_reset_and_disconnects() {
    let mut d = Driver::new(16);
    let (conn, tx) = connect(&mut d, 1000, 9009);
    d.send(&rw(1000, 9009, b"WATCHDOG=1\nhalf"), b"WATCHDOG=1\nhalf");
    let shutdown = Header {
        flags: 3,
        ..hdr(OP_SHUTDOWN, 1000, 9009)
    };
    d.send(&shutdown, &[]);
    let rx = d.take_rx();
    assert_eq!(rx.len(), 1);
    assert_eq!((rx[0].0.op, rx[0].0.dst_port), (OP_RST, 1000));
    let evs = d.events(9009);
    assert!(matches!(evs[0], ChannelEvent::Heartbeats { count: 1, .. }));
    assert!(
        matches!(&evs[1], ChannelEvent::Disconnected { conn: c, reason }
            if *c == conn && matches!(reason, CloseReason::PeerClosedMidMessage)),
        "{evs:?}"
    );
    assert_eq!(d.backend.connection_count(), 0);
    assert_eq!(d.watches[0].metrics.connections.get(), 0);
    assert_eq!(
        tx.try_write(Bytes::from_static(b"x")),
        Err(TryWriteError::Closed)
    );
    // Payload after the shutdown belongs to no connection: reset.
    d.send(&rw(1000, 9009, b"late\n"), b"late\n");
    assert_eq!(d.take_rx()[0].0.op, OP_RST);
    assert_eq!(
        d.counters
            .snapshot()
            .malformed(Malformed::UnknownConnection),
        1
    );
}

#[test]
fn a_guest_reset_disconnects_without_a_reply() {
    let mut d = Driver::new(16);
    let (conn, _tx) = connect(&mut d, 1000, 9009);
    d.send(&hdr(OP_RST, 1000, 9009), &[]);
    assert!(d.take_rx().is_empty(), "a reset is never answered");
    let evs = d.events(9009);
    assert!(
        matches!(&evs[..], [ChannelEvent::Disconnected { conn: c, reason }]
            if *c == conn && matches!(reason, CloseReason::PeerReset)),
        "{evs:?}"
    );
    // A reset for nothing is ignored, not counted.
    d.send(&hdr(OP_RST, 1000, 9009), &[]);
    assert!(d.take_rx().is_empty());
    assert_eq!(d.counters.snapshot().malformed_total(), 0);
}
