//! The vsock device proper: a [`VhostUserBackendMut`] that terminates guest stream connections
//! to its configured ports and feeds each port's watchdog.
//!
//! Everything here runs on the vring worker thread that `vhost-user-backend` starts for each
//! QEMU frontend (and, between frontends, on the serving thread in `mod.rs`), under the
//! backend's lock. Nothing here blocks: events go to the watchdogs with `try_send`, and what
//! does not fit waits in a per-port backlog that a timerfd retries.
//!
//! The epoll tokens: 0 rx queue, 1 tx queue, 2 event queue, 3 reserved (exit), then
//! [`WAKE_EVENT`] (a watchdog queued bytes) and [`RETRY_EVENT`] (the backlog retry timer).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc::error::TrySendError;
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::VsockPort;
use super::conn::{Conn, Credit, Outbox, VsockWriter};
use super::packet::{
    HEADER_SIZE, HOST_CID, Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM, op_name,
};
use super::stats::{Malformed, VsockCounters};
use super::tx::read_tx_chain;
use crate::transport::ChannelContext;
use crate::transport::{ChannelEvent, ConnId, Intake, next_conn_id};
use crate::util::LogLimiter;

/// Guest memory as the vhost-user daemon hands it over.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap<()>>;

/// The rx queue (device → guest).
pub const RX_QUEUE: u16 = 0;
/// The tx queue (guest → device).
pub const TX_QUEUE: u16 = 1;
/// The event queue (unused: awd never migrates).
pub const EVENT_QUEUE: u16 = 2;
/// How many queues a virtio-vsock device has.
pub const NUM_QUEUES: usize = 3;
/// Epoll token of the eventfd the watchdogs' writers signal. Tokens up to `NUM_QUEUES` are
/// reserved by vhost-user-backend.
pub const WAKE_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Epoll token of the backlog retry timer.
pub const RETRY_EVENT: u16 = NUM_QUEUES as u16 + 2;
/// Largest queue the frontend may configure (QEMU uses 128 for vsock).
pub const MAX_QUEUE_SIZE: usize = 256;
/// Largest payload accepted in one tx packet (Linux sends at most 64 KiB), however many
/// descriptors it is spread over.
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// Most guest connections one device holds; further requests get OP_RST.
pub const MAX_CONNECTIONS: usize = 64;
/// Most control packets (resets) waiting for guest rx buffers; more are dropped and counted.
pub const MAX_CONTROL: usize = 256;
/// Most events waiting for one watchdog's full channel. Past it, signals are counted as
/// heartbeats instead and new connections to that port are refused; connection events are
/// never dropped.
pub const MAX_BACKLOG: usize = 1024;
/// How soon a full watchdog channel is retried.
pub const RETRY_DELAY: Duration = Duration::from_millis(10);
/// Rounds of "process, re-enable notifications, look again" per wake-up: a bound against a
/// guest whose ring indices make the queue look non-empty forever.
const MAX_ROUNDS: usize = 16;

const CLOSED_BY_PEER: &str = "closed by the peer";

/// One configured port and the events its watchdog has not taken yet.
#[derive(Debug)]
struct PortState {
    port: u32,
    ctx: ChannelContext,
    backlog: VecDeque<ChannelEvent>,
}

impl PortState {
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

/// The vhost-user vsock backend: configured ports, open connections, pending control packets.
pub struct VsockBackend {
    /// The socket path, for logs.
    device: Arc<str>,
    guest_cid: u64,
    ports: Vec<PortState>,
    conns: Vec<Conn>,
    /// Connection-less packets for the rx queue (resets), oldest first.
    control: VecDeque<Header>,
    mem: Option<Mem>,
    event_idx: bool,
    counters: Arc<VsockCounters>,
    wake: Arc<EventFd>,
    retry: TimerFd,
    retry_armed: bool,
    /// Reused for every tx payload.
    payload: Vec<u8>,
    /// Reused for every decode.
    events: Vec<ChannelEvent>,
    /// Where the next rx round-robin over connections starts.
    rr: usize,
    /// Logs about malformed input.
    limiter: LogLimiter,
    /// Logs about refused connections.
    refusals: LogLimiter,
    /// The rings were stopped (GET_VRING_BASE) while this frontend ran: when they run again,
    /// see whether the guest driver started from scratch (a reboot) or carried on (a pause).
    restart_check: bool,
}

impl std::fmt::Debug for VsockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockBackend")
            .field("device", &self.device)
            .field("guest_cid", &self.guest_cid)
            .field(
                "ports",
                &self.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            )
            .field("conns", &self.conns.len())
            .field("control", &self.control.len())
            .finish_non_exhaustive()
    }
}

