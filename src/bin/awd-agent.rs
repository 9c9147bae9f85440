//! `awd-agent`: the guest side. Writes a heartbeat line every interval to the host's awd, and
//! relays lines from guest programs; its subcommands send such lines through the running agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use awd::agent::{
    Agent, AgentConfig, DEFAULT_READY_CONDITION, DEFAULT_SOCKET, LocalSocket, NotifyConfig, Target,
    relay,
};
use awd::protocol::Message;
use awd::util::error_chain;
use clap::{Parser, Subcommand, ValueEnum};

const EXAMPLE: &str = "\
Examples:
  awd-agent --to port:org.awd.heartbeat.0 --interval 1000     # virtio-serial port by name
  awd-agent --to vsock:2:9009 --interval 1000 --expect-pulses 5000
  awd-agent --to tcp:192.0.2.1:9009 --interval 500
  awd-agent --to vsock:2:9009 --interval 0 --count 200000   # load: blocking writes, timed
  awd-agent --to port:org.awd.heartbeat.0 --notify-socket /run/awd-agent.notify
      # then: NOTIFY_SOCKET=/run/awd-agent.notify WATCHDOG_USEC=5000000 some-daemon
  awd-agent checkpoint db-ready          # through the running agent's local socket
  awd-agent condition maintenance on
  awd-agent fail 'disk full'             # STATUS=disk full, then WATCHDOG=trigger";

/// Sends heartbeats to awd on the host, never blocking when the host side is absent, and
/// relays checkpoints and failures from guest programs through a local socket.
///
/// Without a subcommand it runs as the agent (`--to` is required); with one it sends a line
/// through the running agent and exits: 0 when the agent wrote it to the host, 1 otherwise.
#[derive(Debug, Parser)]
#[command(
    name = "awd-agent",
    version,
    after_help = EXAMPLE,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

/// The agent itself (no subcommand).
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Where to send: port:NAME, tcp:HOST:PORT, unix:PATH or vsock:CID:PORT.
    #[arg(long, required = true)]
    to: Option<Target>,
    /// Milliseconds between heartbeats. 0 is a load mode for benchmarks: write --count lines
    /// as fast as the channel accepts them, with blocking writes, then print how long it took.
    #[arg(long, default_value_t = 1000)]
    interval: u64,
    /// The line sent as a heartbeat.
    #[arg(long, default_value = "WATCHDOG=1")]
    message: String,
    /// Send --message as it is, with no newline after it (input that never completes a line).
    #[arg(long)]
    raw: bool,
    /// Stop after this many heartbeats.
    #[arg(long)]
    count: Option<u64>,
    /// Exit non-zero when no AWD pulse arrives from the host for this many milliseconds.
    #[arg(long, value_name = "MS")]
    expect_pulses: Option<u64>,
    /// Answer each AWD pulse from the host at once with a reply frame, so the host can
    /// measure the round trip.
    #[arg(long)]
    reply_pulses: bool,
    /// The local socket guest programs send lines to [default: /run/awd-agent.sock]. Failing to
    /// listen on the default is only a warning; on a path given here it is an error.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Open no local socket: heartbeats only.
    #[arg(long)]
    no_socket: bool,
    /// Serve systemd's notify protocol on this datagram socket (mode 0660) and relay what
    /// sd_notify daemons send (WATCHDOG=1, WATCHDOG=trigger, WATCHDOG_USEC=, EXTEND_TIMEOUT_USEC=,
    /// STATUS=, READY=1, STOPPING=1) to the host. The agent then sends no heartbeats of its
    /// own: the daemon's keep the host watchdog alive, their absence fires it. Suggested path:
    /// /run/awd-agent.notify.
    #[arg(long, value_name = "PATH")]
    notify_socket: Option<PathBuf>,
    /// With --notify-socket: the guest condition READY=1 sets (CONDITION=NAME=1 on the host;
    /// declare it there with set_by = "guest" to link it). "none": READY=1 is ignored.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_READY_CONDITION, requires = "notify_socket")]
    ready_condition: String,
    /// With --to tcp:, the pre-shared key file of the host's psk= channel: every connection is
    /// authenticated and every message sealed (docs/protocol.md). Mode 600 or 400.
    #[arg(long, value_name = "FILE")]
    psk: Option<PathBuf>,
}

