//! Bad input: a broken configuration is a one-line error and a non-zero exit; hostile channel
//! input is a logged, counted rejection that never disturbs the other watchdogs; a notification
//! peer that misbehaves never crashes awd.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;

fn assert_clean_failure(args: &[&str], want: &str) {
    let (status, _out, err) = awd_oneshot(args);
    assert!(!status.success(), "{args:?} should fail");
    assert_eq!(status.code(), Some(1), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line for {args:?}: {err}");
    assert!(lines[0].starts_with("awd: error: "), "{err}");
    assert!(
        lines[0].contains(want),
        "{args:?}: want {want:?} in {err:?}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn malformed_seed_arguments_are_one_line_errors() {
    let d = scratch("badargs");
    let dir = d.path().display().to_string();
    let ok_node = format!("socket,id=d,path={dir}/d.sock,server=on");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            s(&["--chardev", "socket,id=d,port=9,bogus=1"]),
            "unknown key 'bogus'",
        ),
        (s(&["--chardev", "socket,port=9"]), "missing id="),
        (
            s(&["--chardev", "socket,id=d,port=x"]),
            "port=x: expected a port number",
        ),
        (
            s(&[
                "--chardev",
                &ok_node,
                "--object",
                "advanced-watchdog,id=w,awd_node=nope,timeout=100",
            ]),
            "no chardev with id 'nope'",
        ),
        (
            s(&[
                "--chardev",
                &ok_node,
                "--object",
                "advanced-watchdog,id=w,awd_node=d,timeout=100,colour=red",
            ]),
            "unknown key 'colour'",
        ),
        (
            s(&[
                "--chardev",
                &ok_node,
                "--object",
                &format!("advanced-watchdog,id=w,awd_node=d,timeout=100,opt_script={dir}/missing"),
            ]),
            "missing",
        ),
        (
            s(&[
                "--chardev",
                &ok_node,
                "--object",
                "advanced-watchdog,id=w,awd_node=d,timeout=soon",
            ]),
            "timeout=soon",
        ),
        (
            s(&[
                "--chardev",
                &ok_node,
                "--object",
                "advanced-watchdog,id=w,awd_node=d",
            ]),
            "missing timeout=",
        ),
        (
            s(&["--config", &format!("{dir}/none.toml")]),
            "cannot read config file",
        ),
    ];
    for (args, want) in cases {
        for verb in ["check", "run"] {
            let mut full = vec![verb];
            full.extend(args.iter().map(String::as_str));
            assert_clean_failure(&full, want);
        }
    }
}

#[test]
fn a_port_in_use_is_a_startup_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    assert_clean_failure(
        &[
            "run",
            "--chardev",
            &format!("socket,id=detection,host=127.0.0.1,port={port},server=on"),
            "--object",
            "advanced-watchdog,id=w,awd_node=detection,timeout=1000",
        ],
        &format!(
            "chardev 'detection': cannot listen on tcp:127.0.0.1:{port}: Address already in use"
        ),
    );
}

