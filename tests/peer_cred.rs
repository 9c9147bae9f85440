//! `peer-uid=`/`peer-gid=` on the vhost-user-vsock socket, end to end: the QEMU that connects
//! is checked with `SO_PEERCRED` before the device serves it. A QEMU running as anyone else
//! (here: root, when the device wants uid 65534) is closed at once, counted and logged, and
//! exits without a device; the QEMU the device wants is served and supervised as usual.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn vsock_awd(run: &Path, peer: &str, metrics: u16) -> Awd {
    script(run, "quit.script", "quit\n");
    Awd::run(
        run,
        "awd",
        &s(&[
            "--chardev",
            &format!(
                "vhost-user-vsock,id=hb,path={}/vm1-vsock.sock,guest-cid=3,port=9009,{peer}",
                run.display()
            ),
            "--chardev",
            &format!("socket,id=mon,path={}/vm1-qmp.sock", run.display()),
            "--object",
            "advanced-watchdog,id=vm1,awd_node=hb,notification_node=mon,opt_script=quit.script,\
             timeout=2000,grace=120000",
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ]),
    )
}

fn vsock_guest(run: &Path) -> Qemu {
    Qemu::start(
        run,
        QemuOpts {
            agent: Some(s(&["--to", "vsock:2:9009", "--interval", "200"])),
            args: qemu_args_file("vsock.args", run),
            ..QemuOpts::new("vm1")
        },
    )
}

/// The value of a series in awd's exposition (0 when absent).
fn value(metrics: u16, name: &str) -> u64 {
    series(&scrape(metrics), name) as u64
}

#[test]
fn a_qemu_running_as_another_user_is_refused_by_the_vsock_device() {
    let dir = scratch("peer-cred-refused");
    let run = dir.path();
    let metrics = free_port();
    let mut awd = vsock_awd(run, "peer-uid=65534", metrics);
    awd.wait_msg("awd running", None, SHORT);
    let mut vm = vsock_guest(run);
    let refused = awd.wait_msg("refusing QEMU", None, SHORT);
    assert_eq!(refused["reason"], "peer_cred", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("runs as uid 0, not 65534"),
        "{refused}"
    );
    // QEMU cannot set its device up and exits; nothing of it reached a watchdog.
    assert!(!vm.wait_exit(SHORT).success());
    let deadline = Instant::now() + SHORT;
    while value(metrics, "awd_vsock_frontends_refused_total{") != 1 {
        assert!(Instant::now() < deadline, "the refusal was not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(value(metrics, "awd_vsock_frontends_total{"), 0);
    assert!(
        awd.records(|v| v["message"] == "QEMU connected").is_empty(),
        "the refused QEMU was served"
    );
    assert_eq!(awd.status()["vm1"]["heartbeats"], 0);
}

#[test]
fn the_qemu_the_vsock_device_wants_is_served_and_supervised() {
    let dir = scratch("peer-cred-admitted");
    let run = dir.path();
    let metrics = free_port();
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut awd = vsock_awd(run, &format!("peer-uid={uid},peer-gid={gid}"), metrics);
    awd.wait_msg("awd running", None, SHORT);
    let mut vm = vsock_guest(run);
    awd.wait_msg("QEMU connected", None, SHORT);
    vm.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected to vsock:2:9009")
    });
    vm.run("sleep 3", SHORT);
    assert_eq!(expiries(&awd, "vm1"), 0, "the admitted guest's beats count");
    assert_eq!(value(metrics, "awd_vsock_frontends_refused_total{"), 0);
    vm.run("killall awd-agent", SHORT);
    awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    vm.wait_trace(r#"req: {"execute": "quit", "arguments": {}, "id""#, SHORT);
    assert!(vm.wait_exit(SHORT).success());
}
