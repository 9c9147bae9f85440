//! Wiring: turns a [`Config`] into running tasks.
//!
//! ```text
//!  socket / vsock transport ──ChannelEvent──▶ watchdog task ──Job──▶ action runner ──▶ QMP / HMP / raw
//!        ▲                                        │ (engine)                 (one per notification node)
//!        └──────────── pulses, replies ───────────┘
//! ```
//!
//! Every listener is bound in [`Daemon::start`] before anything runs, so a port in use is an
//! error at startup rather than a log line later.

pub mod watchdog;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::action::{LineReport, Runner, RunnerHandle};
use crate::config::{Chardev, Config};
use crate::metrics::Metrics;
use crate::transport::socket::{self, ChannelContext, SocketError};
use watchdog::WatchdogTask;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A socket channel could not be set up.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The configuration names something the daemon cannot serve yet.
    #[error("chardev '{0}': vhost-user-vsock channels are not available in this build")]
    VsockUnavailable(String),
}

/// Options that are not part of the watchdog configuration.
#[derive(Debug, Default)]
pub struct Options {
    /// Receives the result of every script line (tests use this to wait for actions).
    pub reports: Option<mpsc::UnboundedSender<LineReport>>,
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Daemon {
    /// Binds every listener, then starts every task. Returns once all of it is up.
    pub async fn start(cfg: Config, opts: Options) -> Result<Daemon, DaemonError> {
        for note in &cfg.notes {
            info!("{note}");
        }
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::new());

        // 1. Listeners, so that a port in use fails here, before anything starts.
        let mut listeners = BTreeMap::new();
        for w in &cfg.watchdogs {
            match &cfg.chardevs[&w.awd_node] {
                Chardev::Socket(s) if s.server => {
                    listeners.insert(w.awd_node.clone(), socket::bind(s).await?);
                }
                Chardev::Socket(_) => {}
                Chardev::Vsock(v) => return Err(DaemonError::VsockUnavailable(v.id.clone())),
            }
        }

        // 2. One action runner per notification node.
        let mut runners: BTreeMap<String, RunnerHandle> = BTreeMap::new();
        for w in &cfg.watchdogs {
            let Some(node) = &w.notification_node else {
                continue;
            };
            if runners.contains_key(node) {
                continue;
            }
            let Chardev::Socket(s) = &cfg.chardevs[node] else {
                continue;
            };
            let (mut runner, handle) = Runner::new(s.clone());
            if let Some(tx) = &opts.reports {
                runner = runner.with_reports(tx.clone());
            }
            tracker.spawn(runner.run(shutdown.clone()));
            runners.insert(node.clone(), handle);
        }

        // 3. Watchdogs and their channels.
        for w in &cfg.watchdogs {
            let (tx, rx) = mpsc::channel(1024);
            let wm = metrics.watchdog(&w.id, &w.awd_node);
            let runner = w
                .notification_node
                .as_ref()
                .and_then(|n| runners.get(n).cloned());
            let task = WatchdogTask::new(w, rx, wm.clone(), runner);
            tracker.spawn(task.run(shutdown.clone()));
            let Chardev::Socket(s) = &cfg.chardevs[&w.awd_node] else {
                continue;
            };
            let ctx = ChannelContext {
                watchdog: w.id.as_str().into(),
                channel: w.awd_node.as_str().into(),
                events: tx,
                metrics: wm,
                nodelay: s.nodelay,
            };
            match listeners.remove(&w.awd_node) {
                Some(l) => {
                    info!(watchdog = %w.id, channel = %w.awd_node, "listening on {}", s.endpoint);
                    tracker.spawn(socket::serve(l, ctx, shutdown.clone()));
                }
                None => {
                    info!(watchdog = %w.id, channel = %w.awd_node, "connecting to {}", s.endpoint);
                    tracker.spawn(socket::connect_loop(s.clone(), ctx, shutdown.clone()));
                }
            }
        }
        tracker.close();
        Ok(Daemon {
            tracker,
            shutdown,
            metrics,
        })
    }

    /// The token that stops everything when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops every task and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.wait().await;
    }

    /// Waits until the daemon has stopped (after the shutdown token is cancelled).
    pub async fn wait(&self) {
        self.shutdown.cancelled().await;
        self.tracker.wait().await;
    }
}
