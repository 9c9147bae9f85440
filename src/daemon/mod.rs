//! Wiring: turns a [`Config`] into running tasks, and a new [`Config`] into the smallest change
//! of them (SIGHUP).
//!
//! ```text
//!  socket / vsock transport ──ChannelEvent──▶ watchdog task ──Job──▶ action runner ──▶ QMP / HMP / raw
//!        ▲                                     │ (engine)  ▲              │ (one per notification node)
//!        └──────── pulses, replies ────────────┘           └─ vm-running ─┘ (QMP events)
//!  control socket ──Control──▶ watchdog task             metrics ◀── counters of every part
//! ```
//!
//! Every listener is bound before anything runs, so a port in use is an error at startup (and
//! a reload that would need a port in use is refused as a whole). A reload keeps every
//! watchdog whose configuration did not change, timers and connections included; a watchdog
//! whose supervision or script changed is reconfigured in place (its connections stay, its
//! supervision restarts from now); one whose channel changed is replaced.

pub mod systemd;
pub mod watchdog;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::action::{LineReport, Runner, RunnerHandle};
use crate::config::{Chardev, Config, WatchdogConfig};
use crate::control::{self, ControlListener, Request, Response};
use crate::engine::Setter;
use crate::metrics::{Metrics, WatchdogMetrics};
use crate::transport::ChannelEvent;
use crate::transport::socket::{self, Listener, SocketError};
use crate::transport::vsock::{self, VsockDevice, VsockDeviceConfig, VsockError, VsockPort};
use crate::transport::{ChannelContext, SocketChardev, VsockChardev};
use watchdog::{Command, Control, Links, WatchdogStatus, WatchdogTask};

/// How long a watchdog task has to answer a control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the daemon could not start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A socket channel could not be set up.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// A vhost-user vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A reload would change the ports or CID of a running vsock device. QEMU 7.2 does not
    /// reconnect a vhost-user-vsock device, so that needs a restart of awd and QEMU.
    #[error(
        "vsock device {0}: its ports or guest CID changed; restart awd (and QEMU) to apply that"
    )]
    VsockChanged(PathBuf),
}

/// Options that are not part of the watchdog configuration.
#[derive(Debug, Default)]
pub struct Options {
    /// Receives the result of every script line (tests use this to wait for actions).
    pub reports: Option<mpsc::UnboundedSender<LineReport>>,
    /// Serve the control socket on this listener.
    pub control: Option<ControlListener>,
    /// Serve Prometheus metrics on this listener.
    pub metrics: Option<tokio::net::TcpListener>,
}

/// A running watchdog: its task, its channel, and how to reach it.
struct Running {
    cfg: WatchdogConfig,
    chardev: Chardev,
    node: Option<SocketChardev>,
    token: CancellationToken,
    tasks: TaskTracker,
    control: mpsc::Sender<Control>,
}

/// A running action runner.
struct RunningRunner {
    chardev: SocketChardev,
    handle: RunnerHandle,
    token: CancellationToken,
}

/// A running vsock device and the ports it was built with.
struct RunningVsock {
    device: VsockDevice,
    guest_cid: u64,
    ports: BTreeMap<u32, String>,
}

#[derive(Default)]
struct State {
    watchdogs: BTreeMap<String, Running>,
    runners: BTreeMap<String, RunningRunner>,
    vsock: BTreeMap<PathBuf, RunningVsock>,
}

struct Inner {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    /// The vsock devices' counters, registered in `metrics`.
    vsock_metrics: vsock::VsockCollector,
    reports: Option<mpsc::UnboundedSender<LineReport>>,
    state: Mutex<State>,
}

/// A running daemon. Cloning gives another handle to the same daemon.
#[derive(Clone)]
pub struct Daemon {
    inner: Arc<Inner>,
}

/// Another name for [`Daemon`], for code that only holds a handle.
pub type DaemonHandle = Daemon;

