//! The seed's plain timeout: any input refreshes a timer; silence past `timeout` expires it.

use std::time::{Duration, Instant};

/// What a [`TimeoutSupervision`] reports when its state changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutChange {
    /// The deadline passed with no input. `silent_for` is measured from the last input, or from
    /// the start when nothing ever arrived.
    Expired {
        /// How long the channel had been silent when the expiry was noticed.
        silent_for: Duration,
        /// Whether any input had ever arrived.
        ever_heard: bool,
    },
    /// Input arrived after an expiry: the timer runs again.
    Rearmed,
}

/// A timer that input refreshes and silence expires. Pure: time comes in as an argument.
///
/// The timer is armed at creation, so a peer that never connects is caught too. The first
/// deadline is `grace` after creation (default: `timeout`), which covers a slow guest boot. After
/// an expiry the supervision stays expired, with no deadline, until input re-arms it.
#[derive(Debug, Clone)]
pub struct TimeoutSupervision {
    timeout: Duration,
    started: Instant,
    last_input: Option<Instant>,
    deadline: Instant,
    expired: bool,
}

impl TimeoutSupervision {
    /// Arms a timer at `now`, first due after `grace` (or `timeout` when `None`).
    pub fn new(timeout: Duration, grace: Option<Duration>, now: Instant) -> Self {
        TimeoutSupervision {
            timeout,
            started: now,
            last_input: None,
            deadline: now + grace.unwrap_or(timeout),
            expired: false,
        }
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the timeout (a guest's `WATCHDOG_USEC=`). The running deadline moves with it,
    /// measured from the last input.
    pub fn set_timeout(&mut self, timeout: Duration, now: Instant) {
        self.timeout = timeout;
        if !self.expired {
            let from = self.last_input.unwrap_or(now);
            self.deadline = from + timeout;
        }
    }

    /// Records input at `now`: pushes the deadline to `now + timeout`.
    pub fn input(&mut self, now: Instant) -> Option<TimeoutChange> {
        self.last_input = Some(now);
        self.deadline = now + self.timeout;
        if self.expired {
            self.expired = false;
            Some(TimeoutChange::Rearmed)
        } else {
            None
        }
    }

    /// Restarts the timer at `now` with a full timeout, without counting it as input (a
    /// condition became true again, or the supervision was re-enabled).
    pub fn restart(&mut self, now: Instant) {
        self.deadline = now + self.timeout;
        self.expired = false;
    }

    /// Checks the deadline against `now`. Reports an expiry once; later polls return `None`
    /// until input re-arms the timer.
    pub fn poll(&mut self, now: Instant) -> Option<TimeoutChange> {
        if self.expired || now < self.deadline {
            return None;
        }
        self.expired = true;
        let since = self.last_input.unwrap_or(self.started);
        Some(TimeoutChange::Expired {
            silent_for: now.saturating_duration_since(since),
            ever_heard: self.last_input.is_some(),
        })
    }

    /// When [`poll`](Self::poll) will next report something, or `None` while expired.
    pub fn deadline(&self) -> Option<Instant> {
        (!self.expired).then_some(self.deadline)
    }

    /// Whether the timer has expired and not been re-armed.
    pub fn is_expired(&self) -> bool {
        self.expired
    }

    /// The time of the last input, if any arrived.
    pub fn last_input(&self) -> Option<Instant> {
        self.last_input
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(5000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn armed_at_start_catches_a_peer_that_never_speaks() {
        let t0 = Instant::now();
        let mut s = TimeoutSupervision::new(T, None, t0);
        assert_eq!(s.deadline(), Some(t0 + T));
        assert_eq!(s.poll(t0 + ms(4999)), None);
        assert_eq!(
            s.poll(t0 + T),
            Some(TimeoutChange::Expired {
                silent_for: T,
                ever_heard: false
            })
        );
    }

    #[test]
    fn input_refreshes_and_expiry_fires_once() {
        let t0 = Instant::now();
        let mut s = TimeoutSupervision::new(T, None, t0);
        assert_eq!(s.input(t0 + ms(3000)), None);
        assert_eq!(s.poll(t0 + ms(7999)), None);
        assert_eq!(
            s.poll(t0 + ms(8000)),
            Some(TimeoutChange::Expired {
                silent_for: T,
                ever_heard: true
            })
        );
        assert_eq!(s.poll(t0 + ms(20000)), None, "fires once");
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn input_after_expiry_rearms() {
        let t0 = Instant::now();
        let mut s = TimeoutSupervision::new(T, None, t0);
        assert!(s.poll(t0 + T).is_some());
        assert_eq!(s.input(t0 + ms(9000)), Some(TimeoutChange::Rearmed));
        assert_eq!(s.deadline(), Some(t0 + ms(14000)));
        assert!(s.poll(t0 + ms(14000)).is_some(), "fires again after re-arm");
    }

    #[test]
    fn grace_covers_the_first_heartbeat_only() {
        let t0 = Instant::now();
        let mut s = TimeoutSupervision::new(T, Some(ms(30000)), t0);
        assert_eq!(s.poll(t0 + ms(29999)), None);
        s.input(t0 + ms(20000));
        assert_eq!(
            s.deadline(),
            Some(t0 + ms(25000)),
            "after the first input, plain timeout"
        );
    }

    #[test]
    fn set_timeout_moves_the_running_deadline() {
        let t0 = Instant::now();
        let mut s = TimeoutSupervision::new(T, None, t0);
        s.input(t0 + ms(1000));
        s.set_timeout(ms(2000), t0 + ms(1500));
        assert_eq!(s.deadline(), Some(t0 + ms(3000)));
    }
}
