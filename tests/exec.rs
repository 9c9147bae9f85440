//! The `exec` action end to end: a real awd runs real commands on expiry, with the expiry in
//! their environment, and reports each one by what the command itself did — exit 0, another
//! exit, killed at its timeout — in its log, in `awd_exec_total` and never as done when it was
//! not. The Pacemaker recipe built on it is tested against a real cluster in `pacemaker.rs`.

mod common;

use std::path::Path;

use common::{Awd, SHORT, agent_bin, free_port, s, scrape, scratch, series};

fn write_exec(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mut perm = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&path, perm).unwrap();
    path.display().to_string()
}

/// One watchdog fed by a real agent, then silenced: the expiry runs its command with the
/// expiry's facts in the environment, and an escalation step's failing command is reported as
/// failed with its exit status and stderr. A second watchdog's command hangs and is killed at
/// its timeout. Nothing the commands did is reported as anything else.
#[test]
fn an_expiry_runs_the_command_and_reports_what_it_did() {
    let d = scratch("exec");
    let dir = d.path();
    let env_file = dir.join("env.txt");
    let record = write_exec(
        dir,
        "record.sh",
        &format!(
            "env | grep ^AWD_ | sort > {}\necho recorded \"$1\"",
            env_file.display()
        ),
    );
    let fail = write_exec(dir, "fail.sh", "echo 'no such resource' >&2\nexit 3");
    let hang = write_exec(dir, "hang.sh", "sleep 60");
    let hb_port = free_port();
    let cfg = dir.join("awd.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[chardev.hb]
host = "127.0.0.1"
port = {hb_port}
server = true

[chardev.idle]
path = "{dir}/idle.sock"
server = true

[watchdog.vm1]
awd_node = "hb"
timeout = 2000
exec = ["{record}", "arg with spaces; $(no shell)"]

[[watchdog.vm1.escalate]]
after = 1500
exec = ["{fail}"]

[watchdog.stuck]
awd_node = "idle"
timeout = 1500
grace = 1500
exec = ["{hang}"]
exec_timeout = 700
"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    let (ok, check, err) = common::awd_oneshot(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(ok.success(), "{err}");
    assert!(check.contains("exec [\""), "{check}");
    assert!(check.contains("(timeout 0.7 s)"), "{check}");
    let metrics = free_port();
    let mut awd = Awd::run(
        dir,
        "awd",
        &s(&[
            "--config",
            cfg.to_str().unwrap(),
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
        ]),
    );
    awd.wait_msg("listening", Some("vm1"), SHORT);
    let mut agent = std::process::Command::new(agent_bin())
        .args([
            "--to",
            &format!("tcp:127.0.0.1:{hb_port}"),
            "--interval",
            "200",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    awd.wait_msg("connected", Some("vm1"), SHORT);

    // The hanging command: killed at 0.7 s, reported as a timeout, never as done.
    let timed_out = awd.wait_msg(
        "exec timed out: its process group was killed",
        Some("stuck"),
        SHORT,
    );
    let ms = timed_out["ms"].as_u64().unwrap();
    assert!((650..5000).contains(&ms), "{timed_out}");

    // While the agent runs, vm1 does not expire: nothing of its own ran yet.
    assert!(
        awd.records(|v| v["watchdog"] == "vm1" && v["message"] == "exec starting")
            .is_empty()
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
    awd.wait_msg("watchdog expired", Some("vm1"), SHORT);
    let done = awd.wait_msg("exec done", Some("vm1"), SHORT);
    assert_eq!(done["step"], 0, "{done}");
    assert_eq!(
        done["stdout"], "recorded arg with spaces; $(no shell)",
        "{done}"
    );
    let env = std::fs::read_to_string(&env_file).unwrap();
    let vars: Vec<&str> = env.lines().collect();
    assert!(vars.contains(&"AWD_WATCHDOG=vm1"), "{env}");
    assert!(vars.contains(&"AWD_CHANNEL=hb"), "{env}");
    assert!(vars.contains(&"AWD_STATUS=expired"), "{env}");
    assert!(vars.contains(&"AWD_STEP=0"), "{env}");
    assert!(
        vars.iter()
            .any(|v| v.starts_with("AWD_REASON=") && v.len() > "AWD_REASON=".len()),
        "{env}"
    );

    // 1.5 s later, still silent: the step's command fails, and says so.
    let failed = awd.wait_msg("exec failed", Some("vm1"), SHORT);
    assert_eq!(failed["step"], 1, "{failed}");
    assert_eq!(failed["code"], 3, "{failed}");
    assert_eq!(failed["stderr"], "no such resource", "{failed}");

    let text = scrape(metrics);
    let count = |wd: &str, result: &str| {
        series(
            &text,
            &format!("awd_exec_total{{watchdog=\"{wd}\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(count("vm1", "success"), 1.0, "{text}");
    assert_eq!(count("vm1", "failed"), 1.0, "{text}");
    assert_eq!(count("vm1", "timeout"), 0.0, "{text}");
    assert!(count("stuck", "timeout") >= 1.0, "{text}");
    assert_eq!(count("stuck", "success"), 0.0, "{text}");
}

/// A command that cannot start (a typo in its path) is an error in the log and the counter,
/// not a panic, and the watchdog goes on supervising: a later expiry tries again.
#[test]
fn a_command_that_cannot_start_is_an_error_and_the_watchdog_goes_on() {
    let d = scratch("exec-missing");
    let dir = d.path();
    let cfg = dir.join("awd.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[chardev.hb]
path = "{dir}/hb.sock"
server = true

[watchdog.vm1]
awd_node = "hb"
timeout = 1000
exec = ["/nonexistent/crm_resource", "--fail"]
"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    let mut awd = Awd::run(dir, "awd", &s(&["--config", cfg.to_str().unwrap()]));
    let err = awd.wait_msg("exec could not start", Some("vm1"), SHORT);
    assert!(
        err["error"].as_str().unwrap().contains("No such file"),
        "{err}"
    );
    // Re-arm with a heartbeat, then let it expire again: a second attempt, a second error.
    let mut hb = std::os::unix::net::UnixStream::connect(dir.join("hb.sock")).unwrap();
    std::io::Write::write_all(&mut hb, b"WATCHDOG=1\n").unwrap();
    awd.wait("a recovery", SHORT, |v| {
        v["message"] == "watchdog status changed" && v["to"] == "ok"
    });
    // The first error was taken above; this is the one after the recovery.
    awd.wait_msg("exec could not start", Some("vm1"), SHORT);
    let st = &awd.status()["vm1"];
    assert_eq!(st["expiries"], 2, "{st}");
}

/// Bad exec settings are refused by `awd check` with one line naming the key.
#[test]
fn bad_exec_settings_are_refused_with_a_clear_error() {
    let d = scratch("exec-bad");
    let dir = d.path();
    for (body, want) in [
        ("exec = []", "exec needs a program"),
        ("exec = [\"/bin/true\"]\nexec_timeout = 0", "exec_timeout=0"),
        (
            "exec_timeout = 500",
            "exec_timeout= without an exec command",
        ),
    ] {
        let cfg = dir.join("awd.toml");
        std::fs::write(
            &cfg,
            format!(
                "[chardev.hb]\npath = \"{}/hb.sock\"\nserver = true\n\n[watchdog.w]\nawd_node = \"hb\"\ntimeout = 1000\n{body}\n",
                dir.display()
            ),
        )
        .unwrap();
        let (ok, _, err) = common::awd_oneshot(&["check", "--config", cfg.to_str().unwrap()]);
        assert!(!ok.success(), "{body}");
        assert!(
            err.contains(want) && err.contains("watchdog 'w'"),
            "{body}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
