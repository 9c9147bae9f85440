//! awd as QEMU's vhost-user vsock device: guest AF_VSOCK stream connections to configured
//! ports end here and feed their watchdogs.
//!
//! # Protocol primer
//!
//! QEMU's `-device vhost-user-vsock-pci,chardev=c0` hands the whole virtio-vsock device to
//! whoever serves the chardev's Unix socket: awd. The vhost-user protocol (handled by the
//! `vhost-user-backend` crate) shares guest memory and three virtqueues with us:
//!
//! | queue | direction | carries |
//! |---|---|---|
//! | 0 rx | awd → guest | responses, resets, credit updates, pulses |
//! | 1 tx | guest → awd | requests, payload, shutdowns, resets, credit messages |
//! | 2 event | awd → guest | unused (transport resets on migration) |
//!
//! Every packet starts with a 44-byte little-endian header ([`packet::Header`]): CIDs and ports
//! of both ends, `len` of the payload, `type` (1 = stream), `op`, `flags`, and the sender's
//! receive window (`buf_alloc`, `fwd_cnt`). The guest's CID comes from the device config space
//! (`get_config`: 8 bytes, little-endian); the host is CID 2.
//!
//! A guest `connect(2, port)` sends OP_REQUEST. awd answers OP_RESPONSE if a watchdog listens
//! on that port, OP_RST otherwise. Bytes then flow as OP_RW, each direction limited by the
//! receiver's credit: at most `buf_alloc - (tx_cnt - fwd_cnt)` bytes in flight. awd consumes
//! guest bytes at once and sends OP_CREDIT_UPDATE after every quarter of its 64 KiB window, so a
//! guest never stalls ([`conn`]). OP_SHUTDOWN gets OP_RST back; either end's OP_RST ends the
//! connection.
//!
//! # Threads
//!
//! [`spawn`] binds the socket at once, then one thread serves QEMU frontends one after another
//! (QEMU can be killed and restarted on the same socket). For each, `vhost-user-backend` runs
//! a protocol thread and a vring worker thread; the worker calls [`device::VsockBackend`],
//! which never blocks: events go to watchdogs with `try_send`, and pulses come back through an
//! eventfd-signalled outbox per connection. When a frontend goes, its connections go with it
//! (`Disconnected`; the watchdog timers run on). A third small thread waits for shutdown.
//!
//! # The VM starting over, and reloads
//!
//! Each new frontend, and each time the guest driver sets the device up afresh (a reboot:
//! the rings restart from index 0 after a stop), every port's watchdog hears
//! `ChannelEvent::StartedOver`. A reload may give a port to another watchdog
//! ([`VsockDevice::rebind`]); the port set and the CID stay as the device was started.
//!
//! # Files
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the device as awd runs it: its configuration, [`spawn`], the serving thread, stopping |
//! | [`device`] (`device/mod.rs`) | the vhost-user backend: its state, its lifecycle (frontends, start-overs, re-binding), the vhost-user trait, which dispatches to the three below |
//! | `device/tx.rs` | guest packets off the tx queue, and the connection state each one changes |
//! | `device/rx.rs` | what goes to the guest next on the rx queue: resets, then each connection in turn |
//! | `device/delivery.rs` | the only code that sends to the watchdogs: order, coalesced heartbeats, backlog, retry timer |
//! | [`tx`] | reading one tx packet out of a descriptor chain, wherever the guest put its bytes |
//! | [`packet`] | the packet header and the protocol's constants |
//! | [`conn`] | one connection: its credit, its outbox, the writer the watchdog gets |
//! | [`limits`] | every bound and tunable of the device, each with the reason for its value |
//! | [`stats`] | the device's counters |
//! | `test_driver.rs` | unit tests and the fuzz targets only: a fake guest driver on real virtqueues in guest memory |
//! | `device/tests/` | unit tests of the whole device through that driver, one theme per file, and its property tests |

mod collector;
pub mod conn;
pub mod device;
pub mod limits;
pub mod packet;
mod peer;
pub mod stats;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod test_driver;
pub mod tx;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};
use std::task::{Context, Poll, Wake};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::transport::{ChannelContext, CloseReason, PeerCred};
use crate::util::LogLimiter;
use crate::util::{UnixPathGuard, bind_unix_std};
pub use collector::VsockCollector;
pub use device::VsockBackend;
pub use stats::{Malformed, VsockCounters, VsockStats};

