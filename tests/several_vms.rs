//! Several VMs under one awd, for real: a guest on virtio-serial and a guest on awd's vsock
//! device, each with its own watchdog and QMP node. Silencing one sends the action to its
//! QEMU only; the other keeps running and stays supervised.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const TIMEOUT_MS: u64 = 2000;
const QUIT: &str = r#"req: {"execute": "quit", "arguments": {}, "id""#;

fn quits(vm: &Qemu) -> usize {
    vm.trace.all().iter().filter(|l| l.contains(QUIT)).count()
}

/// A guest whose sockets are in `dir` (`qemu-args/ARGS` with `/run/awd` there).
fn guest(dir: &Path, name: &str, args: &str, to: &str) -> Qemu {
    Qemu::start(
        dir,
        QemuOpts {
            agent: Some(s(&["--to", to, "--interval", "200"])),
            args: qemu_args_file(args, dir),
            ..QemuOpts::new(name)
        },
    )
}

#[test]
fn silencing_one_of_two_guests_quits_only_its_own_qemu() {
    let dir = scratch("several-vms");
    let (serial_dir, vsock_dir) = (dir.path().join("vm1"), dir.path().join("vm2"));
    for d in [&serial_dir, &vsock_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    script(dir.path(), "quit.script", "quit\n");
    let watchdog = |id: &str| {
        format!(
            "advanced-watchdog,id={id},awd_node={id}-hb,notification_node={id}-mon,\
             opt_script=quit.script,timeout={TIMEOUT_MS},grace=120000"
        )
    };
    let mut awd = Awd::run(
        dir.path(),
        "awd",
        &s(&[
            "--chardev",
            &format!(
                "socket,id=vm1-hb,path={}/vm1-hb.sock,server=on,wait=off",
                serial_dir.display()
            ),
            "--chardev",
            &format!(
                "socket,id=vm1-mon,path={}/vm1-qmp.sock",
                serial_dir.display()
            ),
            "--object",
            &watchdog("vm1"),
            "--chardev",
            &format!(
                "vhost-user-vsock,id=vm2-hb,path={}/vm1-vsock.sock,guest-cid=3,port=9009",
                vsock_dir.display()
            ),
            "--chardev",
            &format!(
                "socket,id=vm2-mon,path={}/vm1-qmp.sock",
                vsock_dir.display()
            ),
            "--object",
            &watchdog("vm2"),
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    let mut vm1 = guest(
        &serial_dir,
        "vm1-serial",
        "local-guest.args",
        "port:org.awd.heartbeat.0",
    );
    let mut vm2 = guest(&vsock_dir, "vm2-vsock", "vsock.args", "vsock:2:9009");
    for vm in [&mut vm1, &mut vm2] {
        vm.console.wait("the agent to connect", BOOT, |l| {
            l.contains("awd-agent: connected")
        });
    }
    vm1.run("sleep 3", SHORT);
    assert_eq!(expiries(&awd, "vm1") + expiries(&awd, "vm2"), 0);

    // vm2 falls silent: its QEMU gets `quit` and exits.
    vm2.run("killall awd-agent", SHORT);
    awd.wait_msg("watchdog expired", Some("vm2"), SHORT);
    vm2.wait_trace(QUIT, SHORT);
    assert!(vm2.wait_exit(SHORT).success());

    // vm1 runs on, supervised, for three of its timeouts (a bounded negative check), and
    // never saw a `quit`.
    std::thread::sleep(Duration::from_millis(3 * TIMEOUT_MS));
    vm1.run("true", SHORT);
    assert_eq!(expiries(&awd, "vm1"), 0, "vm1 fired with vm2");
    assert_eq!(quits(&vm1), 0, "vm2's quit reached vm1");
    assert_eq!(awd.status()["vm1"]["status"], "ok");

    // And vm1 is still watched: silenced in turn, it gets its own `quit`.
    vm1.run("killall awd-agent", SHORT);
    awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    vm1.wait_trace(QUIT, SHORT);
    assert!(vm1.wait_exit(SHORT).success());
    assert_eq!(expiries(&awd, "vm2"), 1, "vm2 fired once");
}
