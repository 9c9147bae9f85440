//! Pure supervision: the state machines behind each watchdog, after AUTOSAR's Watchdog Manager
//! and S-CORE's Health Monitor.
//!
//! Nothing in here does I/O, spawns tasks or reads a clock. Every call takes the current time
//! as an argument and returns what changed; [`WatchdogEngine::next_deadline`] tells the caller
//! when to call [`WatchdogEngine::poll`] next. The daemon drives an engine from one timer per
//! watchdog, the guest-side [`client`](crate::client) can run one locally, and unit tests drive
//! it with made-up instants.
//!
//! ## Supervisions
//!
//! | kind | module | checks |
//! |---|---|---|
//! | plain timeout | [`timeout`] | any input within `timeout` (always present, named [`TIMEOUT_NAME`]) |
//! | alive | [`alive`] | a checkpoint `expected - min_margin ..= expected + max_margin` times per cycle |
//! | deadline | [`deadline`] | `min ..= max` from a start to an end checkpoint |
//! | logical | [`logical`] | checkpoints follow allowed transitions from an entry to an exit |
//!
//! Each module's documentation gives its exact rules and how it recovers once expired.
//!
//! ## Status model
//!
//! Per supervision ([`SupervisionStatus`]):
//!
//! ```text
//!              incorrect alive cycle, counter <= tolerance
//!   ┌────┐ ─────────────────────────────────────────────────▶ ┌────────┐
//!   │ OK │                                                     │ FAILED │
//!   └────┘ ◀───────────────────────────────────────────────── └────────┘
//!     │  ▲      correct cycles bring the counter back to 0          │
//!     │  │                                                          │ counter > tolerance
//!     │  └─────── recovery rule of the kind ──────┐                 ▼
//!     │   timeout, trigger, deadline or logical   │           ┌─────────┐
//!     │   error, incorrect cycle with tolerance 0 └────────── │ EXPIRED │
//!     └─────────────────────────────────────────────────────▶ └─────────┘
//!
//!   any status ── disabled, or a linked condition false ──▶ DEACTIVATED
//!   DEACTIVATED ── enabled and every linked condition true ──▶ OK, timers from now
//! ```
//!
//! Recovery from EXPIRED, per kind: the plain timeout re-arms on the next input; alive
//! restarts on its next checkpoint; deadline restarts on its next start checkpoint; logical
//! restarts on its next entry point. Each restart is clean: counters zero, status OK, timers
//! from that instant.
//!
//! Per watchdog ([`GlobalStatus`]): EXPIRED if any supervision is EXPIRED, else FAILED if any
//! is FAILED, else DEACTIVATED if all are, else OK. A watchdog that stays EXPIRED for longer
//! than `expired_tolerance` becomes STOPPED; it stays STOPPED while any supervision is EXPIRED,
//! and goes back to OK (or FAILED) once none is. Actions fire on the global transition to
//! EXPIRED (and to STOPPED where configured).
//!
//! ## Conditions and run-time control
//!
//! A supervision runs only while the watchdog and the supervision are enabled and every
//! linked condition holds; otherwise it is DEACTIVATED (the snapshot shows which: `enabled`,
//! and each linked condition's value). Becoming inactive drops its timers without a fire;
//! becoming active again restarts it from that moment: a fresh alive cycle, no stale deadline,
//! a full timeout (the grace again if it never heard anything). Each condition has one
//! [`Setter`]: the VM ([`VM_RUNNING`], built in, true at start), the guest or the operator; a
//! request from anyone else is refused.
//!
//! ## Time
//!
//! Results depend on the instants handed in, not on how often the engine is polled: a
//! deadline that passed is settled at its own instant (a cycle end, `start + max`, the timeout),
//! whether the next call is a poll or an event. At a tie, input wins: [`WatchdogEngine::handle`]
//! settles only deadlines strictly before its `now`, then applies the event, so a heartbeat
//! handed in at the very instant its timeout falls due refreshes it. [`WatchdogEngine::poll`]
//! settles every deadline up to and including its `now`. An event handed in after a deadline
//! the caller has not polled yet reports that deadline's changes first, then its own.
//!
//! ## Input
//!
//! Every line from the peer is input for the plain timeout, whatever else it means: a
//! heartbeat, a checkpoint, `WATCHDOG_USEC=`, `WATCHDOG=trigger`, a guest's `CONDITION=`, even
//! a refused one. Conditions set by the VM or the operator and enable/disable are not input.
//! `WATCHDOG=trigger` expires the plain timeout at once; while the plain timeout is
//! deactivated the trigger is refused (nothing is supervising).
//!
//! ## A planned stop
//!
//! `STOPPING=1` (systemd's "the service is beginning its shutdown") suspends every supervision
//! of the watchdog, as a false condition does: no timer runs, nothing fires, the status is
//! DEACTIVATED and the snapshot says `stopping`. The stop ends when the peer announces itself
//! again, as a restarted service does: a guest condition (`READY=1` through the agent), a
//! checkpoint, `WATCHDOG_USEC=` or `WATCHDOG=trigger` (which then fires); or when the VM starts
//! over. Supervision then restarts from that moment. Plain input (`WATCHDOG=1`), status text
//! and `EXTEND_TIMEOUT_USEC=` do not end it: a service may go on pinging, reporting and asking
//! for time while it drains, and its silence after that must not fire. `EXTEND_TIMEOUT_USEC=N`
//! otherwise is input that also holds the plain timeout's deadline at least N µs away, once
//! (see [`timeout`]).
//!
//! Whatever is refused comes back as a [`Refusal`] in [`Outcome::rejected`]: its message for
//! the log, and a [`RefusalReason`] to count it by.

pub mod alive;
mod conditions;
pub mod deadline;
pub mod logical;
mod refusal;
mod spec;
mod status;
#[cfg(test)]
mod testing;
pub mod timeout;

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use alive::AliveSpec;
use alive::AliveSupervision;
use conditions::Conditions;
pub use deadline::DeadlineSpec;
use deadline::DeadlineSupervision;
pub use logical::LogicalSpec;
use logical::LogicalSupervision;
pub use refusal::{ConditionRefusal, ExtendRefusal, Refusal, RefusalReason, TimeoutRefusal};
use spec::ms;
pub use spec::{
    ConditionSpec, EngineSpec, Setter, SpecError, SupervisionKind, TIMEOUT_NAME, TimeRange,
    TimeoutSpec, VM_RUNNING,
};
pub use status::SupervisionStatus;
use status::{Horizon, LocalChange, add, ms_since, ms_until};
use timeout::TimeoutSupervision;

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

/// Something that happened to a watchdog, handed to [`WatchdogEngine::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// Input with no further meaning (`WATCHDOG=1`, a pulse, any other line).
    Heartbeat,
    /// `CHECKPOINT=name`: goes to every supervision that knows the checkpoint.
    Checkpoint(&'a str),
    /// `WATCHDOG=trigger`: the peer's own failure notification; expires the plain timeout.
    Trigger,
    /// `WATCHDOG_USEC=`: a new plain timeout, taken only within the configured bounds.
    SetTimeout(Duration),
    /// `EXTEND_TIMEOUT_USEC=`: input, and the plain timeout's deadline held at least this far
    /// away until the next input; refused above the bounds' maximum.
    ExtendTimeout(Duration),
    /// `STOPPING=1`: the peer stops on purpose; every supervision is suspended until it
    /// announces itself again (a guest condition, a checkpoint, `WATCHDOG_USEC=`, a trigger) or
    /// the VM starts over.
    Stopping,
    /// A condition changes.
    Condition {
        /// The condition's name, as declared (or [`VM_RUNNING`]).
        name: &'a str,
        /// Its new value.
        value: bool,
        /// Who sets it; refused unless it is the condition's setter.
        by: Setter,
    },
    /// The operator enables the watchdog (`None`) or one supervision.
    Enable(Option<&'a str>),
    /// The operator disables the watchdog (`None`) or one supervision.
    Disable(Option<&'a str>),
    /// The VM started over (a reset, a reboot, a new QEMU): every supervision forgets what it
    /// heard and starts again with its grace, as at awd's start, so a booting guest is not
    /// taken for a silent one. An EXPIRED watchdog becomes OK again.
    StartOver,
}

/// Whose status changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The watchdog's global status.
    Global,
    /// One supervision's local status, by name.
    Supervision(String),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("watchdog"),
            Scope::Supervision(name) => write!(f, "supervision {name}"),
        }
    }
}

