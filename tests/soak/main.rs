//! The soak (issue 9): one run of faults drawn from a seed against real guests, real QEMUs and
//! two real awds, judged by what QEMU itself witnessed. Run it with `scripts/soak --minutes N
//! --seed S` (it sets `AWD_SOAK_MINUTES`, `AWD_SOAK_SEED` and `AWD_SOAK_REPORT`); `cargo test`
//! alone runs only the verdict's unit tests, the soak is `#[ignore]`d.
//!
//! The run: every fault kind once, in an order drawn from the seed, then faults drawn at
//! random until the minutes are up; after each fault, a wait (bounded) until every subject is
//! healthy again, and a quiet gap of 1–3 s. The verdict counts false, missed and late fires
//! (see `verdict.rs`); the test fails on any of them, or on a subject that did not recover.

#[path = "../common/mod.rs"]
mod common;
mod faults;
mod verdict;
mod world;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};
use serde_json::{Value, json};

use common::*;
use faults::Fault;
use verdict::{Expectation, Outcome, judge};
use world::*;

/// How long after its deadline a fire still counts as this fault's (late) rather than false.
const LATE_SLACK_S: f64 = 10.0;

struct Settings {
    minutes: f64,
    seed: u64,
    report: std::path::PathBuf,
}

fn settings() -> Settings {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let seed = var("AWD_SOAK_SEED").map_or(1, |v| v.parse().expect("AWD_SOAK_SEED: a number"));
    Settings {
        minutes: var("AWD_SOAK_MINUTES").map_or(3.0, |v| v.parse().expect("AWD_SOAK_MINUTES")),
        seed,
        report: var("AWD_SOAK_REPORT").map_or_else(
            || repo().join(format!("target/soak/seed-{seed}.json")),
            Into::into,
        ),
    }
}

/// One fault as run.
struct Ran {
    fault: Fault,
    at: f64,
    took: f64,
    /// Subjects that were not healthy again within the bound after it.
    unrecovered: Vec<&'static str>,
}

#[test]
#[ignore = "a soak of several minutes: run it with scripts/soak"]
fn soak() {
    let cfg = settings();
    let dir = scratch("soak");
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&cfg.seed.to_le_bytes());
    let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
    let mut gaps = TestRng::from_seed(RngAlgorithm::ChaCha, &[!cfg.seed as u8; 32]);
    eprintln!(
        "soak: seed {} for {} min in {}",
        cfg.seed,
        cfg.minutes,
        dir.path().display()
    );

    let mut w = World::start(dir.path());
    let sick = w.wait_healthy(BOOT);
    assert!(sick.is_empty(), "never healthy at start: {sick:?}");
    if let Some(sabotage) = Sabotage::from_env() {
        eprintln!("soak: sabotage {sabotage:?}: this run must fail");
        w.sabotage(sabotage);
    }
    w.t0 = Instant::now();
    let end = Duration::from_secs_f64(cfg.minutes * 60.0);

    let mut next = Fault::schedule(&mut rng);
    let mut ran: Vec<Ran> = Vec::new();
    let mut expectations: Vec<Expectation> = Vec::new();
    while w.t0.elapsed() < end || ran.len() < 12 {
        let fault = next(ran.len());
        let at = w.now();
        eprintln!(
            "soak: {at:7.1} s fault {} {} {}",
            ran.len(),
            fault.kind(),
            fault.params()
        );
        expectations.extend(fault.inject(&mut w, ran.len()));
        let unrecovered: Vec<&'static str> =
            w.wait_healthy(BOOT).iter().map(|s| s.name()).collect();
        if !unrecovered.is_empty() {
            eprintln!(
                "soak: not healthy again after {}: {unrecovered:?}",
                fault.kind()
            );
        }
        ran.push(Ran {
            took: w.now() - at,
            fault,
            at,
            unrecovered,
        });
        std::thread::sleep(Duration::from_millis(gaps.random_range(1000..3000)));
        if ran.last().is_some_and(|r| !r.unrecovered.is_empty()) {
            break;
        }
    }
    // Late fires of the last fault still count.
    std::thread::sleep(Duration::from_secs(2));

    let fires = w.fires();
    let starts: Vec<f64> = ran.iter().map(|r| r.at).collect();
    let verdict = judge(
        &expectations,
        &fires,
        LATE_SLACK_S,
        BOUND_MS as f64 / 1000.0,
        &starts,
    );
    let report = report(&cfg, &w, &ran, &expectations, &fires, &verdict);
    std::fs::create_dir_all(cfg.report.parent().unwrap()).unwrap();
    std::fs::write(&cfg.report, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    print_table(&cfg, &w, &ran, &verdict);
    eprintln!("soak: report {}", cfg.report.display());

    let unrecovered: Vec<_> = ran.iter().filter(|r| !r.unrecovered.is_empty()).collect();
    let (missed, late) = (verdict.count(Outcome::Missed), verdict.count(Outcome::Late));
    if !verdict.false_fires.is_empty() || missed > 0 || late > 0 || !unrecovered.is_empty() {
        // Keep the run's logs for the replay.
        let kept = dir.keep();
        panic!(
            "soak seed {}: {} false, {missed} missed, {late} late fires, {} unrecovered \
             (logs in {})",
            cfg.seed,
            verdict.false_fires.len(),
            unrecovered.len(),
            kept.display()
        );
    }
}

