//! One watchdog's task: owns its engine, hears its channel, fires its script, sends its pulses.
//!
//! The task waits on six things: channel events, control requests (status, enable, disable,
//! operator conditions), the VM's run state from its QMP monitor (`vm-running`), the engine's
//! next deadline (`sleep_until`, never a polling loop), the next escalation step, and the
//! pulse interval. Control requests, the run state and the timers are served before channel
//! input, so a flooding peer delays nothing but its own input; and a deadline drains the input
//! already queued before it is judged, so a heartbeat waiting there is never mistaken for
//! silence.
//!
//! The error reaction is a chain: the script runs on the global transition to EXPIRED; each
//! escalation step runs `after` the expiry if the watchdog is still expired (or stopped) by
//! then; `stopped_script` runs on the transition to STOPPED. An expired watchdog stops its
//! pulses ("stop alive reporting").

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use super::limits::{EVENT_QUEUE, MAX_UNANSWERED};
use crate::action::exec::{ExecCommand, ExecContext, ExecRunner};
use crate::action::script::Script;
use crate::action::{Job, RunnerHandle, VmState};
use crate::config::{EscalationStep, Role, WatchdogConfig};
use crate::engine::{
    Change, EngineSnapshot, Event, GlobalStatus, Outcome, Refusal, Scope, Setter, VM_RUNNING,
    WatchdogEngine,
};
use crate::metrics::WatchdogMetrics;
use crate::protocol::Message;
use crate::transport::{ChannelEvent, ConnId, ConnWriter, TryWriteError};
use crate::util::LogLimiter;

/// The engine's clock: tokio's (so tests can pause it), as the std type the engine takes.
pub fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// A run-time request to a watchdog.
#[derive(Debug)]
pub enum Control {
    /// Report the status.
    Status(oneshot::Sender<WatchdogStatus>),
    /// Take a new configuration (a reload changed this watchdog, or its notification node):
    /// connections stay, the engine restarts from now with the new supervision.
    Reconfigure(Box<(WatchdogConfig, Links)>),
    /// Change something; the reply says whether it was done.
    Command {
        /// The change asked for.
        cmd: Command,
        /// Done, or why the engine refused it.
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
}

/// A change requested at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Enable the watchdog (`None`) or one supervision.
    Enable(Option<String>),
    /// Disable the watchdog (`None`) or one supervision.
    Disable(Option<String>),
    /// Set a condition.
    Condition {
        /// Its name.
        name: String,
        /// Its value.
        value: bool,
        /// Who sets it (the engine refuses anyone else).
        by: Setter,
    },
}

/// What `awd status` shows for one watchdog.
#[derive(Debug, Clone, Serialize)]
pub struct WatchdogStatus {
    /// The watchdog id.
    pub id: String,
    /// The awd_node chardev.
    pub channel: String,
    /// "server" (pulses) or "client" (answers).
    pub role: &'static str,
    /// Open connections on the channel.
    pub connections: usize,
    /// Messages received.
    pub heartbeats: u64,
    /// How long ago the last input arrived (`None`: never).
    pub last_input_ms_ago: Option<u64>,
    /// Transitions to EXPIRED.
    pub expiries: u64,
    /// Script lines the monitor answered.
    pub actions_sent: u64,
    /// Script lines written to a raw node (no answer possible).
    pub actions_written: u64,
    /// Script lines written to a monitor that never answered (timeout, EOF): QEMU may or may
    /// not have run them.
    pub actions_unknown: u64,
    /// Script lines that could not be sent.
    pub actions_failed: u64,
    /// Pulses and replies sent.
    pub pulses_sent: u64,
    /// The latest pulse → reply round trip on any connection, in µs (server role; `None`
    /// until a reply arrived).
    pub last_pulse_rtt_us: Option<u64>,
    /// The VM's run state as its QMP monitor reports it, if awd follows one.
    pub vm_running: Option<bool>,
    /// How many times awd saw the VM start over (reset, reboot, new QEMU), if it follows a
    /// monitor.
    pub vm_starts: Option<u64>,
    /// While escalating: how many steps have run and when the next one is due.
    pub escalation: Option<EscalationStatus>,
    /// The engine's view: global status, conditions, every supervision.
    #[serde(flatten)]
    pub engine: EngineSnapshot,
}

/// Progress through the escalation chain.
#[derive(Debug, Clone, Serialize)]
pub struct EscalationStatus {
    /// Steps run so far, the first script included.
    pub steps_run: usize,
    /// Steps configured, the first script included.
    pub steps_total: usize,
    /// How long until the next step, if one is left.
    pub next_in_ms: Option<u64>,
}

/// What a watchdog is linked to besides its channel.
#[derive(Debug, Default)]
pub struct Links {
    /// Where its scripts go.
    pub runner: Option<RunnerHandle>,
    /// The VM's run state (`None` while unknown), from the notification node's QMP events.
    pub vm: Option<watch::Receiver<VmState>>,
}

/// Everything a watchdog task needs.
pub struct WatchdogTask {
    id: Arc<str>,
    channel: String,
    role: Role,
    pulse_interval: Option<Duration>,
    engine: WatchdogEngine,
    events: mpsc::Receiver<ChannelEvent>,
    control: mpsc::Receiver<Control>,
    conns: BTreeMap<ConnId, Box<dyn ConnWriter>>,
    metrics: Arc<WatchdogMetrics>,
    links: Links,
    script: Arc<Script>,
    /// The command run at the expiry, beside the script.
    exec: Option<Arc<ExecCommand>>,
    escalation: Vec<Step>,
    stopped_script: Arc<Script>,
    /// Runs the watchdog's commands, one at a time.
    exec_runner: ExecRunner,
    /// When the current expiry began and how many escalation steps have run since.
    escalating: Option<(Instant, usize)>,
    pulses: Option<Interval>,
    vm_open: bool,
    /// The run state and start count last applied from `links.vm`: a start count that grows
    /// is the VM starting over; an unchanged run state is not applied again.
    vm_seen: VmState,
    pulse: Bytes,
    reply: Bytes,
    /// When each connection's unanswered pulses were sent, oldest first.
    pulses_out: BTreeMap<ConnId, VecDeque<Instant>>,
    /// The latest measured round trip.
    last_rtt: Option<Duration>,
    /// Rate limits for the log lines input causes.
    logs: InputLogs,
}

