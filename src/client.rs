//! Client API for guest programs: report heartbeats and checkpoints to awd over any byte
//! stream, in the terms of S-CORE's `health_monitoring_lib` and of the seed's operations.
//!
//! A [`HealthMonitor`] writes lines of awd's protocol (see [`protocol`](crate::protocol)) to any
//! [`Write`]: the guest agent's local socket, a virtio-serial port, a vsock stream.
//!
//! | call | line | supervision on the host |
//! |---|---|---|
//! | [`heartbeat`](HealthMonitor::heartbeat) | `WATCHDOG=1` | plain timeout |
//! | [`record_checkpoint`](HealthMonitor::record_checkpoint) | `CHECKPOINT=name` | alive, deadline, logical |
//! | [`transition`](HealthMonitor::transition) | `CHECKPOINT=name` | logical (S-CORE's name) |
//! | [`mark_start`](HealthMonitor::mark_start) / [`DeadlineGuard::mark_end`] | start, then end checkpoint | deadline |
//! | [`fail`](HealthMonitor::fail) | `STATUS=reason`, `WATCHDOG=trigger` | expires at once |
//! | [`set_condition`](HealthMonitor::set_condition) | `CONDITION=name=1\|0` | linked conditions |
//! | [`set_timeout`](HealthMonitor::set_timeout) | `WATCHDOG_USEC=n` | plain timeout, within bounds |
//!
//! ```
//! use std::time::Duration;
//! use awd::client::{DeadlineSpec, HealthMonitor, TimeRange};
//!
//! let request = DeadlineSpec::new(
//!     "request", "req-start", "req-end",
//!     TimeRange::new(Duration::from_millis(10), Duration::from_millis(500)),
//! );
//! let hm = HealthMonitor::new(Vec::new());
//! hm.heartbeat()?;
//! {
//!     let _deadline = hm.mark_start(&request)?; // CHECKPOINT=req-start
//!     // … handle the request …
//! } // dropped: CHECKPOINT=req-end
//! hm.transition("ready")?;
//! # Ok::<(), awd::client::ClientError>(())
//! ```
//!
//! ## Local supervision
//!
//! [`HealthMonitor::with_local_supervision`] also runs the [`engine`](crate::engine) in the
//! guest program, with the same rules as awd on the host, to notice its own failures without
//! the round trip: when the local watchdog expires, the monitor sends the seed's failure
//! notification (`STATUS=` and `WATCHDOG=trigger`) so the host reacts at once, stops its alive
//! reporting ([`heartbeat`](HealthMonitor::heartbeat) writes nothing while expired), and the
//! call that caused it returns [`ClientError::Supervision`]. Timers (alive cycles, deadline
//! maxima) are checked on every call and by [`poll`](HealthMonitor::poll), which a program
//! calls at [`next_deadline`](HealthMonitor::next_deadline).

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub use crate::engine::{
    AliveSpec, ConditionSpec, DeadlineSpec, EngineSnapshot, EngineSpec, GlobalStatus, LogicalSpec,
    Setter, SpecError, TimeRange, TimeoutSpec,
};
use crate::engine::{Change, WatchdogEngine};
use crate::protocol::{EncodeError, MAX_LINE, Message};
use crate::util::valid_name;

/// A TCP connection to awd's `psk=` channel, authenticated (`docs/protocol.md`): whatever is
/// written to it goes out as sealed frames, so a [`HealthMonitor`] over it reports to an
/// authenticated channel as to any other.
#[derive(Debug)]
pub struct SealedStream {
    stream: std::net::TcpStream,
    session: crate::auth::Session,
}

impl SealedStream {
    /// Connects to `addr` and authenticates with `key` (within `timeout` for each step).
    pub fn connect(
        addr: impl std::net::ToSocketAddrs,
        key: &crate::auth::Key,
        timeout: Duration,
    ) -> io::Result<SealedStream> {
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let session =
            crate::auth::handshake_blocking(&mut &stream, key, crate::auth::Role::Client)?;
        Ok(SealedStream { stream, session })
    }
}

