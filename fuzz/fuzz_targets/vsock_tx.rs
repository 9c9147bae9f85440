//! The vsock device's tx path, as a hostile guest drives it: descriptor chains built in real
//! guest memory (`GuestMemoryMmap`) on real split virtqueues, handed to the real
//! `VsockBackend` through `handle_event`, by the unit tests' driver.
//!
//! Input (every field little-endian, missing bytes read as zero): one byte, each watchdog
//! channel's capacity (1 to 16); then up to 64 steps, each a tag byte, by `tag % 8`:
//!
//! | tag | step | then |
//! |---|---|---|
//! | 0–2 | a tx packet | its 44-byte header as the guest writes it; a shape byte and its fields (below); a `u16` payload length and the payload |
//! | 3 | rx buffers posted and kicked | a count byte (`% 32`) |
//! | 4 | every watchdog writes a pulse to each of its connections | |
//! | 5 | the backlog retry timer fires | |
//! | 6 | the watchdogs take their events | |
//! | 7 | the VM stops the rings, or starts them again | a byte: `% 3` 0 stop, 1 start afresh (a reboot), 2 resume |
//!
//! Shapes, by `shape % 6`: 0 one descriptor of `44 + payload + extra − short` (two bytes); 1
//! header and data descriptors with any lengths and directions (`u16`, `u16`, a byte: bit 0
//! header writable, bit 1 data writable); 2 the payload split over three descriptors; 3 raw
//! descriptors, a count byte (`% 8 + 1`) and for each a `u16` length, a flag byte (bit 0 NEXT,
//! 1 WRITE, 2 INDIRECT) and a `next` byte relative to the head (`% 8`): loops, indirect
//! tables, dangling links; 4 one descriptor anywhere (`u64` address, `u32` length); 5 header
//! and payload as one stream cut at up to 8 `u16` offsets, one descriptor per piece.
//!
//! Checks: every tx chain comes back used with length 0 while the rings run; every rx packet
//! goes from the host to the guest with its length; each connection's events arrive as
//! Connected, input, Disconnected; the connection limit holds; when the frontend goes, every
//! connection closes.
#![no_main]

use std::collections::HashMap;

use awd::fuzzing::vsock::{Driver, GUEST_CID, Layout, QSIZE};
use awd::transport::vsock::device::{RETRY_EVENT, RX_QUEUE, TX_QUEUE, WAKE_EVENT};
use awd::transport::vsock::limits::MAX_CONNECTIONS;
use awd::transport::vsock::packet::{HEADER_SIZE, HOST_CID, Header, OP_RST, TYPE_STREAM};
use awd::transport::{ChannelEvent, CloseReason, ConnId, ConnWriter};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

const PORTS: [u32; 2] = [9009, 9010];

/// Reads the input's fields; past the end, everything is zero.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// How a packet's descriptors are laid out.
enum Shape {
    Layout(Layout),
    /// Offsets into header + payload where a new descriptor starts.
    Cuts(Vec<usize>),
}

fn shape(r: &mut Reader<'_>) -> Shape {
    Shape::Layout(match r.u8() % 6 {
        0 => Layout::One {
            extra: u32::from(r.u8()),
            short: u32::from(r.u8()),
        },
        1 => {
            let (head_len, data_len) = (u32::from(r.u16()), u32::from(r.u16()));
            let dirs = r.u8();
            Layout::Two {
                head_len,
                data_len,
                head_write: dirs & 1 != 0,
                data_write: dirs & 2 != 0,
            }
        }
        2 => Layout::Split,
        3 => {
            let n = usize::from(r.u8() % 8) + 1;
            Layout::Raw(
                (0..n)
                    .map(|_| {
                        let len = u32::from(r.u16());
                        let flags = u16::from(r.u8() & 7);
                        let next = u16::from(r.u8() % 8);
                        (len, flags, next)
                    })
                    .collect(),
            )
        }
        4 => Layout::Outside {
            addr: r.u64(),
            len: r.u32(),
        },
        _ => {
            let n = usize::from(r.u8() % 9);
            return Shape::Cuts((0..n).map(|_| usize::from(r.u16())).collect());
        }
    })
}

/// Where each connection is in its life, as its watchdog heard it.
#[derive(Debug, PartialEq)]
enum Life {
    Open,
    Closed,
}

struct World {
    d: Driver,
    running: bool,
    lives: HashMap<ConnId, (u32, Life)>,
    writers: Vec<Box<dyn ConnWriter>>,
}

