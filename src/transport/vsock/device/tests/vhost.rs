//! The vhost-user side: the config space, features, event-idx mode, and queues that are not set up.

use super::*;

#[test]
fn the_config_space_is_the_guest_cid() {
    let d = Driver::new(1);
    assert_eq!(d.backend.get_config(0, 8), GUEST_CID.to_le_bytes().to_vec());
    assert_eq!(d.backend.get_config(4, 8), vec![0, 0, 0, 0]);
    assert!(d.backend.get_config(9, 8).is_empty());
    assert!(d.backend.get_config(u32::MAX, u32::MAX).is_empty());
    assert_eq!(d.backend.num_queues(), 3);
    let f = d.backend.features();
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    let p = d.backend.protocol_features();
    assert!(p.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
}

#[test]
fn event_idx_mode_works_both_ways() {
    let mut d = Driver::new(16);
    d.backend.set_event_idx(true);
    for v in &d.vrings {
        v.set_queue_event_idx(true);
    }
    let (_c, tx) = connect(&mut d, 1000, 9009);
    d.send(&rw(1000, 9009, b"WATCHDOG=1\n"), b"WATCHDOG=1\n");
    assert_eq!(beats(&d.events(9009)), 1);
    tx.try_write(Bytes::from_static(b"pulse")).expect("queued");
    d.event(WAKE_EVENT);
    let rx = d.take_rx();
    assert_eq!(rx.iter().filter(|(h, _)| h.op == OP_RW).count(), 1);
}

#[test]
fn a_queue_that_is_not_ready_is_not_touched() {
    let mut d = Driver::new(16);
    d.vrings[usize::from(TX_QUEUE)].set_queue_ready(false);
    d.queue_packet(&request(1000, 9009), &[]);
    d.event(TX_QUEUE);
    assert_eq!(d.rings[usize::from(TX_QUEUE)].outstanding(&d.mem), 1);
    d.vrings[usize::from(TX_QUEUE)].set_queue_ready(true);
    d.event(TX_QUEUE);
    assert_eq!(d.rings[usize::from(TX_QUEUE)].outstanding(&d.mem), 0);
}