/// One escalation step, as the task runs it.
#[derive(Debug, Clone)]
struct Step {
    after: Duration,
    script: Arc<Script>,
    exec: Option<Arc<ExecCommand>>,
}

fn steps(cfg: &WatchdogConfig) -> Vec<Step> {
    cfg.escalation
        .iter()
        .map(
            |EscalationStep {
                 after,
                 script,
                 exec,
             }| Step {
                after: *after,
                script: Arc::new(script.clone()),
                exec: exec.clone().map(Arc::new),
            },
        )
        .collect()
}

/// The kinds of per-input log lines, each rate-limited on its own: a peer that floods one kind
/// of message cannot fill the log, nor hide the other kinds.
#[derive(Debug, Clone, Copy)]
enum InputLog {
    /// `WATCHDOG=trigger`.
    Trigger,
    /// `WATCHDOG_USEC=` and `EXTEND_TIMEOUT_USEC=`.
    SetTimeout,
    /// `STOPPING=1`.
    Stopping,
    /// `STATUS=`.
    Status,
    /// `CHECKPOINT=` (debug level).
    Checkpoint,
    /// Input the engine refused (a timeout out of bounds, a condition the guest may not set).
    Refused,
}

/// One [`LogLimiter`] per [`InputLog`] kind: a burst of 5 lines, then one per 10 s, each
/// allowed line carrying how many were suppressed before it.
#[derive(Debug)]
struct InputLogs([LogLimiter; 6]);

impl InputLogs {
    fn new() -> Self {
        InputLogs(std::array::from_fn(|_| {
            LogLimiter::new(5, Duration::from_secs(10))
        }))
    }

    /// Whether a line of `kind` may be logged now, and how many were suppressed before it.
    fn allow(&mut self, kind: InputLog) -> Option<u64> {
        self.0[kind as usize].allow(now())
    }
}

fn pulse_timer(role: Role, interval: Option<Duration>) -> Option<Interval> {
    match (role, interval) {
        (Role::Server, Some(p)) => {
            let mut i = tokio::time::interval_at(Instant::now() + p, p);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            Some(i)
        }
        _ => None,
    }
}

impl WatchdogTask {
    /// Builds the task; the timer is armed now.
    pub fn new(
        cfg: &WatchdogConfig,
        events: mpsc::Receiver<ChannelEvent>,
        control: mpsc::Receiver<Control>,
        metrics: Arc<WatchdogMetrics>,
        links: Links,
    ) -> Self {
        let engine = WatchdogEngine::new(&cfg.engine, now())
            .expect("Config::build validated the engine spec");
        metrics.set_status(engine.status());
        let exec_runner = ExecRunner::new(Arc::clone(&metrics));
        let vm_open = links.vm.is_some();
        let vm_seen = VmState {
            running: None,
            starts: links.vm.as_ref().map_or(0, |v| v.borrow().starts),
        };
        WatchdogTask {
            id: cfg.id.as_str().into(),
            channel: cfg.awd_node.clone(),
            role: cfg.role,
            pulse_interval: cfg.pulse_interval,
            engine,
            events,
            control,
            conns: BTreeMap::new(),
            metrics,
            links,
            script: Arc::new(cfg.script.clone()),
            exec: cfg.exec.clone().map(Arc::new),
            escalation: steps(cfg),
            stopped_script: Arc::new(cfg.stopped_script.clone()),
            exec_runner,
            escalating: None,
            pulses: None,
            vm_open,
            vm_seen,
            pulse: Bytes::from(Message::Pulse.encode().expect("a pulse always encodes")),
            reply: Bytes::from(
                Message::PulseReply
                    .encode()
                    .expect("a reply always encodes"),
            ),
            pulses_out: BTreeMap::new(),
            last_rtt: None,
            logs: InputLogs::new(),
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        self.pulses = pulse_timer(self.role, self.pulse_interval);
        info!(
            watchdog = &*self.id,
            deadline_in_ms = self
                .engine
                .next_deadline()
                .map(|d| d.saturating_duration_since(now()).as_millis() as u64),
            "watchdog armed"
        );
        self.catch_up_vm();
        let mut control_open = true;
        loop {
            let deadline = self.engine.next_deadline().map(Instant::from_std);
            let step_at = self.next_step_at();
            let pulsing = self.pulses.is_some()
                && !matches!(
                    self.engine.status(),
                    GlobalStatus::Expired | GlobalStatus::Stopped
                );
            // Fair by construction: the branches that come rarely and must never wait behind
            // input (control requests and the liveness probe, the VM's run state, timers,
            // pulses) are polled first; channel input, which a peer can make endless, last.
            // A deadline never outruns input already queued: its branch drains the queue
            // before it asks the engine, so a heartbeat waiting there is never taken for
            // silence.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                ctl = self.control.recv(), if control_open => match ctl {
                    Some(ctl) => self.on_control(ctl),
                    None => control_open = false,
                },
                changed = async { self.links.vm.as_mut().expect("guarded").changed().await }, if self.vm_open => {
                    match changed {
                        Ok(()) => self.catch_up_vm(),
                        Err(_) => self.vm_open = false,
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    if !self.drain_events() {
                        break;
                    }
                    let c = self.engine.poll(now());
                    self.apply(c);
                }
                _ = tokio::time::sleep_until(step_at.unwrap_or_else(Instant::now)), if step_at.is_some() => {
                    self.escalate();
                }
                _ = async { self.pulses.as_mut().expect("guarded").tick().await }, if pulsing => self.send_pulses(),
                ev = self.events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
            }
            // Steps already due (the task ran late, or an expiry was settled late) run now.
            while self.next_step_at().is_some_and(|t| t <= Instant::now()) {
                self.escalate();
            }
        }
        debug!(watchdog = &*self.id, "watchdog stopped");
    }

