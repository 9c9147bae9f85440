//! Entry points for the coverage-guided fuzz targets in `fuzz/` (cargo feature `fuzzing`, never
//! in a release build).
//!
//! Every target drives the code that reads untrusted input in awd itself, never a copy of it.
//! Most of that code is public already (the protocol [`Decoder`](crate::protocol::Decoder), the
//! transports' [`Intake`](crate::transport::Intake), the config parsers, the control socket, the
//! agent's [`relayable`](crate::agent::relayable)); this module reaches the rest through thin
//! wrappers:
//!
//! | item | reaches |
//! |---|---|
//! | [`vsock`] | the vsock device's unit-test driver: real guest memory, real split virtqueues, the real `VsockBackend` driven through `handle_event` |
//! | [`monitor_session`] | a notification node's greeting, classification (QMP, HMP, raw) and script lines, over an in-memory stream on paused tokio time |
//! | [`agent_client`] | the agent's handling of one local client: line splitting, the relay check, the relay to the host, the replies |
//!
//! Not an API: it changes with the code it wraps.

use std::collections::VecDeque;
use std::io::{self, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::action::monitor::{DeliveryError, Kind, Monitor, MonitorError, Outcome};
use crate::action::qmp::QmpEvent;
use crate::action::script::ScriptLine;
use crate::agent::Agent;
use crate::agent::local::LocalClient;

/// The vsock device's test driver (`transport/vsock/test_driver.rs`), as the unit tests use it.
pub mod vsock {
    pub use crate::transport::vsock::test_driver::{
        Desc, Driver, DriverRing, GUEST_CID, Layout, QSIZE, RX_BUF, Watch, hdr, request, rw,
    };
}

/// The far end of a scripted monitor connection: the reads QEMU's side delivers, in order, then
/// EOF; whatever awd writes is kept.
struct Scripted {
    reads: VecDeque<Vec<u8>>,
    written: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Scripted {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(front) = this.reads.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.drain(..n);
            if front.is_empty() {
                this.reads.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What a scripted monitor session came to.
#[derive(Debug)]
pub struct MonitorSession {
    /// What awd took the node for, or why the greeting failed.
    pub kind: Result<Kind, MonitorError>,
    /// One answer per script line sent (none if the greeting failed).
    pub outcomes: Vec<Result<Outcome, DeliveryError>>,
    /// The QMP events awd received.
    pub events: Vec<QmpEvent>,
    /// Everything awd wrote to the node.
    pub written: Vec<u8>,
}

/// Greets a notification node whose whole output is `reads` (each element one read, then EOF)
/// as [`Monitor::connect`] does once connected, with `known` as the kind remembered from last
/// time, then sends `lines` as the action runner does and closes the connection. Runs on paused
/// tokio time, so a wait for an answer that never comes ends at once with its timeout.
pub fn monitor_session(
    reads: Vec<Vec<u8>>,
    known: Option<Kind>,
    lines: &[ScriptLine],
    timeout: Duration,
) -> MonitorSession {
    let written = Arc::new(Mutex::new(Vec::new()));
    let stream = Scripted {
        // A read of zero bytes is EOF, so empty reads are left out.
        reads: reads.into_iter().filter(|r| !r.is_empty()).collect(),
        written: written.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds");
    let (kind, outcomes, events) = rt.block_on(async {
        let conn = match Monitor::greet(Box::new(stream), "fuzz", known).await {
            Ok(conn) => conn,
            Err(e) => return (Err(e), Vec::new(), Vec::new()),
        };
        let mut monitor = Monitor {
            conn,
            peer_pid: None,
        };
        let mut subscription = monitor.qmp().map(|c| c.events());
        let mut outcomes = Vec::new();
        for line in lines {
            outcomes.push(monitor.run(line, timeout).await);
        }
        let mut events = Vec::new();
        if let Some(rx) = subscription.as_mut() {
            loop {
                match rx.try_recv() {
                    Ok(ev) => events.push(ev),
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
        }
        let kind = monitor.kind();
        monitor.close().await;
        (Ok(kind), outcomes, events)
    });
    let written = std::mem::take(&mut *written.lock().unwrap_or_else(|e| e.into_inner()));
    MonitorSession {
        kind,
        outcomes,
        events,
        written,
    }
}

/// The most a read of the agent's takes from a client in one [`Agent::serve_client`] call is
/// its read budget; writing less than that between calls lets each call drain the socket.
const CLIENT_STEP: usize = 32 * 1024;

/// Connects one local client to `agent` over a socket pair and sends it `reads` (each element
/// arrives as its own read), serving the client after each as the agent's poll loop does; with
/// `eof`, the client then shuts its side. Returns everything the agent answered the client.
pub fn agent_client(agent: &mut Agent, reads: &[&[u8]], eof: bool) -> io::Result<Vec<u8>> {
    let (client, ours) = UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    client.set_nonblocking(true)?;
    let mut local = LocalClient::new(ours);
    let mut replies = Vec::new();
    for read in reads {
        let mut rest = *read;
        while !rest.is_empty() {
            let step = rest.len().min(CLIENT_STEP);
            match (&client).write(&rest[..step]) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            agent.serve_client(&mut local);
            take_replies(&client, &mut replies)?;
        }
    }
    if eof {
        client.shutdown(std::net::Shutdown::Write)?;
        agent.serve_client(&mut local);
    }
    take_replies(&client, &mut replies)?;
    Ok(replies)
}

/// Reads what the agent has answered so far, without waiting.
fn take_replies(client: &UnixStream, replies: &mut Vec<u8>) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut client = client;
    loop {
        match client.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => replies.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