/// A status change, local or global, with its reason in words for the log: the supervision,
/// the checkpoint, the expected and the measured values. A supervision's status is never
/// STOPPED.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Whose status.
    pub scope: Scope,
    /// The status before.
    pub from: GlobalStatus,
    /// The status after.
    pub to: GlobalStatus,
    /// What caused it, in words for the log and `awd status`.
    pub reason: String,
}

impl Change {
    /// Whether this is the watchdog's global status.
    pub fn is_global(&self) -> bool {
        self.scope == Scope::Global
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} -> {}: {}",
            self.scope, self.from, self.to, self.reason
        )
    }
}

/// What [`WatchdogEngine::handle`] did with an event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct Outcome {
    /// Status changes, in the order they happened; global ones follow the local one that
    /// caused them.
    pub changes: Vec<Change>,
    /// Why the event (or part of it) was refused: a `WATCHDOG_USEC=` out of bounds, a
    /// condition nobody declared or its sender may not set, a trigger while the plain timeout
    /// is deactivated, an unknown supervision. Nothing else changed because of it.
    pub rejected: Option<Refusal>,
}

/// One supervision with its run-time switches.
#[derive(Debug, Clone)]
struct Supervision {
    name: String,
    kind: SupervisionKind,
    conditions: Vec<String>,
    enabled: bool,
    active: bool,
    body: Body,
    last_reason: Option<String>,
}

impl Supervision {
    fn status(&self) -> SupervisionStatus {
        if self.active {
            self.body.status()
        } else {
            SupervisionStatus::Deactivated
        }
    }
}

/// The state machine of each kind.
#[derive(Debug, Clone)]
enum Body {
    Timeout(TimeoutSupervision),
    Alive(AliveSupervision),
    Deadline(DeadlineSupervision),
    Logical(LogicalSupervision),
}

impl Body {
    fn status(&self) -> SupervisionStatus {
        match self {
            Body::Timeout(s) => s.status(),
            Body::Alive(s) => s.status(),
            Body::Deadline(s) => s.status(),
            Body::Logical(s) => s.status(),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self {
            Body::Timeout(s) => s.deadline(),
            Body::Alive(s) => s.deadline(),
            Body::Deadline(s) => s.deadline(),
            Body::Logical(_) => None,
        }
    }

    /// Forgets the input that decides whether a restart waits the grace.
    fn forget_input(&mut self) {
        match self {
            Body::Timeout(s) => s.forget_input(),
            Body::Alive(s) => s.forget_checkpoints(),
            Body::Deadline(_) | Body::Logical(_) => {}
        }
    }

    fn restart(&mut self, now: Instant) {
        match self {
            Body::Timeout(s) => s.restart(now),
            Body::Alive(s) => s.restart(now),
            Body::Deadline(s) => s.restart(),
            Body::Logical(s) => s.restart(),
        }
    }

    fn settle(&mut self, h: Horizon, out: &mut Vec<LocalChange>) {
        match self {
            Body::Timeout(s) => s.settle(h, out),
            Body::Alive(s) => s.settle(h, out),
            Body::Deadline(s) => s.settle(h, out),
            Body::Logical(_) => {}
        }
    }

    fn checkpoint(&mut self, name: &str, now: Instant, out: &mut Vec<LocalChange>) -> bool {
        match self {
            Body::Timeout(_) => false,
            Body::Alive(s) => s.checkpoint(name, now, out),
            Body::Deadline(s) => s.checkpoint(name, now, out),
            Body::Logical(s) => s.checkpoint(name, now, out),
        }
    }
}

/// Local changes tagged with the index of their supervision.
type Tagged = Vec<(usize, LocalChange)>;

/// The supervision state of one watchdog.
#[derive(Debug, Clone)]
pub struct WatchdogEngine {
    /// The plain timeout first, then alive, deadline and logical, in spec order.
    sups: Vec<Supervision>,
    conditions: Conditions,
    enabled: bool,
    /// The peer said `STOPPING=1` and has not spoken since.
    stopping: bool,
    status: GlobalStatus,
    expired_since: Option<Instant>,
    expired_tolerance: Option<Duration>,
    last_reason: Option<String>,
}

impl WatchdogEngine {
    /// Starts supervising at `now`, after checking `spec` with [`EngineSpec::validate`].
    pub fn new(spec: &EngineSpec, now: Instant) -> Result<Self, SpecError> {
        spec.validate()?;
        let sup = |name: &str, kind, conditions: &[String], body| Supervision {
            name: name.to_owned(),
            kind,
            conditions: conditions.to_vec(),
            enabled: true,
            active: false,
            body,
            last_reason: None,
        };
        let mut sups = vec![sup(
            TIMEOUT_NAME,
            SupervisionKind::Timeout,
            &spec.plain.conditions,
            Body::Timeout(TimeoutSupervision::new(&spec.plain, spec.grace, now)),
        )];
        for s in &spec.alive {
            sups.push(sup(
                &s.name,
                SupervisionKind::Alive,
                &s.conditions,
                Body::Alive(AliveSupervision::new(s, spec.grace, now)),
            ));
        }
        for s in &spec.deadline {
            sups.push(sup(
                &s.name,
                SupervisionKind::Deadline,
                &s.conditions,
                Body::Deadline(DeadlineSupervision::new(s)),
            ));
        }
        for s in &spec.logical {
            sups.push(sup(
                &s.name,
                SupervisionKind::Logical,
                &s.conditions,
                Body::Logical(LogicalSupervision::new(s)),
            ));
        }
        let conditions = Conditions::new(spec.all_conditions());
        for s in &mut sups {
            s.active = s.conditions.iter().all(|c| conditions.holds(c));
        }
        let mut engine = WatchdogEngine {
            sups,
            conditions,
            enabled: true,
            stopping: false,
            status: GlobalStatus::Ok,
            expired_since: None,
            expired_tolerance: spec.expired_tolerance,
            last_reason: None,
        };
        engine.status = aggregate(&engine.statuses());
        Ok(engine)
    }

    /// When the current EXPIRED (or STOPPED) spell began: the instant the supervision's deadline
    /// passed or its error arrived, even if the engine learnt of it later.
    pub fn expired_since(&self) -> Option<Instant> {
        self.expired_since
    }

    /// The current global status.
    pub fn status(&self) -> GlobalStatus {
        self.status
    }

    /// One supervision's status, by name.
    pub fn supervision_status(&self, name: &str) -> Option<SupervisionStatus> {
        self.sups
            .iter()
            .find(|s| s.name == name)
            .map(Supervision::status)
    }

    /// When [`poll`](Self::poll) must next be called: the earliest deadline of every active
    /// supervision, and the STOPPED deadline while expired. `None` if nothing is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        let sups = self
            .sups
            .iter()
            .filter(|s| s.active)
            .filter_map(|s| s.body.deadline());
        sups.chain(self.stopped_at()).min()
    }

    /// Feeds one event that happened at `now`. Deadlines that passed before `now` are settled
    /// first, at their own instants.
    pub fn handle(&mut self, ev: Event<'_>, now: Instant) -> Outcome {
        let h = Horizon {
            until: now,
            inclusive: false,
        };
        let before = self.statuses();
        let mut local = Vec::new();
        self.settle(h, &mut local);
        let rejected = self.apply(ev, now, &mut local);
        let changes = self.fold(before, local, h);
        Outcome { changes, rejected }
    }

