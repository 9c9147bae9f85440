//! The guest agent behind `awd-agent`: writes a heartbeat line every interval to the host.
//!
//! Targets:
//!
//! | target | channel |
//! |---|---|
//! | `port:NAME` | the virtio-serial port named NAME (found in `/sys/class/virtio-ports/*/name`) |
//! | `tcp:HOST:PORT` | a TCP connection |
//! | `unix:PATH` | a Unix socket |
//! | `vsock:CID:PORT` | an AF_VSOCK stream (the host is CID 2) |
//!
//! The agent never blocks on the host: writes are non-blocking, a heartbeat that cannot be
//! written is skipped (and counted), and a lost connection is reopened on the next tick. It
//! uses only std and libc, so the static binary stays small.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::protocol::{Decoder, Message};

/// Where the agent sends heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A virtio-serial port, by name.
    Port(String),
    /// `host:port`.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
    /// An AF_VSOCK address.
    Vsock {
        /// The peer CID (2 is the host).
        cid: u32,
        /// The port.
        port: u32,
    },
}

/// A target string that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad target '{0}': use port:NAME, tcp:HOST:PORT, unix:PATH or vsock:CID:PORT")]
pub struct TargetError(String);

impl FromStr for Target {
    type Err = TargetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || TargetError(s.to_owned());
        let (kind, rest) = s.split_once(':').ok_or_else(err)?;
        match kind {
            "port" if !rest.is_empty() => Ok(Target::Port(rest.to_owned())),
            "tcp"
                if rest
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(Target::Tcp(rest.to_owned()))
            }
            "unix" if !rest.is_empty() => Ok(Target::Unix(rest.into())),
            "vsock" => {
                let (cid, port) = rest.split_once(':').ok_or_else(err)?;
                Ok(Target::Vsock {
                    cid: cid.parse().map_err(|_| err())?,
                    port: port.parse().map_err(|_| err())?,
                })
            }
            _ => Err(err()),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Port(n) => write!(f, "port:{n}"),
            Target::Tcp(a) => write!(f, "tcp:{a}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
            Target::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

/// Finds the `/dev` node of the virtio-serial port called `name`, looking under `sysfs`
/// (normally `/sys/class/virtio-ports`).
pub fn find_port(sysfs: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(sysfs).ok()?.flatten() {
        let Ok(n) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if n.trim_end() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// An open channel to the host.
#[derive(Debug)]
enum Conn {
    File(File),
    Tcp(TcpStream),
    Unix(UnixStream),
    Vsock(File),
}

impl Conn {
    fn fd(&self) -> RawFd {
        match self {
            Conn::File(f) | Conn::Vsock(f) => f.as_raw_fd(),
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }

    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::File(f) | Conn::Vsock(f) => f.write(b),
            Conn::Tcp(s) => s.write(b),
            Conn::Unix(s) => s.write(b),
        }
    }

    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::File(f) | Conn::Vsock(f) => f.read(b),
            Conn::Tcp(s) => s.read(b),
            Conn::Unix(s) => s.read(b),
        }
    }
}

/// Connects an AF_VSOCK stream socket to `cid:port`, then makes it non-blocking.
fn vsock_connect(cid: u32, port: u32) -> io::Result<File> {
    // SAFETY: plain socket(2); the result is checked and owned right away.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm and the length matches it.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    set_nonblocking(fd)?;
    Ok(File::from(owned))
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open(target: &Target) -> io::Result<Conn> {
    match target {
        Target::Port(name) => {
            let dev = find_port(Path::new("/sys/class/virtio-ports"), name).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no virtio-serial port named {name}"),
                )
            })?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(dev)?;
            Ok(Conn::File(f))
        }
        Target::Tcp(addr) => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in addr.to_socket_addrs()? {
                match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                    Ok(s) => {
                        s.set_nonblocking(true)?;
                        let _ = s.set_nodelay(true);
                        return Ok(Conn::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        Target::Unix(p) => {
            let s = UnixStream::connect(p)?;
            s.set_nonblocking(true)?;
            Ok(Conn::Unix(s))
        }
        Target::Vsock { cid, port } => vsock_connect(*cid, *port).map(Conn::Vsock),
    }
}

/// How the agent behaves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where heartbeats go.
    pub target: Target,
    /// Time between heartbeats.
    pub interval: Duration,
    /// The line sent each time (without newline).
    pub message: String,
    /// Stop after this many heartbeats were written (tests, one-shot use).
    pub count: Option<u64>,
    /// Exit with an error when no AWD pulse arrived for this long (the host watchdog is gone).
    pub expect_pulses: Option<Duration>,
}

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// `--expect-pulses` and the pulses stopped.
    #[error("no pulse from the host for {0:?}: the host watchdog is gone")]
    PulsesStopped(Duration),
    /// poll(2) failed.
    #[error("poll failed")]
    Poll(#[source] io::Error),
}

/// Counters the agent keeps, printed when it stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AgentStats {
    /// Heartbeats written in full.
    pub sent: u64,
    /// Heartbeats skipped because the host side was absent or not reading.
    pub skipped: u64,
    /// Pulses received from the host.
    pub pulses: u64,
    /// Connections opened.
    pub connects: u64,
}

