//! The far end of a notification node, recognised by its greeting: a QMP monitor, an HMP
//! monitor, or a plain socket that just receives lines.
//!
//! | greeting | kind | how a script line is sent |
//! |---|---|---|
//! | `{"QMP": …}` | QMP | typed command through `qapi`, or `human-monitor-command` |
//! | `QEMU … monitor - type 'help' …` then `(qemu) ` | HMP | the line as typed, reply read up to the next prompt |
//! | anything else, or nothing within a second | raw | the line and a newline |
//!
//! A node's kind, once seen, is remembered by its runner and passed back in on every
//! reconnect: a QMP or HMP monitor that stays silent (QEMU hung, or another client holds the
//! monitor) is a connection that failed and will be retried, never a raw socket.
//!
//! A line counts as done only when the monitor answered it. A line written to a monitor that
//! then timed out or closed has an unknown fate ([`DeliveryError::Unknown`]); a line written to
//! a raw socket, where no answer is possible, is [`Outcome::Written`].

use std::time::Duration;

use serde_json::Value;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf,
    WriteHalf,
};
use tokio::net::{TcpStream, UnixStream};

use super::limits::{CONNECT_TIMEOUT, GREETING_TIMEOUT, MAX_HMP_REPLY};
use super::qmp::{QmpClient, QmpError, read_line_bounded};
use super::script::{ScriptLine, TypedCommand};
use crate::transport::{Endpoint, PeerCred};

const HMP_PROMPT: &[u8] = b"(qemu) ";

/// A bidirectional byte stream, type-erased so TCP and Unix share one code path.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

pub(crate) type BoxStream = Box<dyn Stream>;

/// What a notification node turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A QMP monitor.
    Qmp,
    /// An HMP monitor.
    Hmp,
    /// A plain socket: no protocol, no answers.
    Raw,
}

impl Kind {
    /// "QMP", "HMP" or "raw".
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Qmp => "QMP",
            Kind::Hmp => "HMP",
            Kind::Raw => "raw",
        }
    }

    /// Whether this kind greets on connect (a silent peer of this kind is a failure, not a
    /// raw socket).
    fn greets(self) -> bool {
        matches!(self, Kind::Qmp | Kind::Hmp)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a monitor connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// TCP or Unix connect failed.
    #[error("cannot connect to {endpoint}")]
    Connect {
        /// The monitor's address.
        endpoint: String,
        /// The connect error (refused, no such socket, timed out).
        #[source]
        source: std::io::Error,
    },
    /// Connect + greeting took too long.
    #[error("{endpoint}: no greeting within {timeout:?}")]
    Timeout {
        /// The monitor's address.
        endpoint: String,
        /// The limit.
        timeout: Duration,
    },
    /// A node known to be a monitor sent no greeting in time: QEMU is hung, or another client
    /// holds the monitor (QEMU serves one at a time). Retried later; never taken for raw.
    #[error(
        "{endpoint}: no greeting within {timeout:?} from a node known as {kind} (QEMU hung, or another client holds the monitor)"
    )]
    GreetingLate {
        /// The monitor's address.
        endpoint: String,
        /// What it was last time.
        kind: Kind,
        /// How long awd waited.
        timeout: Duration,
    },
    /// The peer closed the connection at once.
    #[error("{endpoint}: closed before greeting")]
    ClosedAtGreeting {
        /// The monitor's address.
        endpoint: String,
    },
    /// The greeting looked like QMP, but the handshake failed.
    #[error("{endpoint}")]
    Qmp {
        /// The monitor's address.
        endpoint: String,
        /// What went wrong in the QMP handshake.
        #[source]
        source: QmpError,
    },
    /// Reading the greeting failed.
    #[error("{endpoint}: reading the greeting failed")]
    Read {
        /// The monitor's address.
        endpoint: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
}

/// What became of one script line that reached the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The monitor answered with success; the text is the reply (`{}` for typed commands, the
    /// output for HMP).
    Ok(String),
    /// The monitor answered with an error: a QMP error or HMP output starting with `Error:`.
    Error(String),
    /// Written to a raw socket in full. A raw peer has no protocol and never answers, so this is
    /// all awd can know; it is not an answer.
    Written,
}

