//! The engine loop: one thread (or the caller's duty cycle) owns a backend, the sockets and an
//! [`Endpoint`], and exchanges messages with application threads through SPSC rings.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering, fence};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::backend::{Backend, BackendStats, Wake};
use crate::envelope::Envelope;
use crate::proto::rng::Rng;
use crate::proto::{
    Batch, Delivery, Destination, Endpoint, Event, FramesStop, Member, Now, PeerStats, Run, SendError, Stats,
};
use crate::ring::Fenced;
use crate::ring::Producer;
use crate::ring::frames::{FrameConsumer, MARKER};
use crate::topic::{self, Filter};
use crate::wire::FRAME_HEADER_LEN;

/// Ring record tags, engine to application: `[session u64][seq u64][payload]`.
pub(crate) const OUT_MESSAGE: u32 = 1;
/// The delivery is in the side channel.
pub(crate) const OUT_SIDE: u32 = 2;
/// `[session][datagrams.start][datagrams.end][has_messages][messages.start][messages.end]`, all u64.
pub(crate) const OUT_LOSS: u32 = 3;
/// Whole messages of one sender for a catch-all subscriber, in one record: `[session u64][first seq u64]`
/// then their frames as on the wire (`proto::Run::frames`).
pub(crate) const OUT_RUN: u32 = 4;
/// Bytes before the payload of an `OUT_MESSAGE` record (and before the frames of an `OUT_RUN` record).
pub(crate) const OUT_HEADER: usize = 16;

/// What goes through the side channel beside an `OUT_SIDE` marker.
#[derive(Debug)]
pub(crate) enum Side {
    /// A message too large for a ring record.
    Message { session: u64, seq: u64, payload: Vec<u8> },
    /// A protocol event.
    Event(Event),
    /// The first delivery of every node: which backend runs it, and why.
    Backend(super::BackendKind, String),
}

/// How the engine waits when it has nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleStrategy {
    /// Never wait in the kernel: lowest latency, one core at 100 %.
    BusySpin,
    /// Spin for this long after the last work, then wait in the kernel until a datagram, a timer or the
    /// application wakes it. The default, with 50 µs: an idle node uses next to no CPU.
    SpinThenPark(Duration),
    /// Wait in the kernel as soon as there is nothing to do.
    Park,
}

impl Default for IdleStrategy {
    fn default() -> IdleStrategy {
        IdleStrategy::SpinThenPark(Duration::from_micros(50))
    }
}

/// Counters of a running node: the protocol's, the engine's own, and its backend's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Protocol counters.
    pub protocol: Stats,
    /// Datagrams read from the sockets.
    pub datagrams_in: u64,
    /// Datagrams dropped on purpose by the loss injector.
    pub injected_drops: u64,
    /// Messages no subscriber's filter selected (dropped in the engine).
    pub unmatched: u64,
    /// Messages addressed to another node (dropped in the engine).
    pub not_addressed: u64,
    /// Messages whose application envelope did not parse (dropped in the engine).
    pub bad_envelope: u64,
    /// Own messages delivered to this node's subscribers (local delivery).
    pub local_deliveries: u64,
    /// The backend's counters: drops on the sockets (refused sends, truncated reads, failed receives) and
    /// how sends and receives were batched.
    pub backend: BackendStats,
}

/// The per-peer half of the published counters (the member list is `Shared::members`).
#[derive(Default)]
pub(crate) struct PeerTable {
    pub(crate) peers: Vec<PeerStats>,
}

/// State shared between the engine and the application handles.
pub(crate) struct Shared {
    pub(crate) shutdown: AtomicBool,
    pub(crate) closed: AtomicBool,
    pub(crate) engine_parked: AtomicBool,
    pub(crate) waker: Mutex<Option<Arc<dyn Wake>>>,
    /// A command is waiting in the channel (checked before the engine parks).
    pub(crate) command_pending: AtomicBool,
    pub(crate) stats: Mutex<NodeStats>,
    /// Live members, refreshed by the engine when membership changes.
    pub(crate) members: Mutex<Vec<Member>>,
    /// Refreshed at the stats cadence (not when going idle: it walks every peer).
    pub(crate) peers: Mutex<PeerTable>,
    pub(crate) error: Mutex<Option<String>>,
    /// Key rotation requests for the endpoint.
    pub(crate) keys: super::keys::KeyCopy,
}

/// State one application handle (publisher or subscriber) shares with the engine.
#[derive(Default)]
pub(crate) struct HandleShared {
    pub(crate) waiter: Waiter,
    /// The handle was dropped: the engine forgets it.
    pub(crate) gone: AtomicBool,
    /// The engine wanted to deliver but this subscriber's ring was full.
    pub(crate) blocked: AtomicBool,
    /// The engine has taken the handle into its loop.
    pub(crate) attached: AtomicBool,
    /// Who has a subscriber: [`TAKEN`] (the application; subscribers made by `Node::subscribe` start so),
    /// [`HELD`] (the node: its catch-all and the builder's subscriptions until taken) or [`ABANDONED`] (the
    /// engine gave it up).
    pub(crate) custody: AtomicU8,
}