/// The agent: a connection, a pending partial write, and counters.
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    conn: Option<Conn>,
    pending: Vec<u8>,
    decoder: Decoder,
    stats: AgentStats,
    last_pulse: Instant,
    last_error: Option<String>,
}

impl Agent {
    /// A new agent; nothing is opened until [`run`](Self::run).
    pub fn new(cfg: AgentConfig) -> Self {
        Agent {
            cfg,
            conn: None,
            pending: Vec::new(),
            decoder: Decoder::new(),
            stats: AgentStats::default(),
            last_pulse: Instant::now(),
            last_error: None,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> AgentStats {
        self.stats
    }

    fn note_error(&mut self, what: &str, e: &io::Error) {
        let msg = format!("{what}: {e}");
        if self.last_error.as_deref() != Some(&msg) {
            eprintln!("awd-agent: {msg}");
            self.last_error = Some(msg);
        }
    }

    fn ensure_open(&mut self) {
        if self.conn.is_some() {
            return;
        }
        match open(&self.cfg.target) {
            Ok(c) => {
                self.stats.connects += 1;
                self.last_error = None;
                eprintln!("awd-agent: connected to {}", self.cfg.target);
                self.conn = Some(c);
                self.pending.clear();
                self.decoder = Decoder::new();
            }
            Err(e) => self.note_error(&format!("cannot open {}", self.cfg.target), &e),
        }
    }

    fn drop_conn(&mut self, why: &str) {
        if self.conn.take().is_some() {
            eprintln!("awd-agent: {} closed: {why}", self.cfg.target);
        }
        self.pending.clear();
    }

    /// Writes one heartbeat (or the rest of the previous one). Never blocks.
    fn beat(&mut self) {
        self.ensure_open();
        let Some(conn) = self.conn.as_mut() else {
            self.stats.skipped += 1;
            return;
        };
        let fresh = self.pending.is_empty();
        if fresh {
            self.pending.extend_from_slice(self.cfg.message.as_bytes());
            self.pending.push(b'\n');
        }
        match conn.write(&self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
                if self.pending.is_empty() {
                    self.stats.sent += 1;
                } else if !fresh {
                    self.stats.skipped += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The host side is absent or not reading: skip, do not queue.
                if fresh {
                    self.pending.clear();
                }
                self.stats.skipped += 1;
            }
            Err(e) => {
                self.stats.skipped += 1;
                let why = e.to_string();
                self.drop_conn(&why);
            }
        }
    }

    /// Reads whatever the host sent (pulses) without blocking.
    fn drain_input(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            match conn.read(&mut buf) {
                Ok(0) => {
                    // A virtio-serial port reads 0 while the host side is closed; a socket at EOF.
                    if !matches!(self.cfg.target, Target::Port(_)) {
                        self.drop_conn("closed by the host");
                    }
                    return;
                }
                Ok(n) => {
                    let mut pulses = 0;
                    self.decoder.feed(&buf[..n], |m| {
                        if m == Message::Pulse {
                            pulses += 1;
                        }
                    });
                    if pulses > 0 {
                        self.stats.pulses += pulses;
                        self.last_pulse = Instant::now();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let why = e.to_string();
                    self.drop_conn(&why);
                    return;
                }
            }
        }
    }

    /// Waits until `until`, reading host input as it arrives.
    fn wait(&mut self, until: Instant) -> Result<(), AgentError> {
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            let ms = (until - now).as_millis().min(i32::MAX as u128) as i32;
            match &self.conn {
                Some(c) => {
                    let mut pfd = libc::pollfd {
                        fd: c.fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, count 1.
                    let r = unsafe { libc::poll(&mut pfd, 1, ms.max(1)) };
                    if r < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() != io::ErrorKind::Interrupted {
                            return Err(AgentError::Poll(e));
                        }
                    } else if r > 0 {
                        if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                            self.drain_input();
                        }
                        if pfd.revents & libc::POLLHUP != 0
                            && matches!(self.cfg.target, Target::Port(_))
                        {
                            // Host side closed: poll would spin; sleep out the interval instead.
                            std::thread::sleep(until.saturating_duration_since(Instant::now()));
                        }
                    }
                }
                None => std::thread::sleep(until - now),
            }
        }
    }

