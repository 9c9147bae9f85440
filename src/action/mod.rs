//! What runs on expiry: a watchdog's script, sent to its notification node.
//!
//! One [`Runner`] task serves each notification chardev, whichever watchdogs share it. It keeps
//! the connection open between jobs (connecting at startup, so the first expiry does not wait
//! for a handshake), recognises the peer by its greeting ([`monitor`]) and remembers what it
//! was, and runs scripts one at a time, line by line, in order. Jobs wait in a per-node queue
//! ([`queue`]) that never drops one: each watchdog has its own small queue, served in turn.
//! Every line's result is logged with the watchdog id and counted.
//!
//! Delivery is at most once per line: a line that may have reached the peer is never sent
//! again, so a lost reply cannot cause two failovers. A line that certainly did not reach the
//! peer is retried on a new connection, a bounded number of times. Each line ends one of four
//! ways: answered by the monitor (`sent`), written to a raw socket that cannot answer
//! (`written`), written to a monitor that then timed out or closed (`unknown`: QEMU may or may
//! not have run it; the connection is closed, by every holder, before the next line), or not
//! sent at all (`failed`).
//!
//! When the node is a QMP monitor, the runner also follows the VM's run state on that
//! connection (`query-status` at connect, then STOP, RESUME, SHUTDOWN and MIGRATION events) and
//! publishes it, with a count of the times the VM started over ([`VmState`]), for the watchdogs
//! that use the node.
//!
//! A watchdog may also name a command to run ([`exec`]), for recovery that another system owns
//! (a cluster manager); it runs beside the script, not through a node.

pub mod exec;
pub mod limits;
pub mod monitor;
pub mod qmp;
pub mod queue;
pub mod script;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::metrics::WatchdogMetrics;
use crate::transport::SocketChardev;
use crate::util::error_chain;
use limits::{ATTEMPTS, LINE_TIMEOUT, MAX_IDLE_BACKOFF, RETRY_PAUSE};
use monitor::{DeliveryError, Kind, Monitor, Outcome};
use queue::{JobQueue, Pushed};
use script::{Script, TypedCommand};

/// One script run, queued by a watchdog.
#[derive(Debug, Clone)]
pub struct Job {
    /// The watchdog that expired.
    pub watchdog: Arc<str>,
    /// Its script.
    pub script: Arc<Script>,
    /// Its counters.
    pub metrics: Arc<WatchdogMetrics>,
    /// The QEMU process it was queued for: the node's process generation when it was
    /// submitted (set by [`RunnerHandle::submit`]). A job meant for a process that has gone
    /// is not run on its successor: that VM is booting, and its watchdog has re-entered its
    /// grace.
    pub process: u64,
}

/// The result of one line, reported to whoever wants to watch (tests, the control socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineReport {
    /// The watchdog.
    pub watchdog: Arc<str>,
    /// The line.
    pub line: String,
    /// QEMU's answer, or why there was none.
    pub result: Result<Outcome, DeliveryError>,
}

/// What awd knows of the VM behind a notification node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmState {
    /// Whether the VM runs its guest, as its QMP monitor reports it (`None` while unknown, and
    /// always for HMP and raw nodes).
    pub running: Option<bool>,
    /// How many times awd saw the VM start over: a QMP `RESET` event, a `SHUTDOWN` event for a
    /// reboot, a new QEMU process behind the monitor, or a `system_reset` line the monitor
    /// answered with success. One restart can be seen more than once (a `system_reset` is
    /// answered *and* followed by `RESET`): watch for a change, do not count boots.
    pub starts: u64,
}

/// A handle to queue jobs on a runner.
#[derive(Debug, Clone)]
pub struct RunnerHandle {
    queue: Arc<JobQueue>,
    process: Arc<AtomicU64>,
    chardev: Arc<str>,
    vm: watch::Receiver<VmState>,
    /// In unit tests of the watchdog, jobs go here instead (the test plays the runner).
    #[cfg(test)]
    tap: Option<mpsc::Sender<Job>>,
}

impl RunnerHandle {
    /// What the node tells of the VM: its run state and how often it started over.
    pub fn vm_state(&self) -> watch::Receiver<VmState> {
        self.vm.clone()
    }

