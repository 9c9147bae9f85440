//! awd as QEMU's vhost-user vsock device, end to end: a real `vhost-user-vsock-pci`, the
//! Debian guest kernel's vsock modules, and `awd-agent` over AF_VSOCK.

mod common;

use std::time::Duration;

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

/// Writes a TOML configuration: chardevs `a` (port 9009) and `b` (port `b_port`) on one vsock
/// device, and watchdog `wa` on `a`, `wb` on `b`, each with its grace.
fn vsock_toml(cfg: &std::path::Path, sock: &str, a: (&str, &str, u64), b: (&str, &str, u64, u32)) {
    let chardev = |id: &str, port: u32| {
        format!(
            "[chardev.{id}]\nbackend = \"vhost-user-vsock\"\npath = \"{sock}\"\nguest-cid = 3\nport = {port}\n"
        )
    };
    let watchdog = |id: &str, node: &str, grace: u64| {
        format!("[watchdog.{id}]\nawd_node = \"{node}\"\ntimeout = 1500\ngrace = {grace}\n")
    };
    let text = [
        chardev(a.0, 9009),
        chardev(b.0, b.3),
        watchdog(a.1, a.0, a.2),
        watchdog(b.1, b.0, b.2),
    ]
    .concat();
    std::fs::write(cfg, text).unwrap();
}

/// SIGHUP with a guest heartbeating on two ports of one device (every 200 ms, timeout 1.5 s):
/// renaming a chardev (same path, port and CID) and swapping two watchdogs between the ports
/// replace the watchdogs, and the device feeds the new ones over the same guest connections:
/// no fire within grace (2 s) + timeout + 2.5 s after each reload. Changing a port is
/// refused, and everything keeps running.
#[test]
fn sighup_renames_and_moves_vsock_watchdogs_while_the_guest_heartbeats() {
    let dir = scratch("vsock-reload");
    let run = dir.path();
    let sock = format!("{}/vm1-vsock.sock", run.display());
    let cfg = run.join("awd.toml");
    // The first grace covers the boot; replaced watchdogs get a short one.
    vsock_toml(
        &cfg,
        &sock,
        ("hb", "vm1", 120_000),
        ("app", "app", 120_000, 9010),
    );
    let mut awd = Awd::run(run, "awd", &["--config".into(), cfg.display().to_string()]);
    awd.wait_msg("awd running", None, SHORT);
    let mut vm = Qemu::start(
        run,
        QemuOpts {
            agent: Some(s(&["--to", "vsock:2:9009", "--interval", "200"])),
            args: without_monitor(qemu_args_file("vsock.args", run)),
            ..QemuOpts::new("vm1")
        },
    );
    vm.wait_ready();
    vm.run(
        "awd-agent --to vsock:2:9010 --interval 200 --no-socket & true",
        SHORT,
    );
    awd.wait_msg("connected", Some("vm1"), BOOT);
    awd.wait_msg("connected", Some("app"), SHORT);
    // A bound long enough for a replaced watchdog's grace (2 s) and timeout (1.5 s) to pass.
    let bound = Duration::from_millis(2000 + 1500 + 2500);
    let all_fed = |awd: &Awd, ids: &[&str]| {
        let st = awd.status();
        for id in ids {
            assert_eq!(st[*id]["status"], "ok", "{id}: {}", st[*id]);
            assert_eq!(st[*id]["connections"], 1, "{id}: {}", st[*id]);
            assert!(st[*id]["heartbeats"].as_u64().unwrap() > 0, "{}", st[*id]);
        }
    };

    // 1. Rename the chardev of port 9009.
    vsock_toml(
        &cfg,
        &sock,
        ("hb-renamed", "vm1", 2000),
        ("app", "app", 120_000, 9010),
    );
    awd.signal(SIGHUP);
    let done = awd.wait_msg("reloaded", None, SHORT);
    assert_eq!(
        done["message"], "reloaded: added -, removed -, changed -, replaced vm1, 1 unchanged",
        "{done}"
    );
    std::thread::sleep(bound); // a negative check: nothing may fire within the bound
    assert_eq!(
        expiries(&awd, "vm1"),
        0,
        "the renamed channel's watchdog is fed"
    );
    all_fed(&awd, &["vm1", "app"]);

    // 2. Swap the two watchdogs between the ports.
    vsock_toml(
        &cfg,
        &sock,
        ("hb-renamed", "app", 2000),
        ("app", "vm1", 2000, 9010),
    );
    awd.signal(SIGHUP);
    let done = awd.wait_msg("reloaded", None, SHORT);
    assert_eq!(
        done["message"], "reloaded: added -, removed -, changed -, replaced app,vm1, 0 unchanged",
        "{done}"
    );
    std::thread::sleep(bound);
    assert_eq!(expiries(&awd, "vm1") + expiries(&awd, "app"), 0);
    all_fed(&awd, &["vm1", "app"]);
    let st = awd.status();
    assert_eq!(
        (st["vm1"]["channel"].as_str(), st["app"]["channel"].as_str()),
        (Some("app"), Some("hb-renamed"))
    );

    // 3. A new port on the running device is refused; the running configuration stays.
    vsock_toml(
        &cfg,
        &sock,
        ("hb-renamed", "app", 2000),
        ("app", "vm1", 2000, 9011),
    );
    awd.signal(SIGHUP);
    let refused = awd.wait_msg("reload failed", None, SHORT);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("ports or guest CID changed"),
        "{refused}"
    );
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(expiries(&awd, "vm1") + expiries(&awd, "app"), 0);
    all_fed(&awd, &["vm1", "app"]);
}

