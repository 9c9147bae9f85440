//! The `exec` action: a command awd runs itself when a watchdog expires, for recovery that
//! belongs to another system — a cluster manager (`crm_resource --fail`), an orchestrator's CLI,
//! a paging hook.
//!
//! The command runs without a shell (the argument vector as configured, so no quoting or
//! injection through the environment), with stdin closed and `AWD_*` variables describing the
//! expiry. It gets its own process group so that on timeout the whole group is killed, not only
//! the first process. Its exit status and the first [`OUTPUT_CAP`] bytes of stdout and stderr
//! are logged, and every run is counted by result (`awd_exec_total{watchdog,result}`). A run is
//! a success only if the command exited with status 0: like a monitor's answer, that is the one
//! thing that proves it happened.

use std::fmt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tracing::{error, info, warn};

use crate::metrics::WatchdogMetrics;

/// The bytes of each of stdout and stderr kept for the log; the rest is read and dropped, so a
/// chatty command never blocks on a full pipe.
pub const OUTPUT_CAP: usize = 4096;

/// How long the output pipes may stay open after the command exited (a background child
/// holding them): after this the output so far is logged and the pipes are closed.
const OUTPUT_LINGER: Duration = Duration::from_secs(1);

/// The longest `exec_timeout` accepted: an action that may take longer than an hour is not a
/// watchdog's reaction any more.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The timeout when `exec_timeout` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A validated command: what to run and how long it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecCommand {
    /// The program (a path, or a name looked up in awd's `PATH`) and its arguments.
    argv: Vec<String>,
    /// After this the command's process group is killed.
    timeout: Duration,
}

/// Why a command was refused at configuration time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    /// `exec = []`, or an empty program name.
    #[error("exec needs a program: exec = [\"/path/to/program\", \"arg\", …]")]
    NoProgram,
    /// An argument holds a NUL byte, which no argument vector can carry.
    #[error("exec argument {0} holds a NUL byte")]
    Nul(usize),
    /// `exec_timeout` out of range.
    #[error("exec_timeout={0}: give 1 ms to 3600000 ms (one hour)")]
    Timeout(u64),
}

impl ExecCommand {
    /// Checks an argument vector and a timeout in milliseconds (`None`: [`DEFAULT_TIMEOUT`]).
    pub fn new(argv: Vec<String>, timeout_ms: Option<u64>) -> Result<ExecCommand, ExecError> {
        if argv.first().is_none_or(|p| p.is_empty()) {
            return Err(ExecError::NoProgram);
        }
        if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
            return Err(ExecError::Nul(i));
        }
        let timeout = match timeout_ms {
            None => DEFAULT_TIMEOUT,
            Some(ms) if ms == 0 || ms > MAX_TIMEOUT.as_millis() as u64 => {
                return Err(ExecError::Timeout(ms));
            }
            Some(ms) => Duration::from_millis(ms),
        };
        Ok(ExecCommand { argv, timeout })
    }

    /// The program and its arguments.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// The time after which the command is killed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl fmt::Display for ExecCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exec {:?} (timeout {} s)",
            self.argv,
            self.timeout.as_secs_f64()
        )
    }
}

/// What the command is told about the expiry, as `AWD_*` environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecContext {
    /// `AWD_WATCHDOG`: the watchdog id.
    pub watchdog: String,
    /// `AWD_CHANNEL`: the watchdog's heartbeat chardev (`awd_node`).
    pub channel: String,
    /// `AWD_STATUS`: the watchdog's status when the run was started (`expired`, `stopped`).
    pub status: String,
    /// `AWD_REASON`: why it expired, as the log says it.
    pub reason: String,
    /// `AWD_STEP`: 0 for the expiry itself, n for escalation step n.
    pub step: usize,
}

impl ExecContext {
    /// The variables, in a fixed order.
    pub fn env(&self) -> [(&'static str, String); 5] {
        [
            ("AWD_WATCHDOG", self.watchdog.clone()),
            ("AWD_CHANNEL", self.channel.clone()),
            ("AWD_STATUS", self.status.clone()),
            ("AWD_REASON", self.reason.clone()),
            ("AWD_STEP", self.step.to_string()),
        ]
    }
}

/// How a run ended, as counted in `awd_exec_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecResult {
    /// Exited with status 0.
    Success,
    /// Exited with another status, or was killed by a signal it did not get from awd.
    Failed,
    /// Still running at its timeout: its process group was killed.
    Timeout,
    /// Could not be started (no such program, not executable).
    Error,
}

impl ExecResult {
    /// Every result, in the order of the metric's series.
    pub const ALL: [ExecResult; 4] = [
        ExecResult::Success,
        ExecResult::Failed,
        ExecResult::Timeout,
        ExecResult::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecResult::Success => "success",
            ExecResult::Failed => "failed",
            ExecResult::Timeout => "timeout",
            ExecResult::Error => "error",
        }
    }
}

