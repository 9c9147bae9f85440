//! What runs on expiry: a watchdog's script, sent to its notification node.
//!
//! One [`Runner`] task serves each notification chardev, whichever watchdogs share it. It keeps
//! the connection open between jobs (connecting at startup, so the first expiry does not wait
//! for a handshake), recognises the peer by its greeting ([`monitor`]), and runs scripts one at a
//! time, line by line, in order. Every line's result is logged with the watchdog id and counted.
//!
//! Delivery is at most once per line: a line that may have reached the peer is never sent
//! again, so a lost reply cannot cause two failovers. A line that certainly did not reach the
//! peer is retried on a new connection, a bounded number of times.
//!
//! When the node is a QMP monitor, the runner also follows the VM's run state on that
//! connection (`query-status` at connect, then STOP, RESUME, SHUTDOWN and MIGRATION events) and
//! publishes it for the `vm-running` condition of the watchdogs that use the node.

pub mod monitor;
pub mod qmp;
pub mod script;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::SocketChardev;
use crate::metrics::WatchdogMetrics;
use monitor::{DeliveryError, Monitor, Outcome};
use script::Script;

/// The time allowed for one line's answer.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection attempts per line before it is given up.
const ATTEMPTS: u32 = 3;
/// The pause between connection attempts, and the first eager reconnect.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// The longest pause between eager reconnects while idle.
const MAX_IDLE_BACKOFF: Duration = Duration::from_secs(10);

/// One script run, queued by a watchdog.
#[derive(Debug, Clone)]
pub struct Job {
    /// The watchdog that expired.
    pub watchdog: Arc<str>,
    /// Its script.
    pub script: Arc<Script>,
    /// Its counters.
    pub metrics: Arc<WatchdogMetrics>,
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

/// A handle to queue jobs on a runner.
#[derive(Debug, Clone)]
pub struct RunnerHandle {
    tx: mpsc::Sender<Job>,
    chardev: Arc<str>,
    vm: watch::Receiver<Option<bool>>,
}

impl RunnerHandle {
    /// The VM's run state as the node's QMP monitor reports it (`None` while unknown, and
    /// always for HMP and raw nodes).
    pub fn vm_state(&self) -> watch::Receiver<Option<bool>> {
        self.vm.clone()
    }

    /// A handle whose jobs arrive on the returned receiver, for tests that play the runner.
    #[cfg(test)]
    pub fn for_tests() -> (RunnerHandle, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel(64);
        let (_vm_tx, vm) = watch::channel(None);
        (
            RunnerHandle {
                tx,
                chardev: "test".into(),
                vm,
            },
            rx,
        )
    }

    /// Queues a job. Never blocks: if 64 jobs are already waiting, this one is dropped with an
    /// error log (the node is unreachable and the queue holds plenty already).
    pub fn submit(&self, job: Job) {
        if let Err(e) = self.tx.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            job.metrics
                .actions_failed
                .inc_by(job.script.lines.len() as u64);
            error!(
                watchdog = &*job.watchdog,
                node = &*self.chardev,
                "script dropped: the notification node's queue is full or closed"
            );
        }
    }
}

/// Serves one notification chardev.
pub struct Runner {
    chardev: SocketChardev,
    jobs: mpsc::Receiver<Job>,
    monitor: Option<Monitor>,
    reports: Option<mpsc::UnboundedSender<LineReport>>,
    failures: u32,
    vm: Arc<watch::Sender<Option<bool>>>,
}

impl Runner {
    /// A runner for `chardev` and the handle to feed it.
    pub fn new(chardev: SocketChardev) -> (Runner, RunnerHandle) {
        let (tx, jobs) = mpsc::channel(64);
        let (vm_tx, vm) = watch::channel(None);
        let handle = RunnerHandle {
            tx,
            chardev: chardev.id.as_str().into(),
            vm,
        };
        let runner = Runner {
            chardev,
            jobs,
            monitor: None,
            reports: None,
            failures: 0,
            vm: Arc::new(vm_tx),
        };
        (runner, handle)
    }

    /// Also send every line's result to `tx`.
    pub fn with_reports(mut self, tx: mpsc::UnboundedSender<LineReport>) -> Self {
        self.reports = Some(tx);
        self
    }

