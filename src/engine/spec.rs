//! What an engine is built from, and the seed's `check_configuration`.
//!
//! An [`EngineSpec`] holds every supervision of one watchdog: the plain timeout (always there),
//! the alive, deadline and logical supervisions, the conditions that can be linked to them, and
//! the expired tolerance. [`EngineSpec::validate`] refuses a spec that could never supervise
//! what it says, with one error per problem and a one-line message that names the supervision.
//! `awd check`, `awd run` and the client's local mode all go through it.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::alive::AliveSpec;
use super::deadline::DeadlineSpec;
use super::logical::LogicalSpec;
use crate::util::valid_name;

/// The name of the plain timeout supervision, as `awd enable WATCHDOG/timeout` and the status
/// show it. No other supervision may take it.
pub const TIMEOUT_NAME: &str = "timeout";

/// The built-in condition that follows the VM's run state (QMP `STOP`, `RESUME`, `SHUTDOWN`,
/// migration). It is always declared, starts true unless the spec says otherwise, and only
/// [`Setter::Vm`] may change it.
pub const VM_RUNNING: &str = "vm-running";

/// A range of accepted durations, `min..=max`, both ends inclusive as in AUTOSAR.
///
/// Named after S-CORE's `health_monitoring_lib::TimeRange`. It is not checked on creation;
/// [`EngineSpec::validate`] refuses `min > max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct TimeRange {
    /// The shortest accepted duration.
    #[serde(rename = "min_ms", serialize_with = "ser_ms")]
    pub min: Duration,
    /// The longest accepted duration.
    #[serde(rename = "max_ms", serialize_with = "ser_ms")]
    pub max: Duration,
}

impl TimeRange {
    /// The range `min..=max`.
    pub const fn new(min: Duration, max: Duration) -> Self {
        TimeRange { min, max }
    }

    /// Whether `d` lies in the range, ends included.
    pub fn contains(&self, d: Duration) -> bool {
        self.min <= d && d <= self.max
    }
}

impl fmt::Display for TimeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={} ms", ms(self.min), ms(self.max))
    }
}

/// The kinds of supervision, for messages, the status table and the JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SupervisionKind {
    /// The seed's plain timeout: any input refreshes it.
    Timeout,
    /// Alive supervision: a checkpoint counted per reference cycle.
    Alive,
    /// Deadline supervision: the time between a start and an end checkpoint.
    Deadline,
    /// Logical supervision: the order of checkpoints.
    Logical,
}

impl SupervisionKind {
    /// A stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            SupervisionKind::Timeout => "timeout",
            SupervisionKind::Alive => "alive",
            SupervisionKind::Deadline => "deadline",
            SupervisionKind::Logical => "logical",
        }
    }
}

impl fmt::Display for SupervisionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who may set a condition. Each condition has exactly one setter, so a guest cannot switch
/// off its own supervision by clearing a condition meant for the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Setter {
    /// The VM's run state, from QMP events (only [`VM_RUNNING`]).
    Vm,
    /// The supervised guest, with a `CONDITION=name=1|0` line.
    Guest,
    /// The operator, through the control socket.
    Operator,
}

impl Setter {
    /// A stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Setter::Vm => "vm",
            Setter::Guest => "guest",
            Setter::Operator => "operator",
        }
    }
}

impl fmt::Display for Setter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A condition that supervisions can be linked to: its name, its value at start and who sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionSpec {
    /// The name, as in `CONDITION=name=1`.
    pub name: String,
    /// The value before anything sets it.
    pub initial: bool,
    /// The only party that may change it.
    pub set_by: Setter,
}

impl ConditionSpec {
    /// A condition called `name` that `set_by` sets, starting at `initial`.
    pub fn new(name: impl Into<String>, initial: bool, set_by: Setter) -> Self {
        ConditionSpec {
            name: name.into(),
            initial,
            set_by,
        }
    }
}

impl fmt::Display for ConditionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (set by the {}, initially {})",
            self.name, self.set_by, self.initial
        )
    }
}

