//! One guest connection: its credit accounting, its decoder, and the bounded outbox the
//! watchdog writes pulses into.
//!
//! Credit works per direction. Whoever receives advertises `buf_alloc` (its buffer) and
//! `fwd_cnt` (bytes it has consumed, ever, wrapping) in every header it sends; the sender may
//! have at most `buf_alloc - (tx_cnt - fwd_cnt)` bytes in flight. awd consumes guest bytes the
//! moment they arrive, so it only has to *tell* the guest, often enough, that it did
//! ([`Credit::consumed`] says when); for pulses it must respect the guest's window
//! ([`Credit::peer_free`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::limits::{BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, OUTBOX_MAX_BYTES, OUTBOX_MAX_CHUNKS};
use crate::transport::{ConnId, ConnWriter, Intake, TryWriteError};

/// Both directions' credit counters of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Credit {
    /// Guest payload bytes awd has consumed (awd's `fwd_cnt`).
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard from awd.
    fwd_cnt_sent: u32,
    /// Payload bytes awd has sent to the guest.
    tx_cnt: u32,
    /// The guest's receive buffer, from its latest header.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed, from its latest header.
    peer_fwd_cnt: u32,
}

impl Credit {
    /// Records the guest's window from a header it sent.
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// How many payload bytes the guest can take now. A guest that reports having consumed
    /// more than was sent gets no credit rather than a wrapped, huge one.
    pub fn peer_free(&self) -> u32 {
        // A claim beyond what was sent wraps `in_flight` to a huge value: no credit.
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records `n` guest bytes consumed; true when a CREDIT_UPDATE is now due.
    pub fn consumed(&mut self, n: u32) -> bool {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
        self.unreported() >= CREDIT_UPDATE_THRESHOLD
    }

    /// Consumed bytes the guest has not heard about yet.
    pub fn unreported(&self) -> u32 {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent)
    }

    /// Records `n` payload bytes sent to the guest.
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// The (`buf_alloc`, `fwd_cnt`) to put in a header going to the guest now; from then on the
    /// guest knows about everything consumed so far.
    pub fn stamp(&mut self) -> (u32, u32) {
        self.fwd_cnt_sent = self.fwd_cnt;
        (BUF_ALLOC, self.fwd_cnt)
    }

    /// awd's `fwd_cnt`: guest payload bytes consumed, ever (wrapping).
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt
    }
}

#[derive(Debug, Default)]
struct OutboxInner {
    chunks: VecDeque<Bytes>,
    bytes: usize,
    closed: bool,
}

/// Bytes the watchdog queued for one connection, waiting for guest rx buffers and credit.
/// Shared between the watchdog's writer (any thread) and the device thread; the lock is only
/// held to push or pop a chunk.
#[derive(Debug, Default)]
pub struct Outbox {
    inner: Mutex<OutboxInner>,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, OutboxInner> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update is
        // a single push or pop), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `b`; returns whether the outbox was empty before (the device needs a wake-up).
    pub fn push(&self, b: Bytes) -> Result<bool, TryWriteError> {
        let mut g = self.lock();
        if g.closed {
            return Err(TryWriteError::Closed);
        }
        if g.chunks.len() >= OUTBOX_MAX_CHUNKS || g.bytes + b.len() > OUTBOX_MAX_BYTES {
            return Err(TryWriteError::Full);
        }
        let was_empty = g.chunks.is_empty();
        g.bytes += b.len();
        g.chunks.push_back(b);
        Ok(was_empty)
    }

    /// Takes up to `max` bytes from the front (the rest of a longer chunk stays queued).
    pub fn take(&self, max: usize) -> Option<Bytes> {
        if max == 0 {
            return None;
        }
        let mut g = self.lock();
        let mut front = g.chunks.pop_front()?;
        let out = if front.len() > max {
            let head = front.split_to(max);
            g.chunks.push_front(front);
            head
        } else {
            front
        };
        g.bytes -= out.len();
        Some(out)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().chunks.is_empty()
    }

    /// Bytes queued, all chunks together.
    pub fn len(&self) -> usize {
        self.lock().bytes
    }

    /// Refuses further writes and drops what is queued (the connection is gone).
    pub fn close(&self) {
        let mut g = self.lock();
        g.closed = true;
        g.chunks.clear();
        g.bytes = 0;
    }
}

/// The [`ConnWriter`] handed to the watchdog in `Connected`: queues into the connection's
/// outbox and wakes the device thread through its eventfd. Never blocks.
#[derive(Debug)]
pub struct VsockWriter {
    outbox: Arc<Outbox>,
    wake: Arc<EventFd>,
}

impl VsockWriter {
    /// A writer for `outbox` that signals `wake`.
    pub fn new(outbox: Arc<Outbox>, wake: Arc<EventFd>) -> Self {
        VsockWriter { outbox, wake }
    }
}

