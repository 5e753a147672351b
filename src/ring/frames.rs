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
//! Synchronisation is the parent module's: `tail` published with Release after the frame is written,
//! `head` with Release after the consumer is done with the bytes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Shared;
use crate::wire::FRAME_HEADER_LEN;

/// Fourth byte of a padding frame.
pub const PAD: u8 = 1;
/// Fourth byte of a marker frame.
pub const MARKER: u8 = 2;

/// Creates a frame ring of at least `capacity` bytes (rounded up to a power of two, at least 64).
pub fn frame_ring(capacity: usize) -> (FrameProducer, FrameConsumer) {
    let shared = Arc::new(Shared::new(capacity));
    (
        FrameProducer { shared: shared.clone(), tail: 0, cached_head: 0 },
        FrameConsumer { shared, head: 0, cached_tail: 0 },
    )
}

/// The writing end.
pub struct FrameProducer {
    shared: Arc<Shared>,
    tail: usize,
    cached_head: usize,
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
        (self.shared.capacity() / 2 - FRAME_HEADER_LEN).min(u16::MAX as usize)
    }

    /// Whether the consumer has taken everything.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.shared.head.load(Ordering::Acquire) == self.tail
    }

    #[inline]
    fn free(&mut self, need: usize) -> bool {
        let cap = self.shared.capacity();
        if self.tail + need - self.cached_head <= cap {
            return true;
        }
        self.cached_head = self.shared.head.load(Ordering::Acquire);
        self.tail + need - self.cached_head <= cap
    }

    /// Bytes needed now for a frame of `len` payload bytes: the frame, and the rest of the lap if it does
    /// not fit before the end.
    #[inline]
    fn need(&self, len: usize) -> usize {
        let size = FRAME_HEADER_LEN + len;
        let to_end = self.shared.capacity() - (self.tail & self.shared.mask);
        if size > to_end { to_end + size } else { size }
    }

    /// Whether a frame of `len` payload bytes could be claimed now.
    #[inline]
    pub fn has_room(&mut self, len: usize) -> bool {
        let need = self.need(len);
        self.free(need)
    }

    /// Claims room for a frame of `len` payload bytes, or `None` when the ring is too full now. Panics if
    /// `len` exceeds [`max_payload`](Self::max_payload) (a caller bug, not a runtime condition).
    #[inline]
    pub fn claim(&mut self, len: usize) -> Option<FrameClaim<'_>> {
        assert!(len <= self.max_payload(), "frame of {len} bytes exceeds the ring's maximum");
        let size = FRAME_HEADER_LEN + len;
        let cap = self.shared.capacity();
        let to_end = cap - (self.tail & self.shared.mask);
        if size > to_end {
            if !self.free(to_end + size) {
                return None;
            }
            if to_end >= FRAME_HEADER_LEN {
                // `to_end < size <= max_payload + 4 <= 65,539`, so the padding's length fits 16 bits.
                self.write_header(self.tail, (to_end - FRAME_HEADER_LEN) as u16, 0, PAD);
            }
            self.tail += to_end;
            self.shared.tail.store(self.tail, Ordering::Release);
        } else if !self.free(size) {
            return None;
        }
        let start = self.tail;
        Some(FrameClaim { producer: self, start, len })
    }

    #[inline]
    fn write_header(&self, pos: usize, len: u16, flags: u8, kind: u8) {
        let [a, b] = len.to_be_bytes();
        let h = [a, b, flags, kind];
        // SAFETY: `pos` lies in [tail, head + capacity), space the consumer does not read until the next
        // Release store of `tail`, and the 4 header bytes do not cross the end of the buffer (frames never
        // wrap; a padding header is only written when at least 4 bytes are left).
        unsafe { std::ptr::copy_nonoverlapping(h.as_ptr(), self.shared.ptr(pos), FRAME_HEADER_LEN) }
    }

    /// Claims a frame for `head` followed by `body`, copies both and commits it with `flags`, in one pass.
    /// Returns false when full. Panics like [`claim`](Self::claim).
    #[inline]
    pub fn push_parts(&mut self, flags: u8, head: &[u8], body: &[u8]) -> bool {
        match self.claim(head.len() + body.len()) {
            Some(mut c) => {
                let (h, b) = c.split_at_mut(head.len());
                h.copy_from_slice(head);
                b.copy_from_slice(body);
                c.commit(flags);
                true
            }
            None => false,
        }
    }

    /// Publishes an empty [`MARKER`] frame. Returns false when full.
    #[inline]
    pub fn push_marker(&mut self) -> bool {
        match self.claim(0) {
            Some(c) => {
                c.commit_as(0, MARKER);
                true
            }
            None => false,
        }
    }
}

impl FrameClaim<'_> {
    /// Publishes the frame with wire `flags`.
    #[inline]
    pub fn commit(self, flags: u8) {
        self.commit_as(flags, 0);
    }

    #[inline]
    fn commit_as(self, flags: u8, kind: u8) {
        let p = self.producer;
        p.write_header(self.start, self.len as u16, flags, kind);
        p.tail = self.start + FRAME_HEADER_LEN + self.len;
        p.shared.tail.store(p.tail, Ordering::Release);
    }
}

