//! The checked model: what [`Config::build`] returns and the daemon runs. Every value here has
//! passed validation; its `Display` is what `awd check` prints.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::supervision;
use crate::action::exec::ExecCommand;
use crate::action::script::Script;
use crate::engine::EngineSpec;
use crate::transport::{Cidr, Endpoint, SocketChardev, VsockChardev};

/// One further step of a watchdog's error reaction: runs `after` the expiry, only if the
/// watchdog is still expired (or stopped) by then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EscalationStep {
    /// Time from the expiry.
    pub after: Duration,
    /// What to send (may be empty when the step only runs a command).
    pub script: Script,
    /// The command to run at this step, if any.
    pub exec: Option<ExecCommand>,
}

/// A validated chardev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chardev {
    /// A TCP or Unix socket.
    Socket(SocketChardev),
    /// A port on awd's vhost-user vsock device.
    Vsock(VsockChardev),
}

impl Chardev {
    /// Its id, as watchdogs name it in `awd_node=` and `notification_node=`.
    pub fn id(&self) -> &str {
        match self {
            Chardev::Socket(s) => &s.id,
            Chardev::Vsock(v) => &v.id,
        }
    }

    /// Its input rate limit, messages per second.
    pub fn rate_limit(&self) -> Option<u32> {
        match self {
            Chardev::Socket(s) => s.rate_limit,
            Chardev::Vsock(v) => v.rate_limit,
        }
    }
}

impl fmt::Display for Chardev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Chardev::Socket(s) if s.server => write!(f, "listen {}", s.endpoint),
            Chardev::Socket(s) => write!(
                f,
                "connect {} (reconnect every {} s)",
                s.endpoint,
                s.reconnect.as_secs_f64()
            ),
            Chardev::Vsock(v) => write!(
                f,
                "vhost-user-vsock {} guest-cid {} port {}",
                v.path.display(),
                v.guest_cid,
                v.port
            ),
        }
    }
}

/// Which side of an AWD pulse exchange a watchdog is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends a pulse every `pulse_interval`.
    Server,
    /// Answers each pulse.
    Client,
}

/// A validated watchdog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchdogConfig {
    /// Its id, used in every log line and metric.
    pub id: String,
    /// Pulse sender or replier.
    pub role: Role,
    /// The chardev heartbeats arrive on.
    pub awd_node: String,
    /// The chardev the script goes to; `None` means log only.
    pub notification_node: Option<String>,
    /// What is sent to the notification node when the watchdog expires.
    pub script: Script,
    /// Where the script came from (a path, or "inline").
    pub script_origin: String,
    /// Server role: the pulse period.
    pub pulse_interval: Option<Duration>,
    /// Every supervision of the watchdog, validated; its plain timeout and grace are the
    /// watchdog's `timeout=` and `grace=` ([`timeout`](Self::timeout), [`grace`](Self::grace)).
    pub engine: EngineSpec,
    /// Further steps after the expiry, in time order.
    pub escalation: Vec<EscalationStep>,
    /// Sent when the watchdog becomes STOPPED (empty: nothing).
    pub stopped_script: Script,
    /// Run at the expiry, beside the script (`exec =`).
    pub exec: Option<ExecCommand>,
    /// Every supervision is linked to `vm-running`: timers stop while the VM is paused.
    pub follow_vm: bool,
}

impl WatchdogConfig {
    /// The configured silence before expiry (`timeout=`); `WATCHDOG_USEC=` changes only the
    /// running engine's copy.
    pub fn timeout(&self) -> Duration {
        self.engine.plain.timeout
    }

