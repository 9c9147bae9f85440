//! Where a heartbeat channel is, as the transports take it: a TCP or Unix socket, server or
//! client, with its connection policy; or a port on awd's vhost-user vsock device. The config
//! module builds these from either syntax; the transports own them.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::cidr::Cidr;

/// Where a socket chardev points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP host and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A validated socket chardev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketChardev {
    /// Its id.
    pub id: String,
    /// Where it listens or connects.
    pub endpoint: Endpoint,
    /// Listen (true) or connect (false).
    pub server: bool,
    /// Client mode: the pause between connection attempts.
    pub reconnect: Duration,
    /// TCP_NODELAY on every connection.
    pub nodelay: bool,
    /// Server mode: the most connections held at once; when full, a new one evicts the
    /// connection silent for longest.
    pub max_connections: usize,
    /// TCP server mode: the allowed peer ranges (empty: any peer).
    pub peers: Vec<Cidr>,
    /// TCP: keepalive and `TCP_USER_TIMEOUT` (`None`: the kernel's defaults).
    pub tcp_user_timeout: Option<Duration>,
    /// Input messages per second that are parsed (`None`: all).
    pub rate_limit: Option<u32>,
    /// Unix sockets: who the peer must be (`SO_PEERCRED`); empty, anyone the file mode lets in.
    pub peer: PeerCred,
    /// TCP: the pre-shared key; the channel then speaks the authenticated framing
    /// (`docs/protocol.md`) and nothing unauthenticated reaches the watchdog.
    pub psk: Option<crate::auth::Key>,
}

/// The credentials a Unix socket's peer must have: its user and group ids as the kernel
/// reports them (`SO_PEERCRED`), so a process that can open the socket file but runs as someone
/// else (another VM's QEMU under libvirt, a user in the socket's group) is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCred {
    /// The user id the peer must run as (`None`: any).
    pub uid: Option<u32>,
    /// The group id the peer must run as (`None`: any).
    pub gid: Option<u32>,
}

impl PeerCred {
    /// Whether this asks for anything.
    pub fn is_any(&self) -> bool {
        self.uid.is_none() && self.gid.is_none()
    }

    /// Whether a peer running as `uid`:`gid` is the one wanted; otherwise what differs.
    pub fn check(&self, uid: u32, gid: u32) -> Result<(), String> {
        match (self.uid, self.gid) {
            (Some(want), _) if want != uid => {
                Err(format!("the peer runs as uid {uid}, not {want}"))
            }
            (_, Some(want)) if want != gid => {
                Err(format!("the peer runs as gid {gid}, not {want}"))
            }
            _ => Ok(()),
        }
    }

    /// Checks the peer of a connected Unix socket. A mismatch, or credentials the kernel will
    /// not give, is a `PermissionDenied` error that says which.
    pub fn verify(&self, s: &tokio::net::UnixStream) -> std::io::Result<()> {
        if self.is_any() {
            return Ok(());
        }
        let cred = s.peer_cred()?;
        self.check(cred.uid(), cred.gid())
            .map_err(|why| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why))
    }
}

/// A validated vhost-user vsock chardev: one listening vsock port on a vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockChardev {
    /// Its id.
    pub id: String,
    /// The vhost-user socket QEMU's `vhost-user-vsock-pci` connects to.
    pub path: PathBuf,
    /// The guest's CID.
    pub guest_cid: u64,
    /// The vsock port awd listens on for this chardev.
    pub port: u32,
    /// Input messages per second that are parsed (`None`: all).
    pub rate_limit: Option<u32>,
    /// Who the QEMU on the vhost-user socket must run as (`SO_PEERCRED`); one value per
    /// device, so every chardev on the same `path` names the same.
    pub peer: PeerCred,
}
