//! Hostile guest input: malformed headers and chains, wrong addresses, unknown ops and floods are
//! dropped or reset and counted, and the device keeps serving.

use super::*;

#[test]
fn a_short_header_is_dropped_and_counted() {
    let mut d = Driver::new(16);
    let addr = d.header_at(&request(1, 9009));
    d.send_chain(&[Desc::read(addr, 20)]);
    assert_malformed(&d, Malformed::ShortHeader, 1);
    assert!(d.events(9009).is_empty());
    assert_still_serving(&mut d);
}

#[test]
fn a_len_bigger_than_the_chain_is_dropped() {
    let mut d = Driver::new(16);
    connect(&mut d, 1000, 9009);
    let lie = Header {
        len: 100,
        ..rw(1000, 9009, b"")
    };
    let addr = d.header_at(&lie);
    // Header plus a 10-byte data descriptor.
    d.send_chain(&[
        Desc::read(addr, HEADER_SIZE as u32),
        Desc::read(addr + 0x100, 10),
    ]);
    // Header only.
    d.send_chain(&[Desc::read(addr, HEADER_SIZE as u32)]);
    // More than any packet may carry.
    let huge = Header {
        len: 1 << 20,
        ..rw(1000, 9009, b"")
    };
    let addr = d.header_at(&huge);
    d.send_chain(&[
        Desc::read(addr, HEADER_SIZE as u32),
        Desc::read(addr + 0x100, 1 << 20),
    ]);
    assert_malformed(&d, Malformed::BadLen, 3);
    assert!(d.events(9009).is_empty(), "nothing was fed");
    assert_eq!(d.backend.connection_count(), 1, "the connection lives on");
    assert_still_serving(&mut d);
}

#[test]
fn a_wrong_socket_type_is_reset() {
    let mut d = Driver::new(16);
    d.post_rx(1);
    let seqpacket = Header {
        type_: 2,
        ..request(1000, 9009)
    };
    d.send(&seqpacket, &[]);
    assert_malformed(&d, Malformed::BadType, 1);
    let rx = d.take_rx();
    assert_eq!((rx[0].0.op, rx[0].0.type_), (OP_RST, 2));
    assert!(d.events(9009).is_empty());
    assert_still_serving(&mut d);
}

#[test]
fn wrong_cids_are_dropped_silently() {
    let mut d = Driver::new(16);
    d.post_rx(2);
    let spoofed = Header {
        src_cid: 7,
        ..request(1000, 9009)
    };
    d.send(&spoofed, &[]);
    let elsewhere = Header {
        dst_cid: 4,
        ..request(1000, 9009)
    };
    d.send(&elsewhere, &[]);
    assert_malformed(&d, Malformed::BadCid, 2);
    assert!(d.take_rx().is_empty());
    assert!(d.events(9009).is_empty());
    assert_still_serving(&mut d);
}

#[test]
fn unknown_ops_are_dropped_and_reset_when_there_is_no_connection() {
    let mut d = Driver::new(16);
    d.post_rx(2);
    d.send(&hdr(42, 1000, 9009), &[]);
    assert_eq!(d.take_rx()[0].0.op, OP_RST);
    connect(&mut d, 1000, 9009);
    d.send(&hdr(42, 1000, 9009), &[]);
    d.send(&hdr(OP_RESPONSE, 1000, 9009), &[]);
    assert!(d.take_rx().is_empty(), "a live connection is not reset");
    assert_malformed(&d, Malformed::UnknownOp, 3);
    assert_eq!(d.backend.connection_count(), 1);
    d.send(&rw(1000, 9009, b"WATCHDOG=1\n"), b"WATCHDOG=1\n");
    assert_eq!(beats(&d.events(9009)), 1);
}