    /// The first deadline, if longer than the timeout (`grace=`).
    pub fn grace(&self) -> Option<Duration> {
        self.engine.grace
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Every chardev, by id.
    pub chardevs: BTreeMap<String, Chardev>,
    /// Every watchdog, in id order.
    pub watchdogs: Vec<WatchdogConfig>,
    /// Things worth a log line that are not errors (ignored keys, risky pulse settings).
    pub notes: Vec<String>,
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for w in &self.watchdogs {
            writeln!(f, "watchdog {}", w.id)?;
            let node = &self.chardevs[&w.awd_node];
            writeln!(f, "  awd_node          {} ({node})", w.awd_node)?;
            if let Chardev::Socket(s) = node {
                if s.server {
                    let peers = match s.peers.as_slice() {
                        [] => "any peer".to_owned(),
                        p => format!(
                            "peers {}",
                            p.iter().map(Cidr::to_string).collect::<Vec<_>>().join(", ")
                        ),
                    };
                    writeln!(
                        f,
                        "  connections       at most {}, the longest silent evicted when full; {peers}",
                        s.max_connections
                    )?;
                } else {
                    writeln!(
                        f,
                        "  connect timeout   {} s (the reconnect period)",
                        s.reconnect.as_secs_f64()
                    )?;
                }
                match (&s.endpoint, s.tcp_user_timeout) {
                    (Endpoint::Tcp { .. }, Some(t)) => writeln!(
                        f,
                        "  tcp               keepalive, user timeout {} ms",
                        t.as_millis()
                    )?,
                    (Endpoint::Tcp { .. }, None) => {
                        writeln!(f, "  tcp               kernel keepalive defaults")?
                    }
                    (Endpoint::Unix(_), _) => {}
                }
                if s.psk.is_some() {
                    writeln!(
                        f,
                        "  authentication    pre-shared key (HMAC-SHA256, docs/protocol.md); \
                         unauthenticated input is rejected"
                    )?;
                }
                if !s.peer.is_any() {
                    let id = |v: Option<u32>| v.map_or("any".to_owned(), |v| v.to_string());
                    writeln!(
                        f,
                        "  peer              uid {}, gid {} (SO_PEERCRED); others are refused",
                        id(s.peer.uid),
                        id(s.peer.gid)
                    )?;
                }
            }
            if let Some(r) = node.rate_limit() {
                writeln!(
                    f,
                    "  rate limit        {r} messages/s parsed (excess input still proves life)"
                )?;
            }
            match &w.notification_node {
                Some(n) => writeln!(f, "  notification_node {n} ({})", self.chardevs[n])?,
                None if w.exec.is_some() => writeln!(f, "  notification_node none (exec only)")?,
                None => writeln!(f, "  notification_node none (log only)")?,
            }
            write!(f, "  timeout           {} ms", w.timeout().as_millis())?;
            match w.grace() {
                Some(g) => writeln!(f, ", first deadline after {} ms", g.as_millis())?,
                None => writeln!(f)?,
            }
            match (w.role, w.pulse_interval) {
                (Role::Server, Some(p)) => {
                    writeln!(f, "  pulses            every {} ms", p.as_millis())?
                }
                (Role::Server, None) => writeln!(f, "  pulses            none")?,
                (Role::Client, _) => writeln!(f, "  pulses            answered")?,
            }
            if w.script.is_empty() {
                writeln!(f, "  script            none")?;
            } else {
                writeln!(
                    f,
                    "  script            {} from {}",
                    w.script, w.script_origin
                )?;
            }
            if let Some(e) = &w.exec {
                writeln!(f, "  run               {e}")?;
            }
            for step in &w.escalation {
                let what = match (&step.exec, step.script.is_empty()) {
                    (Some(e), true) => e.to_string(),
                    (Some(e), false) => format!("{}; {e}", step.script),
                    (None, _) => step.script.to_string(),
                };
                writeln!(
                    f,
                    "  then after {} ms  {what} (if still expired)",
                    step.after.as_millis(),
                )?;
            }
            if !w.stopped_script.is_empty() {
                writeln!(f, "  when stopped      {}", w.stopped_script)?;
            }
            match (w.follow_vm, &w.notification_node) {
                (true, Some(n)) => writeln!(
                    f,
                    "  vm run state      followed on {n}: timers stop while the VM is paused (needs a QMP monitor)"
                )?,
                _ => writeln!(
                    f,
                    "  vm run state      not followed: timers run on the wall clock"
                )?,
            }
            write!(f, "{}", supervision::Summary(&w.engine))?;
        }
        Ok(())
    }
}
