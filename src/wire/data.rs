//! DATA: a sender's datagram carrying one or more message frames.
//!
//! ```text
//!  0                16              24                  32               40
//! +----------------+---------------+-------------------+----------------+---------+---------+----
//! | header         | seq (u64)     | msg_seq (u64)     | low (u64)      | frame 0 | frame 1 | ...
//! +----------------+---------------+-------------------+----------------+---------+---------+----
//! frame: | len (u16) | flags (u8) | reserved (u8) | len bytes of payload |
//! ```
//!
//! `seq` numbers datagrams, `msg_seq` is the message sequence number of frame 0, and each later frame with
//! [`FRAME_FIRST`] set is the next message. A message larger than one datagram is split into fragments: the
//! first carries `FRAME_FIRST`, the last `FRAME_LAST`, the ones between neither. Only frame 0 may be a
//! continuation (no `FRAME_FIRST`) and only the final frame may be unfinished (no `FRAME_LAST`).

use super::{HEADER_LEN, Header, Kind, WireError, be_u64, put_u64};

/// Length of the DATA fixed part (common header included); frames start here.
pub const DATA_HEADER_LEN: usize = 40;
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 4;
/// Frame flag: this frame starts a message.
pub const FRAME_FIRST: u8 = 0x01;
/// Frame flag: this frame ends a message.
pub const FRAME_LAST: u8 = 0x02;

/// A validated DATA packet borrowing the received bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPacket<'a> {
    /// Common header.
    pub header: Header,
    /// Datagram sequence number.
    pub seq: u64,
    /// Message sequence number of frame 0.
    pub msg_seq: u64,
    /// Lowest datagram sequence the sender still retained when it built this datagram.
    pub low: u64,
    frames: &'a [u8],
    shape: FrameShape,
}

/// What validation learnt of a DATA packet's frames, so that a reader need not walk them again to find
/// where a run of whole messages ends: every frame between the first and the last carries both
/// [`FRAME_FIRST`] and [`FRAME_LAST`] (the layout allows nothing else), so only the two ends can be pieces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameShape {
    /// Number of frames.
    pub count: usize,
    /// Offset of the last frame's header from the start of the datagram.
    pub last_at: usize,
    /// Whether the last frame is a whole message (both flags set).
    pub last_whole: bool,
}

impl<'a> DataPacket<'a> {
    /// Parses and validates a whole DATA packet, frames included.
    pub fn parse(bytes: &'a [u8]) -> Result<DataPacket<'a>, WireError> {
        let header = Header::parse(bytes)?;
        if header.kind != Kind::Data {
            return Err(WireError::Malformed("not a DATA packet"));
        }
        Self::parse_with(header, bytes)
    }

    pub(crate) fn parse_with(header: Header, bytes: &'a [u8]) -> Result<DataPacket<'a>, WireError> {
        if bytes.len() < DATA_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let frames = &bytes[DATA_HEADER_LEN..];
        let shape = validate_frames(frames)?;
        let p = DataPacket {
            header,
            seq: be_u64(bytes, HEADER_LEN),
            msg_seq: be_u64(bytes, 24),
            low: be_u64(bytes, 32),
            frames,
            shape,
        };
        if p.seq >= super::MAX_SEQ || p.msg_seq >= super::MAX_SEQ || p.low > p.seq {
            return Err(WireError::Malformed("DATA sequence out of range (seq, msg_seq < 2^63, low <= seq)"));
        }
        Ok(p)
    }

    /// Whether the sender marked this datagram as a retransmission.
    pub fn is_retransmit(&self) -> bool {
        self.header.flags & super::FLAG_RETRANSMIT != 0
    }

    /// The frames, in order. Validation already happened in `parse`, so iteration cannot fail.
    pub fn frames(&self) -> Frames<'a> {
        Frames { rest: self.frames }
    }

    /// How many frames there are and what the last one is.
    pub fn shape(&self) -> FrameShape {
        self.shape
    }
}

fn validate_frames(frames: &[u8]) -> Result<FrameShape, WireError> {
    if frames.is_empty() {
        return Err(WireError::Malformed("DATA without frames"));
    }
    // One pass, one bounds check per frame. A frame followed by another must end its message, and one that
    // follows another must start one: checked as each frame after the first is met.
    let (mut at, mut count, mut last_at, mut flags) = (0usize, 0usize, 0usize, 0u8);
    while at < frames.len() {
        let Some(h) = frames.get(at..at + FRAME_HEADER_LEN) else {
            return Err(WireError::Malformed("trailing bytes shorter than a frame header"));
        };
        let len = usize::from(u16::from_be_bytes([h[0], h[1]]));
        if count > 0 {
            if flags & FRAME_LAST == 0 {
                return Err(WireError::Malformed("unfinished fragment before the final frame"));
            }
            if h[2] & FRAME_FIRST == 0 {
                return Err(WireError::Malformed("continuation fragment after frame 0"));
            }
        }
        flags = h[2];
        (last_at, at, count) = (at, at + FRAME_HEADER_LEN + len, count + 1);
    }
    if at > frames.len() {
        return Err(WireError::Malformed("frame length past the end of the datagram"));
    }
    let whole = FRAME_FIRST | FRAME_LAST;
    Ok(FrameShape { count, last_at: DATA_HEADER_LEN + last_at, last_whole: flags & whole == whole })
}

/// One frame of a DATA packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// `FRAME_FIRST` / `FRAME_LAST` bits.
    pub flags: u8,
    /// The message bytes (or this fragment's share of them).
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// The frame starts a message.
    pub fn is_first(&self) -> bool {
        self.flags & FRAME_FIRST != 0
    }
    /// The frame ends a message.
    pub fn is_last(&self) -> bool {
        self.flags & FRAME_LAST != 0
    }
}

