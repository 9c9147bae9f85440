//! What the fuzz targets share: how an input is cut into reads, and the sandbox a parsed config
//! is built in. Nothing here parses what awd parses; the targets call awd for that.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use awd::config::{Config, ConfigError, RawConfig, RawObject};
use awd::engine::WatchdogEngine;

/// Splits `input` into a head of `2 * n` bytes, read as `n` big-endian cut positions, and the
/// data they cut. The positions are taken modulo `data.len() + 1` and sorted, so every input
/// gives valid cuts and the fuzzer can move each one with two bytes.
pub fn cuts(input: &[u8], n: usize) -> (Vec<usize>, &[u8]) {
    let head = (2 * n).min(input.len());
    let (head, data) = input.split_at(head);
    let mut cuts: Vec<usize> = head
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_be_bytes([c[0], c[1]])) % (data.len() + 1))
        .collect();
    cuts.sort_unstable();
    (cuts, data)
}

/// `data` cut at the sorted positions `cuts`: `cuts.len() + 1` pieces, some possibly empty.
pub fn pieces<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &c in cuts {
        out.push(&data[start..c]);
        start = c;
    }
    out.push(&data[start..]);
    out
}

/// A script file every `opt_script` is pointed at: a fuzzed config must not make awd read
/// whatever file it names (`/dev/zero` would never end).
fn script_fixture() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("awd-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join("opt_script");
        std::fs::write(&path, "# fuzz\nquit\ninfo status\n").expect("the script fixture");
        path
    })
}

/// Validates `raw` as `awd check` and `awd run` do, with every `opt_script` pointed at a fixed
/// script, then holds the result to what the rest of awd assumes of a checked config: it prints
/// (`awd check`), and each watchdog's engine starts ("a config that checks is a config that
/// runs").
pub fn build_and_check(mut raw: RawConfig) -> Result<Config, ConfigError> {
    for o in &mut raw.objects {
        if let RawObject::Watchdog(w) = o {
            if w.opt_script.is_some() {
                w.opt_script = Some(script_fixture().to_owned());
            }
            for step in &mut w.escalate {
                if step.opt_script.is_some() {
                    step.opt_script = Some(script_fixture().to_owned());
                }
            }
        }
    }
    let cfg = Config::build(raw)?;
    let _printed = cfg.to_string();
    let now = Instant::now();
    for w in &cfg.watchdogs {
        if let Err(e) = WatchdogEngine::new(&w.engine, now) {
            panic!("watchdog {} checked but its engine refuses it: {e}", w.id);
        }
    }
    Ok(cfg)
}

/// The script lines a monitor target may send, picked by the bits of the input's first byte:
/// every typed QMP command, and one line that goes through `human-monitor-command` on QMP.
pub const SCRIPT: [&str; 8] = [
    "stop",
    "info status",
    "cont",
    "x_colo_lost_heartbeat",
    "nbd_server_stop",
    "system_reset",
    "system_powerdown",
    "quit",
];

/// A monitor target's input, taken apart.
#[derive(Debug)]
pub struct MonitorInput {
    /// The script lines awd sends, in order, parsed as awd parses a script.
    pub lines: Vec<awd::action::script::ScriptLine>,
    /// What the node was last time.
    pub known: Option<awd::action::monitor::Kind>,
    /// What the monitor sends, one element per read.
    pub reads: Vec<Vec<u8>>,
}

/// Byte 0: which of [`SCRIPT`] are sent (bit i: line i); byte 1 modulo 4: the kind remembered
/// (none, QMP, HMP, raw); the rest: what the monitor sends, cut into reads at every 0xFF byte
/// (a byte neither QMP's UTF-8 JSON nor HMP's text holds).
pub fn monitor_input(input: &[u8]) -> MonitorInput {
    use awd::action::monitor::Kind;
    let mask = input.first().copied().unwrap_or(0);
    let known = match input.get(1).map(|b| b % 4) {
        Some(1) => Some(Kind::Qmp),
        Some(2) => Some(Kind::Hmp),
        Some(3) => Some(Kind::Raw),
        _ => None,
    };
    let text: Vec<&str> = (0..SCRIPT.len())
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| SCRIPT[i])
        .collect();
    let lines = awd::action::script::Script::parse(&text.join("\n"), "fuzz")
        .expect("the fixed script lines parse")
        .lines;
    let rest = input.get(2..).unwrap_or(&[]);
    let reads = rest.split(|&b| b == 0xFF).map(<[u8]>::to_vec).collect();
    MonitorInput {
        lines,
        known,
        reads,
    }
}
