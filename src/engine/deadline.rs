//! Deadline supervision: the time from a start checkpoint to an end checkpoint must lie within
//! `min..=max` (the seed's `configure_minimum_time`/`configure_maximum_time`).
//!
//! * **Too early:** the end arrives less than `min` after the start: EXPIRED at once.
//! * **Too late:** no end by `start + max`. It is a deadline of its own, so the engine
//!   detects it when `start + max` passes, not only when the end finally arrives.
//! * **Bounds** are inclusive, as in AUTOSAR: an end at exactly `min` or exactly `max` is in
//!   time. At `start + max` the tie goes to whichever comes first: an end handed in before the
//!   poll at that instant is in time.
//! * A start while a measurement runs starts it afresh (the earlier, unfinished one is
//!   dropped). An end without a start is ignored.
//! * **Recovery:** once EXPIRED, the next start checkpoint restarts the supervision cleanly,
//!   with status OK and a new measurement; ends are ignored until then.

use std::fmt;
use std::time::{Duration, Instant};

use super::spec::{SpecError, SupervisionKind, TimeRange, check_checkpoint, ms, write_conditions};
use super::status::{Horizon, LocalChange, SupervisionStatus, add};

/// The parameters of one deadline supervision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadlineSpec {
    /// The supervision's name, unique in its watchdog.
    pub name: String,
    /// The checkpoint that starts a measurement.
    pub start: String,
    /// The checkpoint that ends it.
    pub end: String,
    /// The accepted time from start to end.
    pub range: TimeRange,
    /// Conditions that must all hold for it to run.
    pub conditions: Vec<String>,
}

impl DeadlineSpec {
    /// A deadline from `start` to `end` within `range`.
    pub fn new(
        name: impl Into<String>,
        start: impl Into<String>,
        end: impl Into<String>,
        range: TimeRange,
    ) -> Self {
        DeadlineSpec {
            name: name.into(),
            start: start.into(),
            end: end.into(),
            range,
            conditions: Vec::new(),
        }
    }

    /// Sets the shortest accepted time (the seed's `configure_minimum_time`).
    pub fn configure_minimum_time(mut self, min: Duration) -> Self {
        self.range.min = min;
        self
    }

    /// Sets the longest accepted time (the seed's `configure_maximum_time`).
    pub fn configure_maximum_time(mut self, max: Duration) -> Self {
        self.range.max = max;
        self
    }

    /// Links a condition (the seed's `link_condition`).
    pub fn link_condition(mut self, condition: impl Into<String>) -> Self {
        self.conditions.push(condition.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        let name = || self.name.clone();
        check_checkpoint(SupervisionKind::Deadline, &self.name, &self.start)?;
        check_checkpoint(SupervisionKind::Deadline, &self.name, &self.end)?;
        if self.start == self.end {
            return Err(SpecError::DeadlineSameCheckpoint {
                name: name(),
                checkpoint: self.start.clone(),
            });
        }
        if self.range.min > self.range.max {
            return Err(SpecError::DeadlineMinAboveMax {
                name: name(),
                range: self.range,
            });
        }
        if self.range.max.is_zero() {
            return Err(SpecError::DeadlineMaxZero { name: name() });
        }
        Ok(())
    }
}

impl fmt::Display for DeadlineSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "deadline: {} -> {} within {}",
            self.start, self.end, self.range
        )?;
        write_conditions(f, &self.conditions)
    }
}

/// The state of one deadline supervision while it is active.
#[derive(Debug, Clone)]
pub(crate) struct DeadlineSupervision {
    spec: DeadlineSpec,
    status: SupervisionStatus,
    started: Option<Instant>,
    last_measured: Option<Duration>,
    last_checkpoint: Option<(bool, Instant)>,
}

impl DeadlineSupervision {
    /// Starts supervising at `now`: waiting for a start checkpoint.
    pub fn new(spec: &DeadlineSpec) -> Self {
        DeadlineSupervision {
            spec: spec.clone(),
            status: SupervisionStatus::Ok,
            started: None,
            last_measured: None,
            last_checkpoint: None,
        }
    }

    /// The parameters.
    pub fn spec(&self) -> &DeadlineSpec {
        &self.spec
    }

    /// OK or EXPIRED.
    pub fn status(&self) -> SupervisionStatus {
        self.status
    }

    /// When the running measurement started.
    pub fn started(&self) -> Option<Instant> {
        self.started
    }

    /// The last complete measurement, start to end.
    pub fn last_measured(&self) -> Option<Duration> {
        self.last_measured
    }

    /// The last of its checkpoints and when it arrived.
    pub fn last_checkpoint(&self) -> Option<(&str, Instant)> {
        self.last_checkpoint.map(|(start, at)| {
            let name = if start {
                &self.spec.start
            } else {
                &self.spec.end
            };
            (name.as_str(), at)
        })
    }

    /// `start + max` while a measurement runs.
    pub fn deadline(&self) -> Option<Instant> {
        self.started.map(|s| add(s, self.spec.range.max))
    }

    /// Forgets any running measurement; status OK.
    pub fn restart(&mut self) {
        self.status = SupervisionStatus::Ok;
        self.started = None;
    }

