//! Counters shared by the daemon's parts, kept in a Prometheus registry and served over HTTP
//! (`--metrics ADDR`, OpenMetrics text at `/metrics`).
//!
//! Hot paths never look a label set up: each watchdog gets a [`WatchdogMetrics`] with its
//! counters fetched once, and incrementing one is a single atomic add. Values that depend on
//! the time of the scrape (seconds since the last heartbeat) are computed by a collector when
//! scraped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::{GlobalStatus, RefusalReason};
use crate::protocol::Rejection;

/// Labels of per-watchdog series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchdogLabels {
    /// The watchdog id.
    pub watchdog: String,
    /// The awd_node chardev id.
    pub channel: String,
}

/// Labels of rejected- and refused-input series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// The watchdog id.
    pub watchdog: String,
    /// The awd_node chardev id.
    pub channel: String,
    /// Why the input was dropped (a [`Rejection`]) or refused (a [`RefusalReason`]).
    pub reason: String,
}

/// Labels of refused- and evicted-connection series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// The watchdog id.
    pub watchdog: String,
    /// The awd_node chardev id.
    pub channel: String,
    /// Why awd closed the connection.
    pub reason: String,
}

/// Why a server channel refused a connection (the `reason` label): a TCP peer outside
/// `peers=`, or a Unix peer whose credentials are not `peer-uid=`/`peer-gid=`.
pub const REFUSE_REASONS: [&str; 2] = ["not_allowed", "peer_cred"];
/// Why a server channel evicted a connection to admit a new one (the `reason` label):
/// it had never sent anything, it had been silent longer than the watchdog's timeout, or it
/// was only the one silent for longest.
pub const EVICT_REASONS: [&str; 3] = ["never_spoke", "stale", "silent"];

/// Labels of action series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// The watchdog id.
    pub watchdog: String,
    /// `sent` (the monitor answered), `written` (raw socket: written, no answer possible),
    /// `unknown` (written to a monitor, then no answer: timeout or EOF) or `failed` (not sent).
    pub result: String,
}

/// The results an action line is counted under (`awd_actions_total{result=…}`).
pub const ACTION_RESULTS: [&str; 4] = ["sent", "written", "unknown", "failed"];

/// The results an exec run is counted under (`awd_exec_total{result=…}`): exit 0, another
/// exit, killed at its timeout, could not start. `action::exec::ExecResult` is in this order.
pub const EXEC_RESULTS: [&str; 4] = ["success", "failed", "timeout", "error"];

/// Labels of per-notification-node series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// The notification_node chardev id.
    pub node: String,
}

/// Every metric family awd exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    heartbeats: Family<WatchdogLabels, Counter>,
    rejected: Family<RejectLabels, Counter>,
    expiries: Family<WatchdogLabels, Counter>,
    actions: Family<ActionLabels, Counter>,
    exec: Family<ActionLabels, Counter>,
    action_backlog: Family<NodeLabels, Gauge>,
    status: Family<WatchdogLabels, Gauge>,
    connections: Family<WatchdogLabels, Gauge>,
    pulses: Family<WatchdogLabels, Counter>,
    pulse_rtt: Family<WatchdogLabels, Histogram>,
    input_bytes: Family<WatchdogLabels, Counter>,
    refused_inputs: Family<RejectLabels, Counter>,
    rate_limited: Family<WatchdogLabels, Counter>,
    refused: Family<ConnectionLabels, Counter>,
    evicted: Family<ConnectionLabels, Counter>,
    auth_rejected: Family<ConnectionLabels, Counter>,
    live: Arc<LiveWatchdogs>,
}

/// The watchdogs whose scrape-time values a collector computes.
#[derive(Debug, Default)]
struct LiveWatchdogs {
    by_label: Mutex<BTreeMap<(String, String), Weak<WatchdogMetrics>>>,
}

