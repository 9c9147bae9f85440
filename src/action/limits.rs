//! The action runner's limits and timeouts, in one place, each with why it has its value.
//!
//! They bound what a hung or hostile monitor can cost: a script line never waits forever, a
//! reply never grows without bound, and a queue that only grows is logged.

use std::time::Duration;

/// The time allowed for one line's answer. QEMU answers a QMP command in microseconds unless
/// its main loop is stuck; five seconds is far beyond a healthy answer and short next to the
/// escalation steps that follow an expiry, so a hung QEMU makes a line `unknown`, not a stall.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connection attempts per line before it is given up: enough to ride out a monitor that is
/// restarting (QEMU's socket reappears within a second), few enough that a dead node costs a
/// bounded ~1.5 s per line.
pub const ATTEMPTS: u32 = 3;

/// The pause between connection attempts, and the first eager reconnect after a monitor went
/// away.
pub const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The longest pause between eager reconnects while idle: a node that stays down is retried
/// every 10 s, so the VM-state tracker comes back soon after QEMU does without busy-looping.
pub const MAX_IDLE_BACKOFF: Duration = Duration::from_secs(10);

/// How long a peer of unknown kind has to greet before it is taken for a plain socket. QEMU
/// greets as soon as it accepts; a peer known to be a monitor gets the whole
/// [`CONNECT_TIMEOUT`].
pub const GREETING_TIMEOUT: Duration = Duration::from_millis(1000);

/// The limit on connect + greeting + capability negotiation.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The most HMP output kept for one command: `info` commands print a few kilobytes; anything
/// past 64 KiB is dropped so a monitor that never prints its prompt cannot grow memory.
pub const MAX_HMP_REPLY: usize = 64 * 1024;

/// The longest QMP message accepted. QEMU's replies to awd's commands and its events are
/// small; one megabyte leaves room for `query-*` answers and refuses a runaway peer.
pub const MAX_QMP_MESSAGE: usize = 1 << 20;

/// A backlog at least this deep is logged at warn (rate-limited): 64 waiting script runs on
/// one node means its monitor is far slower than the expiries it has to serve.
pub const DEEP_BACKLOG: usize = 64;

/// The shortest interval between two "backlog is deep" log lines of one node.
pub const DEEP_LOG_INTERVAL: Duration = Duration::from_secs(10);
