//! Authenticated framing for heartbeat channels that name a pre-shared key (`psk=FILE`).
//!
//! Without a key, anyone who reaches a TCP heartbeat port can keep a dead peer's watchdog
//! alive or forge pulses. With one, a connection proves knowledge of the key at connect time
//! and every message afterwards carries a tag, so a forger's, a replayed or a reordered message
//! is rejected and refreshes nothing. `docs/protocol.md` is the specification, with the fixed
//! vectors the tests below check.
//!
//! This module is sans-IO: it builds and checks bytes; `transport::psk` drives it over a socket.
//!
//! * **Hello** (each side, at once): `AWD-PSK1` then a fresh 16-byte nonce.
//! * **Proof** (each side, once it has the other's hello): `HMAC-SHA256(key, "awd-psk1 proof"
//!   ‖ role ‖ server nonce ‖ client nonce)`, role `S` or `C` being the sender's.
//! * **Frames**: `len` (u32 BE) ‖ `seq` (u64 BE) ‖ payload ‖ `HMAC-SHA256(key, "awd-psk1 data"
//!   ‖ role ‖ server nonce ‖ client nonce ‖ seq ‖ len ‖ payload)`. Each direction counts
//!   `seq` from 1 and the receiver takes exactly the next one.

use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The hello's first bytes: the protocol and its version.
pub const MAGIC: &[u8; 8] = b"AWD-PSK1";
/// Bytes of each side's nonce.
pub const NONCE_LEN: usize = 16;
/// Bytes of a hello: magic, then nonce.
pub const HELLO_LEN: usize = MAGIC.len() + NONCE_LEN;
/// Bytes of an HMAC-SHA256 tag (proofs and frame tags).
pub const TAG_LEN: usize = 32;
/// Bytes before a frame's payload: length and sequence number.
pub const FRAME_HEADER_LEN: usize = 12;
/// The longest payload a frame may carry: a heartbeat line is a few bytes and the decoder
/// interprets at most 4 KiB; 64 KiB leaves room for a burst and refuses a lying length before
/// it costs memory.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The shortest key accepted: 16 bytes (128 bits) of secret.
pub const MIN_KEY_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// Which end of the connection a side is; bound into every proof and tag, so one side's
/// messages cannot be reflected back to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that accepted the connection.
    Server,
    /// The side that connected.
    Client,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Server => b'S',
            Role::Client => b'C',
        }
    }

    fn peer(self) -> Role {
        match self {
            Role::Server => Role::Client,
            Role::Client => Role::Server,
        }
    }
}

/// A pre-shared key. Its bytes never appear in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read the key file {path}")]
    Read {
        /// The file.
        path: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// Others than its owner may read it.
    #[error("key file {path} has mode {mode:o}: readable by others than its owner (chmod 600 it)")]
    Mode {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Too short to be a secret.
    #[error("key file {path} holds {len} bytes; a key needs at least {MIN_KEY_LEN}")]
    Short {
        /// The file.
        path: String,
        /// The key's length after trailing line breaks are dropped.
        len: usize,
    },
}

impl Key {
    /// A key from its bytes (at least [`MIN_KEY_LEN`]; the caller checks).
    pub fn from_bytes(bytes: &[u8]) -> Key {
        Key(bytes.to_vec())
    }

    /// Reads a key file: its bytes, less trailing `\n`/`\r`, at least [`MIN_KEY_LEN`] of them;
    /// the file may be readable by its owner only (mode 600 or 400).
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let name = path.display().to_string();
        let read = |source| KeyError::Read {
            path: name.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Mode { path: name, mode });
        }
        let mut bytes = std::fs::read(path).map_err(read)?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::Short {
                path: name,
                len: bytes.len(),
            });
        }
        Ok(Key(bytes))
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length.
        <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC accepts any key length")
    }
}

