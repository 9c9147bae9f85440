//! The unchecked records both syntaxes produce: [`seed`](super::seed) parses `-chardev` and
//! `-object` strings into them, [`file`](super::file) deserialises TOML tables into them.
//! Nothing here is validated; [`Config::build`](super::Config::build) does that.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, seed, supervision};

/// A chardev as written, before validation. Field names follow QEMU's keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawChardev {
    /// The id (the TOML table name).
    #[serde(skip)]
    pub id: String,
    /// `socket` or `vhost-user-vsock`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// TCP host.
    pub host: Option<String>,
    /// TCP port, or the vsock port for `vhost-user-vsock`.
    pub port: Option<u32>,
    /// Unix socket path (for `vhost-user-vsock`: the vhost-user socket QEMU connects to).
    pub path: Option<PathBuf>,
    /// Listen (`on`) or connect (`off`).
    pub server: Option<bool>,
    /// QEMU's wait flag; accepted, awd never blocks startup on a peer.
    pub wait: Option<bool>,
    /// Seconds between connection attempts in client mode.
    pub reconnect: Option<u64>,
    /// TCP_NODELAY.
    pub nodelay: Option<bool>,
    /// The guest's CID, for `vhost-user-vsock`.
    #[serde(rename = "guest-cid", alias = "guest_cid")]
    pub guest_cid: Option<u64>,
    /// Server mode: the most connections held at once (seed `max-connections`).
    #[serde(alias = "max-connections")]
    pub max_connections: Option<u32>,
    /// TCP server mode: the peer addresses allowed to connect, as ranges (seed: `peers=`,
    /// repeated for each range).
    pub peers: Option<Vec<String>>,
    /// TCP: milliseconds of unacknowledged data or unanswered keepalive probes before the
    /// connection is dropped; 0 leaves both to the kernel (seed `tcp-user-timeout`).
    #[serde(alias = "tcp-user-timeout")]
    pub tcp_user_timeout: Option<u64>,
    /// Input messages per second that are parsed; the rest still prove life (seed `rate-limit`).
    #[serde(alias = "rate-limit")]
    pub rate_limit: Option<u32>,
    /// Unix sockets: the only user id a peer may run as, checked with `SO_PEERCRED` (seed
    /// `peer-uid`).
    #[serde(alias = "peer-uid")]
    pub peer_uid: Option<u32>,
    /// Unix sockets: the only group id a peer may run as (seed `peer-gid`).
    #[serde(alias = "peer-gid")]
    pub peer_gid: Option<u32>,
    /// TCP: the pre-shared key file; the channel then speaks the authenticated framing of
    /// `docs/protocol.md` (seed `psk`, TOML `psk_file`).
    #[serde(alias = "psk")]
    pub psk_file: Option<std::path::PathBuf>,
    /// Where it came from, for error messages.
    #[serde(skip)]
    pub origin: String,
}

fn default_backend() -> String {
    "socket".into()
}

/// An `advanced-watchdog` object as written, before validation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatchdog {
    /// The id (the TOML table name).
    #[serde(skip)]
    pub id: String,
    /// Pulse sender (`on`) or pulse replier (`off`); defaults to the awd_node's mode.
    pub server: Option<bool>,
    /// The chardev heartbeats arrive on.
    pub awd_node: Option<String>,
    /// The chardev the script is sent to.
    pub notification_node: Option<String>,
    /// The script file.
    pub opt_script: Option<PathBuf>,
    /// The script inline (TOML only), one command per element.
    pub script: Option<Vec<String>>,
    /// Milliseconds between pulses.
    pub pulse_interval: Option<u64>,
    /// Milliseconds of silence before the script runs.
    pub timeout: Option<u64>,
    /// Milliseconds allowed for the first input.
    pub grace: Option<u64>,
    /// Accepted for compatibility and ignored.
    pub iothread: Option<String>,
    /// Follow the VM's run state (the default with a notification node): `false` gives
    /// wall-clock timers that run on while the VM is paused (seed `follow-vm`).
    #[serde(alias = "follow-vm")]
    pub follow_vm: Option<bool>,
    /// Conditions the plain timeout is linked to (TOML only).
    #[serde(default)]
    pub conditions: Vec<String>,
    /// The shortest timeout `WATCHDOG_USEC=` may set, in milliseconds (TOML only).
    pub timeout_min: Option<u64>,
    /// The longest timeout `WATCHDOG_USEC=` may set, in milliseconds (TOML only).
    pub timeout_max: Option<u64>,
    /// Milliseconds EXPIRED before the watchdog is STOPPED (TOML only).
    pub expired_tolerance: Option<u64>,
    /// Conditions the guest sets, with their initial values (TOML only).
    #[serde(default)]
    pub guest_conditions: BTreeMap<String, bool>,
    /// Conditions the operator sets, with their initial values (TOML only).
    #[serde(default)]
    pub operator_conditions: BTreeMap<String, bool>,
    /// Alive supervisions (TOML only).
    #[serde(default)]
    pub alive: Vec<supervision::RawAlive>,
    /// Deadline supervisions (TOML only).
    #[serde(default)]
    pub deadline: Vec<supervision::RawDeadline>,
    /// Logical supervisions (TOML only).
    #[serde(default)]
    pub logical: Vec<supervision::RawLogical>,
    /// Further steps of the error reaction while the watchdog stays expired (TOML only).
    #[serde(default)]
    pub escalate: Vec<RawStep>,
    /// The script run when the watchdog becomes STOPPED (TOML only; needs expired_tolerance).
    pub stopped_script: Option<Vec<String>>,
    /// A command run on expiry, without a shell: program and arguments (TOML only).
    pub exec: Option<Vec<String>>,
    /// Milliseconds the exec command may run before it is killed (default 10000).
    pub exec_timeout: Option<u64>,
    /// Where it came from, for error messages.
    #[serde(skip)]
    pub origin: String,
}

/// One escalation step as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    /// Milliseconds after the expiry.
    pub after: u64,
    /// The script inline.
    pub script: Option<Vec<String>>,
    /// The script file.
    pub opt_script: Option<PathBuf>,
    /// A command run at this step, as the watchdog's `exec` (and with its `exec_timeout`).
    pub exec: Option<Vec<String>>,
}

/// What one `--object` argument describes.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "a handful of records, parsed once at startup"
)]
pub enum RawObject {
    /// An advanced-watchdog.
    Watchdog(RawWatchdog),
    /// An object awd accepts and ignores (`iothread`).
    Ignored {
        /// Its type, named in the note that it was ignored.
        kind: String,
        /// Its id, named in the same note.
        id: String,
    },
}

/// The unvalidated records from every source, in the order given.
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    /// Every chardev, from `--chardev` arguments and `[chardev.*]` tables.
    pub chardevs: Vec<RawChardev>,
    /// Every object, from `--object` arguments and `[watchdog.*]` tables.
    pub objects: Vec<RawObject>,
    /// Directory that relative `opt_script` paths are resolved against (the TOML file's).
    pub base_dir: Option<PathBuf>,
}

impl RawConfig {
    /// Adds seed-syntax arguments (`--chardev`, `--object`), refusing the first that does not
    /// parse.
    pub fn add_seed_args(
        &mut self,
        chardevs: &[String],
        objects: &[String],
    ) -> Result<(), ConfigError> {
        for c in chardevs {
            self.chardevs.push(seed::parse_chardev(c)?);
        }
        for o in objects {
            self.objects.push(seed::parse_object(o)?);
        }
        Ok(())
    }
}