impl World {
    fn packet(&mut self, r: &mut Reader<'_>) {
        let h = Header::decode(&r.array::<HEADER_SIZE>());
        let shape = shape(r);
        let n = usize::from(r.u16());
        let payload = r.bytes(n);
        let used = match shape {
            Shape::Cuts(cuts) => {
                let total = HEADER_SIZE + payload.len();
                let mut cuts: Vec<usize> = cuts.iter().map(|&c| c % (total + 1)).collect();
                cuts.sort_unstable();
                self.d.send_split(&h, payload, &cuts)
            }
            Shape::Layout(layout) => {
                self.d.push_layout(&h, payload, &layout);
                self.d.event(TX_QUEUE);
                self.d.rings[usize::from(TX_QUEUE)].used(&self.d.mem)
            }
        };
        assert_eq!(used.len(), 1, "the chain came back, once: {used:?}");
        assert_eq!(used[0].1, 0, "tx chains come back with length 0");
        assert_eq!(
            self.d.rings[usize::from(TX_QUEUE)].outstanding(&self.d.mem),
            0,
            "no tx chain is left behind"
        );
    }

    fn rx(&mut self, n: u8) {
        let ring = &self.d.rings[usize::from(RX_QUEUE)];
        let room = QSIZE - 1 - ring.outstanding(&self.d.mem).min(QSIZE - 1);
        self.d.kick_rx(usize::from(n % 32).min(usize::from(room)));
    }

    /// Checks what the device put on the rx queue (`take_rx` checks each used length).
    fn take_rx(&mut self) {
        for (h, _data) in self.d.take_rx() {
            assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID), "{h:?}");
            // A reset echoes the type of the packet it answers, as Linux's does.
            assert!(h.type_ == TYPE_STREAM || h.op == OP_RST, "{h:?}");
        }
    }

    fn drain(&mut self) {
        for port in PORTS {
            for ev in self.d.events(port) {
                match ev {
                    ChannelEvent::Connected { conn, tx, .. } => {
                        let old = self.lives.insert(conn, (port, Life::Open));
                        assert!(old.is_none(), "connection {conn} connected twice");
                        self.writers.push(tx);
                    }
                    ChannelEvent::Heartbeats { conn, .. } | ChannelEvent::Signal { conn, .. } => {
                        assert_eq!(
                            self.lives.get(&conn),
                            Some(&(port, Life::Open)),
                            "input on connection {conn} outside its life"
                        );
                    }
                    ChannelEvent::Disconnected { conn, .. } => {
                        let life = self.lives.get_mut(&conn);
                        assert_eq!(
                            life.as_deref(),
                            Some(&(port, Life::Open)),
                            "connection {conn} closed outside its life"
                        );
                        if let Some(l) = life {
                            l.1 = Life::Closed;
                        }
                    }
                    ChannelEvent::StartedOver { .. } => {}
                }
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let mut r = Reader(input);
    let mut w = World {
        d: Driver::with_ports(&PORTS, usize::from(r.u8() % 16) + 1),
        running: true,
        lives: HashMap::new(),
        writers: Vec::new(),
    };
    for _ in 0..64 {
        if r.is_empty() {
            break;
        }
        match r.u8() % 8 {
            0..=2 if w.running => w.packet(&mut r),
            0..=2 => {
                // Stopped rings take nothing: the packet is read and not sent.
                let _ = Header::decode(&r.array::<HEADER_SIZE>());
                let _ = shape(&mut r);
                let n = usize::from(r.u16());
                let _ = r.bytes(n);
            }
            3 => {
                let n = r.u8();
                w.rx(n);
            }
            4 => {
                for tx in &w.writers {
                    let _ = tx.try_write(Bytes::from_static(b"\0\0\0\x17advanced-watchdog pulse"));
                }
                w.d.event(WAKE_EVENT);
            }
            5 => w.d.event(RETRY_EVENT),
            6 => w.drain(),
            _ => match (r.u8() % 3, w.running) {
                (0, true) => {
                    w.d.stop_rings();
                    w.running = false;
                }
                (k @ (1 | 2), false) => {
                    w.d.start_rings(k == 1);
                    w.running = true;
                }
                _ => {}
            },
        }
        w.take_rx();
        assert!(w.d.backend.connection_count() <= MAX_CONNECTIONS);
    }
    if w.running {
        w.rx(8);
        w.take_rx();
    }
    w.d.backend.frontend_gone(CloseReason::Shutdown);
    assert_eq!(w.d.backend.connection_count(), 0);
    assert_eq!(w.d.counters.snapshot().connections_open, 0);
    for _ in 0..4096 {
        w.drain();
        if !w.d.backend.has_backlog() {
            break;
        }
        w.d.backend.flush_events();
    }
    w.drain();
    assert!(
        !w.d.backend.has_backlog(),
        "events still wait after the frontend left"
    );
    for (conn, (_, life)) in &w.lives {
        assert_eq!(*life, Life::Closed, "connection {conn} never heard closed");
    }
});
