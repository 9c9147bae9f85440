//! The soak's world: two "hosts" on one machine, each an awd in its own network namespace
//! joined by a veth pair, and the real QEMUs they watch.
//!
//! - host A (`a/`, namespace `server`): awd A watches the virtio-serial guest while it lives
//!   on A, the vsock guest (awd A is its vhost-user-vsock device), the primary side of a
//!   COLO-style pulse pair (TCP server with a PSK on the veth) and a remote service (an
//!   `awd-agent` on A's loopback speaking the PSK framing).
//! - host B (`b/`, namespace `client`): awd B watches the virtio-serial guest while it lives on
//!   B, and the pair's secondary side (TCP client, reconnecting).
//!
//! Every action goes to a real QEMU's QMP socket, and that QEMU's `-trace handle_qmp_command`
//! is the witness of a fire: the guests get `system_reset` (they reboot in place, the agent
//! comes back), the pair and the remote service get COLO's commands on QEMUs without a guest
//! (`-machine none`), which answer them with an error — an answer all the same.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::netns::{Netns, SERVER_ADDR};
use crate::common::*;

/// The guests' watchdog timeout; their agents beat every [`AGENT_INTERVAL_MS`].
pub const GUEST_TIMEOUT_MS: u64 = 2000;
/// The first deadline after a start or a start-over: a TCG boot on a loaded 2-core machine.
pub const GUEST_GRACE_MS: u64 = 30_000;
/// The pulse pair's timeout and pulse interval.
pub const PAIR_TIMEOUT_MS: u64 = 3000;
pub const PULSE_MS: u64 = 300;
/// The remote service's timeout.
pub const REMOTE_TIMEOUT_MS: u64 = 2000;
/// Every agent's heartbeat interval.
pub const AGENT_INTERVAL_MS: u64 = 200;
/// How long after silence + timeout a fire may reach QEMU and still be on time.
pub const BOUND_MS: u64 = 1500;

/// The two hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    A,
    B,
}

impl Host {
    pub fn other(self) -> Host {
        match self {
            Host::A => Host::B,
            Host::B => Host::A,
        }
    }
}

/// A watched subject: what the verdict is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Serial,
    Vsock,
    PairA,
    PairB,
    Remote,
}

impl Subject {
    pub const ALL: [Subject; 5] = [
        Subject::Serial,
        Subject::Vsock,
        Subject::PairA,
        Subject::PairB,
        Subject::Remote,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Subject::Serial => "serial",
            Subject::Vsock => "vsock",
            Subject::PairA => "pair-a",
            Subject::PairB => "pair-b",
            Subject::Remote => "remote",
        }
    }

    /// The watchdog's id in its awd's configuration.
    pub fn watchdog(self) -> &'static str {
        match self {
            Subject::Serial => "serial",
            Subject::Vsock => "vsock",
            Subject::PairA | Subject::PairB => "pair",
            Subject::Remote => "remote",
        }
    }

    pub fn timeout_ms(self) -> u64 {
        match self {
            Subject::Serial | Subject::Vsock => GUEST_TIMEOUT_MS,
            Subject::PairA | Subject::PairB => PAIR_TIMEOUT_MS,
            Subject::Remote => REMOTE_TIMEOUT_MS,
        }
    }

    /// How often the watched side speaks: the most the last input can precede the fault.
    pub fn interval_ms(self) -> u64 {
        match self {
            Subject::PairA | Subject::PairB => PULSE_MS,
            _ => AGENT_INTERVAL_MS,
        }
    }

    /// The QMP command in the witness's trace that marks one fire of this subject.
    pub fn witness(self) -> &'static str {
        match self {
            Subject::Serial | Subject::Vsock => r#""execute": "system_reset""#,
            Subject::PairA | Subject::PairB => r#""execute": "x-colo-lost-heartbeat""#,
            Subject::Remote => r#""execute": "nbd-server-stop""#,
        }
    }
}