impl fmt::Debug for Daemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Watchdogs started.
    pub added: Vec<String>,
    /// Watchdogs stopped.
    pub removed: Vec<String>,
    /// Watchdogs reconfigured in place (connections kept, supervision restarted).
    pub changed: Vec<String>,
    /// Watchdogs whose channel changed: stopped and started again.
    pub replaced: Vec<String>,
    /// Watchdogs left exactly as they were.
    pub kept: usize,
}

impl fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(",")
            }
        };
        write!(
            f,
            "added {}, removed {}, changed {}, replaced {}, {} unchanged",
            list(&self.added),
            list(&self.removed),
            list(&self.changed),
            list(&self.replaced),
            self.kept
        )
    }
}

/// A watchdog's event channel and counters, made before its transport starts.
type Channel = (
    mpsc::Sender<ChannelEvent>,
    mpsc::Receiver<ChannelEvent>,
    Arc<WatchdogMetrics>,
);

/// Bound listeners and spawned devices for the watchdogs a reload starts.
struct Prepared {
    listeners: BTreeMap<String, Listener>,
    channels: BTreeMap<String, Channel>,
    devices: BTreeMap<PathBuf, RunningVsock>,
}

impl Daemon {
    /// Binds every listener, then starts every task. Returns once all of it is up.
    pub async fn start(cfg: Config, opts: Options) -> Result<Daemon, DaemonError> {
        let metrics = Arc::new(Metrics::new());
        let vsock_metrics = vsock::VsockCollector::default();
        metrics.register_collector(Box::new(vsock_metrics.clone()));
        let inner = Arc::new(Inner {
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            metrics,
            vsock_metrics,
            reports: opts.reports,
            state: Mutex::new(State::default()),
        });
        let daemon = Daemon { inner };
        if let Err(e) = daemon.apply(cfg).await {
            daemon.inner.shutdown.cancel();
            return Err(e);
        }
        if let Some(l) = opts.control {
            daemon.serve_control(l);
        }
        if let Some(l) = opts.metrics {
            if let Ok(addr) = l.local_addr() {
                info!("metrics at http://{addr}/metrics");
            }
            let (m, s) = (daemon.inner.metrics.clone(), daemon.inner.shutdown.clone());
            daemon
                .inner
                .tracker
                .spawn(crate::metrics::serve_http(l, m, s));
        }
        Ok(daemon)
    }

    /// Serves `awd status`/`enable`/`disable`/`condition` on `l` until shutdown.
    pub fn serve_control(&self, l: ControlListener) {
        let handler: Arc<dyn control::Handler> = Arc::new(self.clone());
        self.inner
            .tracker
            .spawn(control::serve(l, handler, self.inner.shutdown.clone()));
    }

    /// Another handle to this daemon.
    pub fn clone_handle(&self) -> Daemon {
        self.clone()
    }

    /// Applies a new configuration: the smallest change from the running one. If anything the
    /// new configuration needs cannot be bound, nothing changes and the error is returned.
    pub async fn reload(&self, cfg: Config) -> Result<ReloadSummary, DaemonError> {
        self.apply(cfg).await
    }

