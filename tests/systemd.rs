//! The units in `contrib/systemd/` under a real systemd (issue 10, item 2): a minimal Debian 12
//! root (`scripts/systemd-root`, built once and cached) booted with `systemd-nspawn --boot`,
//! systemd 252 as its PID 1, the repository's unit files bind-mounted read-only into its unit
//! path and the awd and awd-agent binaries under test into `/usr/local/bin`.
//!
//! Each test boots its own container (`--volatile=overlay`: the cached root stays untouched,
//! every write goes to a tmpfs), with a private network (only loopback: its ports are its own)
//! and, on a host whose PID 1 is not systemd, in a cgroup of its own so that two containers do
//! not share nspawn's `payload`/`supervisor` groups. The tests talk to the container's systemd
//! with `nsenter -t INIT -a systemctl …`.
//!
//! Waits are bounded: systemd's state is polled every 100 ms until a deadline (BOOT for the
//! container to finish booting, SHORT or the stated bound for a unit to change state); every
//! `systemctl start`/`reload`/`stop` returns when systemd's job ends.
//!
//! `docs/systemd.md` says what is tested and how to run it.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The bound for the container to boot to `running` (measured: 1–3 s).
const CONTAINER_BOOT: Duration = Duration::from_secs(60);

/// The cached root, built by `scripts/systemd-root` on first use.
fn systemd_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let out = Command::new(repo().join("scripts/systemd-root"))
            .stderr(Stdio::inherit())
            .output()
            .expect("scripts/systemd-root runs");
        assert!(
            out.status.success(),
            "scripts/systemd-root failed (needs root, debootstrap, deb.debian.org)"
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(path.join("usr/lib/systemd/systemd").exists(), "{path:?}");
        path
    })
}

