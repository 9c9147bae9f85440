//! The reload planner: from what runs and a new [`Config`], what a reload does to each
//! watchdog, action runner and vsock device, decided before anything is touched.
//!
//! It is pure: [`Layout`] describes what runs as plain data (no task, socket or device), so
//! the decisions are tested from configurations alone, and the daemon's executor
//! (`Daemon::apply`) only carries a [`ReloadPlan`] out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::config::{Chardev, Config, WatchdogConfig};
use crate::transport::{SocketChardev, VsockChardev};

use super::ReloadSummary;

/// A watchdog as the reload sees it: its configuration and the chardevs it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchdogSpec {
    /// Its configuration.
    pub cfg: WatchdogConfig,
    /// The chardev heartbeats arrive on.
    pub chardev: Chardev,
    /// The socket chardev of its notification node, if it has one.
    pub node: Option<SocketChardev>,
}

/// A vhost-user vsock device as the reload sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The watchdog each served port feeds.
    pub ports: BTreeMap<u32, String>,
    /// Who QEMU must run as.
    pub peer: crate::transport::PeerCred,
}

/// What runs, or what a configuration asks to run, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Every watchdog, by id.
    pub watchdogs: BTreeMap<String, WatchdogSpec>,
    /// One action runner per notification node, by node id, with the node's chardev.
    pub runners: BTreeMap<String, SocketChardev>,
    /// Every vsock device, by the path of its vhost-user socket.
    pub vsock: BTreeMap<PathBuf, VsockSpec>,
}

impl Layout {
    /// What `cfg` asks to run.
    pub fn of(cfg: &Config) -> Layout {
        let mut l = Layout::default();
        for w in &cfg.watchdogs {
            let chardev = cfg.chardevs[&w.awd_node].clone();
            if let Chardev::Vsock(VsockChardev {
                path,
                guest_cid,
                port,
                peer,
                ..
            }) = &chardev
            {
                l.vsock
                    .entry(path.clone())
                    .or_insert_with(|| VsockSpec {
                        guest_cid: *guest_cid,
                        ports: BTreeMap::new(),
                        peer: *peer,
                    })
                    .ports
                    .insert(*port, w.id.clone());
            }
            let node = node_of(cfg, w);
            if let Some(n) = &node {
                l.runners.insert(n.id.clone(), n.clone());
            }
            let spec = WatchdogSpec {
                cfg: w.clone(),
                chardev,
                node,
            };
            l.watchdogs.insert(w.id.clone(), spec);
        }
        l
    }
}

/// The socket chardev of a watchdog's notification node.
fn node_of(cfg: &Config, w: &WatchdogConfig) -> Option<SocketChardev> {
    match w.notification_node.as_ref().map(|n| &cfg.chardevs[n]) {
        Some(Chardev::Socket(s)) => Some(s.clone()),
        _ => None,
    }
}

/// The endpoint a chardev listens on, as text (`None`: it does not listen on a socket).
fn listening(c: &Chardev) -> Option<String> {
    match c {
        Chardev::Socket(s) if s.server => Some(s.endpoint.to_string()),
        _ => None,
    }
}

/// The step of everything in `old` or `new`, by id: `start` for what only `new` has, `stop`
/// for what only `old` has, `both` of the two for the rest.
fn steps<V, S: Copy>(
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
    (start, stop): (S, S),
    both: impl Fn(&V, &V) -> S,
) -> BTreeMap<String, S> {
    let mut out: BTreeMap<String, S> = new
        .iter()
        .map(|(id, n)| (id.clone(), old.get(id).map_or(start, |o| both(o, n))))
        .collect();
    for id in old.keys().filter(|id| !new.contains_key(*id)) {
        out.insert(id.clone(), stop);
    }
    out
}

