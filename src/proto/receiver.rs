//! The receiving half: one [`Stream`] per remote sender session. It buffers datagrams in a fixed ring
//! indexed by sequence, delivers messages in order (reassembling fragments), detects gaps from sequence
//! numbers and heartbeats, schedules NAKs with a random backoff (held back when another receiver already
//! asked), reports losses it can no longer repair, and reports its position to the sender.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use super::config::{Config, LateJoin};
use super::peers::PeerCounters;
use super::rng::Rng;
use super::{Stats, earliest};
use crate::wire::{
    DATA_HEADER_LEN, DataPacket, FrameShape, HeartbeatRepr, MAX_NAK_RANGES, NakPacket, SeqRange, data::frame_at,
};

/// One slot of the receive ring. It describes sequence `seq` once `seq < Stream::marked`.
struct Slot {
    seq: u64,
    filled: bool,
    /// When to NAK this datagram if it is still missing.
    nak_at: Instant,
    /// When this receiver first asked for it, if it did, and whether it asked again since (a repair then
    /// says nothing reliable about the repair time: Karn's rule).
    asked: Option<(Instant, bool)>,
    /// The whole datagram as received (header included); capacity is reused lap after lap.
    bytes: Vec<u8>,
    /// Its frames as validation found them.
    shape: FrameShape,
}

/// The time from a NAK to its repair, smoothed as RFC 6298 smooths round-trip times (gains 1/8 and 1/4).
#[derive(Debug, Clone, Copy, Default)]
struct RepairTime {
    smoothed: Option<Duration>,
    deviation: Duration,
}

impl RepairTime {
    fn sample(&mut self, r: Duration) {
        match self.smoothed {
            None => {
                self.smoothed = Some(r);
                self.deviation = r / 2;
            }
            Some(s) => {
                self.deviation = self.deviation.saturating_mul(3).saturating_add(s.abs_diff(r)) / 4;
                self.smoothed = Some(s.saturating_mul(7).saturating_add(r) / 8);
            }
        }
    }

    /// The smoothed time and four deviations, once a repair has been timed.
    fn timeout(&self) -> Option<Duration> {
        self.smoothed.map(|s| s.saturating_add(self.deviation.saturating_mul(4)))
    }
}

/// What the next delivery step produced, as positions (the borrow is taken afterwards).
pub(crate) enum Step {
    /// A whole message inside a stored datagram: slot index and byte range.
    Message { slot: usize, range: Range<usize>, seq: u64 },
    /// Consecutive whole messages inside a stored datagram (two or more): slot index, the byte range of
    /// their frames, the first message's sequence and how many there are.
    Run { slot: usize, frames: Range<usize>, seq: u64, count: u64 },
    /// A reassembled message in the stream's reassembly buffer.
    Reassembled { seq: u64 },
    /// Datagrams that can no longer be repaired.
    Loss { datagrams: Range<u64>, messages: Option<Range<u64>> },
}

pub(crate) struct Stream {
    pub(crate) session: u64,
    pub(crate) addr: SocketAddr,
    /// Next datagram to consume.
    next_deliver: u64,
    /// `(seq, index(seq))` of the last datagram `poll` looked at: saves a division per delivered message.
    deliver_index: (u64, usize),
    /// Byte offset of the next frame in datagram `next_deliver` (0: not started).
    cursor: usize,
    /// Index of the next frame in datagram `next_deliver`.
    frame_index: u64,
    /// One past the highest datagram known to exist (from data or heartbeats).
    high: u64,
    /// Slots for `next_deliver..marked` describe their sequence; `marked == min(high, next_deliver + cap)`.
    marked: u64,
    sender_low: u64,
    /// The most datagrams the sender was seen to retain (`seq + 1 - low`): its window, once full.
    sender_span: u64,
    sender_receivers: u32,
    slots: Box<[Slot]>,
    /// Next message sequence to deliver (None until the first datagram is consumed).
    next_msg: Option<u64>,
    reassembly: Vec<u8>,
    reassembling: bool,
    /// Datagrams skipped as unrecoverable, reported when the next datagram arrives (its message sequence
    /// closes the lost message range): first lost datagram and first lost message.
    pending_loss: Option<(u64, Option<u64>)>,
    /// The message being reassembled exceeds `max_message`: its remaining fragments are discarded and it is
    /// reported as lost.
    oversized: bool,
    /// First datagram of the message being reassembled.
    reassembly_start: u64,
    /// Bytes of `reassembly` charged to the endpoint's reassembly budget.
    reassembly_charged: usize,
    /// The sender's next message sequence, from its heartbeats (closes a loss at the tail of a gone sender).
    sender_next_msg: Option<u64>,
    /// The sender went silent for `sender_timeout` with data still undelivered: everything missing is lost.
    gone: bool,
    /// How long repairs take to arrive after this receiver's NAK (PROTOCOL.md 5.5).
    repair_time: RepairTime,
    /// Earliest `nak_at` among missing slots (a lower bound: may be early, never late).
    nak_due: Option<Instant>,
    pub(crate) last_heard: Instant,
    now: Instant,
    status_at: Instant,
    status_pos: u64,
    /// What was exchanged with this sender, for `Endpoint::peer_stats`.
    pub(crate) peer: PeerCounters,
}