/// Why a line got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The line did not reach the peer; it is safe to send again on a new connection.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The line was written to a monitor, but the connection ended or timed out before an
    /// answer: QEMU may have run it, or not. It is not sent again (at most once: never two
    /// `quit`s or two failovers), and it is never reported as done.
    #[error("fate unknown (written, no answer): {0}")]
    Unknown(String),
}

/// A connected notification node.
pub struct Monitor {
    pub(crate) conn: Conn,
    pub(crate) peer_pid: Option<u32>,
}

pub(crate) enum Conn {
    /// A QMP monitor (shared with the task that follows the VM's run state).
    Qmp(std::sync::Arc<QmpClient>),
    /// An HMP monitor.
    Hmp(LineClient),
    /// A plain socket.
    Raw(LineClient),
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("kind", &self.kind())
            .field("peer_pid", &self.peer_pid)
            .finish()
    }
}

/// The two halves of a line-based connection (HMP or raw).
pub struct LineClient {
    reader: BufReader<ReadHalf<BoxStream>>,
    writer: WriteHalf<BoxStream>,
}

/// Connects; for a Unix socket also returns the peer's pid (`SO_PEERCRED`), which tells one
/// QEMU process from the next behind the same path.
/// Connects to a TCP monitor with keepalive and `TCP_USER_TIMEOUT` as on heartbeat channels:
/// a monitor whose host vanished without a FIN is seen to be gone (and its run state stops
/// being trusted) within the default user timeout.
async fn connect_tcp(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect((host, port)).await?;
    let _ = crate::transport::socket::TcpOptions {
        nodelay: true,
        user_timeout: Some(Duration::from_millis(
            crate::transport::limits::DEFAULT_TCP_USER_TIMEOUT_MS,
        )),
    }
    .apply(&s);
    Ok(s)
}

async fn open(endpoint: &Endpoint, peer: PeerCred) -> std::io::Result<(BoxStream, Option<u32>)> {
    Ok(match endpoint {
        Endpoint::Tcp { host, port } => {
            let s = connect_tcp(host, *port).await?;
            (Box::new(s), None)
        }
        Endpoint::Unix(p) => {
            let s = UnixStream::connect(p).await?;
            peer.verify(&s)?;
            let pid = s
                .peer_cred()
                .ok()
                .and_then(|c| c.pid())
                .and_then(|p| u32::try_from(p).ok());
            (Box::new(s), pid)
        }
    })
}

/// Reads until the buffer ends with the HMP prompt. Returns what was read, without the prompt.
async fn read_to_prompt<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the prompt",
            ));
        }
        let n = buf.len();
        out.extend_from_slice(buf);
        r.consume(n);
        if out.ends_with(HMP_PROMPT) {
            out.truncate(out.len() - HMP_PROMPT.len());
            return Ok(out);
        }
        if out.len() > MAX_HMP_REPLY {
            // Keep the tail, where the prompt will be.
            out.drain(..out.len() - HMP_PROMPT.len());
        }
    }
}

/// Removes terminal escape sequences and the echoed command from HMP output.
pub fn clean_hmp_output(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters, then one final byte in @..~
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    // The first line is QEMU's echo of the command.
    match out.split_once('\n') {
        Some((_, rest)) => rest.trim().to_owned(),
        None => String::new(),
    }
}

impl Monitor {
    /// Connects to `endpoint` and recognises what answers. `known` is what the node was last
    /// time: a node known to greet (QMP, HMP) that stays silent is an error
    /// ([`MonitorError::GreetingLate`]), not a raw socket.
    pub async fn connect(
        endpoint: &Endpoint,
        known: Option<Kind>,
    ) -> Result<Monitor, MonitorError> {
        Self::connect_as(endpoint, known, PeerCred::default()).await
    }

    /// [`connect`](Self::connect), refusing a Unix monitor whose process does not run as `peer`
    /// says (`SO_PEERCRED`): a socket file swapped for another process's is not QEMU's.
    pub async fn connect_as(
        endpoint: &Endpoint,
        known: Option<Kind>,
        peer: PeerCred,
    ) -> Result<Monitor, MonitorError> {
        let ep = endpoint.to_string();
        let inner = Self::connect_inner(endpoint, &ep, known, peer);
        match tokio::time::timeout(CONNECT_TIMEOUT, inner).await {
            Ok(r) => r,
            Err(_) => Err(match known {
                Some(kind) if kind.greets() => MonitorError::GreetingLate {
                    endpoint: ep,
                    kind,
                    timeout: CONNECT_TIMEOUT,
                },
                _ => MonitorError::Timeout {
                    endpoint: ep,
                    timeout: CONNECT_TIMEOUT,
                },
            }),
        }
    }

