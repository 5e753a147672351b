//! Packet formats.
//!
//! Every packet starts with the same 16-byte [`Header`]; the rest depends on its [`Kind`]. Each kind has its
//! own module with a borrowed, validated view (`*Packet`) and, where the packet is built by value, a `*Repr`
//! that emits into a caller's buffer. All integers are big-endian. The layouts are specified in
//! `docs/PROTOCOL.md`; the offsets there and the constants here are the same numbers.
//!
//! Parsing is total: any byte string gives `Ok` or a [`WireError`], never a panic, and nothing is allocated
//! from a length field (the views borrow the input).

pub(crate) mod data;
mod heartbeat;
mod member;
mod nak;
mod status;

pub use data::{
    DATA_HEADER_LEN, DataPacket, DataWriter, FRAME_FIRST, FRAME_HEADER_LEN, FRAME_LAST, Frame, FrameShape, Frames,
};
pub use heartbeat::{HEARTBEAT_LEN, HeartbeatRepr};
pub use member::{MAX_NAME_LEN, MEMBER_HEADER_LEN, MemberPacket, MemberRepr, MemberState};
pub use nak::{MAX_NAK_RANGES, NAK_HEADER_LEN, NAK_RANGE_LEN, NakPacket, NakRanges, NakRepr, SeqRange};
pub use status::{STATUS_LEN, StatusRepr};

/// Protocol version carried in byte 0 of every packet.
pub const VERSION: u8 = 1;
/// Length of the common header.
pub const HEADER_LEN: usize = 16;
/// Every sequence number on the wire (datagram and message) is below this: 2^63 cannot be reached in
/// practice, and the bound keeps all arithmetic on received values free of overflow.
pub const MAX_SEQ: u64 = 1 << 63;
/// Header flag on DATA: this datagram is a retransmission answering a NAK.
pub const FLAG_RETRANSMIT: u16 = 0x0001;
/// Header flag on any kind: the body is encrypted and a seal trailer follows it (docs/PROTOCOL.md, section 10).
pub const FLAG_SEALED: u16 = 0x8000;
/// Length of the authentication tag at the end of a sealed packet.
pub const SEAL_TAG_LEN: usize = 16;
/// Bytes a seal adds to a packet: the trailer of key id (1), packet counter (8) and tag ([`SEAL_TAG_LEN`]).
pub const SEAL_OVERHEAD: usize = 1 + 8 + SEAL_TAG_LEN;

/// Why a packet was rejected by a parser or could not be emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The packet is shorter than its fixed part.
    #[error("packet truncated")]
    Truncated,
    /// Byte 0 is not a version this implementation speaks.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// Byte 1 is not a known packet kind.
    #[error("unknown packet kind {0}")]
    UnknownKind(u8),
    /// A length, count or value inside the packet is inconsistent with the packet or with the spec.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The output buffer is too small for the packet being emitted.
    #[error("buffer too small")]
    BufferTooSmall,
}

/// Packet kinds (byte 1 of the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Application messages from a sender (original or retransmission).
    Data = 1,
    /// A sender's position while it has nothing new to send.
    Heartbeat = 2,
    /// A receiver's request for retransmission of sequence ranges.
    Nak = 3,
    /// A receiver's position report to one sender, for flow control.
    Status = 4,
    /// A node's announcement of itself (alive or leaving).
    Member = 5,
}

impl Kind {
    /// Decodes byte 1 of the header.
    pub fn from_u8(v: u8) -> Result<Kind, WireError> {
        Ok(match v {
            1 => Kind::Data,
            2 => Kind::Heartbeat,
            3 => Kind::Nak,
            4 => Kind::Status,
            5 => Kind::Member,
            other => return Err(WireError::UnknownKind(other)),
        })
    }
}

/// The common header at the start of every packet.
///
/// ```text
///  0      1      2             4                           8                                  16
/// +------+------+-------------+---------------------------+----------------------------------+
/// | ver  | kind | flags (u16) | stream (u32)              | session (u64)                    |
/// +------+------+-------------+---------------------------+----------------------------------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What follows the header.
    pub kind: Kind,
    /// Kind-specific flags; unknown bits are ignored by receivers.
    pub flags: u16,
    /// The stream (logical channel) inside the group; receivers ignore streams they were not configured for.
    pub stream: u32,
    /// The session of the node that emitted the packet: random for each incarnation of a node.
    pub session: u64,
}

