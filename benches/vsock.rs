//! Issue 3's benchmark: awd's vhost-user vsock device against rust-vmm's `vhost-device-vsock`
//! (throughput), and guest-to-awd latency over vsock against virtio-serial.
//!
//! `cargo bench --bench vsock` runs the release `awd` and real QEMU guests (the project's test
//! guest from `scripts/build-guest`; KVM when usable, TCG otherwise), in one run:
//!
//! 1. **Throughput, awd.** The guest runs `awd-agent --interval 0 --count N`: N lines of
//!    `WATCHDOG=1\n`, one blocking `write` each, as fast as the channel accepts them (under
//!    credit flow control the backend paces the sender). The bench polls awd's control socket
//!    (the watchdog's `heartbeats`) and times the first to the last arrival.
//! 2. **Throughput, vhost-device-vsock 0.3.0** (`cargo install --locked vhost-device-vsock`;
//!    found in `$AWD_VHOST_DEVICE_VSOCK`, `PATH`, `$CARGO_INSTALL_ROOT/bin` or
//!    `~/.cargo/bin`, else the row is skipped), forwarding the same stream from the same guest
//!    program to a Unix socket this bench reads, counting lines and timing first to last.
//! 3. **Latency.** Guest and host clocks are not comparable under QEMU, so it is a round trip:
//!    awd (server role, `pulse_interval=20`) pulses; the guest's `awd-agent --reply-pulses`
//!    answers each pulse at once; awd logs each pulse → reply time (`pulse round trip`,
//!    `rtt_us`) per connection. Once over vsock, once over a virtio-serial port whose chardev
//!    connects to awd's Unix socket (`qemu-args/local-guest.args`). The first seconds of each
//!    segment are dropped (pulses queued in QEMU before the guest opened the serial port arrive
//!    as a burst). Reported: median and p99 of the RTT, and RTT/2.
//!
//! The latency phase alternates between the two paths in segments (default 3 each), so both
//! see the same machine load over time.
//!
//! Environment: `AWD_BENCH_LINES` (lines per throughput round, default 200000),
//! `AWD_BENCH_ROUNDS` (rounds per backend, default 3), `AWD_BENCH_LATENCY_S` (seconds of
//! latency measurement per path, default 48), `AWD_BENCH_LATENCY_SEGMENTS` (default 3),
//! `AWD_GUEST_DIR` (the guest image).
//!
//! Results are printed as Markdown table rows for docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The message every throughput line carries.
const MESSAGE: &str = "WATCHDOG=1";
/// Pulse interval of the latency phases.
const PULSE_MS: u64 = 20;
/// Seconds dropped at the start of each latency phase.
const WARMUP_S: f64 = 2.0;
/// Bound on one throughput round.
const ROUND_LIMIT: Duration = Duration::from_secs(900);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A child process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// awd with JSON logs, pulse round trips at debug level, and a control socket.
struct AwdProc {
    pid: u32,
    _child: Killed,
    log: LineStream,
    control: PathBuf,
}

impl AwdProc {
    fn start(run: &Path, args: &[String]) -> AwdProc {
        let control = run.join("control.sock");
        let mut child = Command::new(awd_bin())
            .arg("run")
            .args(args)
            .arg("--control")
            .arg(&control)
            .args([
                "--log-format",
                "json",
                "--log",
                "info,awd::daemon::watchdog=debug",
            ])
            .current_dir(run)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("awd starts");
        let log = LineStream::from_reader(child.stderr.take().unwrap(), Some(run.join("awd.log")));
        let mut a = AwdProc {
            pid: child.id(),
            _child: Killed(child),
            log,
            control,
        };
        a.log
            .wait("awd running", SHORT, |l| l.contains("\"awd running\""));
        a
    }

    /// The `heartbeats` of watchdog `id`, from the control socket.
    fn heartbeats(&self, id: &str) -> u64 {
        heartbeats(&self.control, id)
    }
}