impl std::ops::Deref for FrameClaim<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: [start + 4, start + 4 + len) lies inside the claimed, unpublished region, which only this
        // producer touches; it does not cross the end of the buffer (checked in `claim`).
        unsafe { std::slice::from_raw_parts(self.producer.shared.ptr(self.start + FRAME_HEADER_LEN), self.len) }
    }
}

impl std::ops::DerefMut for FrameClaim<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only view of the region.
        unsafe { std::slice::from_raw_parts_mut(self.producer.shared.ptr(self.start + FRAME_HEADER_LEN), self.len) }
    }
}

/// The reading end.
pub struct FrameConsumer {
    shared: Arc<Shared>,
    head: usize,
    cached_tail: usize,
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
            if self.head == self.cached_tail {
                self.cached_tail = self.shared.tail.load(Ordering::Acquire);
                if self.head == self.cached_tail {
                    return None;
                }
            }
            let to_end = self.shared.capacity() - (self.head & self.shared.mask);
            if to_end < FRAME_HEADER_LEN {
                // Too short for a frame: the producer skipped it.
                self.advance(to_end);
                continue;
            }
            let len = (self.cached_tail - self.head).min(to_end);
            // SAFETY: [head, head + len) lies below the Acquire-loaded `tail`, so the producer finished
            // writing it and does not touch it until `head` moves past it; it does not cross the end.
            let bytes = unsafe { std::slice::from_raw_parts(self.shared.ptr(self.head), len) };
            if bytes[3] == PAD {
                let skip = FRAME_HEADER_LEN + usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
                self.advance(skip);
                continue;
            }
            // SAFETY: as above; the borrow of `self` keeps `advance` from running while the slice lives.
            return Some(unsafe { std::slice::from_raw_parts(self.shared.ptr(self.head), len) });
        }
    }

    /// Frees the first `n` bytes of what [`peek`](Self::peek) showed (whole frames) for the producer.
    #[inline]
    pub fn advance(&mut self, n: usize) {
        self.head += n;
        self.shared.head.store(self.head, Ordering::Release);
    }
}

#[cfg(test)]
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
        assert!(p.push_parts(WHOLE, &[0, 0], b"abc"));
        assert!(p.push_marker());
        assert!(p.push_parts(WHOLE, &[], b"xy"));
        let got = c.peek().unwrap().to_vec();
        assert_eq!(got, [0, 5, WHOLE, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, MARKER, 0, 2, WHOLE, 0, b'x', b'y']);
        c.advance(got.len());
        assert!(c.peek().is_none());
        assert!(p.is_empty());
    }

    #[test]
    fn a_frame_that_does_not_fit_wraps_after_padding() {
        let (mut p, mut c) = frame_ring(64);
        assert!(p.push_parts(WHOLE, &[], &[1; 20])); // 24 bytes
        assert!(p.push_parts(WHOLE, &[], &[2; 20])); // 48
        assert!(!p.push_parts(WHOLE, &[], &[3; 20]), "16 bytes to the end, 0 free after them");
        let n = c.peek().unwrap().len();
        assert_eq!(n, 48);
        c.advance(24);
        assert!(p.push_parts(WHOLE, &[], &[3; 20]), "pads the last 16 bytes and wraps");
        let got = frames(c.peek().unwrap());
        assert_eq!(got, vec![(WHOLE, 0, vec![2; 20])], "the padding is not shown");
        c.advance(24);
        assert_eq!(frames(c.peek().unwrap()), vec![(WHOLE, 0, vec![3; 20])]);
    }

    #[test]
    fn a_tail_shorter_than_a_header_is_skipped_by_both_ends() {
        let (mut p, mut c) = frame_ring(128);
        assert!(p.push_parts(WHOLE, &[], &[1; 60])); // 64 bytes
        assert!(p.push_parts(WHOLE, &[], &[2; 57])); // 125: 3 bytes left before the end
        let n = c.peek().unwrap().len();
        c.advance(n);
        assert!(p.push_parts(WHOLE, &[], &[3; 10]), "wraps without a padding header");
        assert_eq!(frames(c.peek().unwrap()), vec![(WHOLE, 0, vec![3; 10])]);
    }

    #[test]
    fn frames_of_every_size_survive_many_laps() {
        let (mut p, mut c) = frame_ring(128);
        for round in 0..2000u32 {
            let len = (round as usize * 7) % 57;
            let body: Vec<u8> = (0..len).map(|i| (i as u32 ^ round) as u8).collect();
            assert!(p.push_parts(WHOLE, &round.to_le_bytes(), &body), "round {round}");
            let got = frames(c.peek().unwrap());
            assert_eq!(got.len(), 1, "round {round}");
            assert_eq!(&got[0].2[..4], &round.to_le_bytes());
            assert_eq!(&got[0].2[4..], &body[..]);
            c.advance(4 + 4 + len);
        }
        assert!(c.peek().is_none());
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
                    claim.commit(i as u8 & 3);
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
