//! The protocol as a sans-IO state machine.
//!
//! An [`Endpoint`] is one node's protocol state for one stream of a group: it sends (as one sender session)
//! and receives from every other sender it hears. It never touches a socket or a clock: the driver passes
//! the current time and received bytes in, and takes datagrams to send, the next timeout, events and
//! deliveries out. The driving loop is:
//!
//! ```text
//! loop {
//!     endpoint.handle_datagram(now, from, bytes)   // for each datagram received
//!     endpoint.handle_timeout(now)                 // when poll_timeout() has passed
//!     endpoint.send(now, msg)                      // for each message the application hands over
//!     while let Some(t) = endpoint.poll_transmit(now, &mut buf) { socket.send(&buf[..t.len], t.destination) }
//!     while let Some(d) = endpoint.recv() { application.deliver(d) }
//!     while let Some(e) = endpoint.poll_event() { application.event(e) }
//!     wait until endpoint.poll_timeout() or a datagram arrives
//! }
//! ```

mod access;
mod config;
mod events;
mod membership;
mod peers;
mod ratelimit;
mod receiver;
pub(crate) mod rng;
pub(crate) mod seal;
mod sender;
mod window;

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

pub use access::{AccessList, Action, Cidr, CidrError};
pub use config::*;
pub use events::MAX_QUEUED_EVENTS;
pub use membership::Member;
pub use peers::{PeerCounters, PeerRole, PeerStats};
pub use seal::{Cipher, KEY_LEN, KeyError, Keyring, MAX_KEYS, REPLAY_WINDOW};
pub use sender::STRANGER_SHARE;

use crate::wire::{
    FLAG_SEALED, Header, Kind, MAX_NAK_RANGES, MemberRepr, MemberState, NakRepr, Packet, SeqRange, StatusRepr,
};
use events::EventQueue;
use receiver::{Step, Stream};
use rng::Rng;
use sender::Sender;

/// Why [`Endpoint::send`] did not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The message exceeds [`Config::max_message`].
    #[error("message of {size} bytes exceeds the configured maximum of {max} bytes (Config::max_message)")]
    TooLarge {
        /// Size of the rejected message.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The window is full (flow control or untransmitted data) or a large message is still being fragmented:
    /// transmit, handle incoming STATUS, and try again.
    #[error("send window full; try again after transmitting and receiving")]
    WouldBlock,
}

/// The time, for the sender's flow control, which needs it only when a slow receiver holds the window
/// (`SlowReceiverPolicy::DropAfter` times the wait): an `Instant` the caller has, or, in the engine, a clock
/// it reads only if asked. The protocol itself never reads a clock.
pub(crate) trait Now {
    /// The current time.
    fn now(&mut self) -> Instant;
}

impl Now for Instant {
    #[inline]
    fn now(&mut self) -> Instant {
        *self
    }
}

/// Where a datagram from [`Endpoint::poll_transmit`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The multicast group.
    Group,
    /// One node, at the address its packets came from.
    Unicast(SocketAddr),
}

/// A datagram ready in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Bytes written at the start of the buffer.
    pub len: usize,
    /// Where to send them.
    pub destination: Destination,
}

/// A message delivered in order, by [`Endpoint::recv`] or a node's subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// The sender's session.
    pub session: u64,
    /// The message's sequence number in that session.
    pub seq: u64,
    /// The message bytes, borrowed from the receiver's buffers until the next receiving call (the next
    /// `recv`, or the return of the subscriber's handler).
    pub payload: &'a [u8],
}

/// Whole messages that follow each other in one datagram of one sender, as [`Endpoint::recv_batch`] hands
/// them out: [`messages`](Self::messages) yields each as a [`Message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run<'a> {
    /// The sender's session.
    pub session: u64,
    /// Sequence number of the first message.
    pub first_seq: u64,
    /// Number of messages (at least 2).
    pub count: u64,
    /// The messages' frames as on the wire (PROTOCOL.md section 3.1), each a whole message, borrowed like a
    /// [`Message`]'s payload.
    pub frames: &'a [u8],
}