/// One vsock port on a device, and the watchdog it feeds.
#[derive(Debug, Clone)]
pub struct VsockPort {
    /// The port guests connect to (on CID 2).
    pub port: u32,
    /// Where its connections' events go.
    pub ctx: ChannelContext,
}

/// One vhost-user vsock device: a socket QEMU connects to, and the ports it serves.
#[derive(Debug, Clone)]
pub struct VsockDeviceConfig {
    /// The vhost-user socket (`-chardev socket,path=…` on the QEMU side).
    pub socket_path: PathBuf,
    /// The guest's CID, reported to QEMU through the device config space.
    pub guest_cid: u64,
    /// The ports served; at least one, no duplicates.
    pub ports: Vec<VsockPort>,
    /// Who the QEMU connecting to the socket must run as (`SO_PEERCRED`); anyone else is
    /// closed before the device serves it.
    pub peer: PeerCred,
}

/// Why a vsock device could not start.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The configuration cannot work.
    #[error("vsock device {path}: {why}")]
    ConfigInvalid {
        /// The socket path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Binding the vhost-user socket failed (a live socket or another file is in the way).
    #[error("vsock device: cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The bind error (address in use, permission denied, a non-socket file there).
        #[source]
        source: io::Error,
    },
    /// An eventfd, timerfd or epoll instance could not be created.
    #[error("vsock device {path}: cannot create its event descriptors")]
    EventFd {
        /// The socket path.
        path: PathBuf,
        /// The system call's error (usually the descriptor limit).
        #[source]
        source: io::Error,
    },
    /// The serving thread could not be started.
    #[error("vsock device {path}: cannot start its thread")]
    Thread {
        /// The socket path.
        path: PathBuf,
        /// The error from spawning the thread (out of memory or thread limit).
        #[source]
        source: io::Error,
    },
}

