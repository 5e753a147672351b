//! HEARTBEAT: a sender's position, sent while it has no new data so that receivers detect tail loss.
//!
//! ```text
//!  0        16              24           32                40                  44               48
//! +--------+---------------+------------+-----------------+-------------------+----------------+
//! | header | next_seq (u64)| low (u64)  | next_msg (u64)  | receivers (u32)   | reserved (u32) |
//! +--------+---------------+------------+-----------------+-------------------+----------------+
//! ```

use super::{HEADER_LEN, Header, Kind, WireError, be_u32, be_u64, put_u32, put_u64};

/// Length of a HEARTBEAT packet.
pub const HEARTBEAT_LEN: usize = 48;

/// HEARTBEAT body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatRepr {
    /// The sequence the sender's next new datagram will carry: every datagram below it has been sent.
    pub next_seq: u64,
    /// The lowest datagram sequence the sender still retains for retransmission.
    pub low: u64,
    /// The message sequence its next new message will carry.
    pub next_msg: u64,
    /// How many live receivers the sender is tracking (with exactly one, that receiver NAKs without delay).
    pub receivers: u32,
}

impl HeartbeatRepr {
    pub(crate) fn parse_body(bytes: &[u8]) -> Result<HeartbeatRepr, WireError> {
        if bytes.len() < HEARTBEAT_LEN {
            return Err(WireError::Truncated);
        }
        let r = HeartbeatRepr {
            next_seq: be_u64(bytes, HEADER_LEN),
            low: be_u64(bytes, 24),
            next_msg: be_u64(bytes, 32),
            receivers: be_u32(bytes, 40),
        };
        if r.low > r.next_seq {
            return Err(WireError::Malformed("heartbeat low above next_seq"));
        }
        if r.next_seq >= super::MAX_SEQ || r.next_msg >= super::MAX_SEQ {
            return Err(WireError::Malformed("heartbeat sequence at or above 2^63"));
        }
        Ok(r)
    }

    /// Emits header and body; returns the length.
    pub fn emit(&self, header: &Header, buf: &mut [u8]) -> Result<usize, WireError> {
        if buf.len() < HEARTBEAT_LEN {
            return Err(WireError::BufferTooSmall);
        }
        debug_assert_eq!(header.kind, Kind::Heartbeat);
        header.emit(buf)?;
        put_u64(buf, 16, self.next_seq);
        put_u64(buf, 24, self.low);
        put_u64(buf, 32, self.next_msg);
        put_u32(buf, 40, self.receivers);
        put_u32(buf, 44, 0);
        Ok(HEARTBEAT_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Packet;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn emit_then_parse_is_identity(low in 0u64..1 << 62, extra in 0u64..1 << 62, next_msg in 0u64..1 << 63, receivers: u32, session: u64, stream: u32) {
            let next_seq = low.saturating_add(extra);
            let h = Header { kind: Kind::Heartbeat, flags: 0, stream, session };
            let r = HeartbeatRepr { next_seq, low, next_msg, receivers };
            let mut buf = [0u8; 64];
            let n = r.emit(&h, &mut buf).unwrap();
            prop_assert_eq!(Packet::parse(&buf[..n]), Ok(Packet::Heartbeat(h, r)));
        }
    }
}
