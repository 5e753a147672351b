//! STATUS: a receiver tells one sender how far it has consumed, for flow control and liveness.
//!
//! ```text
//!  0        16                    24                     32                        36               40
//! +--------+---------------------+----------------------+-------------------------+----------------+
//! | header | target_session (u64)| next_expected (u64)  | buffer_capacity (u32)   | reserved (u32) |
//! +--------+---------------------+----------------------+-------------------------+----------------+
//! ```

use super::{HEADER_LEN, Header, Kind, WireError, be_u32, be_u64, put_u32, put_u64};

/// Length of a STATUS packet.
pub const STATUS_LEN: usize = 40;

/// STATUS body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRepr {
    /// The sender session this report is about.
    pub target_session: u64,
    /// Every datagram below this sequence has been received and consumed by the receiver's application.
    pub next_expected: u64,
    /// How many datagrams ahead of `next_expected` the receiver can buffer.
    pub buffer_capacity: u32,
}

impl StatusRepr {
    pub(crate) fn parse_body(bytes: &[u8]) -> Result<StatusRepr, WireError> {
        if bytes.len() < STATUS_LEN {
            return Err(WireError::Truncated);
        }
        let r = StatusRepr {
            target_session: be_u64(bytes, HEADER_LEN),
            next_expected: be_u64(bytes, 24),
            buffer_capacity: be_u32(bytes, 32),
        };
        if r.next_expected > super::MAX_SEQ {
            return Err(WireError::Malformed("STATUS position above 2^63"));
        }
        Ok(r)
    }

    /// Emits header and body; returns the length.
    pub fn emit(&self, header: &Header, buf: &mut [u8]) -> Result<usize, WireError> {
        if buf.len() < STATUS_LEN {
            return Err(WireError::BufferTooSmall);
        }
        debug_assert_eq!(header.kind, Kind::Status);
        header.emit(buf)?;
        put_u64(buf, 16, self.target_session);
        put_u64(buf, 24, self.next_expected);
        put_u32(buf, 32, self.buffer_capacity);
        put_u32(buf, 36, 0);
        Ok(STATUS_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Packet;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn emit_then_parse_is_identity(target_session: u64, next_expected in 0u64..=1 << 63, buffer_capacity: u32, session: u64) {
            let h = Header { kind: Kind::Status, flags: 0, stream: 1, session };
            let r = StatusRepr { target_session, next_expected, buffer_capacity };
            let mut buf = [0u8; 40];
            let n = r.emit(&h, &mut buf).unwrap();
            prop_assert_eq!(Packet::parse(&buf[..n]), Ok(Packet::Status(h, r)));
        }
    }
}