/// The plain timeout: any input refreshes it, silence past `timeout` expires it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeoutSpec {
    /// Silence before expiry.
    pub timeout: Duration,
    /// The shortest timeout a peer may ask for with `WATCHDOG_USEC=`; `None`: no lower bound.
    pub min: Option<Duration>,
    /// The longest timeout a peer may ask for; `None`: `timeout` itself, so a peer can only
    /// tighten its supervision, never loosen it.
    pub max: Option<Duration>,
    /// Conditions that must all hold for the timeout to run.
    pub conditions: Vec<String>,
}

impl TimeoutSpec {
    /// A plain timeout with no bounds and no conditions.
    pub fn new(timeout: Duration) -> Self {
        TimeoutSpec {
            timeout,
            min: None,
            max: None,
            conditions: Vec::new(),
        }
    }

    /// The accepted `WATCHDOG_USEC=` range, after defaults.
    pub fn bounds(&self) -> TimeRange {
        TimeRange::new(
            self.min.unwrap_or(Duration::from_nanos(1)),
            self.max.unwrap_or(self.timeout),
        )
    }
}

impl fmt::Display for TimeoutSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timeout {} ms", ms(self.timeout))?;
        match (self.min, self.max) {
            (None, None) => write!(f, ", WATCHDOG_USEC may only shorten it")?,
            (min, _) => write!(
                f,
                ", WATCHDOG_USEC within {}..={} ms",
                min.map_or(0, ms),
                ms(self.bounds().max)
            )?,
        }
        write_conditions(f, &self.conditions)
    }
}

/// Every supervision of one watchdog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSpec {
    /// The plain timeout, named [`TIMEOUT_NAME`].
    pub plain: TimeoutSpec,
    /// The first deadline of the plain timeout and the latest start of each alive
    /// supervision's first cycle, when a slow boot needs longer than usual. It applies when a
    /// supervision starts and has never heard from the guest.
    pub grace: Option<Duration>,
    /// Alive supervisions.
    pub alive: Vec<AliveSpec>,
    /// Deadline supervisions.
    pub deadline: Vec<DeadlineSpec>,
    /// Logical supervisions.
    pub logical: Vec<LogicalSpec>,
    /// Conditions besides the built-in [`VM_RUNNING`] (which may be listed to change its
    /// initial value).
    pub conditions: Vec<ConditionSpec>,
    /// How long the watchdog may stay EXPIRED before it becomes STOPPED; `None`: never.
    pub expired_tolerance: Option<Duration>,
}

impl EngineSpec {
    /// The seed's watchdog: a plain timeout and nothing else.
    pub fn plain(timeout: Duration) -> Self {
        EngineSpec {
            plain: TimeoutSpec::new(timeout),
            grace: None,
            alive: Vec::new(),
            deadline: Vec::new(),
            logical: Vec::new(),
            conditions: Vec::new(),
            expired_tolerance: None,
        }
    }

    /// The conditions an engine will know: the declared ones, plus [`VM_RUNNING`] (true at
    /// start) unless declared.
    pub fn all_conditions(&self) -> Vec<ConditionSpec> {
        let mut all = self.conditions.clone();
        if !all.iter().any(|c| c.name == VM_RUNNING) {
            all.insert(0, ConditionSpec::new(VM_RUNNING, true, Setter::Vm));
        }
        all
    }

    /// Every supervision's kind, name and linked conditions, the plain timeout first.
    pub fn supervisions(&self) -> impl Iterator<Item = (SupervisionKind, &str, &[String])> {
        let plain = std::iter::once((
            SupervisionKind::Timeout,
            TIMEOUT_NAME,
            self.plain.conditions.as_slice(),
        ));
        let alive = self.alive.iter().map(|s| {
            (
                SupervisionKind::Alive,
                s.name.as_str(),
                s.conditions.as_slice(),
            )
        });
        let deadline = self.deadline.iter().map(|s| {
            (
                SupervisionKind::Deadline,
                s.name.as_str(),
                s.conditions.as_slice(),
            )
        });
        let logical = self.logical.iter().map(|s| {
            (
                SupervisionKind::Logical,
                s.name.as_str(),
                s.conditions.as_slice(),
            )
        });
        plain.chain(alive).chain(deadline).chain(logical)
    }

