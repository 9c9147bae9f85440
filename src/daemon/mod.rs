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

pub mod limits;
pub mod reload;
pub mod systemd;
pub mod watchdog;

use std::collections::BTreeMap;
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
use crate::control::{self, ControlListener, ErrorCode, Request, Response};
use crate::engine::{self, Setter};
use crate::metrics::{Metrics, WatchdogMetrics};
use crate::transport::ChannelEvent;
use crate::transport::socket::{self, Listener, SocketError};
use crate::transport::vsock::{self, VsockDevice, VsockDeviceConfig, VsockError, VsockPort};
use crate::transport::{ChannelContext, SocketChardev};
use limits::CONTROL_TIMEOUT;
use reload::{
    Layout, Refusal, ReloadPlan, RunnerStep, VsockSpec, VsockStep, WatchdogSpec, WatchdogStep,
};
use watchdog::{Command, Control, Links, WatchdogStatus, WatchdogTask};

/// Why the daemon could not start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A socket channel could not be set up.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// A vhost-user vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A reload would change what cannot change while running (the ports or CID of a vsock
    /// device).
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// Why a command to one watchdog was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No running watchdog has that id.
    #[error("no watchdog '{watchdog}'")]
    UnknownWatchdog {
        /// The id asked for.
        watchdog: String,
    },
    /// The watchdog's task has ended (shutdown, or a reload removed it meanwhile).
    #[error("the watchdog has stopped")]
    Stopped {
        /// The watchdog whose task is gone.
        watchdog: String,
    },
    /// The watchdog's task did not answer in time: its loop is stuck, or too busy to turn.
    #[error("watchdog '{watchdog}' did not answer within {within:?}")]
    NoAnswer {
        /// The watchdog that did not answer.
        watchdog: String,
        /// How long it was given.
        within: Duration,
    },
    /// The engine refused the command; nothing changed.
    #[error(transparent)]
    Refused(#[from] engine::Refusal),
}

impl CommandError {
    /// The watchdog that failed to carry the command out, where that is the reason.
    pub fn watchdog(&self) -> Option<&str> {
        match self {
            CommandError::UnknownWatchdog { watchdog }
            | CommandError::Stopped { watchdog }
            | CommandError::NoAnswer { watchdog, .. } => Some(watchdog),
            CommandError::Refused(_) => None,
        }
    }
}

impl ErrorCode for CommandError {
    fn code(&self) -> &'static str {
        match self {
            CommandError::UnknownWatchdog { .. } => "unknown_watchdog",
            CommandError::Stopped { .. } => "watchdog_stopped",
            CommandError::NoAnswer { .. } => "no_answer",
            CommandError::Refused(r) => r.as_str(),
        }
    }
}

/// Why a control request was refused: the request itself, or the command it sent to a
/// watchdog.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// `enable`/`disable` without a target.
    #[error("give a watchdog id, or id/supervision")]
    NoTarget,
    /// `condition` without a watchdog, and no watchdog declares that operator condition.
    #[error("no watchdog declares operator condition '{name}'")]
    NoOperatorCondition {
        /// The condition asked for.
        name: String,
    },
    /// One of several watchdogs a `condition` went to did not take it.
    #[error("watchdog '{watchdog}'")]
    Watchdog {
        /// The watchdog that did not take it.
        watchdog: String,
        /// Why not.
        #[source]
        source: CommandError,
    },
    /// The one watchdog the request named did not carry it out.
    #[error(transparent)]
    Command(#[from] CommandError),
}

impl ErrorCode for RequestError {
    fn code(&self) -> &'static str {
        match self {
            RequestError::NoTarget => "missing_target",
            RequestError::NoOperatorCondition { .. } => "no_operator_condition",
            RequestError::Watchdog { source, .. } | RequestError::Command(source) => source.code(),
        }
    }
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
    peer: crate::transport::PeerCred,
}

#[derive(Default)]
struct State {
    watchdogs: BTreeMap<String, Running>,
    runners: BTreeMap<String, RunningRunner>,
    vsock: BTreeMap<PathBuf, RunningVsock>,
}