/// Why a peer's bytes were rejected. Each closes the connection and refreshes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The hello does not start with [`MAGIC`]: not this protocol (a plain-text peer, a
    /// scanner), or another version.
    #[error("not an authenticated peer (no AWD-PSK1 hello)")]
    BadMagic,
    /// The proof does not match: the peer does not hold the key.
    #[error("the peer's proof is wrong (another key)")]
    BadProof,
    /// A frame's tag does not match: forged, altered, or from another connection.
    #[error("a frame's tag is wrong (forged, altered or replayed from another connection)")]
    BadTag,
    /// A frame with the wrong sequence number: replayed, reordered or dropped.
    #[error("frame {got} where {expected} was due (replayed, reordered or dropped)")]
    OutOfOrder {
        /// The sequence number due.
        expected: u64,
        /// The one that came.
        got: u64,
    },
    /// A frame longer than [`MAX_PAYLOAD`].
    #[error("a frame of {0} bytes (at most {MAX_PAYLOAD})")]
    TooLong(usize),
    /// The connection ended inside the handshake or a frame.
    #[error("the connection ended mid-message")]
    Truncated,
    /// The peer did not complete the handshake in time.
    #[error("no handshake within the time allowed")]
    HandshakeTimeout,
}

impl AuthError {
    /// Every reason, indexed like the counters.
    pub const REASONS: [&'static str; 7] = [
        "bad_magic",
        "bad_proof",
        "bad_tag",
        "out_of_order",
        "too_long",
        "truncated",
        "handshake_timeout",
    ];

    /// The index of this reason in [`REASONS`](Self::REASONS).
    pub fn index(&self) -> usize {
        match self {
            AuthError::BadMagic => 0,
            AuthError::BadProof => 1,
            AuthError::BadTag => 2,
            AuthError::OutOfOrder { .. } => 3,
            AuthError::TooLong(_) => 4,
            AuthError::Truncated => 5,
            AuthError::HandshakeTimeout => 6,
        }
    }

    /// A stable snake_case name, for logs and the metric label.
    pub fn as_str(&self) -> &'static str {
        Self::REASONS[self.index()]
    }
}

/// A fresh random nonce from the operating system.
pub fn fresh_nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(n)
}

/// The hello that carries `nonce`.
pub fn hello(nonce: &[u8; NONCE_LEN]) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..MAGIC.len()].copy_from_slice(MAGIC);
    out[MAGIC.len()..].copy_from_slice(nonce);
    out
}

/// The nonce of a peer's hello.
pub fn parse_hello(bytes: &[u8; HELLO_LEN]) -> Result<[u8; NONCE_LEN], AuthError> {
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(AuthError::BadMagic);
    }
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(&bytes[MAGIC.len()..]);
    Ok(n)
}

/// Runs one side's handshake over a blocking stream (the guest agent, [`crate::client`]): hello
/// out, the peer's hello in, proof out, the peer's proof in and checked. The caller bounds it
/// with the stream's timeouts. A rejection is a `PermissionDenied` error saying why.
pub fn handshake_blocking<S: std::io::Read + std::io::Write>(
    s: &mut S,
    key: &Key,
    role: Role,
) -> std::io::Result<Session> {
    let refused =
        |e: AuthError| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string());
    let ours = fresh_nonce()?;
    s.write_all(&hello(&ours))?;
    let mut theirs = [0u8; HELLO_LEN];
    s.read_exact(&mut theirs)?;
    let session = Session::new(key, role, ours, parse_hello(&theirs).map_err(refused)?);
    s.write_all(&session.proof())?;
    let mut proof = [0u8; TAG_LEN];
    s.read_exact(&mut proof)?;
    session.check_proof(&proof).map_err(refused)?;
    Ok(session)
}

/// One authenticated connection, from one side: both nonces, and the sequence numbers of both
/// directions.
#[derive(Debug, Clone)]
pub struct Session {
    key: Key,
    role: Role,
    server_nonce: [u8; NONCE_LEN],
    client_nonce: [u8; NONCE_LEN],
    sent: u64,
    received: u64,
}

impl Session {
    /// The session of the side `role`, which sent `ours` and received `theirs`.
    pub fn new(key: &Key, role: Role, ours: [u8; NONCE_LEN], theirs: [u8; NONCE_LEN]) -> Session {
        let (server_nonce, client_nonce) = match role {
            Role::Server => (ours, theirs),
            Role::Client => (theirs, ours),
        };
        Session {
            key: key.clone(),
            role,
            server_nonce,
            client_nonce,
            sent: 0,
            received: 0,
        }
    }

    fn proof_of(&self, role: Role) -> HmacSha256 {
        let mut m = self.key.mac();
        m.update(b"awd-psk1 proof");
        m.update(&[role.byte()]);
        m.update(&self.server_nonce);
        m.update(&self.client_nonce);
        m
    }