/// A running vsock device. Dropping it asks it to stop without waiting; [`VsockDevice::join`]
/// waits.
#[derive(Debug)]
pub struct VsockDevice {
    path: PathBuf,
    backend: Backend,
    counters: Arc<VsockCounters>,
    stop: CancellationToken,
    done: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl VsockDevice {
    /// The vhost-user socket it serves.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Its counters now.
    pub fn stats(&self) -> VsockStats {
        self.counters.snapshot()
    }

    /// Its live counters, for an exporter that reads them later.
    pub fn counters(&self) -> Arc<VsockCounters> {
        self.counters.clone()
    }

    /// Makes `port` feed the watchdog behind `ctx` from now on, keeping the port's open guest
    /// connections (a reload gave the port to a new or replaced watchdog). Returns false if
    /// the device does not serve `port`. Takes the device's lock, which its threads only hold
    /// for non-blocking work.
    pub fn rebind(&self, port: u32, ctx: ChannelContext) -> bool {
        self.backend
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .rebind(port, ctx)
    }

    /// Asks the device to stop (disconnects QEMU, closes guest connections, removes the
    /// socket). Returns at once.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Whether the serving thread has finished.
    pub fn is_stopped(&self) -> bool {
        self.done.is_cancelled()
    }

    /// Resolves once the serving thread has finished (after [`VsockDevice::stop`] or the
    /// shutdown token given to [`spawn`]).
    pub async fn stopped(&self) {
        self.done.cancelled().await;
    }

    /// Stops the device and waits for its threads. Blocks; from async code, await
    /// [`VsockDevice::stopped`] first so this returns at once.
    pub fn join(mut self) {
        self.stop.cancel();
        for t in std::mem::take(&mut self.threads) {
            if t.join().is_err() {
                error!(device = %self.path.display(), "a vsock device thread panicked");
            }
        }
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds the vhost-user listener now (so "socket in use" is a startup error), then serves QEMU
/// frontends on its own thread(s), one after another, until `shutdown` is cancelled.
pub fn spawn(
    cfg: VsockDeviceConfig,
    shutdown: CancellationToken,
) -> Result<VsockDevice, VsockError> {
    validate(&cfg)?;
    let path = cfg.socket_path.clone();
    let (listener, guard) = bind_unix_std(&path)
        .and_then(|(l, g)| {
            // Accepting waits on epoll; the accept itself must never block.
            l.set_nonblocking(true)?;
            Ok((l, g))
        })
        .map_err(|source| VsockError::Bind {
            path: path.clone(),
            source,
        })?;
    let fd_err = |source| VsockError::EventFd {
        path: path.clone(),
        source,
    };
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(fd_err)?);
    let counters = Arc::new(VsockCounters::default());
    let name: Arc<str> = path.display().to_string().into();
    let backend = VsockBackend::new(
        name.clone(),
        cfg.guest_cid,
        cfg.ports,
        counters.clone(),
        wake,
    )
    .map_err(fd_err)?;
    let ctl = Arc::new(StopControl {
        flag: AtomicBool::new(false),
        event: EventFd::new(EFD_NONBLOCK).map_err(fd_err)?,
        handle: Mutex::new(None),
    });
    let epoll = Epoll::new().map_err(fd_err)?;
    for (fd, token) in [
        (listener.as_raw_fd(), LISTENER),
        (ctl.event.as_raw_fd(), STOP),
    ] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(fd_err)?;
    }

    let stop = shutdown.child_token();
    let done = CancellationToken::new();
    let backend = Arc::new(RwLock::new(backend));
    let server = Server {
        name,
        listener: Listener::from(listener),
        _guard: guard,
        epoll,
        backend: backend.clone(),
        counters: counters.clone(),
        ctl: ctl.clone(),
        path: path.clone(),
        peer: cfg.peer,
        refusals: LogLimiter::new(5, Duration::from_secs(10)),
    };
    let serve = {
        let done = done.clone();
        thread::Builder::new()
            .name("awd-vsock".into())
            .spawn(move || {
                let _done = done.drop_guard();
                server.run();
            })
            .map_err(|source| VsockError::Thread {
                path: path.clone(),
                source,
            })?
    };
    let stopper = {
        let (stop, ctl) = (stop.clone(), ctl.clone());
        thread::Builder::new()
            .name("awd-vsock-stop".into())
            .spawn(move || {
                block_on(stop.cancelled());
                ctl.trigger();
            })
    };
    let stopper = match stopper {
        Ok(t) => t,
        Err(source) => {
            ctl.trigger();
            let _ = serve.join();
            return Err(VsockError::Thread { path, source });
        }
    };
    info!(device = %path.display(), guest_cid = cfg.guest_cid, "vsock device listening");
    Ok(VsockDevice {
        path,
        backend,
        counters,
        stop,
        done,
        threads: vec![serve, stopper],
    })
}

fn validate(cfg: &VsockDeviceConfig) -> Result<(), VsockError> {
    let invalid = |why: String| VsockError::ConfigInvalid {
        path: cfg.socket_path.clone(),
        why,
    };
    // 0-2 are the hypervisor, local and host CIDs; u32::MAX is VMADDR_CID_ANY.
    if cfg.guest_cid <= 2 || cfg.guest_cid >= u64::from(u32::MAX) {
        return Err(invalid(format!(
            "guest CID {} is reserved or out of range (3 to 4294967294)",
            cfg.guest_cid
        )));
    }
    if cfg.ports.is_empty() {
        return Err(invalid("no port to serve".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &cfg.ports {
        if !seen.insert(p.port) {
            return Err(invalid(format!("port {} is configured twice", p.port)));
        }
    }
    Ok(())
}

const LISTENER: u64 = 0;
const STOP: u64 = 1;

/// How the stopper reaches the serving thread, wherever it is: waiting for a frontend (the
/// eventfd) or serving one (the daemon's shutdown handle).
struct StopControl {
    flag: AtomicBool,
    event: EventFd,
    handle: Mutex<Option<ShutdownHandle>>,
}

impl StopControl {
    fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            h.shutdown();
        }
    }

    fn stopping(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

type Backend = Arc<RwLock<VsockBackend>>;

/// The serving thread's state.
struct Server {
    name: Arc<str>,
    listener: Listener,
    /// Removes the socket file when the server ends.
    _guard: UnixPathGuard,
    epoll: Epoll,
    backend: Backend,
    counters: Arc<VsockCounters>,
    ctl: Arc<StopControl>,
    /// The vhost-user socket, to find the accepted connection by.
    path: PathBuf,
    /// Who QEMU must run as.
    peer: PeerCred,
    /// Rate limit of the refusal log line.
    refusals: LogLimiter,
}

impl Server {
    fn backend(&self) -> RwLockWriteGuard<'_, VsockBackend> {
        // The backend never panics while locked (no unwrap on guest input); if it somehow
        // did, its state is still consistent enough to shut down.
        self.backend.write().unwrap_or_else(|e| e.into_inner())
    }

    fn run(mut self) {
        let mut events = [EpollEvent::default(); 2];
        while !self.ctl.stopping() {
            // Between frontends nobody else retries events waiting for a full watchdog channel.
            let timeout = if self.backend().has_backlog() {
                limits::IDLE_RETRY_MS
            } else {
                -1
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!(device = &*self.name, "waiting for QEMU failed: {e}");
                    thread::sleep(limits::WAIT_ERROR_PAUSE);
                    continue;
                }
            };
            if self.ctl.stopping() {
                break;
            }
            if !events[..n].iter().any(|e| e.data() == LISTENER) {
                self.backend().flush_events();
                continue;
            }
            self.serve_one();
        }
        self.backend().frontend_gone(CloseReason::Shutdown);
        debug!(device = &*self.name, "vsock device stopped");
    }

    /// Whether the process behind the connection just accepted runs as `peer-uid`/`peer-gid`;
    /// if not, counted and logged (rate-limited).
    fn admitted(&mut self) -> bool {
        let verdict = peer::accepted_peer(&self.path).and_then(|(uid, gid)| {
            self.peer
                .check(uid, gid)
                .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, why))
        });
        let Err(e) = verdict else {
            return true;
        };
        self.counters.frontend_refused();
        if let Some(suppressed) = self.refusals.allow(std::time::Instant::now()) {
            warn!(
                device = &*self.name,
                suppressed,
                reason = "peer_cred",
                "refusing QEMU: {e}"
            );
        }
        false
    }