/// A subscriber in the application's hands.
pub(crate) const TAKEN: u8 = 0;
/// A subscriber the node still holds (the catch-all, or a builder subscription): nobody polls it.
pub(crate) const HELD: u8 = 1;
/// A held subscriber whose ring filled: the engine stopped delivering to it.
pub(crate) const ABANDONED: u8 = 2;

/// The engine's end of a publisher.
pub(crate) struct Inlet {
    /// Wire frames (`ring::frames`); a marker frame stands for the next message of `side`.
    pub(crate) ring: FrameConsumer,
    pub(crate) side: mpsc::Receiver<Vec<u8>>,
    pub(crate) pending: Option<Vec<u8>>,
    pub(crate) shared: Arc<HandleShared>,
}

/// The engine's end of a subscriber.
pub(crate) struct Outlet {
    pub(crate) ring: Producer,
    pub(crate) side: mpsc::Sender<Side>,
    /// `None`: every message except other nodes' private topics (the catch-all subscriber).
    pub(crate) filter: Option<Filter>,
    pub(crate) shared: Arc<HandleShared>,
}

impl Outlet {
    #[inline]
    fn accepts(&self, topic: &str, node_id: u64) -> bool {
        if topic.is_empty() {
            return self.filter.is_none();
        }
        match &self.filter {
            None => catch_all_takes(topic, node_id),
            Some(f) => !topic.is_empty() && f.matches(topic),
        }
    }
}

/// Whether a catch-all subscriber takes a message on `topic`: any topic but another node's private ones.
#[inline]
fn catch_all_takes(topic: &str, node_id: u64) -> bool {
    topic::private_owner(topic).is_none_or(|owner| owner == node_id)
}

/// A delivery handed straight to the thread that drives a node ([`Engine::take_direct`]).
pub(crate) enum Direct<'a> {
    /// A message, envelope included, borrowed from the protocol's buffers.
    Message { session: u64, seq: u64, msg: &'a [u8] },
    /// Messages that can no longer be repaired.
    Loss { session: u64, datagrams: std::ops::Range<u64>, messages: Option<std::ops::Range<u64>> },
    /// A protocol event.
    Event(Event),
}

/// What application threads ask of a running engine.
pub(crate) enum Command {
    /// A new publisher.
    AddInlet(Inlet),
    /// A new subscriber.
    AddOutlet(Outlet),
    /// A key rotation step (already checked against the application's copy of the keyring).
    Key(super::keys::KeyOp),
}

/// An application thread that may park waiting for the engine.
#[derive(Default)]
pub(crate) struct Waiter {
    waiting: AtomicBool,
    thread: Mutex<Option<Thread>>,
}

impl Waiter {
    /// Parks the current thread until `ready()` or the timeout; the engine unparks it through `notify`.
    pub(crate) fn wait_until(&self, deadline: Instant, mut ready: impl FnMut() -> bool) -> bool {
        loop {
            if ready() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current());
            self.waiting.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !ready() {
                // Bounded park: a missed unpark costs at most a millisecond, never a hang.
                std::thread::park_timeout((deadline - now).min(Duration::from_millis(1)));
            }
            self.waiting.store(false, Ordering::SeqCst);
        }
    }

    pub(crate) fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst)
            && let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
        {
            t.unpark();
        }
    }
}

impl Shared {
    pub(crate) fn new() -> Shared {
        Shared {
            shutdown: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            engine_parked: AtomicBool::new(false),
            waker: Mutex::new(None),
            command_pending: AtomicBool::new(false),
            stats: Mutex::new(NodeStats::default()),
            members: Mutex::new(Vec::new()),
            peers: Mutex::new(PeerTable::default()),
            error: Mutex::new(None),
            keys: Default::default(),
        }
    }

    /// Wakes the engine if it is waiting in the kernel.
    pub(crate) fn wake_engine(&self) {
        fence(Ordering::SeqCst);
        if self.engine_parked.load(Ordering::SeqCst) {
            self.wake_parked_engine();
        }
    }

    /// [`wake_engine`](Self::wake_engine) right after a publisher ring's commit, which is a sequentially
    /// consistent exchange (the proof says so): that orders the write the engine must see before this check
    /// of `engine_parked`, against the engine's store, fence and re-check in `park`. The load must stay
    /// SeqCst (Acquire would let it read a stale `false`), and so must `park`'s fence.
    #[inline]
    pub(crate) fn wake_engine_fenced(&self, _published: Fenced) {
        if self.engine_parked.load(Ordering::SeqCst) {
            self.wake_parked_engine();
        }
    }

    /// The rare half of a wake, kept out of line so that the check above inlines into every publish.
    #[cold]
    #[inline(never)]
    fn wake_parked_engine(&self) {
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            w.wake();
        }
    }
}