/// Everything known about one run.
#[derive(Debug)]
pub struct ExecOutcome {
    /// How it ended.
    pub result: ExecResult,
    /// Its exit status, if it exited (or was killed) at all.
    pub status: Option<ExitStatus>,
    /// The start error, for [`ExecResult::Error`].
    pub error: Option<std::io::Error>,
    /// The first [`OUTPUT_CAP`] bytes of stdout, lossily decoded.
    pub stdout: String,
    /// The first [`OUTPUT_CAP`] bytes of stderr, lossily decoded.
    pub stderr: String,
    /// From start to exit (or kill).
    pub elapsed: Duration,
}

/// Reads a pipe to its end, keeping the first [`OUTPUT_CAP`] bytes.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else { return kept };
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = OUTPUT_CAP.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end().to_owned()
}

/// Runs `cmd` to its end or its timeout. Never panics; every failure is in the outcome.
pub async fn run(cmd: &ExecCommand, ctx: &ExecContext) -> ExecOutcome {
    let started = tokio::time::Instant::now();
    let mut command = Command::new(&cmd.argv[0]);
    command
        .args(&cmd.argv[1..])
        .envs(ctx.env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return ExecOutcome {
                result: ExecResult::Error,
                status: None,
                error: Some(e),
                stdout: String::new(),
                stderr: String::new(),
                elapsed: started.elapsed(),
            };
        }
    };
    let pgid = child.id();
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let mut output = tokio::spawn(async move { tokio::join!(read_capped(out), read_capped(err)) });
    let (result, status) = match tokio::time::timeout(cmd.timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => (ExecResult::Success, Some(status)),
        Ok(Ok(status)) => (ExecResult::Failed, Some(status)),
        Ok(Err(_)) => (ExecResult::Failed, None),
        Err(_) => {
            if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) with a negative pid signals the process group the child leads
                // (process_group(0) above); it touches no memory of ours.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            (ExecResult::Timeout, child.wait().await.ok())
        }
    };
    let elapsed = started.elapsed();
    let (stdout, stderr) = match tokio::time::timeout(OUTPUT_LINGER, &mut output).await {
        Ok(Ok((o, e))) => (text(&o), text(&e)),
        _ => {
            output.abort();
            (
                String::new(),
                "(output pipes held open after exit)".to_owned(),
            )
        }
    };
    ExecOutcome {
        result,
        status,
        error: None,
        stdout,
        stderr,
        elapsed,
    }
}

