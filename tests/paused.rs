//! A paused VM does not trip its watchdog by default (issue 8, item 10), end to end: the
//! seed's syntax, a real guest heartbeating over virtio-serial, a QMP notification node, and
//! the test's own second QMP monitor to pause and resume the VM. The seed's AWD ran its timers
//! on QEMU's virtual clock, which stops while the VM is paused; awd follows the run state on
//! the notification node's QMP connection instead.

mod common;

use std::time::Duration;

use common::*;

/// The seed's arguments for a local guest whose notification node is QMP.
fn args(run: &std::path::Path, timeout_ms: u64) -> Vec<String> {
    s(&[
        "--chardev",
        &format!(
            "socket,id=hb,path={}/vm1-hb.sock,server=on,wait=off",
            run.display()
        ),
        "--chardev",
        &format!("socket,id=mon,path={}/vm1-qmp.sock", run.display()),
        "--object",
        &format!(
            "advanced-watchdog,id=vm1,awd_node=hb,notification_node=mon,opt_script={}/quit.script,\
             timeout={timeout_ms},grace=120000",
            run.display()
        ),
    ])
}

/// Pause the VM with `stop` for 3× the timeout, `cont`: no action. Then the guest's agent is
/// killed (the VM keeps running): the script comes. Before the fix the pause alone got `quit`.
#[test]
fn a_paused_vm_does_not_trip_the_watchdog_but_a_silent_guest_does() {
    let dir = scratch("paused");
    let run = dir.path();
    script(run, "quit.script", "quit\n");
    let timeout = Duration::from_millis(2000);
    let args = args(run, timeout.as_millis() as u64);

    // `awd check` says what following the run state needs.
    let mut check = vec!["check"];
    check.extend(args.iter().map(String::as_str));
    let (st, out, err) = awd_oneshot(&check);
    assert!(st.success(), "{err}");
    assert!(
        out.contains("vm run state      followed on mon") && out.contains("needs a QMP monitor"),
        "{out}"
    );

    let mut awd = Awd::run(run, "awd", &args);
    // So does the start-up log.
    let note = awd.wait_msg("watchdog 'vm1': follows the VM's run state", None, SHORT);
    assert!(
        note["message"]
            .as_str()
            .unwrap()
            .contains("with an HMP or raw node the run state is never known"),
        "{note}"
    );
    awd.wait_msg("awd running", None, SHORT);
    let test_qmp = run.join("test-qmp.sock");
    let mut qemu_args = qemu_args_file("local-guest.args", run);
    qemu_args.extend(s(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", test_qmp.display()),
    ]));
    let mut vm = Qemu::start(
        run,
        QemuOpts {
            agent: Some(s(&[
                "--to",
                "port:org.awd.heartbeat.0",
                "--interval",
                "200",
            ])),
            args: qemu_args,
            ..QemuOpts::new("vm1")
        },
    );
    vm.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    let node = awd.wait_msg("notification node connected", None, SHORT);
    assert_eq!(node["kind"], "QMP");
    vm.run("sleep 3", SHORT);
    assert_eq!(expiries(&awd, "vm1"), 0, "no expiry while the agent runs");

    // Pause for three times the timeout.
    let reply = qmp(&test_qmp, "stop");
    assert!(reply.get("return").is_some(), "{reply}");
    awd.wait("vm-running false", SHORT, |v| {
        v["message"] == "VM run state from QMP" && v["watchdog"] == "vm1" && v["running"] == false
    });
    // A negative check with a stated bound: nothing may fire during 3× the timeout.
    std::thread::sleep(3 * timeout);
    assert_eq!(expiries(&awd, "vm1"), 0, "the pause tripped the watchdog");
    assert!(
        awd.records(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("action")))
            .is_empty(),
        "no action during the pause"
    );
    let reply = qmp(&test_qmp, "cont");
    assert!(reply.get("return").is_some(), "{reply}");
    awd.wait("vm-running true", SHORT, |v| {
        v["message"] == "VM run state from QMP" && v["watchdog"] == "vm1" && v["running"] == true
    });
    // The guest beats again for longer than the timeout: still nothing.
    vm.run("sleep 3", SHORT);
    assert_eq!(expiries(&awd, "vm1"), 0, "no expiry after the resume");

    // Now the guest's agent stops while the VM runs: the action comes.
    vm.run("killall awd-agent", SHORT);
    let expired = awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    assert!(
        expired["reason"].as_str().unwrap().contains("silent for"),
        "{expired}"
    );
    let done = awd.wait_msg("action done", Some("vm1"), SHORT);
    assert_eq!(done["line"], "quit");
    vm.wait_trace(r#"req: {"execute": "quit", "arguments": {}, "id""#, SHORT);
    assert!(vm.wait_exit(SHORT).success());
}