/// How a duty cycle reads its sockets.
#[derive(Clone, Copy)]
enum Read {
    /// What is ready, as `Backend::receive` reads it, waiting up to the timeout when nothing is.
    Ready(Option<Duration>),
    /// Every socket until it is empty (`Backend::receive_all`), without waiting.
    Everything,
}

/// The clock, read once and only if the protocol asks (`proto::Now`).
#[derive(Default)]
struct ReadClock(Option<Instant>);

impl Now for ReadClock {
    #[inline]
    fn now(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

/// Drops a seeded fraction of received datagrams, so repair runs on real sockets.
pub(crate) struct LossInjector {
    rng: Rng,
    probability: f64,
}

impl LossInjector {
    pub(crate) fn new(probability: f64, seed: u64) -> LossInjector {
        LossInjector { rng: Rng::new(seed), probability }
    }
}

pub(crate) struct Engine {
    pub(crate) backend: Box<dyn Backend>,
    endpoint: Endpoint,
    inlets: Vec<Inlet>,
    router: Router,
    commands: mpsc::Receiver<Command>,
    /// Deliver this node's own messages to its subscribers too.
    local_delivery: bool,
    shared: Arc<Shared>,
    group: SocketAddr,
    /// Room lent for each datagram by the backend: the endpoint's largest datagram.
    max_datagram: usize,
    loss: Option<LossInjector>,
    stats_at: Instant,
    /// Membership events since the member list was last published.
    members_changed: bool,
    /// A direct send's message in one piece, for local delivery.
    own_scratch: Vec<u8>,
    /// Direct sends delivered locally since subscribers were last woken: they are woken once, at the next
    /// cycle, not once per message (each wake is a full fence per subscriber).
    own_unannounced: bool,
    /// The driving thread takes deliveries itself (`Node::poll`): they wait in the protocol for it.
    direct_reader: bool,
    /// The last `take_direct` stopped at its `max`: more may be waiting (a reason not to park).
    direct_pending: bool,
    /// `STALL_GAP` after the last duty cycle's clock read, and whether the engine waited in `park` since.
    stall_at: Instant,
    parked: bool,
}

/// A gap between two duty cycles longer than this, not spent waiting in `park`, means the thread did not
/// run (descheduled, stopped, or a driving application busy elsewhere): the next cycle reads every socket
/// until it is empty before its timers judge any peer silent. A receive may otherwise leave datagrams for
/// the next one (`Backend::receive`), and a peer whose datagrams wait unread would be judged on the time
/// the node itself was away.
const STALL_GAP: Duration = Duration::from_millis(100);

#[derive(Default)]
struct EngineCounters {
    datagrams_in: u64,
    injected_drops: u64,
    unmatched: u64,
    not_addressed: u64,
    bad_envelope: u64,
    local_deliveries: u64,
}

/// How often a running engine refreshes the stats snapshot.
const STATS_INTERVAL: Duration = Duration::from_millis(50);

pub(crate) struct EngineParts {
    pub(crate) endpoint: Endpoint,
    pub(crate) inlet: Inlet,
    /// The catch-all subscriber's end.
    pub(crate) outlet: Outlet,
    /// Subscriptions made on the builder, there from the start.
    pub(crate) preset: Vec<Outlet>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) local_delivery: bool,
    /// Deliveries go to `Node::poll` (`take_direct`), not to subscribers.
    pub(crate) direct_reader: bool,
    pub(crate) shared: Arc<Shared>,
    pub(crate) group: SocketAddr,
    pub(crate) loss: Option<LossInjector>,
    /// Why this backend was chosen, for the first delivery.
    pub(crate) backend_reason: String,
}

impl Engine {
    pub(crate) fn new(backend: Box<dyn Backend>, mut parts: EngineParts) -> Engine {
        let _ = parts.outlet.side.send(Side::Backend(backend.kind(), std::mem::take(&mut parts.backend_reason)));
        parts.outlet.ring.push(OUT_SIDE, &[]);
        *parts.shared.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend.waker());
        let max_datagram = parts.endpoint.config().max_datagram;
        let inline_max = parts.outlet.ring.max_record() - OUT_HEADER;
        let node_id = parts.endpoint.config().node_id;
        parts.inlet.shared.attached.store(true, Ordering::SeqCst);
        parts.outlet.shared.attached.store(true, Ordering::SeqCst);
        // A direct reader's node has no subscribers: its catch-all end is made but never attached.
        let mut outlets = if parts.direct_reader { Vec::new() } else { vec![parts.outlet] };
        for o in parts.preset {
            o.shared.attached.store(true, Ordering::SeqCst);
            outlets.push(o);
        }
        Engine {
            backend,
            endpoint: parts.endpoint,
            inlets: vec![parts.inlet],
            router: Router {
                outlets,
                counters: EngineCounters::default(),
                node_id,
                inline_max: inline_max.min(64 * 1024),
            },
            commands: parts.commands,
            local_delivery: parts.local_delivery,
            shared: parts.shared,
            group: parts.group,
            max_datagram,
            loss: parts.loss,
            stats_at: Instant::now(),
            members_changed: false,
            own_scratch: Vec::new(),
            own_unannounced: false,
            direct_reader: parts.direct_reader,
            direct_pending: false,
            stall_at: Instant::now() + STALL_GAP,
            parked: false,
        }
    }

