//! The faults the soak injects, how each is drawn from the seed, and what each says about
//! every subject: a fire that must come (and by when), a window where a fire may come, or —
//! the default everywhere else — no fire at all.

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::RngExt;
use proptest::test_runner::TestRng;
use serde_json::{Value, json};

use crate::common::netns::{SERVER_ADDR, in_netns};
use crate::common::*;
use crate::verdict::{ExpectKind, Expectation};
use crate::world::*;

/// One fault, with the parameters drawn for it.
#[derive(Clone, Debug)]
pub enum Fault {
    /// QMP `stop` for longer than the timeout, then `cont`. No fire: a paused VM is not dead.
    Pause { subject: Subject, hold_ms: u64 },
    /// `reboot -f` in the guest. No fire: the VM started over and gets its grace.
    Reboot { subject: Subject },
    /// SIGKILL of the guest's QEMU, then a new QEMU on the same sockets. No fire reaches the
    /// new QEMU: it is a new VM, in its grace.
    KillQemu { subject: Subject, dead_ms: u64 },
    /// Live migration of the virtio-serial guest to the other host (whose awd starts
    /// watching an incoming VM), then `quit` on the source, as libvirt does. No fire on either.
    Migrate,
    /// A changed configuration (a watched watchdog's grace, a spare watchdog added or
    /// removed) and SIGHUP. No fire.
    Reload { host: Host },
    /// awd B ended with SIGTERM and started again. No fire: its peers reconnect in time.
    RestartAwd,
    /// The guest's QEMU frozen with SIGSTOP for longer than the timeout plus awd's 5 s QMP
    /// answer timeout, then SIGCONT. A fire may come (the guest was silent; the command sent
    /// to a frozen QEMU has an unknown fate): allowed, not required.
    Freeze { subject: Subject, hold_ms: u64 },
    /// The veth between the hosts down, then up. Longer than the timeout: both sides of the
    /// pair must fire (each is blind to the other: the split brain COLO fears, made visible).
    /// Shorter: neither may.
    Partition { hold_ms: u64 },
    /// Garbage and reconnects as fast as they go on the remote service's PSK port, with the
    /// real agent alive (no fire) or killed as the flood starts (the flood keeps nothing
    /// alive: a fire is due).
    Flood { hold_ms: u64, kill_peer: bool },
    /// 200 idle TCP connections on a server port, held. No fire: the real peer is served.
    IdleSockets { on_pair: bool, hold_ms: u64 },
    /// The intended failure: the guest agent killed. A fire is due.
    StopAgent { subject: Subject },
    /// The intended failure: the remote service's agent killed, or awd B (the pair's
    /// secondary) killed with SIGKILL. A fire is due on the survivor.
    KillPeer { pair: bool },
}

/// The kinds, in the order of the first round (then shuffled by the seed).
const KINDS: usize = 12;

fn guest(rng: &mut TestRng) -> Subject {
    if rng.random_bool(0.5) {
        Subject::Serial
    } else {
        Subject::Vsock
    }
}

impl Fault {
    /// Fault kind `k` (0..KINDS) with parameters drawn from `rng`.
    fn of_kind(k: usize, rng: &mut TestRng) -> Fault {
        match k {
            0 => Fault::Pause {
                subject: guest(rng),
                hold_ms: rng.random_range(3000..6000),
            },
            1 => Fault::Reboot {
                subject: guest(rng),
            },
            2 => Fault::KillQemu {
                subject: guest(rng),
                dead_ms: rng.random_range(500..4000),
            },
            3 => Fault::Migrate,
            4 => Fault::Reload {
                host: if rng.random_bool(0.5) {
                    Host::A
                } else {
                    Host::B
                },
            },
            5 => Fault::RestartAwd,
            6 => Fault::Freeze {
                subject: guest(rng),
                hold_ms: rng.random_range(8000..10000),
            },
            7 => Fault::Partition {
                hold_ms: if rng.random_bool(0.5) {
                    rng.random_range(300..900)
                } else {
                    rng.random_range(6000..9000)
                },
            },
            8 => Fault::Flood {
                hold_ms: rng.random_range(5000..7000),
                kill_peer: rng.random_bool(0.5),
            },
            9 => Fault::IdleSockets {
                on_pair: rng.random_bool(0.5),
                hold_ms: rng.random_range(4000..7000),
            },
            10 => Fault::StopAgent {
                subject: guest(rng),
            },
            11 => Fault::KillPeer {
                pair: rng.random_bool(0.5),
            },
            _ => unreachable!("{k} is not a fault kind"),
        }
    }

