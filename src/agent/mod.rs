//! The guest agent behind `awd-agent`: writes a heartbeat line every interval to the host, and
//! relays protocol lines from guest programs.
//!
//! Targets:
//!
//! | target | channel |
//! |---|---|
//! | `port:NAME` | the virtio-serial port named NAME (found in `/sys/class/virtio-ports/*/name`) |
//! | `tcp:HOST:PORT` | a TCP connection |
//! | `unix:PATH` | a Unix socket |
//! | `vsock:CID:PORT` | an AF_VSOCK stream (the host is CID 2) |
//!
//! The agent never blocks on the host: writes are non-blocking, a heartbeat that cannot be
//! written is skipped (and counted), and a lost connection is reopened on the next tick. It
//! uses only std and libc, so the static binary stays small.
//!
//! Two options serve benchmarks: `reply_pulses` answers each AWD pulse at once (the host
//! measures the round trip), and [`Agent::flood`] (`--interval 0`) is a load mode that writes
//! a number of lines as fast as the channel takes them, with blocking writes.
//!
//! ## The local socket
//!
//! The running agent also listens on a Unix socket in the guest ([`DEFAULT_SOCKET`], mode
//! 0660), so that guest programs and `awd-agent checkpoint …` report through the one channel the
//! agent holds open. A client writes protocol lines; the agent answers each with `OK\n` or
//! `ERR reason\n` ([`Refusal`]) and writes accepted lines to the host at once, in the order they
//! came, between heartbeats. Only the lines of the protocol that mean something to the host are
//! relayed ([`relayable`]): `CHECKPOINT=`, `CONDITION=`, `STATUS=`, `WATCHDOG=1`,
//! `WATCHDOG=trigger` and `WATCHDOG_USEC=`. A line the host side cannot take right now is
//! dropped, like a heartbeat, and refused with `ERR host unreachable`. [`relay`] is the client
//! side.
//!
//! Clients are hostile too: a line is at most [`MAX_LINE`] bytes (a longer one is read and
//! dropped in a streaming fashion), at most [`MAX_CLIENTS`] are served at once, each wake-up
//! reads a bounded amount from each, and a client that does not read its replies loses them.
//! Everything runs in the one poll(2) loop that also waits for the next heartbeat, so no client
//! can delay a heartbeat.

//!
//! ## The notify socket
//!
//! With [`AgentConfig::notify`] the agent also serves systemd's notify protocol on a datagram
//! socket ([`notify`], mode 0660), so an unmodified `sd_notify` daemon started with
//! `NOTIFY_SOCKET` pointing there is supervised from the host: its `WATCHDOG=1`,
//! `WATCHDOG=trigger`, `WATCHDOG_USEC=`, `EXTEND_TIMEOUT_USEC=`, `STATUS=`, `READY=1` and
//! `STOPPING=1` go to the host as protocol lines, one write per datagram. The agent then sends
//! no heartbeat of its own (it only keeps the channel open), so the daemon's silence is what
//! the host hears. Datagrams are served in the same poll(2) loop, a bounded number per
//! wake-up; bad ones are dropped, counted and logged at most every 10 s.

pub mod limits;
pub(crate) mod local;
pub mod notify;
pub mod relay;
mod target;

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::protocol::{Decoder, MAX_LINE, Message};

pub use limits::MAX_CLIENTS;
use limits::{MAX_DATAGRAM, NOTIFY_BUDGET, NOTIFY_HOLD, READ_BUDGET, REOPEN_GAP};
pub use local::{DEFAULT_SOCKET, LocalSocket, Refusal, relayable};
use local::{LocalClient, LocalListener, bind_local};
pub use notify::{DEFAULT_NOTIFY_SOCKET, DEFAULT_READY_CONDITION};
use notify::{LogGate, Malformed, NotifySocket, Received, bind_notify, translate};
use target::{Conn, open, set_blocking};
pub use target::{Target, TargetError, find_port};

/// How the agent behaves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where heartbeats go.
    pub target: Target,
    /// Time between heartbeats.
    pub interval: Duration,
    /// The line sent each time (without newline).
    pub message: String,
    /// Send `message` as it is, without the newline that ends a line: input that never
    /// completes a line (tests of "any byte proves life").
    pub raw: bool,
    /// Stop after this many heartbeats were written (tests, one-shot use).
    pub count: Option<u64>,
    /// Exit with an error when no input came from the host for this long (the host watchdog is
    /// gone). Any byte counts, as on the host side; AWD pulses are what a live host sends.
    pub expect_pulses: Option<Duration>,
    /// Answer each AWD pulse at once with an `advanced-watchdog reply pulse` frame, so the
    /// host can measure the round trip (`awd_pulse_rtt_seconds`).
    pub reply_pulses: bool,
    /// The local socket for guest programs (`None`: none).
    pub socket: Option<LocalSocket>,
    /// The notify socket for `sd_notify` daemons (`None`: none). With it the agent sends no
    /// heartbeats of its own: the daemon's are what the host hears.
    pub notify: Option<NotifyConfig>,
    /// `tcp:` targets: the pre-shared key of the host's `psk=` channel; every connection is
    /// authenticated and every message sealed (`docs/protocol.md`).
    pub psk: Option<crate::auth::Key>,
}

/// The notify socket ([`notify`]): where, and the condition `READY=1` sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyConfig {
    /// Its path (`NOTIFY_SOCKET=` for the daemon); a stale socket there is replaced.
    pub path: PathBuf,
    /// The guest condition `READY=1` sets (`None`: `READY=1` is ignored).
    pub ready_condition: Option<String>,
}

