//! The agent's local socket, server side: guest programs connect and write protocol lines,
//! which are checked and relayed to the host over the agent's one channel.

use std::ffi::OsString;
use std::fs::Permissions;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::protocol::{MAX_LINE, Message, Rejection, parse_line};

use super::AgentError;
use super::limits::{REPLY_CAP, SOCKET_MODE};

/// Where the running agent listens for guest programs unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/awd-agent.sock";
/// Why the agent refused a line from a local client. Its [`Display`](std::fmt::Display) is the
/// text after `ERR ` in the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The line is longer than [`MAX_LINE`] bytes.
    LineTooLong,
    /// The line is not UTF-8.
    InvalidUtf8,
    /// The text holds a newline, so it would be two lines (found before sending only).
    Newline,
    /// `CHECKPOINT=` with a name that is not [`valid_name`](crate::util::valid_name).
    NameInvalid,
    /// `CONDITION=` not of the form `name=1` or `name=0` with a valid name.
    ConditionInvalid,
    /// `WATCHDOG_USEC=` or `EXTEND_TIMEOUT_USEC=` not a positive number.
    UsecInvalid,
    /// `STOPPING=` with anything but `1`.
    StoppingInvalid,
    /// Not one of the lines the agent relays.
    NotRelayed,
    /// The host side is absent or not reading: the line was dropped.
    HostUnreachable,
    /// [`MAX_CLIENTS`](super::limits::MAX_CLIENTS) are connected already.
    TooManyClients,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::LineTooLong => "line too long (at most 4096 bytes)",
            Refusal::InvalidUtf8 => "not UTF-8",
            Refusal::Newline => "more than one line",
            Refusal::NameInvalid => "bad name (1 to 64 of A-Z a-z 0-9 _ . : -)",
            Refusal::ConditionInvalid => {
                "bad condition (CONDITION=name=1 or CONDITION=name=0, a name of 1 to 64 of \
                 A-Z a-z 0-9 _ . : -)"
            }
            Refusal::UsecInvalid => {
                "bad WATCHDOG_USEC or EXTEND_TIMEOUT_USEC (a positive number of microseconds)"
            }
            Refusal::StoppingInvalid => "bad STOPPING (only STOPPING=1)",
            Refusal::NotRelayed => {
                "not a relayed line (CHECKPOINT=, CONDITION=, STATUS=, WATCHDOG=1, \
                 WATCHDOG=trigger, WATCHDOG_USEC=, EXTEND_TIMEOUT_USEC=, STOPPING=1)"
            }
            Refusal::HostUnreachable => "host unreachable",
            Refusal::TooManyClients => "too many clients",
        })
    }
}

/// Checks one line (without its `\n`; a trailing `\r` is dropped) from a local client and
/// returns the text to relay, or why it is refused. The agent relays only what means something
/// to the host's watchdog, so a confused program cannot fill the channel with lines the host
/// would merely count as heartbeats.
pub fn relayable(raw: &[u8]) -> Result<&str, Refusal> {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    if raw.len() > MAX_LINE {
        return Err(Refusal::LineTooLong);
    }
    let line = std::str::from_utf8(raw).map_err(|_| Refusal::InvalidUtf8)?;
    if line.contains(['\n', '\r']) {
        return Err(Refusal::Newline);
    }
    match parse_line(raw) {
        Message::Heartbeat if line == "WATCHDOG=1" => Ok(line),
        Message::Trigger
        | Message::SetTimeout(_)
        | Message::ExtendTimeout(_)
        | Message::Stopping
        | Message::Checkpoint(_)
        | Message::Condition(..)
        | Message::Status(_) => Ok(line),
        Message::Rejected(Rejection::BadValue) => Err(match line.split_once('=') {
            Some(("CHECKPOINT", _)) => Refusal::NameInvalid,
            Some(("CONDITION", _)) => Refusal::ConditionInvalid,
            Some(("STOPPING", _)) => Refusal::StoppingInvalid,
            _ => Refusal::UsecInvalid,
        }),
        Message::Rejected(Rejection::InvalidUtf8) => Err(Refusal::InvalidUtf8),
        Message::Rejected(_) => Err(Refusal::LineTooLong),
        Message::Heartbeat | Message::Pulse | Message::PulseReply => Err(Refusal::NotRelayed),
    }
}

