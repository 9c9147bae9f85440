//! A small QMP client: typed commands from the `qapi` crate over a transport of our own.
//!
//! The `qapi` crate's own tokio client is not used: it aborts the process after a timed-out
//! command, ends the stream on an event it does not know, and has no timeouts (see
//! `notes/qmp.md`). Here every call has a timeout that removes its pending entry, late replies
//! are dropped, events stay raw JSON, and the connection's end is a token callers can watch.
//!
//! QEMU serves one client per monitor, so a connection whose state is in doubt (a command
//! timed out) must really be closed before a new one can be greeted. [`QmpClient::close`] does
//! that whoever else still holds the client: it drops both halves of the socket at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::limits::MAX_QMP_MESSAGE;

/// What can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Writing the command failed: it did not reach QEMU.
    #[error("QMP write failed")]
    Write(#[source] std::io::Error),
    /// The connection closed after the command was written, before a reply.
    #[error("QMP connection closed before the reply")]
    ClosedAfterSend,
    /// No reply within the timeout.
    #[error("no QMP reply within {0:?}")]
    Timeout(Duration),
    /// The reply does not have the shape the command's schema type says.
    #[error("unexpected QMP reply: {0}")]
    BadReply(String),
    /// The greeting or capabilities negotiation failed.
    #[error("QMP handshake failed: {0}")]
    Handshake(String),
}

/// One event, kept as raw JSON; only the names awd acts on are ever parsed further.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    /// The event name (`STOP`, `RESUME`, `SHUTDOWN`, …).
    pub name: String,
    /// The `data` member, or `null`.
    pub data: Value,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;
/// The write half; `None` once [`QmpClient::close`] dropped it.
type Writer = tokio::sync::Mutex<Option<Box<dyn AsyncWrite + Send + Unpin>>>;

/// A connected, negotiated QMP session.
pub struct QmpClient {
    writer: Writer,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    /// Cancelled when the connection ends, by EOF or by [`QmpClient::close`].
    closed: CancellationToken,
    /// Cancelled once the reader task has dropped the read half.
    reader_gone: CancellationToken,
    /// Whether awd ended the connection (rather than QEMU).
    closed_by_us: AtomicBool,
    /// The greeting's `QMP.version.qemu`, e.g. "7.2.22".
    pub version: String,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Reads one `\n`-terminated line of at most `max` bytes. `Ok(None)` at EOF.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "EOF inside a line",
                ))
            };
        }
        let (used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + used > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
        line.extend_from_slice(&buf[..used]);
        r.consume(used);
        if done {
            return Ok(Some(line));
        }
    }
}

