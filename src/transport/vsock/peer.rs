//! Who is on the other end of the vhost-user connection the device just accepted.
//!
//! vhost-user-backend accepts QEMU's connection itself and keeps the socket to itself, so
//! awd finds it among its own descriptors: a connected (not listening) Unix socket whose local
//! address is the device's path is, by construction, a connection accepted on that path's
//! listener. The device serves nothing until the check has passed (the backend is held, see
//! `VsockBackend::hold`), so the moments between the accept and the check give a peer that is
//! then refused no heartbeat.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The user and group id of the process that connected to the vhost-user socket at `path`
/// (`SO_PEERCRED`, as the kernel recorded it at connect). An error when no such connection is
/// open, or when two are open with different credentials (the device serves one at a time).
pub fn accepted_peer(path: &Path) -> io::Result<(u32, u32)> {
    let want = path.as_os_str().as_bytes();
    let mut found: Option<(u32, u32)> = None;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        // A descriptor closed (or reused) meanwhile simply fails one of these and is skipped.
        if local_path(fd).as_deref() != Some(want) || is_listening(fd) != Some(false) {
            continue;
        }
        let Some(cred) = peer_cred(fd) else {
            continue;
        };
        match found {
            Some(seen) if seen != cred => {
                return Err(io::Error::other(format!(
                    "two connections on {} from different users",
                    path.display()
                )));
            }
            _ => found = Some(cred),
        }
    }
    found.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no connection accepted on {} is open", path.display()),
        )
    })
}

/// The path a Unix socket is bound to (for an accepted connection: its listener's path).
fn local_path(fd: RawFd) -> Option<Vec<u8>> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname(2) writes at most `len` bytes into `addr`, which is that large.
    let rc = unsafe {
        libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_un).cast::<libc::sockaddr>(),
            &mut len,
        )
    };
    if rc != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return None;
    }
    let offset = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    let n = (len as usize)
        .saturating_sub(offset)
        .min(addr.sun_path.len());
    Some(
        addr.sun_path[..n]
            .iter()
            .map(|&c| c as u8)
            .take_while(|&c| c != 0)
            .collect(),
    )
}

/// Whether a socket is a listener (`SO_ACCEPTCONN`); `None` if it is not a socket.
fn is_listening(fd: RawFd) -> Option<bool> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes one c_int into `v`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(v != 0)
}

/// The peer's user and group id (`SO_PEERCRED`).
fn peer_cred(fd: RawFd) -> Option<(u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes one ucred into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((cred.uid, cred.gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn the_accepted_connection_is_found_by_its_listeners_path_and_names_its_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vhost.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // The listener alone (same local path, but listening) is no connection.
        let err = accepted_peer(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        // A connection accepted on another path is not this device's.
        let other = dir.path().join("other.sock");
        let other_listener = UnixListener::bind(&other).unwrap();
        let _c2 = UnixStream::connect(&other).unwrap();
        let _a2 = other_listener.accept().unwrap();

        let _client = UnixStream::connect(&path).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        // SAFETY: plain getters.
        let me = unsafe { (libc::geteuid(), libc::getegid()) };
        assert_eq!(accepted_peer(&path).unwrap(), me);
    }
}
