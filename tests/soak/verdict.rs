//! The soak's verdict: what was expected of each watched subject, what QEMU witnessed, and
//! the false, missed and late fires between the two. Pure: times are seconds since the soak
//! began, so the rules are unit-tested without a guest.

use serde::Serialize;

/// What one fault said about one subject.
#[derive(Clone, Debug, Serialize)]
pub struct Expectation {
    /// The fault's index in the run (its row in the report).
    pub fault: usize,
    /// The subject (a watchdog on one side: `serial`, `vsock`, `pair-a`, `pair-b`, `remote`).
    pub subject: String,
    pub kind: ExpectKind,
}

/// A fault either must make its subject fire, or may (a window where either is right).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExpectKind {
    /// A fire must reach QEMU no earlier than `earliest` (before that the subject was still
    /// proven alive) and no later than `deadline` (silence + timeout + the stated bound).
    Fire { earliest: f64, deadline: f64 },
    /// A fire may or may not reach QEMU between `from` and `to` (a hung QEMU may drop a
    /// command it was sent while frozen).
    Allow { from: f64, to: f64 },
}

/// A command of a subject's script in QEMU's own trace: the witness of one fire.
#[derive(Clone, Debug, Serialize)]
pub struct Fire {
    pub subject: String,
    pub at: f64,
}

/// How one expected fire ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    OnTime,
    Late,
    Missed,
}

/// One expected fire and what happened.
#[derive(Clone, Debug, Serialize)]
pub struct Judged {
    pub fault: usize,
    pub subject: String,
    pub outcome: Outcome,
    /// Seconds from the deadline's timeout point (`deadline - bound`) to the fire; negative
    /// when it came early within the allowed span.
    pub fire_at: Option<f64>,
}

/// A fire no expectation accounts for.
#[derive(Clone, Debug, Serialize)]
pub struct FalseFire {
    pub subject: String,
    pub at: f64,
    /// The fault running (or last run) at that moment, for the replay.
    pub during_fault: Option<usize>,
}

/// The whole verdict.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    pub expected: Vec<Judged>,
    pub false_fires: Vec<FalseFire>,
    /// Fires inside an `Allow` window.
    pub allowed: usize,
}

impl Verdict {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.expected
            .iter()
            .filter(|j| j.outcome == outcome)
            .count()
    }
}

/// Matches witnessed fires to expectations. A fire expected by a fault is the subject's first
/// unclaimed fire in `[earliest, deadline + late_slack]`: on time up to `deadline`, late after
/// it; none there is a miss. A fire claimed by nothing is allowed inside an `Allow` window of
/// its subject and false everywhere else. `fault_starts[i]` is when fault `i` began, to name
/// the fault a false fire fell in.
pub fn judge(
    expectations: &[Expectation],
    fires: &[Fire],
    late_slack: f64,
    bound: f64,
    fault_starts: &[f64],
) -> Verdict {
    let mut claimed = vec![false; fires.len()];
    let mut verdict = Verdict::default();
    let mut wanted: Vec<&Expectation> = expectations
        .iter()
        .filter(|e| matches!(e.kind, ExpectKind::Fire { .. }))
        .collect();
    wanted.sort_by(|a, b| start_of(a).total_cmp(&start_of(b)));
    for e in wanted {
        let ExpectKind::Fire { earliest, deadline } = e.kind else {
            unreachable!("filtered above")
        };
        let found = fires.iter().enumerate().find(|(i, f)| {
            !claimed[*i]
                && f.subject == e.subject
                && f.at >= earliest
                && f.at <= deadline + late_slack
        });
        let judged = match found {
            Some((i, f)) => {
                claimed[i] = true;
                Judged {
                    fault: e.fault,
                    subject: e.subject.clone(),
                    outcome: if f.at <= deadline {
                        Outcome::OnTime
                    } else {
                        Outcome::Late
                    },
                    fire_at: Some(f.at - (deadline - bound)),
                }
            }
            None => Judged {
                fault: e.fault,
                subject: e.subject.clone(),
                outcome: Outcome::Missed,
                fire_at: None,
            },
        };
        verdict.expected.push(judged);
    }
    for (i, f) in fires.iter().enumerate() {
        if claimed[i] {
            continue;
        }
        let allowed = expectations.iter().any(|e| {
            e.subject == f.subject
                && matches!(e.kind, ExpectKind::Allow { from, to } if f.at >= from && f.at <= to)
        });
        if allowed {
            verdict.allowed += 1;
        } else {
            verdict.false_fires.push(FalseFire {
                subject: f.subject.clone(),
                at: f.at,
                during_fault: fault_starts.iter().rposition(|s| *s <= f.at),
            });
        }
    }
    verdict
}

