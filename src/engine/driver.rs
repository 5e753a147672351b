//! The engine loop: one thread (or the caller's duty cycle) owns a backend, the sockets and an
//! [`Endpoint`], and exchanges messages with application threads through SPSC rings.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::backend::{Backend, Wake};
use crate::proto::rng::Rng;
use crate::proto::{Delivery, Destination, Endpoint, Event, SendError, Stats};
use crate::ring::{Consumer, Producer};

/// Ring record tags, application to engine.
pub(crate) const IN_MESSAGE: u32 = 1;
/// The message is in the side channel (too large for a ring record).
pub(crate) const IN_LARGE: u32 = 2;
/// Ring record tags, engine to application: `[session u64][seq u64][payload]`.
pub(crate) const OUT_MESSAGE: u32 = 1;
/// The delivery is in the side channel.
pub(crate) const OUT_SIDE: u32 = 2;
/// `[session][datagrams.start][datagrams.end][has_messages][messages.start][messages.end]`, all u64.
pub(crate) const OUT_LOSS: u32 = 3;
/// Bytes before the payload of an `OUT_MESSAGE` record.
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

/// Counters of a running node: the protocol's plus the engine's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Protocol counters.
    pub protocol: Stats,
    /// Datagrams read from the sockets.
    pub datagrams_in: u64,
    /// Datagrams dropped on purpose by the loss injector.
    pub injected_drops: u64,
    /// Datagrams the kernel refused to send.
    pub send_errors: u64,
}

/// State shared between the engine and the application handles.
pub(crate) struct Shared {
    pub(crate) shutdown: AtomicBool,
    pub(crate) closed: AtomicBool,
    pub(crate) engine_parked: AtomicBool,
    pub(crate) waker: Mutex<Option<Arc<dyn Wake>>>,
    pub(crate) deliver_blocked: AtomicBool,
    /// The application dropped its subscriber: deliveries are consumed and discarded, so this node never
    /// holds senders back.
    pub(crate) subscriber_gone: AtomicBool,
    pub(crate) subscriber: Waiter,
    pub(crate) publisher: Waiter,
    pub(crate) stats: Mutex<NodeStats>,
    pub(crate) error: Mutex<Option<String>>,
    /// Key rotation requests for the endpoint.
    pub(crate) keys: super::keys::KeyChannel,
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
            deliver_blocked: AtomicBool::new(false),
            subscriber_gone: AtomicBool::new(false),
            subscriber: Waiter::default(),
            publisher: Waiter::default(),
            stats: Mutex::new(NodeStats::default()),
            error: Mutex::new(None),
            keys: Default::default(),
        }
    }

    /// Wakes the engine if it is waiting in the kernel.
    pub(crate) fn wake_engine(&self) {
        fence(Ordering::SeqCst);
        if self.engine_parked.load(Ordering::SeqCst)
            && let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
        {
            w.wake();
        }
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
    inbox: Consumer,
    inbox_side: mpsc::Receiver<Vec<u8>>,
    large_pending: Option<Vec<u8>>,
    outbox: Producer,
    outbox_side: mpsc::Sender<Side>,
    inline_max: usize,
    shared: Arc<Shared>,
    group: SocketAddr,
    buf: Box<[u8]>,
    loss: Option<LossInjector>,
    datagrams_in: u64,
    injected_drops: u64,
    stats_at: Instant,
}

/// How often a running engine refreshes the stats snapshot.
const STATS_INTERVAL: Duration = Duration::from_millis(50);

pub(crate) struct EngineParts {
    pub(crate) endpoint: Endpoint,
    pub(crate) inbox: Consumer,
    pub(crate) inbox_side: mpsc::Receiver<Vec<u8>>,
    pub(crate) outbox: Producer,
    pub(crate) outbox_side: mpsc::Sender<Side>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) group: SocketAddr,
    pub(crate) loss: Option<LossInjector>,
    /// Why this backend was chosen, for the first delivery.
    pub(crate) backend_reason: String,
}

impl Engine {
    pub(crate) fn new(backend: Box<dyn Backend>, mut parts: EngineParts) -> Engine {
        let _ = parts.outbox_side.send(Side::Backend(backend.kind(), std::mem::take(&mut parts.backend_reason)));
        parts.outbox.push(OUT_SIDE, &[]);
        *parts.shared.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend.waker());
        let max_datagram = parts.endpoint.config().max_datagram;
        let inline_max = parts.outbox.max_record() - OUT_HEADER;
        Engine {
            backend,
            endpoint: parts.endpoint,
            inbox: parts.inbox,
            inbox_side: parts.inbox_side,
            large_pending: None,
            outbox: parts.outbox,
            outbox_side: parts.outbox_side,
            inline_max: inline_max.min(64 * 1024),
            shared: parts.shared,
            group: parts.group,
            buf: vec![0u8; max_datagram.max(2048)].into_boxed_slice(),
            loss: parts.loss,
            datagrams_in: 0,
            injected_drops: 0,
            stats_at: Instant::now(),
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

    fn receive(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        let now = Instant::now();
        let ep = &mut self.endpoint;
        let loss = &mut self.loss;
        let (count, drops) = (&mut self.datagrams_in, &mut self.injected_drops);
        self.backend.receive(timeout, &mut |from, bytes| {
            *count += 1;
            if let Some(l) = loss.as_mut()
                && l.rng.unit() < l.probability
            {
                *drops += 1;
                return;
            }
            ep.handle_datagram(now, from, bytes);
        })
    }

    fn poll_once(&mut self) -> io::Result<usize> {
        let mut work = self.shared.keys.apply(&mut self.endpoint);
        work += self.receive(Some(Duration::ZERO))?;
        let now = Instant::now();
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
        }
        work += self.take_messages(now);
        work += self.deliver();
        work += self.transmit(now)?;
        if now >= self.stats_at {
            self.publish_stats();
            self.stats_at = now + STATS_INTERVAL;
        }
        Ok(work)
    }

