//! Counters shared by the daemon's parts, kept in a Prometheus registry.
//!
//! Hot paths never look a label set up: each watchdog gets a [`WatchdogMetrics`] with its
//! counters fetched once, and incrementing one is a single atomic add.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::engine::GlobalStatus;
use crate::protocol::Rejection;

/// Labels of per-watchdog series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchdogLabels {
    /// The watchdog id.
    pub watchdog: String,
    /// The awd_node chardev id.
    pub channel: String,
}

/// Labels of rejected-input series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// The watchdog id.
    pub watchdog: String,
    /// The awd_node chardev id.
    pub channel: String,
    /// Why the input was dropped.
    pub reason: String,
}

/// Labels of action series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// The watchdog id.
    pub watchdog: String,
    /// `sent` (the peer accepted it) or `failed`.
    pub result: String,
}

/// Every metric family awd exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    heartbeats: Family<WatchdogLabels, Counter>,
    rejected: Family<RejectLabels, Counter>,
    expiries: Family<WatchdogLabels, Counter>,
    actions: Family<ActionLabels, Counter>,
    status: Family<WatchdogLabels, Gauge>,
    connections: Family<WatchdogLabels, Gauge>,
    pulses: Family<WatchdogLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the families and registers them.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("awd");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            heartbeats: Family::default(),
            rejected: Family::default(),
            expiries: Family::default(),
            actions: Family::default(),
            status: Family::default(),
            connections: Family::default(),
            pulses: Family::default(),
        };
        registry.register(
            "heartbeats",
            "Messages received on the heartbeat channel",
            m.heartbeats.clone(),
        );
        registry.register(
            "rejected_inputs",
            "Inputs dropped as malformed, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "expiries",
            "Transitions of the watchdog to expired",
            m.expiries.clone(),
        );
        registry.register("actions", "Script lines sent, by result", m.actions.clone());
        registry.register(
            "status",
            "Global status: 0 ok, 1 failed, 2 expired, 3 stopped, 4 deactivated",
            m.status.clone(),
        );
        registry.register(
            "connections",
            "Open connections on the heartbeat channel",
            m.connections.clone(),
        );
        registry.register(
            "pulses_sent",
            "AWD pulses and pulse replies sent",
            m.pulses.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
        m
    }

    /// The counters of one watchdog, fetched once.
    pub fn watchdog(&self, watchdog: &str, channel: &str) -> Arc<WatchdogMetrics> {
        let l = WatchdogLabels {
            watchdog: watchdog.into(),
            channel: channel.into(),
        };
        let rejected = Rejection::ALL.map(|r| {
            self.rejected
                .get_or_create(&RejectLabels {
                    watchdog: watchdog.into(),
                    channel: channel.into(),
                    reason: r.as_str().into(),
                })
                .clone()
        });
        let action = |result: &str| {
            self.actions
                .get_or_create(&ActionLabels {
                    watchdog: watchdog.into(),
                    result: result.into(),
                })
                .clone()
        };
        Arc::new(WatchdogMetrics {
            heartbeats: self.heartbeats.get_or_create(&l).clone(),
            rejected,
            expiries: self.expiries.get_or_create(&l).clone(),
            actions_sent: action("sent"),
            actions_failed: action("failed"),
            status: self.status.get_or_create(&l).clone(),
            connections: self.connections.get_or_create(&l).clone(),
            pulses: self.pulses.get_or_create(&l).clone(),
            last_heartbeat_ms: AtomicU64::new(0),
        })
    }

    /// Renders the Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// One watchdog's counters.
#[derive(Debug)]
pub struct WatchdogMetrics {
    /// Messages received.
    pub heartbeats: Counter,
    /// Rejected inputs, indexed like [`Rejection::ALL`].
    pub rejected: [Counter; 4],
    /// Expiries.
    pub expiries: Counter,
    /// Script lines the peer accepted.
    pub actions_sent: Counter,
    /// Script lines that failed.
    pub actions_failed: Counter,
    /// Global status gauge.
    pub status: Gauge,
    /// Open connections.
    pub connections: Gauge,
    /// Pulses and replies sent.
    pub pulses: Counter,
    /// Wall-clock time of the last heartbeat, ms since the Unix epoch (0: never).
    pub last_heartbeat_ms: AtomicU64,
}

impl WatchdogMetrics {
    /// Counts one rejected input.
    pub fn reject(&self, r: Rejection) {
        let i = Rejection::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.rejected[i].inc();
    }

    /// Counts `n` heartbeats received now.
    pub fn heard(&self, n: u64) {
        self.heartbeats.inc_by(n);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_heartbeat_ms.store(now, Ordering::Relaxed);
    }

    /// Records the global status.
    pub fn set_status(&self, s: GlobalStatus) {
        self.status.set(s.as_gauge());
    }

    /// The count of rejected inputs for one reason.
    pub fn rejected_count(&self, r: Rejection) -> u64 {
        let i = Rejection::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.rejected[i].get()
    }
}
