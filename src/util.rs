//! Small helpers shared by several subsystems, with no dependency on any of them: names as the
//! protocol and the engine accept them, error chains on one line, rate-limited logging, and Unix
//! socket files that are cleaned up.
//!
//! Anything here is used by at least two modules that must not import each other; code used by
//! one subsystem lives in that subsystem.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest checkpoint or condition name.
pub const MAX_NAME: usize = 64;

/// Whether `name` is a usable checkpoint or condition name: 1 to [`MAX_NAME`] characters of
/// `[A-Za-z0-9_.:-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
}

/// Formats an error with its sources, `a: b: c`, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Allows a burst of log lines, then one per `period`, counting what it suppressed.
#[derive(Debug)]
pub struct LogLimiter {
    period: Duration,
    burst: u32,
    tokens: u32,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter that allows `burst` lines at once, refilled at one per `period`.
    pub fn new(burst: u32, period: Duration) -> Self {
        LogLimiter {
            period,
            burst,
            tokens: burst,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now; if so, also returns how many were suppressed since
    /// the last one.
    pub fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        if let Some(last) = self.last {
            let refill = (now.saturating_duration_since(last).as_nanos()
                / self.period.as_nanos().max(1)) as u32;
            if refill > 0 {
                self.tokens = self.tokens.saturating_add(refill).min(self.burst);
                self.last = Some(now);
            }
        } else {
            self.last = Some(now);
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Removes a Unix socket file when dropped.
#[derive(Debug)]
pub struct UnixPathGuard(PathBuf);

impl Drop for UnixPathGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl UnixPathGuard {
    /// Removes `path` when dropped.
    pub fn new(path: PathBuf) -> UnixPathGuard {
        UnixPathGuard(path)
    }

    /// The path it removes.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

/// Binds a blocking std Unix listener at `path` after [`clear_stale_socket`]. For code on its own
/// thread (the vhost-user vsock device); `transport::socket::bind_unix` wraps it for tokio.
pub fn bind_unix_std(path: &Path) -> io::Result<(std::os::unix::net::UnixListener, UnixPathGuard)> {
    clear_stale_socket(path)?;
    let l = std::os::unix::net::UnixListener::bind(path)?;
    Ok((l, UnixPathGuard(path.to_owned())))
}

/// Makes way for a socket at `path`: removes a stale socket file left by an earlier process
/// (one nobody answers on). A live socket at the path is an error, as is any non-socket file.
pub fn clear_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening there",
                ));
            }
            Err(_) => std::fs::remove_file(path)?,
        }
    }
    Ok(())
}

/// `n` milliseconds: the unit configs and tests write times in.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_limiter_allows_a_burst_then_one_per_period() {
        let t0 = std::time::Instant::now();
        let mut l = LogLimiter::new(2, Duration::from_secs(1));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(2));
    }

    #[test]
    fn names_are_short_and_plain() {
        assert!(valid_name("db.ready:1-a_b"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name("a=1"));
        assert!(valid_name(&"x".repeat(MAX_NAME)));
        assert!(!valid_name(&"x".repeat(MAX_NAME + 1)));
    }

    #[test]
    fn an_error_chain_is_one_line() {
        let inner = io::Error::other("disk on fire");
        #[derive(Debug, thiserror::Error)]
        #[error("cannot save")]
        struct Outer(#[source] io::Error);
        assert_eq!(error_chain(&Outer(inner)), "cannot save: disk on fire");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = std::env::temp_dir().join(format!("awd-util-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let (live, guard) = bind_unix_std(&path).unwrap();
        assert_eq!(
            bind_unix_std(&path).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(live);
        std::mem::forget(guard); // leave the file behind, as a crashed process would
        let (_l, _g) = bind_unix_std(&path).expect("a stale socket file is cleared");
        std::fs::write(dir.join("plain"), b"x").unwrap();
        assert_eq!(
            clear_stale_socket(&dir.join("plain")).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }
}
