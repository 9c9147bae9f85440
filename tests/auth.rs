//! Authenticated TCP channels (`psk=`), end to end with the real `awd` binary and a client that
//! speaks `docs/protocol.md` through `awd::auth`: every rejection reason, a forger that keeps
//! nothing alive, and an authenticated COLO-style pair that still fails over.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use awd::auth::{self, HELLO_LEN, Key, Role, Session, TAG_LEN};
use common::*;

const KEY: &[u8] = b"correct horse battery staple, twice over";

fn key_file(dir: &Path, name: &str, key: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Connects and runs the client's half of the handshake with `key`; returns the stream and the
/// session (whose proof check of the server may fail with another key: not checked here).
fn authenticate(port: u16, key: &[u8]) -> (TcpStream, Session) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(SHORT)).unwrap();
    let ours = auth::fresh_nonce().unwrap();
    s.write_all(&auth::hello(&ours)).unwrap();
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).unwrap();
    let theirs = auth::parse_hello(&hello).unwrap();
    let session = Session::new(&Key::from_bytes(key), Role::Client, ours, theirs);
    s.write_all(&session.proof()).unwrap();
    let mut proof = [0u8; TAG_LEN];
    let _ = s.read_exact(&mut proof);
    (s, session)
}

fn rejected(awd: &mut Awd, reason: &str) {
    awd.wait(&format!("a rejection for {reason}"), SHORT, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("closing an unauthenticated connection"))
            && v["reason"] == reason
    });
}

/// The value of `awd_auth_rejected_total{reason}` for watchdog `w` (log lines about rejections
/// are rate-limited; the counter is not).
fn rejections(metrics: u16, reason: &str) -> u64 {
    let needle =
        format!("awd_auth_rejected_total{{watchdog=\"w\",channel=\"h1\",reason=\"{reason}\"}} ");
    series(&scrape(metrics), &needle) as u64
}