/// Iterator over the frames of a validated DATA packet.
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Frames<'a> {
    type Item = Frame<'a>;
    fn next(&mut self) -> Option<Frame<'a>> {
        let (frame, used) = frame_at(self.rest, 0)?;
        self.rest = &self.rest[used..];
        Some(frame)
    }
}

/// Reads the frame starting at `offset` of a validated frame area; returns it and the offset just past it.
/// Returns `None` at the end (or, defensively, on bytes that were not validated).
#[inline]
pub(crate) fn frame_at(frames: &[u8], offset: usize) -> Option<(Frame<'_>, usize)> {
    let h = frames.get(offset..offset.checked_add(FRAME_HEADER_LEN)?)?;
    let start = offset + FRAME_HEADER_LEN;
    let next = start + usize::from(u16::from_be_bytes([h[0], h[1]]));
    let payload = frames.get(start..next)?;
    Some((Frame { flags: h[2], payload }, next))
}

/// Builds a DATA datagram in place, in a buffer the caller owns (the sender builds straight into its
/// retransmission window).
pub struct DataWriter;

impl DataWriter {
    /// Writes the fixed part; returns the length written ([`DATA_HEADER_LEN`]).
    pub fn begin(buf: &mut [u8], header: &Header, seq: u64, msg_seq: u64, low: u64) -> Result<usize, WireError> {
        if buf.len() < DATA_HEADER_LEN {
            return Err(WireError::BufferTooSmall);
        }
        debug_assert_eq!(header.kind, Kind::Data);
        header.emit(buf)?;
        put_u64(buf, 16, seq);
        put_u64(buf, 24, msg_seq);
        put_u64(buf, 32, low);
        Ok(DATA_HEADER_LEN)
    }

    /// Appends a frame at `at` (the current length); returns the new length.
    pub fn push_frame(buf: &mut [u8], at: usize, flags: u8, payload: &[u8]) -> Result<usize, WireError> {
        DataWriter::push_frame_parts(buf, at, flags, &[], payload)
    }

    /// Appends a frame whose payload is `head` followed by `body` (an application envelope and its
    /// message, say), written in one pass; returns the new length.
    #[inline(always)]
    pub fn push_frame_parts(
        buf: &mut [u8],
        at: usize,
        flags: u8,
        head: &[u8],
        body: &[u8],
    ) -> Result<usize, WireError> {
        let len = head.len() + body.len();
        let end = at + FRAME_HEADER_LEN + len;
        if len > u16::MAX as usize || end > buf.len() {
            return Err(WireError::BufferTooSmall);
        }
        let frame = &mut buf[at..end];
        frame[..2].copy_from_slice(&(len as u16).to_be_bytes());
        frame[2] = flags;
        frame[3] = 0;
        let (h, b) = frame[FRAME_HEADER_LEN..].split_at_mut(head.len());
        h.copy_from_slice(head);
        b.copy_from_slice(body);
        Ok(end)
    }

