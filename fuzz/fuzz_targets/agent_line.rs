//! The guest agent's local socket: what any guest program may write to it, through the agent's
//! real client handling (line splitting, the 4096-byte bound, `relayable`, the relay to the
//! host, the replies), with a Unix socket as the host side.
//!
//! Input: two 2-byte cut positions, then what one client writes before it shuts its side.
//! Checks: the client's bytes whole and cut into three reads give the same lines to the host
//! and (unless the reply cap dropped some) the same replies; every line the host gets decodes
//! as a message the host acts on; one `OK` per relayed line.
#![no_main]

use std::cell::RefCell;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use awd::agent::limits::REPLY_CAP;
use awd::agent::{Agent, AgentConfig, Target};
use awd::fuzzing::agent_client;
use awd::protocol::{Decoder, Message};
use libfuzzer_sys::fuzz_target;

/// The agent, and the host end it relays to; one for the whole run, as a long-running agent
/// serves one client after another.
struct World {
    agent: Agent,
    listener: UnixListener,
    host: Option<UnixStream>,
    _dir: PathBuf,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("a temporary directory").keep();
        let path = dir.join("host.sock");
        let listener = UnixListener::bind(&path).expect("the host socket binds");
        listener.set_nonblocking(true).expect("non-blocking");
        let agent = Agent::new(AgentConfig {
            target: Target::Unix(path),
            interval: Duration::from_secs(3600),
            message: "WATCHDOG=1".into(),
            raw: false,
            count: None,
            expect_pulses: None,
            reply_pulses: false,
            socket: None,
            notify: None,
            psk: None,
        });
        World {
            agent,
            listener,
            host: None,
            _dir: dir,
        }
    }

    /// What the host has received since the last call.
    fn host_bytes(&mut self) -> Vec<u8> {
        if self.host.is_none()
            && let Ok((s, _)) = self.listener.accept()
        {
            s.set_nonblocking(true).expect("non-blocking");
            self.host = Some(s);
        }
        let mut out = Vec::new();
        let Some(s) = self.host.as_mut() else {
            return out;
        };
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading the host side: {e}"),
            }
        }
        out
    }

    /// One client session: the agent's replies, the host's bytes, and the lines relayed.
    fn session(&mut self, reads: &[&[u8]]) -> (Vec<u8>, Vec<u8>, u64) {
        let before = self.agent.stats().relayed;
        let replies = agent_client(&mut self.agent, reads, true).expect("the socket pair works");
        let host = self.host_bytes();
        (replies, host, self.agent.stats().relayed - before)
    }
}

thread_local! {
    static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
}

fuzz_target!(|input: &[u8]| {
    let (cuts, data) = awd_fuzz::cuts(input, 2);
    let reads = awd_fuzz::pieces(data, &cuts);
    WORLD.with(|w| {
        let mut w = w.borrow_mut();
        let w = w.get_or_insert_with(World::new);
        let (replies, host, relayed) = w.session(&[data]);
        let (split_replies, split_host, split_relayed) = w.session(&reads);
        assert_eq!(
            String::from_utf8_lossy(&split_host),
            String::from_utf8_lossy(&host),
            "cutting the client's bytes changed what the host got"
        );
        assert_eq!(split_relayed, relayed);
        if replies.len() + 256 < REPLY_CAP {
            assert_eq!(
                String::from_utf8_lossy(&split_replies),
                String::from_utf8_lossy(&replies),
                "cutting the client's bytes changed the replies"
            );
            let oks = replies
                .split(|&b| b == b'\n')
                .filter(|l| *l == b"OK")
                .count();
            assert_eq!(oks as u64, relayed, "one OK per relayed line");
        }
        assert!(
            host.is_empty() || host.ends_with(b"\n"),
            "the host gets whole lines"
        );
        let mut d = Decoder::new();
        let mut n = 0u64;
        d.feed(&host, |m| {
            n += 1;
            assert!(
                !matches!(
                    m,
                    Message::Rejected(_) | Message::Pulse | Message::PulseReply
                ),
                "the agent relayed {m:?}"
            );
        });
        assert_eq!(n, relayed, "the host decodes one message per relayed line");
    });
});