impl Stream {
    fn new(session: u64, addr: SocketAddr, start: u64, now: Instant, cap: usize) -> Stream {
        let slots = (0..cap)
            .map(|_| Slot {
                seq: u64::MAX,
                filled: false,
                nak_at: now,
                asked: None,
                bytes: Vec::new(),
                shape: FrameShape::default(),
            })
            .collect();
        Stream {
            session,
            addr,
            next_deliver: start,
            deliver_index: (start, (start % cap as u64) as usize),
            cursor: 0,
            frame_index: 0,
            high: start,
            marked: start,
            sender_low: 0,
            sender_span: 1,
            sender_receivers: 0,
            slots,
            next_msg: None,
            reassembly: Vec::new(),
            reassembling: false,
            pending_loss: None,
            oversized: false,
            reassembly_start: start,
            reassembly_charged: 0,
            sender_next_msg: None,
            gone: false,
            repair_time: RepairTime::default(),
            nak_due: None,
            last_heard: now,
            now,
            status_at: now, // report at once: the sender must know us before it evicts what we need
            status_pos: start,
            peer: PeerCounters::default(),
        }
    }

    fn cap(&self) -> u64 {
        self.slots.len() as u64
    }

    fn index(&self, seq: u64) -> usize {
        (seq % self.cap()) as usize
    }

    fn is_missing(&self, seq: u64) -> bool {
        let s = &self.slots[self.index(seq)];
        s.seq == seq && !s.filled
    }

    /// How long to wait for a repair before asking again (PROTOCOL.md 5.5): `nak_retry` until a repair time
    /// has been measured, then the smoothed repair time and four deviations on top of the retransmission
    /// linger (a sender answers repeated NAKs for a datagram once per linger, so asking sooner is wasted),
    /// never more than `nak_retry`.
    fn nak_retry(&self, cfg: &Config) -> Duration {
        match self.repair_time.timeout() {
            Some(t) => cfg.retransmit_linger.saturating_add(t).min(cfg.nak_retry),
            None => cfg.nak_retry,
        }
    }

    /// Random delay before the first NAK. With one receiver (as the sender's heartbeat tells) there is no one
    /// to suppress, so the NAK goes at once.
    fn nak_delay(&self, cfg: &Config, rng: &mut Rng) -> Duration {
        if self.sender_receivers == 1 {
            Duration::ZERO
        } else {
            Duration::from_nanos(rng.below_nanos(cfg.nak_backoff.as_nanos() as u64))
        }
    }

    /// Describes every slot up to `min(high, next_deliver + cap)`; the ones now known to exist but not
    /// received get a NAK timer. `arriving` is the datagram being stored right now (no timer for it).
    fn extend_marks(&mut self, cfg: &Config, rng: &mut Rng, arriving: Option<u64>) {
        let limit = self.high.min(self.next_deliver + self.cap());
        while self.marked < limit {
            let seq = self.marked;
            let nak_at = if Some(seq) == arriving { self.now } else { self.now + self.nak_delay(cfg, rng) };
            let i = self.index(seq);
            let slot = &mut self.slots[i];
            slot.seq = seq;
            slot.filled = false;
            slot.nak_at = nak_at;
            slot.asked = None;
            if Some(seq) != arriving {
                self.nak_due = earliest(self.nak_due, Some(nak_at));
            }
            self.marked += 1;
        }
    }

