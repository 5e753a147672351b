//! A bounded lock-free single-producer/single-consumer ring of variable-length records, claim/commit style:
//! the producer claims space, writes a record in place, and commits it; the consumer reads records in place
//! and releases them. It carries deliveries from the engine to application threads; [`frames`] is its
//! variant for messages from a publisher to the engine, whose records are wire frames.
//!
//! Layout: a power-of-two byte buffer; positions are ever-increasing `usize` counters (masked to index), so
//! full and empty are told apart without a spare slot. They wrap around (on a 32-bit target after 4 GiB),
//! so they are added and subtracted modulo `usize::MAX + 1`: the distance from head to tail stays right.
//! Each record is an 8-byte header (`len: u32`, `tag: u32`) followed by the payload, padded to 8 bytes. A record never wraps: when it does not fit before
//! the end of the buffer, the producer writes a padding record to the end and starts at index 0.
//!
//! Synchronisation: the producer publishes a record with a Release store of `tail` after writing it (the
//! frame ring, with a SeqCst exchange that is also the fence its wake check needs: [`Fenced`]); the
//! consumer Acquire-loads `tail` before reading. Symmetrically the consumer frees space with a Release store
//! of `head`. Each side caches the other's counter and reloads it only when the cache says "full"/"empty".
//! The counters sit on their own cache lines (crossbeam's `CachePadded`) so the two threads do not
//! false-share. `loom_tests` model-checks both rings (`--cfg blip_loom`).

use std::cell::UnsafeCell;

// Under `--cfg blip_loom` the positions are loom's atomics, so that `loom_tests` can explore every
// interleaving of a producer and a consumer.
#[cfg(blip_loom)]
use loom::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
#[cfg(not(blip_loom))]
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use crossbeam_utils::CachePadded;

pub mod frames;
#[cfg(all(test, blip_loom))]
mod loom_tests;

/// Proof that a record was just published by a sequentially consistent exchange, which is also a full
/// fence. A check of whether the consumer went to sleep needs one between the publish and its own
/// (SeqCst) load of the consumer's flag, against the consumer's store of that flag, fence and re-check of
/// the ring; the engine's wake check takes this proof, so that it cannot follow a publish without it.
#[must_use = "a publish is followed by a check whether the consumer sleeps"]
#[derive(Debug)]
pub struct Fenced(());

const HEADER: usize = 8;
const ALIGN: usize = 8;
/// Tag of the padding record written before a wrap; never seen by users.
const PAD: u32 = u32::MAX;

struct Shared {
    buf: Box<[UnsafeCell<u8>]>,
    mask: usize,
    head: CachePadded<AtomicUsize>,
    tail: CachePadded<AtomicUsize>,
    /// Under loom, one cell per byte of `buf`, touched wherever the byte is read or written, for loom's
    /// race detector: the bytes stay in `buf`, where the rings hand out slices of many bytes.
    #[cfg(blip_loom)]
    track: Box<[loom::cell::UnsafeCell<()>]>,
}

// SAFETY: the buffer is only accessed through a `Writer` (bytes in [tail, head + capacity)) and a `Reader`
// (bytes in [head, tail)); these ranges are disjoint and handed over with Release/Acquire on `tail`/`head`.
unsafe impl Sync for Shared {}
// SAFETY: same argument; the cells hold plain bytes.
unsafe impl Send for Shared {}

impl Shared {
    /// A buffer of at least `capacity` bytes (a power of two, at least 64), both positions at 0.
    fn new(capacity: usize) -> Shared {
        let cap = capacity.max(64).next_power_of_two();
        Shared {
            buf: (0..cap).map(|_| UnsafeCell::new(0)).collect(),
            mask: cap - 1,
            head: CachePadded::new(AtomicUsize::new(0)),
            tail: CachePadded::new(AtomicUsize::new(0)),
            #[cfg(blip_loom)]
            track: (0..cap).map(|_| loom::cell::UnsafeCell::new(())).collect(),
        }
    }

    /// Tells loom that bytes [pos, pos + len) are written (or read) now.
    #[cfg(blip_loom)]
    fn touch(&self, pos: usize, len: usize, write: bool) {
        for i in (0..len).map(|k| pos.wrapping_add(k)) {
            let cell = &self.track[i & self.mask];
            if write {
                cell.with_mut(|_| ());
            } else {
                cell.with(|_| ());
            }
        }
    }