impl<'a> Run<'a> {
    /// The messages, in order.
    pub fn messages(&self) -> RunMessages<'a> {
        RunMessages { session: self.session, seq: self.first_seq, frames: self.frames, at: 0 }
    }
}

/// Iterator over the messages of a [`Run`] (also usable on the `frames` of a run stored elsewhere).
#[derive(Debug, Clone)]
pub struct RunMessages<'a> {
    session: u64,
    seq: u64,
    frames: &'a [u8],
    at: usize,
}

impl<'a> RunMessages<'a> {
    /// Messages of sender `session` from `frames` (whole-message frames as in [`Run::frames`]), the first
    /// with sequence `first_seq`.
    pub fn new(session: u64, first_seq: u64, frames: &'a [u8]) -> RunMessages<'a> {
        RunMessages { session, seq: first_seq, frames, at: 0 }
    }

    /// Byte offset of the next message's frame in `frames`, and its sequence number.
    pub fn position(&self) -> (usize, u64) {
        (self.at, self.seq)
    }

    /// Continues from a [`position`](Self::position) taken earlier on the same frames.
    pub fn resume(session: u64, frames: &'a [u8], (at, seq): (usize, u64)) -> RunMessages<'a> {
        RunMessages { session, seq, frames, at }
    }
}

impl<'a> Iterator for RunMessages<'a> {
    type Item = Message<'a>;

    #[inline]
    fn next(&mut self) -> Option<Message<'a>> {
        let (frame, next) = crate::wire::data::frame_at(self.frames, self.at)?;
        self.at = next;
        let seq = self.seq;
        self.seq += 1;
        Some(Message { session: self.session, seq, payload: frame.payload })
    }
}

/// What [`Endpoint::recv_batch`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batch<'a> {
    /// One delivery, as [`Endpoint::recv`] would have given it.
    One(Delivery<'a>),
    /// Two or more whole messages of one sender, in order.
    Run(Run<'a>),
}

/// What [`Endpoint::send_frames`] took, and why it stopped there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramesTaken {
    /// Bytes of the frames taken (whole frames, from the start).
    pub bytes: usize,
    /// Messages taken.
    pub messages: u64,
    /// Why it stopped.
    pub stop: FramesStop,
}

/// Why [`Endpoint::send_frames`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramesStop {
    /// Every frame was taken, or `max_messages` were.
    Done,
    /// The window takes no more for now (what `send` reports as `SendError::WouldBlock`).
    WouldBlock,
    /// The next frame is not one it takes as it is (not a whole message, too large, or in need of
    /// fragmenting): it is for `send`.
    NotTaken,
}

/// What [`Endpoint::recv`] yields, in stream order per sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery<'a> {
    /// The next message.
    Message(Message<'a>),
    /// Datagrams the sender no longer retains were never received: their messages are lost.
    Loss {
        /// The sender's session.
        session: u64,
        /// Lost datagram sequence numbers.
        datagrams: Range<u64>,
        /// Lost message sequence numbers (`None` if nothing had been delivered from this sender before).
        messages: Option<Range<u64>>,
    },
}

/// Something the application may want to know about, other than deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// First packet heard from a sender session.
    SenderJoined {
        /// The sender's session.
        session: u64,
        /// Address its packets come from.
        addr: SocketAddr,
    },
    /// A sender has been silent for `sender_timeout` and is forgotten.
    SenderGone {
        /// The sender's session.
        session: u64,
    },
    /// A receiver reported its position to this sender for the first time.
    ReceiverJoined {
        /// The receiver's session.
        session: u64,
    },
    /// A receiver has been silent for `receiver_timeout`; flow control no longer waits for it.
    ReceiverGone {
        /// The receiver's session.
        session: u64,
    },
    /// The slow-receiver policy stopped waiting for a receiver that was a whole window behind.
    SlowReceiverDropped {
        /// The receiver's session.
        session: u64,
        /// The position it had reported.
        position: u64,
    },
    /// A node announced itself for the first time.
    PeerJoined {
        /// Its node id.
        node_id: u64,
        /// Its session.
        session: u64,
        /// Its announced name.
        name: String,
    },
    /// A node said it is leaving.
    PeerLeft {
        /// Its node id.
        node_id: u64,
        /// Its session.
        session: u64,
    },
    /// A node was silent for `member_timeout`.
    PeerExpired {
        /// Its node id.
        node_id: u64,
        /// Its last session.
        session: u64,
    },
    /// A known node id announced itself with a new session: it restarted.
    PeerRestarted {
        /// Its node id.
        node_id: u64,
        /// The previous incarnation.
        old_session: u64,
        /// The new incarnation.
        new_session: u64,
    },
}