    /// `low` is the oldest datagram the sender retains and `end` one past its newest.
    fn note_sender_window(&mut self, low: u64, end: u64) {
        self.sender_low = self.sender_low.max(low);
        self.sender_span = self.sender_span.max(end.saturating_sub(low));
    }

    pub(crate) fn handle_data(
        &mut self,
        now: Instant,
        cfg: &Config,
        rng: &mut Rng,
        pkt: &DataPacket<'_>,
        bytes: &[u8],
        stats: &mut Stats,
    ) {
        self.now = now;
        self.last_heard = now;
        self.gone = false;
        self.note_sender_window(pkt.low, pkt.seq.saturating_add(1));
        self.peer.datagrams += 1;
        self.peer.bytes += bytes.len() as u64;
        let seq = pkt.seq;
        if seq < self.next_deliver {
            stats.duplicates += 1;
            self.peer.duplicates += 1;
            return;
        }
        if seq >= self.high {
            self.high = seq + 1;
        }
        self.extend_marks(cfg, rng, Some(seq));
        if seq >= self.next_deliver + self.cap() {
            stats.beyond_buffer += 1;
            return;
        }
        let i = self.index(seq);
        let slot = &mut self.slots[i];
        debug_assert_eq!(slot.seq, seq);
        if slot.filled {
            stats.duplicates += 1;
            self.peer.duplicates += 1;
            return;
        }
        slot.filled = true;
        slot.bytes.clear();
        slot.bytes.extend_from_slice(bytes);
        slot.shape = pkt.shape();
        let asked = slot.asked.take();
        stats.datagrams_received += 1;
        if pkt.is_retransmit() {
            stats.repairs_received += 1;
            self.peer.repairs_received += 1;
            if let Some((at, false)) = asked {
                self.repair_time.sample(now.saturating_duration_since(at));
            }
        }
    }

    pub(crate) fn handle_heartbeat(&mut self, now: Instant, cfg: &Config, rng: &mut Rng, hb: &HeartbeatRepr) {
        self.now = now;
        self.last_heard = now;
        self.gone = false;
        self.note_sender_window(hb.low, hb.next_seq);
        self.sender_receivers = hb.receivers;
        self.peer.datagrams += 1;
        self.peer.bytes += crate::wire::HEARTBEAT_LEN as u64;
        self.sender_next_msg = Some(hb.next_msg);
        if hb.next_seq > self.high {
            self.high = hb.next_seq;
            self.extend_marks(cfg, rng, None);
        }
        if self.next_deliver != self.status_pos {
            self.status_at = now;
        }
    }

    /// Another receiver asked for these datagrams: hold our own NAK for them back as if we had sent it.
    pub(crate) fn overhear_nak(
        &mut self,
        now: Instant,
        cfg: &Config,
        rng: &mut Rng,
        nak: &NakPacket<'_>,
        stats: &mut Stats,
    ) {
        self.now = now;
        // Jittered like a first NAK, so that receivers which all held back do not all retry at once.
        let hold = now + self.nak_retry(cfg) + self.nak_delay(cfg, rng);
        for r in nak.ranges() {
            let start = r.start.max(self.next_deliver);
            let end = r.end().min(self.marked);
            for seq in start..end {
                let i = self.index(seq);
                let slot = &mut self.slots[i];
                if slot.seq == seq && !slot.filled && slot.nak_at < hold {
                    slot.nak_at = hold;
                    stats.naks_suppressed += 1;
                }
            }
        }
    }

    /// Collects the missing datagrams whose NAK is due into `out`; returns how many ranges were written.
    pub(crate) fn collect_naks(
        &mut self,
        now: Instant,
        cfg: &Config,
        rng: &mut Rng,
        out: &mut [SeqRange; MAX_NAK_RANGES],
    ) -> usize {
        self.now = now;
        match self.nak_due {
            Some(due) if due <= now => {}
            _ => return 0,
        }
        let mut count = 0usize;
        // As many ranges as fit one datagram (at most MAX_NAK_RANGES).
        let max_ranges =
            ((cfg.packet_limit() - crate::wire::NAK_HEADER_LEN) / crate::wire::NAK_RANGE_LEN).min(MAX_NAK_RANGES);
        let mut next_due: Option<Instant> = None;
        let retry_at = now + self.nak_retry(cfg) + self.nak_delay(cfg, rng);
        let first = self.next_deliver.max(self.sender_low);
        for seq in first..self.marked {
            let i = self.index(seq);
            let slot = &mut self.slots[i];
            if slot.filled {
                continue;
            }
            if slot.nak_at > now {
                next_due = earliest(next_due, Some(slot.nak_at));
                continue;
            }
            if count > 0 && out[count - 1].end() == seq && out[count - 1].len < u32::MAX {
                out[count - 1].len += 1;
            } else if count < max_ranges {
                out[count] = SeqRange { start: seq, len: 1 };
                count += 1;
            } else {
                next_due = Some(now); // more ranges than one NAK holds: the rest go in the next one
                continue;
            }
            slot.nak_at = retry_at;
            slot.asked = Some(match slot.asked {
                Some((first, _)) => (first, true),
                None => (now, false),
            });
            next_due = earliest(next_due, Some(retry_at));
        }
        self.nak_due = next_due;
        if count > 0 {
            self.peer.naks_sent += 1;
        }
        count
    }

