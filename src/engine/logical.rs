//! Logical supervision: checkpoints must follow each other along allowed transitions (the
//! seed's `add_entry_point`, `add_exit_point`, `add_allowed_transition`).
//!
//! * A sequence begins at an entry point. Each further checkpoint must be an allowed successor
//!   of the one before; reaching an exit point ends the sequence, and the next checkpoint must
//!   be an entry point again (a restart).
//! * Any other checkpoint of the supervision is a failure: EXPIRED at once. Checkpoints the
//!   supervision does not declare are not its business and are ignored.
//! * There is no timer: how long a step takes is the deadline supervision's job.
//! * **Recovery:** once EXPIRED, checkpoints are ignored until an entry point arrives, which
//!   restarts the supervision cleanly (status OK) and begins a new sequence.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Instant;

use super::spec::{SpecError, SupervisionKind, check_checkpoint, write_conditions};
use super::status::{LocalChange, SupervisionStatus};

/// The parameters of one logical supervision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalSpec {
    /// The supervision's name, unique in its watchdog.
    pub name: String,
    /// Every checkpoint of the graph; entries, exits and transitions may only name these.
    pub checkpoints: Vec<String>,
    /// Where a sequence may begin.
    pub entry: Vec<String>,
    /// Where a sequence ends.
    pub exit: Vec<String>,
    /// Allowed steps, `(from, to)`.
    pub transitions: Vec<(String, String)>,
    /// Conditions that must all hold for it to run.
    pub conditions: Vec<String>,
}

impl LogicalSpec {
    /// An empty graph called `name`; add to it with the builder methods.
    pub fn new(name: impl Into<String>) -> Self {
        LogicalSpec {
            name: name.into(),
            checkpoints: Vec::new(),
            entry: Vec::new(),
            exit: Vec::new(),
            transitions: Vec::new(),
            conditions: Vec::new(),
        }
    }

    /// Declares a checkpoint.
    pub fn add_checkpoint(mut self, name: impl Into<String>) -> Self {
        self.checkpoints.push(name.into());
        self
    }

    /// Declares `name` and makes it an entry point (the seed's `add_entry_point`).
    pub fn add_entry_point(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.declare(&name);
        self.entry.push(name);
        self
    }

    /// Declares `name` and makes it an exit point (the seed's `add_exit_point`).
    pub fn add_exit_point(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.declare(&name);
        self.exit.push(name);
        self
    }

    /// Allows the step `from -> to`, declaring both (the seed's `add_allowed_transition`).
    pub fn add_allowed_transition(
        mut self,
        from: impl Into<String>,
        to: impl Into<String>,
    ) -> Self {
        let (from, to) = (from.into(), to.into());
        self.declare(&from);
        self.declare(&to);
        self.transitions.push((from, to));
        self
    }

    /// Links a condition (the seed's `link_condition`).
    pub fn link_condition(mut self, condition: impl Into<String>) -> Self {
        self.conditions.push(condition.into());
        self
    }

