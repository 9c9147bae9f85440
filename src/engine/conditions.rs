//! The conditions of one watchdog: their values, and who may change them.

use super::spec::{ConditionSpec, Setter};

/// Why a condition was not set. Nothing changed; the message names the condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConditionRefusal {
    /// Nobody declared a condition of that name.
    #[error("condition {name} refused: no such condition (known: {})", known.join(", "))]
    Unknown {
        /// The name asked for.
        name: String,
        /// Every condition the watchdog declares, in declaration order.
        known: Vec<String>,
    },
    /// The condition belongs to another setter: a guest cannot clear a condition meant for the
    /// host, nor the operator fake the VM's run state.
    #[error("condition {name} refused: it is set by the {owner}, not by the {by}")]
    WrongSetter {
        /// The condition asked for.
        name: String,
        /// The only party that may set it.
        owner: Setter,
        /// Who asked.
        by: Setter,
    },
}

/// Every condition an engine knows, in declaration order, with its current value.
#[derive(Debug, Clone)]
pub(crate) struct Conditions {
    entries: Vec<(ConditionSpec, bool)>,
}

impl Conditions {
    /// The conditions at their initial values.
    pub fn new(specs: Vec<ConditionSpec>) -> Self {
        Conditions {
            entries: specs
                .into_iter()
                .map(|c| {
                    let v = c.initial;
                    (c, v)
                })
                .collect(),
        }
    }

    /// The value of `name`; a condition nobody declared never holds.
    pub fn holds(&self, name: &str) -> bool {
        self.entries.iter().any(|(c, v)| *v && c.name == name)
    }

    /// Sets `name` to `value` on behalf of `by`. Returns whether the value changed, or why the
    /// request was refused.
    pub fn set(&mut self, name: &str, value: bool, by: Setter) -> Result<bool, ConditionRefusal> {
        let Some((spec, v)) = self.entries.iter_mut().find(|(c, _)| c.name == name) else {
            return Err(ConditionRefusal::Unknown {
                name: name.to_owned(),
                known: self.entries.iter().map(|(c, _)| c.name.clone()).collect(),
            });
        };
        if spec.set_by != by {
            return Err(ConditionRefusal::WrongSetter {
                name: name.to_owned(),
                owner: spec.set_by,
                by,
            });
        }
        Ok(std::mem::replace(v, value) != value)
    }

    /// Every condition with its value.
    pub fn iter(&self) -> impl Iterator<Item = (&ConditionSpec, bool)> {
        self.entries.iter().map(|(c, v)| (c, *v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_declared_setter_changes_a_condition() {
        let mut c = Conditions::new(vec![
            ConditionSpec::new("vm-running", true, Setter::Vm),
            ConditionSpec::new("ready", false, Setter::Guest),
        ]);
        assert!(c.holds("vm-running") && !c.holds("ready") && !c.holds("nope"));
        let err = c
            .set("vm-running", false, Setter::Guest)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "condition vm-running refused: it is set by the vm, not by the guest"
        );
        assert!(c.holds("vm-running"));
        assert_eq!(c.set("ready", true, Setter::Guest), Ok(true));
        assert_eq!(c.set("ready", true, Setter::Guest), Ok(false), "no change");
        let err = c.set("x", true, Setter::Operator).unwrap_err().to_string();
        assert!(
            err.contains("no such condition (known: vm-running, ready)"),
            "{err}"
        );
    }
}