    async fn connect_inner(
        endpoint: &Endpoint,
        ep: &str,
        known: Option<Kind>,
        peer: PeerCred,
    ) -> Result<Monitor, MonitorError> {
        let (stream, peer_pid) =
            open(endpoint, peer)
                .await
                .map_err(|source| MonitorError::Connect {
                    endpoint: ep.to_owned(),
                    source,
                })?;
        let conn = Self::greet(stream, ep, known).await?;
        Ok(Monitor { conn, peer_pid })
    }

    pub(crate) async fn greet(
        stream: BoxStream,
        ep: &str,
        known: Option<Kind>,
    ) -> Result<Conn, MonitorError> {
        let (r, writer) = tokio::io::split(stream);
        let mut reader = BufReader::new(r);
        let read_err = |source| MonitorError::Read {
            endpoint: ep.to_owned(),
            source,
        };
        let wait_greeting = async {
            match known {
                // The outer CONNECT_TIMEOUT bounds the wait.
                Some(k) if k.greets() => Ok(reader.fill_buf().await),
                _ => tokio::time::timeout(GREETING_TIMEOUT, reader.fill_buf()).await,
            }
        };
        let first = match wait_greeting.await {
            Err(_) => return Ok(Conn::Raw(LineClient { reader, writer })),
            Ok(Err(e)) => return Err(read_err(e)),
            Ok(Ok([])) => {
                return Err(MonitorError::ClosedAtGreeting {
                    endpoint: ep.to_owned(),
                });
            }
            Ok(Ok(buf)) => buf[0],
        };
        if first == b'{' {
            let line = read_line_bounded(&mut reader, 64 * 1024)
                .await
                .map_err(read_err)?
                .ok_or_else(|| MonitorError::ClosedAtGreeting {
                    endpoint: ep.to_owned(),
                })?;
            if let Ok(greeting) = serde_json::from_slice::<Value>(&line)
                && greeting.get("QMP").is_some()
            {
                let client = QmpClient::start(&greeting, reader, writer, CONNECT_TIMEOUT)
                    .await
                    .map_err(|source| MonitorError::Qmp {
                        endpoint: ep.to_owned(),
                        source,
                    })?;
                return Ok(Conn::Qmp(std::sync::Arc::new(client)));
            }
            return Ok(Conn::Raw(LineClient { reader, writer }));
        }
        if reader.buffer().starts_with(b"QEMU") {
            read_to_prompt(&mut reader).await.map_err(read_err)?;
            return Ok(Conn::Hmp(LineClient { reader, writer }));
        }
        Ok(Conn::Raw(LineClient { reader, writer }))
    }

    /// What the node is.
    pub fn kind(&self) -> Kind {
        match self.conn {
            Conn::Qmp(_) => Kind::Qmp,
            Conn::Hmp(_) => Kind::Hmp,
            Conn::Raw(_) => Kind::Raw,
        }
    }

    /// The pid of the process behind a Unix socket (`SO_PEERCRED`); `None` over TCP.
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// The QMP client, if this is a QMP monitor.
    pub fn qmp(&self) -> Option<&std::sync::Arc<QmpClient>> {
        match &self.conn {
            Conn::Qmp(c) => Some(c),
            _ => None,
        }
    }

    /// Closes the connection now. For QMP this closes the socket even though the VM-state
    /// tracker still holds the client (QEMU would greet no new client while it is open).
    pub async fn close(self) {
        match self.conn {
            Conn::Qmp(c) => c.close().await,
            Conn::Hmp(c) | Conn::Raw(c) => drop(c),
        }
    }

    /// Waits until the peer ends the connection. Output a raw or HMP peer sends meanwhile is
    /// discarded (HMP says nothing unasked). Cancel-safe.
    pub async fn ended(&mut self) {
        let client = match &mut self.conn {
            Conn::Qmp(c) => return c.closed().cancelled().await,
            Conn::Hmp(c) | Conn::Raw(c) => c,
        };
        loop {
            match client.reader.fill_buf().await {
                Err(_) | Ok([]) => return,
                Ok(buf) => {
                    let n = buf.len();
                    client.reader.consume(n);
                }
            }
        }
    }