    /// Handles every channel event already queued (at most one queue's worth, so a flood
    /// cannot hold the task here). False when the transports are gone.
    fn drain_events(&mut self) -> bool {
        for _ in 0..EVENT_QUEUE {
            match self.events.try_recv() {
                Ok(ev) => self.on_event(ev),
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
        true
    }

    /// Applies the VM's run state if it is known and changed.
    fn catch_up_vm(&mut self) {
        let Some(vm) = self.links.vm.as_mut() else {
            return;
        };
        let VmState { running, starts } = *vm.borrow_and_update();
        if starts > self.vm_seen.starts {
            self.vm_seen.starts = starts;
            self.start_over("the QMP monitor saw a reset, a reboot or a new QEMU");
        }
        if running.is_some() && running != self.vm_seen.running {
            self.vm_seen.running = running;
            if let Some(running) = running {
                self.vm_state(running);
            }
        }
    }

    fn reconfigure(&mut self, cfg: WatchdogConfig, links: Links) {
        let engine = match WatchdogEngine::new(&cfg.engine, now()) {
            Ok(e) => e,
            Err(e) => {
                error!(watchdog = &*self.id, "reconfiguration refused: {e}");
                return;
            }
        };
        info!(
            watchdog = &*self.id,
            "reconfigured: supervision restarts from now"
        );
        self.engine = engine;
        self.metrics.set_status(self.engine.status());
        self.role = cfg.role;
        self.pulse_interval = cfg.pulse_interval;
        self.pulses = pulse_timer(self.role, self.pulse_interval);
        self.pulses_out.clear();
        self.script = Arc::new(cfg.script.clone());
        self.exec = cfg.exec.clone().map(Arc::new);
        self.escalation = steps(&cfg);
        self.stopped_script = Arc::new(cfg.stopped_script.clone());
        self.escalating = None;
        self.vm_open = links.vm.is_some();
        // A new engine (and perhaps a new node): apply the run state again, and count starts
        // from what the node has seen so far.
        self.vm_seen = VmState {
            running: None,
            starts: links.vm.as_ref().map_or(0, |v| v.borrow().starts),
        };
        self.links = links;
        // The new engine starts with vm-running true; tell it what the VM is doing now.
        if let Some(vm) = self.links.vm.as_mut() {
            vm.mark_changed();
        }
    }

    fn vm_state(&mut self, running: bool) {
        info!(watchdog = &*self.id, running, "VM run state from QMP");
        let o = self.engine.handle(
            Event::Condition {
                name: VM_RUNNING,
                value: running,
                by: Setter::Vm,
            },
            now(),
        );
        if let Some(why) = &o.rejected {
            debug!(watchdog = &*self.id, reason = %why, "vm-running not applied");
        }
        self.apply(o.changes);
    }

    fn on_control(&mut self, ctl: Control) {
        match ctl {
            Control::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Control::Reconfigure(b) => {
                let (cfg, links) = *b;
                self.reconfigure(cfg, links);
            }
            Control::Command { cmd, reply } => {
                let at = now();
                let o = match &cmd {
                    Command::Enable(target) => {
                        self.engine.handle(Event::Enable(target.as_deref()), at)
                    }
                    Command::Disable(target) => {
                        self.engine.handle(Event::Disable(target.as_deref()), at)
                    }
                    Command::Condition { name, value, by } => self.engine.handle(
                        Event::Condition {
                            name,
                            value: *value,
                            by: *by,
                        },
                        at,
                    ),
                };
                let result = match o.rejected {
                    Some(why) => Err(why),
                    None => {
                        info!(watchdog = &*self.id, command = ?cmd, "control command applied");
                        Ok(())
                    }
                };
                self.apply(o.changes);
                let _ = reply.send(result);
            }
        }
    }

    /// The status `awd status` shows.
    pub fn status(&self) -> WatchdogStatus {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let last = self.metrics.last_heartbeat_ms.load(Ordering::Relaxed);
        let at = Instant::now();
        WatchdogStatus {
            id: self.id.to_string(),
            channel: self.channel.clone(),
            role: match self.role {
                Role::Server => "server",
                Role::Client => "client",
            },
            connections: self.conns.len(),
            heartbeats: self.metrics.heartbeats.get(),
            last_input_ms_ago: (last != 0).then(|| wall.saturating_sub(last)),
            expiries: self.metrics.expiries.get(),
            actions_sent: self.metrics.actions_sent.get(),
            actions_written: self.metrics.actions_written.get(),
            actions_unknown: self.metrics.actions_unknown.get(),
            actions_failed: self.metrics.actions_failed.get(),
            pulses_sent: self.metrics.pulses.get(),
            last_pulse_rtt_us: self.last_rtt.map(|d| d.as_micros() as u64),
            vm_running: self.links.vm.as_ref().and_then(|v| v.borrow().running),
            vm_starts: self.links.vm.as_ref().map(|v| v.borrow().starts),
            escalation: self.escalating.map(|(_, run)| EscalationStatus {
                steps_run: run + 1,
                steps_total: self.escalation.len() + 1,
                next_in_ms: self
                    .next_step_at()
                    .map(|t| t.saturating_duration_since(at).as_millis() as u64),
            }),
            engine: self.engine.snapshot(now()),
        }
    }

    fn next_step_at(&self) -> Option<Instant> {
        let (since, run) = self.escalating?;
        self.escalation.get(run).map(|step| since + step.after)
    }

    fn escalate(&mut self) {
        let Some((since, run)) = self.escalating else {
            return;
        };
        let Some(step) = self.escalation.get(run).cloned() else {
            return;
        };
        self.escalating = Some((since, run + 1));
        warn!(
            watchdog = &*self.id,
            step = run + 1,
            after_ms = step.after.as_millis() as u64,
            "still expired: escalating"
        );
        let reason = format!(
            "still expired {} ms after the expiry",
            step.after.as_millis()
        );
        self.react(step.script, step.exec, run + 1, &reason);
    }

    /// Runs one reaction: the script through the notification node, the command beside it.
    fn react(
        &self,
        script: Arc<Script>,
        exec: Option<Arc<ExecCommand>>,
        step: usize,
        reason: &str,
    ) {
        if let Some(cmd) = exec {
            self.exec_runner.start(
                cmd,
                ExecContext {
                    watchdog: self.id.to_string(),
                    channel: self.channel.clone(),
                    status: self.engine.status().as_str().to_owned(),
                    reason: reason.to_owned(),
                    step,
                },
            );
            if script.is_empty() {
                return;
            }
        }
        self.submit(script);
    }

    fn submit(&self, script: Arc<Script>) {
        match &self.links.runner {
            Some(r) if !script.is_empty() => r.submit(Job {
                process: 0,
                watchdog: self.id.clone(),
                script,
                metrics: self.metrics.clone(),
            }),
            _ => warn!(watchdog = &*self.id, "no script to run"),
        }
    }

    fn on_event(&mut self, ev: ChannelEvent) {
        match ev {
            ChannelEvent::Connected { conn, peer, tx } => {
                debug!(watchdog = &*self.id, conn, %peer, "channel connection registered");
                self.conns.insert(conn, tx);
                if self.role == Role::Client {
                    // Announce ourselves: a server that expired has stopped pulsing, and
                    // would otherwise never hear from a new client, nor re-arm.
                    self.send(conn, self.reply.clone());
                }
            }
            ChannelEvent::Disconnected { conn, .. } => {
                // The timer goes on: a disconnect is silence, not input.
                self.conns.remove(&conn);
                self.pulses_out.remove(&conn);
            }
            ChannelEvent::StartedOver { reason } => self.start_over(&reason),
            ChannelEvent::Heartbeats { conn, count } => {
                trace!(watchdog = &*self.id, conn, count, "input");
                self.metrics.heard(u64::from(count));
                let o = self.engine.handle(Event::Heartbeat, now());
                self.apply(o.changes);
            }
            ChannelEvent::Signal { conn, signal } => {
                self.metrics.heard(1);
                let at = now();
                // Every message is input first: it refreshes the timer, whatever it says next.
                let refreshed = self.engine.handle(Event::Heartbeat, at);
                self.apply(refreshed.changes);
                // What the message says besides "alive": a log line, a pulse answered, and
                // its engine event, by the protocol's one mapping.
                match &signal {
                    Message::Trigger => {
                        if let Some(suppressed) = self.logs.allow(InputLog::Trigger) {
                            warn!(
                                watchdog = &*self.id,
                                conn, suppressed, "peer reported a failure"
                            );
                        }
                    }
                    Message::SetTimeout(d) => {
                        if let Some(suppressed) = self.logs.allow(InputLog::SetTimeout) {
                            info!(
                                watchdog = &*self.id,
                                timeout_ms = d.as_millis() as u64,
                                suppressed,
                                "peer set the timeout"
                            );
                        }
                    }
                    Message::ExtendTimeout(d) => {
                        if let Some(suppressed) = self.logs.allow(InputLog::SetTimeout) {
                            info!(
                                watchdog = &*self.id,
                                extend_ms = d.as_millis() as u64,
                                suppressed,
                                "peer asked for more time until its next message"
                            );
                        }
                    }
                    Message::Stopping => {
                        if let Some(suppressed) = self.logs.allow(InputLog::Stopping) {
                            info!(
                                watchdog = &*self.id,
                                conn,
                                suppressed,
                                "peer is stopping (STOPPING=1): supervision suspended until it announces itself again"
                            );
                        }
                    }
                    Message::Status(text) => {
                        if let Some(suppressed) = self.logs.allow(InputLog::Status) {
                            info!(
                                watchdog = &*self.id,
                                conn,
                                status = &**text,
                                suppressed,
                                "peer status"
                            );
                        }
                    }
                    Message::Pulse => {
                        if self.role == Role::Client {
                            self.send(conn, self.reply.clone());
                        }
                    }
                    Message::PulseReply => self.pulse_answered(conn),
                    Message::Checkpoint(c) => {
                        if let Some(suppressed) = self.logs.allow(InputLog::Checkpoint) {
                            debug!(
                                watchdog = &*self.id,
                                conn,
                                checkpoint = &**c,
                                suppressed,
                                "checkpoint"
                            );
                        }
                    }
                    Message::Condition(..) | Message::Heartbeat | Message::Rejected(_) => {}
                }
                let o = match signal.event() {
                    // The refresh above was the heartbeat.
                    Some(Event::Heartbeat) | None => Outcome::default(),
                    Some(ev) => self.engine.handle(ev, at),
                };
                if let Some(why) = &o.rejected {
                    self.metrics.refused_input(why.reason());
                    if let Some(suppressed) = self.logs.allow(InputLog::Refused) {
                        warn!(watchdog = &*self.id, conn, reason = %why, suppressed, "input refused");
                    }
                }
                self.apply(o.changes);
            }
        }
    }

    /// The VM started over (see [`ChannelEvent::StartedOver`]).
    ///
    /// Re-enters the grace, as at awd's start, and cancels the escalation steps still pending:
    /// a VM that is rebooting, as its own `system_reset` asked, must not be quit for being
    /// silent while it boots.
    fn start_over(&mut self, reason: &str) {
        let cancelled = self
            .escalating
            .take()
            .map_or(0, |(_, run)| self.escalation.len().saturating_sub(run));
        info!(
            watchdog = &*self.id,
            reason,
            steps_cancelled = cancelled,
            "the VM started over: supervision re-enters its grace"
        );
        let o = self.engine.handle(Event::StartOver, now());
        self.apply(o.changes);
    }

    fn apply(&mut self, changes: Vec<Change>) {
        for t in changes {
            if let Scope::Supervision(name) = &t.scope {
                info!(watchdog = &*self.id, supervision = &**name, from = %t.from, to = %t.to, reason = %t.reason, "supervision status changed");
                continue;
            }
            self.apply_global(t);
        }
    }

    fn apply_global(&mut self, t: Change) {
        self.metrics.set_status(t.to);
        let was_expired = matches!(t.from, GlobalStatus::Expired | GlobalStatus::Stopped);
        match t.to {
            GlobalStatus::Expired if !was_expired => {
                self.metrics.expiries.inc();
                error!(watchdog = &*self.id, from = %t.from, reason = %t.reason, "watchdog expired");
                // Steps count from the expiry itself, even if it was settled late.
                let since = self
                    .engine
                    .expired_since()
                    .map(Instant::from_std)
                    .unwrap_or_else(Instant::now);
                self.escalating = Some((since, 0));
                self.react(self.script.clone(), self.exec.clone(), 0, &t.reason);
            }
            GlobalStatus::Stopped => {
                error!(watchdog = &*self.id, from = %t.from, reason = %t.reason, "watchdog stopped: expired beyond its tolerance");
                if !self.stopped_script.is_empty() {
                    self.submit(self.stopped_script.clone());
                }
            }
            GlobalStatus::Expired => {
                info!(watchdog = &*self.id, from = %t.from, to = %t.to, reason = %t.reason, "watchdog status changed");
            }
            _ => {
                if let Some((_, run)) = self.escalating.take()
                    && run < self.escalation.len()
                {
                    info!(
                        watchdog = &*self.id,
                        steps_left = self.escalation.len() - run,
                        "recovered: remaining escalation steps cancelled"
                    );
                }
                info!(watchdog = &*self.id, from = %t.from, to = %t.to, reason = %t.reason, "watchdog status changed")
            }
        }
    }

    fn send_pulses(&mut self) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            if self.send(conn, self.pulse.clone()) {
                let out = self.pulses_out.entry(conn).or_default();
                if out.len() >= MAX_UNANSWERED {
                    out.pop_front();
                }
                out.push_back(Instant::now());
            }
        }
    }

