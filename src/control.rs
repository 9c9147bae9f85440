//! The control socket: `awd status`, `awd enable`, `awd disable`, `awd condition` talk to a
//! running daemon over a Unix socket, one JSON request and one JSON response per line.
//!
//! ```text
//! → {"cmd":"status"}
//! ← {"ok":true,"watchdogs":[{"id":"vm1","status":"ok",…}]}
//! → {"cmd":"disable","target":"vm1/main-loop"}
//! ← {"ok":true}
//! → {"cmd":"condition","name":"maintenance","value":false}
//! ← {"ok":false,"error":"no watchdog declares operator condition 'maintenance'","code":"no_operator_condition"}
//! ```
//!
//! A refusal carries `error`, a one-line message for people (what `awd` prints), and `code`, a
//! stable snake_case reason for programs ([`ErrorCode`]). Clients that read only `error` work
//! as before; a daemon from before `code` existed leaves it out.
//!
//! The daemon side ([`serve`]) hands each request to a [`Handler`]; the client side
//! ([`request`]) is a blocking call for the CLI.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::util::{UnixPathGuard, clear_stale_socket, error_chain};

/// Where the control socket is unless `--control` says otherwise.
pub const DEFAULT_PATH: &str = "/run/awd/control.sock";

/// The longest request line accepted: a request is a short JSON object (a command and a
/// watchdog id), so 64 KiB refuses only a confused or hostile client, before it costs memory.
const MAX_REQUEST: usize = 64 * 1024;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every watchdog's status.
    Status,
    /// Enable a watchdog (`ID`) or one supervision (`ID/NAME`); re-arms its timers.
    Enable {
        /// `ID` or `ID/SUPERVISION`.
        target: String,
    },
    /// Disable a watchdog or one supervision: it cannot fire until enabled again.
    Disable {
        /// `ID` or `ID/SUPERVISION`.
        target: String,
    },
    /// Set an operator condition, on one watchdog or on every watchdog that links it.
    Condition {
        /// The operator condition, as declared.
        name: String,
        /// Its new value.
        value: bool,
        /// Only this watchdog.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        watchdog: Option<String>,
    },
}

/// One response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not, in one line for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why not, as a stable snake_case reason for programs ([`ErrorCode::code`]); `None` from
    /// a daemon that predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// For `status`: one object per watchdog.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watchdogs: Vec<Value>,
}

impl Response {
    /// Whether this is a refusal with `code` whose message starts with `message` (tests).
    #[cfg(test)]
    pub(crate) fn is_refusal(&self, code: &str, message: &str) -> bool {
        !self.ok
            && self.code.as_deref() == Some(code)
            && self
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with(message))
    }

    /// A success with no payload.
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    /// A refusal: the error's whole chain as the message, and its code.
    pub fn error<E: ErrorCode>(e: &E) -> Response {
        Response {
            ok: false,
            error: Some(error_chain(e)),
            code: Some(e.code().to_owned()),
            watchdogs: Vec::new(),
        }
    }
}

/// An error the control socket can answer with: a message (its `Display` and `source` chain)
/// and a stable code.
pub trait ErrorCode: std::error::Error {
    /// A stable snake_case name of the reason, the response's `code`.
    fn code(&self) -> &'static str;
}

/// Why a request line was refused before any handler saw it.
#[derive(Debug, thiserror::Error)]
pub enum RequestLineError {
    /// The line is longer than 64 KiB.
    #[error("request too long")]
    TooLong,
    /// The line is not a JSON [`Request`].
    #[error("bad request")]
    Malformed(#[source] serde_json::Error),
}

impl ErrorCode for RequestLineError {
    fn code(&self) -> &'static str {
        match self {
            RequestLineError::TooLong => "request_too_long",
            RequestLineError::Malformed(_) => "bad_request",
        }
    }
}

/// What the daemon does with a request.
pub trait Handler: Send + Sync + 'static {
    /// Carries out `req`.
    fn handle(
        &self,
        req: Request,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + '_>>;
}

