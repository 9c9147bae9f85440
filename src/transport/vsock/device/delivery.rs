//! Handing events to the watchdogs: the only code in the device that sends on a watchdog's
//! channel.
//!
//! The device never blocks, so every event goes with `try_send`. What does not fit waits in
//! its port's backlog, in order, until [`Delivery::flush`] (at the end of every wake-up, and
//! from the retry timer while anything still waits) gets it through. A connection's plain
//! heartbeats are not queued one by one: the connection counts them (its `beats`), and they go
//! as one [`ChannelEvent::Heartbeats`] when nothing is queued before them, or take their place
//! in the backlog in front of the connection's next other event, so the watchdog always sees
//! the guest's order.
//!
//! Backpressure: once a port's backlog holds [`MAX_BACKLOG`] events, a connection's decoded
//! signals are counted as heartbeats instead (still proof of life), and [`Delivery::congested`]
//! tells the tx side to refuse new connections to that port. `Connected`, `Disconnected` and
//! `StartedOver` are never dropped. A closed channel (awd is stopping) swallows everything.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use tokio::sync::mpsc::error::TrySendError;
use vmm_sys_util::timerfd::TimerFd;

use super::super::VsockPort;
use super::super::limits::{MAX_BACKLOG, RETRY_DELAY};
use crate::transport::ChannelContext;
use crate::transport::{ChannelEvent, CloseReason, ConnId, ConnWriter};

/// One configured port and the events its watchdog has not taken yet.
#[derive(Debug)]
struct Port {
    port: u32,
    ctx: ChannelContext,
    backlog: VecDeque<ChannelEvent>,
}

impl Port {
    /// Hands `conn`'s coalesced heartbeats to the watchdog if nothing is queued before them.
    fn send_beats(&mut self, conn: ConnId, pending: &mut u32) {
        if *pending == 0 || !self.backlog.is_empty() {
            return;
        }
        match self.ctx.events.try_send(ChannelEvent::Heartbeats {
            conn,
            count: *pending,
        }) {
            Ok(()) | Err(TrySendError::Closed(_)) => *pending = 0,
            Err(TrySendError::Full(_)) => {}
        }
    }

    /// Sends `ev` (anything but heartbeats) for `conn`, after `conn`'s pending heartbeats and
    /// after everything already queued, so the watchdog sees the guest's order. Returns false
    /// when `droppable` and the backlog is full: the caller counts the drop.
    fn send_ordered(
        &mut self,
        conn: ConnId,
        pending: &mut u32,
        ev: ChannelEvent,
        droppable: bool,
    ) -> bool {
        self.send_beats(conn, pending);
        if droppable && self.backlog.len() >= MAX_BACKLOG {
            return false;
        }
        if *pending > 0 {
            let count = std::mem::take(pending);
            match self.backlog.back_mut() {
                Some(ChannelEvent::Heartbeats { conn: c, count: n }) if *c == conn => {
                    *n = n.saturating_add(count);
                }
                _ => self
                    .backlog
                    .push_back(ChannelEvent::Heartbeats { conn, count }),
            }
        }
        if !self.backlog.is_empty() {
            self.backlog.push_back(ev);
            return true;
        }
        match self.ctx.events.try_send(ev) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(ev)) => self.backlog.push_back(ev),
        }
        true
    }

    /// Sends a connection-less event (never dropped) after everything already queued.
    fn send_event(&mut self, ev: ChannelEvent) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(ev);
            return;
        }
        match self.ctx.events.try_send(ev) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(ev)) => self.backlog.push_back(ev),
        }
    }

    /// Sends queued events until the channel is full again.
    fn drain_backlog(&mut self) {
        while let Some(ev) = self.backlog.pop_front() {
            match self.ctx.events.try_send(ev) {
                Ok(()) => {}
                Err(TrySendError::Full(ev)) => {
                    self.backlog.push_front(ev);
                    return;
                }
                // The watchdog is gone (awd is stopping): nobody to tell.
                Err(TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    return;
                }
            }
        }
    }
}

/// The device's ports, their watchdogs, what waits for them, and the timer that retries it.
///
/// Ports are addressed by their index in the configured list (a connection's `port_idx`); a
/// connection is named by its id and its count of heartbeats not yet handed over, which stays
/// with the connection.
#[derive(Debug)]
pub(super) struct Delivery {
    ports: Vec<Port>,
    /// Fires [`RETRY_DELAY`] after a flush that left something waiting.
    retry: TimerFd,
    /// The timer is set and has not fired yet: a flush does not set it again.
    retry_armed: bool,
}