    /// This side's proof of the key.
    pub fn proof(&self) -> [u8; TAG_LEN] {
        self.proof_of(self.role).finalize().into_bytes().into()
    }

    /// Checks the peer's proof (in constant time).
    pub fn check_proof(&self, proof: &[u8; TAG_LEN]) -> Result<(), AuthError> {
        self.proof_of(self.role.peer())
            .verify_slice(proof)
            .map_err(|_| AuthError::BadProof)
    }

    fn tag(&self, sender: Role, seq: u64, payload: &[u8]) -> HmacSha256 {
        let mut m = self.key.mac();
        m.update(b"awd-psk1 data");
        m.update(&[sender.byte()]);
        m.update(&self.server_nonce);
        m.update(&self.client_nonce);
        m.update(&seq.to_be_bytes());
        m.update(&(payload.len() as u32).to_be_bytes());
        m.update(payload);
        m
    }

    /// The next frame carrying `payload` (at most [`MAX_PAYLOAD`] bytes; longer is the
    /// caller's bug and is cut into several frames by [`seal_all`](Self::seal_all)).
    pub fn seal(&mut self, payload: &[u8]) -> Vec<u8> {
        debug_assert!(payload.len() <= MAX_PAYLOAD);
        self.sent += 1;
        let tag = self
            .tag(self.role, self.sent, payload)
            .finalize()
            .into_bytes();
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len() + TAG_LEN);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.sent.to_be_bytes());
        out.extend_from_slice(payload);
        out.extend_from_slice(&tag);
        out
    }

    /// `bytes` as frames of at most [`MAX_PAYLOAD`] each.
    pub fn seal_all(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in bytes.chunks(MAX_PAYLOAD) {
            out.extend(self.seal(chunk));
        }
        out
    }

    /// Takes the first whole frame off the front of `buf`, checks it and returns its payload;
    /// `Ok(None)` while the frame is incomplete. A lying length is refused as soon as its
    /// header is in.
    pub fn open(&mut self, buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, AuthError> {
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(AuthError::TooLong(len));
        }
        let total = FRAME_HEADER_LEN + len + TAG_LEN;
        if buf.len() < total {
            return Ok(None);
        }
        let seq = u64::from_be_bytes(buf[4..12].try_into().expect("8 bytes"));
        let payload = &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
        self.tag(self.role.peer(), seq, payload)
            .verify_slice(&buf[FRAME_HEADER_LEN + len..total])
            .map_err(|_| AuthError::BadTag)?;
        let expected = self.received + 1;
        if seq != expected {
            return Err(AuthError::OutOfOrder { expected, got: seq });
        }
        self.received = seq;
        let payload = payload.to_vec();
        buf.drain(..total);
        Ok(Some(payload))
    }
}

