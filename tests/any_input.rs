//! "Any input refreshes its timer" (the seed's words), end to end against the real awd binary:
//! peers whose input never forms a complete line keep a 1 s watchdog alive for as long as they
//! write, and the watchdog fires within its timeout plus a stated bound once they fall silent
//! (the connection stays open: silence, not a disconnect).

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long each peer writes.
const WRITING: Duration = Duration::from_secs(5);
/// The watchdogs' timeout.
const TIMEOUT: Duration = Duration::from_secs(1);
/// How late after `TIMEOUT` a fire may come (detection is a few ms; the rest is log
/// transport and a loaded 2-core machine).
const LATE_BOUND: Duration = Duration::from_millis(1000);

/// A peer: connects, calls `write(i)` every `period` until `WRITING` is over, then holds the
/// connection open without a byte more, and reports when it last wrote.
fn peer(
    path: &Path,
    period: Duration,
    mut write: impl FnMut(&mut UnixStream, usize) + Send + 'static,
) -> mpsc::Receiver<(Instant, UnixStream)> {
    let mut c = UnixStream::connect(path).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let start = Instant::now();
        let mut last = start;
        let mut i = 0;
        while start.elapsed() < WRITING {
            write(&mut c, i);
            last = Instant::now();
            i += 1;
            // The peer's own write period: this is its behaviour, not a wait in the test.
            thread::sleep(period);
        }
        let _ = tx.send((last, c));
    });
    rx
}

#[test]
fn input_without_newlines_refreshes_and_silence_after_it_fires() {
    let d = scratch("anyinput");
    let dir = d.path();
    let mut args = Vec::new();
    for id in ["trickle", "binary", "longline"] {
        args.push("--chardev".to_owned());
        args.push(format!(
            "socket,id={id},path={}/{id}.sock,server=on",
            dir.display()
        ));
        args.push("--object".to_owned());
        args.push(format!(
            "advanced-watchdog,id={id},awd_node={id},timeout={}",
            TIMEOUT.as_millis()
        ));
    }
    let mut awd = Awd::run(dir, "awd", &args);
    awd.wait_msg("awd running", None, SHORT);

    // One byte every 200 ms, never a newline.
    let trickle = peer(
        &dir.join("trickle.sock"),
        Duration::from_millis(200),
        |c, _| c.write_all(b"x").unwrap(),
    );
    // Binary chunks with no newline (and no zero byte, so no frame header either).
    let binary = peer(
        &dir.join("binary.sock"),
        Duration::from_millis(200),
        |c, i| {
            let chunk: Vec<u8> = (0..3000u32)
                .map(|j| ((j.wrapping_mul(2654435761).wrapping_add(i as u32) >> 11) as u8) | 0x80)
                .collect();
            c.write_all(&chunk).unwrap();
        },
    );
    // A 10 MB line over five seconds: 200 KB every 100 ms, the newline never comes.
    let longline = peer(
        &dir.join("longline.sock"),
        Duration::from_millis(100),
        |c, _| c.write_all(&vec![b'a'; 200 * 1024]).unwrap(),
    );

    for (id, rx) in [
        ("trickle", trickle),
        ("binary", binary),
        ("longline", longline),
    ] {
        let (last, _conn) = rx.recv_timeout(SHORT).expect("the peer wrote");
        awd.wait_msg("watchdog expired", Some(id), SHORT);
        let after = last.elapsed();
        // The first fire came a full timeout after the last input, not while input flowed …
        assert!(
            after + Duration::from_millis(50) >= TIMEOUT,
            "{id}: fired {after:?} after the last input, before its {TIMEOUT:?} timeout"
        );
        // … and within the timeout plus the bound.
        assert!(
            after <= TIMEOUT + LATE_BOUND,
            "{id}: fired {after:?} after the last input, more than {TIMEOUT:?} + {LATE_BOUND:?}"
        );
        eprintln!("{id}: fired {after:?} after its last input");
    }
    // The peers' inputs were counted as input, the over-long line rejected once.
    let st = awd.status();
    for id in ["trickle", "binary", "longline"] {
        assert!(
            st[id]["heartbeats"].as_u64().unwrap() >= 20,
            "{id}: {}",
            st[id]
        );
        assert_eq!(
            st[id]["expiries"], 1,
            "{id}: exactly one fire, after the input stopped"
        );
    }
}
