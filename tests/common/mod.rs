//! Harness for end-to-end tests against a real `qemu-system-x86_64` booting the project's guest
//! image (`scripts/build-guest`), and real `awd` processes.
//!
//! Nothing here sleeps to wait: every wait is for an event (a console line, a trace line, a log
//! record, a process exit) with a generous bound. Children are killed on drop, and when a test
//! fails their logs are printed.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod colo;
pub mod netns;
pub mod pacemaker;

/// The bound for anything that involves a guest booting under TCG on a loaded machine.
pub const BOOT: Duration = Duration::from_secs(120);
/// The bound for an event that should follow within seconds.
pub const SHORT: Duration = Duration::from_secs(30);

/// The directory holding `vmlinuz` and `initramfs.cpio.gz`.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("AWD_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest"));
    assert!(
        dir.join("vmlinuz").exists() && dir.join("initramfs.cpio.gz").exists(),
        "no guest image in {}: run scripts/build-guest first (scripts/test does)",
        dir.display()
    );
    dir
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether KVM can be used: /dev/kvm writable *and* the CPU shows vmx or svm (the nested
/// backend on some hosts has /dev/kvm but cannot boot a stock kernel).
pub fn kvm_usable() -> bool {
    let writable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    writable && cpuinfo.split_whitespace().any(|w| w == "vmx" || w == "svm")
}

/// The accelerator arguments for this machine.
pub fn accel_args() -> Vec<String> {
    if kvm_usable() {
        vec!["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]
    } else {
        vec!["-accel".into(), "tcg".into(), "-cpu".into(), "max".into()]
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Lines read from a child's pipe, kept for the failure report and delivered in order.
pub struct LineStream {
    rx: Receiver<String>,
    /// Every line so far, with the instant it was read.
    all: Arc<Mutex<Vec<(Instant, String)>>>,
    /// Lines received but not matched yet, in arrival order.
    pending: std::collections::VecDeque<String>,
}

impl LineStream {
    fn spawn<R: Read + Send + 'static>(r: R, mirror: Option<PathBuf>) -> LineStream {
        let (tx, rx): (Sender<String>, Receiver<String>) = channel();
        let all = Arc::new(Mutex::new(Vec::new()));
        let all2 = all.clone();
        std::thread::spawn(move || {
            let mut file = mirror.and_then(|p| std::fs::File::create(p).ok());
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                        if let Some(f) = file.as_mut() {
                            let _ = writeln!(f, "{line}");
                        }
                        all2.lock().unwrap().push((Instant::now(), line.clone()));
                        if tx.send(line).is_err() {
                            // Nobody listens any more; keep draining so the child never blocks.
                        }
                    }
                }
            }
        });
        LineStream {
            rx,
            all,
            pending: Default::default(),
        }
    }

    /// Waits for a line matching `pred` and takes it. Lines that do not match stay for later
    /// waits, so events from concurrent tasks may be awaited in any order; to assert an order,
    /// compare [`LineStream::position`]s.
    pub fn wait(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        match self.try_wait(timeout, pred) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("timed out after {timeout:?} waiting for {what}")
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("stream ended while waiting for {what}")
            }
        }
    }

    /// [`LineStream::wait`] that reports a timeout or the end of the stream instead of
    /// failing the test, for a harness that goes on and judges it later.
    pub fn try_wait(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, RecvTimeoutError> {
        if let Some(i) = self.pending.iter().position(|l| pred(l)) {
            return Ok(self.pending.remove(i).expect("index from position"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.rx.recv_timeout(left)?;
            if pred(&line) {
                return Ok(line);
            }
            self.pending.push_back(line);
        }
    }

    /// The index of the first line so far matching `pred`.
    pub fn position(&self, pred: impl Fn(&str) -> bool) -> Option<usize> {
        self.all.lock().unwrap().iter().position(|(_, l)| pred(l))
    }

    /// Waits for the stream to end (the child closed its end, normally by exiting).
    pub fn wait_eof(&mut self, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => self.pending.push_back(l),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("timed out after {timeout:?} waiting for {what} to exit")
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Every line so far (including unconsumed ones).
    pub fn all(&self) -> Vec<String> {
        self.all
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Every line so far with the instant it was read (a witness's clock: the reader thread
    /// takes each line as the child writes it).
    pub fn all_timed(&self) -> Vec<(Instant, String)> {
        self.all.lock().unwrap().clone()
    }

    /// Forgets the lines received and not yet matched, so that later waits match only lines
    /// that arrive from now on.
    pub fn skip_pending(&mut self) {
        self.pending.clear();
        while self.rx.try_recv().is_ok() {}
    }

    /// Lines read from any reader (a socket, a child's pipe), mirrored to `mirror` if given.
    pub fn from_reader<R: Read + Send + 'static>(r: R, mirror: Option<PathBuf>) -> LineStream {
        LineStream::spawn(r, mirror)
    }
}

/// A QEMU process running the test guest.
pub struct Qemu {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    /// The serial console (QEMU's stdout).
    pub console: LineStream,
    /// QEMU's stderr: trace records of every QMP/HMP command that reached it.
    pub trace: LineStream,
    marker: u32,
}

/// How to start a guest.
pub struct QemuOpts {
    /// A name for logs.
    pub name: String,
    /// Arguments for awd-agent in the guest (`None`: no agent).
    pub agent: Option<Vec<String>>,
    /// Further QEMU arguments (monitors, chardevs, devices).
    pub args: Vec<String>,
    /// Guest memory, e.g. "256M". With `memfd`, the memory is a shared memfd backend (vhost-user).
    pub memory: &'static str,
    /// Use a shared memfd memory backend (required by vhost-user devices).
    pub memfd: bool,
    /// Boot the guest kernel (false: `-machine none`, for a QEMU that is only a QMP target).
    pub kernel: bool,
    /// More kernel command-line words (e.g. `awd_delay=5`: the agent starts 5 s after boot).
    pub append: String,
    /// `-no-reboot` (the default): a guest reboot or `system_reset` ends QEMU. Off, the guest
    /// reboots in place, as on a host.
    pub no_reboot: bool,
    /// The initramfs in the guest directory (`initramfs-notify.cpio.gz`: with systemd-notify).
    pub initrd: &'static str,
}

impl QemuOpts {
    /// A guest named `name` with default settings.
    pub fn new(name: &str) -> Self {
        QemuOpts {
            name: name.into(),
            agent: None,
            args: Vec::new(),
            memory: "256M",
            memfd: false,
            kernel: true,
            append: String::new(),
            no_reboot: true,
            initrd: "initramfs.cpio.gz",
        }
    }
}

/// Reads an argument file from `qemu-args/` (one argument or `-opt value` pair per line, `#`
/// comments), substituting `/run/awd` with `rundir`.
pub fn qemu_args_file(name: &str, rundir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("qemu-args").join(name)).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        for word in line.split_whitespace() {
            out.push(word.replace("/run/awd", &rundir.display().to_string()));
        }
    }
    out
}

impl Qemu {
    /// Starts QEMU. The console and trace are mirrored to files in `dir`.
    pub fn start(dir: &Path, opts: QemuOpts) -> Qemu {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-nodefaults", "-display", "none", "-no-user-config"]);
        if opts.no_reboot {
            cmd.arg("-no-reboot");
        }
        if opts.kernel {
            let g = guest_dir();
            cmd.args(accel_args());
            cmd.args(["-m", opts.memory]);
            if opts.memfd {
                cmd.args([
                    "-object",
                    &format!("memory-backend-memfd,id=mem,size={},share=on", opts.memory),
                    "-numa",
                    "node,memdev=mem",
                ]);
            }
            let mut append = "console=ttyS0 quiet panic=-1".to_string();
            if let Some(a) = &opts.agent {
                append.push_str(&format!(" awd_agent={}", a.join(",")));
            }
            if !opts.append.is_empty() {
                append.push(' ');
                append.push_str(&opts.append);
            }
            cmd.arg("-kernel")
                .arg(g.join("vmlinuz"))
                .arg("-initrd")
                .arg(g.join(opts.initrd));
            cmd.args(["-append", &append, "-serial", "stdio"]);
        } else {
            cmd.args(["-machine", "none"]);
        }
        cmd.args([
            "-trace",
            "handle_qmp_command",
            "-trace",
            "handle_hmp_command",
        ]);
        cmd.args(&opts.args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("qemu-system-x86_64 starts (is qemu-system-x86 installed?)");
        let console = LineStream::spawn(
            child.stdout.take().unwrap(),
            Some(dir.join(format!("{}.console", opts.name))),
        );
        let trace = LineStream::spawn(
            child.stderr.take().unwrap(),
            Some(dir.join(format!("{}.trace", opts.name))),
        );
        let stdin = child.stdin.take();
        Qemu {
            name: opts.name,
            child,
            stdin,
            console,
            trace,
            marker: 0,
        }
    }

    /// Waits for the guest's init to report ready.
    pub fn wait_ready(&mut self) {
        self.console
            .wait("guest ready", BOOT, |l| l.contains("AWD-GUEST: ready"));
    }

    /// Runs a shell command on the guest console and waits for it to finish.
    pub fn run(&mut self, shell: &str, timeout: Duration) {
        self.marker += 1;
        let mark = format!("AWD-MARK-{}", self.marker);
        let stdin = self.stdin.as_mut().expect("console stdin");
        // The marker is split so the echoed command line does not match it.
        writeln!(stdin, "{shell}; echo AWD-MARK-\"{}\"", self.marker).unwrap();
        stdin.flush().unwrap();
        self.console
            .wait(&format!("`{shell}` to finish"), timeout, |l| {
                // Agent output may share the line; "AWD-MARK-1" must not match "AWD-MARK-12".
                l.split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
                    .any(|w| w == mark)
            });
    }

    /// Waits for a trace record containing `needle`; returns it.
    pub fn wait_trace(&mut self, needle: &str, timeout: Duration) -> String {
        self.trace.wait(&format!("trace `{needle}`"), timeout, |l| {
            l.contains(needle)
        })
    }

    /// Waits for QEMU to exit (its stdout closing is the event).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let name = self.name.clone();
        self.console.wait_eof(&name, timeout);
        self.child.wait().unwrap()
    }

    /// Kills QEMU at once (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Qemu {
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

/// An `awd` process with JSON logs on stderr.
pub struct Awd {
    pub name: String,
    child: Child,
    /// Log records, one JSON object per line.
    pub log: LineStream,
    /// Its control socket.
    pub control: PathBuf,
}

/// The path of the awd binary under test.
pub fn awd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_awd"))
}

/// The path of the (host-built) awd-agent binary under test.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_awd-agent"))
}

impl Awd {
    /// Starts `awd run ARGS --log-format json`, logs mirrored to `dir/NAME.log`.
    pub fn run(dir: &Path, name: &str, args: &[String]) -> Awd {
        Self::run_env(dir, name, args, &[])
    }

    /// [`Awd::run`] with extra environment variables.
    pub fn run_env(dir: &Path, name: &str, args: &[String], env: &[(&str, &str)]) -> Awd {
        Self::spawn(dir, name, args, env, None)
    }

    /// [`Awd::run`] inside the network namespace `netns` (`ip netns exec` execs awd, so the
    /// pid is awd's and signals reach it).
    pub fn run_in_netns(dir: &Path, name: &str, args: &[String], netns: &str) -> Awd {
        Self::spawn(dir, name, args, &[], Some(netns))
    }

    fn spawn(
        dir: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        netns: Option<&str>,
    ) -> Awd {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(awd_bin());
                c
            }
            None => Command::new(awd_bin()),
        };
        cmd.envs(env.iter().copied());
        cmd.arg("run")
            .args(args)
            .args(["--log-format", "json", "--log", "awd=debug"]);
        if !args.iter().any(|a| a == "--control") {
            // Never the host-wide default: tests run side by side.
            cmd.arg("--control")
                .arg(dir.join(format!("{name}.control.sock")));
        }
        let mut child = cmd
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("awd starts");
        let log = LineStream::spawn(
            child.stderr.take().unwrap(),
            Some(dir.join(format!("{name}.log"))),
        );
        let control = args
            .iter()
            .position(|a| a == "--control")
            .map(|i| PathBuf::from(&args[i + 1]))
            .unwrap_or_else(|| dir.join(format!("{name}.control.sock")));
        Awd {
            name: name.into(),
            child,
            log,
            control,
        }
    }

    /// Waits for a log record for which `pred` holds; returns it.
    pub fn wait(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let line = self.log.wait(what, timeout, |l| {
            serde_json::from_str::<Value>(l)
                .map(|v| pred(&v))
                .unwrap_or(false)
        });
        serde_json::from_str(&line).unwrap()
    }

    /// Waits for a record with `message` == `msg` (and `watchdog` == `wd` when given).
    pub fn wait_msg(&mut self, msg: &str, wd: Option<&str>, timeout: Duration) -> Value {
        self.wait(&format!("log `{msg}` for {wd:?}"), timeout, |v| {
            v["message"].as_str().is_some_and(|m| m.starts_with(msg))
                && wd.is_none_or(|w| v["watchdog"].as_str() == Some(w))
        })
    }

    /// Every record so far that satisfies `pred`.
    pub fn records(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.log
            .all()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| pred(v))
            .collect()
    }

    /// Runs `awd ARGS --control SOCKET` against this awd; returns (status, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let mut full: Vec<&str> = args.to_vec();
        let control = self.control.display().to_string();
        full.extend(["--control", &control]);
        awd_oneshot(&full)
    }

    /// `awd status --json`: one object per watchdog, by id.
    pub fn status(&self) -> std::collections::BTreeMap<String, Value> {
        let (st, out, err) = self.ctl(&["status", "--json"]);
        assert!(st.success(), "awd status failed: {err}");
        let list: Vec<Value> = serde_json::from_str(&out).expect("status JSON");
        list.into_iter()
            .map(|w| (w["id"].as_str().unwrap().to_owned(), w))
            .collect()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit (its stderr closing is the event).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let name = self.name.clone();
        self.log.wait_eof(&name, timeout);
        self.child.wait().unwrap()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// SIGKILL.
pub const SIGKILL: i32 = 9;
/// SIGTERM.
pub const SIGTERM: i32 = 15;
/// SIGHUP.
pub const SIGHUP: i32 = 1;

impl Drop for Awd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("===== awd {} log =====", self.name);
            for l in self.log.all() {
                eprintln!("{l}");
            }
        }
    }
}

