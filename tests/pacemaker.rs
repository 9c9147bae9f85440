//! Recovery through Pacemaker (docs/clusters.md): awd's `exec` action reports a silent VM to a
//! real one-node corosync + Pacemaker cluster with `crm_resource --fail`, and Pacemaker
//! recovers the VM's resource under its own policy. The resource standing for the VM is an
//! `ocf:pacemaker:Dummy`; the heartbeat source is the real `awd-agent` over TCP.
//!
//! The cluster's state lives in Pacemaker's fixed directories, so these tests take a lock
//! (tests/common/pacemaker.rs) and run one cluster at a time.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pacemaker::{self, Cluster, NODE, Resource};
use common::*;
use serde_json::Value;

/// The resource standing for the VM: restarted in place after a failure until its fail count
/// on the node reaches 3, then moved away (here, with no other node, stopped).
const VM1: Resource = Resource {
    id: "vm1",
    agent: "ocf:pacemaker:Dummy",
    meta: &[("migration-threshold", "3")],
};
const THRESHOLD: u64 = 3;

/// A second VM's resource, failed through contrib/pacemaker/awd-fail-resource.
const VM2: Resource = Resource {
    id: "vm2",
    agent: "ocf:pacemaker:Dummy",
    meta: &[("migration-threshold", "3")],
};