impl Write for SealedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let frame = self.session.seal_all(buf);
        self.stream.write_all(&frame)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Why a report was not made, or what it revealed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The line could not be written.
    #[error("cannot write to awd")]
    Write(#[source] io::Error),
    /// A checkpoint or condition name the protocol cannot carry.
    #[error("'{0}' is not a valid name (1 to 64 of A-Z a-z 0-9 _ . : -)")]
    NameInvalid(String),
    /// A report the protocol cannot carry as it is (names are checked before, status text is
    /// cut to fit, so this means a bug rather than bad input).
    #[error("cannot encode the report")]
    Encode(#[from] EncodeError),
    /// The local supervision spec does not check.
    #[error("local supervision: {0}")]
    Spec(#[from] SpecError),
    /// Local supervision: this call (or a timer it settled) expired the watchdog. The line
    /// was sent, followed by the failure notification.
    #[error("local supervision expired: {0}")]
    Supervision(String),
    /// Local supervision: the watchdog is expired, so alive reporting has stopped.
    #[error("heartbeat withheld: local supervision is {0}")]
    Withheld(GlobalStatus),
}

/// Where the monitor reads the time in local mode.
type Clock = Box<dyn Fn() -> Instant + Send>;

struct Inner<W> {
    out: W,
    local: Option<(WatchdogEngine, Clock)>,
}

/// Reports a guest program's health to awd. Cheap to clone: clones share the writer (under a
/// lock, so threads can report at once) and, in local mode, the engine.
pub struct HealthMonitor<W> {
    inner: Arc<Mutex<Inner<W>>>,
}

impl<W> Clone for HealthMonitor<W> {
    fn clone(&self) -> Self {
        HealthMonitor {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<W> std::fmt::Debug for HealthMonitor<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthMonitor").finish_non_exhaustive()
    }
}

impl<W: Write> HealthMonitor<W> {
    /// A monitor that writes to `out` and leaves all supervision to awd.
    pub fn new(out: W) -> Self {
        HealthMonitor {
            inner: Arc::new(Mutex::new(Inner { out, local: None })),
        }
    }

    /// A monitor that also supervises locally, by `spec`, from now on.
    pub fn with_local_supervision(out: W, spec: &EngineSpec) -> Result<Self, ClientError> {
        Self::with_local_supervision_and_clock(out, spec, Instant::now)
    }

    /// As [`with_local_supervision`](Self::with_local_supervision), with the time read from
    /// `clock` (tests, or a program with a clock of its own).
    pub fn with_local_supervision_and_clock(
        out: W,
        spec: &EngineSpec,
        clock: impl Fn() -> Instant + Send + 'static,
    ) -> Result<Self, ClientError> {
        let engine = WatchdogEngine::new(spec, clock())?;
        Ok(HealthMonitor {
            inner: Arc::new(Mutex::new(Inner {
                out,
                local: Some((engine, Box::new(clock))),
            })),
        })
    }

    /// `WATCHDOG=1`: the program is alive. Withheld while the local supervision is expired.
    pub fn heartbeat(&self) -> Result<(), ClientError> {
        let mut inner = self.lock();
        if let Some((engine, _)) = &inner.local
            && let s @ (GlobalStatus::Expired | GlobalStatus::Stopped) = engine.status()
        {
            return Err(ClientError::Withheld(s));
        }
        inner.report(&[Message::Heartbeat])
    }

    /// `CHECKPOINT=name` (the seed's `record_checkpoint`).
    pub fn record_checkpoint(&self, name: &str) -> Result<(), ClientError> {
        check_name(name)?;
        self.lock().report(&[Message::Checkpoint(name.into())])
    }

    /// A logical supervision's step to `checkpoint` (S-CORE's `transition`); the same line as
    /// [`record_checkpoint`](Self::record_checkpoint).
    pub fn transition(&self, checkpoint: &str) -> Result<(), ClientError> {
        self.record_checkpoint(checkpoint)
    }

    /// Starts a deadline measurement: sends the start checkpoint and returns a guard that
    /// sends the end checkpoint when it is dropped or [`mark_end`](DeadlineGuard::mark_end)
    /// is called.
    pub fn mark_start(&self, deadline: &DeadlineSpec) -> Result<DeadlineGuard<W>, ClientError> {
        check_name(&deadline.end)?;
        self.record_checkpoint(&deadline.start)?;
        Ok(DeadlineGuard {
            monitor: self.clone(),
            end: deadline.end.clone(),
            ended: false,
        })
    }

    /// Reports a failure at once, without waiting for a timeout: `STATUS=reason` for the log,
    /// then `WATCHDOG=trigger`. Line breaks in `reason` become spaces.
    pub fn fail(&self, reason: &str) -> Result<(), ClientError> {
        self.lock().report(&failure(reason))
    }

    /// `CONDITION=name=1|0`: sets a condition the guest owns.
    pub fn set_condition(&self, name: &str, value: bool) -> Result<(), ClientError> {
        check_name(name)?;
        self.lock()
            .report(&[Message::Condition(name.into(), value)])
    }

    /// `WATCHDOG_USEC=`: asks for a new plain timeout (awd takes it only within its bounds).
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), ClientError> {
        self.lock().report(&[Message::SetTimeout(timeout)])
    }

    /// Local mode: settles the local timers now, sending the failure notification if that
    /// expires the watchdog. Returns the local status (`None` without local supervision).
    pub fn poll(&self) -> Result<Option<GlobalStatus>, ClientError> {
        let mut inner = self.lock();
        let Some((engine, clock)) = &mut inner.local else {
            return Ok(None);
        };
        let changes = engine.poll(clock());
        let status = engine.status();
        inner.notify(&changes)?;
        Ok(Some(status))
    }

    /// Local mode: when [`poll`](Self::poll) should next be called.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock()
            .local
            .as_ref()
            .and_then(|(e, _)| e.next_deadline())
    }

    /// Local mode: the local global status.
    pub fn status(&self) -> Option<GlobalStatus> {
        self.lock().local.as_ref().map(|(e, _)| e.status())
    }

    /// Local mode: everything the local engine knows, as `awd status` would show it.
    pub fn snapshot(&self) -> Option<EngineSnapshot> {
        self.lock()
            .local
            .as_ref()
            .map(|(e, clock)| e.snapshot(clock()))
    }

    /// The writer back, once this is the last clone (guards hold clones too).
    pub fn into_writer(self) -> Result<W, Self> {
        match Arc::try_unwrap(self.inner) {
            Ok(m) => Ok(m.into_inner().unwrap_or_else(PoisonError::into_inner).out),
            Err(inner) => Err(HealthMonitor { inner }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<W>> {
        // A panic elsewhere while writing leaves at worst a torn line; reporting goes on.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<W: Write> Inner<W> {
    /// Feeds the local engine (if any) what `messages` mean to it, writes them, then the
    /// failure notification if the local watchdog just expired.
    fn report(&mut self, messages: &[Message]) -> Result<(), ClientError> {
        let bytes = encode(messages)?;
        let mut changes = Vec::new();
        if let Some((engine, clock)) = &mut self.local {
            let now = clock();
            for ev in messages.iter().filter_map(Message::event) {
                changes.extend(engine.handle(ev, now).changes);
            }
        }
        self.write(&bytes)?;
        self.notify(&changes)
    }

    /// Sends the failure notification for a global change to EXPIRED among `changes`.
    fn notify(&mut self, changes: &[Change]) -> Result<(), ClientError> {
        let Some(c) = changes
            .iter()
            .find(|c| c.is_global() && c.to == GlobalStatus::Expired)
        else {
            return Ok(());
        };
        let reason = format!("local supervision: {}", c.reason);
        self.write(&encode(&failure(&reason))?)?;
        Err(ClientError::Supervision(c.reason.clone()))
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.out
            .write_all(bytes)
            .and_then(|()| self.out.flush())
            .map_err(ClientError::Write)
    }
}

/// The messages in `messages`, encoded one after the other.
fn encode(messages: &[Message]) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    for m in messages {
        out.extend(m.encode()?);
    }
    Ok(out)
}

/// `STATUS=reason` (one line, cut to fit) and `WATCHDOG=trigger`.
fn failure(reason: &str) -> [Message; 2] {
    let mut text: String = reason
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let limit = MAX_LINE - "STATUS=".len();
    if text.len() > limit {
        let mut cut = limit;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    [Message::Status(text.into()), Message::Trigger]
}

fn check_name(name: &str) -> Result<(), ClientError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ClientError::NameInvalid(name.to_owned()))
    }
}

/// A running deadline measurement (S-CORE's deadline handle): sends the end checkpoint once,
/// on [`mark_end`](Self::mark_end) or when dropped.
#[must_use = "dropping the guard marks the end of the deadline at once"]
pub struct DeadlineGuard<W: Write> {
    monitor: HealthMonitor<W>,
    end: String,
    ended: bool,
}

impl<W: Write> DeadlineGuard<W> {
    /// Ends the measurement now (the seed's `mark_end`) and reports how that went.
    pub fn mark_end(mut self) -> Result<(), ClientError> {
        self.ended = true;
        self.monitor.record_checkpoint(&self.end)
    }
}

impl<W: Write> Drop for DeadlineGuard<W> {
    fn drop(&mut self) {
        if !self.ended {
            // Nowhere to report a failure from a drop; call mark_end to see it.
            let _ = self.monitor.record_checkpoint(&self.end);
        }
    }
}

impl<W: Write> std::fmt::Debug for DeadlineGuard<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineGuard")
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::protocol::{Decoder, Message};
    use crate::util::ms;

    fn text(hm: HealthMonitor<Vec<u8>>) -> String {
        String::from_utf8(hm.into_writer().expect("last clone")).expect("utf-8")
    }

    fn request() -> DeadlineSpec {
        DeadlineSpec::new(
            "request",
            "req-start",
            "req-end",
            TimeRange::new(ms(10), ms(500)),
        )
    }

    #[test]
    fn every_call_writes_its_protocol_line() {
        let hm = HealthMonitor::new(Vec::new());
        hm.heartbeat().unwrap();
        hm.record_checkpoint("init").unwrap();
        hm.transition("config").unwrap();
        {
            let _g = hm.mark_start(&request()).unwrap();
        }
        hm.mark_start(&request()).unwrap().mark_end().unwrap();
        hm.set_condition("app-ready", true).unwrap();
        hm.set_condition("app-ready", false).unwrap();
        hm.set_timeout(ms(2500)).unwrap();
        hm.fail("disk\nfull").unwrap();
        assert_eq!(
            text(hm),
            "WATCHDOG=1\nCHECKPOINT=init\nCHECKPOINT=config\n\
             CHECKPOINT=req-start\nCHECKPOINT=req-end\nCHECKPOINT=req-start\nCHECKPOINT=req-end\n\
             CONDITION=app-ready=1\nCONDITION=app-ready=0\nWATCHDOG_USEC=2500000\n\
             STATUS=disk full\nWATCHDOG=trigger\n"
        );
    }

    #[test]
    fn the_lines_decode_to_what_the_host_expects() {
        let hm = HealthMonitor::new(Vec::new());
        hm.record_checkpoint("tick").unwrap();
        hm.set_condition("ready", true).unwrap();
        hm.fail(&"x".repeat(2 * MAX_LINE)).unwrap();
        let bytes = hm.into_writer().unwrap();
        let mut seen = Vec::new();
        Decoder::new().feed(&bytes, |m| {
            seen.push(match m {
                Message::Checkpoint(c) => format!("checkpoint {c}"),
                Message::Condition(c, v) => format!("condition {c} {v}"),
                Message::Status(s) => format!("status of {}", s.len()),
                Message::Trigger => "trigger".into(),
                other => format!("{other:?}"),
            })
        });
        assert_eq!(
            seen,
            [
                "checkpoint tick",
                "condition ready true",
                &format!("status of {}", MAX_LINE - 7),
                "trigger"
            ]
        );
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_written() {
        let hm = HealthMonitor::new(Vec::new());
        assert!(matches!(
            hm.record_checkpoint("a b"),
            Err(ClientError::NameInvalid(n)) if n == "a b"
        ));
        assert!(hm.set_condition("", true).is_err());
        let bad = DeadlineSpec::new("d", "ok", "not ok", TimeRange::new(ms(0), ms(1)));
        assert!(hm.mark_start(&bad).is_err());
        assert_eq!(text(hm), "");
    }

    #[test]
    fn write_errors_are_reported() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = HealthMonitor::new(Broken).heartbeat().unwrap_err();
        assert!(matches!(err, ClientError::Write(_)), "{err}");
    }

    /// A clock the test moves by hand.
    fn clock() -> (Arc<AtomicU64>, impl Fn() -> Instant + Send + 'static) {
        let t0 = Instant::now();
        let offset = Arc::new(AtomicU64::new(0));
        let o = offset.clone();
        (offset, move || t0 + ms(o.load(Ordering::SeqCst)))
    }

    fn local_spec() -> EngineSpec {
        let mut spec = EngineSpec::plain(ms(5000));
        spec.deadline = vec![request()];
        spec.logical = vec![
            LogicalSpec::new("boot")
                .add_entry_point("init")
                .add_allowed_transition("init", "ready")
                .add_exit_point("ready"),
        ];
        spec
    }

    #[test]
    fn local_mode_reports_a_broken_sequence_at_once_and_stops_heartbeats() {
        let (_t, clock) = clock();
        let hm = HealthMonitor::with_local_supervision_and_clock(Vec::new(), &local_spec(), clock)
            .unwrap();
        hm.transition("init").unwrap();
        let err = hm.transition("init").unwrap_err();
        assert!(
            err.to_string()
                .contains("checkpoint init may not follow init, expected one of ready"),
            "{err}"
        );
        assert_eq!(hm.status(), Some(GlobalStatus::Expired));
        assert!(matches!(
            hm.heartbeat(),
            Err(ClientError::Withheld(GlobalStatus::Expired))
        ));
        hm.transition("init").unwrap();
        assert_eq!(
            hm.status(),
            Some(GlobalStatus::Ok),
            "restarted at the entry"
        );
        hm.heartbeat().unwrap();
        let out = text(hm);
        assert_eq!(
            out,
            "CHECKPOINT=init\nCHECKPOINT=init\nSTATUS=local supervision: logical boot: \
             checkpoint init may not follow init, expected one of ready\nWATCHDOG=trigger\n\
             CHECKPOINT=init\nWATCHDOG=1\n"
        );
    }

    #[test]
    fn local_mode_catches_a_deadline_overrun_at_its_maximum() {
        let (t, clock) = clock();
        let hm = HealthMonitor::with_local_supervision_and_clock(Vec::new(), &local_spec(), clock)
            .unwrap();
        let guard = hm.mark_start(&request()).unwrap();
        let due = hm.next_deadline().expect("start + max");
        t.store(499, Ordering::SeqCst);
        assert_eq!(hm.poll().unwrap(), Some(GlobalStatus::Ok));
        assert_eq!(hm.next_deadline(), Some(due));
        t.store(500, Ordering::SeqCst);
        let err = hm.poll().unwrap_err();
        assert!(
            err.to_string().contains("no end req-end within 500 ms"),
            "{err}"
        );
        // The late end changes nothing more; the guard is spent.
        guard.mark_end().unwrap();
        let snap = hm.snapshot().unwrap();
        assert_eq!(snap.status, GlobalStatus::Expired);
        assert!(text(hm).ends_with("WATCHDOG=trigger\nCHECKPOINT=req-end\n"));
    }

    #[test]
    fn local_mode_refuses_an_invalid_spec() {
        let mut spec = local_spec();
        spec.deadline[0].range = TimeRange::new(ms(600), ms(500));
        let err = HealthMonitor::with_local_supervision(Vec::new(), &spec).unwrap_err();
        assert_eq!(
            err.to_string(),
            "local supervision: deadline 'request': min=600 ms is greater than max=500 ms"
        );
    }
}
