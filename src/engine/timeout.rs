//! The seed's plain timeout: any input refreshes a timer; silence past `timeout` expires it.
//!
//! * The timer is armed when the supervision starts, so a peer that never speaks is caught too.
//!   The first deadline is `grace` after the start (default: `timeout`), which covers a slow
//!   guest boot; grace applies again on a restart (condition true again, re-enabled) only if
//!   nothing has been heard yet.
//! * `WATCHDOG=trigger` expires it at once: the peer's own failure notification.
//! * `WATCHDOG_USEC=` sets a new timeout within [`TimeoutSpec::bounds`]; outside them the
//!   request is refused with a [`TimeoutRefusal`] and nothing changes, though the line still counts as
//!   input.
//! * `EXTEND_TIMEOUT_USEC=N` (systemd's "the service must send a new message within N µs")
//!   moves this one deadline to `now + N` if that is later than `now + timeout`; the next input
//!   brings back the plain timeout. N above the bounds' maximum is refused with an
//!   [`ExtendRefusal`], so a guest cannot buy itself more silence than `timeout_max` allows.
//! * **Recovery:** once expired it has no deadline and stays expired until the next input,
//!   which re-arms it with a full timeout.

use std::time::{Duration, Instant};

use super::spec::{TimeRange, TimeoutSpec, ms};
use super::status::{Horizon, LocalChange, SupervisionStatus, add};

/// Why a `WATCHDOG_USEC=` was not taken: the timeout asked for lies outside the bounds the
/// configuration allows. The timeout stays as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "WATCHDOG_USEC={} refused: the timeout must lie within {bounds} (it stays {} ms)",
    .requested.as_micros(),
    ms(*.current)
)]
pub struct TimeoutRefusal {
    /// The timeout the peer asked for.
    pub requested: Duration,
    /// The accepted range (`timeout_min..=timeout_max`).
    pub bounds: TimeRange,
    /// The timeout that stays in force.
    pub current: Duration,
}

/// Why an `EXTEND_TIMEOUT_USEC=` was not taken: it asks for more than the longest timeout the
/// configuration allows. The deadline stays `timeout` after the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "EXTEND_TIMEOUT_USEC={} refused: at most {} ms (timeout_max) may be asked for",
    .requested.as_micros(),
    ms(*.max)
)]
pub struct ExtendRefusal {
    /// The extension the peer asked for.
    pub requested: Duration,
    /// The most it may ask for (`timeout_max`, else the timeout).
    pub max: Duration,
}

/// A timer that input refreshes and silence expires. Pure: time comes in as an argument.
#[derive(Debug, Clone)]
pub(crate) struct TimeoutSupervision {
    timeout: Duration,
    grace: Option<Duration>,
    bounds: TimeRange,
    /// When the timer was last (re)started without input: start, condition, enable.
    armed_at: Instant,
    last_input: Option<Instant>,
    /// `None` while expired.
    deadline: Option<Instant>,
    /// The `EXTEND_TIMEOUT_USEC=` behind the current deadline, until the next input.
    extended: Option<Duration>,
    status: SupervisionStatus,
}

impl TimeoutSupervision {
    /// A timer armed at `now`, first due after `grace` (or the timeout when `None`).
    pub fn new(spec: &TimeoutSpec, grace: Option<Duration>, now: Instant) -> Self {
        let mut s = TimeoutSupervision {
            timeout: spec.timeout,
            grace,
            bounds: spec.bounds(),
            armed_at: now,
            last_input: None,
            deadline: None,
            extended: None,
            status: SupervisionStatus::Ok,
        };
        s.restart(now);
        s
    }

    /// OK or EXPIRED.
    pub fn status(&self) -> SupervisionStatus {
        self.status
    }

    /// The current timeout (changed by `WATCHDOG_USEC=`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The accepted `WATCHDOG_USEC=` range.
    pub fn bounds(&self) -> TimeRange {
        self.bounds
    }

    /// The grace for the first deadline.
    pub fn grace(&self) -> Option<Duration> {
        self.grace
    }

    /// When it expires unless input arrives; `None` while expired.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The last input, if any ever arrived.
    pub fn last_input(&self) -> Option<Instant> {
        self.last_input
    }

    /// (Re)starts the timer at `now` without counting it as input: the supervision started,
    /// a condition became true again, or it was re-enabled.
    pub fn restart(&mut self, now: Instant) {
        let first = match self.last_input {
            Some(_) => self.timeout,
            None => self.grace.unwrap_or(self.timeout),
        };
        self.armed_at = now;
        self.deadline = Some(add(now, first));
        self.extended = None;
        self.status = SupervisionStatus::Ok;
    }

