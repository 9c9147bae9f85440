//! The daemon's limits, in one place, each with why it has its value.

use std::time::Duration;

/// The capacity of a watchdog's channel-event queue: the most events a deadline drains before
/// it is judged. A full queue slows the transports that feed it (a socket stops being read,
/// the vsock device keeps a backlog of its own), never the watchdog; 1,024 events are a few
/// seconds of the worst flood a transport coalesces, drained in well under a millisecond.
pub const EVENT_QUEUE: usize = 1024;

/// Unanswered pulses remembered per connection; older ones are forgotten (their replies are
/// then not measured). At one pulse a second, 16 covers a peer 16 s behind, far past any
/// timeout, while a peer that never replies costs a fixed few hundred bytes.
pub const MAX_UNANSWERED: usize = 16;

/// How long a watchdog task has to answer a control request. A healthy task answers within
/// microseconds (control is served before channel input); two seconds means it is stuck, and
/// `awd status` must say so rather than hang.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