    /// Moves messages from the application's ring into the protocol until the window refuses.
    fn take_messages(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(rec) = self.inbox.peek() {
            let result = match rec.tag() {
                IN_LARGE => {
                    let Some(msg) = self.large_pending.take().or_else(|| self.inbox_side.try_recv().ok()) else {
                        break; // the publisher sends on the channel before the marker, so this cannot happen
                    };
                    let r = self.endpoint.send(now, &msg);
                    if r == Err(SendError::WouldBlock) {
                        self.large_pending = Some(msg);
                    }
                    r
                }
                _ => self.endpoint.send(now, &rec),
            };
            match result {
                Err(SendError::WouldBlock) => break,
                // Ok, or TooLarge (the publisher checks the size first, so only a misuse gets here).
                _ => {
                    rec.release();
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.shared.publisher.notify();
        }
        n
    }

    /// Hands deliveries and events to the application while its ring has room.
    fn deliver(&mut self) -> usize {
        let mut n = 0;
        if self.shared.subscriber_gone.load(Ordering::Relaxed) {
            while self.endpoint.recv().is_some() {
                n += 1;
            }
            while self.endpoint.poll_event().is_some() {
                n += 1;
            }
            return n;
        }
        loop {
            if !self.outbox.has_room(OUT_HEADER + self.inline_max) {
                self.shared.deliver_blocked.store(true, Ordering::SeqCst);
                break;
            }
            let Some(d) = self.endpoint.recv() else { break };
            match d {
                Delivery::Message(m) if m.payload.len() <= self.inline_max => {
                    let mut c = self.outbox.claim(OUT_HEADER + m.payload.len()).expect("room checked");
                    c[..8].copy_from_slice(&m.session.to_ne_bytes());
                    c[8..16].copy_from_slice(&m.seq.to_ne_bytes());
                    c[OUT_HEADER..].copy_from_slice(m.payload);
                    c.commit(OUT_MESSAGE);
                }
                Delivery::Message(m) => {
                    let side = Side::Message { session: m.session, seq: m.seq, payload: m.payload.to_vec() };
                    let _ = self.outbox_side.send(side);
                    self.outbox.push(OUT_SIDE, &[]);
                }
                Delivery::Loss { session, datagrams, messages } => {
                    let (has, m) = match messages {
                        Some(m) => (1u64, m),
                        None => (0, 0..0),
                    };
                    let mut rec = [0u8; 48];
                    for (i, v) in [session, datagrams.start, datagrams.end, has, m.start, m.end].into_iter().enumerate()
                    {
                        rec[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
                    }
                    self.outbox.push(OUT_LOSS, &rec);
                }
            }
            n += 1;
        }
        while self.outbox.has_room(0) {
            let Some(e) = self.endpoint.poll_event() else { break };
            let _ = self.outbox_side.send(Side::Event(e));
            self.outbox.push(OUT_SIDE, &[]);
            n += 1;
        }
        if n > 0 {
            self.shared.subscriber.notify();
        }
        n
    }

    fn transmit(&mut self, now: Instant) -> io::Result<usize> {
        let mut n = 0;
        while let Some(t) = self.endpoint.poll_transmit(now, &mut self.buf) {
            let dest = match t.destination {
                Destination::Group => self.group,
                Destination::Unicast(a) => a,
            };
            self.backend.queue_send(dest, &self.buf[..t.len])?;
            n += 1;
        }
        if n > 0 {
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
        let app_ready = !self.inbox.is_empty()
            || self.shared.shutdown.load(Ordering::SeqCst)
            || (self.shared.deliver_blocked.load(Ordering::SeqCst)
                && self.outbox.has_room(OUT_HEADER + self.inline_max));
        let n = if app_ready { 0 } else { self.receive(timeout)? };
        self.shared.engine_parked.store(false, Ordering::SeqCst);
        self.shared.deliver_blocked.store(false, Ordering::SeqCst);
        Ok(n)
    }

    pub(crate) fn publish_stats(&mut self) {
        let mut s = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.protocol.clone_from(self.endpoint.stats());
        s.datagrams_in = self.datagrams_in;
        s.injected_drops = self.injected_drops;
        s.send_errors = self.backend.send_errors();
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
        let _ = self.transmit(now);
        self.publish_stats();
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.subscriber.notify();
        self.shared.publisher.notify();
    }
}