impl VsockBackend {
    /// A device for `guest_cid` serving `ports`. `wake` is the eventfd the connections'
    /// writers signal; it and the retry timer are registered with each frontend's epoll loop.
    pub fn new(
        device: Arc<str>,
        guest_cid: u64,
        ports: Vec<VsockPort>,
        counters: Arc<VsockCounters>,
        wake: Arc<EventFd>,
    ) -> io::Result<Self> {
        let retry = TimerFd::new()?;
        set_nonblocking(retry.as_raw_fd())?;
        Ok(VsockBackend {
            device,
            guest_cid,
            ports: ports
                .into_iter()
                .map(|p| PortState {
                    port: p.port,
                    ctx: p.ctx,
                    backlog: VecDeque::new(),
                })
                .collect(),
            conns: Vec::with_capacity(MAX_CONNECTIONS),
            control: VecDeque::new(),
            mem: None,
            event_idx: false,
            counters,
            wake,
            retry,
            retry_armed: false,
            payload: vec![0; MAX_PKT_PAYLOAD as usize],
            events: Vec::new(),
            rr: 0,
            limiter: LogLimiter::new(5, Duration::from_secs(10)),
            refusals: LogLimiter::new(5, Duration::from_secs(10)),
            restart_check: false,
        })
    }

    /// The writers' eventfd, to register as [`WAKE_EVENT`].
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The retry timer, to register as [`RETRY_EVENT`].
    pub fn retry_fd(&self) -> RawFd {
        self.retry.as_raw_fd()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether some event still waits for a watchdog's channel.
    pub fn has_backlog(&self) -> bool {
        self.ports.iter().any(|p| !p.backlog.is_empty())
            || self.conns.iter().any(|c| c.pending_beats > 0)
    }

    /// The frontend went away (or awd is stopping): every connection is gone with it. The
    /// watchdogs hear `Disconnected`; their timers are not touched.
    pub fn frontend_gone(&mut self, reason: &str) {
        self.reset_connections(reason);
        self.mem = None;
        self.event_idx = false;
        self.restart_check = false;
        self.flush_events();
    }

    /// The VM behind the device started over: every port's watchdog hears
    /// [`ChannelEvent::StartedOver`] (after whatever is queued for it), so it re-enters its
    /// grace. Called when a frontend connects (a new QEMU, the first one included) and when the
    /// guest driver starts the device from scratch (a reboot).
    pub fn started_over(&mut self, reason: &str) {
        info!(
            device = &*self.device,
            reason, "the VM behind the vsock device started over"
        );
        for p in &mut self.ports {
            p.send_event(ChannelEvent::StartedOver {
                reason: reason.to_owned(),
            });
        }
        self.flush_events();
    }

    /// Makes `port` feed the watchdog behind `ctx` from now on (a reload gave the port to a new
    /// or replaced watchdog). Open connections stay open: the new watchdog hears `Connected`
    /// for each (with a writer for its pulses), then their heartbeats. Events still queued
    /// for the old watchdog are dropped: it is gone. Returns false if the device does not
    /// serve `port`.
    pub fn rebind(&mut self, port: u32, ctx: ChannelContext) -> bool {
        let Some(idx) = self.ports.iter().position(|p| p.port == port) else {
            return false;
        };
        let p = &mut self.ports[idx];
        if p.ctx.events.same_channel(&ctx.events) {
            return true;
        }
        let old = std::mem::replace(&mut p.ctx, ctx);
        p.backlog.clear();
        info!(
            device = &*self.device,
            port,
            watchdog = &*p.ctx.watchdog,
            channel = &*p.ctx.channel,
            previous = &*old.watchdog,
            "vsock port re-bound to a new watchdog"
        );
        for c in self.conns.iter_mut().filter(|c| c.port_idx == idx) {
            old.metrics.connections.dec();
            p.ctx.metrics.connections.inc();
            // A partial line is lost; what follows it still proves the guest alive.
            c.intake = Intake::new(
                p.ctx.watchdog.clone(),
                p.ctx.channel.clone(),
                p.ctx.metrics.clone(),
            )
            .with_rate_limit(p.ctx.rate_limit);
            let ev = ChannelEvent::Connected {
                conn: c.id,
                peer: peer_name(self.guest_cid, c.guest_port),
                tx: Box::new(VsockWriter::new(c.outbox.clone(), self.wake.clone())),
            };
            // Connected first; the heartbeats counted meanwhile follow it.
            let beats = std::mem::take(&mut c.pending_beats);
            p.send_ordered(c.id, &mut 0, ev, false);
            c.pending_beats = beats;
        }
        self.flush_events();
        true
    }

    /// After the rings were stopped, the first time both rx and tx run again: if the guest
    /// driver set them up from index 0 it initialised the device afresh (a guest reboot
    /// resets the virtio device); a VM resumed after a pause carries on from where its rings
    /// were. (A paused VM whose rings had never been used, or had wrapped to exactly 0, also
    /// counts as started over: it is booting, or the grace it gets is harmless.)
    fn check_restart(&mut self, vrings: &[VringRwLock]) {
        let (Some(rx), Some(tx)) = (
            vrings.get(usize::from(RX_QUEUE)),
            vrings.get(usize::from(TX_QUEUE)),
        ) else {
            return;
        };
        if !is_live(rx) || !is_live(tx) {
            return;
        }
        self.restart_check = false;
        let (rx_at, tx_at) = (rx.queue_next_avail(), tx.queue_next_avail());
        debug!(device = &*self.device, rx_at, tx_at, "the rings run again");
        if rx_at == 0 && tx_at == 0 {
            self.started_over("the guest reset the device");
        }
    }

    /// Closes every connection and forgets pending control packets.
    fn reset_connections(&mut self, reason: &str) {
        while !self.conns.is_empty() {
            self.close(self.conns.len() - 1, reason);
        }
        self.control.clear();
        self.rr = 0;
    }

    // ---- tx: guest → device ----

    fn process_tx(&mut self, vrings: &[VringRwLock]) {
        let Some(vring) = vrings.get(usize::from(TX_QUEUE)).filter(|v| is_live(v)) else {
            return;
        };
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return;
        };
        let mut used = false;
        for _ in 0..MAX_ROUNDS {
            // Errors here mean the ring addresses are outside guest memory; popping below
            // then finds nothing, so there is nothing more useful to do with them.
            let _ = vring.disable_notification();
            loop {
                let next = {
                    let mut state = vring.get_mut();
                    state.get_queue_mut().pop_descriptor_chain(mem.clone())
                };
                let Some(mut chain) = next else { break };
                let head = chain.head_index();
                self.on_tx_chain(&mem, &mut chain);
                if vring.add_used(head, 0).is_err() {
                    // A head index beyond the queue: it cannot be returned. Counted, skipped.
                    self.malformed(
                        Malformed::BadDescriptor,
                        format_args!("tx chain head {head} is outside the queue"),
                    );
                }
                used = true;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                _ => break,
            }
        }
        if used {
            notify(vring);
        }
    }