/// A promise broken on purpose (`AWD_SOAK_SABOTAGE`), to show that the soak catches it: a run
/// with one must fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// `wall-clock`: the guests' watchdogs ignore the VM's run state (`follow_vm = false`), so
    /// a paused VM trips its watchdog: false fires.
    WallClock,
    /// `no-grace`: the guests' grace is only their timeout, shorter than a boot: a reboot or
    /// a new QEMU trips the watchdog: false fires.
    NoGrace,
    /// `slow-remote`: the remote service's timeout is a minute, so its death is noticed far
    /// too late: missed fires.
    SlowRemote,
}

impl Sabotage {
    pub fn from_env() -> Option<Sabotage> {
        match std::env::var("AWD_SOAK_SABOTAGE").ok()?.as_str() {
            "" => None,
            "wall-clock" => Some(Sabotage::WallClock),
            "no-grace" => Some(Sabotage::NoGrace),
            "slow-remote" => Some(Sabotage::SlowRemote),
            other => panic!("AWD_SOAK_SABOTAGE={other}: wall-clock, no-grace or slow-remote"),
        }
    }
}

/// A guest and where it runs.
pub struct Guest {
    pub qemu: Qemu,
    pub host: Host,
    /// The harness's own QMP socket on this QEMU (stop, cont, migrate).
    pub test_qmp: PathBuf,
}

/// Everything the soak runs.
pub struct World {
    pub layout: Layout,
    /// The soak's clock: every time in the report is seconds since this.
    pub t0: Instant,
    pub awd_a: Awd,
    pub awd_b: Awd,
    /// Which configuration variant each host's awd runs (SIGHUP toggles it).
    pub variant: [bool; 2],
    pub serial: Guest,
    pub vsock: Guest,
    pub colo_a: Qemu,
    pub colo_b: Qemu,
    pub remote_qemu: Qemu,
    pub remote_agent: Option<Child>,
    /// QEMUs that ended (killed, migrated away): their traces are still witnesses.
    pub retired: Vec<(Subject, Qemu)>,
    /// awd processes that ended (restarted, killed): their logs still count.
    pub retired_awds: Vec<(Host, Awd)>,
    /// Processes started so far, for unique log names.
    spawned: u32,
}

fn host_dir(root: &Path, h: Host) -> PathBuf {
    root.join(match h {
        Host::A => "a",
        Host::B => "b",
    })
}

/// A 32-byte key file, mode 0600 as awd requires.
fn write_key(path: &Path, seed: u8) {
    use std::os::unix::fs::PermissionsExt;
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(seed))
        .collect();
    std::fs::write(path, key).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

impl World {
    /// Builds both hosts and starts everything.
    pub fn start(dir: &Path) -> World {
        for h in [Host::A, Host::B] {
            std::fs::create_dir_all(host_dir(dir, h)).unwrap();
        }
        std::fs::create_dir_all(dir.join("a/vsock")).unwrap();
        write_key(&dir.join("pair.key"), 1);
        write_key(&dir.join("remote.key"), 2);
        let qmp_only = |name: &str, sock: PathBuf| {
            let q = Qemu::start(
                dir,
                QemuOpts {
                    kernel: false,
                    args: s(&[
                        "-qmp",
                        &format!("unix:{},server=on,wait=off", sock.display()),
                    ]),
                    ..QemuOpts::new(name)
                },
            );
            // Bound before awd starts, so its first connect finds a monitor.
            wait_path(&sock);
            q
        };
        let colo_a = qmp_only("colo-a", dir.join("a/colo-qmp.sock"));
        let colo_b = qmp_only("colo-b", dir.join("b/colo-qmp.sock"));
        let remote_qemu = qmp_only("remote-qemu", dir.join("a/remote-qmp.sock"));
        let layout = Layout {
            dir: dir.to_path_buf(),
            sabotage: None,
            net: Netns::new(),
            pair_port: free_port(),
            remote_port: free_port(),
        };
        for h in [Host::A, Host::B] {
            layout.write_config(h, false);
        }
        let mut spawned = 0;
        let mut awd_a = layout.start_awd(Host::A, &mut spawned);
        let mut awd_b = layout.start_awd(Host::B, &mut spawned);
        awd_a.wait_msg("awd running", None, SHORT);
        awd_b.wait_msg("awd running", None, SHORT);
        let serial = layout.start_serial(Host::A, None, &mut spawned);
        let vsock = layout.start_vsock(&mut spawned);
        let mut w = World {
            layout,
            t0: Instant::now(),
            awd_a,
            awd_b,
            variant: [false, false],
            serial,
            vsock,
            colo_a,
            colo_b,
            remote_qemu,
            remote_agent: None,
            retired: Vec::new(),
            retired_awds: Vec::new(),
            spawned,
        };
        w.start_remote_agent();
        w
    }

