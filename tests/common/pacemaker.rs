//! A real one-node Pacemaker cluster on loopback: corosync (knet on 127.0.0.1, one vote,
//! quorate alone) and pacemakerd, started by the test as its own children and stopped on drop.
//!
//! Pacemaker keeps its state in fixed places (`/var/lib/pacemaker/cib`, its IPC names), so one
//! such cluster can run on a machine at a time: a lock file serializes the tests that start
//! one, across test binaries and work trees, and the CIB is wiped before and after. The test
//! refuses to run (it never stops or wipes anything) where a cluster it did not start runs or
//! a CIB it did not write is on disk. Fencing is off (`stonith-enabled=false`): there is
//! nothing to fence on a one-node test cluster; production clusters need it
//! (docs/clusters.md).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::LineStream;

/// Pacemaker's state directory (fixed at build time).
const STATE: &str = "/var/lib/pacemaker";
/// The lock that serializes the tests that run a cluster.
const LOCK: &str = "/var/lib/pacemaker/awd-e2e.lock";
/// The pids of the cluster processes a test started, for the next run to end them if that
/// test was killed before its drop ran.
const PIDS: &str = "/var/lib/pacemaker/awd-e2e.pids";
/// The cluster name, also the mark by which a CIB on disk is known as the tests' own.
pub const CLUSTER: &str = "awd-e2e-test";
/// The one node's name (corosync's nodelist; Pacemaker's uname).
pub const NODE: &str = "node1";
/// How long the cluster gets to start, elect itself and start its resources.
pub const START: Duration = Duration::from_secs(60);

/// The tools the cluster needs, with the package that brings each.
const TOOLS: &[(&str, &str)] = &[
    ("/usr/sbin/corosync", "corosync"),
    ("/usr/sbin/pacemakerd", "pacemaker"),
    ("/usr/sbin/crm_mon", "pacemaker-cli-utils"),
    ("/usr/sbin/crm_resource", "pacemaker-cli-utils"),
    ("/usr/sbin/crm_failcount", "pacemaker-cli-utils"),
    ("/usr/sbin/cibadmin", "pacemaker-cli-utils"),
    ("/usr/lib/ocf/resource.d/pacemaker/Dummy", "pacemaker"),
];

/// A one-node cluster; see the module documentation.
pub struct Cluster {
    dir: PathBuf,
    corosync: Option<Child>,
    pacemakerd: Option<Child>,
    /// corosync's stderr (its log: `to_stderr`).
    pub corosync_log: LineStream,
    /// Held for the cluster's life.
    _lock: File,
}

/// What a resource is: a primitive with its meta attributes.
pub struct Resource<'a> {
    pub id: &'a str,
    /// `class:provider:type`, e.g. `ocf:pacemaker:Dummy`.
    pub agent: &'a str,
    /// Meta attributes (`migration-threshold`, `failure-timeout`, …).
    pub meta: &'a [(&'a str, &'a str)],
}

impl Cluster {
    /// Starts corosync and pacemakerd with `resources` in a fresh CIB and waits until each
    /// resource is started on [`NODE`]. Logs go to `dir` (`corosync.log`, `pacemaker.log`).
    pub fn start(dir: &Path, resources: &[Resource]) -> Cluster {
        for (tool, package) in TOOLS {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: install {package} (scripts/install-deps test does)"
            );
        }
        let lock = take_lock();
        end_leftovers();
        refuse_foreign_cluster();
        wipe_cib();
        write_cib(resources);

        // The daemons that run as hacluster write pacemaker.log in the test's directory.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (uid, gid) = hacluster();
        let plog = dir.join("pacemaker.log");
        std::fs::write(&plog, "").unwrap();
        std::os::unix::fs::chown(&plog, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&plog, std::fs::Permissions::from_mode(0o660)).unwrap();