impl Collector for LiveWatchdogs {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = unix_ms();
        let map = self.by_label.lock().unwrap_or_else(|e| e.into_inner());
        let gauge = Family::<WatchdogLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for ((watchdog, channel), wm) in map.iter() {
            let Some(wm) = wm.upgrade() else { continue };
            // Never heard: measured from the watchdog's start.
            let last = match wm.last_heartbeat_ms.load(Ordering::Relaxed) {
                0 => wm.started_ms,
                t => t,
            };
            let since = Duration::from_millis(now.saturating_sub(last)).as_secs_f64();
            gauge
                .get_or_create(&WatchdogLabels {
                    watchdog: watchdog.clone(),
                    channel: channel.clone(),
                })
                .set(since);
        }
        let metric = encoder.encode_descriptor(
            "seconds_since_last_heartbeat",
            "Seconds since the last input on the heartbeat channel (since start if none)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// Upper bounds of the `awd_pulse_rtt_seconds` buckets: 50 µs to 1 s.
pub const PULSE_RTT_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

fn pulse_rtt_histogram() -> Histogram {
    Histogram::new(PULSE_RTT_BUCKETS)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
            exec: Family::default(),
            action_backlog: Family::default(),
            status: Family::default(),
            connections: Family::default(),
            pulses: Family::default(),
            pulse_rtt: Family::new_with_constructor(pulse_rtt_histogram),
            input_bytes: Family::default(),
            refused_inputs: Family::default(),
            rate_limited: Family::default(),
            refused: Family::default(),
            evicted: Family::default(),
            auth_rejected: Family::default(),
            live: Arc::default(),
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
        registry.register(
            "actions",
            "Script lines, by result: sent (answered), written (raw node), unknown (no answer), failed (not sent)",
            m.actions.clone(),
        );
        registry.register(
            "exec",
            "Runs of a watchdog's exec command, by result: success (exit 0), failed (other exit), timeout (killed), error (could not start)",
            m.exec.clone(),
        );
        registry.register(
            "action_backlog",
            "Script runs waiting for their notification node",
            m.action_backlog.clone(),
        );
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
        registry.register(
            "pulse_rtt_seconds",
            "Round trip from an AWD pulse sent to its reply received, per watchdog (server role)",
            m.pulse_rtt.clone(),
        );
        registry.register(
            "input_bytes",
            "Bytes read from the heartbeat channel (rate() of it is the channel's input rate)",
            m.input_bytes.clone(),
        );
        registry.register(
            "refused_inputs",
            "Well-formed inputs the supervision refused, by reason (a timeout out of bounds, a condition not declared or not the peer's to set, a trigger while the plain timeout is deactivated)",
            m.refused_inputs.clone(),
        );
        registry.register(
            "rate_limited_inputs",
            "Reads over the channel's rate_limit: proof of life, but not parsed",
            m.rate_limited.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections a server channel closed at once, by reason (not_allowed: outside peers=; peer_cred: a Unix peer other than peer-uid=/peer-gid=)",
            m.refused.clone(),
        );
        registry.register(
            "connections_evicted",
            "Connections a full server channel closed to admit a new one, by reason",
            m.evicted.clone(),
        );
        registry.register(
            "auth_rejected",
            "Connections of a psk= channel closed for what they sent, by reason (bad_magic, bad_proof, bad_tag, out_of_order, too_long, truncated, handshake_timeout)",
            m.auth_rejected.clone(),
        );
        registry.register_collector(Box::new(m.live.clone()));
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
        m
    }

    /// The counters of one watchdog, fetched once.
    pub fn watchdog(&self, watchdog: &str, channel: &str) -> Arc<WatchdogMetrics> {
        let l = WatchdogLabels {
            watchdog: watchdog.into(),
            channel: channel.into(),
        };
        let by_reason = |family: &Family<RejectLabels, Counter>, reason: &str| {
            family
                .get_or_create(&RejectLabels {
                    watchdog: watchdog.into(),
                    channel: channel.into(),
                    reason: reason.into(),
                })
                .clone()
        };
        let rejected = Rejection::ALL.map(|r| by_reason(&self.rejected, r.as_str()));
        let action = |result: &str| {
            self.actions
                .get_or_create(&ActionLabels {
                    watchdog: watchdog.into(),
                    result: result.into(),
                })
                .clone()
        };
        let exec = EXEC_RESULTS.map(|r| {
            self.exec
                .get_or_create(&ActionLabels {
                    watchdog: watchdog.into(),
                    result: r.into(),
                })
                .clone()
        });
        let conn = |family: &Family<ConnectionLabels, Counter>, reason: &str| {
            family
                .get_or_create(&ConnectionLabels {
                    watchdog: watchdog.into(),
                    channel: channel.into(),
                    reason: reason.into(),
                })
                .clone()
        };
        let wm = Arc::new(WatchdogMetrics {
            refused: REFUSE_REASONS.map(|r| conn(&self.refused, r)),
            evicted: EVICT_REASONS.map(|r| conn(&self.evicted, r)),
            auth_rejected: crate::auth::AuthError::REASONS.map(|r| conn(&self.auth_rejected, r)),
            heartbeats: self.heartbeats.get_or_create(&l).clone(),
            rejected,
            expiries: self.expiries.get_or_create(&l).clone(),
            actions_sent: action("sent"),
            actions_written: action("written"),
            actions_unknown: action("unknown"),
            actions_failed: action("failed"),
            exec,
            status: self.status.get_or_create(&l).clone(),
            connections: self.connections.get_or_create(&l).clone(),
            pulses: self.pulses.get_or_create(&l).clone(),
            pulse_rtt: self.pulse_rtt.get_or_create(&l).clone(),
            input_bytes: self.input_bytes.get_or_create(&l).clone(),
            refused_inputs: RefusalReason::ALL.map(|r| by_reason(&self.refused_inputs, r.as_str())),
            rate_limited: self.rate_limited.get_or_create(&l).clone(),
            last_heartbeat_ms: AtomicU64::new(0),
            started_ms: unix_ms(),
        });
        self.live
            .by_label
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((watchdog.into(), channel.into()), Arc::downgrade(&wm));
        wm
    }

    /// Drops every series of a watchdog that no longer exists (after a reload).
    pub fn remove_watchdog(&self, watchdog: &str, channel: &str) {
        let l = WatchdogLabels {
            watchdog: watchdog.into(),
            channel: channel.into(),
        };
        for f in [
            &self.heartbeats,
            &self.expiries,
            &self.pulses,
            &self.input_bytes,
            &self.rate_limited,
        ] {
            f.remove(&l);
        }
        for f in [&self.status, &self.connections] {
            f.remove(&l);
        }
        self.pulse_rtt.remove(&l);
        let reasons = Rejection::ALL.map(|r| (&self.rejected, r.as_str()));
        let refusals = RefusalReason::ALL.map(|r| (&self.refused_inputs, r.as_str()));
        for (family, reason) in reasons.into_iter().chain(refusals) {
            family.remove(&RejectLabels {
                watchdog: watchdog.into(),
                channel: channel.into(),
                reason: reason.into(),
            });
        }
        for (family, reasons) in [
            (&self.refused, &REFUSE_REASONS[..]),
            (&self.evicted, &EVICT_REASONS[..]),
            (&self.auth_rejected, &crate::auth::AuthError::REASONS[..]),
        ] {
            for r in reasons {
                family.remove(&ConnectionLabels {
                    watchdog: watchdog.into(),
                    channel: channel.into(),
                    reason: (*r).into(),
                });
            }
        }
        for result in ACTION_RESULTS {
            self.actions.remove(&ActionLabels {
                watchdog: watchdog.into(),
                result: result.into(),
            });
        }
        for result in EXEC_RESULTS {
            self.exec.remove(&ActionLabels {
                watchdog: watchdog.into(),
                result: result.into(),
            });
        }
        self.live
            .by_label
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(watchdog.to_owned(), channel.to_owned()));
    }

