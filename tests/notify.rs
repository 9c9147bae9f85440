//! Unmodified systemd-notify services, supervised from the host (issue 10, item 7), end to
//! end: a real guest booted with Debian's own `systemd-notify` binary (and the libraries `ldd`
//! names, `scripts/build-guest`), `awd-agent --notify-socket` relaying over virtio-serial, and a
//! real awd with a QMP notification node on the same QEMU.
//!
//! The "daemon" is a shell loop that calls `systemd-notify --no-block` as a service would call
//! `sd_notify(3)`; neither it nor systemd-notify knows anything of awd. What is shown:
//!
//! * `READY=1` sets the guest condition the plain timeout is linked to: supervision starts there;
//! * `WATCHDOG=1` pings keep the watchdog alive over two timeouts; their absence fires it;
//! * `WATCHDOG=trigger` fires at once (the reason says so, not "silent");
//! * `STOPPING=1` (with its `STATUS=` in the same datagram), then silence over two timeouts
//!   fires nothing; the next start's `READY=1` resumes supervision;
//! * `EXTEND_TIMEOUT_USEC=` holds the deadline, then the fire names it;
//! * a malformed datagram is dropped and counted in the guest, and fires nothing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The watchdog's timeout.
const TIMEOUT: Duration = Duration::from_secs(3);
/// How late after its due time a fire may come: the guest's `systemd-notify` under TCG, the
/// log transport and a loaded 2-core machine.
const LATE: Duration = Duration::from_secs(3);
/// The notify socket in the guest.
const SOCK: &str = "/run/awd-agent.notify";

fn config(run: &Path) -> String {
    format!(
        r#"[chardev.hb]
path = "{run}/vm1-hb.sock"
server = true

[chardev.mon]
path = "{run}/vm1-qmp.sock"

[watchdog.vm1]
awd_node = "hb"
notification_node = "mon"
script = ["info status"]
timeout = {timeout}
timeout_max = 60000
conditions = ["ready"]
guest_conditions = {{ ready = false }}
"#,
        run = run.display(),
        timeout = TIMEOUT.as_millis()
    )
}

/// The daemon: `READY=1`, then a `WATCHDOG=1` every 500 ms until /tmp/stop exists; on the way
/// out it says `STOPPING=1` when /tmp/polite exists, and asks for the extension in /tmp/extend.
const DAEMON: &str = r#"cat > /tmp/daemon <<'EOF'
#!/bin/sh
export NOTIFY_SOCKET=/run/awd-agent.notify
systemd-notify --no-block READY=1 'STATUS=serving'
echo DAEMON-UP
while [ ! -e /tmp/stop ]; do systemd-notify --no-block WATCHDOG=1; sleep 0.5; done
[ -e /tmp/polite ] && systemd-notify --no-block STOPPING=1 'STATUS=bye'
[ -e /tmp/extend ] && systemd-notify --no-block EXTEND_TIMEOUT_USEC=$(cat /tmp/extend)
rm -f /tmp/stop /tmp/polite /tmp/extend
echo DAEMON-DOWN
EOF
chmod +x /tmp/daemon"#;

/// The watchdog's expiries so far, as log records.
fn expired(awd: &Awd) -> Vec<Value> {
    awd.records(|v| v["message"] == "watchdog expired" && v["watchdog"] == "vm1")
}

/// Starts the daemon in the guest's background and waits until it said READY=1.
fn start_daemon(vm: &mut Qemu) {
    vm.console.skip_pending();
    vm.run("(/tmp/daemon > /dev/console 2>&1 &)", SHORT);
    vm.console
        .wait("the daemon to start", SHORT, |l| l.contains("DAEMON-UP"));
}

/// How the daemon goes.
#[derive(Clone, Copy)]
enum Exit {
    /// Without a word.
    Dies,
    /// `STOPPING=1`.
    Polite,
    /// `EXTEND_TIMEOUT_USEC=` of this many µs, then nothing.
    Extend(u64),
}