/// Runs one watchdog's commands one at a time, in the order they were started, each logged and
/// counted when it ends. Cloned into every run, so a slow command delays only its own
/// watchdog's next command, never the watchdog itself.
#[derive(Debug, Clone)]
pub struct ExecRunner {
    metrics: Arc<WatchdogMetrics>,
    /// Held by the running command; tokio's mutex is fair, so waiting runs go in order.
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl ExecRunner {
    /// A runner counting into `metrics`.
    pub fn new(metrics: Arc<WatchdogMetrics>) -> Self {
        ExecRunner {
            metrics,
            turn: Arc::default(),
        }
    }

    /// Starts `cmd` in its own task (after the watchdog's earlier commands have ended) and
    /// returns at once.
    pub fn start(&self, cmd: Arc<ExecCommand>, ctx: ExecContext) {
        let runner = self.clone();
        info!(watchdog = %ctx.watchdog, step = ctx.step, argv = ?cmd.argv, "exec starting");
        tokio::spawn(async move {
            let _turn = runner.turn.lock().await;
            let out = run(&cmd, &ctx).await;
            runner.metrics.exec_ran(out.result.as_str());
            runner.log(&cmd, &ctx, &out);
        });
    }

    fn log(&self, cmd: &ExecCommand, ctx: &ExecContext, out: &ExecOutcome) {
        let ms = out.elapsed.as_millis() as u64;
        let code = out.status.and_then(|s| s.code());
        let signal = out
            .status
            .and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s));
        let (wd, step, argv) = (&ctx.watchdog, ctx.step, cmd.argv());
        let (stdout, stderr) = (&out.stdout, &out.stderr);
        match out.result {
            ExecResult::Success => {
                info!(watchdog = %wd, step, ?argv, ms, stdout, stderr, "exec done")
            }
            ExecResult::Failed => {
                error!(watchdog = %wd, step, ?argv, ms, code, signal, stdout, stderr, "exec failed")
            }
            ExecResult::Timeout => warn!(
                watchdog = %wd, step, ?argv, ms, stdout, stderr,
                "exec timed out: its process group was killed"
            ),
            ExecResult::Error => {
                let error = out
                    .error
                    .as_ref()
                    .map(|e| crate::util::error_chain(e))
                    .unwrap_or_default();
                error!(watchdog = %wd, step, ?argv, error, "exec could not start")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_counted_under_the_metrics_labels() {
        let labels: Vec<_> = ExecResult::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels, crate::metrics::EXEC_RESULTS);
    }

    fn ctx() -> ExecContext {
        ExecContext {
            watchdog: "vm1".into(),
            channel: "hb".into(),
            status: "expired".into(),
            reason: "timeout: no input for 3000 ms".into(),
            step: 0,
        }
    }

    fn sh(script: &str, timeout_ms: u64) -> ExecCommand {
        ExecCommand::new(
            vec!["/bin/sh".into(), "-c".into(), script.into()],
            Some(timeout_ms),
        )
        .unwrap()
    }

    #[test]
    fn commands_are_checked() {
        assert_eq!(ExecCommand::new(vec![], None), Err(ExecError::NoProgram));
        assert_eq!(
            ExecCommand::new(vec![String::new()], None),
            Err(ExecError::NoProgram)
        );
        assert_eq!(
            ExecCommand::new(vec!["a".into(), "b\0c".into()], None),
            Err(ExecError::Nul(1))
        );
        assert_eq!(
            ExecCommand::new(vec!["a".into()], Some(0)),
            Err(ExecError::Timeout(0))
        );
        assert_eq!(
            ExecCommand::new(vec!["a".into()], Some(3_600_001)),
            Err(ExecError::Timeout(3_600_001))
        );
        let c = ExecCommand::new(vec!["/bin/true".into()], None).unwrap();
        assert_eq!(c.timeout(), DEFAULT_TIMEOUT);
        assert_eq!(c.to_string(), "exec [\"/bin/true\"] (timeout 10 s)");
    }

    #[tokio::test]
    async fn the_command_sees_the_expiry_in_its_environment_and_no_shell_interprets_it() {
        // The reason holds shell syntax: passed as an argument, it must arrive untouched.
        let c = ExecCommand::new(
            vec![
                "/usr/bin/env".into(),
                "--".into(),
                "/bin/sh".into(),
                "-c".into(),
                "echo \"$AWD_WATCHDOG|$AWD_CHANNEL|$AWD_STATUS|$AWD_STEP|$AWD_REASON|$1\"".into(),
                "sh".into(),
                "$(touch /nonexistent); `x`".into(),
            ],
            Some(5000),
        )
        .unwrap();
        let out = run(&c, &ctx()).await;
        assert_eq!(out.result, ExecResult::Success, "{out:?}");
        assert_eq!(
            out.stdout,
            "vm1|hb|expired|0|timeout: no input for 3000 ms|$(touch /nonexistent); `x`"
        );
    }

    #[tokio::test]
    async fn a_non_zero_exit_is_a_failure_with_its_status_and_stderr() {
        let out = run(&sh("echo oops >&2; exit 3", 5000), &ctx()).await;
        assert_eq!(out.result, ExecResult::Failed);
        assert_eq!(out.status.and_then(|s| s.code()), Some(3));
        assert_eq!(out.stderr, "oops");
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error_not_a_panic() {
        let c = ExecCommand::new(vec!["/nonexistent/awd-test-program".into()], None).unwrap();
        let out = run(&c, &ctx()).await;
        assert_eq!(out.result, ExecResult::Error);
        assert_eq!(
            out.error.map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed_with_its_children() {
        // The shell starts a child that would outlive it; both must be gone after the kill.
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let out = run(&sh(&script, 300), &ctx()).await;
        assert_eq!(out.result, ExecResult::Timeout);
        assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild was SIGKILLed with the group; reap-free check: it is gone or a zombie
        // of init, never still sleeping. Bounded: 5 s.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            if matches!(state, None | Some("Z") | Some("X")) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "grandchild {pid} still alive: {stat}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_flood_of_output_is_capped_and_never_blocks_the_command() {
        // 1 MB on stdout: far beyond a pipe's buffer, so a reader that stopped would hang it.
        let out = run(
            &sh("head -c 1000000 /dev/zero | tr '\\0' x", 10_000),
            &ctx(),
        )
        .await;
        assert_eq!(out.result, ExecResult::Success);
        assert_eq!(out.stdout.len(), OUTPUT_CAP);
    }

    #[tokio::test]
    async fn output_held_open_by_a_background_child_does_not_turn_success_into_a_timeout() {
        let out = run(&sh("sleep 3 & echo started", 10_000), &ctx()).await;
        assert_eq!(out.result, ExecResult::Success);
        assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);
    }
}