/// Why a reload is refused as a whole. The message is the same for every vsock refusal;
/// the variant says what changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The guest CID of a running vsock device would change. QEMU 7.2 does not reconnect a
    /// vhost-user-vsock device, so that needs a restart of awd and QEMU.
    #[error(
        "vsock device {path}: its ports or guest CID changed; restart awd (and QEMU) to apply that"
    )]
    VsockGuestCid {
        /// The device's vhost-user socket.
        path: PathBuf,
        /// The CID it runs with.
        running: u64,
        /// The CID the new configuration gives it.
        wanted: u64,
    },
    /// The set of ports a running vsock device serves would change (for the same reason).
    #[error(
        "vsock device {path}: its ports or guest CID changed; restart awd (and QEMU) to apply that"
    )]
    VsockPorts {
        /// The device's vhost-user socket.
        path: PathBuf,
        /// The ports it serves.
        running: Vec<u32>,
        /// The ports the new configuration gives it.
        wanted: Vec<u32>,
    },
    /// The `peer-uid=`/`peer-gid=` of a running vsock device would change. The QEMU it serves
    /// was admitted under the old ones; it is not disconnected behind the operator's back.
    #[error(
        "vsock device {path}: its peer-uid/peer-gid changed; restart awd (and QEMU) to apply that"
    )]
    VsockPeer {
        /// The device's vhost-user socket.
        path: PathBuf,
    },
}

/// What a reload does to one watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogStep {
    /// New: started.
    Add,
    /// Its channel changed: stopped and started again.
    Replace,
    /// Its supervision, script or notification node changed: reconfigured in place, its
    /// connections kept.
    Change,
    /// Unchanged: left exactly as it is.
    Keep,
    /// Gone from the configuration: stopped, its metrics series removed.
    Remove,
}

/// What a reload does to the action runner of one notification node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerStep {
    /// A node no running watchdog used: a runner is started.
    Start,
    /// The node's chardev changed: the old runner is stopped and a new one started.
    Swap,
    /// Unchanged.
    Keep,
    /// No watchdog uses the node any more: its runner is stopped, its metrics removed.
    Stop,
}

/// What a reload does to one vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockStep {
    /// A new device: spawned, serving the ports of the new layout.
    Spawn,
    /// A running device keeps its guest connections. `rebind`: the ports whose watchdog
    /// starts anew (added or replaced), fed to it from now on.
    Keep {
        /// Port and the id of the watchdog it feeds from now on.
        rebind: Vec<(u32, String)>,
    },
    /// No watchdog uses it any more: stopped.
    Remove,
}

/// What a reload does, decided from the running [`Layout`] and the new configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadPlan {
    /// The layout once the reload is done: what the new configuration asks to run.
    pub target: Layout,
    /// Every watchdog, running or new, by id.
    pub watchdogs: BTreeMap<String, WatchdogStep>,
    /// The started watchdogs whose listening endpoint a running watchdog holds: bound only
    /// after that one stops (a failure then is logged; the rest of the reload goes on).
    pub late_bind: BTreeSet<String>,
    /// Every action runner, running or needed, by notification node id.
    pub runners: BTreeMap<String, RunnerStep>,
    /// Every vsock device, running or needed, by socket path.
    pub vsock: BTreeMap<PathBuf, VsockStep>,
}

