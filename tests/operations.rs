//! Running awd the way hosts run daemons: the sd_notify protocol against a real notify socket,
//! a Prometheus scrape parsed by a real exposition parser, SIGHUP reloads and SIGTERM.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Receives notify datagrams until one contains `want`; returns everything received.
fn notify_until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + SHORT;
    let mut buf = [0u8; 4096];
    loop {
        sock.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {want} datagram ({e}); got {got:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = msg.lines().any(|l| l == want);
        got.push(msg);
        if done {
            return got;
        }
    }
}

/// READY=1 once listeners are up, WATCHDOG=1 at half of WATCHDOG_USEC, RELOADING=1 then READY=1
/// around a SIGHUP, STOPPING=1 on SIGTERM — on a notify socket the test owns.
#[test]
fn sd_notify_protocol() {
    let d = scratch("notify");
    let dir = d.path();
    let notify = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
    let notify_path = dir.join("notify.sock").display().to_string();
    let mut awd = Awd::run_env(
        dir,
        "awd",
        &s(&[
            "--chardev",
            &format!("socket,id=d,path={}/d.sock,server=on", dir.display()),
            "--object",
            "advanced-watchdog,id=w,awd_node=d,timeout=60000",
        ]),
        &[("NOTIFY_SOCKET", &notify_path), ("WATCHDOG_USEC", "400000")],
    );
    let got = notify_until(&notify, "READY=1");
    assert!(
        got.last()
            .unwrap()
            .contains("STATUS=supervising 1 watchdog(s)"),
        "{got:?}"
    );
    // The listener is bound before READY=1.
    UnixStream::connect(dir.join("d.sock")).expect("listening when READY=1 arrives");
    let t0 = Instant::now();
    notify_until(&notify, "WATCHDOG=1");
    notify_until(&notify, "WATCHDOG=1");
    notify_until(&notify, "WATCHDOG=1");
    // Three pings at half of 400 ms: about 0.4–0.6 s, surely under 5 s.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    awd.signal(SIGHUP);
    let got = notify_until(&notify, "RELOADING=1");
    assert!(got.last().unwrap().contains("MONOTONIC_USEC="), "{got:?}");
    notify_until(&notify, "READY=1");
    awd.signal(SIGTERM);
    notify_until(&notify, "STOPPING=1");
    assert!(awd.wait_exit(SHORT).success());
}

fn http_get(port: u16, path: &str) -> (String, String) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

/// A scrape over HTTP, parsed by the Prometheus project's own Python client (its OpenMetrics
/// parser), shows heartbeats, rejections by reason, status, expiries and seconds since the
/// last heartbeat for each watchdog.
#[test]
fn metrics_scrape_parses_with_a_real_exposition_parser() {
    let d = scratch("metrics");
    let dir = d.path();
    let port = free_port();
    let mut awd = Awd::run(
        dir,
        "awd",
        &s(&[
            "--metrics",
            &format!("127.0.0.1:{port}"),
            "--chardev",
            &format!("socket,id=hb,path={}/hb.sock,server=on", dir.display()),
            "--chardev",
            &format!(
                "socket,id=quiet,path={}/quiet.sock,server=on",
                dir.display()
            ),
            "--object",
            "advanced-watchdog,id=vm1,awd_node=hb,timeout=60000",
            "--object",
            "advanced-watchdog,id=vm2,awd_node=quiet,timeout=200",
        ]),
    );
    awd.wait_msg("metrics at http://", None, SHORT);
    let mut c = UnixStream::connect(dir.join("hb.sock")).unwrap();
    c.write_all(b"WATCHDOG=1\nWATCHDOG=1\nWATCHDOG=1\n\xff\xfe\n")
        .unwrap();
    awd.wait("the rejection", SHORT, |v| v["reason"] == "invalid_utf8");
    awd.wait_msg("watchdog expired", Some("vm2"), SHORT);
    let (head, body) = http_get(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    std::fs::write(dir.join("scrape.txt"), &body).unwrap();
    let parser = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value, "type": fam.type})
