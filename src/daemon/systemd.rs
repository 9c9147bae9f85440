//! systemd integration through the `sd-notify` crate: `READY=1` once every listener is up,
//! `RELOADING=1`/`STOPPING=1` around reloads and shutdown, and `WATCHDOG=1` at half of
//! `WatchdogSec`.
//!
//! A ping is sent only after every watchdog task has answered a status probe within the ping
//! period: the same tasks that drive the timers. If one of them stalls, the pings stop and
//! systemd restarts awd — the seed's "the Health Monitor itself is supervised by the Launch
//! Manager". Without `NOTIFY_SOCKET` every call here does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::DaemonHandle;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("sd_notify failed: {e}");
    }
}

/// Tells systemd that awd is up (every listener bound, every task started).
pub fn ready(watchdogs: usize) {
    let status = format!("supervising {watchdogs} watchdog(s)");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Tells systemd a reload has begun; [`ready`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// Tells systemd awd is shutting down.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// The ping period: half of `WatchdogSec`, if systemd asked for pings.
pub fn ping_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// Starts the ping loop if systemd asked for one.
pub fn spawn_watchdog(daemon: DaemonHandle) -> Option<JoinHandle<()>> {
    let period = ping_period()?;
    debug!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match daemon.probe(period).await {
                Ok(()) => notify(&[NotifyState::Watchdog]),
                Err(e) => warn!(
                    "watchdog task {} did not answer: withholding WATCHDOG=1",
                    e.watchdog().unwrap_or("?")
                ),
            }
        }
    }))
}
