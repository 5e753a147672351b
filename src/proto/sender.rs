//! The sending half: packs messages into datagrams in the retransmission window, transmits them,
//! answers NAKs from stored bytes, heartbeats while idle, and applies flow control from receivers' STATUS.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Now;
use super::config::{Config, SlowReceiverPolicy};
use super::events::EventQueue;
use super::peers::PeerCounters;
use super::ratelimit::TokenBucket;
use super::window::Window;
use super::{Event, FramesStop, FramesTaken, SendError, Stats};
use crate::wire::{
    DATA_HEADER_LEN, DataWriter, FLAG_RETRANSMIT, FRAME_FIRST, FRAME_HEADER_LEN, FRAME_LAST, Header, HeartbeatRepr,
    Kind, NakPacket, StatusRepr,
};

/// A receiver the sender has heard STATUS from.
#[derive(Debug)]
struct RemoteReceiver {
    session: u64,
    next_expected: u64,
    /// Datagrams it can buffer beyond `next_expected` (its STATUS says); the sender never sends past that.
    capacity: u64,
    last_heard: Instant,
    /// Since when this receiver alone has kept the window from advancing (for `DropAfter`).
    blocking_since: Option<Instant>,
    /// Dropped by the slow-receiver policy: ignored for flow control until it catches up with the window.
    dropped: bool,
    /// Its retransmission budget.
    budget: TokenBucket,
    /// What it asked of this sender, for `Endpoint::peer_stats`.
    peer: PeerCounters,
}

/// Requesters that never reported STATUS share `1 / STRANGER_SHARE` of one receiver's retransmission budget.
pub const STRANGER_SHARE: u64 = 16;

pub(crate) struct Sender {
    header: Header,
    max_datagram: usize,
    max_message: usize,
    /// Largest payload of a frame `send_frames` takes as it is: a whole message that fits one datagram.
    max_frame_payload: usize,
    window: Window,
    /// Sequence of the open datagram (when `open_len > 0`), else of the next one to open.
    next_seq: u64,
    /// Bytes written in the open datagram; 0 when none is open.
    open_len: usize,
    /// Frames in the open datagram.
    open_frames: u64,
    /// Message sequence of the open datagram's frame 0.
    open_msg_seq: u64,
    /// Message sequence the next new message will carry.
    next_msg: u64,
    /// Every datagram below this has been transmitted at least once.
    sent: u64,
    /// Lowest sequence still in the window.
    low: u64,
    retransmit: VecDeque<(u64, u64)>,
    retransmit_cap: usize,
    retransmit_rate: u64,
    retransmit_burst: u64,
    /// The budget shared by requesters that never reported STATUS.
    strangers: TokenBucket,
    linger: Duration,
    /// A message larger than the free space, being fragmented into the window as space frees.
    staged: Vec<u8>,
    staged_offset: usize,
    staged_active: bool,
    /// Message sequence of the staged message.
    staged_msg: u64,
    receivers: Vec<RemoteReceiver>,
    max_receivers: usize,
    receiver_timeout: Duration,
    policy: SlowReceiverPolicy,
    heartbeat_at: Option<Instant>,
    heartbeat_interval: Duration,
    heartbeat_min: Duration,
    heartbeat_max: Duration,
}

impl Sender {
    pub(crate) fn new(config: &Config, session: u64) -> Sender {
        Sender {
            header: Header { kind: Kind::Data, flags: 0, stream: config.stream, session },
            max_datagram: config.packet_limit(),
            max_message: config.max_message,
            max_frame_payload: config
                .max_message
                .min(config.packet_limit().saturating_sub(DATA_HEADER_LEN + FRAME_HEADER_LEN)),
            window: Window::new(config.window, config.packet_limit()),
            next_seq: 0,
            open_len: 0,
            open_frames: 0,
            open_msg_seq: 0,
            next_msg: 0,
            sent: 0,
            low: 0,
            retransmit: VecDeque::with_capacity(config.retransmit_queue),
            retransmit_cap: config.retransmit_queue,
            retransmit_rate: config.retransmit_rate,
            retransmit_burst: config.retransmit_burst,
            strangers: TokenBucket::full(config.retransmit_burst / STRANGER_SHARE),
            linger: config.retransmit_linger,
            staged: Vec::new(),
            staged_offset: 0,
            staged_active: false,
            staged_msg: 0,
            receivers: Vec::new(),
            max_receivers: config.max_receivers,
            receiver_timeout: config.receiver_timeout,
            policy: config.slow_receiver,
            heartbeat_at: None,
            heartbeat_interval: config.heartbeat_min,
            heartbeat_min: config.heartbeat_min,
            heartbeat_max: config.heartbeat_max,
        }
    }