/// Runs `awd ARGS` to completion; returns (exit status, stdout, stderr).
pub fn awd_oneshot(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(awd_bin()).args(args).output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A scratch directory for one test, kept on failure for inspection.
pub fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("awd-{name}-"))
        .tempdir()
        .unwrap()
}

/// Writes a script file and returns its path.
pub fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Sends one QMP command on a monitor socket of the test's own (not awd's) and returns the
/// reply line.
pub fn qmp(path: &Path, command: &str) -> Value {
    qmp_json(path, &serde_json::json!({ "execute": command }))
}

/// [`qmp`] with a whole command object (arguments too).
pub fn qmp_json(path: &Path, command: &Value) -> Value {
    use std::os::unix::net::UnixStream;
    let s = UnixStream::connect(path).expect("test QMP socket");
    s.set_read_timeout(Some(SHORT)).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // greeting
    writeln!(w, "{{\"execute\": \"qmp_capabilities\"}}").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    writeln!(w, "{command}").unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        if v.get("return").is_some() || v.get("error").is_some() {
            return v;
        }
    }
}

/// `GET /metrics` from awd's metrics endpoint on 127.0.0.1:`port`; returns the response.
pub fn scrape(port: u16) -> String {
    use std::net::TcpStream;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(SHORT)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of the series whose line starts with `series` (name and labels), or 0.
pub fn series(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Owned arguments from string literals.
pub fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// How many times `wd` has logged "watchdog expired" so far.
pub fn expiries(awd: &Awd, wd: &str) -> usize {
    awd.records(|v| v["message"] == "watchdog expired" && v["watchdog"] == wd)
        .len()
}

/// An argument list without its `-chardev …awdmon…` / `-mon chardev=awdmon…` option pairs (the
/// monitor awd would use), for runs that need no QMP.
pub fn without_monitor(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.into_iter();
    while let Some(opt) = it.next() {
        let value = it.next().unwrap_or_default();
        if !value.contains("awdmon") {
            out.push(opt);
            out.push(value);
        }
    }
    out
}
