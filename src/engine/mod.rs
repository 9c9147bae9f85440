//! Pure supervision: the state machines behind each watchdog.
//!
//! Nothing in here does I/O, spawns tasks or reads a clock. Every call takes the current time as
//! an argument and returns what changed; [`WatchdogEngine::next_deadline`] tells the caller when
//! to call [`WatchdogEngine::poll`] next. The daemon drives an engine from one timer per
//! watchdog, and unit tests drive it with made-up instants.

pub mod timeout;

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::protocol::Message;
pub use timeout::{TimeoutChange, TimeoutSupervision};

/// A watchdog's overall status, after AUTOSAR's Watchdog Manager global status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GlobalStatus {
    /// Every supervision is OK or deactivated.
    Ok,
    /// A supervision failed but is still within its tolerance.
    Failed,
    /// A supervision expired: the watchdog's actions run.
    Expired,
    /// Expired for longer than the expired tolerance.
    Stopped,
    /// Every supervision is deactivated (disabled or its conditions do not hold).
    Deactivated,
}

impl GlobalStatus {
    /// A stable lowercase name, used in logs, JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            GlobalStatus::Ok => "ok",
            GlobalStatus::Failed => "failed",
            GlobalStatus::Expired => "expired",
            GlobalStatus::Stopped => "stopped",
            GlobalStatus::Deactivated => "deactivated",
        }
    }

    /// A number for the metrics gauge: ok 0, failed 1, expired 2, stopped 3, deactivated 4.
    pub fn as_gauge(self) -> i64 {
        match self {
            GlobalStatus::Ok => 0,
            GlobalStatus::Failed => 1,
            GlobalStatus::Expired => 2,
            GlobalStatus::Stopped => 3,
            GlobalStatus::Deactivated => 4,
        }
    }
}

impl fmt::Display for GlobalStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of a watchdog's global status, with the reason in words for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The status before.
    pub from: GlobalStatus,
    /// The status after.
    pub to: GlobalStatus,
    /// What caused it: the supervision, the expected and the measured values.
    pub reason: String,
}

/// What an engine is built from: the supervision parameters of one watchdog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSpec {
    /// The plain timeout.
    pub timeout: Duration,
    /// The first deadline, when longer than `timeout` is needed for the first input.
    pub grace: Option<Duration>,
}

/// The supervision state of one watchdog.
#[derive(Debug, Clone)]
pub struct WatchdogEngine {
    timeout: TimeoutSupervision,
    status: GlobalStatus,
}

impl WatchdogEngine {
    /// Starts supervising at `now`.
    pub fn new(spec: &EngineSpec, now: Instant) -> Self {
        WatchdogEngine {
            timeout: TimeoutSupervision::new(spec.timeout, spec.grace, now),
            status: GlobalStatus::Ok,
        }
    }

    /// The current global status.
    pub fn status(&self) -> GlobalStatus {
        self.status
    }

    /// The plain timeout supervision, for status reports.
    pub fn timeout(&self) -> &TimeoutSupervision {
        &self.timeout
    }

    /// When [`poll`](Self::poll) must next be called, or `None` if nothing is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timeout.deadline()
    }

    /// Feeds one decoded message that arrived at `now`.
    pub fn on_message(&mut self, msg: &Message<'_>, now: Instant) -> Option<Transition> {
        match msg {
            Message::Trigger => {
                self.timeout.input(now);
                if self.status == GlobalStatus::Expired {
                    return None;
                }
                // Expire at once; the next heartbeat re-arms as for a timeout expiry.
                self.timeout.poll(now + self.timeout.timeout());
                self.set(
                    GlobalStatus::Expired,
                    "the peer reported a failure (WATCHDOG=trigger)",
                )
            }
            Message::SetTimeout(t) => {
                self.timeout.set_timeout(*t, now);
                self.heartbeat(now)
            }
            _ => self.heartbeat(now),
        }
    }

    /// Records a heartbeat at `now`.
    pub fn heartbeat(&mut self, now: Instant) -> Option<Transition> {
        match self.timeout.input(now) {
            Some(TimeoutChange::Rearmed) => self.set(GlobalStatus::Ok, "input arrived again"),
            _ if self.status == GlobalStatus::Expired => {
                self.set(GlobalStatus::Ok, "input arrived again")
            }
            _ => None,
        }
    }

    /// Checks deadlines against `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Transition> {
        match self.timeout.poll(now)? {
            TimeoutChange::Expired {
                silent_for,
                ever_heard,
            } => {
                let reason = if ever_heard {
                    format!(
                        "timeout: silent for {} ms, timeout {} ms",
                        silent_for.as_millis(),
                        self.timeout.timeout().as_millis()
                    )
                } else {
                    format!(
                        "timeout: nothing received in the {} ms since start",
                        silent_for.as_millis()
                    )
                };
                self.set(GlobalStatus::Expired, &reason)
            }
            TimeoutChange::Rearmed => None,
        }
    }

    fn set(&mut self, to: GlobalStatus, reason: &str) -> Option<Transition> {
        if self.status == to {
            return None;
        }
        let from = std::mem::replace(&mut self.status, to);
        Some(Transition {
            from,
            to,
            reason: reason.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(t0: Instant) -> WatchdogEngine {
        WatchdogEngine::new(
            &EngineSpec {
                timeout: Duration::from_secs(5),
                grace: None,
            },
            t0,
        )
    }

    #[test]
    fn expiry_and_rearm_are_global_transitions() {
        let t0 = Instant::now();
        let mut e = engine(t0);
        assert_eq!(e.poll(t0 + Duration::from_secs(4)), None);
        let t = e.poll(t0 + Duration::from_secs(5)).expect("expires");
        assert_eq!((t.from, t.to), (GlobalStatus::Ok, GlobalStatus::Expired));
        assert!(t.reason.contains("nothing received"), "{}", t.reason);
        let t = e
            .on_message(&Message::Heartbeat, t0 + Duration::from_secs(6))
            .expect("rearms");
        assert_eq!((t.from, t.to), (GlobalStatus::Expired, GlobalStatus::Ok));
    }

    #[test]
    fn trigger_expires_at_once_and_a_heartbeat_rearms() {
        let t0 = Instant::now();
        let mut e = engine(t0);
        let t = e.on_message(&Message::Trigger, t0).expect("expires");
        assert_eq!(t.to, GlobalStatus::Expired);
        assert_eq!(e.next_deadline(), None);
        assert_eq!(e.on_message(&Message::Trigger, t0), None, "once");
        let t = e.heartbeat(t0 + Duration::from_secs(1)).expect("rearms");
        assert_eq!(t.to, GlobalStatus::Ok);
        assert_eq!(e.next_deadline(), Some(t0 + Duration::from_secs(6)));
    }
}