    /// The seed's `check_configuration`: the first problem found, or `Ok`.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_plain()?;
        let mut names = BTreeSet::new();
        for (kind, name, _) in self.supervisions() {
            if !valid_name(name) {
                return Err(SpecError::NameInvalid {
                    kind,
                    name: name.to_owned(),
                });
            }
            if !names.insert(name) {
                return Err(SpecError::NameDuplicate {
                    kind,
                    name: name.to_owned(),
                });
            }
        }
        for s in &self.alive {
            s.validate()?;
        }
        for s in &self.deadline {
            s.validate()?;
        }
        for s in &self.logical {
            s.validate()?;
        }
        self.validate_conditions()
    }

    fn validate_plain(&self) -> Result<(), SpecError> {
        let p = &self.plain;
        if p.timeout.is_zero() {
            return Err(SpecError::TimeoutZero);
        }
        if let (Some(min), Some(max)) = (p.min, p.max)
            && min > max
        {
            return Err(SpecError::TimeoutBoundsInverted { min, max });
        }
        let bounds = p.bounds();
        if !bounds.contains(p.timeout) {
            return Err(SpecError::TimeoutOutsideBounds {
                timeout: p.timeout,
                bounds,
            });
        }
        Ok(())
    }

    fn validate_conditions(&self) -> Result<(), SpecError> {
        let mut declared = BTreeSet::new();
        for c in &self.conditions {
            if !valid_name(&c.name) {
                return Err(SpecError::ConditionInvalid {
                    name: c.name.clone(),
                });
            }
            if !declared.insert(c.name.as_str()) {
                return Err(SpecError::ConditionDuplicate {
                    name: c.name.clone(),
                });
            }
            if (c.name == VM_RUNNING) != (c.set_by == Setter::Vm) {
                return Err(SpecError::ConditionSetter {
                    name: c.name.clone(),
                    set_by: c.set_by,
                });
            }
        }
        declared.insert(VM_RUNNING);
        for (kind, name, linked) in self.supervisions() {
            if let Some(c) = linked.iter().find(|c| !declared.contains(c.as_str())) {
                return Err(SpecError::ConditionUnset {
                    kind,
                    name: name.to_owned(),
                    condition: c.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Why an [`EngineSpec`] was refused. Each message is one line and names the supervision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The plain timeout is zero.
    #[error("timeout: timeout=0: give at least 1 ms")]
    TimeoutZero,
    /// The `WATCHDOG_USEC=` bounds are the wrong way round.
    #[error(
        "timeout: timeout_min={} ms is greater than timeout_max={} ms",
        ms(*.min),
        ms(*.max)
    )]
    TimeoutBoundsInverted {
        /// The lower bound.
        min: Duration,
        /// The upper bound.
        max: Duration,
    },
    /// The configured timeout is not one a peer could ask for.
    #[error(
        "timeout: timeout={} ms lies outside timeout_min..=timeout_max ({bounds})",
        ms(*.timeout)
    )]
    TimeoutOutsideBounds {
        /// The timeout.
        timeout: Duration,
        /// The bounds.
        bounds: TimeRange,
    },
    /// A supervision name that the protocol and `awd enable W/S` cannot carry.
    #[error("{}: a name holds 1 to 64 of A-Z a-z 0-9 _ . : -", label(*.kind, .name))]
    NameInvalid {
        /// Its kind.
        kind: SupervisionKind,
        /// The name.
        name: String,
    },
    /// Two supervisions of a watchdog share a name (`timeout` is the plain timeout's).
    #[error("{}: the name is already taken in this watchdog", label(*.kind, .name))]
    NameDuplicate {
        /// Its kind.
        kind: SupervisionKind,
        /// The name.
        name: String,
    },
    /// A checkpoint name the protocol cannot carry.
    #[error(
        "{}: checkpoint '{checkpoint}': a name holds 1 to 64 of A-Z a-z 0-9 _ . : -",
        label(*.kind, .name)
    )]
    CheckpointInvalid {
        /// The supervision's kind.
        kind: SupervisionKind,
        /// The supervision.
        name: String,
        /// The checkpoint.
        checkpoint: String,
    },
    /// An alive supervision with a zero reference cycle.
    #[error("alive '{name}': cycle=0: give at least 1 ms")]
    AliveCycleZero {
        /// The supervision.
        name: String,
    },
    /// An alive supervision that expects no checkpoint at all.
    #[error("alive '{name}': expected=0: expect at least 1 checkpoint per cycle")]
    AliveExpectedZero {
        /// The supervision.
        name: String,
    },
    /// The expected count lies outside its margins: the minimum count would be negative.
    #[error(
        "alive '{name}': expected={expected} lies outside its margins: min_margin={min_margin} \
         would make the minimum count negative"
    )]
    AliveMarginTooWide {
        /// The supervision.
        name: String,
        /// The expected count.
        expected: u32,
        /// The margin below it.
        min_margin: u32,
    },
    /// A deadline supervision with a zero maximum.
    #[error("deadline '{name}': max=0: give at least 1 ms")]
    DeadlineMaxZero {
        /// The supervision.
        name: String,
    },
    /// A deadline supervision whose minimum is above its maximum.
    #[error(
        "deadline '{name}': min={} ms is greater than max={} ms",
        ms(.range.min),
        ms(.range.max)
    )]
    DeadlineMinAboveMax {
        /// The supervision.
        name: String,
        /// The range.
        range: TimeRange,
    },
    /// A deadline supervision that starts and ends at the same checkpoint.
    #[error("deadline '{name}': start and end are both checkpoint '{checkpoint}'")]
    DeadlineSameCheckpoint {
        /// The supervision.
        name: String,
        /// The checkpoint.
        checkpoint: String,
    },
    /// A logical supervision without an entry point.
    #[error("logical '{name}': no entry point")]
    LogicalNoEntry {
        /// The supervision.
        name: String,
    },
    /// An entry, an exit or a transition names a checkpoint not in the declared list.
    #[error("logical '{name}': {place} names undeclared checkpoint '{checkpoint}'")]
    LogicalUndeclared {
        /// The supervision.
        name: String,
        /// Where: `entry`, `exit` or `transition a -> b`.
        place: String,
        /// The checkpoint.
        checkpoint: String,
    },
    /// An exit point that no walk from an entry point reaches.
    #[error("logical '{name}': exit point '{exit}' is unreachable from every entry point")]
    LogicalExitUnreachable {
        /// The supervision.
        name: String,
        /// The exit point.
        exit: String,
    },
    /// A transition out of an exit point, which can never be taken: the sequence ends there.
    #[error(
        "logical '{name}': transition {from} -> {to} leaves exit point '{from}', where the \
         sequence ends"
    )]
    LogicalTransitionFromExit {
        /// The supervision.
        name: String,
        /// The exit point.
        from: String,
        /// The target.
        to: String,
    },
    /// A condition name the protocol cannot carry.
    #[error("condition '{name}': a name holds 1 to 64 of A-Z a-z 0-9 _ . : -")]
    ConditionInvalid {
        /// The condition.
        name: String,
    },
    /// A condition declared twice.
    #[error("condition '{name}' is declared twice")]
    ConditionDuplicate {
        /// The condition.
        name: String,
    },
    /// `vm-running` with another setter, or another condition claiming the VM as setter.
    #[error(
        "condition '{name}': only the built-in vm-running is set by the vm, and only by it \
         (declared: set by the {set_by})"
    )]
    ConditionSetter {
        /// The condition.
        name: String,
        /// The setter given.
        set_by: Setter,
    },
    /// A supervision is linked to a condition that nothing sets.
    #[error(
        "{}: linked condition '{condition}' is set by nothing (declare it as a guest or \
         operator condition)",
        label(*.kind, .name)
    )]
    ConditionUnset {
        /// The supervision's kind.
        kind: SupervisionKind,
        /// The supervision.
        name: String,
        /// The condition.
        condition: String,
    },
}

