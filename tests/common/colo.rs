//! A COLO pair on one machine: two network namespaces (the primary's and the secondary's
//! "host") joined by a veth pair, a QEMU 7.2 in each set up as `docs/system/qemu-colo.rst`
//! says (COLO proxy, quorum + replication disks, `x-colo` migration), and beside each QEMU an
//! awd with the seed's heartbeat objects: server + pulses on the primary, client + reconnect
//! on the secondary, over a `psk=` channel across the veth. Each awd also watches its own
//! guest over virtio-serial (watchdog `guest`), and the guest prints a counter on its console
//! once a second (`COLO-HB n`) and sends it to that watchdog (`STATUS=hb-n`).
//!
//! Under TCG no COLO checkpoint may run (see `docs/colo.md`: QEMU 7.2 deadlocks in the first
//! one), so the pair is built with `x-checkpoint-delay` at its maximum and a guest that sends
//! no packets: the secondary holds the state the COLO migration gave it and runs in parallel.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

/// The primary's and the secondary's address on the veth pair.
pub const PRIMARY_ADDR: &str = "10.254.78.1";
pub const SECONDARY_ADDR: &str = "10.254.78.2";
/// The port of the primary awd's heartbeat listener (`h1`).
pub const HEARTBEAT_PORT: u16 = 9009;
/// The idle checkpoint period: the largest QEMU takes, so that no checkpoint runs.
pub const NO_CHECKPOINT: u64 = 2_147_483_647;
/// The pre-shared key of the awd pair.
pub const PSK: &[u8] = b"the COLO pair's heartbeat key, 40 bytes";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Prints a line of the demo's narration (shown with `--nocapture`).
pub fn say(text: &str) {
    println!("== {text}");
}

/// Two network namespaces, the primary's and the secondary's, joined by a veth pair; removed
/// on drop. Names are unique per test process and per pair, so tests may run side by side.
pub struct ColoNet {
    pub primary: String,
    pub secondary: String,
    secondary_if: String,
}

impl ColoNet {
    pub fn new() -> ColoNet {
        let tag = format!(
            "{}{}",
            std::process::id() % 10_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let net = ColoNet {
            primary: format!("awcolo{tag}p"),
            secondary: format!("awcolo{tag}s"),
            secondary_if: format!("awc{tag}s"),
        };
        let primary_if = format!("awc{tag}p");
        for n in [&net.primary, &net.secondary] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            netns::ip(&["netns", "add", n]);
        }
        netns::ip(&[
            "link",
            "add",
            &primary_if,
            "type",
            "veth",
            "peer",
            "name",
            &net.secondary_if,
        ]);
        netns::ip(&["link", "set", &primary_if, "netns", &net.primary]);
        netns::ip(&["link", "set", &net.secondary_if, "netns", &net.secondary]);
        for (n, dev, addr) in [
            (&net.primary, &primary_if, PRIMARY_ADDR),
            (&net.secondary, &net.secondary_if, SECONDARY_ADDR),
        ] {
            netns::ip(&["-n", n, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            netns::ip(&["-n", n, "link", "set", dev, "up"]);
            netns::ip(&["-n", n, "link", "set", "lo", "up"]);
            // A failover waits for the NBD connection to the lost peer to fail (see
            // docs/colo.md); with Linux's default of 15 retransmissions that takes ~15 min.
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    n,
                    "sysctl",
                    "-qw",
                    "net.ipv4.tcp_retries2=4",
                ])
                .output()
                .expect("sysctl runs");
            assert!(out.status.success(), "sysctl tcp_retries2 in {n}");
        }
        net
    }

    /// The heartbeat path and the replication path are cut between the two hosts (both
    /// machines stay up): the link goes down, nothing is sent, no FIN, no RST.
    pub fn cut(&self) {
        netns::ip(&[
            "-n",
            &self.secondary,
            "link",
            "set",
            &self.secondary_if,
            "down",
        ]);
    }
}

