//! Where the agent sends: the targets and how each is opened, non-blocking.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

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
pub(super) enum Conn {
    File(File),
    Tcp(TcpStream),
    Unix(UnixStream),
    Vsock(File),
}

impl Conn {
    pub(super) fn fd(&self) -> RawFd {
        match self {
            Conn::File(f) | Conn::Vsock(f) => f.as_raw_fd(),
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }

    pub(super) fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::File(f) | Conn::Vsock(f) => f.write(b),
            Conn::Tcp(s) => s.write(b),
            Conn::Unix(s) => s.write(b),
        }
    }

    pub(super) fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::File(f) | Conn::Vsock(f) => f.read(b),
            Conn::Tcp(s) => s.read(b),
            Conn::Unix(s) => s.read(b),
        }
    }
}

/// Runs the client's half of the `psk=` handshake (`docs/protocol.md`) on a freshly connected
/// TCP socket, blocking for at most the handshake timeout, and leaves it non-blocking.
pub(super) fn authenticate(
    s: &TcpStream,
    key: &crate::auth::Key,
) -> io::Result<crate::auth::Session> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let session = crate::auth::handshake_blocking(&mut &*s, key, crate::auth::Role::Client)?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    s.set_nonblocking(true)?;
    Ok(session)
}

/// Connects an AF_VSOCK stream socket to `cid:port`, then makes it non-blocking.
pub(super) fn vsock_connect(cid: u32, port: u32) -> io::Result<File> {
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

pub(super) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn set_blocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn open(target: &Target) -> io::Result<Conn> {
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
