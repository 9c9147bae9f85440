//! The seed's COLO use case for real: two QEMU 7.2 in COLO replication, each in its own
//! network namespace ("host"), an awd beside each with the seed's heartbeat objects over a
//! `psk=` channel, and failover both ways (`tests/common/colo.rs` builds the pair;
//! `docs/colo.md` says what works under TCG and what does not, and why).
//!
//! 1. The primary host dies: the secondary's awd sends `nbd-server-stop` then
//!    `x-colo-lost-heartbeat`; the secondary VM takes over with the replicated guest, whose
//!    counter goes on from the primary's and whose heartbeats reach the secondary host's awd.
//! 2. The secondary host dies: the primary's awd sends `x-colo-lost-heartbeat`; the primary
//!    goes on alone.
//! 3. The link between them is cut, both VMs alive: both awds fire, and both VMs end up running
//!    alone (split brain), while a forger on the primary's network keeps nothing alive.
//!
//! Needs root (network namespaces), qemu-system-x86, qemu-utils and the guest image. `scripts/
//! colo-demo` runs these with their narration shown.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::colo::*;
use common::*;
use serde_json::Value;

/// Waits until `query-colo-status` on `vm` shows `mode: none`; returns the status.
fn wait_colo_exit(vm: &ColoVm, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let st = vm.colo_status();
        if st["mode"] == "none" {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{}: COLO still {st} after {timeout:?}",
            vm.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `vm` runs: COLO reports mode `none` before the failover's own `vm_start` has
/// run, so right after [`wait_colo_exit`] the VM may still be stopped for a moment.
fn wait_running(vm: &ColoVm, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !vm.running() {
        assert!(
            Instant::now() < deadline,
            "{}: not running {timeout:?} after COLO ended",
            vm.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The script line of an `action done` record for `heart1`, waited for.
fn action_done(awd: &mut Awd) -> Value {
    awd.wait_msg("action done", Some("heart1"), SHORT)
}

/// Every counter value on a console increases by one from the line before: no reboot, no
/// rollback, no gap.
fn assert_consecutive(vm: &ColoVm) {
    let c = vm.counters();
    for w in c.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{}: counter {c:?}", vm.name);
    }
}

/// The guest's heartbeats reach `host`'s watchdog `guest`, which is OK: its count grows, and a
/// `STATUS=hb-N` line with N above `above` arrives (the log of status lines is rate-limited to
/// one per 10 s after a burst, so this waits up to SHORT).
fn guest_heard(host: &mut Host, above: u64) -> u64 {
    let before = host.watchdog("guest")["heartbeats"].as_u64().unwrap();
    let rec = host.awd.wait(
        &format!("a guest status hb-N with N > {above}"),
        SHORT,
        |v| {
            v["message"] == "peer status"
                && v["watchdog"] == "guest"
                && v["status"]
                    .as_str()
                    .and_then(|s| s.strip_prefix("hb-"))
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n > above)
        },
    );
    let n: u64 = rec["status"].as_str().unwrap()[3..].parse().unwrap();
    // The agent beats every 500 ms: the count grows within SHORT.
    let deadline = Instant::now() + SHORT;
    loop {
        let g = host.watchdog("guest");
        assert_eq!(g["status"], "ok", "{g}");
        assert_eq!(g["expiries"], 0, "{g}");
        if g["heartbeats"].as_u64().unwrap() > before {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat since {before}: {g}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn primary_dies_the_secondary_takes_over_and_the_guest_counts_on() {
    let t0 = Instant::now();
    let dir = scratch("colo-primary-dies");
    let mut pair = ColoPair::start(dir.path());
    let (p, s) = (&mut pair.primary, &mut pair.secondary);

    // Negative check, a stated bound: for 11 s (more than either timeout) pulses and replies
    // keep both awds quiet, and the guest's heartbeats keep both guest watchdogs OK.
    std::thread::sleep(Duration::from_secs(11));
    for (name, h) in [("primary", &*p), ("secondary", &*s)] {
        let hb = h.watchdog("heart1");
        assert_eq!(hb["status"], "ok", "{name}: {hb}");
        assert_eq!(hb["expiries"], 0, "{name}: {hb}");
        assert_eq!(h.watchdog("guest")["status"], "ok", "{name}");
    }
    assert!(p.watchdog("heart1")["last_pulse_rtt_us"].is_u64());
    say("11 s: both heartbeat watchdogs OK, pulses answered, both guest watchdogs OK");

    // The primary host dies: its QEMU and its awd, SIGKILL.
    p.vm.kill();
    p.awd.signal(SIGKILL);
    p.awd.wait_exit(SHORT);
    p.vm.console.wait_eof("primary", SHORT);
    let last = *p.vm.counters().last().unwrap();
    let killed = Instant::now();
    say(&format!(
        "primary QEMU and its awd killed (SIGKILL); the guest's counter was at {last}"
    ));

    let fired = s.awd.wait_msg("watchdog expired", Some("heart1"), SHORT);
    let after = killed.elapsed();
    assert!(
        after >= Duration::from_secs(8),
        "fired {after:?} after the kill"
    );
    say(&format!(
        "secondary awd: heart1 expired {:.1} s after the kill ({})",
        after.as_secs_f64(),
        fired["reason"]
            .as_str()
            .or(fired["last_reason"].as_str())
            .unwrap_or("")
    ));
    let nbd = action_done(&mut s.awd);
    let colo = action_done(&mut s.awd);
    assert_eq!(nbd["line"], "nbd_server_stop", "{nbd}");
    assert_eq!(colo["line"], "x_colo_lost_heartbeat", "{colo}");
    s.vm.wait_trace(r#""execute": "nbd-server-stop""#, SHORT);
    s.vm.wait_trace(r#""execute": "x-colo-lost-heartbeat""#, SHORT);
    let at = |needle: &str| s.vm.trace.position(|l| l.contains(needle)).unwrap();
    assert!(at("\"nbd-server-stop\"") < at("\"x-colo-lost-heartbeat\""));
    say("secondary QEMU received nbd-server-stop, then x-colo-lost-heartbeat (QEMU's trace)");

    let st = wait_colo_exit(&s.vm, SHORT);
    assert_eq!(st["last-mode"], "secondary", "{st}");
    assert_eq!(st["reason"], "request", "{st}");
    wait_running(&s.vm, SHORT); // the survivor runs
    say(&format!("secondary query-colo-status: {st}; running"));

    // The same guest goes on: its counter continues past the primary's last value, with no
    // reboot and no gap, and its heartbeats reach the secondary host's watchdog.
    let n = s.vm.wait_counter_above(last + 3, SHORT);
    assert_consecutive(&s.vm);
    assert!(
        s.vm.console
            .position(|l| l.contains("AWD-GUEST: ready"))
            .is_none(),
        "the secondary's guest never booted: its state came from the primary"
    );
    let heard = guest_heard(s, n);
    s.vm.run("echo survivor shell alive", SHORT);
    say(&format!(
        "guest counter on the survivor: {n} (primary's last {last}); its awd heard hb-{heard}"
    ));
    say(&format!("case 1 took {:.1} s", t0.elapsed().as_secs_f64()));
}

#[test]
fn secondary_dies_the_primary_goes_on_alone() {
    let t0 = Instant::now();
    let dir = scratch("colo-secondary-dies");
    let mut pair = ColoPair::start(dir.path());
    let (p, s) = (&mut pair.primary, &mut pair.secondary);

    s.vm.kill();
    s.awd.signal(SIGKILL);
    s.awd.wait_exit(SHORT);
    let killed = Instant::now();
    let before = *p.vm.counters().last().unwrap();
    say(&format!(
        "secondary QEMU and its awd killed (SIGKILL); the guest's counter is at {before}"
    ));

    p.awd.wait_msg("watchdog expired", Some("heart1"), SHORT);
    let after = killed.elapsed();
    assert!(
        after >= Duration::from_secs(4),
        "fired {after:?} after the kill"
    );
    let colo = action_done(&mut p.awd);
    assert_eq!(colo["line"], "x_colo_lost_heartbeat", "{colo}");
    p.vm.wait_trace(r#""execute": "x-colo-lost-heartbeat""#, SHORT);
    say(&format!(
        "primary awd: heart1 expired {:.1} s after the kill, x-colo-lost-heartbeat answered {}",
        after.as_secs_f64(),
        colo["reply"]
    ));

    let st = wait_colo_exit(&p.vm, SHORT);
    assert_eq!(st["last-mode"], "primary", "{st}");
    assert_eq!(st["reason"], "request", "{st}");
    wait_running(&p.vm, SHORT);
    assert_eq!(
        p.vm.qmp("query-migrate", Value::Null)["status"],
        "completed"
    );
    let n = p.vm.wait_counter_above(before + 3, SHORT);
    assert_consecutive(&p.vm);
    let heard = guest_heard(p, n);
    p.vm.run("echo primary shell alive", SHORT);
    say(&format!(
        "primary query-colo-status: {st}; running alone, counter {n}, its awd heard hb-{heard}"
    ));
    say(&format!("case 2 took {:.1} s", t0.elapsed().as_secs_f64()));
}

#[test]
fn a_partition_fires_both_sides_split_brain_made_visible() {
    let t0 = Instant::now();
    let dir = scratch("colo-partition");
    let mut pair = ColoPair::start(dir.path());

    // A forger on the primary's network, without the key: plain heartbeats and fake pulse
    // replies, and a handshake with a guessed key, every 100 ms for the rest of the test.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forger = {
        let stop = stop.clone();
        spawn_in_netns(&pair.net.primary, move || {
            let mut tries = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut c) = TcpStream::connect((PRIMARY_ADDR, HEARTBEAT_PORT)) {
                    let _ = c.write_all(b"WATCHDOG=1\nadvanced-watchdog reply pulse\n");
                    let _ = c.write_all(&[0, 0, 0, 29]);
                    let _ = c.write_all(b"advanced-watchdog reply pulse");
                    tries += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            tries
        })
    };

    pair.net.cut();
    let cut = Instant::now();
    say(
        "link between the hosts cut (both VMs and both awds alive); a forger without the key \
         hammers the primary's heartbeat port",
    );
    let (p, s) = (&mut pair.primary, &mut pair.secondary);

    // Both sides see only silence: each fires its script.
    p.awd.wait_msg("watchdog expired", Some("heart1"), SHORT);
    let p_after = cut.elapsed();
    s.awd.wait_msg("watchdog expired", Some("heart1"), SHORT);
    let s_after = cut.elapsed();
    assert!(
        p_after >= Duration::from_secs(4),
        "primary fired {p_after:?} after the cut"
    );
    assert!(
        s_after >= Duration::from_secs(8),
        "secondary fired {s_after:?} after the cut"
    );
    say(&format!(
        "both awds report the partition: primary heart1 expired after {:.1} s, secondary after \
         {:.1} s",
        p_after.as_secs_f64(),
        s_after.as_secs_f64()
    ));

    // The secondary takes over at once.
    let nbd = action_done(&mut s.awd);
    let colo = action_done(&mut s.awd);
    assert_eq!(nbd["line"], "nbd_server_stop");
    assert_eq!(colo["line"], "x_colo_lost_heartbeat");
    let sst = wait_colo_exit(&s.vm, SHORT);
    assert_eq!(sst["last-mode"], "secondary", "{sst}");

    // The primary's failover first stops the VM and flushes every disk, the NBD child to the
    // unreachable secondary too: QEMU answers only once that TCP connection gives up
    // (net.ipv4.tcp_retries2=4 here: ~9 s), longer than awd's 5 s per line.
    p.vm.wait_trace(r#""execute": "x-colo-lost-heartbeat""#, SHORT);
    let rec = p
        .awd
        .wait("the primary's x_colo_lost_heartbeat to end", SHORT, |v| {
            v["watchdog"] == "heart1"
                && v["message"].as_str().is_some_and(|m| {
                    m.starts_with("action done") || m.starts_with("action fate unknown")
                })
        });
    let pst = wait_colo_exit(&p.vm, SHORT);
    assert_eq!(pst["last-mode"], "primary", "{pst}");
    assert_eq!(pst["reason"], "request", "{pst}");
    say(&format!(
        "primary awd: x_colo_lost_heartbeat ended with `{}`; primary query-colo-status {pst}",
        rec["message"].as_str().unwrap()
    ));

    // Split brain: both VMs run alone, the same guest twice, both counters going on.
    wait_running(&p.vm, SHORT);
    wait_running(&s.vm, SHORT);
    let pn = *p.vm.counters().last().unwrap();
    let sn = *s.vm.counters().last().unwrap();
    let pn2 = p.vm.wait_counter_above(pn + 2, SHORT);
    let sn2 = s.vm.wait_counter_above(sn + 2, SHORT);
    say(&format!(
        "SPLIT BRAIN: both VMs running with COLO mode none, guest counters {pn2} (primary) and \
         {sn2} (secondary)"
    ));

    // The forger kept nothing alive: its connections were refused by the authentication.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let tries = forger.join().unwrap();
    assert!(tries > 10, "the forger connected {tries} times");
    let m = p.scrape();
    let rejected: f64 = m
        .lines()
        .filter(|l| l.starts_with("awd_auth_rejected_total{watchdog=\"heart1\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(rejected >= 10.0, "auth rejections {rejected}:\n{m}");
    assert_eq!(
        expiries(&p.awd, "heart1"),
        1,
        "the primary fired once, forger or not"
    );
    say(&format!(
        "the forger connected {tries} times; the primary's awd rejected {rejected} and fired \
         anyway (awd_auth_rejected_total)"
    ));
    say(&format!("case 3 took {:.1} s", t0.elapsed().as_secs_f64()));
}