impl Drop for ColoNet {
    fn drop(&mut self) {
        for n in [&self.primary, &self.secondary] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Runs `f` on a new thread inside the network namespace `ns` (sockets it creates live there).
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
    std::thread::spawn(move || {
        // SAFETY: setns(2) on a valid namespace fd; it changes only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// The counter value of a guest console line `COLO-HB n` (the shell's prompt may precede it).
pub fn counter(line: &str) -> Option<u64> {
    let at = line.find("COLO-HB ")?;
    let rest = &line[at + "COLO-HB ".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() || digits.len() != rest.trim_end().len() {
        return None;
    }
    digits.parse().ok()
}

/// One COLO QEMU, run inside its host's network namespace. The test drives it through its own
/// QMP monitor (`qmp`); awd has another one (`qemu-args/colo-*.args`).
pub struct ColoVm {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    /// The serial console.
    pub console: LineStream,
    /// Trace records of every QMP command that reached QEMU, and its error messages.
    pub trace: LineStream,
    /// The test's own QMP socket.
    pub qmp: PathBuf,
    marker: u32,
}

impl ColoVm {
    fn start(dir: &Path, name: &str, netns: &str, args: &[String]) -> ColoVm {
        let g = guest_dir();
        let qmp = dir.join(format!("{name}-test-qmp.sock"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, "qemu-system-x86_64"]);
        cmd.args([
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
            "-no-reboot",
        ]);
        cmd.args([
            "-name", name, "-accel", "tcg", "-cpu", "max", "-m", "256M", "-smp", "1",
        ]);
        cmd.arg("-kernel")
            .arg(g.join("vmlinuz"))
            .arg("-initrd")
            .arg(g.join("initramfs.cpio.gz"));
        cmd.args([
            "-append",
            "console=ttyS0 quiet panic=-1 awd_agent=--to,port:org.awd.heartbeat.0,--interval,500",
            "-serial",
            "stdio",
            "-trace",
            "handle_qmp_command",
        ]);
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        cmd.args(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("qemu-system-x86_64 starts");
        let console = LineStream::from_reader(
            child.stdout.take().unwrap(),
            Some(dir.join(format!("{name}.console"))),
        );
        let trace = LineStream::from_reader(
            child.stderr.take().unwrap(),
            Some(dir.join(format!("{name}.trace"))),
        );
        ColoVm {
            name: name.into(),
            stdin: child.stdin.take(),
            child,
            console,
            trace,
            qmp,
            marker: 0,
        }
    }

    /// Sends `execute` with `arguments` on the test's monitor and returns the `return` value;
    /// an `error` reply fails the test.
    pub fn qmp(&self, execute: &str, arguments: Value) -> Value {
        let reply = self.qmp_reply(execute, arguments);
        match reply.get("return") {
            Some(r) => r.clone(),
            None => panic!("{}: {execute} failed: {reply}", self.name),
        }
    }

    /// The whole reply, errors included.
    pub fn qmp_reply(&self, execute: &str, arguments: Value) -> Value {
        let mut c = serde_json::json!({ "execute": execute });
        if !arguments.is_null() {
            c["arguments"] = arguments;
        }
        qmp_json(&self.qmp, &c)
    }

    /// `query-colo-status`: `{mode, last-mode, reason}`.
    pub fn colo_status(&self) -> Value {
        self.qmp("query-colo-status", Value::Null)
    }

    /// Whether the VM runs (`query-status`).
    pub fn running(&self) -> bool {
        self.qmp("query-status", Value::Null)["running"] == true
    }

    /// Waits for the test's QMP socket to accept and greet (QEMU creates it at start-up).
    fn wait_qmp(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while std::os::unix::net::UnixStream::connect(&self.qmp).is_err() {
            assert!(
                Instant::now() < deadline,
                "{}: no QMP socket within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types a line on the serial console.
    pub fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("console stdin");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Runs a shell command on the console and waits for it to finish.
    pub fn run(&mut self, shell: &str, timeout: Duration) {
        self.marker += 1;
        let mark = format!("COLO-MARK-{}", self.marker);
        let n = self.marker;
        self.type_line(&format!("{shell}; echo COLO-MARK-\"{n}\""));
        self.console
            .wait(&format!("`{shell}` on {}", self.name), timeout, |l| {
                l.split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
                    .any(|w| w == mark)
            });
    }

    /// Waits for a console counter line `COLO-HB n` with `n` > `above`; returns `n`.
    pub fn wait_counter_above(&mut self, above: u64, timeout: Duration) -> u64 {
        let line = self.console.wait(
            &format!("{}'s counter above {above}", self.name),
            timeout,
            |l| counter(l).is_some_and(|n| n > above),
        );
        counter(&line).unwrap()
    }

    /// Every counter value the console has shown so far, in order.
    pub fn counters(&self) -> Vec<u64> {
        self.console
            .all()
            .iter()
            .filter_map(|l| counter(l))
            .collect()
    }

    /// Waits for a trace record containing `needle`.
    pub fn wait_trace(&mut self, needle: &str, timeout: Duration) -> String {
        let name = self.name.clone();
        self.trace
            .wait(&format!("{name}: trace `{needle}`"), timeout, |l| {
                l.contains(needle)
            })
    }

    /// SIGKILL, as if its host died.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ColoVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("===== {} console =====", self.name);
            for l in self.console.all() {
                eprintln!("{l}");
            }
            eprintln!("===== {} trace =====", self.name);
            for l in self.trace.all() {
                eprintln!("{l}");
            }
        }
    }
}

/// One host of the pair: its QEMU and its awd.
pub struct Host {
    pub vm: ColoVm,
    pub awd: Awd,
    /// The awd's metrics port, inside the host's namespace.
    pub metrics: u16,
    pub netns: String,
}

impl Host {
    /// `GET /metrics` from this host's awd (from inside its namespace).
    pub fn scrape(&self) -> String {
        let port = self.metrics;
        netns::in_netns(&self.netns, move || scrape(port))
    }

    /// The `awd status --json` object of watchdog `wd`.
    pub fn watchdog(&self, wd: &str) -> Value {
        self.awd.status()[wd].clone()
    }
}

/// The two hosts, with COLO running between their VMs.
pub struct ColoPair {
    pub primary: Host,
    pub secondary: Host,
    pub dir: PathBuf,
    pub psk: PathBuf,
    /// Last, so that the namespaces go after the processes in them.
    pub net: ColoNet,
}

/// The primary QEMU's COLO proxy and disk, as in qemu-colo.rst (the disk a raw image).
fn primary_args(dir: &Path) -> Vec<String> {
    let p = PRIMARY_ADDR;
    let mut a = s(&[
        "-netdev",
        "user,id=hn0",
        "-device",
        "rtl8139,id=e0,netdev=hn0",
        "-chardev",
        &format!("socket,id=mirror0,host={p},port=9003,server=on,wait=off"),
        "-chardev",
        &format!("socket,id=compare1,host={p},port=9004,server=on,wait=on"),
        "-chardev",
        "socket,id=compare0,host=127.0.0.1,port=9001,server=on,wait=off",
        "-chardev",
        "socket,id=compare0-0,host=127.0.0.1,port=9001",
        "-chardev",
        "socket,id=compare_out,host=127.0.0.1,port=9005,server=on,wait=off",
        "-chardev",
        "socket,id=compare_out0,host=127.0.0.1,port=9005",
        "-object",
        "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
        "-object",
        "filter-redirector,netdev=hn0,id=redire0,queue=rx,indev=compare_out",
        "-object",
        "filter-redirector,netdev=hn0,id=redire1,queue=rx,outdev=compare0",
        "-object",
        "iothread,id=iothread1",
        "-object",
        "colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1,outdev=compare_out0,iothread=iothread1",
        "-drive",
        &format!(
            "if=ide,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,\
             children.0.file.filename={},children.0.driver=raw",
            dir.join("primary.raw").display()
        ),
    ]);
    a.extend(qemu_args_file("colo-primary.args", dir));
    a.extend(guest_channel(dir, "primary"));
    a
}

/// The secondary QEMU: the redirectors and rewriter, the replication disk chain, `-incoming`.
fn secondary_args(dir: &Path) -> Vec<String> {
    let p = PRIMARY_ADDR;
    let d = |f: &str| dir.join(f).display().to_string();
    let mut a = s(&[
        "-netdev",
        "user,id=hn0",
        "-device",
        "rtl8139,id=e0,netdev=hn0",
        "-chardev",
        &format!("socket,id=red0,host={p},port=9003,reconnect=1"),
        "-chardev",
        &format!("socket,id=red1,host={p},port=9004,reconnect=1"),
        "-object",
        "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0",
        "-object",
        "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1",
        "-object",
        "filter-rewriter,id=rew0,netdev=hn0,queue=all",
        "-drive",
        &format!(
            "if=none,id=parent0,file.filename={},driver=raw",
            d("secondary.raw")
        ),
        "-drive",
        &format!(
            "if=none,id=childs0,driver=replication,mode=secondary,file.driver=qcow2,\
             top-id=colo-disk0,file.file.filename={},file.backing.driver=qcow2,\
             file.backing.file.filename={},file.backing.backing=parent0",
            d("secondary-active.qcow2"),
            d("secondary-hidden.qcow2")
        ),
        "-drive",
        "if=ide,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=childs0",
        "-incoming",
        &format!("tcp:{SECONDARY_ADDR}:9998"),
    ]);
    a.extend(qemu_args_file("colo-secondary.args", dir));
    a.extend(guest_channel(dir, "secondary"));
    a
}

/// The guest's heartbeat port, to the awd on the same host.
fn guest_channel(dir: &Path, side: &str) -> Vec<String> {
    s(&[
        "-device",
        "virtio-serial-pci,id=awdserial",
        "-chardev",
        &format!(
            "socket,id=awdhb,path={},reconnect=1",
            dir.join(format!("{side}-hb.sock")).display()
        ),
        "-device",
        "virtserialport,bus=awdserial.0,chardev=awdhb,name=org.awd.heartbeat.0",
    ])
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs (package qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The awd beside the primary QEMU: the seed's primary object (server, pulses every second,
/// timeout 5 s, `x_colo_lost_heartbeat`) on a `psk=` channel, and the guest's watchdog.
fn primary_awd(dir: &Path, net: &ColoNet, psk: &Path, metrics: u16) -> Awd {
    script(dir, "colo_primary_opt_script", "x_colo_lost_heartbeat\n");
    Awd::run_in_netns(
        dir,
        "primary-awd",
        &s(&[
            "--chardev",
            &format!(
                "socket,id=h1,host={PRIMARY_ADDR},port={HEARTBEAT_PORT},server=on,wait=off,psk={}",
                psk.display()
            ),
            "--chardev",
            &format!(
                "socket,id=mon,path={}",
                dir.join("primary-qmp.sock").display()
            ),
            "--chardev",
            &format!(
                "socket,id=hb,path={},server=on,wait=off",
                dir.join("primary-hb.sock").display()
            ),
            "--object",
            &format!(
                "advanced-watchdog,id=heart1,server=on,awd_node=h1,notification_node=mon,\
                 opt_script={},pulse_interval=1000,timeout=5000",
                dir.join("colo_primary_opt_script").display()
            ),
            "--object",
            "advanced-watchdog,id=guest,awd_node=hb,timeout=5000,grace=120000",
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ]),
        &net.primary,
    )
}

/// The awd beside the secondary QEMU: the seed's secondary object (client, reconnect every
/// second, timeout 10 s, `nbd_server_stop` + `x_colo_lost_heartbeat`), and the guest's watchdog.
fn secondary_awd(dir: &Path, net: &ColoNet, psk: &Path, metrics: u16) -> Awd {
    script(
        dir,
        "colo_secondary_opt_script",
        "nbd_server_stop\nx_colo_lost_heartbeat\n",
    );
    Awd::run_in_netns(
        dir,
        "secondary-awd",
        &s(&[
            "--chardev",
            &format!(
                "socket,id=h1,host={PRIMARY_ADDR},port={HEARTBEAT_PORT},reconnect=1,psk={}",
                psk.display()
            ),
            "--chardev",
            &format!(
                "socket,id=mon,path={}",
                dir.join("secondary-qmp.sock").display()
            ),
            "--chardev",
            &format!(
                "socket,id=hb,path={},server=on,wait=off",
                dir.join("secondary-hb.sock").display()
            ),
            "--object",
            &format!(
                "advanced-watchdog,id=heart1,server=off,awd_node=h1,notification_node=mon,\
                 opt_script={},timeout=10000",
                dir.join("colo_secondary_opt_script").display()
            ),
            "--object",
            "advanced-watchdog,id=guest,awd_node=hb,timeout=5000,grace=120000",
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ]),
        &net.secondary,
    )
}

impl ColoPair {
    /// Builds the pair and returns once COLO runs, both awds hear each other, and the guest's
    /// counter is running on the primary.
    pub fn start(dir: &Path) -> ColoPair {
        let t0 = Instant::now();
        let net = ColoNet::new();
        say(&format!(
            "hosts: network namespaces {} ({PRIMARY_ADDR}) and {} ({SECONDARY_ADDR})",
            net.primary, net.secondary
        ));
        let img = |f: &str| dir.join(f).display().to_string();
        qemu_img(&["create", "-q", "-f", "raw", &img("primary.raw"), "16M"]);
        std::fs::copy(dir.join("primary.raw"), dir.join("secondary.raw")).unwrap();
        for f in ["secondary-active.qcow2", "secondary-hidden.qcow2"] {
            qemu_img(&["create", "-q", "-f", "qcow2", &img(f), "16M"]);
        }
        let psk = dir.join("colo.psk");
        std::fs::write(&psk, PSK).unwrap();
        std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();

        say("starting an awd on each host (seed objects, psk= channel)");
        let (pm, sm) = (free_port(), free_port());
        let mut pawd = primary_awd(dir, &net, &psk, pm);
        let mut sawd = secondary_awd(dir, &net, &psk, sm);
        pawd.wait_msg("awd running", None, SHORT);
        sawd.wait_msg("awd running", None, SHORT);

        say("starting the primary QEMU (running) and the secondary QEMU (-incoming)");
        let pvm = ColoVm::start(dir, "primary", &net.primary, &primary_args(dir));
        let svm = ColoVm::start(dir, "secondary", &net.secondary, &secondary_args(dir));
        let mut pair = ColoPair {
            primary: Host {
                vm: pvm,
                awd: pawd,
                metrics: pm,
                netns: net.primary.clone(),
            },
            secondary: Host {
                vm: svm,
                awd: sawd,
                metrics: sm,
                netns: net.secondary.clone(),
            },
            dir: dir.to_path_buf(),
            psk,
            net,
        };
        let (p, s) = (&mut pair.primary, &mut pair.secondary);
        p.vm.wait_qmp(SHORT);
        s.vm.wait_qmp(SHORT);
        p.vm.console.wait("primary guest ready", BOOT, |l| {
            l.contains("AWD-GUEST: ready")
        });
        // The guest's counter: on the console, and to the host's watchdog `guest`.
        p.vm.type_line(
            "i=0; while :; do i=$((i+1)); echo COLO-HB $i; \
             awd-agent status hb-$i >/dev/null 2>&1; sleep 1; done &",
        );
        p.vm.wait_counter_above(0, SHORT);
        p.awd.wait_msg("connected", Some("guest"), SHORT);
        p.awd.wait_msg("connected", Some("heart1"), SHORT);
        s.awd.wait_msg("connected", Some("heart1"), SHORT);

        say("COLO: secondary nbd-server-start/add, primary drive_add + x-blockdev-change, migrate");
        use serde_json::json;
        s.vm.qmp(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-colo", "state": true}]}),
        );
        s.vm.qmp(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": SECONDARY_ADDR, "port": "9999"}}}),
        );
        s.vm.qmp(
            "nbd-server-add",
            json!({"device": "parent0", "writable": true}),
        );
        let out = p.vm.qmp(
            "human-monitor-command",
            json!({"command-line": format!(
                "drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,\
                 file.host={SECONDARY_ADDR},file.port=9999,file.export=parent0,node-name=replication0"
            )}),
        );
        assert_eq!(out, "", "drive_add: {out}");
        p.vm.qmp(
            "x-blockdev-change",
            json!({"parent": "colo-disk0", "node": "replication0"}),
        );
        p.vm.qmp(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-colo", "state": true}]}),
        );
        p.vm.qmp(
            "migrate-set-parameters",
            json!({"x-checkpoint-delay": NO_CHECKPOINT}),
        );
        p.vm.qmp(
            "migrate",
            json!({"uri": format!("tcp:{SECONDARY_ADDR}:9998")}),
        );
        let deadline = Instant::now() + SHORT;
        loop {
            let (pc, sc) = (p.vm.colo_status(), s.vm.colo_status());
            if pc["mode"] == "primary" && sc["mode"] == "secondary" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "COLO not running within {SHORT:?}: primary {pc}, secondary {sc}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(p.vm.qmp("query-migrate", Value::Null)["status"], "colo");
        // The secondary VM runs from the replicated state: its counter goes on from the
        // primary's, and its heartbeats reach the secondary host's awd.
        let at = *p.vm.counters().last().unwrap();
        let n = s.vm.wait_counter_above(0, SHORT);
        assert!(
            n >= at,
            "the secondary's counter starts at {n}, the primary's was {at}"
        );
        s.awd.wait_msg("connected", Some("guest"), SHORT);
        say(&format!(
            "COLO running (query-migrate: colo; query-colo-status: primary / secondary) after \
             {:.1} s; guest counter at {at} on the primary, {n} on the secondary",
            t0.elapsed().as_secs_f64()
        ));
        pair
    }
}