/// Writes the test key `0123456789abcdef0123456789abcdef` (with a newline) to `dir/psk` with
/// `mode`; for unit tests here and in config.
#[cfg(test)]
pub(crate) fn test_key_file(dir: &Path, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("psk");
    std::fs::write(&p, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn pair(key: &Key) -> (Session, Session) {
        let (s, c) = ([0x11; NONCE_LEN], [0x22; NONCE_LEN]);
        (
            Session::new(key, Role::Server, s, c),
            Session::new(key, Role::Client, c, s),
        )
    }

    fn key() -> Key {
        Key::from_bytes(b"0123456789abcdef0123456789abcdef")
    }

    /// The vectors in `docs/protocol.md`, read from the document itself, so the text and the
    /// code cannot drift apart.
    #[test]
    fn the_fixed_vectors_of_the_specification_hold() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
            .expect("docs/protocol.md");
        let vector = |name: &str| -> String {
            let line = doc
                .lines()
                .find(|l| {
                    l.trim_start_matches(['-', ' '])
                        .starts_with(&format!("{name}:"))
                })
                .unwrap_or_else(|| panic!("docs/protocol.md has no `{name}:` vector"));
            // The value is the first `…` span after the name.
            line.split('`').nth(1).unwrap_or_default().to_owned()
        };
        let (mut server, mut client) = pair(&key());
        assert_eq!(hex(&hello(&[0x11; NONCE_LEN])), vector("server hello"));
        assert_eq!(hex(&server.proof()), vector("server proof"));
        assert_eq!(hex(&client.proof()), vector("client proof"));
        let frame = client.seal(b"WATCHDOG=1\n");
        assert_eq!(hex(&frame), vector("client frame 1"));
        let mut buf = frame;
        assert_eq!(server.open(&mut buf), Ok(Some(b"WATCHDOG=1\n".to_vec())));
        let reply = server.seal(b"");
        assert_eq!(hex(&reply), vector("server frame 1"));
    }

    #[test]
    fn frames_round_trip_in_both_directions_and_split_anywhere() {
        let (mut server, mut client) = pair(&key());
        assert_eq!(server.check_proof(&client.proof()), Ok(()));
        assert_eq!(client.check_proof(&server.proof()), Ok(()));
        let mut wire = Vec::new();
        for line in [&b"WATCHDOG=1\n"[..], b"", &[0u8; 300][..]] {
            wire.extend(client.seal(line));
        }
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for b in wire {
            buf.push(b);
            while let Some(p) = server.open(&mut buf).unwrap() {
                got.push(p);
            }
        }
        assert_eq!(got, [b"WATCHDOG=1\n".to_vec(), Vec::new(), vec![0u8; 300]]);
        let mut back = server.seal(b"advanced-watchdog pulse");
        assert_eq!(
            client.open(&mut back),
            Ok(Some(b"advanced-watchdog pulse".to_vec()))
        );
    }

    #[test]
    fn each_kind_of_forgery_is_rejected_with_its_reason() {
        let (mut server, mut client) = pair(&key());
        // Another key: the proof fails.
        let (_, forger) = pair(&Key::from_bytes(b"not the key, not the key at all"));
        assert_eq!(
            server.check_proof(&forger.proof()),
            Err(AuthError::BadProof)
        );
        // Reflection: the server's own proof sent back to it.
        assert_eq!(
            server.check_proof(&server.proof()),
            Err(AuthError::BadProof)
        );
        // An altered byte.
        let mut f = client.seal(b"WATCHDOG=1\n");
        f[FRAME_HEADER_LEN] ^= 1;
        assert_eq!(server.open(&mut f), Err(AuthError::BadTag));
        // A replay of a frame already taken.
        let (mut server, mut client) = pair(&key());
        let f = client.seal(b"WATCHDOG=1\n");
        assert!(server.open(&mut f.clone()).unwrap().is_some());
        assert_eq!(
            server.open(&mut f.clone()),
            Err(AuthError::OutOfOrder {
                expected: 2,
                got: 1
            })
        );
        // Reordering: frame 3 before frame 2.
        let (_f2, f3) = (client.seal(b"a"), client.seal(b"b"));
        assert!(matches!(
            server.open(&mut f3.clone()),
            Err(AuthError::OutOfOrder { .. })
        ));
        // A frame from another connection (other nonces).
        let mut other = Session::new(&key(), Role::Client, [0x33; NONCE_LEN], [0x44; NONCE_LEN]);
        let (mut server, _) = pair(&key());
        assert_eq!(
            server.open(&mut other.seal(b"WATCHDOG=1\n")),
            Err(AuthError::BadTag)
        );
        // A server frame reflected to the server.
        let (mut server, _) = pair(&key());
        let mut own = server.clone().seal(b"x");
        assert_eq!(server.open(&mut own), Err(AuthError::BadTag));
        // A lying length, refused from the header alone.
        let mut huge = (MAX_PAYLOAD as u32 + 1).to_be_bytes().to_vec();
        huge.extend([0u8; 8]);
        assert_eq!(
            server.open(&mut huge),
            Err(AuthError::TooLong(MAX_PAYLOAD + 1))
        );
        // A plain-text peer.
        let mut plain = [0u8; HELLO_LEN];
        plain[..11].copy_from_slice(b"WATCHDOG=1\n");
        assert_eq!(parse_hello(&plain), Err(AuthError::BadMagic));
    }

    #[test]
    fn a_key_file_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = test_key_file(dir.path(), 0o644);
        assert!(matches!(
            Key::load(&p),
            Err(KeyError::Mode { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            Key::load(&p).unwrap(),
            key(),
            "the trailing newline is not part of it"
        );
        std::fs::write(&p, "short\n").unwrap();
        assert!(matches!(Key::load(&p), Err(KeyError::Short { len: 5, .. })));
        assert!(matches!(
            Key::load(&dir.path().join("none")),
            Err(KeyError::Read { .. })
        ));
        assert_eq!(format!("{:?}", key()), "Key(32 bytes)", "never the bytes");
    }
}
