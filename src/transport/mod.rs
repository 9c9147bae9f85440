//! Heartbeat channels: where input comes from, and where pulses go back.
//!
//! A transport owns its connections. It decodes what arrives with [`Intake`] and hands the
//! results to its watchdog as [`ChannelEvent`]s over a bounded channel; the watchdog never
//! touches a socket. Each connection registers a writer (`Connected::tx`) the watchdog uses for
//! pulses and pulse replies.

mod cidr;
mod endpoint;
pub mod limits;
pub mod psk;
pub mod socket;
pub mod vsock;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::metrics::WatchdogMetrics;
use crate::protocol::{Decoder, Message, Rejection};
use crate::util::LogLimiter;
pub use cidr::{Cidr, CidrError};
pub use endpoint::{Endpoint, PeerCred, SocketChardev, VsockChardev};

/// Identifies one connection of a channel, unique in the process.
pub type ConnId = u64;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A fresh connection id.
pub fn next_conn_id() -> ConnId {
    NEXT_CONN.fetch_add(1, Ordering::Relaxed)
}

/// Why a write to a connection was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryWriteError {
    /// The peer is not reading fast enough; the bytes were dropped.
    Full,
    /// The connection is gone.
    Closed,
}

/// The sending side of one connection, as the watchdog sees it: queue bytes without waiting.
/// Socket connections use a tokio channel drained by a writer task; the vsock device has its
/// own queue drained by its epoll thread.
pub trait ConnWriter: Send + Sync + std::fmt::Debug {
    /// Queues `bytes` for the peer, or says why not. Never blocks.
    fn try_write(&self, bytes: Bytes) -> Result<(), TryWriteError>;
}

impl ConnWriter for mpsc::Sender<Bytes> {
    fn try_write(&self, bytes: Bytes) -> Result<(), TryWriteError> {
        self.try_send(bytes).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TryWriteError::Full,
            mpsc::error::TrySendError::Closed(_) => TryWriteError::Closed,
        })
    }
}