    /// The next delivery step, if one is possible now. With `runs`, whole messages that follow each other in
    /// a datagram come out as one [`Step::Run`] instead of one step each.
    /// `in_use` is the endpoint's reassembly budget in use, shared by every stream.
    pub(crate) fn poll(
        &mut self,
        cfg: &Config,
        rng: &mut Rng,
        stats: &mut Stats,
        in_use: &mut usize,
        runs: bool,
    ) -> Option<Step> {
        if !self.reassembling && self.reassembly_charged > 0 {
            // The message reassembled last time has been handed out.
            self.release_reassembly(in_use);
        }
        loop {
            let nd = self.next_deliver;
            if nd >= self.marked {
                if self.gone
                    && let Some((start, from_msg)) = self.pending_loss.take()
                {
                    // Nothing will ever follow the lost tail of a sender that is gone.
                    stats.loss_events += 1;
                    self.peer.loss_events += 1;
                    let messages = from_msg.zip(self.sender_next_msg).map(|(a, b)| a..b.max(a));
                    return Some(Step::Loss { datagrams: start..nd, messages });
                }
                return None;
            }
            let i = if self.deliver_index.0 == nd {
                self.deliver_index.1
            } else {
                let i = self.index(nd);
                self.deliver_index = (nd, i);
                i
            };
            if !self.slots[i].filled {
                if nd < self.sender_low {
                    self.skip_unrecoverable(cfg, rng, stats, in_use);
                    continue;
                }
                return None;
            }
            if self.cursor == 0 {
                if let Some(loss) = self.pending_loss.take() {
                    return Some(self.report_loss(i, loss, stats));
                }
                self.start_datagram(i);
            }
            let (flags, range, next) = {
                let bytes = &self.slots[i].bytes;
                match frame_at(bytes, self.cursor) {
                    Some((f, next)) => {
                        let start = next - f.payload.len();
                        (f.flags, start..next, next)
                    }
                    None => {
                        self.finish_datagram(i, cfg, rng);
                        continue;
                    }
                }
            };
            let msg = self.frame_msg_seq(i);
            self.cursor = next;
            self.frame_index += 1;
            let first = flags & crate::wire::FRAME_FIRST != 0;
            let last = flags & crate::wire::FRAME_LAST != 0;
            if first && self.reassembling {
                // A new message starts before the previous one ended (a broken sender): report the unfinished
                // one as lost, then take this frame again.
                self.cursor = range.start - crate::wire::FRAME_HEADER_LEN;
                self.frame_index -= 1;
                let lost = self.next_msg.unwrap_or(msg);
                self.reassembling = false;
                self.release_reassembly(in_use);
                self.next_msg = Some(lost + 1);
                stats.malformed += 1;
                stats.loss_events += 1;
                self.peer.loss_events += 1;
                return Some(Step::Loss { datagrams: self.reassembly_start..nd + 1, messages: Some(lost..lost + 1) });
            }
            match (first, last) {
                (true, true) => {
                    let (end, count) = if runs { self.run_end(i, next) } else { (next, 1) };
                    self.next_msg = Some(msg + count);
                    stats.messages_delivered += count;
                    self.peer.messages_delivered += count;
                    if count > 1 {
                        self.cursor = end;
                        self.frame_index += count - 1;
                        let frames = range.start - crate::wire::FRAME_HEADER_LEN..end;
                        return Some(Step::Run { slot: i, frames, seq: msg, count });
                    }
                    return Some(Step::Message { slot: i, range, seq: msg });
                }
                (true, false) => {
                    self.reassembling = true;
                    self.reassembly_start = nd;
                    self.oversized = false;
                    self.release_reassembly(in_use);
                    self.append_fragment(i, range, cfg, stats, in_use);
                }
                (false, _) if !self.reassembling => {
                    // The tail of a message whose start we never had (joined or lost mid-message).
                }
                (false, last) => {
                    self.append_fragment(i, range, cfg, stats, in_use);
                    if last {
                        self.reassembling = false;
                        self.next_msg = Some(msg + 1);
                        if self.oversized {
                            self.oversized = false;
                            stats.loss_events += 1;
                            self.peer.loss_events += 1;
                            return Some(Step::Loss {
                                datagrams: self.reassembly_start..nd + 1,
                                messages: Some(msg..msg + 1),
                            });
                        }
                        stats.messages_delivered += 1;
                        self.peer.messages_delivered += 1;
                        return Some(Step::Reassembled { seq: msg });
                    }
                }
            }
        }
    }

