//! Health-monitor supervision end to end: a real guest reports checkpoints through
//! `awd-agent checkpoint`, awd supervises them with logical and deadline supervisions linked to
//! `vm-running` (followed from the VM's own QMP events), and `awd status --json`,
//! `awd disable`/`enable` drive and observe it all.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use common::*;
use serde_json::Value;

fn supervision<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["supervisions"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no supervision {name} in {status}"))
}

#[test]
fn checkpoints_pauses_and_run_time_control() {
    let dir = scratch("supervision");
    let run = dir.path();
    let r = run.display();
    let config = format!(
        r#"
[chardev.hb]
path = "{r}/vm1-hb.sock"
server = true

[chardev.mon]
path = "{r}/vm1-qmp.sock"

[chardev.clock]
path = "{r}/clock.sock"
server = true

[watchdog.vm1]
awd_node = "hb"
notification_node = "mon"
script = ["info status"]
timeout = 3000
grace = 120000
conditions = ["vm-running"]

[[watchdog.vm1.logical]]
name = "boot"
checkpoints = ["init", "config", "ready"]
entry = ["init"]
exit = ["ready"]
transitions = [["init", "config"], ["config", "ready"]]
conditions = ["vm-running"]

[[watchdog.vm1.deadline]]
name = "request"
start = "req-start"
end = "req-end"
max = 1500
conditions = ["vm-running"]

# A stopwatch for the test: it expires 5 s after the test feeds it once.
[watchdog.clock]
awd_node = "clock"
timeout = 5000
grace = 600000
"#
    );
    std::fs::write(run.join("awd.toml"), config).unwrap();
    let (st, out, err) = awd_oneshot(&["check", "--config", &format!("{r}/awd.toml")]);
    assert!(st.success(), "{err}");
    assert!(
        out.contains("logical 'boot'") || out.contains("boot"),
        "{out}"
    );

    let mut awd = Awd::run(run, "awd", &["--config".into(), format!("{r}/awd.toml")]);
    awd.wait_msg("awd running", None, SHORT);
    let mut args = qemu_args_file("local-guest.args", run);
    // The test's own QMP monitor, to pause and resume the VM (awd holds the other one).
    args.extend([
        "-qmp".into(),
        format!("unix:{r}/test-qmp.sock,server=on,wait=off"),
    ]);
    let mut vm = Qemu::start(
        run,
        QemuOpts {
            agent: Some(
                ["--to", "port:org.awd.heartbeat.0", "--interval", "200"]
                    .map(String::from)
                    .to_vec(),
            ),
            args,
            ..QemuOpts::new("vm1")
        },
    );
    vm.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    awd.wait("vm-running from QMP", SHORT, |v| {
        v["message"] == "VM run state from QMP" && v["watchdog"] == "vm1" && v["running"] == true
    });
    let st = awd.status();
    assert_eq!(st["vm1"]["status"], "ok", "{}", st["vm1"]);
    assert_eq!(st["vm1"]["vm_running"], true);
    for name in ["timeout", "boot", "request"] {
        assert_eq!(supervision(&st["vm1"], name)["status"], "ok");
    }

    // 1. A legal walk through the logical supervision: nothing fires.
    vm.run(
        "awd-agent checkpoint init && awd-agent checkpoint config && awd-agent checkpoint ready",
        SHORT,
    );
    assert_eq!(expiries(&awd, "vm1"), 0);

    // 2. An illegal step fires at once: the heartbeats keep the timeout quiet, so only the
    //    logical supervision can be the cause.
    let t0 = Instant::now();
    vm.run(
        "awd-agent checkpoint init && awd-agent checkpoint ready",
        SHORT,
    );
    let expired = awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(3),
        "fired within the timeout: {:?}",
        t0.elapsed()
    );
    assert!(
        expired["reason"].as_str().unwrap().contains("boot"),
        "{expired}"
    );
    awd.wait_msg("action done", Some("vm1"), SHORT);
    let st = awd.status();
    assert_eq!(st["vm1"]["status"], "expired");
    assert_eq!(supervision(&st["vm1"], "boot")["status"], "expired");
    // A restart at an entry point brings it back.
    vm.run(
        "awd-agent checkpoint init && awd-agent checkpoint config && awd-agent checkpoint ready",
        SHORT,
    );
    awd.wait("back to ok", SHORT, |v| {
        v["message"] == "watchdog status changed" && v["watchdog"] == "vm1" && v["to"] == "ok"
    });
    assert_eq!(awd.status()["vm1"]["status"], "ok");

    // 3. A deadline overrun: start without an end fires once the maximum has passed.
    vm.run("awd-agent checkpoint req-start", SHORT);
    let expired = awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    assert!(
        expired["reason"].as_str().unwrap().contains("request"),
        "{expired}"
    );
    assert_eq!(
        supervision(&awd.status()["vm1"], "request")["status"],
        "expired"
    );
    vm.run(
        "awd-agent checkpoint req-start && awd-agent checkpoint req-end",
        SHORT,
    );
    awd.wait("back to ok", SHORT, |v| {
        v["message"] == "watchdog status changed" && v["watchdog"] == "vm1" && v["to"] == "ok"
    });

    // 4. `awd disable` stops a firing-to-be; `awd enable` re-arms it.
    let before = expiries(&awd, "vm1");
    vm.run("awd-agent checkpoint req-start", SHORT);
    let (ok, _, err) = awd.ctl(&["disable", "vm1/request"]);
    assert!(ok.success(), "{err}");
    assert_eq!(
        supervision(&awd.status()["vm1"], "request")["status"],
        "deactivated"
    );
    vm.run("sleep 3", SHORT); // twice the deadline's maximum
    assert_eq!(
        expiries(&awd, "vm1"),
        before,
        "a disabled supervision does not fire"
    );
    let (ok, _, err) = awd.ctl(&["enable", "vm1/request"]);
    assert!(ok.success(), "{err}");
    assert_eq!(supervision(&awd.status()["vm1"], "request")["status"], "ok");
    vm.run("awd-agent checkpoint req-start", SHORT);
    awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    vm.run(
        "awd-agent checkpoint req-start && awd-agent checkpoint req-end",
        SHORT,
    );
    awd.wait("back to ok", SHORT, |v| {
        v["message"] == "watchdog status changed" && v["watchdog"] == "vm1" && v["to"] == "ok"
    });
    let (bad, _, err) = awd.ctl(&["disable", "vm1/nope"]);
    assert!(!bad.success() && err.contains("nope"), "{err}");

    // 5. The VM is paused (QMP stop) for longer than the timeout, then resumed: nothing fires.
    let before = expiries(&awd, "vm1");
    let reply = qmp(&run.join("test-qmp.sock"), "stop");
    assert!(reply.get("return").is_some(), "{reply}");
    awd.wait("vm-running false", SHORT, |v| {
        v["message"] == "VM run state from QMP" && v["watchdog"] == "vm1" && v["running"] == false
    });
    assert_eq!(awd.status()["vm1"]["status"], "deactivated");
    // Let more than the timeout pass while paused: the stopwatch expires 5 s after this.
    UnixStream::connect(run.join("clock.sock"))
        .unwrap()
        .write_all(b"WATCHDOG=1\n")
        .unwrap();
    awd.wait_msg("watchdog expired", Some("clock"), SHORT);
    assert_eq!(expiries(&awd, "vm1"), before, "no fire while paused");
    let reply = qmp(&run.join("test-qmp.sock"), "cont");
    assert!(reply.get("return").is_some(), "{reply}");
    awd.wait("vm-running true", SHORT, |v| {
        v["message"] == "VM run state from QMP" && v["watchdog"] == "vm1" && v["running"] == true
    });
    vm.run("sleep 4", SHORT);
    assert_eq!(
        expiries(&awd, "vm1"),
        before,
        "no fire after the resume either"
    );
    assert_eq!(awd.status()["vm1"]["status"], "ok");
}
