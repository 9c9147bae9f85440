//! TCP and Unix socket channels, as QEMU's `-chardev socket` has them: a server that listens, or
//! a client that connects and reconnects every `reconnect` seconds.
//!
//! A server accepts several connections at once (a restarted peer may connect before its old
//! connection is seen to close); all of them feed the same watchdog, and pulses go to each.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{ChannelEvent, Intake, next_conn_id};
use crate::config::{Endpoint, SocketChardev};
use crate::metrics::WatchdogMetrics;

/// The most connections one server channel holds; further ones are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection whose peer does not read its pulses for this long is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer per connection.
const READ_CHUNK: usize = 8 * 1024;

/// Why a socket channel could not start.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Binding the listening socket failed (port in use, no permission, bad address).
    #[error("chardev '{chardev}': cannot listen on {endpoint}")]
    Bind {
        /// The chardev id.
        chardev: String,
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A bound listening socket, TCP or Unix.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix; the path is removed when the listener is dropped.
    Unix(UnixListener, UnixPathGuard),
}

/// Removes a Unix socket file when dropped.
#[derive(Debug)]
pub struct UnixPathGuard(PathBuf);

impl Drop for UnixPathGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds a Unix socket, removing a stale socket file left by an earlier process (one nobody
/// answers on). A live socket at the path is an error, as is any non-socket file.
pub fn bind_unix(path: &Path) -> io::Result<(UnixListener, UnixPathGuard)> {
    let (l, guard) = bind_unix_std(path)?;
    l.set_nonblocking(true)?;
    Ok((UnixListener::from_std(l)?, guard))
}

/// [`bind_unix`] for code that runs on its own thread rather than on tokio (the vhost-user vsock
/// device): the same stale-file handling, a blocking std listener.
pub fn bind_unix_std(path: &Path) -> io::Result<(std::os::unix::net::UnixListener, UnixPathGuard)> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening there",
                ));
            }
            Err(_) => std::fs::remove_file(path)?,
        }
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    Ok((l, UnixPathGuard(path.to_owned())))
}

/// Binds the listening socket of a server chardev. Called before anything runs, so a port in
/// use stops awd at startup with a clear error.
pub async fn bind(ch: &SocketChardev) -> Result<Listener, SocketError> {
    let err = |source| SocketError::Bind {
        chardev: ch.id.clone(),
        endpoint: ch.endpoint.to_string(),
        source,
    };
    match &ch.endpoint {
        Endpoint::Tcp { host, port } => TcpListener::bind((host.as_str(), *port))
            .await
            .map(Listener::Tcp)
            .map_err(err),
        Endpoint::Unix(path) => bind_unix(path)
            .map(|(l, g)| Listener::Unix(l, g))
            .map_err(err),
    }
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
}

/// Accepts connections until `shutdown`, serving each on its own task.
pub async fn serve(listener: Listener, ctx: ChannelContext, shutdown: CancellationToken) {
    let conns = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                if conns.len() >= MAX_CONNECTIONS {
                    warn!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, %peer,
                        "refusing connection: {MAX_CONNECTIONS} already open");
                    continue;
                }
                let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
                conns.spawn(async move {
                    match stream {
                        Accepted::Tcp(s) => {
                            if ctx.nodelay {
                                let _ = s.set_nodelay(true);
                            }
                            run_connection(s, peer, &ctx, &shutdown).await
                        }
                        Accepted::Unix(s) => run_connection(s, peer, &ctx, &shutdown).await,
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(
                    watchdog = &*ctx.watchdog,
                    channel = &*ctx.channel,
                    "accept failed: {e}"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    conns.close();
    conns.wait().await;
}

enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn accept(l: &Listener) -> io::Result<(Accepted, String)> {
    match l {
        Listener::Tcp(l) => l
            .accept()
            .await
            .map(|(s, a)| (Accepted::Tcp(s), a.to_string())),
        Listener::Unix(l, g) => l
            .accept()
            .await
            .map(|(s, _)| (Accepted::Unix(s), format!("unix:{}", g.0.display()))),
    }
}

/// Connects to `ch`'s endpoint, serves the connection until it ends, waits `reconnect`, and
/// tries again, until `shutdown`.
pub async fn connect_loop(ch: SocketChardev, ctx: ChannelContext, shutdown: CancellationToken) {
    let mut failures = 0u64;
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = connect(&ch.endpoint) => r,
        };
        match result {
            Ok(stream) => {
                failures = 0;
                let peer = ch.endpoint.to_string();
                match stream {
                    Accepted::Tcp(s) => {
                        if ch.nodelay {
                            let _ = s.set_nodelay(true);
                        }
                        run_connection(s, peer, &ctx, &shutdown).await
                    }
                    Accepted::Unix(s) => run_connection(s, peer, &ctx, &shutdown).await,
                }
            }
            Err(e) => {
                failures += 1;
                // Say it once loudly, then quietly: a peer that is down stays down for a while.
                if failures == 1 {
                    warn!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, endpoint = %ch.endpoint,
                        "cannot connect: {e}; retrying every {} s", ch.reconnect.as_secs_f64());
                } else {
                    debug!(
                        watchdog = &*ctx.watchdog,
                        channel = &*ctx.channel,
                        "connect attempt {failures} failed: {e}"
                    );
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ch.reconnect) => {}
        }
    }
}

async fn connect(ep: &Endpoint) -> io::Result<Accepted> {
    match ep {
        Endpoint::Tcp { host, port } => TcpStream::connect((host.as_str(), *port))
            .await
            .map(Accepted::Tcp),
        Endpoint::Unix(p) => UnixStream::connect(p).await.map(Accepted::Unix),
    }
}

/// Serves one connection: reads and decodes until EOF, error or shutdown, while a writer task
/// sends whatever the watchdog queues for it.
pub async fn run_connection<S>(
    stream: S,
    peer: String,
    ctx: &ChannelContext,
    shutdown: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let conn = next_conn_id();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Bytes>(16);
    let closed = CancellationToken::new();
    let writer = {
        let closed = closed.clone();
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&b)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            let _ = wr.shutdown().await;
            closed.cancel();
        })
    };
    info!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, conn, %peer, "connected");
    ctx.metrics.connections.inc();
    if ctx
        .events
        .send(ChannelEvent::Connected {
            conn,
            peer: peer.clone(),
            tx: Box::new(tx),
        })
        .await
        .is_err()
    {
        ctx.metrics.connections.dec();
        writer.abort();
        return;
    }
    let mut intake = Intake::new(
        ctx.watchdog.clone(),
        ctx.channel.clone(),
        ctx.metrics.clone(),
    );
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut events = Vec::new();
    let reason = loop {
        buf.clear();
        let n = tokio::select! {
            _ = shutdown.cancelled() => break "awd is shutting down".to_owned(),
            _ = closed.cancelled() => break "the peer stopped reading".to_owned(),
            r = rd.read_buf(&mut buf) => r,
        };
        match n {
            Ok(0) if intake.is_mid_message() => break "closed by the peer mid-message".to_owned(),
            Ok(0) => break "closed by the peer".to_owned(),
            Ok(_) => {
                intake.feed(conn, &buf, &mut events);
                for ev in events.drain(..) {
                    // Back-pressure: a slow watchdog slows this connection, not the others.
                    if ctx.events.send(ev).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) => break format!("read error: {e}"),
        }
    };
    ctx.metrics.connections.dec();
    info!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, conn, %peer, "disconnected: {reason}");
    let _ = ctx
        .events
        .send(ChannelEvent::Disconnected { conn, reason })
        .await;
    writer.abort();
}
