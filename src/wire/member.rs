//! MEMBER: a node announces itself (periodically while alive) or says it is leaving.
//!
//! ```text
//!  0        16             24           25              26               28
//! +--------+--------------+------------+---------------+----------------+------------------------+
//! | header | node_id (u64)| state (u8) | name_len (u8) | reserved (u16) | name (UTF-8, name_len) |
//! +--------+--------------+------------+---------------+----------------+------------------------+
//! ```

use super::{HEADER_LEN, Header, Kind, WireError, be_u64, put_u64};

/// Length of the MEMBER fixed part (common header included).
pub const MEMBER_HEADER_LEN: usize = 28;
/// Longest node name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// What a MEMBER packet says about its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// The node is alive (sent at start and then periodically).
    Alive,
    /// The node is leaving the group.
    Leaving,
}

/// A validated MEMBER packet borrowing the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberPacket<'a> {
    /// Common header; `session` is the announcing node's current incarnation.
    pub header: Header,
    /// Body.
    pub repr: MemberRepr<'a>,
}

/// MEMBER body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberRepr<'a> {
    /// The node's stable identity (kept across restarts; the session changes).
    pub node_id: u64,
    /// Alive or leaving.
    pub state: MemberState,
    /// Optional human-readable name, at most [`MAX_NAME_LEN`] bytes.
    pub name: &'a str,
}

impl<'a> MemberPacket<'a> {
    pub(crate) fn parse_with(header: Header, bytes: &'a [u8]) -> Result<MemberPacket<'a>, WireError> {
        if bytes.len() < MEMBER_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let state = match bytes[24] {
            0 => MemberState::Alive,
            1 => MemberState::Leaving,
            _ => return Err(WireError::Malformed("unknown member state")),
        };
        let name_len = bytes[25] as usize;
        if name_len > MAX_NAME_LEN {
            return Err(WireError::Malformed("member name too long"));
        }
        let name = bytes.get(MEMBER_HEADER_LEN..MEMBER_HEADER_LEN + name_len).ok_or(WireError::Truncated)?;
        let name = core::str::from_utf8(name).map_err(|_| WireError::Malformed("member name not UTF-8"))?;
        Ok(MemberPacket { header, repr: MemberRepr { node_id: be_u64(bytes, HEADER_LEN), state, name } })
    }
}

impl MemberRepr<'_> {
    /// Emits header and body; returns the length.
    pub fn emit(&self, header: &Header, buf: &mut [u8]) -> Result<usize, WireError> {
        if self.name.len() > MAX_NAME_LEN {
            return Err(WireError::Malformed("member name too long"));
        }
        let len = MEMBER_HEADER_LEN + self.name.len();
        if buf.len() < len {
            return Err(WireError::BufferTooSmall);
        }
        debug_assert_eq!(header.kind, Kind::Member);
        header.emit(buf)?;
        put_u64(buf, 16, self.node_id);
        buf[24] = match self.state {
            MemberState::Alive => 0,
            MemberState::Leaving => 1,
        };
        buf[25] = self.name.len() as u8;
        buf[26] = 0;
        buf[27] = 0;
        buf[MEMBER_HEADER_LEN..len].copy_from_slice(self.name.as_bytes());
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Packet;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn emit_then_parse_is_identity(node_id: u64, leaving: bool, name in "[a-z0-9é.-]{0,20}", session: u64) {
            let h = Header { kind: Kind::Member, flags: 0, stream: 1, session };
            let r = MemberRepr { node_id, state: if leaving { MemberState::Leaving } else { MemberState::Alive }, name: &name };
            let mut buf = [0u8; 128];
            let n = r.emit(&h, &mut buf).unwrap();
            prop_assert_eq!(Packet::parse(&buf[..n]), Ok(Packet::Member(MemberPacket { header: h, repr: r })));
        }
    }
}
