//! From raw records to the checked model: [`Config::build`] and the checks behind it. Each
//! refusal is a [`ConfigError`] of one line that names the record and the key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    Chardev, Config, ConfigError, EscalationStep, RawChardev, RawConfig, RawObject, RawWatchdog,
    Role, WatchdogConfig, supervision,
};
use crate::action::exec::ExecCommand;
use crate::action::script::Script;
use crate::auth::Key;
use crate::engine::{EngineSpec, VM_RUNNING};
use crate::transport::limits::{
    DEFAULT_MAX_CONNECTIONS, DEFAULT_TCP_USER_TIMEOUT_MS, MAX_MAX_CONNECTIONS,
};
use crate::transport::{Cidr, Endpoint, PeerCred, SocketChardev, VsockChardev};
use crate::util::ms;

/// QEMU's rule for ids: a letter, then letters, digits, `-`, `.` and `_`.
fn valid_id(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

fn check_id(origin: &str, id: &str) -> Result<(), ConfigError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            origin,
            format!(
                "id '{id}': ids start with a letter and hold letters, digits, '-', '.' and '_'"
            ),
        ))
    }
}

fn build_chardev(c: &RawChardev) -> Result<Chardev, ConfigError> {
    let o = c.origin.as_str();
    check_id(o, &c.id)?;
    match c.backend.as_str() {
        "socket" => {
            if c.guest_cid.is_some() {
                return Err(ConfigError::invalid(
                    o,
                    "guest-cid is only for vhost-user-vsock",
                ));
            }
            let endpoint = match (&c.path, &c.host, c.port) {
                (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                    return Err(ConfigError::invalid(
                        o,
                        "give either path= or host=/port=, not both",
                    ));
                }
                (Some(p), None, None) => Endpoint::Unix(p.clone()),
                (None, host, Some(port)) => {
                    let port = u16::try_from(port)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| {
                            ConfigError::invalid(o, format!("port={port}: not a TCP port"))
                        })?;
                    let default = if c.server == Some(true) {
                        "0.0.0.0"
                    } else {
                        "localhost"
                    };
                    let host = host
                        .clone()
                        .filter(|h| !h.is_empty())
                        .unwrap_or_else(|| default.into());
                    Endpoint::Tcp { host, port }
                }
                (None, _, None) => {
                    return Err(ConfigError::invalid(
                        o,
                        "missing port= (or path= for a Unix socket)",
                    ));
                }
            };
            let server = c.server.unwrap_or(false);
            if server && c.reconnect.is_some() {
                return Err(ConfigError::invalid(
                    o,
                    "reconnect= is only for client mode (server=off)",
                ));
            }
            if c.reconnect == Some(0) {
                return Err(ConfigError::invalid(
                    o,
                    "reconnect=0: give at least 1 second",
                ));
            }
            let tcp = matches!(endpoint, Endpoint::Tcp { .. });
            if c.nodelay.is_some() && !tcp {
                return Err(ConfigError::invalid(o, "nodelay= is only for TCP sockets"));
            }
            let max_connections = match c.max_connections {
                Some(_) if !server => {
                    return Err(ConfigError::invalid(
                        o,
                        "max-connections= is only for server mode (server=on)",
                    ));
                }
                Some(n) if n == 0 || n > MAX_MAX_CONNECTIONS => {
                    return Err(ConfigError::invalid(
                        o,
                        format!("max-connections={n}: give 1..={MAX_MAX_CONNECTIONS}"),
                    ));
                }
                Some(n) => n,
                None => DEFAULT_MAX_CONNECTIONS,
            };
            let peers = match &c.peers {
                None => Vec::new(),
                Some(_) if !server || !tcp => {
                    return Err(ConfigError::invalid(
                        o,
                        "peers= is only for TCP server mode (host=/port=, server=on)",
                    ));
                }
                Some(list) if list.is_empty() => {
                    return Err(ConfigError::invalid(
                        o,
                        "peers: an empty list admits nobody; leave it out to admit any peer",
                    ));
                }
                Some(list) => list
                    .iter()
                    .map(|p| {
                        p.trim()
                            .parse::<Cidr>()
                            .map_err(|e| ConfigError::invalid(o, format!("peers={p}: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            let tcp_user_timeout = match c.tcp_user_timeout {
                Some(_) if !tcp => {
                    return Err(ConfigError::invalid(
                        o,
                        "tcp-user-timeout= is only for TCP sockets",
                    ));
                }
                Some(0) => None,
                Some(ms) if !(1000..=u64::from(u32::MAX)).contains(&ms) => {
                    return Err(ConfigError::invalid(
                        o,
                        format!(
                            "tcp-user-timeout={ms}: give at least 1000 ms (keepalive probes go out \
                             in whole seconds), or 0 for the kernel's defaults"
                        ),
                    ));
                }
                Some(ms) => Some(Duration::from_millis(ms)),
                None if tcp => Some(Duration::from_millis(DEFAULT_TCP_USER_TIMEOUT_MS)),
                None => None,
            };
            if tcp && (c.peer_uid.is_some() || c.peer_gid.is_some()) {
                return Err(ConfigError::invalid(
                    o,
                    "peer-uid=/peer-gid= are for Unix sockets (checked with SO_PEERCRED); a TCP \
                     peer has no credentials to check",
                ));
            }
            let psk = match &c.psk_file {
                Some(_) if !tcp => {
                    return Err(ConfigError::invalid(
                        o,
                        "psk= is for TCP sockets; a Unix socket names its peer with peer-uid=",
                    ));
                }
                Some(path) => Some(Key::load(path).map_err(|e| {
                    ConfigError::invalid(o, format!("psk: {}", crate::util::error_chain(&e)))
                })?),
                None => None,
            };
            Ok(Chardev::Socket(SocketChardev {
                id: c.id.clone(),
                endpoint,
                server,
                reconnect: Duration::from_secs(c.reconnect.unwrap_or(1)),
                nodelay: c.nodelay.unwrap_or(false),
                max_connections: max_connections as usize,
                peers,
                tcp_user_timeout,
                rate_limit: check_rate_limit(o, c.rate_limit)?,
                peer: PeerCred {
                    uid: c.peer_uid,
                    gid: c.peer_gid,
                },
                psk,
            }))
        }
        "vhost-user-vsock" => {
            let path = c.path.clone().ok_or_else(|| {
                ConfigError::invalid(o, "missing path= (the vhost-user socket QEMU connects to)")
            })?;
            let guest_cid = c
                .guest_cid
                .ok_or_else(|| ConfigError::invalid(o, "missing guest-cid="))?;
            if guest_cid < 3 || guest_cid > u64::from(u32::MAX - 1) {
                return Err(ConfigError::invalid(
                    o,
                    format!("guest-cid={guest_cid}: guest CIDs start at 3 and fit in 32 bits"),
                ));
            }
            let port = c
                .port
                .ok_or_else(|| ConfigError::invalid(o, "missing port= (the vsock port)"))?;
            if port == u32::MAX {
                return Err(ConfigError::invalid(
                    o,
                    "port=4294967295 is VMADDR_PORT_ANY",
                ));
            }
            for (set, key) in [
                (c.host.is_some(), "host"),
                (c.server.is_some(), "server"),
                (c.wait.is_some(), "wait"),
                (c.reconnect.is_some(), "reconnect"),
                (c.nodelay.is_some(), "nodelay"),
                (c.max_connections.is_some(), "max-connections"),
                (c.peers.is_some(), "peers"),
                (c.tcp_user_timeout.is_some(), "tcp-user-timeout"),
                (c.psk_file.is_some(), "psk"),
            ] {
                if set {
                    return Err(ConfigError::invalid(
                        o,
                        format!("{key}= does not apply to vhost-user-vsock"),
                    ));
                }
            }
            Ok(Chardev::Vsock(VsockChardev {
                id: c.id.clone(),
                path,
                guest_cid,
                port,
                rate_limit: check_rate_limit(o, c.rate_limit)?,
                peer: PeerCred {
                    uid: c.peer_uid,
                    gid: c.peer_gid,
                },
            }))
        }
        other => Err(ConfigError::invalid(
            o,
            format!("unsupported chardev backend '{other}' (awd has socket and vhost-user-vsock)"),
        )),
    }
}

/// `rate-limit=` is a number of messages per second, at least 1.
fn check_rate_limit(origin: &str, v: Option<u32>) -> Result<Option<u32>, ConfigError> {
    match v {
        Some(0) => Err(ConfigError::invalid(
            origin,
            "rate-limit=0: give at least 1 message per second, or leave it out",
        )),
        v => Ok(v),
    }
}

impl Config {
    /// Validates raw records into a configuration. Reads opt_script files.
    pub fn build(raw: RawConfig) -> Result<Config, ConfigError> {
        let mut cfg = Config::default();
        for c in &raw.chardevs {
            let chardev = build_chardev(c)?;
            if cfg.chardevs.insert(c.id.clone(), chardev).is_some() {
                return Err(ConfigError::DuplicateId {
                    what: "chardev",
                    id: c.id.clone(),
                });
            }
        }
        // vsock chardevs on one device must agree on the guest CID and the peer (both belong
        // to the device), and ports must be unique.
        let mut devices: BTreeMap<&Path, (u64, BTreeSet<u32>, PeerCred)> = BTreeMap::new();
        for ch in cfg.chardevs.values() {
            if let Chardev::Vsock(v) = ch {
                let entry =
                    devices
                        .entry(&v.path)
                        .or_insert((v.guest_cid, BTreeSet::new(), v.peer));
                if entry.2 != v.peer {
                    return Err(ConfigError::invalid(
                        &format!("chardev '{}'", v.id),
                        format!(
                            "peer-uid=/peer-gid= differ from another chardev's on {}: they \
                             belong to the device, so name them alike on every chardev",
                            v.path.display()
                        ),
                    ));
                }
                if entry.0 != v.guest_cid {
                    return Err(ConfigError::invalid(
                        &format!("chardev '{}'", v.id),
                        format!(
                            "guest-cid={} differs from guest-cid={} of another chardev on {}",
                            v.guest_cid,
                            entry.0,
                            v.path.display()
                        ),
                    ));
                }
                if !entry.1.insert(v.port) {
                    return Err(ConfigError::invalid(
                        &format!("chardev '{}'", v.id),
                        format!(
                            "vsock port {} is already used on {}",
                            v.port,
                            v.path.display()
                        ),
                    ));
                }
            }
        }
        // Socket endpoints must be unique among listeners.
        let mut listeners = BTreeMap::new();
        for ch in cfg.chardevs.values() {
            if let Chardev::Socket(s) = ch
                && s.server
                && let Some(other) = listeners.insert(s.endpoint.to_string(), s.id.clone())
            {
                return Err(ConfigError::invalid(
                    &format!("chardev '{}'", s.id),
                    format!("listens on {} like chardev '{other}'", s.endpoint),
                ));
            }
        }

        let mut used: BTreeMap<String, String> = BTreeMap::new();
        let mut ids = BTreeSet::new();
        for obj in &raw.objects {
            let w = match obj {
                RawObject::Ignored { kind, id } => {
                    cfg.notes
                        .push(format!("object {kind} '{id}' is accepted and ignored"));
                    continue;
                }
                RawObject::Watchdog(w) => w,
            };
            if !ids.insert(w.id.clone()) {
                return Err(ConfigError::DuplicateId {
                    what: "watchdog",
                    id: w.id.clone(),
                });
            }
            let wc = build_watchdog(w, &cfg, raw.base_dir.as_deref())?;
            if let Some(other) = used.insert(wc.awd_node.clone(), wc.id.clone()) {
                return Err(ConfigError::ChardevInUse {
                    watchdog: wc.id.clone(),
                    id: wc.awd_node.clone(),
                    other,
                });
            }
            let links_vm = wc
                .engine
                .supervisions()
                .any(|(_, _, conds)| conds.iter().any(|c| c == crate::engine::VM_RUNNING));
            if let (true, Some(node)) = (wc.follow_vm, &wc.notification_node) {
                cfg.notes.push(format!(
                    "watchdog '{}': follows the VM's run state (its timers stop while the VM is \
                     paused) on notification_node={node}; that needs a QMP monitor there: with an \
                     HMP or raw node the run state is never known and the timers run on the wall \
                     clock (follow-vm=off says so explicitly)",
                    wc.id
                ));
            }
            if links_vm && wc.notification_node.is_none() {
                cfg.notes.push(format!(
                    "watchdog '{}': vm-running is followed on the notification node's QMP \
                     connection; without a notification_node it stays true",
                    wc.id
                ));
            }
            if let Some(iothread) = &w.iothread {
                cfg.notes.push(format!(
                    "watchdog '{}': iothread={iothread} is accepted and ignored (awd runs its own threads)",
                    w.id
                ));
            }
            if let Some(p) = wc.pulse_interval
                && p >= wc.timeout()
            {
                cfg.notes.push(format!(
                    "watchdog '{}': pulse_interval ({} ms) is not shorter than timeout ({} ms): \
                     a peer with the same timeout expires between pulses",
                    wc.id,
                    p.as_millis(),
                    wc.timeout().as_millis()
                ));
            }
            cfg.watchdogs.push(wc);
        }
        for wc in &cfg.watchdogs {
            if let Some(n) = &wc.notification_node
                && let Some(user) = used.get(n)
            {
                return Err(ConfigError::invalid(
                    &format!("watchdog '{}'", wc.id),
                    format!("notification_node={n} is the awd_node of watchdog '{user}'"),
                ));
            }
        }
        if cfg.watchdogs.is_empty() {
            return Err(ConfigError::Empty);
        }
        cfg.watchdogs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(cfg)
    }
}

fn build_watchdog(
    w: &RawWatchdog,
    cfg: &Config,
    base_dir: Option<&Path>,
) -> Result<WatchdogConfig, ConfigError> {
    let o = format!("watchdog '{}'", w.id);
    check_id(&w.origin, &w.id)?;
    let awd_node = w
        .awd_node
        .clone()
        .ok_or_else(|| ConfigError::invalid(&o, "missing awd_node="))?;
    let node = cfg
        .chardevs
        .get(&awd_node)
        .ok_or_else(|| ConfigError::ChardevMissing {
            watchdog: w.id.clone(),
            key: "awd_node",
            id: awd_node.clone(),
        })?;
    if let Some(n) = &w.notification_node {
        match cfg.chardevs.get(n) {
            None => {
                return Err(ConfigError::ChardevMissing {
                    watchdog: w.id.clone(),
                    key: "notification_node",
                    id: n.clone(),
                });
            }
            Some(Chardev::Vsock(_)) => {
                return Err(ConfigError::invalid(
                    &o,
                    format!("notification_node={n} is a vsock port; use a socket chardev"),
                ));
            }
            Some(Chardev::Socket(s)) if s.psk.is_some() => {
                return Err(ConfigError::invalid(
                    &o,
                    format!(
                        "notification_node={n} has psk=: a QEMU monitor speaks QMP or HMP, not \
                         awd's authenticated framing"
                    ),
                ));
            }
            Some(Chardev::Socket(s)) if s.server => {
                return Err(ConfigError::invalid(
                    &o,
                    format!(
                        "notification_node={n} must be a client chardev (server=off): awd connects to the monitor"
                    ),
                ));
            }
            Some(Chardev::Socket(_)) => {}
        }
    }
    let timeout = w
        .timeout
        .ok_or_else(|| ConfigError::invalid(&o, "missing timeout= (milliseconds)"))?;
    if timeout == 0 {
        return Err(ConfigError::invalid(&o, "timeout=0: give at least 1 ms"));
    }
    if w.pulse_interval == Some(0) {
        return Err(ConfigError::invalid(
            &o,
            "pulse_interval=0: give at least 1 ms",
        ));
    }
    if w.grace == Some(0) {
        return Err(ConfigError::invalid(
            &o,
            "grace=0: leave it out to use timeout",
        ));
    }
    let (script, script_origin) = load_script(
        &w.id,
        &o,
        w.opt_script.as_ref(),
        w.script.as_ref(),
        base_dir,
    )?;
    if !script.is_empty() && w.notification_node.is_none() {
        return Err(ConfigError::invalid(
            &o,
            "a script needs a notification_node= to send it to",
        ));
    }
    let mode_server = match node {
        Chardev::Socket(s) => s.server,
        Chardev::Vsock(_) => true,
    };
    let role = match w.server.unwrap_or(mode_server) {
        true => Role::Server,
        false => Role::Client,
    };
    if w.pulse_interval.is_some() && role == Role::Client {
        return Err(ConfigError::invalid(
            &o,
            "pulse_interval= needs server=on: the client side answers pulses instead",
        ));
    }
    let mut engine = supervision::engine_spec(w, ms(timeout), w.grace.map(ms))
        .map_err(|e| ConfigError::invalid(&o, e.to_string()))?;
    let follow_vm = match (w.follow_vm, &w.notification_node) {
        (Some(true), None) => {
            return Err(ConfigError::invalid(
                &o,
                "follow-vm=on needs a notification_node= (the run state comes from its QMP connection)",
            ));
        }
        (Some(false), _) => {
            if let Some((kind, name, _)) = engine
                .supervisions()
                .find(|(_, _, conds)| conds.iter().any(|c| c == VM_RUNNING))
            {
                return Err(ConfigError::invalid(
                    &o,
                    format!(
                        "follow-vm=off, but {kind} '{name}' links condition vm-running; drop one of them"
                    ),
                ));
            }
            false
        }
        (_, node) => node.is_some(),
    };
    if follow_vm {
        link_vm_running(&mut engine);
    }
    let exec_cmd = |origin: &str, argv: &Option<Vec<String>>| {
        argv.as_ref()
            .map(|argv| ExecCommand::new(argv.clone(), w.exec_timeout))
            .transpose()
            .map_err(|e| ConfigError::invalid(origin, e.to_string()))
    };
    let exec = exec_cmd(&o, &w.exec)?;
    if w.exec_timeout.is_some() && exec.is_none() && w.escalate.iter().all(|s| s.exec.is_none()) {
        return Err(ConfigError::invalid(
            &o,
            "exec_timeout= without an exec command (exec = [\"program\", …])",
        ));
    }
    let mut escalation = Vec::new();
    for (i, step) in w.escalate.iter().enumerate() {
        let origin = format!("{o}: escalate[{i}]");
        let (script, _) = load_script(
            &w.id,
            &origin,
            step.opt_script.as_ref(),
            step.script.as_ref(),
            base_dir,
        )?;
        let step_exec = exec_cmd(&origin, &step.exec)?;
        if script.is_empty() && step_exec.is_none() {
            return Err(ConfigError::invalid(
                &origin,
                "a step needs a script or an exec command",
            ));
        }
        let after = ms(step.after);
        if step.after == 0
            || escalation
                .last()
                .is_some_and(|p: &EscalationStep| p.after >= after)
        {
            return Err(ConfigError::invalid(
                &origin,
                format!(
                    "after={}: steps come after the expiry and after each other (strictly increasing ms)",
                    step.after
                ),
            ));
        }
        escalation.push(EscalationStep {
            after,
            script,
            exec: step_exec,
        });
    }
    let stopped_script = match &w.stopped_script {
        Some(lines) => {
            if w.expired_tolerance.is_none() {
                return Err(ConfigError::invalid(
                    &o,
                    "stopped_script needs expired_tolerance (when to become STOPPED)",
                ));
            }
            load_script(&w.id, &o, None, Some(lines), base_dir)?.0
        }
        None => Script::default(),
    };
    let scripted_steps = escalation.iter().any(|s| !s.script.is_empty());
    if (scripted_steps || !stopped_script.is_empty()) && w.notification_node.is_none() {
        return Err(ConfigError::invalid(
            &o,
            "escalation steps need a notification_node= to send them to",
        ));
    }
    Ok(WatchdogConfig {
        id: w.id.clone(),
        role,
        awd_node,
        notification_node: w.notification_node.clone(),
        script,
        script_origin,
        pulse_interval: w.pulse_interval.map(ms),
        engine,
        escalation,
        stopped_script,
        exec,
        follow_vm,
    })
}

/// Links every supervision of `spec` to `vm-running` (once), so none of its timers runs while
/// the VM is paused, as the seed's timers on QEMU's virtual clock did not.
fn link_vm_running(spec: &mut EngineSpec) {
    let link = |conds: &mut Vec<String>| {
        if !conds.iter().any(|c| c == VM_RUNNING) {
            conds.insert(0, VM_RUNNING.to_owned());
        }
    };
    link(&mut spec.plain.conditions);
    spec.alive.iter_mut().for_each(|a| link(&mut a.conditions));
    spec.deadline
        .iter_mut()
        .for_each(|d| link(&mut d.conditions));
    spec.logical
        .iter_mut()
        .for_each(|l| link(&mut l.conditions));
}

/// Loads a script given as a file (relative to `base_dir`) or inline lines.
fn load_script(
    id: &str,
    origin: &str,
    file: Option<&PathBuf>,
    inline: Option<&Vec<String>>,
    base_dir: Option<&Path>,
) -> Result<(Script, String), ConfigError> {
    match (file, inline) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            origin,
            "give either opt_script or script, not both",
        )),
        (Some(path), None) => {
            let path = match base_dir {
                Some(dir) if path.is_relative() => dir.join(path),
                _ => path.clone(),
            };
            let script = Script::load(&path).map_err(|source| ConfigError::Script {
                watchdog: id.to_owned(),
                source,
            })?;
            Ok((script, path.display().to_string()))
        }
        (None, Some(lines)) => {
            let script = Script::parse(&lines.join("\n"), "inline").map_err(|source| {
                ConfigError::Script {
                    watchdog: id.to_owned(),
                    source,
                }
            })?;
            Ok((script, "inline".to_owned()))
        }
        (None, None) => Ok((Script::default(), "none".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file;

    fn build(chardevs: &[&str], objects: &[&str]) -> Result<Config, ConfigError> {
        let mut raw = RawConfig::default();
        let c: Vec<String> = chardevs.iter().map(|s| s.to_string()).collect();
        let o: Vec<String> = objects.iter().map(|s| s.to_string()).collect();
        raw.add_seed_args(&c, &o)?;
        Config::build(raw)
    }

    fn script_file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn the_seeds_local_guest_example_resolves() {
        let s = script_file("quit\n");
        let cfg = build(
            &[
                "socket,id=detection,host=0.0.0.0,port=9009,server,nowait",
                "socket,id=notification,host=127.0.0.1,port=4445",
            ],
            &[
                "iothread,id=iothread1",
                &format!(
                    "advanced-watchdog,id=awd1,server=on,awd_node=detection,notification_node=notification,\
                     opt_script={},iothread=iothread1,pulse_interval=1000,timeout=5000",
                    s.path().display()
                ),
            ],
        )
        .unwrap();
        let w = &cfg.watchdogs[0];
        assert_eq!(w.role, Role::Server);
        assert_eq!(w.timeout(), Duration::from_secs(5));
        assert_eq!(w.pulse_interval, Some(Duration::from_secs(1)));
        assert!(
            cfg.notes
                .iter()
                .any(|n| n.contains("iothread=iothread1 is accepted and ignored"))
        );
        let text = cfg.to_string();
        assert!(text.contains("listen tcp:0.0.0.0:9009"), "{text}");
        assert!(text.contains("quit (QMP quit)"), "{text}");
    }

    #[test]
    fn timeout_and_grace_are_held_once_by_the_engine_spec() {
        let cfg = build(
            &["socket,id=a,port=1,server"],
            &["advanced-watchdog,id=w,awd_node=a,timeout=5000,grace=60000"],
        )
        .unwrap();
        let w = &cfg.watchdogs[0];
        assert_eq!(w.engine.plain.timeout, Duration::from_secs(5));
        assert_eq!(w.engine.grace, Some(Duration::from_secs(60)));
        assert_eq!(
            (w.timeout(), w.grace()),
            (w.engine.plain.timeout, w.engine.grace)
        );
        let text = cfg.to_string();
        assert!(
            text.contains("timeout           5000 ms, first deadline after 60000 ms"),
            "{text}"
        );
    }

    #[test]
    fn the_seeds_colo_secondary_is_a_client_that_answers_pulses() {
        let s = script_file("nbd_server_stop\nx_colo_lost_heartbeat\n");
        let cfg = build(
            &["socket,id=h1,host=127.0.0.1,port=9009,reconnect=1", "socket,id=mon,host=127.0.0.1,port=4445"],
            &[&format!(
                "advanced-watchdog,id=heart1,server=off,awd_node=h1,notification_node=mon,opt_script={},timeout=10000",
                s.path().display()
            )],
        )
        .unwrap();
        assert_eq!(cfg.watchdogs[0].role, Role::Client);
        assert_eq!(cfg.watchdogs[0].script.lines.len(), 2);
    }

    #[test]
    fn errors_are_one_line_and_name_what_is_wrong() {
        let cases: &[(&[&str], &[&str], &str)] = &[
            (
                &["socket,id=a,port=1,server"],
                &["advanced-watchdog,id=w,awd_node=b,timeout=1"],
                "awd_node=b: no chardev with id 'b'",
            ),
            (
                &["socket,id=a,port=1,server"],
                &["advanced-watchdog,id=w,awd_node=a,notification_node=zz,timeout=1"],
                "notification_node=zz: no chardev",
            ),
            (
                &["socket,id=a,port=1,server"],
                &["advanced-watchdog,id=w,awd_node=a,timeout=1,opt_script=/nonexistent/x"],
                "cannot read opt_script /nonexistent/x",
            ),
            (
                &["socket,id=a,port=1,server"],
                &["advanced-watchdog,id=w,awd_node=a"],
                "missing timeout=",
            ),
            (
                &["socket,id=a,port=1,server"],
                &["advanced-watchdog,id=w,awd_node=a,timeout=0"],
                "timeout=0",
            ),
            (
                &["socket,id=a,port=1,server", "socket,id=a,port=2,server"],
                &["advanced-watchdog,id=w,awd_node=a,timeout=1"],
                "duplicate chardev id 'a'",
            ),
            (
                &["socket,id=a,port=1,server"],
                &[
                    "advanced-watchdog,id=w,awd_node=a,timeout=1",
                    "advanced-watchdog,id=v,awd_node=a,timeout=1",
                ],
                "already used by watchdog 'w'",
            ),
            (
                &["socket,id=a,path=/x,port=1"],
                &[],
                "either path= or host=/port=",
            ),
            (
                &["socket,id=a,port=1,server,reconnect=1"],
                &[],
                "reconnect= is only for client mode",
            ),
            (
                &["socket,id=a,port=70000"],
                &[],
                "port=70000: not a TCP port",
            ),
            (
                &["serial,id=a"],
                &[],
                "unsupported chardev backend 'serial'",
            ),
            (
                &["socket,id=a,port=1"],
                &["advanced-watchdog,id=w,awd_node=a,timeout=1,pulse_interval=5"],
                "pulse_interval= needs server=on",
            ),
            (&[], &[], "no watchdogs configured"),
            (
                &["socket,id=a,,b,port=1"],
                &[],
                "id 'a,b': ids start with a letter",
            ),
        ];
        for (chardevs, objects, want) in cases {
            let err = crate::util::error_chain(&build(chardevs, objects).unwrap_err());
            assert!(err.contains(want), "want {want:?}, got {err:?}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn escalation_steps_are_ordered_and_need_a_node() {
        use crate::config::file::parse;
        let base = "[chardev.d]\npath = \"/tmp/d\"\nserver = true\n[chardev.m]\npath = \"/tmp/m\"\n\
            [watchdog.w]\nawd_node = \"d\"\nnotification_node = \"m\"\ntimeout = 100\nscript = [\"system_reset\"]\n";
        let ok = format!("{base}[[watchdog.w.escalate]]\nafter = 30000\nscript = [\"quit\"]\n");
        let cfg = Config::build(parse(&ok, Path::new("a.toml")).unwrap()).unwrap();
        assert_eq!(
            cfg.watchdogs[0].escalation[0].after,
            Duration::from_secs(30)
        );
        assert!(
            cfg.to_string()
                .contains("then after 30000 ms  quit (QMP quit) (if still expired)"),
            "{cfg}"
        );
        let bad = format!("{ok}[[watchdog.w.escalate]]\nafter = 30000\nscript = [\"quit\"]\n");
        let err = Config::build(parse(&bad, Path::new("a.toml")).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("escalate[1]") && err.contains("strictly increasing"),
            "{err}"
        );
        let bad = format!("{base}stopped_script = [\"quit\"]\n");
        let err = Config::build(parse(&bad, Path::new("a.toml")).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs expired_tolerance"), "{err}");
    }

    #[test]
    fn an_exec_action_needs_no_notification_node_and_a_step_may_only_exec() {
        use crate::config::file::parse;
        let text = "[chardev.d]\npath = \"/tmp/d\"\nserver = true\n[watchdog.w]\nawd_node = \"d\"\n\
            timeout = 100\nexec = [\"/usr/sbin/crm_resource\", \"--fail\"]\nexec_timeout = 2500\n\
            [[watchdog.w.escalate]]\nafter = 1000\nexec = [\"/bin/false\"]\n";
        let cfg = Config::build(parse(text, Path::new("a.toml")).unwrap()).unwrap();
        let w = &cfg.watchdogs[0];
        let exec = w.exec.as_ref().unwrap();
        assert_eq!(exec.argv(), ["/usr/sbin/crm_resource", "--fail"]);
        assert_eq!(exec.timeout(), Duration::from_millis(2500));
        assert_eq!(
            w.escalation[0].exec.as_ref().unwrap().timeout(),
            Duration::from_millis(2500),
            "a step's command takes the watchdog's exec_timeout"
        );
        assert!(w.escalation[0].script.is_empty());
        let shown = cfg.to_string();
        assert!(
            shown.contains("exec [\"/usr/sbin/crm_resource\", \"--fail\"] (timeout 2.5 s)"),
            "{shown}"
        );
        let bare = text.replace("exec = [\"/bin/false\"]\n", "");
        let err = Config::build(parse(&bare, Path::new("a.toml")).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a step needs a script or an exec command"),
            "{err}"
        );
    }

    #[test]
    fn a_pulse_interval_not_shorter_than_the_timeout_is_noted() {
        let cfg = build(
            &["socket,id=a,port=1,server"],
            &["advanced-watchdog,id=w,awd_node=a,timeout=1000,pulse_interval=1000"],
        )
        .unwrap();
        assert!(
            cfg.notes
                .iter()
                .any(|n| n.contains("not shorter than timeout")),
            "{:?}",
            cfg.notes
        );
    }

    #[test]
    fn a_psk_is_for_tcp_heartbeat_channels_and_its_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = crate::auth::test_key_file(dir.path(), 0o600);
        let k = key.display();
        let cfg = build(
            &[&format!("socket,id=hb,port=9009,server=on,psk={k}")],
            &["advanced-watchdog,id=w,awd_node=hb,timeout=1000"],
        )
        .unwrap();
        let Chardev::Socket(s) = &cfg.chardevs["hb"] else {
            panic!("a socket")
        };
        assert_eq!(
            s.psk,
            Some(Key::from_bytes(b"0123456789abcdef0123456789abcdef"))
        );
        assert!(
            cfg.to_string().contains("authentication    pre-shared key"),
            "{cfg}"
        );
        let toml = format!(
            "[chardev.hb]\nport = 9009\nserver = true\npsk_file = \"{k}\"\n\
             [watchdog.w]\nawd_node = \"hb\"\ntimeout = 1000\n"
        );
        let from_file = Config::build(file::parse(&toml, Path::new("a.toml")).unwrap()).unwrap();
        assert_eq!(from_file.chardevs, cfg.chardevs);
        let refuse = |chardevs: &[&str], object: &str, want: &str| {
            let err = build(chardevs, &[object]).map(|_| ()).unwrap_err();
            let err = crate::util::error_chain(&err);
            assert!(err.contains(want), "{chardevs:?}: {err}");
        };
        let w = "advanced-watchdog,id=w,awd_node=hb,timeout=1";
        refuse(
            &[&format!("socket,id=hb,path=/tmp/a,psk={k}")],
            w,
            "psk= is for TCP sockets",
        );
        refuse(
            &[&format!(
                "vhost-user-vsock,id=hb,path=/tmp/v,guest-cid=3,port=1,psk={k}"
            )],
            w,
            "psk= does not apply to vhost-user-vsock",
        );
        refuse(
            &[
                "socket,id=hb,port=9009,server=on",
                &format!("socket,id=m,port=4445,psk={k}"),
            ],
            "advanced-watchdog,id=w,awd_node=hb,notification_node=m,timeout=1",
            "a QEMU monitor speaks QMP or HMP",
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        refuse(
            &[&format!("socket,id=hb,port=9009,server=on,psk={k}")],
            w,
            "readable by others than its owner",
        );
    }

    #[test]
    fn peer_credentials_are_for_unix_sockets_in_both_syntaxes() {
        let cfg = build(
            &["socket,id=hb,path=/tmp/hb.sock,server=on,peer-uid=107,peer-gid=115"],
            &["advanced-watchdog,id=w,awd_node=hb,timeout=1000"],
        )
        .unwrap();
        let Chardev::Socket(s) = &cfg.chardevs["hb"] else {
            panic!("a socket")
        };
        let want = PeerCred {
            uid: Some(107),
            gid: Some(115),
        };
        assert_eq!(s.peer, want);
        assert!(
            cfg.to_string()
                .contains("peer              uid 107, gid 115 (SO_PEERCRED)"),
            "{cfg}"
        );
        let toml = "[chardev.hb]\npath = \"/tmp/hb.sock\"\nserver = true\npeer_uid = 107\n\
            peer_gid = 115\n[watchdog.w]\nawd_node = \"hb\"\ntimeout = 1000\n";
        let from_file = Config::build(file::parse(toml, Path::new("a.toml")).unwrap()).unwrap();
        assert_eq!(from_file.chardevs, cfg.chardevs);
        for (chardev, want) in [
            (
                "socket,id=hb,port=9009,server=on,peer-uid=0",
                "peer-uid=/peer-gid= are for Unix sockets",
            ),
            ("socket,id=hb,path=/tmp/a,peer-uid=x", "peer-uid"),
        ] {
            let err = build(
                &[chardev],
                &["advanced-watchdog,id=w,awd_node=hb,timeout=1"],
            )
            .map(|_| ())
            .unwrap_err();
            let err = crate::util::error_chain(&err);
            assert!(err.contains(want), "{chardev}: {err}");
        }
    }

    /// The vhost-user socket checks its QEMU too; the check belongs to the device, so every
    /// chardev on one path must name the same credentials.
    #[test]
    fn a_vsock_device_names_its_qemus_credentials_once_for_all_its_ports() {
        let cfg = build(
            &[
                "vhost-user-vsock,id=hb,path=/tmp/v.sock,guest-cid=3,port=1,peer-uid=107,peer-gid=115",
                "vhost-user-vsock,id=app,path=/tmp/v.sock,guest-cid=3,port=2,peer-uid=107,peer-gid=115",
            ],
            &[
                "advanced-watchdog,id=w,awd_node=hb,timeout=1",
                "advanced-watchdog,id=a,awd_node=app,timeout=1",
            ],
        )
        .unwrap();
        let Chardev::Vsock(v) = &cfg.chardevs["hb"] else {
            panic!("a vsock chardev")
        };
        assert_eq!(
            v.peer,
            PeerCred {
                uid: Some(107),
                gid: Some(115)
            }
        );
        let err = build(
            &[
                "vhost-user-vsock,id=hb,path=/tmp/v.sock,guest-cid=3,port=1,peer-uid=107",
                "vhost-user-vsock,id=app,path=/tmp/v.sock,guest-cid=3,port=2",
            ],
            &[
                "advanced-watchdog,id=w,awd_node=hb,timeout=1",
                "advanced-watchdog,id=a,awd_node=app,timeout=1",
            ],
        )
        .map(|_| ())
        .unwrap_err();
        let err = crate::util::error_chain(&err);
        assert!(err.contains("peer-uid=/peer-gid= differ"), "{err}");
    }

    #[test]
    fn connection_limits_allow_lists_timeouts_and_rate_limits_parse_in_both_syntaxes() {
        let cfg = build(
            &[
                "socket,id=hb,host=0.0.0.0,port=9009,server=on,max-connections=8,\
               peers=10.0.0.0/8,peers=127.0.0.1,tcp-user-timeout=3000,rate-limit=200",
            ],
            &["advanced-watchdog,id=w,awd_node=hb,timeout=1000"],
        )
        .unwrap();
        let Chardev::Socket(seed) = &cfg.chardevs["hb"] else {
            panic!("a socket")
        };
        assert_eq!(seed.max_connections, 8);
        assert_eq!(
            seed.peers,
            vec![
                "10.0.0.0/8".parse::<Cidr>().unwrap(),
                "127.0.0.1/32".parse().unwrap()
            ]
        );
        assert_eq!(seed.tcp_user_timeout, Some(Duration::from_secs(3)));
        assert_eq!(seed.rate_limit, Some(200));
        let text = cfg.to_string();
        for want in [
            "connections       at most 8, the longest silent evicted when full; peers 10.0.0.0/8, 127.0.0.1/32",
            "tcp               keepalive, user timeout 3000 ms",
            "rate limit        200 messages/s parsed (excess input still proves life)",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        let toml = "[chardev.hb]\nhost = \"0.0.0.0\"\nport = 9009\nserver = true\nmax_connections = 8\n\
            peers = [\"10.0.0.0/8\", \"127.0.0.1\"]\ntcp_user_timeout = 3000\nrate_limit = 200\n\
            [watchdog.w]\nawd_node = \"hb\"\ntimeout = 1000\n";
        let from_file = Config::build(file::parse(toml, Path::new("a.toml")).unwrap()).unwrap();
        assert_eq!(from_file.chardevs, cfg.chardevs);
        // Defaults: 64 connections, any peer, a 5 s user timeout on TCP, nothing on Unix.
        let cfg = build(
            &[
                "socket,id=hb,port=9009,server",
                "socket,id=u,path=/tmp/u.sock,server",
                "vhost-user-vsock,id=v,path=/tmp/v.sock,guest-cid=3,port=1,rate-limit=50",
            ],
            &["advanced-watchdog,id=w,awd_node=hb,timeout=1000"],
        )
        .unwrap();
        let Chardev::Socket(d) = &cfg.chardevs["hb"] else {
            panic!("a socket")
        };
        assert_eq!(
            (
                d.max_connections,
                d.peers.len(),
                d.tcp_user_timeout,
                d.rate_limit
            ),
            (64, 0, Some(Duration::from_secs(5)), None)
        );
        let Chardev::Socket(u) = &cfg.chardevs["u"] else {
            panic!("a socket")
        };
        assert_eq!(u.tcp_user_timeout, None);
        assert_eq!(cfg.chardevs["v"].rate_limit(), Some(50));
        let cfg = build(
            &["socket,id=hb,port=9009,tcp-user-timeout=0"],
            &["advanced-watchdog,id=w,awd_node=hb,timeout=1000"],
        )
        .unwrap();
        assert!(cfg.to_string().contains("connect timeout   1 s"), "{cfg}");
        assert!(
            cfg.to_string().contains("kernel keepalive defaults"),
            "{cfg}"
        );
    }

    #[test]
    fn connection_options_are_refused_where_they_do_not_apply() {
        let w = ["advanced-watchdog,id=w,awd_node=a,timeout=1"];
        for (chardev, want) in [
            (
                "socket,id=a,port=1,max-connections=4",
                "max-connections= is only for server mode",
            ),
            (
                "socket,id=a,port=1,server,max-connections=0",
                "max-connections=0: give 1..=4096",
            ),
            (
                "socket,id=a,port=1,server,max-connections=5000",
                "max-connections=5000",
            ),
            (
                "socket,id=a,port=1,peers=10.0.0.0/8",
                "peers= is only for TCP server mode",
            ),
            (
                "socket,id=a,path=/tmp/x,server,peers=10.0.0.0/8",
                "peers= is only for TCP server mode",
            ),
            (
                "socket,id=a,port=1,server,peers=10.1.0.0/8",
                "peers=10.1.0.0/8: '10.1.0.0/8' has host bits set",
            ),
            (
                "socket,id=a,port=1,server,peers=localhost",
                "peers=localhost: 'localhost' is not an IP address",
            ),
            (
                "socket,id=a,path=/tmp/x,tcp-user-timeout=1000",
                "tcp-user-timeout= is only for TCP",
            ),
            (
                "socket,id=a,port=1,tcp-user-timeout=500",
                "tcp-user-timeout=500: give at least 1000 ms",
            ),
            (
                "socket,id=a,port=1,rate-limit=0",
                "rate-limit=0: give at least 1",
            ),
            (
                "socket,id=a,port=1,rate-limit=-3",
                "rate-limit=-3: expected a whole number",
            ),
            (
                "vhost-user-vsock,id=a,path=/tmp/v,guest-cid=3,port=1,max-connections=3",
                "max-connections= does not apply to vhost-user-vsock",
            ),
            (
                "vhost-user-vsock,id=a,path=/tmp/v,guest-cid=3,port=1,rate-limit=0",
                "rate-limit=0",
            ),
        ] {
            let err = build(&[chardev], &w).unwrap_err().to_string();
            assert!(err.contains(want), "{chardev}: want {want:?}, got {err:?}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = Config::build(
            file::parse(
                "[chardev.a]\nport = 1\nserver = true\npeers = []\n[watchdog.w]\nawd_node = \"a\"\ntimeout = 1\n",
                Path::new("a.toml"),
            )
            .unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("an empty list admits nobody"), "{err}");
    }

    #[test]
    fn a_watchdog_with_a_notification_node_follows_the_vm_unless_told_not_to() {
        let chardevs = [
            "socket,id=hb,path=/tmp/hb.sock,server",
            "socket,id=mon,path=/tmp/mon.sock",
        ];
        let cfg = build(
            &chardevs,
            &["advanced-watchdog,id=w,awd_node=hb,notification_node=mon,timeout=1000"],
        )
        .unwrap();
        let w = &cfg.watchdogs[0];
        assert!(w.follow_vm);
        assert_eq!(w.engine.plain.conditions, vec![VM_RUNNING.to_owned()]);
        assert!(
            cfg.notes
                .iter()
                .any(|n| n.contains("follows the VM's run state")
                    && n.contains("needs a QMP monitor")
                    && n.contains("HMP or raw node")),
            "{:?}",
            cfg.notes
        );
        let text = cfg.to_string();
        assert!(text.contains("vm run state      followed on mon"), "{text}");
        assert!(text.contains("conditions vm-running"), "{text}");

        for off in ["follow-vm=off", "follow_vm=off"] {
            let cfg = build(
                &chardevs,
                &[&format!(
                    "advanced-watchdog,id=w,awd_node=hb,notification_node=mon,timeout=1000,{off}"
                )],
            )
            .unwrap();
            assert!(!cfg.watchdogs[0].follow_vm);
            assert!(cfg.watchdogs[0].engine.plain.conditions.is_empty());
            assert!(
                cfg.to_string()
                    .contains("not followed: timers run on the wall clock")
            );
            assert!(!cfg.notes.iter().any(|n| n.contains("follows the VM")));
        }
        // Without a node there is nothing to follow.
        let cfg = build(
            &chardevs,
            &["advanced-watchdog,id=w,awd_node=hb,timeout=1000"],
        )
        .unwrap();
        assert!(!cfg.watchdogs[0].follow_vm);
        assert!(cfg.watchdogs[0].engine.plain.conditions.is_empty());
        let err = build(
            &chardevs,
            &["advanced-watchdog,id=w,awd_node=hb,timeout=1000,follow-vm=on"],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("follow-vm=on needs a notification_node="),
            "{err}"
        );

        // TOML: every supervision is linked, once; an explicit opt-out contradicting a link is refused.
        let base = "[chardev.hb]\npath = \"/tmp/hb\"\nserver = true\n[chardev.mon]\npath = \"/tmp/m\"\n\
            [watchdog.w]\nawd_node = \"hb\"\nnotification_node = \"mon\"\ntimeout = 1000\n";
        let alive =
            "[[watchdog.w.alive]]\nname = \"l\"\ncheckpoint = \"t\"\ncycle = 100\nexpected = 1\n";
        let cfg = Config::build(
            file::parse(
                &format!("{base}conditions = [\"vm-running\"]\n{alive}"),
                Path::new("a.toml"),
            )
            .unwrap(),
        )
        .unwrap();
        let e = &cfg.watchdogs[0].engine;
        assert_eq!(e.plain.conditions, vec![VM_RUNNING.to_owned()]);
        assert_eq!(e.alive[0].conditions, vec![VM_RUNNING.to_owned()]);
        let err = Config::build(
            file::parse(
                &format!("{base}follow_vm = false\n{alive}conditions = [\"vm-running\"]\n"),
                Path::new("a.toml"),
            )
            .unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("follow-vm=off, but alive 'l' links condition vm-running"),
            "{err}"
        );
    }

    #[test]
    fn vsock_chardevs_share_a_device_but_not_a_port() {
        let ok = build(
            &[
                "vhost-user-vsock,id=a,path=/tmp/v.sock,guest-cid=3,port=9009",
                "vhost-user-vsock,id=b,path=/tmp/v.sock,guest-cid=3,port=9010",
            ],
            &[
                "advanced-watchdog,id=w,awd_node=a,timeout=1000",
                "advanced-watchdog,id=v,awd_node=b,timeout=1000",
            ],
        );
        assert!(ok.is_ok(), "{ok:?}");
        let err = build(
            &[
                "vhost-user-vsock,id=a,path=/tmp/v.sock,guest-cid=3,port=9009",
                "vhost-user-vsock,id=b,path=/tmp/v.sock,guest-cid=4,port=9010",
            ],
            &["advanced-watchdog,id=w,awd_node=a,timeout=1000"],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("differs from guest-cid=3"), "{err}");
    }
}