/// A watchdog's "the VM started over" record.
fn is_start_over(v: &serde_json::Value) -> bool {
    v["watchdog"] == "vm1"
        && v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the VM started over"))
}

/// The VM starts over twice: the guest reboots (`reboot -f`; QEMU resets instead of exiting)
/// and QEMU is killed and a new one started on the same socket. Each time the watchdog
/// hears it ("the VM started over"), as it did for the first QEMU; a pause and resume
/// (QMP `stop`, `cont`) is not a start-over.
#[test]
fn a_guest_reboot_and_a_new_qemu_start_the_vm_over() {
    let dir = scratch("vsock-started-over");
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
    let started_over = |awd: &mut Awd, reason: &'static str, bound| {
        awd.wait(&format!("the VM started over: {reason}"), bound, |v| {
            is_start_over(v) && v["reason"] == reason
        });
    };
    let opts = |name: &str| {
        let mut args = qemu_args_file("vsock.args", run);
        // The harness passes -no-reboot; this later option makes a guest reboot a reset.
        args.extend(s(&["-action", "reboot=reset"]));
        QemuOpts {
            agent: Some(s(&["--to", "vsock:2:9009", "--interval", "200"])),
            args,
            ..QemuOpts::new(name)
        }
    };
    let mut first = Qemu::start(run, opts("first"));
    started_over(&mut awd, "a new QEMU connected", SHORT);
    first.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    awd.wait_msg("connected", Some("vm1"), SHORT);

    // A pause is not a start-over: the rings stop and carry on where they were.
    let qmp_sock = run.join("vm1-qmp.sock");
    assert!(qmp(&qmp_sock, "stop").get("return").is_some());
    assert!(qmp(&qmp_sock, "cont").get("return").is_some());
    let again = awd.wait("the rings to run again after the pause", SHORT, |v| {
        v["message"] == "the rings run again"
    });
    assert_ne!(
        (&again["rx_at"], &again["tx_at"]),
        (&0.into(), &0.into()),
        "{again}"
    );
    assert_eq!(awd.records(is_start_over).len(), 1);
    awd.wait_msg("connected", Some("vm1"), SHORT);

    first.run("(sleep 1; reboot -f) & true", SHORT);
    started_over(&mut awd, "the guest reset the device", BOOT);
    first
        .console
        .wait("the agent to connect after the reboot", BOOT, |l| {
            l.contains("awd-agent: connected")
        });
    awd.wait_msg("connected", Some("vm1"), SHORT);
    assert!(first.pid() > 0, "the same QEMU: it reset, it did not exit");

    first.kill();
    awd.wait_msg("disconnected", Some("vm1"), SHORT);
    let mut second = Qemu::start(run, opts("second"));
    started_over(&mut awd, "a new QEMU connected", SHORT);
    second.console.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    awd.wait_msg("connected", Some("vm1"), SHORT);
    assert_eq!(
        awd.records(is_start_over).len(),
        3,
        "exactly: first QEMU, reboot, second QEMU"
    );
}

