//! The vsock device proper: a [`VhostUserBackendMut`] that terminates guest stream connections
//! to its configured ports and feeds each port's watchdog.
//!
//! Everything here runs on the vring worker thread that `vhost-user-backend` starts for each
//! QEMU frontend (and, between frontends, on the serving thread in `mod.rs`), under the
//! backend's lock. Nothing here blocks: events go to the watchdogs with `try_send`, and what
//! does not fit waits in a per-port backlog that a timerfd retries.
//!
//! This file holds the backend's state, its lifecycle (frontends coming and going, the guest
//! starting over, reloads re-binding ports) and the vhost-user trait, which only dispatches to
//! the parts that do the work, one job each:
//!
//! | file | job |
//! |---|---|
//! | `tx.rs` | guest packets off the tx queue, and each connection's state: request, response, payload, credit, shutdown, reset |
//! | `rx.rs` | what goes to the guest next on the rx queue: resets first, then each connection's response, payload, credit messages in turn |
//! | `delivery.rs` | the only code that talks to the watchdogs: events in the guest's order, coalesced heartbeats, the backlog of a full channel and its retry timer |
//!
//! The epoll tokens: 0 rx queue, 1 tx queue, 2 event queue, 3 reserved (exit), then
//! [`WAKE_EVENT`] (a watchdog queued bytes) and [`RETRY_EVENT`] (the backlog retry timer).

mod delivery;
mod rx;
#[cfg(test)]
mod tests;
mod tx;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::eventfd::EventFd;

use self::delivery::Delivery;
use super::VsockPort;
use super::conn::{Conn, VsockWriter};
use super::limits::{LOG_BURST, LOG_PERIOD, MAX_CONNECTIONS, MAX_PKT_PAYLOAD, MAX_QUEUE_SIZE};
use super::packet::Header;
use super::stats::{Malformed, VsockCounters};
use crate::transport::ChannelContext;
use crate::transport::{ChannelEvent, CloseReason, Intake};
use crate::util::LogLimiter;

/// Guest memory as the vhost-user daemon hands it over.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
/// A snapshot of guest memory, held while one queue is processed.
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

