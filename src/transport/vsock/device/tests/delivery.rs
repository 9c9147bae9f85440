//! Events to the watchdogs through the whole device: full channels, the backlog, and ports re-bound
//! to new watchdogs (`device::delivery`'s own tests cover the same without virtqueues).

use super::*;

#[test]
fn a_full_watchdog_channel_coalesces_heartbeats_and_never_loses_connection_events() {
    let mut d = Driver::new(1);
    d.post_rx(4);
    d.send(&request(1000, 9009), &[]);
    // The channel (capacity 1) now holds Connected; everything else waits.
    for _ in 0..5 {
        d.send(&rw(1000, 9009, b"WATCHDOG=1\n"), b"WATCHDOG=1\n");
    }
    d.send(&rw(1000, 9009, b"STATUS=x\n"), b"STATUS=x\n");
    d.send(&rw(1000, 9009, b"WATCHDOG=1\n"), b"WATCHDOG=1\n");
    d.send(&hdr(OP_RST, 1000, 9009), &[]);
    assert!(d.backend.has_backlog());
    let mut got = Vec::new();
    for _ in 0..10 {
        got.extend(d.events(9009));
        d.event(RETRY_EVENT);
    }
    assert!(!d.backend.has_backlog());
    let kinds: Vec<String> = got
        .iter()
        .map(|e| match e {
            ChannelEvent::Connected { .. } => "connected".into(),
            ChannelEvent::Heartbeats { count, .. } => format!("beats {count}"),
            ChannelEvent::Signal { .. } => "signal".into(),
            ChannelEvent::Disconnected { .. } => "disconnected".into(),
            ChannelEvent::StartedOver { .. } => "started over".into(),
        })
        .collect();
    assert_eq!(
        kinds,
        ["connected", "beats 5", "signal", "beats 1", "disconnected"]
    );
}

#[test]
fn signals_beyond_the_backlog_become_heartbeats() {
    let mut d = Driver::new(1);
    d.post_rx(4);
    d.send(&request(1000, 9009), &[]);
    // Alternating kinds: a run of STATUS= lines in one read is one signal.
    let lines = "STATUS=x\nCHECKPOINT=c\n".repeat(MAX_BACKLOG + 10);
    for chunk in lines.as_bytes().chunks(4000) {
        d.send(&rw(1000, 9009, chunk), chunk);
    }
    assert!(d.counters.snapshot().events_dropped >= 10);
    // A new connection to the congested port is refused, others are not.
    d.send(&request(1001, 9009), &[]);
    assert_eq!(d.take_rx().last().map(|(h, _)| h.op), Some(OP_RST));
    assert_still_serving(&mut d);
    let mut n = 0u32;
    for _ in 0..3000 {
        for e in d.events(9009) {
            n += match e {
                ChannelEvent::Heartbeats { count, .. } => count,
                ChannelEvent::Signal { .. } => 1,
                _ => 0,
            };
        }
        d.event(RETRY_EVENT);
    }
    assert_eq!(
        n as usize,
        2 * (MAX_BACKLOG + 10),
        "every line was heard one way or another"
    );
}

#[test]
fn started_over_waits_behind_a_full_channel_and_is_never_dropped() {
    let mut d = Driver::new(1);
    d.backend.started_over("a new QEMU connected");
    d.backend.started_over("a new QEMU connected");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.extend(started_over(&d.events(9009)));
        got.extend(started_over(&d.events(9010)));
        d.event(RETRY_EVENT);
    }
    assert_eq!(got.len(), 4, "two for each port");
    assert!(!d.backend.has_backlog());
}

#[test]
fn rebinding_a_port_moves_its_connections_to_the_new_watchdog() {
    let mut d = Driver::new(16);
    let (conn, old_tx) = connect(&mut d, 1000, 9009);
    d.send(&rw(1000, 9009, b"WATCHDOG=1\nWATCH"), b"WATCHDOG=1\nWATCH");
    assert_eq!(beats(&d.events(9009)), 1);
    let metrics = crate::metrics::Metrics::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let wm = metrics.watchdog("renamed", "hb2");
    let ctx = ChannelContext {
        watchdog: "renamed".into(),
        channel: "hb2".into(),
        events: tx,
        metrics: wm.clone(),
        nodelay: false,
        rate_limit: None,
    };
    assert!(!d.backend.rebind(7777, ctx.clone()), "not a served port");
    assert!(d.backend.rebind(9009, ctx.clone()));
    let Ok(ChannelEvent::Connected {
        conn: c,
        peer,
        tx: new_tx,
    }) = rx.try_recv()
    else {
        panic!("the new watchdog hears the open connection")
    };
    assert_eq!((c, peer.as_str()), (conn, "vsock:3:1000"));
    assert_eq!(d.watches[0].metrics.connections.get(), 0);
    assert_eq!(wm.connections.get(), 1);
    // The guest heartbeats on: the new watchdog hears them, the old one nothing.
    d.send(&rw(1000, 9009, b"\nWATCHDOG=1\n"), b"\nWATCHDOG=1\n");
    let mut evs = Vec::new();
    while let Ok(e) = rx.try_recv() {
        evs.push(e);
    }
    assert!(beats(&evs) >= 1, "{evs:?}");
    assert!(d.events(9009).is_empty());
    // Pulses from the new watchdog reach the guest; so do the old writer's (same stream).
    new_tx.try_write(Bytes::from_static(b"p")).expect("queued");
    d.event(WAKE_EVENT);
    assert!(d.take_rx().iter().any(|(h, b)| h.op == OP_RW && b == b"p"));
    drop(old_tx);
    // Rebinding to the same channel again changes nothing.
    assert!(d.backend.rebind(9009, ctx));
    assert!(rx.try_recv().is_err());
    assert_eq!(wm.connections.get(), 1);
    // The connection's end goes to the new watchdog.
    d.send(&hdr(OP_RST, 1000, 9009), &[]);
    assert!(matches!(rx.try_recv(), Ok(ChannelEvent::Disconnected { conn: c, .. }) if c == conn));
    assert_eq!(wm.connections.get(), 0);
}