    fn on_tx_chain(&mut self, mem: &MemGuard, chain: &mut DescriptorChain<MemGuard>) {
        let mut payload = std::mem::take(&mut self.payload);
        let head = chain.head_index();
        match read_tx_chain(&**mem, head, chain, &mut payload) {
            Ok(pkt) => {
                // Only stream payload counts as received bytes; a control packet with a `len`
                // was read (to check it) and is ignored.
                let n = if pkt.header.op == OP_RW { pkt.len } else { 0 };
                self.counters.received(n);
                self.on_packet(&pkt.header, &payload[..n]);
            }
            Err(e) => {
                self.counters.received(0);
                self.malformed(e.reason(), format_args!("tx chain: {e}"));
            }
        }
        self.payload = payload;
    }

    /// Handles one well-formed tx packet.
    fn on_packet(&mut self, hdr: &Header, data: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            // Not addressed to us, or spoofed: there is nobody sensible to answer.
            let guest_cid = self.guest_cid;
            self.malformed(
                Malformed::BadCid,
                format_args!(
                    "{} from cid {} to cid {} (expected {} to {HOST_CID})",
                    op_name(hdr.op),
                    hdr.src_cid,
                    hdr.dst_cid,
                    guest_cid
                ),
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.malformed(
                Malformed::BadType,
                format_args!(
                    "{} of socket type {} to port {} (only stream sockets are served)",
                    op_name(hdr.op),
                    hdr.type_,
                    hdr.dst_port
                ),
            );
            if hdr.op != OP_RST {
                self.queue_rst(hdr);
            }
            return;
        }
        let idx = self
            .conns
            .iter()
            .position(|c| c.guest_port == hdr.src_port && c.local_port == hdr.dst_port);
        if hdr.op == OP_REQUEST {
            self.on_request(hdr, idx);
            return;
        }
        let Some(i) = idx else {
            // Never answer a reset with a reset.
            if hdr.op == OP_RST {
                return;
            }
            let reason = match hdr.op {
                OP_RW | OP_SHUTDOWN | OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => {
                    Malformed::UnknownConnection
                }
                _ => Malformed::UnknownOp,
            };
            self.malformed(
                reason,
                format_args!(
                    "{} (op {}) for port {} from guest port {} with no connection",
                    op_name(hdr.op),
                    hdr.op,
                    hdr.dst_port,
                    hdr.src_port
                ),
            );
            self.queue_rst(hdr);
            return;
        };
        let c = &mut self.conns[i];
        c.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt);
        match hdr.op {
            OP_RW => {
                if data.is_empty() {
                    return;
                }
                c.intake.feed(c.id, data, &mut self.events);
                // The payload is consumed at once; the guest learns it from the next header.
                let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                if c.credit.consumed(n) {
                    c.need_credit_update = true;
                }
                self.route_events(i);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => c.need_credit_update = true,
            OP_SHUTDOWN => {
                self.close(i, CLOSED_BY_PEER);
                self.queue_rst(hdr);
            }
            OP_RST => self.close(i, "reset by the peer"),
            _ => self.malformed(
                Malformed::UnknownOp,
                format_args!(
                    "{} (op {}) on a connection to port {}, dropped",
                    op_name(hdr.op),
                    hdr.op,
                    hdr.dst_port
                ),
            ),
        }
    }

