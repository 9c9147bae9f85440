//! The agent's notify socket: systemd's notify protocol, served in the guest, so that a daemon
//! written for `sd_notify(3)` (libsystemd, the `systemd-notify` command, the sd-notify
//! libraries of every language) is supervised from the host with no change: start it with
//! `NOTIFY_SOCKET` pointing here.
//!
//! A datagram holds newline-separated `KEY=VALUE` assignments. What they mean to the host's
//! watchdog is relayed over the agent's one channel, in order, as protocol lines:
//!
//! | assignment | relayed as |
//! |---|---|
//! | `WATCHDOG=1` | `WATCHDOG=1` |
//! | `WATCHDOG=trigger` | `WATCHDOG=trigger` (the host fires at once) |
//! | `WATCHDOG_USEC=N` | `WATCHDOG_USEC=N` (within the host's bounds) |
//! | `EXTEND_TIMEOUT_USEC=N` | `EXTEND_TIMEOUT_USEC=N` |
//! | `STATUS=text` | `STATUS=text` |
//! | `READY=1` | `CONDITION=<ready condition>=1` (a guest condition the host can link) |
//! | `STOPPING=1` | `STOPPING=1` (a planned stop: the host suspends supervision) |
//! | `CHECKPOINT=`, `CONDITION=` | as they are (awd's own lines) |
//!
//! Other keys systemd defines (`MAINPID=`, `RELOADING=1`, `ERRNO=`, `FDSTORE=1`, …) and keys
//! nobody defines mean nothing to the host: they are ignored, as systemd ignores unknown ones,
//! and counted. A datagram is relayed whole or not at all: one that is not UTF-8, holds a line
//! without `=` or a known key with a bad value (`WATCHDOG=0`, `READY=yes`, `WATCHDOG_USEC=abc`)
//! is dropped and counted as malformed, one longer than [`MAX_DATAGRAM`] (systemd's own limit)
//! as oversized. Descriptors passed along (`FDSTORE=1`) are never received, so the kernel
//! closes them.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::protocol::{Message, parse_line};

use super::AgentError;
use super::limits::MAX_DATAGRAM;
use super::local::{SocketFile, place_socket};

/// The notify socket's path in the guest unless told otherwise (`NOTIFY_SOCKET=` for daemons).
pub const DEFAULT_NOTIFY_SOCKET: &str = "/run/awd-agent.notify";
/// The guest condition `READY=1` sets unless told otherwise.
pub const DEFAULT_READY_CONDITION: &str = "ready";

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Longer than [`MAX_DATAGRAM`] bytes.
    #[error("datagram of {0} bytes, more than {MAX_DATAGRAM}")]
    Oversized(usize),
    /// Not UTF-8.
    #[error("datagram is not UTF-8")]
    NotUtf8,
    /// A line with no `=`.
    #[error("'{0}' is not a KEY=VALUE assignment")]
    NotAssignment(String),
    /// A key the host cares about, with a value that does not parse.
    #[error("bad value in '{0}'")]
    BadValue(String),
}

/// What one datagram asks the agent to relay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translated {
    /// The messages for the host, in the datagram's order (maybe none).
    pub messages: Vec<Message>,
    /// Assignments that mean nothing to the host.
    pub ignored: usize,
}

/// Translates one datagram. `ready` is the condition `READY=1` sets (`None`: ignore it).
pub fn translate(dgram: &[u8], ready: Option<&str>) -> Result<Translated, Malformed> {
    if dgram.len() > MAX_DATAGRAM {
        return Err(Malformed::Oversized(dgram.len()));
    }
    let text = std::str::from_utf8(dgram).map_err(|_| Malformed::NotUtf8)?;
    let mut out = Translated::default();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let Some((key, value)) = line.split_once('=') else {
            return Err(Malformed::NotAssignment(shorten(line)));
        };
        let bad = || Malformed::BadValue(shorten(line));
        let message = match (key, value) {
            ("WATCHDOG", "1") => Message::Heartbeat,
            ("WATCHDOG", "trigger") => Message::Trigger,
            ("WATCHDOG", _) => return Err(bad()),
            ("READY", "1") => match ready {
                Some(name) => Message::Condition(name.into(), true),
                None => {
                    out.ignored += 1;
                    continue;
                }
            },
            ("READY", _) => return Err(bad()),
            (
                "WATCHDOG_USEC"
                | "EXTEND_TIMEOUT_USEC"
                | "STOPPING"
                | "STATUS"
                | "CHECKPOINT"
                | "CONDITION",
                _,
            ) => match parse_line(line.as_bytes()) {
                Message::Rejected(_) => return Err(bad()),
                m => m,
            },
            _ => {
                out.ignored += 1;
                continue;
            }
        };
        out.messages.push(message);
    }
    Ok(out)
}

/// At most 60 characters of `s`, for log lines about hostile input.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// The bound notify socket. Its file is removed when dropped.
#[derive(Debug)]
pub(super) struct NotifySocket {
    pub(super) socket: UnixDatagram,
    _file: SocketFile,
}

/// Binds the notify socket at `path`, mode 0660, replacing a stale one (see
/// [`place_socket`]).
pub(super) fn bind_notify(path: &Path) -> Result<NotifySocket, AgentError> {
    let (socket, file) = place_socket(
        path,
        |p| UnixDatagram::unbound().and_then(|s| s.connect(p)).is_ok(),
        |p| UnixDatagram::bind(p),
    )?;
    socket
        .set_nonblocking(true)
        .map_err(|source| AgentError::SocketBind {
            path: path.to_owned(),
            source,
        })?;
    Ok(NotifySocket {
        socket,
        _file: file,
    })
}