    /// Settles every deadline up to and including `now`.
    pub fn poll(&mut self, now: Instant) -> Vec<Change> {
        let h = Horizon {
            until: now,
            inclusive: true,
        };
        let before = self.statuses();
        let mut local = Vec::new();
        self.settle(h, &mut local);
        self.fold(before, local, h)
    }

    /// Everything `awd status` shows, as of `now`.
    pub fn snapshot(&self, now: Instant) -> EngineSnapshot {
        EngineSnapshot {
            status: self.status,
            enabled: self.enabled,
            stopping: self.stopping,
            last_reason: self.last_reason.clone(),
            expired_for_ms: match self.status {
                GlobalStatus::Expired | GlobalStatus::Stopped => {
                    self.expired_since.map(|t| ms_since(t, now))
                }
                _ => None,
            },
            stopped_in_ms: self.stopped_at().map(|t| ms_until(t, now)),
            next_deadline_ms: self.next_deadline().map(|t| ms_until(t, now)),
            conditions: self
                .conditions
                .iter()
                .map(|(c, value)| ConditionSnapshot {
                    name: c.name.clone(),
                    value,
                    set_by: c.set_by,
                })
                .collect(),
            supervisions: self
                .sups
                .iter()
                .map(|s| self.sup_snapshot(s, now))
                .collect(),
        }
    }

    fn sup_snapshot(&self, s: &Supervision, now: Instant) -> SupervisionSnapshot {
        let deadline = s.active.then(|| s.body.deadline()).flatten();
        let (last, detail) = match &s.body {
            Body::Timeout(t) => (
                None,
                SupervisionDetail::Timeout {
                    timeout_ms: ms(t.timeout()),
                    grace_ms: t.grace().map(ms),
                    timeout_min_ms: ms(t.bounds().min),
                    timeout_max_ms: ms(t.bounds().max),
                    last_input_ms_ago: t.last_input().map(|i| ms_since(i, now)),
                },
            ),
            Body::Alive(a) => {
                let spec = a.spec();
                (
                    a.last_checkpoint().map(|t| (spec.checkpoint.as_str(), t)),
                    SupervisionDetail::Alive {
                        checkpoint: spec.checkpoint.clone(),
                        cycle_ms: ms(spec.cycle),
                        expected: spec.expected,
                        min_count: spec.min_count(),
                        max_count: spec.max_count(),
                        tolerance: spec.tolerance,
                        failed_cycles: a.failed_cycles(),
                        count_in_cycle: a.count(),
                        cycle_elapsed_ms: s
                            .active
                            .then(|| a.cycle_start())
                            .flatten()
                            .map(|t| ms_since(t, now)),
                        last_cycle_count: a.last_count(),
                    },
                )
            }
            Body::Deadline(d) => {
                let spec = d.spec();
                (
                    d.last_checkpoint(),
                    SupervisionDetail::Deadline {
                        start: spec.start.clone(),
                        end: spec.end.clone(),
                        min_ms: ms(spec.range.min),
                        max_ms: ms(spec.range.max),
                        running_for_ms: s
                            .active
                            .then(|| d.started())
                            .flatten()
                            .map(|t| ms_since(t, now)),
                        last_measured_ms: d.last_measured().map(ms),
                    },
                )
            }
            Body::Logical(l) => (
                l.last_checkpoint(),
                SupervisionDetail::Logical {
                    current: l.current().map(str::to_owned),
                    expected_next: l.expected_next(),
                },
            ),
        };
        SupervisionSnapshot {
            name: s.name.clone(),
            status: s.status(),
            enabled: s.enabled,
            active: s.active,
            conditions: s
                .conditions
                .iter()
                .map(|c| LinkedCondition {
                    name: c.clone(),
                    holds: self.conditions.holds(c),
                })
                .collect(),
            next_deadline_ms: deadline.map(|t| ms_until(t, now)),
            last_checkpoint: last.map(|(c, _)| c.to_owned()),
            last_checkpoint_ms_ago: last.map(|(_, t)| ms_since(t, now)),
            last_reason: s.last_reason.clone(),
            detail,
        }
    }

    fn statuses(&self) -> Vec<SupervisionStatus> {
        self.sups.iter().map(Supervision::status).collect()
    }

    fn stopped_at(&self) -> Option<Instant> {
        if self.status != GlobalStatus::Expired {
            return None;
        }
        Some(add(self.expired_since?, self.expired_tolerance?))
    }

    /// Settles every active supervision's deadlines within `h`.
    fn settle(&mut self, h: Horizon, local: &mut Tagged) {
        for (i, s) in self.sups.iter_mut().enumerate() {
            if s.active {
                let mut out = Vec::new();
                s.body.settle(h, &mut out);
                local.extend(out.into_iter().map(|c| (i, c)));
            }
        }
    }

    /// Applies one event at `now`; returns why it was refused, if it was.
    fn apply(&mut self, ev: Event<'_>, now: Instant, local: &mut Tagged) -> Option<Refusal> {
        match ev {
            Event::Heartbeat => {
                self.peer_input(now, local);
                None
            }
            Event::Checkpoint(name) => {
                self.resume(now, local);
                self.peer_input(now, local);
                for (i, s) in self.sups.iter_mut().enumerate() {
                    if s.active {
                        let mut out = Vec::new();
                        s.body.checkpoint(name, now, &mut out);
                        local.extend(out.into_iter().map(|c| (i, c)));
                    }
                }
                None
            }
            Event::Trigger => {
                self.resume(now, local);
                let mut refused = None;
                for (i, s) in self.sups.iter_mut().enumerate() {
                    if let Body::Timeout(t) = &mut s.body {
                        if s.active {
                            let mut out = Vec::new();
                            t.trigger(now, &mut out);
                            local.extend(out.into_iter().map(|c| (i, c)));
                        } else {
                            t.note_input(now);
                            refused = Some(Refusal::TriggerDeactivated);
                        }
                    }
                }
                refused
            }
            Event::SetTimeout(d) => {
                let mut refused = None;
                for s in &mut self.sups {
                    if let Body::Timeout(t) = &mut s.body {
                        refused = t.set_timeout(d).err().map(Refusal::from);
                    }
                }
                self.resume(now, local);
                self.peer_input(now, local);
                refused
            }
            Event::ExtendTimeout(by) => {
                self.peer_input(now, local);
                let mut refused = None;
                for s in &mut self.sups {
                    if let Body::Timeout(t) = &mut s.body
                        && s.active
                    {
                        refused = t.extend(now, by).err().map(Refusal::from);
                    }
                }
                refused
            }
            Event::Stopping => {
                if !self.stopping {
                    self.stopping = true;
                    for i in 0..self.sups.len() {
                        self.update_activity(i, now, "the peer is stopping (STOPPING=1)", local);
                    }
                }
                for s in &mut self.sups {
                    if let Body::Timeout(t) = &mut s.body {
                        t.note_input(now);
                    }
                }
                None
            }
            Event::Condition { name, value, by } => {
                if by == Setter::Guest {
                    self.resume(now, local);
                    self.peer_input(now, local);
                }
                match self.conditions.set(name, value, by) {
                    Err(refused) => Some(refused.into()),
                    Ok(false) => None,
                    Ok(true) => {
                        let reason = match value {
                            true => format!("condition {name} became true (set by the {by})"),
                            false => format!("condition {name} became false (set by the {by})"),
                        };
                        for i in 0..self.sups.len() {
                            if self.sups[i].conditions.iter().any(|c| c == name) {
                                self.update_activity(i, now, &reason, local);
                            }
                        }
                        None
                    }
                }
            }
            Event::StartOver => {
                let was_stopping = std::mem::take(&mut self.stopping);
                for (i, s) in self.sups.iter_mut().enumerate() {
                    s.body.forget_input();
                    if !s.active {
                        continue;
                    }
                    let from = s.status();
                    s.body.restart(now);
                    if s.status() != from {
                        local.push((
                            i,
                            LocalChange {
                                at: now,
                                from,
                                to: s.status(),
                                reason: "the VM started over: supervision restarted with its grace"
                                    .into(),
                            },
                        ));
                    }
                }
                if was_stopping {
                    for i in 0..self.sups.len() {
                        self.update_activity(i, now, "the VM started over after STOPPING=1", local);
                    }
                }
                None
            }
            Event::Enable(target) | Event::Disable(target) => {
                let on = matches!(ev, Event::Enable(_));
                let verb = if on { "enabled" } else { "disabled" };
                match target {
                    None => {
                        self.enabled = on;
                        let reason = format!("watchdog {verb} by the operator");
                        for i in 0..self.sups.len() {
                            self.update_activity(i, now, &reason, local);
                        }
                        None
                    }
                    Some(name) => match self.sups.iter().position(|s| s.name == name) {
                        Some(i) => {
                            self.sups[i].enabled = on;
                            let reason = format!("{verb} by the operator");
                            self.update_activity(i, now, &reason, local);
                            None
                        }
                        None => Some(Refusal::UnknownSupervision {
                            name: name.to_owned(),
                            known: self.sups.iter().map(|s| s.name.clone()).collect(),
                        }),
                    },
                }
            }
        }
    }