        let conf = dir.join("corosync.conf");
        std::fs::write(&conf, corosync_conf()).unwrap();
        let mut corosync = Command::new("/usr/sbin/corosync")
            .arg("-f")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("corosync starts");
        let corosync_log = LineStream::from_reader(
            corosync.stderr.take().unwrap(),
            Some(dir.join("corosync.log")),
        );
        record_pids(&[corosync.id()]);
        // From here on, a failure stops what was started (drop).
        let mut cluster = Cluster {
            dir: dir.to_owned(),
            corosync: Some(corosync),
            pacemakerd: None,
            corosync_log,
            _lock: lock,
        };
        cluster.corosync_log.wait("corosync ready", START, |l| {
            l.contains("ready to provide service")
        });

        let pacemakerd = Command::new("/usr/sbin/pacemakerd")
            .env("PCMK_logfile", &plog)
            .env("PCMK_logfacility", "none")
            .env("PCMK_debug", "no")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pacemakerd starts");
        cluster.pacemakerd = Some(pacemakerd);
        cluster.record();
        for r in resources {
            cluster.wait_until(&format!("{} started", r.id), START, |c| {
                // Its daemons, as they appear, for a later run to end if this one is killed.
                c.record();
                c.running_on(r.id).then_some(())
            });
        }
        // pacemakerd has spawned every daemon by now.
        cluster.record();
        cluster
    }

    /// Records the pids of corosync, pacemakerd and pacemakerd's daemons.
    fn record(&self) {
        let mut pids: Vec<u32> = self.corosync.iter().map(Child::id).collect();
        if let Some(p) = &self.pacemakerd {
            pids.push(p.id());
            pids.extend(children_of(p.id()));
        }
        record_pids(&pids);
    }

    /// Polls `probe` every 100 ms until it gives a value; fails the test after `timeout`.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&Cluster) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = probe(self) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; crm_mon:\n{}",
                self.crm_mon()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `crm_mon -1 --failcounts`: the cluster as an operator sees it.
    pub fn crm_mon(&self) -> String {
        run("/usr/sbin/crm_mon", &["-1", "--failcounts"]).1
    }

    /// The resource's fail count on [`NODE`] (`crm_failcount --query`); INFINITY is `u64::MAX`.
    pub fn failcount(&self, rsc: &str) -> u64 {
        let (ok, out) = run(
            "/usr/sbin/crm_failcount",
            &["--query", "-r", rsc, "-N", NODE],
        );
        assert!(ok, "crm_failcount failed: {out}");
        let value = out
            .split_whitespace()
            .find_map(|w| w.strip_prefix("value="))
            .unwrap_or_else(|| panic!("no value in crm_failcount's answer: {out}"));
        if value == "INFINITY" {
            u64::MAX
        } else {
            value.parse().expect("a number")
        }
    }

    /// Whether Pacemaker runs the resource on [`NODE`] (`crm_resource --locate`).
    pub fn running_on(&self, rsc: &str) -> bool {
        let (ok, out) = run("/usr/sbin/crm_resource", &["--locate", "--resource", rsc]);
        ok && out.contains(&format!("is running on: {NODE}"))
    }

    /// The call id of the resource's last operation when that was a successful start: the
    /// executor numbers every operation, so a larger one is a later start (a recovery).
    pub fn last_start(&self, rsc: &str) -> Option<u64> {
        let xpath = format!("//lrm_resource[@id='{rsc}']/lrm_rsc_op[@id='{rsc}_last_0']");
        let (ok, out) = run("/usr/sbin/cibadmin", &["--query", "--xpath", &xpath]);
        if !ok || attr(&out, "operation")? != "start" || attr(&out, "rc-code")? != "0" {
            return None;
        }
        attr(&out, "call-id")?.parse().ok()
    }

    /// The lines of pacemaker.log containing `needle` (the scheduler's `Actions: Recover
    /// vm1 ( node1 )`, for instance).
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("pacemaker.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== crm_mon =====\n{}", self.crm_mon());
            eprintln!("===== corosync log =====");
            for l in self.corosync_log.all() {
                eprintln!("{l}");
            }
            eprintln!("===== pacemaker.log (notices and worse) =====");
            for l in std::fs::read_to_string(self.dir.join("pacemaker.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.contains("\tinfo: ") && !l.contains("\tdebug: "))
            {
                eprintln!("{l}");
            }
        }
        if let Some(mut p) = self.pacemakerd.take() {
            let daemons = children_of(p.id());
            // SIGTERM: pacemakerd stops the resources, then its daemons, then itself.
            signal(p.id(), libc::SIGTERM);
            if !exited_within(&mut p, Duration::from_secs(30)) {
                eprintln!("pacemakerd did not stop within 30 s: killed");
                let _ = p.kill();
                let _ = p.wait();
            }
            for pid in daemons {
                if is_cluster_process(pid) {
                    signal(pid, libc::SIGKILL);
                }
            }
        }
        if let Some(mut c) = self.corosync.take() {
            signal(c.id(), libc::SIGTERM);
            if !exited_within(&mut c, Duration::from_secs(10)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        wipe_cib();
        let _ = std::fs::remove_file(PIDS);
    }
}

fn corosync_conf() -> String {
    format!(
        "# One node on loopback, quorate alone: written by awd's tests (tests/common/pacemaker.rs).
totem {{
    version: 2
    cluster_name: {CLUSTER}
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 1000
}}
nodelist {{
    node {{
        name: {NODE}
        nodeid: 1
        ring0_addr: 127.0.0.1
    }}
}}
quorum {{
    provider: corosync_votequorum
    expected_votes: 1
}}
logging {{
    to_stderr: yes
    to_logfile: no
    to_syslog: no
    timestamp: on
}}
"
    )
}

/// The CIB the cluster starts with: no fencing (one test node; production needs it), a short
/// `dc-deadtime` (a lone node need not wait 20 s for peers before it elects itself), the
/// resources.
fn cib(resources: &[Resource]) -> String {
    let mut prims = String::new();
    for r in resources {
        let mut parts = r.agent.splitn(3, ':');
        let (class, provider, kind) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().expect("class:provider:type"),
        );
        let id = r.id;
        let mut meta = String::new();
        for (k, v) in r.meta {
            meta.push_str(&format!(
                "          <nvpair id=\"{id}-meta-{k}\" name=\"{k}\" value=\"{v}\"/>\n"
            ));
        }
        prims.push_str(&format!(
            "      <primitive id=\"{id}\" class=\"{class}\" provider=\"{provider}\" type=\"{kind}\">
        <meta_attributes id=\"{id}-meta\">
{meta}        </meta_attributes>
        <operations>
          <op id=\"{id}-monitor-10s\" name=\"monitor\" interval=\"10s\" timeout=\"20s\"/>
        </operations>
      </primitive>
"
        ));
    }
    format!(
        "<cib crm_feature_set=\"3.16.1\" validate-with=\"pacemaker-3.9\" epoch=\"1\" num_updates=\"0\" admin_epoch=\"0\">
  <configuration>
    <crm_config>
      <cluster_property_set id=\"cib-bootstrap-options\">
        <nvpair id=\"cib-bootstrap-options-cluster-name\" name=\"cluster-name\" value=\"{CLUSTER}\"/>
        <nvpair id=\"opt-stonith-enabled\" name=\"stonith-enabled\" value=\"false\"/>
        <nvpair id=\"opt-dc-deadtime\" name=\"dc-deadtime\" value=\"1s\"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources>
{prims}    </resources>
    <constraints/>
  </configuration>
  <status/>
</cib>
"
    )
}