/// Counters kept by an endpoint. All only grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages accepted by `send`.
    pub messages_sent: u64,
    /// Payload bytes accepted by `send`.
    pub bytes_sent: u64,
    /// New DATA datagrams transmitted.
    pub datagrams_sent: u64,
    /// DATA datagrams retransmitted in answer to NAKs.
    pub retransmits: u64,
    /// NAKed datagrams not retransmitted because they were retransmitted within the linger.
    pub retransmits_suppressed: u64,
    /// NAKed ranges dropped because the retransmission queue was full.
    pub retransmit_queue_full: u64,
    /// NAKed datagrams not retransmitted because their requester exceeded its retransmission budget.
    pub retransmits_rate_limited: u64,
    /// HEARTBEAT packets sent.
    pub heartbeats_sent: u64,
    /// Times `send` found the window closed by flow control.
    pub flow_control_blocked: u64,
    /// NAK packets sent.
    pub naks_sent: u64,
    /// NAK packets received for this endpoint's own session.
    pub naks_received: u64,
    /// Missing datagrams whose NAK was held back because another receiver asked for them.
    pub naks_suppressed: u64,
    /// STATUS packets sent.
    pub status_sent: u64,
    /// STATUS packets received for this endpoint's own session.
    pub status_received: u64,
    /// Distinct DATA datagrams stored for delivery.
    pub datagrams_received: u64,
    /// Of those, ones that arrived as retransmissions.
    pub repairs_received: u64,
    /// Messages delivered to the application.
    pub messages_delivered: u64,
    /// DATA datagrams received again after they had been received.
    pub duplicates: u64,
    /// DATA datagrams dropped because they were past the receive buffer (they are NAKed later).
    pub beyond_buffer: u64,
    /// Packets that failed to parse, or broke the framing rules across datagrams.
    pub malformed: u64,
    /// Packets dropped by the access list (before parsing).
    pub denied: u64,
    /// Packets for another stream of the group.
    pub foreign_stream: u64,
    /// This endpoint's own packets looped back.
    pub own_packets: u64,
    /// Packets from senders beyond `max_senders`, receivers beyond `max_receivers`, or members beyond
    /// `max_members`.
    pub over_limit: u64,
    /// Reassembled messages discarded (and reported lost) for exceeding `max_message` or the shared
    /// `max_reassembly` budget.
    pub oversized_messages: u64,
    /// Loss events delivered.
    pub loss_events: u64,
    /// Datagrams covered by loss events.
    pub lost_datagrams: u64,
    /// Unsealed packets dropped because encryption is on.
    pub unsealed_dropped: u64,
    /// Sealed packets dropped because encryption is off.
    pub sealed_dropped: u64,
    /// Sealed packets that did not authenticate: wrong key, unknown key id, altered or truncated.
    pub auth_failed: u64,
    /// Sealed packets that authenticated but were seen before, or fell behind the session's replay window.
    pub replayed: u64,
    /// Peer sessions whose replay state was forgotten (least recently heard first) to make room for a new
    /// authentic session, the table being full (`max_senders + max_receivers + max_members` sessions).
    pub seal_evicted: u64,
    /// Packets not sent because sealing failed (the session's packet counter is exhausted).
    pub seal_failed: u64,
    /// Events dropped, oldest first, because [`MAX_QUEUED_EVENTS`] were waiting for the application
    /// (brought up to date by `handle_timeout`, `poll_transmit` and `poll_event`).
    pub events_dropped: u64,
}