    /// How many watchdogs run.
    pub async fn watchdog_count(&self) -> usize {
        self.inner.state.lock().await.watchdogs.len()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The token that stops everything when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Stops every task and device and waits for them.
    pub async fn stop(self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        let devices: Vec<RunningVsock> = {
            let mut st = self.inner.state.lock().await;
            for (_, w) in std::mem::take(&mut st.watchdogs) {
                w.token.cancel();
                w.tasks.close();
                w.tasks.wait().await;
            }
            std::mem::take(&mut st.vsock).into_values().collect()
        };
        for d in &devices {
            d.device.stopped().await;
        }
        self.inner.tracker.wait().await;
        for d in devices {
            let _ = tokio::task::spawn_blocking(move || d.device.join()).await;
        }
    }

    /// Asks every watchdog task for its status within `timeout`: proof that the loops that
    /// drive the timers are turning. Returns the id of the first one that did not answer.
    pub async fn probe(&self, timeout: Duration) -> Result<(), String> {
        let controls = self.controls().await;
        for (id, tx) in controls {
            let (reply, rx) = oneshot::channel();
            let asked = tokio::time::timeout(timeout, tx.send(Control::Status(reply))).await;
            let answered = match asked {
                Ok(Ok(())) => tokio::time::timeout(timeout, rx)
                    .await
                    .is_ok_and(|r| r.is_ok()),
                _ => false,
            };
            if !answered {
                return Err(id);
            }
        }
        Ok(())
    }

    /// Every watchdog's status, in id order.
    pub async fn status(&self) -> Vec<WatchdogStatus> {
        let mut out = Vec::new();
        for (id, tx) in self.controls().await {
            let (reply, rx) = oneshot::channel();
            if tx.send(Control::Status(reply)).await.is_err() {
                continue;
            }
            match tokio::time::timeout(CONTROL_TIMEOUT, rx).await {
                Ok(Ok(s)) => out.push(s),
                _ => warn!(watchdog = %id, "no status within {CONTROL_TIMEOUT:?}"),
            }
        }
        out
    }

    async fn controls(&self) -> Vec<(String, mpsc::Sender<Control>)> {
        let st = self.inner.state.lock().await;
        st.watchdogs
            .iter()
            .map(|(id, w)| (id.clone(), w.control.clone()))
            .collect()
    }

    /// Sends a command to one watchdog and waits for its answer.
    pub async fn command(&self, watchdog: &str, cmd: Command) -> Result<(), String> {
        let tx = {
            let st = self.inner.state.lock().await;
            match st.watchdogs.get(watchdog) {
                Some(w) => w.control.clone(),
                None => return Err(format!("no watchdog '{watchdog}'")),
            }
        };
        let (reply, rx) = oneshot::channel();
        tx.send(Control::Command { cmd, reply })
            .await
            .map_err(|_| "the watchdog has stopped".to_owned())?;
        match tokio::time::timeout(CONTROL_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            _ => Err(format!(
                "watchdog '{watchdog}' did not answer within {CONTROL_TIMEOUT:?}"
            )),
        }
    }

    async fn handle_request(&self, req: Request) -> Response {
        match req {
            Request::Status => {
                let watchdogs = self
                    .status()
                    .await
                    .into_iter()
                    .filter_map(|s| serde_json::to_value(s).ok())
                    .collect();
                Response {
                    ok: true,
                    error: None,
                    watchdogs,
                }
            }
            Request::Enable { target } | Request::Disable { target } if target.is_empty() => {
                Response::error("give a watchdog id, or id/supervision")
            }
            Request::Enable { target } => self.targeted(&target, true).await,
            Request::Disable { target } => self.targeted(&target, false).await,
            Request::Condition {
                name,
                value,
                watchdog,
            } => {
                let ids: Vec<String> = match watchdog {
                    Some(w) => vec![w],
                    None => {
                        let st = self.inner.state.lock().await;
                        st.watchdogs
                            .iter()
                            .filter(|(_, w)| {
                                w.cfg
                                    .engine
                                    .conditions
                                    .iter()
                                    .any(|c| c.name == name && c.set_by == Setter::Operator)
                            })
                            .map(|(id, _)| id.clone())
                            .collect()
                    }
                };
                if ids.is_empty() {
                    return Response::error(format!(
                        "no watchdog declares operator condition '{name}'"
                    ));
                }
                for id in ids {
                    let cmd = Command::Condition {
                        name: name.clone(),
                        value,
                        by: Setter::Operator,
                    };
                    if let Err(e) = self.command(&id, cmd).await {
                        return Response::error(format!("watchdog '{id}': {e}"));
                    }
                }
                Response::ok()
            }
        }
    }

    async fn targeted(&self, target: &str, enable: bool) -> Response {
        let (id, sup) = match target.split_once('/') {
            Some((id, sup)) => (id, Some(sup.to_owned())),
            None => (target, None),
        };
        let cmd = if enable {
            Command::Enable(sup)
        } else {
            Command::Disable(sup)
        };
        match self.command(id, cmd).await {
            Ok(()) => Response::ok(),
            Err(e) => Response::error(e),
        }
    }

    /// Moves the running state to `cfg`.
    async fn apply(&self, cfg: Config) -> Result<ReloadSummary, DaemonError> {
        for note in &cfg.notes {
            info!("{note}");
        }
        let mut st = self.inner.state.lock().await;
        let mut summary = ReloadSummary::default();

        // Plan: what happens to each watchdog.
        let new_ids: BTreeSet<&str> = cfg.watchdogs.iter().map(|w| w.id.as_str()).collect();
        let removed: Vec<String> = st
            .watchdogs
            .keys()
            .filter(|id| !new_ids.contains(id.as_str()))
            .cloned()
            .collect();
        let mut start = Vec::new(); // added or replaced
        let mut reconfigure = Vec::new();
        for w in &cfg.watchdogs {
            let chardev = cfg.chardevs[&w.awd_node].clone();
            let node = node_of(&cfg, w);
            match st.watchdogs.get(&w.id) {
                None => {
                    summary.added.push(w.id.clone());
                    start.push(w);
                }
                Some(r) if r.chardev != chardev => {
                    summary.replaced.push(w.id.clone());
                    start.push(w);
                }
                Some(r) if r.cfg != *w || r.node != node => {
                    summary.changed.push(w.id.clone());
                    reconfigure.push(w);
                }
                Some(_) => summary.kept += 1,
            }
        }
        summary.removed = removed.clone();

        // vsock devices: the port set and CID of a running device cannot change; which
        // watchdog a port feeds can (a renamed chardev, a watchdog moved to another port).
        let mut wanted_devices: BTreeMap<PathBuf, (u64, BTreeMap<u32, String>)> = BTreeMap::new();
        for w in &cfg.watchdogs {
            if let Chardev::Vsock(VsockChardev {
                path,
                guest_cid,
                port,
                ..
            }) = &cfg.chardevs[&w.awd_node]
            {
                wanted_devices
                    .entry(path.clone())
                    .or_insert_with(|| (*guest_cid, BTreeMap::new()))
                    .1
                    .insert(*port, w.id.clone());
            }
        }
        for (path, (cid, ports)) in &wanted_devices {
            if let Some(d) = st.vsock.get(path)
                && (d.guest_cid != *cid || !d.ports.keys().eq(ports.keys()))
            {
                return Err(DaemonError::VsockChanged(path.clone()));
            }
        }

        // Bind what new watchdogs need, before touching anything that runs. Replaced
        // watchdogs whose endpoint is still held by their old self are bound after it stops.
        let held: BTreeSet<String> = st
            .watchdogs
            .values()
            .filter_map(|r| match &r.chardev {
                Chardev::Socket(s) if s.server => Some(s.endpoint.to_string()),
                _ => None,
            })
            .collect();
        let mut prepared = Prepared {
            listeners: BTreeMap::new(),
            channels: BTreeMap::new(),
            devices: BTreeMap::new(),
        };
        let mut late_bind = Vec::new();
        for w in &start {
            if let Chardev::Socket(s) = &cfg.chardevs[&w.awd_node]
                && s.server
            {
                if held.contains(&s.endpoint.to_string()) {
                    late_bind.push(w.id.clone());
                } else {
                    prepared
                        .listeners
                        .insert(w.id.clone(), socket::bind(s).await?);
                }
            }
            let (tx, rx) = mpsc::channel(watchdog::EVENT_QUEUE);
            let wm = self.inner.metrics.watchdog(&w.id, &w.awd_node);
            prepared.channels.insert(w.id.clone(), (tx, rx, wm));
        }
        for (path, (cid, ports)) in &wanted_devices {
            if st.vsock.contains_key(path) {
                continue;
            }
            let mut dev = VsockDeviceConfig {
                socket_path: path.clone(),
                guest_cid: *cid,
                ports: Vec::new(),
            };
            for (port, id) in ports {
                let Some((tx, _, wm)) = prepared.channels.get(id) else {
                    continue;
                };
                let w = cfg
                    .watchdogs
                    .iter()
                    .find(|w| &w.id == id)
                    .expect("planned above");
                dev.ports.push(VsockPort {
                    port: *port,
                    ctx: context(w, tx.clone(), wm.clone(), &cfg.chardevs[&w.awd_node]),
                });
                info!(watchdog = %id, channel = %w.awd_node, "vsock port {port} on {}", path.display());
            }
            let device = vsock::spawn(dev, self.inner.shutdown.clone())?;
            self.inner
                .vsock_metrics
                .add(&path.display().to_string(), device.counters());
            prepared.devices.insert(
                path.clone(),
                RunningVsock {
                    device,
                    guest_cid: *cid,
                    ports: ports.clone(),
                },
            );
        }

        // From here on nothing can fail as a whole.
        // 1. Stop removed and replaced watchdogs, and vsock devices nobody uses any more.
        for id in removed.iter().chain(summary.replaced.iter()) {
            if let Some(r) = st.watchdogs.remove(id) {
                r.token.cancel();
                r.tasks.close();
                r.tasks.wait().await;
                if removed.contains(id) {
                    self.inner.metrics.remove_watchdog(id, &r.cfg.awd_node);
                    info!(watchdog = %id, "watchdog removed");
                }
            }
        }
        let gone: Vec<PathBuf> = st
            .vsock
            .keys()
            .filter(|p| !wanted_devices.contains_key(*p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(d) = st.vsock.remove(&path) {
                info!(device = %path.display(), "vsock device removed");
                self.inner.vsock_metrics.remove(&path.display().to_string());
                d.device.stop();
                d.device.stopped().await;
            }
        }
        // Running devices: a port whose watchdog starts anew (added or replaced) feeds the
        // new one from now on, its guest connections kept.
        for (path, (_, ports)) in &wanted_devices {
            let Some(d) = st.vsock.get_mut(path) else {
                continue;
            };
            for (port, id) in ports {
                let (Some((tx, _, wm)), Some(w)) = (
                    prepared.channels.get(id),
                    cfg.watchdogs.iter().find(|w| &w.id == id),
                ) else {
                    continue;
                };
                d.device.rebind(
                    *port,
                    context(w, tx.clone(), wm.clone(), &cfg.chardevs[&w.awd_node]),
                );
                info!(watchdog = %id, channel = %w.awd_node, "vsock port {port} on {}", path.display());
            }
            d.ports = ports.clone();
        }
        st.vsock.extend(prepared.devices);
        for id in &late_bind {
            let w = cfg
                .watchdogs
                .iter()
                .find(|w| &w.id == id)
                .expect("planned above");
            if let Chardev::Socket(s) = &cfg.chardevs[&w.awd_node] {
                match socket::bind(s).await {
                    Ok(l) => {
                        prepared.listeners.insert(id.clone(), l);
                    }
                    Err(e) => warn!(watchdog = %id, "{}", crate::util::error_chain(&e)),
                }
            }
        }

        // 2. Runners: one per notification node; keep those whose chardev did not change.
        let mut wanted_nodes: BTreeMap<String, SocketChardev> = BTreeMap::new();
        for w in &cfg.watchdogs {
            if let Some(node) = node_of(&cfg, w) {
                wanted_nodes.insert(node.id.clone(), node);
            }
        }
        let stale: Vec<String> = st
            .runners
            .iter()
            .filter(|(id, r)| wanted_nodes.get(*id) != Some(&r.chardev))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(r) = st.runners.remove(&id) {
                r.token.cancel();
                self.inner.metrics.remove_node(&id);
            }
        }
        for (id, chardev) in wanted_nodes {
            if st.runners.contains_key(&id) {
                continue;
            }
            let (mut runner, handle) = Runner::new(chardev.clone());
            runner = runner.with_backlog_gauge(self.inner.metrics.node_backlog(&id));
            if let Some(tx) = &self.inner.reports {
                runner = runner.with_reports(tx.clone());
            }
            let token = self.inner.shutdown.child_token();
            self.inner.tracker.spawn(runner.run(token.clone()));
            st.runners.insert(
                id,
                RunningRunner {
                    chardev,
                    handle,
                    token,
                },
            );
        }
        let links = |st: &State, w: &WatchdogConfig| {
            let runner = w
                .notification_node
                .as_ref()
                .and_then(|n| st.runners.get(n))
                .map(|r| r.handle.clone());
            let vm = runner.as_ref().map(RunnerHandle::vm_state);
            Links { runner, vm }
        };

        // 3. Reconfigure in place; also every kept watchdog whose runner was replaced.
        for w in &reconfigure {
            let l = links(&st, w);
            let node = node_of(&cfg, w);
            if let Some(r) = st.watchdogs.get_mut(&w.id) {
                let _ = r
                    .control
                    .send(Control::Reconfigure(Box::new(((*w).clone(), l))))
                    .await;
                r.cfg = (*w).clone();
                r.node = node;
            }
        }

        // 4. Start added and replaced watchdogs.
        for w in start {
            let Some((tx, rx, wm)) = prepared.channels.remove(&w.id) else {
                continue;
            };
            let token = self.inner.shutdown.child_token();
            let tasks = TaskTracker::new();
            let (control_tx, control_rx) = mpsc::channel(16);
            let task = WatchdogTask::new(w, rx, control_rx, wm.clone(), links(&st, w));
            tasks.spawn(task.run(token.clone()));
            let chardev = cfg.chardevs[&w.awd_node].clone();
            if let Chardev::Socket(s) = &chardev {
                let ctx = context(w, tx.clone(), wm, &chardev);
                match prepared.listeners.remove(&w.id) {
                    Some(l) => {
                        let policy = socket::ServerPolicy::of(s, w.timeout);
                        info!(watchdog = %w.id, channel = %w.awd_node, max_connections = policy.max_connections,
                            "listening on {}", s.endpoint);
                        tasks.spawn(socket::serve(l, policy, ctx, token.clone()));
                    }
                    None if s.server => {}
                    None => {
                        info!(watchdog = %w.id, channel = %w.awd_node, "connecting to {}", s.endpoint);
                        tasks.spawn(socket::connect_loop(s.clone(), ctx, token.clone()));
                    }
                }
            }
            self.inner.tracker.spawn({
                let tasks = tasks.clone();
                async move { tasks.wait().await }
            });
            st.watchdogs.insert(
                w.id.clone(),
                Running {
                    cfg: w.clone(),
                    chardev,
                    node: node_of(&cfg, w),
                    token,
                    tasks,
                    control: control_tx,
                },
            );
        }
        Ok(summary)
    }
}

/// The socket chardev of a watchdog's notification node.
fn node_of(cfg: &Config, w: &WatchdogConfig) -> Option<SocketChardev> {
    match w.notification_node.as_ref().map(|n| &cfg.chardevs[n]) {
        Some(Chardev::Socket(s)) => Some(s.clone()),
        _ => None,
    }
}

fn context(
    w: &WatchdogConfig,
    events: mpsc::Sender<ChannelEvent>,
    metrics: Arc<WatchdogMetrics>,
    chardev: &Chardev,
) -> ChannelContext {
    ChannelContext {
        watchdog: w.id.as_str().into(),
        channel: w.awd_node.as_str().into(),
        events,
        metrics,
        nodelay: matches!(chardev, Chardev::Socket(s) if s.nodelay),
        rate_limit: chardev.rate_limit(),
    }
}

impl control::Handler for Daemon {
    fn handle(
        &self,
        req: Request,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + '_>> {
        Box::pin(self.handle_request(req))
    }
}
