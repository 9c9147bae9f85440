//! awd under libvirt: the domain XML examples in `qemu-args/libvirt/` validate against libvirt's
//! schema, and each works end to end with a real libvirt daemon, a real TCG domain booting the
//! project's guest image, and a real awd that quits the domain through its second QMP monitor
//! once the guest's agent falls silent.
//!
//! The daemon is the system-mode `libvirtd` of Debian's libvirt-daemon-system, started by the
//! test in a private mount namespace: `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`,
//! `/var/cache/libvirt` and `/var/log/libvirt` are bind mounts of the test's scratch directory,
//! so it needs no systemd, leaves the host's configuration alone, and runs next to a system
//! libvirtd if there is one. Its config runs QEMU as root without relabelling (`user = "root"`,
//! `dynamic_ownership = 0`): on hosts where `/dev/kvm` is root-only, a daemon running QEMU as
//! libvirt-qemu re-probes QEMU's capabilities on every lookup ("KVM was enabled when probing …,
//! but it is not available now") and a domain takes about a minute to start.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use common::*;

/// The directory of the libvirt examples.
fn examples_dir() -> PathBuf {
    repo().join("qemu-args/libvirt")
}

/// Every `*.xml` file in `qemu-args/libvirt/`, sorted.
fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    v.sort();
    v
}

/// The path of `prog` in PATH (or the sbin directories, where Debian puts libvirtd).
fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// The path of `prog`, or a failure that names the Debian package to install.
fn need(prog: &str, package: &str) -> PathBuf {
    which(prog).unwrap_or_else(|| {
        panic!("`{prog}` is not installed: apt-get install --no-install-recommends {package}")
    })
}

/// Runs `cmd` to completion within `timeout`, collecting its output. On timeout the child is
/// killed and an error returned.
fn run_bounded(mut cmd: Command, what: &str, timeout: Duration) -> Result<Output, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let pid = child.id() as i32;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.map_err(|e| format!("{what}: {e}")),
        Err(_) => {
            // SAFETY: kill(2) has no memory-safety preconditions. The child did not exit
            // within the bound, so its waiter has not reaped it and the pid is still its.
            unsafe {
                libc::kill(pid, SIGKILL);
            }
            Err(format!("{what}: no exit within {timeout:?}"))
        }
    }
}

/// The output of a command that must succeed.
fn checked(out: Result<Output, String>, what: &str) -> String {
    let out = out.unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Waits until process `pid` (not necessarily our child) has exited; false on timeout. The
/// event is the process's pidfd becoming readable.
fn wait_gone(pid: i32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        // ESRCH: no such process any more.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    let deadline = Instant::now() + timeout;
    let gone = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break r == 1;
    };
    // SAFETY: closing the descriptor opened above, once.
    unsafe {
        libc::close(fd);
    }
    gone
}

/// Sends `sig` to `pid`.
fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A private libvirtd (see the module comment). Dropping it destroys its domains, stops the
/// daemon, kills any QEMU left behind, and prints the daemon's and the domains' logs if the
/// test is failing.
struct Libvirtd {
    root: PathBuf,
    pid: i32,
    uri: String,
}

impl Libvirtd {
    /// Starts the daemon with its state under `root`; returns once it accepts connections.
    fn start(root: &Path) -> Libvirtd {
        Self::start_with(root, false)
    }

