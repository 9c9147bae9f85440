//! Reading one tx packet (guest → awd) out of a descriptor chain, wherever the guest put its
//! bytes.
//!
//! The virtio spec lets a driver lay a packet out over any number of device-readable
//! descriptors, and Linux does: the 44-byte header and the payload in one descriptor (6.2 and
//! later), a header descriptor and one data descriptor (older kernels), or a header followed by
//! one descriptor per page fragment (nonlinear skbs: large writes in 6.12 stable and later, and
//! `MSG_ZEROCOPY`). `virtio-vsock`'s `VsockPacket` reads only the first data descriptor, so a
//! split payload looked too short, was dropped, and its bytes were never credited back: after
//! one credit window the guest could send nothing more. [`read_tx_chain`] reads the chain as
//! one byte stream, header first, then exactly the header's `len` payload bytes.
//!
//! The guest is hostile: every byte is copied once into awd's own buffers before anything
//! looks at it (a header field is never read twice from guest memory), `len` is checked against
//! the largest packet before any payload is read, a chain that carries fewer bytes than `len`
//! is refused, and so are device-writable descriptors, descriptors outside guest memory and
//! chains that loop back on themselves.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::limits::TRACKED_SLOTS;
use super::packet::{HEADER_SIZE, Header};
use super::stats::Malformed;

/// Why a tx chain is not a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The chain yielded no descriptor at all (a bad head or indirect table).
    #[error("the chain has no usable descriptor")]
    ChainEmpty,
    /// A descriptor the device may only write: tx buffers are device-readable.
    #[error("descriptor {index} of the chain is device-writable")]
    DescriptorWriteOnly {
        /// Its position in the chain, from 0.
        index: usize,
    },
    /// A descriptor points back into the chain.
    #[error("descriptor {index} of the chain links back to descriptor slot {next}")]
    ChainLoop {
        /// Its position in the chain, from 0.
        index: usize,
        /// The slot it links to.
        next: u16,
    },
    /// A descriptor's buffer is not (all) in guest memory.
    #[error("descriptor {index} of the chain ({len} bytes at {addr:#x}) is outside guest memory")]
    DescriptorOutside {
        /// Its position in the chain, from 0.
        index: usize,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The whole chain is shorter than the header.
    #[error("the chain carries {got} bytes, fewer than the {HEADER_SIZE}-byte header")]
    HeaderShort {
        /// Bytes the chain carries.
        got: usize,
    },
    /// The header's `len` is over the largest payload accepted.
    #[error("the header's len {len} is over the {max}-byte limit")]
    LenTooLarge {
        /// The header's `len`.
        len: u32,
        /// The limit.
        max: usize,
    },
    /// The chain ends before the header's `len` payload bytes.
    #[error("the header's len is {len}, but the chain carries {got} payload bytes")]
    PayloadShort {
        /// The header's `len`.
        len: u32,
        /// Payload bytes the chain carries.
        got: usize,
    },
}

impl TxError {
    /// The counter this error is counted under.
    pub fn reason(&self) -> Malformed {
        match self {
            TxError::ChainEmpty | TxError::ChainLoop { .. } | TxError::DescriptorOutside { .. } => {
                Malformed::BadDescriptor
            }
            TxError::DescriptorWriteOnly { .. } => Malformed::WrongDirection,
            TxError::HeaderShort { .. } => Malformed::ShortHeader,
            TxError::LenTooLarge { .. } | TxError::PayloadShort { .. } => Malformed::BadLen,
        }
    }
}

/// A packet read out of a tx chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxPacket {
    /// The header, as copied.
    pub header: Header,
    /// Payload bytes copied into the caller's buffer: exactly the header's `len`.
    pub len: usize,
    /// Descriptors the packet was read from (the chain's rest, if any, is not looked at).
    pub descriptors: usize,
}