/// Why the agent stopped with an error, or why a line sent through it did not get through.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// `--expect-pulses` and the pulses stopped.
    #[error("no pulse from the host for {0:?}: the host watchdog is gone")]
    PulsesStopped(Duration),
    /// [`Agent::flood`] could not open or write to the host channel.
    #[error("flooding {target} failed")]
    Flood {
        /// The target.
        target: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// poll(2) failed.
    #[error("poll failed")]
    Poll(#[source] io::Error),
    /// The local socket could not be set up.
    #[error("cannot listen on {}", path.display())]
    SocketBind {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Another agent answers on the local socket already.
    #[error("{} is in use by another running agent", .0.display())]
    SocketInUse(PathBuf),
    /// The client found no agent on the local socket.
    #[error("cannot reach the agent at {} (is `awd-agent --to …` running?)", path.display())]
    SocketConnect {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Talking to the agent failed midway.
    #[error("talking to the agent at {} failed", path.display())]
    SocketIo {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The client refused to send a line the agent would refuse.
    #[error("cannot send '{line}': {reason}")]
    LineInvalid {
        /// The line, shortened.
        line: String,
        /// What the agent would answer to it.
        reason: Refusal,
    },
    /// The agent answered `ERR reason`.
    #[error("the agent refused '{line}': {reason}")]
    LineRefused {
        /// The line, shortened.
        line: String,
        /// The agent's reason.
        reason: String,
    },
    /// The agent did not answer in time.
    #[error("no reply from the agent at {} within {:?}", path.display(), limits::REPLY_TIMEOUT)]
    ReplyTimeout {
        /// The socket's path.
        path: PathBuf,
    },
    /// The agent closed the connection without answering, or answered something else.
    #[error("no valid reply from the agent at {} (got '{reply}')", path.display())]
    ReplyInvalid {
        /// The socket's path.
        path: PathBuf,
        /// What came back, shortened.
        reply: String,
    },
}

/// At most 60 characters of `s`, for error messages about lines of any length.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Counters the agent keeps, printed when it stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AgentStats {
    /// Heartbeats written in full.
    pub sent: u64,
    /// Heartbeats skipped because the host side was absent or not reading.
    pub skipped: u64,
    /// Pulses received from the host.
    pub pulses: u64,
    /// Pulse replies written (`reply_pulses`).
    pub replies: u64,
    /// Connections opened.
    pub connects: u64,
    /// Lines from local clients written to the host.
    pub relayed: u64,
    /// Lines (and connections) from local clients refused, the host being absent included.
    pub refused: u64,
    /// Datagrams received on the notify socket.
    pub notify_datagrams: u64,
    /// Messages from notify datagrams written to the host.
    pub notify_relayed: u64,
    /// Notify assignments that mean nothing to the host (`MAINPID=`, unknown keys).
    pub notify_ignored: u64,
    /// Notify datagrams dropped as malformed (not UTF-8, not `KEY=VALUE`, a bad value).
    pub notify_malformed: u64,
    /// Notify datagrams dropped for being longer than [`MAX_DATAGRAM`].
    pub notify_oversized: u64,
    /// Messages from notify datagrams dropped because the host could not take them.
    pub notify_unrelayed: u64,
}

/// What [`Agent::flood`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloodReport {
    /// Lines written.
    pub lines: u64,
    /// Bytes written.
    pub bytes: u64,
    /// From the first write's start to the last write's return.
    pub elapsed: Duration,
}

/// How far a message got to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// All of it.
    Whole,
    /// A part; the rest is in `Agent::out` and goes before anything else.
    Started,
    /// Nothing: no connection, the host is not reading, or the connection broke.
    Not,
}

/// The agent: a connection to the host, a pending partial write, the local socket and its
/// clients, and counters.
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    /// The heartbeat line with its newline, built once.
    beat_line: Vec<u8>,
    conn: Option<Conn>,
    /// The unwritten tail of a message the host has partly received. It is finished before
    /// anything else is written, so lines never interleave.
    out: Vec<u8>,
    /// Whether `out` is a heartbeat's tail (counted as sent when it completes).
    out_is_beat: bool,
    decoder: Decoder,
    stats: AgentStats,
    last_pulse: Instant,
    last_error: Option<String>,
    /// When opening the host channel last failed.
    last_open_failure: Option<Instant>,
    listener: Option<LocalListener>,
    clients: Vec<LocalClient>,
    notify: Option<NotifySocket>,
    /// A datagram's lines the host could not take yet, with their message count and since
    /// when; while it is held the notify socket is not read (see [`NOTIFY_HOLD`]).
    notify_pending: Option<(Vec<u8>, u64, Instant)>,
    /// A held datagram waited [`NOTIFY_HOLD`] in vain: until the host takes a write again,
    /// datagrams it cannot take are dropped at once, so a hung host does not slow the daemon.
    notify_stuck: bool,
    /// Rate-limits the log lines about dropped notify datagrams.
    notify_log: LogGate,
    /// The authenticated session of the open connection, with `psk`.
    auth: Option<Auth>,
}

/// One authenticated connection's state: a session per direction (each keeps its own sequence
/// numbers) and the bytes of a frame not yet complete.
#[derive(Debug)]
struct Auth {
    opener: crate::auth::Session,
    sealer: crate::auth::Session,
    inbound: Vec<u8>,
}

impl Agent {
    /// A new agent; nothing is opened until [`run`](Self::run).
    pub fn new(cfg: AgentConfig) -> Self {
        let mut beat_line = cfg.message.clone().into_bytes();
        if !cfg.raw {
            beat_line.push(b'\n');
        }
        Agent {
            cfg,
            beat_line,
            conn: None,
            out: Vec::new(),
            out_is_beat: false,
            decoder: Decoder::new(),
            stats: AgentStats::default(),
            last_pulse: Instant::now(),
            last_error: None,
            last_open_failure: None,
            listener: None,
            clients: Vec::new(),
            notify: None,
            notify_pending: None,
            notify_stuck: false,
            notify_log: LogGate::default(),
            auth: None,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> AgentStats {
        self.stats
    }

    fn note_error(&mut self, what: &str, e: &io::Error) {
        let msg = format!("{what}: {e}");
        if self.last_error.as_deref() != Some(&msg) {
            eprintln!("awd-agent: {msg}");
            self.last_error = Some(msg);
        }
    }

    fn ensure_open(&mut self) {
        if self.conn.is_some() {
            return;
        }
        let opened = open(&self.cfg.target).and_then(|c| {
            let auth = match (&self.cfg.psk, &c) {
                (Some(key), target::Conn::Tcp(s)) => {
                    let session = target::authenticate(s, key)?;
                    Some(Auth {
                        opener: session.clone(),
                        sealer: session,
                        inbound: Vec::new(),
                    })
                }
                _ => None,
            };
            Ok((c, auth))
        });
        match opened {
            Ok((c, auth)) => {
                self.auth = auth;
                self.stats.connects += 1;
                self.last_error = None;
                self.last_open_failure = None;
                eprintln!("awd-agent: connected to {}", self.cfg.target);
                self.conn = Some(c);
                self.out.clear();
                self.out_is_beat = false;
                self.decoder = Decoder::new();
            }
            Err(e) => {
                self.last_open_failure = Some(Instant::now());
                self.note_error(&format!("cannot open {}", self.cfg.target), &e);
            }
        }
    }

    fn drop_conn(&mut self, why: &str) {
        self.auth = None;
        if self.conn.take().is_some() {
            eprintln!("awd-agent: {} closed: {why}", self.cfg.target);
        }
        if !self.out.is_empty() && self.out_is_beat {
            self.stats.skipped += 1;
        }
        self.out.clear();
        self.out_is_beat = false;
    }

    /// Writes the rest of a partly written message. True when nothing is left. Never blocks.
    fn flush_host(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        while !self.out.is_empty() {
            let Some(conn) = self.conn.as_mut() else {
                return false;
            };
            match conn.write(&self.out) {
                Ok(0) => return false,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    let why = e.to_string();
                    self.drop_conn(&why);
                    return false;
                }
            }
        }
        if std::mem::take(&mut self.out_is_beat) {
            self.stats.sent += 1;
        }
        true
    }

    /// Writes one message to the host after whatever is pending. Never blocks, never queues a
    /// message that has not started: one the host cannot take now is dropped.
    fn write_host(&mut self, msg: &[u8], is_beat: bool) -> Written {
        let Some(auth) = &mut self.auth else {
            return self.write_host_raw(msg, is_beat);
        };
        // A frame that is not sent at all must not use up its sequence number, or the host
        // would take the next one for a replay.
        let before = auth.sealer.clone();
        let frame = auth.sealer.seal_all(msg);
        let written = self.write_host_raw(&frame, is_beat);
        if let (Written::Not, Some(auth)) = (written, &mut self.auth) {
            auth.sealer = before;
        }
        written
    }

    /// [`write_host`](Self::write_host) of bytes as they go on the wire.
    fn write_host_raw(&mut self, msg: &[u8], is_beat: bool) -> Written {
        if !self.flush_host() {
            return Written::Not;
        }
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Written::Not;
            };
            return match conn.write(msg) {
                Ok(n) if n == msg.len() => Written::Whole,
                Ok(0) => Written::Not,
                Ok(n) => {
                    self.out.extend_from_slice(&msg[n..]);
                    self.out_is_beat = is_beat;
                    Written::Started
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The host side is absent or not reading: skip, do not queue.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Written::Not,
                Err(e) => {
                    let why = e.to_string();
                    self.drop_conn(&why);
                    Written::Not
                }
            };
        }
    }

