//! A VM that starts over gets its grace again (issue 8, item 6), end to end: a real QEMU, a real
//! guest whose service (the agent) comes up 5 s after boot, longer than the 3 s timeout, and QEMU's
//! own `-trace handle_qmp_command` log as the witness of every action.

mod common;

use common::*;

const SYSTEM_RESET: &str = r#"req: {"execute": "system_reset""#;
const QUIT: &str = r#"req: {"execute": "quit""#;

/// A watchdog with a 3 s timeout and a 25 s grace whose script is `system_reset`, escalating to
/// `quit` 4 s after an expiry.
fn start_awd(run: &std::path::Path) -> Awd {
    std::fs::write(
        run.join("awd.toml"),
        format!(
            r#"
[chardev.hb]
path = "{dir}/vm1-hb.sock"
server = true

[chardev.mon]
path = "{dir}/vm1-qmp.sock"

[watchdog.vm1]
awd_node = "hb"
notification_node = "mon"
timeout = 3000
grace = 25000
script = ["system_reset"]

[[watchdog.vm1.escalate]]
after = 4000
script = ["quit"]
"#,
            dir = run.display()
        ),
    )
    .unwrap();
    let mut awd = Awd::run(run, "awd", &s(&["--config", "awd.toml"]));
    awd.wait_msg("awd running", None, SHORT);
    awd
}

/// A guest that reboots on reset (the harness's `-no-reboot` would make QEMU exit) and whose
/// agent starts 5 s after each boot.
fn start_vm(run: &std::path::Path, name: &str) -> Qemu {
    let mut args = qemu_args_file("local-guest.args", run);
    args.extend(s(&["-action", "reboot=reset"]));
    Qemu::start(
        run,
        QemuOpts {
            agent: Some(s(&[
                "--to",
                "port:org.awd.heartbeat.0",
                "--interval",
                "200",
            ])),
            args,
            append: "awd_delay=5".into(),
            ..QemuOpts::new(name)
        },
    )
}

fn count(vm: &Qemu, needle: &str) -> usize {
    vm.trace.all().iter().filter(|l| l.contains(needle)).count()
}

/// The watchdog's own `system_reset` reboots the guest, whose service needs longer than the
/// timeout — and longer than the escalation's 4 s — to come up: no `quit` during the boot;
/// once the rebooted guest has beaten and gone silent again, one more `system_reset`.
#[test]
fn after_its_own_reset_a_rebooting_guest_is_not_escalated() {
    let dir = scratch("restart-reset");
    let run = dir.path();
    let mut awd = start_awd(run);
    let mut vm = start_vm(run, "vm1");
    vm.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    vm.run("sleep 4", SHORT);
    assert_eq!(expiries(&awd, "vm1"), 0, "no expiry while the agent runs");
    vm.run("killall awd-agent", SHORT);
    awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    vm.wait_trace(SYSTEM_RESET, SHORT);
    awd.wait_msg("the VM started over", Some("vm1"), SHORT);
    // The guest reboots; its agent comes up 5 s after the boot, past the 4 s escalation.
    vm.console
        .wait("the second boot", BOOT, |l| l.contains("AWD-GUEST: ready"));
    vm.console.wait("the agent to connect again", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    assert_eq!(count(&vm, QUIT), 0, "no quit for a VM rebooting as asked");
    let escalated = awd.records(|v| v["message"] == "still expired: escalating");
    assert!(escalated.is_empty(), "{escalated:?}");
    // The rebooted guest beats, then goes silent: one more system_reset.
    vm.run("sleep 4", SHORT);
    assert_eq!(count(&vm, SYSTEM_RESET), 1);
    vm.run("killall awd-agent", SHORT);
    vm.trace
        .wait("a second system_reset", SHORT, |l| l.contains(SYSTEM_RESET));
    assert_eq!(count(&vm, QUIT), 0);
}

/// QEMU is killed and a new QEMU starts at once on the same sockets: it must not inherit the
/// old one's timer. No `system_reset` reaches it while its guest boots (its agent comes up 5 s
/// after boot, past the 3 s timeout); once it beats and goes silent, the action comes.
#[test]
fn a_new_qemu_on_the_same_sockets_does_not_inherit_the_old_timer() {
    let dir = scratch("restart-qemu");
    let run = dir.path();
    let mut awd = start_awd(run);
    let mut old = start_vm(run, "old");
    old.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    vm_beats_for_a_while(&mut old);
    old.kill();
    let mut vm = start_vm(run, "new");
    awd.wait("a start-over for the new QEMU", SHORT, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the VM started over"))
            && v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("QMP monitor"))
    });
    vm.console.wait("the new guest's agent", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    assert_eq!(
        count(&vm, SYSTEM_RESET),
        0,
        "no action on a VM that is booting"
    );
    assert_eq!(
        expiries(&awd, "vm1"),
        0,
        "the old QEMU's silence did not fire"
    );
    vm_beats_for_a_while(&mut vm);
    vm.run("killall awd-agent", SHORT);
    vm.wait_trace(SYSTEM_RESET, SHORT);
    assert_eq!(expiries(&awd, "vm1"), 1);
}

/// Lets the guest's agent beat for longer than the timeout.
fn vm_beats_for_a_while(vm: &mut Qemu) {
    vm.run("sleep 4", SHORT);
}