impl ConnWriter for VsockWriter {
    fn try_write(&self, bytes: Bytes) -> Result<(), TryWriteError> {
        if self.outbox.push(bytes)? {
            // A full eventfd counter (2^64 - 2 pending wake-ups) cannot happen in practice; the
            // device drains all outboxes on any wake-up anyway.
            let _ = self.wake.write(1);
        }
        Ok(())
    }
}

/// One open guest connection.
#[derive(Debug)]
pub struct Conn {
    /// Process-wide id, as the watchdog knows it.
    pub id: ConnId,
    /// Index of the port (watchdog) in the device's port list.
    pub port_idx: usize,
    /// The guest's port (its `src_port`).
    pub guest_port: u32,
    /// awd's port (the guest's `dst_port`).
    pub local_port: u32,
    /// Decodes what the guest sends.
    pub intake: Intake,
    /// What the watchdog wants sent.
    pub outbox: Arc<Outbox>,
    /// Both directions' credit counters.
    pub credit: Credit,
    /// An OP_RESPONSE is owed.
    pub need_response: bool,
    /// An OP_CREDIT_UPDATE is owed.
    pub need_credit_update: bool,
    /// An OP_CREDIT_REQUEST was sent for the current stall; no other is sent until the
    /// guest's window opens (else a guest whose reader is stuck would ping-pong with us).
    pub credit_requested: bool,
    /// Heartbeats decoded but not yet accepted by the watchdog's channel (coalesced).
    pub pending_beats: u32,
}

impl Conn {
    /// Whether this connection has a packet to send, given the rx buffer room it would get.
    pub fn has_rx_work(&self) -> bool {
        if self.need_response || self.need_credit_update {
            return true;
        }
        if self.outbox.is_empty() {
            return false;
        }
        self.credit.peer_free() > 0 || !self.credit_requested
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn a_credit_update_is_due_after_a_quarter_window() {
        let mut c = Credit::default();
        assert!(!c.consumed(CREDIT_UPDATE_THRESHOLD - 1));
        assert!(c.consumed(1));
        assert_eq!(c.stamp(), (BUF_ALLOC, CREDIT_UPDATE_THRESHOLD));
        assert_eq!(c.unreported(), 0);
        assert!(!c.consumed(10));
    }

    #[test]
    fn the_counters_wrap() {
        let mut c = Credit::default();
        c.consumed(u32::MAX);
        c.stamp();
        assert!(
            !c.consumed(2),
            "wrapping fwd_cnt is not a huge unreported count"
        );
        assert_eq!(c.fwd_cnt(), 1);
        c.sent(u32::MAX);
        c.update_peer(100, u32::MAX - 10);
        assert_eq!(c.peer_free(), 90);
        c.sent(5);
        assert_eq!(c.peer_free(), 85, "tx_cnt wrapped past zero");
    }

    #[test]
    fn peer_credit_is_never_inflated_by_a_lying_guest() {
        let mut c = Credit::default();
        c.sent(10);
        c.update_peer(100, 50); // claims to have consumed more than was sent
        assert_eq!(c.peer_free(), 0);
        c.update_peer(100, 10);
        assert_eq!(c.peer_free(), 100);
        c.update_peer(0, 10);
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn the_outbox_is_bounded_splits_and_closes() {
        let o = Outbox::default();
        assert_eq!(o.push(Bytes::from_static(b"abcdef")), Ok(true));
        assert_eq!(o.push(Bytes::from_static(b"gh")), Ok(false));
        assert_eq!(o.take(4).as_deref(), Some(&b"abcd"[..]));
        assert_eq!(o.len(), 4);
        assert_eq!(o.take(100).as_deref(), Some(&b"ef"[..]));
        assert_eq!(o.take(0), None);
        assert_eq!(o.take(100).as_deref(), Some(&b"gh"[..]));
        assert!(o.is_empty());
        assert_eq!(
            o.push(Bytes::from(vec![0u8; OUTBOX_MAX_BYTES + 1])),
            Err(TryWriteError::Full)
        );
        for _ in 0..OUTBOX_MAX_CHUNKS {
            o.push(Bytes::from_static(b"x")).expect("room");
        }
        assert_eq!(o.push(Bytes::from_static(b"x")), Err(TryWriteError::Full));
        o.close();
        assert!(o.is_empty());
        assert_eq!(o.push(Bytes::from_static(b"x")), Err(TryWriteError::Closed));
    }

    #[test]
    fn the_writer_wakes_the_device_once_per_empty_to_non_empty() {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let outbox = Arc::new(Outbox::default());
        let w = VsockWriter::new(outbox.clone(), wake.clone());
        w.try_write(Bytes::from_static(b"a")).expect("queued");
        w.try_write(Bytes::from_static(b"b")).expect("queued");
        assert_eq!(wake.read().expect("woken"), 1);
        outbox.close();
        assert_eq!(
            w.try_write(Bytes::from_static(b"c")),
            Err(TryWriteError::Closed)
        );
    }
}