fn heartbeats(control: &Path, id: &str) -> u64 {
    let resp = awd::control::request(control, &awd::control::Request::Status)
        .expect("awd answers on its control socket");
    resp.watchdogs
        .iter()
        .find(|w| w["id"] == id)
        .and_then(|w| w["heartbeats"].as_u64())
        .unwrap_or_else(|| panic!("no watchdog {id} in {:?}", resp.watchdogs))
}

/// CPU time (user + system) a process has used so far, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// First and last arrival of a counted stream, as seen by the host.
#[derive(Debug, Clone, Copy)]
struct Arrivals {
    /// When the first lines were seen, and how many had arrived by then.
    first: Instant,
    at_first: u64,
    /// When all lines had arrived.
    last: Instant,
    total: u64,
    /// CPU seconds the reading side itself used (the bench's reader thread; 0 for awd).
    reader_cpu: f64,
}

impl Arrivals {
    /// Lines per second from the first observation to the last.
    fn rate(&self) -> f64 {
        let secs = self.last.duration_since(self.first).as_secs_f64();
        (self.total - self.at_first) as f64 / secs.max(1e-9)
    }

    fn secs(&self) -> f64 {
        self.last.duration_since(self.first).as_secs_f64()
    }
}

/// Polls awd's counter of watchdog `id` every 10 ms until `lines` more than `base` arrived.
fn poll_awd(
    control: PathBuf,
    id: &'static str,
    base: u64,
    lines: u64,
) -> std::thread::JoinHandle<Arrivals> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + ROUND_LIMIT;
        let mut first: Option<(Instant, u64)> = None;
        loop {
            let n = heartbeats(&control, id) - base;
            let now = Instant::now();
            if n > 0 && first.is_none() {
                first = Some((now, n));
            }
            if n >= lines {
                let (first, at_first) = first.expect("set above");
                return Arrivals {
                    first,
                    at_first,
                    last: now,
                    total: n,
                    reader_cpu: 0.0,
                };
            }
            assert!(now < deadline, "awd heard only {n} of {lines} lines");
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// Accepts one connection on `listener` and counts the lines read from it until `lines`
/// arrived (or the peer closed), timing each read.
fn read_lines(listener: UnixListener, lines: u64) -> std::thread::JoinHandle<Arrivals> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("vhost-device-vsock connects");
        let cpu0 = thread_cpu_secs();
        s.set_read_timeout(Some(ROUND_LIMIT)).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0u64;
        let mut first = None;
        let mut last = Instant::now();
        while n < lines {
            let r = s.read(&mut buf).expect("read from vhost-device-vsock");
            if r == 0 {
                break;
            }
            last = Instant::now();
            n += buf[..r].iter().filter(|&&b| b == b'\n').count() as u64;
            if first.is_none() {
                first = Some((last, n));
            }
        }
        let (first, at_first) = first.expect("some lines arrived");
        assert_eq!(n, lines, "the reader got every line");
        Arrivals {
            first,
            at_first,
            last,
            total: n,
            reader_cpu: thread_cpu_secs() - cpu0,
        }
    })
}

/// A guest on `args`, booted and ready, with an agent that knows the bench's options.
fn boot(run: &Path, name: &str, args: Vec<String>) -> Qemu {
    let mut vm = Qemu::start(
        run,
        QemuOpts {
            // vsock.args brings the shared memfd memory vhost-user needs.
            args,
            ..QemuOpts::new(name)
        },
    );
    vm.wait_ready();
    vm.run(
        "awd-agent --help | grep -q -- --reply-pulses && echo AGENT-OK || echo AGENT-OLD",
        SHORT,
    );
    assert!(
        !vm.console.all().iter().any(|l| l == "AGENT-OLD"),
        "the guest image's awd-agent has no --reply-pulses / --interval 0: rerun scripts/build-guest"
    );
    vm
}

