//! The `awd` command line: `awd run` and `awd check`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing::{error, info};

use crate::action::error_chain;
use crate::config::{Config, ConfigError, RawConfig, file};
use crate::daemon::{Daemon, Options};

const RUN_EXAMPLE: &str = "\
Example (the seed's local-guest watchdog: quit QEMU after 5 s of silence on port 9009):
  awd run --chardev socket,id=detection,host=0.0.0.0,port=9009,server=on,wait=off \\
          --chardev socket,id=notification,host=127.0.0.1,port=4445 \\
          --object advanced-watchdog,id=awd1,awd_node=detection,notification_node=notification,opt_script=quit.script,timeout=5000
  awd run --config /etc/awd/vm1.toml";

const CHECK_EXAMPLE: &str = "\
Example:
  awd check --config /etc/awd/vm1.toml
  awd check --chardev socket,id=d,path=/run/awd/d.sock,server=on --object advanced-watchdog,id=w,awd_node=d,timeout=5000";

/// Advanced Watch Dog: supervises heartbeats from QEMU guests, peer VMMs and remote services,
/// and runs a script against a QEMU monitor when they stop.
#[derive(Debug, Parser)]
#[command(name = "awd", version, after_help = RUN_EXAMPLE)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `awd=debug`.
    #[arg(long, global = true, env = "AWD_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the watchdogs until SIGTERM or SIGINT.
    #[command(after_help = RUN_EXAMPLE)]
    Run(ConfigArgs),
    /// Validate the configuration and print the resolved watchdogs; runs nothing.
    #[command(after_help = CHECK_EXAMPLE)]
    Check(ConfigArgs),
}

/// Where the configuration comes from: a TOML file, seed-style arguments, or both.
#[derive(Debug, Args)]
struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A QEMU-style chardev: `socket,id=ID,host=H,port=P[,server=on][,reconnect=S]` or `socket,id=ID,path=P…`.
    #[arg(long, value_name = "SPEC")]
    chardev: Vec<String>,
    /// A QEMU-style object: `advanced-watchdog,id=ID,awd_node=…,notification_node=…,opt_script=…,timeout=MS…`.
    #[arg(long, value_name = "SPEC")]
    object: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config, ConfigError> {
        let mut raw = match &self.config {
            Some(path) => file::load(path)?,
            None => RawConfig::default(),
        };
        raw.add_seed_args(&self.chardev, &self.object)?;
        Config::build(raw)
    }
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Parses the command line and runs it. Errors are printed on one line; the exit code is 1
/// for a bad configuration or startup failure, 0 otherwise.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    match cli.command {
        Command::Check(args) => match args.load() {
            Ok(cfg) => {
                for note in &cfg.notes {
                    println!("note: {note}");
                }
                print!("{cfg}");
                println!("configuration OK: {} watchdog(s)", cfg.watchdogs.len());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Run(args) => {
            raise_fd_limit();
            let cfg = match args.load() {
                Ok(cfg) => cfg,
                Err(e) => return fail(&e),
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(&e),
            };
            rt.block_on(run(cfg))
        }
    }
}

/// Raises the soft limit on open files to the hard limit: each channel holds a listener and its
/// connections, and 1,024 descriptors is a few hundred watchdogs.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on this process with a valid, initialised struct.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("awd: error: {}", error_chain(e));
    ExitCode::FAILURE
}

async fn run(cfg: Config) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => return fail(&e),
    };
    let count = cfg.watchdogs.len();
    let daemon = match Daemon::start(cfg, Options::default()).await {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    info!(watchdogs = count, "awd running");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(5), daemon.stop()).await;
    if stopped.is_err() {
        error!("tasks did not stop within 5 s; exiting anyway");
    }
    ExitCode::SUCCESS
}