/// One node's protocol state for one stream. See the [module docs](self) for the driving loop.
pub struct Endpoint {
    config: Config,
    session: u64,
    rng: Rng,
    sender: Sender,
    streams: Vec<Stream>,
    /// Stream that delivered last; `recv` continues there (batching) before moving round.
    current: usize,
    members: membership::Membership,
    events: EventQueue,
    stats: Stats,
    housekeeping_at: Instant,
    nak_ranges: [SeqRange; MAX_NAK_RANGES],
    /// Bytes all streams' reassemblies hold (bounded by `Config::max_reassembly`).
    reassembly_in_use: usize,
    /// Keys, counters and peers' replay windows, when encryption is on.
    sealer: Option<seal::Sealer>,
    /// Where a sealed datagram is copied and opened: allocated once (empty when encryption is off).
    scratch: Box<[u8]>,
}

/// How often silent senders, receivers and members are looked for.
pub const HOUSEKEEPING_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

impl Endpoint {
    /// Creates an endpoint. `session` identifies this incarnation (pick it at random); `seed` seeds the
    /// timer jitter. Allocates the retransmission window (`window × max_datagram` bytes) here, once.
    pub fn new(config: Config, session: u64, seed: u64, now: Instant) -> Result<Endpoint, ConfigError> {
        config.validate()?;
        let sealer = config.encryption.clone().map(|keys| {
            seal::Sealer::new(keys, session, config.max_senders + config.max_receivers + config.max_members)
        });
        let scratch = if sealer.is_some() { vec![0u8; MAX_UDP_PAYLOAD].into_boxed_slice() } else { Box::default() };
        Ok(Endpoint {
            sealer,
            scratch,
            sender: Sender::new(&config, session),
            members: membership::Membership::new(&config, now),
            config,
            session,
            rng: Rng::new(seed),
            streams: Vec::new(),
            current: 0,
            events: EventQueue::default(),
            stats: Stats::default(),
            housekeeping_at: now + HOUSEKEEPING_INTERVAL,
            nak_ranges: [SeqRange { start: 0, len: 0 }; MAX_NAK_RANGES],
            reassembly_in_use: 0,
        })
    }

    /// This incarnation's session id.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Nodes currently known to be alive.
    pub fn members(&self) -> &[Member] {
        self.members.members()
    }