/// Why the control socket could not start, or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Binding the socket failed.
    #[error("cannot listen on control socket {path}")]
    Bind {
        /// The socket path, as given.
        path: String,
        /// The error from creating the directory or binding.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the daemon failed.
    #[error("cannot reach awd at {path} (is `awd run --control {path}` running?)")]
    Connect {
        /// The socket path the client tried.
        path: String,
        /// The connect error (no such file, refused, permission).
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("control socket {path}")]
    Io {
        /// The socket path.
        path: String,
        /// The read or write error, or the 10 s read timeout.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not a response.
    #[error("control socket {path}: bad response: {msg}")]
    BadResponse {
        /// The socket path.
        path: String,
        /// The JSON error, on one line.
        msg: String,
    },
}

/// A bound control socket; the file is removed when it is dropped.
#[derive(Debug)]
pub struct ControlListener {
    listener: tokio::net::UnixListener,
    _guard: UnixPathGuard,
}

/// Binds the control socket, creating its directory. Only the owner may connect (mode 0600):
/// the socket can disable watchdogs.
///
/// The socket never exists at a looser mode, not even for a moment: it is bound inside a
/// fresh private directory (mode 0700) next to `path`, set to 0600 there, and renamed into
/// place. (`umask` around `bind` would do too, but it is process-wide, and other threads
/// create files meanwhile.)
pub fn bind(path: &Path) -> Result<ControlListener, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| ControlError::Bind {
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    clear_stale_socket(path).map_err(err)?;
    let private = private_dir(dir).map_err(err)?;
    // Short names: a Unix socket path has at most 107 bytes.
    let staged = private.0.join("s");
    let bound = (|| {
        let l = std::os::unix::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })();
    drop(private);
    let l = bound.map_err(err)?;
    let guard = UnixPathGuard::new(path.to_owned());
    let listener = tokio::net::UnixListener::from_std(l).map_err(err)?;
    Ok(ControlListener {
        listener,
        _guard: guard,
    })
}

/// A directory only the owner can enter, removed (with what is left in it) when dropped.
struct PrivateDir(PathBuf);
impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates a fresh directory in `parent` that only the owner can enter.
fn private_dir(parent: &Path) -> std::io::Result<PrivateDir> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let name = format!(
            ".awd.{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let p = parent.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(PrivateDir(p)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Serves requests until `shutdown`.
pub async fn serve(l: ControlListener, handler: Arc<dyn Handler>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = l.listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("control socket accept failed: {e}");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(r)
                .take(MAX_REQUEST as u64 * 16)
                .lines();
            loop {
                let line =
                    match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
                        Ok(Ok(Some(l))) => l,
                        _ => break,
                    };
                let resp = if line.len() > MAX_REQUEST {
                    Response::error(&RequestLineError::TooLong)
                } else {
                    match serde_json::from_str::<Request>(&line) {
                        Ok(req) => {
                            debug!(?req, "control request");
                            handler.handle(req).await
                        }
                        Err(e) => Response::error(&RequestLineError::Malformed(e)),
                    }
                };
                let mut out =
                    serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Sends one request to the daemon at `path` and waits (up to 10 s) for the response.
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let shown = path.display().to_string();
    let io = |source| ControlError::Io {
        path: shown.clone(),
        source,
    };
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: shown.clone(),
            source,
        })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::BadResponse {
        path: shown.clone(),
        msg: e.to_string(),
    })?;
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp).map_err(io)?;
    serde_json::from_str(&resp).map_err(|e| ControlError::BadResponse {
        path: shown,
        msg: e.to_string(),
    })
}