impl Delivery {
    /// Delivery to the watchdogs of `ports`, in their order.
    pub(super) fn new(ports: Vec<VsockPort>) -> io::Result<Self> {
        let retry = TimerFd::new()?;
        set_nonblocking(retry.as_raw_fd())?;
        Ok(Delivery {
            ports: ports
                .into_iter()
                .map(|p| Port {
                    port: p.port,
                    ctx: p.ctx,
                    backlog: VecDeque::new(),
                })
                .collect(),
            retry,
            retry_armed: false,
        })
    }

    /// The retry timer, for the epoll loop.
    pub(super) fn retry_fd(&self) -> RawFd {
        self.retry.as_raw_fd()
    }

    /// The port numbers served, in order.
    pub(super) fn ports(&self) -> impl Iterator<Item = u32> + '_ {
        self.ports.iter().map(|p| p.port)
    }

    /// The index of `port`, if it is served.
    pub(super) fn find(&self, port: u32) -> Option<usize> {
        self.ports.iter().position(|p| p.port == port)
    }

    /// The watchdog behind port `idx` (names for logs, metrics and limits for its intakes).
    pub(super) fn ctx(&self, idx: usize) -> &ChannelContext {
        &self.ports[idx].ctx
    }

    /// Whether port `idx`'s watchdog is so far behind that a new connection to it is refused.
    pub(super) fn congested(&self, idx: usize) -> bool {
        self.ports[idx].backlog.len() >= MAX_BACKLOG
    }

    /// Whether some port's backlog is not empty (connections' pending heartbeats aside).
    pub(super) fn has_backlog(&self) -> bool {
        self.ports.iter().any(|p| !p.backlog.is_empty())
    }

    /// Tells port `idx`'s watchdog that connection `conn` opened, after the heartbeats in
    /// `beats` and everything already queued.
    pub(super) fn connected(
        &mut self,
        idx: usize,
        conn: ConnId,
        beats: &mut u32,
        peer: String,
        tx: Box<dyn ConnWriter>,
    ) {
        let ev = ChannelEvent::Connected { conn, peer, tx };
        self.ports[idx].send_ordered(conn, beats, ev, false);
    }

    /// Tells port `idx`'s (new) watchdog about connection `conn`, already open, ahead of the
    /// heartbeats the connection has counted meanwhile: they are the new watchdog's now.
    pub(super) fn reconnected(
        &mut self,
        idx: usize,
        conn: ConnId,
        peer: String,
        tx: Box<dyn ConnWriter>,
    ) {
        let ev = ChannelEvent::Connected { conn, peer, tx };
        self.ports[idx].send_ordered(conn, &mut 0, ev, false);
    }

    /// Tells port `idx`'s watchdog that connection `conn` closed, after its heartbeats in
    /// `beats` and everything already queued.
    pub(super) fn disconnected(
        &mut self,
        idx: usize,
        conn: ConnId,
        beats: &mut u32,
        reason: CloseReason,
    ) {
        let ev = ChannelEvent::Disconnected { conn, reason };
        self.ports[idx].send_ordered(conn, beats, ev, false);
    }

    /// Delivers what one read of connection `conn` decoded. Plain heartbeats are only added
    /// to `beats`: [`flush`](Self::flush), at the end of each wake-up, hands them over as one
    /// event per connection, so a burst of small packets costs the watchdog one wake-up rather
    /// than one per packet. Returns how many other events the full backlog refused; each was
    /// counted in `beats` instead.
    pub(super) fn decoded(
        &mut self,
        idx: usize,
        conn: ConnId,
        beats: &mut u32,
        events: impl IntoIterator<Item = ChannelEvent>,
    ) -> u32 {
        let port = &mut self.ports[idx];
        let mut dropped = 0;
        for ev in events {
            match ev {
                ChannelEvent::Heartbeats { count, .. } => {
                    *beats = beats.saturating_add(count);
                }
                ev => {
                    if !port.send_ordered(conn, beats, ev, true) {
                        // Still proof of life: keep it as a heartbeat.
                        *beats = beats.saturating_add(1);
                        dropped += 1;
                    }
                }
            }
        }
        dropped
    }

    /// Tells every port's watchdog that the VM started over, after whatever is queued for it.
    pub(super) fn started_over(&mut self, reason: &str) {
        for p in &mut self.ports {
            p.send_event(ChannelEvent::StartedOver {
                reason: reason.to_owned(),
            });
        }
    }

    /// Makes port `idx` feed the watchdog behind `ctx`, dropping what was queued for the old
    /// one (it is gone). Returns the old watchdog's context, or `None` when `ctx` is the same
    /// channel (nothing changed).
    pub(super) fn rebind(&mut self, idx: usize, ctx: ChannelContext) -> Option<ChannelContext> {
        let p = &mut self.ports[idx];
        if p.ctx.events.same_channel(&ctx.events) {
            return None;
        }
        let old = std::mem::replace(&mut p.ctx, ctx);
        p.backlog.clear();
        Some(old)
    }

    /// Sends everything waiting: each port's backlog, then each connection's heartbeats
    /// (`conns`: port index, id and pending heartbeats of every open connection). Arms the
    /// retry timer if some of it still does not fit.
    pub(super) fn flush<'a>(
        &mut self,
        conns: impl IntoIterator<Item = (usize, ConnId, &'a mut u32)>,
    ) {
        for p in &mut self.ports {
            p.drain_backlog();
        }
        let mut beats_left = false;
        for (idx, conn, beats) in conns {
            self.ports[idx].send_beats(conn, beats);
            beats_left |= *beats > 0;
        }
        if (beats_left || self.has_backlog())
            && !self.retry_armed
            && self.retry.reset(RETRY_DELAY, None).is_ok()
        {
            self.retry_armed = true;
        }
    }

    /// The retry timer's descriptor was readable. Non-blocking: a stale readiness (the timer
    /// was re-armed meanwhile) reads nothing and leaves it armed.
    pub(super) fn retry_fired(&mut self) {
        if self.retry.wait().is_ok() {
            self.retry_armed = false;
        }
    }
}

