//! The VM going away or starting over: frontend disconnects, stopped rings, guest reboots and
//! device resets.

use super::*;

#[test]
fn a_frontend_disconnect_drops_every_connection_but_leaves_the_timer_alone() {
    let mut d = Driver::new(16);
    let (a, tx) = connect(&mut d, 1000, 9009);
    let (b, _) = connect(&mut d, 1001, 9010);
    d.backend.frontend_gone(CloseReason::FrontendGone);
    let ea = d.events(9009);
    let eb = d.events(9010);
    assert!(
        matches!(&ea[..], [ChannelEvent::Disconnected { conn, reason }]
        if *conn == a && matches!(reason, CloseReason::FrontendGone))
    );
    assert!(matches!(&eb[..], [ChannelEvent::Disconnected { conn, .. }] if *conn == b));
    assert_eq!(
        tx.try_write(Bytes::from_static(b"x")),
        Err(TryWriteError::Closed)
    );
    assert_eq!(d.counters.snapshot().connections_open, 0);
    assert_eq!(d.watches[0].metrics.connections.get(), 0);
    // Without memory the device does nothing until the next frontend.
    d.queue_packet(&request(1000, 9009), &[]);
    d.event(TX_QUEUE);
    assert!(d.events(9009).is_empty());
}

#[test]
fn stopping_the_vrings_resets_connections() {
    let mut d = Driver::new(16);
    connect(&mut d, 1000, 9009);
    for q in 0..3 {
        d.backend.stop_vring(q).expect("ok");
    }
    let evs = d.events(9009);
    assert_eq!(evs.len(), 1);
    assert!(matches!(&evs[0], ChannelEvent::Disconnected { reason, .. }
        if matches!(reason, CloseReason::DeviceStopped)));
}

#[test]
fn a_guest_that_resets_the_device_started_over_and_a_resumed_one_did_not() {
    let mut d = Driver::new(16);
    connect(&mut d, 1000, 9009);
    d.send(&rw(1000, 9009, b"WATCHDOG=1\n"), b"WATCHDOG=1\n");
    d.events(9009);
    // A pause: the rings stop, then carry on where they were.
    d.stop_rings();
    d.start_rings(false);
    d.kick_rx(1);
    let evs = d.events(9009);
    assert!(started_over(&evs).is_empty(), "{evs:?}");
    assert!(
        matches!(&evs[..], [ChannelEvent::Disconnected { .. }]),
        "{evs:?}"
    );
    // A reboot: the rings stop, and the guest driver sets them up again from index 0.
    d.stop_rings();
    d.start_rings(true);
    assert!(d.events(9009).is_empty(), "nothing until the rings run");
    d.kick_rx(4);
    assert_eq!(
        started_over(&d.events(9009)),
        ["the guest reset the device"]
    );
    assert_eq!(
        started_over(&d.events(9010)),
        ["the guest reset the device"]
    );
    // Once: the rings running on are not a new start.
    connect(&mut d, 1000, 9009);
    d.send(&rw(1000, 9009, b"WATCHDOG=1\n"), b"WATCHDOG=1\n");
    assert!(started_over(&d.events(9009)).is_empty());
    // A reset of the whole device by the frontend also starts over.
    d.backend.reset_device();
    let evs = d.events(9009);
    assert!(
        matches!(evs[0], ChannelEvent::Disconnected { .. }),
        "{evs:?}"
    );
    assert_eq!(started_over(&evs), ["the device was reset"]);
}