    /// One past the last sealed datagram.
    fn sealed_end(&self) -> u64 {
        self.next_seq
    }

    pub(crate) fn live_receivers(&self) -> usize {
        self.receivers.iter().filter(|r| !r.dropped).count()
    }

    pub(crate) fn send(
        &mut self,
        now: Instant,
        msg: &[u8],
        events: &mut EventQueue,
        stats: &mut Stats,
    ) -> Result<(), SendError> {
        self.send_parts(&mut { now }, &[], msg, events, stats)
    }

    /// [`send`](Self::send) of the message `head` followed by `body`, written into the window in one pass.
    #[inline(always)]
    pub(crate) fn send_parts(
        &mut self,
        now: &mut impl Now,
        head: &[u8],
        body: &[u8],
        events: &mut EventQueue,
        stats: &mut Stats,
    ) -> Result<(), SendError> {
        if self.try_append(head, body, stats) {
            return Ok(());
        }
        self.send_parts_opening(now, head, body, events, stats)
    }

    /// The common case of [`send_parts`](Self::send_parts), which needs no clock: a whole message that fits
    /// the open datagram. Returns false, having done nothing, otherwise.
    #[inline(always)]
    pub(crate) fn try_append(&mut self, head: &[u8], body: &[u8], stats: &mut Stats) -> bool {
        let len = head.len() + body.len();
        // A fragmented message still under way has sealed its last datagram, so an open one means none is.
        if self.open_len > 0 && self.open_len + FRAME_HEADER_LEN + len <= self.max_datagram && len <= self.max_message {
            debug_assert!(!self.staged_active);
            self.append_whole(head, body);
            self.count_sent(len, stats);
            return true;
        }
        false
    }

    /// The rest of [`send_parts`](Self::send_parts): a datagram to open, a message to fragment, or a refusal.
    #[inline(never)]
    fn send_parts_opening(
        &mut self,
        now: &mut impl Now,
        head: &[u8],
        body: &[u8],
        events: &mut EventQueue,
        stats: &mut Stats,
    ) -> Result<(), SendError> {
        let len = head.len() + body.len();
        if len > self.max_message {
            return Err(SendError::TooLarge { size: len, max: self.max_message });
        }
        if self.staged_active {
            self.progress_staged(now, events, stats);
            if self.staged_active {
                return Err(SendError::WouldBlock);
            }
        }
        // Room in the open datagram again, now that a fragmented message is done.
        if self.try_append(head, body, stats) {
            return Ok(());
        }
        if DATA_HEADER_LEN + FRAME_HEADER_LEN + len <= self.max_datagram {
            self.seal();
            if !self.open(now, events, stats) {
                return Err(SendError::WouldBlock);
            }
            self.append_whole(head, body);
        } else {
            // Larger than a datagram: copy once and fragment as the window allows.
            self.staged.clear();
            self.staged.extend_from_slice(head);
            self.staged.extend_from_slice(body);
            self.staged_offset = 0;
            self.staged_active = true;
            self.staged_msg = self.next_msg;
            self.progress_staged(now, events, stats);
        }
        self.count_sent(len, stats);
        Ok(())
    }

    #[inline(always)]
    fn count_sent(&mut self, len: usize, stats: &mut Stats) {
        stats.messages_sent += 1;
        stats.bytes_sent += len as u64;
        self.next_msg += 1;
    }