    pub fn dir_of(&self, h: Host) -> PathBuf {
        host_dir(&self.layout.dir, h)
    }

    /// Seconds since the soak began.
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Seconds since the soak began, of an instant.
    pub fn at(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.t0).as_secs_f64()
            - self.t0.saturating_duration_since(t).as_secs_f64()
    }

    /// Rewrites host `h`'s configuration in the other variant (for a SIGHUP).
    pub fn toggle_config(&mut self, h: Host) {
        self.variant[h as usize] = !self.variant[h as usize];
        self.layout.write_config(h, self.variant[h as usize]);
    }

    /// Breaks a promise on purpose: both configurations are rewritten with `sabotage` and
    /// reloaded, once everything runs (a guest without grace would not even boot otherwise).
    pub fn sabotage(&mut self, sabotage: Sabotage) {
        self.layout.sabotage = Some(sabotage);
        for h in [Host::A, Host::B] {
            self.layout.write_config(h, self.variant[h as usize]);
            let awd = self.awd_mut(h);
            awd.log.skip_pending();
            awd.signal(SIGHUP);
            awd.wait_msg("reloaded", None, SHORT);
        }
    }

    /// Starts host `h`'s awd again (after it ended).
    pub fn restart_awd(&mut self, h: Host) {
        let awd = self.layout.start_awd(h, &mut self.spawned);
        let old = std::mem::replace(self.awd_mut(h), awd);
        self.retired_awds.push((h, old));
    }

    /// Starts the serial guest on `h`, waiting for a migration when `incoming` is given.
    pub fn start_serial(&mut self, h: Host, incoming: Option<&str>) -> Guest {
        self.layout.start_serial(h, incoming, &mut self.spawned)
    }

    pub fn start_vsock(&mut self) -> Guest {
        self.layout.start_vsock(&mut self.spawned)
    }

    /// Starts the remote service's agent on host A's loopback.
    pub fn start_remote_agent(&mut self) {
        self.spawned += 1;
        let name = format!("remote-agent-{}", self.spawned);
        let dir = &self.layout.dir;
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.layout.net.server])
            .arg(agent_bin())
            .args([
                "--to",
                &format!("tcp:127.0.0.1:{}", self.layout.remote_port),
                "--interval",
                &AGENT_INTERVAL_MS.to_string(),
                "--psk",
            ])
            .arg(dir.join("remote.key"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("awd-agent starts");
        self.remote_agent = Some(child);
    }
}

/// Where everything is: the directories, the namespaces and the ports.
pub struct Layout {
    pub dir: PathBuf,
    /// The promise broken on purpose, once the world runs (see [`World::sabotage`]).
    pub sabotage: Option<Sabotage>,
    pub net: Netns,
    pub pair_port: u16,
    pub remote_port: u16,
}

impl Layout {
    fn dir_of(&self, h: Host) -> PathBuf {
        host_dir(&self.dir, h)
    }

