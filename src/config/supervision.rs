//! The supervisions of a watchdog in the TOML file (the seed's `--object` syntax only gives the
//! plain timeout). Durations are milliseconds, as everywhere in the config.
//!
//! ```toml
//! [watchdog.app]
//! awd_node = "hb"
//! timeout = 5000                          # the plain timeout: any input refreshes it
//! conditions = ["vm-running"]             # conditions the plain timeout is linked to
//! timeout_min = 1000                      # WATCHDOG_USEC= bounds; without timeout_max a
//! timeout_max = 60000                     # guest may only shorten its timeout
//! expired_tolerance = 10000               # EXPIRED for this long: STOPPED (optional)
//! guest_conditions = { app-ready = false }       # set by CONDITION=app-ready=1|0; initial value
//! operator_conditions = { maintenance-off = true } # set through the control socket
//!
//! [[watchdog.app.alive]]
//! name = "main-loop"
//! checkpoint = "tick"
//! cycle = 1000                            # reference cycle
//! expected = 10                           # correct: 8..=12 per cycle
//! min_margin = 2
//! max_margin = 2
//! tolerance = 3                           # failed cycles before EXPIRED
//! conditions = ["vm-running", "app-ready"]
//!
//! [[watchdog.app.deadline]]
//! name = "request"
//! start = "req-start"
//! end = "req-end"
//! min = 10                                # too early below, too late above; both inclusive
//! max = 500
//!
//! [[watchdog.app.logical]]
//! name = "boot"
//! checkpoints = ["init", "config", "ready"]
//! entry = ["init"]
//! exit = ["ready"]
//! transitions = [["init", "config"], ["config", "ready"]]
//! ```
//!
//! `vm-running` is built in (true at start, driven by the VM's run state). Any other linked
//! condition must be declared in `guest_conditions` or `operator_conditions`, with its value
//! at start; [`engine_spec`] turns all of this into an [`EngineSpec`] and checks it with
//! [`EngineSpec::validate`], so `awd check` reports every problem the seed's
//! `check_configuration` would.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::RawWatchdog;
use crate::engine::{
    AliveSpec, ConditionSpec, DeadlineSpec, EngineSpec, LogicalSpec, Setter, SpecError,
    TIMEOUT_NAME, TimeRange, TimeoutSpec,
};
use crate::util::ms;

/// An `[[watchdog.ID.alive]]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlive {
    /// The supervision's name.
    pub name: String,
    /// The checkpoint counted.
    pub checkpoint: String,
    /// The reference cycle, in milliseconds.
    pub cycle: u64,
    /// Checkpoints expected per cycle.
    pub expected: u32,
    /// How many fewer are still correct.
    #[serde(default)]
    pub min_margin: u32,
    /// How many more are still correct.
    #[serde(default)]
    pub max_margin: u32,
    /// Failed cycles tolerated before the supervision expires.
    #[serde(default)]
    pub tolerance: u32,
    /// Linked conditions.
    #[serde(default)]
    pub conditions: Vec<String>,
}

/// A `[[watchdog.ID.deadline]]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeadline {
    /// The supervision's name.
    pub name: String,
    /// The start checkpoint.
    pub start: String,
    /// The end checkpoint.
    pub end: String,
    /// The shortest accepted time from start to end, in milliseconds.
    #[serde(default)]
    pub min: u64,
    /// The longest accepted time, in milliseconds.
    pub max: u64,
    /// Linked conditions.
    #[serde(default)]
    pub conditions: Vec<String>,
}

/// A `[[watchdog.ID.logical]]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogical {
    /// The supervision's name.
    pub name: String,
    /// Every checkpoint of the graph.
    pub checkpoints: Vec<String>,
    /// Entry points.
    pub entry: Vec<String>,
    /// Exit points.
    #[serde(default)]
    pub exit: Vec<String>,
    /// Allowed transitions, `[from, to]`.
    #[serde(default)]
    pub transitions: Vec<(String, String)>,
    /// Linked conditions.
    #[serde(default)]
    pub conditions: Vec<String>,
}