    /// See [`Endpoint::send_frames`](super::Endpoint::send_frames).
    pub(crate) fn send_frames(
        &mut self,
        now: Instant,
        frames: &[u8],
        max_messages: u64,
        events: &mut EventQueue,
        stats: &mut Stats,
    ) -> FramesTaken {
        if self.staged_active {
            self.progress_staged(&mut { now }, events, stats);
            if self.staged_active {
                return FramesTaken { bytes: 0, messages: 0, stop: FramesStop::WouldBlock };
            }
        }
        let (mut at, mut taken) = (0, 0u64);
        let stop = loop {
            if at >= frames.len() || taken >= max_messages {
                break FramesStop::Done;
            }
            // The longest run of frames from `at` that fits the open datagram.
            let room = if self.open_len > 0 { self.max_datagram - self.open_len } else { 0 };
            let (fits_until, most) = (at + room, max_messages - taken);
            let (mut end, mut count, mut ineligible) = (at, 0u64, false);
            while count < most {
                let Some(next) = self.whole_frame_at(frames, end) else {
                    ineligible = true;
                    break;
                };
                if next > fits_until {
                    break;
                }
                (end, count) = (next, count + 1);
            }
            if count > 0 {
                let buf = self.window.building_mut(self.next_seq);
                buf[self.open_len..self.open_len + (end - at)].copy_from_slice(&frames[at..end]);
                self.open_len += end - at;
                self.open_frames += count;
                self.next_msg += count;
                stats.messages_sent += count;
                stats.bytes_sent += (end - at) as u64 - count * FRAME_HEADER_LEN as u64;
                (at, taken) = (end, taken + count);
                continue;
            }
            if ineligible {
                break FramesStop::NotTaken;
            }
            // The next frame does not fit what is left of the open datagram (it fits an empty one).
            self.seal();
            if !self.open(&mut { now }, events, stats) {
                break FramesStop::WouldBlock;
            }
        };
        FramesTaken { bytes: at, messages: taken, stop }
    }

    /// The offset past the frame at `at`, if `send_frames` may take that frame as it is (a whole message
    /// that fits one datagram).
    #[inline]
    fn whole_frame_at(&self, frames: &[u8], at: usize) -> Option<usize> {
        let h = frames.get(at..at + FRAME_HEADER_LEN)?;
        let len = usize::from(u16::from_be_bytes([h[0], h[1]]));
        let next = at + FRAME_HEADER_LEN + len;
        // Flags and the reserved byte in one comparison: both flags set, and a wire frame (not ring padding
        // or a marker).
        let ok = u16::from_be_bytes([h[2], h[3]]) == u16::from(FRAME_FIRST | FRAME_LAST) << 8
            && len <= self.max_frame_payload
            && next <= frames.len();
        ok.then_some(next)
    }

    /// Whether a message could be accepted now (window space and no fragmented message in progress).
    pub(crate) fn is_writable(&mut self, now: Instant, events: &mut EventQueue) -> bool {
        !self.staged_active && (self.open_len > 0 || self.may_open(self.next_seq, &mut { now }, events))
    }

    /// Appends a whole message, `head` then `body`, as one frame of the open datagram (room checked by the
    /// caller).
    #[inline(always)]
    fn append_whole(&mut self, head: &[u8], body: &[u8]) {
        let at = self.open_len;
        let buf = self.window.building_mut(self.next_seq);
        self.open_len = DataWriter::push_frame_parts(buf, at, FRAME_FIRST | FRAME_LAST, head, body)
            .expect("space checked by caller");
        self.open_frames += 1;
    }