/// Lines sent through the running agent.
#[derive(Debug, Subcommand)]
enum Command {
    /// Report a checkpoint: CHECKPOINT=NAME.
    Checkpoint {
        /// The checkpoint: 1 to 64 of A-Z a-z 0-9 _ . : -
        name: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Report a failure, for the host to act at once: STATUS=REASON, then WATCHDOG=trigger.
    Fail {
        /// Why (several words are joined with spaces).
        #[arg(required = true)]
        reason: Vec<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Set or clear a condition: CONDITION=NAME=1 or CONDITION=NAME=0.
    Condition {
        /// The condition: 1 to 64 of A-Z a-z 0-9 _ . : -
        name: String,
        /// on sets it, off clears it.
        state: OnOff,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Send free text for the host's log: STATUS=TEXT.
    Status {
        /// The text (several words are joined with spaces).
        #[arg(required = true)]
        text: Vec<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// The running agent's socket, for the subcommands.
#[derive(Debug, clap::Args)]
struct SocketArg {
    /// The running agent's local socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

/// A condition's new state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    /// Set (CONDITION=NAME=1).
    #[value(alias = "1")]
    On,
    /// Clear (CONDITION=NAME=0).
    #[value(alias = "0")]
    Off,
}

impl Command {
    /// The socket and the protocol messages this subcommand sends, in order.
    fn messages(self) -> (PathBuf, Vec<Message>) {
        match self {
            Command::Checkpoint { name, socket } => {
                (socket.socket, vec![Message::Checkpoint(name.into())])
            }
            Command::Fail { reason, socket } => (
                socket.socket,
                vec![Message::Status(reason.join(" ").into()), Message::Trigger],
            ),
            Command::Condition {
                name,
                state,
                socket,
            } => (
                socket.socket,
                vec![Message::Condition(name.into(), state == OnOff::On)],
            ),
            Command::Status { text, socket } => {
                (socket.socket, vec![Message::Status(text.join(" ").into())])
            }
        }
    }
}

fn send(command: Command) -> ExitCode {
    let (socket, messages) = command.messages();
    match relay::send(&socket, &messages) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("awd-agent: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let Some(target) = args.to else {
        eprintln!("awd-agent: error: --to is required");
        return ExitCode::from(2);
    };
    if args.message.contains('\n') {
        eprintln!("awd-agent: error: --message must be one line");
        return ExitCode::FAILURE;
    }
    let psk = match &args.psk {
        None => None,
        Some(_) if !matches!(target, Target::Tcp(_)) => {
            eprintln!("awd-agent: error: --psk is for --to tcp: (other channels are local)");
            return ExitCode::FAILURE;
        }
        Some(_) if args.interval == 0 => {
            eprintln!("awd-agent: error: the load mode (--interval 0) does not speak --psk");
            return ExitCode::FAILURE;
        }
        Some(path) => match awd::auth::Key::load(path) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("awd-agent: error: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        },
    };
    if args.notify_socket.is_some() {
        let conflict = if args.interval == 0 {
            Some("the load mode (--interval 0)")
        } else if args.count.is_some() {
            Some("--count (the agent sends no heartbeats of its own)")
        } else if args.raw {
            Some("--raw (the agent sends no heartbeats of its own)")
        } else {
            None
        };
        if let Some(what) = conflict {
            eprintln!("awd-agent: error: --notify-socket does not go with {what}");
            return ExitCode::from(2);
        }
    }
    let ready_condition = match args.ready_condition.as_str() {
        "none" => None,
        name if awd::util::valid_name(name) => Some(name.to_owned()),
        name => {
            eprintln!(
                "awd-agent: error: --ready-condition '{name}' is not a valid name (1 to 64 of \
                 A-Z a-z 0-9 _ . : -, or none)"
            );
            return ExitCode::from(2);
        }
    };
    let notify = args.notify_socket.map(|path| NotifyConfig {
        path,
        ready_condition,
    });
    if args.interval == 0 {
        return flood(target, args.message, args.raw, args.count);
    }
    let socket = (!args.no_socket).then(|| LocalSocket {
        required: args.socket.is_some(),
        path: args.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
    });
    let mut agent = Agent::new(AgentConfig {
        target,
        interval: Duration::from_millis(args.interval),
        message: args.message,
        raw: args.raw,
        count: args.count,
        expect_pulses: args.expect_pulses.map(Duration::from_millis),
        reply_pulses: args.reply_pulses,
        socket,
        notify,
        psk,
    });
    eprintln!("awd-agent: started");
    match agent.run() {
        Ok(stats) => {
            eprintln!("awd-agent: done: {stats:?}");
            ExitCode::SUCCESS
        }
        Err(e) => failed(&e, &agent),
    }
}

/// Reports why the agent stopped, with its counters, and exits 2.
fn failed(e: &dyn std::error::Error, agent: &Agent) -> ExitCode {
    eprintln!("awd-agent: error: {} ({:?})", error_chain(e), agent.stats());
    ExitCode::from(2)
}

/// `--interval 0`: the load mode.
fn flood(target: Target, message: String, raw: bool, count: Option<u64>) -> ExitCode {
    let Some(count) = count else {
        eprintln!("awd-agent: error: --interval 0 needs --count");
        return ExitCode::from(2);
    };
    let mut agent = Agent::new(AgentConfig {
        target,
        interval: Duration::ZERO,
        message,
        raw,
        count: Some(count),
        expect_pulses: None,
        reply_pulses: false,
        socket: None,
        notify: None,
        psk: None,
    });
    match agent.flood() {
        Ok(r) => {
            let secs = r.elapsed.as_secs_f64();
            eprintln!(
                "awd-agent: flood: {} lines, {} bytes in {:.3} s ({:.0} lines/s)",
                r.lines,
                r.bytes,
                secs,
                r.lines as f64 / secs.max(1e-9)
            );
            ExitCode::SUCCESS
        }
        Err(e) => failed(&e, &agent),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(command) => send(command),
        None => run(args.run),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("awd-agent").chain(argv.iter().copied()))
    }

    fn lines(argv: &[&str]) -> (PathBuf, Vec<String>) {
        match parse(argv) {
            Ok(Args {
                command: Some(c), ..
            }) => {
                let (socket, messages) = c.messages();
                let lines = messages
                    .iter()
                    .map(|m| relay::line_of(m).unwrap())
                    .collect();
                (socket, lines)
            }
            other => panic!("{argv:?}: {other:?}"),
        }
    }

    #[test]
    fn the_cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn the_flag_form_runs_the_agent() {
        let a = parse(&["--to", "port:org.awd.heartbeat.0", "--interval", "200"]).unwrap();
        assert!(a.command.is_none());
        assert_eq!(a.run.to, Some(Target::Port("org.awd.heartbeat.0".into())));
        assert_eq!(
            (a.run.interval, a.run.socket, a.run.no_socket),
            (200, None, false)
        );
        let a = parse(&["--to", "unix:/h", "--socket", "/tmp/a.sock"]).unwrap();
        assert_eq!(a.run.socket, Some(PathBuf::from("/tmp/a.sock")));
        assert!(parse(&[]).is_err(), "--to is required without a subcommand");
        assert!(parse(&["--interval", "5"]).is_err());
    }

    #[test]
    fn subcommands_make_their_lines() {
        let default = PathBuf::from(DEFAULT_SOCKET);
        assert_eq!(
            lines(&["checkpoint", "boot"]),
            (default.clone(), vec!["CHECKPOINT=boot".to_owned()])
        );
        assert_eq!(
            lines(&["checkpoint", "boot", "--socket", "/tmp/x.sock"]),
            (
                PathBuf::from("/tmp/x.sock"),
                vec!["CHECKPOINT=boot".to_owned()]
            )
        );
        assert_eq!(
            lines(&["fail", "disk", "full"]),
            (
                default.clone(),
                vec!["STATUS=disk full".to_owned(), "WATCHDOG=trigger".to_owned()]
            )
        );
        assert_eq!(
            lines(&["condition", "ready", "on"]).1,
            vec!["CONDITION=ready=1".to_owned()]
        );
        assert_eq!(
            lines(&["condition", "ready", "off"]).1,
            vec!["CONDITION=ready=0".to_owned()]
        );
        assert_eq!(
            lines(&["status", "all good"]).1,
            vec!["STATUS=all good".to_owned()]
        );
        for bad in [
            &["checkpoint"][..],
            &["fail"],
            &["condition", "ready", "maybe"],
            &["--to", "unix:/h", "checkpoint", "x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_agent_is_one_line_and_exit_1() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, lines) = lines(&[
            "checkpoint",
            "boot",
            "--socket",
            dir.path().join("none.sock").to_str().unwrap(),
        ]);
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let err = relay::send_lines(&socket, &lines).unwrap_err();
        let msg = error_chain(&err);
        assert!(msg.starts_with("cannot reach the agent at "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}
