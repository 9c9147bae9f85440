//! Heartbeat channels: where input comes from, and where pulses go back.
//!
//! A transport owns its connections. It decodes what arrives with [`Intake`] and hands the
//! results to its watchdog as [`ChannelEvent`]s over a bounded channel; the watchdog never
//! touches a socket. Each connection registers a writer (`Connected::tx`) the watchdog uses for
//! pulses and pulse replies.

pub mod socket;
pub mod vsock;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::metrics::WatchdogMetrics;
use crate::protocol::{Decoder, Message, Rejection};

/// Identifies one connection of a channel, unique in the process.
pub type ConnId = u64;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A fresh connection id.
pub fn next_conn_id() -> ConnId {
    NEXT_CONN.fetch_add(1, Ordering::Relaxed)
}

/// A decoded message that is more than a heartbeat, owned so it can cross a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// `WATCHDOG=trigger`.
    Trigger,
    /// `WATCHDOG_USEC=`.
    SetTimeout(Duration),
    /// `CHECKPOINT=`.
    Checkpoint(Box<str>),
    /// `CONDITION=`.
    Condition(Box<str>, bool),
    /// `STATUS=`.
    Status(Box<str>),
    /// An AWD pulse.
    Pulse,
    /// An AWD pulse reply.
    PulseReply,
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
        /// Why, for logs.
        reason: String,
    },
    /// `count` plain heartbeats arrived (coalesced: one event per read, not per line).
    Heartbeats {
        /// The connection.
        conn: ConnId,
        /// How many.
        count: u32,
    },
    /// The VM behind the channel started over: a new vhost-user frontend (a new QEMU), or the
    /// guest reset its device (a reboot). The watchdog re-enters its grace, as at awd's start,
    /// and cancels pending escalation steps: a booting guest is not silent.
    StartedOver {
        /// What was seen, for logs.
        reason: String,
    },
    /// A message with a meaning beyond "alive"; it refreshes the timer too.
    Signal {
        /// The connection.
        conn: ConnId,
        /// The message.
        signal: Signal,
    },
}

/// Allows a burst of log lines, then one per `period`, counting what it suppressed.
#[derive(Debug)]
pub struct LogLimiter {
    period: Duration,
    burst: u32,
    tokens: u32,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter that allows `burst` lines at once, refilled at one per `period`.
    pub fn new(burst: u32, period: Duration) -> Self {
        LogLimiter {
            period,
            burst,
            tokens: burst,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now; if so, also returns how many were suppressed since
    /// the last one.
    pub fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        if let Some(last) = self.last {
            let refill = (now.saturating_duration_since(last).as_nanos()
                / self.period.as_nanos().max(1)) as u32;
            if refill > 0 {
                self.tokens = self.tokens.saturating_add(refill).min(self.burst);
                self.last = Some(now);
            }
        } else {
            self.last = Some(now);
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }
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
        }
    }

    /// Decodes `bytes` from connection `conn` and appends the resulting events to `out`.
    /// Plain heartbeats (and rejected input, which still proves the peer alive) are coalesced
    /// into at most one [`ChannelEvent::Heartbeats`] per call, placed before the signals.
    pub fn feed(&mut self, conn: ConnId, bytes: &[u8], out: &mut Vec<ChannelEvent>) {
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
                    if let Some(suppressed) = limiter.allow(std::time::Instant::now()) {
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
                Message::Trigger => Signal::Trigger,
                Message::SetTimeout(t) => Signal::SetTimeout(t),
                Message::Checkpoint(c) => Signal::Checkpoint(c.into()),
                Message::Condition(c, v) => Signal::Condition(c.into(), v),
                Message::Status(s) => Signal::Status(s.into()),
                Message::Pulse => Signal::Pulse,
                Message::PulseReply => Signal::PulseReply,
            };
            signals.push(signal);
        });
        if beats > 0 {
            out.push(ChannelEvent::Heartbeats { conn, count: beats });
        }
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
            matches!(&out[1], ChannelEvent::Signal { signal: Signal::Checkpoint(c), .. } if &**c == "a")
        );
        assert_eq!(out.len(), 2);
        assert_eq!(metrics.rejected_count(Rejection::InvalidUtf8), 1);
    }

    #[test]
    fn the_log_limiter_allows_a_burst_then_one_per_period() {
        let t0 = std::time::Instant::now();
        let mut l = LogLimiter::new(2, Duration::from_secs(1));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(2));
    }
}