    /// Writes one heartbeat (after the rest of a partly written message). Never blocks. With a
    /// notify socket only (re)opens the channel: the daemon's heartbeats are the ones that count.
    fn beat(&mut self) {
        self.ensure_open();
        if self.cfg.notify.is_some() {
            return;
        }
        let line = std::mem::take(&mut self.beat_line);
        let written = self.write_host(&line, true);
        self.beat_line = line;
        match written {
            Written::Whole => self.stats.sent += 1,
            Written::Started => {} // counted when it completes, or as skipped when lost
            Written::Not => self.stats.skipped += 1,
        }
    }

    /// Writes one checked line from a local client to the host, at once. Never blocks.
    fn relay(&mut self, line: &str) -> Result<(), Refusal> {
        let mut msg = Vec::with_capacity(line.len() + 1);
        msg.extend_from_slice(line.as_bytes());
        msg.push(b'\n');
        match self.relay_bytes(&msg) {
            Written::Whole | Written::Started => {
                self.stats.relayed += 1;
                Ok(())
            }
            Written::Not => Err(Refusal::HostUnreachable),
        }
    }

    /// Writes relayed lines to the host at once, reopening the channel first if it is closed
    /// (at most every [`REOPEN_GAP`]). Never blocks.
    fn relay_bytes(&mut self, msg: &[u8]) -> Written {
        if self.conn.is_none()
            && self
                .last_open_failure
                .is_none_or(|t| t.elapsed() >= REOPEN_GAP)
        {
            self.ensure_open();
        }
        self.write_host(msg, false)
    }

    /// Opens the notify socket, if configured and not open yet; failing is an error.
    fn listen_notify(&mut self) -> Result<(), AgentError> {
        if self.notify.is_some() {
            return Ok(());
        }
        let Some(cfg) = self.cfg.notify.as_ref() else {
            return Ok(());
        };
        let sock = bind_notify(&cfg.path)?;
        eprintln!(
            "awd-agent: notify socket on {} (NOTIFY_SOCKET={0}); heartbeats come from the daemon",
            cfg.path.display()
        );
        self.notify = Some(sock);
        Ok(())
    }

    /// Receives waiting notify datagrams (at most [`NOTIFY_BUDGET`]) and relays what each
    /// means to the host, a datagram's lines in one write; drops and counts the bad ones.
    fn serve_notify(&mut self) {
        if !self.flush_notify() {
            return;
        }
        let mut buf = [0u8; MAX_DATAGRAM];
        for _ in 0..NOTIFY_BUDGET {
            let Some(sock) = &self.notify else {
                return;
            };
            let len = match sock.recv(&mut buf) {
                Ok(Received::Datagram(n)) => n,
                Ok(Received::Empty) => return,
                Err(e) => {
                    self.note_error("cannot receive on the notify socket", &e);
                    return;
                }
            };
            self.stats.notify_datagrams += 1;
            let ready = self
                .cfg
                .notify
                .as_ref()
                .and_then(|n| n.ready_condition.as_deref());
            let translated = if len > buf.len() {
                Err(Malformed::Oversized(len))
            } else {
                translate(&buf[..len], ready)
            };
            let t = match translated {
                Ok(t) => t,
                Err(why) => {
                    match why {
                        Malformed::Oversized(_) => self.stats.notify_oversized += 1,
                        _ => self.stats.notify_malformed += 1,
                    }
                    self.notify_dropped(&why.to_string());
                    continue;
                }
            };
            self.stats.notify_ignored += t.ignored as u64;
            if t.messages.is_empty() {
                continue;
            }
            // Translated messages always encode (the fuzz target checks it), except with a
            // ready condition the caller did not validate: drop the datagram, never panic.
            let encoded: Result<Vec<Vec<u8>>, _> = t.messages.iter().map(Message::encode).collect();
            let msg = match encoded {
                Ok(parts) => parts.concat(),
                Err(e) => {
                    self.stats.notify_malformed += 1;
                    self.notify_dropped(&format!("cannot be relayed: {e}"));
                    continue;
                }
            };
            let n = t.messages.len() as u64;
            self.notify_pending = Some((msg, n, Instant::now()));
            if !self.flush_notify() {
                return; // the host is slow: the rest waits in the socket's queue
            }
        }
    }

    /// Writes the held datagram's lines, if any. True when nothing is held any more (written,
    /// or dropped because there is no connection or it was held for [`NOTIFY_HOLD`]).
    fn flush_notify(&mut self) -> bool {
        let Some((msg, n, since)) = self.notify_pending.take() else {
            return true;
        };
        match self.relay_bytes(&msg) {
            Written::Whole | Written::Started => {
                self.stats.notify_relayed += n;
                self.notify_stuck = false;
                true
            }
            Written::Not
                if self.conn.is_some() && !self.notify_stuck && since.elapsed() < NOTIFY_HOLD =>
            {
                self.notify_pending = Some((msg, n, since));
                false
            }
            Written::Not => {
                self.notify_stuck = self.conn.is_some();
                self.stats.notify_unrelayed += n;
                self.notify_dropped("the host channel cannot take it");
                true
            }
        }
    }

    /// Logs a dropped notify datagram, at most once per 10 s.
    fn notify_dropped(&mut self, why: &str) {
        if let Some(held) = self.notify_log.allow(Instant::now()) {
            let st = &self.stats;
            let held = match held {
                0 => String::new(),
                n => format!(", {n} more lines held back"),
            };
            eprintln!(
                "awd-agent: notify datagram dropped: {why} (so far: {} malformed, {} oversized, \
                 {} messages unrelayed{held})",
                st.notify_malformed, st.notify_oversized, st.notify_unrelayed
            );
        }
    }