/// A 10 MB line, binary junk, invalid UTF-8, lying frame lengths and a flood on one watchdog's
/// channel: each is a logged, counted rejection, and the other watchdog is never disturbed.
#[test]
fn hostile_channel_input_is_rejected_and_isolated() {
    let d = scratch("hostile");
    let dir = d.path();
    let mut awd = Awd::run(
        dir,
        "awd",
        &s(&[
            "--chardev",
            &format!("socket,id=bad,path={}/bad.sock,server=on", dir.display()),
            "--chardev",
            &format!("socket,id=good,path={}/good.sock,server=on", dir.display()),
            "--object",
            "advanced-watchdog,id=victim,awd_node=bad,timeout=60000",
            "--object",
            "advanced-watchdog,id=bystander,awd_node=good,timeout=1500",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    // The bystander heartbeats from its own thread the whole time.
    let good_path = dir.join("good.sock");
    let (count_tx, count_rx) = std::sync::mpsc::channel::<u64>();
    std::thread::spawn(move || {
        let mut c = UnixStream::connect(good_path).unwrap();
        for n in 1.. {
            if c.write_all(b"WATCHDOG=1\n").is_err() || count_tx.send(n).is_err() {
                break;
            }
            // The bystander's own heartbeat period.
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    let mut bad = UnixStream::connect(dir.join("bad.sock")).unwrap();
    // A 10 MB line.
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..10 {
        bad.write_all(&chunk).unwrap();
    }
    bad.write_all(b"\n").unwrap();
    awd.wait("line_too_long", SHORT, |v| v["reason"] == "line_too_long");
    // Invalid UTF-8 and binary junk.
    bad.write_all(b"\xff\xfe\xfd not utf-8\n").unwrap();
    awd.wait("invalid_utf8", SHORT, |v| v["reason"] == "invalid_utf8");
    bad.write_all(b"\x00\xff\xff\xff\x13\x37junk\n").unwrap();
    awd.wait("frame_too_long", SHORT, |v| v["reason"] == "frame_too_long");
    bad.write_all(b"WATCHDOG_USEC=forever\n").unwrap();
    awd.wait("bad_value", SHORT, |v| v["reason"] == "bad_value");
    // A flood of junk: rate-limited logs, no stall.
    let junk: Vec<u8> = (0..(4 << 20))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    bad.write_all(&junk).unwrap();
    bad.write_all(b"\n").unwrap();
    drop(bad);
    awd.wait_msg("disconnected", Some("victim"), SHORT);

    // The bystander goes on well past twice its timeout after the flood (30 more beats at
    // 100 ms); it must never have expired.
    let after_flood = count_rx.try_iter().last().unwrap_or(0);
    while count_rx.recv_timeout(SHORT).expect("bystander beats") < after_flood + 30 {}
    let expired = awd.records(|v| v["message"] == "watchdog expired");
    assert!(expired.is_empty(), "nobody expired: {expired:?}");
    let rejected = awd.records(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("rejected input"))
    });
    assert!(
        rejected.len() <= 10,
        "rejection logs are rate-limited, got {}",
        rejected.len()
    );
    assert!(
        awd.records(|v| v["level"] == "ERROR"
            || v["message"]
                .as_str()
                .is_some_and(|m| m.contains("panicked")))
            .is_empty()
    );
}

/// The notification peer closes in the middle of a three-line script: the line it swallowed
/// is reported as unknown (never resent, never done), the rest go out on a new connection, and
/// awd lives on.
#[test]
fn a_notification_peer_that_closes_mid_script() {
    let d = scratch("midscript");
    let dir = d.path();
    std::fs::write(dir.join("s"), "stop\ninfo status\ncont\n").unwrap();
    let hmp = TcpListener::bind("127.0.0.1:0").unwrap();
    let hmp_port = hmp.local_addr().unwrap().port();
    let mut awd = Awd::run(
        dir,
        "awd",
        &s(&[
            "--chardev",
            &format!("socket,id=d,path={}/d.sock,server=on", dir.display()),
            "--chardev",
            &format!("socket,id=m,host=127.0.0.1,port={hmp_port}"),
            "--object",
            "advanced-watchdog,id=w,awd_node=d,notification_node=m,opt_script=s,timeout=300",
        ]),
    );
    // First connection: an HMP monitor that reads one command and hangs up without answering.
    let (mut c1, _) = hmp.accept().unwrap();
    c1.write_all(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
        .unwrap();
    let mut r1 = BufReader::new(c1.try_clone().unwrap());
    let mut line = String::new();
    r1.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "stop");
    drop(r1);
    drop(c1);
    let lost = awd.wait_msg("action fate unknown", Some("w"), SHORT);
    assert_eq!(lost["line"], "stop");
    // Second connection: a well-behaved monitor gets the remaining lines, in order.
    let (mut c2, _) = hmp.accept().unwrap();
    c2.write_all(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
        .unwrap();
    let mut r2 = BufReader::new(c2.try_clone().unwrap());
    for want in ["info status", "cont"] {
        line.clear();
        r2.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), want);
        c2.write_all(format!("{want}\r\nok\r\n(qemu) ").as_bytes())
            .unwrap();
        let done = awd.wait_msg("action done", Some("w"), SHORT);
        assert_eq!(done["line"], want);
    }
    // awd is still alive and serving: a heartbeat re-arms the watchdog.
    let mut probe = UnixStream::connect(dir.join("d.sock")).unwrap();
    probe.write_all(b"WATCHDOG=1\n").unwrap();
    let rearmed = awd.wait_msg("watchdog status changed", Some("w"), SHORT);
    assert_eq!(rearmed["to"], "ok");
}

/// `--object` given to `check` prints the resolved model.
#[test]
fn check_prints_the_resolved_watchdogs() {
    let d = scratch("check");
    let dir = d.path().display().to_string();
    std::fs::write(format!("{dir}/colo_opt_script"), "quit\n").unwrap();
    let (status, out, err) = awd_oneshot(&[
        "check",
        "--chardev",
        "socket,id=detection,host=0.0.0.0,port=9009,server,nowait",
        "--chardev",
        "socket,id=notification,host=127.0.0.1,port=4445",
        "--object",
        &format!(
            "advanced-watchdog,id=awd1,server=on,awd_node=detection,notification_node=notification,\
             opt_script={dir}/colo_opt_script,iothread=iothread1,pulse_interval=1000,timeout=5000"
        ),
    ]);
    assert!(status.success(), "{err}");
    assert!(out.contains("watchdog awd1"), "{out}");
    assert!(out.contains("listen tcp:0.0.0.0:9009"), "{out}");
    assert!(out.contains("quit (QMP quit)"), "{out}");
    assert!(out.contains("pulses            every 1000 ms"), "{out}");
    let _ = TcpStream::connect("127.0.0.1:9"); // nothing was bound by check
}