print(json.dumps(out))
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", parser])
        .arg(dir.join("scrape.txt"))
        .output()
        .expect("/usr/bin/python3 with python3-prometheus-client (apt) is needed");
    assert!(
        out.status.success(),
        "the parser rejected the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let get = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{body}"))["value"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(
        get(
            "awd_heartbeats_total",
            &[("watchdog", "vm1"), ("channel", "hb")]
        ),
        4.0
    );
    assert_eq!(
        get(
            "awd_rejected_inputs_total",
            &[("watchdog", "vm1"), ("reason", "invalid_utf8")]
        ),
        1.0
    );
    assert_eq!(get("awd_status", &[("watchdog", "vm1")]), 0.0);
    assert_eq!(get("awd_status", &[("watchdog", "vm2")]), 2.0, "expired");
    assert_eq!(get("awd_expiries_total", &[("watchdog", "vm2")]), 1.0);
    assert_eq!(get("awd_connections", &[("watchdog", "vm1")]), 1.0);
    assert!(get("awd_seconds_since_last_heartbeat", &[("watchdog", "vm1")]) < 30.0);
    assert!(get("awd_seconds_since_last_heartbeat", &[("watchdog", "vm2")]) >= 0.2);
    assert_eq!(
        get(
            "awd_actions_total",
            &[("watchdog", "vm2"), ("result", "failed")]
        ),
        0.0
    );
    let (head, _) = http_get(port, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// SIGHUP: watchdogs added, removed and changed without dropping the others' timers or
/// connections; an invalid new configuration is refused and the old one kept.
#[test]
fn sighup_reloads_without_disturbing_the_rest() {
    let d = scratch("reload");
    let dir = d.path();
    let r = dir.display();
    let cfg = dir.join("awd.toml");
    let table = |id: &str, timeout: u64| {
        format!(
            "[chardev.{id}]\npath = \"{r}/{id}.sock\"\nserver = true\n[watchdog.{id}]\nawd_node = \"{id}\"\ntimeout = {timeout}\n"
        )
    };
    std::fs::write(
        &cfg,
        format!(
            "{}{}{}",
            table("keep", 60000),
            table("drop", 60000),
            table("tune", 60000)
        ),
    )
    .unwrap();
    let mut awd = Awd::run(dir, "awd", &["--config".into(), cfg.display().to_string()]);
    awd.wait_msg("awd running", None, SHORT);
    let mut keep = UnixStream::connect(dir.join("keep.sock")).unwrap();
    keep.write_all(b"WATCHDOG=1\n").unwrap();
    let mut tune = UnixStream::connect(dir.join("tune.sock")).unwrap();
    tune.write_all(b"WATCHDOG=1\n").unwrap();
    // Two connections, logged in either order.
    awd.wait_msg("connected", None, SHORT);
    awd.wait_msg("connected", None, SHORT);
    let keep_armed_before = awd
        .records(|v| v["message"] == "watchdog armed" && v["watchdog"] == "keep")
        .len();

    // Remove `drop`, shorten `tune`'s timeout, add `new`, leave `keep` alone.
    std::fs::write(
        &cfg,
        format!(
            "{}{}{}",
            table("keep", 60000),
            table("tune", 400),
            table("new", 60000)
        ),
    )
    .unwrap();
    awd.signal(SIGHUP);
    let done = awd.wait_msg("reloaded", None, SHORT);
    assert_eq!(
        done["message"], "reloaded: added new, removed drop, changed tune, replaced -, 1 unchanged",
        "{done}"
    );
    UnixStream::connect(dir.join("new.sock")).expect("the added watchdog listens");
    assert!(
        UnixStream::connect(dir.join("drop.sock")).is_err(),
        "the removed watchdog's socket is gone"
    );
    // `tune` kept its connection and now runs the new timeout.
    awd.wait_msg("watchdog expired", Some("tune"), SHORT);
    tune.write_all(b"WATCHDOG=1\n").unwrap();
    awd.wait("tune re-armed on its old connection", SHORT, |v| {
        v["message"] == "watchdog status changed" && v["watchdog"] == "tune" && v["to"] == "ok"
    });
    // `keep` was not touched: same connection, no new arming, still OK.
    keep.write_all(b"WATCHDOG=1\n").unwrap();
    assert_eq!(
        awd.records(|v| v["message"] == "watchdog armed" && v["watchdog"] == "keep")
            .len(),
        keep_armed_before
    );
    assert_eq!(
        awd.records(|v| v["message"] == "connected" && v["watchdog"] == "keep")
            .len(),
        1
    );
    let st = awd.status();
    assert_eq!(
        st.keys().cloned().collect::<Vec<_>>(),
        ["keep", "new", "tune"]
    );
    assert_eq!(st["keep"]["connections"], 1);
    assert_eq!(st["keep"]["status"], "ok");

    // An invalid configuration is refused; everything keeps running.
    std::fs::write(&cfg, "[watchdog.broken]\ntimeout = \"soon\"\n").unwrap();
    awd.signal(SIGHUP);
    let refused = awd.wait_msg("reload refused", None, SHORT);
    assert!(
        refused["message"].as_str().unwrap().contains("awd.toml"),
        "{refused}"
    );
    assert_eq!(awd.status().len(), 3);
    keep.write_all(b"WATCHDOG=1\n").unwrap();
}

/// SIGTERM is a clean shutdown: exit status 0, listeners closed and their socket files
/// removed, a log line for each step.
#[test]
fn sigterm_is_a_clean_shutdown() {
    let d = scratch("sigterm");
    let dir = d.path();
    let mut awd = Awd::run(
        dir,
        "awd",
        &s(&[
            "--chardev",
            &format!("socket,id=d,path={}/d.sock,server=on", dir.display()),
            "--object",
            "advanced-watchdog,id=w,awd_node=d,timeout=60000",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    let _c = UnixStream::connect(dir.join("d.sock")).unwrap();
    awd.wait_msg("connected", Some("w"), SHORT);
    awd.signal(SIGTERM);
    awd.wait_msg("SIGTERM: shutting down", None, SHORT);
    awd.wait_msg("stopped", None, SHORT);
    assert!(awd.wait_exit(SHORT).success());
    assert!(
        !dir.join("d.sock").exists(),
        "the listener's socket file is removed"
    );
    assert!(
        !dir.join("awd.control.sock").exists(),
        "so is the control socket"
    );
}