    /// Reads whatever the host sent (pulses) without blocking.
    fn drain_input(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            match conn.read(&mut buf) {
                Ok(0) => {
                    // A virtio-serial port reads 0 while the host side is closed; a socket at EOF.
                    if !matches!(self.cfg.target, Target::Port(_)) {
                        self.drop_conn("closed by the host");
                    }
                    return;
                }
                Ok(n) => {
                    // On an authenticated connection only verified payloads are input.
                    let plain = match &mut self.auth {
                        None => buf[..n].to_vec(),
                        Some(auth) => {
                            auth.inbound.extend_from_slice(&buf[..n]);
                            let mut plain = Vec::new();
                            loop {
                                match auth.opener.open(&mut auth.inbound) {
                                    Ok(Some(p)) => plain.extend(p),
                                    Ok(None) => break,
                                    Err(e) => {
                                        self.drop_conn(&format!("rejected: {e}"));
                                        return;
                                    }
                                }
                            }
                            if plain.is_empty() {
                                continue;
                            }
                            plain
                        }
                    };
                    // Any input from the host proves it alive, a partial pulse frame too: only
                    // complete pulses are counted and answered.
                    self.last_pulse = Instant::now();
                    let mut pulses = 0;
                    self.decoder.feed(&plain, |m| {
                        if m == Message::Pulse {
                            pulses += 1;
                        }
                    });
                    if pulses > 0 {
                        self.stats.pulses += pulses;
                        if self.cfg.reply_pulses {
                            self.reply_pulses(pulses);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let why = e.to_string();
                    self.drop_conn(&why);
                    return;
                }
            }
        }
    }

    /// Answers `n` pulses at once, one reply frame each, after whatever is pending. Never
    /// blocks: a reply the host cannot take now is dropped, like a heartbeat.
    fn reply_pulses(&mut self, n: u64) {
        let reply = Message::PulseReply
            .encode()
            .expect("a pulse reply always encodes");
        for _ in 0..n {
            match self.write_host(&reply, false) {
                Written::Whole | Written::Started => self.stats.replies += 1,
                Written::Not => return,
            }
        }
    }

    /// Opens the local socket, if configured and not open yet. A failure is an error only when
    /// the socket is [`required`](LocalSocket::required); otherwise it is logged and the agent
    /// goes on with heartbeats alone.
    fn listen(&mut self) -> Result<(), AgentError> {
        if self.listener.is_some() {
            return Ok(());
        }
        let Some(sock) = self.cfg.socket.as_ref() else {
            return Ok(());
        };
        match bind_local(&sock.path) {
            Ok(l) => {
                eprintln!("awd-agent: listening on {}", sock.path.display());
                self.listener = Some(l);
                Ok(())
            }
            Err(e) if !sock.required => {
                let source = std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                eprintln!("awd-agent: warning: {e}{source}; going on without the local socket");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Accepts waiting local clients, up to [`MAX_CLIENTS`] per call. False when accepting
    /// fails in a way that would repeat at once (out of descriptors): stop polling the
    /// listener for this wait.
    fn accept_clients(&mut self) -> bool {
        for _ in 0..MAX_CLIENTS {
            let accepted = match &self.listener {
                Some(l) => l.listener.accept(),
                None => return true,
            };
            match accepted {
                Ok((s, _)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        let _ = s.set_nonblocking(true);
                        let _ = (&s).write(format!("ERR {}\n", Refusal::TooManyClients).as_bytes());
                        self.stats.refused += 1;
                    } else if s.set_nonblocking(true).is_ok() {
                        self.clients.push(LocalClient::new(s));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    self.note_error("cannot accept on the local socket", &e);
                    return false;
                }
            }
        }
        true
    }

    /// Reads what a client sent (a bounded amount), relays its complete lines and queues the
    /// answers, then writes what answers the socket takes.
    pub(crate) fn serve_client(&mut self, c: &mut LocalClient) {
        let mut buf = [0u8; 8192];
        let mut budget = READ_BUDGET;
        while budget > 0 && !c.eof && !c.dead {
            match (&c.stream).read(&mut buf) {
                Ok(0) => {
                    c.eof = true;
                    // A last line without its newline still counts.
                    if !c.line.is_empty() && !c.discarding {
                        let line = std::mem::take(&mut c.line);
                        self.client_line(c, &line);
                    }
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    self.client_input(c, &buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => c.dead = true,
            }
        }
        c.flush();
    }

    /// Splits a client's bytes into lines, keeping at most [`MAX_LINE`] of a line: an
    /// over-long one is refused when it gets too long and the rest of it is dropped unread.
    fn client_input(&mut self, c: &mut LocalClient, mut input: &[u8]) {
        while !input.is_empty() {
            let (chunk, complete) = match input.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let chunk = &input[..pos];
                    input = &input[pos + 1..];
                    (chunk, true)
                }
                None => (std::mem::take(&mut input), false),
            };
            if c.discarding {
                c.discarding = !complete;
                continue;
            }
            if c.line.len() + chunk.len() > MAX_LINE {
                c.line.clear();
                c.discarding = !complete;
                self.stats.refused += 1;
                c.answer(Err(Refusal::LineTooLong));
                continue;
            }
            c.line.extend_from_slice(chunk);
            if complete {
                let line = std::mem::take(&mut c.line);
                self.client_line(c, &line);
                c.line = line;
                c.line.clear();
            }
        }
    }

    /// Checks and relays one line from a client, and queues the answer.
    fn client_line(&mut self, c: &mut LocalClient, raw: &[u8]) {
        let r = relayable(raw).and_then(|line| self.relay(line));
        if r.is_err() {
            self.stats.refused += 1;
        }
        c.answer(r);
    }

    /// Waits until `until`, reading host input as it arrives, flushing a partly written
    /// message when the host can take it, and serving local clients.
    fn wait(&mut self, until: Instant) -> Result<(), AgentError> {
        // The host's descriptor reported a hang-up that reading does not clear (a
        // virtio-serial port whose host side is closed): poll would spin, so leave it out
        // until `until`.
        let mut host_quiet = false;
        // Accepting failed (out of descriptors): leave the listener out until `until`.
        let mut listener_quiet = false;
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3 + MAX_CLIENTS);
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            // A held notify datagram is retried when the host can take it, or dropped once
            // held for too long, whichever comes first.
            let mut wake = until;
            if let Some((_, _, since)) = &self.notify_pending {
                if now >= *since + NOTIFY_HOLD {
                    self.serve_notify();
                }
                if let Some((_, _, since)) = &self.notify_pending {
                    wake = wake.min(*since + NOTIFY_HOLD);
                }
            }
            let ms = (wake.saturating_duration_since(now))
                .as_millis()
                .min(i32::MAX as u128) as i32;
            fds.clear();
            let host_fd = match &self.conn {
                Some(c) if !host_quiet => c.fd(),
                _ => -1, // poll(2) ignores negative descriptors
            };
            let mut host_events = libc::POLLIN;
            if !self.out.is_empty() || self.notify_pending.is_some() {
                host_events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: host_fd,
                events: host_events,
                revents: 0,
            });
            fds.push(libc::pollfd {
                fd: match &self.listener {
                    Some(l) if !listener_quiet => l.listener.as_raw_fd(),
                    _ => -1,
                },
                events: libc::POLLIN,
                revents: 0,
            });
            fds.push(libc::pollfd {
                fd: match (&self.notify, &self.notify_pending) {
                    (Some(n), None) => n.socket.as_raw_fd(),
                    _ => -1, // a datagram is held: later ones wait in the kernel's queue
                },
                events: libc::POLLIN,
                revents: 0,
            });
            for c in &self.clients {
                let mut events = 0;
                if !c.eof {
                    events |= libc::POLLIN;
                }
                if !c.reply.is_empty() {
                    events |= libc::POLLOUT;
                }
                fds.push(libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds that outlives the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms.max(1)) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(AgentError::Poll(e));
            }
            if r == 0 {
                continue;
            }
            // The host first: relaying below may drop and reopen the connection.
            let host = fds[0].revents;
            if host_fd >= 0 && host != 0 {
                if host & libc::POLLOUT != 0 {
                    self.flush_host();
                    if self.notify_pending.is_some() {
                        self.serve_notify();
                    }
                }
                if host & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.drain_input();
                }
                if host & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
                    && self.conn.is_some()
                {
                    host_quiet = true;
                }
            }
            // Then the notify socket's datagrams.
            if fds[2].revents != 0 {
                self.serve_notify();
            }
            // Then the clients, in the order they were polled; none is added meanwhile.
            let mut clients = std::mem::take(&mut self.clients);
            for (c, p) in clients.iter_mut().zip(&fds[3..]) {
                if p.revents & libc::POLLNVAL != 0 {
                    c.dead = true;
                    continue;
                }
                if p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !c.eof {
                    self.serve_client(c);
                } else if p.revents & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0 {
                    c.flush();
                    if p.revents & (libc::POLLHUP | libc::POLLERR) != 0 && !c.reply.is_empty() {
                        c.dead = true; // cannot write to it, and would be polled again at once
                    }
                }
            }
            clients.retain(|c| !c.done());
            self.clients = clients;
            // Then new clients, once the closed ones have made room.
            let lrev = fds[1].revents;
            if lrev & libc::POLLIN != 0 {
                listener_quiet = !self.accept_clients();
            } else if lrev != 0 {
                listener_quiet = true; // an error state that accepting would not clear
            }
        }
    }

