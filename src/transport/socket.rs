//! TCP and Unix socket channels, as QEMU's `-chardev socket` has them: a server that listens, or
//! a client that connects and reconnects every `reconnect` seconds.
//!
//! A server accepts several connections at once (a restarted peer may connect before its old
//! connection is seen to close); all of them feed the same watchdog, and pulses go to each.
//!
//! **The real peer is always served.** A full server channel (`max_connections`) does not
//! refuse a newcomer: it evicts the connection that proves least, so idle sockets opened by
//! anyone who can reach the port cannot lock the peer out ([`choose_victim`]). A TCP server may
//! also admit only `peers=` ranges. Refusals and evictions are counted by reason and logged,
//! rate-limited.
//!
//! **No TCP connection hangs.** Every TCP connection gets keepalive and `TCP_USER_TIMEOUT`
//! ([`TcpOptions`]), so a peer whose host vanished without a FIN is noticed within the user
//! timeout; a client's connect attempt is bounded by its `reconnect` period, so attempts start
//! every `reconnect` seconds even while SYNs are dropped.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::limits::{READ_CHUNK, WRITE_TIMEOUT};
use super::psk;
use super::{ChannelContext, ChannelEvent, CloseReason, Intake, next_conn_id};
use super::{Cidr, Endpoint, PeerCred, SocketChardev};
use crate::auth::{Key, Role};
use crate::metrics::EVICT_REASONS;
use crate::util::{LogLimiter, UnixPathGuard, bind_unix_std, error_chain};

/// Why a socket channel could not start.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Binding the listening socket failed (port in use, no permission, bad address).
    #[error("chardev '{chardev}': cannot listen on {endpoint}")]
    Bind {
        /// The chardev id.
        chardev: String,
        /// The address it tried to listen on.
        endpoint: String,
        /// The bind error (address in use, permission denied, bad address).
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

/// Binds a Unix socket, removing a stale socket file left by an earlier process (one nobody
/// answers on). A live socket at the path is an error, as is any non-socket file.
pub fn bind_unix(path: &Path) -> io::Result<(UnixListener, UnixPathGuard)> {
    let (l, guard) = bind_unix_std(path)?;
    l.set_nonblocking(true)?;
    Ok((UnixListener::from_std(l)?, guard))
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

/// Socket options for every TCP connection of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpOptions {
    /// TCP_NODELAY.
    pub nodelay: bool,
    /// Keepalive and `TCP_USER_TIMEOUT`: a peer that acknowledges nothing for this long is
    /// gone. `None` leaves both to the kernel (no keepalive, retransmits for ~15 minutes).
    pub user_timeout: Option<Duration>,
}

impl TcpOptions {
    /// The options a chardev asks for.
    pub fn of(ch: &SocketChardev) -> TcpOptions {
        TcpOptions {
            nodelay: ch.nodelay,
            user_timeout: ch.tcp_user_timeout,
        }
    }

    /// The keepalive idle time and probe interval for a user timeout: a fifth of it in whole
    /// seconds (at least 1), so several probes go out before the user timeout ends the
    /// connection. With `TCP_USER_TIMEOUT` set, Linux drops the connection once a probe is
    /// unanswered and nothing has been received for the user timeout.
    pub fn keepalive_period(user_timeout: Duration) -> Duration {
        Duration::from_secs((user_timeout.as_secs() / 5).max(1))
    }

    /// Applies the options to `s`.
    pub fn apply(&self, s: &TcpStream) -> io::Result<()> {
        if self.nodelay {
            s.set_nodelay(true)?;
        }
        if let Some(t) = self.user_timeout {
            let period = Self::keepalive_period(t);
            let sock = socket2::SockRef::from(s);
            let retries = (t.as_secs() / period.as_secs()).clamp(1, 127) as u32;
            sock.set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(period)
                    .with_interval(period)
                    .with_retries(retries),
            )?;
            sock.set_tcp_user_timeout(Some(t))?;
        }
        Ok(())
    }
}