    /// Whether the peer has closed the connection (checked without blocking). Output a raw
    /// peer sent meanwhile is discarded.
    pub async fn is_closed(&mut self) -> bool {
        let client = match &mut self.conn {
            Conn::Qmp(c) => return c.closed().is_cancelled(),
            Conn::Hmp(c) | Conn::Raw(c) => c,
        };
        loop {
            match tokio::time::timeout(Duration::ZERO, client.reader.fill_buf()).await {
                Err(_) => return false,
                Ok(Err(_)) | Ok(Ok([])) => return true,
                Ok(Ok(buf)) => {
                    let n = buf.len();
                    client.reader.consume(n);
                }
            }
        }
    }

    /// Sends one script line and waits (up to `timeout`) for its answer.
    pub async fn run(
        &mut self,
        line: &ScriptLine,
        timeout: Duration,
    ) -> Result<Outcome, DeliveryError> {
        match &mut self.conn {
            Conn::Qmp(c) => run_qmp(c, line, timeout).await,
            Conn::Hmp(c) => {
                let quit = line.typed == Some(TypedCommand::Quit);
                write_line(c, &line.text, timeout).await?;
                match tokio::time::timeout(timeout, read_to_prompt(&mut c.reader)).await {
                    Ok(Ok(raw)) => {
                        let text = clean_hmp_output(&raw);
                        if text.starts_with("Error") || text.contains("\nError") {
                            Ok(Outcome::Error(text))
                        } else {
                            Ok(Outcome::Ok(text))
                        }
                    }
                    Ok(Err(_)) if quit => {
                        Ok(Outcome::Ok("QEMU closed the monitor after quit".into()))
                    }
                    Ok(Err(e)) => Err(DeliveryError::Unknown(e.to_string())),
                    Err(_) => Err(DeliveryError::Unknown(format!(
                        "no prompt within {timeout:?}"
                    ))),
                }
            }
            Conn::Raw(c) => {
                write_line(c, &line.text, timeout).await?;
                Ok(Outcome::Written)
            }
        }
    }
}

async fn write_line(
    c: &mut LineClient,
    text: &str,
    timeout: Duration,
) -> Result<(), DeliveryError> {
    let mut bytes = Vec::with_capacity(text.len() + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    match tokio::time::timeout(timeout, async {
        c.writer.write_all(&bytes).await?;
        c.writer.flush().await
    })
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(DeliveryError::NotSent(e.to_string())),
        Err(_) => Err(DeliveryError::Unknown(format!(
            "write did not finish within {timeout:?}"
        ))),
    }
}

async fn typed<C: qapi::Command>(
    c: &QmpClient,
    cmd: C,
    timeout: Duration,
) -> Result<Result<String, qapi::Error>, QmpError> {
    Ok(c.execute(cmd, timeout).await?.map(|_| "{}".to_owned()))
}