    /// Load mode (`--interval 0`): opens the target, writes the heartbeat line `count` times
    /// (`None`: once) as fast as the channel takes them, with *blocking* writes, and returns
    /// how long the writes took. No local socket, no pulses: a benchmark's guest load, paced
    /// by the host side (on vsock, by its credit updates).
    pub fn flood(&mut self) -> Result<FloodReport, AgentError> {
        let err = |source| AgentError::Flood {
            target: self.cfg.target.to_string(),
            source,
        };
        let mut conn = open(&self.cfg.target).map_err(err)?;
        self.stats.connects += 1;
        eprintln!("awd-agent: connected to {}", self.cfg.target);
        set_blocking(conn.fd()).map_err(err)?;
        let lines = self.cfg.count.unwrap_or(1);
        let start = Instant::now();
        for _ in 0..lines {
            let mut rest = &self.beat_line[..];
            while !rest.is_empty() {
                match conn.write(rest) {
                    Ok(0) => return Err(err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(err(e)),
                }
            }
            self.stats.sent += 1;
        }
        Ok(FloodReport {
            lines,
            bytes: lines * self.beat_line.len() as u64,
            elapsed: start.elapsed(),
        })
    }

    /// Runs until `count` heartbeats were sent, or forever. With `expect_pulses`, fails when
    /// the host's pulses stop. Opens the local socket first, if configured.
    pub fn run(&mut self) -> Result<AgentStats, AgentError> {
        self.run_until(None)
    }

    /// [`run`](Self::run), also returning when `stop` is set (checked at least every 5 ms
    /// while it is given), so tests can end a running agent.
    fn run_until(&mut self, stop: Option<&AtomicBool>) -> Result<AgentStats, AgentError> {
        const STOP_CHECK: Duration = Duration::from_millis(5);
        self.listen()?;
        self.listen_notify()?;
        let mut next = Instant::now();
        self.last_pulse = Instant::now();
        loop {
            self.beat();
            if let Some(n) = self.cfg.count
                && self.stats.sent >= n
            {
                return Ok(self.stats);
            }
            next += self.cfg.interval;
            let now = Instant::now();
            if next < now {
                next = now; // late (the guest was paused): do not burst to catch up
            }
            match stop {
                None => self.wait(next)?,
                Some(stop) => loop {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(self.stats);
                    }
                    let now = Instant::now();
                    if now >= next {
                        break;
                    }
                    self.wait(next.min(now + STOP_CHECK))?;
                },
            }
            if let Some(limit) = self.cfg.expect_pulses
                && self.last_pulse.elapsed() > limit
            {
                return Err(AgentError::PulsesStopped(limit));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{PULSE, PULSE_REPLY, frame};
    use std::io::{BufRead, BufReader};
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::thread::JoinHandle;

    /// The bound on anything a test waits for.
    const LIMIT: Duration = Duration::from_secs(10);
    /// An interval long enough that no second heartbeat comes during a test.
    const HOUR: Duration = Duration::from_secs(3600);

    /// A running agent with its local socket, heartbeating (hourly) to a host that has heard
    /// the first heartbeat. The directory holds both sockets.
    fn running_with_host() -> (tempfile::TempDir, PathBuf, Host, Running) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let mut host = Host::bind(&dir.path().join("host.sock"));
        let agent = Running::start(config(
            Target::Unix(dir.path().join("host.sock")),
            Some(&sock),
            HOUR,
        ));
        assert_eq!(host.line(), "WATCHDOG=1");
        (dir, sock, host, agent)
    }

    /// A paired agent that heartbeats every 5 ms and wants a pulse every `every`.
    fn expecting_pulses(every: Duration) -> (Agent, UnixStream) {
        let mut cfg = config(
            Target::Unix("/unused".into()),
            None,
            Duration::from_millis(5),
        );
        cfg.expect_pulses = Some(every);
        paired(cfg)
    }

    /// A running agent with its local socket and no host listening.
    fn running_without_host() -> (tempfile::TempDir, PathBuf, Running) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let agent = Running::start(config(
            Target::Unix(dir.path().join("absent.sock")),
            Some(&sock),
            HOUR,
        ));
        (dir, sock, agent)
    }

    /// An agent already connected to one end of a socket pair; the other end is the host.
    fn paired(cfg: AgentConfig) -> (Agent, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut agent = Agent::new(cfg);
        agent.conn = Some(Conn::Unix(ours));
        (agent, theirs)
    }

    fn config(target: Target, socket: Option<&Path>, interval: Duration) -> AgentConfig {
        AgentConfig {
            target,
            interval,
            message: "WATCHDOG=1".into(),
            raw: false,
            count: None,
            expect_pulses: None,
            reply_pulses: false,
            psk: None,
            notify: None,
            socket: socket.map(|p| LocalSocket {
                path: p.to_owned(),
                required: true,
            }),
        }
    }

    /// A Unix "host" the agent connects to, read a line at a time with a timeout.
    struct Host {
        listener: UnixListener,
        conn: Option<BufReader<UnixStream>>,
    }

    impl Host {
        fn bind(path: &Path) -> Host {
            Host {
                listener: UnixListener::bind(path).unwrap(),
                conn: None,
            }
        }

        /// The agent's connection, once it has connected (within [`LIMIT`]).
        fn accept(&self) -> UnixStream {
            let mut pfd = libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, count 1.
            let r = unsafe { libc::poll(&mut pfd, 1, LIMIT.as_millis() as i32) };
            assert_eq!(r, 1, "the agent did not connect");
            self.listener.accept().unwrap().0
        }

        /// The next line the agent wrote, without its newline.
        fn line(&mut self) -> String {
            if self.conn.is_none() {
                let s = self.accept();
                s.set_read_timeout(Some(LIMIT)).unwrap();
                self.conn = Some(BufReader::new(s));
            }
            let mut l = String::new();
            self.conn.as_mut().unwrap().read_line(&mut l).unwrap();
            assert_eq!(l.pop(), Some('\n'), "{l:?}");
            l
        }
    }

    /// A raw local client, reading the agent's answers with a timeout.
    struct Client(BufReader<UnixStream>);

    impl Client {
        fn connect(path: &Path) -> Client {
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(LIMIT)).unwrap();
            s.set_write_timeout(Some(LIMIT)).unwrap();
            Client(BufReader::new(s))
        }

        fn send(&mut self, bytes: &[u8]) {
            self.0.get_mut().write_all(bytes).unwrap();
        }

        fn reply(&mut self) -> String {
            let mut l = String::new();
            self.0.read_line(&mut l).unwrap();
            assert_eq!(l.pop(), Some('\n'), "{l:?}");
            l
        }
    }

    /// An agent running its loop on a thread, its local socket bound before it starts.
    struct Running {
        stop: Arc<AtomicBool>,
        handle: Option<JoinHandle<(Agent, Result<AgentStats, AgentError>)>>,
    }

    impl Running {
        fn start(cfg: AgentConfig) -> Running {
            let mut agent = Agent::new(cfg);
            agent.listen().unwrap();
            agent.listen_notify().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let handle = std::thread::spawn(move || {
                let r = agent.run_until(Some(&flag));
                (agent, r)
            });
            Running {
                stop,
                handle: Some(handle),
            }
        }

        /// Stops the loop; it must have run without error.
        fn stop(mut self) -> (Agent, AgentStats) {
            self.stop.store(true, Ordering::Relaxed);
            let (agent, r) = self.handle.take().unwrap().join().unwrap();
            (agent, r.unwrap())
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
    }