    /// A reply arrived on `conn`: a peer answers each pulse in order on its stream, so it
    /// answers the oldest unanswered one. A reply with no pulse outstanding (a client's
    /// announcement on connect) is not measured.
    fn pulse_answered(&mut self, conn: ConnId) {
        let Some(sent) = self.pulses_out.get_mut(&conn).and_then(VecDeque::pop_front) else {
            return;
        };
        let rtt = sent.elapsed();
        self.metrics.pulse_rtt.observe(rtt.as_secs_f64());
        self.last_rtt = Some(rtt);
        debug!(
            watchdog = &*self.id,
            conn,
            rtt_us = rtt.as_micros() as u64,
            "pulse round trip"
        );
    }

    /// Queues `bytes` on `conn`; true when queued.
    fn send(&mut self, conn: ConnId, bytes: Bytes) -> bool {
        let Some(tx) = self.conns.get(&conn) else {
            return false;
        };
        match tx.try_write(bytes) {
            Ok(()) => {
                self.metrics.pulses.inc();
                true
            }
            Err(TryWriteError::Full) => {
                debug!(
                    watchdog = &*self.id,
                    conn, "pulse skipped: the peer is not reading"
                );
                false
            }
            Err(TryWriteError::Closed) => {
                self.conns.remove(&conn);
                self.pulses_out.remove(&conn);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The timer logic on tokio's paused clock: time moves only when the test says so (or when
    //! every task is idle and a timer is due, which tokio then fires at once).
    use super::*;
    use crate::action::script::Script;
    use crate::engine::EngineSpec;
    use crate::metrics::Metrics;
    use crate::protocol::{PULSE, PULSE_REPLY, frame};

    struct Harness {
        events: mpsc::Sender<ChannelEvent>,
        control: mpsc::Sender<Control>,
        vm: watch::Sender<VmState>,
        jobs: mpsc::Receiver<Job>,
        metrics: Arc<WatchdogMetrics>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    /// A watchdog whose jobs land in `Harness::jobs` (the test plays the action runner).
    fn start(timeout_ms: u64, grace_ms: Option<u64>, role: Role, pulse_ms: Option<u64>) -> Harness {
        start_with(timeout_ms, grace_ms, role, pulse_ms, |_| {})
    }

    fn start_with(
        timeout_ms: u64,
        grace_ms: Option<u64>,
        role: Role,
        pulse_ms: Option<u64>,
        edit: impl FnOnce(&mut WatchdogConfig),
    ) -> Harness {
        let mut cfg = WatchdogConfig {
            id: "w".into(),
            role,
            awd_node: "n".into(),
            notification_node: None,
            script: Script::parse("quit", "test").unwrap(),
            script_origin: "test".into(),
            pulse_interval: pulse_ms.map(Duration::from_millis),
            engine: EngineSpec {
                grace: grace_ms.map(Duration::from_millis),
                ..EngineSpec::plain(Duration::from_millis(timeout_ms))
            },
            escalation: Vec::new(),
            stopped_script: Script::default(),
            exec: None,
            follow_vm: false,
        };
        edit(&mut cfg);
        let (events, rx) = mpsc::channel(16);
        let (control, ctl_rx) = mpsc::channel(4);
        let (vm, vm_rx) = watch::channel(VmState::default());
        let metrics = Metrics::new().watchdog("w", "n");
        let (handle, jobs) = RunnerHandle::for_tests();
        let shutdown = CancellationToken::new();
        let links = Links {
            runner: Some(handle),
            vm: Some(vm_rx),
        };
        let task = tokio::spawn(
            WatchdogTask::new(&cfg, rx, ctl_rx, metrics.clone(), links).run(shutdown.clone()),
        );
        Harness {
            events,
            control,
            vm,
            jobs,
            metrics,
            shutdown,
            task,
        }
    }

    fn scripts_run(h: &mut Harness) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(j) = h.jobs.try_recv() {
            out.push(
                j.script
                    .lines
                    .iter()
                    .map(|l| l.text.as_str())
                    .collect::<Vec<_>>()
                    .join(";"),
            );
        }
        out
    }

    async fn command(h: &Harness, cmd: Command) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        h.control
            .send(Control::Command { cmd, reply })
            .await
            .unwrap();
        rx.await.unwrap().map_err(|r| r.to_string())
    }

    async fn status(h: &Harness) -> WatchdogStatus {
        let (reply, rx) = oneshot::channel();
        h.control.send(Control::Status(reply)).await.unwrap();
        rx.await.unwrap()
    }

    /// Opens connection `conn` to the watchdog and returns what the watchdog writes to it.
    async fn connect(h: &Harness, conn: ConnId) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(64);
        let peer = "p".into();
        send(
            h,
            ChannelEvent::Connected {
                conn,
                peer,
                tx: Box::new(tx),
            },
        )
        .await;
        rx
    }

    /// Hands the watchdog one channel event and lets it act on it.
    async fn send(h: &Harness, ev: ChannelEvent) {
        h.events.send(ev).await.unwrap();
        settle().await;
    }

    async fn beat(h: &Harness) {
        send(h, ChannelEvent::Heartbeats { conn: 1, count: 1 }).await;
    }

    /// Lets the watchdog task run until it waits again, without moving the clock.
    async fn settle() {
        // A clock jump can wake several timers in turn (a deadline, then an escalation step
        // computed from it); each needs a round of the task.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    async fn advance(ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
        settle().await;
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_expiry_and_rearm() {
        let h = start(5000, None, Role::Server, None);
        settle().await;
        advance(3000).await;
        beat(&h).await;
        advance(4999).await;
        assert_eq!(
            h.metrics.expiries.get(),
            0,
            "refreshed at 3 s: not due before 8 s"
        );
        advance(1).await;
        assert_eq!(h.metrics.expiries.get(), 1, "expired at 8 s");
        assert_eq!(h.metrics.status.get(), GlobalStatus::Expired.as_gauge());
        advance(60_000).await;
        assert_eq!(
            h.metrics.expiries.get(),
            1,
            "the script runs once per expiry"
        );
        beat(&h).await;
        assert_eq!(
            h.metrics.status.get(),
            GlobalStatus::Ok.as_gauge(),
            "input re-arms"
        );
        advance(5000).await;
        assert_eq!(h.metrics.expiries.get(), 2, "and it can expire again");
        h.shutdown.cancel();
        h.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_queued_as_the_deadline_falls_due_is_not_silence() {
        let h = start(5000, None, Role::Server, None);
        settle().await;
        advance(4999).await;
        // Queued, not yet handled, when the deadline comes due: the deadline drains it first.
        h.events
            .try_send(ChannelEvent::Heartbeats { conn: 1, count: 0 })
            .unwrap();
        advance(1).await;
        assert_eq!(h.metrics.expiries.get(), 0);
        advance(4999).await;
        assert_eq!(
            h.metrics.expiries.get(),
            0,
            "refreshed at 5 s, by input of any kind"
        );
        advance(1).await;
        assert_eq!(h.metrics.expiries.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn every_signal_refreshes_the_timer() {
        let h = start(5000, None, Role::Server, None);
        settle().await;
        for signal in [
            Message::SetTimeout(Duration::from_secs(5)),
            Message::Status("x".into()),
            Message::Checkpoint("c".into()),
            Message::Condition("nobody-declared-it".into(), true),
        ] {
            advance(4000).await;
            send(&h, ChannelEvent::Signal { conn: 1, signal }).await;
        }
        advance(4999).await;
        assert_eq!(h.metrics.expiries.get(), 0);
        advance(1).await;
        assert_eq!(h.metrics.expiries.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_inputs_are_counted_by_reason() {
        use crate::engine::RefusalReason as R;
        let h = start(5000, None, Role::Server, None);
        settle().await;
        command(
            &h,
            Command::Disable(Some(crate::engine::TIMEOUT_NAME.into())),
        )
        .await
        .unwrap();
        for signal in [
            Message::Condition("nobody-declared-it".into(), true),
            Message::Condition(VM_RUNNING.into(), false),
            Message::SetTimeout(Duration::from_secs(10)),
            Message::Trigger,
            Message::Condition("nobody-declared-it".into(), false),
        ] {
            send(&h, ChannelEvent::Signal { conn: 1, signal }).await;
        }
        let counts = R::ALL.map(|r| (r, h.metrics.refused_input_count(r)));
        assert_eq!(
            counts,
            [
                (R::UnknownCondition, 2),
                (R::WrongSetter, 1),
                (R::TimeoutOutOfBounds, 1),
                (R::TriggerDeactivated, 1),
                (R::UnknownSupervision, 0),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_vm_that_starts_over_gets_its_grace_and_no_pending_escalation() {
        let mut h = start_with(1000, Some(30_000), Role::Server, None, |c| {
            c.script = Script::parse("system_reset", "t").unwrap();
            c.escalation = vec![EscalationStep {
                after: Duration::from_secs(4),
                script: Script::parse("quit", "t").unwrap(),
                exec: None,
            }];
        });
        settle().await;
        advance(100).await;
        beat(&h).await;
        advance(1000).await;
        assert_eq!(scripts_run(&mut h), ["system_reset"]);
        // The reset took: the VM starts over 500 ms later and boots for 20 s in silence.
        advance(500).await;
        send(
            &h,
            ChannelEvent::StartedOver {
                reason: "test".into(),
            },
        )
        .await;
        assert_eq!(status(&h).await.engine.status, GlobalStatus::Ok);
        advance(20_000).await;
        assert!(
            scripts_run(&mut h).is_empty(),
            "no quit for a VM rebooting as asked"
        );
        // Its service comes up, beats, then goes silent: one action, after the plain timeout.
        beat(&h).await;
        advance(999).await;
        assert!(scripts_run(&mut h).is_empty());
        advance(1).await;
        assert_eq!(scripts_run(&mut h), ["system_reset"]);
        assert_eq!(h.metrics.expiries.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_counted_by_the_qmp_monitor_restarts_the_grace() {
        let mut h = start_with(1000, Some(30_000), Role::Server, None, |c| {
            c.escalation = vec![EscalationStep {
                after: Duration::from_secs(4),
                script: Script::parse("system_powerdown", "t").unwrap(),
                exec: None,
            }];
        });
        settle().await;
        h.vm.send_modify(|s| s.running = Some(true));
        settle().await;
        advance(100).await;
        beat(&h).await;
        advance(1000).await;
        assert_eq!(scripts_run(&mut h), ["quit"]);
        // RESET, or a new QEMU: the runner counts a start; the same state again is no start.
        h.vm.send_modify(|s| s.starts += 1);
        settle().await;
        h.vm.send_modify(|_| {});
        settle().await;
        advance(29_999).await;
        assert!(scripts_run(&mut h).is_empty(), "grace, and no escalation");
        advance(1).await;
        assert_eq!(scripts_run(&mut h), ["quit"], "silent after its grace");
    }

    #[tokio::test(start_paused = true)]
    async fn a_vm_that_starts_over_and_never_speaks_expires_after_the_grace() {
        let mut h = start(1000, Some(30_000), Role::Server, None);
        settle().await;
        advance(100).await;
        beat(&h).await;
        advance(5000).await;
        assert_eq!(h.metrics.expiries.get(), 1);
        send(
            &h,
            ChannelEvent::StartedOver {
                reason: "test".into(),
            },
        )
        .await;
        advance(29_999).await;
        assert_eq!(h.metrics.expiries.get(), 1);
        advance(1).await;
        assert_eq!(
            h.metrics.expiries.get(),
            2,
            "a silent restarted VM is still caught"
        );
        let _ = scripts_run(&mut h);
    }

    #[tokio::test(start_paused = true)]
    async fn grace_covers_a_slow_first_heartbeat() {
        let h = start(1000, Some(30_000), Role::Server, None);
        settle().await;
        advance(29_999).await;
        assert_eq!(h.metrics.expiries.get(), 0);
        beat(&h).await;
        advance(999).await;
        assert_eq!(h.metrics.expiries.get(), 0);
        advance(1).await;
        assert_eq!(
            h.metrics.expiries.get(),
            1,
            "after the first input the plain timeout applies"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_connects_is_caught() {
        let h = start(2000, None, Role::Server, None);
        settle().await;
        advance(2000).await;
        assert_eq!(h.metrics.expiries.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_pulses_every_interval_and_stops_while_expired() {
        let h = start(5000, None, Role::Server, Some(1000));
        let mut rx = connect(&h, 9).await;
        advance(999).await;
        assert!(rx.try_recv().is_err(), "first pulse after one interval");
        advance(1).await;
        assert_eq!(&rx.try_recv().unwrap()[..], &frame(PULSE.as_bytes())[..]);
        advance(1000).await;
        assert!(rx.try_recv().is_ok());
        // No input at all: expires at 5 s, then no more pulses (stop alive reporting).
        advance(3000).await;
        assert_eq!(h.metrics.expiries.get(), 1);
        while rx.try_recv().is_ok() {}
        advance(5000).await;
        assert!(
            rx.try_recv().is_err(),
            "an expired watchdog stops its pulses"
        );
        beat(&h).await;
        advance(1000).await;
        assert!(rx.try_recv().is_ok(), "pulses resume once re-armed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_measures_each_pulse_round_trip() {
        let h = start(5000, None, Role::Server, Some(1000));
        let mut rx = connect(&h, 7).await;
        let reply = |conn| ChannelEvent::Signal {
            conn,
            signal: Message::PulseReply,
        };
        // A reply with no pulse outstanding (a client announcing itself) is not measured.
        h.events.send(reply(7)).await.unwrap();
        settle().await;
        assert_eq!(status(&h).await.last_pulse_rtt_us, None);
        advance(1000).await;
        assert!(rx.try_recv().is_ok(), "a pulse went out");
        advance(3).await;
        h.events.send(reply(7)).await.unwrap();
        settle().await;
        assert_eq!(status(&h).await.last_pulse_rtt_us, Some(3000));
        // Two pulses unanswered, then both replies: each is matched to its own pulse.
        advance(997).await;
        advance(1000).await;
        advance(10).await;
        h.events.send(reply(7)).await.unwrap();
        settle().await;
        assert_eq!(status(&h).await.last_pulse_rtt_us, Some(1_010_000));
        h.events.send(reply(7)).await.unwrap();
        settle().await;
        assert_eq!(status(&h).await.last_pulse_rtt_us, Some(10_000));
        // The histogram saw the three round trips: 3 ms, 1.01 s and 10 ms.
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("rtt", "t", h.metrics.pulse_rtt.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("rtt_count 3\n"), "{text}");
        assert!(text.contains("rtt_bucket{le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("rtt_bucket{le=\"0.025\"} 2\n"), "{text}");
        h.shutdown.cancel();
        h.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_answers_each_pulse_and_a_pulse_is_input() {
        let h = start(5000, None, Role::Client, None);
        let mut rx = connect(&h, 3).await;
        assert_eq!(
            &rx.try_recv().unwrap()[..],
            &frame(PULSE_REPLY.as_bytes())[..],
            "a client announces itself on connect"
        );
        advance(4000).await;
        send(
            &h,
            ChannelEvent::Signal {
                conn: 3,
                signal: Message::Pulse,
            },
        )
        .await;
        assert_eq!(
            &rx.try_recv().unwrap()[..],
            &frame(PULSE_REPLY.as_bytes())[..]
        );
        advance(4999).await;
        assert_eq!(h.metrics.expiries.get(), 0, "the pulse refreshed the timer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_disconnect_does_not_reset_the_timer() {
        let h = start(5000, None, Role::Server, None);
        let _rx = connect(&h, 4).await;
        advance(4000).await;
        send(
            &h,
            ChannelEvent::Disconnected {
                conn: 4,
                reason: crate::transport::CloseReason::PeerClosed,
            },
        )
        .await;
        advance(1000).await;
        assert_eq!(h.metrics.expiries.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_escalation_chain_runs_only_while_still_expired() {
        let mut h = start_with(1000, None, Role::Server, None, |c| {
            c.script = Script::parse("system_reset", "t").unwrap();
            c.escalation = vec![
                EscalationStep {
                    after: Duration::from_secs(30),
                    script: Script::parse("quit", "t").unwrap(),
                    exec: None,
                },
                EscalationStep {
                    after: Duration::from_secs(60),
                    script: Script::parse("x_colo_lost_heartbeat", "t").unwrap(),
                    exec: None,
                },
            ];
        });
        settle().await;
        advance(1000).await;
        assert_eq!(scripts_run(&mut h), ["system_reset"]);
        let st = status(&h).await;
        assert_eq!(st.escalation.as_ref().unwrap().next_in_ms, Some(30_000));
        advance(29_999).await;
        assert!(scripts_run(&mut h).is_empty());
        advance(1).await;
        assert_eq!(
            scripts_run(&mut h),
            ["quit"],
            "still silent 30 s later: next step"
        );
        // The guest comes back (t = 41 s) before the last step (due at t = 61 s): that step
        // never runs. Silence again expires at 42 s and starts the chain from the beginning:
        // system_reset at once, quit 30 s later (72 s), and nothing else by 102 s.
        advance(10_000).await;
        beat(&h).await;
        advance(60_000).await;
        assert_eq!(scripts_run(&mut h), ["system_reset", "quit"]);
        assert_eq!(h.metrics.expiries.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_vm_never_trips_its_watchdog() {
        let mut h = start_with(2000, None, Role::Server, None, |c| {
            c.engine.plain.conditions = vec![VM_RUNNING.into()];
        });
        settle().await;
        h.vm.send_modify(|s| s.running = Some(true));
        settle().await;
        advance(1500).await;
        h.vm.send_modify(|s| s.running = Some(false)); // QMP STOP
        settle().await;
        advance(60_000).await;
        assert!(scripts_run(&mut h).is_empty(), "no fire while paused");
        assert_eq!(status(&h).await.engine.status, GlobalStatus::Deactivated);
        h.vm.send_modify(|s| s.running = Some(true)); // QMP RESUME: a full timeout from now
        settle().await;
        advance(1999).await;
        assert!(scripts_run(&mut h).is_empty());
        advance(1).await;
        assert_eq!(
            scripts_run(&mut h),
            ["quit"],
            "silence after the resume still counts"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn disable_stops_a_firing_to_be_and_enable_rearms() {
        let mut h = start(2000, None, Role::Server, None);
        settle().await;
        advance(1900).await;
        command(&h, Command::Disable(None)).await.unwrap();
        advance(10_000).await;
        assert!(scripts_run(&mut h).is_empty());
        command(&h, Command::Enable(None)).await.unwrap();
        advance(1999).await;
        assert!(
            scripts_run(&mut h).is_empty(),
            "re-armed with a full timeout"
        );
        advance(1).await;
        assert_eq!(scripts_run(&mut h), ["quit"]);
        let err = command(&h, Command::Disable(Some("nope".into())))
            .await
            .unwrap_err();
        assert!(err.contains("nope"), "{err}");
        let err = command(
            &h,
            Command::Condition {
                name: VM_RUNNING.into(),
                value: false,
                by: Setter::Operator,
            },
        )
        .await
        .unwrap_err();
        assert!(!err.is_empty(), "the operator may not set vm-running");
    }
}