impl State {
    /// What runs, as the reload planner sees it.
    fn layout(&self) -> Layout {
        let watchdogs = self.watchdogs.iter().map(|(id, r)| {
            let spec = WatchdogSpec {
                cfg: r.cfg.clone(),
                chardev: r.chardev.clone(),
                node: r.node.clone(),
            };
            (id.clone(), spec)
        });
        let runners = self
            .runners
            .iter()
            .map(|(id, r)| (id.clone(), r.chardev.clone()));
        let vsock = self.vsock.iter().map(|(path, d)| {
            let spec = VsockSpec {
                guest_cid: d.guest_cid,
                ports: d.ports.clone(),
                peer: d.peer,
            };
            (path.clone(), spec)
        });
        Layout {
            watchdogs: watchdogs.collect(),
            runners: runners.collect(),
            vsock: vsock.collect(),
        }
    }
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
#[derive(Default)]
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
    /// drive the timers are turning. Fails on the first one that did not answer.
    pub async fn probe(&self, timeout: Duration) -> Result<(), CommandError> {
        let controls = self.controls().await;
        for (watchdog, tx) in controls {
            let (reply, rx) = oneshot::channel();
            let asked = tokio::time::timeout(timeout, tx.send(Control::Status(reply))).await;
            let answered = match asked {
                Ok(Ok(())) => tokio::time::timeout(timeout, rx).await.map(|r| r.is_ok()),
                Ok(Err(_)) => Ok(false),
                Err(elapsed) => Err(elapsed),
            };
            match answered {
                Ok(true) => {}
                Ok(false) => return Err(CommandError::Stopped { watchdog }),
                Err(_) => {
                    return Err(CommandError::NoAnswer {
                        watchdog,
                        within: timeout,
                    });
                }
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
    pub async fn command(&self, watchdog: &str, cmd: Command) -> Result<(), CommandError> {
        let tx = {
            let st = self.inner.state.lock().await;
            match st.watchdogs.get(watchdog) {
                Some(w) => w.control.clone(),
                None => {
                    return Err(CommandError::UnknownWatchdog {
                        watchdog: watchdog.to_owned(),
                    });
                }
            }
        };
        let (reply, rx) = oneshot::channel();
        tx.send(Control::Command { cmd, reply })
            .await
            .map_err(|_| CommandError::Stopped {
                watchdog: watchdog.to_owned(),
            })?;
        match tokio::time::timeout(CONTROL_TIMEOUT, rx).await {
            Ok(Ok(r)) => Ok(r?),
            _ => Err(CommandError::NoAnswer {
                watchdog: watchdog.to_owned(),
                within: CONTROL_TIMEOUT,
            }),
        }
    }

    /// Answers one control request.
    async fn handle_request(&self, req: Request) -> Response {
        match self.carry_out(req).await {
            Ok(resp) => resp,
            Err(e) => Response::error(&e),
        }
    }

    /// Carries out one control request: the response on success, else why not.
    async fn carry_out(&self, req: Request) -> Result<Response, RequestError> {
        match req {
            Request::Status => {
                let watchdogs = self
                    .status()
                    .await
                    .into_iter()
                    .filter_map(|s| serde_json::to_value(s).ok())
                    .collect();
                Ok(Response {
                    watchdogs,
                    ..Response::ok()
                })
            }
            Request::Enable { target } | Request::Disable { target } if target.is_empty() => {
                Err(RequestError::NoTarget)
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
                    return Err(RequestError::NoOperatorCondition { name });
                }
                for id in ids {
                    let cmd = Command::Condition {
                        name: name.clone(),
                        value,
                        by: Setter::Operator,
                    };
                    self.command(&id, cmd)
                        .await
                        .map_err(|source| RequestError::Watchdog {
                            watchdog: id,
                            source,
                        })?;
                }
                Ok(Response::ok())
            }
        }
    }

    /// `enable`/`disable` of `ID` or `ID/SUPERVISION`.
    async fn targeted(&self, target: &str, enable: bool) -> Result<Response, RequestError> {
        let (id, sup) = match target.split_once('/') {
            Some((id, sup)) => (id, Some(sup.to_owned())),
            None => (target, None),
        };
        let cmd = if enable {
            Command::Enable(sup)
        } else {
            Command::Disable(sup)
        };
        self.command(id, cmd).await?;
        Ok(Response::ok())
    }

    /// Moves the running state to `cfg`: plans the change ([`reload`]; refused as a whole if it
    /// cannot be made while running), binds and spawns what the started watchdogs need (an
    /// error there also leaves everything as it was), then carries the plan out.
    async fn apply(&self, cfg: Config) -> Result<ReloadSummary, DaemonError> {
        for note in &cfg.notes {
            info!("{note}");
        }
        let mut st = self.inner.state.lock().await;
        let plan = ReloadPlan::new(&st.layout(), &cfg)?;
        let mut prepared = self.prepare(&plan).await?;

        // From here on nothing can fail as a whole.
        // 1. Stop removed and replaced watchdogs, then update the vsock devices and bind what
        //    the stopped watchdogs held.
        let (removed, replaced) = (WatchdogStep::Remove, WatchdogStep::Replace);
        for id in plan.ids(removed).chain(plan.ids(replaced)) {
            let Some(r) = st.watchdogs.remove(id) else {
                continue;
            };
            r.token.cancel();
            r.tasks.close();
            r.tasks.wait().await;
            if plan.watchdogs.get(id) == Some(&removed) {
                self.inner.metrics.remove_watchdog(id, &r.cfg.awd_node);
                info!(watchdog = %id, "watchdog removed");
            }
        }
        self.update_vsock(&mut st, &plan, &mut prepared).await;
        for id in &plan.late_bind {
            let chardev = plan.target.watchdogs.get(id).map(|w| &w.chardev);
            let Some(Chardev::Socket(s)) = chardev else {
                continue;
            };
            match socket::bind(s).await {
                Ok(l) => {
                    prepared.listeners.insert(id.clone(), l);
                }
                Err(e) => warn!(watchdog = %id, "{}", crate::util::error_chain(&e)),
            }
        }

        // 2. Runners: one per notification node; stop the stale ones, then start the new.
        for id in plan.runner_ids(|s| matches!(s, RunnerStep::Swap | RunnerStep::Stop)) {
            if let Some(r) = st.runners.remove(id) {
                r.token.cancel();
                self.inner.metrics.remove_node(id);
            }
        }
        for id in plan.runner_ids(|s| matches!(s, RunnerStep::Start | RunnerStep::Swap)) {
            if let Some(chardev) = plan.target.runners.get(id) {
                self.start_runner(&mut st, id, chardev);
            }
        }

        // 3. Reconfigure in place; this includes every watchdog whose runner was swapped.
        for id in plan.ids(WatchdogStep::Change) {
            let Some(w) = plan.target.watchdogs.get(id) else {
                continue;
            };
            let l = links(&st, &w.cfg);
            if let Some(r) = st.watchdogs.get_mut(id) {
                let _ = r
                    .control
                    .send(Control::Reconfigure(Box::new((w.cfg.clone(), l))))
                    .await;
                r.cfg = w.cfg.clone();
                r.node = w.node.clone();
            }
        }

        // 4. Start added and replaced watchdogs.
        for (id, w) in plan.starting() {
            if let Some(channel) = prepared.channels.remove(id) {
                let listener = prepared.listeners.remove(id);
                self.start_watchdog(&mut st, w, channel, listener);
            }
        }
        Ok(plan.summary())
    }

    /// Binds the listeners and spawns the vsock devices the plan's started watchdogs need, and
    /// makes their event channels. Listeners a running watchdog still holds are left for
    /// later ([`ReloadPlan::late_bind`]).
    async fn prepare(&self, plan: &ReloadPlan) -> Result<Prepared, DaemonError> {
        let mut p = Prepared::default();
        for (id, w) in plan.starting() {
            if let Chardev::Socket(s) = &w.chardev
                && s.server
                && !plan.late_bind.contains(id)
            {
                p.listeners.insert(id.clone(), socket::bind(s).await?);
            }
            let (tx, rx) = mpsc::channel(limits::EVENT_QUEUE);
            let wm = self.inner.metrics.watchdog(id, &w.cfg.awd_node);
            p.channels.insert(id.clone(), (tx, rx, wm));
        }
        for (path, step) in &plan.vsock {
            let (VsockStep::Spawn, Some(spec)) = (step, plan.target.vsock.get(path)) else {
                continue;
            };
            let mut dev = VsockDeviceConfig {
                socket_path: path.clone(),
                guest_cid: spec.guest_cid,
                ports: Vec::new(),
                peer: spec.peer,
            };
            for (port, id) in &spec.ports {
                let (Some((tx, _, wm)), Some(w)) =
                    (p.channels.get(id), plan.target.watchdogs.get(id))
                else {
                    continue;
                };
                dev.ports.push(VsockPort {
                    port: *port,
                    ctx: context(&w.cfg, tx.clone(), wm.clone(), &w.chardev),
                });
                info!(watchdog = %id, channel = %w.cfg.awd_node, "vsock port {port} on {}", path.display());
            }
            let device = vsock::spawn(dev, self.inner.shutdown.clone())?;
            self.inner
                .vsock_metrics
                .add(&path.display().to_string(), device.counters());
            let running = RunningVsock {
                device,
                guest_cid: spec.guest_cid,
                ports: spec.ports.clone(),
                peer: spec.peer,
            };
            p.devices.insert(path.clone(), running);
        }
        Ok(p)
    }

    /// Stops the vsock devices nobody uses any more; on running ones, a port whose watchdog
    /// starts anew (added or replaced) feeds the new one from now on, its guest connections
    /// kept; then the spawned devices join the running ones.
    async fn update_vsock(&self, st: &mut State, plan: &ReloadPlan, prepared: &mut Prepared) {
        for (path, _) in plan.vsock.iter().filter(|(_, s)| **s == VsockStep::Remove) {
            if let Some(d) = st.vsock.remove(path) {
                info!(device = %path.display(), "vsock device removed");
                self.inner.vsock_metrics.remove(&path.display().to_string());
                d.device.stop();
                d.device.stopped().await;
            }
        }
        for (path, step) in &plan.vsock {
            let (VsockStep::Keep { rebind }, Some(d), Some(spec)) =
                (step, st.vsock.get_mut(path), plan.target.vsock.get(path))
            else {
                continue;
            };
            for (port, id) in rebind {
                let (Some((tx, _, wm)), Some(w)) =
                    (prepared.channels.get(id), plan.target.watchdogs.get(id))
                else {
                    continue;
                };
                let ctx = context(&w.cfg, tx.clone(), wm.clone(), &w.chardev);
                d.device.rebind(*port, ctx);
                info!(watchdog = %id, channel = %w.cfg.awd_node, "vsock port {port} on {}", path.display());
            }
            d.ports = spec.ports.clone();
        }
        st.vsock.extend(std::mem::take(&mut prepared.devices));
    }

    /// Starts the action runner of notification node `id`.
    fn start_runner(&self, st: &mut State, id: &str, chardev: &SocketChardev) {
        let (mut runner, handle) = Runner::new(chardev.clone());
        runner = runner.with_backlog_gauge(self.inner.metrics.node_backlog(id));
        if let Some(tx) = &self.inner.reports {
            runner = runner.with_reports(tx.clone());
        }
        let token = self.inner.shutdown.child_token();
        self.inner.tracker.spawn(runner.run(token.clone()));
        let running = RunningRunner {
            chardev: chardev.clone(),
            handle,
            token,
        };
        st.runners.insert(id.to_owned(), running);
    }

    /// Starts a watchdog task and its socket transport (a vsock port was bound to its channel
    /// already). A listening chardev without `listener` could not be bound: no transport.
    fn start_watchdog(
        &self,
        st: &mut State,
        w: &WatchdogSpec,
        (tx, rx, wm): Channel,
        listener: Option<Listener>,
    ) {
        let token = self.inner.shutdown.child_token();
        let tasks = TaskTracker::new();
        let (control_tx, control_rx) = mpsc::channel(16);
        let task = WatchdogTask::new(&w.cfg, rx, control_rx, wm.clone(), links(st, &w.cfg));
        tasks.spawn(task.run(token.clone()));
        let (id, node) = (&w.cfg.id, &w.cfg.awd_node);
        if let Chardev::Socket(s) = &w.chardev {
            let ctx = context(&w.cfg, tx.clone(), wm, &w.chardev);
            match listener {
                Some(l) => {
                    let policy = socket::ServerPolicy::of(s, w.cfg.timeout());
                    info!(watchdog = %id, channel = %node, max_connections = policy.max_connections,
                        "listening on {}", s.endpoint);
                    tasks.spawn(socket::serve(l, policy, ctx, token.clone()));
                }
                None if s.server => {}
                None => {
                    info!(watchdog = %id, channel = %node, "connecting to {}", s.endpoint);
                    tasks.spawn(socket::connect_loop(s.clone(), ctx, token.clone()));
                }
            }
        }
        self.inner.tracker.spawn({
            let tasks = tasks.clone();
            async move { tasks.wait().await }
        });
        let running = Running {
            cfg: w.cfg.clone(),
            chardev: w.chardev.clone(),
            node: w.node.clone(),
            token,
            tasks,
            control: control_tx,
        };
        st.watchdogs.insert(id.clone(), running);
    }
}

/// What a watchdog task reaches: the runner of its notification node and the VM state it
/// reports.
fn links(st: &State, w: &WatchdogConfig) -> Links {
    let runner = w
        .notification_node
        .as_ref()
        .and_then(|n| st.runners.get(n))
        .map(|r| r.handle.clone());
    let vm = runner.as_ref().map(RunnerHandle::vm_state);
    Links { runner, vm }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file;
    use serde_json::json;

    /// Every refusal the control socket can give, as the wire sees it: `error` as `awd` has
    /// always printed it, and `code` beside it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn control_refusals_carry_the_old_message_and_a_code() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[chardev.hb]\npath = \"{}\"\nserver = true\n\
             [watchdog.vm1]\nawd_node = \"hb\"\ntimeout = 60000\n\
             guest_conditions = {{ ready = false }}\n\
             operator_conditions = {{ maintenance-off = true }}\n",
            dir.path().join("hb.sock").display()
        );
        let raw = file::parse(&toml, &dir.path().join("awd.toml")).unwrap();
        let daemon = Daemon::start(Config::build(raw).unwrap(), Options::default())
            .await
            .unwrap();
        let condition = |name: &str, watchdog: Option<&str>| Request::Condition {
            name: name.into(),
            value: false,
            watchdog: watchdog.map(str::to_owned),
        };
        let cases = [
            (
                Request::Disable {
                    target: "vm1/nope".into(),
                },
                json!({
                    "ok": false,
                    "error": "no supervision nope in this watchdog (it has timeout)",
                    "code": "unknown_supervision",
                }),
            ),
            (
                Request::Enable {
                    target: "vm2".into(),
                },
                json!({"ok": false, "error": "no watchdog 'vm2'", "code": "unknown_watchdog"}),
            ),
            (
                Request::Enable { target: "".into() },
                json!({
                    "ok": false,
                    "error": "give a watchdog id, or id/supervision",
                    "code": "missing_target",
                }),
            ),
            (
                condition("ready", None),
                json!({
                    "ok": false,
                    "error": "no watchdog declares operator condition 'ready'",
                    "code": "no_operator_condition",
                }),
            ),
            (
                condition("ready", Some("vm1")),
                json!({
                    "ok": false,
                    "error": "watchdog 'vm1': condition ready refused: it is set by the guest, \
                              not by the operator",
                    "code": "wrong_setter",
                }),
            ),
            (
                condition("ready", Some("vm2")),
                json!({
                    "ok": false,
                    "error": "watchdog 'vm2': no watchdog 'vm2'",
                    "code": "unknown_watchdog",
                }),
            ),
            (condition("maintenance-off", None), json!({"ok": true})),
            (
                Request::Disable {
                    target: "vm1/timeout".into(),
                },
                json!({"ok": true}),
            ),
        ];
        for (req, want) in cases {
            let got = serde_json::to_value(daemon.handle_request(req.clone()).await).unwrap();
            assert_eq!(got, want, "{req:?}");
        }
        let resp = daemon.handle_request(condition("x", Some("vm1"))).await;
        assert!(
            resp.is_refusal(
                "unknown_condition",
                "watchdog 'vm1': condition x refused: no such"
            ),
            "{resp:?}"
        );
        daemon.stop().await;
    }

    #[test]
    fn a_command_that_got_no_answer_names_the_watchdog_and_the_wait() {
        let e = CommandError::NoAnswer {
            watchdog: "vm1".into(),
            within: CONTROL_TIMEOUT,
        };
        assert_eq!(e.to_string(), "watchdog 'vm1' did not answer within 2s");
        assert_eq!((e.code(), e.watchdog()), ("no_answer", Some("vm1")));
        let e = CommandError::Stopped {
            watchdog: "vm1".into(),
        };
        assert_eq!(
            serde_json::to_value(Response::error(&e)).unwrap(),
            json!({"ok": false, "error": "the watchdog has stopped", "code": "watchdog_stopped"})
        );
    }
}