fn write_cib(resources: &[Resource]) {
    let path = Path::new(STATE).join("cib/cib.xml");
    std::fs::write(&path, cib(resources)).unwrap();
    let (uid, gid) = hacluster();
    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Removes the CIB and the scheduler's saved inputs, after checking that they are the tests'.
fn wipe_cib() {
    for sub in ["cib", "pengine"] {
        if let Ok(entries) = std::fs::read_dir(Path::new(STATE).join(sub)) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Refuses to go on where a cluster this test did not start runs, or a CIB that is not the
/// tests' is on disk: wiping it would destroy someone's cluster configuration.
fn refuse_foreign_cluster() {
    if let Some(&pid) = pids_named(CLUSTER_COMMS).first() {
        panic!(
            "a cluster this test did not start runs here (pid {pid}, {}): stop it first; the \
             test would wipe its CIB",
            comm(pid).unwrap_or_default()
        );
    }
    let cib = Path::new(STATE).join("cib/cib.xml");
    if let Ok(text) = std::fs::read_to_string(&cib) {
        assert!(
            text.contains(CLUSTER),
            "{} is not the tests' CIB (no cluster-name {CLUSTER}): the test would wipe it; \
             remove /var/lib/pacemaker/cib/* yourself if it is disposable",
            cib.display()
        );
    }
}

/// Takes the lock, waiting (bounded) for another test that holds it.
fn take_lock() -> File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .unwrap_or_else(|e| panic!("{LOCK}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "{LOCK} held by another test for 300 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn record_pids(pids: &[u32]) {
    let mut all: Vec<u32> = recorded_pids();
    all.extend(pids);
    all.sort_unstable();
    all.dedup();
    let text: String = all.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(PIDS, text).unwrap();
}

fn recorded_pids() -> Vec<u32> {
    std::fs::read_to_string(PIDS)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Ends the cluster processes an earlier run of these tests started and could not stop (it
/// was killed): only pids it recorded, and only while they are still cluster processes.
fn end_leftovers() {
    let pids = recorded_pids();
    for &pid in &pids {
        if is_cluster_process(pid) {
            eprintln!(
                "ending pid {pid} ({}), left by an earlier run",
                comm(pid).unwrap_or_default()
            );
            signal(pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| is_cluster_process(p)) {
        assert!(
            Instant::now() < deadline,
            "leftover cluster processes live on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(PIDS);
}

/// corosync, pacemakerd and its daemons, by /proc/PID/comm (cut at 15 bytes). Not a prefix
/// match: the test binary itself is `pacemaker-HASH`.
const CLUSTER_COMMS: &[&str] = &[
    "corosync",
    "pacemakerd",
    "pacemaker-based",
    "pacemaker-fence",
    "pacemaker-execd",
    "pacemaker-attrd",
    "pacemaker-sched",
    "pacemaker-contr",
];

fn is_cluster_process(pid: u32) -> bool {
    comm(pid).is_some_and(|c| CLUSTER_COMMS.contains(&c.as_str()))
}

pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Processes named one of `names` (by /proc/PID/comm).
fn pids_named(names: &[&str]) -> Vec<u32> {
    proc_pids()
        .into_iter()
        .filter(|&p| comm(p).is_some_and(|c| names.contains(&c.as_str())))
        .collect()
}

fn proc_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The children of `parent` (pacemakerd's daemons, which leave its session and process group;
/// the commands awd runs).
pub fn children_of(parent: u32) -> Vec<u32> {
    proc_pids()
        .into_iter()
        .filter(|&p| {
            let mut stat = String::new();
            File::open(format!("/proc/{p}/stat"))
                .and_then(|mut f| f.read_to_string(&mut stat))
                .is_ok()
                && stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
        })
        .collect()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this module started or recorded.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn exited_within(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The uid and gid of `hacluster`, the user Pacemaker's daemons run as.
fn hacluster() -> (u32, u32) {
    let name = std::ffi::CString::new("hacluster").unwrap();
    // SAFETY: getpwnam(3) with a valid C string; the result is read at once, on this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "no user hacluster: is pacemaker installed?");
    // SAFETY: non-null, from getpwnam just above.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// Runs a cluster tool; returns (success, stdout and stderr).
fn run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The value of `name="…"` in an XML fragment.
fn attr<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = xml.find(&key)? + key.len();
    let len = xml[start..].find('"')?;
    Some(&xml[start..start + len])
}