    /// A handle whose jobs arrive on the returned receiver, for tests that play the runner.
    #[cfg(test)]
    pub fn for_tests() -> (RunnerHandle, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel(64);
        let (_vm_tx, vm) = watch::channel(VmState::default());
        (
            RunnerHandle {
                queue: Arc::new(JobQueue::new("test")),
                process: Arc::default(),
                chardev: "test".into(),
                vm,
                tap: Some(tx),
            },
            rx,
        )
    }

    /// Queues a job behind the watchdog's earlier ones. Never blocks and never drops a job
    /// while the runner runs (see [`queue`]); only a runner that has stopped (shutdown, or a
    /// reload that removed the node) refuses it, with an error log.
    pub fn submit(&self, mut job: Job) {
        job.process = self.process.load(Ordering::SeqCst);
        #[cfg(test)]
        if let Some(tap) = &self.tap {
            let _ = tap.try_send(job);
            return;
        }
        match self.queue.push(job) {
            Pushed::Queued { backlog } => {
                debug!(node = &*self.chardev, backlog, "script queued")
            }
            Pushed::Coalesced => {}
            Pushed::Closed(job) => {
                job.metrics
                    .actions_failed
                    .inc_by(job.script.lines.len() as u64);
                error!(
                    watchdog = &*job.watchdog,
                    node = &*self.chardev,
                    "script not run: the notification node's runner has stopped"
                );
            }
        }
    }
}

/// How the previous connection to the node ended, to tell a new QEMU behind a TCP node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LastEnd {
    /// No connection yet.
    Never,
    /// Still open, or closed by awd.
    Ours,
    /// The peer ended it (EOF, reset, write failure).
    Peer,
}

/// Serves one notification chardev.
pub struct Runner {
    chardev: SocketChardev,
    queue: Arc<JobQueue>,
    /// The generation of the QEMU process behind the node, bumped each time a new process
    /// replaces the one seen before (not for a reset of the same one).
    process: Arc<AtomicU64>,
    monitor: Option<Monitor>,
    reports: Option<mpsc::UnboundedSender<LineReport>>,
    failures: u32,
    vm: Arc<watch::Sender<VmState>>,
    /// What the node turned out to be, once seen.
    kind: Option<Kind>,
    /// The pid behind the Unix socket on the last connection.
    last_pid: Option<u32>,
    last_end: LastEnd,
}

impl Runner {
    /// A runner for `chardev` and the handle to feed it.
    pub fn new(chardev: SocketChardev) -> (Runner, RunnerHandle) {
        let queue = Arc::new(JobQueue::new(&chardev.id));
        let process = Arc::new(AtomicU64::new(0));
        let (vm_tx, vm) = watch::channel(VmState::default());
        let handle = RunnerHandle {
            queue: queue.clone(),
            process: process.clone(),
            chardev: chardev.id.as_str().into(),
            vm,
            #[cfg(test)]
            tap: None,
        };
        let runner = Runner {
            chardev,
            queue,
            process,
            monitor: None,
            reports: None,
            failures: 0,
            vm: Arc::new(vm_tx),
            kind: None,
            last_pid: None,
            last_end: LastEnd::Never,
        };
        (runner, handle)
    }

    /// Also send every line's result to `tx`.
    pub fn with_reports(mut self, tx: mpsc::UnboundedSender<LineReport>) -> Self {
        self.reports = Some(tx);
        self
    }

    /// Export the number of jobs waiting on `gauge` (`awd_action_backlog{node}`).
    pub fn with_backlog_gauge(self, gauge: Gauge) -> Self {
        self.queue.set_gauge(gauge);
        self
    }

