//! The far end of a notification node, recognised by its greeting: a QMP monitor, an HMP
//! monitor, or a plain socket that just receives lines.
//!
//! | greeting | kind | how a script line is sent |
//! |---|---|---|
//! | `{"QMP": …}` | QMP | typed command through `qapi`, or `human-monitor-command` |
//! | `QEMU … monitor - type 'help' …` then `(qemu) ` | HMP | the line as typed, reply read up to the next prompt |
//! | anything else, or nothing within a second | raw | the line and a newline |

use std::time::Duration;

use serde_json::Value;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf,
    WriteHalf,
};
use tokio::net::{TcpStream, UnixStream};

use super::qmp::{QmpClient, QmpError, read_line_bounded};
use super::script::{ScriptLine, TypedCommand};
use crate::config::Endpoint;

/// How long a peer has to greet before it is taken for a plain socket.
pub const GREETING_TIMEOUT: Duration = Duration::from_millis(1000);
/// The limit on connect + greeting + negotiation.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most HMP output kept for one command.
const MAX_HMP_REPLY: usize = 64 * 1024;
const HMP_PROMPT: &[u8] = b"(qemu) ";

/// A bidirectional byte stream, type-erased so TCP and Unix share one code path.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

type BoxStream = Box<dyn Stream>;

/// Why a monitor connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// TCP or Unix connect failed.
    #[error("cannot connect to {endpoint}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connect + greeting took too long.
    #[error("{endpoint}: no greeting within {timeout:?}")]
    Timeout {
        /// Where.
        endpoint: String,
        /// The limit.
        timeout: Duration,
    },
    /// The peer closed the connection at once.
    #[error("{endpoint}: closed before greeting")]
    ClosedAtGreeting {
        /// Where.
        endpoint: String,
    },
    /// The greeting looked like QMP, but the handshake failed.
    #[error("{endpoint}")]
    Qmp {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// Reading the greeting failed.
    #[error("{endpoint}: reading the greeting failed")]
    Read {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// QEMU's answer to one script line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success; the text is the reply (`{}` for typed commands, the output for HMP).
    Ok(String),
    /// QEMU answered with an error: a QMP error or HMP output starting with `Error:`.
    Error(String),
}

/// Why a line got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The line did not reach the peer; it is safe to send again on a new connection.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The line was written, but the connection ended or timed out before an answer. It is not
    /// sent again (at most once: never two `quit`s or two failovers).
    #[error("sent, but no answer: {0}")]
    Lost(String),
}

/// A connected notification node.
pub enum Monitor {
    /// A QMP monitor (shared with the task that follows the VM's run state).
    Qmp(std::sync::Arc<QmpClient>),
    /// An HMP monitor.
    Hmp(LineClient),
    /// A plain socket.
    Raw(LineClient),
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

/// The two halves of a line-based connection (HMP or raw).
pub struct LineClient {
    reader: BufReader<ReadHalf<BoxStream>>,
    writer: WriteHalf<BoxStream>,
}

async fn open(endpoint: &Endpoint) -> std::io::Result<BoxStream> {
    Ok(match endpoint {
        Endpoint::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
        Endpoint::Unix(p) => Box::new(UnixStream::connect(p).await?),
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
    /// Connects to `endpoint` and recognises what answers.
    pub async fn connect(endpoint: &Endpoint) -> Result<Monitor, MonitorError> {
        let ep = endpoint.to_string();
        match tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(endpoint, &ep)).await {
            Ok(r) => r,
            Err(_) => Err(MonitorError::Timeout {
                endpoint: ep,
                timeout: CONNECT_TIMEOUT,
            }),
        }
    }

    async fn connect_inner(endpoint: &Endpoint, ep: &str) -> Result<Monitor, MonitorError> {
        let stream = open(endpoint)
            .await
            .map_err(|source| MonitorError::Connect {
                endpoint: ep.to_owned(),
                source,
            })?;
        let (r, writer) = tokio::io::split(stream);
        let mut reader = BufReader::new(r);
        let read_err = |source| MonitorError::Read {
            endpoint: ep.to_owned(),
            source,
        };
        let first = match tokio::time::timeout(GREETING_TIMEOUT, reader.fill_buf()).await {
            Err(_) => return Ok(Monitor::Raw(LineClient { reader, writer })),
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
                return Ok(Monitor::Qmp(std::sync::Arc::new(client)));
            }
            return Ok(Monitor::Raw(LineClient { reader, writer }));
        }
        if reader.buffer().starts_with(b"QEMU") {
            read_to_prompt(&mut reader).await.map_err(read_err)?;
            return Ok(Monitor::Hmp(LineClient { reader, writer }));
        }
        Ok(Monitor::Raw(LineClient { reader, writer }))
    }

    /// "QMP", "HMP" or "raw".
    pub fn kind(&self) -> &'static str {
        match self {
            Monitor::Qmp(_) => "QMP",
            Monitor::Hmp(_) => "HMP",
            Monitor::Raw(_) => "raw",
        }
    }

    /// The QMP client, if this is a QMP monitor.
    pub fn qmp(&self) -> Option<&std::sync::Arc<QmpClient>> {
        match self {
            Monitor::Qmp(c) => Some(c),
            _ => None,
        }
    }

    /// Whether the peer has closed the connection (checked without blocking). Output a raw
    /// peer sent meanwhile is discarded.
    pub async fn is_closed(&mut self) -> bool {
        let client = match self {
            Monitor::Qmp(c) => return c.closed().is_cancelled(),
            Monitor::Hmp(c) | Monitor::Raw(c) => c,
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
        match self {
            Monitor::Qmp(c) => run_qmp(c, line, timeout).await,
            Monitor::Hmp(c) => {
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
                    Ok(Err(e)) => Err(DeliveryError::Lost(e.to_string())),
                    Err(_) => Err(DeliveryError::Lost(format!("no prompt within {timeout:?}"))),
                }
            }
            Monitor::Raw(c) => {
                write_line(c, &line.text, timeout).await?;
                Ok(Outcome::Ok("written".into()))
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
        Err(_) => Err(DeliveryError::Lost(format!(
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
            Err(DeliveryError::Lost(e.to_string()))
        }
        Err(e) => Ok(Outcome::Error(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                "HMP",
            ),
            (b"hello admin\n", "raw"),
            (b"", "raw"),
        ] {
            let path = dir.path().join(format!("s{}", greeting.len()));
            let l = tokio::net::UnixListener::bind(&path).unwrap();
            let g = greeting.to_vec();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                s.write_all(&g).await.unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
            let m = Monitor::connect(&Endpoint::Unix(path)).await.unwrap();
            assert_eq!(m.kind(), kind);
        }
    }
}