    fn on_request(&mut self, hdr: &Header, existing: Option<usize>) {
        let Some(port_idx) = self.ports.iter().position(|p| p.port == hdr.dst_port) else {
            self.refuse(hdr, "no watchdog listens on that port");
            return;
        };
        if let Some(i) = existing {
            // The guest forgot the old connection (it rebooted while we did not see it).
            self.close(i, "replaced by a new connection from the same guest port");
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.refuse(hdr, "too many open connections");
            return;
        }
        if self.ports[port_idx].backlog.len() >= MAX_BACKLOG {
            self.refuse(hdr, "the watchdog is not keeping up");
            return;
        }
        let port = &mut self.ports[port_idx];
        let id = next_conn_id();
        let outbox = Arc::new(Outbox::default());
        let mut credit = Credit::default();
        credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt);
        let mut conn = Conn {
            id,
            port_idx,
            guest_port: hdr.src_port,
            local_port: hdr.dst_port,
            intake: Intake::new(
                port.ctx.watchdog.clone(),
                port.ctx.channel.clone(),
                port.ctx.metrics.clone(),
            )
            .with_rate_limit(port.ctx.rate_limit),
            outbox: outbox.clone(),
            credit,
            need_response: true,
            need_credit_update: false,
            credit_requested: false,
            pending_beats: 0,
        };
        let peer = peer_name(self.guest_cid, hdr.src_port);
        info!(watchdog = &*port.ctx.watchdog, channel = &*port.ctx.channel, conn = id, %peer,
            port = hdr.dst_port, "connected");
        port.ctx.metrics.connections.inc();
        self.counters.opened();
        let ev = ChannelEvent::Connected {
            conn: id,
            peer,
            tx: Box::new(VsockWriter::new(outbox, self.wake.clone())),
        };
        port.send_ordered(id, &mut conn.pending_beats, ev, false);
        self.conns.push(conn);
    }

    fn refuse(&mut self, hdr: &Header, why: &str) {
        self.counters.refused();
        if let Some(suppressed) = self.refusals.allow(Instant::now()) {
            info!(device = &*self.device, port = hdr.dst_port, peer = %peer_name(self.guest_cid, hdr.src_port),
                suppressed, "refused a guest connection: {why}");
        }
        self.queue_rst(hdr);
    }

    /// Closes connection `i`: the watchdog hears `Disconnected` (after anything still queued
    /// for it) and its writer starts answering `Closed`.
    fn close(&mut self, i: usize, reason: &str) {
        if i >= self.conns.len() {
            return;
        }
        let mut c = self.conns.swap_remove(i);
        c.outbox.close();
        let reason = if reason == CLOSED_BY_PEER && c.intake.is_mid_message() {
            "closed by the peer mid-message"
        } else {
            reason
        };
        let port = &mut self.ports[c.port_idx];
        port.ctx.metrics.connections.dec();
        self.counters.closed();
        info!(watchdog = &*port.ctx.watchdog, channel = &*port.ctx.channel, conn = c.id,
            peer = %peer_name(self.guest_cid, c.guest_port), "disconnected: {reason}");
        let ev = ChannelEvent::Disconnected {
            conn: c.id,
            reason: reason.to_owned(),
        };
        port.send_ordered(c.id, &mut c.pending_beats, ev, false);
    }

    /// Delivers what the last `Intake::feed` decoded for connection `i`. Plain heartbeats are
    /// only counted here: [`flush_events`](Self::flush_events), at the end of each wake-up,
    /// hands them over as one event per connection, so a burst of small packets costs the
    /// watchdog one wake-up rather than one per packet.
    fn route_events(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let port = &mut self.ports[c.port_idx];
        for ev in self.events.drain(..) {
            match ev {
                ChannelEvent::Heartbeats { count, .. } => {
                    c.pending_beats = c.pending_beats.saturating_add(count);
                }
                ev => {
                    if !port.send_ordered(c.id, &mut c.pending_beats, ev, true) {
                        // Still proof of life: keep it as a heartbeat.
                        c.pending_beats = c.pending_beats.saturating_add(1);
                        self.counters.event_dropped();
                        if let Some(suppressed) = self.limiter.allow(Instant::now()) {
                            warn!(
                                watchdog = &*port.ctx.watchdog,
                                channel = &*port.ctx.channel,
                                conn = c.id,
                                suppressed,
                                "the watchdog is not keeping up: a message was counted as a heartbeat"
                            );
                        }
                    }
                }
            }
        }
    }

    fn queue_rst(&mut self, hdr: &Header) {
        if self.control.len() >= MAX_CONTROL {
            self.counters.control_dropped();
            return;
        }
        self.control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: hdr.type_,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    fn malformed(&mut self, r: Malformed, detail: std::fmt::Arguments<'_>) {
        self.counters.malformed(r);
        if let Some(suppressed) = self.limiter.allow(Instant::now()) {
            warn!(
                device = &*self.device,
                reason = r.as_str(),
                suppressed,
                "dropped malformed guest input: {detail}"
            );
        }
    }

    // ---- rx: device → guest ----

    fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || self.conns.iter().any(Conn::has_rx_work)
    }

    fn process_rx(&mut self, vrings: &[VringRwLock]) {
        if !self.has_rx_work() {
            return;
        }
        let Some(vring) = vrings.get(usize::from(RX_QUEUE)).filter(|v| is_live(v)) else {
            return;
        };
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return;
        };
        let mut used = false;
        let mut rounds = 0;
        while self.has_rx_work() {
            let next = {
                let mut state = vring.get_mut();
                state.get_queue_mut().pop_descriptor_chain(mem.clone())
            };
            let Some(mut chain) = next else {
                // Out of buffers: ask the guest to kick when it adds some, and look once more
                // in case it just did.
                rounds += 1;
                match vring.enable_notification() {
                    Ok(true) if rounds < MAX_ROUNDS => continue,
                    _ => break,
                }
            };
            let head = chain.head_index();
            let len = self.fill_rx(&mem, &mut chain);
            if vring.add_used(head, len).is_err() {
                self.malformed(
                    Malformed::BadDescriptor,
                    format_args!("rx chain head {head} is outside the queue"),
                );
            }
            used = true;
        }
        if used {
            notify(vring);
        }
    }

    /// Writes the next pending packet into an rx chain; returns the bytes written (0 when the
    /// chain is unusable, which returns it to the guest empty).
    fn fill_rx(&mut self, mem: &MemGuard, chain: &mut DescriptorChain<MemGuard>) -> u32 {
        let mut pkt = match VsockPacket::from_rx_virtq_chain(&**mem, chain, MAX_PKT_PAYLOAD) {
            Ok(p) => p,
            Err(e) => {
                self.malformed(Malformed::RxBuffer, format_args!("rx chain: {e}"));
                return 0;
            }
        };
        let room = pkt.data_slice().map_or(0, |d| d.len());
        let Some((hdr, data)) = self.next_rx_packet(room) else {
            // Only payload was pending and this buffer has no room for any.
            self.malformed(
                Malformed::RxBuffer,
                format_args!("rx chain has no room for payload"),
            );
            return 0;
        };
        let n = data.as_ref().map_or(0, Bytes::len);
        if let (Some(d), Some(slice)) = (&data, pkt.data_slice()) {
            slice.copy_from(&d[..]);
        }
        if let Err(e) = pkt.set_header_from_raw(&hdr.encode()) {
            self.malformed(Malformed::RxBuffer, format_args!("rx header: {e}"));
            return 0;
        }
        match hdr.op {
            OP_RST => self.counters.reset_sent(),
            OP_CREDIT_UPDATE => self.counters.credit_update_sent(),
            _ => {}
        }
        self.counters.sent(n);
        debug!(
            device = &*self.device,
            op = op_name(hdr.op),
            port = hdr.src_port,
            guest_port = hdr.dst_port,
            len = n,
            "to guest"
        );
        // HEADER_SIZE + n <= 44 + 64 KiB.
        (HEADER_SIZE + n) as u32
    }

    /// Chooses (and consumes) the next packet for the guest: resets first, then each
    /// connection in turn. `room` is the payload space of the buffer at hand.
    fn next_rx_packet(&mut self, room: usize) -> Option<(Header, Option<Bytes>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, None));
        }
        let n = self.conns.len();
        for k in 0..n {
            let i = (self.rr + k) % n;
            if let Some(p) = self.conn_rx_packet(i, room) {
                self.rr = (i + 1) % n;
                return Some(p);
            }
        }
        None
    }

    fn conn_rx_packet(&mut self, i: usize, room: usize) -> Option<(Header, Option<Bytes>)> {
        let c = &mut self.conns[i];
        let mut data = None;
        let op = if c.need_response {
            c.need_response = false;
            OP_RESPONSE
        } else if !c.outbox.is_empty() && c.credit.peer_free() > 0 && room > 0 {
            let max = room.min(c.credit.peer_free() as usize);
            let b = c.outbox.take(max)?;
            // max <= peer_free, a u32.
            c.credit.sent(b.len() as u32);
            // The window opened: a later stall may ask again.
            c.credit_requested = false;
            data = Some(b);
            OP_RW
        } else if !c.outbox.is_empty() && c.credit.peer_free() == 0 && !c.credit_requested {
            c.credit_requested = true;
            OP_CREDIT_REQUEST
        } else if c.need_credit_update {
            OP_CREDIT_UPDATE
        } else {
            return None;
        };
        // Every header carries our window, so any packet is also a credit update.
        let (buf_alloc, fwd_cnt) = c.credit.stamp();
        c.need_credit_update = false;
        let hdr = Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: c.local_port,
            dst_port: c.guest_port,
            len: data.as_ref().map_or(0, |d| d.len() as u32),
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        };
        Some((hdr, data))
    }

    // ---- events to the watchdogs ----

    /// Retries everything waiting for the watchdogs' channels; arms the retry timer if some
    /// of it still does not fit.
    pub fn flush_events(&mut self) {
        for p in &mut self.ports {
            p.drain_backlog();
        }
        for c in &mut self.conns {
            self.ports[c.port_idx].send_beats(c.id, &mut c.pending_beats);
        }
        if self.has_backlog() && !self.retry_armed && self.retry.reset(RETRY_DELAY, None).is_ok() {
            self.retry_armed = true;
        }
    }
}

