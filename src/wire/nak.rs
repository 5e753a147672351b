//! NAK: a receiver asks a sender to retransmit ranges of datagrams. Sent to the group, so other receivers
//! missing the same datagrams hear it and hold their own NAKs back.
//!
//! ```text
//!  0        16                    24             28
//! +--------+---------------------+--------------+-------------------------------------------+
//! | header | target_session (u64)| count (u32)  | count × range: start (u64), len (u32)     |
//! +--------+---------------------+--------------+-------------------------------------------+
//! ```
//! `count` is 1 ..= [`MAX_NAK_RANGES`]; every `len` is at least 1 and `start + len` must not overflow.

use super::{HEADER_LEN, Header, Kind, WireError, be_u32, be_u64, put_u32, put_u64};

/// Length of the NAK fixed part (common header included).
pub const NAK_HEADER_LEN: usize = 28;
/// Length of one encoded range.
pub const NAK_RANGE_LEN: usize = 12;
/// Most ranges in one NAK (keeps a NAK under 800 bytes).
pub const MAX_NAK_RANGES: usize = 64;

/// A half-open range of datagram sequence numbers, `start .. start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    /// First sequence in the range.
    pub start: u64,
    /// Number of sequences (at least 1).
    pub len: u32,
}

impl SeqRange {
    /// One past the last sequence.
    pub fn end(&self) -> u64 {
        self.start + self.len as u64
    }
}

/// A validated NAK borrowing the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NakPacket<'a> {
    /// Common header; `session` is the requesting receiver's.
    pub header: Header,
    /// The sender session asked to retransmit.
    pub target_session: u64,
    ranges: &'a [u8],
}

impl<'a> NakPacket<'a> {
    pub(crate) fn parse_with(header: Header, bytes: &'a [u8]) -> Result<NakPacket<'a>, WireError> {
        if bytes.len() < NAK_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let count = be_u32(bytes, 24) as usize;
        if count == 0 || count > MAX_NAK_RANGES {
            return Err(WireError::Malformed("NAK range count out of bounds"));
        }
        let end = NAK_HEADER_LEN + count * NAK_RANGE_LEN;
        let ranges = bytes.get(NAK_HEADER_LEN..end).ok_or(WireError::Truncated)?;
        for r in (NakRanges { rest: ranges }) {
            if r.len == 0 || r.start.checked_add(r.len as u64).is_none_or(|end| end > super::MAX_SEQ) {
                return Err(WireError::Malformed("empty NAK range, or one past 2^63"));
            }
        }
        Ok(NakPacket { header, target_session: be_u64(bytes, HEADER_LEN), ranges })
    }

    /// The requested ranges.
    pub fn ranges(&self) -> NakRanges<'a> {
        NakRanges { rest: self.ranges }
    }
}

/// Iterator over the ranges of a NAK.
#[derive(Debug, Clone)]
pub struct NakRanges<'a> {
    rest: &'a [u8],
}

impl Iterator for NakRanges<'_> {
    type Item = SeqRange;
    fn next(&mut self) -> Option<SeqRange> {
        if self.rest.len() < NAK_RANGE_LEN {
            return None;
        }
        let r = SeqRange { start: be_u64(self.rest, 0), len: be_u32(self.rest, 8) };
        self.rest = &self.rest[NAK_RANGE_LEN..];
        Some(r)
    }
}

/// A NAK to emit.
#[derive(Debug, Clone, Copy)]
pub struct NakRepr<'r> {
    /// The sender session asked to retransmit.
    pub target_session: u64,
    /// 1 ..= [`MAX_NAK_RANGES`] non-empty ranges.
    pub ranges: &'r [SeqRange],
}

impl NakRepr<'_> {
    /// Emits header and body; returns the length.
    pub fn emit(&self, header: &Header, buf: &mut [u8]) -> Result<usize, WireError> {
        if self.ranges.is_empty() || self.ranges.len() > MAX_NAK_RANGES {
            return Err(WireError::Malformed("NAK range count out of bounds"));
        }
        let len = NAK_HEADER_LEN + self.ranges.len() * NAK_RANGE_LEN;
        if buf.len() < len {
            return Err(WireError::BufferTooSmall);
        }
        debug_assert_eq!(header.kind, Kind::Nak);
        header.emit(buf)?;
        put_u64(buf, 16, self.target_session);
        put_u32(buf, 24, self.ranges.len() as u32);
        for (i, r) in self.ranges.iter().enumerate() {
            let at = NAK_HEADER_LEN + i * NAK_RANGE_LEN;
            put_u64(buf, at, r.start);
            put_u32(buf, at + 8, r.len);
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Packet;
    use proptest::prelude::*;

    #[test]
    fn rejects_zero_and_overflowing_ranges() {
        let h = Header { kind: Kind::Nak, flags: 0, stream: 1, session: 2 };
        let mut buf = [0u8; 64];
        let n =
            NakRepr { target_session: 3, ranges: &[SeqRange { start: u64::MAX, len: 2 }] }.emit(&h, &mut buf).unwrap();
        assert!(matches!(Packet::parse(&buf[..n]), Err(WireError::Malformed(_))));
        let n = NakRepr { target_session: 3, ranges: &[SeqRange { start: 5, len: 0 }] }.emit(&h, &mut buf).unwrap();
        assert!(matches!(Packet::parse(&buf[..n]), Err(WireError::Malformed(_))));
        let n = NakRepr { target_session: 3, ranges: &[SeqRange { start: 5, len: 1 }] }.emit(&h, &mut buf).unwrap();
        assert!(matches!(Packet::parse(&buf[..n - 1]), Err(WireError::Truncated)));
    }

    proptest! {
        #[test]
        fn emit_then_parse_is_identity(target_session: u64, session: u64,
                                       raw in proptest::collection::vec((0u64..1 << 62, 1u32..), 1..=MAX_NAK_RANGES)) {
            let ranges: Vec<SeqRange> = raw.iter().map(|&(start, len)| SeqRange { start, len }).collect();
            let h = Header { kind: Kind::Nak, flags: 0, stream: 9, session };
            let mut buf = vec![0u8; 1024];
            let n = NakRepr { target_session, ranges: &ranges }.emit(&h, &mut buf).unwrap();
            let Ok(Packet::Nak(p)) = Packet::parse(&buf[..n]) else { panic!("not a NAK") };
            prop_assert_eq!(p.header, h);
            prop_assert_eq!(p.target_session, target_session);
            prop_assert_eq!(p.ranges().collect::<Vec<_>>(), ranges);
        }
    }
}