    /// Forgets all input: the VM behind the channel started over, so the next (re)start waits
    /// the grace again, as at awd's start.
    pub fn forget_input(&mut self) {
        self.last_input = None;
    }

    /// Notes input at `now` while the supervision is not running (for the snapshot and grace).
    pub fn note_input(&mut self, now: Instant) {
        self.last_input = Some(now);
    }

    /// Input at `now`: pushes the deadline to `now + timeout`, and re-arms after an expiry.
    pub fn input(&mut self, now: Instant, out: &mut Vec<LocalChange>) {
        let silent = now.saturating_duration_since(self.silent_since());
        self.last_input = Some(now);
        self.deadline = Some(add(now, self.timeout));
        self.extended = None;
        if self.status == SupervisionStatus::Expired {
            self.status = SupervisionStatus::Ok;
            out.push(LocalChange {
                at: now,
                from: SupervisionStatus::Expired,
                to: SupervisionStatus::Ok,
                reason: format!("input arrived again after {} ms", ms(silent)),
            });
        }
    }

    /// `WATCHDOG=trigger` at `now`: the peer reports its own failure; expire at once.
    pub fn trigger(&mut self, now: Instant, out: &mut Vec<LocalChange>) {
        self.last_input = Some(now);
        self.deadline = None;
        if self.status != SupervisionStatus::Expired {
            out.push(LocalChange {
                at: now,
                from: self.status,
                to: SupervisionStatus::Expired,
                reason: "the peer reported a failure (WATCHDOG=trigger)".into(),
            });
            self.status = SupervisionStatus::Expired;
        }
    }