    /// The schedule: every kind once in a seed-shuffled order, then kinds drawn at random.
    pub fn schedule(rng: &mut TestRng) -> impl FnMut(usize) -> Fault + '_ {
        let mut first: Vec<usize> = (0..KINDS).collect();
        for i in (1..KINDS).rev() {
            first.swap(i, rng.random_range(0..=i));
        }
        move |n| {
            let k = if n < KINDS {
                first[n]
            } else {
                rng.random_range(0..KINDS)
            };
            Fault::of_kind(k, rng)
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Pause { .. } => "pause",
            Fault::Reboot { .. } => "reboot",
            Fault::KillQemu { .. } => "kill-qemu",
            Fault::Migrate => "migrate",
            Fault::Reload { .. } => "reload",
            Fault::RestartAwd => "restart-awd",
            Fault::Freeze { .. } => "freeze-qemu",
            Fault::Partition { .. } => "partition",
            Fault::Flood { .. } => "flood",
            Fault::IdleSockets { .. } => "idle-sockets",
            Fault::StopAgent { .. } => "stop-agent",
            Fault::KillPeer { .. } => "kill-peer",
        }
    }

    /// The parameters, for the report and the replay.
    pub fn params(&self) -> Value {
        match self {
            Fault::Pause { subject, hold_ms } | Fault::Freeze { subject, hold_ms } => {
                json!({"subject": subject.name(), "hold_ms": hold_ms})
            }
            Fault::Reboot { subject } | Fault::StopAgent { subject } => {
                json!({"subject": subject.name()})
            }
            Fault::KillQemu { subject, dead_ms } => {
                json!({"subject": subject.name(), "dead_ms": dead_ms})
            }
            Fault::Migrate | Fault::RestartAwd => json!({}),
            Fault::Reload { host } => json!({"host": format!("{host:?}")}),
            Fault::Partition { hold_ms } => json!({"hold_ms": hold_ms}),
            Fault::Flood { hold_ms, kill_peer } => {
                json!({"hold_ms": hold_ms, "kill_peer": kill_peer})
            }
            Fault::IdleSockets { on_pair, hold_ms } => {
                json!({"port": if *on_pair { "pair" } else { "remote" }, "hold_ms": hold_ms})
            }
            Fault::KillPeer { pair } => {
                json!({"peer": if *pair { "awd-b" } else { "remote-agent" }})
            }
        }
    }

    /// Injects the fault and undoes it; returns what it expects of the subjects. `index` is
    /// the fault's row in the report.
    pub fn inject(&self, w: &mut World, index: usize) -> Vec<Expectation> {
        let mut expect = Vec::new();
        match *self {
            Fault::Pause { subject, hold_ms } => {
                let g = w.guest(subject);
                ok(qmp(&g.test_qmp, "stop"));
                hold(hold_ms);
                ok(qmp(&g.test_qmp, "cont"));
            }
            Fault::Reboot { subject } => {
                let q = &mut w.guest(subject).qemu;
                q.run("(sleep 0.2; reboot -f) & true", SHORT);
                agent_back(q);
            }
            Fault::KillQemu { subject, dead_ms } => {
                w.guest(subject).qemu.kill();
                hold(dead_ms);
                let new = match subject {
                    Subject::Serial => {
                        let h = w.serial.host;
                        w.start_serial(h, None)
                    }
                    _ => w.start_vsock(),
                };
                w.replace_guest(subject, new);
                agent_back(&mut w.guest(subject).qemu);
            }
            Fault::Migrate => migrate(w),
            Fault::Reload { host } => {
                w.toggle_config(host);
                w.awd_mut(host).log.skip_pending();
                w.awd(host).signal(SIGHUP);
                w.awd_mut(host).wait("the reload", SHORT, |v| {
                    v["message"].as_str().is_some_and(|m| {
                        m.starts_with("reloaded") || m.starts_with("reload refused")
                    })
                });
            }
            Fault::RestartAwd => {
                w.awd_b.signal(SIGTERM);
                w.awd_b.wait_exit(SHORT);
                w.restart_awd(Host::B);
                w.awd_b.wait_msg("awd running", None, SHORT);
            }
            Fault::Freeze { subject, hold_ms } => {
                let from = w.now();
                let pid = w.guest(subject).qemu.pid() as i32;
                signal(pid, libc::SIGSTOP);
                hold(hold_ms);
                signal(pid, libc::SIGCONT);
                expect.push(Expectation {
                    fault: index,
                    subject: subject.name().into(),
                    kind: ExpectKind::Allow {
                        from,
                        // After SIGCONT QEMU may yet run what it was sent while frozen.
                        to: w.now() + secs(subject.timeout_ms() + BOUND_MS) + 10.0,
                    },
                });
            }
            Fault::Partition { hold_ms } => {
                let start = w.now();
                w.layout.net.cut();
                hold(hold_ms);
                w.layout.net.heal();
                if hold_ms > PAIR_TIMEOUT_MS + BOUND_MS {
                    for s in [Subject::PairA, Subject::PairB] {
                        expect.push(fire_due(index, s, start));
                    }
                }
            }
            Fault::Flood { hold_ms, kill_peer } => {
                let start = w.now();
                if kill_peer {
                    w.kill_remote_agent();
                    expect.push(fire_due(index, Subject::Remote, start));
                }
                let conns = flood(w, Duration::from_millis(hold_ms));
                eprintln!("soak: flood made {conns} connections");
                if kill_peer {
                    wait_fire(w, Subject::Remote, start);
                    w.start_remote_agent();
                }
            }
            Fault::IdleSockets { on_pair, hold_ms } => {
                let (host, port) = if on_pair {
                    (SERVER_ADDR, w.layout.pair_port)
                } else {
                    ("127.0.0.1", w.layout.remote_port)
                };
                let ns = w.layout.net.server.clone();
                let held: Vec<TcpStream> = in_netns(&ns, || {
                    (0..200)
                        .filter_map(|_| TcpStream::connect((host, port)).ok())
                        .collect()
                });
                eprintln!("soak: holding {} idle sockets", held.len());
                hold(hold_ms);
                drop(held);
            }
            Fault::StopAgent { subject } => {
                let start = w.now();
                w.guest(subject).qemu.run("killall awd-agent", SHORT);
                expect.push(fire_due(index, subject, start));
                wait_fire(w, subject, start);
                // The fire reset the guest: its agent comes back with the boot.
                agent_back(&mut w.guest(subject).qemu);
            }
            Fault::KillPeer { pair } => {
                let start = w.now();
                if pair {
                    w.awd_b.signal(SIGKILL);
                    w.awd_b.wait_exit(SHORT);
                    expect.push(fire_due(index, Subject::PairA, start));
                    wait_fire(w, Subject::PairA, start);
                    w.restart_awd(Host::B);
                    w.awd_b.wait_msg("awd running", None, SHORT);
                } else {
                    w.kill_remote_agent();
                    expect.push(fire_due(index, Subject::Remote, start));
                    wait_fire(w, Subject::Remote, start);
                    w.start_remote_agent();
                }
            }
        }
        expect
    }
}

