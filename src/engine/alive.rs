//! Alive supervision: a checkpoint must arrive a given number of times per reference cycle.
//!
//! * **Cycles.** The reference cycles follow each other without drift: each starts where the
//!   last ended. The first starts when the supervision starts; while it has never heard its
//!   checkpoint and a `grace` is set, the first cycle starts at the first checkpoint or when
//!   the grace ends, whichever comes first (a booting guest is not counted).
//! * **Verdict at each cycle end.** A checkpoint counts for the cycle during which it arrives.
//!   One at exactly a cycle's end counts for that cycle if it is handed in before the poll at
//!   that instant (input first, as everywhere in the engine), else for the next. The count is
//!   correct when it lies in `min..=max`, both inclusive as in AUTOSAR, where
//!   `min = expected - min_margin` and `max = expected + max_margin`.
//! * **Status.** An incorrect cycle adds 1 to the failed-cycle counter: the status becomes
//!   FAILED while the counter is within `tolerance`, EXPIRED once it exceeds it (at once when
//!   the tolerance is 0). A correct cycle takes 1 off the counter; at 0 the status is OK again.
//! * **Recovery.** Once EXPIRED, the cycles stop. The next checkpoint restarts the supervision
//!   cleanly: counter 0, status OK, a fresh cycle starting at that checkpoint, which counts
//!   as its first.

use std::fmt;
use std::time::{Duration, Instant};

use super::spec::{SpecError, SupervisionKind, check_checkpoint, ms, write_conditions};
use super::status::{Horizon, LocalChange, SupervisionStatus, add, times};

/// The parameters of one alive supervision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliveSpec {
    /// The supervision's name, unique in its watchdog.
    pub name: String,
    /// The checkpoint counted.
    pub checkpoint: String,
    /// The reference cycle.
    pub cycle: Duration,
    /// How many checkpoints a cycle should hold.
    pub expected: u32,
    /// How many fewer are still correct.
    pub min_margin: u32,
    /// How many more are still correct.
    pub max_margin: u32,
    /// How many failed cycles are tolerated (FAILED) before the supervision expires.
    pub tolerance: u32,
    /// Conditions that must all hold for it to run.
    pub conditions: Vec<String>,
}

impl AliveSpec {
    /// `expected` times `checkpoint` per `cycle`, no margins, no tolerance, no conditions.
    pub fn new(
        name: impl Into<String>,
        checkpoint: impl Into<String>,
        cycle: Duration,
        expected: u32,
    ) -> Self {
        AliveSpec {
            name: name.into(),
            checkpoint: checkpoint.into(),
            cycle,
            expected,
            min_margin: 0,
            max_margin: 0,
            tolerance: 0,
            conditions: Vec::new(),
        }
    }

    /// Sets the margins around the expected count.
    pub fn with_margins(mut self, min_margin: u32, max_margin: u32) -> Self {
        self.min_margin = min_margin;
        self.max_margin = max_margin;
        self
    }

    /// Sets how many failed cycles are tolerated.
    pub fn with_tolerance(mut self, tolerance: u32) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Links a condition (the seed's `link_condition`).
    pub fn link_condition(mut self, condition: impl Into<String>) -> Self {
        self.conditions.push(condition.into());
        self
    }

    /// The fewest checkpoints a correct cycle holds.
    pub fn min_count(&self) -> u32 {
        self.expected.saturating_sub(self.min_margin)
    }

    /// The most checkpoints a correct cycle holds.
    pub fn max_count(&self) -> u32 {
        self.expected.saturating_add(self.max_margin)
    }

    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        let name = || self.name.clone();
        check_checkpoint(SupervisionKind::Alive, &self.name, &self.checkpoint)?;
        if self.cycle.is_zero() {
            return Err(SpecError::AliveCycleZero { name: name() });
        }
        if self.expected == 0 {
            return Err(SpecError::AliveExpectedZero { name: name() });
        }
        if self.min_margin > self.expected {
            return Err(SpecError::AliveMarginTooWide {
                name: name(),
                expected: self.expected,
                min_margin: self.min_margin,
            });
        }
        Ok(())
    }
}

