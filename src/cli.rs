//! The `awd` command line: `awd run`, `awd check`, and the control commands `awd status`,
//! `awd enable`, `awd disable` and `awd condition` that talk to a running awd.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing::{error, info};

use crate::config::{Config, ConfigError, RawConfig, file};
use crate::control::{self, Request, Response};
use crate::daemon::{Daemon, Options, systemd};
use crate::util::error_chain;

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

const STATUS_EXAMPLE: &str = "\
Example:
  awd status                      # a table, from /run/awd/control.sock
  awd status --json | jq '.[] | select(.status != \"ok\")'
  awd disable vm1/main-loop       # one supervision; `awd disable vm1` for the whole watchdog
  awd enable vm1/main-loop        # re-armed from now
  awd condition maintenance off   # an operator condition, on every watchdog that links it";

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
    /// Run the watchdogs until SIGTERM or SIGINT; SIGHUP reloads the configuration.
    #[command(after_help = RUN_EXAMPLE)]
    Run(RunArgs),
    /// Validate the configuration and print the resolved watchdogs; runs nothing.
    #[command(after_help = CHECK_EXAMPLE)]
    Check(ConfigArgs),
    /// Show every watchdog of a running awd: status, supervisions, conditions.
    #[command(after_help = STATUS_EXAMPLE)]
    Status {
        /// Print JSON (an array, one object per watchdog) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Enable a watchdog (`ID`) or one supervision (`ID/NAME`); its timers re-arm from now.
    #[command(after_help = STATUS_EXAMPLE)]
    Enable {
        /// `ID` or `ID/SUPERVISION`.
        target: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Disable a watchdog or one supervision: it cannot fire until enabled again.
    #[command(after_help = STATUS_EXAMPLE)]
    Disable {
        /// `ID` or `ID/SUPERVISION`.
        target: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Set an operator condition (declared in `operator_conditions`).
    #[command(after_help = STATUS_EXAMPLE)]
    Condition {
        /// The condition's name.
        name: String,
        /// Its new value.
        #[arg(value_parser = parse_on_off)]
        value: bool,
        /// Only on this watchdog (default: every watchdog that declares it).
        #[arg(long)]
        watchdog: Option<String>,
        #[command(flatten)]
        control: ControlArg,
    },
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("'{s}': expected on or off")),
    }
}

/// The control socket of a running awd.
#[derive(Debug, Args)]
struct ControlArg {
    /// The control socket (default: $AWD_CONTROL, else /run/awd/control.sock).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

/// `awd run`'s options.
#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Serve `awd status`/`enable`/`disable` on this Unix socket (default: /run/awd/control.sock
    /// when it can be created; an explicit path must work).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

/// Where the configuration comes from: a TOML file, seed-style arguments, or both.
#[derive(Debug, Clone, Args)]
struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A QEMU-style chardev: `socket,id=ID,host=H,port=P[,server=on][,reconnect=S]`,
    /// `socket,id=ID,path=P…` or `vhost-user-vsock,id=ID,path=P,guest-cid=C,port=N`.
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
        // Colour codes only on a terminal: under systemd they would land in the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Parses the command line and runs it. Errors are printed on one line; the exit code is 1
/// for a bad configuration, a startup failure or a refused control request, 0 otherwise.
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
            let cfg = match args.config.load() {
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
            rt.block_on(run(cfg, args))
        }
        Command::Status { json, control } => {
            let resp =
                match control::request(&control::resolve_path(control.control), &Request::Status) {
                    Ok(r) => r,
                    Err(e) => return fail(&e),
                };
            if !resp.ok {
                return refused(&resp);
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&resp.watchdogs).unwrap_or_default()
                );
            } else {
                print!("{}", control::render_table(&resp.watchdogs));
            }
            ExitCode::SUCCESS
        }
        Command::Enable { target, control } => send(control, Request::Enable { target }),
        Command::Disable { target, control } => send(control, Request::Disable { target }),
        Command::Condition {
            name,
            value,
            watchdog,
            control,
        } => send(
            control,
            Request::Condition {
                name,
                value,
                watchdog,
            },
        ),
    }
}

fn send(control: ControlArg, req: Request) -> ExitCode {
    match control::request(&control::resolve_path(control.control), &req) {
        Ok(resp) if resp.ok => ExitCode::SUCCESS,
        Ok(resp) => refused(&resp),
        Err(e) => fail(&e),
    }
}

fn refused(resp: &Response) -> ExitCode {
    eprintln!(
        "awd: error: {}",
        resp.error.as_deref().unwrap_or("request refused")
    );
    ExitCode::FAILURE
}

/// Raises the soft limit on open files to the hard limit: each channel holds a listener and its
/// connections, and 1,024 descriptors is a few hundred watchdogs.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on this process with a valid, initialised struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
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

async fn run(cfg: Config, args: RunArgs) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return fail(&e),
    };
    // An explicit control socket must work; it is bound before anything starts.
    let control = match &args.control {
        Some(path) => match control::bind(path) {
            Ok(l) => Some(l),
            Err(e) => return fail(&e),
        },
        None => None,
    };
    let metrics_listener = match &args.metrics {
        Some(addr) => match crate::metrics::bind_http(addr).await {
            Ok(l) => Some(l),
            Err(e) => return fail(&e),
        },
        None => None,
    };
    let count = cfg.watchdogs.len();
    let opts = Options {
        control,
        metrics: metrics_listener,
        ..Options::default()
    };
    let daemon = match Daemon::start(cfg, opts).await {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    if args.control.is_none() {
        // The default control socket is a convenience: without it awd still runs.
        match control::bind(std::path::Path::new(control::DEFAULT_PATH)) {
            Ok(l) => daemon.serve_control(l),
            Err(e) => info!(
                "no control socket: {} (give --control PATH)",
                error_chain(&e)
            ),
        }
    }
    info!(watchdogs = count, "awd running");
    systemd::ready(count);
    let watchdog_pings = systemd::spawn_watchdog(daemon.clone_handle());
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                systemd::reloading();
                match args.config.load() {
                    Ok(cfg) => match daemon.reload(cfg).await {
                        Ok(summary) => info!("reloaded: {summary}"),
                        Err(e) => error!("reload failed, the running configuration stays: {}", error_chain(&e)),
                    },
                    Err(e) => error!("reload refused, the running configuration stays: {}", error_chain(&e)),
                }
                systemd::ready(daemon.watchdog_count().await);
            }
        }
    }
    systemd::stopping();
    if let Some(p) = watchdog_pings {
        p.abort();
    }
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(5), daemon.stop()).await;
    if stopped.is_err() {
        error!("tasks did not stop within 5 s; exiting anyway");
    }
    info!("stopped");
    ExitCode::SUCCESS
}
