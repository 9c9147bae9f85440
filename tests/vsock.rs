//! awd as QEMU's vhost-user vsock device, end to end: a real `vhost-user-vsock-pci`, the
//! Debian guest kernel's vsock modules, and `awd-agent` over AF_VSOCK.

mod common;

use common::*;

/// The guest's agent over AF_VSOCK keeps the VM alive; once it stops, awd sends a typed QMP
/// `quit` and QEMU exits.
#[test]
fn agent_over_vsock_keeps_the_vm_alive_and_silence_quits() {
    let dir = scratch("vsock-quit");
    let run = dir.path();
    script(run, "quit.script", "quit\n");
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--chardev",
            &format!(
                "vhost-user-vsock,id=hb,path={}/vm1-vsock.sock,guest-cid=3,port=9009",
                run.display()
            ),
            "--chardev",
            &format!("socket,id=mon,path={}/vm1-qmp.sock", run.display()),
            "--object",
            "advanced-watchdog,id=vm1,awd_node=hb,notification_node=mon,opt_script=quit.script,timeout=3000,grace=120000",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    let mut vm = Qemu::start(
        run,
        QemuOpts {
            agent: Some(s(&["--to", "vsock:2:9009", "--interval", "200"])),
            args: qemu_args_file("vsock.args", run),
            ..QemuOpts::new("vm1")
        },
    );
    vm.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected to vsock:2:9009")
    });
    let conn = awd.wait_msg("connected", Some("vm1"), SHORT);
    assert!(
        conn["peer"].as_str().unwrap().starts_with("vsock:3:"),
        "{conn}"
    );
    vm.run("sleep 5", SHORT);
    assert_eq!(expiries(&awd, "vm1"), 0, "no expiry while the agent runs");
    vm.run("killall awd-agent", SHORT);
    awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    let done = awd.wait_msg("action done", Some("vm1"), SHORT);
    assert_eq!(done["line"], "quit");
    vm.wait_trace(r#"req: {"execute": "quit""#, SHORT);
    assert!(vm.wait_exit(SHORT).success());
}

/// One device, several ports: a second port feeds a second watchdog, an unknown port is
/// refused at once, pulses reach the guest on the same stream, and a stream of ~800 KB (a dozen
/// credit windows) goes through without a stall.
#[test]
fn ports_pulses_refusal_and_credit() {
    let dir = scratch("vsock-ports");
    let run = dir.path();
    let sock = format!("{}/vm1-vsock.sock", run.display());
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--chardev",
            &format!("vhost-user-vsock,id=hb,path={sock},guest-cid=3,port=9009"),
            "--chardev",
            &format!("vhost-user-vsock,id=app,path={sock},guest-cid=3,port=9010"),
            "--object",
            "advanced-watchdog,id=vm1,awd_node=hb,pulse_interval=300,timeout=5000,grace=120000",
            "--object",
            "advanced-watchdog,id=app,awd_node=app,timeout=60000,grace=120000",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    let mut vm = Qemu::start(
        run,
        QemuOpts {
            args: qemu_args_file("vsock.args", run),
            ..QemuOpts::new("vm1")
        },
    );
    vm.wait_ready();
    // Pulses: the agent expects one at least every 2 s and exits non-zero otherwise.
    vm.run(
        "awd-agent --to vsock:2:9009 --interval 100 --count 40 --expect-pulses 2000; echo agent-exit=$?",
        BOOT,
    );
    let done = vm
        .console
        .all()
        .into_iter()
        .rev()
        .find(|l| l.starts_with("awd-agent: done:"))
        .expect("agent summary");
    let pulses: u64 = done
        .split("pulses: ")
        .nth(1)
        .and_then(|r| r.split([',', ' ']).next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(pulses >= 5, "{done}");
    assert!(vm.console.all().iter().any(|l| l == "agent-exit=0"));
    awd.wait_msg("connected", Some("vm1"), SHORT);

    // The second port feeds the second watchdog, with 100-byte lines through many windows.
    let line = "x".repeat(99);
    vm.run(&format!("awd-agent --to vsock:2:9010 --interval 1 --count 8000 --message {line}; echo app-exit=$?"), BOOT);
    assert!(
        vm.console.all().iter().any(|l| l == "app-exit=0"),
        "8000 lines went through"
    );
    awd.wait_msg("connected", Some("app"), SHORT);
    let heard = awd.wait("the app channel's disconnect", SHORT, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("disconnected"))
            && v["watchdog"] == "app"
    });
    assert_eq!(heard["watchdog"], "app");

    // An unknown port: reset at once (the agent reports the failed connect and gives up).
    vm.run("awd-agent --to vsock:2:7777 --interval 100 --count 1 & sleep 1; kill $!; echo refused-done", SHORT);
    let refused = vm
        .console
        .all()
        .into_iter()
        .find(|l| l.contains("cannot open vsock:2:7777"));
    assert!(
        refused.as_deref().is_some_and(|l| l.contains("reset")),
        "{refused:?}"
    );
    assert_eq!(expiries(&awd, "app"), 0);
}

/// QEMU is killed and restarted on the same socket: awd keeps serving, the watchdog's timer
/// runs on through the gap (it expires while no QEMU is there), and the new guest's heartbeats
/// re-arm it.
#[test]
fn qemu_restart_on_the_same_socket() {
    let dir = scratch("vsock-restart");
    let run = dir.path();
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--chardev",
            &format!(
                "vhost-user-vsock,id=hb,path={}/vm1-vsock.sock,guest-cid=3,port=9009",
                run.display()
            ),
            "--object",
            "advanced-watchdog,id=vm1,awd_node=hb,timeout=3000,grace=120000",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    let opts = |name: &str| QemuOpts {
        agent: Some(s(&["--to", "vsock:2:9009", "--interval", "200"])),
        // The argument file without its QMP monitor: this test needs none.
        args: without_monitor(qemu_args_file("vsock.args", run)),
        ..QemuOpts::new(name)
    };
    let mut first = Qemu::start(run, opts("first"));
    first.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    awd.wait_msg("connected", Some("vm1"), SHORT);
    first.run("sleep 1", SHORT); // a few heartbeats: the grace period is over
    first.kill();
    awd.wait_msg("disconnected", Some("vm1"), SHORT);
    // Silence after the disconnect is silence: the timer was not reset.
    awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    let mut second = Qemu::start(run, opts("second"));
    second.console.wait("the agent to reconnect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    awd.wait_msg("connected", Some("vm1"), SHORT);
    let rearmed = awd.wait("re-armed", SHORT, |v| {
        v["message"] == "watchdog status changed" && v["to"] == "ok"
    });
    assert_eq!(rearmed["watchdog"], "vm1");
}