impl VhostUserBackendMut for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.guest_cid.to_le_bytes();
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn update_memory(&mut self, mem: Mem) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A fresh pair per frontend: each one gets its own worker thread to stop.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!(
                    device = &*self.device,
                    "cannot create the worker exit event: {e}"
                );
                None
            }
        }
    }

    fn reset_device(&mut self) {
        // VHOST_USER_RESET_DEVICE: the frontend reset the device as a whole.
        self.reset_connections("the device was reset");
        self.restart_check = false;
        self.started_over("the device was reset");
    }

    fn stop_vring(&mut self, _queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the VM stopped the device (guest reboot, VM stop, shutdown). The
        // guest driver starts from scratch afterwards, so its old connections are gone.
        self.restart_check = true;
        if !self.conns.is_empty() || !self.control.is_empty() {
            self.reset_connections("the guest stopped the device");
            self.flush_events();
        }
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if self.restart_check {
            self.check_restart(vrings);
        }
        match device_event {
            TX_QUEUE => self.process_tx(vrings),
            WAKE_EVENT => {
                let _ = self.wake.read();
            }
            // Non-blocking: a stale readiness (timer re-armed meanwhile) reads nothing.
            RETRY_EVENT if self.retry.wait().is_ok() => self.retry_armed = false,
            // RX_QUEUE: new rx buffers, used below. EVENT_QUEUE: never used.
            _ => {}
        }
        self.process_rx(vrings);
        self.flush_events();
        // Never an error: an error would stop the worker thread and with it every port.
        Ok(())
    }
}