    fn declare(&mut self, name: &str) {
        if !self.checkpoints.iter().any(|c| c == name) {
            self.checkpoints.push(name.to_owned());
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        let name = || self.name.clone();
        for c in &self.checkpoints {
            check_checkpoint(SupervisionKind::Logical, &self.name, c)?;
        }
        let declared: BTreeSet<&str> = self.checkpoints.iter().map(String::as_str).collect();
        let undeclared = |place: String, c: &str| SpecError::LogicalUndeclared {
            name: name(),
            place,
            checkpoint: c.to_owned(),
        };
        if self.entry.is_empty() {
            return Err(SpecError::LogicalNoEntry { name: name() });
        }
        for (place, list) in [("entry", &self.entry), ("exit", &self.exit)] {
            if let Some(c) = list.iter().find(|c| !declared.contains(c.as_str())) {
                return Err(undeclared(place.into(), c));
            }
        }
        for (from, to) in &self.transitions {
            for c in [from, to] {
                if !declared.contains(c.as_str()) {
                    return Err(undeclared(format!("transition {from} -> {to}"), c));
                }
            }
            if self.exit.contains(from) {
                return Err(SpecError::LogicalTransitionFromExit {
                    name: name(),
                    from: from.clone(),
                    to: to.clone(),
                });
            }
        }
        let graph = Graph::new(self);
        let mut reached: BTreeSet<&str> = self.entry.iter().map(String::as_str).collect();
        let mut todo: Vec<&str> = reached.iter().copied().collect();
        while let Some(c) = todo.pop() {
            for next in graph.successors(c) {
                if reached.insert(next) {
                    todo.push(next);
                }
            }
        }
        if let Some(exit) = self.exit.iter().find(|e| !reached.contains(e.as_str())) {
            return Err(SpecError::LogicalExitUnreachable {
                name: name(),
                exit: exit.clone(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for LogicalSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let steps: Vec<String> = self
            .transitions
            .iter()
            .map(|(a, b)| format!("{a}->{b}"))
            .collect();
        write!(
            f,
            "logical: entry {}, exit {}, transitions {}",
            list_or_none(&self.entry),
            list_or_none(&self.exit),
            list_or_none(&steps)
        )?;
        write_conditions(f, &self.conditions)
    }
}

fn list_or_none(l: &[String]) -> String {
    if l.is_empty() {
        "none".into()
    } else {
        l.join(", ")
    }
}

/// The transitions as a successor map.
#[derive(Debug, Clone)]
struct Graph {
    next: BTreeMap<String, BTreeSet<String>>,
}

impl Graph {
    fn new(spec: &LogicalSpec) -> Self {
        let mut next: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in &spec.transitions {
            next.entry(a.clone()).or_default().insert(b.clone());
        }
        Graph { next }
    }

    fn successors(&self, c: &str) -> impl Iterator<Item = &str> {
        self.next.get(c).into_iter().flatten().map(String::as_str)
    }
}

/// The state of one logical supervision while it is active.
#[derive(Debug, Clone)]
pub(crate) struct LogicalSupervision {
    spec: LogicalSpec,
    graph: Graph,
    status: SupervisionStatus,
    /// The last checkpoint of the running sequence; `None` between sequences.
    current: Option<String>,
    last_checkpoint: Option<(String, Instant)>,
}

impl LogicalSupervision {
    /// Starts supervising: the next checkpoint must be an entry point.
    pub fn new(spec: &LogicalSpec) -> Self {
        LogicalSupervision {
            spec: spec.clone(),
            graph: Graph::new(spec),
            status: SupervisionStatus::Ok,
            current: None,
            last_checkpoint: None,
        }
    }

    /// OK or EXPIRED.
    pub fn status(&self) -> SupervisionStatus {
        self.status
    }

    /// The last checkpoint of the running sequence, `None` between sequences.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// The last of its checkpoints and when it arrived.
    pub fn last_checkpoint(&self) -> Option<(&str, Instant)> {
        self.last_checkpoint.as_ref().map(|(c, t)| (c.as_str(), *t))
    }

    /// What may come next: the successors of the current checkpoint, or the entry points.
    pub fn expected_next(&self) -> Vec<String> {
        match &self.current {
            Some(c) => self.graph.successors(c).map(str::to_owned).collect(),
            None => {
                let mut e = self.spec.entry.clone();
                e.sort();
                e.dedup();
                e
            }
        }
    }

    /// Forgets the running sequence; status OK.
    pub fn restart(&mut self) {
        self.status = SupervisionStatus::Ok;
        self.current = None;
    }

    /// A checkpoint at `now`; returns whether it is this supervision's.
    pub fn checkpoint(&mut self, name: &str, now: Instant, out: &mut Vec<LocalChange>) -> bool {
        if !self.spec.checkpoints.iter().any(|c| c == name) {
            return false;
        }
        self.last_checkpoint = Some((name.to_owned(), now));
        let is_entry = self.spec.entry.iter().any(|c| c == name);
        if self.status == SupervisionStatus::Expired {
            if !is_entry {
                return true;
            }
            out.push(LocalChange {
                at: now,
                from: SupervisionStatus::Expired,
                to: SupervisionStatus::Ok,
                reason: format!("entry point {name} arrived: supervision restarted"),
            });
            self.restart();
        }
        let allowed = match &self.current {
            None => is_entry,
            Some(prev) => self.graph.successors(prev).any(|c| c == name),
        };
        if allowed {
            let ends = self.spec.exit.iter().any(|c| c == name);
            self.current = (!ends).then(|| name.to_owned());
            return true;
        }
        let expected = self.expected_next();
        let expected = if expected.is_empty() {
            "nothing (a dead end)".to_owned()
        } else {
            expected.join(", ")
        };
        let reason = match &self.current {
            None => format!("checkpoint {name} is not an entry point, expected one of {expected}"),
            Some(prev) => {
                format!("checkpoint {name} may not follow {prev}, expected one of {expected}")
            }
        };
        out.push(LocalChange {
            at: now,
            from: self.status,
            to: SupervisionStatus::Expired,
            reason,
        });
        self.status = SupervisionStatus::Expired;
        self.current = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// init -> config -> (run -> config)* -> ready; `reset` is an entry too.
    fn spec() -> LogicalSpec {
        LogicalSpec::new("boot")
            .add_entry_point("init")
            .add_entry_point("reset")
            .add_exit_point("ready")
            .add_allowed_transition("init", "config")
            .add_allowed_transition("reset", "config")
            .add_allowed_transition("config", "run")
            .add_allowed_transition("run", "config")
            .add_allowed_transition("config", "ready")
    }

    /// Walks `steps`; returns the status after each.
    fn walk(steps: &[&str]) -> (Vec<SupervisionStatus>, Vec<LocalChange>) {
        let t0 = Instant::now();
        let mut l = LogicalSupervision::new(&spec());
        let mut out = Vec::new();
        let statuses = steps
            .iter()
            .map(|s| {
                l.checkpoint(s, t0, &mut out);
                l.status()
            })
            .collect();
        (statuses, out)
    }

    #[test]
    fn walks_legal_and_illegal() {
        use SupervisionStatus::{Expired as X, Ok as K};
        let cases: &[(&[&str], &[SupervisionStatus], &str)] = &[
            (
                &["init", "config", "run", "config", "ready"],
                &[K, K, K, K, K],
                "",
            ),
            (
                &["init", "config", "ready", "reset", "config", "ready"],
                &[K; 6],
                "",
            ),
            (
                &["config"],
                &[X],
                "checkpoint config is not an entry point, expected one of init, reset",
            ),
            (
                &["init", "ready"],
                &[K, X],
                "checkpoint ready may not follow init, expected one of config",
            ),
            (
                &["init", "config", "init"],
                &[K, K, X],
                "may not follow config, expected one of ready, run",
            ),
            (
                &["init", "config", "ready", "config"],
                &[K, K, K, X],
                "not an entry point",
            ),
            // Unknown checkpoints are someone else's: ignored.
            (&["init", "tick", "config"], &[K, K, K], ""),
            // Recovery: ignored until an entry point restarts a sequence.
            (
                &["run", "config", "init", "config"],
                &[X, X, K, K],
                "not an entry point",
            ),
        ];
        for (steps, want, reason) in cases {
            let (got, out) = walk(steps);
            assert_eq!(&got, want, "{steps:?}");
            if reason.is_empty() {
                assert!(out.is_empty(), "{steps:?}: {out:?}");
            } else {
                assert!(
                    out[0].reason.contains(reason),
                    "{steps:?}: {}",
                    out[0].reason
                );
            }
        }
    }

    #[test]
    fn a_restart_at_an_entry_point_after_the_exit_and_the_state_shown() {
        let t0 = Instant::now();
        let mut l = LogicalSupervision::new(&spec());
        let mut out = Vec::new();
        assert_eq!(l.expected_next(), ["init", "reset"]);
        l.checkpoint("init", t0, &mut out);
        assert_eq!(
            (l.current(), l.expected_next()),
            (Some("init"), vec!["config".to_owned()])
        );
        l.checkpoint("config", t0, &mut out);
        l.checkpoint("ready", t0, &mut out);
        assert_eq!(l.current(), None, "the exit ends the sequence");
        l.checkpoint("reset", t0, &mut out);
        assert_eq!(l.current(), Some("reset"));
        assert_eq!(l.status(), SupervisionStatus::Ok);
        assert!(out.is_empty());
        assert_eq!(l.last_checkpoint(), Some(("reset", t0)));
    }

    #[test]
    fn check_configuration_errors() {
        let base = LogicalSpec::new("g")
            .add_entry_point("a")
            .add_exit_point("c");
        let cases: Vec<(LogicalSpec, &str)> = vec![
            (
                LogicalSpec::new("g").add_checkpoint("a"),
                "logical 'g': no entry point",
            ),
            (
                LogicalSpec {
                    transitions: vec![("a".into(), "x".into())],
                    ..base.clone()
                },
                "logical 'g': transition a -> x names undeclared checkpoint 'x'",
            ),
            (
                LogicalSpec {
                    exit: vec!["zz".into()],
                    ..base.clone()
                },
                "logical 'g': exit names undeclared checkpoint 'zz'",
            ),
            (
                base.clone().add_allowed_transition("a", "b"),
                "logical 'g': exit point 'c' is unreachable from every entry point",
            ),
            (
                base.clone()
                    .add_allowed_transition("a", "c")
                    .add_allowed_transition("c", "a"),
                "transition c -> a leaves exit point 'c'",
            ),
            (
                base.clone().add_checkpoint("a b"),
                "checkpoint 'a b': a name holds",
            ),
        ];
        for (spec, want) in cases {
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?}, got {err:?}");
        }
        assert!(base.add_allowed_transition("a", "c").validate().is_ok());
        // A cycle with no exit is a valid main loop.
        assert!(
            LogicalSpec::new("loop")
                .add_entry_point("a")
                .add_allowed_transition("a", "b")
                .add_allowed_transition("b", "a")
                .validate()
                .is_ok()
        );
    }
}