/// How a server channel admits connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerPolicy {
    /// The most connections held at once; a newcomer beyond evicts one ([`choose_victim`]).
    pub max_connections: usize,
    /// TCP: the peer ranges admitted (empty: any).
    pub peers: Vec<Cidr>,
    /// A connection silent for longer than this (the watchdog's timeout) proves nothing.
    pub stale_after: Duration,
    /// Options for each accepted TCP connection.
    pub tcp: TcpOptions,
    /// Unix: who a peer must be (`SO_PEERCRED`).
    pub peer: PeerCred,
    /// TCP: the pre-shared key every connection must prove (`psk=`).
    pub psk: Option<Key>,
}

impl ServerPolicy {
    /// The policy of server chardev `ch` feeding a watchdog with timeout `stale_after`.
    pub fn of(ch: &SocketChardev, stale_after: Duration) -> ServerPolicy {
        ServerPolicy {
            max_connections: ch.max_connections.max(1),
            peers: ch.peers.clone(),
            stale_after,
            tcp: TcpOptions::of(ch),
            peer: ch.peer,
            psk: ch.psk.clone(),
        }
    }

    /// Whether a peer at `addr` may connect (Unix peers always may: the file mode guards them).
    pub fn admits(&self, addr: Option<SocketAddr>) -> bool {
        match addr {
            Some(a) if !self.peers.is_empty() => self.peers.iter().any(|c| c.contains(a.ip())),
            _ => true,
        }
    }
}

/// Why a connection was evicted; indexes [`EVICT_REASONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictReason {
    /// It never sent a byte.
    NeverSpoke,
    /// It has been silent for longer than the watchdog's timeout.
    Stale,
    /// Every connection spoke within the timeout; this one longest ago.
    Silent,
}

impl EvictReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        EVICT_REASONS[self as usize]
    }

    fn describe(self) -> &'static str {
        match self {
            EvictReason::NeverSpoke => "it never sent anything",
            EvictReason::Stale => "it was silent for longer than the watchdog's timeout",
            EvictReason::Silent => {
                "it was the one silent for longest (every connection is recent:                  raise max-connections if this is a real peer)"
            }
        }
    }
}

/// What the accept loop knows of one open connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnActivity {
    /// When it was accepted.
    pub accepted: Instant,
    /// When it last delivered input (`None`: never).
    pub last_input: Option<Instant>,
}

/// Picks the connection a full channel evicts to admit a new one: one that proves nothing
/// first (never spoke, or silent for longer than `stale_after`; the longest silent of those,
/// counting silence from acceptance for one that never spoke), else the one silent for
/// longest. A live peer beats at least once per timeout, so it is evicted only when every
/// other connection has spoken more recently than it. `None` only for an empty slice.
pub fn choose_victim(
    now: Instant,
    conns: &[ConnActivity],
    stale_after: Duration,
) -> Option<(usize, EvictReason)> {
    let silent_since = |c: &ConnActivity| c.last_input.unwrap_or(c.accepted);
    let proves_nothing = |c: &ConnActivity| {
        c.last_input
            .is_none_or(|t| now.saturating_duration_since(t) > stale_after)
    };
    let pick = |useless: bool| {
        conns
            .iter()
            .enumerate()
            .filter(|(_, c)| !useless || proves_nothing(c))
            .min_by_key(|(_, c)| silent_since(c))
            .map(|(i, c)| {
                let reason = match (c.last_input, useless) {
                    (None, _) => EvictReason::NeverSpoke,
                    (Some(_), true) => EvictReason::Stale,
                    (Some(_), false) => EvictReason::Silent,
                };
                (i, reason)
            })
    };
    pick(true).or_else(|| pick(false))
}