/// Builds and checks the engine spec of watchdog `w`, whose plain timeout and grace the caller
/// has already read.
pub fn engine_spec(
    w: &RawWatchdog,
    timeout: Duration,
    grace: Option<Duration>,
) -> Result<EngineSpec, SpecError> {
    let conditions = w
        .guest_conditions
        .iter()
        .map(|(n, v)| ConditionSpec::new(n, *v, Setter::Guest))
        .chain(
            w.operator_conditions
                .iter()
                .map(|(n, v)| ConditionSpec::new(n, *v, Setter::Operator)),
        )
        .collect();
    let spec = EngineSpec {
        plain: TimeoutSpec {
            timeout,
            min: w.timeout_min.map(ms),
            max: w.timeout_max.map(ms),
            conditions: w.conditions.clone(),
        },
        grace,
        alive: w
            .alive
            .iter()
            .map(|a| AliveSpec {
                name: a.name.clone(),
                checkpoint: a.checkpoint.clone(),
                cycle: ms(a.cycle),
                expected: a.expected,
                min_margin: a.min_margin,
                max_margin: a.max_margin,
                tolerance: a.tolerance,
                conditions: a.conditions.clone(),
            })
            .collect(),
        deadline: w
            .deadline
            .iter()
            .map(|d| DeadlineSpec {
                name: d.name.clone(),
                start: d.start.clone(),
                end: d.end.clone(),
                range: TimeRange::new(ms(d.min), ms(d.max)),
                conditions: d.conditions.clone(),
            })
            .collect(),
        logical: w
            .logical
            .iter()
            .map(|l| LogicalSpec {
                name: l.name.clone(),
                checkpoints: l.checkpoints.clone(),
                entry: l.entry.clone(),
                exit: l.exit.clone(),
                transitions: l.transitions.clone(),
                conditions: l.conditions.clone(),
            })
            .collect(),
        conditions,
        expired_tolerance: w.expired_tolerance.map(ms),
    };
    spec.validate()?;
    Ok(spec)
}

