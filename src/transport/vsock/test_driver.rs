//! A fake guest driver for unit tests: real guest memory, real split virtqueues laid out by
//! virtio-queue's `MockSplitQueue`, and a [`VsockBackend`] driven through `handle_event`, the
//! way the vring worker drives it.
//!
//! `MockSplitQueue` lays out the descriptor table and writes descriptors. Its avail and used
//! rings are not used: in virtio-queue 0.18 the mock computes the avail ring's end as
//! `start + len` bytes instead of `start + 2 * len`, so for queues over 128 entries the used
//! ring overlaps the avail ring; and `add_desc_chains` does not wrap. The rings are placed
//! here as the spec lays them out, and chains are written by hand, so long tests can go around
//! the rings many times.

use std::sync::Arc;

use tokio::sync::mpsc;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::{DescriptorTable, MockSplitQueue};
use vm_memory::{Address as _, Bytes as _, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::VsockPort;
use super::device::{NUM_QUEUES, RX_QUEUE, TX_QUEUE, VsockBackend};
use super::limits::BUF_ALLOC;
use super::packet::{HEADER_SIZE, HOST_CID, Header, OP_REQUEST, OP_RW, TYPE_STREAM};
use super::stats::VsockCounters;
use crate::metrics::{Metrics, WatchdogMetrics};
use crate::transport::ChannelContext;
use crate::transport::ChannelEvent;

/// Queue size used by the tests.
pub const QSIZE: u16 = 256;
/// The guest's CID in the tests.
pub const GUEST_CID: u64 = 3;
/// Guest memory size.
const MEM_SIZE: u64 = 64 << 20;
/// Per-slot buffer stride of each queue.
const RX_STRIDE: u64 = 0x2000;
const TX_STRIDE: u64 = 0x1_1000;
/// Size of the rx buffers posted by [`Driver::post_rx`].
pub const RX_BUF: u32 = 4096;

/// One descriptor as a test writes it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Guest address of its buffer.
    pub addr: u64,
    /// Length of its buffer in bytes.
    pub len: u32,
    /// The device may write the buffer (an rx buffer) rather than only read it.
    pub write: bool,
}

impl Desc {
    /// A buffer the device only reads (tx).
    pub fn read(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: false,
        }
    }

    /// A buffer the device may write (rx, or a wrong-direction tx descriptor).
    pub fn write(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            write: true,
        }
    }
}

/// How a tx packet is laid out in descriptors, for [`Driver::push_layout`].
#[derive(Debug, Clone)]
pub enum Layout {
    /// Header and payload in one descriptor of `HEADER_SIZE + payload + extra - short`.
    One {
        /// Slack after the payload.
        extra: u32,
        /// Bytes cut off the end.
        short: u32,
    },
    /// Header descriptor, data descriptor, each with an arbitrary length and direction.
    Two {
        /// The header descriptor's length.
        head_len: u32,
        /// The data descriptor's length.
        data_len: u32,
        /// The header descriptor is device-writable.
        head_write: bool,
        /// The data descriptor is device-writable.
        data_write: bool,
    },
    /// Header descriptor followed by the payload split over three descriptors.
    Split,
    /// Descriptors with arbitrary flags and links (loops, indirect, dangling), each
    /// `(len, flag bits, next)`: bit 0 NEXT, bit 1 WRITE, bit 2 INDIRECT; `next` relative to
    /// the head, as [`DriverRing::push_raw`] takes it.
    Raw(Vec<(u32, u16, u16)>),
    /// A header descriptor outside guest memory.
    Outside {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
}

/// The driver side of one split queue.
#[derive(Debug)]
pub struct DriverRing {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    avail_idx: u16,
    used_seen: u16,
    next_slot: u16,
    buffers: u64,
    stride: u64,
}

impl DriverRing {
    fn new(mem: &GuestMemoryMmap, base: u64, buffers: u64, stride: u64) -> Self {
        let m = MockSplitQueue::create(mem, GuestAddress(base), QSIZE);
        let desc = m.desc_table_addr();
        // The split-ring layout: avail (flags, idx, ring[n], used_event) right after the table,
        // used (flags, idx, ring[n] of 8 bytes, avail_event) 4-aligned after that.
        let avail = desc.unchecked_add(16 * u64::from(QSIZE));
        let used_start = avail.0 + 6 + 2 * u64::from(QSIZE);
        let used = GuestAddress(used_start.div_ceil(4) * 4);
        mem.write_slice(&vec![0u8; 6 + 2 * usize::from(QSIZE)], avail)
            .expect("avail ring");
        mem.write_slice(&vec![0u8; 6 + 8 * usize::from(QSIZE)], used)
            .expect("used ring");
        DriverRing {
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
            next_slot: 0,
            buffers,
            stride,
        }
    }

