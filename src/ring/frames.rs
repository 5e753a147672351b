//! A publisher's ring: the same lock-free SPSC byte ring as [`super`], but its records are DATA frames as they
//! go on the wire (`[len u16 BE][flags][0][payload]`, PROTOCOL.md section 3.1), back to back with no header
//! or padding of the ring's own. The engine can then take every whole message that fits a datagram with one
//! copy, where a ring of records needs one copy and one routing step per message.
//!
//! Two kinds of frame never reach the wire; they are told apart by the reserved fourth byte, which is 0 in
//! every wire frame:
//! - [`PAD`]: the producer's filler before a wrap. A frame never crosses the end of the buffer: when one
//!   does not fit, the producer writes a padding frame over the rest of the lap (or, when fewer than 4 bytes
//!   are left, nothing: the consumer skips a tail that short by itself) and starts at index 0.
//! - [`MARKER`]: a frame whose payload travels elsewhere (a large message in a side channel); it holds its
//!   place in the order.
//!
//! Positions, synchronisation and every access to the buffer are the parent module's (`Writer`, `Reader`).
//! Committing a frame is a sequentially consistent exchange, so a full fence: every commit is followed by a
//! check whether the engine sleeps, which needs one.

use super::{Fenced, Reader, Writer, ends};
use crate::wire::FRAME_HEADER_LEN;

/// Fourth byte of a padding frame.
pub const PAD: u8 = 1;
/// Fourth byte of a marker frame.
pub const MARKER: u8 = 2;

/// Creates a frame ring of at least `capacity` bytes (rounded up to a power of two, at least 64).
pub fn frame_ring(capacity: usize) -> (FrameProducer, FrameConsumer) {
    let (w, r) = ends(capacity);
    // At most half the ring less a header, so that a frame always fits after a wrap; and what 16 bits say.
    let max_payload = (w.capacity() / 2 - FRAME_HEADER_LEN).min(u16::MAX as usize);
    (FrameProducer { w, max_payload }, FrameConsumer { r })
}

#[inline]
fn header(len: usize, flags: u8, kind: u8) -> [u8; FRAME_HEADER_LEN] {
    let [a, b] = (len as u16).to_be_bytes();
    [a, b, flags, kind]
}

/// The writing end.
pub struct FrameProducer {
    w: Writer,
    max_payload: usize,
}

/// Room claimed for one frame's payload; write it, then [`commit`](FrameClaim::commit). Dropping it without
/// committing abandons the space (nothing is published).
pub struct FrameClaim<'a> {
    producer: &'a mut FrameProducer,
    start: usize,
    len: usize,
}

impl FrameProducer {
    /// Largest payload a frame can carry: what its 16-bit length can say, and at most half the ring less a
    /// header, so that a frame always fits after a wrap.
    #[inline]
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Whether the consumer has taken everything.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.w.is_empty()
    }

    /// Whether a frame of `len` payload bytes could be claimed now (including a wrap).
    #[inline]
    pub fn has_room(&mut self, len: usize) -> bool {
        self.w.fits(FRAME_HEADER_LEN + len)
    }

    /// Claims room for a frame of `len` payload bytes, or `None` when the ring is too full now. Panics if
    /// `len` exceeds [`max_payload`](Self::max_payload) (a caller bug, not a runtime condition).
    #[inline]
    pub fn claim(&mut self, len: usize) -> Option<FrameClaim<'_>> {
        let start = self.reserve(len)?;
        Some(FrameClaim { producer: self, start, len })
    }

    /// Reserves room for a frame of `len` payload bytes (see [`claim`](Self::claim)); returns where its
    /// header goes.
    #[inline]
    fn reserve(&mut self, len: usize) -> Option<usize> {
        assert!(len <= self.max_payload, "frame of {len} bytes exceeds the ring's maximum");
        self.w.reserve(FRAME_HEADER_LEN + len, |w, to_end| {
            // A tail too short for a header stays unwritten (the reader skips it). Otherwise a padding frame:
            // `to_end < size <= max_payload + 4 <= 65,539`, so its length fits 16 bits.
            if to_end >= FRAME_HEADER_LEN {
                w.write(w.tail, &header(to_end - FRAME_HEADER_LEN, 0, PAD));
            }
        })
    }

    /// Writes a frame of `head` followed by `body` and commits it with `flags`, in one pass. Returns `None`
    /// when full. Panics like [`claim`](Self::claim).
    #[inline]
    pub fn push_parts(&mut self, flags: u8, head: &[u8], body: &[u8]) -> Option<Fenced> {
        let len = head.len() + body.len();
        let start = self.reserve(len)?;
        let at = start.wrapping_add(FRAME_HEADER_LEN);
        self.w.write(at, head);
        self.w.write(at.wrapping_add(head.len()), body);
        Some(self.publish(start, len, flags, 0))
    }

    /// Writes the header of the frame at `start` (its payload written) and publishes it.
    #[inline]
    fn publish(&mut self, start: usize, len: usize, flags: u8, kind: u8) -> Fenced {
        self.w.write(start, &header(len, flags, kind));
        self.w.publish_fenced(start.wrapping_add(FRAME_HEADER_LEN + len))
    }

    /// Publishes an empty [`MARKER`] frame. Returns `None` when full.
    #[inline]
    pub fn push_marker(&mut self) -> Option<Fenced> {
        Some(self.claim(0)?.commit_as(0, MARKER))
    }
}