    /// Runs the agent's wait loop until `done` holds, for at most [`LIMIT`].
    fn pump(agent: &mut Agent, done: impl Fn(&Agent) -> bool) {
        let end = Instant::now() + LIMIT;
        while !done(agent) {
            assert!(Instant::now() < end, "timed out: {:?}", agent.stats());
            agent
                .wait(Instant::now() + Duration::from_millis(2))
                .unwrap();
        }
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            "port:org.awd.0".parse::<Target>().unwrap(),
            Target::Port("org.awd.0".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:9009".parse::<Target>().unwrap(),
            Target::Tcp("127.0.0.1:9009".into())
        );
        assert_eq!(
            "vsock:2:9009".parse::<Target>().unwrap(),
            Target::Vsock { cid: 2, port: 9009 }
        );
        assert_eq!(
            "unix:/run/x".parse::<Target>().unwrap(),
            Target::Unix("/run/x".into())
        );
        for bad in [
            "",
            "port:",
            "tcp:host",
            "tcp::1",
            "vsock:2",
            "vsock:x:1",
            "serial:/dev/x",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_are_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (dev, name) in [("vport1p1", "other"), ("vport2p1", "org.awd.heartbeat.0")] {
            std::fs::create_dir(dir.path().join(dev)).unwrap();
            std::fs::write(dir.path().join(dev).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_port(dir.path(), "org.awd.heartbeat.0"),
            Some(PathBuf::from("/dev/vport2p1"))
        );
        assert_eq!(find_port(dir.path(), "nope"), None);
    }

    #[test]
    fn heartbeats_reach_a_unix_listener_and_an_absent_host_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut agent = Agent::new(config(
            Target::Unix(path.clone()),
            None,
            Duration::from_millis(1),
        ));
        agent.beat();
        assert_eq!(
            agent.stats().skipped,
            1,
            "no listener: skipped, not blocked"
        );
        let l = UnixListener::bind(&path).unwrap();
        agent.beat();
        agent.beat();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 22];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"WATCHDOG=1\nWATCHDOG=1\n");
        assert_eq!(agent.stats().sent, 2);
    }

    #[test]
    fn a_host_that_does_not_read_never_blocks_the_agent() {
        let mut cfg = config(
            Target::Unix("/unused".into()),
            None,
            Duration::from_millis(1),
        );
        cfg.message = "x".repeat(1000);
        let (mut agent, _theirs) = paired(cfg);
        for _ in 0..2000 {
            agent.beat();
        }
        let s = agent.stats();
        assert!(s.skipped > 0 && s.sent > 0, "{s:?}");
        let in_flight = u64::from(!agent.out.is_empty());
        assert_eq!(s.sent + s.skipped + in_flight, 2000);
    }

    #[test]
    fn pulses_are_counted_and_their_absence_is_an_error() {
        let (mut agent, mut theirs) = expecting_pulses(Duration::from_millis(50));
        theirs.write_all(&frame(PULSE.as_bytes())).unwrap();
        agent
            .wait(Instant::now() + Duration::from_millis(5))
            .unwrap();
        assert_eq!(agent.stats().pulses, 1);
        let err = agent.run().unwrap_err();
        assert!(matches!(err, AgentError::PulsesStopped(_)), "{err}");
    }

    #[test]
    fn any_byte_from_the_host_proves_it_alive_a_partial_pulse_too() {
        let (mut agent, mut theirs) = expecting_pulses(Duration::from_secs(60));
        let pulse = frame(PULSE.as_bytes());
        let before = Instant::now();
        agent.last_pulse = before - Duration::from_secs(30);
        theirs.write_all(&pulse[..3]).unwrap();
        agent
            .wait(Instant::now() + Duration::from_millis(5))
            .unwrap();
        assert!(agent.last_pulse >= before, "the partial frame refreshed");
        assert_eq!(agent.stats().pulses, 0, "but is not counted as a pulse");
        theirs.write_all(&pulse[3..]).unwrap();
        agent
            .wait(Instant::now() + Duration::from_millis(5))
            .unwrap();
        assert_eq!(agent.stats().pulses, 1);
    }

    #[test]
    fn with_reply_pulses_each_pulse_is_answered_at_once() {
        let mut cfg = config(Target::Unix("/unused".into()), None, HOUR);
        cfg.reply_pulses = true;
        let (mut agent, mut theirs) = paired(cfg);
        let pulse = frame(PULSE.as_bytes());
        theirs
            .write_all(&[&pulse[..], &pulse[..]].concat())
            .unwrap();
        agent
            .wait(Instant::now() + Duration::from_millis(20))
            .unwrap();
        assert_eq!((agent.stats().pulses, agent.stats().replies), (2, 2));
        let reply = frame(PULSE_REPLY.as_bytes());
        let mut got = vec![0u8; 2 * reply.len()];
        theirs.set_read_timeout(Some(LIMIT)).unwrap();
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(got, [&reply[..], &reply[..]].concat());
    }

