//! The seed's three use cases, end to end: real QEMU, a real guest kernel, real awd processes.
//! QEMU's own trace (`-trace handle_qmp_command -trace handle_hmp_command`) is the witness of
//! what reached the monitor.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

/// Use case 1 with QMP: the guest's agent heartbeats over virtio-serial; while it runs nothing
/// fires; once it stops (the VM keeps running) awd sends a typed QMP `quit`.
#[test]
fn local_guest_over_virtio_serial_quit_via_typed_qmp() {
    let dir = scratch("local-qmp");
    let run = dir.path();
    script(run, "quit.script", "quit\n");
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--chardev",
            &format!(
                "socket,id=hb,path={}/vm1-hb.sock,server=on,wait=off",
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
            agent: Some(s(&[
                "--to",
                "port:org.awd.heartbeat.0",
                "--interval",
                "200",
            ])),
            args: qemu_args_file("local-guest.args", run),
            ..QemuOpts::new("vm1")
        },
    );
    vm.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    awd.wait_msg("notification node connected", None, SHORT);
    // Heartbeats flow for longer than the timeout: nothing fires.
    vm.run("sleep 5", SHORT);
    assert_eq!(expiries(&awd, "vm1"), 0, "no expiry while the agent runs");
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

/// Use case 1 with the seed's exact syntax (TCP, legacy `server,nowait`, iothread, pulses) and
/// an HMP monitor over TCP: the script line is written as typed at the `(qemu)` prompt.
#[test]
fn local_guest_seed_syntax_quit_via_hmp() {
    let dir = scratch("local-hmp");
    let run = dir.path();
    script(run, "colo_opt_script", "quit\n");
    let (hb, hmp) = (free_port(), free_port());
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--chardev",
            &format!("socket,id=detection,host=127.0.0.1,port={hb},server,nowait"),
            "--chardev",
            &format!("socket,id=notification,host=127.0.0.1,port={hmp}"),
            "--object",
            "iothread,id=iothread1",
            "--object",
            "advanced-watchdog,id=awd1,server=on,awd_node=detection,notification_node=notification,\
             opt_script=colo_opt_script,iothread=iothread1,pulse_interval=1000,timeout=3000,grace=120000",
        ]),
    );
    awd.wait_msg(
        "watchdog 'awd1': iothread=iothread1 is accepted and ignored",
        None,
        SHORT,
    );
    let mut vm = Qemu::start(
        run,
        QemuOpts {
            agent: Some(s(&[
                "--to",
                "port:org.awd.heartbeat.0",
                "--interval",
                "200",
            ])),
            args: s(&[
                "-device",
                "virtio-serial-pci,id=awdserial",
                "-chardev",
                &format!("socket,id=awdhb,host=127.0.0.1,port={hb},reconnect=1"),
                "-device",
                "virtserialport,bus=awdserial.0,chardev=awdhb,name=org.awd.heartbeat.0",
                "-monitor",
                &format!("tcp:127.0.0.1:{hmp},server=on,wait=off,nodelay=on"),
            ]),
            ..QemuOpts::new("vm1")
        },
    );
    vm.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    let node = awd.wait_msg("notification node connected", None, SHORT);
    assert_eq!(node["kind"], "HMP");
    vm.run("sleep 5", SHORT);
    assert_eq!(expiries(&awd, "awd1"), 0, "no expiry while the agent runs");
    vm.run("killall awd-agent", SHORT);
    awd.wait_msg("watchdog expired", Some("awd1"), SHORT);
    vm.wait_trace("cmdline: quit", SHORT);
    assert!(vm.wait_exit(SHORT).success());
}