/// The host's awd-agent sending heartbeats to `port` every 200 ms.
fn agent(port: u16) -> Child {
    Command::new(agent_bin())
        .args([
            "--to",
            &format!("tcp:127.0.0.1:{port}"),
            "--interval",
            "200",
            "--no-socket",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("awd-agent starts")
}

fn write_config(dir: &Path, text: &str) -> String {
    let p = dir.join("awd.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// `awd_exec_total{watchdog,result}` from awd's metrics.
fn exec_total(metrics: u16, wd: &str, result: &str) -> f64 {
    series(
        &scrape(metrics),
        &format!("awd_exec_total{{watchdog=\"{wd}\",result=\"{result}\"}}"),
    )
}

/// Waits for the outcome of the watchdog's exec action: `exec done`, `exec failed`, `exec
/// timed out` or `exec could not start`.
fn exec_outcome(awd: &mut Awd, wd: &str) -> Value {
    awd.wait(&format!("the exec outcome for {wd}"), SHORT, |v| {
        v["watchdog"] == wd
            && v["message"].as_str().is_some_and(|m| {
                [
                    "exec done",
                    "exec failed",
                    "exec timed out",
                    "exec could not start",
                ]
                .iter()
                .any(|o| m.starts_with(o))
            })
    })
}

/// Waits until the agent's heartbeats reach the watchdog (a count in `awd status`).
fn wait_heartbeats(awd: &Awd, wd: &str, at_least: u64) {
    let deadline = Instant::now() + SHORT;
    while awd.status()[wd]["heartbeats"].as_u64().unwrap_or(0) < at_least {
        assert!(
            Instant::now() < deadline,
            "no heartbeats reached {wd} within {SHORT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The whole recipe: heartbeats from a real agent, the agent killed, awd's expiry runs
/// `crm_resource --fail`, Pacemaker counts the failure and restarts the resource in place; the
/// VM comes back, falls silent again, and so on until the fail count reaches the resource's
/// `migration-threshold`: then Pacemaker, not awd, moves the resource off the node (with no
/// other node here, it stays stopped).
///
/// Pacemaker 2.1.5 (Debian 12) counts one `crm_resource --fail` as one failure or as two:
/// its controller sees the simulated failure twice in the CIB diff (the operation's
/// `vm1_last_0` modified, `vm1_last_failure_0` created) and sends attrd `value++` for each;
/// whether attrd merges them is timing. So each round asserts a rise of 1 or 2 and decides
/// what Pacemaker must do from the count it reached.
#[test]
fn an_expiry_fails_the_vm_resource_and_pacemaker_recovers_it() {
    let t0 = Instant::now();
    let dir = scratch("pacemaker-recover");
    let run = dir.path();
    let cluster = Cluster::start(run, &[VM1]);
    let up = t0.elapsed();
    let mut last_start = cluster.last_start("vm1").expect("vm1 started");
    assert_eq!(cluster.failcount("vm1"), 0);

    let (port, metrics) = (free_port(), free_port());
    let config = write_config(
        run,
        &format!(
            r#"
[chardev.hb]
host = "127.0.0.1"
port = {port}
server = true

[watchdog.vm1]
awd_node = "hb"
timeout = 1000
grace = 30000
exec = ["/usr/sbin/crm_resource", "--fail", "--resource", "vm1", "--node", "{NODE}"]
exec_timeout = 10000
"#
        ),
    );
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--config",
            &config,
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    assert_eq!(exec_total(metrics, "vm1", "success"), 0.0);

    let mut counts = Vec::new();
    let mut timings = Vec::new();
    let mut count = 0;
    // Each round adds at least 1, so the threshold is reached in at most THRESHOLD rounds.
    for round in 1..=THRESHOLD {
        let mut source = agent(port);
        if round == 1 {
            awd.wait_msg("connected", Some("vm1"), SHORT);
        } else {
            awd.wait(
                &format!("round {round}: the watchdog re-armed"),
                SHORT,
                |v| {
                    v["message"] == "watchdog status changed"
                        && v["watchdog"] == "vm1"
                        && v["to"] == "ok"
                },
            );
        }
        let before = awd.status()["vm1"]["heartbeats"].as_u64().unwrap_or(0);
        wait_heartbeats(&awd, "vm1", before + 3);
        source.kill().unwrap();
        source.wait().unwrap();
        let silenced = Instant::now();
        awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
        let done = exec_outcome(&mut awd, "vm1");
        assert!(
            done["message"].as_str().unwrap().starts_with("exec done"),
            "round {round}: crm_resource --fail succeeded: {done}"
        );
        let reported = silenced.elapsed();
        assert_eq!(exec_total(metrics, "vm1", "success"), round as f64);
        let previous = count;
        count = cluster.wait_until(
            &format!("round {round}: the fail count rises above {previous}"),
            SHORT,
            |c| Some(c.failcount("vm1")).filter(|&n| n > previous),
        );
        assert!(
            count <= previous + 2,
            "round {round}: one report raised the fail count from {previous} to {count}"
        );
        counts.push(count);
        if count < THRESHOLD {
            // Below the threshold: Pacemaker restarts vm1 where it was.
            last_start = cluster.wait_until(
                &format!("round {round}: vm1 restarted after the failure"),
                SHORT,
                |c| c.last_start("vm1").filter(|&id| id > last_start),
            );
            timings.push((reported, silenced.elapsed()));
            assert!(cluster.running_on("vm1"));
            let mon = cluster.crm_mon();
            assert!(
                mon.lines()
                    .any(|l| l.contains("vm1") && l.contains("Started node1")),
                "crm_mon shows vm1 started:\n{mon}"
            );
            assert!(
                mon.contains(&format!(
                    "vm1: migration-threshold={THRESHOLD} fail-count={count}"
                )),
                "crm_mon shows the fail count:\n{mon}"
            );
            assert!(
                mon.contains("vm1 asyncmon on node1 returned 'error' (Simulated failure)"),
                "crm_mon shows the failure awd reported:\n{mon}"
            );
            assert!(
                cluster
                    .log_lines("Actions: Recover")
                    .iter()
                    .any(|l| l.contains("vm1")),
                "the scheduler decided to recover vm1"
            );
        } else {
            // At the threshold: Pacemaker's policy moves vm1 off node1; no other node.
            cluster.wait_until(&format!("round {round}: vm1 moved off node1"), SHORT, |c| {
                (!c.running_on("vm1")).then_some(())
            });
            timings.push((reported, silenced.elapsed()));
            assert!(
                !cluster
                    .log_lines("cannot run on node1 due to reaching migration threshold")
                    .is_empty(),
                "Pacemaker's migration-threshold moved vm1 away"
            );
            let mon = cluster.crm_mon();
            assert!(
                mon.contains(&format!(
                    "vm1: migration-threshold={THRESHOLD} fail-count={count}"
                )),
                "crm_mon shows the fail count:\n{mon}"
            );
            break;
        }
    }
    assert!(count >= THRESHOLD, "fail counts per round: {counts:?}");
    assert_eq!(exec_total(metrics, "vm1", "failed"), 0.0);
    eprintln!(
        "timings: cluster up {up:?}; fail count after each round {counts:?}; per round, \
         silence to `exec done` and to Pacemaker's recovery (or move away): {timings:?}; \
         whole test before teardown {:?}",
        t0.elapsed()
    );
}

/// A command that fails (a resource the cluster does not know) or hangs past `exec_timeout`
/// is logged with its exit status and output, counted by result, and changes nothing in the
/// cluster; contrib/pacemaker/awd-fail-resource, run with no argument, fails the resource named
/// by `AWD_WATCHDOG` on this host's node (`crm_node -n`) and Pacemaker recovers that one only.
#[test]
fn failing_hanging_and_wrapped_execs_against_the_cluster() {
    let dir = scratch("pacemaker-fail");
    let run = dir.path();
    let cluster = Cluster::start(run, &[VM1, VM2]);
    let vm1_start = cluster.last_start("vm1").expect("vm1 started");
    let vm2_start = cluster.last_start("vm2").expect("vm2 started");
    let wrapper = repo().join("contrib/pacemaker/awd-fail-resource");
    let (typo, hang, wrapped, metrics) = (free_port(), free_port(), free_port(), free_port());
    // No heartbeat source at all: each watchdog expires at the end of its first timeout.
    let config = write_config(
        run,
        &format!(
            r#"
[chardev.typo]
host = "127.0.0.1"
port = {typo}
server = true

[chardev.hang]
host = "127.0.0.1"
port = {hang}
server = true

[chardev.wrapped]
host = "127.0.0.1"
port = {wrapped}
server = true

[watchdog.vm-typo]
awd_node = "typo"
timeout = 1000
exec = ["/usr/sbin/crm_resource", "--fail", "--resource", "vm9", "--node", "{NODE}"]

[watchdog.vm-hang]
awd_node = "hang"
timeout = 1000
exec = ["/bin/sleep", "60"]
exec_timeout = 500

[watchdog.vm2]
awd_node = "wrapped"
timeout = 1000
exec = ["{}"]
"#,
            wrapper.display()
        ),
    );
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--config",
            &config,
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);

    let failed = exec_outcome(&mut awd, "vm-typo");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .starts_with("exec failed"),
        "{failed}"
    );
    assert_eq!(
        failed["code"], 105,
        "crm_resource's exit status (105, no such object) is logged: {failed}"
    );
    assert!(
        failed.to_string().contains("Resource vm9 not found"),
        "crm_resource's output is logged: {failed}"
    );
    let hung = exec_outcome(&mut awd, "vm-hang");
    assert!(
        hung["message"]
            .as_str()
            .unwrap()
            .starts_with("exec timed out"),
        "{hung}"
    );
    // Killed at its timeout, not left to sleep its 60 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pacemaker::children_of(awd.pid())
        .iter()
        .any(|&p| pacemaker::comm(p).as_deref() == Some("sleep"))
    {
        assert!(
            Instant::now() < deadline,
            "the timed-out command still runs 5 s after `exec timed out`"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let wrapped = exec_outcome(&mut awd, "vm2");
    assert!(
        wrapped["message"]
            .as_str()
            .unwrap()
            .starts_with("exec done"),
        "{wrapped}"
    );
    assert!(
        wrapped["stdout"]
            .as_str()
            .unwrap_or_default()
            .contains("awd-fail-resource: failing vm2 on node1 (watchdog vm2, expired, step 0:"),
        "the wrapper saw AWD_WATCHDOG, AWD_STATUS, AWD_STEP: {wrapped}"
    );
    cluster.wait_until("vm2's fail count rises", SHORT, |c| {
        (c.failcount("vm2") >= 1).then_some(())
    });
    cluster.wait_until("vm2 restarted after the failure", SHORT, |c| {
        c.last_start("vm2").filter(|&id| id > vm2_start)
    });

    assert_eq!(exec_total(metrics, "vm-typo", "failed"), 1.0);
    assert_eq!(exec_total(metrics, "vm-typo", "success"), 0.0);
    assert_eq!(exec_total(metrics, "vm-hang", "timeout"), 1.0);
    assert_eq!(exec_total(metrics, "vm2", "success"), 1.0);
    // The cluster saw no failure of vm1.
    assert_eq!(cluster.failcount("vm1"), 0);
    assert_eq!(cluster.last_start("vm1"), Some(vm1_start));
    assert!(cluster.running_on("vm1"));
}

/// contrib/pacemaker loads with the commands docs/clusters.md gives (`cibadmin --create`,
/// `crm_attribute`, here on a CIB file rather than a live cluster) into a three-node
/// configuration that `crm_verify` finds no error in, and its awd configuration passes
/// `awd check`.
#[test]
fn the_contrib_cluster_configuration_loads_and_verifies() {
    let dir = scratch("pacemaker-contrib");
    let cib = dir.path().join("cib.xml");
    std::fs::write(
        &cib,
        r#"<cib crm_feature_set="3.16.1" validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config/>
    <nodes>
      <node id="1" uname="node1"/>
      <node id="2" uname="node2"/>
      <node id="3" uname="node3"/>
    </nodes>
    <resources/>
    <constraints/>
  </configuration>
  <status/>
</cib>
"#,
    )
    .unwrap();
    let contrib = repo().join("contrib/pacemaker");
    let tool = |prog: &str, args: &[&str]| -> (bool, String) {
        let out = Command::new(prog)
            .args(args)
            .env("CIB_file", &cib)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{prog}: {e} (scripts/install-deps test installs it)"));
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    for file in ["vm1.xml", "fencing.xml"] {
        let path = contrib.join(file).display().to_string();
        let (ok, out) = tool(
            "/usr/sbin/cibadmin",
            &["--create", "--scope", "resources", "--xml-file", &path],
        );
        assert!(ok, "cibadmin --create {file}: {out}");
    }
    let (ok, out) = tool(
        "/usr/sbin/crm_attribute",
        &[
            "--type",
            "crm_config",
            "--name",
            "stonith-enabled",
            "--update",
            "true",
        ],
    );
    assert!(ok, "crm_attribute: {out}");
    let text = std::fs::read_to_string(&cib).unwrap();
    for id in ["vm1", "fence-node1", "fence-node2", "fence-node3"] {
        assert!(
            text.contains(&format!("<primitive id=\"{id}\"")),
            "{id} loaded"
        );
    }
    // A CIB file has no status section: no node is online, so crm_verify warns (no quorum,
    // nodes unclean). A schema or configuration error would say `error`.
    let (_, out) = tool(
        "/usr/sbin/crm_verify",
        &["--xml-file", &cib.display().to_string(), "-V"],
    );
    assert!(
        !out.to_lowercase().contains("error"),
        "crm_verify found errors:\n{out}"
    );
    let (st, out, err) = awd_oneshot(&[
        "check",
        "--config",
        &contrib.join("awd-vm1.toml").display().to_string(),
    ]);
    assert!(st.success(), "awd check: {out}{err}");
    assert!(out.contains("awd-fail-resource"), "{out}");
}
