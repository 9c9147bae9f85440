//! The authenticated framing ([`crate::auth`]) over a socket: the handshake under a time limit,
//! then a relay that checks every frame before its payload reaches the channel.
//!
//! The channel's own code (intake, pulses, eviction) is the same as on a plain socket: it reads
//! and writes one end of an in-memory pipe, and the relay holds the other. Only payloads whose
//! tags verify go into the pipe, so nothing a peer without the key sends can refresh a timer;
//! a rejected frame closes the connection, and the rejection is logged and counted by reason.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tracing::warn;

use super::ChannelContext;
use crate::auth::{self, AuthError, HELLO_LEN, Key, Role, Session, TAG_LEN};
use crate::util::LogLimiter;

/// How long a peer has to complete the handshake: a real peer answers in a round trip; one that
/// says nothing is closed, and until then it counts as a connection that never spoke, the
/// first to be evicted.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of the pipe between the relay and the channel, and of each read.
const PIPE: usize = 64 * 1024;

/// Why an authenticated connection ended before or while relaying.
#[derive(Debug, thiserror::Error)]
pub enum PskError {
    /// The peer's bytes were rejected.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The socket failed (or no nonce could be drawn).
    #[error("i/o")]
    Io(#[source] std::io::Error),
}

fn io_or_truncated(e: std::io::Error) -> PskError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        PskError::Auth(AuthError::Truncated)
    } else {
        PskError::Io(e)
    }
}

/// Runs the handshake as `role`: hello out, the peer's hello in, proof out, the peer's proof
/// in and checked. Bounded by [`HANDSHAKE_TIMEOUT`].
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &Key,
    role: Role,
) -> Result<Session, PskError> {
    let steps = async {
        let ours = auth::fresh_nonce().map_err(PskError::Io)?;
        s.write_all(&auth::hello(&ours))
            .await
            .map_err(PskError::Io)?;
        let mut hello = [0u8; HELLO_LEN];
        s.read_exact(&mut hello).await.map_err(io_or_truncated)?;
        let theirs = auth::parse_hello(&hello)?;
        let session = Session::new(key, role, ours, theirs);
        s.write_all(&session.proof()).await.map_err(PskError::Io)?;
        let mut proof = [0u8; TAG_LEN];
        s.read_exact(&mut proof).await.map_err(io_or_truncated)?;
        session.check_proof(&proof)?;
        Ok(session)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, steps)
        .await
        .unwrap_or(Err(PskError::Auth(AuthError::HandshakeTimeout)))
}

/// Authenticates `stream` as `role` and returns the channel's end of a pipe that carries the
/// verified payloads in and seals whatever is written to it; the relay runs until either side
/// closes. `None` when the handshake failed (logged and counted).
pub async fn open<S>(
    mut stream: S,
    key: &Key,
    role: Role,
    ctx: &ChannelContext,
    peer: &str,
    log: &Arc<Mutex<LogLimiter>>,
) -> Option<DuplexStream>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let session = match handshake(&mut stream, key, role).await {
        Ok(s) => s,
        Err(e) => {
            reject(ctx, peer, log, &e);
            return None;
        }
    };
    let (channel_end, relay_end) = tokio::io::duplex(PIPE);
    let (ctx, peer, log) = (ctx.clone(), peer.to_owned(), log.clone());
    tokio::spawn(async move {
        if let Err(e) = relay(stream, session, relay_end).await {
            reject(&ctx, &peer, &log, &e);
        }
    });
    Some(channel_end)
}

/// Counts and logs (rate-limited) a rejection; a plain socket error is only counted as what it
/// is, a closed connection.
fn reject(ctx: &ChannelContext, peer: &str, log: &Arc<Mutex<LogLimiter>>, e: &PskError) {
    let PskError::Auth(a) = e else {
        tracing::debug!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, %peer,
            "authenticated connection ended: {}", crate::util::error_chain(e));
        return;
    };
    ctx.metrics.auth_rejected[a.index()].inc();
    let allowed = log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allow(std::time::Instant::now());
    if let Some(suppressed) = allowed {
        warn!(watchdog = &*ctx.watchdog, channel = &*ctx.channel, %peer, suppressed,
            reason = a.as_str(), "closing an unauthenticated connection: {a}");
    }
}

