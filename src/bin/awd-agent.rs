//! `awd-agent`: the guest side. Writes a heartbeat line every interval to the host's awd.

use std::process::ExitCode;
use std::time::Duration;

use awd::agent::{Agent, AgentConfig, Target};
use clap::Parser;

const EXAMPLE: &str = "\
Examples:
  awd-agent --to port:org.awd.heartbeat.0 --interval 1000     # virtio-serial port by name
  awd-agent --to vsock:2:9009 --interval 1000 --expect-pulses 5000
  awd-agent --to tcp:192.0.2.1:9009 --interval 500";

/// Sends heartbeats to awd on the host, never blocking when the host side is absent.
#[derive(Debug, Parser)]
#[command(name = "awd-agent", version, after_help = EXAMPLE)]
struct Args {
    /// Where to send: port:NAME, tcp:HOST:PORT, unix:PATH or vsock:CID:PORT.
    #[arg(long)]
    to: Target,
    /// Milliseconds between heartbeats.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    interval: u64,
    /// The line sent as a heartbeat.
    #[arg(long, default_value = "WATCHDOG=1")]
    message: String,
    /// Stop after this many heartbeats.
    #[arg(long)]
    count: Option<u64>,
    /// Exit non-zero when no AWD pulse arrives from the host for this many milliseconds.
    #[arg(long, value_name = "MS")]
    expect_pulses: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.message.contains('\n') {
        eprintln!("awd-agent: error: --message must be one line");
        return ExitCode::FAILURE;
    }
    let mut agent = Agent::new(AgentConfig {
        target: args.to,
        interval: Duration::from_millis(args.interval),
        message: args.message,
        count: args.count,
        expect_pulses: args.expect_pulses.map(Duration::from_millis),
    });
    eprintln!("awd-agent: started");
    match agent.run() {
        Ok(stats) => {
            eprintln!("awd-agent: done: {stats:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("awd-agent: error: {e} ({:?})", agent.stats());
            ExitCode::from(2)
        }
    }
}
