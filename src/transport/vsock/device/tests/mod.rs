//! The device driven as a guest driver drives it, through real virtqueues in guest memory
//! ([`Driver`]), one theme per file. Every test checks the device's effect on both sides: the
//! rx queue the guest reads and the events the watchdogs hear.

mod connect;
mod credit;
mod delivery;
mod hostile;
mod proptests;
mod reset;
mod rw;
mod vhost;

use super::super::limits::*;
use super::super::packet::*;
use super::super::test_driver::*;
use super::*;
use crate::protocol::{Message, PULSE, frame};
use crate::transport::{CloseReason, ConnId, ConnWriter, TryWriteError};
use bytes::Bytes;
use vm_memory::Bytes as _;

/// Connects guest port `gp` to host port `port`, with rx buffers posted; returns the
/// watchdog's writer for the connection.
fn connect(d: &mut Driver, gp: u32, port: u32) -> (ConnId, Box<dyn ConnWriter>) {
    d.post_rx(4);
    let used = d.send(&request(gp, port), &[]);
    assert_eq!(used.len(), 1);
    let rx = d.take_rx();
    assert_eq!(rx.len(), 1, "{rx:?}");
    assert_eq!(rx[0].0.op, OP_RESPONSE);
    match d.events(port).pop() {
        Some(ChannelEvent::Connected { conn, tx, .. }) => (conn, tx),
        other => panic!("expected Connected, got {other:?}"),
    }
}

/// Heartbeats in `evs`, all connections together.
fn beats(evs: &[ChannelEvent]) -> u32 {
    evs.iter()
        .map(|e| match e {
            ChannelEvent::Heartbeats { count, .. } => *count,
            _ => 0,
        })
        .sum()
}

/// Checks that `n` pieces of guest input were counted malformed for reason `r`.
fn assert_malformed(d: &Driver, r: Malformed, n: u64) {
    assert_eq!(d.counters.snapshot().malformed(r), n, "{r}");
}

/// After some bad input, the device still serves the other port normally.
fn assert_still_serving(d: &mut Driver) {
    d.post_rx(1);
    d.send(&request(4242, 9010), &[]);
    let rx = d.take_rx();
    assert_eq!(rx.last().map(|(h, _)| h.op), Some(OP_RESPONSE), "{rx:?}");
    assert!(matches!(
        d.events(9010).pop(),
        Some(ChannelEvent::Connected { .. })
    ));
}

/// The reasons of the `StartedOver` events in `evs`.
fn started_over(evs: &[ChannelEvent]) -> Vec<String> {
    evs.iter()
        .filter_map(|e| match e {
            ChannelEvent::StartedOver { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}
