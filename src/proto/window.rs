//! The retransmission window: a fixed ring of encoded datagrams, allocated once when the sender is created.
//!
//! Datagram `seq` lives in slot `seq % capacity`. The sender builds new datagrams directly in their slot,
//! transmits them by copying out, and answers NAKs by copying out again, so the stored bytes are exactly
//! what went on the wire.

use std::time::Instant;

pub(crate) struct Window {
    bytes: Box<[u8]>,
    lens: Box<[u16]>,
    /// When each slot was last retransmitted, for the NAK linger.
    retransmitted_at: Box<[Option<Instant>]>,
    slot_size: usize,
    capacity: usize,
    /// `(seq, byte offset of its slot)` of the datagram being built: saves a division per appended message.
    building: (u64, usize),
}

impl Window {
    pub(crate) fn new(capacity: usize, slot_size: usize) -> Window {
        Window {
            bytes: vec![0u8; capacity * slot_size].into_boxed_slice(),
            lens: vec![0u16; capacity].into_boxed_slice(),
            retransmitted_at: vec![None; capacity].into_boxed_slice(),
            slot_size,
            capacity,
            building: (0, 0),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    fn index(&self, seq: u64) -> usize {
        (seq % self.capacity as u64) as usize
    }

    /// The whole slot for `seq`, to build a datagram in; resets its length and linger stamp.
    pub(crate) fn slot_mut(&mut self, seq: u64) -> &mut [u8] {
        let i = self.index(seq);
        self.lens[i] = 0;
        self.retransmitted_at[i] = None;
        &mut self.bytes[i * self.slot_size..(i + 1) * self.slot_size]
    }

    /// The slot for `seq` as it is being built (length unchanged).
    #[inline(always)]
    pub(crate) fn building_mut(&mut self, seq: u64) -> &mut [u8] {
        let at = if self.building.0 == seq {
            self.building.1
        } else {
            let at = self.index(seq) * self.slot_size;
            self.building = (seq, at);
            at
        };
        &mut self.bytes[at..at + self.slot_size]
    }

    pub(crate) fn set_len(&mut self, seq: u64, len: usize) {
        let i = self.index(seq);
        self.lens[i] = len as u16;
    }

    /// The stored datagram for `seq`.
    pub(crate) fn datagram(&self, seq: u64) -> &[u8] {
        let i = self.index(seq);
        &self.bytes[i * self.slot_size..i * self.slot_size + self.lens[i] as usize]
    }

    /// Records a retransmission of `seq` unless one happened less than `linger` ago; returns whether the
    /// caller should retransmit.
    pub(crate) fn claim_retransmit(&mut self, seq: u64, now: Instant, linger: std::time::Duration) -> bool {
        let i = self.index(seq);
        match self.retransmitted_at[i] {
            Some(at) if now.saturating_duration_since(at) < linger => false,
            _ => {
                self.retransmitted_at[i] = Some(now);
                true
            }
        }
    }
}