    /// Where the run of whole-message frames that starts with the frame just taken (`from` is its end, and
    /// `frame_index` already counts it) ends in slot `slot`, and how many frames the run has. Every frame
    /// after the first and before the last is whole (the DATA layout), so only the last one needs a look,
    /// and validation recorded it.
    fn run_end(&self, slot: usize, from: usize) -> (usize, u64) {
        let s = &self.slots[slot];
        let after = (s.shape.count as u64).saturating_sub(self.frame_index);
        match after {
            0 => (from, 1),
            _ if s.shape.last_whole => (s.bytes.len(), 1 + after),
            _ => (s.shape.last_at, after),
        }
    }

    fn frame_msg_seq(&self, slot: usize) -> u64 {
        // Frame k of a datagram belongs to message msg_seq + k (see the DATA layout).
        let b = &self.slots[slot].bytes;
        crate::wire::be_u64(b, 24).wrapping_add(self.frame_index)
    }

    fn start_datagram(&mut self, slot: usize) {
        self.cursor = DATA_HEADER_LEN;
        self.frame_index = 0;
        if self.next_msg.is_none() {
            // First datagram consumed from this sender: if it opens with the tail of an earlier message, that
            // message was never ours to deliver.
            let msg_seq = crate::wire::be_u64(&self.slots[slot].bytes, 24);
            let continuation = self.slots[slot].bytes[DATA_HEADER_LEN + 2] & crate::wire::FRAME_FIRST == 0;
            self.next_msg = Some(msg_seq + continuation as u64);
        }
    }

    fn append_fragment(
        &mut self,
        slot: usize,
        range: Range<usize>,
        cfg: &Config,
        stats: &mut Stats,
        in_use: &mut usize,
    ) {
        if self.oversized {
            return;
        }
        let add = range.len();
        if self.reassembly.len() + add > cfg.max_message || *in_use + add > cfg.max_reassembly {
            // Too large for this receiver, or for the memory all reassemblies may share: the message is
            // dropped and, at its last fragment, reported lost.
            self.oversized = true;
            self.release_reassembly(in_use);
            stats.oversized_messages += 1;
            return;
        }
        self.reassembly.extend_from_slice(&self.slots[slot].bytes[range]);
        *in_use += add;
        self.reassembly_charged += add;
    }

    /// Empties the reassembly buffer and gives its bytes back to the budget (and a large allocation back to
    /// the system).
    fn release_reassembly(&mut self, in_use: &mut usize) {
        *in_use -= self.reassembly_charged;
        self.reassembly_charged = 0;
        self.reassembly.clear();
        if self.reassembly.capacity() > 1 << 20 {
            self.reassembly = Vec::new();
        }
    }

    /// Bytes this stream holds against the reassembly budget (given back when the stream is removed).
    pub(crate) fn reassembly_charged(&self) -> usize {
        self.reassembly_charged
    }

    fn finish_datagram(&mut self, slot: usize, cfg: &Config, rng: &mut Rng) {
        self.slots[slot].filled = false;
        self.slots[slot].seq = u64::MAX;
        self.next_deliver += 1;
        self.cursor = 0;
        self.extend_marks(cfg, rng, None);
        // A quarter of what the sender can have in flight to us: our buffer, or its window if smaller (it
        // must hear from us before its window fills, not only at the periodic STATUS).
        if self.next_deliver - self.status_pos >= (self.cap().min(self.sender_span) / 4).max(1) {
            self.status_at = self.now;
        }
    }