/// One connection's record, shared between its task (which stamps input) and the accept loop
/// (which may evict it). The loop holds it weakly: a connection that ended drops out.
#[derive(Debug)]
pub struct ConnSlot {
    accepted: Instant,
    /// Milliseconds after `accepted` of the last input, plus one (0: never).
    last_input: AtomicU64,
    evict: CancellationToken,
    why: OnceLock<EvictReason>,
    /// The channel's limiter for connect and disconnect lines: anyone who reaches the port
    /// can open connections as fast as they like.
    log: Arc<std::sync::Mutex<LogLimiter>>,
}

impl ConnSlot {
    fn new(log: Arc<std::sync::Mutex<LogLimiter>>) -> Arc<ConnSlot> {
        Arc::new(ConnSlot {
            accepted: Instant::now(),
            last_input: AtomicU64::new(0),
            evict: CancellationToken::new(),
            why: OnceLock::new(),
            log,
        })
    }

    /// Whether a connect or disconnect line may be logged now, with the count suppressed.
    fn may_log(slot: Option<&Arc<ConnSlot>>) -> Option<u64> {
        match slot {
            None => Some(0),
            Some(s) => s
                .log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allow(std::time::Instant::now()),
        }
    }

    /// Records input now.
    fn touch(&self) {
        let ms = self.accepted.elapsed().as_millis() as u64;
        self.last_input
            .store(ms.saturating_add(1), Ordering::Relaxed);
    }

    fn activity(&self) -> ConnActivity {
        let last_input = match self.last_input.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.accepted + Duration::from_millis(ms - 1)),
        };
        ConnActivity {
            accepted: self.accepted,
            last_input,
        }
    }
}