    /// Sessions of the senders currently followed.
    pub fn senders(&self) -> impl Iterator<Item = u64> + '_ {
        self.streams.iter().map(|s| s.session)
    }

    /// Live receivers tracked by this endpoint's sender.
    pub fn receivers(&self) -> usize {
        self.sender.live_receivers()
    }

    /// Counters per peer: one row per sender followed, then one per receiver of this endpoint's stream.
    /// Allocates nothing; the engine copies the rows out at its stats cadence, not per packet.
    pub fn peer_stats(&self) -> impl Iterator<Item = PeerStats> + '_ {
        let node_id = |session: u64| self.members().iter().find(|m| m.session == session).map(|m| m.node_id);
        let senders = self.streams.iter().map(move |s| PeerStats {
            session: s.session,
            role: PeerRole::Sender,
            node_id: node_id(s.session),
            addr: Some(s.addr),
            counters: s.peer_counters(),
        });
        let receivers = self.sender.receiver_counters().map(move |(session, counters)| PeerStats {
            session,
            role: PeerRole::Receiver,
            node_id: node_id(session),
            addr: None,
            counters,
        });
        senders.chain(receivers)
    }

    /// Queues a message. Small messages are packed together into the open datagram, which goes out at the
    /// next [`poll_transmit`](Self::poll_transmit); larger ones are fragmented.
    pub fn send(&mut self, now: Instant, msg: &[u8]) -> Result<(), SendError> {
        self.sender.send(now, msg, &mut self.events, &mut self.stats)
    }

    /// [`send`](Self::send) of the message made of `head` followed by `body` (an application envelope and its
    /// payload, say), written into the window in one pass with no staging copy.
    #[inline(always)]
    pub fn send_parts(&mut self, now: Instant, head: &[u8], body: &[u8]) -> Result<(), SendError> {
        self.sender.send_parts(&mut { now }, head, body, &mut self.events, &mut self.stats)
    }

    /// [`send_parts`](Self::send_parts) with the time given as a [`Now`], asked only if a slow receiver holds
    /// the window.
    #[inline(always)]
    pub(crate) fn send_parts_at(&mut self, now: &mut impl Now, head: &[u8], body: &[u8]) -> Result<(), SendError> {
        self.sender.send_parts(now, head, body, &mut self.events, &mut self.stats)
    }

    /// The part of [`send_parts`](Self::send_parts) that needs no time: appends the message to the datagram
    /// being filled if it fits there whole, and returns whether it did. When it returns false nothing
    /// changed, and `send_parts` (which may open a datagram, so reads `now`) takes the message. A caller
    /// whose clock read costs something calls this first.
    #[inline(always)]
    pub fn try_append_parts(&mut self, head: &[u8], body: &[u8]) -> bool {
        self.sender.try_append(head, body, &mut self.stats)
    }

    /// Queues whole messages already framed as DATA carries them (`[len u16 BE][FRAME_FIRST | FRAME_LAST][0]
    /// [message]` each, back to back), as many as the window takes, copying each datagram's worth at once
    /// instead of one message at a time. Stops at the end or after `max_messages` ([`FramesStop::Done`]),
    /// when the window refuses ([`FramesStop::WouldBlock`], counted as `send` counts it), or before a frame
    /// that is not such a message, is larger than `max_message` or would need fragmenting
    /// ([`FramesStop::NotTaken`]: give that one to `send`). The same messages given to `send` one by one
    /// would have made the same datagrams.
    pub fn send_frames(&mut self, now: Instant, frames: &[u8], max_messages: u64) -> FramesTaken {
        self.sender.send_frames(now, frames, max_messages, &mut self.events, &mut self.stats)
    }

    /// Whether `send` would accept a message now.
    pub fn is_writable(&mut self, now: Instant) -> bool {
        self.sender.is_writable(now, &mut self.events)
    }

    /// Whether datagrams are waiting for `poll_transmit`.
    pub fn has_pending_transmit(&self) -> bool {
        self.sender.has_pending()
    }

    /// Announces that this node is leaving; the MEMBER packet goes out at the next `poll_transmit`.
    pub fn close(&mut self, now: Instant) {
        self.members.leave(now);
    }

    /// Adds a key to the keyring: packets sealed under it are accepted from now on. Rotation is: add the
    /// new key on every node, then [`use_key`](Self::use_key) it everywhere, then remove the old one.
    pub fn add_key(&mut self, key_id: u8, secret: [u8; KEY_LEN]) -> Result<(), KeyError> {
        let sealer = self.sealer.as_mut().ok_or(KeyError::NotEnabled)?;
        sealer.add_key(key_id, secret)?;
        self.config.encryption = Some(sealer.keyring().clone());
        Ok(())
    }

    /// Seals every packet from now on under the key `key_id`, which must be held.
    pub fn use_key(&mut self, key_id: u8) -> Result<(), KeyError> {
        let sealer = self.sealer.as_mut().ok_or(KeyError::NotEnabled)?;
        sealer.use_key(key_id)?;
        self.config.encryption = Some(sealer.keyring().clone());
        Ok(())
    }

    /// Removes a key (not the sending key): packets sealed under it are rejected from now on.
    pub fn remove_key(&mut self, key_id: u8) -> Result<(), KeyError> {
        let sealer = self.sealer.as_mut().ok_or(KeyError::NotEnabled)?;
        sealer.remove_key(key_id)?;
        self.config.encryption = Some(sealer.keyring().clone());
        Ok(())
    }

    /// Processes one received datagram. Never panics on any input; bad packets are counted and dropped.
    ///
    /// With encryption on, the datagram is opened (authenticated, checked against replay, decrypted) in an
    /// endpoint-owned buffer before anything else than the access list and the clear header looks at it.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let Some(header) = self.admit(from, bytes) else { return };
        if header.flags & FLAG_SEALED == 0 || self.sealer.is_none() {
            self.dispatch(now, from, bytes);
            return;
        }
        if bytes.len() > self.scratch.len() {
            self.stats.malformed += 1; // larger than any UDP payload: not a datagram this endpoint can receive
            return;
        }
        // Opened in a copy, since `bytes` is the caller's. Taken out for the call so that the plaintext can
        // borrow it while `dispatch` borrows the endpoint.
        let mut scratch = std::mem::take(&mut self.scratch);
        let buf = &mut scratch[..bytes.len()];
        buf.copy_from_slice(bytes);
        self.open_and_dispatch(now, from, header.session, buf);
        self.scratch = scratch;
    }

    /// Like [`handle_datagram`](Self::handle_datagram), but a sealed datagram is opened in place, in the
    /// caller's buffer (which is left holding the plaintext or garbage): one copy fewer per datagram.
    pub fn handle_datagram_mut(&mut self, now: Instant, from: SocketAddr, bytes: &mut [u8]) {
        let Some(header) = self.admit(from, bytes) else { return };
        if header.flags & FLAG_SEALED == 0 || self.sealer.is_none() {
            self.dispatch(now, from, bytes);
            return;
        }
        self.open_and_dispatch(now, from, header.session, bytes);
    }

    /// The checks every datagram passes before it is opened or parsed: the access list, a header, not our
    /// own, and sealed exactly when encryption is on. Returns the header, or `None` (counted) to drop it.
    fn admit(&mut self, from: SocketAddr, bytes: &[u8]) -> Option<Header> {
        if !self.config.access.allows_all() && self.config.access.check(from) == Action::Deny {
            self.stats.denied += 1;
            return None;
        }
        let Ok(header) = Header::parse(bytes) else {
            self.stats.malformed += 1;
            return None;
        };
        // Own packets looped back are not worth opening: at full rate that would double the sender's work.
        if header.session == self.session {
            self.stats.own_packets += 1;
            return None;
        }
        let sealed = header.flags & FLAG_SEALED != 0;
        match (self.sealer.is_some(), sealed) {
            (false, true) => self.stats.sealed_dropped += 1,
            (true, false) => self.stats.unsealed_dropped += 1,
            _ => return Some(header),
        }
        None
    }

    /// Opens a sealed datagram in place and handles the plaintext.
    fn open_and_dispatch(&mut self, now: Instant, from: SocketAddr, session: u64, buf: &mut [u8]) {
        let Some(sealer) = self.sealer.as_mut() else { return };
        match sealer.open(session, buf) {
            Ok(opened) => {
                if opened.evicted {
                    self.stats.seal_evicted += 1;
                }
                self.dispatch(now, from, &buf[..opened.len]);
            }
            Err(seal::OpenError::Replay) => self.stats.replayed += 1,
            Err(_) => self.stats.auth_failed += 1,
        }
    }

    /// Handles a datagram in clear (opened, if encryption is on).
    fn dispatch(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let packet = match Packet::parse(bytes) {
            Ok(p) => p,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        let header = packet.header();
        if header.stream != self.config.stream {
            self.stats.foreign_stream += 1;
            return;
        }
        match packet {
            Packet::Data(d) => {
                if let Some(i) = self.stream_for(now, header.session, from, d.seq, d.low, d.is_retransmit()) {
                    self.streams[i].handle_data(now, &self.config, &mut self.rng, &d, bytes, &mut self.stats);
                }
            }
            Packet::Heartbeat(_, hb) => {
                if let Some(i) = self.stream_for(now, header.session, from, hb.next_seq, hb.low, false) {
                    self.streams[i].handle_heartbeat(now, &self.config, &mut self.rng, &hb);
                }
            }
            Packet::Nak(nak) => {
                if nak.target_session == self.session {
                    self.sender.handle_nak(now, header.session, &nak, &mut self.stats);
                } else if let Some(s) = self.streams.iter_mut().find(|s| s.session == nak.target_session) {
                    s.overhear_nak(now, &self.config, &mut self.rng, &nak, &mut self.stats);
                }
            }
            Packet::Status(_, status) => {
                if status.target_session == self.session {
                    self.stats.status_received += 1;
                    if !self.sender.handle_status(now, header.session, &status, &mut self.events) {
                        self.stats.over_limit += 1;
                    }
                }
            }
            Packet::Member(m) => {
                if m.repr.state == MemberState::Leaving {
                    self.sender.forget_receiver(header.session, &mut self.events);
                }
                if !self.members.handle(now, header.session, &m.repr, &mut self.events) {
                    self.stats.over_limit += 1;
                }
            }
        }
    }

    /// Index of the stream for `session`, creating it (late-join policy) when this is a new sender.
    fn stream_for(
        &mut self,
        now: Instant,
        session: u64,
        from: SocketAddr,
        seq: u64,
        low: u64,
        retransmit: bool,
    ) -> Option<usize> {
        if let Some(s) = self.streams.get(self.current)
            && s.session == session
        {
            return Some(self.current);
        }
        if let Some(i) = self.streams.iter().position(|s| s.session == session) {
            return Some(i);
        }
        if retransmit && self.config.late_join == LateJoin::Next {
            return None; // an old datagram repaired for someone else: not where this receiver starts
        }
        if self.streams.len() >= self.config.max_senders {
            self.stats.over_limit += 1;
            return None;
        }
        self.streams.push(receiver::new_stream(session, from, seq, low, now, &self.config));
        self.events.push_back(Event::SenderJoined { session, addr: from });
        Some(self.streams.len() - 1)
    }

    /// Runs timers: expiry of silent peers, progress of a fragmented message. NAKs, STATUS and heartbeats
    /// that fall due are emitted by `poll_transmit`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.sender.on_tick(now, &mut self.events, &mut self.stats);
        if now >= self.housekeeping_at {
            self.housekeeping_at = now + HOUSEKEEPING_INTERVAL;
            let timeout = self.config.sender_timeout;
            let events = &mut self.events;
            let in_use = &mut self.reassembly_in_use;
            self.streams.retain_mut(|s| {
                if now.saturating_duration_since(s.last_heard) < timeout {
                    return true;
                }
                if !s.is_drained() {
                    // Keep it until the application has taken what arrived and the losses are reported.
                    s.mark_gone();
                    return true;
                }
                events.push_back(Event::SenderGone { session: s.session });
                *in_use -= s.reassembly_charged();
                false
            });
            self.current = 0;
            self.sender.expire_receivers(now, &mut self.events);
            self.members.expire(now, &mut self.events);
        }
        self.stats.events_dropped = self.events.dropped();
    }

    /// Writes the next datagram to send into `buf` (at least `max_datagram` bytes), or returns `None` when
    /// nothing is due. Priority: NAKs, retransmissions, new data, heartbeats, STATUS, announcements. With
    /// encryption on, the datagram is sealed in place in `buf`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        self.stats.events_dropped = self.events.dropped();
        let mut t = self.poll_plain(now, buf)?;
        if let Some(sealer) = self.sealer.as_mut() {
            match sealer.seal(buf, t.len) {
                Ok(len) => t.len = len,
                Err(_) => {
                    self.stats.seal_failed += 1;
                    return None;
                }
            }
        }
        Some(t)
    }

    /// The next datagram to send, in clear.
    fn poll_plain(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        for i in 0..self.streams.len() {
            let count = self.streams[i].collect_naks(now, &self.config, &mut self.rng, &mut self.nak_ranges);
            if count > 0 {
                let target_session = self.streams[i].session;
                let header = self.header(Kind::Nak);
                let nak = NakRepr { target_session, ranges: &self.nak_ranges[..count] };
                let len = nak.emit(&header, buf).ok()?;
                self.stats.naks_sent += 1;
                return Some(Transmit { len, destination: Destination::Group });
            }
        }
        if let Some(len) = self.sender.poll_transmit(now, buf, &mut self.events, &mut self.stats) {
            return Some(Transmit { len, destination: Destination::Group });
        }
        let header = self.header(Kind::Status);
        for s in self.streams.iter_mut() {
            if let Some(next_expected) = s.take_status(now, &self.config) {
                let status =
                    StatusRepr { target_session: s.session, next_expected, buffer_capacity: s.buffer_capacity() };
                let len = status.emit(&header, buf).ok()?;
                self.stats.status_sent += 1;
                return Some(Transmit { len, destination: Destination::Unicast(s.addr) });
            }
        }
        if let Some(state) = self.members.poll_announce(now) {
            let header = self.header(Kind::Member);
            let repr = MemberRepr { node_id: self.config.node_id, state, name: &self.config.node_name };
            let len = repr.emit(&header, buf).ok()?;
            return Some(Transmit { len, destination: Destination::Group });
        }
        None
    }

    fn header(&self, kind: Kind) -> Header {
        Header { kind, flags: 0, stream: self.config.stream, session: self.session }
    }

    /// When `handle_timeout` (and then `poll_transmit`) should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = earliest(self.sender.poll_timeout(), self.members.poll_timeout());
        t = earliest(t, Some(self.housekeeping_at));
        for s in &self.streams {
            t = earliest(t, s.poll_timeout());
        }
        t
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.stats.events_dropped = self.events.dropped();
        self.events.pop_front()
    }

    /// Next delivery (message or loss), in order per sender. The payload is borrowed from the endpoint's
    /// buffers until the next call.
    pub fn recv(&mut self) -> Option<Delivery<'_>> {
        let (i, step) = self.next_step(false)?;
        match batch(&self.streams[i], step) {
            Batch::One(d) => Some(d),
            Batch::Run(_) => unreachable!("runs are only made when asked for"),
        }
    }

    /// Like [`recv`](Self::recv), except that whole messages stored one after another in a datagram come
    /// out together as one [`Batch::Run`]: the same messages in the same order, at a fraction of the cost
    /// per message. Anything else comes out as [`Batch::One`].
    pub fn recv_batch(&mut self) -> Option<Batch<'_>> {
        let (i, step) = self.next_step(true)?;
        Some(batch(&self.streams[i], step))
    }

    /// The next delivery step of any stream, round-robin from the last one that delivered: its index and step.
    fn next_step(&mut self, runs: bool) -> Option<(usize, Step)> {
        let n = self.streams.len();
        // Round from `current` (no division: this runs once per delivered message).
        let start = if self.current < n { self.current } else { 0 };
        for k in 0..n {
            let i = if start + k < n { start + k } else { start + k - n };
            let cfg = &self.config;
            if let Some(step) =
                self.streams[i].poll(cfg, &mut self.rng, &mut self.stats, &mut self.reassembly_in_use, runs)
            {
                self.current = i;
                return Some((i, step));
            }
        }
        None
    }
}

/// What a stream's delivery step hands out, borrowed from the stream's buffers.
fn batch(s: &Stream, step: Step) -> Batch<'_> {
    let session = s.session;
    match step {
        Step::Message { slot, range, seq } => {
            Batch::One(Delivery::Message(Message { session, seq, payload: &s.slot_bytes(slot)[range] }))
        }
        Step::Run { slot, frames, seq, count } => {
            Batch::Run(Run { session, first_seq: seq, count, frames: &s.slot_bytes(slot)[frames] })
        }
        Step::Reassembled { seq } => Batch::One(Delivery::Message(Message { session, seq, payload: s.reassembled() })),
        Step::Loss { datagrams, messages } => Batch::One(Delivery::Loss { session, datagrams, messages }),
    }
}

/// The earlier of two optional instants.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}