/// The supervision part of `awd check`'s output for one watchdog: one line per supervision
/// and per condition, indented like the rest of [`Config`](super::Config)'s display.
pub struct Summary<'a>(pub &'a EngineSpec);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        writeln!(f, "  supervision       {TIMEOUT_NAME}: {}", s.plain)?;
        for a in &s.alive {
            writeln!(f, "  supervision       {}: {a}", a.name)?;
        }
        for d in &s.deadline {
            writeln!(f, "  supervision       {}: {d}", d.name)?;
        }
        for l in &s.logical {
            writeln!(f, "  supervision       {}: {l}", l.name)?;
        }
        for c in s.all_conditions() {
            writeln!(f, "  condition         {c}")?;
        }
        match s.expired_tolerance {
            Some(t) => writeln!(f, "  expired_tolerance {} ms, then stopped", t.as_millis()),
            None => writeln!(f, "  expired_tolerance none (stays expired)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, ConfigError, file};

    const CHARDEV: &str = "[chardev.hb]\npath = \"/tmp/awd-test-hb.sock\"\nserver = true\n";

    fn build(watchdog: &str) -> Result<Config, ConfigError> {
        let text =
            format!("{CHARDEV}[watchdog.app]\nawd_node = \"hb\"\ntimeout = 5000\n{watchdog}");
        Config::build(file::parse(&text, Path::new("awd.toml"))?)
    }

    /// The module's example, as README shows it.
    const EXAMPLE: &str = r#"
conditions = ["vm-running"]
timeout_min = 1000
timeout_max = 60000
expired_tolerance = 10000
guest_conditions = { app-ready = false }
operator_conditions = { maintenance-off = true }

[[watchdog.app.alive]]
name = "main-loop"
checkpoint = "tick"
cycle = 1000
expected = 10
min_margin = 2
max_margin = 2
tolerance = 3
conditions = ["vm-running", "app-ready"]

[[watchdog.app.deadline]]
name = "request"
start = "req-start"
end = "req-end"
min = 10
max = 500

[[watchdog.app.logical]]
name = "boot"
checkpoints = ["init", "config", "ready"]
entry = ["init"]
exit = ["ready"]
transitions = [["init", "config"], ["config", "ready"]]
"#;

    #[test]
    fn the_module_example_builds_and_check_prints_each_supervision() {
        let cfg = build(EXAMPLE).unwrap();
        let e = &cfg.watchdogs[0].engine;
        assert_eq!(e.plain.timeout, ms(5000));
        assert_eq!(e.plain.bounds(), TimeRange::new(ms(1000), ms(60_000)));
        assert_eq!(e.alive[0].min_count(), 8);
        assert_eq!(e.deadline[0].range, TimeRange::new(ms(10), ms(500)));
        assert_eq!(e.logical[0].transitions.len(), 2);
        assert_eq!(e.expired_tolerance, Some(ms(10_000)));
        let text = cfg.to_string();
        for want in [
            "supervision       timeout: timeout 5000 ms, WATCHDOG_USEC within 1000..=60000 ms, conditions vm-running",
            "supervision       main-loop: alive: checkpoint tick 8..=12 times per 1000 ms (expected 10), 3 failed cycles tolerated, conditions vm-running, app-ready",
            "supervision       request: deadline: req-start -> req-end within 10..=500 ms",
            "supervision       boot: logical: entry init, exit ready, transitions init->config, config->ready",
            "condition         vm-running (set by the vm, initially true)",
            "condition         app-ready (set by the guest, initially false)",
            "condition         maintenance-off (set by the operator, initially true)",
            "expired_tolerance 10000 ms, then stopped",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn a_seed_style_watchdog_is_a_plain_timeout() {
        let cfg = build("").unwrap();
        assert_eq!(cfg.watchdogs[0].engine, EngineSpec::plain(ms(5000)));
        let text = cfg.to_string();
        assert!(
            text.contains("timeout: timeout 5000 ms, WATCHDOG_USEC may only shorten it"),
            "{text}"
        );
    }

    /// Every check_configuration error of issue 4, one line each, naming the supervision.
    #[test]
    fn check_configuration_errors_are_one_line_and_name_the_supervision() {
        let alive = "[[watchdog.app.alive]]\nname = \"loop\"\ncheckpoint = \"tick\"\n";
        let deadline = "[[watchdog.app.deadline]]\nname = \"req\"\nstart = \"s\"\nend = \"e\"\n";
        let logical = "[[watchdog.app.logical]]\nname = \"boot\"\ncheckpoints = [\"a\", \"b\", \"c\"]\nentry = [\"a\"]\n";
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{deadline}min = 600\nmax = 500\n"),
                "watchdog 'app': deadline 'req': min=600 ms is greater than max=500 ms",
            ),
            (
                "timeout_min = 7000\ntimeout_max = 6000\n".into(),
                "watchdog 'app': timeout: timeout_min=7000 ms is greater than timeout_max=6000 ms",
            ),
            (
                format!("{alive}cycle = 1000\nexpected = 2\nmin_margin = 3\n"),
                "watchdog 'app': alive 'loop': expected=2 lies outside its margins: min_margin=3",
            ),
            (
                format!("{alive}cycle = 0\nexpected = 2\n"),
                "watchdog 'app': alive 'loop': cycle=0: give at least 1 ms",
            ),
            (
                format!("{deadline}max = 0\n"),
                "watchdog 'app': deadline 'req': max=0: give at least 1 ms",
            ),
            (
                format!(
                    "{logical}exit = [\"c\"]\ntransitions = [[\"a\", \"b\"], [\"b\", \"x\"]]\n"
                ),
                "watchdog 'app': logical 'boot': transition b -> x names undeclared checkpoint 'x'",
            ),
            (
                format!("{logical}exit = [\"c\"]\ntransitions = [[\"a\", \"b\"]]\n"),
                "watchdog 'app': logical 'boot': exit point 'c' is unreachable from every entry point",
            ),
            (
                format!("{alive}cycle = 100\nexpected = 1\nconditions = [\"app-redy\"]\n"),
                "watchdog 'app': alive 'loop': linked condition 'app-redy' is set by nothing",
            ),
            (
                "conditions = [\"ready\"]\n".into(),
                "watchdog 'app': timeout: linked condition 'ready' is set by nothing",
            ),
            (
                "guest_conditions = { vm-running = true }\n".into(),
                "condition 'vm-running': only the built-in vm-running is set by the vm",
            ),
            (
                "guest_conditions = { x = true }\noperator_conditions = { x = false }\n".into(),
                "condition 'x' is declared twice",
            ),
            (
                format!("{alive}name = \"timeout\"\n").replace("name = \"loop\"\n", "")
                    + "cycle = 1\nexpected = 1\n",
                "watchdog 'app': alive 'timeout': the name is already taken",
            ),
            (
                "timeout_max = 4000\n".into(),
                "watchdog 'app': timeout: timeout=5000 ms lies outside timeout_min..=timeout_max",
            ),
        ];
        for (extra, want) in cases {
            let err = build(&extra).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "want {want:?}\n got {err:?}\nfor\n{extra}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn unknown_keys_in_a_supervision_table_are_refused() {
        let err = build("[[watchdog.app.alive]]\nname = \"l\"\ncheckpoint = \"t\"\ncycle = 1\nexpected = 1\ncylce = 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cylce"), "{err}");
        let err = build("[[watchdog.app.logical]]\nname = \"l\"\ncheckpoints = [\"a\"]\nentry = [\"a\"]\ntransitions = [[\"a\"]]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("awd.toml"), "{err}");
    }
}