/// One datagram received, or why there is none.
#[derive(Debug)]
pub(super) enum Received {
    /// A datagram of `len` bytes; if `len` exceeds the buffer, it was cut (and is oversized).
    Datagram(usize),
    /// Nothing waiting.
    Empty,
}

impl NotifySocket {
    /// Receives one datagram into `buf` without blocking; returns its real length even when it
    /// was longer than `buf` (`MSG_TRUNC`), so oversized ones are told from full ones.
    pub(super) fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                return Ok(Received::Datagram(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(Received::Empty),
                _ => return Err(e),
            }
        }
    }
}

/// A log line at most every [`GATE`](LogGate::GATE), with how many were held back: a daemon that
/// sends garbage in a loop must not flood the guest's console.
#[derive(Debug, Default)]
pub(super) struct LogGate {
    last: Option<Instant>,
    held: u64,
}

impl LogGate {
    const GATE: Duration = Duration::from_secs(10);

    /// Whether to log now; `Some(n)` with the number of lines held back since the last one.
    pub(super) fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < Self::GATE => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(d: &str) -> Vec<Message> {
        let t = translate(d.as_bytes(), Some("ready")).unwrap();
        t.messages
    }

    #[test]
    fn what_systemd_notify_sends_is_relayed_as_protocol_lines() {
        assert_eq!(ok("WATCHDOG=1"), [Message::Heartbeat]);
        assert_eq!(
            ok("WATCHDOG=1\n"),
            [Message::Heartbeat],
            "a trailing newline"
        );
        assert_eq!(
            ok("READY=1\nSTATUS=serving 3 clients\nMAINPID=42\nWATCHDOG_USEC=5000000"),
            [
                Message::Condition("ready".into(), true),
                Message::Status("serving 3 clients".into()),
                Message::SetTimeout(Duration::from_secs(5)),
            ]
        );
        assert_eq!(
            ok("STOPPING=1\nSTATUS=shutting down"),
            [Message::Stopping, Message::Status("shutting down".into())]
        );
        assert_eq!(
            ok("EXTEND_TIMEOUT_USEC=20000000"),
            [Message::ExtendTimeout(Duration::from_secs(20))]
        );
        assert_eq!(ok("WATCHDOG=trigger"), [Message::Trigger]);
        assert_eq!(
            ok("CHECKPOINT=loaded\nCONDITION=db=0"),
            [
                Message::Checkpoint("loaded".into()),
                Message::Condition("db".into(), false)
            ]
        );
    }

    #[test]
    fn keys_that_mean_nothing_to_the_host_are_ignored_and_counted() {
        let t = translate(
            b"MAINPID=42\nRELOADING=1\nMONOTONIC_USEC=1\nERRNO=5\nFDSTORE=1\nX_MINE=1\n",
            Some("ready"),
        )
        .unwrap();
        assert_eq!(
            t,
            Translated {
                messages: vec![],
                ignored: 6
            }
        );
        let t = translate(b"READY=1", None).unwrap();
        assert_eq!(
            t,
            Translated {
                messages: vec![],
                ignored: 1
            },
            "no ready condition"
        );
        assert_eq!(translate(b"", Some("r")).unwrap(), Translated::default());
    }

    #[test]
    fn a_datagram_with_one_bad_assignment_is_dropped_whole() {
        let bad: [(&[u8], &str); 9] = [
            (b"WATCHDOG=1\nWATCHDOG=0", "bad value in 'WATCHDOG=0'"),
            (b"READY=yes", "bad value in 'READY=yes'"),
            (b"WATCHDOG_USEC=abc", "bad value in 'WATCHDOG_USEC=abc'"),
            (
                b"EXTEND_TIMEOUT_USEC=0",
                "bad value in 'EXTEND_TIMEOUT_USEC=0'",
            ),
            (b"STOPPING=0", "bad value in 'STOPPING=0'"),
            (b"STATUS=a\rb", "bad value in 'STATUS=a\rb'"),
            (b"CHECKPOINT=a b", "bad value in 'CHECKPOINT=a b'"),
            (
                b"WATCHDOG=1\nhello",
                "'hello' is not a KEY=VALUE assignment",
            ),
            (b"\xff\xfe", "datagram is not UTF-8"),
        ];
        for (d, why) in bad {
            assert_eq!(
                translate(d, Some("ready")).unwrap_err().to_string(),
                why,
                "{d:?}"
            );
        }
        let big = vec![b'a'; MAX_DATAGRAM + 1];
        assert_eq!(
            translate(&big, Some("ready")),
            Err(Malformed::Oversized(MAX_DATAGRAM + 1))
        );
        let long = format!("STATUS={}", "x".repeat(MAX_DATAGRAM - 7));
        assert_eq!(ok(&long).len(), 1, "exactly the limit is fine");
    }

    #[test]
    fn every_relayed_message_encodes() {
        let long = format!("STATUS={}", "é".repeat(2000));
        for m in ok(&format!("{long}\nWATCHDOG_USEC=1\nREADY=1\nSTOPPING=1")) {
            assert!(m.encode().is_ok(), "{m:?}");
        }
    }

    #[test]
    fn the_log_gate_lets_one_line_through_per_ten_seconds() {
        let t0 = Instant::now();
        let mut g = LogGate::default();
        assert_eq!(g.allow(t0), Some(0));
        assert_eq!(g.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(g.allow(t0 + Duration::from_secs(2)), None);
        assert_eq!(g.allow(t0 + Duration::from_secs(10)), Some(2));
    }
}