    /// The peer announced itself after `STOPPING=1`: the stop is over, supervision restarts
    /// now.
    fn resume(&mut self, now: Instant, local: &mut Tagged) {
        if std::mem::take(&mut self.stopping) {
            for i in 0..self.sups.len() {
                self.update_activity(i, now, "the peer announced itself after STOPPING=1", local);
            }
        }
    }

    /// Input from the peer: refreshes (or re-arms) the plain timeout.
    fn peer_input(&mut self, now: Instant, local: &mut Tagged) {
        for (i, s) in self.sups.iter_mut().enumerate() {
            if let Body::Timeout(t) = &mut s.body {
                if s.active {
                    let mut out = Vec::new();
                    t.input(now, &mut out);
                    local.extend(out.into_iter().map(|c| (i, c)));
                } else {
                    t.note_input(now);
                }
            }
        }
    }

    /// Starts or suspends supervision `i` if its switches and conditions say so.
    fn update_activity(&mut self, i: usize, now: Instant, reason: &str, local: &mut Tagged) {
        let s = &self.sups[i];
        let run = self.enabled
            && !self.stopping
            && s.enabled
            && s.conditions.iter().all(|c| self.conditions.holds(c));
        let s = &mut self.sups[i];
        if run == s.active {
            return;
        }
        let from = s.status();
        s.active = run;
        let reason = if run {
            s.body.restart(now);
            format!("{reason}: supervision restarted")
        } else {
            format!("{reason}: supervision suspended")
        };
        local.push((
            i,
            LocalChange {
                at: now,
                from,
                to: s.status(),
                reason,
            },
        ));
    }

    /// Turns local changes into the reported list, in time order, deriving global changes
    /// (and STOPPED) as they happen.
    fn fold(
        &mut self,
        mut cur: Vec<SupervisionStatus>,
        mut local: Tagged,
        h: Horizon,
    ) -> Vec<Change> {
        local.sort_by_key(|(_, c)| c.at);
        let mut changes = Vec::with_capacity(local.len() * 2);
        for (i, c) in local {
            self.check_stopped(
                Horizon {
                    until: c.at,
                    inclusive: false,
                },
                &mut changes,
            );
            debug_assert_eq!(cur[i], c.from, "changes of {} chain up", self.sups[i].name);
            cur[i] = c.to;
            let s = &mut self.sups[i];
            s.last_reason = Some(c.reason.clone());
            let global_reason = match s.kind {
                SupervisionKind::Timeout => format!("{}: {}", s.name, c.reason),
                kind => format!("{kind} {}: {}", s.name, c.reason),
            };
            changes.push(Change {
                scope: Scope::Supervision(s.name.clone()),
                from: c.from.into(),
                to: c.to.into(),
                reason: c.reason,
            });
            self.set_global(aggregate(&cur), c.at, global_reason, &mut changes);
        }
        self.check_stopped(h, &mut changes);
        debug_assert_eq!(cur, self.statuses(), "every local change was reported");
        changes
    }

    fn set_global(&mut self, to: GlobalStatus, at: Instant, reason: String, out: &mut Vec<Change>) {
        let to = match (self.status, to) {
            (GlobalStatus::Stopped, GlobalStatus::Expired) => GlobalStatus::Stopped,
            _ => to,
        };
        if to == self.status {
            return;
        }
        match to {
            GlobalStatus::Expired => self.expired_since = Some(at),
            GlobalStatus::Stopped => {}
            _ => self.expired_since = None,
        }
        self.last_reason = Some(reason.clone());
        out.push(Change {
            scope: Scope::Global,
            from: std::mem::replace(&mut self.status, to),
            to,
            reason,
        });
    }

    fn check_stopped(&mut self, h: Horizon, out: &mut Vec<Change>) {
        let (Some(at), Some(tolerance)) = (self.stopped_at(), self.expired_tolerance) else {
            return;
        };
        if h.covers(at) {
            let reason = format!("expired for {} ms, the expired tolerance", ms(tolerance));
            self.last_reason = Some(reason.clone());
            self.status = GlobalStatus::Stopped;
            out.push(Change {
                scope: Scope::Global,
                from: GlobalStatus::Expired,
                to: GlobalStatus::Stopped,
                reason,
            });
        }
    }
}

/// The global status that local statuses add up to (STOPPED aside).
fn aggregate(statuses: &[SupervisionStatus]) -> GlobalStatus {
    let any = |s| statuses.contains(&s);
    if any(SupervisionStatus::Expired) {
        GlobalStatus::Expired
    } else if any(SupervisionStatus::Failed) {
        GlobalStatus::Failed
    } else if statuses
        .iter()
        .all(|s| *s == SupervisionStatus::Deactivated)
    {
        GlobalStatus::Deactivated
    } else {
        GlobalStatus::Ok
    }
}

/// A watchdog's supervision state at one instant: everything `awd status` shows, table or JSON.
/// Times are whole milliseconds relative to the snapshot's instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineSnapshot {
    /// The global status.
    pub status: GlobalStatus,
    /// Whether the watchdog as a whole is enabled.
    pub enabled: bool,
    /// Whether the peer said `STOPPING=1` and has not spoken since (every supervision is
    /// suspended).
    pub stopping: bool,
    /// Why the global status last changed.
    pub last_reason: Option<String>,
    /// How long it has been EXPIRED (or STOPPED).
    pub expired_for_ms: Option<u64>,
    /// While EXPIRED with an expired tolerance: how long until STOPPED.
    pub stopped_in_ms: Option<u64>,
    /// How long until the engine must next be polled.
    pub next_deadline_ms: Option<u64>,
    /// Every condition and its value.
    pub conditions: Vec<ConditionSnapshot>,
    /// Every supervision, the plain timeout first.
    pub supervisions: Vec<SupervisionSnapshot>,
}

/// A condition's current value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConditionSnapshot {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: bool,
    /// Who sets it.
    pub set_by: Setter,
}

/// A condition as one supervision sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkedCondition {
    /// Its name.
    pub name: String,
    /// Whether it holds now.
    pub holds: bool,
}

/// One supervision's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SupervisionSnapshot {
    /// Its name.
    pub name: String,
    /// Its local status.
    pub status: SupervisionStatus,
    /// Whether the operator left it enabled (the watchdog's own switch is separate).
    pub enabled: bool,
    /// Whether it supervises now: enabled, watchdog enabled, every linked condition true.
    pub active: bool,
    /// Its linked conditions and whether each holds.
    pub conditions: Vec<LinkedCondition>,
    /// How long until its next deadline, while active.
    pub next_deadline_ms: Option<u64>,
    /// The last of its checkpoints.
    pub last_checkpoint: Option<String>,
    /// How long ago that checkpoint arrived.
    pub last_checkpoint_ms_ago: Option<u64>,
    /// Why its status last changed.
    pub last_reason: Option<String>,
    /// What its kind adds; serialized inline, with a `kind` field.
    #[serde(flatten)]
    pub detail: SupervisionDetail,
}

