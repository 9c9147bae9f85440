//! The virtio-vsock packet header: constants, and a plain copy of the header that the device
//! can inspect and build without touching guest memory again.
//!
//! Tx chains are read by [`super::tx`], which copies the header once and decodes it here
//! ([`Header::decode`]); headers for the rx queue are encoded here ([`Header::encode`]). No
//! header field is ever read twice from guest memory (a hostile guest could change it in
//! between).

use virtio_vsock::packet::PKT_HEADER_SIZE;

/// The host's CID: the only destination awd answers for.
pub const HOST_CID: u64 = 2;
/// `type` of a stream socket, the only kind awd serves.
pub const TYPE_STREAM: u16 = 1;

/// Connection request (guest → host here).
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset or refused.
pub const OP_RST: u16 = 3;
/// Orderly shutdown of one or both directions.
pub const OP_SHUTDOWN: u16 = 4;
/// Payload.
pub const OP_RW: u16 = 5;
/// The sender's receive window (buf_alloc, fwd_cnt) changed.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for an OP_CREDIT_UPDATE.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// Size of the packed header, 44 bytes.
pub const HEADER_SIZE: usize = PKT_HEADER_SIZE;

/// The fields of one virtio-vsock header, in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender CID.
    pub src_cid: u64,
    /// Receiver CID.
    pub dst_cid: u64,
    /// Sender port.
    pub src_port: u32,
    /// Receiver port.
    pub dst_port: u32,
    /// Payload length (OP_RW only).
    pub len: u32,
    /// Socket type (1 = stream).
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Op-specific flags (OP_SHUTDOWN: 1 = no more receives, 2 = no more sends).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// The packed little-endian wire form.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the packed wire form.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// A name for an op, for logs.
pub fn op_name(op: u16) -> &'static str {
    match op {
        OP_REQUEST => "request",
        OP_RESPONSE => "response",
        OP_RST => "rst",
        OP_SHUTDOWN => "shutdown",
        OP_RW => "rw",
        OP_CREDIT_UPDATE => "credit_update",
        OP_CREDIT_REQUEST => "credit_request",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_layout_matches_the_spec() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 9009,
            len: 11,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(HEADER_SIZE, 44);
        assert_eq!(b[0], 0x08, "src_cid is little-endian at 0");
        assert_eq!(&b[8..16], &2u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[20..24], &9009u32.to_le_bytes());
        assert_eq!(&b[24..28], &11u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[32..36], &3u32.to_le_bytes());
        assert_eq!(&b[36..40], &65536u32.to_le_bytes());
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(Header::decode(&b), h);
    }

    #[test]
    fn ops_have_names() {
        assert_eq!(op_name(OP_CREDIT_REQUEST), "credit_request");
        assert_eq!(op_name(99), "unknown");
    }
}
