//! Control-socket requests, as any local process could write them, to a running daemon: the
//! real socket (`control::bind`), the real per-connection loop (`control::serve`) and the real
//! handler (`Daemon`) with two watchdogs, supervisions and conditions to act on.
//!
//! Input: the bytes a client writes before it shuts its side. Checks: every response is one
//! JSON `Response` line, a refusal carries a code and a success none; for UTF-8 input, one
//! response per line, refused as `bad_request` exactly when the line is not a `Request`, and
//! every request survives a serialization round trip.
//!
//! The daemon lives for the whole run, so a request can change what a later input sees (a
//! disabled watchdog stays disabled); the state space is small and every state is legal.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use awd::config::{Config, file};
use awd::control::{Request, Response};
use awd::daemon::{Daemon, Options};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// The longest request line the daemon accepts (`control::MAX_REQUEST`).
const MAX_REQUEST: usize = 64 * 1024;

struct World {
    rt: Runtime,
    socket: PathBuf,
}

const CONFIG: &str = r#"
[chardev.hb]
path = "@DIR@/hb.sock"
server = true

[chardev.hb2]
path = "@DIR@/hb2.sock"
server = true

[watchdog.vm1]
awd_node = "hb"
timeout = 86400000
guest_conditions = { app-ready = false }
operator_conditions = { maintenance-off = true }

[[watchdog.vm1.alive]]
name = "main-loop"
checkpoint = "tick"
cycle = 86400000
expected = 10
min_margin = 2
max_margin = 2
tolerance = 3
conditions = ["app-ready"]

[[watchdog.vm1.deadline]]
name = "request"
start = "req-start"
end = "req-end"
max = 86400000
conditions = ["maintenance-off"]

[watchdog.vm2]
awd_node = "hb2"
timeout = 86400000
operator_conditions = { maintenance-off = false }
"#;

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory").keep();
        let text = CONFIG.replace("@DIR@", &dir.display().to_string());
        let raw = file::parse(&text, &dir.join("awd.toml")).expect("the daemon's config parses");
        let cfg = Config::build(raw).expect("the daemon's config checks");
        let socket = dir.join("control.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let control = awd::control::bind(&socket).expect("the control socket binds");
            let opts = Options {
                control: Some(control),
                ..Options::default()
            };
            let daemon = Daemon::start(cfg, opts).await.expect("the daemon starts");
            // It runs for the whole fuzzing run.
            std::mem::forget(daemon);
        });
        World { rt, socket }
    })
}

/// Writes `input` on a fresh connection, shuts the writing side, and reads every response.
fn exchange(w: &World, input: &[u8]) -> Vec<u8> {
    w.rt.block_on(async {
        let s = tokio::net::UnixStream::connect(&w.socket)
            .await
            .expect("the daemon accepts");
        let (mut r, mut wr) = s.into_split();
        let write = async {
            // The daemon may close early (a line that is not UTF-8 ends the connection).
            let _ = wr.write_all(input).await;
            let _ = wr.shutdown().await;
        };
        let read = async {
            let mut out = Vec::new();
            let _ = r.read_to_end(&mut out).await;
            out
        };
        let (_, out) =
            tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
                .await
                .expect("the daemon answers within 30 s");
        out
    })
}

fuzz_target!(|input: &[u8]| {
    let w = world();
    let out = exchange(w, input);
    assert!(
        out.is_empty() || out.ends_with(b"\n"),
        "responses are whole lines"
    );
    let responses: Vec<Response> = out
        .split_inclusive(|&b| b == b'\n')
        .map(|l| {
            let r: Response = serde_json::from_slice(l).expect("each response is JSON");
            assert_eq!(r.ok, r.error.is_none(), "{r:?}");
            assert_eq!(r.ok, r.code.is_none(), "{r:?}");
            r
        })
        .collect();
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if input.len() >= 16 * MAX_REQUEST {
        return;
    }
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    assert_eq!(
        responses.len(),
        lines.len(),
        "one response per request line"
    );
    for (line, resp) in lines.iter().zip(&responses) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let code = resp.code.as_deref();
        if line.len() > MAX_REQUEST {
            assert_eq!(code, Some("request_too_long"));
            continue;
        }
        match serde_json::from_str::<Request>(line) {
            Err(_) => assert_eq!(code, Some("bad_request"), "{line:?}"),
            Ok(req) => {
                assert_ne!(code, Some("bad_request"), "{line:?}");
                let again = serde_json::to_string(&req).expect("a request serializes");
                let back: Request = serde_json::from_str(&again).expect("and parses back");
                assert_eq!(back, req);
            }
        }
    }
});