    /// Runs until `shutdown`. A job under way when shutdown comes is finished or abandoned
    /// after its current line, with a log line either way.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut idle_backoff = Duration::ZERO;
        let queue = self.queue.clone();
        loop {
            let connected = self.monitor.is_some();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                job = queue.pop() => self.run_job(job, &shutdown).await,
                _ = async { self.monitor.as_mut().expect("guarded").ended().await }, if connected => {
                    debug!(node = %self.chardev.id, "notification node closed the connection");
                    self.monitor = None;
                    self.last_end = LastEnd::Peer;
                    idle_backoff = RETRY_PAUSE;
                }
                _ = tokio::time::sleep(idle_backoff), if !connected => {
                    if self.connect().await {
                        idle_backoff = Duration::ZERO;
                    } else {
                        idle_backoff = (idle_backoff * 2).clamp(RETRY_PAUSE, MAX_IDLE_BACKOFF);
                    }
                }
            }
        }
        let abandoned = self.queue.close();
        for job in &abandoned {
            warn!(watchdog = &*job.watchdog, node = %self.chardev.id, "shutting down: script abandoned");
        }
        if let Some(m) = self.monitor.take() {
            m.close().await;
        }
        debug!(node = %self.chardev.id, abandoned = abandoned.len(), "action runner stopped");
    }

    /// Counts a start-over of the VM and says why.
    fn started_over(&self, why: &str) {
        started_over(&self.vm, &self.chardev.id, why);
    }

    /// Closes the connection (every holder of it) and forgets it.
    async fn drop_monitor(&mut self, end: LastEnd) {
        if let Some(m) = self.monitor.take() {
            m.close().await;
        }
        self.last_end = end;
    }

    /// Tries once to connect; logs the first failure of a streak at warn, the rest at debug.
    async fn connect(&mut self) -> bool {
        match Monitor::connect_as(&self.chardev.endpoint, self.kind, self.chardev.peer).await {
            Ok(m) => {
                let kind = m.kind();
                info!(node = %self.chardev.id, endpoint = %self.chardev.endpoint, %kind, pid = m.peer_pid(), "notification node connected");
                if self.kind != Some(kind) {
                    if let Some(old) = self.kind {
                        warn!(node = %self.chardev.id, was = %old, now = %kind, "the notification node changed kind");
                    }
                    if kind != Kind::Qmp {
                        warn!(node = %self.chardev.id, %kind, "not a QMP monitor: the VM's run state (vm-running) cannot be followed through this node");
                    }
                    self.kind = Some(kind);
                }
                if kind != Kind::Raw {
                    self.note_new_process(&m);
                }
                self.last_end = LastEnd::Ours;
                if let Some(c) = m.qmp() {
                    tokio::spawn(track_vm(
                        c.clone(),
                        self.vm.clone(),
                        self.chardev.id.clone(),
                    ));
                }
                self.monitor = Some(m);
                self.failures = 0;
                true
            }
            Err(e) => {
                self.failures += 1;
                let msg = error_chain(&e);
                if self.failures == 1 {
                    warn!(node = %self.chardev.id, "notification node unavailable: {msg}");
                } else {
                    debug!(node = %self.chardev.id, attempt = self.failures, "notification node unavailable: {msg}");
                }
                false
            }
        }
    }

    /// A new QEMU process behind the monitor is a VM that started over: over a Unix socket,
    /// a peer pid not seen on the previous connection (the first one included); over TCP, the
    /// first connection, or one after the peer ended the previous one.
    fn note_new_process(&mut self, m: &Monitor) {
        match (m.peer_pid(), &self.chardev.endpoint) {
            (Some(pid), _) => {
                if self.last_pid != Some(pid) {
                    // The first pid too when the node was unreachable before: a job queued
                    // meanwhile was decided without a QEMU to ask (no run state), and the one
                    // that now appears may be a VM that has only just started, or one
                    // arriving by migration. Its watchdogs re-enter their grace below, and an
                    // expiry decided before a VM started over is not run on it. (A first
                    // connection with no failed attempt before is awd starting up: a job
                    // queued in that instant runs.)
                    if self.last_pid.is_some() || self.failures > 0 {
                        self.new_process();
                    }
                    self.started_over(&format!("new QEMU process behind the monitor (pid {pid})"));
                }
                self.last_pid = Some(pid);
            }
            (None, _) => match self.last_end {
                LastEnd::Never => self.started_over("first connection to the monitor"),
                // Over TCP a closed connection may be the same QEMU (a proxy, a transient
                // loss): the start-over re-graces, but queued jobs still run. Only a pid seen
                // to change proves a new process.
                LastEnd::Peer => self.started_over("new connection after the monitor closed"),
                LastEnd::Ours => {}
            },
        }
    }

    /// A QEMU process is behind the node that was not before (it replaced another, or it is
    /// the first seen after the node was unreachable): jobs queued before are not run on it.
    fn new_process(&self) {
        self.process.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether `job` was queued for a QEMU process that is no longer behind the node.
    fn meant_for_a_gone_process(&self, job: &Job) -> bool {
        job.process < self.process.load(Ordering::SeqCst)
    }

    async fn run_job(&mut self, job: Job, shutdown: &CancellationToken) {
        info!(watchdog = &*job.watchdog, node = %self.chardev.id, lines = job.script.lines.len(), backlog = self.queue.len(), "running script");
        for (i, line) in job.script.lines.iter().enumerate() {
            if shutdown.is_cancelled() {
                warn!(watchdog = &*job.watchdog, node = %self.chardev.id, remaining = job.script.lines.len() - i,
                    "shutting down: rest of the script abandoned");
                return;
            }
            let result = self.run_line(&job, line).await;
            match &result {
                Ok(Outcome::Ok(reply)) => {
                    job.metrics.actions_sent.inc();
                    info!(watchdog = &*job.watchdog, node = %self.chardev.id, line = %line.text, reply = %reply, "action done");
                    if line.typed == Some(TypedCommand::SystemReset) {
                        self.started_over("system_reset answered with success");
                    }
                }
                Ok(Outcome::Error(reply)) => {
                    job.metrics.actions_sent.inc();
                    warn!(watchdog = &*job.watchdog, node = %self.chardev.id, line = %line.text, reply = %reply, "action answered with an error");
                }
                Ok(Outcome::Written) => {
                    job.metrics.actions_written.inc();
                    info!(watchdog = &*job.watchdog, node = %self.chardev.id, line = %line.text,
                        "action written (raw node: no answer possible)");
                }
                Err(e @ DeliveryError::Unknown(_)) => {
                    job.metrics.actions_unknown.inc();
                    error!(watchdog = &*job.watchdog, node = %self.chardev.id, line = %line.text,
                        "action fate unknown: {e}");
                }
                Err(e @ DeliveryError::NotSent(_)) => {
                    job.metrics.actions_failed.inc();
                    error!(watchdog = &*job.watchdog, node = %self.chardev.id, line = %line.text, "action failed: {e}");
                }
            }
            if let Some(tx) = &self.reports {
                let _ = tx.send(LineReport {
                    watchdog: job.watchdog.clone(),
                    line: line.text.clone(),
                    result,
                });
            }
        }
    }

    async fn run_line(
        &mut self,
        job: &Job,
        line: &script::ScriptLine,
    ) -> Result<Outcome, DeliveryError> {
        let mut last = DeliveryError::NotSent("no attempt".into());
        for attempt in 0..ATTEMPTS {
            if let Some(m) = &mut self.monitor
                && m.is_closed().await
            {
                self.drop_monitor(LastEnd::Peer).await;
            }
            if self.monitor.is_none() {
                if attempt > 0 {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                if !self.connect().await {
                    last = DeliveryError::NotSent(format!("{} unreachable", self.chardev.endpoint));
                    continue;
                }
            }
            if self.meant_for_a_gone_process(job) {
                return Err(DeliveryError::NotSent(
                    "abandoned: queued for a QEMU process that has gone; a new one is starting, \
                     and the watchdog re-entered its grace"
                        .into(),
                ));
            }
            let m = self.monitor.as_mut().expect("connected above");
            match m.run(line, LINE_TIMEOUT).await {
                Ok(o) => return Ok(o),
                Err(e @ DeliveryError::Unknown(_)) => {
                    // The monitor may still be busy with this line. QEMU greets no new client
                    // while any holder keeps this connection open, so close it for all.
                    self.drop_monitor(LastEnd::Ours).await;
                    return Err(e);
                }
                Err(e @ DeliveryError::NotSent(_)) => {
                    debug!(watchdog = &*job.watchdog, node = %self.chardev.id, "retrying on a new connection: {e}");
                    self.drop_monitor(LastEnd::Peer).await;
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// Counts a start-over of the VM on `tx` and logs why.
fn started_over(tx: &watch::Sender<VmState>, node: &str, why: &str) {
    let mut starts = 0;
    tx.send_modify(|s| {
        s.starts += 1;
        starts = s.starts;
    });
    info!(%node, starts, reason = why, "VM started over");
}

/// What a QMP event says about the VM's run state: `Some(false)` while it cannot run the
/// guest (stopped, shut down, migrating), `Some(true)` when it resumes, `None` when the state
/// must be asked for again (a migration ended), and nothing for other events.
fn vm_event(name: &str, data: &serde_json::Value) -> Option<Option<bool>> {
    match name {
        "STOP" | "SHUTDOWN" => Some(Some(false)),
        "RESUME" => Some(Some(true)),
        "MIGRATION" => match data.get("status").and_then(|s| s.as_str()) {
            Some("completed" | "failed" | "cancelled") => Some(None),
            Some("none") | None => None,
            // setup, active, pre-switchover, device, postcopy-*, wait-unplug, colo…
            Some(_) => Some(Some(false)),
        },
        _ => None,
    }
}

/// Whether a QMP event means the VM starts over.
///
/// What QEMU 7.2 sends, measured here (a guest `reboot -f`, and QMP `system_reset`):
/// - normally (reboot action `reset`): `RESET` with `{"guest": true, "reason": "guest-reset"}`
///   for a guest reboot (often twice: the firmware resets again), and `RESET` with
///   `{"guest": false, "reason": "host-qmp-system-reset"}` for `system_reset` — sent *before*
///   the command's `{"return": {}}` — then `RESET` `guest-reset` as the firmware restarts;
/// - with `-no-reboot` (reboot action `shutdown`): `SHUTDOWN` with the same reasons,
///   `guest-reset` or `host-qmp-system-reset`, and QEMU exits (whoever restarts it starts a
///   new process, seen as such).
///
/// Any `RESET` counts (`subsystem-reset` too: a reset is a reset); `SHUTDOWN` only for those
/// reboot reasons, not for a power-off (`guest-shutdown`, `host-qmp-quit`, …).
fn starts_over(name: &str, data: &serde_json::Value) -> bool {
    match name {
        "RESET" => true,
        "SHUTDOWN" => matches!(
            data.get("reason").and_then(|r| r.as_str()),
            Some("guest-reset" | "host-qmp-system-reset" | "subsystem-reset")
        ),
        _ => false,
    }
}

/// Follows the VM's run state on a QMP connection until it closes; publishes it on `tx`.
/// Ends (dropping its client) as soon as the connection closes, whoever closed it.
async fn track_vm(client: Arc<qmp::QmpClient>, tx: Arc<watch::Sender<VmState>>, node: String) {
    let mut events = client.events();
    let query = async |client: &qmp::QmpClient| {
        let asked = client.execute(qapi::qmp::query_status {}, LINE_TIMEOUT);
        let answer = tokio::select! {
            _ = client.closed().cancelled() => return None,
            a = asked => a,
        };
        match answer {
            Ok(Ok(st)) => Some(st.running),
            Ok(Err(e)) => {
                warn!(%node, "query-status failed: {}", e.desc);
                None
            }
            Err(e) => {
                debug!(%node, "query-status failed: {e}");
                None
            }
        }
    };
    let publish = |running: Option<bool>| {
        if let Some(r) = running {
            let changed = tx.send_if_modified(|s| {
                let changed = s.running != Some(r);
                s.running = Some(r);
                changed
            });
            if changed {
                info!(%node, running = r, "VM run state");
            }
        }
    };
    publish(query(&client).await);
    loop {
        let ev = tokio::select! {
            _ = client.closed().cancelled() => break,
            ev = events.recv() => ev,
        };
        match ev {
            Ok(ev) => {
                if starts_over(&ev.name, &ev.data) {
                    started_over(&tx, &node, &format!("QMP event {} {}", ev.name, ev.data));
                }
                match vm_event(&ev.name, &ev.data) {
                    Some(Some(r)) => publish(Some(r)),
                    Some(None) => publish(query(&client).await),
                    None => {}
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                publish(query(&client).await)
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    drop(client);
    debug!(%node, "stopped following the VM run state");
}

#[cfg(test)]
impl Job {
    /// A job of `watchdog` running the script `text`, with counters of its own (unit tests).
    pub(crate) fn for_test(watchdog: &str, text: &str) -> Job {
        Job {
            process: 0,
            watchdog: watchdog.into(),
            script: Arc::new(Script::parse(text, "t").unwrap()),
            metrics: crate::metrics::Metrics::new().watchdog(watchdog, "hb"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Endpoint;
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A runner on a fake node at `path`, its handle, and its line reports.
    fn runner_at(
        path: &std::path::Path,
    ) -> (
        RunnerHandle,
        mpsc::UnboundedReceiver<LineReport>,
        CancellationToken,
    ) {
        let (runner, handle) = Runner::new(SocketChardev {
            id: "mon".into(),
            endpoint: Endpoint::Unix(path.to_owned()),
            server: false,
            reconnect: Duration::from_secs(1),
            nodelay: false,
            max_connections: crate::transport::limits::DEFAULT_MAX_CONNECTIONS as usize,
            peers: Vec::new(),
            tcp_user_timeout: None,
            rate_limit: None,
            peer: Default::default(),
            psk: None,
        });
        let (tx, reports) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        tokio::spawn(runner.with_reports(tx).run(stop.clone()));
        (handle, reports, stop)
    }

    fn job(wd: &str, text: &str) -> Job {
        Job::for_test(wd, text)
    }

    async fn report(rx: &mut mpsc::UnboundedReceiver<LineReport>) -> LineReport {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a line report in time")
            .expect("runner alive")
    }

    #[tokio::test]
    async fn an_answered_system_reset_on_hmp_counts_a_start_and_a_raw_write_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let hmp = dir.path().join("hmp");
        let l = tokio::net::UnixListener::bind(&hmp).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = tokio::io::split(s);
            let mut r = BufReader::new(r);
            w.write_all(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
                .await
                .unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap() > 0 {
                // QEMU echoes the command, then prompts again.
                w.write_all(format!("{}\r\n(qemu) ", line.trim()).as_bytes())
                    .await
                    .unwrap();
                line.clear();
            }
        });
        let (handle, mut reports, stop) = runner_at(&hmp);
        let mut vm = handle.vm_state();
        handle.submit(job("w", "system_reset"));
        let r = report(&mut reports).await;
        assert_eq!(r.result, Ok(Outcome::Ok(String::new())), "{r:?}");
        // The connection (a new pid: this process) counted once, the answered reset once.
        assert_eq!(vm.borrow_and_update().starts, 2);
        assert_eq!(vm.borrow().running, None, "HMP cannot tell the run state");
        stop.cancel();

        let raw = dir.path().join("raw");
        let l = tokio::net::UnixListener::bind(&raw).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap_or(0) > 0 {}
        });
        let (handle, mut reports, stop) = runner_at(&raw);
        handle.submit(job("w", "system_reset"));
        let r = report(&mut reports).await;
        assert_eq!(r.result, Ok(Outcome::Written));
        assert_eq!(
            handle.vm_state().borrow().starts,
            0,
            "a raw node is no QEMU, and a written reset is no answer"
        );
        stop.cancel();
    }

    /// A fake QEMU in its own process (python3, so its pid differs from ours) serving the HMP
    /// greeting on `path` and echoing every line it gets to its stdout; with `mode` "die" it
    /// exits right after the greeting. Returns the child and its stdout lines ("listening"
    /// first).
    fn fake_hmp_qemu(
        path: &std::path::Path,
        mode: &str,
    ) -> (
        tokio::process::Child,
        tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    ) {
        const HMP: &str = r#"
import socket, sys
path, mode = sys.argv[1], sys.argv[2]
l = socket.socket(socket.AF_UNIX)
l.bind(path); l.listen(1)
print("listening", flush=True)
c, _ = l.accept()
c.sendall(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
if mode == "die":
    sys.exit(0)
for line in c.makefile("rb"):
    sys.stdout.write(line.decode().strip() + "\n"); sys.stdout.flush()
    c.sendall(line.strip() + b"\r\n(qemu) ")
"#;
        let _ = std::fs::remove_file(path);
        let mut child = tokio::process::Command::new("python3")
            .args(["-c", HMP])
            .arg(path)
            .arg(mode)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let out = BufReader::new(child.stdout.take().expect("piped")).lines();
        (child, out)
    }

    /// The fake QEMU's next stdout line (bounded).
    async fn next_line(
        out: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    ) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(10), out.next_line())
            .await
            .expect("the fake QEMU said something")
            .unwrap()
    }

    /// A job queued while one QEMU was behind the node is not run on the QEMU that replaced
    /// it (a new peer pid on the Unix socket); a job queued after the replacement is. The two
    /// "QEMUs" are separate processes (python3) serving the HMP greeting, so their pids differ.
    #[tokio::test]
    async fn a_job_meant_for_a_qemu_that_has_gone_is_not_run_on_its_successor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hmp");
        let (mut first, mut out) = fake_hmp_qemu(&path, "die");
        assert_eq!(next_line(&mut out).await.as_deref(), Some("listening"));
        let (handle, mut reports, stop) = runner_at(&path);
        let mut vm = handle.vm_state();
        tokio::time::timeout(Duration::from_secs(10), vm.wait_for(|s| s.starts == 1))
            .await
            .expect("connected to the first QEMU")
            .unwrap();
        // The first QEMU dies and a new one comes up on the same path before the runner has
        // noticed; a job queued now was meant for the first.
        tokio::time::timeout(Duration::from_secs(10), first.wait())
            .await
            .unwrap()
            .unwrap();
        let (_second, mut out) = fake_hmp_qemu(&path, "serve");
        assert_eq!(next_line(&mut out).await.as_deref(), Some("listening"));
        handle.submit(job("w", "system_reset"));
        let r = report(&mut reports).await;
        assert!(
            matches!(&r.result, Err(DeliveryError::NotSent(why)) if why.contains("abandoned")),
            "{r:?}"
        );
        handle.submit(job("w", "info status"));
        let r = report(&mut reports).await;
        assert!(matches!(r.result, Ok(Outcome::Ok(_))), "{r:?}");
        assert_eq!(
            next_line(&mut out).await.as_deref(),
            Some("info status"),
            "the reset never reached the new QEMU; the later line did"
        );
        stop.cancel();
    }

    /// Found by the soak: a destination host's watchdog expired while its QEMU waited for a
    /// migration and awd could not reach the monitor yet; the job then ran on that QEMU as
    /// soon as it could be reached, resetting the incoming VM. A job queued while no QEMU was
    /// reachable is not run on the QEMU that then appears (its watchdogs re-enter their grace).
    #[tokio::test]
    async fn a_job_queued_while_no_qemu_was_reachable_is_not_run_on_the_one_that_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hmp");
        let (handle, mut reports, stop) = runner_at(&path);
        // Nothing listens yet: the job is queued and its first attempt fails.
        handle.submit(job("w", "system_reset"));
        let (_qemu, mut out) = fake_hmp_qemu(&path, "serve");
        assert_eq!(next_line(&mut out).await.as_deref(), Some("listening"));
        let r = report(&mut reports).await;
        assert!(
            matches!(&r.result, Err(DeliveryError::NotSent(why)) if why.contains("abandoned")),
            "{r:?}"
        );
        handle.submit(job("w", "info status"));
        let r = report(&mut reports).await;
        assert!(matches!(r.result, Ok(Outcome::Ok(_))), "{r:?}");
        assert_eq!(
            next_line(&mut out).await.as_deref(),
            Some("info status"),
            "the reset never reached the QEMU that appeared; the later line did"
        );
        stop.cancel();
    }

    #[test]
    fn qmp_events_map_to_the_vm_run_state() {
        assert_eq!(vm_event("STOP", &json!({})), Some(Some(false)));
        assert_eq!(vm_event("RESUME", &json!({})), Some(Some(true)));
        assert_eq!(
            vm_event(
                "SHUTDOWN",
                &json!({"guest": false, "reason": "host-qmp-quit"})
            ),
            Some(Some(false))
        );
        assert_eq!(
            vm_event("MIGRATION", &json!({"status": "active"})),
            Some(Some(false))
        );
        assert_eq!(
            vm_event("MIGRATION", &json!({"status": "completed"})),
            Some(None)
        );
        assert_eq!(vm_event("MIGRATION_PASS", &json!({"pass": 2})), None);
        assert_eq!(vm_event("RTC_CHANGE", &json!({})), None);
    }

    #[test]
    fn resets_and_reboot_shutdowns_count_as_the_vm_starting_over() {
        // As QEMU 7.2 sends them (see `starts_over`).
        let guest_reboot = json!({"guest": true, "reason": "guest-reset"});
        let qmp_reset = json!({"guest": false, "reason": "host-qmp-system-reset"});
        assert!(starts_over("RESET", &guest_reboot));
        assert!(starts_over("RESET", &qmp_reset));
        assert!(starts_over("SHUTDOWN", &guest_reboot), "-no-reboot");
        assert!(starts_over("SHUTDOWN", &qmp_reset), "-no-reboot");
        for reason in [
            "guest-shutdown",
            "host-qmp-quit",
            "host-signal",
            "guest-panic",
        ] {
            assert!(
                !starts_over("SHUTDOWN", &json!({"guest": false, "reason": reason})),
                "{reason} is not a reboot"
            );
        }
        assert!(!starts_over("STOP", &json!({})));
        assert!(
            !starts_over("POWERDOWN", &json!({})),
            "system_powerdown is not a start"
        );
    }
}