/// The vhost-user vsock backend: configured ports, open connections, pending control packets.
pub struct VsockBackend {
    /// The socket path, for logs.
    device: Arc<str>,
    /// The guest's CID: the only source accepted, the destination of every rx packet.
    guest_cid: u64,
    /// The ports' watchdogs, and everything on its way to them.
    delivery: Delivery,
    /// Open connections, in no particular order (closing one swaps the last into its place).
    conns: Vec<Conn>,
    /// Connection-less packets for the rx queue (resets), oldest first.
    control: VecDeque<Header>,
    /// Guest memory, from the frontend's SET_MEM_TABLE; none between frontends.
    mem: Option<Mem>,
    /// The frontend is not admitted yet (its credentials are being checked): no queue is
    /// touched, no heartbeat delivered.
    held: bool,
    /// A tx kick arrived while held: the queue is read once admitted.
    missed_tx: bool,
    /// Whether the frontend negotiated VIRTIO_RING_F_EVENT_IDX.
    event_idx: bool,
    /// The device's counters, shared with the metrics exporter.
    counters: Arc<VsockCounters>,
    /// The eventfd the connections' writers signal when they queue bytes for the guest.
    wake: Arc<EventFd>,
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
            .field("ports", &self.delivery.ports().collect::<Vec<_>>())
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
        Ok(VsockBackend {
            device,
            guest_cid,
            delivery: Delivery::new(ports)?,
            conns: Vec::with_capacity(MAX_CONNECTIONS),
            control: VecDeque::new(),
            mem: None,
            held: false,
            missed_tx: false,
            event_idx: false,
            counters,
            wake,
            payload: vec![0; MAX_PKT_PAYLOAD as usize],
            events: Vec::new(),
            rr: 0,
            limiter: LogLimiter::new(LOG_BURST, LOG_PERIOD),
            refusals: LogLimiter::new(LOG_BURST, LOG_PERIOD),
            restart_check: false,
        })
    }

    /// The writers' eventfd, to register as [`WAKE_EVENT`].
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The retry timer, to register as [`RETRY_EVENT`].
    pub fn retry_fd(&self) -> RawFd {
        self.delivery.retry_fd()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether some event still waits for a watchdog's channel.
    pub fn has_backlog(&self) -> bool {
        self.delivery.has_backlog() || self.conns.iter().any(|c| c.pending_beats > 0)
    }

    /// The frontend went away (or awd is stopping): every connection is gone with it. The
    /// watchdogs hear `Disconnected`; their timers are not touched.
    pub fn frontend_gone(&mut self, reason: CloseReason) {
        self.held = false;
        self.missed_tx = false;
        self.reset_connections(reason);
        self.mem = None;
        self.event_idx = false;
        self.restart_check = false;
        self.flush_events();
    }

    /// Serves nothing until [`VsockBackend::admit`]: the next frontend's credentials are
    /// checked once it is accepted, and until then its kicks are only noted.
    pub fn hold(&mut self) {
        self.held = true;
    }

    /// The held frontend passed its check: serve it, starting with any tx kick it sent
    /// meanwhile (the worker is woken to read the queue).
    pub fn admit(&mut self) {
        self.held = false;
        let _ = self.wake.write(1);
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
        self.delivery.started_over(reason);
        self.flush_events();
    }

    /// Makes `port` feed the watchdog behind `ctx` from now on (a reload gave the port to a new
    /// or replaced watchdog). Open connections stay open: the new watchdog hears `Connected`
    /// for each (with a writer for its pulses), then their heartbeats. Events still queued
    /// for the old watchdog are dropped: it is gone. Returns false if the device does not
    /// serve `port`.
    pub fn rebind(&mut self, port: u32, ctx: ChannelContext) -> bool {
        let Some(idx) = self.delivery.find(port) else {
            return false;
        };
        let Some(old) = self.delivery.rebind(idx, ctx) else {
            return true;
        };
        let new = self.delivery.ctx(idx);
        info!(
            device = &*self.device,
            port,
            watchdog = &*new.watchdog,
            channel = &*new.channel,
            previous = &*old.watchdog,
            "vsock port re-bound to a new watchdog"
        );
        for c in self.conns.iter_mut().filter(|c| c.port_idx == idx) {
            let new = self.delivery.ctx(idx);
            old.metrics.connections.dec();
            new.metrics.connections.inc();
            // A partial line is lost; what follows it still proves the guest alive.
            c.intake = Intake::new(
                new.watchdog.clone(),
                new.channel.clone(),
                new.metrics.clone(),
            )
            .with_rate_limit(new.rate_limit);
            // Connected first; the heartbeats counted meanwhile follow it.
            self.delivery.reconnected(
                idx,
                c.id,
                peer_name(self.guest_cid, c.guest_port),
                Box::new(VsockWriter::new(c.outbox.clone(), self.wake.clone())),
            );
        }
        self.flush_events();
        true
    }

    /// Retries everything waiting for the watchdogs' channels; arms the retry timer if some
    /// of it still does not fit.
    pub fn flush_events(&mut self) {
        self.delivery.flush(
            self.conns
                .iter_mut()
                .map(|c| (c.port_idx, c.id, &mut c.pending_beats)),
        );
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
    fn reset_connections(&mut self, reason: CloseReason) {
        while !self.conns.is_empty() {
            self.close(self.conns.len() - 1, reason.clone());
        }
        self.control.clear();
        self.rr = 0;
    }

    /// Counts a piece of malformed guest input and logs it (rate-limited).
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
        self.reset_connections(CloseReason::DeviceReset);
        self.restart_check = false;
        self.started_over("the device was reset");
    }

    fn stop_vring(&mut self, _queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the VM stopped the device (guest reboot, VM stop, shutdown). The
        // guest driver starts from scratch afterwards, so its old connections are gone.
        self.restart_check = true;
        if !self.conns.is_empty() || !self.control.is_empty() {
            self.reset_connections(CloseReason::DeviceStopped);
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
        if self.held {
            match device_event {
                TX_QUEUE => self.missed_tx = true,
                WAKE_EVENT => {
                    let _ = self.wake.read();
                }
                _ => {}
            }
            return Ok(());
        }
        if self.restart_check {
            self.check_restart(vrings);
        }
        match device_event {
            TX_QUEUE => self.process_tx(vrings),
            WAKE_EVENT => {
                let _ = self.wake.read();
                if std::mem::take(&mut self.missed_tx) {
                    self.process_tx(vrings);
                }
            }
            RETRY_EVENT => self.delivery.retry_fired(),
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

/// How a guest connection's peer is named in logs and `Connected` events.
fn peer_name(cid: u64, port: u32) -> String {
    format!("vsock:{cid}:{port}")
}