fn report(
    cfg: &Settings,
    w: &World,
    ran: &[Ran],
    expectations: &[Expectation],
    fires: &[verdict::Fire],
    verdict: &verdict::Verdict,
) -> Value {
    let [expired_a, expired_b] = w.awd_counts("watchdog expired");
    let [unknown_a, unknown_b] = w.awd_counts("action fate unknown");
    let [failed_a, failed_b] = w.awd_counts("action failed");
    json!({
        "seed": cfg.seed,
        "minutes": cfg.minutes,
        "sabotage": Sabotage::from_env().map(|s| format!("{s:?}")),
        "ran_s": w.now(),
        "bound_ms": BOUND_MS,
        "timeouts_ms": {
            "guest": GUEST_TIMEOUT_MS, "pair": PAIR_TIMEOUT_MS, "remote": REMOTE_TIMEOUT_MS,
        },
        "replay": format!("scripts/soak --minutes {} --seed {}", cfg.minutes, cfg.seed),
        "faults": ran.iter().enumerate().map(|(i, r)| json!({
            "index": i, "at": r.at, "took": r.took, "kind": r.fault.kind(),
            "params": r.fault.params(), "unrecovered": r.unrecovered,
        })).collect::<Vec<_>>(),
        "expectations": expectations,
        "fires": fires,
        "verdict": {
            "expected": verdict.expected.len(),
            "on_time": verdict.count(Outcome::OnTime),
            "late": verdict.count(Outcome::Late),
            "missed": verdict.count(Outcome::Missed),
            "false": verdict.false_fires.len(),
            "allowed": verdict.allowed,
            "detail": verdict,
        },
        "awd": {
            "expiries_logged": {"a": expired_a, "b": expired_b},
            "actions_unknown": {"a": unknown_a, "b": unknown_b},
            "actions_failed": {"a": failed_a, "b": failed_b},
            "events": w.awd_events(),
        },
    })
}

fn print_table(cfg: &Settings, w: &World, ran: &[Ran], verdict: &verdict::Verdict) {
    let mut by_kind: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for r in ran {
        let e = by_kind.entry(r.fault.kind()).or_default();
        e.0 += 1;
        e.1 = e.1.max(r.took);
    }
    println!(
        "\nsoak: seed {}, {:.1} min, {} faults (replay: scripts/soak --minutes {} --seed {})",
        cfg.seed,
        w.now() / 60.0,
        ran.len(),
        cfg.minutes,
        cfg.seed
    );
    println!("\n| fault | injected | longest (s) |\n|---|---|---|");
    for (k, (n, longest)) in &by_kind {
        println!("| {k} | {n} | {longest:.1} |");
    }
    println!(
        "\n| subject | fires due | on time | late | missed | false | latest fire after timeout (s) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for s in Subject::ALL {
        let mine: Vec<_> = verdict
            .expected
            .iter()
            .filter(|j| j.subject == s.name())
            .collect();
        let n = |o: Outcome| mine.iter().filter(|j| j.outcome == o).count();
        let latest = mine
            .iter()
            .filter_map(|j| j.fire_at)
            .fold(f64::NEG_INFINITY, f64::max);
        let falses = verdict
            .false_fires
            .iter()
            .filter(|f| f.subject == s.name())
            .count();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            s.name(),
            mine.len(),
            n(Outcome::OnTime),
            n(Outcome::Late),
            n(Outcome::Missed),
            falses,
            if latest.is_finite() {
                format!("{latest:.2}")
            } else {
                "-".into()
            }
        );
    }
    println!(
        "\ntotal: {} due, {} on time, {} late, {} missed, {} false, {} allowed (frozen QEMU)",
        verdict.expected.len(),
        verdict.count(Outcome::OnTime),
        verdict.count(Outcome::Late),
        verdict.count(Outcome::Missed),
        verdict.false_fires.len(),
        verdict.allowed
    );
    for f in &verdict.false_fires {
        println!(
            "false fire: {} at {:.1} s, during fault {:?}",
            f.subject, f.at, f.during_fault
        );
    }
}