impl fmt::Display for AliveSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "alive: checkpoint {} {}..={} times per {} ms (expected {}), {} failed cycles tolerated",
            self.checkpoint,
            self.min_count(),
            self.max_count(),
            ms(self.cycle),
            self.expected,
            self.tolerance
        )?;
        write_conditions(f, &self.conditions)
    }
}

/// Where the supervision is in its cycles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the first cycle: it starts at the first checkpoint or at `until`.
    Waiting { until: Instant },
    /// Inside the cycle that started at `start`.
    Running { start: Instant },
    /// Expired: no cycles until the next checkpoint.
    Stopped,
}

/// The state of one alive supervision while it is active.
#[derive(Debug, Clone)]
pub(crate) struct AliveSupervision {
    spec: AliveSpec,
    grace: Option<Duration>,
    status: SupervisionStatus,
    failed: u32,
    phase: Phase,
    count: u32,
    last_count: Option<u32>,
    last_checkpoint: Option<Instant>,
}

impl AliveSupervision {
    /// Starts supervising at `now`.
    pub fn new(spec: &AliveSpec, grace: Option<Duration>, now: Instant) -> Self {
        let mut s = AliveSupervision {
            spec: spec.clone(),
            grace,
            status: SupervisionStatus::Ok,
            failed: 0,
            phase: Phase::Stopped,
            count: 0,
            last_count: None,
            last_checkpoint: None,
        };
        s.restart(now);
        s
    }

    /// The parameters.
    pub fn spec(&self) -> &AliveSpec {
        &self.spec
    }

    /// OK, FAILED or EXPIRED.
    pub fn status(&self) -> SupervisionStatus {
        self.status
    }

    /// The failed-cycle counter.
    pub fn failed_cycles(&self) -> u32 {
        self.failed
    }

    /// Checkpoints so far in the current cycle.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The count of the last closed cycle.
    pub fn last_count(&self) -> Option<u32> {
        self.last_count
    }

    /// When the current cycle started, if one runs.
    pub fn cycle_start(&self) -> Option<Instant> {
        match self.phase {
            Phase::Running { start } => Some(start),
            _ => None,
        }
    }

    /// When its checkpoint last arrived.
    pub fn last_checkpoint(&self) -> Option<Instant> {
        self.last_checkpoint
    }