    /// Writes host `h`'s configuration, in its current variant. The variants differ in a
    /// watched watchdog's grace and in a spare watchdog being there: a SIGHUP that toggles them
    /// replaces one watchdog and adds or removes another while every subject heartbeats.
    pub fn write_config(&self, h: Host, alt: bool) {
        let d = self.dir_of(h);
        let sabotage = self.sabotage;
        let grace = GUEST_GRACE_MS + if alt { 1000 } else { 0 };
        // The guests' watchdogs' extra lines: a sabotaged run breaks a promise on purpose.
        let guest_extra = match sabotage {
            Some(Sabotage::WallClock) => "follow_vm = false\n",
            _ => "",
        };
        let (grace, guest_grace) = match sabotage {
            Some(Sabotage::NoGrace) => (GUEST_TIMEOUT_MS, GUEST_TIMEOUT_MS),
            _ => (grace, GUEST_GRACE_MS),
        };
        let remote_timeout = match sabotage {
            Some(Sabotage::SlowRemote) => 60_000,
            _ => REMOTE_TIMEOUT_MS,
        };
        let mut t = format!(
            r#"# written by the soak harness (tests/soak)
[chardev.serial-hb]
path = "{d}/vm1-hb.sock"
server = true

[chardev.serial-mon]
path = "{d}/vm1-qmp.sock"

[watchdog.serial]
awd_node = "serial-hb"
notification_node = "serial-mon"
script = ["system_reset"]
timeout = {GUEST_TIMEOUT_MS}
grace = {grace}
{guest_extra}
[chardev.pair-mon]
path = "{d}/colo-qmp.sock"
"#,
            d = d.display()
        );
        match h {
            Host::A => t.push_str(&format!(
                r#"
[chardev.vsock-hb]
backend = "vhost-user-vsock"
path = "{d}/vsock/vm1-vsock.sock"
guest-cid = 3
port = 9009

[chardev.vsock-mon]
path = "{d}/vsock/vm1-qmp.sock"

[watchdog.vsock]
awd_node = "vsock-hb"
notification_node = "vsock-mon"
script = ["system_reset"]
timeout = {GUEST_TIMEOUT_MS}
grace = {guest_grace}
{guest_extra}
[chardev.pair]
host = "{SERVER_ADDR}"
port = {pair}
server = true
psk_file = "{root}/pair.key"

[watchdog.pair]
server = true
awd_node = "pair"
notification_node = "pair-mon"
script = ["x_colo_lost_heartbeat"]
pulse_interval = {PULSE_MS}
timeout = {PAIR_TIMEOUT_MS}

[chardev.remote]
host = "127.0.0.1"
port = {remote}
server = true
psk_file = "{root}/remote.key"

[chardev.remote-mon]
path = "{d}/remote-qmp.sock"

[watchdog.remote]
awd_node = "remote"
notification_node = "remote-mon"
script = ["nbd_server_stop"]
timeout = {remote_timeout}
"#,
                d = d.display(),
                root = self.dir.display(),
                pair = self.pair_port,
                remote = self.remote_port,
            )),
            Host::B => t.push_str(&format!(
                r#"
[chardev.pair]
host = "{SERVER_ADDR}"
port = {pair}
reconnect = 1
psk_file = "{root}/pair.key"

[watchdog.pair]
server = false
awd_node = "pair"
notification_node = "pair-mon"
script = ["nbd_server_stop", "x_colo_lost_heartbeat"]
timeout = {PAIR_TIMEOUT_MS}
"#,
                root = self.dir.display(),
                pair = self.pair_port,
            )),
        }
        if alt {
            t.push_str(&format!(
                r#"
[chardev.spare]
path = "{d}/spare.sock"
server = true

[watchdog.spare]
awd_node = "spare"
timeout = 600000
"#,
                d = d.display()
            ));
        }
        std::fs::write(d.join("awd.toml"), t).unwrap();
    }

    /// Starts host `h`'s awd in its namespace, on its configuration file.
    fn start_awd(&self, h: Host, spawned: &mut u32) -> Awd {
        let d = self.dir_of(h);
        let (base, ns) = match h {
            Host::A => ("awd-a", self.net.server.clone()),
            Host::B => ("awd-b", self.net.client.clone()),
        };
        *spawned += 1;
        let name = format!("{base}-{spawned}");
        let cfg = d.join("awd.toml").display().to_string();
        Awd::run_in_netns(&d, &name, &s(&["--config", &cfg]), &ns)
    }