/// The guest's own report of the last flood (`awd-agent: flood: …`), if any.
fn guest_report(vm: &Qemu) -> String {
    vm.console
        .all()
        .into_iter()
        .rev()
        .find_map(|l| {
            l.split_once("awd-agent: flood: ")
                .map(|(_, r)| r.to_string())
        })
        .unwrap_or_else(|| "no report".into())
}

fn flood_cmd(lines: u64) -> String {
    format!(
        "awd-agent --to vsock:2:9009 --interval 0 --count {lines} --message {MESSAGE} --no-socket; echo flood-exit=$?"
    )
}

fn vhost_device_vsock() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AWD_VHOST_DEVICE_VSOCK") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(root) = std::env::var_os("CARGO_INSTALL_ROOT") {
        dirs.push(PathBuf::from(root).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("vhost-device-vsock"))
        .find(|p| p.is_file())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Seconds of the day from a log record's RFC 3339 timestamp (`…T06:50:18.123456Z`).
fn day_secs(v: &Value) -> Option<f64> {
    let ts = v["timestamp"].as_str()?;
    let (_, time) = ts.split_once('T')?;
    let time = time.trim_end_matches('Z');
    let mut parts = time.splitn(3, ':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + sec)
}

/// Round trips (µs) logged for watchdog `id` in `records`, without the first `WARMUP_S`.
fn rtts(records: &[Value], id: &str) -> Vec<f64> {
    let mine: Vec<(f64, f64)> = records
        .iter()
        .filter(|v| v["message"] == "pulse round trip" && v["watchdog"] == id)
        .filter_map(|v| Some((day_secs(v)?, v["rtt_us"].as_f64()?)))
        .collect();
    let Some(&(t0, _)) = mine.first() else {
        return Vec::new();
    };
    let mut out: Vec<f64> = mine
        .into_iter()
        .filter(|&(t, _)| {
            let t = if t < t0 { t + 86_400.0 } else { t };
            t - t0 >= WARMUP_S
        })
        .map(|(_, us)| us)
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

struct Tput {
    label: String,
    rates: Vec<f64>,
    secs: Vec<f64>,
    /// Host CPU of the backend (and reader) per round, as a share of one core.
    cpu: Vec<f64>,
    guest: Vec<String>,
}

impl Tput {
    fn row(&self, lines: u64) -> String {
        let mut sorted = self.rates.clone();
        sorted.sort_by(f64::total_cmp);
        format!(
            "| {} | {} × {lines} lines | {:.0} /s | {:.0}–{:.0} /s | {:.2} s | {:.0} % | {} |",
            self.label,
            self.rates.len(),
            median(&self.rates),
            sorted[0],
            sorted[sorted.len() - 1],
            median(&self.secs),
            median(&self.cpu) * 100.0,
            self.guest.join("; ")
        )
    }
}

fn main() {
    let lines = env_u64("AWD_BENCH_LINES", 200_000);
    let rounds = env_u64("AWD_BENCH_ROUNDS", 3).max(1);
    let latency_s = env_u64("AWD_BENCH_LATENCY_S", 48).max(5);
    let g = guest_dir(); // fails with a pointer to scripts/build-guest when missing
    let accel = if kvm_usable() { "KVM" } else { "TCG" };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {cores} cores, {accel}, guest image {}, load average at start {}",
        g.display(),
        loadavg()
    );
    let dir = tempfile::Builder::new()
        .prefix("awd-bench-vsock-")
        .tempdir()
        .expect("tempdir");
    let run = dir.path();
    let awd_args = |run: &Path| {
        let r = run.display();
        s(&[
            "--chardev",
            &format!("vhost-user-vsock,id=tput,path={r}/vm1-vsock.sock,guest-cid=3,port=9009"),
            "--chardev",
            &format!("vhost-user-vsock,id=latv,path={r}/vm1-vsock.sock,guest-cid=3,port=9010"),
            "--chardev",
            &format!("socket,id=lats,path={r}/vm1-hb.sock,server=on,wait=off"),
            "--object",
            "advanced-watchdog,id=tput,awd_node=tput,timeout=600000,grace=600000",
            "--object",
            &format!(
                "advanced-watchdog,id=lat-vsock,awd_node=latv,server=on,pulse_interval={PULSE_MS},timeout=600000,grace=600000"
            ),
            "--object",
            &format!(
                "advanced-watchdog,id=lat-serial,awd_node=lats,server=on,pulse_interval={PULSE_MS},timeout=600000,grace=600000"
            ),
        ])
    };
    let awd = AwdProc::start(run, &awd_args(run));
    let vsock_args = without_monitor(qemu_args_file("vsock.args", run));

    // 1. Throughput into awd's device.
    let mut awd_tput = Tput {
        label: "awd vsock device → watchdog".into(),
        rates: Vec::new(),
        secs: Vec::new(),
        cpu: Vec::new(),
        guest: Vec::new(),
    };
    {
        let mut vm = boot(run, "tput-awd", vsock_args.clone());
        for round in 0..rounds {
            let base = awd.heartbeats("tput");
            let (cpu0, t0) = (cpu_secs(awd.pid), Instant::now());
            let poller = poll_awd(awd.control.clone(), "tput", base, lines);
            vm.run(&flood_cmd(lines), ROUND_LIMIT);
            let a = poller.join().expect("poller");
            let cpu = (cpu_secs(awd.pid) - cpu0) / t0.elapsed().as_secs_f64();
            let report = guest_report(&vm);
            println!(
                "awd round {round}: {} lines in {:.3} s = {:.0} lines/s, awd CPU {:.0} % (guest: {report})",
                a.total - a.at_first,
                a.secs(),
                a.rate(),
                cpu * 100.0
            );
            awd_tput.cpu.push(cpu);
            awd_tput.rates.push(a.rate());
            awd_tput.secs.push(a.secs());
            awd_tput.guest.push(report);
        }
        vm.kill();
    }

    // 2. The same load through vhost-device-vsock to a Unix socket reader.
    let mut ref_tput = None;
    match vhost_device_vsock() {
        None => println!(
            "vhost-device-vsock not found (PATH, $CARGO_INSTALL_ROOT/bin, ~/.cargo/bin, \
             $AWD_VHOST_DEVICE_VSOCK): install it with `cargo install --locked vhost-device-vsock \
             --version 0.3.0` to get the reference row; skipped"
        ),
        Some(bin) => {
            let rdir = tempfile::Builder::new()
                .prefix("awd-bench-vdv-")
                .tempdir()
                .expect("tempdir");
            let r = rdir.path();
            let uds = r.join("vm1.vsock");
            let child = Command::new(&bin)
                .args(["--guest-cid", "3", "--socket"])
                .arg(r.join("vm1-vsock.sock"))
                .arg("--uds-path")
                .arg(&uds)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::File::create(r.join("vhost-device-vsock.log")).expect("log file"),
                ))
                .spawn()
                .expect("vhost-device-vsock starts");
            let vdv_pid = child.id();
            let _vdv = Killed(child);
            let start = Instant::now();
            while !r.join("vm1-vsock.sock").exists() {
                assert!(
                    start.elapsed() < SHORT,
                    "vhost-device-vsock did not create its socket"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut t = Tput {
                label: "vhost-device-vsock 0.3.0 → Unix socket reader".into(),
                rates: Vec::new(),
                secs: Vec::new(),
                cpu: Vec::new(),
                guest: Vec::new(),
            };
            let mut vm = boot(
                r,
                "tput-vdv",
                without_monitor(qemu_args_file("vsock.args", r)),
            );
            let port_path = PathBuf::from(format!("{}_9009", uds.display()));
            for round in 0..rounds {
                let _ = std::fs::remove_file(&port_path);
                let listener = UnixListener::bind(&port_path).expect("bind the port listener");
                let (cpu0, t0) = (cpu_secs(vdv_pid), Instant::now());
                let reader = read_lines(listener, lines);
                vm.run(&flood_cmd(lines), ROUND_LIMIT);
                let a = reader.join().expect("reader");
                let wall = t0.elapsed().as_secs_f64();
                let cpu = (cpu_secs(vdv_pid) - cpu0) / wall;
                let report = guest_report(&vm);
                println!(
                    "vhost-device-vsock round {round}: {} lines in {:.3} s = {:.0} lines/s, \
                     vhost-device-vsock CPU {:.0} % + reader {:.0} % (guest: {report})",
                    a.total - a.at_first,
                    a.secs(),
                    a.rate(),
                    cpu * 100.0,
                    a.reader_cpu / wall * 100.0
                );
                t.cpu.push(cpu + a.reader_cpu / wall);
                t.rates.push(a.rate());
                t.secs.push(a.secs());
                t.guest.push(report);
            }
            vm.kill();
            ref_tput = Some(t);
        }
    }

    // 3. Latency: pulse → reply over vsock, then over virtio-serial, in one guest.
    let mut args = vsock_args.clone();
    args.extend(without_monitor(qemu_args_file("local-guest.args", run)));
    let mut vm = boot(run, "latency", args);
    // Alternating segments, so both paths see the same machine load over time.
    let segments = env_u64("AWD_BENCH_LATENCY_SEGMENTS", 3).max(1);
    let count = latency_s.div_ceil(segments).max(4); // heartbeats at 1 s: seconds per segment
    let paths = [
        ("lat-vsock", "vsock:2:9010"),
        ("lat-serial", "port:org.awd.heartbeat.0"),
    ];
    let mut lat: Vec<(&str, Vec<f64>)> = paths.iter().map(|(_, t)| (*t, Vec::new())).collect();
    for seg in 0..segments {
        for (k, (id, target)) in paths.iter().enumerate() {
            let from = awd.log.all().len();
            vm.run(
                &format!(
                    "awd-agent --to {target} --interval 1000 --count {count} --reply-pulses --no-socket; echo lat-exit=$?"
                ),
                Duration::from_secs(count * 4 + 120),
            );
            std::thread::sleep(Duration::from_millis(200)); // the last log lines
            let records: Vec<Value> = awd.log.all()[from..]
                .iter()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let v = rtts(&records, id);
            assert!(
                v.len() >= 50,
                "{id}: only {} round trips measured; see {}",
                v.len(),
                run.join("awd.log").display()
            );
            println!(
                "{id} segment {seg}: {} round trips (first {WARMUP_S} s dropped), median {:.0} µs, p99 {:.0} µs, max {:.0} µs",
                v.len(),
                pct(&v, 0.5),
                pct(&v, 0.99),
                v[v.len() - 1]
            );
            lat[k].1.extend(v);
        }
    }
    for (_, v) in &mut lat {
        v.sort_by(f64::total_cmp);
    }
    vm.kill();
    drop(awd);
    let end_load = loadavg();

    println!();
    println!("load average at end: {end_load}");
    println!();
    println!(
        "| backend | rounds × load | heartbeats/s (median) | range | first → last arrival (median) | host CPU (median) | guest's own timing |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!("{}", awd_tput.row(lines));
    if let Some(t) = &ref_tput {
        println!("{}", t.row(lines));
    }
    println!();
    println!(
        "| path | round trips | RTT median | RTT p99 | one way (RTT/2) median | one way (RTT/2) p99 |"
    );
    println!("|---|---|---|---|---|---|");
    for (target, v) in &lat {
        let path = if target.starts_with("vsock") {
            "vsock (awd's device)"
        } else {
            "virtio-serial → QEMU chardev → awd Unix socket"
        };
        let (m, p) = (pct(v, 0.5), pct(v, 0.99));
        println!(
            "| {path} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs |",
            v.len(),
            m,
            p,
            m / 2.0,
            p / 2.0
        );
    }
}