    fn progress_staged(&mut self, now: &mut impl Now, events: &mut EventQueue, stats: &mut Stats) {
        while self.staged_active {
            let room = if self.open_len > 0 { self.max_datagram - self.open_len } else { 0 };
            if room <= FRAME_HEADER_LEN {
                self.seal();
                if !self.open(now, events, stats) {
                    return;
                }
                continue;
            }
            let take = (room - FRAME_HEADER_LEN).min(self.staged.len() - self.staged_offset);
            let mut flags = 0;
            if self.staged_offset == 0 {
                flags |= FRAME_FIRST;
            }
            if self.staged_offset + take == self.staged.len() {
                flags |= FRAME_LAST;
            }
            let at = self.open_len;
            let buf = self.window.building_mut(self.next_seq);
            let chunk = &self.staged[self.staged_offset..self.staged_offset + take];
            self.open_len = DataWriter::push_frame(buf, at, flags, chunk).expect("room computed above");
            self.open_frames += 1;
            self.staged_offset += take;
            if flags & FRAME_LAST != 0 {
                self.staged_active = false;
                if self.staged.capacity() > 4 * self.max_datagram {
                    // Give back the memory of a very large message rather than keep it for ever.
                    self.staged = Vec::new();
                }
            } else {
                // An unfinished fragment must be the last frame of its datagram.
                self.seal();
            }
        }
    }

    /// Closes the open datagram: it becomes eligible for transmission.
    fn seal(&mut self) {
        if self.open_len > 0 {
            self.window.set_len(self.next_seq, self.open_len);
            self.next_seq += 1;
            self.open_len = 0;
            self.open_frames = 0;
        }
    }

    /// Opens datagram `next_seq` in its window slot if flow control allows evicting the slot's old datagram.
    fn open(&mut self, now: &mut impl Now, events: &mut EventQueue, stats: &mut Stats) -> bool {
        debug_assert_eq!(self.open_len, 0);
        if !self.may_open(self.next_seq, now, events) {
            stats.flow_control_blocked += 1;
            return false;
        }
        let seq = self.next_seq;
        let cap = self.window.capacity() as u64;
        if seq >= cap {
            self.low = seq - cap + 1;
        }
        // The message that frame 0 belongs to: the staged one if fragmenting, else the next new message.
        self.open_msg_seq = if self.staged_active { self.staged_msg } else { self.next_msg };
        let (header, low) = (self.header, self.low);
        let buf = self.window.slot_mut(seq);
        self.open_len = DataWriter::begin(buf, &header, seq, self.open_msg_seq, low).expect("slot fits header");
        true
    }

    /// Flow control: may the slot for `seq` be reused (evicting `seq - window`)?
    fn may_open(&mut self, seq: u64, now: &mut impl Now, events: &mut EventQueue) -> bool {
        let cap = self.window.capacity() as u64;
        // Opening `seq` evicts `seq - window` from the ring; never what has not been transmitted once.
        let evict = seq.checked_sub(cap);
        if evict.is_some_and(|e| e >= self.sent) {
            return false;
        }
        let mut ok = true;
        for r in self.receivers.iter_mut() {
            if r.dropped {
                continue;
            }
            // A live receiver still needs the evicted datagram, or has no room for this one.
            let needs_evicted = evict.is_some_and(|e| r.next_expected <= e);
            let out_of_room = r.capacity > 0 && seq >= r.next_expected + r.capacity;
            if !needs_evicted && !out_of_room {
                continue;
            }
            match self.policy {
                SlowReceiverPolicy::HoldBack => ok = false,
                SlowReceiverPolicy::DropAfter(limit) => {
                    let now = now.now();
                    let since = *r.blocking_since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= limit {
                        r.dropped = true;
                        r.blocking_since = None;
                        events.push_back(Event::SlowReceiverDropped { session: r.session, position: r.next_expected });
                    } else {
                        ok = false;
                    }
                }
            }
        }
        ok
    }

    /// Returns false when the receiver is new and the table is full (the STATUS is dropped).
    pub(crate) fn handle_status(
        &mut self,
        now: Instant,
        from: u64,
        status: &StatusRepr,
        events: &mut EventQueue,
    ) -> bool {
        if let Some(r) = self.receivers.iter_mut().find(|r| r.session == from) {
            r.last_heard = now;
            r.peer.status_received += 1;
            r.capacity = status.buffer_capacity as u64;
            if status.next_expected > r.next_expected {
                r.next_expected = status.next_expected;
                r.blocking_since = None;
            }
            if r.dropped && r.next_expected >= self.low {
                r.dropped = false;
            }
            return true;
        }
        if self.receivers.len() >= self.max_receivers {
            return false;
        }
        self.receivers.push(RemoteReceiver {
            session: from,
            next_expected: status.next_expected,
            capacity: status.buffer_capacity as u64,
            last_heard: now,
            blocking_since: None,
            dropped: false,
            budget: TokenBucket::full(self.retransmit_burst),
            peer: PeerCounters { status_received: 1, ..PeerCounters::default() },
        });
        events.push_back(Event::ReceiverJoined { session: from });
        true
    }

