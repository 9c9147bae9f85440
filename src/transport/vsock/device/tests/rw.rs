//! Payload both ways: guest bytes to the watchdog however the guest lays them out in descriptors,
//! pulses back on the rx queue, and what waits for rx buffers.

use super::*;

#[test]
fn payload_feeds_the_watchdog() {
    let mut d = Driver::new(16);
    let (conn, _tx) = connect(&mut d, 1000, 9009);
    let line = b"WATCHDOG=1\nWATCHDOG=1\nSTATUS=hello\n";
    assert_eq!(d.send(&rw(1000, 9009, line), line), vec![(1, 0)]);
    let evs = d.events(9009);
    assert!(
        matches!(evs[0], ChannelEvent::Heartbeats { conn: c, count: 2 } if c == conn),
        "{evs:?}"
    );
    assert!(matches!(
        &evs[1],
        ChannelEvent::Signal { signal: Message::Status(s), .. } if &**s == "hello"
    ));
    assert_eq!(evs.len(), 2);
    // A line split over two packets: each packet is input (proof of life) on its own.
    d.send(&rw(1000, 9009, b"WATCH"), b"WATCH");
    d.send(&rw(1000, 9009, b"DOG=1\n"), b"DOG=1\n");
    assert_eq!(beats(&d.events(9009)), 2);
    assert!(d.take_rx().is_empty(), "no credit update for a few bytes");
    let s = d.counters.snapshot();
    assert_eq!(s.bytes_from_guest, (line.len() + 11) as u64);
}

#[test]
fn header_and_payload_may_share_one_descriptor() {
    // Linux 6.2+ guests put both in one buffer.
    let mut d = Driver::new(16);
    connect(&mut d, 1000, 9009);
    let line = b"WATCHDOG=1\nWATCHDOG=1\n";
    let addr = d.header_at(&rw(1000, 9009, line));
    d.mem
        .write_slice(line, vm_memory::GuestAddress(addr + HEADER_SIZE as u64))
        .expect("payload");
    d.send_chain(&[Desc::read(addr, (HEADER_SIZE + line.len()) as u32)]);
    assert_eq!(beats(&d.events(9009)), 2);
    assert_eq!(d.counters.snapshot().malformed_total(), 0);
}

#[test]
fn a_payload_split_over_several_descriptors_is_heard_and_credited() {
    // A nonlinear skb: header, then the payload in three pieces. Such packets used to be
    // dropped as bad_len, uncredited, so the guest ran out of credit after one window.
    let mut d = Driver::new(1024);
    connect(&mut d, 1000, 9009);
    let line = b"WATCHDOG=1\n";
    let chunk: Vec<u8> = line.iter().copied().cycle().take(11 * 372).collect();
    let h = HEADER_SIZE;
    let packets = (2 * BUF_ALLOC as usize).div_ceil(chunk.len());
    let mut heard = 0;
    for _ in 0..packets {
        let used = d.send_split(&rw(1000, 9009, &chunk), &chunk, &[h, h + 1000, h + 3000]);
        assert_eq!(used.len(), 1);
        heard += beats(&d.events(9009));
    }
    assert_eq!(heard as usize, packets * 372, "every line was heard");
    assert_eq!(d.counters.snapshot().malformed_total(), 0);
    let total = (packets * chunk.len()) as u32;
    assert!(total > 2 * BUF_ALLOC, "past two credit windows");
    assert_eq!(d.counters.snapshot().bytes_from_guest, u64::from(total));
    // Every byte was credited back to the guest.
    d.post_rx(64);
    d.send(&hdr(OP_CREDIT_REQUEST, 1000, 9009), &[]);
    let rx = d.take_rx();
    let last = rx.iter().rev().find(|(h, _)| h.op == OP_CREDIT_UPDATE);
    assert_eq!(last.map(|(h, _)| h.fwd_cnt), Some(total), "{rx:?}");
}

#[test]
fn every_payload_of_one_byte_or_more_is_a_heartbeat() {
    // Any input proves life: bytes that never complete a line count, one per packet,
    // however they are laid out; an empty OP_RW carries no input.
    let mut d = Driver::new(1024);
    connect(&mut d, 1000, 9009);
    for i in 0..20 {
        d.send(&rw(1000, 9009, b"x"), b"x");
        d.send_split(
            &rw(1000, 9009, b"yz"),
            b"yz",
            &[HEADER_SIZE - i % 3, HEADER_SIZE + 1],
        );
    }
    d.send(&rw(1000, 9009, b""), b"");
    assert_eq!(beats(&d.events(9009)), 40);
    assert_eq!(d.counters.snapshot().malformed_total(), 0);
}

#[test]
fn a_header_split_over_descriptors_is_read() {
    let mut d = Driver::new(16);
    connect(&mut d, 1000, 9009);
    let line = b"WATCHDOG=1\nWATCHDOG=1\n";
    d.send_split(&rw(1000, 9009, line), line, &[1, 20, 20, 43, 50]);
    assert_eq!(beats(&d.events(9009)), 2);
    assert_eq!(d.counters.snapshot().malformed_total(), 0);
}

#[test]
fn pulses_are_delivered_on_the_rx_queue() {
    let mut d = Driver::new(16);
    let (_conn, tx) = connect(&mut d, 1000, 9009);
    let pulse = Bytes::from(frame(PULSE.as_bytes()));
    tx.try_write(pulse.clone()).expect("queued");
    assert_eq!(d.wake.read().expect("the writer woke the device"), 1);
    let _ = d.wake.write(1);
    d.event(WAKE_EVENT);
    let rx = d.take_rx();
    assert_eq!(rx.len(), 1);
    let (h, data) = &rx[0];
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, 9009, 1000));
    assert_eq!(&data[..], &pulse[..]);
    let s = d.counters.snapshot();
    assert_eq!(s.bytes_to_guest, pulse.len() as u64);
}

#[test]
fn without_rx_buffers_packets_wait_and_go_when_buffers_arrive() {
    let mut d = Driver::new(16);
    d.send(&request(1000, 9009), &[]);
    d.send(&request(1001, 7777), &[]);
    assert!(d.take_rx().is_empty(), "no buffers yet");
    let Some(ChannelEvent::Connected { tx, .. }) = d.events(9009).pop() else {
        panic!("connected")
    };
    // The outbox is bounded: pulses queue up to its limit, then Full.
    for _ in 0..OUTBOX_MAX_CHUNKS {
        tx.try_write(Bytes::from_static(b"pulse")).expect("queued");
    }
    assert_eq!(
        tx.try_write(Bytes::from_static(b"pulse")),
        Err(TryWriteError::Full)
    );
    d.event(WAKE_EVENT);
    assert!(d.take_rx().is_empty());
    d.kick_rx(2);
    let rx = d.take_rx();
    let ops: Vec<u16> = rx.iter().map(|(h, _)| h.op).collect();
    assert_eq!(
        ops,
        vec![OP_RST, OP_RESPONSE],
        "control first, then the connection"
    );
    d.kick_rx(64);
    let payload: usize = d
        .take_rx()
        .iter()
        .filter(|(h, _)| h.op == OP_RW)
        .map(|(_, b)| b.len())
        .sum();
    assert_eq!(payload, OUTBOX_MAX_CHUNKS * 5);
    tx.try_write(Bytes::from_static(b"pulse"))
        .expect("room again");
}