/// Makes reads of `fd` return at once rather than wait.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::sync::mpsc;

    use super::*;
    use crate::metrics::Metrics;
    use crate::protocol::Message;

    /// A watchdog's context whose channel holds `cap` events, and the watchdog's end of it.
    fn ctx(name: &str, cap: usize) -> (ChannelContext, mpsc::Receiver<ChannelEvent>) {
        let (events, rx) = mpsc::channel(cap);
        let ctx = ChannelContext {
            watchdog: name.into(),
            channel: "c".into(),
            events,
            metrics: Metrics::new().watchdog(name, "c"),
            nodelay: false,
            rate_limit: None,
        };
        (ctx, rx)
    }

    /// Delivery to ports 9009, 9010, … whose channels hold `caps[i]` events each.
    fn delivery(caps: &[usize]) -> (Delivery, Vec<mpsc::Receiver<ChannelEvent>>) {
        let mut ports = Vec::new();
        let mut rxs = Vec::new();
        for (i, &cap) in caps.iter().enumerate() {
            let (ctx, rx) = ctx(&format!("w{i}"), cap);
            ports.push(VsockPort {
                port: 9009 + i as u32,
                ctx,
            });
            rxs.push(rx);
        }
        (Delivery::new(ports).expect("timerfd"), rxs)
    }

    fn writer() -> Box<dyn ConnWriter> {
        Box::new(mpsc::channel::<Bytes>(1).0)
    }

    fn status(conn: ConnId, s: &str) -> ChannelEvent {
        ChannelEvent::Signal {
            conn,
            signal: Message::Status(s.into()),
        }
    }

    fn beats(conn: ConnId, count: u32) -> ChannelEvent {
        ChannelEvent::Heartbeats { conn, count }
    }

    /// What the watchdog has been sent so far, one word per event.
    fn heard(rx: &mut mpsc::Receiver<ChannelEvent>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            out.push(match ev {
                ChannelEvent::Connected { conn, .. } => format!("connected {conn}"),
                ChannelEvent::Disconnected { conn, reason } => {
                    format!("disconnected {conn} {reason}")
                }
                ChannelEvent::Heartbeats { conn, count } => format!("beats {conn} {count}"),
                ChannelEvent::Signal { conn, .. } => format!("signal {conn}"),
                ChannelEvent::StartedOver { reason } => format!("started over {reason}"),
            });
        }
        out
    }

    /// Takes one event at a time from a channel of capacity 1, flushing in between, until
    /// nothing is left anywhere.
    fn drain_one_by_one(
        d: &mut Delivery,
        rx: &mut mpsc::Receiver<ChannelEvent>,
        conns: &mut [(usize, ConnId, u32)],
    ) -> Vec<String> {
        let mut got = Vec::new();
        for _ in 0..10_000 {
            got.extend(heard(rx));
            d.flush(conns.iter_mut().map(|(p, c, b)| (*p, *c, b)));
            if !d.has_backlog() && conns.iter().all(|c| c.2 == 0) && rx.is_empty() {
                break;
            }
        }
        got
    }

    #[test]
    fn with_room_in_the_channel_events_go_at_once_in_order() {
        let (mut d, mut rxs) = delivery(&[16, 16]);
        let mut b = 0;
        d.connected(0, 1, &mut b, "vsock:3:1000".into(), writer());
        let dropped = d.decoded(0, 1, &mut b, [beats(1, 2), status(1, "x"), beats(1, 1)]);
        assert_eq!(dropped, 0);
        assert_eq!(b, 1, "the last heartbeats wait for the flush");
        assert_eq!(heard(&mut rxs[0]), ["connected 1", "beats 1 2", "signal 1"]);
        d.flush([(0, 1, &mut b)]);
        assert_eq!(b, 0);
        assert_eq!(heard(&mut rxs[0]), ["beats 1 1"]);
        d.disconnected(0, 1, &mut b, CloseReason::PeerClosed);
        assert_eq!(heard(&mut rxs[0]), ["disconnected 1 closed by the peer"]);
        assert!(
            heard(&mut rxs[1]).is_empty(),
            "the other port hears nothing"
        );
        assert!(!d.has_backlog());
        assert!(!d.retry_armed, "nothing waits: no timer");
    }

    #[test]
    fn a_full_channel_keeps_the_guests_order_and_coalesces_heartbeats() {
        let (mut d, mut rxs) = delivery(&[1]);
        let (mut a, mut b) = (0, 0);
        d.connected(0, 1, &mut a, "a".into(), writer());
        // The channel is full from here on: everything waits, heartbeats add up.
        d.decoded(0, 1, &mut a, [beats(1, 2)]);
        d.decoded(0, 1, &mut a, [beats(1, 1), status(1, "x")]);
        d.connected(0, 2, &mut b, "b".into(), writer());
        d.decoded(0, 2, &mut b, [beats(2, 4)]);
        d.decoded(0, 1, &mut a, [beats(1, 1)]);
        d.decoded(0, 1, &mut a, [beats(1, 1)]);
        d.disconnected(0, 1, &mut a, CloseReason::PeerReset);
        assert!(d.has_backlog());
        let mut conns = [(0, 2, b)];
        let got = drain_one_by_one(&mut d, &mut rxs[0], &mut conns);
        assert_eq!(
            got,
            [
                "connected 1",
                "beats 1 3",
                "signal 1",
                "connected 2",
                "beats 1 2",
                "disconnected 1 reset by the peer",
                "beats 2 4",
            ]
        );
    }

    #[test]
    fn past_the_backlog_signals_become_heartbeats_and_the_port_is_congested() {
        let (mut d, mut rxs) = delivery(&[1, 1]);
        let mut b = 0;
        d.connected(0, 1, &mut b, "a".into(), writer());
        let signals: Vec<_> = (0..MAX_BACKLOG + 5).map(|_| status(1, "x")).collect();
        assert_eq!(d.decoded(0, 1, &mut b, signals), 5);
        assert_eq!(b, 5, "each refused signal still counts as proof of life");
        assert!(d.congested(0));
        assert!(!d.congested(1), "only that port");
        // Connection events and start-overs are never refused.
        d.disconnected(0, 1, &mut b, CloseReason::PeerReset);
        d.started_over("reboot");
        assert_eq!(b, 0);
        let got = drain_one_by_one(&mut d, &mut rxs[0], &mut []);
        assert_eq!(
            got.len(),
            1 + MAX_BACKLOG + 3,
            "{:?}",
            &got[got.len() - 4..]
        );
        assert_eq!(got.iter().filter(|e| *e == "signal 1").count(), MAX_BACKLOG);
        assert_eq!(
            &got[got.len() - 3..],
            [
                "beats 1 5",
                "disconnected 1 reset by the peer",
                "started over reboot"
            ]
        );
        assert!(!d.congested(0));
        assert_eq!(heard(&mut rxs[1]), ["started over reboot"]);
    }

    #[test]
    fn started_over_reaches_every_port_behind_what_is_queued() {
        let (mut d, mut rxs) = delivery(&[1, 4]);
        let mut b = 0;
        d.connected(0, 1, &mut b, "a".into(), writer());
        d.decoded(0, 1, &mut b, [status(1, "x")]);
        d.started_over("new QEMU");
        assert_eq!(heard(&mut rxs[1]), ["started over new QEMU"]);
        let got = drain_one_by_one(&mut d, &mut rxs[0], &mut []);
        assert_eq!(got, ["connected 1", "signal 1", "started over new QEMU"]);
    }

    #[test]
    fn a_closed_channel_swallows_everything() {
        let (mut d, mut rxs) = delivery(&[1]);
        let mut b = 0;
        d.connected(0, 1, &mut b, "a".into(), writer());
        d.decoded(0, 1, &mut b, [beats(1, 1), status(1, "x")]);
        assert!(d.has_backlog());
        // The watchdog goes (awd is stopping): what waits is dropped, nothing is retried.
        rxs.clear();
        d.flush([(0, 1, &mut b)]);
        assert!(!d.has_backlog());
        d.decoded(0, 1, &mut b, [beats(1, 3), status(1, "y")]);
        d.disconnected(0, 1, &mut b, CloseReason::PeerReset);
        d.started_over("reboot");
        d.flush([(0, 1, &mut b)]);
        assert_eq!(b, 0);
        assert!(!d.has_backlog());
    }

    #[test]
    fn the_retry_timer_is_armed_once_while_anything_waits() {
        let (mut d, mut rxs) = delivery(&[1]);
        let mut b = 0;
        d.connected(0, 1, &mut b, "a".into(), writer());
        d.decoded(0, 1, &mut b, [beats(1, 1)]);
        d.flush([(0, 1, &mut b)]);
        assert_eq!(b, 1, "the channel is full");
        assert!(d.retry_armed);
        // A readiness seen before the timer expired (it was re-armed meanwhile) reads nothing.
        d.retry_fired();
        assert!(d.retry_armed, "not fired yet");
        std::thread::sleep(RETRY_DELAY + Duration::from_millis(20));
        d.retry_fired();
        assert!(!d.retry_armed);
        // Still full: the next flush arms it again; once through, it stays unarmed.
        d.flush([(0, 1, &mut b)]);
        assert!(d.retry_armed);
        assert_eq!(heard(&mut rxs[0]), ["connected 1"]);
        d.flush([(0, 1, &mut b)]);
        assert_eq!((b, heard(&mut rxs[0]).len()), (0, 1));
        std::thread::sleep(RETRY_DELAY + Duration::from_millis(20));
        d.retry_fired();
        d.flush([(0, 1, &mut b)]);
        assert!(!d.retry_armed, "nothing waits");
    }

    #[test]
    fn rebinding_drops_the_old_queue_and_the_new_watchdog_hears_connected_first() {
        let (mut d, mut rxs) = delivery(&[1]);
        let mut b = 0;
        d.connected(0, 1, &mut b, "a".into(), writer());
        d.decoded(0, 1, &mut b, [status(1, "x")]);
        // The same channel again changes nothing.
        let same = d.ctx(0).clone();
        assert!(d.rebind(0, same).is_none());
        assert!(d.has_backlog());
        let (new, mut new_rx) = ctx("renamed", 4);
        let old = d.rebind(0, new).expect("a new watchdog");
        assert_eq!(&*old.watchdog, "w0");
        assert_eq!(&*d.ctx(0).watchdog, "renamed");
        assert!(!d.has_backlog(), "the old watchdog's queue is gone with it");
        // Heartbeats counted before the rebind follow the new Connected.
        d.decoded(0, 1, &mut b, [beats(1, 2)]);
        d.reconnected(0, 1, "a".into(), writer());
        assert_eq!(b, 2);
        d.flush([(0, 1, &mut b)]);
        assert_eq!(heard(&mut new_rx), ["connected 1", "beats 1 2"]);
        assert_eq!(heard(&mut rxs[0]), ["connected 1"]);
    }

    #[test]
    fn ports_are_found_by_number() {
        let (d, _rxs) = delivery(&[1, 1, 1]);
        assert_eq!(d.ports().collect::<Vec<_>>(), [9009, 9010, 9011]);
        assert_eq!(d.find(9010), Some(1));
        assert_eq!(d.find(7777), None);
    }
}