    /// Sets header flags in an already built datagram (the sender marks retransmissions this way).
    pub fn set_flags(buf: &mut [u8], flags: u16) {
        buf[2..4].copy_from_slice(&flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header { kind: Kind::Data, flags: 0, stream: 7, session: 0xABCD }
    }

    #[test]
    fn rejects_sequences_out_of_range() {
        let mut buf = [0u8; 64];
        for (seq, msg_seq, low) in [(1 << 63, 0, 0), (5, 1 << 63, 0), (5, 0, 6)] {
            let n = DataWriter::begin(&mut buf, &header(), seq, msg_seq, low).unwrap();
            let n = DataWriter::push_frame(&mut buf, n, FRAME_FIRST | FRAME_LAST, b"x").unwrap();
            assert!(matches!(DataPacket::parse(&buf[..n]), Err(WireError::Malformed(_))), "{seq} {msg_seq} {low}");
        }
    }

    #[test]
    fn rejects_bad_frame_sequences() {
        let mut buf = [0u8; 128];
        let mut n = DataWriter::begin(&mut buf, &header(), 1, 2, 0).unwrap();
        n = DataWriter::push_frame(&mut buf, n, FRAME_FIRST, b"abc").unwrap();
        n = DataWriter::push_frame(&mut buf, n, FRAME_FIRST | FRAME_LAST, b"d").unwrap();
        // frame 0 not finished but followed by another frame
        assert!(matches!(DataPacket::parse(&buf[..n]), Err(WireError::Malformed(_))));

        let mut n = DataWriter::begin(&mut buf, &header(), 1, 2, 0).unwrap();
        n = DataWriter::push_frame(&mut buf, n, FRAME_FIRST | FRAME_LAST, b"abc").unwrap();
        n = DataWriter::push_frame(&mut buf, n, FRAME_LAST, b"d").unwrap();
        assert!(matches!(DataPacket::parse(&buf[..n]), Err(WireError::Malformed(_))));

        let n = DataWriter::begin(&mut buf, &header(), 1, 2, 0).unwrap();
        assert!(matches!(DataPacket::parse(&buf[..n]), Err(WireError::Malformed(_))));
        // length past end
        let n = DataWriter::push_frame(&mut buf, n, FRAME_FIRST | FRAME_LAST, b"abcdef").unwrap();
        assert!(matches!(DataPacket::parse(&buf[..n - 1]), Err(WireError::Malformed(_))));
    }

    fn frames_strategy() -> impl Strategy<Value = (bool, Vec<Vec<u8>>, bool)> {
        (any::<bool>(), proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..8), any::<bool>())
    }

    proptest! {
        #[test]
        fn emit_then_parse_is_identity(seq in 0u64..1 << 63, msg_seq in 0u64..1 << 63, low_back: u64, retx: bool,
                                       (cont, frames, open) in frames_strategy()) {
            let low = seq - low_back % (seq + 1);
            let mut buf = vec![0u8; 4096];
            let mut h = header();
            if retx { h.flags = crate::wire::FLAG_RETRANSMIT; }
            let mut n = DataWriter::begin(&mut buf, &h, seq, msg_seq, low).unwrap();
            let count = frames.len();
            let mut want = Vec::new();
            let mut last_at = 0;
            for (i, f) in frames.iter().enumerate() {
                let mut flags = FRAME_FIRST | FRAME_LAST;
                if i == 0 && cont { flags &= !FRAME_FIRST; }
                if i + 1 == count && open { flags &= !FRAME_LAST; }
                last_at = n;
                n = DataWriter::push_frame(&mut buf, n, flags, f).unwrap();
                want.push((flags, f.clone()));
            }
            let p = DataPacket::parse(&buf[..n]).unwrap();
            let last_whole = !(open || (count == 1 && cont));
            prop_assert_eq!(p.shape(), FrameShape { count, last_at, last_whole });
            prop_assert_eq!(p.header, h);
            prop_assert_eq!((p.seq, p.msg_seq, p.low), (seq, msg_seq, low));
            prop_assert_eq!(p.is_retransmit(), retx);
            let got: Vec<(u8, Vec<u8>)> = p.frames().map(|f| (f.flags, f.payload.to_vec())).collect();
            prop_assert_eq!(got, want);
        }
    }
}
