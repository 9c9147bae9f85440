//! The guest agent's limits, in one place, each with why it has its value. They keep a
//! runaway or hostile program in the guest from costing the agent its heartbeat: the agent
//! is the one thing that proves the guest alive.

use std::time::Duration;

/// The most local clients served at once; one more is answered `ERR too many clients` and
/// closed, so a runaway program cannot use up the agent's descriptors.
pub const MAX_CLIENTS: usize = 16;
/// The local socket's file mode: root and its group only, as it reaches the host's watchdog.
pub const SOCKET_MODE: u32 = 0o660;
/// Replies a client has not read yet, at most; more are dropped (a fire-and-forget client never
/// reads them, and must not make the agent buffer without bound).
pub const REPLY_CAP: usize = 4096;
/// Bytes read from one client per wake-up, so a client that writes without pause cannot hold
/// the loop past a heartbeat's time.
pub const READ_BUDGET: usize = 64 * 1024;
/// The least time between two attempts to reopen the host channel for a relayed line (a
/// heartbeat always tries), so a client that sends many lines while the host is absent does not
/// turn into a connect storm.
pub const REOPEN_GAP: Duration = Duration::from_millis(100);

/// How long to wait for the agent's answer to a line; the agent answers at once unless it
/// is stuck, and a stuck agent must not hang the program that reports.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest answer read: the agent answers `OK` or `ERR reason`, a few dozen bytes, so a
/// kilobyte refuses anything that is not the agent without a cost.
pub const MAX_REPLY: u64 = 1024;

/// The longest notify datagram taken, systemd's own limit (`NOTIFY_BUFFER_MAX`, one page): a
/// longer one is dropped and counted, never read in part.
pub const MAX_DATAGRAM: usize = 4096;
/// Notify datagrams received per wake-up, so a daemon that sends without pause cannot hold the
/// loop: the rest wait in the socket's queue, and the kernel drops what does not fit there.
pub const NOTIFY_BUDGET: usize = 256;
/// How long a notify datagram the host cannot take yet is held (and the socket left unread, so
/// later datagrams wait in the kernel's queue, in order) before it is dropped and counted. A
/// slow host loses nothing; a hung one costs the daemon at most this long in a blocking
/// `sd_notify` once the queue is full.
pub const NOTIFY_HOLD: Duration = Duration::from_secs(2);
