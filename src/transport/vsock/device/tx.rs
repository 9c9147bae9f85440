//! Guest → device: packets off the tx queue, and what each one does to its connection.
//!
//! A tx chain is read into the device's own buffer ([`read_tx_chain`]), then checked: only
//! stream packets from the guest's CID to the host reach a connection. Per connection:
//!
//! | guest sends | awd |
//! |---|---|
//! | OP_REQUEST to a served port | opens a connection, owes OP_RESPONSE, the watchdog hears `Connected` |
//! | OP_REQUEST to another port, or past a limit | OP_RST |
//! | OP_RW | feeds the payload to the connection's intake, credits it at once |
//! | OP_CREDIT_REQUEST | owes OP_CREDIT_UPDATE |
//! | OP_CREDIT_UPDATE | (every header updates the guest's window) |
//! | OP_SHUTDOWN | closes, OP_RST |
//! | OP_RST | closes, no reply |
//! | anything for no connection | OP_RST (never to an OP_RST) |
//!
//! What awd owes the guest is queued here and sent by [`super::rx`]; what the watchdog hears
//! goes through [`super::delivery`].

use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::GuestAddressSpace;

use super::super::conn::{Conn, Credit, Outbox, VsockWriter};
use super::super::limits::{MAX_CONNECTIONS, MAX_ROUNDS};
use super::super::packet::{
    HOST_CID, Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RST, OP_RW, OP_SHUTDOWN,
    TYPE_STREAM, op_name,
};
use super::super::stats::Malformed;
use super::super::tx::read_tx_chain;
use super::{MemGuard, TX_QUEUE, VsockBackend, is_live, notify, peer_name};
use crate::transport::{CloseReason, Intake, next_conn_id};

impl VsockBackend {
    /// Handles every chain the guest has made available on the tx queue, and tells it.
    pub(super) fn process_tx(&mut self, vrings: &[VringRwLock]) {
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

    /// Reads one tx chain and handles the packet in it, or counts why there is none.
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
                self.close(i, CloseReason::PeerClosed);
                self.queue_rst(hdr);
            }
            OP_RST => self.close(i, CloseReason::PeerReset),
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

    /// Opens a connection for an OP_REQUEST, or refuses it. `existing` is a connection
    /// already open between the same two ports.
    fn on_request(&mut self, hdr: &Header, existing: Option<usize>) {
        let Some(port_idx) = self.delivery.find(hdr.dst_port) else {
            self.refuse(hdr, "no watchdog listens on that port");
            return;
        };
        if let Some(i) = existing {
            // The guest forgot the old connection (it rebooted while we did not see it).
            self.close(i, CloseReason::Replaced);
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.refuse(hdr, "too many open connections");
            return;
        }
        if self.delivery.congested(port_idx) {
            self.refuse(hdr, "the watchdog is not keeping up");
            return;
        }
        let ctx = self.delivery.ctx(port_idx);
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
                ctx.watchdog.clone(),
                ctx.channel.clone(),
                ctx.metrics.clone(),
            )
            .with_rate_limit(ctx.rate_limit),
            outbox: outbox.clone(),
            credit,
            need_response: true,
            need_credit_update: false,
            credit_requested: false,
            pending_beats: 0,
        };
        let peer = peer_name(self.guest_cid, hdr.src_port);
        info!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, conn = id, %peer,
            port = hdr.dst_port, "connected");
        ctx.metrics.connections.inc();
        self.counters.opened();
        let tx = Box::new(VsockWriter::new(outbox, self.wake.clone()));
        self.delivery
            .connected(port_idx, id, &mut conn.pending_beats, peer, tx);
        self.conns.push(conn);
    }

    /// Refuses a connection request with OP_RST, counted and logged (rate-limited).
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
    pub(super) fn close(&mut self, i: usize, reason: CloseReason) {
        if i >= self.conns.len() {
            return;
        }
        let mut c = self.conns.swap_remove(i);
        c.outbox.close();
        let reason = match reason {
            CloseReason::PeerClosed if c.intake.is_mid_message() => {
                CloseReason::PeerClosedMidMessage
            }
            reason => reason,
        };
        let ctx = self.delivery.ctx(c.port_idx);
        ctx.metrics.connections.dec();
        self.counters.closed();
        info!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, conn = c.id,
            peer = %peer_name(self.guest_cid, c.guest_port), "disconnected: {reason}");
        self.delivery
            .disconnected(c.port_idx, c.id, &mut c.pending_beats, reason);
    }

    /// Hands what the last `Intake::feed` decoded for connection `i` to its watchdog; what a
    /// congested watchdog could not take is counted and logged (rate-limited).
    fn route_events(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let dropped = self.delivery.decoded(
            c.port_idx,
            c.id,
            &mut c.pending_beats,
            self.events.drain(..),
        );
        for _ in 0..dropped {
            self.counters.event_dropped();
            if let Some(suppressed) = self.limiter.allow(Instant::now()) {
                let ctx = self.delivery.ctx(c.port_idx);
                warn!(
                    watchdog = &*ctx.watchdog,
                    channel = &*ctx.channel,
                    conn = c.id,
                    suppressed,
                    "the watchdog is not keeping up: a message was counted as a heartbeat"
                );
            }
        }
    }
}