    /// A checkpoint at `now`; returns whether it is this supervision's.
    pub fn checkpoint(&mut self, name: &str, now: Instant, out: &mut Vec<LocalChange>) -> bool {
        if name == self.spec.start {
            self.last_checkpoint = Some((true, now));
            if self.status == SupervisionStatus::Expired {
                out.push(LocalChange {
                    at: now,
                    from: SupervisionStatus::Expired,
                    to: SupervisionStatus::Ok,
                    reason: format!(
                        "start checkpoint {} arrived: supervision restarted",
                        self.spec.start
                    ),
                });
                self.status = SupervisionStatus::Ok;
            }
            self.started = Some(now);
            return true;
        }
        if name != self.spec.end {
            return false;
        }
        self.last_checkpoint = Some((false, now));
        let Some(start) = self.started.take() else {
            return true;
        };
        let took = now.saturating_duration_since(start);
        self.last_measured = Some(took);
        let verdict = if took < self.spec.range.min {
            "too early"
        } else if took > self.spec.range.max {
            "too late"
        } else {
            return true;
        };
        out.push(LocalChange {
            at: now,
            from: self.status,
            to: SupervisionStatus::Expired,
            reason: format!(
                "end {} {} ms after start {}: {verdict}, expected {}",
                self.spec.end,
                ms(took),
                self.spec.start,
                self.spec.range
            ),
        });
        self.status = SupervisionStatus::Expired;
        true
    }

    /// Expires the supervision if `start + max` is due within `h`.
    pub fn settle(&mut self, h: Horizon, out: &mut Vec<LocalChange>) {
        let Some(due) = self.deadline().filter(|d| h.covers(*d)) else {
            return;
        };
        self.started = None;
        out.push(LocalChange {
            at: due,
            from: self.status,
            to: SupervisionStatus::Expired,
            reason: format!(
                "no end {} within {} ms of start {}: too late, expected {}",
                self.spec.end,
                ms(self.spec.range.max),
                self.spec.start,
                self.spec.range
            ),
        });
        self.status = SupervisionStatus::Expired;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{excl, ms};

    fn spec() -> DeadlineSpec {
        DeadlineSpec::new(
            "req",
            "req-start",
            "req-end",
            TimeRange::new(ms(10), ms(500)),
        )
    }

    #[test]
    fn ends_at_the_exact_bounds() {
        // (end after start, ok): both bounds inclusive.
        let cases = [
            (0, false),
            (9, false),
            (10, true),
            (250, true),
            (500, true),
            (501, false),
        ];
        for (after, ok) in cases {
            let t0 = Instant::now();
            let mut d = DeadlineSupervision::new(&spec());
            let mut out = Vec::new();
            d.checkpoint("req-start", t0, &mut out);
            let end = t0 + ms(after);
            // As the engine does: settle what is due strictly before the event, then apply it.
            d.settle(excl(end), &mut out);
            d.checkpoint("req-end", end, &mut out);
            assert_eq!(
                d.status() == SupervisionStatus::Ok,
                ok,
                "{after} ms: {out:?}"
            );
            if after < 10 {
                assert!(out[0].reason.contains("too early"), "{}", out[0].reason);
                assert!(out[0].reason.contains(&format!("{after} ms after start")));
            }
            if after > 500 {
                assert!(out[0].reason.contains("too late"), "{}", out[0].reason);
                assert_eq!(out[0].at, t0 + ms(500), "detected at start + max");
            }
        }
    }

    #[test]
    fn too_late_is_detected_at_start_plus_max_without_an_end() {
        let t0 = Instant::now();
        let mut d = DeadlineSupervision::new(&spec());
        let mut out = Vec::new();
        d.checkpoint("req-start", t0, &mut out);
        assert_eq!(d.deadline(), Some(t0 + ms(500)));
        d.settle(
            Horizon {
                until: t0 + ms(500),
                inclusive: true,
            },
            &mut out,
        );
        assert_eq!(d.status(), SupervisionStatus::Expired);
        assert!(out[0].reason.contains("no end req-end within 500 ms"));
        assert_eq!(d.deadline(), None);
        // The late end is ignored; the next start restarts cleanly.
        d.checkpoint("req-end", t0 + ms(600), &mut out);
        assert_eq!(out.len(), 1);
        d.checkpoint("req-start", t0 + ms(700), &mut out);
        assert_eq!(d.status(), SupervisionStatus::Ok);
        assert_eq!(d.deadline(), Some(t0 + ms(1200)));
    }

    #[test]
    fn a_second_start_restarts_the_measurement_and_a_lone_end_is_ignored() {
        let t0 = Instant::now();
        let mut d = DeadlineSupervision::new(&spec());
        let mut out = Vec::new();
        assert!(d.checkpoint("req-end", t0, &mut out));
        assert!(out.is_empty());
        d.checkpoint("req-start", t0, &mut out);
        d.checkpoint("req-start", t0 + ms(400), &mut out);
        assert_eq!(d.deadline(), Some(t0 + ms(900)));
        d.checkpoint("req-end", t0 + ms(800), &mut out);
        assert_eq!(d.last_measured(), Some(ms(400)));
        assert!(out.is_empty());
        assert!(!d.checkpoint("other", t0, &mut out));
    }
}