async fn run_qmp(
    c: &QmpClient,
    line: &ScriptLine,
    timeout: Duration,
) -> Result<Outcome, DeliveryError> {
    use qapi::qmp;
    let result = match line.typed {
        Some(TypedCommand::Quit) => typed(c, qmp::quit {}, timeout).await,
        Some(TypedCommand::XColoLostHeartbeat) => {
            typed(c, qmp::x_colo_lost_heartbeat {}, timeout).await
        }
        Some(TypedCommand::NbdServerStop) => typed(c, qmp::nbd_server_stop {}, timeout).await,
        Some(TypedCommand::Stop) => typed(c, qmp::stop {}, timeout).await,
        Some(TypedCommand::Cont) => typed(c, qmp::cont {}, timeout).await,
        Some(TypedCommand::SystemReset) => typed(c, qmp::system_reset {}, timeout).await,
        Some(TypedCommand::SystemPowerdown) => typed(c, qmp::system_powerdown {}, timeout).await,
        None => c
            .execute(
                qmp::human_monitor_command {
                    command_line: line.text.clone(),
                    cpu_index: None,
                },
                timeout,
            )
            .await
            .map(|r| r.map(|s| s.trim().to_owned())),
    };
    match result {
        Ok(Ok(text)) if line.typed.is_none() && text.starts_with("Error") => {
            Ok(Outcome::Error(text))
        }
        Ok(Ok(text)) => Ok(Outcome::Ok(text)),
        Ok(Err(e)) => Ok(Outcome::Error(format!("{:?}: {}", e.class, e.desc))),
        // QEMU closes the connection right after quit, often before the reply.
        Err(QmpError::ClosedAfterSend) if line.typed == Some(TypedCommand::Quit) => {
            Ok(Outcome::Ok("QEMU closed the connection after quit".into()))
        }
        Err(e @ QmpError::Write(_)) => Err(DeliveryError::NotSent(e.to_string())),
        Err(e @ (QmpError::ClosedAfterSend | QmpError::Timeout(_))) => {
            Err(DeliveryError::Unknown(e.to_string()))
        }
        Err(e) => Ok(Outcome::Error(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tcp_monitor_connection_has_keepalive_and_a_user_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let s = connect_tcp("127.0.0.1", port).await.unwrap();
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(
                crate::transport::limits::DEFAULT_TCP_USER_TIMEOUT_MS
            ))
        );
        assert!(s.nodelay().unwrap());
    }

    #[test]
    fn hmp_output_loses_its_echo_and_escapes() {
        let raw = b"info status\r\n\x1b[K\x1b[DVM status: running\r\n";
        assert_eq!(clean_hmp_output(raw), "VM status: running");
        assert_eq!(clean_hmp_output(b"quit\r\n"), "");
    }

    #[tokio::test]
    async fn greetings_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        for (greeting, kind) in [
            (
                &b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) "[..],
                Kind::Hmp,
            ),
            (b"hello admin\n", Kind::Raw),
            (b"", Kind::Raw),
        ] {
            let path = dir.path().join(format!("s{}", greeting.len()));
            let l = tokio::net::UnixListener::bind(&path).unwrap();
            let g = greeting.to_vec();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                s.write_all(&g).await.unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
            let m = Monitor::connect(&Endpoint::Unix(path), None).await.unwrap();
            assert_eq!(m.kind(), kind);
            assert_eq!(m.peer_pid(), Some(std::process::id()), "SO_PEERCRED");
        }
    }

    /// A monitor socket whose process runs as someone other than `peer-uid=` says is refused
    /// before a byte is sent; the right one is used.
    #[tokio::test]
    async fn a_monitor_of_the_wrong_user_is_refused() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp");
        // Never accepted: a connection in the backlog already has its peer's credentials.
        let _listening = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap(); // made by this process: our uid and gid
        let ep = Endpoint::Unix(path);
        let someone_else = PeerCred {
            uid: Some(meta.uid() ^ 1),
            gid: None,
        };
        let err = Monitor::connect_as(&ep, None, someone_else)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(
            crate::util::error_chain(&err).contains(&format!(
                "the peer runs as uid {}, not {}",
                meta.uid(),
                meta.uid() ^ 1
            )),
            "{err:?}"
        );
        let us = PeerCred {
            uid: Some(meta.uid()),
            gid: Some(meta.gid()),
        };
        let m = Monitor::connect_as(&ep, Some(Kind::Raw), us).await.unwrap();
        assert_eq!(m.kind(), Kind::Raw);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_node_known_as_qmp_is_a_late_greeting_not_raw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            // Accepts, as the kernel does for a busy QEMU monitor, and says nothing.
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let ep = Endpoint::Unix(path);
        let started = tokio::time::Instant::now();
        let err = Monitor::connect(&ep, Some(Kind::Qmp)).await.unwrap_err();
        assert!(
            matches!(
                err,
                MonitorError::GreetingLate {
                    kind: Kind::Qmp,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            started.elapsed() >= CONNECT_TIMEOUT,
            "waited the whole bound"
        );
        let m = Monitor::connect(&ep, None).await.unwrap();
        assert_eq!(
            m.kind(),
            Kind::Raw,
            "unknown nodes that stay silent are raw"
        );
        let m = Monitor::connect(&ep, Some(Kind::Raw)).await.unwrap();
        assert_eq!(m.kind(), Kind::Raw);
    }
}
