//! awd's footprint with many channels: RSS and CPU with 1,000 TCP heartbeat channels at 10 Hz.
//!
//! `cargo bench --bench channels` starts the release `awd` with 1,000 watchdogs, each listening
//! on its own TCP port, connects one client per watchdog and sends `WATCHDOG=1` on each every
//! 100 ms (10,000 heartbeats/s in all) for a warm-up and a measured period. CPU is awd's
//! utime+stime over the measured period from /proc/PID/stat; memory is VmRSS and VmHWM from
//! /proc/PID/status. It also checks that no watchdog expired.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHANNELS: usize = 1000;
const PERIOD: Duration = Duration::from_millis(100);
const WARMUP: Duration = Duration::from_secs(5);
const MEASURE: Duration = Duration::from_secs(20);

fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    raise_nofile();
    let dir = tempfile::tempdir().expect("tempdir");
    let ports: Vec<u16> = {
        let ls: Vec<TcpListener> = (0..CHANNELS)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("port"))
            .collect();
        ls.iter()
            .map(|l| l.local_addr().expect("addr").port())
            .collect()
    };
    let mut toml = String::new();
    for (i, port) in ports.iter().enumerate() {
        toml.push_str(&format!(
            "[chardev.hb{i}]\nhost = \"127.0.0.1\"\nport = {port}\nserver = true\n\
             [watchdog.w{i}]\nawd_node = \"hb{i}\"\ntimeout = 2000\ngrace = 30000\n"
        ));
    }
    let cfg = dir.path().join("awd.toml");
    std::fs::write(&cfg, toml).expect("config");
    let mut awd = Command::new(env!("CARGO_BIN_EXE_awd"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("AWD_LOG", "off")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start awd");
    let pid = awd.id();
    let start = Instant::now();
    let mut conns: Vec<TcpStream> = ports
        .iter()
        .map(|p| {
            loop {
                match TcpStream::connect(("127.0.0.1", *p)) {
                    Ok(s) => break s,
                    Err(_) if start.elapsed() < Duration::from_secs(30) => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => panic!("connect {p}: {e}"),
                }
            }
        })
        .collect();
    for c in &conns {
        c.set_nodelay(true).expect("nodelay");
    }
    let beat = |conns: &mut Vec<TcpStream>, for_: Duration| {
        let end = Instant::now() + for_;
        let mut next = Instant::now();
        while Instant::now() < end {
            // Spread the 1,000 writes over the period.
            for chunk in conns.chunks_mut(CHANNELS / 10) {
                for c in chunk.iter_mut() {
                    c.write_all(b"WATCHDOG=1\n").expect("heartbeat");
                }
                next += PERIOD / 10;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        }
    };
    beat(&mut conns, WARMUP);
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    beat(&mut conns, MEASURE);
    let (t1, c1) = (Instant::now(), cpu_ticks(pid));
    let hz = 100.0; // USER_HZ on Linux
    let cpu = (c1 - c0) as f64 / hz / (t1 - t0).as_secs_f64() * 100.0;
    let rss = status_kb(pid, "VmRSS:");
    let hwm = status_kb(pid, "VmHWM:");
    let _ = awd.kill();
    let out = awd.wait_with_output().expect("awd output");
    let log = String::from_utf8_lossy(&out.stderr);
    let expired = log.matches("watchdog expired").count();
    println!(
        "| {CHANNELS} TCP channels at 10 Hz ({} heartbeats/s) | CPU {cpu:.1} % of one core | RSS {:.1} MiB (peak {:.1} MiB) | expiries {expired} |",
        CHANNELS * 10,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    assert_eq!(
        expired, 0,
        "no watchdog may expire while its heartbeats flow"
    );
}