fn counted(metrics: u16, reason: &str) {
    let deadline = std::time::Instant::now() + SHORT;
    while rejections(metrics, reason) == 0 {
        assert!(std::time::Instant::now() < deadline, "no {reason} counted");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn heartbeats(awd: &Awd) -> u64 {
    awd.status()["w"]["heartbeats"].as_u64().unwrap()
}

#[test]
fn every_rejection_reason_closes_the_connection_and_refreshes_nothing() {
    let dir = scratch("auth-reasons");
    let run = dir.path();
    let psk = key_file(run, "psk", KEY);
    let (port, metrics) = (free_port(), free_port());
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
            "--chardev",
            &format!(
                "socket,id=h1,host=127.0.0.1,port={port},server=on,wait=off,psk={}",
                psk.display()
            ),
            "--object",
            "advanced-watchdog,id=w,awd_node=h1,timeout=60000",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);

    // A plain-text peer: its heartbeats are not a hello.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain
        .write_all(b"WATCHDOG=1\nWATCHDOG=1\nWATCHDOG=1\n")
        .unwrap();
    rejected(&mut awd, "bad_magic");
    counted(metrics, "bad_magic");
    // Another key.
    let _wrong = authenticate(port, b"not the key, but just as long as it");
    counted(metrics, "bad_proof");
    // The right key, then an altered frame.
    let (mut s, mut session) = authenticate(port, KEY);
    let mut f = session.seal(b"WATCHDOG=1\n");
    f[12] ^= 0x20;
    s.write_all(&f).unwrap();
    counted(metrics, "bad_tag");
    // The right key, then the same frame twice (a replay).
    let (mut s, mut session) = authenticate(port, KEY);
    let f = session.seal(b"WATCHDOG=1\n");
    s.write_all(&f).unwrap();
    s.write_all(&f).unwrap();
    counted(metrics, "out_of_order");
    // A frame claiming a megabyte.
    let (mut s, _) = authenticate(port, KEY);
    s.write_all(&(1u32 << 20).to_be_bytes()).unwrap();
    s.write_all(&[0u8; 8]).unwrap();
    counted(metrics, "too_long");
    // Half a frame, then the end.
    let (mut s, mut session) = authenticate(port, KEY);
    let f = session.seal(b"WATCHDOG=1\n");
    s.write_all(&f[..f.len() / 2]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    counted(metrics, "truncated");
    // Silence after connecting: given up after the 5 s handshake timeout.
    let _silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    counted(metrics, "handshake_timeout");

    // One replayed frame was the first of its connection and verified: that one counted.
    // Nothing else did.
    assert_eq!(heartbeats(&awd), 1, "only verified frames are input");
    // An authenticated peer is heard, and answered with sealed frames of its own.
    let (mut s, mut session) = authenticate(port, KEY);
    for _ in 0..3 {
        s.write_all(&session.seal(b"WATCHDOG=1\n")).unwrap();
    }
    let deadline = std::time::Instant::now() + SHORT;
    while heartbeats(&awd) < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "verified frames not heard"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A primary and a secondary awd, both with the key: pulses and replies flow, authenticated.
/// Forgers without the key (plain text, a wrong key) hammer the primary's port; when the real
/// secondary dies the primary still fires, and its admin socket gets the script.
#[test]
fn an_authenticated_pair_fails_over_and_a_forger_keeps_nothing_alive() {
    let dir = scratch("auth-pair");
    let run = dir.path();
    let psk = key_file(run, "psk", KEY);
    script(run, "colo_primary_opt_script", "x_colo_lost_heartbeat\n");
    let (h1, admin_port) = (free_port(), free_port());
    let admin = TcpListener::bind(("127.0.0.1", admin_port)).unwrap();
    let mut primary = Awd::run(
        run,
        "primary",
        &s(&[
            "--chardev",
            &format!(
                "socket,id=h1,host=127.0.0.1,port={h1},server=on,wait=off,psk={}",
                psk.display()
            ),
            "--chardev",
            &format!("socket,id=heartbeat0,host=127.0.0.1,port={admin_port}"),
            "--object",
            "advanced-watchdog,id=heart1,server=on,awd_node=h1,notification_node=heartbeat0,\
             opt_script=colo_primary_opt_script,pulse_interval=300,timeout=2000,follow-vm=off",
        ]),
    );
    primary.wait_msg("awd running", None, SHORT);
    let mut secondary = Awd::run(
        run,
        "secondary",
        &s(&[
            "--chardev",
            &format!(
                "socket,id=h1,host=127.0.0.1,port={h1},reconnect=1,psk={}",
                psk.display()
            ),
            "--object",
            "advanced-watchdog,id=heart1,server=off,awd_node=h1,timeout=2000",
        ]),
    );
    secondary.wait_msg("connected", Some("heart1"), SHORT);
    primary.wait_msg("connected", Some("heart1"), SHORT);
    let (mut admin_conn, _) = admin.accept().unwrap();

    // Forgers, for the rest of the test.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forger = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut s) = TcpStream::connect(("127.0.0.1", h1)) {
                    let _ = s.write_all(b"WATCHDOG=1\nadvanced-watchdog reply pulse\n");
                }
                let (mut s, mut session) = authenticate(h1, b"a forger's guess at the key......");
                let _ = s.write_all(&session.seal(b"WATCHDOG=1\n"));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Both alive for longer than either timeout: pulses and replies keep both quiet.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(expiries(&primary, "heart1"), 0);
    assert_eq!(expiries(&secondary, "heart1"), 0);
    rejected(&mut primary, "bad_magic");
    rejected(&mut primary, "bad_proof");

    // The secondary dies: the forgers do not keep the primary's watchdog alive.
    secondary.signal(SIGKILL);
    secondary.wait_exit(SHORT);
    primary.wait_msg("watchdog expired", Some("heart1"), SHORT);
    admin_conn.set_read_timeout(Some(SHORT)).unwrap();
    let mut line = String::new();
    BufReader::new(&mut admin_conn)
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "x_colo_lost_heartbeat\n");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    forger.join().unwrap();
}

/// The guest agent over `--to tcp: --psk` and `awd::client` over a `SealedStream` keep an
/// authenticated channel's watchdog alive; the agent's silence fires it; an agent with another
/// key is refused and keeps nothing alive.
#[test]
fn the_agent_and_the_client_speak_the_authenticated_framing() {
    let dir = scratch("auth-agent");
    let run = dir.path();
    let psk = key_file(run, "psk", KEY);
    let wrong = key_file(run, "wrong", b"a key that the host does not hold....");
    let port = free_port();
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--chardev",
            &format!(
                "socket,id=h1,host=127.0.0.1,port={port},server=on,wait=off,psk={}",
                psk.display()
            ),
            "--object",
            "advanced-watchdog,id=w,awd_node=h1,timeout=1000,grace=1500",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    let agent = |key: &Path| {
        std::process::Command::new(agent_bin())
            .args([
                "--to",
                &format!("tcp:127.0.0.1:{port}"),
                "--interval",
                "200",
            ])
            .arg("--psk")
            .arg(key)
            .arg("--no-socket")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("awd-agent")
    };
    // Another key: refused, and the watchdog expires at the end of its grace regardless.
    let mut forger = agent(&wrong);
    awd.wait_msg("watchdog expired", Some("w"), SHORT);
    let _ = forger.kill();
    let _ = forger.wait();
    // The right key: the watchdog re-arms and stays up for three timeouts.
    let mut real = agent(&psk);
    awd.wait("the watchdog re-armed", SHORT, |v| {
        v["message"] == "watchdog status changed" && v["to"] == "ok"
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        expiries(&awd, "w"),
        1,
        "the authenticated agent keeps it alive"
    );
    real.kill().unwrap();
    real.wait().unwrap();
    let deadline = std::time::Instant::now() + SHORT;
    while expiries(&awd, "w") < 2 {
        assert!(std::time::Instant::now() < deadline, "silence did not fire");
        std::thread::sleep(Duration::from_millis(50));
    }
    // awd::client over a sealed stream.
    let stream =
        awd::client::SealedStream::connect(("127.0.0.1", port), &Key::from_bytes(KEY), SHORT)
            .expect("authenticated");
    let monitor = awd::client::HealthMonitor::new(stream);
    let before = heartbeats(&awd);
    for _ in 0..5 {
        monitor.heartbeat().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = std::time::Instant::now() + SHORT;
    while heartbeats(&awd) < before + 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the client was not heard"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(awd.status()["w"]["status"], "ok", "{:?}", awd.status());
}

/// On a full `psk=` channel, connections that never complete the handshake are the ones
/// evicted: twenty idle sockets cannot push out the authenticated peer.
#[test]
fn unauthenticated_connections_never_crowd_out_the_real_peer() {
    let dir = scratch("auth-crowd");
    let run = dir.path();
    let psk = key_file(run, "psk", KEY);
    let port = free_port();
    let mut awd = Awd::run(
        run,
        "awd",
        &s(&[
            "--chardev",
            &format!(
                "socket,id=h1,host=127.0.0.1,port={port},server=on,wait=off,max-connections=2,psk={}",
                psk.display()
            ),
            "--object",
            "advanced-watchdog,id=w,awd_node=h1,timeout=1000,grace=10000",
        ]),
    );
    awd.wait_msg("awd running", None, SHORT);
    let (mut real, mut session) = authenticate(port, KEY);
    real.write_all(&session.seal(b"WATCHDOG=1\n")).unwrap();
    awd.wait_msg("connected", Some("w"), SHORT);
    let mut idle = Vec::new();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        if idle.len() < 20 {
            idle.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
        }
        real.write_all(&session.seal(b"WATCHDOG=1\n")).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(expiries(&awd, "w"), 0, "the real peer was crowded out");
    let evicted = awd.records(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("channel full"))
    });
    assert!(!evicted.is_empty(), "the idle sockets were evicted");
    assert!(
        evicted.iter().all(|v| v["reason"] == "never_spoke"),
        "{evicted:?}"
    );
}