impl Header {
    /// Parses the common header, checking version and kind.
    pub fn parse(bytes: &[u8]) -> Result<Header, WireError> {
        if bytes.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if bytes[0] != VERSION {
            return Err(WireError::Version(bytes[0]));
        }
        Ok(Header {
            kind: Kind::from_u8(bytes[1])?,
            flags: be_u16(bytes, 2),
            stream: be_u32(bytes, 4),
            session: be_u64(bytes, 8),
        })
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        if buf.len() < HEADER_LEN {
            return Err(WireError::BufferTooSmall);
        }
        buf[0] = VERSION;
        buf[1] = self.kind as u8;
        buf[2..4].copy_from_slice(&self.flags.to_be_bytes());
        buf[4..8].copy_from_slice(&self.stream.to_be_bytes());
        buf[8..16].copy_from_slice(&self.session.to_be_bytes());
        Ok(())
    }
}

/// Any packet, parsed: the header plus a borrowed view or value of its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// See [`DataPacket`].
    Data(DataPacket<'a>),
    /// See [`HeartbeatRepr`].
    Heartbeat(Header, HeartbeatRepr),
    /// See [`NakPacket`].
    Nak(NakPacket<'a>),
    /// See [`StatusRepr`].
    Status(Header, StatusRepr),
    /// See [`MemberPacket`].
    Member(MemberPacket<'a>),
}

impl<'a> Packet<'a> {
    /// Parses any packet kind. Total: never panics, never allocates.
    pub fn parse(bytes: &'a [u8]) -> Result<Packet<'a>, WireError> {
        let header = Header::parse(bytes)?;
        Ok(match header.kind {
            Kind::Data => Packet::Data(DataPacket::parse_with(header, bytes)?),
            Kind::Heartbeat => Packet::Heartbeat(header, HeartbeatRepr::parse_body(bytes)?),
            Kind::Nak => Packet::Nak(NakPacket::parse_with(header, bytes)?),
            Kind::Status => Packet::Status(header, StatusRepr::parse_body(bytes)?),
            Kind::Member => Packet::Member(MemberPacket::parse_with(header, bytes)?),
        })
    }

    /// The common header of the packet.
    pub fn header(&self) -> Header {
        match self {
            Packet::Data(p) => p.header,
            Packet::Heartbeat(h, _) | Packet::Status(h, _) => *h,
            Packet::Nak(p) => p.header,
            Packet::Member(p) => p.header,
        }
    }
}

// Callers check the length before reading; these helpers only exist to keep offsets readable.
pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_rejects_bad_version_and_kind() {
        let mut b = [0u8; 16];
        b[0] = 2;
        b[1] = 1;
        assert_eq!(Header::parse(&b), Err(WireError::Version(2)));
        b[0] = VERSION;
        b[1] = 99;
        assert_eq!(Header::parse(&b), Err(WireError::UnknownKind(99)));
        assert_eq!(Header::parse(&b[..15]), Err(WireError::Truncated));
    }

    proptest! {
        #[test]
        fn header_roundtrip(kind in 1u8..=5, flags: u16, stream: u32, session: u64) {
            let h = Header { kind: Kind::from_u8(kind).unwrap(), flags, stream, session };
            let mut b = [0u8; HEADER_LEN];
            h.emit(&mut b).unwrap();
            prop_assert_eq!(Header::parse(&b), Ok(h));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Packet::parse(&bytes);
        }

        #[test]
        fn arbitrary_bodies_with_valid_header_never_panic(kind in 1u8..=5, body in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let mut bytes = vec![VERSION, kind, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            bytes.extend_from_slice(&body);
            if let Ok(Packet::Data(d)) = Packet::parse(&bytes) {
                // A validated DATA packet's frames must iterate without panicking and stay in bounds.
                let total: usize = d.frames().map(|f| f.payload.len() + FRAME_HEADER_LEN).sum();
                prop_assert_eq!(total + DATA_HEADER_LEN, bytes.len());
            }
        }
    }
}
