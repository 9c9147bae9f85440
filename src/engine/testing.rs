//! Helpers the engine's unit tests share: durations in milliseconds and the two kinds of
//! horizon.

use std::time::Instant;

use super::status::Horizon;
pub use crate::util::ms;

/// A horizon that covers a deadline at exactly `t` (how `poll` settles).
pub fn incl(t: Instant) -> Horizon {
    Horizon {
        until: t,
        inclusive: true,
    }
}

/// A horizon that does not cover a deadline at exactly `t` (input at that instant wins).
pub fn excl(t: Instant) -> Horizon {
    Horizon {
        until: t,
        inclusive: false,
    }
}