/// The unit files under test: `contrib/systemd/`, or `AWD_SYSTEMD_UNITS` (to try other units,
/// e.g. an older version's, against the same tests).
fn units_dir() -> PathBuf {
    std::env::var_os("AWD_SYSTEMD_UNITS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("contrib/systemd"))
}

/// A booted systemd-nspawn container.
struct Container {
    name: String,
    nspawn: Child,
    /// The container's PID 1 (systemd), as this process sees it.
    init: u32,
    /// The cgroups made for this container (removed on drop).
    cgroups: Vec<PathBuf>,
    /// nspawn's own output.
    log: PathBuf,
}

/// Polls `f` every 100 ms until it holds; panics with `what` after `bound`.
fn poll(what: &str, bound: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        if start.elapsed() > bound {
            panic!("timed out after {bound:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes a cgroup directory and its children (cgroupfs takes `rmdir`, never `unlink`).
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The cgroup hierarchies to give a container a group of its own in: the unified one and, on a
/// hybrid host, systemd's named v1 hierarchy too.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let hierarchies: Vec<PathBuf> = if base.join("cgroup.controllers").exists() {
        vec![base.to_path_buf()]
    } else {
        ["unified", "systemd"]
            .iter()
            .map(|h| base.join(h))
            .filter(|p| p.join("cgroup.procs").exists())
            .collect()
    };
    hierarchies
        .into_iter()
        .map(|h| h.join(name))
        .filter(|d| std::fs::create_dir(d).is_ok())
        .collect()
}

impl Container {
    /// Boots a container and waits until its systemd says `running`.
    fn boot(test: &str) -> Container {
        static N: AtomicU32 = AtomicU32::new(0);
        assert_eq!(
            // SAFETY: geteuid(2) has no preconditions.
            unsafe { libc::geteuid() },
            0,
            "systemd-nspawn needs root"
        );
        let root = systemd_root();
        let name = format!(
            "awd-{test}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let cgroups = cgroup_dirs(&name);
        let log = std::env::temp_dir().join(format!("{name}.nspawn.log"));
        let procs: Vec<String> = cgroups
            .iter()
            .map(|d| d.join("cgroup.procs").display().to_string())
            .collect();
        let out = std::fs::File::create(&log).unwrap();
        let bind = |from: &Path, to: &str| format!("--bind-ro={}:{to}", from.display());
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"for f in $AWD_CGROUP_PROCS; do echo $$ > "$f"; done; exec systemd-nspawn "$@""#)
            .arg("sh")
            .env("AWD_CGROUP_PROCS", procs.join(" "))
            .args([
                "--quiet",
                "--boot",
                "--volatile=overlay",
                "--private-network",
            ])
            // No host systemd to register with or to make a scope: run in our own cgroup.
            .args(["--register=no", "--keep-unit", "--console=pipe"])
            .arg(format!("--machine={name}"))
            .arg(format!("--directory={}", root.display()))
            .arg(bind(&awd_bin(), "/usr/local/bin/awd"))
            .arg(bind(&agent_bin(), "/usr/local/bin/awd-agent"))
            .arg(bind(&units_dir(), "/usr/local/lib/systemd/system"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let nspawn = cmd
            .spawn()
            .expect("systemd-nspawn starts (package systemd-container: scripts/install-deps test)");
        let mut c = Container {
            name,
            init: 0,
            nspawn,
            cgroups,
            log,
        };
        let pid = c.nspawn.id();
        let started = Instant::now();
        poll("the container's systemd to start", CONTAINER_BOOT, || {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            c.init = children
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .find(|p: &u32| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|comm| comm.trim() == "systemd")
                })
                .unwrap_or(0);
            if c.init == 0 {
                if let Ok(Some(st)) = c.nspawn.try_wait() {
                    panic!(
                        "systemd-nspawn exited ({st}): {}",
                        std::fs::read_to_string(&c.log).unwrap_or_default()
                    );
                }
            }
            c.init != 0
        });
        let mut state = String::new();
        poll("the container to boot", CONTAINER_BOOT, || {
            state = c.systemctl(&["is-system-running"]).0;
            state == "running" || state == "degraded"
        });
        eprintln!("{}: booted to {state} in {:?}", c.name, started.elapsed());
        c
    }

    /// Runs a command in the container; returns its output.
    fn exec(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new("nsenter")
            .arg("-t")
            .arg(self.init.to_string())
            .arg("-a")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nsenter runs");
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Runs a command in the container; returns (stdout trimmed, success).
    fn run(&self, args: &[&str]) -> (String, bool) {
        let out = self.exec(args, None);
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            out.status.success(),
        )
    }

    /// Runs a command in the container that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args, None);
        assert!(
            out.status.success(),
            "`{}` failed in the container: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `systemctl ARGS`: (stdout trimmed, success).
    fn systemctl(&self, args: &[&str]) -> (String, bool) {
        let mut full = vec!["systemctl", "--no-pager"];
        full.extend(args);
        self.run(&full)
    }

    /// One property of a unit (`systemctl show -p PROP --value`).
    fn show(&self, unit: &str, prop: &str) -> String {
        self.systemctl(&["show", unit, "-p", prop, "--value"]).0
    }

    /// Writes a file in the container (parent directories made).
    fn write(&self, path: &str, text: &str) {
        let out = self.exec(
            &[
                "sh",
                "-c",
                r#"mkdir -p "$(dirname "$1")" && cat > "$1""#,
                "sh",
                path,
            ],
            Some(text),
        );
        assert!(out.status.success(), "writing {path} in the container");
    }

    /// A unit's journal so far.
    fn journal(&self, unit: &str) -> String {
        self.run(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
            .0
    }

    /// `awd status --json` of the awd serving `control` in the container, by watchdog id.
    fn status(&self, control: &str) -> std::collections::BTreeMap<String, Value> {
        let out = self.ok(&[
            "/usr/local/bin/awd",
            "status",
            "--json",
            "--control",
            control,
        ]);
        let list: Vec<Value> = serde_json::from_str(&out).expect("status JSON");
        list.into_iter()
            .map(|w| (w["id"].as_str().unwrap().to_owned(), w))
            .collect()
    }

    /// Polls until `unit` is `active`/`running` with `StatusText` `status`, within `bound`.
    fn wait_running(&self, unit: &str, status: &str, bound: Duration) {
        poll(
            &format!("{unit} running with status {status:?}"),
            bound,
            || {
                self.show(unit, "ActiveState") == "active"
                    && self.show(unit, "SubState") == "running"
                    && self.show(unit, "StatusText") == status
            },
        );
    }

    /// This container path as the host sees it.
    fn host_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.init))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() && self.init != 0 {
            eprintln!("===== {} journal =====", self.name);
            eprintln!(
                "{}",
                self.run(&["journalctl", "--no-pager", "-b", "-n", "400"]).0
            );
        }
        // SIGTERM asks the container's systemd to power off; SIGKILL if it takes over 30 s.
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.nspawn.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for d in &self.cgroups {
            remove_cgroup(d);
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A configuration of `n` watchdogs `w0`…, each on its own Unix socket server
/// `/run/awd/PREFIX-hbI.sock`, with a timeout that does not expire in a test.
fn unix_watchdogs(prefix: &str, n: usize) -> String {
    let mut t = String::new();
    for i in 0..n {
        t.push_str(&format!(
            "[chardev.hb{i}]\npath = \"/run/awd/{prefix}-hb{i}.sock\"\nserver = true\n\n\
             [watchdog.w{i}]\nawd_node = \"hb{i}\"\ntimeout = 600000\n\n"
        ));
    }
    t
}

/// A watchdog `id` on a TCP server at 127.0.0.1:`port` (the container's own loopback).
fn tcp_watchdog(id: &str, port: u16, timeout_ms: u64) -> String {
    format!(
        "[chardev.{id}-hb]\nhost = \"127.0.0.1\"\nport = {port}\nserver = true\n\n\
         [watchdog.{id}]\nawd_node = \"{id}-hb\"\ntimeout = {timeout_ms}\n\n"
    )
}

/// `awd.service` and `awd@vm1.service` start through `Type=notify` on a host with neither
/// `/run/qemu` nor `/var/lib/libvirt/qemu`, `systemctl reload` reloads (and an invalid new
/// configuration leaves the old one running), the hardening is in force (awd may create a
/// socket in `/run/qemu` once it exists, and nowhere else), and `systemctl stop` is clean.
#[test]
fn awd_units_start_through_notify_reload_and_stop() {
    let c = Container::boot("units");
    for dir in ["/run/qemu", "/var/lib/libvirt/qemu"] {
        assert!(!c.run(&["test", "-e", dir]).1, "{dir} exists in the root");
    }
    c.write("/etc/awd/awd.toml", &tcp_watchdog("vm1", 9009, 600_000));
    c.write("/etc/awd/vm1.toml", &unix_watchdogs("vm1", 1));
    // systemd's own lint: no unknown directive, no bad value, nothing at all to say.
    let verify = c.exec(
        &[
            "systemd-analyze",
            "verify",
            "awd.service",
            "awd@vm1.service",
            "awd-agent.service",
        ],
        None,
    );
    let said = String::from_utf8_lossy(&verify.stderr).to_string()
        + &String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");

    // `systemctl start` of a Type=notify unit returns once the unit sent READY=1; the status
    // text is the one awd sends with it.
    let (_, started) = c.systemctl(&["start", "awd.service", "awd@vm1.service"]);
    assert!(
        started,
        "awd units did not start: {}{}",
        c.journal("awd.service"),
        c.journal("awd@vm1.service")
    );
    for unit in ["awd.service", "awd@vm1.service"] {
        assert_eq!(c.show(unit, "Type"), "notify", "{unit}");
        assert_eq!(c.show(unit, "ActiveState"), "active", "{unit}");
        assert_eq!(c.show(unit, "SubState"), "running", "{unit}");
        assert_eq!(
            c.show(unit, "StatusText"),
            "supervising 1 watchdog(s)",
            "{unit}"
        );
        assert_eq!(c.show(unit, "WatchdogUSec"), "10s", "{unit}");
    }
    assert!(c.status("/run/awd/control.sock").contains_key("vm1"));
    assert!(c.status("/run/awd/vm1.control.sock").contains_key("w0"));
    // Both enable (their [Install] sections hold).
    c.ok(&["systemctl", "enable", "awd.service", "awd@vm1.service"]);

    // Reload: a second watchdog appears in the same process. systemctl returns when the
    // ExecReload command has sent SIGHUP; awd then sends RELOADING=1 and READY=1 with its new
    // status text, which is awaited (bound SHORT).
    let pid = c.show("awd.service", "MainPID");
    c.write(
        "/etc/awd/awd.toml",
        &(tcp_watchdog("vm1", 9009, 600_000) + &tcp_watchdog("vm2", 9010, 600_000)),
    );
    let (_, reloaded) = c.systemctl(&["reload", "awd.service"]);
    assert!(reloaded, "reload failed: {}", c.journal("awd.service"));
    c.wait_running("awd.service", "supervising 2 watchdog(s)", SHORT);
    assert_eq!(
        c.show("awd.service", "MainPID"),
        pid,
        "reload restarted awd"
    );
    assert_eq!(c.show("awd.service", "NRestarts"), "0");
    let st = c.status("/run/awd/control.sock");
    assert!(st.contains_key("vm1") && st.contains_key("vm2"), "{st:?}");
    let journal = c.journal("awd.service");
    assert!(journal.contains("Reloaded awd.service"), "{journal}");
    assert!(journal.contains("reloaded: added vm2"), "{journal}");
    assert!(
        !journal.contains('\x1b'),
        "colour escapes in the journal: {journal}"
    );

    // An invalid configuration: awd refuses it, says so, ends the reload (READY=1) and keeps
    // the old watchdogs (bound SHORT for the refusal to be logged).
    let pid = c.show("awd@vm1.service", "MainPID");
    c.write(
        "/etc/awd/vm1.toml",
        "[watchdog.w0]\nawd_node = \"nowhere\"\n",
    );
    assert!(c.systemctl(&["reload", "awd@vm1.service"]).1);
    poll("awd@vm1 to refuse the bad configuration", SHORT, || {
        c.journal("awd@vm1.service")
            .contains("reload refused, the running configuration stays")
    });
    c.wait_running("awd@vm1.service", "supervising 1 watchdog(s)", SHORT);
    assert_eq!(c.show("awd@vm1.service", "MainPID"), pid);
    assert!(c.status("/run/awd/vm1.control.sock").contains_key("w0"));

    // ReadWritePaths= applies to /run/qemu once it exists: awd@vm2 listens there. And
    // ProtectSystem=strict holds elsewhere: awd@ro cannot make its socket in /var/lib.
    c.ok(&["mkdir", "-p", "/run/qemu", "/var/lib/libvirt/qemu"]);
    c.write(
        "/etc/awd/vm2.toml",
        "[chardev.hb]\npath = \"/run/qemu/vm2-hb.sock\"\nserver = true\n\n\
         [watchdog.vm2]\nawd_node = \"hb\"\ntimeout = 600000\n",
    );
    c.write(
        "/etc/awd/ro.toml",
        "[chardev.hb]\npath = \"/var/lib/ro-hb.sock\"\nserver = true\n\n\
         [watchdog.ro]\nawd_node = \"hb\"\ntimeout = 600000\n",
    );
    assert!(
        c.systemctl(&["start", "awd@vm2.service"]).1,
        "{}",
        c.journal("awd@vm2.service")
    );
    assert!(c.run(&["test", "-S", "/run/qemu/vm2-hb.sock"]).1);
    assert!(!c.systemctl(&["start", "awd@ro.service"]).1);
    let ro = c.journal("awd@ro.service");
    assert!(ro.contains("Read-only file system"), "{ro}");
    c.ok(&["systemctl", "stop", "awd@ro.service"]);

    // Stop: STOPPING=1, a clean exit (Result=success, not a timeout or a signal), the
    // control socket gone.
    c.ok(&[
        "systemctl",
        "stop",
        "awd.service",
        "awd@vm1.service",
        "awd@vm2.service",
    ]);
    for unit in ["awd.service", "awd@vm1.service", "awd@vm2.service"] {
        assert_eq!(c.show(unit, "ActiveState"), "inactive", "{unit}");
        assert_eq!(c.show(unit, "Result"), "success", "{unit}");
    }
    assert!(!c.run(&["test", "-e", "/run/awd/control.sock"]).1);
}

/// awd pings systemd at half of `WatchdogSec=10`, and an awd frozen with SIGSTOP stops
/// pinging: systemd kills it (SIGABRT) and `Restart=on-failure` starts a new one.
#[test]
fn a_frozen_awd_is_killed_and_restarted_by_watchdogsec() {
    let c = Container::boot("watchdog");
    c.write("/etc/awd/vm1.toml", &unix_watchdogs("vm1", 1));
    assert!(c.systemctl(&["start", "awd@vm1.service"]).1);
    let unit = "awd@vm1.service";

    // The last ping systemd received (WatchdogTimestampMonotonic, systemd's own clock)
    // changes at every WATCHDOG=1: one change is awaited to line up with a ping, then the next,
    // each within WatchdogSec (a longer gap and systemd would have killed awd).
    let ping = || c.show(unit, "WatchdogTimestampMonotonic");
    let next_ping = |after: &str| -> u64 {
        let mut now = String::new();
        poll("a WATCHDOG=1 ping", Duration::from_secs(10), || {
            now = ping();
            now != after
        });
        now.parse().unwrap()
    };
    let first = next_ping(&ping());
    let second = next_ping(&first.to_string());
    let period = Duration::from_micros(second - first);
    eprintln!("pings {period:?} apart");
    assert!(
        period > Duration::from_secs(3) && period < Duration::from_secs(8),
        "pings {period:?} apart; WatchdogSec=10 asks for 5 s"
    );
    assert_eq!(c.show(unit, "NRestarts"), "0");

    // Freeze it.
    let old = c.show(unit, "MainPID");
    let frozen = Instant::now();
    c.ok(&[
        "systemctl",
        "kill",
        "--kill-who=main",
        "--signal=SIGSTOP",
        unit,
    ]);
    // At most WatchdogSec after the last ping, plus RestartSec=1 and the start: 30 s.
    let took = poll("systemd to restart the frozen awd", SHORT, || {
        c.show(unit, "NRestarts") == "1"
            && c.show(unit, "ActiveState") == "active"
            && c.show(unit, "SubState") == "running"
    });
    eprintln!("frozen awd replaced after {:?}", frozen.elapsed());
    // 10 s from the last ping, 1 s RestartSec: measured 11.1 s. The bound leaves room for load.
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let new = c.show(unit, "MainPID");
    assert_ne!(new, old);
    assert!(
        !c.run(&["test", "-e", &format!("/proc/{old}")]).1,
        "{old} lives"
    );
    let journal = c.journal(unit);
    assert!(
        journal.contains("Watchdog timeout (limit 10s)!"),
        "{journal}"
    );
    assert!(
        journal.contains("Failed with result 'watchdog'"),
        "{journal}"
    );
    // The new awd serves.
    assert!(c.status("/run/awd/vm1.control.sock").contains_key("w0"));
}

/// `LimitNOFILE=` lets one awd hold 2,000 channels with a connection on each (4,000-odd
/// descriptors); with 1,024 (a drop-in), the same configuration cannot start.
#[test]
fn limit_nofile_holds_thousands_of_channels() {
    const CHANNELS: usize = 2000;
    let c = Container::boot("nofile");
    c.write("/etc/awd/big.toml", &unix_watchdogs("big", CHANNELS));
    let unit = "awd@big.service";

    // The unit's limit lowered to 1,024: refused.
    c.write(
        "/etc/systemd/system/awd@big.service.d/nofile.conf",
        "[Service]\nLimitNOFILE=1024\n",
    );
    c.ok(&["systemctl", "daemon-reload"]);
    assert!(!c.systemctl(&["start", unit]).1, "started with 1024 files");
    let journal = c.journal(unit);
    assert!(journal.contains("Too many open files"), "{journal}");
    c.ok(&["systemctl", "stop", unit]);
    c.ok(&["rm", "/etc/systemd/system/awd@big.service.d/nofile.conf"]);
    c.ok(&["systemctl", "daemon-reload"]);
    // (A unit stopped after failing is unloaded: nothing to reset.)

    // The unit as shipped.
    assert!(c.systemctl(&["start", unit]).1, "{}", c.journal(unit));
    assert_eq!(c.show(unit, "LimitNOFILE"), "65536");
    // systemd clamps the limit to what it may grant: the container's own hard limit when it
    // lacks CAP_SYS_RESOURCE (this sandbox: 20,000).
    let hard = |limits: &str| -> u64 {
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_string();
        line.split_whitespace().nth(4).unwrap().parse().unwrap()
    };
    let ceiling = hard(&std::fs::read_to_string(format!("/proc/{}/limits", c.init)).unwrap());
    let pid = c.show(unit, "MainPID");
    let limits = c.ok(&["cat", &format!("/proc/{pid}/limits")]);
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap();
    eprintln!(
        "awd@big: open files {soft} (soft) / {} (hard)",
        hard(&limits)
    );
    assert_eq!(hard(&limits), ceiling.min(65536), "{limits}");
    assert_eq!(
        soft,
        hard(&limits),
        "awd raises its soft limit to the hard one"
    );
    assert!(
        soft > 2 * CHANNELS as u64 + 100,
        "this host allows only {soft}"
    );

    // A connection on every channel, from this process through the container's /run.
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    let conns: Vec<UnixStream> = (0..CHANNELS)
        .map(|i| {
            let p = c.host_path(&format!("/run/awd/big-hb{i}.sock"));
            let mut s = UnixStream::connect(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            s.write_all(b"WATCHDOG=1\n").unwrap();
            s
        })
        .collect();
    poll("every channel to count its heartbeat", SHORT, || {
        let st = c.status("/run/awd/big.control.sock");
        st.len() == CHANNELS
            && st
                .values()
                .all(|w| w["connections"] == 1 && w["heartbeats"].as_u64() >= Some(1))
    });
    let fds: usize = c
        .ok(&["sh", "-c", &format!("ls /proc/{pid}/fd | wc -l")])
        .parse()
        .unwrap();
    eprintln!("awd@big holds {fds} descriptors");
    assert!(fds > 2 * CHANNELS, "{fds}");
    assert_eq!(c.show(unit, "ActiveState"), "active");
    drop(conns);
}

/// `awd-agent.service` in a guest with systemd (the container), its `--to` changed by a
/// drop-in to awd's TCP channel in the same container: heartbeats arrive, the local socket
/// relays `awd-agent fail`, and `Restart=always` brings a killed agent back.
#[test]
fn awd_agent_service_sends_heartbeats() {
    let c = Container::boot("agent");
    c.write("/etc/awd/awd.toml", &tcp_watchdog("guest", 9009, 600_000));
    assert!(
        c.systemctl(&["start", "awd.service"]).1,
        "{}",
        c.journal("awd.service")
    );
    // The shipped unit speaks to a virtio-serial port; this container has none.
    c.write(
        "/etc/systemd/system/awd-agent.service.d/tcp.conf",
        "[Service]\nExecStart=\n\
         ExecStart=/usr/local/bin/awd-agent --to tcp:127.0.0.1:9009 --interval 1000\n",
    );
    c.ok(&["systemctl", "daemon-reload"]);
    c.ok(&["systemctl", "enable", "--now", "awd-agent.service"]);
    let heartbeats = || -> u64 {
        c.status("/run/awd/control.sock")["guest"]["heartbeats"]
            .as_u64()
            .unwrap()
    };
    // 1 s interval: three heartbeats within SHORT.
    poll("three heartbeats from awd-agent.service", SHORT, || {
        heartbeats() >= 3
    });
    let journal = c.journal("awd-agent.service");
    assert!(
        !journal.contains("going on without the local socket"),
        "{journal}"
    );

    // Restart=always (RestartSec=1): a killed agent is back and heartbeats resume.
    let old = c.show("awd-agent.service", "MainPID");
    c.ok(&["systemctl", "kill", "--signal=SIGKILL", "awd-agent.service"]);
    poll("awd-agent.service to restart", SHORT, || {
        c.show("awd-agent.service", "NRestarts") == "1"
            && c.show("awd-agent.service", "ActiveState") == "active"
    });
    assert_ne!(c.show("awd-agent.service", "MainPID"), old);
    let n = heartbeats();
    poll("heartbeats after the restart", SHORT, || {
        heartbeats() >= n + 2
    });

    // The local socket: `awd-agent fail` reaches awd through the running service: the
    // watchdog expires at once (and recovers with the next heartbeat).
    let expiries = || {
        c.status("/run/awd/control.sock")["guest"]["expiries"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(expiries(), 0);
    c.ok(&["/usr/local/bin/awd-agent", "fail", "systemd", "test"]);
    poll("awd to see the guest's failure", SHORT, || expiries() == 1);
    let journal = c.journal("awd.service");
    assert!(journal.contains("systemd test"), "{journal}");
}