/// Waits (bounded) for the guest agent to connect again after a boot (the console lines
/// before the fault are skipped), so the next fault does not land on a booting guest. A guest
/// that does not come back is not a harness failure: the health check after the fault reports
/// it, and the verdict judges what fired.
fn agent_back(q: &mut Qemu) {
    q.console.skip_pending();
    let back = q
        .console
        .try_wait(BOOT, |l| l.contains("AWD-GUEST: ready"))
        .and_then(|_| {
            q.console
                .try_wait(BOOT, |l| l.contains("awd-agent: connected"))
        });
    if back.is_err() {
        eprintln!(
            "soak: {}: the agent did not come back after the boot",
            q.name
        );
    }
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Holds a fault for its drawn duration (the fault itself, not a wait for an event).
fn hold(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a child of ours that has not been reaped.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn ok(reply: Value) {
    assert!(reply.get("return").is_some(), "QMP: {reply}");
}

/// A fire due on `subject` after silence that began at `start`: its last input was at most
/// one interval (plus scheduling slack) before, so the expiry lies in
/// `[start + timeout - interval - 0.25 s, start + timeout + bound]`.
fn fire_due(index: usize, subject: Subject, start: f64) -> Expectation {
    let timeout = secs(subject.timeout_ms());
    Expectation {
        fault: index,
        subject: subject.name().into(),
        kind: ExpectKind::Fire {
            earliest: start + timeout - secs(subject.interval_ms()) - 0.25,
            deadline: start + timeout + secs(BOUND_MS),
        },
    }
}

/// Waits (bounded: the deadline plus 10 s) for a fire of `subject` after `start`, so the next
/// fault does not overlap it; the verdict judges it.
fn wait_fire(w: &World, subject: Subject, start: f64) {
    let until = Instant::now() + Duration::from_millis(subject.timeout_ms() + BOUND_MS + 10_000);
    while Instant::now() < until {
        if w.fires()
            .iter()
            .any(|f| f.subject == subject.name() && f.at >= start)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("soak: no fire of {} after {start:.1} s", subject.name());
}

/// Live-migrates the serial guest to the other host and ends the source QEMU.
fn migrate(w: &mut World) {
    let from = w.serial.host;
    let to = from.other();
    let sock = w.dir_of(to).join("mig.sock");
    let _ = std::fs::remove_file(&sock);
    let uri = format!("unix:{}", sock.display());
    let dest = w.start_serial(to, Some(&uri));
    wait_path(&sock);
    let src = w.serial.test_qmp.clone();
    ok(qmp_json(
        &src,
        &json!({"execute": "migrate", "arguments": {"uri": uri}}),
    ));
    let deadline = Instant::now() + BOOT;
    loop {
        let st = qmp(&src, "query-migrate");
        match st["return"]["status"].as_str() {
            Some("completed") => break,
            Some("failed" | "cancelled") => panic!("migration: {st}"),
            _ if Instant::now() > deadline => panic!("migration did not complete: {st}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    quit(&src);
    w.serial.qemu.wait_exit(SHORT);
    w.replace_guest(Subject::Serial, dest);
}

/// `quit` on a QMP socket, as libvirt ends a migrated source. QEMU may close the connection
/// before its reply is read: its exit is the answer awaited.
fn quit(path: &std::path::Path) {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(path).expect("source QMP");
    s.set_read_timeout(Some(SHORT)).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    let _ = r.read_line(&mut line);
    let mut w = s;
    let _ = w.write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"quit\"}\n");
    // Read until QEMU closes: a request still queued when the client hangs up is dropped.
    loop {
        line.clear();
        if !matches!(r.read_line(&mut line), Ok(n) if n > 0) {
            break;
        }
    }
}

/// Floods the remote service's port from host A's namespace: connections that write junk as
/// fast as they can and reconnect when closed. Returns the connections made.
fn flood(w: &World, hold: Duration) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let port = w.layout.remote_port;
    let ns = w.layout.net.server.clone();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (stop, made, ns) = (stop.clone(), made.clone(), ns.clone());
            std::thread::spawn(move || {
                use std::io::Write;
                let junk: Vec<u8> = (0..16384u32).map(|b| (b * 31 + i) as u8).collect();
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = in_netns(&ns, || TcpStream::connect(("127.0.0.1", port)))
                    else {
                        continue;
                    };
                    made.fetch_add(1, Ordering::Relaxed);
                    // A peer that stops reading must not hold the flood past its end.
                    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                    while !stop.load(Ordering::Relaxed) {
                        if s.write(&junk).is_err() {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(hold);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    made.load(Ordering::Relaxed)
}