/// Reads the header and then exactly `header.len` payload bytes from `descs` (the chain whose
/// head descriptor sits in slot `head`) into `payload`, whose length is the largest payload
/// accepted. Stops at the first descriptor that completes the packet.
pub fn read_tx_chain<M: GuestMemory>(
    mem: &M,
    head: u16,
    descs: impl IntoIterator<Item = Descriptor>,
    payload: &mut [u8],
) -> Result<TxPacket, TxError> {
    let mut raw = [0u8; HEADER_SIZE];
    let mut have = 0usize; // header bytes copied so far
    let mut header: Option<Header> = None;
    let mut got = 0usize; // payload bytes copied so far
    let mut seen = [0u64; TRACKED_SLOTS / 64];
    let mut mark = |slot: u16| {
        let i = usize::from(slot);
        if i >= TRACKED_SLOTS {
            return true;
        }
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        let fresh = seen[word] & bit == 0;
        seen[word] |= bit;
        fresh
    };
    mark(head);
    let mut count = 0usize;
    for (index, d) in descs.into_iter().enumerate() {
        count = index + 1;
        if d.is_write_only() {
            return Err(TxError::DescriptorWriteOnly { index });
        }
        let outside = TxError::DescriptorOutside {
            index,
            addr: d.addr().0,
            len: d.len(),
        };
        // Bytes of this descriptor not consumed yet, and where they start.
        let mut left = d.len() as usize;
        let mut at = d.addr();
        let copy = |at: &mut GuestAddress, left: &mut usize, buf: &mut [u8]| {
            if buf.is_empty() {
                return Ok(());
            }
            mem.read_slice(buf, *at).map_err(|_| outside)?;
            *left -= buf.len();
            *at =
                at.0.checked_add(buf.len() as u64)
                    .map(GuestAddress)
                    .ok_or(outside)?;
            Ok(())
        };
        if header.is_none() {
            let take = left.min(HEADER_SIZE - have);
            copy(&mut at, &mut left, &mut raw[have..have + take])?;
            have += take;
            if have == HEADER_SIZE {
                let h = Header::decode(&raw);
                if h.len as usize > payload.len() {
                    return Err(TxError::LenTooLarge {
                        len: h.len,
                        max: payload.len(),
                    });
                }
                header = Some(h);
            }
        }
        if let Some(h) = header {
            let need = h.len as usize;
            let take = left.min(need - got);
            copy(&mut at, &mut left, &mut payload[got..got + take])?;
            got += take;
            if got == need {
                return Ok(TxPacket {
                    header: h,
                    len: got,
                    descriptors: count,
                });
            }
        }
        if d.has_next() && !mark(d.next()) {
            return Err(TxError::ChainLoop {
                index,
                next: d.next(),
            });
        }
    }
    match header {
        _ if count == 0 => Err(TxError::ChainEmpty),
        None => Err(TxError::HeaderShort { got: have }),
        Some(h) => Err(TxError::PayloadShort { len: h.len, got }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    use crate::transport::vsock::limits::MAX_PKT_PAYLOAD;
    use crate::transport::vsock::packet::{HOST_CID, OP_RW, TYPE_STREAM};

    const MAX: usize = MAX_PKT_PAYLOAD as usize;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("guest memory")
    }

    fn header(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 9009,
            len,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    /// Descriptors in slots 0, 1, 2… linked in order, one per `(addr, len)`.
    fn chain(parts: &[(u64, u32)]) -> Vec<Descriptor> {
        parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len))| {
                let last = i + 1 == parts.len();
                let flags = if last { 0 } else { VRING_DESC_F_NEXT as u16 };
                Descriptor::new(addr, len, flags, i as u16 + 1)
            })
            .collect()
    }

    /// Writes `bytes` split at `cuts` into fragments 0x1000 bytes apart; returns the chain.
    fn scatter(m: &GuestMemoryMmap, bytes: &[u8], cuts: &[usize]) -> Vec<Descriptor> {
        let mut parts = Vec::new();
        let mut addr = 0x1_0000u64;
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
            m.write_slice(&bytes[start..end], GuestAddress(addr))
                .expect("fragment");
            parts.push((addr, (end - start) as u32));
            addr += (end - start) as u64 + 0x1000;
            start = end;
        }
        chain(&parts)
    }

    fn packet(len: usize) -> (Header, Vec<u8>) {
        let h = header(len as u32);
        let mut bytes = h.encode().to_vec();
        bytes.extend((0..len).map(|i| (i % 251) as u8));
        (h, bytes)
    }

    #[test]
    fn header_and_payload_split_anywhere_are_read_whole() {
        let m = mem();
        let (h, bytes) = packet(3000);
        // Inside the header, at its end, inside the payload, and a zero-length fragment.
        let descs = scatter(&m, &bytes, &[10, 44, 44, 1000, 2999]);
        let mut buf = vec![0u8; MAX];
        let p = read_tx_chain(&m, 0, descs, &mut buf).expect("a packet");
        assert_eq!(
            p,
            TxPacket {
                header: h,
                len: 3000,
                descriptors: 6
            }
        );
        assert_eq!(&buf[..3000], &bytes[HEADER_SIZE..]);
    }

    #[test]
    fn a_full_64_kib_payload_over_one_descriptor_per_page_is_read() {
        // A nonlinear skb: header, then 16 page fragments.
        let m = mem();
        let (_, bytes) = packet(MAX);
        let cuts: Vec<usize> = (0..=16).map(|i| HEADER_SIZE + i * 4096).collect();
        let descs = scatter(&m, &bytes, &cuts[..16]);
        assert_eq!(descs.len(), 17);
        let mut buf = vec![0u8; MAX];
        let p = read_tx_chain(&m, 0, descs, &mut buf).expect("a packet");
        assert_eq!((p.len, p.descriptors), (MAX, 17));
        assert_eq!(&buf[..], &bytes[HEADER_SIZE..]);
    }

    #[test]
    fn the_rest_of_a_chain_past_the_packet_is_not_read() {
        let m = mem();
        let (_, bytes) = packet(10);
        let mut descs = scatter(&m, &bytes, &[HEADER_SIZE]);
        // A trailing descriptor outside memory, and slack in the data descriptor.
        descs[1].set_len(100);
        descs[1].set_flags(VRING_DESC_F_NEXT as u16);
        descs.push(Descriptor::new(1 << 50, 10, 0, 0));
        let mut buf = vec![0u8; MAX];
        let p = read_tx_chain(&m, 0, descs, &mut buf).expect("a packet");
        assert_eq!((p.len, p.descriptors), (10, 2));
    }

    #[test]
    fn hostile_chains_are_refused_with_a_reason() {
        let m = mem();
        let mut buf = vec![0u8; MAX];
        let (_, bytes) = packet(100);
        let mut read = |descs: Vec<Descriptor>| read_tx_chain(&m, 0, descs, &mut buf);

        assert_eq!(read(Vec::new()), Err(TxError::ChainEmpty));
        // The whole chain is shorter than the header.
        let d = scatter(&m, &bytes[..30], &[10]);
        assert_eq!(read(d), Err(TxError::HeaderShort { got: 30 }));
        // len says 100; the chain carries 60.
        let d = scatter(&m, &bytes[..HEADER_SIZE + 60], &[HEADER_SIZE]);
        assert_eq!(read(d), Err(TxError::PayloadShort { len: 100, got: 60 }));
        // A huge len is refused before any payload is read.
        let huge = header(u32::MAX).encode();
        let d = scatter(&m, &huge, &[]);
        assert!(matches!(
            read(d),
            Err(TxError::LenTooLarge { len: u32::MAX, .. })
        ));
        // A device-writable fragment.
        let mut d = scatter(&m, &bytes, &[HEADER_SIZE, 80]);
        d[2].set_flags(VRING_DESC_F_WRITE as u16);
        assert_eq!(read(d), Err(TxError::DescriptorWriteOnly { index: 2 }));
        // A fragment outside guest memory, and one whose end wraps the address space.
        let mut d = scatter(&m, &bytes, &[HEADER_SIZE]);
        d[1].set_addr(u64::MAX - 4);
        assert!(matches!(
            read(d),
            Err(TxError::DescriptorOutside { index: 1, .. })
        ));
        // A loop: slot 1 links back to slot 0 (the head), short of len each time round.
        let mut d = scatter(&m, &bytes[..HEADER_SIZE + 10], &[HEADER_SIZE]);
        d[1].set_flags(VRING_DESC_F_NEXT as u16);
        d[1].set_next(0);
        let looped: Vec<Descriptor> = d.iter().copied().cycle().take(256).collect();
        assert_eq!(read(looped), Err(TxError::ChainLoop { index: 1, next: 0 }));
    }

    #[test]
    fn reasons_map_to_counters() {
        assert_eq!(TxError::ChainEmpty.reason(), Malformed::BadDescriptor);
        assert_eq!(
            TxError::HeaderShort { got: 1 }.reason(),
            Malformed::ShortHeader
        );
        assert_eq!(
            TxError::PayloadShort { len: 2, got: 1 }.reason(),
            Malformed::BadLen
        );
        assert_eq!(
            TxError::DescriptorWriteOnly { index: 0 }.reason(),
            Malformed::WrongDirection
        );
    }

    proptest! {
        /// Any split of header and payload over 1 to 8 descriptors (zero-length ones included)
        /// reads back the same header and payload; any chain cut short is refused, never
        /// misread.
        #[test]
        fn fuzz_tx_chain_splits_read_back_whole(
            len in prop_oneof![0usize..200, 0usize..=MAX],
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            short in prop_oneof![Just(0usize), 1usize..100],
        ) {
            let m = mem();
            let (h, bytes) = packet(len);
            let total = bytes.len().saturating_sub(short);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(total + 1)).collect();
            cuts.sort_unstable();
            let descs = scatter(&m, &bytes[..total], &cuts);
            let mut buf = vec![0u8; MAX];
            let r = read_tx_chain(&m, 0, descs, &mut buf);
            if short == 0 {
                let p = r.expect("a whole packet");
                prop_assert_eq!(p.header, h);
                prop_assert_eq!(p.len, len);
                prop_assert_eq!(&buf[..len], &bytes[HEADER_SIZE..]);
            } else if total < HEADER_SIZE {
                prop_assert_eq!(r, Err(TxError::HeaderShort { got: total }));
            } else {
                let got = total - HEADER_SIZE;
                prop_assert_eq!(r, Err(TxError::PayloadShort { len: len as u32, got }));
            }
        }
    }
}
