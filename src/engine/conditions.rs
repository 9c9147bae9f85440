//! The conditions of one watchdog: their values, and who may change them.

use super::spec::{ConditionSpec, Setter};

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
    pub fn set(&mut self, name: &str, value: bool, by: Setter) -> Result<bool, String> {
        let Some((spec, v)) = self.entries.iter_mut().find(|(c, _)| c.name == name) else {
            let known: Vec<&str> = self.entries.iter().map(|(c, _)| c.name.as_str()).collect();
            return Err(format!(
                "condition {name} refused: no such condition (known: {})",
                known.join(", ")
            ));
        };
        if spec.set_by != by {
            return Err(format!(
                "condition {name} refused: it is set by the {}, not by the {by}",
                spec.set_by
            ));
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
        let err = c.set("vm-running", false, Setter::Guest).unwrap_err();
        assert_eq!(
            err,
            "condition vm-running refused: it is set by the vm, not by the guest"
        );
        assert!(c.holds("vm-running"));
        assert_eq!(c.set("ready", true, Setter::Guest), Ok(true));
        assert_eq!(c.set("ready", true, Setter::Guest), Ok(false), "no change");
        let err = c.set("x", true, Setter::Operator).unwrap_err();
        assert!(
            err.contains("no such condition (known: vm-running, ready)"),
            "{err}"
        );
    }
}