    /// Runs until `shutdown`. A job under way when shutdown comes is finished or abandoned
    /// after its current line, with a log line either way.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut idle_backoff = Duration::ZERO;
        loop {
            let closed = match &self.monitor {
                Some(Monitor::Qmp(c)) => Some(c.closed().clone()),
                _ => None,
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                job = self.jobs.recv() => match job {
                    Some(job) => self.run_job(job, &shutdown).await,
                    None => break,
                },
                _ = async { closed.as_ref().expect("guarded").cancelled().await }, if closed.is_some() => {
                    debug!(node = %self.chardev.id, "QMP connection closed");
                    self.monitor = None;
                    idle_backoff = RETRY_PAUSE;
                }
                _ = tokio::time::sleep(idle_backoff), if self.monitor.is_none() => {
                    if self.connect().await {
                        idle_backoff = Duration::ZERO;
                    } else {
                        idle_backoff = (idle_backoff * 2).clamp(RETRY_PAUSE, MAX_IDLE_BACKOFF);
                    }
                }
            }
        }
        let mut abandoned = 0;
        while let Ok(job) = self.jobs.try_recv() {
            warn!(watchdog = &*job.watchdog, node = %self.chardev.id, "shutting down: script abandoned");
            abandoned += 1;
        }
        debug!(node = %self.chardev.id, abandoned, "action runner stopped");
    }

    /// Tries once to connect; logs the first failure of a streak at warn, the rest at debug.
    async fn connect(&mut self) -> bool {
        match Monitor::connect(&self.chardev.endpoint).await {
            Ok(m) => {
                info!(node = %self.chardev.id, endpoint = %self.chardev.endpoint, kind = m.kind(), "notification node connected");
                if m.qmp().is_none() {
                    debug!(node = %self.chardev.id, "not a QMP monitor: the VM's run state (vm-running) cannot be followed here");
                }
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

    async fn run_job(&mut self, job: Job, shutdown: &CancellationToken) {
        info!(watchdog = &*job.watchdog, node = %self.chardev.id, lines = job.script.lines.len(), "running script");
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
                }
                Ok(Outcome::Error(reply)) => {
                    job.metrics.actions_sent.inc();
                    warn!(watchdog = &*job.watchdog, node = %self.chardev.id, line = %line.text, reply = %reply, "action answered with an error");
                }
                Err(e) => {
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
                self.monitor = None;
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
            let m = self.monitor.as_mut().expect("connected above");
            match m.run(line, LINE_TIMEOUT).await {
                Ok(o) => return Ok(o),
                Err(e @ DeliveryError::Lost(_)) => {
                    self.monitor = None;
                    return Err(e);
                }
                Err(e @ DeliveryError::NotSent(_)) => {
                    debug!(watchdog = &*job.watchdog, node = %self.chardev.id, "retrying on a new connection: {e}");
                    self.monitor = None;
                    last = e;
                }
            }
        }
        Err(last)
    }
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

/// Follows the VM's run state on a QMP connection until it closes; publishes it on `tx`.
async fn track_vm(client: Arc<qmp::QmpClient>, tx: Arc<watch::Sender<Option<bool>>>, node: String) {
    let mut events = client.events();
    let query = async |client: &qmp::QmpClient| match client
        .execute(qapi::qmp::query_status {}, LINE_TIMEOUT)
        .await
    {
        Ok(Ok(st)) => Some(st.running),
        Ok(Err(e)) => {
            warn!(%node, "query-status failed: {}", e.desc);
            None
        }
        Err(e) => {
            debug!(%node, "query-status failed: {e}");
            None
        }
    };
    let publish = |running: Option<bool>| {
        if let Some(r) = running
            && *tx.borrow() != Some(r)
        {
            info!(%node, running = r, "VM run state");
            tx.send_replace(Some(r));
        }
    };
    publish(query(&client).await);
    loop {
        let ev = tokio::select! {
            _ = client.closed().cancelled() => break,
            ev = events.recv() => ev,
        };
        match ev {
            Ok(ev) => match vm_event(&ev.name, &ev.data) {
                Some(Some(r)) => publish(Some(r)),
                Some(None) => publish(query(&client).await),
                None => {}
            },
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                publish(query(&client).await)
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    debug!(%node, "stopped following the VM run state");
}

/// Formats an error with its sources, `a: b: c`, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