/// The guest writes 64 KiB lines (a 65,535-byte line and its newline) with blocking writes: 64
/// of them, 64 credit windows. Every one arrives (each is counted as an over-long line), no
/// packet is malformed, and the stream never wedges (the writes all complete).
#[test]
fn lines_of_64_kib_all_arrive_and_the_stream_never_wedges() {
    let dir = scratch("vsock-64k");
    let run = dir.path();
    let port = free_port();
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--metrics",
            &format!("127.0.0.1:{port}"),
            "--chardev",
            &format!(
                "vhost-user-vsock,id=hb,path={}/vm1-vsock.sock,guest-cid=3,port=9009",
                run.display()
            ),
            "--object",
            "advanced-watchdog,id=vm1,awd_node=hb,timeout=60000,grace=120000",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    let mut vm = Qemu::start(
        run,
        QemuOpts {
            args: without_monitor(qemu_args_file("vsock.args", run)),
            ..QemuOpts::new("vm1")
        },
    );
    vm.wait_ready();
    vm.run(
        r#"awd-agent --to vsock:2:9009 --interval 0 --count 64 --message "$(head -c 65535 /dev/zero | tr '\0' x)"; echo flood-exit=$?"#,
        BOOT,
    );
    let console = vm.console.all();
    assert!(
        console.iter().any(|l| l == "flood-exit=0"),
        "the writes all completed"
    );
    assert!(
        console
            .iter()
            .any(|l| l.starts_with("awd-agent: flood: 64 lines, 4194304 bytes")),
        "{console:?}"
    );
    let series =
        "awd_rejected_inputs_total{watchdog=\"vm1\",channel=\"hb\",reason=\"line_too_long\"}";
    let deadline = std::time::Instant::now() + SHORT;
    let metrics = loop {
        let body = scrape(port);
        let n = metric(&body, series);
        if n == Some(64.0) {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} = {n:?}, want 64"
        );
        std::thread::sleep(Duration::from_millis(100)); // polling a counter: no event to wait on
    };
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("awd_vsock_malformed_total"))
    {
        assert!(line.ends_with(" 0"), "{line}");
    }
    assert_eq!(expiries(&awd, "vm1"), 0);
}

/// The value of one series in a scrape.
fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
}

/// "Any input refreshes the timer" over vsock: a guest process writing one byte every 200 ms,
/// never a newline, keeps a 1 s watchdog alive for 5 s; once it stops, the watchdog fires
/// within the timeout plus 1.5 s.
#[test]
fn one_byte_every_200_ms_without_a_newline_keeps_a_1_s_watchdog_alive() {
    let dir = scratch("vsock-bytes");
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
            "advanced-watchdog,id=vm1,awd_node=hb,timeout=1000,grace=120000",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    let mut vm = Qemu::start(
        run,
        QemuOpts {
            args: without_monitor(qemu_args_file("vsock.args", run)),
            ..QemuOpts::new("vm1")
        },
    );
    vm.wait_ready();
    // Three heartbeat lines end the grace; then bytes alone, from a second agent at once.
    vm.run(
        "awd-agent --to vsock:2:9009 --interval 100 --count 3 --no-socket && (awd-agent --to vsock:2:9009 --interval 200 --raw --message x --no-socket & true)",
        SHORT,
    );
    // The run returned after the first agent wrote its lines: the grace is over.
    vm.console.wait("the line writer to connect", SHORT, |l| {
        l.contains("awd-agent: connected")
    });
    vm.console.wait("the byte writer to connect", SHORT, |l| {
        l.contains("awd-agent: connected")
    });
    awd.wait_msg("connected", Some("vm1"), SHORT);
    awd.wait_msg("connected", Some("vm1"), SHORT);
    let before = awd.status()["vm1"]["heartbeats"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(5)); // a negative check: no fire within 5 s
    assert_eq!(
        expiries(&awd, "vm1"),
        0,
        "bytes without a newline are proof of life"
    );
    let st = awd.status();
    assert_eq!(st["vm1"]["status"], "ok", "{}", st["vm1"]);
    assert!(
        st["vm1"]["heartbeats"].as_u64().unwrap() >= before + 10,
        "about 25 writes in 5 s: {}",
        st["vm1"]
    );
    vm.run("killall awd-agent", SHORT);
    let stopped = std::time::Instant::now();
    awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    let late = stopped.elapsed();
    eprintln!("fired {late:?} after the byte writer was killed");
    assert!(
        late <= Duration::from_millis(1000 + 1500),
        "fired {late:?} after the writer stopped"
    );
}