    /// The backlog gauge of a notification node (script runs waiting for it).
    pub fn node_backlog(&self, node: &str) -> Gauge {
        self.action_backlog
            .get_or_create(&NodeLabels { node: node.into() })
            .clone()
    }

    /// Drops the series of a notification node that no longer exists (after a reload).
    pub fn remove_node(&self, node: &str) {
        self.action_backlog
            .remove(&NodeLabels { node: node.into() });
    }

    /// Adds a subsystem's own collector to the exposition, under the `awd_` prefix. Devices keep
    /// their counters in their own module (the vsock device's collector lives with the device),
    /// so this module needs to know nothing of them.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_collector(collector);
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
    /// Connections refused, indexed like [`REFUSE_REASONS`].
    pub refused: [Counter; 2],
    /// Connections evicted, indexed like [`EVICT_REASONS`].
    pub evicted: [Counter; 3],
    /// Connections of a `psk=` channel rejected, indexed like
    /// [`AuthError::REASONS`](crate::auth::AuthError::REASONS).
    pub auth_rejected: [Counter; 7],
    /// Messages received.
    pub heartbeats: Counter,
    /// Rejected inputs, indexed like [`Rejection::ALL`].
    pub rejected: [Counter; 4],
    /// Expiries.
    pub expiries: Counter,
    /// Script lines the monitor answered (with success or an error).
    pub actions_sent: Counter,
    /// Script lines written to a raw node, which cannot answer.
    pub actions_written: Counter,
    /// Script lines written to a monitor that then gave no answer (timeout, EOF): QEMU may or
    /// may not have run them.
    pub actions_unknown: Counter,
    /// Script lines that could not be sent.
    pub actions_failed: Counter,
    /// Runs of the exec command, indexed like [`EXEC_RESULTS`].
    pub exec: [Counter; 4],
    /// Global status gauge.
    pub status: Gauge,
    /// Open connections.
    pub connections: Gauge,
    /// Pulses and replies sent.
    pub pulses: Counter,
    /// Pulse → reply round trips (server role), in seconds.
    pub pulse_rtt: Histogram,
    /// Bytes read from the channel.
    pub input_bytes: Counter,
    /// Well-formed inputs the engine refused, indexed like [`RefusalReason::ALL`].
    pub refused_inputs: [Counter; RefusalReason::ALL.len()],
    /// Reads beyond the channel's rate limit, taken as proof of life without being parsed.
    pub rate_limited: Counter,
    /// Wall-clock time of the last heartbeat, ms since the Unix epoch (0: never).
    pub last_heartbeat_ms: AtomicU64,
    /// Wall-clock time the watchdog started, ms since the Unix epoch.
    pub started_ms: u64,
}