/// How messages name a supervision: `alive 'main-loop'`, or just `timeout` for the plain one.
fn label(kind: SupervisionKind, name: &str) -> String {
    match kind {
        SupervisionKind::Timeout if name == TIMEOUT_NAME => TIMEOUT_NAME.to_owned(),
        _ => format!("{kind} '{name}'"),
    }
}

/// Whole milliseconds, for messages.
pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(ms(*d))
}

/// Appends `, conditions a, b` when there are linked conditions.
pub(crate) fn write_conditions(f: &mut fmt::Formatter<'_>, c: &[String]) -> fmt::Result {
    if c.is_empty() {
        Ok(())
    } else {
        write!(f, ", conditions {}", c.join(", "))
    }
}

/// Checks a checkpoint name of supervision `name`.
pub(crate) fn check_checkpoint(
    kind: SupervisionKind,
    name: &str,
    checkpoint: &str,
) -> Result<(), SpecError> {
    if valid_name(checkpoint) {
        Ok(())
    } else {
        Err(SpecError::CheckpointInvalid {
            kind,
            name: name.to_owned(),
            checkpoint: checkpoint.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn with(f: impl FnOnce(&mut EngineSpec)) -> Result<(), SpecError> {
        let mut spec = EngineSpec::plain(ms(1000));
        f(&mut spec);
        spec.validate()
    }

    #[test]
    fn the_plain_spec_and_vm_running_are_valid_and_time_ranges_are_inclusive() {
        assert_eq!(with(|_| {}), Ok(()));
        let spec = EngineSpec::plain(ms(1000));
        assert_eq!(
            spec.all_conditions(),
            [ConditionSpec::new(VM_RUNNING, true, Setter::Vm)]
        );
        let r = TimeRange::new(ms(10), ms(20));
        assert!(r.contains(ms(10)) && r.contains(ms(20)));
        assert!(!r.contains(ms(9)) && !r.contains(ms(21)));
        assert_eq!(r.to_string(), "10..=20 ms");
    }

    #[test]
    fn check_configuration_names_what_is_wrong() {
        fn alive() -> AliveSpec {
            AliveSpec::new("loop", "tick", ms(100), 10)
        }
        fn deadline() -> DeadlineSpec {
            DeadlineSpec::new("req", "s", "e", TimeRange::new(ms(10), ms(500)))
        }
        type Case = (Box<dyn FnOnce(&mut EngineSpec)>, &'static str);
        let cases: Vec<Case> = vec![
            (
                Box::new(|s| s.plain.timeout = Duration::ZERO),
                "timeout: timeout=0: give at least 1 ms",
            ),
            (
                Box::new(|s| s.alive = vec![alive().with_margins(11, 0)]),
                "alive 'loop': expected=10 lies outside its margins: min_margin=11 would make \
                 the minimum count negative",
            ),
            (
                Box::new(|s| s.alive = vec![AliveSpec::new("loop", "tick", ms(100), 0)]),
                "alive 'loop': expected=0: expect at least 1 checkpoint per cycle",
            ),
            (
                Box::new(|s| s.alive = vec![AliveSpec::new("loop", "tick", ms(0), 1)]),
                "alive 'loop': cycle=0: give at least 1 ms",
            ),
            (
                Box::new(|s| s.alive = vec![AliveSpec::new("loop", "", ms(1), 1)]),
                "alive 'loop': checkpoint '': a name holds",
            ),
            (
                Box::new(|s| s.alive = vec![AliveSpec::new("a/b", "t", ms(1), 1)]),
                "alive 'a/b': a name holds",
            ),
            (
                Box::new(|s| s.deadline = vec![deadline().configure_minimum_time(ms(501))]),
                "deadline 'req': min=501 ms is greater than max=500 ms",
            ),
            (
                Box::new(|s| {
                    s.deadline = vec![DeadlineSpec::new(
                        "req",
                        "s",
                        "s",
                        TimeRange::new(ms(0), ms(1)),
                    )]
                }),
                "deadline 'req': start and end are both checkpoint 's'",
            ),
            (
                Box::new(|s| s.deadline = vec![deadline(), deadline()]),
                "deadline 'req': the name is already taken in this watchdog",
            ),
            (
                Box::new(|s| s.deadline = vec![deadline().link_condition("ready")]),
                "deadline 'req': linked condition 'ready' is set by nothing",
            ),
            (
                Box::new(|s| s.conditions = vec![ConditionSpec::new("x y", true, Setter::Guest)]),
                "condition 'x y': a name holds",
            ),
            (
                Box::new(|s| s.conditions = vec![ConditionSpec::new("up", true, Setter::Vm)]),
                "condition 'up': only the built-in vm-running is set by the vm",
            ),
        ];
        for (edit, want) in cases {
            let err = with(edit).unwrap_err().to_string();
            assert!(err.starts_with(want), "want {want:?}, got {err:?}");
            assert!(!err.contains('\n'), "{err}");
        }
    }
}