impl QmpClient {
    /// Completes a QMP handshake on a stream whose greeting line has been read already
    /// (`greeting`), negotiates capabilities, and starts the reader task.
    pub async fn start<R, W>(
        greeting: &Value,
        mut reader: R,
        writer: W,
        timeout: Duration,
    ) -> Result<Self, QmpError>
    where
        R: AsyncBufRead + Unpin + Send + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let version = greeting
            .pointer("/QMP/version/qemu")
            .map(|v| {
                let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
                format!("{}.{}.{}", n("major"), n("minor"), n("micro"))
            })
            .ok_or_else(|| QmpError::Handshake("greeting has no QMP.version".into()))?;
        let mut writer: Box<dyn AsyncWrite + Send + Unpin> = Box::new(writer);
        writer
            .write_all(b"{\"execute\":\"qmp_capabilities\",\"id\":0}\r\n")
            .await
            .map_err(|e| QmpError::Handshake(format!("write: {e}")))?;
        // Events may come before the reply; skip them.
        let negotiated = tokio::time::timeout(timeout, async {
            loop {
                let line = read_line_bounded(&mut reader, MAX_QMP_MESSAGE)
                    .await
                    .map_err(|e| QmpError::Handshake(format!("read: {e}")))?
                    .ok_or_else(|| QmpError::Handshake("closed during negotiation".into()))?;
                let v: Value = serde_json::from_slice(&line)
                    .map_err(|e| QmpError::Handshake(format!("not JSON: {e}")))?;
                if v.get("return").is_some() {
                    return Ok(());
                }
                if let Some(e) = v.get("error") {
                    return Err(QmpError::Handshake(format!("qmp_capabilities: {e}")));
                }
            }
        })
        .await;
        match negotiated {
            Ok(r) => r?,
            Err(_) => {
                return Err(QmpError::Handshake(format!(
                    "no reply to qmp_capabilities within {timeout:?}"
                )));
            }
        }
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(64);
        let closed = CancellationToken::new();
        let reader_gone = CancellationToken::new();
        tokio::spawn(read_loop(
            reader,
            pending.clone(),
            events.clone(),
            closed.clone(),
            reader_gone.clone(),
        ));
        Ok(QmpClient {
            writer: tokio::sync::Mutex::new(Some(writer)),
            pending,
            next_id: AtomicU64::new(1),
            events,
            closed,
            reader_gone,
            closed_by_us: AtomicBool::new(false),
            version,
        })
    }

    /// Closes the connection now, whoever else holds this client: the reader task ends and
    /// drops the read half, the write half is dropped here, so the socket is closed when this
    /// returns and QEMU can greet the next client. Pending and later commands fail, the
    /// [`closed`](Self::closed) token is cancelled, and event subscribers see the end.
    pub async fn close(&self) {
        self.closed_by_us.store(true, Ordering::Relaxed);
        self.closed.cancel();
        // A write in progress holds the lock for at most its own timeout.
        let writer = self.writer.lock().await.take();
        drop(writer);
        self.reader_gone.cancelled().await;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether the connection ended without awd closing it (EOF or a read error: QEMU closed
    /// it, exited or was killed).
    pub fn ended_by_peer(&self) -> bool {
        self.closed.is_cancelled() && !self.closed_by_us.load(Ordering::Relaxed)
    }

    /// A token cancelled when the connection ends.
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// Subscribes to QMP events.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Executes a typed command. The outer `Result` is the transport's; the inner one is
    /// QEMU's answer: its return value or its error.
    pub async fn execute<C: qapi::Command>(
        &self,
        cmd: C,
        timeout: Duration,
    ) -> Result<Result<C::Ok, qapi::Error>, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = serde_json::to_vec(&qapi::Execute::with_id(cmd, id))
            .map_err(|e| QmpError::BadReply(format!("cannot serialize: {e}")))?;
        msg.extend_from_slice(b"\r\n");
        let reply = self.round_trip(id, &msg, timeout).await?;
        if let Some(err) = reply.get("error") {
            let err: qapi::Error = serde_json::from_value(serde_json::json!({"error": err}))
                .map_err(|e| QmpError::BadReply(format!("{e}: {reply}")))?;
            return Ok(Err(err));
        }
        let ret = reply.get("return").cloned().unwrap_or(Value::Null);
        serde_json::from_value::<C::Ok>(ret)
            .map(Ok)
            .map_err(|e| QmpError::BadReply(format!("{e}: {reply}")))
    }

    async fn round_trip(&self, id: u64, msg: &[u8], timeout: Duration) -> Result<Value, QmpError> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let written = {
            let mut guard = self.writer.lock().await;
            match guard.as_mut() {
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the connection was closed",
                )),
                Some(w) => match tokio::time::timeout(timeout, async {
                    w.write_all(msg).await?;
                    w.flush().await
                })
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "write timed out",
                    )),
                },
            }
        };
        if let Err(e) = written {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(QmpError::Write(e));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(QmpError::ClosedAfterSend),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Err(QmpError::Timeout(timeout))
            }
        }
    }
}