    /// `next_deliver` is missing and the sender no longer retains it: skip the run of missing datagrams below
    /// the sender's low. Datagrams past the receive buffer were never stored, so they count as missing too.
    fn skip_unrecoverable(&mut self, cfg: &Config, rng: &mut Rng, stats: &mut Stats, in_use: &mut usize) {
        let start = self.next_deliver;
        let limit = self.sender_low.min(self.marked);
        let mut end = start;
        while end < limit && self.is_missing(end) {
            end += 1;
        }
        if end == self.marked && end < self.sender_low {
            end = self.sender_low;
        }
        for seq in start..end.min(self.marked) {
            let j = self.index(seq);
            self.slots[j].seq = u64::MAX;
        }
        if self.reassembling {
            // The message being reassembled lost its tail; `next_msg` still names it.
            self.reassembling = false;
            self.release_reassembly(in_use);
        }
        let from_msg = self.next_msg;
        self.pending_loss = Some(self.pending_loss.unwrap_or((start, from_msg)));
        stats.lost_datagrams += end - start;
        self.peer.lost_datagrams += end - start;
        self.next_deliver = end;
        self.cursor = 0;
        self.marked = self.marked.max(end);
        self.extend_marks(cfg, rng, None);
    }

    /// The datagram after a skipped run has arrived: report the loss with its exact message range and start
    /// delivering from the first whole message in it.
    fn report_loss(&mut self, slot: usize, (start, from_msg): (u64, Option<u64>), stats: &mut Stats) -> Step {
        let b = &self.slots[slot].bytes;
        let msg_seq = crate::wire::be_u64(b, 24);
        let continuation = b[DATA_HEADER_LEN + 2] & crate::wire::FRAME_FIRST == 0;
        let resume = msg_seq + continuation as u64;
        let messages = from_msg.map(|from| from..resume.max(from));
        self.next_msg = Some(resume);
        self.start_datagram(slot);
        if continuation {
            // Frame 0 is the tail of a lost message: start after it.
            if let Some((_, next)) = frame_at(&self.slots[slot].bytes, DATA_HEADER_LEN) {
                self.cursor = next;
                self.frame_index = 1;
            }
        }
        stats.loss_events += 1;
        self.peer.loss_events += 1;
        self.status_at = self.now;
        Step::Loss { datagrams: start..self.next_deliver, messages }
    }

    pub(crate) fn slot_bytes(&self, slot: usize) -> &[u8] {
        &self.slots[slot].bytes
    }

    pub(crate) fn reassembled(&self) -> &[u8] {
        &self.reassembly
    }

    /// A STATUS is due: returns the position to report.
    pub(crate) fn take_status(&mut self, now: Instant, cfg: &Config) -> Option<u64> {
        if self.status_at > now {
            return None;
        }
        self.status_at = now + cfg.status_interval;
        self.status_pos = self.next_deliver;
        Some(self.next_deliver)
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        earliest(self.nak_due, Some(self.status_at))
    }

    /// Everything received has been delivered and nothing is pending.
    pub(crate) fn is_drained(&self) -> bool {
        self.next_deliver >= self.high && self.pending_loss.is_none() && !self.reassembling
    }

    /// The sender is silent for good: what is still missing can never be repaired.
    pub(crate) fn mark_gone(&mut self) {
        self.gone = true;
        self.sender_low = self.high;
    }

    /// This sender's counters, with the current position.
    pub(crate) fn peer_counters(&self) -> PeerCounters {
        PeerCounters { position: self.next_deliver, ..self.peer }
    }

    pub(crate) fn buffer_capacity(&self) -> u32 {
        self.slots.len() as u32
    }
}

/// Creates the stream for a sender heard for the first time, placed by the late-join policy.
pub(crate) fn new_stream(
    session: u64,
    addr: SocketAddr,
    first_seq: u64,
    low: u64,
    now: Instant,
    cfg: &Config,
) -> Stream {
    let start = match cfg.late_join {
        LateJoin::Next => first_seq,
        LateJoin::Oldest => low.min(first_seq),
    };
    let mut s = Stream::new(session, addr, start, now, cfg.receive_buffer);
    s.sender_low = low;
    s
}