    #[cfg(not(blip_loom))]
    #[inline(always)]
    fn touch(&self, _pos: usize, _len: usize, _write: bool) {}

    #[inline]
    fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Where byte `pos` (masked) lives, derived from the buffer's base pointer so that the accesses made
    /// through it may span many bytes.
    #[inline]
    fn ptr(&self, pos: usize) -> *mut u8 {
        // SAFETY: `pos & mask` is below the buffer's length (a power of two, `mask + 1`), so the offset stays
        // inside the allocation.
        UnsafeCell::raw_get(unsafe { self.buf.as_ptr().add(pos & self.mask) })
    }
}

/// The producer's side of a ring's positions, whatever its record format: where it writes next, the space
/// it may use, and publishing. Every write to the buffer goes through here.
struct Writer {
    shared: Arc<Shared>,
    tail: usize,
    cached_head: usize,
}

impl Writer {
    #[inline]
    fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Bytes from `tail` to the end of the buffer.
    #[inline]
    fn to_end(&self) -> usize {
        self.capacity() - (self.tail & self.shared.mask)
    }

    /// Whether `need` bytes from `tail` are free (re-reading the consumer's position only when the cached
    /// one says no).
    #[inline]
    fn free(&mut self, need: usize) -> bool {
        let cap = self.capacity();
        if self.tail.wrapping_sub(self.cached_head) + need <= cap {
            return true;
        }
        self.cached_head = self.shared.head.load(Ordering::Acquire);
        self.tail.wrapping_sub(self.cached_head) + need <= cap
    }

    /// Whether `size` bytes that must not cross the end of the buffer could be reserved now.
    #[inline]
    fn fits(&mut self, size: usize) -> bool {
        let to_end = self.to_end();
        self.free(if size > to_end { to_end + size } else { size })
    }

    /// Reserves `size` bytes that do not cross the end of the buffer: when they would, the rest of the lap
    /// is given up first (`pad(self, to_end)` writes whatever filler the format needs there) and the room
    /// starts at index 0. Returns where it starts, or `None` when the ring is too full now.
    #[inline]
    fn reserve(&mut self, size: usize, pad: impl FnOnce(&Writer, usize)) -> Option<usize> {
        let to_end = self.to_end();
        if size > to_end {
            if !self.free(to_end + size) {
                return None;
            }
            pad(self, to_end);
            self.publish(self.tail.wrapping_add(to_end));
        } else if !self.free(size) {
            return None;
        }
        Some(self.tail)
    }

    /// Free bytes now (the consumer's position freshly read).
    #[inline]
    fn free_bytes(&mut self) -> usize {
        self.cached_head = self.shared.head.load(Ordering::Acquire);
        self.capacity() - self.tail.wrapping_sub(self.cached_head)
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.shared.head.load(Ordering::Acquire) == self.tail
    }

    /// Copies `bytes` to `pos`, in space this writer has checked free and not yet published, not crossing the
    /// end of the buffer.
    #[inline]
    fn write(&self, pos: usize, bytes: &[u8]) {
        debug_assert!((pos & self.shared.mask) + bytes.len() <= self.capacity());
        self.shared.touch(pos, bytes.len(), true);
        // SAFETY: the caller keeps [pos, pos + len) inside [tail, head + capacity), space the reader does not
        // touch until the next Release store of `tail`, and before the end of the buffer (records never wrap).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.shared.ptr(pos), bytes.len()) }
    }

    /// The unpublished region [pos, pos + len), under the same conditions as [`write`](Self::write).
    #[inline]
    fn region(&self, pos: usize, len: usize) -> &[u8] {
        debug_assert!((pos & self.shared.mask) + len <= self.capacity());
        self.shared.touch(pos, len, false);
        // SAFETY: as in `write`; the region is not published, so only this writer sees it, and nothing writes
        // to it while the slice lives: the claims that hand it out hold the producer by `&mut`, and their
        // own writes (commit) consume them.
        unsafe { std::slice::from_raw_parts(self.shared.ptr(pos), len) }
    }