    /// The buffer address that belongs to descriptor slot `slot`.
    pub fn buffer(&self, slot: u16) -> u64 {
        self.buffers + u64::from(slot) * self.stride
    }

    /// The buffer of the slot the next chain head will use.
    pub fn next_buffer(&self) -> u64 {
        self.buffer(self.next_slot)
    }

    /// Writes a chain (linked with NEXT) and makes it available; returns its head index.
    pub fn push(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let head = self.next_slot;
        for (i, d) in descs.iter().enumerate() {
            let slot = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { (slot + 1) % QSIZE };
            let raw = RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next));
            DescriptorTable::new(mem, self.desc, QSIZE)
                .store(slot, raw)
                .expect("descriptor table is in memory");
        }
        self.next_slot = (head + descs.len() as u16) % QSIZE;
        self.publish(mem, head);
        head
    }

    /// Writes descriptors verbatim (flags and `next` as given, `next` relative to the head) at
    /// consecutive slots and makes the first available: for loops, indirect flags and other
    /// nonsense a hostile driver might produce.
    pub fn push_raw(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.next_slot;
        let table = DescriptorTable::new(mem, self.desc, QSIZE);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let slot = (head + i as u16) % QSIZE;
            let next = (head + next) % QSIZE;
            let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            table
                .store(slot, raw)
                .expect("descriptor table is in memory");
        }
        self.next_slot = (head + descs.len().max(1) as u16) % QSIZE;
        self.publish(mem, head);
        head
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let entry = self
            .avail
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % QSIZE));
        mem.write_obj(head.to_le(), entry).expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), self.avail.unchecked_add(2))
            .expect("avail idx");
    }

    /// Used entries (head index, length) added since the last call.
    pub fn used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(self.used.unchecked_add(2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self
                .used
                .unchecked_add(4 + 8 * u64::from(self.used_seen % QSIZE));
            let id: u32 = mem.read_obj(e).expect("used elem");
            let len: u32 = mem.read_obj(e.unchecked_add(4)).expect("used elem");
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Chains made available and not yet used.
    pub fn outstanding(&self, mem: &GuestMemoryMmap) -> u16 {
        let idx: u16 = mem.read_obj(self.used.unchecked_add(2)).expect("used idx");
        self.avail_idx.wrapping_sub(idx)
    }

    /// The address descriptor `id` points at.
    pub fn desc_addr(&self, mem: &GuestMemoryMmap, id: u32) -> u64 {
        mem.read_obj(self.desc.unchecked_add(u64::from(id) * 16))
            .expect("descriptor")
    }
}

/// A port's receiving end, as the watchdog task would hold it.
#[derive(Debug)]
pub struct Watch {
    /// The vsock port whose events it receives.
    pub port: u32,
    /// Events from the device.
    pub rx: mpsc::Receiver<ChannelEvent>,
    /// The watchdog's metrics (its open connection gauge).
    pub metrics: Arc<WatchdogMetrics>,
}

/// Guest memory, three vrings, the backend, and one [`Watch`] per port.
pub struct Driver {
    /// Guest memory (regions shared with the vrings and the backend).
    pub mem: GuestMemoryMmap,
    /// The device side of the queues, as the vring worker would pass them.
    pub vrings: Vec<VringRwLock>,
    /// rx (0), tx (1), event (2).
    pub rings: Vec<DriverRing>,
    /// The device under test.
    pub backend: VsockBackend,
    /// The device's counters.
    pub counters: Arc<VsockCounters>,
    /// The writers' wake-up eventfd.
    pub wake: Arc<EventFd>,
    /// One per configured port.
    pub watches: Vec<Watch>,
}

impl Driver {
    /// A device on ports 9009 and 9010 whose watchdog channels hold `cap` events each.
    pub fn new(cap: usize) -> Self {
        Self::with_ports(&[9009, 9010], cap)
    }

    /// A device serving `ports`.
    pub fn with_ports(ports: &[u32], cap: usize) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let rings = vec![
            DriverRing::new(&mem, 0x0, 0x40_0000, RX_STRIDE),
            DriverRing::new(&mem, 0x1_0000, 0x100_0000, TX_STRIDE),
            DriverRing::new(&mem, 0x2_0000, 0x80_0000, RX_STRIDE),
        ];
        let vrings: Vec<VringRwLock> = rings
            .iter()
            .map(|r| {
                let v = VringRwLock::new(atomic.clone(), QSIZE).expect("vring");
                v.set_queue_info(r.desc.0, r.avail.0, r.used.0)
                    .expect("queue addresses");
                v.set_queue_size(QSIZE);
                v.set_queue_ready(true);
                v.set_enabled(true);
                v
            })
            .collect();
        assert_eq!(vrings.len(), NUM_QUEUES);
        let metrics = Metrics::new();
        let mut watches = Vec::new();
        let mut cfg = Vec::new();
        for &port in ports {
            let (tx, rx) = mpsc::channel(cap);
            let m = metrics.watchdog(&format!("w{port}"), &format!("c{port}"));
            cfg.push(VsockPort {
                port,
                ctx: ChannelContext {
                    watchdog: format!("w{port}").into(),
                    channel: format!("c{port}").into(),
                    events: tx,
                    metrics: m.clone(),
                    nodelay: false,
                    rate_limit: None,
                },
            });
            watches.push(Watch {
                port,
                rx,
                metrics: m,
            });
        }
        let counters = Arc::new(VsockCounters::default());
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let mut backend = VsockBackend::new(
            "test".into(),
            GUEST_CID,
            cfg,
            counters.clone(),
            wake.clone(),
        )
        .expect("backend");
        backend.update_memory(atomic).expect("memory");
        Driver {
            mem,
            vrings,
            rings,
            backend,
            counters,
            wake,
            watches,
        }
    }

    /// What the frontend does when the VM stops the device (GET_VRING_BASE on every queue):
    /// the rings stop and the backend hears `stop_vring`.
    pub fn stop_rings(&mut self) {
        for (i, v) in self.vrings.iter().enumerate() {
            v.set_queue_ready(false);
            self.backend
                .stop_vring(i as u32)
                .expect("stop_vring never fails");
        }
    }

    /// Starts the stopped rings again. `fresh`: as a guest driver that initialised the device
    /// anew (a reboot), with empty rings from index 0; otherwise where they stopped (a VM
    /// resumed after a pause).
    pub fn start_rings(&mut self, fresh: bool) {
        for (i, v) in self.vrings.iter().enumerate() {
            if fresh {
                let (base, buffers, stride) = match i {
                    0 => (0x0, 0x40_0000, RX_STRIDE),
                    1 => (0x1_0000, 0x100_0000, TX_STRIDE),
                    _ => (0x2_0000, 0x80_0000, RX_STRIDE),
                };
                self.rings[i] = DriverRing::new(&self.mem, base, buffers, stride);
                v.set_queue_next_avail(0);
                v.set_queue_next_used(0);
            }
            v.set_queue_ready(true);
        }
    }

    /// Runs the device for one epoll event.
    pub fn event(&mut self, token: u16) {
        self.backend
            .handle_event(token, EventSet::IN, &self.vrings, 0)
            .expect("handle_event never fails");
    }

    /// Puts a tx chain made of `descs` on the tx queue (without running the device).
    pub fn push_tx(&mut self, descs: &[Desc]) -> u16 {
        let ring = &mut self.rings[usize::from(TX_QUEUE)];
        ring.push(&self.mem, descs)
    }

    /// Sends a tx chain, runs the device, and checks it came back used with length 0.
    pub fn send_chain(&mut self, descs: &[Desc]) {
        let head = self.push_tx(descs);
        self.event(TX_QUEUE);
        let used = self.rings[usize::from(TX_QUEUE)].used(&self.mem);
        assert_eq!(used, vec![(u32::from(head), 0)], "the chain was returned");
    }

    /// Writes `h` into the buffer of the next tx chain head; data may go at +0x100.
    pub fn header_at(&mut self, h: &Header) -> u64 {
        let addr = self.rings[usize::from(TX_QUEUE)].next_buffer();
        self.mem
            .write_slice(&h.encode(), GuestAddress(addr))
            .expect("header");
        addr
    }

    /// Writes the packet into the next tx slot's buffer and queues descriptors per `layout`
    /// (without running the device).
    pub fn push_layout(&mut self, h: &Header, payload: &[u8], layout: &Layout) {
        let base = self.rings[usize::from(TX_QUEUE)].next_buffer();
        self.mem
            .write_slice(&h.encode(), GuestAddress(base))
            .expect("header");
        let data = base + 0x100;
        self.mem
            .write_slice(payload, GuestAddress(data))
            .expect("payload");
        let ro = |addr, len| Desc {
            addr,
            len,
            write: false,
        };
        let n = payload.len() as u32;
        let ring = &mut self.rings[usize::from(TX_QUEUE)];
        match layout {
            Layout::One { extra, short } => {
                self.mem
                    .write_slice(payload, GuestAddress(base + HEADER_SIZE as u64))
                    .expect("payload");
                let len = (HEADER_SIZE as u32 + n + extra).saturating_sub(*short);
                ring.push(&self.mem, &[ro(base, len)]);
            }
            Layout::Two {
                head_len,
                data_len,
                head_write,
                data_write,
            } => {
                let descs = [
                    Desc {
                        addr: base,
                        len: *head_len,
                        write: *head_write,
                    },
                    Desc {
                        addr: data,
                        len: *data_len,
                        write: *data_write,
                    },
                ];
                ring.push(&self.mem, &descs);
            }
            Layout::Split => {
                let third = n / 3;
                ring.push(
                    &self.mem,
                    &[
                        ro(base, HEADER_SIZE as u32),
                        ro(data, third),
                        ro(data + u64::from(third), third),
                        ro(data + u64::from(2 * third), n - 2 * third),
                    ],
                );
            }
            Layout::Raw(descs) => {
                let raw: Vec<_> = descs
                    .iter()
                    .map(|&(len, flag_bits, next)| {
                        let mut flags = 0u16;
                        if flag_bits & 1 != 0 {
                            flags |= VRING_DESC_F_NEXT as u16;
                        }
                        if flag_bits & 2 != 0 {
                            flags |= VRING_DESC_F_WRITE as u16;
                        }
                        if flag_bits & 4 != 0 {
                            flags |= VRING_DESC_F_INDIRECT as u16;
                        }
                        (base, len, flags, next)
                    })
                    .collect();
                ring.push_raw(&self.mem, &raw);
            }
            Layout::Outside { addr, len } => {
                ring.push(&self.mem, &[Desc::read(*addr, *len)]);
            }
        }
    }

    /// Writes `hdr` and `payload` into the next tx slot's buffer and queues them as a header
    /// descriptor plus (if there is payload) a data descriptor.
    pub fn queue_packet(&mut self, hdr: &Header, payload: &[u8]) {
        let ring = &mut self.rings[usize::from(TX_QUEUE)];
        let base = ring.buffer(ring.next_slot);
        self.mem
            .write_slice(&hdr.encode(), GuestAddress(base))
            .expect("header buffer");
        let mut descs = vec![Desc::read(base, HEADER_SIZE as u32)];
        if !payload.is_empty() {
            let data = base + 0x100;
            self.mem
                .write_slice(payload, GuestAddress(data))
                .expect("data buffer");
            descs.push(Desc::read(data, payload.len() as u32));
        }
        ring.push(&self.mem, &descs);
    }

    /// Queues `hdr` and `payload` as one byte stream cut at `cuts` (sorted offsets into the
    /// 44-byte header plus payload; repeats give zero-length descriptors), one descriptor per
    /// piece, each piece in the buffer of its own descriptor slot; runs the device and returns
    /// the tx used entries.
    pub fn send_split(&mut self, hdr: &Header, payload: &[u8], cuts: &[usize]) -> Vec<(u32, u32)> {
        let mut bytes = hdr.encode().to_vec();
        bytes.extend_from_slice(payload);
        let ring = &mut self.rings[usize::from(TX_QUEUE)];
        let base = ring.next_buffer();
        let mut descs = Vec::new();
        let mut start = 0;
        for (i, &end) in cuts.iter().chain(std::iter::once(&bytes.len())).enumerate() {
            let end = end.clamp(start, bytes.len());
            // Pieces of one chain never share a buffer, and go backwards through memory, so
            // no two are adjacent.
            let addr = base + (cuts.len() - i) as u64 * TX_STRIDE;
            self.mem
                .write_slice(&bytes[start..end], GuestAddress(addr))
                .expect("fragment buffer");
            descs.push(Desc::read(addr, (end - start) as u32));
            start = end;
        }
        ring.push(&self.mem, &descs);
        self.event(TX_QUEUE);
        self.rings[usize::from(TX_QUEUE)].used(&self.mem)
    }

    /// Sends one packet and runs the device; returns the tx used entries it produced.
    pub fn send(&mut self, hdr: &Header, payload: &[u8]) -> Vec<(u32, u32)> {
        self.queue_packet(hdr, payload);
        self.event(TX_QUEUE);
        self.rings[usize::from(TX_QUEUE)].used(&self.mem)
    }

    /// Posts `n` rx buffers of [`RX_BUF`] bytes, each one device-writable descriptor.
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let ring = &mut self.rings[usize::from(RX_QUEUE)];
            let addr = ring.buffer(ring.next_slot);
            ring.push(&self.mem, &[Desc::write(addr, RX_BUF)]);
        }
    }

    /// Posts rx buffers and tells the device (an rx queue kick).
    pub fn kick_rx(&mut self, n: usize) {
        self.post_rx(n);
        self.event(RX_QUEUE);
    }

    /// Packets the device put on the rx queue since the last call.
    pub fn take_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        let ring = &mut self.rings[usize::from(RX_QUEUE)];
        let mut out = Vec::new();
        for (id, len) in ring.used(&self.mem) {
            if (len as usize) < HEADER_SIZE {
                continue;
            }
            let addr = ring.desc_addr(&self.mem, id);
            let mut h = [0u8; HEADER_SIZE];
            self.mem
                .read_slice(&mut h, GuestAddress(addr))
                .expect("rx header");
            let hdr = Header::decode(&h);
            let mut data = vec![0u8; len as usize - HEADER_SIZE];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HEADER_SIZE as u64))
                .expect("rx data");
            assert_eq!(hdr.len as usize, data.len(), "used len = header + len");
            out.push((hdr, data));
        }
        out
    }

    /// Events waiting for port `port`'s watchdog.
    pub fn events(&mut self, port: u32) -> Vec<ChannelEvent> {
        let w = self
            .watches
            .iter_mut()
            .find(|w| w.port == port)
            .expect("a configured port");
        let mut out = Vec::new();
        while let Ok(ev) = w.rx.try_recv() {
            out.push(ev);
        }
        out
    }
}

/// A guest → host header from guest port `src_port` to host port `dst_port`.
pub fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: 0,
    }
}

/// An OP_REQUEST.
pub fn request(src_port: u32, dst_port: u32) -> Header {
    hdr(OP_REQUEST, src_port, dst_port)
}

/// An OP_RW header for `payload`.
pub fn rw(src_port: u32, dst_port: u32, payload: &[u8]) -> Header {
    Header {
        len: payload.len() as u32,
        ..hdr(OP_RW, src_port, dst_port)
    }
}
