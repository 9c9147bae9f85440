//! Every bound and tunable of the vsock device, with the reason for its value.
//!
//! The guest is hostile, so each queue or table the guest can make grow has a bound here; the
//! rest are timings. Protocol constants (queue indices, op codes, the header size, the host
//! CID) are not choices and live with the protocol ([`super::packet`], [`super::device`]).

use std::time::Duration;

// ---- virtqueues and packets ----

/// Largest queue the frontend may configure. QEMU's vhost-user-vsock asks for 128; twice that
/// leaves room for a frontend that asks for more, while keeping [`TRACKED_SLOTS`], which must
/// cover every descriptor slot of a queue, a 32-byte bitmap on the stack.
pub const MAX_QUEUE_SIZE: usize = 256;

/// Largest payload accepted in one tx packet, however many descriptors it is spread over, and
/// the largest rx data buffer accepted. Linux never sends more than 64 KiB in one packet
/// (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`) nor posts bigger rx buffers, so anything larger is a
/// lying guest; the device's one reused tx payload buffer is this big.
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;

/// Descriptor slots remembered to detect a chain that loops back on itself: a direct chain
/// lives in a queue of at most [`MAX_QUEUE_SIZE`] descriptors. Larger indices can only come
/// from an indirect table, a feature awd does not offer, and are bounded by the chain
/// iterator's own limit.
pub const TRACKED_SLOTS: usize = MAX_QUEUE_SIZE;

// The loop detector keeps one bit per slot in 64-bit words.
const _: () = assert!(TRACKED_SLOTS % 64 == 0);

/// Rounds of "process, re-enable notifications, look again" per wake-up and queue. A
/// well-behaved guest needs one or two; the bound stops a guest whose ring indices make the
/// queue look non-empty forever from holding the worker thread (and every other port).
pub const MAX_ROUNDS: usize = 16;

// ---- connections and credit ----

/// Most guest connections one device holds; further requests get OP_RST. A guest agent needs
/// one connection per port; 64 is far more than a well-behaved guest opens, and bounds what a
/// request flood makes awd hold (an intake and an outbox each) and the linear search every tx
/// packet does over the open connections.
pub const MAX_CONNECTIONS: usize = 64;

/// The receive buffer awd advertises to the guest for each connection. awd consumes guest
/// bytes the moment they arrive, so the window only sets how often credit updates are due;
/// one [`MAX_PKT_PAYLOAD`] lets the guest always send a largest packet.
pub const BUF_ALLOC: u32 = 64 * 1024;

/// Once this many consumed bytes have not been reported to the guest, an OP_CREDIT_UPDATE is
/// due. A quarter window: the guest still has three quarters of its credit when the update
/// is queued, so it never stalls waiting for one, and a guest streaming at full speed costs
/// one extra rx packet per 16 KiB.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Most bytes a connection's outbox holds; a watchdog's write beyond it is refused with
/// `Full`. Pulses are a few dozen bytes, so this holds hundreds of them; a guest that stops
/// reading cannot make awd buffer more than this per connection.
pub const OUTBOX_MAX_BYTES: usize = 16 * 1024;

/// Most separate writes a connection's outbox holds, whatever their size: each is its own
/// rx packet, and a guest that stops reading should not make awd keep more than a handful of
/// seconds' worth of pulses.
pub const OUTBOX_MAX_CHUNKS: usize = 64;

// ---- the rx queue ----

/// Most control packets (resets) waiting for guest rx buffers; more are dropped and counted.
/// One full rx queue's worth ([`MAX_QUEUE_SIZE`]): a guest that posts a full queue of buffers
/// gets every reset, and one that floods requests without posting any cannot grow the queue.
pub const MAX_CONTROL: usize = MAX_QUEUE_SIZE;

// ---- events to the watchdogs ----

/// Most events waiting for one watchdog's full channel, on top of the channel itself (1,024
/// events, `daemon::limits::EVENT_QUEUE`). Past it, signals are counted as heartbeats instead
/// (still proof of life) and new connections to that port are refused; connection events are
/// never dropped. A watchdog has to fall two channels behind before anything is coalesced.
pub const MAX_BACKLOG: usize = 1024;

/// How soon a full watchdog channel is retried. Short next to any watchdog timeout, so a
/// watchdog that catches up hears the waiting events at once; long enough that a stuck one
/// costs at most a hundred wake-ups a second.
pub const RETRY_DELAY: Duration = Duration::from_millis(10);

// ---- logs ----

/// Log lines about malformed guest input (and, separately, about refused connections) allowed
/// at once. A hostile guest can produce bad input as fast as it likes; a few lines show what
/// it does, the suppressed count says how much more.
pub const LOG_BURST: u32 = 5;

/// How often one more such log line is allowed after the burst.
pub const LOG_PERIOD: Duration = Duration::from_secs(10);

// ---- the serving thread ----

/// Between QEMU frontends, how often (milliseconds) the serving thread retries events waiting
/// for a full watchdog channel. Nobody else retries them then; twice [`RETRY_DELAY`] keeps a
/// waiting heartbeat's lateness far below any timeout at a negligible wake-up cost.
pub const IDLE_RETRY_MS: i32 = 20;

/// Pause after a failed wait for QEMU (an epoll error other than EINTR): the error is logged
/// each time, so a persistent one must not spin a core or flood the log.
pub const WAIT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Pause after failing to set up for a QEMU connection (out of memory or descriptors): longer,
/// since the cause is outside awd and unlikely to pass within milliseconds.
pub const SETUP_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// How long a stopping device waits for the vring worker threads to let go of the backend.
/// A worker's loop returns within one epoll round once told to stop; two seconds only passes
/// when one is wedged, which is logged.
pub const WORKER_STOP_WAIT: Duration = Duration::from_secs(2);