    /// [`region`](Self::region), writable; `&mut self` makes it the only view.
    #[inline]
    fn region_mut(&mut self, pos: usize, len: usize) -> &mut [u8] {
        debug_assert!((pos & self.shared.mask) + len <= self.capacity());
        self.shared.touch(pos, len, true);
        // SAFETY: as in `region`.
        unsafe { std::slice::from_raw_parts_mut(self.shared.ptr(pos), len) }
    }

    /// Hands everything before `tail` to the reader.
    #[inline]
    fn publish(&mut self, tail: usize) {
        self.tail = tail;
        self.shared.tail.store(tail, Ordering::Release);
    }

    /// [`publish`](Self::publish) as a sequentially consistent read-modify-write, which is also a full
    /// fence: a producer that next checks whether its consumer went to sleep needs one between the two, and
    /// a locked exchange costs less than a release store followed by `fence(SeqCst)` (`mfence` on x86).
    #[inline]
    fn publish_fenced(&mut self, tail: usize) -> Fenced {
        self.tail = tail;
        self.shared.tail.swap(tail, Ordering::SeqCst);
        Fenced(())
    }
}

/// The consumer's side of a ring's positions: what is published, reading it, freeing it.
struct Reader {
    shared: Arc<Shared>,
    head: usize,
    cached_tail: usize,
}

impl Reader {
    /// Published bytes from `head` (re-reading the producer's position only when the cached one says none).
    #[inline]
    fn ready(&mut self) -> usize {
        if self.head == self.cached_tail {
            self.cached_tail = self.shared.tail.load(Ordering::Acquire);
        }
        self.cached_tail.wrapping_sub(self.head)
    }

    /// Bytes from `head` to the end of the buffer.
    #[inline]
    fn to_end(&self) -> usize {
        self.shared.capacity() - (self.head & self.shared.mask)
    }

    /// The published bytes [head + offset, head + offset + len), which must not cross the end of the buffer.
    /// Panics otherwise: the rings' public readers reach here with lengths read from the buffer and counts
    /// given by their callers, and a slice past `tail` would overlap what the producer is writing.
    #[inline]
    fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        let avail = self.cached_tail.wrapping_sub(self.head).min(self.to_end());
        assert!(offset <= avail && len <= avail - offset, "ring read past what is published");
        let at = self.head.wrapping_add(offset);
        self.shared.touch(at, len, false);
        // SAFETY: the range (checked above) lies below the Acquire-loaded `tail`, so the producer finished
        // writing it and does not touch it until `head` moves past it (only `advance`, which needs `&mut
        // self`, moves it); it does not cross the end of the buffer.
        unsafe { std::slice::from_raw_parts(self.shared.ptr(at), len) }
    }

    /// Frees `n` bytes from `head` for the producer. Panics past what is published: `head` beyond `tail`
    /// would let [`bytes`](Self::bytes) and the producer's room check go wrong.
    #[inline]
    fn advance(&mut self, n: usize) {
        assert!(n <= self.cached_tail.wrapping_sub(self.head), "ring advanced past what is published");
        self.head = self.head.wrapping_add(n);
        self.shared.head.store(self.head, Ordering::Release);
    }
}

/// Both ends of a new buffer of at least `capacity` bytes.
fn ends(capacity: usize) -> (Writer, Reader) {
    ends_from(capacity, 0)
}

/// [`ends`] with both positions at `start` (tests start near the wrap of the counters). The record ring
/// needs `start` to be a multiple of 8, as its positions always are.
fn ends_from(capacity: usize, start: usize) -> (Writer, Reader) {
    let shared = Arc::new(Shared::new(capacity));
    shared.head.store(start, Ordering::Relaxed);
    shared.tail.store(start, Ordering::Relaxed);
    (
        Writer { shared: shared.clone(), tail: start, cached_head: start },
        Reader { shared, head: start, cached_tail: start },
    )
}

/// Creates a ring of at least `capacity` bytes (rounded up to a power of two, at least 64).
pub fn ring(capacity: usize) -> (Producer, Consumer) {
    let (w, r) = ends(capacity);
    (Producer { w }, Consumer { r })
}

#[inline]
fn padded(len: usize) -> usize {
    (HEADER + len + ALIGN - 1) & !(ALIGN - 1)
}