    /// Accepts one QEMU and serves it until it disconnects or awd stops.
    fn serve_one(&mut self) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            match VhostUserDaemon::new("awd-vsock-frontend".into(), self.backend.clone(), mem) {
                Ok(d) => d,
                Err(e) => {
                    error!(
                        device = &*self.name,
                        "cannot set up for a QEMU connection: {e}"
                    );
                    thread::sleep(limits::SETUP_ERROR_PAUSE);
                    return;
                }
            };
        let (wake, retry) = {
            let b = self.backend();
            (b.wake_fd(), b.retry_fd())
        };
        if let Some(h) = daemon.get_epoll_handlers().first() {
            for (fd, token) in [(wake, device::WAKE_EVENT), (retry, device::RETRY_EVENT)] {
                if let Err(e) = h.register_listener(fd, EventSet::IN, u64::from(token)) {
                    error!(
                        device = &*self.name,
                        "cannot watch the device's event descriptors: {e}"
                    );
                }
            }
        }
        let checked = !self.peer.is_any();
        if checked {
            self.backend().hold();
        }
        if let Err(e) = daemon.start(&mut self.listener) {
            warn!(device = &*self.name, "accepting QEMU failed: {e}");
            self.backend().frontend_gone(CloseReason::FrontendGone);
            return;
        }
        let refused = checked && !self.admitted();
        if !refused {
            self.counters.frontend();
            info!(device = &*self.name, "QEMU connected");
            // A new QEMU is a new VM, whatever the last one's watchdogs knew.
            self.backend().started_over("a new QEMU connected");
            if checked {
                self.backend().admit();
            }
        }
        {
            let mut handle = self.ctl.handle.lock().unwrap_or_else(|e| e.into_inner());
            if self.ctl.stopping() || refused {
                daemon.request_shutdown();
            } else {
                *handle = daemon.shutdown_handle();
            }
        }
        let result = daemon.wait();
        self.ctl
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // Stop this frontend's vring worker and wait until it is gone, so it cannot touch the
        // next frontend's memory with this one's stale rings.
        let workers = daemon.get_epoll_handlers();
        for h in &workers {
            h.send_exit_event();
        }
        drop(daemon);
        wait_for_workers(&self.name, &workers);
        drop(workers);
        let reason = if self.ctl.stopping() {
            CloseReason::Shutdown
        } else {
            CloseReason::FrontendGone
        };
        self.backend().frontend_gone(reason);
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!(device = &*self.name, "QEMU disconnected"),
            Err(e) => warn!(device = &*self.name, "QEMU connection ended: {e}"),
        }
    }
}