    /// The end of the current cycle, or of the wait for the first one.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Waiting { until } => Some(until),
            Phase::Running { start } => Some(add(start, self.spec.cycle)),
            Phase::Stopped => None,
        }
    }

    /// Forgets every checkpoint: the VM started over, so the next restart waits the grace
    /// again for the first one.
    pub fn forget_checkpoints(&mut self) {
        self.last_checkpoint = None;
    }

    /// Starts afresh at `now`: counter 0, status OK, the first cycle (or the wait for it).
    pub fn restart(&mut self, now: Instant) {
        self.status = SupervisionStatus::Ok;
        self.failed = 0;
        self.count = 0;
        self.phase = match (self.grace, self.last_checkpoint) {
            (Some(g), None) => Phase::Waiting { until: add(now, g) },
            _ => Phase::Running { start: now },
        };
    }

    /// A checkpoint at `now`; returns whether it is this supervision's.
    pub fn checkpoint(&mut self, name: &str, now: Instant, out: &mut Vec<LocalChange>) -> bool {
        if name != self.spec.checkpoint {
            return false;
        }
        self.last_checkpoint = Some(now);
        match self.phase {
            Phase::Running { .. } => self.count = self.count.saturating_add(1),
            Phase::Waiting { .. } => {
                self.phase = Phase::Running { start: now };
                self.count = 1;
            }
            Phase::Stopped => {
                out.push(LocalChange {
                    at: now,
                    from: self.status,
                    to: SupervisionStatus::Ok,
                    reason: format!(
                        "checkpoint {} arrived again: supervision restarted",
                        self.spec.checkpoint
                    ),
                });
                self.restart(now);
                self.phase = Phase::Running { start: now };
                self.count = 1;
            }
        }
        true
    }

    /// Closes every cycle that ends within `h`.
    pub fn settle(&mut self, h: Horizon, out: &mut Vec<LocalChange>) {
        loop {
            match self.phase {
                Phase::Stopped => return,
                Phase::Waiting { until } => {
                    if !h.covers(until) {
                        return;
                    }
                    self.phase = Phase::Running { start: until };
                    self.count = 0;
                }
                Phase::Running { start } => {
                    let end = add(start, self.spec.cycle);
                    if !h.covers(end) {
                        return;
                    }
                    let count = std::mem::take(&mut self.count);
                    self.phase = Phase::Running { start: end };
                    self.close_cycles(count, 1, end, out);
                    // Cycles after that one held nothing: no event came in between.
                    let next = add(end, self.spec.cycle);
                    let empty = h.count_steps(next, self.spec.cycle);
                    if empty > 0 && self.phase != Phase::Stopped {
                        self.phase = Phase::Running {
                            start: add(end, times(self.spec.cycle, empty)),
                        };
                        self.close_cycles(0, empty, next, out);
                    }
                }
            }
        }
    }

    /// Closes `n` consecutive cycles that each held `count` checkpoints, the first ending at
    /// `first_end`, in closed form (a late poll after a long silence costs nothing).
    fn close_cycles(&mut self, count: u32, n: u64, first_end: Instant, out: &mut Vec<LocalChange>) {
        let end_of = |i: u64| add(first_end, times(self.spec.cycle, i));
        self.last_count = Some(count);
        let (min, max) = (self.spec.min_count(), self.spec.max_count());
        let seen = format!(
            "checkpoint {} seen {count} times in a {} ms cycle, expected {min}..={max}",
            self.spec.checkpoint,
            ms(self.spec.cycle)
        );
        if (min..=max).contains(&count) {
            if self.failed == 0 {
                return;
            }
            let made_good = u32::try_from(n).unwrap_or(u32::MAX).min(self.failed);
            self.failed -= made_good;
            if self.failed == 0 {
                out.push(LocalChange {
                    at: end_of(u64::from(made_good) - 1),
                    from: self.status,
                    to: SupervisionStatus::Ok,
                    reason: format!("{seen}; failed cycles back to 0"),
                });
                self.status = SupervisionStatus::Ok;
            }
            return;
        }
        // Incorrect: each cycle adds 1; `room` more cycles expire the supervision.
        let room = u64::from(self.spec.tolerance - self.failed) + 1;
        if self.status == SupervisionStatus::Ok && room > 1 {
            out.push(LocalChange {
                at: first_end,
                from: SupervisionStatus::Ok,
                to: SupervisionStatus::Failed,
                reason: format!(
                    "{seen}; failed cycles {}, tolerated {}",
                    self.failed + 1,
                    self.spec.tolerance
                ),
            });
            self.status = SupervisionStatus::Failed;
        }
        if n >= room {
            self.failed = self.spec.tolerance.saturating_add(1);
            out.push(LocalChange {
                at: end_of(room - 1),
                from: self.status,
                to: SupervisionStatus::Expired,
                reason: format!(
                    "{seen}; failed cycles {} exceed the tolerance of {}",
                    self.failed, self.spec.tolerance
                ),
            });
            self.status = SupervisionStatus::Expired;
            self.phase = Phase::Stopped;
        } else {
            // n < room, so this stays within the tolerance.
            self.failed += u32::try_from(n).unwrap_or(u32::MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{incl, ms};

    /// 10 ± 2 ticks per 100 ms.
    fn spec(tolerance: u32) -> AliveSpec {
        AliveSpec::new("loop", "tick", ms(100), 10)
            .with_margins(2, 2)
            .with_tolerance(tolerance)
    }

    /// Feeds `count` ticks spread over the cycle starting at `start`, then closes it.
    fn cycle(
        s: &mut AliveSupervision,
        start: Instant,
        count: u32,
        out: &mut Vec<LocalChange>,
    ) -> Instant {
        for i in 0..count {
            let at = start + ms(u64::from(i) * 90 / u64::from(count.max(1)));
            assert!(s.checkpoint("tick", at, out));
        }
        let end = start + ms(100);
        s.settle(incl(end), out);
        end
    }

    #[test]
    fn counts_at_the_exact_bounds_of_the_margins() {
        // (count, correct): min = 8, max = 12, both inclusive.
        let cases = [
            (7, false),
            (8, true),
            (10, true),
            (12, true),
            (13, false),
            (0, false),
        ];
        for (count, correct) in cases {
            let t0 = Instant::now();
            let mut s = AliveSupervision::new(&spec(0), None, t0);
            let mut out = Vec::new();
            cycle(&mut s, t0, count, &mut out);
            let want = if correct {
                SupervisionStatus::Ok
            } else {
                SupervisionStatus::Expired
            };
            assert_eq!(s.status(), want, "count {count}: {out:?}");
            assert_eq!(out.is_empty(), correct, "count {count}");
            if !correct {
                assert!(
                    out[0].reason.contains(&format!(
                        "seen {count} times in a 100 ms cycle, expected 8..=12"
                    )),
                    "{}",
                    out[0].reason
                );
            }
        }
    }

    #[test]
    fn a_checkpoint_at_the_cycle_end_counts_for_it_unless_the_end_was_polled_first() {
        let one = AliveSpec::new("a", "tick", ms(100), 1);
        let end = Instant::now() + ms(100);
        let t0 = end - ms(100);
        // Input first: the engine settles exclusively before an event at the same instant.
        let mut s = AliveSupervision::new(&one, None, t0);
        let mut out = Vec::new();
        s.settle(
            Horizon {
                until: end,
                inclusive: false,
            },
            &mut out,
        );
        s.checkpoint("tick", end, &mut out);
        s.settle(incl(end), &mut out);
        assert_eq!(s.status(), SupervisionStatus::Ok, "{out:?}");
        // Polled first: the cycle closed empty, and the tick opens the next one.
        let mut s = AliveSupervision::new(&one, None, t0);
        s.settle(incl(end), &mut out);
        s.checkpoint("tick", end, &mut out);
        assert_eq!(s.status(), SupervisionStatus::Ok, "restarted by the tick");
        assert_eq!(out.len(), 2, "expired, then restarted: {out:?}");
    }

    #[test]
    fn tolerance_n_failed_cycles_then_expired() {
        let t0 = Instant::now();
        let mut s = AliveSupervision::new(&spec(3), None, t0);
        let mut out = Vec::new();
        let mut t = t0;
        let mut seen = Vec::new();
        for _ in 0..4 {
            t = cycle(&mut s, t, 5, &mut out);
            seen.push((s.status(), s.failed_cycles()));
        }
        assert_eq!(
            seen,
            [
                (SupervisionStatus::Failed, 1),
                (SupervisionStatus::Failed, 2),
                (SupervisionStatus::Failed, 3),
                (SupervisionStatus::Expired, 4),
            ]
        );
        assert_eq!(out.len(), 2, "OK->FAILED, FAILED->EXPIRED: {out:?}");
        assert!(
            out[1]
                .reason
                .contains("failed cycles 4 exceed the tolerance of 3")
        );
        assert_eq!(out[1].at, t0 + ms(400));
        assert_eq!(s.deadline(), None, "cycles stop once expired");
    }

    #[test]
    fn recovery_before_expiry_takes_one_correct_cycle_per_failed_one() {
        let t0 = Instant::now();
        let mut s = AliveSupervision::new(&spec(3), None, t0);
        let mut out = Vec::new();
        let mut t = cycle(&mut s, t0, 0, &mut out);
        t = cycle(&mut s, t, 20, &mut out);
        assert_eq!(
            (s.status(), s.failed_cycles()),
            (SupervisionStatus::Failed, 2)
        );
        t = cycle(&mut s, t, 10, &mut out);
        assert_eq!(
            (s.status(), s.failed_cycles()),
            (SupervisionStatus::Failed, 1)
        );
        cycle(&mut s, t, 9, &mut out);
        assert_eq!((s.status(), s.failed_cycles()), (SupervisionStatus::Ok, 0));
        assert_eq!(out.last().map(|c| c.to), Some(SupervisionStatus::Ok));
        assert!(out.last().is_some_and(|c| c.reason.contains("back to 0")));
    }

    #[test]
    fn a_late_settle_closes_every_missed_cycle_at_its_own_end() {
        let t0 = Instant::now();
        let mut s = AliveSupervision::new(&spec(2), None, t0);
        let mut out = Vec::new();
        for i in 0..10 {
            s.checkpoint("tick", t0 + ms(i), &mut out);
        }
        // One poll, ten seconds late: cycle 1 correct, cycles 2, 3 failed, cycle 4 expires.
        s.settle(incl(t0 + ms(10_000)), &mut out);
        let got: Vec<_> = out.iter().map(|c| (c.to, c.at)).collect();
        assert_eq!(
            got,
            [
                (SupervisionStatus::Failed, t0 + ms(200)),
                (SupervisionStatus::Expired, t0 + ms(400)),
            ]
        );
        // A correct-when-empty alive (min 0) skips a day of cycles without looping.
        let lax = AliveSpec::new("lax", "tick", ms(1), 1).with_margins(1, 0);
        let mut s = AliveSupervision::new(&lax, None, t0);
        s.settle(incl(t0 + Duration::from_secs(86_400)), &mut out);
        assert_eq!(s.status(), SupervisionStatus::Ok);
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(86_400) + ms(1)));
    }

    #[test]
    fn grace_waits_for_the_first_checkpoint_or_its_end() {
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut s = AliveSupervision::new(&spec(0), Some(ms(5000)), t0);
        assert_eq!(s.deadline(), Some(t0 + ms(5000)));
        s.checkpoint("tick", t0 + ms(1234), &mut out);
        assert_eq!(
            s.cycle_start(),
            Some(t0 + ms(1234)),
            "first tick starts cycle 1"
        );
        assert_eq!(s.count(), 1);
        let mut s = AliveSupervision::new(&spec(0), Some(ms(5000)), t0);
        s.settle(incl(t0 + ms(5099)), &mut out);
        assert_eq!(s.cycle_start(), Some(t0 + ms(5000)));
        assert!(out.is_empty());
        s.settle(incl(t0 + ms(5100)), &mut out);
        assert_eq!(s.status(), SupervisionStatus::Expired);
    }

    #[test]
    fn after_expiry_the_next_checkpoint_restarts_cleanly() {
        let t0 = Instant::now();
        let mut s = AliveSupervision::new(&spec(0), None, t0);
        let mut out = Vec::new();
        s.settle(incl(t0 + ms(100)), &mut out);
        assert_eq!(s.status(), SupervisionStatus::Expired);
        assert!(!s.checkpoint("other", t0 + ms(500), &mut out));
        assert!(s.checkpoint("tick", t0 + ms(500), &mut out));
        assert_eq!(s.status(), SupervisionStatus::Ok);
        assert_eq!((s.cycle_start(), s.count()), (Some(t0 + ms(500)), 1));
        assert!(out.last().is_some_and(|c| c.reason.contains("restarted")));
    }
}
