//! Credit both ways: updates awd owes the guest, and pulses held to the guest's window.

use super::*;

#[test]
fn a_credit_request_gets_a_credit_update() {
    let mut d = Driver::new(16);
    connect(&mut d, 1000, 9009);
    d.send(&rw(1000, 9009, b"WATCHDOG=1\n"), b"WATCHDOG=1\n");
    d.send(&hdr(OP_CREDIT_REQUEST, 1000, 9009), &[]);
    let rx = d.take_rx();
    assert_eq!(rx.len(), 1);
    let h = rx[0].0;
    assert_eq!(
        (h.op, h.buf_alloc, h.fwd_cnt),
        (OP_CREDIT_UPDATE, BUF_ALLOC, 11)
    );
    assert_eq!(d.counters.snapshot().credit_updates_sent, 1);
}

#[test]
fn a_pulse_waits_for_guest_credit_and_asks_for_it_once() {
    let mut d = Driver::new(16);
    d.post_rx(8);
    let no_room = Header {
        buf_alloc: 0,
        ..request(1000, 9009)
    };
    d.send(&no_room, &[]);
    assert_eq!(d.take_rx()[0].0.op, OP_RESPONSE);
    let Some(ChannelEvent::Connected { tx, .. }) = d.events(9009).pop() else {
        panic!("connected")
    };
    tx.try_write(Bytes::from_static(b"0123456789abcdef"))
        .expect("queued");
    d.event(WAKE_EVENT);
    let rx = d.take_rx();
    assert_eq!(rx.len(), 1, "only a credit request, no payload: {rx:?}");
    assert_eq!(rx[0].0.op, OP_CREDIT_REQUEST);
    d.event(WAKE_EVENT);
    assert!(d.take_rx().is_empty(), "asked once, then waits");
    // A guest that answers with a still-closed window is not asked again (no ping-pong).
    let closed = Header {
        buf_alloc: 0,
        ..hdr(OP_CREDIT_UPDATE, 1000, 9009)
    };
    d.send(&closed, &[]);
    assert!(d.take_rx().is_empty(), "no second credit request");
    // The guest opens a 10-byte window: 10 bytes go, the rest waits.
    let update = Header {
        buf_alloc: 10,
        ..hdr(OP_CREDIT_UPDATE, 1000, 9009)
    };
    d.send(&update, &[]);
    let rx = d.take_rx();
    let sent: Vec<_> = rx.iter().filter(|(h, _)| h.op == OP_RW).collect();
    assert_eq!(sent.len(), 1, "{rx:?}");
    assert_eq!(&sent[0].1[..], b"0123456789");
    // The guest consumed them and has room again.
    let update = Header {
        buf_alloc: 10,
        fwd_cnt: 10,
        ..hdr(OP_CREDIT_UPDATE, 1000, 9009)
    };
    d.send(&update, &[]);
    let rx = d.take_rx();
    let rest: Vec<u8> = rx
        .iter()
        .filter(|(h, _)| h.op == OP_RW)
        .flat_map(|(_, b)| b.clone())
        .collect();
    assert_eq!(&rest[..], b"abcdef");
}

#[test]
fn credit_updates_keep_a_well_behaved_guest_going_far_past_one_window() {
    let mut d = Driver::new(1024);
    connect(&mut d, 1000, 9009);
    // The guest side of the credit protocol, as Linux does it.
    let (mut peer_buf_alloc, mut peer_fwd_cnt, mut tx_cnt) = (BUF_ALLOC, 0u32, 0u32);
    let line = b"WATCHDOG=1\n";
    let chunk: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(line.len() * 372)
        .collect();
    let total_target = 1 << 20;
    let (mut sent, mut updates, mut heard) = (0usize, 0, 0u32);
    d.post_rx(64);
    while sent < total_target {
        let credit = peer_buf_alloc - tx_cnt.wrapping_sub(peer_fwd_cnt);
        let n = chunk.len().min(credit as usize);
        if n < chunk.len() {
            // Out of credit: the device must already have said it consumed more.
            let rx = d.take_rx();
            let update = rx.iter().rev().find(|(h, _)| h.op == OP_CREDIT_UPDATE);
            let Some((h, _)) = update else {
                panic!("the guest stalled after {sent} bytes: no credit update");
            };
            updates += rx.iter().filter(|(h, _)| h.op == OP_CREDIT_UPDATE).count();
            (peer_buf_alloc, peer_fwd_cnt) = (h.buf_alloc, h.fwd_cnt);
            d.post_rx(rx.len());
            continue;
        }
        let h = rw(1000, 9009, &chunk);
        d.send(&h, &chunk);
        tx_cnt = tx_cnt.wrapping_add(n as u32);
        sent += n;
        heard += beats(&d.events(9009));
    }
    updates += d
        .take_rx()
        .iter()
        .filter(|(h, _)| h.op == OP_CREDIT_UPDATE)
        .count();
    assert_eq!(heard as usize, sent / line.len(), "every heartbeat arrived");
    // One update per quarter window, give or take the packet that crosses the line.
    let per_update = CREDIT_UPDATE_THRESHOLD as usize + chunk.len();
    assert!(
        updates + 1 >= sent / per_update,
        "{updates} credit updates for {sent} bytes"
    );
    assert!(sent > 16 * BUF_ALLOC as usize, "far past one window");
    assert_eq!(d.counters.snapshot().credit_updates_sent as usize, updates);
}
