//! Live migration of a virtio-serial guest between two QEMUs on this host, each side with the
//! awd a host would have (issue 9). QEMU 7.2: the source VM stops (`STOP`, run state
//! `postmigrate`) and its QEMU then exits; the destination is `inmigrate` until `RESUME`. awd
//! follows the run state (`query-status` + `STOP`/`RESUME` on its QMP node) and changes no
//! migration capability. Expected: the source's watchdog never fires; the destination's does not
//! fire while the VM is incoming, however long, and supervises once it runs.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const TIMEOUT_MS: u64 = 2000;
const GRACE_MS: u64 = 8000;

/// One host's awd: the seed's use case 1 with a QMP notification node.
fn awd_args(run: &Path) -> Vec<String> {
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
             timeout={TIMEOUT_MS},grace={GRACE_MS}",
            run.display()
        ),
    ])
}

/// One host's QEMU: the same devices on both sides, as migration requires.
fn qemu_opts(run: &Path, extra: &[&str]) -> QemuOpts {
    let mut args = qemu_args_file("local-guest.args", run);
    args.extend(s(&[
        "-qmp",
        &format!("unix:{}/test-qmp.sock,server=on,wait=off", run.display()),
    ]));
    args.extend(s(extra));
    QemuOpts {
        agent: Some(s(&[
            "--to",
            "port:org.awd.heartbeat.0",
            "--interval",
            "200",
        ])),
        args,
        ..QemuOpts::new("vm1")
    }
}

fn no_action(awd: &Awd) -> bool {
    awd.records(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("action") || m == "watchdog expired")
    })
    .is_empty()
}

#[test]
fn a_migrated_guest_trips_neither_side_and_is_supervised_on_arrival() {
    let dir = scratch("migration");
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    for d in [&src, &dst] {
        std::fs::create_dir_all(d).unwrap();
        script(d, "quit.script", "quit\n");
    }
    let mut awd_src = Awd::run(&src, "awd-src", &awd_args(&src));
    let mut awd_dst = Awd::run(&dst, "awd-dst", &awd_args(&dst));
    awd_src.wait_msg("awd running", None, SHORT);
    awd_dst.wait_msg("awd running", None, SHORT);

    // The destination waits for the incoming VM from the start.
    let mig = dst.join("mig.sock");
    let incoming = format!("unix:{}", mig.display());
    let mut vm_dst = Qemu::start(&dst, qemu_opts(&dst, &["-incoming", &incoming]));
    let waiting_since = Instant::now();
    awd_dst.wait("the destination VM is not running", SHORT, |v| {
        v["message"] == "VM run state from QMP" && v["running"] == false
    });

    let mut vm_src = Qemu::start(&src, qemu_opts(&src, &[]));
    vm_src.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    vm_src.run("sleep 3", SHORT);
    assert!(no_action(&awd_src), "the source fired while its guest beat");

    // The incoming VM has now waited longer than grace + timeout: a watchdog that did not
    // follow `inmigrate` would have fired. A negative check, bounded by that sum plus 2 s.
    let bound = Duration::from_millis(GRACE_MS + TIMEOUT_MS + 2000);
    if let Some(rest) = bound.checked_sub(waiting_since.elapsed()) {
        std::thread::sleep(rest);
    }
    assert!(
        no_action(&awd_dst),
        "the destination fired before its VM arrived"
    );

    let reply = qmp_json(
        &src.join("test-qmp.sock"),
        &serde_json::json!({"execute": "migrate", "arguments": {"uri": incoming}}),
    );
    assert!(reply.get("return").is_some(), "{reply}");
    let deadline = Instant::now() + SHORT;
    loop {
        let st = qmp_json(
            &src.join("test-qmp.sock"),
            &serde_json::json!({"execute": "query-migrate"}),
        );
        match st["return"]["status"].as_str() {
            Some("completed") => break,
            Some("failed" | "cancelled") => panic!("migration: {st}"),
            _ if Instant::now() > deadline => panic!("migration did not complete: {st}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    awd_src.wait("the source VM stopped", SHORT, |v| {
        v["message"] == "VM run state from QMP" && v["running"] == false
    });
    awd_dst.wait("the destination VM runs", SHORT, |v| {
        v["message"] == "VM run state from QMP" && v["running"] == true
    });
    // As libvirt does, the source QEMU is then ended.
    let reply = qmp(&src.join("test-qmp.sock"), "quit");
    assert!(reply.get("return").is_some(), "{reply}");
    assert!(vm_src.wait_exit(SHORT).success());

    // The guest beats on through the destination, and the source, its QEMU gone, stays quiet:
    // three timeouts plus a second on both sides.
    std::thread::sleep(Duration::from_millis(3 * TIMEOUT_MS + 1000));
    assert!(no_action(&awd_src), "the source fired after the VM left");
    assert!(
        no_action(&awd_dst),
        "the destination fired on a running guest"
    );

    // The destination supervises: silence the agent, and its watchdog quits the VM there.
    vm_dst.run("killall awd-agent", SHORT);
    let expired = awd_dst.wait_msg("watchdog expired", Some("vm1"), SHORT);
    assert!(
        expired["reason"].as_str().unwrap().contains("silent for"),
        "{expired}"
    );
    awd_dst.wait_msg("action done", Some("vm1"), SHORT);
    vm_dst.wait_trace(r#"req: {"execute": "quit", "arguments": {}, "id""#, SHORT);
    assert!(vm_dst.wait_exit(SHORT).success());
    assert!(no_action(&awd_src), "the source never fired");
}

/// A guest on awd's vhost-user vsock device cannot be migrated: QEMU 7.2 refuses (the device
/// is not migratable), the VM keeps running where it is, and awd goes on supervising it.
#[test]
fn qemu_refuses_to_migrate_a_guest_on_the_vhost_user_vsock_device() {
    let dir = scratch("migration-vsock");
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
            "advanced-watchdog,id=vm1,awd_node=hb,notification_node=mon,opt_script=quit.script,\
             timeout=2000,grace=120000",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    let mut args = qemu_args_file("vsock.args", run);
    args.extend(s(&[
        "-qmp",
        &format!("unix:{}/test-qmp.sock,server=on,wait=off", run.display()),
    ]));
    let mut vm = Qemu::start(
        run,
        QemuOpts {
            agent: Some(s(&["--to", "vsock:2:9009", "--interval", "200"])),
            args,
            ..QemuOpts::new("vm1")
        },
    );
    vm.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected to vsock:2:9009")
    });
    let nowhere = format!("unix:{}/nobody-listens.sock", run.display());
    let reply = qmp_json(
        &run.join("test-qmp.sock"),
        &serde_json::json!({"execute": "migrate", "arguments": {"uri": nowhere}}),
    );
    let desc = reply["error"]["desc"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    eprintln!("QEMU: {desc}");
    assert!(
        desc.contains("non-migratable device") && desc.contains("vhost-user-vsock"),
        "QEMU took the migration: {reply}"
    );
    // Still running, still supervised.
    vm.run("sleep 3", SHORT);
    assert!(
        no_action(&awd),
        "the refused migration tripped the watchdog"
    );
    vm.run("killall awd-agent", SHORT);
    awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    vm.wait_trace(r#"req: {"execute": "quit", "arguments": {}, "id""#, SHORT);
    assert!(vm.wait_exit(SHORT).success());
}
