//! The socket transports' limits and defaults, in one place, each with why it has its value.
//! (The vhost-user vsock device keeps its own in [`vsock::limits`](super::vsock).)

use std::time::Duration;

/// Connections a server channel holds unless `max_connections` says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;

/// The most `max_connections` may be: each connection holds a file descriptor.
pub const MAX_MAX_CONNECTIONS: u32 = 4096;

/// `tcp_user_timeout` unless configured: a TCP peer that stops acknowledging (its host gone
/// without a FIN) is noticed within this many milliseconds.
pub const DEFAULT_TCP_USER_TIMEOUT_MS: u64 = 5000;

/// A connection whose peer does not read its pulses for this long is closed: a pulse is a few
/// dozen bytes, so a socket buffer that stays full this long belongs to a peer that is gone or
/// hostile, and holding it would stall nothing but cost a slot.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Read buffer per connection: two pages hold hundreds of heartbeat lines, so a burst is one
/// read, and 64 connections cost half a megabyte at most.
pub const READ_CHUNK: usize = 8 * 1024;