    /// Starts the virtio-serial guest on host `h` (`incoming`: a migration URI to wait on).
    fn start_serial(&self, h: Host, incoming: Option<&str>, spawned: &mut u32) -> Guest {
        let extra = incoming.map_or(Vec::new(), |uri| s(&["-incoming", uri]));
        let guest = GuestKind {
            base: "serial",
            args_file: "local-guest.args",
            agent_to: "port:org.awd.heartbeat.0",
        };
        self.start_guest(self.dir_of(h), h, &guest, extra, spawned)
    }

    /// Starts the vsock guest (always on host A: its device is awd A).
    fn start_vsock(&self, spawned: &mut u32) -> Guest {
        let guest = GuestKind {
            base: "vsock",
            args_file: "vsock.args",
            agent_to: "vsock:2:9009",
        };
        self.start_guest(
            self.dir.join("a/vsock"),
            Host::A,
            &guest,
            Vec::new(),
            spawned,
        )
    }

    /// Starts a guest in `d` (its sockets' directory) that reboots in place, with a QMP socket
    /// of the harness's own; returns once that socket is bound.
    fn start_guest(
        &self,
        d: PathBuf,
        host: Host,
        kind: &GuestKind,
        extra: Vec<String>,
        spawned: &mut u32,
    ) -> Guest {
        let test_qmp = d.join(format!("{}-test.sock", kind.base));
        let _ = std::fs::remove_file(&test_qmp);
        let mut args = qemu_args_file(kind.args_file, &d);
        args.extend(s(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", test_qmp.display()),
        ]));
        args.extend(extra);
        *spawned += 1;
        let name = format!("{}-{spawned}", kind.base);
        let qemu = Qemu::start(
            &d,
            QemuOpts {
                agent: Some(agent_args(kind.agent_to)),
                args,
                no_reboot: false,
                ..QemuOpts::new(&name)
            },
        );
        wait_path(&test_qmp);
        Guest {
            qemu,
            host,
            test_qmp,
        }
    }
}

/// What differs between the two guests.
struct GuestKind {
    /// The log name's stem.
    base: &'static str,
    /// Its devices, from `qemu-args/`.
    args_file: &'static str,
    /// The agent's `--to`.
    agent_to: &'static str,
}

impl World {
    pub fn awd(&self, h: Host) -> &Awd {
        match h {
            Host::A => &self.awd_a,
            Host::B => &self.awd_b,
        }
    }

    pub fn awd_mut(&mut self, h: Host) -> &mut Awd {
        match h {
            Host::A => &mut self.awd_a,
            Host::B => &mut self.awd_b,
        }
    }

