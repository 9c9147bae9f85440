//! One watchdog's task: owns its engine, hears its channel, fires its script, sends its pulses.
//!
//! The task waits on three things: channel events, the engine's next deadline
//! (`sleep_until`, never a polling loop), and the pulse interval. Input is handled before a
//! deadline that falls due at the same moment, so a heartbeat already queued is never mistaken
//! for silence.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use crate::action::script::Script;
use crate::action::{Job, RunnerHandle};
use crate::config::{Role, WatchdogConfig};
use crate::engine::{Change, Event, GlobalStatus, Scope, Setter, WatchdogEngine};
use crate::metrics::WatchdogMetrics;
use crate::protocol::{PULSE, PULSE_REPLY, frame};
use crate::transport::{ChannelEvent, ConnId, ConnWriter, Signal, TryWriteError};

/// The engine's clock: tokio's (so tests can pause it), as the std type the engine takes.
pub fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Everything a watchdog task needs.
pub struct WatchdogTask {
    id: Arc<str>,
    role: Role,
    pulse_interval: Option<Duration>,
    engine: WatchdogEngine,
    events: mpsc::Receiver<ChannelEvent>,
    conns: BTreeMap<ConnId, Box<dyn ConnWriter>>,
    metrics: Arc<WatchdogMetrics>,
    runner: Option<RunnerHandle>,
    script: Arc<Script>,
    pulse: Bytes,
    reply: Bytes,
}