    pub(crate) fn handle_nak(&mut self, now: Instant, requester: u64, nak: &NakPacket<'_>, stats: &mut Stats) {
        stats.naks_received += 1;
        let end = self.sealed_end().min(self.sent);
        let cost = self.max_datagram as u64;
        let mut peer = None;
        let (budget, rate, burst) = match self.receivers.iter_mut().find(|r| r.session == requester) {
            Some(r) => {
                r.peer.naks_received += 1;
                peer = Some(&mut r.peer);
                (&mut r.budget, self.retransmit_rate, self.retransmit_burst)
            }
            // Real receivers report STATUS on first contact, so strangers (forged, or a receiver whose first
            // STATUS was lost) need little: they share a sixteenth of one receiver's budget.
            None => {
                (&mut self.strangers, self.retransmit_rate / STRANGER_SHARE, self.retransmit_burst / STRANGER_SHARE)
            }
        };
        for r in nak.ranges() {
            if r.start < self.low {
                // Part of the range is gone: tell receivers the window's bounds at once so they report the
                // loss instead of asking again.
                self.heartbeat_at = Some(now);
            }
            let start = r.start.max(self.low);
            let stop = r.end().min(end);
            if start >= stop {
                continue;
            }
            if self.retransmit.len() >= self.retransmit_cap {
                stats.retransmit_queue_full += 1;
                continue;
            }
            let granted = budget.take(now, rate, burst, stop - start, cost);
            stats.retransmits_rate_limited += stop - start - granted;
            if let Some(p) = peer.as_mut() {
                p.retransmits_rate_limited += stop - start - granted;
                p.retransmits += granted;
            }
            if granted > 0 {
                self.retransmit.push_back((start, start + granted));
            }
        }
    }