impl ReloadPlan {
    /// Plans the move from `old` to `cfg`; refused if it changes what a running vsock device
    /// serves (the first such device in path order).
    pub fn new(old: &Layout, cfg: &Config) -> Result<ReloadPlan, Refusal> {
        let target = Layout::of(cfg);
        for (path, want) in &target.vsock {
            let Some(run) = old.vsock.get(path) else {
                continue;
            };
            if run.guest_cid != want.guest_cid {
                return Err(Refusal::VsockGuestCid {
                    path: path.clone(),
                    running: run.guest_cid,
                    wanted: want.guest_cid,
                });
            }
            if run.peer != want.peer {
                return Err(Refusal::VsockPeer { path: path.clone() });
            }
            if !run.ports.keys().eq(want.ports.keys()) {
                return Err(Refusal::VsockPorts {
                    path: path.clone(),
                    running: run.ports.keys().copied().collect(),
                    wanted: want.ports.keys().copied().collect(),
                });
            }
        }

        let ends = (WatchdogStep::Add, WatchdogStep::Remove);
        let watchdogs = steps(&old.watchdogs, &target.watchdogs, ends, |r, w| {
            if r.chardev != w.chardev {
                WatchdogStep::Replace
            } else if r.cfg != w.cfg || r.node != w.node {
                WatchdogStep::Change
            } else {
                WatchdogStep::Keep
            }
        });
        let starts = |id: &String| {
            matches!(
                watchdogs.get(id),
                Some(WatchdogStep::Add | WatchdogStep::Replace)
            )
        };

        // A replaced watchdog's endpoint is still held by its old self until that stops.
        let held: BTreeSet<String> = old
            .watchdogs
            .values()
            .filter_map(|r| listening(&r.chardev))
            .collect();
        let late_bind = target
            .watchdogs
            .iter()
            .filter(|(id, w)| {
                starts(id) && listening(&w.chardev).is_some_and(|e| held.contains(&e))
            })
            .map(|(id, _)| id.clone())
            .collect();

        let ends = (RunnerStep::Start, RunnerStep::Stop);
        let runners = steps(&old.runners, &target.runners, ends, |r, c| {
            if r == c {
                RunnerStep::Keep
            } else {
                RunnerStep::Swap
            }
        });

        // Which watchdog a port of a running device feeds can change (a renamed chardev, a
        // watchdog moved to another port); its port set and CID cannot (refused above).
        let mut vsock = BTreeMap::new();
        for (path, want) in &target.vsock {
            let step = if old.vsock.contains_key(path) {
                let rebind = want
                    .ports
                    .iter()
                    .filter(|(_, id)| starts(id))
                    .map(|(port, id)| (*port, id.clone()))
                    .collect();
                VsockStep::Keep { rebind }
            } else {
                VsockStep::Spawn
            };
            vsock.insert(path.clone(), step);
        }
        for path in old.vsock.keys() {
            if !target.vsock.contains_key(path) {
                vsock.insert(path.clone(), VsockStep::Remove);
            }
        }

        Ok(ReloadPlan {
            target,
            watchdogs,
            late_bind,
            runners,
            vsock,
        })
    }

