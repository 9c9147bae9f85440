//! Detection lateness: the time from a watchdog's deadline to its action being written to the
//! notification socket, over many expiries.
//!
//! `cargo bench --bench lateness` starts the release `awd` with 20 watchdogs (timeout 200 ms)
//! on Unix sockets and a raw notification socket owned by this program. Each round sends one
//! heartbeat per watchdog (staggered by 10 ms) and waits for every expiry line. The deadline is
//! taken as heartbeat-sent + timeout, so the figure includes the heartbeat's own delivery and is
//! an upper bound. Results are printed as a Markdown table row for docs/benchmarks.md.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WATCHDOGS: usize = 20;
const ROUNDS: usize = 12;
const TIMEOUT_MS: u64 = 200;

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let notify = UnixListener::bind(d.join("notify.sock")).expect("bind notify");
    let mut toml = format!(
        "[chardev.notify]\npath = \"{}\"\n",
        d.join("notify.sock").display()
    );
    for i in 0..WATCHDOGS {
        toml.push_str(&format!(
            "[chardev.hb{i}]\npath = \"{}\"\nserver = true\n[watchdog.w{i}]\nawd_node = \"hb{i}\"\n\
             notification_node = \"notify\"\nscript = [\"expired w{i}\"]\ntimeout = {TIMEOUT_MS}\ngrace = 600000\n",
            d.join(format!("hb{i}.sock")).display()
        ));
    }
    std::fs::write(d.join("awd.toml"), toml).expect("write config");
    let mut awd = Command::new(env!("CARGO_BIN_EXE_awd"))
        .args(["run", "--config"])
        .arg(d.join("awd.toml"))
        .env("AWD_LOG", "off")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start awd");
    // The runner connects at startup; a raw socket is recognised after its 1 s greeting wait.
    notify.set_nonblocking(false).expect("blocking");
    let (conn, _) = notify
        .accept()
        .expect("awd connects to the notification socket");
    let mut lines = BufReader::new(conn);
    let mut hb: Vec<UnixStream> = (0..WATCHDOGS)
        .map(|i| {
            let p = d.join(format!("hb{i}.sock"));
            let start = Instant::now();
            loop {
                match UnixStream::connect(&p) {
                    Ok(s) => break s,
                    Err(_) if start.elapsed() < Duration::from_secs(10) => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("connect {}: {e}", p.display()),
                }
            }
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1200)); // past the runner's greeting wait
    let mut late = Vec::new();
    for _ in 0..ROUNDS {
        let mut deadline = vec![Instant::now(); WATCHDOGS];
        for (i, s) in hb.iter_mut().enumerate() {
            s.write_all(b"WATCHDOG=1\n").expect("heartbeat");
            deadline[i] = Instant::now() + Duration::from_millis(TIMEOUT_MS);
            std::thread::sleep(Duration::from_millis(10));
        }
        for _ in 0..WATCHDOGS {
            let mut line = String::new();
            lines.read_line(&mut line).expect("action line");
            let at = Instant::now();
            let i: usize = line
                .trim()
                .trim_start_matches("expired w")
                .parse()
                .expect("watchdog index");
            late.push(at.saturating_duration_since(deadline[i]));
        }
    }
    let _ = awd.kill();
    let _ = awd.wait();
    late.sort();
    let pct = |p: f64| late[((late.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("expiries: {}", late.len());
    println!(
        "| detection lateness (deadline → action written) | {} expiries | median {:.2} ms | p99 {:.2} ms | max {:.2} ms |",
        late.len(),
        ms(pct(0.5)),
        ms(pct(0.99)),
        ms(*late.last().expect("at least one"))
    );
}