/// Use case 2: a COLO heartbeat pair of two awd processes. The primary listens and pulses; the
/// secondary connects, answers, and reconnects. Each detects the other's death: SIGKILL the
/// secondary and the primary's script reaches its notification socket; restart it, SIGKILL the
/// primary, and the secondary sends `nbd-server-stop` then `x-colo-lost-heartbeat` to its QEMU,
/// as typed QMP, in script order.
#[test]
fn colo_pair_each_side_detects_the_others_death() {
    let dir = scratch("colo");
    let run = dir.path();
    script(run, "colo_primary_opt_script", "x_colo_lost_heartbeat\n");
    script(
        run,
        "colo_secondary_opt_script",
        "nbd_server_stop\nx_colo_lost_heartbeat\n",
    );
    let (h1, admin_port) = (free_port(), free_port());
    // The primary's notification node: an admin socket that receives raw lines.
    let admin = TcpListener::bind(("127.0.0.1", admin_port)).unwrap();

    let mut vm = Qemu::start(
        run,
        QemuOpts {
            args: qemu_args_file("colo-secondary.args", run),
            ..QemuOpts::new("secondary")
        },
    );
    vm.wait_ready();

    let primary_args = s(&[
        "--chardev",
        &format!("socket,id=h1,host=127.0.0.1,port={h1},server=on,wait=off"),
        "--chardev",
        &format!("socket,id=heartbeat0,host=127.0.0.1,port={admin_port}"),
        "--object",
        "advanced-watchdog,id=heart1,server=on,awd_node=h1,notification_node=heartbeat0,\
         opt_script=colo_primary_opt_script,pulse_interval=300,timeout=2000",
    ]);
    let secondary_args = s(&[
        "--chardev",
        &format!("socket,id=h1,host=127.0.0.1,port={h1},reconnect=1"),
        "--chardev",
        &format!("socket,id=heart1,path={}/secondary-qmp.sock", run.display()),
        "--object",
        "advanced-watchdog,id=heart1,server=off,awd_node=h1,notification_node=heart1,\
         opt_script=colo_secondary_opt_script,timeout=2000",
    ]);
    let mut primary = Awd::run(run, "primary", &primary_args);
    primary.wait_msg("awd running", None, SHORT);
    let mut secondary = Awd::run(run, "secondary", &secondary_args);
    secondary.wait_msg("connected", Some("heart1"), SHORT);
    primary.wait_msg("connected", Some("heart1"), SHORT);
    let (mut admin_conn, _) = admin.accept().unwrap();
    // Both alive for longer than either timeout: pulses and replies keep both quiet.
    vm.run("sleep 5", SHORT);
    assert_eq!(expiries(&primary, "heart1"), 0);
    assert_eq!(expiries(&secondary, "heart1"), 0);

    // 1. The secondary dies: the primary notices and notifies its admin socket.
    secondary.signal(SIGKILL);
    secondary.wait_exit(SHORT);
    primary.wait_msg("watchdog expired", Some("heart1"), SHORT);
    admin_conn.set_read_timeout(Some(SHORT)).unwrap();
    let mut line = String::new();
    BufReader::new(&mut admin_conn)
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "x_colo_lost_heartbeat\n");

    // 2. A new secondary connects; the primary re-arms.
    let mut secondary = Awd::run(run, "secondary2", &secondary_args);
    secondary.wait_msg("connected", Some("heart1"), SHORT);
    primary.wait("primary re-armed", SHORT, |v| {
        v["message"] == "watchdog status changed" && v["to"] == "ok"
    });
    secondary.wait_msg("notification node connected", None, SHORT);

    // 3. The primary dies: the secondary fails over through its QEMU's QMP, in script order.
    primary.signal(SIGKILL);
    primary.wait_exit(SHORT);
    secondary.wait_msg("watchdog expired", Some("heart1"), SHORT);
    vm.wait_trace(r#"req: {"execute": "nbd-server-stop""#, SHORT);
    vm.wait_trace(r#"req: {"execute": "x-colo-lost-heartbeat""#, SHORT);
    let nbd_at = vm
        .trace
        .position(|l| l.contains(r#""execute": "nbd-server-stop""#));
    let colo_at = vm
        .trace
        .position(|l| l.contains(r#""execute": "x-colo-lost-heartbeat""#));
    assert!(nbd_at < colo_at, "script order: nbd-server-stop first");
    let nbd = secondary.wait_msg("action answered with an error", Some("heart1"), SHORT);
    assert_eq!(nbd["line"], "nbd_server_stop");
    assert!(
        nbd["reply"]
            .as_str()
            .unwrap()
            .contains("NBD server not running"),
        "{nbd}"
    );
    let colo = secondary.wait_msg("action answered with an error", Some("heart1"), SHORT);
    assert_eq!(colo["line"], "x_colo_lost_heartbeat");
    assert!(
        colo["reply"]
            .as_str()
            .unwrap()
            .contains("The feature 'colo' is not enabled"),
        "{colo}"
    );
}

/// Use case 3: awd as the client of a remote TCP service. While the service talks nothing
/// fires; once it stops, the script (`stop`, then an HMP-only line) runs against the VM.
#[test]
fn remote_service_silence_pauses_the_vm() {
    let dir = scratch("remote");
    let run = dir.path();
    script(run, "pause.script", "stop\ninfo status\n");
    let svc_port = free_port();
    let service = TcpListener::bind(("127.0.0.1", svc_port)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let svc = std::thread::spawn(move || {
        let (mut conn, _) = service.accept().unwrap();
        // The remote service's own heartbeat loop.
        while !stop2.load(Ordering::Relaxed) {
            if conn.write_all(b"alive\n").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Dropping the listener and the connection: the service is gone.
    });

    let mut vm = Qemu::start(
        run,
        QemuOpts {
            args: qemu_args_file("remote-service.args", run),
            ..QemuOpts::new("vm1")
        },
    );
    vm.wait_ready();
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--chardev",
            &format!("socket,id=svc,host=127.0.0.1,port={svc_port},reconnect=1"),
            "--chardev",
            &format!("socket,id=mon,path={}/vm1-qmp.sock", run.display()),
            "--object",
            "advanced-watchdog,id=db-link,awd_node=svc,notification_node=mon,opt_script=pause.script,timeout=1500",
        ]),
    );
    awd.wait_msg("connected", Some("db-link"), SHORT);
    awd.wait_msg("notification node connected", None, SHORT);
    vm.run("sleep 4", SHORT);
    assert_eq!(
        expiries(&awd, "db-link"),
        0,
        "no expiry while the service talks"
    );
    stop.store(true, Ordering::Relaxed);
    svc.join().unwrap();
    awd.wait_msg("watchdog expired", Some("db-link"), SHORT);
    vm.wait_trace(r#"req: {"execute": "stop""#, SHORT);
    vm.wait_trace(
        r#""execute": "human-monitor-command", "arguments": {"command-line": "info status"}"#,
        SHORT,
    );
    let first = awd.wait_msg("action done", Some("db-link"), SHORT);
    assert_eq!(first["line"], "stop");
    let second = awd.wait_msg("action done", Some("db-link"), SHORT);
    assert_eq!(second["line"], "info status");
    assert!(
        second["reply"].as_str().unwrap().contains("paused"),
        "{second}"
    );
}
