//! Why the engine refused an event: one [`Refusal`] per reason, each with the one-line message
//! the log shows and a stable [`RefusalReason`] that metrics count by and the control socket
//! answers with.
//!
//! A refused event changes nothing but what it always does: a line from the peer still counts
//! as input for the plain timeout.

use std::fmt;

pub use super::conditions::ConditionRefusal;
pub use super::timeout::{ExtendRefusal, TimeoutRefusal};

/// Why [`WatchdogEngine::handle`](super::WatchdogEngine::handle) refused an event (or the part
/// of it that was more than input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `CONDITION=` or `awd condition` named a condition that is not declared, or one that
    /// belongs to another setter.
    #[error(transparent)]
    Condition(#[from] ConditionRefusal),
    /// `WATCHDOG_USEC=` asked for a timeout outside the configured bounds.
    #[error(transparent)]
    Timeout(#[from] TimeoutRefusal),
    /// `EXTEND_TIMEOUT_USEC=` asked for more than the longest timeout allowed.
    #[error(transparent)]
    Extend(#[from] ExtendRefusal),
    /// `WATCHDOG=trigger` while the plain timeout is deactivated: nothing is supervising, so
    /// there is nothing to expire.
    #[error("WATCHDOG=trigger refused: the plain timeout is deactivated")]
    TriggerDeactivated,
    /// `awd enable`/`disable` named a supervision the watchdog does not have.
    #[error("no supervision {name} in this watchdog (it has {})", known.join(", "))]
    UnknownSupervision {
        /// The name asked for.
        name: String,
        /// The watchdog's supervisions, plain timeout first.
        known: Vec<String>,
    },
}

impl Refusal {
    /// The reason, for counting and for machines.
    pub fn reason(&self) -> RefusalReason {
        match self {
            Refusal::Condition(ConditionRefusal::Unknown { .. }) => RefusalReason::UnknownCondition,
            Refusal::Condition(ConditionRefusal::WrongSetter { .. }) => RefusalReason::WrongSetter,
            Refusal::Timeout(_) | Refusal::Extend(_) => RefusalReason::TimeoutOutOfBounds,
            Refusal::TriggerDeactivated => RefusalReason::TriggerDeactivated,
            Refusal::UnknownSupervision { .. } => RefusalReason::UnknownSupervision,
        }
    }

    /// The reason as a stable snake_case name (a metric label, a control-socket error code).
    pub fn as_str(&self) -> &'static str {
        self.reason().as_str()
    }
}

/// The kinds of [`Refusal`], without their details: a fixed set that metrics pre-register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalReason {
    /// A condition nobody declared.
    UnknownCondition,
    /// A condition set by someone other than its setter.
    WrongSetter,
    /// A `WATCHDOG_USEC=` outside the bounds, or an `EXTEND_TIMEOUT_USEC=` above them.
    TimeoutOutOfBounds,
    /// A `WATCHDOG=trigger` while the plain timeout is deactivated.
    TriggerDeactivated,
    /// An enable or disable of a supervision the watchdog does not have.
    UnknownSupervision,
}

impl RefusalReason {
    /// Every reason, in a fixed order (the index metrics keep their counters by).
    pub const ALL: [RefusalReason; 5] = [
        RefusalReason::UnknownCondition,
        RefusalReason::WrongSetter,
        RefusalReason::TimeoutOutOfBounds,
        RefusalReason::TriggerDeactivated,
        RefusalReason::UnknownSupervision,
    ];

    /// A stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::UnknownCondition => "unknown_condition",
            RefusalReason::WrongSetter => "wrong_setter",
            RefusalReason::TimeoutOutOfBounds => "timeout_out_of_bounds",
            RefusalReason::TriggerDeactivated => "trigger_deactivated",
            RefusalReason::UnknownSupervision => "unknown_supervision",
        }
    }

    /// Its position in [`ALL`](Self::ALL).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_place_and_a_distinct_name() {
        for (i, r) in RefusalReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r}");
        }
        let names: std::collections::BTreeSet<_> =
            RefusalReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), RefusalReason::ALL.len());
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
    }

    #[test]
    fn a_wrapped_refusal_reads_as_its_cause_and_is_counted_by_it() {
        let r = Refusal::from(ConditionRefusal::WrongSetter {
            name: "vm-running".into(),
            owner: crate::engine::Setter::Vm,
            by: crate::engine::Setter::Guest,
        });
        assert_eq!(
            r.to_string(),
            "condition vm-running refused: it is set by the vm, not by the guest"
        );
        assert_eq!(r.as_str(), "wrong_setter");
        let r = Refusal::UnknownSupervision {
            name: "nope".into(),
            known: vec!["timeout".into(), "loop".into()],
        };
        assert_eq!(
            r.to_string(),
            "no supervision nope in this watchdog (it has timeout, loop)"
        );
        assert_eq!(r.reason(), RefusalReason::UnknownSupervision);
    }
}