/// Accepts connections until `shutdown`, serving each on its own task, admitting and evicting
/// as `policy` says.
pub async fn serve(
    listener: Listener,
    policy: ServerPolicy,
    ctx: ChannelContext,
    shutdown: CancellationToken,
) {
    let conns = TaskTracker::new();
    let mut slots: Vec<Weak<ConnSlot>> = Vec::new();
    let mut refusals = LogLimiter::new(5, Duration::from_secs(10));
    let mut evictions = LogLimiter::new(5, Duration::from_secs(10));
    let conn_log = Arc::new(std::sync::Mutex::new(LogLimiter::new(
        20,
        Duration::from_secs(1),
    )));
    let auth_log = Arc::new(std::sync::Mutex::new(LogLimiter::new(
        5,
        Duration::from_secs(10),
    )));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok((stream, peer, addr)) => {
                if !policy.admits(addr) {
                    ctx.metrics.refused[0].inc();
                    if let Some(suppressed) = refusals.allow(std::time::Instant::now()) {
                        warn!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, %peer, suppressed,
                            reason = "not_allowed", "refusing connection: the peer is outside peers=");
                    }
                    continue;
                }
                if let Accepted::Unix(s) = &stream
                    && let Err(e) = policy.peer.verify(s)
                {
                    ctx.metrics.refused[1].inc();
                    if let Some(suppressed) = refusals.allow(std::time::Instant::now()) {
                        warn!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, %peer, suppressed,
                            reason = "peer_cred", "refusing connection: {e}");
                    }
                    continue;
                }
                slots.retain(|w| w.strong_count() > 0);
                if slots.len() >= policy.max_connections {
                    evict_one(&mut slots, &policy, &ctx, &mut evictions);
                }
                let slot = ConnSlot::new(conn_log.clone());
                slots.push(Arc::downgrade(&slot));
                let (ctx, shutdown, tcp) = (ctx.clone(), shutdown.clone(), policy.tcp);
                let (psk, auth_log) = (policy.psk.clone(), auth_log.clone());
                conns.spawn(async move {
                    match stream {
                        Accepted::Tcp(s) => {
                            set_tcp_options(&s, &tcp, &ctx, &peer);
                            let Some(key) = psk else {
                                return serve_connection(s, peer, &ctx, &shutdown, Some(slot))
                                    .await;
                            };
                            let auth = psk::open(s, &key, Role::Server, &ctx, &peer, &auth_log);
                            let pipe = tokio::select! {
                                _ = shutdown.cancelled() => None,
                                p = auth => p,
                            };
                            if let Some(pipe) = pipe {
                                serve_connection(pipe, peer, &ctx, &shutdown, Some(slot)).await
                            }
                        }
                        Accepted::Unix(s) => {
                            serve_connection(s, peer, &ctx, &shutdown, Some(slot)).await
                        }
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

/// Evicts the connection [`choose_victim`] picks from a full channel, and counts it.
fn evict_one(
    slots: &mut Vec<Weak<ConnSlot>>,
    policy: &ServerPolicy,
    ctx: &ChannelContext,
    log: &mut LogLimiter,
) {
    let live: Vec<Arc<ConnSlot>> = slots.iter().filter_map(Weak::upgrade).collect();
    let activity: Vec<ConnActivity> = live.iter().map(|s| s.activity()).collect();
    let Some((i, reason)) = choose_victim(Instant::now(), &activity, policy.stale_after) else {
        return;
    };
    let victim = &live[i];
    let _ = victim.why.set(reason);
    victim.evict.cancel();
    slots.retain(|w| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(victim)));
    ctx.metrics.evicted[reason as usize].inc();
    if let Some(suppressed) = log.allow(std::time::Instant::now()) {
        warn!(
            watchdog = &*ctx.watchdog,
            channel = &*ctx.channel,
            max_connections = policy.max_connections,
            reason = reason.as_str(),
            suppressed,
            "channel full: evicting a connection to admit a new one, because {}",
            reason.describe()
        );
    }
}

fn set_tcp_options(s: &TcpStream, tcp: &TcpOptions, ctx: &ChannelContext, peer: &str) {
    if let Err(e) = tcp.apply(s) {
        debug!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, %peer, "cannot set TCP options: {e}");
    }
}

enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn accept(l: &Listener) -> io::Result<(Accepted, String, Option<SocketAddr>)> {
    match l {
        Listener::Tcp(l) => l
            .accept()
            .await
            .map(|(s, a)| (Accepted::Tcp(s), a.to_string(), Some(a))),
        Listener::Unix(l, g) => l.accept().await.map(|(s, _)| {
            (
                Accepted::Unix(s),
                format!("unix:{}", g.path().display()),
                None,
            )
        }),
    }
}

/// Connects to `ch`'s endpoint, serves the connection until it ends, and tries again — at once
/// after a connection that lasted at least `reconnect`, else `reconnect` after the last
/// attempt began — until `shutdown`. An attempt that gets no answer is given up after `reconnect`
/// (SYNs dropped by a vanished host would otherwise hold it for minutes), so attempts start
/// every `reconnect` seconds.
pub async fn connect_loop(ch: SocketChardev, ctx: ChannelContext, shutdown: CancellationToken) {
    let tcp = TcpOptions::of(&ch);
    let mut failures = 0u64;
    let auth_log = Arc::new(std::sync::Mutex::new(LogLimiter::new(
        5,
        Duration::from_secs(10),
    )));
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = connect_within(&ch.endpoint, ch.reconnect, ch.peer) => r,
        };
        let next = match result {
            Ok(stream) => {
                failures = 0;
                let peer = ch.endpoint.to_string();
                match stream {
                    Accepted::Tcp(s) => {
                        set_tcp_options(&s, &tcp, &ctx, &peer);
                        match &ch.psk {
                            None => run_connection(s, peer, &ctx, &shutdown).await,
                            Some(key) => {
                                let auth = psk::open(s, key, Role::Client, &ctx, &peer, &auth_log);
                                let pipe = tokio::select! {
                                    _ = shutdown.cancelled() => return,
                                    p = auth => p,
                                };
                                if let Some(pipe) = pipe {
                                    run_connection(pipe, peer, &ctx, &shutdown).await
                                }
                            }
                        }
                    }
                    Accepted::Unix(s) => run_connection(s, peer, &ctx, &shutdown).await,
                }
                // A connection that was up for a while and then ended (a reset after a
                // network blip, the server restarting) is tried again at once: waiting a
                // whole period on top of the time TCP took to report the loss can outlast
                // the peer's timeout (found by the soak: a 0.9 s partition, reported 2 s
                // late, then 1 s of waiting, tripped both sides of a pair with 3 s timeouts).
                // One that ended quickly waits its period, so a peer that accepts and closes
                // is not hammered.
                if started.elapsed() >= ch.reconnect {
                    Instant::now()
                } else {
                    started + ch.reconnect
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
                started + ch.reconnect
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

/// One connect attempt, given up after `limit`.
async fn connect_within(ep: &Endpoint, limit: Duration, peer: PeerCred) -> io::Result<Accepted> {
    tokio::time::timeout(limit, connect(ep, peer))
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {} s", limit.as_secs_f64()),
            ))
        })
}