/// The part of a [`SupervisionSnapshot`] that depends on the kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SupervisionDetail {
    /// The plain timeout.
    Timeout {
        /// The current timeout.
        timeout_ms: u64,
        /// The grace for the first input, if configured.
        grace_ms: Option<u64>,
        /// The shortest timeout `WATCHDOG_USEC=` may set.
        timeout_min_ms: u64,
        /// The longest timeout `WATCHDOG_USEC=` may set.
        timeout_max_ms: u64,
        /// How long ago the last input arrived.
        last_input_ms_ago: Option<u64>,
    },
    /// An alive supervision.
    Alive {
        /// The checkpoint counted.
        checkpoint: String,
        /// The reference cycle.
        cycle_ms: u64,
        /// The expected count.
        expected: u32,
        /// The fewest checkpoints of a correct cycle.
        min_count: u32,
        /// The most checkpoints of a correct cycle.
        max_count: u32,
        /// Failed cycles tolerated.
        tolerance: u32,
        /// The failed-cycle counter.
        failed_cycles: u32,
        /// Checkpoints so far in the current cycle.
        count_in_cycle: u32,
        /// How far into the current cycle, if one runs.
        cycle_elapsed_ms: Option<u64>,
        /// The count of the last closed cycle.
        last_cycle_count: Option<u32>,
    },
    /// A deadline supervision.
    Deadline {
        /// The start checkpoint.
        start: String,
        /// The end checkpoint.
        end: String,
        /// The shortest accepted time.
        min_ms: u64,
        /// The longest accepted time.
        max_ms: u64,
        /// How long the running measurement has run, if one runs.
        running_for_ms: Option<u64>,
        /// The last complete measurement.
        last_measured_ms: Option<u64>,
    },
    /// A logical supervision.
    Logical {
        /// The last checkpoint of the running sequence; `None` between sequences.
        current: Option<String>,
        /// What may come next.
        expected_next: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::ms;
    use proptest::prelude::*;

    fn engine(spec: &EngineSpec, t0: Instant) -> WatchdogEngine {
        WatchdogEngine::new(spec, t0).expect("valid spec")
    }

    /// The global changes, as (from, to).
    fn globals(changes: &[Change]) -> Vec<(GlobalStatus, GlobalStatus)> {
        changes
            .iter()
            .filter(|c| c.is_global())
            .map(|c| (c.from, c.to))
            .collect()
    }

    fn cond(name: &str, value: bool, by: Setter) -> Event<'_> {
        Event::Condition { name, value, by }
    }

    use GlobalStatus::{Deactivated as GD, Expired as GX, Failed as GF, Ok as GO, Stopped as GS};

    #[test]
    fn expiry_and_rearm_are_global_transitions() {
        let t0 = Instant::now();
        let mut e = engine(&EngineSpec::plain(ms(5000)), t0);
        assert!(e.poll(t0 + ms(4999)).is_empty());
        let c = e.poll(t0 + ms(5000));
        assert_eq!(globals(&c), [(GO, GX)]);
        assert_eq!(c[0].scope, Scope::Supervision(TIMEOUT_NAME.into()));
        assert!(
            c[1].reason.starts_with("timeout: nothing received"),
            "{}",
            c[1].reason
        );
        let c = e.handle(Event::Heartbeat, t0 + ms(6000)).changes;
        assert_eq!(globals(&c), [(GX, GO)]);
        assert_eq!(e.next_deadline(), Some(t0 + ms(11_000)));
    }

    #[test]
    fn trigger_expires_at_once_and_a_heartbeat_rearms() {
        let t0 = Instant::now();
        let mut e = engine(&EngineSpec::plain(ms(5000)), t0);
        let c = e.handle(Event::Trigger, t0).changes;
        assert_eq!(globals(&c), [(GO, GX)]);
        assert!(c[1].reason.contains("WATCHDOG=trigger"));
        assert_eq!(e.next_deadline(), None);
        assert!(e.handle(Event::Trigger, t0).changes.is_empty(), "once");
        let c = e.handle(Event::Heartbeat, t0 + ms(1000)).changes;
        assert_eq!(globals(&c), [(GX, GO)]);
        assert_eq!(e.next_deadline(), Some(t0 + ms(6000)));
    }

    #[test]
    fn input_at_the_very_deadline_wins_input_after_it_does_not() {
        let t0 = Instant::now();
        let mut e = engine(&EngineSpec::plain(ms(5000)), t0);
        assert!(e.handle(Event::Heartbeat, t0 + ms(5000)).changes.is_empty());
        // Without a poll in between, later input still sees that the timeout passed first.
        let mut e = engine(&EngineSpec::plain(ms(5000)), t0);
        let c = e.handle(Event::Heartbeat, t0 + ms(5001)).changes;
        assert_eq!(globals(&c), [(GO, GX), (GX, GO)]);
    }

    #[test]
    fn watchdog_usec_is_taken_within_bounds_and_refused_outside() {
        let t0 = Instant::now();
        let mut spec = EngineSpec::plain(ms(5000));
        spec.plain.min = Some(ms(1000));
        spec.plain.max = Some(ms(60_000));
        let mut e = engine(&spec, t0);
        let o = e.handle(Event::SetTimeout(ms(60_000)), t0 + ms(1000));
        assert_eq!(o, Outcome::default());
        assert_eq!(e.next_deadline(), Some(t0 + ms(61_000)));
        let o = e.handle(Event::SetTimeout(ms(999)), t0 + ms(2000));
        assert!(o.changes.is_empty());
        let why = o.rejected.expect("refused").to_string();
        assert!(why.contains("WATCHDOG_USEC=999000 refused"), "{why}");
        assert!(why.contains("1000..=60000 ms"), "{why}");
        assert_eq!(
            e.next_deadline(),
            Some(t0 + ms(62_000)),
            "unchanged timeout, but the line was input"
        );
    }

    #[test]
    fn stopping_suspends_everything_without_a_fire_until_the_peer_speaks_again() {
        let t0 = Instant::now();
        let mut e = engine(&paused_spec(), t0);
        let _ = e.handle(Event::Checkpoint("s"), t0 + ms(10));
        let c = e.handle(Event::Stopping, t0 + ms(20)).changes;
        assert_eq!(globals(&c), [(GO, GD)]);
        assert!(
            c.iter()
                .filter(|c| !c.is_global())
                .all(|c| c.reason == "the peer is stopping (STOPPING=1): supervision suspended"),
            "{c:?}"
        );
        assert!(e.snapshot(t0 + ms(20)).stopping);
        assert_eq!(e.next_deadline(), None, "no timer runs while stopped");
        assert!(e.poll(t0 + ms(3_599_999)).is_empty(), "an hour: nothing");
        // Pings, a second STOPPING=1 and an operator's enable change nothing: a draining
        // service may still ping.
        assert!(
            e.handle(Event::Heartbeat, t0 + ms(3_600_000))
                .changes
                .is_empty()
        );
        assert!(
            e.handle(Event::Stopping, t0 + ms(3_600_001))
                .changes
                .is_empty()
        );
        assert!(
            e.handle(Event::Enable(None), t0 + ms(3_600_002))
                .changes
                .is_empty()
        );
        assert!(
            e.poll(t0 + ms(7_200_000)).is_empty(),
            "silence after the pings: nothing"
        );
        // The peer announces itself: supervision restarts from that moment, full timeout.
        let back = t0 + ms(7_200_010);
        let c = e.handle(Event::Checkpoint("unknown"), back).changes;
        assert_eq!(globals(&c), [(GD, GO)]);
        assert!(
            c[0].reason
                .starts_with("the peer announced itself after STOPPING=1: supervision restarted"),
            "{}",
            c[0].reason
        );
        assert!(!e.snapshot(back).stopping);
        assert_eq!(
            e.next_deadline(),
            Some(back + ms(100)),
            "a fresh alive cycle first"
        );
        assert_eq!(
            e.snapshot(back).supervisions[0].next_deadline_ms,
            Some(1000),
            "the full timeout"
        );
    }

    #[test]
    fn a_stop_ends_when_the_peer_announces_itself_and_a_trigger_then_fires() {
        let t0 = Instant::now();
        let timeout = || EngineSpec::plain(ms(1000));
        let mut e = engine(&timeout(), t0);
        let _ = e.handle(Event::Stopping, t0);
        let c = e.handle(Event::Trigger, t0 + ms(5000)).changes;
        assert_eq!(
            globals(&c),
            [(GD, GO), (GO, GX)],
            "resumed, then the trigger"
        );
        for ev in [
            Event::Checkpoint("x"),
            Event::SetTimeout(ms(500)),
            cond("ready", true, Setter::Guest),
        ] {
            let mut spec = timeout();
            spec.conditions = vec![ConditionSpec::new("ready", false, Setter::Guest)];
            let mut e = engine(&spec, t0);
            let _ = e.handle(Event::Stopping, t0);
            let c = e.handle(ev, t0 + ms(10)).changes;
            assert_eq!(globals(&c), [(GD, GO)], "{ev:?}");
        }
        // Pings, more time asked for while draining, and conditions of the VM or the operator
        // are not the peer announcing itself.
        let mut spec = timeout();
        spec.conditions = vec![ConditionSpec::new("maint", false, Setter::Operator)];
        let mut e = engine(&spec, t0);
        let _ = e.handle(Event::Stopping, t0);
        assert!(e.handle(Event::Heartbeat, t0 + ms(1)).changes.is_empty());
        let o = e.handle(Event::ExtendTimeout(ms(500)), t0 + ms(2));
        assert_eq!(o, Outcome::default(), "no extension to hold while stopped");
        let o = e.handle(cond("maint", true, Setter::Operator), t0 + ms(10));
        assert!(o.changes.is_empty(), "{o:?}");
        assert!(
            e.handle(cond(VM_RUNNING, true, Setter::Vm), t0 + ms(20))
                .changes
                .is_empty()
        );
        assert!(e.snapshot(t0).stopping);
    }

    #[test]
    fn a_vm_that_starts_over_after_stopping_waits_its_grace_again() {
        let t0 = Instant::now();
        let mut spec = EngineSpec::plain(ms(1000));
        spec.grace = Some(ms(30_000));
        let mut e = engine(&spec, t0);
        let _ = e.handle(Event::Heartbeat, t0 + ms(10));
        let _ = e.handle(Event::Stopping, t0 + ms(20));
        let c = e.handle(Event::StartOver, t0 + ms(5000)).changes;
        assert_eq!(globals(&c), [(GD, GO)]);
        assert!(!e.snapshot(t0).stopping);
        assert_eq!(e.next_deadline(), Some(t0 + ms(35_000)), "the grace");
    }

    #[test]
    fn extend_timeout_holds_one_deadline_within_timeout_max() {
        let t0 = Instant::now();
        let mut spec = EngineSpec::plain(ms(1000));
        spec.plain.max = Some(ms(60_000));
        let mut e = engine(&spec, t0);
        let o = e.handle(Event::ExtendTimeout(ms(20_000)), t0 + ms(100));
        assert_eq!(o, Outcome::default());
        assert_eq!(e.next_deadline(), Some(t0 + ms(20_100)));
        assert!(e.poll(t0 + ms(20_099)).is_empty());
        let c = e.poll(t0 + ms(20_100));
        assert_eq!(globals(&c), [(GO, GX)]);
        let o = e.handle(Event::ExtendTimeout(ms(60_001)), t0 + ms(30_000));
        assert_eq!(globals(&o.changes), [(GX, GO)], "the line is input");
        let why = o.rejected.expect("refused");
        assert_eq!(why.reason(), RefusalReason::TimeoutOutOfBounds);
        assert_eq!(
            e.next_deadline(),
            Some(t0 + ms(31_000)),
            "the plain timeout"
        );
    }

    fn paused_spec() -> EngineSpec {
        let mut spec = EngineSpec::plain(ms(1000));
        spec.plain.conditions = vec![VM_RUNNING.into()];
        spec.alive = vec![AliveSpec::new("loop", "tick", ms(100), 1).link_condition(VM_RUNNING)];
        spec.deadline = vec![
            DeadlineSpec::new("req", "s", "e", TimeRange::new(ms(0), ms(300)))
                .link_condition(VM_RUNNING),
        ];
        spec
    }

    #[test]
    fn a_pause_ten_times_the_timeout_fires_nothing_and_resumes_fresh() {
        let t0 = Instant::now();
        let mut e = engine(&paused_spec(), t0);
        assert!(
            e.handle(Event::Checkpoint("tick"), t0 + ms(10))
                .changes
                .is_empty()
        );
        let _ = e.handle(Event::Checkpoint("s"), t0 + ms(20));
        let c = e
            .handle(cond(VM_RUNNING, false, Setter::Vm), t0 + ms(50))
            .changes;
        assert_eq!(globals(&c), [(GO, GD)]);
        assert_eq!(
            c.iter().filter(|c| c.to == GD && !c.is_global()).count(),
            3,
            "{c:?}"
        );
        assert_eq!(e.next_deadline(), None, "no timers while paused");
        assert!(
            e.poll(t0 + ms(10_050)).is_empty(),
            "10 timeouts later: no fire"
        );
        let resume = t0 + ms(10_050);
        let c = e.handle(cond(VM_RUNNING, true, Setter::Vm), resume).changes;
        assert_eq!(globals(&c), [(GD, GO)]);
        assert!(
            c[0].reason.contains("condition vm-running became true"),
            "{}",
            c[0].reason
        );
        assert!(
            c[0].reason.ends_with("supervision restarted"),
            "{}",
            c[0].reason
        );
        assert_eq!(
            e.next_deadline(),
            Some(resume + ms(100)),
            "a fresh alive cycle; the deadline's stale start is gone"
        );
        let snap = e.snapshot(resume);
        let timeout = &snap.supervisions[0];
        assert_eq!(
            timeout.next_deadline_ms,
            Some(1000),
            "a full timeout from now"
        );
        let _ = e.handle(Event::Checkpoint("tick"), resume + ms(50));
        assert!(e.poll(resume + ms(100)).is_empty());
    }

    #[test]
    fn conditions_are_set_only_by_their_setter_and_a_guest_line_is_input() {
        let t0 = Instant::now();
        let mut spec = paused_spec();
        spec.conditions = vec![
            ConditionSpec::new("app-ready", false, Setter::Guest),
            ConditionSpec::new("maintenance-off", true, Setter::Operator),
        ];
        spec.logical = vec![
            LogicalSpec::new("boot")
                .add_entry_point("a")
                .add_exit_point("b")
                .add_allowed_transition("a", "b")
                .link_condition("app-ready")
                .link_condition("maintenance-off"),
        ];
        let mut e = engine(&spec, t0);
        assert_eq!(
            e.supervision_status("boot"),
            Some(SupervisionStatus::Deactivated)
        );
        let o = e.handle(cond(VM_RUNNING, false, Setter::Guest), t0 + ms(40));
        assert!(
            o.rejected
                .is_some_and(|r| r.to_string().contains("set by the vm, not by the guest"))
        );
        assert_eq!(
            e.next_deadline(),
            Some(t0 + ms(100)),
            "still running (the alive cycle)"
        );
        assert_eq!(
            e.snapshot(t0 + ms(40)).supervisions[0].next_deadline_ms,
            Some(1000),
            "the refused line was input"
        );
        let o = e.handle(cond("maintenance-off", false, Setter::Guest), t0 + ms(50));
        assert!(o.rejected.is_some());
        let o = e.handle(cond("app-ready", true, Setter::Guest), t0 + ms(60));
        assert_eq!(o.rejected, None);
        assert_eq!(e.supervision_status("boot"), Some(SupervisionStatus::Ok));
        let o = e.handle(
            cond("maintenance-off", false, Setter::Operator),
            t0 + ms(70),
        );
        assert_eq!(
            o.changes[0].reason,
            "condition maintenance-off became false (set by the operator): supervision suspended"
        );
        assert_eq!(
            e.supervision_status("boot"),
            Some(SupervisionStatus::Deactivated)
        );
    }

    #[test]
    fn enable_and_disable_at_run_time() {
        let t0 = Instant::now();
        let mut e = engine(&paused_spec(), t0);
        let c = e.handle(Event::Disable(None), t0 + ms(50)).changes;
        assert_eq!(globals(&c), [(GO, GD)]);
        assert!(
            e.poll(t0 + ms(60_000)).is_empty(),
            "a disabled watchdog never fires"
        );
        let o = e.handle(Event::Enable(Some("nope")), t0 + ms(60_000));
        assert!(o.rejected.is_some_and(|r| {
            r.to_string()
                .contains("no supervision nope in this watchdog (it has timeout, loop, req)")
        }));
        // Disabling one supervision while the watchdog is off changes nothing yet.
        assert!(
            e.handle(Event::Disable(Some("loop")), t0 + ms(60_000))
                .changes
                .is_empty()
        );
        let on = t0 + ms(60_000);
        let c = e.handle(Event::Enable(None), on).changes;
        assert_eq!(globals(&c), [(GD, GO)]);
        assert_eq!(
            e.supervision_status("loop"),
            Some(SupervisionStatus::Deactivated)
        );
        assert_eq!(e.next_deadline(), Some(on + ms(1000)), "re-armed from now");
        // Disable the plain timeout alone: a trigger is refused, nothing fires.
        let _ = e.handle(Event::Disable(Some(TIMEOUT_NAME)), on);
        assert_eq!(e.status(), GO, "the deadline supervision is still on");
        let o = e.handle(Event::Trigger, on + ms(1));
        assert!(o.changes.is_empty());
        assert!(
            o.rejected
                .is_some_and(|r| r.to_string().contains("deactivated"))
        );
        assert!(e.poll(on + ms(100_000)).is_empty());
        let c = e
            .handle(Event::Enable(Some(TIMEOUT_NAME)), on + ms(100_000))
            .changes;
        assert_eq!(c.len(), 1, "local only: {c:?}");
        assert_eq!(
            c[0].reason,
            "enabled by the operator: supervision restarted"
        );
    }

    #[test]
    fn a_vm_that_starts_over_gets_its_grace_again() {
        let t0 = Instant::now();
        let mut spec = EngineSpec::plain(ms(1000));
        spec.grace = Some(ms(30_000));
        let mut e = engine(&spec, t0);
        // Heard at 10 s (grace over), silent: expired at 11 s.
        let _ = e.handle(Event::Heartbeat, t0 + ms(10_000));
        assert_eq!(globals(&e.poll(t0 + ms(11_000))), [(GO, GX)]);
        // The VM reset at 12 s: OK again, and the booting guest has the whole grace.
        let o = e.handle(Event::StartOver, t0 + ms(12_000));
        assert_eq!(globals(&o.changes), [(GX, GO)]);
        assert!(o.changes[0].reason.contains("started over"), "{o:?}");
        assert_eq!(e.next_deadline(), Some(t0 + ms(42_000)));
        assert!(e.poll(t0 + ms(41_999)).is_empty());
        assert_eq!(globals(&e.poll(t0 + ms(42_000))), [(GO, GX)]);
        // Running and heard: a start-over re-enters the grace without a status change.
        let _ = e.handle(Event::Heartbeat, t0 + ms(50_000));
        let o = e.handle(Event::StartOver, t0 + ms(50_500));
        assert!(globals(&o.changes).is_empty(), "{o:?}");
        assert_eq!(e.next_deadline(), Some(t0 + ms(80_500)));
    }

    #[test]
    fn a_start_over_while_paused_keeps_the_grace_for_the_resume() {
        let t0 = Instant::now();
        let mut spec = EngineSpec::plain(ms(1000));
        spec.plain.conditions = vec![VM_RUNNING.into()];
        spec.grace = Some(ms(30_000));
        let mut e = engine(&spec, t0);
        let _ = e.handle(Event::Heartbeat, t0 + ms(100));
        let pause = |v| Event::Condition {
            name: VM_RUNNING,
            value: v,
            by: Setter::Vm,
        };
        let _ = e.handle(pause(false), t0 + ms(200));
        let _ = e.handle(Event::StartOver, t0 + ms(300));
        let _ = e.handle(pause(true), t0 + ms(400));
        assert_eq!(
            e.next_deadline(),
            Some(t0 + ms(30_400)),
            "resumed after a start-over: the grace, not the bare timeout"
        );
    }

    #[test]
    fn expired_tolerance_leads_to_stopped_and_recovery_leaves_it() {
        let t0 = Instant::now();
        let mut spec = EngineSpec::plain(ms(1000));
        spec.expired_tolerance = Some(ms(3000));
        let mut e = engine(&spec, t0);
        assert_eq!(globals(&e.poll(t0 + ms(1000))), [(GO, GX)]);
        assert_eq!(e.next_deadline(), Some(t0 + ms(4000)));
        assert_eq!(e.snapshot(t0 + ms(2500)).stopped_in_ms, Some(1500));
        assert!(e.poll(t0 + ms(3999)).is_empty());
        let c = e.poll(t0 + ms(4000));
        assert_eq!(globals(&c), [(GX, GS)]);
        assert!(c[0].reason.contains("expired for 3000 ms"));
        assert_eq!(e.next_deadline(), None);
        assert_eq!(e.snapshot(t0 + ms(5000)).expired_for_ms, Some(4000));
        let c = e.handle(Event::Heartbeat, t0 + ms(9000)).changes;
        assert_eq!(globals(&c), [(GS, GO)]);
        // Without a poll, a late event still sees the STOPPED instant pass first.
        let mut e = engine(&spec, t0);
        let c = e.handle(Event::Heartbeat, t0 + ms(9000)).changes;
        assert_eq!(globals(&c), [(GO, GX), (GX, GS), (GS, GO)]);
        // A tolerance of 0 stops at the first poll.
        spec.expired_tolerance = Some(Duration::ZERO);
        let mut e = engine(&spec, t0);
        assert_eq!(globals(&e.poll(t0 + ms(1000))), [(GO, GX), (GX, GS)]);
    }

    #[test]
    fn local_statuses_add_up_to_the_global_one() {
        let t0 = Instant::now();
        let mut spec = EngineSpec::plain(ms(60_000));
        spec.alive = vec![AliveSpec::new("loop", "tick", ms(100), 1).with_tolerance(1)];
        spec.logical = vec![
            LogicalSpec::new("seq")
                .add_entry_point("a")
                .add_allowed_transition("a", "b")
                .add_exit_point("b"),
        ];
        let mut e = engine(&spec, t0);
        let c = e.poll(t0 + ms(100));
        assert_eq!(globals(&c), [(GO, GF)], "one empty cycle, tolerance 1");
        assert!(
            c[1].reason
                .starts_with("alive loop: checkpoint tick seen 0 times")
        );
        let c = e.handle(Event::Checkpoint("b"), t0 + ms(150)).changes;
        assert_eq!(globals(&c), [(GF, GX)], "the logical error expires at once");
        assert!(
            c[1].reason.contains("checkpoint b is not an entry point"),
            "{}",
            c[1].reason
        );
        let _ = e.handle(Event::Checkpoint("tick"), t0 + ms(160));
        let c = e.poll(t0 + ms(200));
        assert!(
            globals(&c).is_empty(),
            "alive is OK again, logical still expired: {c:?}"
        );
        let c = e.handle(Event::Checkpoint("a"), t0 + ms(210)).changes;
        assert_eq!(globals(&c), [(GX, GO)], "restart at an entry point");
    }

    #[test]
    fn a_deadline_overrun_fires_at_start_plus_max() {
        let t0 = Instant::now();
        let mut e = engine(&paused_spec(), t0);
        let _ = e.handle(Event::Checkpoint("s"), t0 + ms(10));
        assert_eq!(
            e.next_deadline(),
            Some(t0 + ms(100)),
            "the alive cycle comes first"
        );
        for cycle in 0..3 {
            let c = e.handle(Event::Checkpoint("tick"), t0 + ms(50 + 100 * cycle));
            assert!(c.changes.is_empty());
            assert!(e.poll(t0 + ms(100 + 100 * cycle)).is_empty());
        }
        assert_eq!(e.next_deadline(), Some(t0 + ms(310)));
        let c = e.poll(t0 + ms(310));
        assert_eq!(globals(&c), [(GO, GX)]);
        assert!(
            c[1].reason
                .contains("deadline req: no end e within 300 ms of start s"),
            "{}",
            c[1].reason
        );
    }

    #[test]
    fn new_refuses_an_invalid_spec() {
        let mut spec = EngineSpec::plain(ms(1000));
        spec.alive = vec![AliveSpec::new("a", "t", Duration::ZERO, 1)];
        let err = WatchdogEngine::new(&spec, Instant::now()).unwrap_err();
        assert_eq!(err.to_string(), "alive 'a': cycle=0: give at least 1 ms");
    }

    #[test]
    fn the_snapshot_shows_everything_status_needs() {
        let t0 = Instant::now();
        let mut spec = paused_spec();
        spec.alive[0] = AliveSpec::new("loop", "tick", ms(100), 3)
            .with_margins(1, 2)
            .with_tolerance(2);
        spec.logical = vec![
            LogicalSpec::new("seq")
                .add_entry_point("a")
                .add_allowed_transition("a", "b")
                .add_exit_point("b"),
        ];
        let mut e = engine(&spec, t0);
        let _ = e.handle(Event::Checkpoint("tick"), t0 + ms(10));
        let _ = e.handle(Event::Checkpoint("s"), t0 + ms(20));
        let _ = e.handle(Event::Checkpoint("a"), t0 + ms(30));
        let json = serde_json::to_value(e.snapshot(t0 + ms(40))).expect("serializes");
        let want = serde_json::json!({
            "status": "ok",
            "enabled": true,
            "last_reason": null,
            "expired_for_ms": null,
            "stopped_in_ms": null,
            "stopping": false,
            "next_deadline_ms": 60,
            "conditions": [{"name": "vm-running", "value": true, "set_by": "vm"}],
            "supervisions": [
                {
                    "name": "timeout", "kind": "timeout", "status": "ok", "enabled": true,
                    "active": true, "conditions": [{"name": "vm-running", "holds": true}],
                    "next_deadline_ms": 990, "last_checkpoint": null,
                    "last_checkpoint_ms_ago": null, "last_reason": null,
                    "timeout_ms": 1000, "grace_ms": null, "timeout_min_ms": 0,
                    "timeout_max_ms": 1000, "last_input_ms_ago": 10
                },
                {
                    "name": "loop", "kind": "alive", "status": "ok", "enabled": true,
                    "active": true, "conditions": [],
                    "next_deadline_ms": 60, "last_checkpoint": "tick",
                    "last_checkpoint_ms_ago": 30, "last_reason": null,
                    "checkpoint": "tick", "cycle_ms": 100, "expected": 3, "min_count": 2,
                    "max_count": 5, "tolerance": 2, "failed_cycles": 0, "count_in_cycle": 1,
                    "cycle_elapsed_ms": 40, "last_cycle_count": null
                },
                {
                    "name": "req", "kind": "deadline", "status": "ok", "enabled": true,
                    "active": true, "conditions": [{"name": "vm-running", "holds": true}],
                    "next_deadline_ms": 280, "last_checkpoint": "s",
                    "last_checkpoint_ms_ago": 20, "last_reason": null,
                    "start": "s", "end": "e", "min_ms": 0, "max_ms": 300,
                    "running_for_ms": 20, "last_measured_ms": null
                },
                {
                    "name": "seq", "kind": "logical", "status": "ok", "enabled": true,
                    "active": true, "conditions": [], "next_deadline_ms": null,
                    "last_checkpoint": "a", "last_checkpoint_ms_ago": 10, "last_reason": null,
                    "current": "a", "expected_next": ["b"]
                }
            ]
        });
        assert_eq!(json, want);
        // After a failure the reasons and the expiry show up.
        let _ = e.handle(Event::Checkpoint("a"), t0 + ms(50));
        let snap = e.snapshot(t0 + ms(70));
        assert_eq!(snap.status, GX);
        assert_eq!(snap.expired_for_ms, Some(20));
        assert_eq!(
            snap.last_reason.as_deref(),
            Some("logical seq: checkpoint a may not follow a, expected one of b")
        );
        assert_eq!(snap.supervisions[3].status, SupervisionStatus::Expired);
    }

    /// Event kinds for the property test.
    fn event(kind: u8) -> Event<'static> {
        match kind {
            0 => Event::Heartbeat,
            1 | 2 => Event::Checkpoint("tick"),
            3 => Event::Checkpoint("s"),
            4 => Event::Checkpoint("e"),
            5 => Event::Checkpoint("a"),
            6 => Event::Checkpoint("b"),
            7 => Event::Trigger,
            8 => cond("g", true, Setter::Guest),
            9 => cond("g", false, Setter::Guest),
            10 => Event::Disable(Some("loop")),
            11 => Event::Enable(Some("loop")),
            12 => Event::SetTimeout(ms(150)),
            13 => Event::Stopping,
            14 => Event::ExtendTimeout(ms(180)),
            _ => Event::StartOver,
        }
    }

    fn busy_spec() -> EngineSpec {
        let mut spec = EngineSpec::plain(ms(100));
        spec.plain.max = Some(ms(200));
        spec.expired_tolerance = Some(ms(120));
        spec.conditions = vec![ConditionSpec::new("g", true, Setter::Guest)];
        spec.alive = vec![
            AliveSpec::new("loop", "tick", ms(50), 2)
                .with_margins(1, 1)
                .with_tolerance(1)
                .link_condition("g"),
        ];
        spec.deadline = vec![DeadlineSpec::new(
            "req",
            "s",
            "e",
            TimeRange::new(ms(10), ms(60)),
        )];
        spec.logical = vec![
            LogicalSpec::new("seq")
                .add_entry_point("a")
                .add_allowed_transition("a", "b")
                .add_allowed_transition("b", "a"),
        ];
        spec
    }

    proptest! {
        /// How often the engine is polled does not change what it reports: one engine is only
        /// fed events, another is also polled at every millisecond in between.
        #[test]
        fn fuzz_polling_frequency_does_not_change_the_outcome(
            events in proptest::collection::vec((0u64..90, 0u8..16), 0..40),
        ) {
            let t0 = Instant::now();
            let spec = busy_spec();
            let mut lazy = engine(&spec, t0);
            let mut busy = engine(&spec, t0);
            let (mut lazy_out, mut busy_out) = (Vec::new(), Vec::new());
            let mut t = 0;
            for (gap, kind) in events {
                for m in t + 1..t + gap {
                    busy_out.extend(busy.poll(t0 + ms(m)));
                }
                t += gap;
                let at = t0 + ms(t);
                lazy_out.extend(lazy.handle(event(kind), at).changes);
                busy_out.extend(busy.handle(event(kind), at).changes);
                prop_assert_eq!(lazy.status(), busy.status());
            }
            let end = t0 + ms(t + 1000);
            lazy_out.extend(lazy.poll(end));
            for m in t + 1..=t + 1000 {
                busy_out.extend(busy.poll(t0 + ms(m)));
            }
            prop_assert_eq!(lazy_out, busy_out);
            prop_assert_eq!(lazy.snapshot(end), busy.snapshot(end));
        }
    }
}