    /// Kills the remote service's agent (SIGKILL).
    pub fn kill_remote_agent(&mut self) {
        if let Some(mut c) = self.remote_agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn guest(&mut self, subject: Subject) -> &mut Guest {
        match subject {
            Subject::Serial => &mut self.serial,
            Subject::Vsock => &mut self.vsock,
            other => panic!("{other:?} is not a guest"),
        }
    }

    /// The awd that holds a subject's watchdog.
    pub fn host_of(&self, subject: Subject) -> Host {
        match subject {
            Subject::Serial => self.serial.host,
            Subject::PairB => Host::B,
            _ => Host::A,
        }
    }

    /// Replaces a guest's QEMU by a new one on the same sockets; the old one is retired.
    pub fn replace_guest(&mut self, subject: Subject, new: Guest) {
        let old = std::mem::replace(self.guest(subject), new);
        self.retired.push((subject, old.qemu));
    }

    /// Whether `subject`'s watchdog is OK and heard from within the last second.
    pub fn healthy(&self, subject: Subject) -> bool {
        let awd = self.awd(self.host_of(subject));
        let (st, out, _) = awd.ctl(&["status", "--json"]);
        if !st.success() {
            return false;
        }
        let Ok(list) = serde_json::from_str::<Vec<serde_json::Value>>(&out) else {
            return false;
        };
        list.iter().any(|w| {
            w["id"] == subject.watchdog()
                && w["status"] == "ok"
                && w["last_input_ms_ago"].as_u64().is_some_and(|ms| ms < 1000)
        })
    }

    /// Waits until every subject is healthy; returns the ones that are not by `timeout`.
    pub fn wait_healthy(&self, timeout: Duration) -> Vec<Subject> {
        let deadline = Instant::now() + timeout;
        loop {
            let sick: Vec<Subject> = Subject::ALL
                .into_iter()
                .filter(|s| !self.healthy(*s))
                .collect();
            if sick.is_empty() || Instant::now() > deadline {
                return sick;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Every fire QEMU witnessed, by subject, in soak seconds.
    pub fn fires(&self) -> Vec<crate::verdict::Fire> {
        let mut out = Vec::new();
        let mut add = |subject: Subject, q: &Qemu| {
            for (t, line) in q.trace.all_timed() {
                if line.contains(subject.witness()) {
                    out.push(crate::verdict::Fire {
                        subject: subject.name().into(),
                        at: self.at(t),
                    });
                }
            }
        };
        add(Subject::Serial, &self.serial.qemu);
        add(Subject::Vsock, &self.vsock.qemu);
        add(Subject::PairA, &self.colo_a);
        add(Subject::PairB, &self.colo_b);
        add(Subject::Remote, &self.remote_qemu);
        for (subject, q) in &self.retired {
            add(*subject, q);
        }
        out.sort_by(|a, b| a.at.total_cmp(&b.at));
        out
    }

    /// Every awd process of the run, with its host: the running ones and those that ended.
    fn all_awds(&self) -> impl Iterator<Item = (Host, &Awd)> {
        [(Host::A, &self.awd_a), (Host::B, &self.awd_b)]
            .into_iter()
            .chain(self.retired_awds.iter().map(|(h, a)| (*h, a)))
    }

    /// Counts of awd's own records over the run whose message starts with `message`, by host
    /// (every awd process of that host, the ended ones too).
    pub fn awd_counts(&self, message: &str) -> [usize; 2] {
        let mut n = [0, 0];
        for (h, awd) in self.all_awds() {
            n[h as usize] += awd
                .records(|v| {
                    v["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with(message))
                })
                .len();
        }
        n
    }

    /// awd's own account of every expiry and action outcome other than an answer, in soak
    /// seconds, for the report: what awd decided, beside what QEMU witnessed.
    pub fn awd_events(&self) -> Vec<serde_json::Value> {
        const KEPT: [&str; 3] = ["watchdog expired", "action fate unknown", "action failed"];
        let mut out = Vec::new();
        for (h, awd) in self.all_awds() {
            for (t, line) in awd.log.all_timed() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let Some(m) = v["message"].as_str() else {
                    continue;
                };
                if KEPT.iter().any(|k| m.starts_with(k)) {
                    out.push(serde_json::json!({
                        "host": format!("{h:?}"), "at": self.at(t), "watchdog": v["watchdog"],
                        "message": m, "reason": v["reason"],
                    }));
                }
            }
        }
        let at = |v: &serde_json::Value| v["at"].as_f64().unwrap_or(0.0);
        out.sort_by(|a, b| at(a).total_cmp(&at(b)));
        out
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill_remote_agent();
    }
}

/// The guest agent's arguments: heartbeats every [`AGENT_INTERVAL_MS`].
fn agent_args(to: &str) -> Vec<String> {
    s(&["--to", to, "--interval", &AGENT_INTERVAL_MS.to_string()])
}

/// Waits for a socket file QEMU or awd creates as it starts.
pub fn wait_path(p: &Path) {
    let deadline = Instant::now() + SHORT;
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}
