//! The local status of one supervision, the changes supervisions report, and how far in time
//! a settling step may go.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::GlobalStatus;

/// One supervision's status, after AUTOSAR's Watchdog Manager local status (S-CORE's `EStatus`:
/// kOk, kFailed, kExpired, kDeactivated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SupervisionStatus {
    /// Supervising, and every check so far was correct (or failures have been made good).
    Ok,
    /// Alive only: incorrect cycles, still within the failed-cycle tolerance.
    Failed,
    /// Supervision failed for good: the watchdog's actions run.
    Expired,
    /// Not supervising: disabled, or a linked condition does not hold.
    Deactivated,
}

impl SupervisionStatus {
    /// A stable lowercase name, used in logs and JSON.
    pub fn as_str(self) -> &'static str {
        GlobalStatus::from(self).as_str()
    }
}

impl fmt::Display for SupervisionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<SupervisionStatus> for GlobalStatus {
    fn from(s: SupervisionStatus) -> Self {
        match s {
            SupervisionStatus::Ok => GlobalStatus::Ok,
            SupervisionStatus::Failed => GlobalStatus::Failed,
            SupervisionStatus::Expired => GlobalStatus::Expired,
            SupervisionStatus::Deactivated => GlobalStatus::Deactivated,
        }
    }
}

/// A status change of one supervision, stamped with the instant it happened (a deadline that
/// passed, or the event that caused it), so the engine can order changes in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocalChange {
    /// When it happened.
    pub at: Instant,
    /// The status before.
    pub from: SupervisionStatus,
    /// The status after.
    pub to: SupervisionStatus,
    /// Why, in words: the checkpoint, the expected and the measured values.
    pub reason: String,
}

/// The end of a settling step: deadlines before `until` are due, and one at exactly `until`
/// too when `inclusive`.
///
/// [`handle`](super::WatchdogEngine::handle) settles exclusively, so an event handed in at
/// the very instant a deadline falls due wins over it; [`poll`](super::WatchdogEngine::poll)
/// settles inclusively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Horizon {
    /// The instant.
    pub until: Instant,
    /// Whether a deadline at exactly `until` is due.
    pub inclusive: bool,
}

impl Horizon {
    /// Whether a deadline at `t` is due.
    pub fn covers(&self, t: Instant) -> bool {
        t < self.until || (self.inclusive && t == self.until)
    }

    /// How many of the instants `first + i * step` (i = 0, 1, …) are due.
    pub fn count_steps(&self, first: Instant, step: Duration) -> u64 {
        if !self.covers(first) || step.is_zero() {
            return 0;
        }
        let span = self.until.duration_since(first).as_nanos();
        let step = step.as_nanos();
        let mut n = span / step + 1;
        if !self.inclusive && span % step == 0 {
            n -= 1;
        }
        u64::try_from(n).unwrap_or(u64::MAX)
    }
}

/// `t + d`, or a time about a century after `t` when the sum does not fit (a config may give
/// absurdly long durations; they must not panic the engine).
pub(crate) fn add(t: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(1 << 32);
    t.checked_add(d).or_else(|| t.checked_add(FAR)).unwrap_or(t)
}

/// `step * n`, saturating at the largest duration an `Instant` sum can sensibly take.
pub(crate) fn times(step: Duration, n: u64) -> Duration {
    let nanos = step.as_nanos().saturating_mul(u128::from(n));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Whole milliseconds from `now` until `t` (0 once passed), for snapshots.
pub(crate) fn ms_until(t: Instant, now: Instant) -> u64 {
    super::spec::ms(t.saturating_duration_since(now))
}

/// Whole milliseconds from `t` until `now` (0 if `t` is later), for snapshots.
pub(crate) fn ms_since(t: Instant, now: Instant) -> u64 {
    super::spec::ms(now.saturating_duration_since(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::ms;

    #[test]
    fn horizons_count_due_steps_exactly_at_the_boundaries() {
        let t0 = Instant::now();
        let cases = [
            // (until, inclusive, first, step, due)
            (100, true, 100, 10, 1),
            (100, false, 100, 10, 0),
            (99, true, 100, 10, 0),
            (130, true, 100, 10, 4),
            (130, false, 100, 10, 3),
            (135, false, 100, 10, 4),
        ];
        for (until, inclusive, first, step, due) in cases {
            let h = Horizon {
                until: t0 + ms(until),
                inclusive,
            };
            assert_eq!(
                h.count_steps(t0 + ms(first), ms(step)),
                due,
                "until {until} inclusive {inclusive} first {first} step {step}"
            );
        }
    }

    #[test]
    fn times_and_add_saturate() {
        assert_eq!(times(ms(3), 4), ms(12));
        assert_eq!(times(Duration::MAX, 2), Duration::from_nanos(u64::MAX));
        let t0 = Instant::now();
        assert!(add(t0, Duration::MAX) > t0 + Duration::from_secs(1 << 30));
    }
}