#[inline]
fn header(len: usize, tag: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&(len as u32).to_ne_bytes());
    h[4..].copy_from_slice(&tag.to_ne_bytes());
    h
}

/// The writing end.
pub struct Producer {
    w: Writer,
}

/// Space claimed in the ring; write the record, then [`commit`](Claim::commit) it. Dropping it without
/// committing abandons the space (nothing is published).
pub struct Claim<'a> {
    producer: &'a mut Producer,
    start: usize,
    len: usize,
}

impl Producer {
    /// Largest payload a record can carry: half the ring, so a record always fits after a wrap.
    #[inline]
    pub fn max_record(&self) -> usize {
        self.w.capacity() / 2 - HEADER
    }

    /// Whether the consumer has released everything (the ring is empty).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.w.is_empty()
    }

    /// Free bytes now (the consumer's position freshly read). Records of `padded` sizes adding up to
    /// `free_bytes() - W` can all be claimed, where `W` bounds the padded size of each: at most one wrap
    /// happens before that much is used, and it wastes less than one record.
    #[inline]
    pub fn free_bytes(&mut self) -> usize {
        self.w.free_bytes()
    }

    /// Bytes a record of `len` payload bytes takes in the ring (header and padding included).
    #[inline]
    pub fn record_size(len: usize) -> usize {
        padded(len)
    }

    /// Whether a `len`-byte record could be claimed now (including a wrap).
    #[inline]
    pub fn has_room(&mut self, len: usize) -> bool {
        self.w.fits(padded(len))
    }

    /// Claims space for a `len`-byte payload, or `None` when the ring is too full now. Panics if `len`
    /// exceeds [`max_record`](Self::max_record) (a caller bug, not a runtime condition).
    #[inline]
    pub fn claim(&mut self, len: usize) -> Option<Claim<'_>> {
        assert!(len <= self.max_record(), "record of {len} bytes exceeds the ring's maximum");
        // A padding record fills the lap's end (positions are 8-aligned, so there is room for its header).
        let start = self.w.reserve(padded(len), |w, to_end| w.write(w.tail, &header(to_end - HEADER, PAD)))?;
        Some(Claim { producer: self, start, len })
    }

    /// Claims room for `head` followed by `body`, copies both and commits with `tag`, in one pass (no
    /// intermediate buffer). Returns false when full. Panics like [`claim`](Self::claim).
    #[inline]
    pub fn push_parts(&mut self, tag: u32, head: &[u8], body: &[u8]) -> bool {
        match self.claim(head.len() + body.len()) {
            Some(mut c) => {
                let (h, b) = c.split_at_mut(head.len());
                h.copy_from_slice(head);
                b.copy_from_slice(body);
                c.commit(tag);
                true
            }
            None => false,
        }
    }

    /// Convenience: claims, copies `payload`, and commits with `tag`. Returns false when full.
    #[inline]
    pub fn push(&mut self, tag: u32, payload: &[u8]) -> bool {
        match self.claim(payload.len()) {
            Some(mut c) => {
                c.copy_from_slice(payload);
                c.commit(tag);
                true
            }
            None => false,
        }
    }
}

impl Claim<'_> {
    /// Publishes the record with `tag` (any value but `u32::MAX`, which is reserved).
    #[inline]
    pub fn commit(self, tag: u32) {
        assert_ne!(tag, PAD, "tag u32::MAX is reserved");
        let w = &mut self.producer.w;
        w.write(self.start, &header(self.len, tag));
        w.publish(self.start.wrapping_add(padded(self.len)));
    }
}

impl std::ops::Deref for Claim<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        self.producer.w.region(self.start.wrapping_add(HEADER), self.len)
    }
}

impl std::ops::DerefMut for Claim<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        self.producer.w.region_mut(self.start.wrapping_add(HEADER), self.len)
    }
}

/// The reading end.
pub struct Consumer {
    r: Reader,
}

/// A record read in place; [`release`](Record::release) frees its space. Dropping without releasing leaves
/// it at the front of the ring.
pub struct Record<'a> {
    consumer: &'a mut Consumer,
    tag: u32,
    len: usize,
}

impl Consumer {
    /// Whether a record is ready.
    #[inline]
    pub fn is_empty(&mut self) -> bool {
        self.peek().is_none()
    }