/// Whether a queue is set up and enabled. Touching a queue that is not (its ring addresses
/// are still zero) would write notification flags into guest page 0.
fn is_live(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// Tells the guest about used descriptors, if it wants to know.
fn notify(vring: &VringRwLock) {
    if vring.needs_notification().unwrap_or(true) {
        // The call eventfd is QEMU's; if it is gone, so is the frontend.
        let _ = vring.signal_used_queue();
    }
}

fn peer_name(cid: u64, port: u32) -> String {
    format!("vsock:{cid}:{port}")
}

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
    use super::super::conn::{BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, OUTBOX_MAX_CHUNKS};
    use super::super::test_driver::*;
    use super::*;
    use crate::protocol::{PULSE, frame};
    use crate::transport::{ConnWriter, Signal, TryWriteError};
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

    fn beats(evs: &[ChannelEvent]) -> u32 {
        evs.iter()
            .map(|e| match e {
                ChannelEvent::Heartbeats { count, .. } => *count,
                _ => 0,
            })
            .sum()
    }

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
            ChannelEvent::Signal { signal: Signal::Status(s), .. } if &**s == "hello"
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
        let addr = header_at(&mut d, &rw(1000, 9009, line));
        d.mem
            .write_slice(line, vm_memory::GuestAddress(addr + HEADER_SIZE as u64))
            .expect("payload");
        send_chain(
            &mut d,
            &[Desc {
                addr,
                len: (HEADER_SIZE + line.len()) as u32,
                write: false,
            }],
        );
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
                if *c == conn && reason == "closed by the peer mid-message"),
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
                if *c == conn && reason == "reset by the peer"),
            "{evs:?}"
        );
        // A reset for nothing is ignored, not counted.
        d.send(&hdr(OP_RST, 1000, 9009), &[]);
        assert!(d.take_rx().is_empty());
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

    /// Sends a tx chain, runs the device, and checks it came back used with length 0.
    fn send_chain(d: &mut Driver, descs: &[Desc]) {
        let head = d.push_tx(descs);
        d.event(TX_QUEUE);
        let used = d.rings[usize::from(TX_QUEUE)].used(&d.mem);
        assert_eq!(used, vec![(u32::from(head), 0)], "the chain was returned");
    }

    /// Writes `h` into the buffer of the next tx chain head; data may go at +0x100.
    fn header_at(d: &mut Driver, h: &Header) -> u64 {
        let addr = d.rings[usize::from(TX_QUEUE)].next_buffer();
        d.mem
            .write_slice(&h.encode(), vm_memory::GuestAddress(addr))
            .expect("header");
        addr
    }

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

    #[test]
    fn a_short_header_is_dropped_and_counted() {
        let mut d = Driver::new(16);
        let addr = header_at(&mut d, &request(1, 9009));
        send_chain(
            &mut d,
            &[Desc {
                addr,
                len: 20,
                write: false,
            }],
        );
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
        let addr = header_at(&mut d, &lie);
        // Header plus a 10-byte data descriptor.
        send_chain(
            &mut d,
            &[
                Desc {
                    addr,
                    len: HEADER_SIZE as u32,
                    write: false,
                },
                Desc {
                    addr: addr + 0x100,
                    len: 10,
                    write: false,
                },
            ],
        );
        // Header only.
        send_chain(
            &mut d,
            &[Desc {
                addr,
                len: HEADER_SIZE as u32,
                write: false,
            }],
        );
        // More than any packet may carry.
        let huge = Header {
            len: 1 << 20,
            ..rw(1000, 9009, b"")
        };
        let addr = header_at(&mut d, &huge);
        send_chain(
            &mut d,
            &[
                Desc {
                    addr,
                    len: HEADER_SIZE as u32,
                    write: false,
                },
                Desc {
                    addr: addr + 0x100,
                    len: 1 << 20,
                    write: false,
                },
            ],
        );
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
        let addr = header_at(&mut d, &request(1000, 9009));
        send_chain(
            &mut d,
            &[Desc {
                addr,
                len: HEADER_SIZE as u32,
                write: true,
            }],
        );
        let payload = rw(1000, 9009, b"WATCHDOG=1\n");
        let addr = header_at(&mut d, &payload);
        send_chain(
            &mut d,
            &[
                Desc {
                    addr,
                    len: HEADER_SIZE as u32,
                    write: false,
                },
                Desc {
                    addr: addr + 0x100,
                    len: 11,
                    write: true,
                },
            ],
        );
        assert_malformed(&d, Malformed::WrongDirection, 2);
        // rx side: a read-only rx buffer is returned empty and the next one is used.
        let ring = &mut d.rings[usize::from(RX_QUEUE)];
        ring.push(
            &d.mem,
            &[Desc {
                addr: 0x40_0000,
                len: 4096,
                write: false,
            }],
        );
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
        send_chain(
            &mut d,
            &[Desc {
                addr: 1 << 40,
                len: HEADER_SIZE as u32,
                write: false,
            }],
        );
        let addr = header_at(&mut d, &rw(1000, 9009, b"0123456789"));
        send_chain(
            &mut d,
            &[
                Desc {
                    addr,
                    len: HEADER_SIZE as u32,
                    write: false,
                },
                Desc {
                    addr: u64::MAX - 4,
                    len: 10,
                    write: false,
                },
            ],
        );
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
    fn a_frontend_disconnect_drops_every_connection_but_leaves_the_timer_alone() {
        let mut d = Driver::new(16);
        let (a, tx) = connect(&mut d, 1000, 9009);
        let (b, _) = connect(&mut d, 1001, 9010);
        d.backend.frontend_gone("QEMU disconnected");
        let ea = d.events(9009);
        let eb = d.events(9010);
        assert!(
            matches!(&ea[..], [ChannelEvent::Disconnected { conn, reason }]
            if *conn == a && reason == "QEMU disconnected")
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
            if reason == "the guest stopped the device"));
    }

    fn started_over(evs: &[ChannelEvent]) -> Vec<String> {
        evs.iter()
            .filter_map(|e| match e {
                ChannelEvent::StartedOver { reason } => Some(reason.clone()),
                _ => None,
            })
            .collect()
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
        assert!(
            matches!(rx.try_recv(), Ok(ChannelEvent::Disconnected { conn: c, .. }) if c == conn)
        );
        assert_eq!(wm.connections.get(), 0);
    }

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
}