    /// Each tracked receiver's session and counters, with its reported position.
    pub(crate) fn receiver_counters(&self) -> impl Iterator<Item = (u64, PeerCounters)> + '_ {
        self.receivers.iter().map(|r| (r.session, PeerCounters { position: r.next_expected, ..r.peer }))
    }

    pub(crate) fn expire_receivers(&mut self, now: Instant, events: &mut EventQueue) {
        let timeout = self.receiver_timeout;
        self.receivers.retain(|r| {
            let alive = now.saturating_duration_since(r.last_heard) < timeout;
            if !alive {
                events.push_back(Event::ReceiverGone { session: r.session });
            }
            alive
        });
    }

    /// Forgets a receiver that said it is leaving, so flow control stops waiting for it at once rather
    /// than after `receiver_timeout`.
    pub(crate) fn forget_receiver(&mut self, session: u64, events: &mut EventQueue) {
        let before = self.receivers.len();
        self.receivers.retain(|r| r.session != session);
        if self.receivers.len() < before {
            events.push_back(Event::ReceiverGone { session });
        }
    }

    /// Makes progress on a fragmented message (window space may have been freed by a STATUS).
    pub(crate) fn on_tick(&mut self, now: Instant, events: &mut EventQueue, stats: &mut Stats) {
        if self.staged_active {
            self.progress_staged(&mut { now }, events, stats);
        }
    }

    /// Next datagram to send, if any: retransmissions first (repair latency), then new data, then heartbeat.
    pub(crate) fn poll_transmit(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        events: &mut EventQueue,
        stats: &mut Stats,
    ) -> Option<usize> {
        while let Some(&(start, stop)) = self.retransmit.front() {
            if start + 1 >= stop {
                self.retransmit.pop_front();
            } else {
                self.retransmit[0].0 += 1;
            }
            if start < self.low || start >= self.sent {
                continue;
            }
            if !self.window.claim_retransmit(start, now, self.linger) {
                stats.retransmits_suppressed += 1;
                continue;
            }
            let n = self.copy_out(start, buf)?;
            DataWriter::set_flags(buf, FLAG_RETRANSMIT);
            stats.retransmits += 1;
            return Some(n);
        }

        if self.staged_active {
            self.progress_staged(&mut { now }, events, stats);
        }
        if self.sent == self.sealed_end() {
            // Flush on poll: whatever the application queued since the last poll goes out now.
            self.seal();
        }
        if self.sent < self.sealed_end() {
            let n = self.copy_out(self.sent, buf)?;
            self.sent += 1;
            stats.datagrams_sent += 1;
            self.heartbeat_interval = self.heartbeat_min;
            self.heartbeat_at = Some(now + self.heartbeat_min);
            return Some(n);
        }

        match self.heartbeat_at {
            Some(at) if at <= now => {
                let hb = HeartbeatRepr {
                    next_seq: self.sent,
                    low: self.low,
                    next_msg: self.next_msg,
                    receivers: self.live_receivers() as u32,
                };
                let header = Header { kind: Kind::Heartbeat, ..self.header };
                let n = hb.emit(&header, buf).ok()?;
                self.heartbeat_interval = (self.heartbeat_interval * 2).min(self.heartbeat_max);
                self.heartbeat_at = Some(now + self.heartbeat_interval);
                stats.heartbeats_sent += 1;
                Some(n)
            }
            _ => None,
        }
    }

    fn copy_out(&self, seq: u64, buf: &mut [u8]) -> Option<usize> {
        let d = self.window.datagram(seq);
        let out = buf.get_mut(..d.len())?;
        out.copy_from_slice(d);
        Some(d.len())
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if !self.retransmit.is_empty() {
            return None; // work is pending now; the caller polls transmit first
        }
        self.heartbeat_at
    }

    /// Whether anything is ready to transmit immediately.
    pub(crate) fn has_pending(&self) -> bool {
        !self.retransmit.is_empty() || self.sent < self.sealed_end() || self.open_len > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A time source that counts how often it is asked.
    struct CountingNow {
        at: Instant,
        asked: usize,
    }

    impl Now for CountingNow {
        fn now(&mut self) -> Instant {
            self.asked += 1;
            self.at
        }
    }

    /// Opening datagrams, fragmenting and waiting for the window to drain never ask for the time while no
    /// slow receiver holds the window: the engine's direct sends read the clock only then (33 ns a read on
    /// the project's machine, once per datagram at 1,024 bytes otherwise).
    #[test]
    fn the_time_is_not_asked_for_without_a_slow_receiver() {
        let at = Instant::now();
        let policy = SlowReceiverPolicy::DropAfter(Duration::from_secs(1));
        let cfg = Config { window: 8, slow_receiver: policy, ..Config::default() };
        let mut sender = Sender::new(&cfg, 7);
        let (mut events, mut stats) = (EventQueue::default(), Stats::default());
        let mut now = CountingNow { at, asked: 0 };
        let mut buf = vec![0u8; cfg.max_datagram];
        let (mut sent, mut refused) = (0, 0);
        for i in 0..2_000usize {
            // Whole messages that share datagrams, ones that fill a datagram, and ones that fragment.
            let body = vec![i as u8; [10, 1400, 3000][i % 3]];
            loop {
                match sender.send_parts(&mut now, &[0, 0], &body, &mut events, &mut stats) {
                    Ok(()) => break,
                    Err(SendError::WouldBlock) => {
                        refused += 1;
                        while sender.poll_transmit(at, &mut buf, &mut events, &mut stats).is_some() {
                            sent += 1;
                        }
                    }
                    Err(e) => panic!("message {i}: {e}"),
                }
            }
        }
        assert!(refused > 0 && sent > 0, "the 8-datagram window never filled ({refused} refusals, {sent} sent)");
        assert_eq!(now.asked, 0, "asked for the time with no receiver holding the window");
    }
}