    /// The oldest record, if any.
    #[inline]
    pub fn peek(&mut self) -> Option<Record<'_>> {
        loop {
            if self.r.ready() == 0 {
                return None;
            }
            let h = self.r.bytes(0, HEADER);
            let len = u32::from_ne_bytes(h[..4].try_into().unwrap()) as usize;
            let tag = u32::from_ne_bytes(h[4..].try_into().unwrap());
            if tag == PAD {
                self.r.advance(HEADER + len);
                continue;
            }
            return Some(Record { consumer: self, tag, len });
        }
    }
}

impl Record<'_> {
    /// The tag given at commit.
    #[inline]
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// Frees the record's space for the producer.
    #[inline]
    pub fn release(self) {
        self.consumer.r.advance(padded(self.len));
    }
}

impl std::ops::Deref for Record<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        self.consumer.r.bytes(HEADER, self.len)
    }
}

// Under `blip_loom` only `loom_tests` can run: loom's atomics panic outside a model.
#[cfg(all(test, not(blip_loom)))]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Records through a ring whose positions pass `usize::MAX` (after 4 GiB on a 32-bit target): lengths
    /// that keep the records from lining up with the wrap of the buffer, each read back whole.
    #[test]
    fn positions_wrap_around() {
        let (w, r) = ends_from(256, 0usize.wrapping_sub(304));
        let (mut p, mut c) = (Producer { w }, Consumer { r });
        for i in 0..2_000u32 {
            let len = (i as usize * 7) % 60;
            assert!(p.push(i, &vec![i as u8; len]), "record {i}");
            let rec = c.peek().expect("a record");
            assert_eq!((rec.tag(), &rec[..]), (i, &vec![i as u8; len][..]), "record {i}");
            rec.release();
            assert!(c.peek().is_none());
        }
        assert!(p.w.tail < 1 << 20, "the positions wrapped");
    }

    #[test]
    fn fills_wraps_and_empties() {
        let (mut p, mut c) = ring(64);
        assert_eq!(p.max_record(), 24);
        assert!(p.push(1, &[1; 20]));
        assert!(p.push(2, &[2; 20]));
        assert!(!p.push(3, &[3; 20]), "64 bytes hold two 32-byte records");
        let r = c.peek().unwrap();
        assert_eq!((r.tag(), &r[..]), (1, &[1u8; 20][..]));
        r.release();
        assert!(p.push(3, &[3; 20]), "wraps into the freed space");
        for want in [2u32, 3] {
            let r = c.peek().unwrap();
            assert_eq!(r.tag(), want);
            assert!(r.iter().all(|&b| b == want as u8));
            r.release();
        }
        assert!(c.peek().is_none());
        assert!(p.is_empty());
    }

    #[test]
    fn wrap_with_padding_keeps_records_whole() {
        let (mut p, mut c) = ring(128);
        for round in 0..1000u32 {
            let len = (round as usize * 7) % 50;
            let payload: Vec<u8> = (0..len).map(|i| (i as u32 + round) as u8).collect();
            assert!(p.push(round, &payload));
            let r = c.peek().unwrap();
            assert_eq!(r.tag(), round);
            assert_eq!(&r[..], &payload[..]);
            r.release();
        }
    }

    /// Two threads, a million records of varying size: every record arrives once, in order, intact.
    #[test]
    fn concurrent_producer_and_consumer() {
        const N: u32 = 1_000_000;
        let (mut p, mut c) = ring(4096);
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
                    claim.commit(i % 7);
                    i += 1;
                } else {
                    assert!(Instant::now() < deadline, "producer starved");
                    std::hint::spin_loop();
                }
            }
        });
        let mut next = 0u32;
        while next < N {
            match c.peek() {
                Some(r) => {
                    let i = u32::from_le_bytes(r[..4].try_into().unwrap());
                    assert_eq!(i, next);
                    assert_eq!(r.tag(), i % 7);
                    assert_eq!(r.len(), 4 + (i as usize % 61));
                    assert!(r[4..].iter().all(|&b| b == i as u8));
                    r.release();
                    next += 1;
                }
                None => {
                    assert!(Instant::now() < deadline, "consumer starved at {next}");
                    std::hint::spin_loop();
                }
            }
        }
        t.join().unwrap();
    }
}