#[cfg(test)]
mod proptests {
    //! Arbitrary guest input through the tx path. Run alone (the case count honours
    //! `PROPTEST_CASES`): `cargo test --lib proptest_tx_path`.
    use proptest::prelude::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::{Bytes as _, GuestAddress};

    use super::super::test_driver::*;
    use super::*;

    /// How a packet is laid out in descriptors.
    #[derive(Debug, Clone)]
    enum Layout {
        /// Header and payload in one descriptor of `HEADER_SIZE + payload + extra - short`.
        One { extra: u32, short: u32 },
        /// Header descriptor, data descriptor, each with an arbitrary length and direction.
        Two {
            head_len: u32,
            data_len: u32,
            head_write: bool,
            data_write: bool,
        },
        /// Header descriptor followed by the payload split over three descriptors.
        Split,
        /// Descriptors with arbitrary flags and links (loops, indirect, dangling).
        Raw(Vec<(u32, u16, u16)>),
        /// A header descriptor outside guest memory.
        Outside { addr: u64, len: u32 },
    }

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
            prop_oneof![Just(0u32), Just(BUF_ALLOC_), any::<u32>()],
            prop_oneof![Just(0u32), any::<u32>()],
        )
            .prop_map(
                |(
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
                )| {
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

    const BUF_ALLOC_: u32 = super::super::conn::BUF_ALLOC;

    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            "(WATCHDOG=1\n|STATUS=[a-z]{0,8}\n|WATCHDOG=trigger\n|x{0,20}){0,12}"
                .prop_map(String::into_bytes),
        ]
    }

    /// Writes the packet into the next tx slot's buffer and queues descriptors per `layout`.
    fn push(d: &mut Driver, h: &Header, payload: &[u8], layout: &Layout) {
        let base = d.rings[usize::from(TX_QUEUE)].next_buffer();
        d.mem
            .write_slice(&h.encode(), GuestAddress(base))
            .expect("header");
        let data = base + 0x100;
        d.mem
            .write_slice(payload, GuestAddress(data))
            .expect("payload");
        let ro = |addr, len| Desc {
            addr,
            len,
            write: false,
        };
        let n = payload.len() as u32;
        let ring = &mut d.rings[usize::from(TX_QUEUE)];
        match layout {
            Layout::One { extra, short } => {
                d.mem
                    .write_slice(payload, GuestAddress(base + HEADER_SIZE as u64))
                    .expect("payload");
                let len = (HEADER_SIZE as u32 + n + extra).saturating_sub(*short);
                ring.push(&d.mem, &[ro(base, len)]);
            }
            Layout::Two {
                head_len,
                data_len,
                head_write,
                data_write,
            } => {
                let descs = [
                    Desc {
                        addr: base,
                        len: *head_len,
                        write: *head_write,
                    },
                    Desc {
                        addr: data,
                        len: *data_len,
                        write: *data_write,
                    },
                ];
                ring.push(&d.mem, &descs);
            }
            Layout::Split => {
                let third = n / 3;
                ring.push(
                    &d.mem,
                    &[
                        ro(base, HEADER_SIZE as u32),
                        ro(data, third),
                        ro(data + u64::from(third), third),
                        ro(data + u64::from(2 * third), n - 2 * third),
                    ],
                );
            }
            Layout::Raw(descs) => {
                let raw: Vec<_> = descs
                    .iter()
                    .map(|&(len, flag_bits, next)| {
                        let mut flags = 0u16;
                        if flag_bits & 1 != 0 {
                            flags |= VRING_DESC_F_NEXT as u16;
                        }
                        if flag_bits & 2 != 0 {
                            flags |= VRING_DESC_F_WRITE as u16;
                        }
                        if flag_bits & 4 != 0 {
                            flags |= VRING_DESC_F_INDIRECT as u16;
                        }
                        (base, len, flags, next)
                    })
                    .collect();
                ring.push_raw(&d.mem, &raw);
            }
            Layout::Outside { addr, len } => {
                ring.push(
                    &d.mem,
                    &[Desc {
                        addr: *addr,
                        len: *len,
                        write: false,
                    }],
                );
            }
        }
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
                push(&mut d, h, p, l);
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
            d.backend.frontend_gone("test over");
            prop_assert_eq!(d.backend.connection_count(), 0);
            prop_assert_eq!(d.counters.snapshot().connections_open, 0);
        }
    }
}
