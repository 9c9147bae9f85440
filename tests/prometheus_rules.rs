//! `contrib/prometheus/awd.rules.yml` against the real tools: promtool checks the rules and
//! runs their unit tests, and every awd series a rule reads exists in awd's own exposition, so
//! a renamed metric cannot leave an alert that never fires.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;

use awd::metrics::Metrics;
use awd::transport::vsock::{VsockCollector, VsockCounters};

const RULES: &str = "contrib/prometheus/awd.rules.yml";

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian package prometheus; scripts/install-deps installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_rules_check_and_their_unit_tests_pass() {
    promtool(&["check", "rules", RULES]);
    promtool(&["test", "rules", "contrib/prometheus/awd.rules.test.yml"]);
}

#[test]
fn every_series_a_rule_reads_is_one_awd_exports() {
    let m = Metrics::new();
    let w = m.watchdog("vm1", "hb");
    w.heard(1);
    let vsock = VsockCollector::default();
    m.register_collector(Box::new(vsock.clone()));
    vsock.add("/run/awd/vm1.sock", Arc::new(VsockCounters::default()));
    let exposition = m.encode();
    let exported: BTreeSet<&str> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let rules = std::fs::read_to_string(RULES).expect("the rules file");
    let mut read = BTreeSet::new();
    for expr in rules.lines().filter_map(|l| l.trim().strip_prefix("expr:")) {
        for (i, _) in expr.match_indices("awd_") {
            let name: String = expr[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            read.insert(name);
        }
    }
    assert!(read.len() >= 6, "{read:?}");
    let missing: Vec<_> = read
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "rules read {missing:?}, not in\n{exposition}"
    );
}
