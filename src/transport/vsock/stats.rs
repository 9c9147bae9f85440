//! Device-level counters: plain atomics the device thread bumps and anyone can read.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a guest packet or descriptor chain was dropped. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Malformed {
    /// A tx chain carries fewer bytes than the 44-byte header.
    ShortHeader,
    /// The header's `len` is larger than the payload the whole chain carries, or than 64 KiB.
    BadLen,
    /// A device-writable descriptor on the tx queue (or a read-only one on the rx queue).
    WrongDirection,
    /// A descriptor index or address outside the queue or guest memory, a chain that loops
    /// back on itself, or one with no usable descriptor.
    BadDescriptor,
    /// A socket type other than stream.
    BadType,
    /// A source CID other than the guest's, or a destination other than the host (2).
    BadCid,
    /// An op the host side does not accept (unknown, or OP_RESPONSE to a host that never
    /// connects to the guest).
    UnknownOp,
    /// A packet for a connection that does not exist.
    UnknownConnection,
    /// An rx buffer the device could not put a packet into (returned empty).
    RxBuffer,
}

impl Malformed {
    /// Every reason, indexed like the counters.
    pub const ALL: [Malformed; 9] = [
        Malformed::ShortHeader,
        Malformed::BadLen,
        Malformed::WrongDirection,
        Malformed::BadDescriptor,
        Malformed::BadType,
        Malformed::BadCid,
        Malformed::UnknownOp,
        Malformed::UnknownConnection,
        Malformed::RxBuffer,
    ];

    /// A stable snake_case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Malformed::ShortHeader => "short_header",
            Malformed::BadLen => "bad_len",
            Malformed::WrongDirection => "wrong_direction",
            Malformed::BadDescriptor => "bad_descriptor",
            Malformed::BadType => "bad_type",
            Malformed::BadCid => "bad_cid",
            Malformed::UnknownOp => "unknown_op",
            Malformed::UnknownConnection => "unknown_connection",
            Malformed::RxBuffer => "rx_buffer",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The live counters of one vsock device. Cheap to bump (one relaxed atomic add) and safe to
/// read from any thread; [`VsockCounters::snapshot`] copies them.
#[derive(Debug, Default)]
pub struct VsockCounters {
    frontends: AtomicU64,
    frontends_refused: AtomicU64,
    connections_opened: AtomicU64,
    connections_open: AtomicU64,
    connections_refused: AtomicU64,
    packets_from_guest: AtomicU64,
    packets_to_guest: AtomicU64,
    bytes_from_guest: AtomicU64,
    bytes_to_guest: AtomicU64,
    resets_sent: AtomicU64,
    credit_updates_sent: AtomicU64,
    events_dropped: AtomicU64,
    control_dropped: AtomicU64,
    malformed: [AtomicU64; 9],
}

/// A copy of a device's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// QEMU frontends served so far (each connect of QEMU to the socket).
    pub frontends: u64,
    /// QEMU connections closed at once because the process on the other end did not have
    /// the `peer-uid=`/`peer-gid=` the device asks for (`SO_PEERCRED`).
    pub frontends_refused: u64,
    /// Guest connections accepted, ever.
    pub connections_opened: u64,
    /// Guest connections open now.
    pub connections_open: u64,
    /// Connection requests answered with OP_RST (port not configured, connection limit, or
    /// a watchdog that is not keeping up).
    pub connections_refused: u64,
    /// Packets taken from the tx queue (well-formed or not).
    pub packets_from_guest: u64,
    /// Packets put on the rx queue.
    pub packets_to_guest: u64,
    /// Payload bytes received from the guest.
    pub bytes_from_guest: u64,
    /// Payload bytes sent to the guest (pulses).
    pub bytes_to_guest: u64,
    /// OP_RST packets sent.
    pub resets_sent: u64,
    /// OP_CREDIT_UPDATE packets sent.
    pub credit_updates_sent: u64,
    /// Signals dropped (counted as heartbeats instead) because a watchdog's channel stayed full.
    pub events_dropped: u64,
    /// Control packets (OP_RST) dropped because the guest posted no rx buffers for too long.
    pub control_dropped: u64,
    /// Malformed input, indexed like [`Malformed::ALL`].
    pub malformed: [u64; 9],
}

impl VsockStats {
    /// The count of malformed input for one reason.
    pub fn malformed(&self, r: Malformed) -> u64 {
        self.malformed[r.index()]
    }

    /// All malformed input, any reason.
    pub fn malformed_total(&self) -> u64 {
        self.malformed.iter().sum()
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

impl VsockCounters {
    /// Copies every counter.
    pub fn snapshot(&self) -> VsockStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VsockStats {
            frontends: g(&self.frontends),
            frontends_refused: g(&self.frontends_refused),
            connections_opened: g(&self.connections_opened),
            connections_open: g(&self.connections_open),
            connections_refused: g(&self.connections_refused),
            packets_from_guest: g(&self.packets_from_guest),
            packets_to_guest: g(&self.packets_to_guest),
            bytes_from_guest: g(&self.bytes_from_guest),
            bytes_to_guest: g(&self.bytes_to_guest),
            resets_sent: g(&self.resets_sent),
            credit_updates_sent: g(&self.credit_updates_sent),
            events_dropped: g(&self.events_dropped),
            control_dropped: g(&self.control_dropped),
            malformed: std::array::from_fn(|i| g(&self.malformed[i])),
        }
    }

    pub(crate) fn frontend(&self) {
        inc(&self.frontends);
    }

    pub(crate) fn frontend_refused(&self) {
        inc(&self.frontends_refused);
    }

    pub(crate) fn opened(&self) {
        inc(&self.connections_opened);
        inc(&self.connections_open);
    }

    pub(crate) fn closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self) {
        inc(&self.connections_refused);
    }

    pub(crate) fn received(&self, payload: usize) {
        inc(&self.packets_from_guest);
        self.bytes_from_guest
            .fetch_add(payload as u64, Ordering::Relaxed);
    }

    pub(crate) fn sent(&self, payload: usize) {
        inc(&self.packets_to_guest);
        self.bytes_to_guest
            .fetch_add(payload as u64, Ordering::Relaxed);
    }

    pub(crate) fn reset_sent(&self) {
        inc(&self.resets_sent);
    }

    pub(crate) fn credit_update_sent(&self) {
        inc(&self.credit_updates_sent);
    }

    pub(crate) fn event_dropped(&self) {
        inc(&self.events_dropped);
    }

    pub(crate) fn control_dropped(&self) {
        inc(&self.control_dropped);
    }

    pub(crate) fn malformed(&self, r: Malformed) {
        inc(&self.malformed[r.index()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_counter() {
        let c = VsockCounters::default();
        for (i, r) in Malformed::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            for _ in 0..=i {
                c.malformed(*r);
            }
        }
        let s = c.snapshot();
        for (i, r) in Malformed::ALL.iter().enumerate() {
            assert_eq!(s.malformed(*r), i as u64 + 1, "{r}");
        }
        assert_eq!(s.malformed_total(), (1..=9).sum::<u64>());
    }

    #[test]
    fn open_connections_go_up_and_down() {
        let c = VsockCounters::default();
        c.opened();
        c.opened();
        c.closed();
        let s = c.snapshot();
        assert_eq!((s.connections_opened, s.connections_open), (2, 1));
    }
}