/// The local socket the agent opens for guest programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSocket {
    /// Its path; a stale socket file there is replaced.
    pub path: PathBuf,
    /// Whether failing to listen stops the agent. False for the default path, so an agent in a
    /// guest without a writable `/run` still sends heartbeats, as it did before the socket
    /// existed.
    pub required: bool,
}

/// A socket file the agent created: removed when dropped, if it is still the agent's own (a
/// newer agent may have replaced it).
#[derive(Debug)]
pub(super) struct SocketFile {
    pub(super) path: PathBuf,
    /// Device and inode of the socket file, to tell it from a newer agent's.
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The listening local socket.
#[derive(Debug)]
pub(super) struct LocalListener {
    pub(super) listener: UnixListener,
    /// Its file, removed with it.
    _file: SocketFile,
}

/// Binds the local socket at `path` (see [`place_socket`]).
pub(super) fn bind_local(path: &Path) -> Result<LocalListener, AgentError> {
    let (listener, file) = place_socket(
        path,
        |p| UnixStream::connect(p).is_ok(),
        |p| UnixListener::bind(p),
    )?;
    listener
        .set_nonblocking(true)
        .map_err(|source| AgentError::SocketBind {
            path: path.to_owned(),
            source,
        })?;
    Ok(LocalListener {
        listener,
        _file: file,
    })
}

/// Binds a socket at `path` with `bind`: replaces a stale socket file (one `live` says nobody
/// answers on), refuses a live one or anything that is not a socket, and sets the mode before
/// the socket appears under its name (bound under a temporary name, chmod, renamed), so there is
/// no moment when anyone may connect or send.
pub(super) fn place_socket<S>(
    path: &Path,
    live: impl FnOnce(&Path) -> bool,
    bind: impl FnOnce(&Path) -> io::Result<S>,
) -> Result<(S, SocketFile), AgentError> {
    let bind_err = |source| AgentError::SocketBind {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if live(path) {
                return Err(AgentError::SocketInUse(path.to_owned()));
            }
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(bind_err(e)),
            }
        }
        Ok(_) => {
            return Err(bind_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let name = path.file_name().ok_or_else(|| {
        bind_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path names no file",
        ))
    })?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let socket = bind(&tmp).map_err(bind_err)?;
    let placed = std::fs::set_permissions(&tmp, Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| std::fs::symlink_metadata(path));
    match placed {
        Ok(m) => Ok((
            socket,
            SocketFile {
                path: path.to_owned(),
                id: (m.dev(), m.ino()),
            },
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(bind_err(e))
        }
    }
}

/// A guest program connected to the local socket.
#[derive(Debug)]
pub(crate) struct LocalClient {
    pub(super) stream: UnixStream,
    /// The line received so far, at most [`MAX_LINE`] bytes.
    pub(super) line: Vec<u8>,
    /// Inside an over-long line (already refused): dropping bytes up to the next newline.
    pub(super) discarding: bool,
    /// Replies not written yet, at most [`REPLY_CAP`] bytes.
    pub(super) reply: Vec<u8>,
    /// The client shut its side; it is closed once its replies are out.
    pub(super) eof: bool,
    /// Reading or writing failed: close it.
    pub(super) dead: bool,
}

impl LocalClient {
    pub(crate) fn new(stream: UnixStream) -> Self {
        LocalClient {
            stream,
            line: Vec::new(),
            discarding: false,
            reply: Vec::new(),
            eof: false,
            dead: false,
        }
    }

    /// Queues the answer to one line, unless the client has left too many unread.
    pub(super) fn answer(&mut self, r: Result<(), Refusal>) {
        let text = match r {
            Ok(()) => "OK\n".to_owned(),
            Err(why) => format!("ERR {why}\n"),
        };
        if self.reply.len() + text.len() <= REPLY_CAP {
            self.reply.extend_from_slice(text.as_bytes());
        }
    }

    /// Writes queued replies as far as the socket takes them. Never blocks.
    pub(super) fn flush(&mut self) {
        while !self.reply.is_empty() {
            match (&self.stream).write(&self.reply) {
                Ok(0) => {
                    self.dead = true;
                    return;
                }
                Ok(n) => {
                    self.reply.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
    }

    /// Whether the client can be closed.
    pub(super) fn done(&self) -> bool {
        self.dead || (self.eof && self.reply.is_empty())
    }
}