    #[test]
    fn flood_writes_count_lines_with_blocking_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let reader = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut all = Vec::new();
            BufReader::new(s).read_to_end(&mut all).unwrap();
            all
        });
        let mut cfg = config(Target::Unix(path), None, Duration::ZERO);
        // Far more than a socket buffer: the writes must block, not skip.
        cfg.count = Some(50_000);
        let mut agent = Agent::new(cfg);
        let report = agent.flood().unwrap();
        assert_eq!((report.lines, report.bytes), (50_000, 550_000));
        assert_eq!(agent.stats().sent, 50_000);
        drop(agent);
        let all = reader.join().unwrap();
        assert_eq!(all.len(), 550_000);
        assert!(all.chunks(11).all(|l| l == b"WATCHDOG=1\n"));
        let err = Agent::new(config(
            Target::Unix(dir.path().join("absent.sock")),
            None,
            Duration::ZERO,
        ))
        .flood()
        .unwrap_err();
        assert!(matches!(err, AgentError::Flood { .. }), "{err}");
    }

    #[test]
    fn only_the_lines_that_mean_something_to_the_host_are_relayed() {
        for good in [
            "CHECKPOINT=boot",
            "CHECKPOINT=a.b:c-d_0",
            "CONDITION=ready=1",
            "CONDITION=ready=0",
            "STATUS=disk full",
            "STATUS=",
            "WATCHDOG=1",
            "WATCHDOG=trigger",
            "WATCHDOG_USEC=2000000",
            "EXTEND_TIMEOUT_USEC=30000000",
            "STOPPING=1",
        ] {
            assert_eq!(relayable(good.as_bytes()), Ok(good));
        }
        assert_eq!(relayable(b"CHECKPOINT=x\r"), Ok("CHECKPOINT=x"));
        let long = format!("STATUS={}", "x".repeat(MAX_LINE));
        for (bad, why) in [
            (&b"hello"[..], Refusal::NotRelayed),
            (b"", Refusal::NotRelayed),
            (b"WATCHDOG=0", Refusal::NotRelayed),
            (b"X=Y", Refusal::NotRelayed),
            (b"advanced-watchdog pulse", Refusal::NotRelayed),
            (b"\0\0\0\x05hello", Refusal::NotRelayed),
            (b"CHECKPOINT=", Refusal::NameInvalid),
            (b"CHECKPOINT=a b", Refusal::NameInvalid),
            (b"CONDITION=x", Refusal::ConditionInvalid),
            (b"CONDITION=x=2", Refusal::ConditionInvalid),
            (b"WATCHDOG_USEC=abc", Refusal::UsecInvalid),
            (b"WATCHDOG_USEC=0", Refusal::UsecInvalid),
            (b"EXTEND_TIMEOUT_USEC=x", Refusal::UsecInvalid),
            (b"STOPPING=0", Refusal::StoppingInvalid),
            (b"STATUS=\xff", Refusal::InvalidUtf8),
            (b"STATUS=a\nWATCHDOG=trigger", Refusal::Newline),
            (b"STATUS=a\rb", Refusal::Newline),
            (long.as_bytes(), Refusal::LineTooLong),
        ] {
            assert_eq!(relayable(bad), Err(why), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            relayable(format!("STATUS={}", "x".repeat(MAX_LINE - 7)).as_bytes()).map(str::len),
            Ok(MAX_LINE)
        );
    }

    /// A running agent with a notify socket (`READY=1` sets `ready`) and no local socket,
    /// whose interval is 10 ms, connected to a host. The directory holds both sockets.
    fn running_notify() -> (tempfile::TempDir, PathBuf, Host, Running) {
        let dir = tempfile::tempdir().unwrap();
        let notify = dir.path().join("agent.notify");
        let host = Host::bind(&dir.path().join("host.sock"));
        let mut cfg = config(
            Target::Unix(dir.path().join("host.sock")),
            None,
            Duration::from_millis(10),
        );
        cfg.notify = Some(NotifyConfig {
            path: notify.clone(),
            ready_condition: Some("ready".into()),
        });
        (dir, notify, host, Running::start(cfg))
    }

    #[test]
    fn notify_datagrams_are_relayed_in_order_and_the_agent_sends_no_heartbeat_of_its_own() {
        let (_dir, notify, mut host, agent) = running_notify();
        let mode = std::fs::metadata(&notify).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let daemon = std::os::unix::net::UnixDatagram::unbound().unwrap();
        // Ten intervals pass first: an agent that sent its own heartbeats would have by then.
        std::thread::sleep(Duration::from_millis(100));
        daemon
            .send_to(b"READY=1\nSTATUS=serving\nMAINPID=7\n", &notify)
            .unwrap();
        assert_eq!(host.line(), "CONDITION=ready=1");
        assert_eq!(host.line(), "STATUS=serving");
        // A bad assignment drops its whole datagram; so do invalid UTF-8 and 5,000 bytes.
        daemon.send_to(b"STATUS=half\nhello", &notify).unwrap();
        daemon.send_to(b"STATUS=\xff", &notify).unwrap();
        let big = format!("STATUS={}", "x".repeat(5000));
        daemon.send_to(big.as_bytes(), &notify).unwrap();
        daemon.send_to(b"WATCHDOG=1", &notify).unwrap();
        assert_eq!(host.line(), "WATCHDOG=1");
        daemon
            .send_to(b"EXTEND_TIMEOUT_USEC=5000000\nSTOPPING=1", &notify)
            .unwrap();
        assert_eq!(host.line(), "EXTEND_TIMEOUT_USEC=5000000");
        assert_eq!(host.line(), "STOPPING=1");
        daemon.send_to(b"WATCHDOG=trigger", &notify).unwrap();
        assert_eq!(host.line(), "WATCHDOG=trigger");
        let (_, st) = agent.stop();
        assert_eq!(st.sent, 0, "no heartbeat of its own: {st:?}");
        assert_eq!(
            (st.notify_datagrams, st.notify_relayed, st.notify_ignored),
            (7, 6, 1),
            "{st:?}"
        );
        assert_eq!(
            (
                st.notify_malformed,
                st.notify_oversized,
                st.notify_unrelayed
            ),
            (2, 1, 0),
            "{st:?}"
        );
        assert!(!notify.exists(), "the socket file goes with the agent");
    }

    #[test]
    fn a_flood_of_notify_datagrams_arrives_whole_and_in_order() {
        let (_dir, notify, mut host, agent) = running_notify();
        let daemon = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let sender = {
            let notify = notify.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    // Blocking sends: the kernel queue paces the sender, nothing is lost.
                    daemon
                        .send_to(format!("STATUS=n{i}\nWATCHDOG=1").as_bytes(), &notify)
                        .unwrap();
                }
            })
        };
        for i in 0..2000 {
            assert_eq!(host.line(), format!("STATUS=n{i}"));
            assert_eq!(host.line(), "WATCHDOG=1");
        }
        sender.join().unwrap();
        let (_, st) = agent.stop();
        assert_eq!((st.notify_datagrams, st.notify_relayed), (2000, 4000));
    }

    /// A host that accepts but never reads: a datagram is held for [`NOTIFY_HOLD`], then it and
    /// every later one the host cannot take are dropped and counted at once; the agent never
    /// blocks, and the daemon's queue keeps draining.
    #[test]
    fn a_host_that_never_reads_costs_notify_datagrams_not_the_agent() {
        let (_dir, notify, host, agent) = running_notify();
        let conn = host.accept();
        let daemon = std::os::unix::net::UnixDatagram::unbound().unwrap();
        daemon.set_nonblocking(true).unwrap();
        let line = format!("STATUS={}", "x".repeat(4000));
        let (mut sent, mut refused) = (0u64, 0u64);
        let start = Instant::now();
        // The daemon's behaviour: a datagram every millisecond for twice the hold.
        while start.elapsed() < 2 * NOTIFY_HOLD {
            match daemon.send_to(line.as_bytes(), &notify) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => refused += 1,
                Err(e) => panic!("{e}"),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let stopping = Instant::now();
        let (_, st) = agent.stop();
        assert!(
            stopping.elapsed() < Duration::from_secs(1),
            "the agent was stuck"
        );
        assert!(
            st.notify_unrelayed > 100,
            "after the hold the queue drains: {st:?}"
        );
        assert!(st.notify_relayed > 0, "the host's buffer took some: {st:?}");
        assert!(
            st.notify_relayed + st.notify_unrelayed <= st.notify_datagrams,
            "{st:?}"
        );
        eprintln!("sent {sent}, refused by a full queue {refused}: {st:?}");
        drop(conn);
    }

    #[test]
    fn a_live_notify_socket_is_not_taken_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let live = notify::bind_notify(&path).unwrap();
        assert!(matches!(
            notify::bind_notify(&path),
            Err(AgentError::SocketInUse(_))
        ));
        drop(live);
        // A stale socket file, bound by someone who left without removing it.
        let stale = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        drop(stale);
        let again = notify::bind_notify(&path).unwrap();
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert!(matches!(
            notify::bind_notify(&dir.path().join("file")),
            Err(AgentError::SocketBind { .. })
        ));
        drop(again);
        assert!(!path.exists());
    }

    #[test]
    fn a_checkpoint_from_a_local_client_reaches_the_host_at_once() {
        let (_dir, sock, mut host, agent) = running_with_host();
        // The next heartbeat is an hour away: the checkpoint goes out now.
        relay::send_line(&sock, "CHECKPOINT=boot").unwrap();
        assert_eq!(host.line(), "CHECKPOINT=boot");
        relay::send_lines(&sock, &["STATUS=disk full", "WATCHDOG=trigger"]).unwrap();
        assert_eq!(host.line(), "STATUS=disk full");
        assert_eq!(host.line(), "WATCHDOG=trigger");
        let (_, stats) = agent.stop();
        assert_eq!((stats.sent, stats.relayed, stats.refused), (1, 3, 0));
    }

    #[test]
    fn lines_sent_first_reach_the_host_in_order_before_the_next_heartbeat() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let mut host = Host::bind(&dir.path().join("host.sock"));
        let mut agent = Agent::new(config(
            Target::Unix(dir.path().join("host.sock")),
            Some(&sock),
            HOUR,
        ));
        agent.listen().unwrap();
        agent.beat();
        assert_eq!(host.line(), "WATCHDOG=1");
        let mut client = Client::connect(&sock);
        client.send(b"CHECKPOINT=a\nCONDITION=c=1\r\nSTATUS=x y\nWATCHDOG=trigger\nCHECKPOINT=b\n");
        pump(&mut agent, |a| a.stats().relayed == 5);
        agent.beat();
        for want in [
            "CHECKPOINT=a",
            "CONDITION=c=1",
            "STATUS=x y",
            "WATCHDOG=trigger",
            "CHECKPOINT=b",
            "WATCHDOG=1",
        ] {
            assert_eq!(host.line(), want);
        }
        for _ in 0..5 {
            assert_eq!(client.reply(), "OK");
        }
    }

    #[test]
    fn bad_lines_are_refused_and_never_reach_the_host() {
        let (dir, sock, mut host, agent) = running_with_host();
        let mut client = Client::connect(&sock);
        client.send(
            b"hello\nCHECKPOINT=a b\nCONDITION=x\nWATCHDOG_USEC=abc\n\
              advanced-watchdog pulse\nWATCHDOG=0\n\nCHECKPOINT=ok\n",
        );
        for why in [
            Refusal::NotRelayed,
            Refusal::NameInvalid,
            Refusal::ConditionInvalid,
            Refusal::UsecInvalid,
            Refusal::NotRelayed,
            Refusal::NotRelayed,
            Refusal::NotRelayed,
        ] {
            assert_eq!(client.reply(), format!("ERR {why}"));
        }
        assert_eq!(client.reply(), "OK");
        assert_eq!(host.line(), "CHECKPOINT=ok");
        // The client side checks before it connects.
        let err = relay::send_line(&sock, "CHECKPOINT=a b").unwrap_err();
        assert!(
            matches!(
                err,
                AgentError::LineInvalid {
                    reason: Refusal::NameInvalid,
                    ..
                }
            ),
            "{err}"
        );
        let err = relay::send_line(&dir.path().join("absent.sock"), "CHECKPOINT=a").unwrap_err();
        assert!(matches!(err, AgentError::SocketConnect { .. }), "{err}");
        let (_, stats) = agent.stop();
        assert_eq!((stats.relayed, stats.refused), (1, 7));
    }

    #[test]
    fn without_the_host_a_line_is_dropped_and_refused_as_unreachable() {
        let (_dir, sock, agent) = running_without_host();
        let err = relay::send_line(&sock, "CHECKPOINT=boot").unwrap_err();
        match &err {
            AgentError::LineRefused { line, reason } => {
                assert_eq!(
                    (line.as_str(), reason.as_str()),
                    ("CHECKPOINT=boot", "host unreachable")
                );
            }
            other => panic!("{other}"),
        }
        assert_eq!(
            err.to_string(),
            "the agent refused 'CHECKPOINT=boot': host unreachable"
        );
        let (_, stats) = agent.stop();
        assert_eq!(
            (stats.sent, stats.skipped, stats.relayed, stats.refused),
            (0, 1, 0, 1)
        );
    }

    #[test]
    fn a_host_that_does_not_read_gets_no_relayed_line_and_the_client_hears_why() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let mut cfg = config(Target::Unix("/unused".into()), Some(&sock), HOUR);
        cfg.message = "x".repeat(1000);
        let (mut agent, _theirs) = paired(cfg);
        agent.listen().unwrap();
        while agent.stats().skipped == 0 {
            agent.beat(); // fill the host's buffer
        }
        let mut client = Client::connect(&sock);
        client.send(b"CHECKPOINT=a\n");
        pump(&mut agent, |a| a.stats().refused == 1);
        assert_eq!(client.reply(), "ERR host unreachable");
        assert_eq!(agent.stats().relayed, 0);
    }

    #[test]
    fn a_ten_megabyte_line_and_invalid_utf8_get_err_and_the_agent_goes_on() {
        let (_dir, sock, mut host, agent) = running_with_host();
        let mut client = Client::connect(&sock);
        let mut huge = vec![b'a'; 10 * 1024 * 1024];
        huge.extend_from_slice(b"\nSTATUS=\xff\xfe\nCHECKPOINT=after\n");
        client.send(&huge);
        assert_eq!(client.reply(), format!("ERR {}", Refusal::LineTooLong));
        assert_eq!(client.reply(), format!("ERR {}", Refusal::InvalidUtf8));
        assert_eq!(client.reply(), "OK");
        assert_eq!(host.line(), "CHECKPOINT=after");
        // A line without its newline, then the end: still a line.
        let mut last = Client::connect(&sock);
        last.send(b"CHECKPOINT=last");
        last.0
            .get_ref()
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        assert_eq!(last.reply(), "OK");
        assert_eq!(host.line(), "CHECKPOINT=last");
        relay::send_line(&sock, "CHECKPOINT=still-here").unwrap();
        assert_eq!(host.line(), "CHECKPOINT=still-here");
        let (agent, stats) = agent.stop();
        assert_eq!((stats.relayed, stats.refused), (3, 2));
        for c in &agent.clients {
            assert!(c.line.capacity() <= 2 * MAX_LINE, "{}", c.line.capacity());
        }
    }

    #[test]
    fn clients_beyond_the_limit_are_refused_and_a_freed_slot_is_reused() {
        let (_dir, sock, agent) = running_without_host();
        let mut held: Vec<Client> = (0..MAX_CLIENTS).map(|_| Client::connect(&sock)).collect();
        let mut extra = Client::connect(&sock);
        assert_eq!(extra.reply(), format!("ERR {}", Refusal::TooManyClients));
        let err = relay::send_line(&sock, "CHECKPOINT=x").unwrap_err();
        assert!(
            matches!(&err, AgentError::LineRefused { reason, .. } if reason == "too many clients"),
            "{err}"
        );
        // The held ones are served.
        held[3].send(b"CHECKPOINT=x\n");
        assert_eq!(held[3].reply(), "ERR host unreachable");
        drop(held.pop());
        let err = relay::send_line(&sock, "CHECKPOINT=x").unwrap_err();
        assert!(
            matches!(&err, AgentError::LineRefused { reason, .. } if reason == "host unreachable"),
            "{err}"
        );
        drop(agent);
    }

    #[test]
    fn a_stale_socket_is_replaced_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        drop(UnixListener::bind(&sock).unwrap()); // leaves a stale socket file
        let target = Target::Unix(dir.path().join("absent.sock"));
        let mut first = Agent::new(config(target.clone(), Some(&sock), HOUR));
        first.listen().unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, limits::SOCKET_MODE);
        let mut second = Agent::new(config(target.clone(), Some(&sock), HOUR));
        let err = second.listen().unwrap_err();
        assert!(matches!(err, AgentError::SocketInUse(_)), "{err}");
        // Not required (the default path): a warning, and heartbeats go on.
        let mut cfg = config(target.clone(), Some(&sock), HOUR);
        if let Some(s) = cfg.socket.as_mut() {
            s.required = false;
        }
        let mut third = Agent::new(cfg);
        third.listen().unwrap();
        assert!(third.listener.is_none());
        // Not a socket: left alone.
        let file = dir.path().join("file");
        std::fs::write(&file, "keep").unwrap();
        let mut fourth = Agent::new(config(target, Some(&file), HOUR));
        let err = fourth.listen().unwrap_err();
        assert!(matches!(err, AgentError::SocketBind { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
        drop(first);
        assert!(!sock.exists(), "removed when the agent ends");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }
}