    /// Runs until `count` heartbeats were sent, or forever. With `expect_pulses`, fails when
    /// the host's pulses stop.
    pub fn run(&mut self) -> Result<AgentStats, AgentError> {
        let mut next = Instant::now();
        self.last_pulse = Instant::now();
        loop {
            self.beat();
            if let Some(n) = self.cfg.count
                && self.stats.sent >= n
            {
                return Ok(self.stats);
            }
            next += self.cfg.interval;
            let now = Instant::now();
            if next < now {
                next = now; // late (the guest was paused): do not burst to catch up
            }
            self.wait(next)?;
            if let Some(limit) = self.cfg.expect_pulses
                && self.last_pulse.elapsed() > limit
            {
                return Err(AgentError::PulsesStopped(limit));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "port:org.awd.0".parse::<Target>().unwrap(),
            Target::Port("org.awd.0".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:9009".parse::<Target>().unwrap(),
            Target::Tcp("127.0.0.1:9009".into())
        );
        assert_eq!(
            "vsock:2:9009".parse::<Target>().unwrap(),
            Target::Vsock { cid: 2, port: 9009 }
        );
        assert_eq!(
            "unix:/run/x".parse::<Target>().unwrap(),
            Target::Unix("/run/x".into())
        );
        for bad in [
            "",
            "port:",
            "tcp:host",
            "tcp::1",
            "vsock:2",
            "vsock:x:1",
            "serial:/dev/x",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_are_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (dev, name) in [("vport1p1", "other"), ("vport2p1", "org.awd.heartbeat.0")] {
            std::fs::create_dir(dir.path().join(dev)).unwrap();
            std::fs::write(dir.path().join(dev).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_port(dir.path(), "org.awd.heartbeat.0"),
            Some(PathBuf::from("/dev/vport2p1"))
        );
        assert_eq!(find_port(dir.path(), "nope"), None);
    }

    #[test]
    fn heartbeats_reach_a_unix_listener_and_an_absent_host_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut agent = Agent::new(AgentConfig {
            target: Target::Unix(path.clone()),
            interval: Duration::from_millis(1),
            message: "WATCHDOG=1".into(),
            count: None,
            expect_pulses: None,
        });
        agent.beat();
        assert_eq!(
            agent.stats().skipped,
            1,
            "no listener: skipped, not blocked"
        );
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        agent.beat();
        agent.beat();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 22];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"WATCHDOG=1\nWATCHDOG=1\n");
        assert_eq!(agent.stats().sent, 2);
    }

    #[test]
    fn a_host_that_does_not_read_never_blocks_the_agent() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut agent = Agent::new(AgentConfig {
            target: Target::Unix("/unused".into()),
            interval: Duration::from_millis(1),
            message: "x".repeat(1000),
            count: None,
            expect_pulses: None,
        });
        agent.conn = Some(Conn::Unix(ours));
        for _ in 0..2000 {
            agent.beat();
        }
        let s = agent.stats();
        assert!(s.skipped > 0 && s.sent > 0, "{s:?}");
        assert_eq!(s.sent + s.skipped, 2000);
    }

    #[test]
    fn pulses_are_counted_and_their_absence_is_an_error() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut agent = Agent::new(AgentConfig {
            target: Target::Unix("/unused".into()),
            interval: Duration::from_millis(5),
            message: "WATCHDOG=1".into(),
            count: None,
            expect_pulses: Some(Duration::from_millis(50)),
        });
        agent.conn = Some(Conn::Unix(ours));
        theirs
            .write_all(&crate::protocol::frame(crate::protocol::PULSE.as_bytes()))
            .unwrap();
        agent
            .wait(Instant::now() + Duration::from_millis(5))
            .unwrap();
        assert_eq!(agent.stats().pulses, 1);
        let err = agent.run().unwrap_err();
        assert!(matches!(err, AgentError::PulsesStopped(_)), "{err}");
    }
}