fn start_of(e: &Expectation) -> f64 {
    match e.kind {
        ExpectKind::Fire { earliest, .. } => earliest,
        ExpectKind::Allow { from, .. } => from,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fire(subject: &str, at: f64) -> Fire {
        Fire {
            subject: subject.into(),
            at,
        }
    }

    fn expect_fire(fault: usize, subject: &str, earliest: f64, deadline: f64) -> Expectation {
        Expectation {
            fault,
            subject: subject.into(),
            kind: ExpectKind::Fire { earliest, deadline },
        }
    }

    #[test]
    fn an_expected_fire_in_time_is_on_time_and_nothing_is_false() {
        let v = judge(
            &[expect_fire(0, "serial", 10.0, 13.5)],
            &[fire("serial", 12.1)],
            10.0,
            1.5,
            &[9.0],
        );
        assert_eq!(v.count(Outcome::OnTime), 1);
        assert!(v.false_fires.is_empty());
        let at = v.expected[0].fire_at.unwrap();
        assert!((at - 0.1).abs() < 1e-9, "{at}");
    }

    #[test]
    fn a_fire_after_the_deadline_is_late_and_none_at_all_is_missed() {
        let v = judge(
            &[
                expect_fire(0, "serial", 10.0, 13.5),
                expect_fire(1, "vsock", 30.0, 33.5),
            ],
            &[fire("serial", 15.0)],
            10.0,
            1.5,
            &[9.0, 29.0],
        );
        assert_eq!(v.count(Outcome::Late), 1);
        assert_eq!(v.count(Outcome::Missed), 1);
        assert!(v.false_fires.is_empty());
    }

    #[test]
    fn a_fire_of_another_subject_or_before_the_silence_is_false() {
        let v = judge(
            &[expect_fire(0, "serial", 10.0, 13.5)],
            &[
                fire("vsock", 12.0),
                fire("serial", 9.5),
                fire("serial", 12.0),
            ],
            10.0,
            1.5,
            &[9.0],
        );
        assert_eq!(v.count(Outcome::OnTime), 1);
        assert_eq!(v.false_fires.len(), 2);
        assert_eq!(v.false_fires[0].during_fault, Some(0));
    }

    #[test]
    fn one_fire_answers_one_expectation_and_a_second_fire_is_false() {
        let v = judge(
            &[expect_fire(0, "remote", 10.0, 13.5)],
            &[fire("remote", 12.0), fire("remote", 12.5)],
            10.0,
            1.5,
            &[9.0],
        );
        assert_eq!(v.count(Outcome::OnTime), 1);
        assert_eq!(v.false_fires.len(), 1);
    }

    #[test]
    fn a_fire_inside_an_allow_window_is_neither_false_nor_required() {
        let allow = Expectation {
            fault: 0,
            subject: "vsock".into(),
            kind: ExpectKind::Allow {
                from: 5.0,
                to: 20.0,
            },
        };
        let v = judge(
            std::slice::from_ref(&allow),
            &[fire("vsock", 8.0)],
            10.0,
            1.5,
            &[5.0],
        );
        assert_eq!(v.allowed, 1);
        assert!(v.false_fires.is_empty() && v.expected.is_empty());
        let v = judge(&[allow], &[], 10.0, 1.5, &[5.0]);
        assert_eq!(v.allowed, 0);
        assert!(v.false_fires.is_empty() && v.expected.is_empty());
    }
}