impl FrameClaim<'_> {
    /// Publishes the frame with wire `flags`.
    #[inline]
    pub fn commit(self, flags: u8) -> Fenced {
        self.commit_as(flags, 0)
    }

    #[inline]
    fn commit_as(self, flags: u8, kind: u8) -> Fenced {
        self.producer.publish(self.start, self.len, flags, kind)
    }
}

impl std::ops::Deref for FrameClaim<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        self.producer.w.region(self.start.wrapping_add(FRAME_HEADER_LEN), self.len)
    }
}

impl std::ops::DerefMut for FrameClaim<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        self.producer.w.region_mut(self.start.wrapping_add(FRAME_HEADER_LEN), self.len)
    }
}

/// The reading end.
pub struct FrameConsumer {
    r: Reader,
}

impl FrameConsumer {
    /// Whether a frame is ready.
    #[inline]
    pub fn is_empty(&mut self) -> bool {
        self.peek().is_none()
    }

    /// The published frames from the oldest on, as far as the end of the buffer: whole frames back to back,
    /// the first of which is not padding (the last may be: it ends a lap). Take them with
    /// [`advance`](Self::advance).
    #[inline]
    pub fn peek(&mut self) -> Option<&[u8]> {
        loop {
            let ready = self.r.ready();
            if ready == 0 {
                return None;
            }
            let to_end = self.r.to_end();
            if to_end < FRAME_HEADER_LEN {
                // Too short for a frame: the producer skipped it.
                self.r.advance(to_end);
                continue;
            }
            let h = self.r.bytes(0, FRAME_HEADER_LEN);
            if h[3] == PAD {
                let skip = FRAME_HEADER_LEN + usize::from(u16::from_be_bytes([h[0], h[1]]));
                self.r.advance(skip);
                continue;
            }
            return Some(self.r.bytes(0, ready.min(to_end)));
        }
    }

    /// Frees the first `n` bytes of what [`peek`](Self::peek) showed (whole frames) for the producer.
    #[inline]
    pub fn advance(&mut self, n: usize) {
        self.r.advance(n);
    }
}

#[cfg(all(test, not(blip_loom)))]
mod tests {
    use super::*;
    use crate::wire::{FRAME_FIRST, FRAME_LAST};
    use std::time::{Duration, Instant};

    const WHOLE: u8 = FRAME_FIRST | FRAME_LAST;