/// Waits (bounded) until only `workers` itself holds the epoll handlers: each worker thread
/// keeps a clone until its loop has returned.
fn wait_for_workers<T>(name: &str, workers: &[Arc<T>]) {
    let step = Duration::from_millis(1);
    for _ in 0..limits::WORKER_STOP_WAIT.as_millis() {
        if workers.iter().all(|w| Arc::strong_count(w) == 1) {
            return;
        }
        thread::sleep(step);
    }
    warn!(
        device = name,
        "a vring worker thread did not stop within {} s",
        limits::WORKER_STOP_WAIT.as_secs()
    );
}

/// Runs a future to completion on this thread (the stopper only awaits a cancellation token,
/// which needs no runtime).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut f = pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use tokio::sync::mpsc;

    fn config(path: &Path, ports: &[u32], cid: u64) -> VsockDeviceConfig {
        let metrics = Metrics::new();
        VsockDeviceConfig {
            socket_path: path.to_owned(),
            guest_cid: cid,
            ports: ports
                .iter()
                .map(|&port| VsockPort {
                    port,
                    ctx: ChannelContext {
                        watchdog: "w".into(),
                        channel: "c".into(),
                        events: mpsc::channel(4).0,
                        metrics: metrics.watchdog("w", "c"),
                        nodelay: false,
                        rate_limit: None,
                    },
                })
                .collect(),
            peer: PeerCred::default(),
        }
    }

    fn wait_stopped(d: &VsockDevice) {
        for _ in 0..500 {
            if d.is_stopped() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("the device did not stop");
    }

    #[test]
    fn spawn_binds_at_once_and_a_socket_in_use_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let dev = spawn(config(&path, &[9009], 3), CancellationToken::new()).expect("spawned");
        assert!(path.exists(), "bound before spawn returned");
        assert_eq!(dev.socket_path(), path);
        let err = spawn(config(&path, &[9009], 3), CancellationToken::new())
            .expect_err("the socket is in use");
        assert!(matches!(err, VsockError::Bind { .. }), "{err}");
        // The second spawn's check that the socket is live connects to it, which the first
        // device may count as a frontend: nothing else has happened.
        let stats = VsockStats {
            frontends: 0,
            ..dev.stats()
        };
        assert_eq!(stats, VsockStats::default());
        dev.join();
        assert!(!path.exists(), "the socket file is removed on stop");
    }

    #[test]
    fn a_stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let dev = spawn(config(&path, &[9009], 3), CancellationToken::new()).expect("spawned");
        dev.join();
    }

    #[test]
    fn cancelling_the_shutdown_token_stops_the_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let token = CancellationToken::new();
        let dev = spawn(config(&path, &[9009, 9010], 3), token.clone()).expect("spawned");
        assert!(!dev.is_stopped());
        token.cancel();
        wait_stopped(&dev);
        assert!(!path.exists());
        dev.join();
    }

    #[test]
    fn bad_configurations_are_refused_before_binding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        for (ports, cid) in [
            (&[][..], 3),
            (&[9009, 9009][..], 3),
            (&[9009][..], 2),
            (&[9009][..], u64::from(u32::MAX)),
        ] {
            let err =
                spawn(config(&path, ports, cid), CancellationToken::new()).expect_err("refused");
            assert!(matches!(err, VsockError::ConfigInvalid { .. }), "{err}");
            assert!(!path.exists());
        }
    }
}