impl WatchdogTask {
    /// Builds the task; the timer is armed now.
    pub fn new(
        cfg: &WatchdogConfig,
        events: mpsc::Receiver<ChannelEvent>,
        metrics: Arc<WatchdogMetrics>,
        runner: Option<RunnerHandle>,
    ) -> Self {
        let engine = WatchdogEngine::new(&cfg.engine, now())
            .expect("Config::build validated the engine spec");
        metrics.set_status(engine.status());
        WatchdogTask {
            id: cfg.id.as_str().into(),
            role: cfg.role,
            pulse_interval: cfg.pulse_interval,
            engine,
            events,
            conns: BTreeMap::new(),
            metrics,
            runner,
            script: Arc::new(cfg.script.clone()),
            pulse: Bytes::from(frame(PULSE.as_bytes())),
            reply: Bytes::from(frame(PULSE_REPLY.as_bytes())),
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut pulses: Option<Interval> = match (self.role, self.pulse_interval) {
            (Role::Server, Some(p)) => {
                let mut i = tokio::time::interval_at(Instant::now() + p, p);
                i.set_missed_tick_behavior(MissedTickBehavior::Delay);
                Some(i)
            }
            _ => None,
        };
        info!(
            watchdog = &*self.id,
            deadline_in_ms = self
                .engine
                .next_deadline()
                .map(|d| d.saturating_duration_since(now()).as_millis() as u64),
            "watchdog armed"
        );
        loop {
            let deadline = self.engine.next_deadline().map(Instant::from_std);
            let pulsing = pulses.is_some()
                && !matches!(
                    self.engine.status(),
                    GlobalStatus::Expired | GlobalStatus::Stopped
                );
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                ev = self.events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let c = self.engine.poll(now());
                    self.apply(c);
                }
                _ = async { pulses.as_mut().expect("guarded").tick().await }, if pulsing => self.send_pulses(),
            }
        }
        debug!(watchdog = &*self.id, "watchdog stopped");
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
            }
            ChannelEvent::Heartbeats { conn, count } => {
                trace!(watchdog = &*self.id, conn, count, "heartbeat");
                self.metrics.heard(u64::from(count));
                let o = self.engine.handle(Event::Heartbeat, now());
                self.apply(o.changes);
            }
            ChannelEvent::Signal { conn, signal } => {
                self.metrics.heard(1);
                let at = now();
                let o = match &signal {
                    Signal::Trigger => self.engine.handle(Event::Trigger, at),
                    Signal::SetTimeout(d) => {
                        info!(
                            watchdog = &*self.id,
                            timeout_ms = d.as_millis() as u64,
                            "peer set the timeout"
                        );
                        self.engine.handle(Event::SetTimeout(*d), at)
                    }
                    Signal::Status(text) => {
                        info!(watchdog = &*self.id, conn, status = &**text, "peer status");
                        self.engine.handle(Event::Heartbeat, at)
                    }
                    Signal::Pulse => {
                        if self.role == Role::Client {
                            self.send(conn, self.reply.clone());
                        }
                        self.engine.handle(Event::Heartbeat, at)
                    }
                    Signal::PulseReply => self.engine.handle(Event::Heartbeat, at),
                    Signal::Checkpoint(c) => self.engine.handle(Event::Checkpoint(c), at),
                    Signal::Condition(c, v) => self.engine.handle(
                        Event::Condition {
                            name: c,
                            value: *v,
                            by: Setter::Guest,
                        },
                        at,
                    ),
                };
                if let Some(why) = &o.rejected {
                    warn!(watchdog = &*self.id, conn, reason = %why, "input refused");
                }
                self.apply(o.changes);
            }
        }
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
        match t.to {
            GlobalStatus::Expired => {
                self.metrics.expiries.inc();
                error!(watchdog = &*self.id, from = %t.from, reason = %t.reason, "watchdog expired");
                match &self.runner {
                    Some(r) if !self.script.is_empty() => r.submit(Job {
                        watchdog: self.id.clone(),
                        script: self.script.clone(),
                        metrics: self.metrics.clone(),
                    }),
                    _ => warn!(watchdog = &*self.id, "no script to run"),
                }
            }
            _ => {
                info!(watchdog = &*self.id, from = %t.from, to = %t.to, reason = %t.reason, "watchdog status changed")
            }
        }
    }

    fn send_pulses(&mut self) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.send(conn, self.pulse.clone());
        }
    }

    fn send(&mut self, conn: ConnId, bytes: Bytes) {
        let Some(tx) = self.conns.get(&conn) else {
            return;
        };
        match tx.try_write(bytes) {
            Ok(()) => {
                self.metrics.pulses.inc();
            }
            Err(TryWriteError::Full) => {
                debug!(
                    watchdog = &*self.id,
                    conn, "pulse skipped: the peer is not reading"
                );
            }
            Err(TryWriteError::Closed) => {
                self.conns.remove(&conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The timer logic on tokio's paused clock: time moves only when the test says so (or when
    //! every task is idle and a timer is due, which tokio then fires at once).
    use super::*;
    use crate::action::Runner;
    use crate::action::script::Script;
    use crate::config::{Endpoint, SocketChardev};
    use crate::engine::EngineSpec;
    use crate::metrics::Metrics;

    struct Harness {
        events: mpsc::Sender<ChannelEvent>,
        metrics: Arc<WatchdogMetrics>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    /// A watchdog with a notification node that leads nowhere: expiries are observed through
    /// the expiry counter (the runner's job queue is never drained by a connection).
    fn start(timeout_ms: u64, grace_ms: Option<u64>, role: Role, pulse_ms: Option<u64>) -> Harness {
        let cfg = WatchdogConfig {
            id: "w".into(),
            role,
            awd_node: "n".into(),
            notification_node: None,
            script: Script::parse("quit", "test").unwrap(),
            script_origin: "test".into(),
            pulse_interval: pulse_ms.map(Duration::from_millis),
            timeout: Duration::from_millis(timeout_ms),
            grace: grace_ms.map(Duration::from_millis),
            engine: EngineSpec {
                grace: grace_ms.map(Duration::from_millis),
                ..EngineSpec::plain(Duration::from_millis(timeout_ms))
            },
        };
        let (events, rx) = mpsc::channel(16);
        let metrics = Metrics::new().watchdog("w", "n");
        let (_runner, handle) = Runner::new(SocketChardev {
            id: "mon".into(),
            endpoint: Endpoint::Unix("/nonexistent".into()),
            server: false,
            reconnect: Duration::from_secs(1),
            nodelay: false,
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(
            WatchdogTask::new(&cfg, rx, metrics.clone(), Some(handle)).run(shutdown.clone()),
        );
        Harness {
            events,
            metrics,
            shutdown,
            task,
        }
    }

    async fn beat(h: &Harness) {
        h.events
            .send(ChannelEvent::Heartbeats { conn: 1, count: 1 })
            .await
            .unwrap();
        settle().await;
    }

    /// Lets the watchdog task run until it waits again, without moving the clock.
    async fn settle() {
        for _ in 0..10 {
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
        let (tx, mut rx) = mpsc::channel(64);
        h.events
            .send(ChannelEvent::Connected {
                conn: 9,
                peer: "p".into(),
                tx: Box::new(tx),
            })
            .await
            .unwrap();
        settle().await;
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
    async fn a_client_answers_each_pulse_and_a_pulse_is_input() {
        let h = start(5000, None, Role::Client, None);
        let (tx, mut rx) = mpsc::channel(64);
        h.events
            .send(ChannelEvent::Connected {
                conn: 3,
                peer: "p".into(),
                tx: Box::new(tx),
            })
            .await
            .unwrap();
        settle().await;
        assert_eq!(
            &rx.try_recv().unwrap()[..],
            &frame(PULSE_REPLY.as_bytes())[..],
            "a client announces itself on connect"
        );
        advance(4000).await;
        h.events
            .send(ChannelEvent::Signal {
                conn: 3,
                signal: Signal::Pulse,
            })
            .await
            .unwrap();
        settle().await;
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
        let (tx, _rx) = mpsc::channel(64);
        h.events
            .send(ChannelEvent::Connected {
                conn: 4,
                peer: "p".into(),
                tx: Box::new(tx),
            })
            .await
            .unwrap();
        settle().await;
        advance(4000).await;
        h.events
            .send(ChannelEvent::Disconnected {
                conn: 4,
                reason: "x".into(),
            })
            .await
            .unwrap();
        settle().await;
        advance(1000).await;
        assert_eq!(h.metrics.expiries.get(), 1);
    }
}
