//! Device → guest: what goes on the rx queue next.
//!
//! The guest posts empty rx buffers; each gets one packet. Control packets (resets for
//! requests refused and packets for no connection, at most [`MAX_CONTROL`] waiting) go first,
//! oldest first; then the connections take turns, round-robin, each with the first of what it
//! owes: OP_RESPONSE, payload the watchdog queued (as far as the guest's credit allows), one
//! OP_CREDIT_REQUEST when that credit runs out, or an OP_CREDIT_UPDATE. Every header carries
//! the connection's window, so any packet is also a credit update. Without buffers everything
//! waits, and the guest is asked to kick when it posts some.

use bytes::Bytes;
use tracing::debug;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestAddressSpace;

use super::super::conn::Conn;
use super::super::limits::{MAX_CONTROL, MAX_PKT_PAYLOAD, MAX_ROUNDS};
use super::super::packet::{
    HEADER_SIZE, HOST_CID, Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_RESPONSE, OP_RST, OP_RW,
    TYPE_STREAM, op_name,
};
use super::super::stats::Malformed;
use super::{MemGuard, RX_QUEUE, VsockBackend, is_live, notify};

impl VsockBackend {
    /// Queues an OP_RST answering `hdr` (a refused request, a packet for no connection);
    /// past [`MAX_CONTROL`] waiting, it is dropped and counted instead.
    pub(super) fn queue_rst(&mut self, hdr: &Header) {
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

    /// Whether anything waits to go to the guest.
    fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || self.conns.iter().any(Conn::has_rx_work)
    }

    /// Fills the guest's rx buffers with what waits for it, and tells it.
    pub(super) fn process_rx(&mut self, vrings: &[VringRwLock]) {
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

    /// The packet connection `i` owes the guest next, if any, given `room` payload bytes.
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
}