    /// The ids of the watchdogs `step` happens to, in id order.
    pub fn ids(&self, step: WatchdogStep) -> impl Iterator<Item = &String> + '_ {
        self.watchdogs
            .iter()
            .filter(move |(_, s)| **s == step)
            .map(|(id, _)| id)
    }

    /// The watchdogs that start anew (added or replaced), in id order.
    pub fn starting(&self) -> impl Iterator<Item = (&String, &WatchdogSpec)> + '_ {
        self.target.watchdogs.iter().filter(|(id, _)| {
            matches!(
                self.watchdogs.get(*id),
                Some(WatchdogStep::Add | WatchdogStep::Replace)
            )
        })
    }

    /// The notification nodes whose runner `pick` selects, in id order.
    pub fn runner_ids(&self, pick: fn(RunnerStep) -> bool) -> impl Iterator<Item = &String> + '_ {
        self.runners
            .iter()
            .filter(move |(_, s)| pick(**s))
            .map(|(id, _)| id)
    }

    /// What the reload reports.
    pub fn summary(&self) -> ReloadSummary {
        let list = |step| self.ids(step).cloned().collect();
        ReloadSummary {
            added: list(WatchdogStep::Add),
            removed: list(WatchdogStep::Remove),
            changed: list(WatchdogStep::Change),
            replaced: list(WatchdogStep::Replace),
            kept: self.ids(WatchdogStep::Keep).count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;
    use RunnerStep as R;
    use WatchdogStep as W;

    /// A configuration in the seed's syntax, one `-chardev SPEC` or `-object SPEC` per line.
    /// The parser refuses a configuration without watchdogs, so "" stands for the empty
    /// [`Config`] (what runs before the daemon's first `apply`).
    fn config(text: &str) -> Config {
        let (mut chardevs, mut objects) = (Vec::new(), Vec::new());
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match line.split_once(' ') {
                Some(("-chardev", spec)) => chardevs.push(spec.to_owned()),
                Some(("-object", spec)) => objects.push(spec.to_owned()),
                _ => panic!("not -chardev or -object: {line}"),
            }
        }
        if chardevs.is_empty() && objects.is_empty() {
            return Config::default();
        }
        let mut raw = RawConfig::default();
        raw.add_seed_args(&chardevs, &objects).expect("seed syntax");
        Config::build(raw).expect("a valid configuration")
    }

    /// The steps a row expects (the target layout is always [`Layout::of`] the new
    /// configuration).
    #[derive(Debug, PartialEq, Eq)]
    struct Steps {
        watchdogs: Vec<(String, WatchdogStep)>,
        late_bind: Vec<String>,
        runners: Vec<(String, RunnerStep)>,
        vsock: Vec<(PathBuf, VsockStep)>,
    }

    fn want(
        watchdogs: &[(&str, WatchdogStep)],
        late_bind: &[&str],
        runners: &[(&str, RunnerStep)],
        vsock: &[(&str, VsockStep)],
    ) -> Result<Steps, Refusal> {
        Ok(Steps {
            watchdogs: watchdogs.iter().map(|(i, s)| ((*i).into(), *s)).collect(),
            late_bind: late_bind.iter().map(|i| (*i).into()).collect(),
            runners: runners.iter().map(|(i, s)| ((*i).into(), *s)).collect(),
            vsock: vsock
                .iter()
                .map(|(p, s)| ((*p).into(), s.clone()))
                .collect(),
        })
    }

    fn steps(plan: &ReloadPlan) -> Steps {
        Steps {
            watchdogs: plan
                .watchdogs
                .iter()
                .map(|(i, s)| (i.clone(), *s))
                .collect(),
            late_bind: plan.late_bind.iter().cloned().collect(),
            runners: plan.runners.iter().map(|(i, s)| (i.clone(), *s)).collect(),
            vsock: plan
                .vsock
                .iter()
                .map(|(p, s)| (p.clone(), s.clone()))
                .collect(),
        }
    }

    /// Every running watchdog, runner and device has a step that ends it or carries it on,
    /// and every one the target needs has a step that starts it or carries it on.
    fn assert_accounts_for_everything(plan: &ReloadPlan, old: &Layout, name: &str) {
        for (id, step) in &plan.watchdogs {
            let (was, will) = (
                old.watchdogs.contains_key(id),
                plan.target.watchdogs.contains_key(id),
            );
            let ok = match step {
                W::Add => !was && will,
                W::Remove => was && !will,
                W::Replace | W::Change | W::Keep => was && will,
            };
            assert!(ok, "{name}: watchdog {id}: {step:?}");
        }
        let all: BTreeSet<_> = old
            .watchdogs
            .keys()
            .chain(plan.target.watchdogs.keys())
            .collect();
        assert!(
            all.iter()
                .eq(plan.watchdogs.keys().collect::<BTreeSet<_>>().iter()),
            "{name}"
        );
        let all: BTreeSet<_> = old
            .runners
            .keys()
            .chain(plan.target.runners.keys())
            .collect();
        assert!(
            all.iter()
                .eq(plan.runners.keys().collect::<BTreeSet<_>>().iter()),
            "{name}"
        );
        let all: BTreeSet<_> = old.vsock.keys().chain(plan.target.vsock.keys()).collect();
        assert!(
            all.iter()
                .eq(plan.vsock.keys().collect::<BTreeSet<_>>().iter()),
            "{name}"
        );
    }

    fn rebind(ports: &[(u32, &str)]) -> VsockStep {
        VsockStep::Keep {
            rebind: ports.iter().map(|(p, id)| (*p, (*id).to_owned())).collect(),
        }
    }

    const HB: &str = "-chardev socket,id=hb,path=/run/hb.sock,server=on";
    const HB_NARROW: &str = "-chardev socket,id=hb,path=/run/hb.sock,server=on,max-connections=2";
    const HB_RENAMED: &str = "-chardev socket,id=hb2,path=/run/hb.sock,server=on";
    const HB_MOVED: &str = "-chardev socket,id=hb,path=/run/hb-new.sock,server=on";
    const PEER: &str = "-chardev socket,id=peer,host=127.0.0.1,port=9009,reconnect=1";
    const MON: &str = "-chardev socket,id=mon,path=/run/mon.sock";
    const MON_MOVED: &str = "-chardev socket,id=mon,path=/run/mon-new.sock";
    const MON2: &str = "-chardev socket,id=mon2,path=/run/mon2.sock";
    const A: &str = "-object advanced-watchdog,id=a,awd_node=hb,timeout=1000";
    const A_ON_HB2: &str = "-object advanced-watchdog,id=a,awd_node=hb2,timeout=1000";
    const A_SLOW: &str = "-object advanced-watchdog,id=a,awd_node=hb,timeout=5000";
    const A_MON: &str =
        "-object advanced-watchdog,id=a,awd_node=hb,notification_node=mon,timeout=1000";
    const A_MON2: &str =
        "-object advanced-watchdog,id=a,awd_node=hb,notification_node=mon2,timeout=1000";
    const B: &str = "-object advanced-watchdog,id=b,awd_node=hb,timeout=1000";
    const C_PEER: &str = "-object advanced-watchdog,id=c,awd_node=peer,timeout=1000";
    const C_PEER_MON: &str =
        "-object advanced-watchdog,id=c,awd_node=peer,notification_node=mon,timeout=1000";
    const V9: &str = "-chardev vhost-user-vsock,id=v9,path=/run/v.sock,guest-cid=3,port=9009";
    const V9_RENAMED: &str =
        "-chardev vhost-user-vsock,id=w9,path=/run/v.sock,guest-cid=3,port=9009";
    const V9_CID4: &str = "-chardev vhost-user-vsock,id=v9,path=/run/v.sock,guest-cid=4,port=9009";
    const V9_UID: &str =
        "-chardev vhost-user-vsock,id=v9,path=/run/v.sock,guest-cid=3,port=9009,peer-uid=107";
    const V9_OTHER: &str = "-chardev vhost-user-vsock,id=v9,path=/run/u.sock,guest-cid=3,port=9009";
    const V10: &str = "-chardev vhost-user-vsock,id=v10,path=/run/v.sock,guest-cid=3,port=9010";
    const V11: &str = "-chardev vhost-user-vsock,id=v10,path=/run/v.sock,guest-cid=3,port=9011";
    const VM_V9: &str = "-object advanced-watchdog,id=vm,awd_node=v9,timeout=1000";
    const VM_V9_SLOW: &str = "-object advanced-watchdog,id=vm,awd_node=v9,timeout=5000";
    const VM_W9: &str = "-object advanced-watchdog,id=vm,awd_node=w9,timeout=1000";
    const VM_V10: &str = "-object advanced-watchdog,id=vm,awd_node=v10,timeout=1000";
    const APP_V9: &str = "-object advanced-watchdog,id=app,awd_node=v9,timeout=1000";
    const APP_V10: &str = "-object advanced-watchdog,id=app,awd_node=v10,timeout=1000";

    fn lines(parts: &[&str]) -> String {
        parts.join("\n")
    }

    #[test]
    fn every_kind_of_change_is_planned() {
        let v = "/run/v.sock";
        let cases: Vec<(&str, String, String, Result<Steps, Refusal>)> = vec![
            (
                "empty to full: everything starts",
                String::new(),
                lines(&[HB, MON, V9, A_MON, VM_V9]),
                want(
                    &[("a", W::Add), ("vm", W::Add)],
                    &[],
                    &[("mon", R::Start)],
                    &[(v, VsockStep::Spawn)],
                ),
            ),
            (
                "full to empty: everything stops",
                lines(&[HB, MON, V9, A_MON, VM_V9]),
                String::new(),
                want(
                    &[("a", W::Remove), ("vm", W::Remove)],
                    &[],
                    &[("mon", R::Stop)],
                    &[(v, VsockStep::Remove)],
                ),
            ),
            (
                "unchanged: kept",
                lines(&[HB, MON, V9, A_MON, VM_V9]),
                lines(&[HB, MON, V9, A_MON, VM_V9]),
                want(
                    &[("a", W::Keep), ("vm", W::Keep)],
                    &[],
                    &[("mon", R::Keep)],
                    &[(v, rebind(&[]))],
                ),
            ),
            (
                "a chardev nobody uses does not matter",
                lines(&[HB, A]),
                lines(&[HB, MON2, PEER, A]),
                want(&[("a", W::Keep)], &[], &[], &[]),
            ),
            (
                "added",
                lines(&[HB, A]),
                lines(&[HB, PEER, A, C_PEER]),
                want(&[("a", W::Keep), ("c", W::Add)], &[], &[], &[]),
            ),
            (
                "removed",
                lines(&[HB, PEER, A, C_PEER]),
                lines(&[HB, A]),
                want(&[("a", W::Keep), ("c", W::Remove)], &[], &[], &[]),
            ),
            (
                "a new timeout is a change in place",
                lines(&[HB, A]),
                lines(&[HB, A_SLOW]),
                want(&[("a", W::Change)], &[], &[], &[]),
            ),
            (
                "a new endpoint replaces the watchdog",
                lines(&[HB, A]),
                lines(&[HB_MOVED, A]),
                want(&[("a", W::Replace)], &[], &[], &[]),
            ),
            (
                "a new option on the same endpoint replaces it, bound once the old one stops",
                lines(&[HB, A]),
                lines(&[HB_NARROW, A]),
                want(&[("a", W::Replace)], &["a"], &[], &[]),
            ),
            (
                "a renamed chardev replaces the watchdog on the same endpoint",
                lines(&[HB, A]),
                lines(&[HB_RENAMED, A_ON_HB2]),
                want(&[("a", W::Replace)], &["a"], &[], &[]),
            ),
            (
                "an endpoint moved to a new watchdog is bound once the old one stops",
                lines(&[HB, A]),
                lines(&[HB, B]),
                want(&[("a", W::Remove), ("b", W::Add)], &["b"], &[], &[]),
            ),
            (
                "a node given to a watchdog starts a runner and changes the watchdog",
                lines(&[HB, MON, A]),
                lines(&[HB, MON, A_MON]),
                want(&[("a", W::Change)], &[], &[("mon", R::Start)], &[]),
            ),
            (
                "a node whose chardev changed swaps its runner and changes its watchdogs",
                lines(&[HB, PEER, MON, A_MON, C_PEER_MON]),
                lines(&[HB, PEER, MON_MOVED, A_MON, C_PEER_MON]),
                want(
                    &[("a", W::Change), ("c", W::Change)],
                    &[],
                    &[("mon", R::Swap)],
                    &[],
                ),
            ),
            (
                "a node still used by another watchdog keeps its runner",
                lines(&[HB, PEER, MON, A_MON, C_PEER_MON]),
                lines(&[HB, PEER, MON, A, C_PEER_MON]),
                want(
                    &[("a", W::Change), ("c", W::Keep)],
                    &[],
                    &[("mon", R::Keep)],
                    &[],
                ),
            ),
            (
                "a node nobody uses any more stops its runner",
                lines(&[HB, MON, A_MON]),
                lines(&[HB, MON, A]),
                want(&[("a", W::Change)], &[], &[("mon", R::Stop)], &[]),
            ),
            (
                "a watchdog moved to another node: one runner stops, another starts",
                lines(&[HB, MON, MON2, A_MON]),
                lines(&[HB, MON, MON2, A_MON2]),
                want(
                    &[("a", W::Change)],
                    &[],
                    &[("mon", R::Stop), ("mon2", R::Start)],
                    &[],
                ),
            ),
            (
                "a renamed vsock chardev: the port is re-bound to the replaced watchdog",
                lines(&[V9, V10, VM_V9, APP_V10]),
                lines(&[V9_RENAMED, V10, VM_W9, APP_V10]),
                want(
                    &[("app", W::Keep), ("vm", W::Replace)],
                    &[],
                    &[],
                    &[(v, rebind(&[(9009, "vm")]))],
                ),
            ),
            (
                "watchdogs swapped between vsock ports: both re-bound",
                lines(&[V9, V10, VM_V9, APP_V10]),
                lines(&[V9, V10, VM_V10, APP_V9]),
                want(
                    &[("app", W::Replace), ("vm", W::Replace)],
                    &[],
                    &[],
                    &[(v, rebind(&[(9009, "app"), (9010, "vm")]))],
                ),
            ),
            (
                "a vsock watchdog changed in place keeps its port as it is",
                lines(&[V9, VM_V9]),
                lines(&[V9, VM_V9_SLOW]),
                want(&[("vm", W::Change)], &[], &[], &[(v, rebind(&[]))]),
            ),
            (
                "a vsock watchdog moved to a new device: one spawned, the other removed",
                lines(&[V9, VM_V9]),
                lines(&[V9_OTHER, VM_V9]),
                want(
                    &[("vm", W::Replace)],
                    &[],
                    &[],
                    &[("/run/u.sock", VsockStep::Spawn), (v, VsockStep::Remove)],
                ),
            ),
            (
                "a new port on a running vsock device is refused",
                lines(&[V9, V10, VM_V9, APP_V10]),
                lines(&[V9, V11, VM_V9, APP_V10]),
                Err(Refusal::VsockPorts {
                    path: v.into(),
                    running: vec![9009, 9010],
                    wanted: vec![9009, 9011],
                }),
            ),
            (
                "a port dropped from a running vsock device is refused",
                lines(&[V9, V10, VM_V9, APP_V10]),
                lines(&[V9, VM_V9]),
                Err(Refusal::VsockPorts {
                    path: v.into(),
                    running: vec![9009, 9010],
                    wanted: vec![9009],
                }),
            ),
            (
                "a new guest CID on a running vsock device is refused",
                lines(&[V9, VM_V9]),
                lines(&[V9_CID4, VM_V9]),
                Err(Refusal::VsockGuestCid {
                    path: v.into(),
                    running: 3,
                    wanted: 4,
                }),
            ),
            (
                "new peer credentials on a running vsock device are refused",
                lines(&[V9, VM_V9]),
                lines(&[V9_UID, VM_V9]),
                Err(Refusal::VsockPeer { path: v.into() }),
            ),
            (
                "several at once",
                lines(&[HB, PEER, MON, V9, V10, A_MON, C_PEER, VM_V9, APP_V10]),
                lines(&[HB_NARROW, MON_MOVED, MON2, V9, V10, A_MON2, VM_V10, APP_V9]),
                want(
                    &[
                        ("a", W::Replace),
                        ("app", W::Replace),
                        ("c", W::Remove),
                        ("vm", W::Replace),
                    ],
                    &["a"],
                    &[("mon", R::Stop), ("mon2", R::Start)],
                    &[(v, rebind(&[(9009, "app"), (9010, "vm")]))],
                ),
            ),
        ];
        for (name, old, new, expected) in cases {
            let (old, new) = (Layout::of(&config(&old)), config(&new));
            let plan = ReloadPlan::new(&old, &new);
            assert_eq!(
                plan.as_ref().map(steps).map_err(Clone::clone),
                expected,
                "{name}"
            );
            if let Ok(plan) = plan {
                assert_eq!(plan.target, Layout::of(&new), "{name}");
                assert_accounts_for_everything(&plan, &old, name);
            }
        }
    }

    /// The end-to-end reload scenario (tests/operations.rs), as the summary line reports it.
    #[test]
    fn the_summary_lists_each_kind_of_step() {
        let table = |id: &str, timeout: u64| {
            format!(
                "-chardev socket,id={id},path=/run/{id}.sock,server=on\n\
                 -object advanced-watchdog,id={id},awd_node={id},timeout={timeout}\n"
            )
        };
        let old = config(
            &[
                table("keep", 60000),
                table("drop", 60000),
                table("tune", 60000),
            ]
            .concat(),
        );
        let new = config(
            &[
                table("keep", 60000),
                table("tune", 400),
                table("new", 60000),
            ]
            .concat(),
        );
        let plan = ReloadPlan::new(&Layout::of(&old), &new).unwrap();
        assert_eq!(
            plan.summary().to_string(),
            "added new, removed drop, changed tune, replaced -, 1 unchanged"
        );
        let start = ReloadPlan::new(&Layout::default(), &new).unwrap();
        assert_eq!(
            start.summary(),
            ReloadSummary {
                added: vec!["keep".into(), "new".into(), "tune".into()],
                ..ReloadSummary::default()
            }
        );
    }

    #[test]
    fn a_refusal_says_what_to_do() {
        let old = Layout::of(&config(&lines(&[V9, VM_V9])));
        let err = ReloadPlan::new(&old, &config(&lines(&[V9_CID4, VM_V9]))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "vsock device /run/v.sock: its ports or guest CID changed; restart awd (and QEMU) to apply that"
        );
    }
}