/// Moves verified payloads from `stream` into `pipe`, and sealed frames of what the channel
/// writes to `pipe` out to `stream`, until either ends. Each direction keeps its own sequence
/// numbers, so each has its own copy of the session.
async fn relay<S>(stream: S, session: Session, pipe: DuplexStream) -> Result<(), PskError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut net_rd, mut net_wr) = tokio::io::split(stream);
    let (mut pipe_rd, mut pipe_wr) = tokio::io::split(pipe);
    let (mut opener, mut sealer) = (session.clone(), session);
    let inbound = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; PIPE];
        loop {
            let n = net_rd.read(&mut chunk).await.map_err(PskError::Io)?;
            if n == 0 {
                return if buf.is_empty() {
                    Ok(())
                } else {
                    Err(PskError::Auth(AuthError::Truncated))
                };
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Some(payload) = opener.open(&mut buf)? {
                if pipe_wr.write_all(&payload).await.is_err() {
                    return Ok(()); // the channel closed its end
                }
            }
        }
    };
    let outbound = async {
        let mut chunk = vec![0u8; PIPE];
        loop {
            match pipe_rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if net_wr
                        .write_all(&sealer.seal_all(&chunk[..n]))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = net_wr.shutdown().await;
    };
    tokio::select! {
        r = inbound => r,
        () = outbound => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::from_bytes(b"0123456789abcdef0123456789abcdef")
    }

    #[tokio::test]
    async fn both_ends_agree_and_a_wrong_key_or_a_plain_peer_is_refused() {
        let k = key();
        let (mut a, mut b) = tokio::io::duplex(4096);
        let (sa, sb) = tokio::join!(
            handshake(&mut a, &k, Role::Server),
            handshake(&mut b, &k, Role::Client)
        );
        let (mut sa, mut sb) = (sa.unwrap(), sb.unwrap());
        let mut f = sb.seal(b"WATCHDOG=1\n");
        assert_eq!(sa.open(&mut f).unwrap(), Some(b"WATCHDOG=1\n".to_vec()));

        let (mut a, mut b) = tokio::io::duplex(4096);
        let other = Key::from_bytes(b"another key, quite another key");
        let (sa, _) = tokio::join!(
            handshake(&mut a, &k, Role::Server),
            handshake(&mut b, &other, Role::Client)
        );
        assert!(matches!(sa, Err(PskError::Auth(AuthError::BadProof))));

        let (mut a, mut b) = tokio::io::duplex(4096);
        b.write_all(b"WATCHDOG=1\nWATCHDOG=1\nWATCHDOG=1\n")
            .await
            .unwrap();
        let sa = handshake(&mut a, &k, Role::Server).await;
        assert!(matches!(sa, Err(PskError::Auth(AuthError::BadMagic))));

        let (mut a, b) = tokio::io::duplex(4096);
        drop(b);
        let sa = handshake(&mut a, &k, Role::Server).await;
        assert!(matches!(
            sa,
            Err(PskError::Io(_)) | Err(PskError::Auth(AuthError::Truncated))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_given_up_at_the_handshake_timeout() {
        let (mut a, _b) = tokio::io::duplex(4096);
        let k = key();
        let t0 = tokio::time::Instant::now();
        let r = handshake(&mut a, &k, Role::Server).await;
        assert!(matches!(
            r,
            Err(PskError::Auth(AuthError::HandshakeTimeout))
        ));
        assert_eq!(t0.elapsed(), HANDSHAKE_TIMEOUT);
    }
}