    /// `WATCHDOG_USEC=`: takes `timeout` if it lies within the bounds, else says why not. The
    /// caller counts the line as input afterwards either way.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), TimeoutRefusal> {
        if self.bounds.contains(timeout) {
            self.timeout = timeout;
            Ok(())
        } else {
            Err(TimeoutRefusal {
                requested: timeout,
                bounds: self.bounds,
                current: self.timeout,
            })
        }
    }

    /// `EXTEND_TIMEOUT_USEC=` at `now`, after the line was taken as input: the deadline becomes
    /// `now + by` if that is later. Refused (nothing changes) above the bounds' maximum.
    pub fn extend(&mut self, now: Instant, by: Duration) -> Result<(), ExtendRefusal> {
        let max = self.bounds.max;
        if by > max {
            return Err(ExtendRefusal { requested: by, max });
        }
        let until = add(now, by);
        if let Some(d) = self.deadline
            && until > d
        {
            self.deadline = Some(until);
            self.extended = Some(by);
        }
        Ok(())
    }

    /// Expires the timer if its deadline is due within `h`.
    pub fn settle(&mut self, h: Horizon, out: &mut Vec<LocalChange>) {
        let Some(d) = self.deadline.filter(|d| h.covers(*d)) else {
            return;
        };
        let silent = d.saturating_duration_since(self.silent_since());
        let reason = match (self.last_input, self.extended) {
            (Some(_), Some(by)) => format!(
                "silent for {} ms, past the {} ms its EXTEND_TIMEOUT_USEC= asked for (timeout {} ms)",
                ms(silent),
                ms(by),
                ms(self.timeout)
            ),
            (Some(_), None) => format!(
                "silent for {} ms, timeout {} ms",
                ms(silent),
                ms(self.timeout)
            ),
            (None, _) => format!("nothing received in the {} ms since start", ms(silent)),
        };
        self.deadline = None;
        self.extended = None;
        self.status = SupervisionStatus::Expired;
        out.push(LocalChange {
            at: d,
            from: SupervisionStatus::Ok,
            to: SupervisionStatus::Expired,
            reason,
        });
    }

    /// Silence is measured from the last input, or from the last restart if that is later
    /// (time spent paused is not silence).
    fn silent_since(&self) -> Instant {
        match self.last_input {
            Some(t) if t > self.armed_at => t,
            _ => self.armed_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{incl, ms};

    const T: Duration = Duration::from_millis(5000);

    fn sup(grace: Option<Duration>, t0: Instant) -> TimeoutSupervision {
        TimeoutSupervision::new(&TimeoutSpec::new(T), grace, t0)
    }

    #[test]
    fn armed_at_start_catches_a_peer_that_never_speaks() {
        let t0 = Instant::now();
        let mut s = sup(None, t0);
        let mut out = Vec::new();
        assert_eq!(s.deadline(), Some(t0 + T));
        s.settle(incl(t0 + ms(4999)), &mut out);
        assert!(out.is_empty());
        s.settle(incl(t0 + T), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].at, t0 + T);
        assert!(
            out[0].reason.contains("nothing received in the 5000 ms"),
            "{}",
            out[0].reason
        );
    }

    #[test]
    fn input_refreshes_expiry_fires_once_and_input_rearms() {
        let t0 = Instant::now();
        let mut s = sup(None, t0);
        let mut out = Vec::new();
        s.input(t0 + ms(3000), &mut out);
        s.settle(incl(t0 + ms(7999)), &mut out);
        assert!(out.is_empty());
        s.settle(incl(t0 + ms(20_000)), &mut out);
        assert_eq!(out.len(), 1, "fires once");
        assert_eq!(out[0].at, t0 + ms(8000), "stamped at the deadline");
        assert!(out[0].reason.contains("silent for 5000 ms"));
        s.settle(incl(t0 + ms(30_000)), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(s.deadline(), None);
        s.input(t0 + ms(31_000), &mut out);
        assert_eq!(out[1].to, SupervisionStatus::Ok);
        assert_eq!(s.deadline(), Some(t0 + ms(36_000)));
    }

    #[test]
    fn grace_covers_the_first_input_only_and_returns_on_restart_while_unheard() {
        let t0 = Instant::now();
        let mut s = sup(Some(ms(30_000)), t0);
        assert_eq!(s.deadline(), Some(t0 + ms(30_000)));
        s.restart(t0 + ms(1000));
        assert_eq!(s.deadline(), Some(t0 + ms(31_000)), "nothing heard yet");
        s.input(t0 + ms(20_000), &mut Vec::new());
        assert_eq!(s.deadline(), Some(t0 + ms(25_000)));
        s.restart(t0 + ms(40_000));
        assert_eq!(s.deadline(), Some(t0 + ms(45_000)), "heard: plain timeout");
    }

    #[test]
    fn an_extension_holds_one_deadline_within_timeout_max_and_the_next_input_ends_it() {
        let t0 = Instant::now();
        let spec = TimeoutSpec {
            max: Some(ms(60_000)),
            ..TimeoutSpec::new(T)
        };
        let mut s = TimeoutSupervision::new(&spec, None, t0);
        let mut out = Vec::new();
        s.input(t0 + ms(1000), &mut out);
        s.extend(t0 + ms(1000), ms(30_000)).unwrap();
        assert_eq!(s.deadline(), Some(t0 + ms(31_000)));
        s.extend(t0 + ms(1000), ms(2000)).unwrap();
        assert_eq!(s.deadline(), Some(t0 + ms(31_000)), "never shortens");
        let err = s.extend(t0 + ms(1000), ms(60_001)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "EXTEND_TIMEOUT_USEC=60001000 refused: at most 60000 ms (timeout_max) may be asked for"
        );
        assert_eq!(
            s.deadline(),
            Some(t0 + ms(31_000)),
            "a refusal changes nothing"
        );
        s.settle(incl(t0 + ms(30_999)), &mut out);
        assert!(out.is_empty());
        s.settle(incl(t0 + ms(31_000)), &mut out);
        assert_eq!(out.len(), 1);
        assert!(
            out[0]
                .reason
                .contains("past the 30000 ms its EXTEND_TIMEOUT_USEC= asked for"),
            "{}",
            out[0].reason
        );
        // Input ends an extension: the plain timeout is back.
        s.input(t0 + ms(40_000), &mut out);
        s.extend(t0 + ms(40_000), ms(20_000)).unwrap();
        s.input(t0 + ms(41_000), &mut out);
        assert_eq!(s.deadline(), Some(t0 + ms(46_000)));
        // Without timeout_max nothing beyond the timeout may be asked for.
        let mut plain = sup(None, t0);
        assert!(plain.extend(t0, T).is_ok());
        assert!(plain.extend(t0, T + ms(1)).is_err());
    }

    #[test]
    fn set_timeout_respects_bounds_inclusively() {
        let t0 = Instant::now();
        let spec = TimeoutSpec {
            min: Some(ms(1000)),
            max: Some(ms(60_000)),
            ..TimeoutSpec::new(T)
        };
        let mut s = TimeoutSupervision::new(&spec, None, t0);
        assert!(s.set_timeout(ms(1000)).is_ok());
        assert!(s.set_timeout(ms(60_000)).is_ok());
        let err = s.set_timeout(ms(60_001)).unwrap_err().to_string();
        assert!(err.contains("1000..=60000 ms"), "{err}");
        assert!(err.contains("it stays 60000 ms"), "{err}");
        assert!(s.set_timeout(ms(999)).is_err());
        assert_eq!(s.timeout(), ms(60_000));
        let mut unbounded = sup(None, t0);
        assert!(unbounded.set_timeout(ms(10)).is_ok(), "shortening is fine");
        assert!(unbounded.set_timeout(ms(5001)).is_err(), "loosening is not");
    }
}