/// Why a connection closed. The text is what logs say; [`CloseReason::as_str`] is a stable
/// name for counting and matching, so nobody compares messages.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CloseReason {
    /// The peer closed at a message boundary.
    #[error("closed by the peer")]
    PeerClosed,
    /// The peer closed with a message half sent.
    #[error("closed by the peer mid-message")]
    PeerClosedMidMessage,
    /// The peer reset the connection (vsock `OP_RST`).
    #[error("reset by the peer")]
    PeerReset,
    /// The peer did not read its pulses for the write timeout.
    #[error("the peer stopped reading")]
    PeerNotReading,
    /// A new connection from the same guest port replaced it.
    #[error("replaced by a new connection from the same guest port")]
    Replaced,
    /// A full server channel closed it to admit a newcomer; the text says which rule chose it.
    #[error("evicted to admit a new connection: {0}")]
    Evicted(&'static str),
    /// Reading failed.
    #[error("read error")]
    Read(#[source] Arc<std::io::Error>),
    /// The QEMU serving the vsock device went away.
    #[error("QEMU disconnected")]
    FrontendGone,
    /// The guest stopped the vsock device (a ring stopped: a reboot or a driver unload).
    #[error("the guest stopped the device")]
    DeviceStopped,
    /// The vsock device was reset by the frontend.
    #[error("the device was reset")]
    DeviceReset,
    /// awd is stopping.
    #[error("awd is shutting down")]
    Shutdown,
}

impl CloseReason {
    /// A stable snake_case name, for logs and counters.
    pub fn as_str(&self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::PeerClosedMidMessage => "peer_closed_mid_message",
            CloseReason::PeerReset => "peer_reset",
            CloseReason::PeerNotReading => "peer_not_reading",
            CloseReason::Replaced => "replaced",
            CloseReason::Evicted(_) => "evicted",
            CloseReason::Read(_) => "read_error",
            CloseReason::FrontendGone => "frontend_gone",
            CloseReason::DeviceStopped => "device_stopped",
            CloseReason::DeviceReset => "device_reset",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// What a transport tells its watchdog.
#[derive(Debug)]
pub enum ChannelEvent {
    /// A connection opened; `tx` writes to it (pulses, replies).
    Connected {
        /// The connection.
        conn: ConnId,
        /// The peer's address, for logs.
        peer: String,
        /// Writes bytes to the connection.
        tx: Box<dyn ConnWriter>,
    },
    /// A connection closed.
    Disconnected {
        /// The connection.
        conn: ConnId,
        /// How it ended: the peer, awd, the device or an error.
        reason: CloseReason,
    },
    /// Input arrived: proof of life, which refreshes the timer whatever `count` is. Coalesced:
    /// one event per read, not per line.
    Heartbeats {
        /// The connection.
        conn: ConnId,
        /// Plain messages completed (0 when the read only completed signals, which follow).
        count: u32,
    },
    /// The VM behind the channel started over: a new vhost-user frontend (a new QEMU), or the
    /// guest reset its device (a reboot). The watchdog re-enters its grace, as at awd's start,
    /// and cancels pending escalation steps: a booting guest is not silent.
    StartedOver {
        /// What was seen, for logs.
        reason: String,
    },
    /// A message with a meaning beyond "alive" (never a plain heartbeat or a rejected input,
    /// which the intake counts into [`ChannelEvent::Heartbeats`]); it refreshes the timer too.
    Signal {
        /// The connection.
        conn: ConnId,
        /// The message, as the protocol decoded it.
        signal: Message,
    },
}

/// What a channel needs to feed its watchdog.
#[derive(Debug, Clone)]
pub struct ChannelContext {
    /// The watchdog id, for logs.
    pub watchdog: Arc<str>,
    /// The chardev id, for logs.
    pub channel: Arc<str>,
    /// Where events go.
    pub events: mpsc::Sender<ChannelEvent>,
    /// Counters.
    pub metrics: Arc<WatchdogMetrics>,
    /// Set TCP_NODELAY on connections.
    pub nodelay: bool,
    /// Input messages per second that are parsed; the excess still proves life (`None`: all).
    pub rate_limit: Option<u32>,
}

/// The receiving half of a channel: decodes bytes, counts and logs rejections, and turns the
/// rest into [`ChannelEvent`]s.
#[derive(Debug)]
pub struct Intake {
    watchdog: Arc<str>,
    channel: Arc<str>,
    decoder: Decoder,
    metrics: Arc<WatchdogMetrics>,
    limiter: LogLimiter,
    rate: Option<RateLimit>,
    rate_log: LogLimiter,
}

/// A token bucket of messages per second for one connection: a second's worth of burst, then
/// `per_second`. A read decoded while tokens remain may overdraw the bucket (a read holds at
/// most a few thousand messages), and reads are skipped until the debt is repaid, so the cost
/// of a flood is bounded by the rate whatever the read sizes.
#[derive(Debug)]
struct RateLimit {
    per_second: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl RateLimit {
    fn new(per_second: u32, now: std::time::Instant) -> Self {
        RateLimit {
            per_second: f64::from(per_second),
            tokens: f64::from(per_second),
            last: now,
        }
    }

    /// Whether a read may be decoded now.
    fn admit(&mut self, now: std::time::Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        self.tokens >= 1.0
    }

    /// Takes `n` messages from the bucket, possibly into debt.
    fn spend(&mut self, n: u32) {
        self.tokens -= f64::from(n);
    }
}

impl Intake {
    /// A fresh intake for one connection of `channel`, feeding `watchdog`.
    pub fn new(watchdog: Arc<str>, channel: Arc<str>, metrics: Arc<WatchdogMetrics>) -> Self {
        Intake {
            watchdog,
            channel,
            decoder: Decoder::new(),
            metrics,
            limiter: LogLimiter::new(5, Duration::from_secs(10)),
            rate: None,
            rate_log: LogLimiter::new(1, Duration::from_secs(10)),
        }
    }

    /// Parses at most `per_second` messages a second on this connection (the channel's
    /// `rate_limit`). Reads beyond it still prove the peer alive, but are not decoded; the
    /// decoder then resynchronises at the next newline.
    pub fn with_rate_limit(mut self, per_second: Option<u32>) -> Self {
        self.rate = per_second
            .filter(|&n| n > 0)
            .map(|n| RateLimit::new(n, std::time::Instant::now()));
        self
    }

    /// Decodes `bytes` from connection `conn` and appends the resulting events to `out`.
    ///
    /// Any read that returned at least one byte is proof of life, whatever the decoder makes
    /// of it (the seed: "any input refreshes its timer"): a partial line, a byte of a 10 MB
    /// line, binary without a newline, rejected input. So a non-empty `bytes` always gives one
    /// [`ChannelEvent::Heartbeats`], first, before the signals the read completed. Its `count`
    /// is the number of plain messages completed (rejected ones included), or 1 when the read
    /// completed no message at all, so the counter shows input that only continued a message.
    pub fn feed(&mut self, conn: ConnId, bytes: &[u8], out: &mut Vec<ChannelEvent>) {
        self.feed_at(conn, bytes, std::time::Instant::now(), out);
    }

    /// [`feed`](Self::feed) at a given time (the rate limit's and the log limiter's clock).
    pub fn feed_at(
        &mut self,
        conn: ConnId,
        bytes: &[u8],
        at: std::time::Instant,
        out: &mut Vec<ChannelEvent>,
    ) {
        if bytes.is_empty() {
            return;
        }
        self.metrics.input_bytes.inc_by(bytes.len() as u64);
        if let Some(rate) = &mut self.rate
            && !rate.admit(at)
        {
            self.metrics.rate_limited.inc();
            self.decoder.resync();
            if let Some(suppressed) = self.rate_log.allow(at) {
                tracing::warn!(
                    watchdog = &*self.watchdog,
                    channel = &*self.channel,
                    conn,
                    suppressed,
                    "input over the channel's rate limit: taken as proof of life, not parsed"
                );
            }
            out.push(ChannelEvent::Heartbeats { conn, count: 1 });
            return;
        }
        let mut beats: u32 = 0;
        let mut signals = Vec::new();
        let (watchdog, channel, metrics, limiter) = (
            &self.watchdog,
            &self.channel,
            &self.metrics,
            &mut self.limiter,
        );
        self.decoder.feed(bytes, |m| {
            let signal = match m {
                Message::Heartbeat => {
                    beats = beats.saturating_add(1);
                    return;
                }
                Message::Rejected(r) => {
                    metrics.reject(r);
                    beats = beats.saturating_add(1);
                    if let Some(suppressed) = limiter.allow(at) {
                        tracing::warn!(
                            watchdog = &**watchdog,
                            channel = &**channel,
                            conn,
                            reason = r.as_str(),
                            suppressed,
                            "rejected input: {}",
                            describe(r)
                        );
                    }
                    return;
                }
                signal => signal,
            };
            // Within one read, a run of STATUS= (or WATCHDOG_USEC=) lines means what its last
            // line means: a flood of them costs the watchdog one event per read, not per line.
            match (signals.last_mut(), &signal) {
                (Some(last @ Message::Status(_)), Message::Status(_))
                | (Some(last @ Message::SetTimeout(_)), Message::SetTimeout(_)) => {
                    *last = signal;
                    beats = beats.saturating_add(1);
                }
                _ => signals.push(signal),
            }
        });
        if let Some(rate) = &mut self.rate {
            rate.spend(beats.saturating_add(signals.len() as u32));
        }
        if beats == 0 && signals.is_empty() {
            beats = 1;
        }
        out.push(ChannelEvent::Heartbeats { conn, count: beats });
        out.extend(
            signals
                .into_iter()
                .map(|signal| ChannelEvent::Signal { conn, signal }),
        );
    }

    /// Whether the stream ended in the middle of a message.
    pub fn is_mid_message(&self) -> bool {
        self.decoder.is_mid_message()
    }
}

fn describe(r: Rejection) -> &'static str {
    match r {
        Rejection::LineTooLong => "line longer than 4096 bytes, dropped up to the next newline",
        Rejection::FrameTooLong => "frame length over 4096 bytes, dropped up to the next newline",
        Rejection::InvalidUtf8 => "line is not UTF-8",
        Rejection::BadValue => "a known key with a value that does not parse",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn heartbeats_coalesce_and_rejections_count() {
        let metrics = Metrics::new().watchdog("w", "c");
        let mut intake = Intake::new("w".into(), "c".into(), metrics.clone());
        let mut out = Vec::new();
        intake.feed(
            7,
            b"WATCHDOG=1\nWATCHDOG=1\n\xff\nCHECKPOINT=a\nhi\n",
            &mut out,
        );
        assert!(
            matches!(out[0], ChannelEvent::Heartbeats { conn: 7, count: 4 }),
            "{out:?}"
        );
        assert!(
            matches!(&out[1], ChannelEvent::Signal { signal: Message::Checkpoint(c), .. } if &**c == "a")
        );
        assert_eq!(out.len(), 2);
        assert_eq!(metrics.rejected_count(Rejection::InvalidUtf8), 1);
    }

    fn intake() -> (Intake, Arc<WatchdogMetrics>) {
        let metrics = Metrics::new().watchdog("w", "c");
        (
            Intake::new("w".into(), "c".into(), metrics.clone()),
            metrics,
        )
    }

    /// The events of one read, as (kind, count) pairs: "beat" with its count, or "signal".
    fn kinds(out: &[ChannelEvent]) -> Vec<(&'static str, u32)> {
        out.iter()
            .map(|e| match e {
                ChannelEvent::Heartbeats { count, .. } => ("beat", *count),
                ChannelEvent::Signal { .. } => ("signal", 0),
                _ => ("other", 0),
            })
            .collect()
    }

    #[test]
    fn every_read_with_a_byte_is_proof_of_life_even_without_a_newline() {
        let (mut intake, metrics) = intake();
        let mut out = Vec::new();
        // One byte every read, never a newline: each read is a heartbeat.
        for _ in 0..10 {
            intake.feed(1, b"x", &mut out);
            assert_eq!(kinds(&out), [("beat", 1)]);
            out.clear();
        }
        // Binary chunks with no newline, a frame header cut short, invalid UTF-8.
        for chunk in [&b"\x01\x02\x03\xff"[..], b"\x00\x00", b"\xfe\xfe\xfe"] {
            intake.feed(1, chunk, &mut out);
            assert_eq!(kinds(&out), [("beat", 1)], "{chunk:?}");
            out.clear();
        }
        // An empty read (EOF is told apart by the caller) is not input.
        intake.feed(1, b"", &mut out);
        assert!(out.is_empty());
        assert_eq!(metrics.input_bytes.get(), 10 + 4 + 2 + 3);
    }

    #[test]
    fn a_ten_megabyte_line_refreshes_on_every_read_and_after_its_rejection() {
        let (mut intake, metrics) = intake();
        let chunk = vec![b'a'; 8192];
        let mut out = Vec::new();
        for i in 0..1280 {
            intake.feed(1, &chunk, &mut out);
            assert_eq!(kinds(&out).len(), 1, "read {i}: one event");
            assert!(
                matches!(out[0], ChannelEvent::Heartbeats { .. }),
                "read {i}"
            );
            out.clear();
        }
        assert_eq!(metrics.rejected_count(Rejection::LineTooLong), 1);
        // The discarded tail still counts, and the next line keeps its meaning.
        intake.feed(1, b"aaaa\nCHECKPOINT=up\n", &mut out);
        assert_eq!(kinds(&out), [("beat", 0), ("signal", 0)]);
    }

    #[test]
    fn well_formed_lines_keep_their_meaning_behind_the_refresh() {
        let (mut intake, _) = intake();
        let mut out = Vec::new();
        intake.feed(
            1,
            b"WATCHDOG_USEC=2000000\nWATCHDOG=1\nSTATUS=ok\n",
            &mut out,
        );
        assert_eq!(kinds(&out), [("beat", 1), ("signal", 0), ("signal", 0)]);
        out.clear();
        // A line split over reads: the first part refreshes, the end completes the meaning.
        intake.feed(1, b"CHECKPO", &mut out);
        assert_eq!(kinds(&out), [("beat", 1)]);
        out.clear();
        intake.feed(1, b"INT=a\n", &mut out);
        assert_eq!(kinds(&out), [("beat", 0), ("signal", 0)]);
    }

    #[test]
    fn a_run_of_status_lines_in_one_read_is_one_signal_the_last() {
        let (mut intake, _) = intake();
        let mut out = Vec::new();
        intake.feed(
            1,
            b"STATUS=a\nSTATUS=b\nSTATUS=c\nCHECKPOINT=x\nSTATUS=d\n",
            &mut out,
        );
        assert_eq!(
            kinds(&out),
            [("beat", 2), ("signal", 0), ("signal", 0), ("signal", 0)]
        );
        assert!(
            matches!(&out[1], ChannelEvent::Signal { signal: Message::Status(s), .. } if &**s == "c")
        );
    }

    #[test]
    fn over_the_rate_limit_input_proves_life_but_is_not_parsed() {
        let (intake, metrics) = intake();
        let mut intake = intake.with_rate_limit(Some(10));
        let t0 = std::time::Instant::now();
        let mut out = Vec::new();
        let mut signals = 0;
        for _ in 0..100 {
            intake.feed_at(1, b"STATUS=flood\n", t0, &mut out);
            assert!(matches!(out[0], ChannelEvent::Heartbeats { .. }));
            signals += kinds(&out).iter().filter(|k| k.0 == "signal").count();
            out.clear();
        }
        assert_eq!(signals, 10, "a second's worth of burst");
        assert_eq!(metrics.rate_limited.get(), 90);
        // Skipped input leaves the decoder mid-stream: it resyncs at the next newline.
        intake.feed_at(1, b"partial", t0 + Duration::from_secs(1), &mut out);
        out.clear();
        intake.feed_at(
            1,
            b" end\nSTATUS=after\n",
            t0 + Duration::from_secs(1),
            &mut out,
        );
        assert_eq!(kinds(&out), [("beat", 0), ("signal", 0)]);
    }

    #[test]
    fn close_reasons_have_stable_names_and_keep_their_source() {
        let read = CloseReason::Read(Arc::new(std::io::Error::other("connection reset")));
        assert_eq!(
            crate::util::error_chain(&read),
            "read error: connection reset"
        );
        assert_eq!(read.as_str(), "read_error");
        let all = [
            CloseReason::PeerClosed,
            CloseReason::PeerClosedMidMessage,
            CloseReason::PeerReset,
            CloseReason::PeerNotReading,
            CloseReason::Replaced,
            CloseReason::Evicted("it never sent anything"),
            read,
            CloseReason::FrontendGone,
            CloseReason::DeviceStopped,
            CloseReason::DeviceReset,
            CloseReason::Shutdown,
        ];
        let names: std::collections::BTreeSet<&str> = all.iter().map(CloseReason::as_str).collect();
        assert_eq!(names.len(), all.len(), "each reason has its own name");
        assert_eq!(
            CloseReason::Evicted("it never sent anything").to_string(),
            "evicted to admit a new connection: it never sent anything"
        );
    }
}