    /// Splits peeked bytes into (flags, kind, payload) frames, leaving out padding (which may end a lap
    /// after other frames).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
            if bytes[3] != PAD {
                out.push((bytes[2], bytes[3], bytes[4..4 + len].to_vec()));
            }
            bytes = &bytes[4 + len..];
        }
        out
    }

    #[test]
    fn frames_are_wire_frames_back_to_back() {
        let (mut p, mut c) = frame_ring(64);
        assert_eq!(p.max_payload(), 28);
        assert!(p.push_parts(WHOLE, &[0, 0], b"abc").is_some());
        assert!(p.push_marker().is_some());
        assert!(p.push_parts(WHOLE, &[], b"xy").is_some());
        let got = c.peek().unwrap().to_vec();
        assert_eq!(got, [0, 5, WHOLE, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, MARKER, 0, 2, WHOLE, 0, b'x', b'y']);
        c.advance(got.len());
        assert!(c.peek().is_none());
        assert!(p.is_empty());
    }

    #[test]
    fn a_frame_that_does_not_fit_wraps_after_padding() {
        let (mut p, mut c) = frame_ring(64);
        assert!(p.push_parts(WHOLE, &[], &[1; 20]).is_some()); // 24 bytes
        assert!(p.push_parts(WHOLE, &[], &[2; 20]).is_some()); // 48
        assert!(p.push_parts(WHOLE, &[], &[3; 20]).is_none(), "16 bytes to the end, 0 free after them");
        let n = c.peek().unwrap().len();
        assert_eq!(n, 48);
        c.advance(24);
        assert!(p.push_parts(WHOLE, &[], &[3; 20]).is_some(), "pads the last 16 bytes and wraps");
        let got = frames(c.peek().unwrap());
        assert_eq!(got, vec![(WHOLE, 0, vec![2; 20])], "the padding is not shown");
        c.advance(24);
        assert_eq!(frames(c.peek().unwrap()), vec![(WHOLE, 0, vec![3; 20])]);
    }

    #[test]
    fn a_tail_shorter_than_a_header_is_skipped_by_both_ends() {
        let (mut p, mut c) = frame_ring(128);
        assert!(p.push_parts(WHOLE, &[], &[1; 60]).is_some()); // 64 bytes
        assert!(p.push_parts(WHOLE, &[], &[2; 57]).is_some()); // 125: 3 bytes left before the end
        let n = c.peek().unwrap().len();
        c.advance(n);
        assert!(p.push_parts(WHOLE, &[], &[3; 10]).is_some(), "wraps without a padding header");
        assert_eq!(frames(c.peek().unwrap()), vec![(WHOLE, 0, vec![3; 10])]);
    }

    #[test]
    fn frames_of_every_size_survive_many_laps() {
        let (mut p, mut c) = frame_ring(128);
        for round in 0..2000u32 {
            let len = (round as usize * 7) % 57;
            let body: Vec<u8> = (0..len).map(|i| (i as u32 ^ round) as u8).collect();
            assert!(p.push_parts(WHOLE, &round.to_le_bytes(), &body).is_some(), "round {round}");
            let got = frames(c.peek().unwrap());
            assert_eq!(got.len(), 1, "round {round}");
            assert_eq!(&got[0].2[..4], &round.to_le_bytes());
            assert_eq!(&got[0].2[4..], &body[..]);
            c.advance(4 + 4 + len);
        }
        assert!(c.peek().is_none());
    }

    /// As above, with the positions passing `usize::MAX` (after 4 GiB on a 32-bit target).
    #[test]
    fn frames_survive_the_wrap_of_the_positions() {
        let (w, r) = super::super::ends_from(128, usize::MAX - 200);
        let max_payload = w.capacity() / 2 - FRAME_HEADER_LEN;
        let (mut p, mut c) = (FrameProducer { w, max_payload }, FrameConsumer { r });
        for round in 0..2000u32 {
            let len = (round as usize * 7) % 57;
            assert!(p.push_parts(WHOLE, &round.to_le_bytes(), &vec![round as u8; len]).is_some(), "round {round}");
            let got = frames(c.peek().unwrap());
            assert_eq!(got, vec![(WHOLE, 0, [&round.to_le_bytes()[..], &vec![round as u8; len]].concat())]);
            c.advance(4 + 4 + len);
        }
        assert!(c.peek().is_none());
        assert!(p.w.tail < 1 << 20, "the positions wrapped");
    }

    /// A reader that frees more than was published would let the producer write over what it reads next:
    /// refused.
    #[test]
    #[should_panic(expected = "ring advanced past what is published")]
    fn advancing_past_what_is_published_panics() {
        let (mut p, mut c) = frame_ring(64);
        assert!(p.push_parts(WHOLE, &[], &[1; 8]).is_some());
        let n = c.peek().unwrap().len();
        c.advance(n + 4);
    }

    /// Two threads, a million frames of varying size: every frame arrives once, in order, intact.
    #[test]
    fn concurrent_producer_and_consumer() {
        const N: u32 = 1_000_000;
        let (mut p, mut c) = frame_ring(4096);
        let deadline = Instant::now() + Duration::from_secs(60);
        let t = std::thread::spawn(move || {
            let mut i = 0u32;
            while i < N {
                let len = 4 + (i as usize % 61);
                if let Some(mut claim) = p.claim(len) {
                    claim[..4].copy_from_slice(&i.to_le_bytes());
                    for b in claim[4..].iter_mut() {
                        *b = i as u8;
                    }
                    let _ = claim.commit(i as u8 & 3);
                    i += 1;
                } else {
                    assert!(Instant::now() < deadline, "producer starved");
                    std::hint::spin_loop();
                }
            }
        });
        let mut next = 0u32;
        while next < N {
            let Some(bytes) = c.peek() else {
                assert!(Instant::now() < deadline, "consumer starved at {next}");
                std::hint::spin_loop();
                continue;
            };
            let taken = bytes.len();
            for (flags, kind, payload) in frames(bytes) {
                let i = u32::from_le_bytes(payload[..4].try_into().unwrap());
                assert_eq!((i, flags, kind, payload.len()), (next, next as u8 & 3, 0, 4 + (next as usize % 61)));
                assert!(payload[4..].iter().all(|&b| b == i as u8));
                next += 1;
            }
            c.advance(taken);
        }
        t.join().unwrap();
    }
}