async fn read_loop<R: AsyncBufRead + Unpin>(
    mut reader: R,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: CancellationToken,
    reader_gone: CancellationToken,
) {
    loop {
        let line = tokio::select! {
            _ = closed.cancelled() => break,
            l = read_line_bounded(&mut reader, MAX_QMP_MESSAGE) => l,
        };
        let line = match line {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                debug!("QMP read ended: {e}");
                break;
            }
        };
        let Ok(v) = serde_json::from_slice::<Value>(&line) else {
            debug!("QMP: ignoring a line that is not JSON");
            continue;
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let data = v.get("data").cloned().unwrap_or(Value::Null);
            let _ = events.send(QmpEvent {
                name: name.to_owned(),
                data,
            });
            continue;
        }
        if let Some(id) = v.get("id").and_then(Value::as_u64) {
            let tx = pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            if let Some(tx) = tx {
                let _ = tx.send(v);
            }
        }
    }
    drop(reader);
    closed.cancel();
    reader_gone.cancel();
    // Dropping the senders tells every waiting caller the connection is gone.
    pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, BufReader};

    /// A fake QMP server on the far end of a duplex pipe, answering from a script.
    async fn client_with<F, Fut>(serve: F) -> QmpClient
    where
        F: FnOnce(tokio::io::DuplexStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (ours, theirs) = tokio::io::duplex(4096);
        tokio::spawn(serve(theirs));
        let (r, w) = tokio::io::split(ours);
        let greeting = serde_json::json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}}}});
        QmpClient::start(&greeting, BufReader::new(r), w, Duration::from_secs(5))
            .await
            .unwrap()
    }

    async fn read_request(s: &mut tokio::io::DuplexStream) -> Value {
        let mut buf = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).await.unwrap() == 1 {
            if b[0] == b'\n' {
                break;
            }
            buf.push(b[0]);
        }
        serde_json::from_slice(&buf).unwrap()
    }

    #[tokio::test]
    async fn typed_command_and_error_reply() {
        let c = client_with(|mut s| async move {
            let req = read_request(&mut s).await;
            assert_eq!(req["execute"], "qmp_capabilities");
            s.write_all(b"{\"return\": {}}\r\n").await.unwrap();
            let req = read_request(&mut s).await;
            assert_eq!(req["execute"], "x-colo-lost-heartbeat");
            let id = req["id"].clone();
            let reply = serde_json::json!({"error": {"class": "GenericError", "desc": "The feature 'colo' is not enabled"}, "id": id});
            s.write_all(format!("{{\"event\": \"MEM_UNPLUG_ERROR\", \"data\": {{}}}}\r\n{reply}\r\n").as_bytes()).await.unwrap();
            let req = read_request(&mut s).await;
            assert_eq!(req["execute"], "human-monitor-command");
            assert_eq!(req["arguments"]["command-line"], "info status");
            let reply = serde_json::json!({"return": "VM status: running\r\n", "id": req["id"]});
            s.write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();
            let _ = read_request(&mut s).await;
        })
        .await;
        let mut events = c.events();
        let r = c
            .execute(qapi::qmp::x_colo_lost_heartbeat {}, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r.unwrap_err().desc, "The feature 'colo' is not enabled");
        assert_eq!(
            events.recv().await.unwrap().name,
            "MEM_UNPLUG_ERROR",
            "unknown events do not end the stream"
        );
        let r = c
            .execute(
                qapi::qmp::human_monitor_command {
                    command_line: "info status".into(),
                    cpu_index: None,
                },
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(r.unwrap(), "VM status: running\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_command_does_not_poison_the_next() {
        let c = client_with(|mut s| async move {
            let _ = read_request(&mut s).await;
            s.write_all(b"{\"return\": {}}\r\n").await.unwrap();
            let first = read_request(&mut s).await; // never answered in time
            let second = read_request(&mut s).await;
            let late = serde_json::json!({"return": {}, "id": first["id"]});
            let ok = serde_json::json!({"return": {"running": true, "status": "running"}, "id": second["id"]});
            s.write_all(format!("{late}\r\n{ok}\r\n").as_bytes()).await.unwrap();
            let _ = read_request(&mut s).await;
        })
        .await;
        let r = c.execute(qapi::qmp::stop {}, Duration::from_secs(1)).await;
        assert!(matches!(r, Err(QmpError::Timeout(_))), "{r:?}");
        let r = c
            .execute(qapi::qmp::query_status {}, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(r.running);
    }

    #[tokio::test]
    async fn a_connection_closed_after_send_is_reported_as_such() {
        let c = client_with(|mut s| async move {
            let _ = read_request(&mut s).await;
            s.write_all(b"{\"return\": {}}\r\n").await.unwrap();
            let _ = read_request(&mut s).await;
            s.write_all(b"{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}}\r\n").await.unwrap();
            drop(s);
        })
        .await;
        let r = c.execute(qapi::qmp::quit {}, Duration::from_secs(5)).await;
        assert!(matches!(r, Err(QmpError::ClosedAfterSend)), "{r:?}");
        c.closed().cancelled().await;
        assert!(c.ended_by_peer());
    }

    #[tokio::test(start_paused = true)]
    async fn close_shuts_the_socket_while_other_holders_remain() {
        let (saw_eof_tx, saw_eof) = oneshot::channel();
        let c = Arc::new(
            client_with(|mut s| async move {
                let _ = read_request(&mut s).await;
                s.write_all(b"{\"return\": {}}\r\n").await.unwrap();
                let _ = read_request(&mut s).await; // system_reset: never answered
                let mut rest = Vec::new();
                let n = s.read_to_end(&mut rest).await.unwrap();
                let _ = saw_eof_tx.send(n);
            })
            .await,
        );
        // Another holder, as the VM-state tracker is.
        let other = c.clone();
        let r = c
            .execute(qapi::qmp::system_reset {}, Duration::from_secs(5))
            .await;
        assert!(matches!(r, Err(QmpError::Timeout(_))), "{r:?}");
        c.close().await;
        assert_eq!(saw_eof.await.unwrap(), 0, "the peer sees EOF at once");
        assert!(other.closed().is_cancelled());
        assert!(!other.ended_by_peer(), "awd closed it");
        let r = other
            .execute(qapi::qmp::quit {}, Duration::from_secs(5))
            .await;
        assert!(matches!(r, Err(QmpError::Write(_))), "{r:?}");
    }
}