    /// One pass of work, then (if there was none and `wait` allows) one wait in the kernel of at most `wait`.
    /// Returns the amount of work done.
    pub(crate) fn duty_cycle(&mut self, wait: Option<Duration>) -> io::Result<usize> {
        let work = self.poll_once()?;
        if work == 0 && wait != Some(Duration::ZERO) {
            return self.park(wait);
        }
        Ok(work)
    }

    /// Receives as `how` says, stamping every datagram with `now`.
    fn read(&mut self, now: Instant, how: Read) -> io::Result<usize> {
        let ep = &mut self.endpoint;
        let loss = &mut self.loss;
        let c = &mut self.router.counters;
        let mut sink = |from: SocketAddr, bytes: &mut [u8]| {
            c.datagrams_in += 1;
            if let Some(l) = loss.as_mut()
                && l.rng.unit() < l.probability
            {
                c.injected_drops += 1;
                return;
            }
            ep.handle_datagram_mut(now, from, bytes);
        };
        match how {
            Read::Ready(timeout) => self.backend.receive(timeout, &mut sink),
            Read::Everything => self.backend.receive_all(&mut sink),
        }
    }

    fn poll_once(&mut self) -> io::Result<usize> {
        if std::mem::take(&mut self.own_unannounced) {
            self.notify_outlets();
        }
        let mut work = self.run_commands();
        // One clock read per cycle: the cycle takes microseconds, far below any protocol timer.
        let now = Instant::now();
        let stalled = !std::mem::take(&mut self.parked) && now > self.stall_at;
        self.stall_at = now + STALL_GAP;
        // One transmit per cycle, before its receive system call: what the application queued leaves at once
        // (a reply does not wait for the receive), and so does what the previous cycle's receive and timers
        // called for (a NAK, a repair, a STATUS, a window the STATUS opened). A cycle that received did work,
        // so the next one follows without waiting.
        work += self.take_messages(now);
        // Queued, not flushed: the receive below submits it in the same system call.
        work += self.transmit(now, false)?;
        let how = if stalled { Read::Everything } else { Read::Ready(Some(Duration::ZERO)) };
        work += self.read(now, how)?;
        // Timers after the receive: a thread that was descheduled or stopped for a while must not judge its
        // peers silent before reading what they sent meanwhile (all of it, after a stall: `STALL_GAP`).
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
        }
        work += self.deliver();
        if now >= self.stats_at || self.members_changed {
            self.publish_stats();
            self.publish_peers();
            self.stats_at = now + STATS_INTERVAL;
        }
        Ok(work)
    }

    /// Takes new publishers and subscribers into the loop, applies key operations, and forgets dropped
    /// handles.
    fn run_commands(&mut self) -> usize {
        let mut n = 0;
        // A plain load first: the swap (a locked instruction) only when a command is waiting.
        if self.shared.command_pending.load(Ordering::Acquire)
            && self.shared.command_pending.swap(false, Ordering::SeqCst)
        {
            while let Ok(cmd) = self.commands.try_recv() {
                match cmd {
                    Command::AddInlet(i) => {
                        i.shared.attached.store(true, Ordering::SeqCst);
                        i.shared.waiter.notify();
                        self.inlets.push(i);
                    }
                    Command::AddOutlet(o) => {
                        o.shared.attached.store(true, Ordering::SeqCst);
                        o.shared.waiter.notify();
                        self.router.outlets.push(o);
                    }
                    Command::Key(op) => op.apply_to_endpoint(&mut self.endpoint),
                }
                n += 1;
            }
        }
        // A dropped publisher's last messages are still taken before it is forgotten.
        self.inlets
            .retain_mut(|i| !(i.shared.gone.load(Ordering::Acquire) && i.ring.is_empty() && i.pending.is_none()));
        self.router.outlets.retain(|o| !o.shared.gone.load(Ordering::Acquire));
        n
    }

    /// Moves messages from the publishers' rings into the protocol until the window refuses. The rings hold
    /// wire frames, so whole messages go in bulk (`Endpoint::send_frames`: one copy per datagram's worth);
    /// a marker's message (in the side channel) and a message that needs fragmenting go one at a time
    /// through `Endpoint::send`. With local delivery, one message at a time: each needs ring room.
    fn take_messages(&mut self, now: Instant) -> usize {
        let mut n = 0;
        let session = self.endpoint.session();
        let max = if self.local_delivery { 1 } else { u64::MAX };
        for k in 0..self.inlets.len() {
            let mut taken = 0;
            loop {
                if self.local_delivery && !self.router.has_room() {
                    break;
                }
                let inlet = &mut self.inlets[k];
                let Some(frames) = inlet.ring.peek() else { break };
                let seq = self.endpoint.stats().messages_sent;
                let t = self.endpoint.send_frames(now, frames, max);
                if t.messages > 0 {
                    if self.local_delivery {
                        self.router.deliver_own(session, seq, &frames[FRAME_HEADER_LEN..t.bytes]);
                    }
                    inlet.ring.advance(t.bytes);
                    taken += t.messages;
                    // Unless the window refused, more may follow: past the end of what was peeked (a lap's
                    // end, padding), or a frame for `send`, met again by the next peek.
                    if t.stop == FramesStop::WouldBlock {
                        break;
                    }
                    continue;
                }
                if t.stop != FramesStop::NotTaken {
                    break;
                }
                // The first frame is a marker or needs fragmenting: one message through `send`.
                let len = usize::from(u16::from_be_bytes([frames[0], frames[1]]));
                let result = if frames[3] == MARKER {
                    let Some(msg) = inlet.pending.take().or_else(|| inlet.side.try_recv().ok()) else {
                        break; // the publisher sends on the channel before the marker, so this cannot happen
                    };
                    let r = self.endpoint.send(now, &msg);
                    match r {
                        Err(SendError::WouldBlock) => inlet.pending = Some(msg),
                        Ok(()) if self.local_delivery => self.router.deliver_own(session, seq, &msg),
                        _ => {}
                    }
                    r
                } else {
                    let msg =
                        frames.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len).expect("the ring holds whole frames");
                    let r = self.endpoint.send(now, msg);
                    if r.is_ok() && self.local_delivery {
                        self.router.deliver_own(session, seq, msg);
                    }
                    r
                };
                match result {
                    Err(SendError::WouldBlock) => break,
                    // Ok, or TooLarge (the publisher checks the size first, so only a misuse gets here).
                    _ => {
                        inlet.ring.advance(FRAME_HEADER_LEN + len);
                        taken += 1;
                    }
                }
            }
            if taken > 0 {
                self.inlets[k].shared.waiter.notify();
                n += taken as usize;
            }
        }
        if n > 0 && self.local_delivery {
            self.notify_outlets();
        }
        n
    }

    /// Hands up to about `max` messages and losses (a datagram's messages go together, so a run may pass
    /// `max`; 0 hands nothing), and then every pending event, straight from the protocol to `f`, as a
    /// catch-all subscriber would get them: no ring, no copy. Returns the messages and losses handed.
    pub(crate) fn take_direct(&mut self, max: usize, f: &mut dyn FnMut(Direct<'_>)) -> usize {
        if max == 0 {
            return 0;
        }
        let mut n = 0;
        self.direct_pending = false;
        while n < max {
            let Some(d) = self.endpoint.recv_batch() else { break };
            match d {
                Batch::Run(run) => {
                    for m in run.messages() {
                        if self.router.catch_all_accepts(m.payload) {
                            f(Direct::Message { session: m.session, seq: m.seq, msg: m.payload });
                            n += 1;
                        }
                    }
                }
                Batch::One(Delivery::Message(m)) => {
                    if self.router.catch_all_accepts(m.payload) {
                        f(Direct::Message { session: m.session, seq: m.seq, msg: m.payload });
                        n += 1;
                    }
                }
                Batch::One(Delivery::Loss { session, datagrams, messages }) => {
                    f(Direct::Loss { session, datagrams, messages });
                    n += 1;
                }
            }
            self.direct_pending = n >= max;
        }
        // Events are few and carry membership: all of them, whatever `max`.
        while let Some(e) = self.endpoint.poll_event() {
            self.members_changed |= is_membership(&e);
            f(Direct::Event(e));
        }
        n
    }

    /// Sends the message `head` followed by `body` straight into the protocol, from the thread that drives
    /// this engine: no ring between, so one copy fewer than a publisher's. It goes out at the next transmit
    /// (the next duty cycle). The clock is read only if a slow receiver holds the window (its wait is timed
    /// from then; the application may have run for any time since the last cycle), not for every datagram.
    #[inline(always)]
    pub(crate) fn send_direct(&mut self, head: &[u8], body: &[u8]) -> Result<(), SendError> {
        if self.local_delivery && !self.router.has_room() {
            return Err(SendError::WouldBlock);
        }
        if !self.endpoint.try_append_parts(head, body) {
            self.endpoint.send_parts_at(&mut ReadClock::default(), head, body)?;
        }
        if self.local_delivery {
            self.deliver_own_direct(head, body);
        }
        Ok(())
    }

    /// Local delivery of the message a direct send just took (its sequence is the last one counted).
    fn deliver_own_direct(&mut self, head: &[u8], body: &[u8]) {
        let seq = self.endpoint.stats().messages_sent - 1;
        let mut msg = std::mem::take(&mut self.own_scratch);
        msg.clear();
        msg.extend_from_slice(head);
        msg.extend_from_slice(body);
        self.router.deliver_own(self.endpoint.session(), seq, &msg);
        self.own_scratch = msg;
        self.own_unannounced = true;
    }

    fn notify_outlets(&self) {
        for o in &self.router.outlets {
            o.shared.waiter.notify();
        }
    }

    /// Hands deliveries and events to the subscribers while their rings have room.
    fn deliver(&mut self) -> usize {
        if self.direct_reader {
            return 0; // left for `take_direct`
        }
        let mut n = 0;
        if self.router.outlets.is_empty() {
            // Nobody listens: deliveries are consumed and discarded, so this node never holds senders back.
            while self.endpoint.recv().is_some() {
                n += 1;
            }
            while let Some(e) = self.endpoint.poll_event() {
                self.members_changed |= is_membership(&e);
                n += 1;
            }
            return n;
        }
        // Room is checked in bulk: once every ring is known to have `credit` bytes to spare, deliveries
        // draw on that until it runs low, rather than each checking every ring.
        let largest = Producer::record_size(OUT_HEADER + self.router.inline_max);
        // Whole messages that share a datagram go to a catch-all subscriber as one record (one routing step
        // and one record instead of one per message), when a run record fits inline and the credit covers
        // the worst case of routing the run message by message instead (`Router::route_run`).
        let runs =
            self.router.inline_max >= self.max_datagram && self.router.outlets.iter().any(|o| o.filter.is_none());
        let run_need = Router::run_bound(self.max_datagram);
        let mut credit = 0;
        loop {
            if credit < largest {
                if !self.router.has_room() {
                    break;
                }
                credit = self.router.spare_bytes(largest).max(largest);
            }
            let next = if runs && credit >= run_need {
                self.endpoint.recv_batch()
            } else {
                self.endpoint.recv().map(Batch::One)
            };
            let Some(d) = next else { break };
            match d {
                Batch::Run(run) => credit = credit.saturating_sub(self.router.route_run(&run)),
                Batch::One(Delivery::Message(m)) => {
                    credit = credit.saturating_sub(self.router.record_size(m.payload.len()));
                    self.router.route(m.session, m.seq, m.payload);
                }
                Batch::One(Delivery::Loss { session, datagrams, messages }) => {
                    let (has, m) = match messages {
                        Some(m) => (1u64, m),
                        None => (0, 0..0),
                    };
                    let mut rec = [0u8; 48];
                    for (i, v) in [session, datagrams.start, datagrams.end, has, m.start, m.end].into_iter().enumerate()
                    {
                        rec[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
                    }
                    for o in &mut self.router.outlets {
                        o.ring.push(OUT_LOSS, &rec);
                    }
                    credit = credit.saturating_sub(Producer::record_size(rec.len()));
                }
            }
            n += 1;
        }
        while self.router.outlets.iter_mut().all(|o| o.ring.has_room(0)) {
            let Some(e) = self.endpoint.poll_event() else { break };
            self.members_changed |= is_membership(&e);
            for o in &mut self.router.outlets {
                let _ = o.side.send(Side::Event(e.clone()));
                o.ring.push(OUT_SIDE, &[]);
            }
            n += 1;
        }
        if n > 0 {
            self.notify_outlets();
        }
        n
    }

    fn transmit(&mut self, now: Instant, flush: bool) -> io::Result<usize> {
        let mut n = 0;
        // Each datagram is written straight into the backend's send batch (sealed there too, when encryption
        // is on), not into a buffer of ours and then copied.
        loop {
            let buf = self.backend.send_buffer(self.max_datagram);
            let Some(t) = self.endpoint.poll_transmit(now, buf) else { break };
            let dest = match t.destination {
                Destination::Group => self.group,
                Destination::Unicast(a) => a,
            };
            self.backend.commit_send(dest, t.len)?;
            n += 1;
        }
        if n > 0 && flush {
            self.backend.flush()?;
        }
        Ok(n)
    }

    /// Waits in the kernel until a datagram, the next protocol timer, `wait`, or a wake from the application.
    fn park(&mut self, wait: Option<Duration>) -> io::Result<usize> {
        self.publish_stats();
        let now = Instant::now();
        let timer = self.endpoint.poll_timeout().map(|t| t.saturating_duration_since(now));
        let timeout = match (timer, wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.shared.engine_parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let inline_max = self.router.inline_max;
        let app_ready = self.inlets.iter_mut().any(|i| !i.ring.is_empty() || i.shared.gone.load(Ordering::SeqCst))
            || self.shared.shutdown.load(Ordering::SeqCst)
            || self.shared.command_pending.load(Ordering::SeqCst)
            || self.direct_pending
            || self.router.outlets.iter_mut().any(|o| {
                o.shared.gone.load(Ordering::SeqCst)
                    || (o.shared.blocked.load(Ordering::SeqCst) && o.ring.has_room(OUT_HEADER + inline_max))
            });
        let n = if app_ready { 0 } else { self.read(now, Read::Ready(timeout))? };
        self.parked = true;
        self.shared.engine_parked.store(false, Ordering::SeqCst);
        for o in &self.router.outlets {
            o.shared.blocked.store(false, Ordering::SeqCst);
        }
        Ok(n)
    }

    pub(crate) fn publish_stats(&mut self) {
        {
            let mut s = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
            s.protocol.clone_from(self.endpoint.stats());
            let c = &self.router.counters;
            s.datagrams_in = c.datagrams_in;
            s.injected_drops = c.injected_drops;
            s.unmatched = c.unmatched;
            s.not_addressed = c.not_addressed;
            s.bad_envelope = c.bad_envelope;
            s.local_deliveries = c.local_deliveries;
            s.backend = self.backend.stats();
        }
        if self.members_changed {
            self.members_changed = false;
            let mut m = self.shared.members.lock().unwrap_or_else(|e| e.into_inner());
            m.clear();
            m.extend_from_slice(self.endpoint.members());
        }
    }

    /// Copies the per-peer counters out, reusing the table's buffers (no allocation once they are sized).
    fn publish_peers(&mut self) {
        let mut t = self.shared.peers.lock().unwrap_or_else(|e| e.into_inner());
        t.peers.clear();
        t.peers.extend(self.endpoint.peer_stats());
    }

    /// The engine thread's loop until shutdown.
    pub(crate) fn run(mut self, idle: IdleStrategy) {
        let mut last_work = Instant::now();
        let result = loop {
            if self.shared.shutdown.load(Ordering::Acquire) {
                break Ok(());
            }
            let work = match self.poll_once() {
                Ok(w) => w,
                Err(e) => break Err(e),
            };
            if work > 0 {
                last_work = Instant::now();
                continue;
            }
            let park = match idle {
                IdleStrategy::BusySpin => false,
                IdleStrategy::SpinThenPark(spin) => last_work.elapsed() >= spin,
                IdleStrategy::Park => true,
            };
            if park {
                if let Err(e) = self.park(None) {
                    break Err(e);
                }
            } else {
                std::hint::spin_loop();
            }
        };
        if let Err(e) = result {
            *self.shared.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
        }
        self.close();
    }

    /// Says goodbye to the group, flushes, and marks the node closed.
    pub(crate) fn close(&mut self) {
        let now = Instant::now();
        self.endpoint.close(now);
        let _ = self.transmit(now, true);
        self.publish_stats();
        self.publish_peers();
        self.shared.closed.store(true, Ordering::SeqCst);
        self.notify_outlets();
        for i in &self.inlets {
            i.shared.waiter.notify();
        }
    }
}

fn is_membership(e: &Event) -> bool {
    matches!(
        e,
        Event::PeerJoined { .. } | Event::PeerLeft { .. } | Event::PeerExpired { .. } | Event::PeerRestarted { .. }
    )
}

/// The subscribers' rings and what routing to them counts.
struct Router {
    outlets: Vec<Outlet>,
    counters: EngineCounters,
    node_id: u64,
    /// Largest message copied into a ring record; larger ones go through the side channel.
    inline_max: usize,
}

impl Router {
    /// Whether every subscriber has room for the largest inline record (a delivery may go to all of them).
    fn has_room(&mut self) -> bool {
        let mut room = true;
        let mut abandoned = false;
        for o in &mut self.outlets {
            if !o.ring.has_room(OUT_HEADER + self.inline_max) {
                // Nobody can poll a catch-all the node still holds (an application that only publishes never
                // takes it): give it up rather than hold every sender of the group back for it.
                let held = o.shared.custody.compare_exchange(HELD, ABANDONED, Ordering::SeqCst, Ordering::SeqCst);
                if held.is_ok() {
                    log::debug!("blip: catch-all subscriber never taken and full; no longer delivered to");
                    abandoned = true;
                    continue;
                }
                o.shared.blocked.store(true, Ordering::SeqCst);
                room = false;
            }
        }
        if abandoned {
            self.outlets.retain(|o| o.shared.custody.load(Ordering::SeqCst) != ABANDONED);
        }
        room
    }

    /// Bytes of records every ring can take now, whatever their sizes (each at most `largest` bytes):
    /// the least free space, less one record that a wrap may waste.
    fn spare_bytes(&mut self, largest: usize) -> usize {
        let least = self.outlets.iter_mut().map(|o| o.ring.free_bytes()).min().unwrap_or(0);
        least.saturating_sub(largest)
    }

    /// Ring bytes a message of `len` bytes takes in a subscriber's ring (an inline record, or the marker of
    /// one sent through the side channel).
    fn record_size(&self, len: usize) -> usize {
        Producer::record_size(if len <= self.inline_max { OUT_HEADER + len } else { 0 })
    }

    /// Routes one of this node's own messages (local delivery).
    fn deliver_own(&mut self, session: u64, seq: u64, msg: &[u8]) {
        self.route(session, seq, msg);
        self.counters.local_deliveries += 1;
    }

    /// Ring bytes that routing a run from a datagram of at most `max_datagram` bytes may take in any one
    /// ring, whichever way it goes: a run record, or a record per message. A message routed on its own has an
    /// envelope of at least 2 bytes, so a frame of at least 6; its record takes at most 27 bytes more than its
    /// frame (16 of record header, 8 of ring header, 7 of padding, less the frame's 4).
    fn run_bound(max_datagram: usize) -> usize {
        max_datagram + max_datagram / 6 * 27 + Producer::record_size(OUT_HEADER)
    }

    /// Routes a run of whole messages. When a catch-all subscriber takes every one of them (none is aimed at
    /// another node or private to one), each catch-all subscriber gets the run as one `OUT_RUN` record and
    /// every other subscriber the messages its filter selects; otherwise each message is routed on its own.
    /// Returns a bound on the ring bytes used in any one ring ([`run_bound`](Self::run_bound) at most).
    fn route_run(&mut self, run: &Run<'_>) -> usize {
        let node_id = self.node_id;
        // A plain envelope (two zero bytes, the common case, which `Envelope::parse` would also find first)
        // is taken by a catch-all subscriber as it is.
        let whole = run.messages().all(|m| {
            m.payload.starts_with(&[0, 0])
                || Envelope::parse(m.payload).is_ok_and(|(env, _)| {
                    env.target.is_none_or(|t| t == node_id) && catch_all_takes(env.topic, node_id)
                })
        });
        let per_message = |r: &Router| run.messages().map(|m| r.record_size(m.payload.len())).sum::<usize>();
        if !whole {
            let used = per_message(self);
            for m in run.messages() {
                self.route(m.session, m.seq, m.payload);
            }
            return used;
        }
        let mut filtered = false;
        for o in self.outlets.iter_mut() {
            if o.filter.is_some() {
                filtered = true;
                continue;
            }
            let mut c = o.ring.claim(OUT_HEADER + run.frames.len()).expect("room checked");
            c[..8].copy_from_slice(&run.session.to_ne_bytes());
            c[8..16].copy_from_slice(&run.first_seq.to_ne_bytes());
            c[OUT_HEADER..].copy_from_slice(run.frames);
            c.commit(OUT_RUN);
        }
        if filtered {
            // Each envelope parsed once, whatever the number of filtered subscribers.
            for m in run.messages() {
                let Ok((env, _)) = Envelope::parse(m.payload) else { continue };
                for o in self.outlets.iter_mut().filter(|o| o.filter.is_some()) {
                    if o.accepts(env.topic, node_id) {
                        push_message(o, self.inline_max, m.session, m.seq, m.payload);
                    }
                }
            }
        }
        let record = Producer::record_size(OUT_HEADER + run.frames.len());
        if filtered { per_message(self).max(record) } else { record }
    }

    /// Whether a catch-all subscriber takes this message (counted as `route` counts what nobody takes).
    fn catch_all_accepts(&mut self, msg: &[u8]) -> bool {
        // A plain envelope (two zero bytes), as in `route_run`.
        if msg.starts_with(&[0, 0]) {
            return true;
        }
        let Some(env) = self.addressed(msg) else { return false };
        if !catch_all_takes(env.topic, self.node_id) {
            self.counters.unmatched += 1;
            return false;
        }
        true
    }

    /// The message's envelope, if it parses and is not aimed at another node (each refusal counted).
    fn addressed<'m>(&mut self, msg: &'m [u8]) -> Option<Envelope<'m>> {
        let env = match Envelope::parse(msg) {
            Ok((env, _)) => env,
            Err(_) => {
                self.counters.bad_envelope += 1;
                return None;
            }
        };
        if env.target.is_some_and(|t| t != self.node_id) {
            self.counters.not_addressed += 1;
            return None;
        }
        Some(env)
    }

    /// Copies one message to every subscriber whose filter selects it. The caller has checked
    /// [`has_room`](Self::has_room).
    fn route(&mut self, session: u64, seq: u64, msg: &[u8]) {
        let Some(env) = self.addressed(msg) else { return };
        let mut matched = false;
        for o in self.outlets.iter_mut() {
            if !o.accepts(env.topic, self.node_id) {
                continue;
            }
            matched = true;
            push_message(o, self.inline_max, session, seq, msg);
        }
        if !matched {
            self.counters.unmatched += 1;
        }
    }
}

/// Copies one message into a subscriber's ring (through the side channel beyond `inline_max` bytes).
#[inline]
fn push_message(o: &mut Outlet, inline_max: usize, session: u64, seq: u64, msg: &[u8]) {
    if msg.len() <= inline_max {
        let mut c = o.ring.claim(OUT_HEADER + msg.len()).expect("room checked");
        c[..8].copy_from_slice(&session.to_ne_bytes());
        c[8..16].copy_from_slice(&seq.to_ne_bytes());
        c[OUT_HEADER..].copy_from_slice(msg);
        c.commit(OUT_MESSAGE);
    } else {
        let _ = o.side.send(Side::Message { session, seq, payload: msg.to_vec() });
        o.ring.push(OUT_SIDE, &[]);
    }
}