#[test]
fn chains_of_the_wrong_direction_are_returned() {
    let mut d = Driver::new(16);
    let addr = d.header_at(&request(1000, 9009));
    d.send_chain(&[Desc::write(addr, HEADER_SIZE as u32)]);
    let payload = rw(1000, 9009, b"WATCHDOG=1\n");
    let addr = d.header_at(&payload);
    d.send_chain(&[
        Desc::read(addr, HEADER_SIZE as u32),
        Desc::write(addr + 0x100, 11),
    ]);
    assert_malformed(&d, Malformed::WrongDirection, 2);
    // rx side: a read-only rx buffer is returned empty and the next one is used.
    let ring = &mut d.rings[usize::from(RX_QUEUE)];
    ring.push(&d.mem, &[Desc::read(0x40_0000, 4096)]);
    d.post_rx(1);
    d.send(&request(1000, 7777), &[]);
    let used = d.rings[usize::from(RX_QUEUE)].used(&d.mem);
    assert_eq!(used.len(), 2);
    assert_eq!(used[0].1, 0, "the bad buffer came back empty");
    assert_eq!(
        used[1].1, HEADER_SIZE as u32,
        "the reset went into the good one"
    );
    assert_malformed(&d, Malformed::RxBuffer, 1);
    assert_still_serving(&mut d);
}

#[test]
fn descriptors_outside_guest_memory_are_returned() {
    let mut d = Driver::new(16);
    d.send_chain(&[Desc::read(1 << 40, HEADER_SIZE as u32)]);
    let addr = d.header_at(&rw(1000, 9009, b"0123456789"));
    d.send_chain(&[
        Desc::read(addr, HEADER_SIZE as u32),
        Desc::read(u64::MAX - 4, 10),
    ]);
    assert_malformed(&d, Malformed::BadDescriptor, 2);
    assert_still_serving(&mut d);
}

#[test]
fn payload_for_an_unknown_connection_is_reset() {
    let mut d = Driver::new(16);
    d.post_rx(3);
    d.send(&rw(5, 9009, b"WATCHDOG=1\n"), b"WATCHDOG=1\n");
    d.send(&hdr(OP_CREDIT_UPDATE, 5, 9009), &[]);
    d.send(&hdr(OP_SHUTDOWN, 5, 9009), &[]);
    let ops: Vec<u16> = d.take_rx().iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![OP_RST; 3]);
    assert_malformed(&d, Malformed::UnknownConnection, 3);
    assert!(d.events(9009).is_empty(), "not a heartbeat");
}

#[test]
fn a_request_flood_is_capped() {
    let mut d = Driver::new(4096);
    d.post_rx(200);
    for p in 0..100 {
        d.send(&request(p, 9009), &[]);
    }
    assert_eq!(d.backend.connection_count(), MAX_CONNECTIONS);
    let rx = d.take_rx();
    let resets = rx.iter().filter(|(h, _)| h.op == OP_RST).count();
    let responses = rx.iter().filter(|(h, _)| h.op == OP_RESPONSE).count();
    assert_eq!(
        (responses, resets),
        (MAX_CONNECTIONS, 100 - MAX_CONNECTIONS)
    );
    assert_eq!(
        d.counters.snapshot().connections_refused,
        (100 - MAX_CONNECTIONS) as u64
    );
    // A repeated request from the same guest port replaces the old connection.
    d.send(&request(3, 9009), &[]);
    let evs = d.events(9009);
    let n = evs.len();
    assert!(matches!(evs[n - 2], ChannelEvent::Disconnected { .. }));
    assert!(matches!(evs[n - 1], ChannelEvent::Connected { .. }));
    assert_eq!(d.backend.connection_count(), MAX_CONNECTIONS);
}

#[test]
fn resets_waiting_for_buffers_are_bounded() {
    let mut d = Driver::new(16);
    for p in 0..(MAX_CONTROL as u32 + 10) {
        d.send(&request(p, 7777), &[]);
    }
    let s = d.counters.snapshot();
    assert_eq!(s.control_dropped, 10);
    d.kick_rx(200);
    d.kick_rx(200);
    assert_eq!(d.take_rx().len(), MAX_CONTROL);
}