/// The control socket path: `--control`, else `AWD_CONTROL`, else [`DEFAULT_PATH`].
pub fn resolve_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("AWD_CONTROL").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Renders a `status` response as a table for people: one line per watchdog, then one
/// indented line per supervision.
pub fn render_table(watchdogs: &[Value]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<16} {:<11} {:<14} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8}\n",
        "WATCHDOG",
        "STATUS",
        "CHANNEL",
        "CONNS",
        "HEARTBEATS",
        "LAST(ms)",
        "EXPIRIES",
        "ACTIONS",
        "UNKNOWN"
    ));
    for w in watchdogs {
        out.push_str(&format!(
            "{:<16} {:<11} {:<14} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8}\n",
            text(&w["id"]),
            text(&w["status"]),
            text(&w["channel"]),
            text(&w["connections"]),
            text(&w["heartbeats"]),
            text(&w["last_input_ms_ago"]),
            text(&w["expiries"]),
            text(&w["actions_sent"]),
            text(&w["actions_unknown"]),
        ));
        if w["stopping"].as_bool() == Some(true) {
            out.push_str(
                "  stopping: the peer said STOPPING=1; supervision resumes when it announces itself (READY=1, a checkpoint, WATCHDOG_USEC=)\n",
            );
        }
        if let Some(sups) = w["supervisions"].as_array() {
            for sup in sups {
                let active = match (sup["enabled"].as_bool(), sup["active"].as_bool()) {
                    (Some(false), _) => "disabled",
                    (_, Some(false)) => "suspended",
                    _ => "active",
                };
                let row = format!(
                    "  {:<14} {:<11} {:<9} {:<9} next {:>7} ms  {}",
                    text(&sup["name"]),
                    text(&sup["status"]),
                    text(&sup["kind"]),
                    active,
                    text(&sup["next_deadline_ms"]),
                    sup["last_reason"].as_str().unwrap_or(""),
                );
                out.push_str(row.trim_end());
                out.push('\n');
            }
        }
        if let Some(conds) = w["conditions"].as_array()
            && !conds.is_empty()
        {
            let list: Vec<String> = conds
                .iter()
                .map(|c| format!("{}={}", text(&c["name"]), text(&c["value"])))
                .collect();
            out.push_str(&format!("  conditions: {}\n", list.join(" ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let cases = [
            (Request::Status, r#"{"cmd":"status"}"#),
            (
                Request::Enable {
                    target: "vm1/alive".into(),
                },
                r#"{"cmd":"enable","target":"vm1/alive"}"#,
            ),
            (
                Request::Condition {
                    name: "maint".into(),
                    value: false,
                    watchdog: None,
                },
                r#"{"cmd":"condition","name":"maint","value":false}"#,
            ),
        ];
        for (req, wire) in cases {
            assert_eq!(serde_json::to_string(&req).unwrap(), wire);
            assert_eq!(serde_json::from_str::<Request>(wire).unwrap(), req);
        }
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }

    /// The socket is never reachable at a looser mode than 0600: a watcher that stats the path
    /// as fast as it can while the socket is bound over and over never sees another mode, and
    /// nothing is left beside it.
    #[test]
    fn the_control_socket_is_created_with_mode_0600_from_the_start() {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/c.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = std::collections::BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(m) = std::fs::symlink_metadata(&path) {
                        seen.insert(m.permissions().mode() & 0o777);
                    }
                }
                seen
            })
        };
        for _ in 0..300 {
            let l = rt.block_on(async { bind(&path).unwrap() });
            drop(l);
        }
        stop.store(true, Ordering::Relaxed);
        let seen = watcher.join().unwrap();
        assert!(
            seen.iter().all(|m| *m == 0o600),
            "modes seen at the path: {seen:?} (0o600 = 384)"
        );
        let l = rt.block_on(async { bind(&path).unwrap() });
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("c.sock")],
            "no private directory left"
        );
        // A live socket at the path is not taken over.
        let again = rt.block_on(async { bind(&path) });
        assert!(again.is_err(), "a second daemon on a live socket");
        drop(l);
        assert!(!path.exists(), "removed when the listener is dropped");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("no")]
    struct No;
    impl ErrorCode for No {
        fn code(&self) -> &'static str {
            "no"
        }
    }

    /// A refusal's wire form: `error` as before, `code` beside it; a success has neither.
    #[test]
    fn a_refusal_carries_its_message_and_a_stable_code() {
        #[derive(Debug, thiserror::Error)]
        #[error("watchdog 'vm1'")]
        struct Outer(#[source] No);
        impl ErrorCode for Outer {
            fn code(&self) -> &'static str {
                "no"
            }
        }
        assert_eq!(
            serde_json::to_string(&Response::error(&Outer(No))).unwrap(),
            r#"{"ok":false,"error":"watchdog 'vm1': no","code":"no"}"#,
            "the message is the whole chain"
        );
        assert_eq!(
            serde_json::to_string(&Response::ok()).unwrap(),
            r#"{"ok":true}"#
        );
        let line = Response::error(&RequestLineError::TooLong);
        assert_eq!(
            serde_json::to_value(&line).unwrap(),
            serde_json::json!({"ok": false, "error": "request too long", "code": "request_too_long"})
        );
        let bad = serde_json::from_str::<Request>("{").unwrap_err();
        let resp = Response::error(&RequestLineError::Malformed(bad));
        let msg = resp.error.as_deref().unwrap();
        assert!(msg.starts_with("bad request: EOF while parsing"), "{msg}");
        assert_eq!(resp.code.as_deref(), Some("bad_request"));
    }

    /// A client that knows only `ok` and `error` reads a new response, and a new client reads an
    /// old one (no `code`).
    #[test]
    fn old_and_new_responses_read_both_ways() {
        #[derive(Deserialize)]
        struct OldResponse {
            ok: bool,
            error: Option<String>,
        }
        let new = r#"{"ok":false,"error":"no watchdog 'x'","code":"unknown_watchdog"}"#;
        let old: OldResponse = serde_json::from_str(new).unwrap();
        assert!(!old.ok);
        assert_eq!(old.error.as_deref(), Some("no watchdog 'x'"));
        let read: Response =
            serde_json::from_str(r#"{"ok":false,"error":"no watchdog 'x'"}"#).unwrap();
        assert_eq!(read.error.as_deref(), Some("no watchdog 'x'"));
        assert_eq!(read.code, None);
    }

    struct Echo;
    impl Handler for Echo {
        fn handle(
            &self,
            req: Request,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + '_>> {
            Box::pin(async move {
                match req {
                    Request::Status => Response {
                        watchdogs: vec![serde_json::json!({"id": "vm1", "status": "ok"})],
                        ..Response::ok()
                    },
                    _ => Response::error(&No),
                }
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_trip_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let l = bind(&path).unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(l, Arc::new(Echo), shutdown.clone()));
        let p = path.clone();
        let resp = tokio::task::spawn_blocking(move || request(&p, &Request::Status))
            .await
            .unwrap()
            .unwrap();
        assert!(resp.ok);
        assert_eq!(resp.watchdogs[0]["id"], "vm1");
        assert!(render_table(&resp.watchdogs).contains("vm1"));
        let p = path.clone();
        let resp = tokio::task::spawn_blocking(move || {
            request(&p, &Request::Disable { target: "x".into() })
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(resp.error.as_deref(), Some("no"));
        assert_eq!(resp.code.as_deref(), Some("no"));
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(b"{\"cmd\":\"reboot\"}\n").await.unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(&mut s)
            .read_line(&mut line)
            .await
            .unwrap();
        let resp: Response = serde_json::from_str(&line).unwrap();
        assert!(
            resp.is_refusal("bad_request", "bad request: unknown variant"),
            "{resp:?}"
        );
        shutdown.cancel();
    }
}