    /// [`Libvirtd::start`]; with `hook`, the daemon also has awd's QEMU hook
    /// (`contrib/libvirt/hooks/qemu` as `/etc/libvirt/hooks/qemu`), `root/awd-etc` as
    /// `/etc/awd`, and `root/systemctl` in place of `/usr/bin/systemctl` (there is no systemd
    /// here to start units: the stand-in does what `awd@.service` would).
    fn start_with(root: &Path, hook: bool) -> Libvirtd {
        let libvirtd = need("libvirtd", "libvirt-daemon-system");
        need("virsh", "libvirt-clients");
        let unshare = need("unshare", "util-linux");
        for d in ["etc", "run", "lib", "cache", "log"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let log = root.join("libvirtd.log");
        std::fs::write(
            root.join("etc/libvirtd.conf"),
            format!(
                "# awd's libvirt test: a private daemon.\n\
                 log_outputs = \"3:file:{}\"\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("etc/qemu.conf"),
            "# awd's libvirt test: QEMU as root, files left as they are, no virtlogd, no cgroups.\n\
             user = \"root\"\n\
             group = \"root\"\n\
             dynamic_ownership = 0\n\
             stdio_handler = \"file\"\n\
             cgroup_controllers = [ ]\n",
        )
        .unwrap();
        // `libvirtd --daemon` returns once its sockets listen; connections made while its
        // drivers initialise wait for them.
        let script = r#"
            set -e
            for d in etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt \
                     cache:/var/cache/libvirt log:/var/log/libvirt; do
                mkdir -p "${d#*:}"
                mount --bind "$1/${d%%:*}" "${d#*:}"
            done
            if [ "$3" = hook ]; then
                mkdir -p /etc/awd
                mount --bind "$1/awd-etc" /etc/awd
                mount --bind "$1/systemctl" /usr/bin/systemctl
            fi
            exec "$2" --daemon --config /etc/libvirt/libvirtd.conf --pid-file "$1/libvirtd.pid"
        "#;
        let mut cmd = Command::new(unshare);
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(root)
        .arg(libvirtd)
        .arg(if hook { "hook" } else { "" });
        if hook {
            std::fs::create_dir_all(root.join("etc/hooks")).unwrap();
            std::fs::copy(
                repo().join("contrib/libvirt/hooks/qemu"),
                root.join("etc/hooks/qemu"),
            )
            .unwrap();
        }
        let out = run_bounded(cmd, "libvirtd --daemon", SHORT).unwrap_or_else(|e| panic!("{e}"));
        let daemon_log = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            out.status.success(),
            "libvirtd did not start ({}); it needs root and a mount namespace (unshare -m):\n{}{}\n{daemon_log}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let pid = std::fs::read_to_string(root.join("libvirtd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Libvirtd {
            root: root.to_path_buf(),
            pid,
            uri: format!(
                "qemu:///system?socket={}",
                root.join("run/libvirt-sock").display()
            ),
        }
    }

    /// `virsh -c URI ARGS`, bounded.
    fn virsh_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("virsh");
        cmd.arg("-c").arg(&self.uri).args(args);
        cmd
    }

    /// `virsh ARGS`, which must succeed; returns its stdout.
    fn virsh(&self, args: &[&str]) -> String {
        let what = format!("virsh {}", args.join(" "));
        checked(run_bounded(self.virsh_cmd(args), &what, SHORT), &what)
    }

    /// The names of the running domains.
    fn running(&self) -> Vec<String> {
        self.virsh(&["list", "--name"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The pid of a running domain's QEMU.
    fn qemu_pid(&self, domain: &str) -> i32 {
        std::fs::read_to_string(self.root.join(format!("run/qemu/{domain}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A domain's log (QEMU's command line and stderr, libvirt's notes).
    fn domain_log(&self, domain: &str) -> String {
        std::fs::read_to_string(self.root.join(format!("log/qemu/{domain}.log")))
            .unwrap_or_default()
    }

    /// `virsh event --loop` for lifecycle events, each line a stream line.
    fn events(&self, domain: &str) -> Events {
        let mut child = self
            .virsh_cmd(&[
                "event",
                "--domain",
                domain,
                "--event",
                "lifecycle",
                "--loop",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = LineStream::from_reader(child.stdout.take().unwrap(), None);
        Events { child, lines }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let running: Vec<String> = run_bounded(self.virsh_cmd(&["list", "--name"]), "list", SHORT)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        for d in &running {
            let _ = run_bounded(self.virsh_cmd(&["destroy", d]), "destroy", SHORT);
        }
        signal(self.pid, SIGTERM);
        if !wait_gone(self.pid, SHORT) {
            eprintln!("libvirtd ignored SIGTERM; killing it");
            signal(self.pid, SIGKILL);
            wait_gone(self.pid, SHORT);
        }
        // A QEMU libvirt did not stop (it would have removed its pid file).
        if let Ok(dir) = std::fs::read_dir(self.root.join("run/qemu")) {
            for e in dir.flatten() {
                let p = e.path();
                if p.extension().is_none_or(|x| x != "pid") {
                    continue;
                }
                let Some(pid) = std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok())
                else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains("qemu-system") {
                    eprintln!("killing a QEMU left behind: pid {pid}");
                    signal(pid, SIGKILL);
                    wait_gone(pid, SHORT);
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("===== libvirtd log =====");
            eprintln!(
                "{}",
                std::fs::read_to_string(self.root.join("libvirtd.log")).unwrap_or_default()
            );
            if let Ok(dir) = std::fs::read_dir(self.root.join("log/qemu")) {
                for e in dir.flatten() {
                    eprintln!("===== domain log {} =====", e.path().display());
                    // Without the trace of libvirt's own (many) QMP commands.
                    for l in std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .lines()
                    {
                        if !l.contains(r#""id": "libvirt-"#) {
                            eprintln!("{l}");
                        }
                    }
                }
            }
        }
    }
}

/// A running `virsh event --loop`.
struct Events {
    child: Child,
    lines: LineStream,
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest's serial console: QEMU connects to the test's socket while it starts, so no
/// output is lost, and the test can type on it.
struct Console {
    out: LineStream,
    input: UnixStream,
    marker: u32,
}

impl Console {
    /// Takes the connection QEMU made while starting (it is queued on `listener`).
    fn accept(listener: &UnixListener, mirror: PathBuf) -> Console {
        listener.set_nonblocking(true).unwrap();
        let (stream, _) = listener
            .accept()
            .expect("QEMU connected to the console socket while the domain started");
        stream.set_nonblocking(false).unwrap();
        Console {
            out: LineStream::from_reader(stream.try_clone().unwrap(), Some(mirror)),
            input: stream,
            marker: 0,
        }
    }

    /// Runs a shell command on the console and waits for it to finish.
    fn run(&mut self, shell: &str, timeout: Duration) {
        self.marker += 1;
        let mark = format!("AWD-MARK-{}", self.marker);
        // The marker is split so the echoed command line does not match it.
        writeln!(self.input, "{shell}; echo AWD-MARK-\"{}\"", self.marker).unwrap();
        self.out
            .wait(&format!("`{shell}` to finish"), timeout, |l| {
                l.trim_end() == mark
            });
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== guest console =====");
            for l in self.out.all() {
                eprintln!("{l}");
            }
        }
    }
}

/// The text from `open` through the matching `close` (both included), if `open` occurs.
fn element<'a>(xml: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = xml.find(open)?;
    let end = start
        + xml[start..]
            .find(close)
            .unwrap_or_else(|| panic!("`{open}` without `{close}`"))
        + close.len();
    Some(&xml[start..end])
}

/// `xml` without its `<!-- … -->` comments (which may mention the elements we look for).
fn strip_comments(xml: &str) -> String {
    let mut out = String::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<!--") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("-->")
            .unwrap_or_else(|| panic!("unterminated comment"));
        rest = &rest[start + end + 3..];
    }
    out.push_str(rest);
    out
}

/// The test domain: an example's awd parts (its `<memoryBacking>`, its `<channel>`s and its
/// `<qemu:commandline>`, with `/run/awd` replaced by `awd_dir`) in a TCG domain that boots the
/// project's guest kernel, runs `awd-agent AGENT`, and has its serial console on `console`.
fn test_domain(
    example: &str,
    name: &str,
    awd_dir: &Path,
    console: &Path,
    agent: &[&str],
) -> String {
    let text = std::fs::read_to_string(examples_dir().join(example)).unwrap();
    let text = strip_comments(&text).replace("/run/awd", &awd_dir.display().to_string());
    let memory = element(&text, "<memoryBacking>", "</memoryBacking>").unwrap_or("");
    let channel = element(&text, "<channel type='unix'>", "</channel>").unwrap_or("");
    // QEMU's trace of every QMP command that reaches it goes to the domain log: the witness
    // that awd's `quit` came through the second monitor.
    let commandline = element(&text, "<qemu:commandline>", "</qemu:commandline>")
        .unwrap_or_else(|| panic!("{example} has no <qemu:commandline> (awd's monitor)"))
        .replace(
            "</qemu:commandline>",
            "  <qemu:arg value='-trace'/>\n    <qemu:arg value='handle_qmp_command'/>\n  </qemu:commandline>",
        );
    let g = guest_dir();
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  {memory}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 awd_agent={agent}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <serial type='unix'>
      <source mode='connect' path='{console}'/>
      <target port='0'/>
    </serial>
    {channel}
  </devices>
  {commandline}
</domain>
",
        kernel = g.join("vmlinuz").display(),
        initrd = g.join("initramfs.cpio.gz").display(),
        agent = agent.join(","),
        console = console.display(),
    )
}

/// Runs `virt-xml-validate FILE domain`; returns its combined output, failing with the
/// packages to install when the tool (or its xmllint) is missing.
fn validate(file: &Path) -> (bool, String) {
    let tool = need("virt-xml-validate", "libvirt-clients libxml2-utils");
    let mut cmd = Command::new(tool);
    cmd.arg(file).arg("domain");
    let out = run_bounded(cmd, "virt-xml-validate", SHORT).unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("xmllint: not found"),
        "virt-xml-validate needs xmllint: apt-get install --no-install-recommends libxml2-utils\n{text}"
    );
    (out.status.success(), text)
}

/// Every example in `qemu-args/libvirt/` is a valid libvirt domain.
#[test]
fn xml_examples_validate() {
    let files = examples();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["virtio-serial.xml", "vhost-user-vsock.xml"] {
        assert!(
            names.iter().any(|n| n == expected),
            "qemu-args/libvirt/{expected} is missing (have {names:?})"
        );
    }
    let mut failures = Vec::new();
    for f in &files {
        let (ok, text) = validate(f);
        if !ok {
            failures.push(format!("{}:\n{text}", f.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "invalid domain XML:\n{}",
        failures.join("\n")
    );
}

/// The first awd log record satisfying `pred`, whether it has been passed over by an earlier
/// wait or is still to come.
fn seen(awd: &mut Awd, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    match awd.records(&pred).into_iter().next() {
        Some(v) => v,
        None => awd.wait(what, SHORT, pred),
    }
}

/// One example under a real libvirt daemon: awd listens on `awd_channel` (an awd `--chardev`
/// whose `/run/awd` is replaced by the test's directory); the guest's agent heartbeats to it
/// through the example's device; while it runs nothing fires; once it is killed (the guest
/// keeps running) awd sends `quit` through the example's second QMP monitor, QEMU exits and
/// the transient domain is gone.
fn silenced_agent_quits_the_domain(test: &str, example: &str, awd_channel: &str, agent: &[&str]) {
    let dir = scratch(test);
    let root = dir.path();
    // libvirt runs QEMU in its own mount namespace; keep the tree traversable.
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let awd_dir = root.join("awd");
    std::fs::create_dir(&awd_dir).unwrap();
    let started = Instant::now();

    let libvirtd = Libvirtd::start(root);

    // awd first: libvirt and QEMU look for its sockets when the domain starts.
    script(&awd_dir, "quit.script", "quit\n");
    let mut awd = Awd::run(
        &awd_dir,
        "awd",
        &s(&[
            "--chardev",
            &awd_channel.replace("/run/awd", &awd_dir.display().to_string()),
            "--chardev",
            &format!("socket,id=mon,path={}/vm1-qmp.sock", awd_dir.display()),
            "--object",
            "advanced-watchdog,id=vm1,awd_node=hb,notification_node=mon,opt_script=quit.script,timeout=3000,grace=120000",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);

    let name = "awd-vm1";
    let console_path = root.join("console.sock");
    let console_listener = UnixListener::bind(&console_path).unwrap();
    let xml = test_domain(example, name, &awd_dir, &console_path, agent);
    let xml_path = root.join(format!("{name}.xml"));
    std::fs::write(&xml_path, &xml).unwrap();
    let (ok, text) = validate(&xml_path);
    assert!(ok, "the generated domain is invalid:\n{text}\n{xml}");

    libvirtd.virsh(&["create", &xml_path.display().to_string()]);
    let mut console = Console::accept(&console_listener, root.join("console.log"));
    let mut events = libvirtd.events(name);
    let qemu = libvirtd.qemu_pid(name);
    assert_eq!(libvirtd.running(), vec![name.to_string()]);
    eprintln!("{test}: domain started after {:?}", started.elapsed());

    console.out.wait("the agent to connect", BOOT, |l| {
        l.contains("awd-agent: connected")
    });
    // The two connections come in either order.
    seen(&mut awd, "the heartbeat channel to connect", |v| {
        v["message"] == "connected" && v["watchdog"] == "vm1"
    });
    let node = seen(&mut awd, "the notification node to connect", |v| {
        v["message"] == "notification node connected"
    });
    assert_eq!(node["kind"], "QMP", "{node}");
    eprintln!(
        "{test}: guest agent connected after {:?}",
        started.elapsed()
    );

    // Heartbeats flow for longer than the timeout: nothing fires.
    console.run("sleep 4", SHORT);
    let expiries = awd.records(|v| v["message"] == "watchdog expired");
    assert!(
        expiries.is_empty(),
        "no expiry while the agent runs: {expiries:?}"
    );

    // Silence the agent; the guest keeps running.
    console.run("killall awd-agent", SHORT);
    let expired = awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    assert!(
        expired["reason"]
            .as_str()
            .unwrap_or("")
            .contains("silent for"),
        "{expired}"
    );
    let done = awd.wait_msg("action done", Some("vm1"), SHORT);
    assert_eq!(done["line"], "quit", "{done}");

    // QEMU quits; libvirt sees it stop and forgets the transient domain.
    events.lines.wait("the domain to stop", SHORT, |l| {
        l.contains(&format!("domain '{name}': Stopped"))
    });
    assert!(wait_gone(qemu, SHORT), "QEMU (pid {qemu}) exited");
    let running = libvirtd.running();
    assert!(running.is_empty(), "no running domain is left: {running:?}");
    let log = libvirtd.domain_log(name);
    assert!(
        log.contains(r#"req: {"execute": "quit""#),
        "QEMU's trace shows awd's quit on the second monitor:\n{log}"
    );
    eprintln!("{test}: done after {:?}", started.elapsed());
}

/// `virtio-serial.xml`: the heartbeat over the example's `<channel type='unix'>`.
#[test]
fn libvirt_end_to_end() {
    silenced_agent_quits_the_domain(
        "libvirt-serial",
        "virtio-serial.xml",
        "socket,id=hb,path=/run/awd/vm1-hb.sock,server=on,wait=off",
        &["--to", "port:org.awd.heartbeat.0", "--interval", "200"],
    );
}

/// `vhost-user-vsock.xml`: awd serves the guest's vsock device through the example's
/// `<qemu:commandline>` device and shared `<memoryBacking>`; the agent connects to CID 2.
#[test]
fn libvirt_vhost_user_vsock_end_to_end() {
    silenced_agent_quits_the_domain(
        "libvirt-vsock",
        "vhost-user-vsock.xml",
        "vhost-user-vsock,id=hb,path=/run/awd/vm1-vsock.sock,guest-cid=3,port=9009",
        &["--to", "vsock:2:9009", "--interval", "200"],
    );
}

/// The stand-in for `systemctl` in the hook test's daemon: logs each call with whether the
/// domain's QEMU runs (its pid file), and does what `awd@.service` would: `start` runs
/// `awd run --config /etc/awd/%I.toml` and returns once awd answers on its control socket
/// (`Type=notify`), `stop` ends it.
const SYSTEMCTL: &str = r#"#!/bin/sh
root=ROOT
for unit; do :; done
instance=$(systemd-escape --unescape --instance "$unit")
qemu=absent
[ -e "/run/libvirt/qemu/$instance.pid" ] && qemu=running
echo "$* qemu=$qemu" >> "$root/systemctl.log"
case "$1" in
    start)
        setsid AWD run --config "/etc/awd/$instance.toml" --control "$root/awd.control.sock" \
            --log-format json --log awd=debug > "$root/hook-awd.log" 2>&1 < /dev/null &
        echo $! > "$root/awd.pid"
        i=0
        until AWD status --control "$root/awd.control.sock" > /dev/null 2>&1; do
            i=$((i + 1)); [ $i -lt 300 ] || exit 1; sleep 0.1
        done ;;
    stop) kill "$(cat "$root/awd.pid")" ;;
esac
"#;

/// `contrib/libvirt/hooks/qemu` under the real libvirtd: awd@DOMAIN starts before the
/// domain's QEMU (so its sockets are there when QEMU connects), supervises the domain, and
/// stops once the domain has ended; a domain without `/etc/awd/DOMAIN.toml` is left alone.
#[test]
fn the_libvirt_hook_runs_awd_beside_the_domain() {
    let dir = scratch("libvirt-hook");
    let root = dir.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let awd_dir = root.join("awd");
    std::fs::create_dir_all(&awd_dir).unwrap();
    std::fs::create_dir_all(root.join("awd-etc")).unwrap();
    let name = "awd-vm1";
    std::fs::write(
        root.join(format!("awd-etc/{name}.toml")),
        format!(
            "[chardev.hb]\npath = \"{d}/vm1-hb.sock\"\nserver = true\n\n\
             [chardev.mon]\npath = \"{d}/vm1-qmp.sock\"\n\n\
             [watchdog.vm1]\nawd_node = \"hb\"\nnotification_node = \"mon\"\n\
             script = [\"quit\"]\ntimeout = 3000\ngrace = 120000\n",
            d = awd_dir.display()
        ),
    )
    .unwrap();
    let stub = root.join("systemctl");
    std::fs::write(
        &stub,
        SYSTEMCTL
            .replace("ROOT", &root.display().to_string())
            .replace("AWD", &awd_bin().display().to_string()),
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let calls = || std::fs::read_to_string(root.join("systemctl.log")).unwrap_or_default();
    let libvirtd = Libvirtd::start_with(root, true);

    let console_path = root.join("console.sock");
    let console_listener = UnixListener::bind(&console_path).unwrap();
    let xml = test_domain(
        "virtio-serial.xml",
        name,
        &awd_dir,
        &console_path,
        &["--to", "port:org.awd.heartbeat.0", "--interval", "200"],
    );
    let xml_path = root.join(format!("{name}.xml"));
    std::fs::write(&xml_path, &xml).unwrap();
    libvirtd.virsh(&["create", &xml_path.display().to_string()]);
    let _console = Console::accept(&console_listener, root.join("console.log"));
    let awd_pid: i32 = std::fs::read_to_string(root.join("awd.pid"))
        .expect("the hook started awd")
        .trim()
        .parse()
        .unwrap();
    let first = calls();
    assert_eq!(
        first.lines().next(),
        Some(r"start awd@awd\x2dvm1.service qemu=absent"),
        "awd@DOMAIN starts before QEMU does:\n{first}"
    );

    // The hook's awd supervises the domain: the guest's heartbeats reach it.
    let control = root.join("awd.control.sock").display().to_string();
    let deadline = Instant::now() + BOOT;
    loop {
        let (st, out, _) = awd_oneshot(&["status", "--json", "--control", &control]);
        let beats = serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .ok()
            .and_then(|l| l.first().and_then(|w| w["heartbeats"].as_u64()))
            .unwrap_or(0);
        if st.success() && beats > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat reached the hook's awd"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The domain ends: the hook stops awd.
    libvirtd.virsh(&["destroy", name]);
    assert!(
        wait_gone(awd_pid, SHORT),
        "awd@DOMAIN stopped after the domain ended:\n{}",
        calls()
    );
    let all = calls();
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 2, "one start, one stop:\n{all}");
    assert_eq!(
        lines[1], r"stop --no-block awd@awd\x2dvm1.service qemu=absent",
        "{all}"
    );
    let log = std::fs::read_to_string(root.join("hook-awd.log")).unwrap_or_default();
    assert!(
        !log.contains("watchdog expired"),
        "the hook's awd did not fire at a domain that was destroyed:\n{log}"
    );

    // A domain without an awd configuration: the hook does nothing (a direct call, with a
    // name no host has a configuration for).
    let out = Command::new(repo().join("contrib/libvirt/hooks/qemu"))
        .args(["awd-test-no-such-domain", "prepare", "begin", "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        calls(),
        all,
        "no systemctl call for a domain without a config"
    );
}