/// Stops the daemon as `exit` says; returns when it has gone.
fn stop_daemon(vm: &mut Qemu, exit: Exit) -> Instant {
    vm.console.skip_pending();
    let cmd = match exit {
        Exit::Dies => "touch /tmp/stop".to_owned(),
        Exit::Polite => "touch /tmp/polite /tmp/stop".to_owned(),
        Exit::Extend(usec) => format!("echo {usec} > /tmp/extend; touch /tmp/stop"),
    };
    vm.run(&cmd, SHORT);
    vm.console
        .wait("the daemon to stop", SHORT, |l| l.contains("DAEMON-DOWN"));
    Instant::now()
}

/// Waits for the watchdog's next expiry (each is waited for once, in order).
fn next_expiry(awd: &mut Awd, bound: Duration) -> Value {
    awd.wait_msg("watchdog expired", Some("vm1"), bound)
}

/// Waits for the watchdog to go from `from` to `to`.
fn wait_change(awd: &mut Awd, from: &str, to: &str) -> Value {
    awd.wait(&format!("vm1 {from} -> {to}"), SHORT, |v| {
        v["message"] == "watchdog status changed"
            && v["watchdog"] == "vm1"
            && v["from"] == from
            && v["to"] == to
    })
}

#[test]
fn an_unmodified_systemd_notify_daemon_is_supervised_from_the_host() {
    let dir = scratch("notify");
    let run = dir.path();
    let cfg = run.join("awd.toml");
    std::fs::write(&cfg, config(run)).unwrap();
    let (ok, check, err) = awd_oneshot(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(ok.success(), "{err}{check}");
    let mut awd = Awd::run(run, "awd", &s(&["--config", cfg.to_str().unwrap()]));
    awd.wait_msg("awd running", None, SHORT);
    let mut vm = Qemu::start(
        run,
        QemuOpts {
            agent: Some(s(&[
                "--to",
                "port:org.awd.heartbeat.0",
                "--notify-socket",
                SOCK,
                "--no-socket",
            ])),
            args: qemu_args_file("local-guest.args", run),
            initrd: "initramfs-notify.cpio.gz",
            ..QemuOpts::new("vm1")
        },
    );
    vm.wait_ready();
    vm.console.wait("the agent's notify socket", BOOT, |l| {
        l.contains("awd-agent: notify socket on /run/awd-agent.notify")
    });
    let listening = Instant::now();
    vm.run(DAEMON, SHORT);
    awd.wait_msg("notification node connected", None, SHORT);

    // Before READY=1 the plain timeout is suspended (linked to `ready`), the agent sends
    // nothing of its own: over two timeouts since it listens, no expiry. A negative check,
    // stated bound.
    std::thread::sleep((TIMEOUT * 2).saturating_sub(listening.elapsed()));
    assert!(expired(&awd).is_empty(), "nothing to supervise yet");
    assert_eq!(awd.status()["vm1"]["status"], "deactivated");

    // 1. READY=1 and pings: alive over two timeouts.
    start_daemon(&mut vm);
    let ready = wait_change(&mut awd, "deactivated", "ok");
    assert!(
        ready["reason"]
            .as_str()
            .unwrap()
            .contains("condition ready became true (set by the guest)"),
        "{ready}"
    );
    awd.wait("the daemon's status", SHORT, |v| {
        v["message"] == "peer status" && v["status"] == "serving"
    });
    vm.run(&format!("sleep {}", 2 * TIMEOUT.as_secs()), SHORT);
    assert!(
        expired(&awd).is_empty(),
        "the pings kept it alive: {:?}",
        expired(&awd)
    );
    assert_eq!(awd.status()["vm1"]["status"], "ok");

    // 2. The daemon dies without a word: the watchdog fires one timeout after its last ping.
    let gone = stop_daemon(&mut vm, Exit::Dies);
    let first = next_expiry(&mut awd, TIMEOUT + LATE + SHORT);
    let after = gone.elapsed();
    assert!(
        first["reason"].as_str().unwrap().contains("silent for"),
        "{first}"
    );
    assert!(
        after <= TIMEOUT + LATE,
        "fired {after:?} after the daemon went"
    );
    awd.wait_msg("action done", Some("vm1"), SHORT);
    eprintln!("silence: fired {after:?} after the daemon's exit");

    // 3. Back, then WATCHDOG=trigger: a fire at once, by the trigger.
    start_daemon(&mut vm);
    wait_change(&mut awd, "expired", "ok");
    let sent = Instant::now();
    vm.run(
        &format!("NOTIFY_SOCKET={SOCK} systemd-notify --no-block WATCHDOG=trigger"),
        SHORT,
    );
    let second = next_expiry(&mut awd, SHORT);
    assert!(
        second["reason"]
            .as_str()
            .unwrap()
            .contains("WATCHDOG=trigger"),
        "{second}"
    );
    let took = sent.elapsed();
    assert!(took < TIMEOUT + LATE, "the trigger took {took:?}");
    eprintln!("trigger: fired {took:?} after systemd-notify was started");

    // 4. A planned stop: STOPPING=1, then silence over two timeouts fires nothing.
    wait_change(&mut awd, "expired", "ok");
    let stopped = stop_daemon(&mut vm, Exit::Polite);
    awd.wait("the stop", SHORT, |v| {
        v["message"]
            == "peer is stopping (STOPPING=1): supervision suspended until it announces itself again"
    });
    let st = awd.status();
    assert_eq!(st["vm1"]["stopping"], true, "{}", st["vm1"]);
    assert_eq!(st["vm1"]["status"], "deactivated");
    // The daemon said STATUS=bye in the same datagram: text, not a reason to resume.
    awd.wait("the last status", SHORT, |v| {
        v["message"] == "peer status" && v["status"] == "bye"
    });
    let quiet = (TIMEOUT * 2).saturating_sub(stopped.elapsed());
    std::thread::sleep(quiet);
    assert_eq!(
        expired(&awd).len(),
        2,
        "the planned stop fired: {:?}",
        expired(&awd)
    );
    // The daemon's next start (READY=1) resumes supervision, and its death fires again.
    start_daemon(&mut vm);
    wait_change(&mut awd, "deactivated", "ok");
    awd.wait("resumed", SHORT, |v| {
        v["watchdog"] == "vm1"
            && v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("the peer announced itself after STOPPING=1"))
    });
    assert_eq!(awd.status()["vm1"]["stopping"], false);
    stop_daemon(&mut vm, Exit::Dies);
    let third = next_expiry(&mut awd, TIMEOUT + LATE + SHORT);
    assert!(
        third["reason"].as_str().unwrap().contains("silent for"),
        "{third}"
    );

    // 5. EXTEND_TIMEOUT_USEC=: the daemon asks for 8 s on its way out, then is silent: no
    // fire at the plain timeout, and the fire at the extension names it.
    start_daemon(&mut vm);
    let asked = stop_daemon(&mut vm, Exit::Extend(8_000_000));
    awd.wait("the extension", SHORT, |v| {
        v["message"] == "peer asked for more time until its next message" && v["extend_ms"] == 8000
    });
    // A malformed datagram is dropped in the guest, counted, and is no input at all.
    vm.console.skip_pending();
    vm.run(
        &format!("NOTIFY_SOCKET={SOCK} systemd-notify --no-block WATCHDOG=0"),
        SHORT,
    );
    vm.console
        .wait("the malformed datagram dropped", SHORT, |l| {
            l.contains("notify datagram dropped: bad value in 'WATCHDOG=0'")
                && l.contains("1 malformed")
        });
    std::thread::sleep((TIMEOUT + LATE).saturating_sub(asked.elapsed()));
    assert_eq!(expired(&awd).len(), 3, "fired before the extension ran out");
    let fourth = next_expiry(&mut awd, Duration::from_secs(8) + LATE + SHORT);
    let after = asked.elapsed();
    assert!(
        fourth["reason"]
            .as_str()
            .unwrap()
            .contains("past the 8000 ms its EXTEND_TIMEOUT_USEC= asked for"),
        "{fourth}"
    );
    assert!(
        after >= Duration::from_secs(7) && after <= Duration::from_secs(8) + LATE,
        "the extended fire came {after:?} after the request"
    );
    eprintln!("extension: fired {after:?} after EXTEND_TIMEOUT_USEC=8000000");
}