/// Connects to `ep`; a Unix server whose process is not `peer` is refused like an error.
async fn connect(ep: &Endpoint, peer: PeerCred) -> io::Result<Accepted> {
    match ep {
        Endpoint::Tcp { host, port } => TcpStream::connect((host.as_str(), *port))
            .await
            .map(Accepted::Tcp),
        Endpoint::Unix(p) => {
            let s = UnixStream::connect(p).await?;
            peer.verify(&s)?;
            Ok(Accepted::Unix(s))
        }
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
    serve_connection(stream, peer, ctx, shutdown, None).await
}

/// [`run_connection`] for a server channel's connection: `slot` is stamped with each input and
/// ends the connection when the accept loop evicts it.
async fn serve_connection<S>(
    stream: S,
    peer: String,
    ctx: &ChannelContext,
    shutdown: &CancellationToken,
    slot: Option<Arc<ConnSlot>>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let never = CancellationToken::new();
    let evicted = slot.as_ref().map_or(&never, |s| &s.evict);
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
    if let Some(suppressed) = ConnSlot::may_log(slot.as_ref()) {
        info!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, conn, %peer, suppressed, "connected");
    }
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
    )
    .with_rate_limit(ctx.rate_limit);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut events = Vec::new();
    let reason = loop {
        buf.clear();
        let n = tokio::select! {
            _ = shutdown.cancelled() => break CloseReason::Shutdown,
            _ = closed.cancelled() => break CloseReason::PeerNotReading,
            _ = evicted.cancelled() => {
                let why = slot.as_ref().and_then(|s| s.why.get().copied()).map_or("", EvictReason::describe);
                break CloseReason::Evicted(why);
            }
            r = rd.read_buf(&mut buf) => r,
        };
        match n {
            Ok(0) if intake.is_mid_message() => break CloseReason::PeerClosedMidMessage,
            Ok(0) => break CloseReason::PeerClosed,
            Ok(_) => {
                if let Some(s) = &slot {
                    s.touch();
                }
                intake.feed(conn, &buf, &mut events);
                for ev in events.drain(..) {
                    // Back-pressure: a slow watchdog slows this connection, not the others.
                    if ctx.events.send(ev).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) => break CloseReason::Read(Arc::new(e)),
        }
    };
    ctx.metrics.connections.dec();
    if let Some(suppressed) = ConnSlot::may_log(slot.as_ref()) {
        info!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, conn, %peer, suppressed, "disconnected: {}", error_chain(&reason));
    }
    let _ = ctx
        .events
        .send(ChannelEvent::Disconnected { conn, reason })
        .await;
    writer.abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, WatchdogMetrics};
    use crate::util::ms;

    #[test]
    fn the_victim_is_one_that_proves_nothing_and_a_recent_speaker_goes_last() {
        let t0 = Instant::now();
        let now = t0 + ms(10_000);
        let conn = |accepted: u64, last: Option<u64>| ConnActivity {
            accepted: t0 + ms(accepted),
            last_input: last.map(|l| t0 + ms(l)),
        };
        let timeout = ms(1000);
        let cases = [
            // The real peer spoke 100 ms ago; the others never spoke: the oldest of them goes,
            // even though the peer was accepted before all of them.
            (
                [conn(0, Some(9_900)), conn(5_000, None), conn(9_990, None)],
                EvictReason::NeverSpoke,
            ),
            // One spoke long ago (stale) and one never spoke, accepted later: the longest
            // silent.
            (
                [
                    conn(0, Some(9_900)),
                    conn(0, Some(2_000)),
                    conn(9_000, None),
                ],
                EvictReason::Stale,
            ),
            // Every connection spoke within the timeout: the one silent for longest.
            (
                [
                    conn(0, Some(9_900)),
                    conn(0, Some(9_500)),
                    conn(0, Some(9_950)),
                ],
                EvictReason::Silent,
            ),
        ];
        for (c, why) in cases {
            assert_eq!(choose_victim(now, &c, timeout), Some((1, why)), "{c:?}");
        }
        assert_eq!(choose_victim(now, &[], timeout), None);
    }

    #[test]
    fn an_allow_list_admits_its_ranges_and_unix_peers() {
        let ch = SocketChardev {
            id: "c".into(),
            endpoint: Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 1,
            },
            server: true,
            reconnect: Duration::from_secs(1),
            nodelay: false,
            max_connections: 4,
            peers: vec!["10.0.0.0/8".parse().unwrap()],
            tcp_user_timeout: None,
            rate_limit: None,
            peer: Default::default(),
            psk: None,
        };
        let p = ServerPolicy::of(&ch, ms(1000));
        assert!(p.admits(Some("10.9.8.7:5".parse().unwrap())));
        assert!(p.admits(Some("[::ffff:10.9.8.7]:5".parse().unwrap())));
        assert!(!p.admits(Some("127.0.0.1:5".parse().unwrap())));
        assert!(p.admits(None), "Unix peers");
        let open = ServerPolicy {
            peers: Vec::new(),
            ..p
        };
        assert!(open.admits(Some("127.0.0.1:5".parse().unwrap())));
    }

    fn context(metrics: &Arc<WatchdogMetrics>) -> (ChannelContext, mpsc::Receiver<ChannelEvent>) {
        let (events, rx) = mpsc::channel(64);
        let ctx = ChannelContext {
            watchdog: "w".into(),
            channel: "c".into(),
            events,
            metrics: metrics.clone(),
            nodelay: false,
            rate_limit: None,
        };
        (ctx, rx)
    }

    fn policy(max: usize, peers: &[&str]) -> ServerPolicy {
        ServerPolicy {
            max_connections: max,
            peers: peers.iter().map(|p| p.parse().unwrap()).collect(),
            stale_after: ms(1000),
            tcp: TcpOptions {
                nodelay: false,
                user_timeout: Some(Duration::from_secs(3)),
            },
            peer: PeerCred::default(),
            psk: None,
        }
    }

    /// Waits (bounded) for the next event that `pred` selects. The writer of every
    /// `Connected` event goes to `keep`, as the watchdog holds it: its drop closes the connection.
    async fn next_event(
        rx: &mut mpsc::Receiver<ChannelEvent>,
        keep: &mut Vec<Box<dyn crate::transport::ConnWriter>>,
        pred: impl Fn(&ChannelEvent) -> bool,
    ) -> ChannelEvent {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let ev = rx.recv().await.expect("channel open");
                let hit = pred(&ev);
                let ev = match ev {
                    ChannelEvent::Connected { conn, peer, tx } => {
                        keep.push(tx);
                        let (keep, _) = mpsc::channel::<Bytes>(1);
                        ChannelEvent::Connected {
                            conn,
                            peer,
                            tx: Box::new(keep),
                        }
                    }
                    other => other,
                };
                if hit {
                    return ev;
                }
            }
        })
        .await
        .expect("event within 10 s")
    }

    async fn read_eof<S: AsyncRead + Unpin>(s: &mut S) -> bool {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn a_full_channel_evicts_an_idle_connection_not_the_speaking_peer() {
        let metrics = Metrics::new().watchdog("w", "c");
        let (ctx, mut rx) = context(&metrics);
        let mut keep = Vec::new();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            Listener::Tcp(l),
            policy(2, &[]),
            ctx,
            shutdown.clone(),
        ));
        let mut idle = TcpStream::connect(addr).await.unwrap();
        next_event(&mut rx, &mut keep, |e| {
            matches!(e, ChannelEvent::Connected { .. })
        })
        .await;
        let mut peer = TcpStream::connect(addr).await.unwrap();
        next_event(&mut rx, &mut keep, |e| {
            matches!(e, ChannelEvent::Connected { .. })
        })
        .await;
        peer.write_all(b"WATCHDOG=1\n").await.unwrap();
        next_event(&mut rx, &mut keep, |e| {
            matches!(e, ChannelEvent::Heartbeats { .. })
        })
        .await;
        // A third connection: the idle one makes room, the peer stays.
        let _newcomer = TcpStream::connect(addr).await.unwrap();
        let ChannelEvent::Disconnected { reason, .. } = next_event(&mut rx, &mut keep, |e| {
            matches!(e, ChannelEvent::Disconnected { .. })
        })
        .await
        else {
            unreachable!()
        };
        let reason = reason.to_string();
        assert!(
            reason.contains("evicted") && reason.contains("never sent anything"),
            "{reason}"
        );
        assert!(read_eof(&mut idle).await, "the idle connection is closed");
        assert_eq!(metrics.evicted[EvictReason::NeverSpoke as usize].get(), 1);
        peer.write_all(b"WATCHDOG=1\n").await.unwrap();
        next_event(&mut rx, &mut keep, |e| {
            matches!(e, ChannelEvent::Heartbeats { .. })
        })
        .await;
        shutdown.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_peer_outside_the_allow_list_is_closed_and_counted() {
        let metrics = Metrics::new().watchdog("w", "c");
        let (ctx, mut rx) = context(&metrics);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            Listener::Tcp(l),
            policy(4, &["10.0.0.0/8"]),
            ctx,
            shutdown.clone(),
        ));
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert!(read_eof(&mut s).await, "refused at once");
        assert_eq!(metrics.refused[0].get(), 1);
        assert!(rx.try_recv().is_err(), "the watchdog never hears of it");
        shutdown.cancel();
        server.await.unwrap();
    }

    /// A Unix server with `peer-uid=`: a peer running as anyone else is closed at once and
    /// counted, and the watchdog hears nothing; a peer running as that uid (a child started
    /// with `setpriv`, a real other process) is served.
    #[tokio::test]
    async fn a_unix_peer_with_other_credentials_is_refused_and_the_right_one_served() {
        const NOBODY: u32 = 65534;
        let metrics = Metrics::new().watchdog("w", "c");
        let (ctx, mut rx) = context(&metrics);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.sock");
        let (l, g) = bind_unix(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut pol = policy(4, &[]);
        pol.peer = PeerCred {
            uid: Some(NOBODY),
            gid: None,
        };
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(Listener::Unix(l, g), pol, ctx, shutdown.clone()));
        // This process runs as root.
        let mut s = UnixStream::connect(&path).await.unwrap();
        assert!(read_eof(&mut s).await, "refused at once");
        assert_eq!(metrics.refused[1].get(), 1);
        assert!(rx.try_recv().is_err(), "the watchdog never hears of it");
        // The same path, from a process running as nobody.
        let script = format!(
            "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?}); \
             s.sendall(b'WATCHDOG=1\\n'); s.recv(1)",
            path.display().to_string()
        );
        let mut child = tokio::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["/usr/bin/python3", "-c", &script])
            .kill_on_drop(true)
            .spawn()
            .expect("setpriv (util-linux) and /usr/bin/python3");
        let mut keep = Vec::new();
        next_event(&mut rx, &mut keep, |e| {
            matches!(e, ChannelEvent::Heartbeats { .. })
        })
        .await;
        assert_eq!(metrics.refused[1].get(), 1, "the right peer is not refused");
        let _ = child.kill().await;
        shutdown.cancel();
        server.await.unwrap();
    }

    #[test]
    fn peer_credentials_say_what_differs() {
        let want = PeerCred {
            uid: Some(107),
            gid: Some(115),
        };
        assert_eq!(want.check(107, 115), Ok(()));
        assert_eq!(
            want.check(0, 115),
            Err("the peer runs as uid 0, not 107".into())
        );
        assert_eq!(
            want.check(107, 0),
            Err("the peer runs as gid 0, not 115".into())
        );
        assert!(PeerCred::default().is_any());
        assert_eq!(PeerCred::default().check(1, 2), Ok(()));
    }

    #[tokio::test]
    async fn tcp_connections_get_keepalive_and_the_user_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        TcpOptions {
            nodelay: true,
            user_timeout: Some(Duration::from_secs(5)),
        }
        .apply(&s)
        .unwrap();
        let r = socket2::SockRef::from(&s);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.tcp_user_timeout().unwrap(), Some(Duration::from_secs(5)));
        assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(1));
        assert_eq!(r.tcp_keepalive_interval().unwrap(), Duration::from_secs(1));
        assert!(r.tcp_nodelay().unwrap());
        assert_eq!(
            TcpOptions::keepalive_period(Duration::from_secs(30)),
            Duration::from_secs(6)
        );
    }

    /// A listener whose accept queue is full drops further SYNs, as a vanished host does: the
    /// attempt ends at its limit instead of after the kernel's two minutes of SYN retries.
    /// A client whose connection was up for longer than its period and then ended tries
    /// again at once; one whose connection ended quickly waits its period.
    #[tokio::test]
    async fn a_lost_connection_is_retried_at_once_a_short_one_after_the_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let metrics = Metrics::new().watchdog("w", "c");
        let (ctx, _events) = context(&metrics);
        let ch = SocketChardev {
            id: "c".into(),
            endpoint: Endpoint::Unix(path.clone()),
            server: false,
            reconnect: ms(400),
            nodelay: false,
            max_connections: 1,
            peers: Vec::new(),
            tcp_user_timeout: None,
            rate_limit: None,
            peer: Default::default(),
            psk: None,
        };
        let stop = CancellationToken::new();
        tokio::spawn(connect_loop(ch, ctx, stop.clone()));
        let accept = async || {
            tokio::time::timeout(Duration::from_secs(10), listener.accept())
                .await
                .expect("the client connects")
                .unwrap()
                .0
        };
        let first = accept().await;
        tokio::time::sleep(ms(600)).await;
        drop(first);
        let lost = Instant::now();
        let second = accept().await;
        let again = lost.elapsed();
        assert!(
            again < ms(300),
            "a long connection lost: retried after {again:?}"
        );
        // This one ends at once: the next attempt waits for the period.
        drop(second);
        let lost = Instant::now();
        let _third = accept().await;
        let again = lost.elapsed();
        assert!(
            again >= ms(300),
            "a short connection lost: retried after {again:?}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_connect_attempt_that_gets_no_answer_ends_at_its_limit() {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        sock.listen(0).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        let ep = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: addr.port(),
        };
        // Fill the queue: the first attempts complete (nobody accepts), then one hangs.
        let mut held = Vec::new();
        let started = loop {
            let started = Instant::now();
            match connect_within(&ep, ms(1000), PeerCred::default()).await {
                Ok(s) => held.push(s),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
                    break started;
                }
            }
            assert!(held.len() < 16, "the accept queue never filled");
        };
        let took = started.elapsed();
        assert!(took >= ms(900) && took < ms(3000), "{took:?}");
    }
}