impl WatchdogMetrics {
    /// Counts one rejected input.
    pub fn reject(&self, r: Rejection) {
        let i = Rejection::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.rejected[i].inc();
    }

    /// Counts one input the engine refused.
    pub fn refused_input(&self, r: RefusalReason) {
        self.refused_inputs[r.index()].inc();
    }

    /// Counts one exec run under its result, a name from [`EXEC_RESULTS`].
    pub fn exec_ran(&self, result: &str) {
        if let Some(i) = EXEC_RESULTS.iter().position(|r| *r == result) {
            self.exec[i].inc();
        }
    }

    /// The count of exec runs with one result.
    pub fn exec_count(&self, result: &str) -> u64 {
        EXEC_RESULTS
            .iter()
            .position(|r| *r == result)
            .map_or(0, |i| self.exec[i].get())
    }

    /// The count of refused inputs for one reason.
    pub fn refused_input_count(&self, r: RefusalReason) -> u64 {
        self.refused_inputs[r.index()].get()
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

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}")]
pub struct HttpError {
    /// The `--metrics` address, as given.
    pub addr: String,
    /// The bind error (address in use, not an address).
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics endpoint (at startup, so an address in use is a startup error).
pub async fn bind_http(addr: &str) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError {
            addr: addr.to_owned(),
            source,
        })
}

/// Bounds on the metrics endpoint's clients: whoever can reach the port must not hold awd's
/// file descriptors or tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A client must send a request's headers within this long after connecting (or after its
    /// previous response), else the connection is closed.
    pub header_read_timeout: Duration,
    /// The most connections served at once; a further one is closed at once.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    /// 5 s for the headers (a scraper sends them at once), 16 connections (Prometheus keeps one
    /// per target).
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 16,
        }
    }
}

/// Serves `GET /metrics` (OpenMetrics text) until `shutdown`, within [`HttpLimits::default`];
/// anything else is 404.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    serve_http_with(listener, metrics, HttpLimits::default(), shutdown).await
}

