//! A flooding peer costs only its own watchdog (issue 8, item 4), end to end against the real
//! awd binary: three channels flooded at once — `STATUS=` lines, `WATCHDOG_USEC=` lines and
//! binary junk, each as fast as a blocking writer can go — while a neighbour heartbeats at
//! 10 Hz, `awd status` is polled on the control socket and awd pings a systemd notify socket
//! with `WatchdogSec=2s`. Measured, and held to stated bounds: the neighbour never fires, the
//! status round trip's p99, the longest gap between `WATCHDOG=1` pings, and the log's growth.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long the floods run.
const FLOOD: Duration = Duration::from_secs(8);
/// systemd's `WatchdogSec` for this awd: pings every second.
const WATCHDOG_SEC: Duration = Duration::from_secs(2);
/// The slack allowed on a ping gap beyond `WatchdogSec/2` (a loaded 2-core machine).
const PING_MARGIN: Duration = Duration::from_millis(500);
/// The bound on `awd status` round trips, at the 99th percentile.
const STATUS_P99: Duration = Duration::from_millis(100);
/// The bound on log growth while three channels flood.
const LOG_BYTES_PER_SEC: f64 = 20_000.0;

/// One `status` request on the control socket, timed.
fn status_round_trip(control: &Path) -> Duration {
    let t = Instant::now();
    let mut c = UnixStream::connect(control).unwrap();
    c.set_read_timeout(Some(SHORT)).unwrap();
    c.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    t.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn three_floods_cost_only_their_own_watchdogs() {
    let d = scratch("flood");
    let dir = d.path();
    let notify = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
    let notify_path = dir.join("notify.sock").display().to_string();
    let mut args = Vec::new();
    for (id, timeout) in [
        ("status", 60_000),
        ("usec", 60_000),
        ("junk", 60_000),
        ("neighbour", 1500),
    ] {
        args.extend([
            "--chardev".to_owned(),
            format!("socket,id={id},path={}/{id}.sock,server=on", dir.display()),
            "--object".to_owned(),
            format!("advanced-watchdog,id={id},awd_node={id},timeout={timeout}"),
        ]);
    }
    let usec = WATCHDOG_SEC.as_micros().to_string();
    let mut awd = Awd::run_env(
        dir,
        "awd",
        &args,
        &[("NOTIFY_SOCKET", &notify_path), ("WATCHDOG_USEC", &usec)],
    );
    awd.wait_msg("awd running", None, SHORT);

    let stop = Arc::new(AtomicBool::new(false));
    // The neighbour: a heartbeat every 100 ms, its own period.
    let neighbour = {
        let mut c = UnixStream::connect(dir.join("neighbour.sock")).unwrap();
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                c.write_all(b"WATCHDOG=1\n").unwrap();
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let payloads: [(&str, Vec<u8>); 3] = [
        ("status", b"STATUS=flooding the log\n".repeat(4096)),
        ("usec", b"WATCHDOG_USEC=30000000\n".repeat(4096)),
        (
            "junk",
            (0..96 * 1024u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
    ];
    let log_before = std::fs::metadata(dir.join("awd.log")).unwrap().len();
    let t0 = Instant::now();
    let flooders: Vec<_> = payloads
        .into_iter()
        .map(|(id, payload)| {
            let mut c = UnixStream::connect(dir.join(format!("{id}.sock"))).unwrap();
            c.set_write_timeout(Some(SHORT)).unwrap();
            let stop = stop.clone();
            thread::spawn(move || {
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    c.write_all(&payload).expect("awd keeps reading the flood");
                    sent += payload.len() as u64;
                }
                sent
            })
        })
        .collect();

    // While the floods run: poll status every 50 ms, and read the pings.
    notify.set_nonblocking(true).unwrap();
    let mut latencies = Vec::new();
    let mut pings = vec![];
    let mut buf = [0u8; 4096];
    while t0.elapsed() < FLOOD {
        latencies.push(status_round_trip(&awd.control));
        while let Ok(n) = notify.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "WATCHDOG=1")
            {
                pings.push(Instant::now());
            }
        }
        // The polling period of this test's status client.
        thread::sleep(Duration::from_millis(50));
    }
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let sent: Vec<u64> = flooders.into_iter().map(|t| t.join().unwrap()).collect();
    neighbour.join().unwrap();
    let log_bytes = std::fs::metadata(dir.join("awd.log")).unwrap().len() - log_before;

    latencies.sort();
    let p50 = percentile(&latencies, 0.5);
    let p99 = percentile(&latencies, 0.99);
    let mut gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    // Also the stretches before the first ping and after the last one.
    gaps.push(pings.first().map_or(elapsed, |p| *p - t0));
    gaps.push(pings.last().map_or(elapsed, |p| t0 + elapsed - *p));
    let max_gap = gaps.iter().max().copied().unwrap_or_default();
    let log_rate = log_bytes as f64 / elapsed.as_secs_f64();
    let st = awd.status();
    eprintln!(
        "flood: {:.1} MB/s written by each flooder ({sent:?} bytes in {elapsed:?}); \
         status round trips: {} polls, p50 {p50:?}, p99 {p99:?}, max {:?}; \
         {} pings, longest gap {max_gap:?}; log {log_bytes} bytes = {log_rate:.0} B/s; \
         neighbour heartbeats {}",
        sent.iter().sum::<u64>() as f64 / 3.0 / elapsed.as_secs_f64() / 1e6,
        latencies.len(),
        latencies.last().unwrap(),
        pings.len(),
        st["neighbour"]["heartbeats"],
    );
    assert_eq!(
        st["neighbour"]["expiries"], 0,
        "the neighbour never fired: {}",
        st["neighbour"]
    );
    assert!(
        awd.records(|v| v["message"] == "watchdog expired")
            .is_empty(),
        "nobody fired"
    );
    assert!(p99 <= STATUS_P99, "status p99 {p99:?} > {STATUS_P99:?}");
    assert!(
        max_gap <= WATCHDOG_SEC / 2 + PING_MARGIN,
        "a ping gap of {max_gap:?} (WatchdogSec {WATCHDOG_SEC:?})"
    );
    assert!(
        log_rate <= LOG_BYTES_PER_SEC,
        "the log grew {log_rate:.0} B/s (bound {LOG_BYTES_PER_SEC} B/s)"
    );
    for id in ["status", "usec", "junk"] {
        assert!(
            st[id]["heartbeats"].as_u64().unwrap() > 0,
            "{id}: the flood was read: {}",
            st[id]
        );
    }
}