/// [`serve_http`] with explicit limits.
pub async fn serve_http_with(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    limits: HttpLimits,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode, header};

    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut refusals = crate::util::LogLimiter::new(5, Duration::from_secs(10));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(suppressed) = refusals.allow(std::time::Instant::now()) {
                tracing::warn!(%peer, suppressed, max_connections = limits.max_connections,
                    "metrics: refusing a connection, too many open");
            }
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let resp = if req.method() == hyper::Method::GET
                            && req.uri().path() == "/metrics"
                        {
                            Response::builder()
                                .header(
                                    header::CONTENT_TYPE,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(metrics.encode())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"awd serves /metrics\n")))
                        };
                        resp.map_err(std::io::Error::other)
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_family_and_the_scrape_time_gauge() {
        let m = Metrics::new();
        let w = m.watchdog("vm1", "hb");
        w.heard(3);
        w.reject(Rejection::InvalidUtf8);
        w.pulse_rtt.observe(0.0003);
        w.refused[0].inc();
        w.evicted[0].inc_by(2);
        w.refused_input(RefusalReason::TimeoutOutOfBounds);
        let text = m.encode();
        for needle in [
            "awd_heartbeats_total{watchdog=\"vm1\",channel=\"hb\"} 3",
            "awd_rejected_inputs_total{watchdog=\"vm1\",channel=\"hb\",reason=\"invalid_utf8\"} 1",
            "awd_seconds_since_last_heartbeat{watchdog=\"vm1\",channel=\"hb\"}",
            "awd_status{watchdog=\"vm1\",channel=\"hb\"} 0",
            "awd_pulse_rtt_seconds_bucket{le=\"0.0005\",watchdog=\"vm1\",channel=\"hb\"} 1",
            "awd_pulse_rtt_seconds_count{watchdog=\"vm1\",channel=\"hb\"} 1",
            "awd_connections_refused_total{watchdog=\"vm1\",channel=\"hb\",reason=\"not_allowed\"} 1",
            "awd_connections_evicted_total{watchdog=\"vm1\",channel=\"hb\",reason=\"never_spoke\"} 2",
            "awd_connections_evicted_total{watchdog=\"vm1\",channel=\"hb\",reason=\"silent\"} 0",
            "awd_refused_inputs_total{watchdog=\"vm1\",channel=\"hb\",reason=\"timeout_out_of_bounds\"} 1",
            "awd_refused_inputs_total{watchdog=\"vm1\",channel=\"hb\",reason=\"wrong_setter\"} 0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        m.remove_watchdog("vm1", "hb");
        assert!(
            !m.encode().contains("vm1"),
            "removed watchdogs leave no series"
        );
    }

    async fn closed_within(s: &mut tokio::net::TcpStream, bound: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(bound, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    async fn start(
        limits: HttpLimits,
    ) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
        let l = bind_http("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve_http_with(
            l,
            Arc::new(Metrics::new()),
            limits,
            shutdown.clone(),
        ));
        (addr, shutdown)
    }

    async fn scrape(addr: std::net::SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await;
        out
    }

    /// A client that connects and sends nothing, or only part of its headers, is closed once
    /// the header timeout passes; before, it held its connection and task for ever.
    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_closed() {
        use tokio::io::AsyncWriteExt;
        let limits = HttpLimits {
            header_read_timeout: Duration::from_millis(300),
            max_connections: 4,
        };
        let (addr, shutdown) = start(limits).await;
        let t0 = std::time::Instant::now();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"GET /metr").await.unwrap();
        assert!(
            closed_within(&mut silent, Duration::from_secs(10)).await,
            "silent client kept"
        );
        assert!(
            closed_within(&mut partial, Duration::from_secs(10)).await,
            "slow client kept"
        );
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
        assert!(
            scrape(addr).await.contains("200 OK"),
            "a real scrape still works"
        );
        shutdown.cancel();
    }

    /// Beyond `max_connections` a connection is closed at once; once the holders go, scrapes
    /// are served again.
    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_once() {
        let limits = HttpLimits {
            header_read_timeout: Duration::from_secs(60),
            max_connections: 2,
        };
        let (addr, shutdown) = start(limits).await;
        let a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let b = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut c, Duration::from_secs(10)).await,
            "the third is closed"
        );
        drop((a, b));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if scrape(addr).await.contains("200 OK") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "slots never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
    }
}
