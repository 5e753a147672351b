//! A deterministic network simulator for the protocol, in the style of quinn-proto's test pair.
//!
//! Senders and receivers are [`Endpoint`]s joined by a simulated multicast network. Each node has an uplink
//! (applied once to everything it sends, so a drop there is a loss shared by every receiver) and a downlink
//! (applied to everything it receives), each with seeded random loss, Gilbert–Elliott burst loss,
//! duplication, delay, jitter (which reorders) and an MTU. Time is virtual: the loop jumps to the next packet
//! arrival, timeout or application send, so a run of seconds of traffic takes milliseconds. Runs are bounded
//! in steps and virtual time, so a livelock ends the run with an error instead of hanging a test.
//!
//! The application on each sender sends numbered messages; the application on each receiver checks that
//! they arrive in order, exactly once, with no gap that was not reported by a loss event.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use crate::proto::rng::Rng;
use crate::proto::{Batch, Config, Delivery, Destination, Endpoint, Event, Message, SendError};
use crate::wire::{DataPacket, FLAG_SEALED, Kind};

/// Behaviour of one direction of a node's attachment to the network.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Probability that a packet is dropped (independent losses).
    pub loss: f64,
    /// Gilbert–Elliott burst loss: probability of entering the bad state per packet, and of leaving it.
    /// Every packet is dropped while in the bad state.
    pub burst: Option<(f64, f64)>,
    /// Probability that a packet is delivered twice.
    pub duplicate: f64,
    /// Fixed one-way delay contributed by this link.
    pub delay: Duration,
    /// Extra uniform random delay in `0..=jitter` (reorders packets).
    pub jitter: Duration,
    /// Packets larger than this are dropped.
    pub mtu: usize,
}

impl Default for LinkConfig {
    fn default() -> LinkConfig {
        LinkConfig {
            loss: 0.0,
            burst: None,
            duplicate: 0.0,
            delay: Duration::from_micros(50),
            jitter: Duration::ZERO,
            mtu: 65_535,
        }
    }
}

/// A period during which a node's application does not read (it stops calling `recv`).
#[derive(Debug, Clone, Copy)]
pub struct Stall {
    /// Receiver index (0-based, among receivers).
    pub receiver: usize,
    /// Start, in virtual time since the beginning.
    pub from: Duration,
    /// End, in virtual time since the beginning.
    pub until: Duration,
}

/// A period during which every packet to a receiver is dropped.
#[derive(Debug, Clone, Copy)]
pub struct Blackout {
    /// Receiver index (0-based, among receivers).
    pub receiver: usize,
    /// Start, in virtual time since the beginning.
    pub from: Duration,
    /// End, in virtual time since the beginning.
    pub until: Duration,
}

/// One simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed for the network's and the endpoints' randomness.
    pub seed: u64,
    /// Number of senders.
    pub senders: usize,
    /// Number of receivers.
    pub receivers: usize,
    /// Messages each sender sends.
    pub messages: u64,
    /// Size of each message in bytes (at least 16: index and sender are written in the first bytes).
    pub message_size: usize,
    /// The sending application offers `batch` messages every `send_interval`.
    pub send_interval: Duration,
    /// Messages offered per send interval.
    pub batch: usize,
    /// Protocol configuration for every node (session, node id and seed are set per node).
    pub protocol: Config,
    /// Uplink of every sender.
    pub sender_uplink: LinkConfig,
    /// Downlink of every sender (NAKs and STATUS reaching it).
    pub sender_downlink: LinkConfig,
    /// Uplink of every receiver (NAKs and STATUS leaving it).
    pub receiver_uplink: LinkConfig,
    /// Downlink of every receiver.
    pub receiver_downlink: LinkConfig,
    /// Receivers whose application stops reading for a while.
    pub stalls: Vec<Stall>,
    /// Receivers cut off entirely for a while.
    pub blackouts: Vec<Blackout>,
    /// DATA datagram sequence numbers dropped on every sender's uplink on their first transmission
    /// (retransmissions pass): deterministic loss at a chosen place, such as the last datagram before idle.
    pub drop_datagrams: Vec<u64>,
    /// Receivers read with [`Endpoint::recv_batch`] (runs of whole messages at once) instead of
    /// [`Endpoint::recv`]; what they deliver must not change.
    pub batched_reads: bool,
    /// Give up (error) past this much virtual time.
    pub max_virtual: Duration,
    /// Give up (error) past this many loop iterations.
    pub max_steps: u64,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            seed: 1,
            senders: 1,
            receivers: 1,
            messages: 2000,
            message_size: 200,
            send_interval: Duration::from_micros(20),
            batch: 4,
            protocol: Config::default(),
            sender_uplink: LinkConfig::default(),
            sender_downlink: LinkConfig::default(),
            receiver_uplink: LinkConfig::default(),
            receiver_downlink: LinkConfig::default(),
            stalls: Vec::new(),
            blackouts: Vec::new(),
            drop_datagrams: Vec::new(),
            batched_reads: false,
            max_virtual: Duration::from_secs(120),
            max_steps: 20_000_000,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimReport {
    /// Messages delivered, summed over receivers and senders.
    pub delivered: u64,
    /// Messages that should have been delivered (`senders × messages × receivers`).
    pub expected: u64,
    /// Every receiver saw every sender's messages in increasing order.
    pub in_order: bool,
    /// Messages delivered more than once.
    pub duplicates: u64,
    /// Messages skipped without a loss event covering them.
    pub unreported_gaps: u64,
    /// Messages whose payload did not match what was sent.
    pub corrupt: u64,
    /// Loss events delivered.
    pub loss_events: u64,
    /// Messages covered by loss events.
    pub lost_messages: u64,
    /// NAK packets sent by all receivers.
    pub naks: u64,
    /// Retransmitted datagrams sent by all senders.
    pub retransmissions: u64,
    /// Distinct DATA datagrams (sender, sequence) that the network dropped on the way to at least one receiver.
    pub lost_datagrams: u64,
    /// Packets of any kind dropped by the network (counted per destination).
    pub dropped_packets: u64,
    /// Virtual time until every receiver had every message (or the run ended).
    pub virtual_ms: f64,
    /// Median time from a DATA datagram's loss to its arrival by repair, in virtual milliseconds.
    pub repair_ms_p50: f64,
    /// Its 99th percentile.
    pub repair_ms_p99: f64,
    /// Longest such time.
    pub repair_ms_max: f64,
    /// Repaired losses measured.
    pub repairs: u64,
    /// `SlowReceiverDropped` events raised by senders.
    pub slow_receivers_dropped: u64,
    /// Times a sender's `send` returned `WouldBlock`.
    pub sender_blocked: u64,
    /// Messages before the first one a receiver delivered under `LateJoin::Next` (not expected of it).
    pub skipped_at_join: u64,
    /// Runs of whole messages delivered at once (with `batched_reads`).
    pub runs: u64,
}

/// Why a run did not finish.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// The configuration is not usable.
    #[error("bad simulation config: {0}")]
    Config(String),
    /// The run exceeded `max_steps` or `max_virtual` before every message was accounted for.
    #[error("simulation did not finish within its bounds ({reason}); partial report: {report:?}")]
    Unfinished {
        /// Which bound.
        reason: &'static str,
        /// What had happened so far.
        report: Box<SimReport>,
    },
}

struct Node {
    endpoint: Endpoint,
    addr: SocketAddr,
    uplink: LinkConfig,
    downlink: LinkConfig,
    up_bad: bool,
    down_bad: bool,
    /// Receivers: next expected message index from each sender (indexed by sender).
    expected: Vec<u64>,
    /// Receivers: whether anything was delivered from each sender yet.
    started: Vec<bool>,
    /// Senders: next message index to send.
    next_index: u64,
}

struct InFlight {
    dst: usize,
    from: SocketAddr,
    bytes: Vec<u8>,
}

/// A receiver's checks of what it delivers, against what each sender sent.
struct Tally<'a> {
    senders: &'a [u64],
    late_next: bool,
    /// Next expected message index from each sender (indexed by sender).
    expected: &'a mut [u64],
    /// Whether anything was delivered from each sender yet.
    started: &'a mut [bool],
    report: &'a mut SimReport,
}

impl Tally<'_> {
    fn message(&mut self, m: Message<'_>) {
        let Some(s) = self.senders.iter().position(|&x| x == m.session) else { return };
        if !check_message(m.payload, s as u32, m.seq) {
            self.report.corrupt += 1;
        }
        let want = &mut self.expected[s];
        if !self.started[s] {
            self.started[s] = true;
            if self.late_next {
                self.report.skipped_at_join += m.seq;
                *want = m.seq;
            }
        }
        if m.seq < *want {
            self.report.duplicates += 1;
            self.report.in_order = false;
            return;
        }
        if m.seq > *want {
            self.report.unreported_gaps += m.seq - *want;
            self.report.in_order = false;
        }
        *want = m.seq + 1;
        self.report.delivered += 1;
    }

    fn loss(&mut self, session: u64, messages: Option<std::ops::Range<u64>>) {
        let Some(s) = self.senders.iter().position(|&x| x == session) else { return };
        self.report.loss_events += 1;
        let want = &mut self.expected[s];
        self.started[s] = true;
        match messages {
            Some(r) if r.start == *want => {
                self.report.lost_messages += r.end - r.start;
                *want = r.end;
            }
            Some(r) => {
                // A loss range that does not start where delivery stopped is itself a gap.
                self.report.unreported_gaps += r.start.abs_diff(*want);
                self.report.in_order = false;
                *want = (*want).max(r.end);
            }
            None => {}
        }
    }
}

/// Runs one simulation to completion (every message delivered or reported lost at every receiver).
pub fn run(cfg: &SimConfig) -> Result<SimReport, SimError> {
    Sim::new(cfg)?.run()
}

struct Sim<'c> {
    cfg: &'c SimConfig,
    base: Instant,
    rng: Rng,
    nodes: Vec<Node>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: HashMap<u64, InFlight>,
    counter: u64,
    report: SimReport,
    /// (receiver node, sender session, seq) -> virtual time the datagram was dropped.
    lost_at: HashMap<(usize, u64, u64), u64>,
    lost_distinct: std::collections::HashSet<(u64, u64)>,
    repair_samples: Vec<u64>,
    buf: Vec<u8>,
    sender_sessions: Vec<u64>,
}

impl<'c> Sim<'c> {
    fn new(cfg: &'c SimConfig) -> Result<Sim<'c>, SimError> {
        if cfg.message_size < 16 {
            return Err(SimError::Config("message_size must be at least 16".into()));
        }
        if cfg.senders == 0 || cfg.batch == 0 {
            return Err(SimError::Config("need at least one sender and a batch of at least one".into()));
        }
        let base = Instant::now();
        let mut rng = Rng::new(cfg.seed);
        let mut nodes = Vec::new();
        let mut sender_sessions = Vec::new();
        for i in 0..cfg.senders + cfg.receivers {
            let is_sender = i < cfg.senders;
            let mut protocol = cfg.protocol.clone();
            protocol.node_id = i as u64 + 1;
            let session = rng.next_u64();
            let endpoint =
                Endpoint::new(protocol, session, rng.next_u64(), base).map_err(|e| SimError::Config(e.to_string()))?;
            if is_sender {
                sender_sessions.push(session);
            }
            let addr =
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8 + 1), 4000));
            nodes.push(Node {
                endpoint,
                addr,
                uplink: if is_sender { cfg.sender_uplink.clone() } else { cfg.receiver_uplink.clone() },
                downlink: if is_sender { cfg.sender_downlink.clone() } else { cfg.receiver_downlink.clone() },
                up_bad: false,
                down_bad: false,
                expected: vec![0; cfg.senders],
                started: vec![false; cfg.senders],
                next_index: 0,
            });
        }
        let max_datagram = cfg.protocol.max_datagram;
        Ok(Sim {
            cfg,
            base,
            rng,
            nodes,
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            counter: 0,
            report: SimReport {
                expected: cfg.senders as u64 * cfg.messages * cfg.receivers as u64,
                in_order: true,
                ..SimReport::default()
            },
            lost_at: HashMap::new(),
            lost_distinct: Default::default(),
            repair_samples: Vec::new(),
            buf: vec![0u8; max_datagram.max(2048)],
            sender_sessions,
        })
    }

    fn at(&self, t: u64) -> Instant {
        self.base + Duration::from_nanos(t)
    }

    fn since(&self, i: Instant) -> u64 {
        i.saturating_duration_since(self.base).as_nanos() as u64
    }

    fn is_receiver(&self, node: usize) -> bool {
        node >= self.cfg.senders
    }

    fn run(mut self) -> Result<SimReport, SimError> {
        let mut t: u64 = 0;
        let mut next_send: u64 = 0;
        let mut steps: u64 = 0;
        let max_t = self.cfg.max_virtual.as_nanos() as u64;
        loop {
            steps += 1;
            if steps > self.cfg.max_steps {
                return Err(self.unfinished("max_steps", t));
            }
            if t > max_t {
                return Err(self.unfinished("max_virtual", t));
            }
            let now = self.at(t);

            // Arrivals due now.
            while let Some(&Reverse((arrive, id))) = self.queue.peek() {
                if arrive > t {
                    break;
                }
                self.queue.pop();
                let p = self.in_flight.remove(&id).expect("queued packet is in flight");
                self.note_arrival(t, p.dst, &p.bytes);
                self.nodes[p.dst].endpoint.handle_datagram(now, p.from, &p.bytes);
            }

            for n in self.nodes.iter_mut() {
                if n.endpoint.poll_timeout().is_some_and(|d| d <= now) {
                    n.endpoint.handle_timeout(now);
                }
            }

            if t >= next_send {
                self.offer_messages(now);
                next_send = t + self.cfg.send_interval.as_nanos() as u64;
            }

            for i in self.cfg.senders..self.nodes.len() {
                if !self.stalled(i, t) {
                    self.read(i);
                }
            }
            for i in 0..self.nodes.len() {
                self.drain_events(i);
                self.transmit(i, t);
            }

            if self.done() {
                break;
            }

            // Jump to the next thing that happens.
            let mut next = u64::MAX;
            if let Some(&Reverse((arrive, _))) = self.queue.peek() {
                next = next.min(arrive);
            }
            for n in &self.nodes {
                if let Some(d) = n.endpoint.poll_timeout() {
                    next = next.min(self.since(d));
                }
            }
            if self.nodes[..self.cfg.senders].iter().any(|n| n.next_index < self.cfg.messages) {
                next = next.min(next_send);
            }
            for s in &self.cfg.stalls {
                let until = s.until.as_nanos() as u64;
                if until > t {
                    next = next.min(until);
                }
            }
            if next == u64::MAX {
                return Err(self.unfinished("nothing left to happen", t));
            }
            t = next.max(t + 1);
        }
        self.report.virtual_ms = t as f64 / 1e6;
        Ok(self.finish())
    }

    fn unfinished(&mut self, reason: &'static str, t: u64) -> SimError {
        self.report.virtual_ms = t as f64 / 1e6;
        SimError::Unfinished { reason, report: Box::new(self.finish()) }
    }

    fn finish(&mut self) -> SimReport {
        let mut r = self.report.clone();
        for (i, n) in self.nodes.iter().enumerate() {
            let s = n.endpoint.stats();
            if self.is_receiver(i) {
                r.naks += s.naks_sent;
            } else {
                r.retransmissions += s.retransmits;
            }
        }
        r.lost_datagrams = self.lost_distinct.len() as u64;
        self.repair_samples.sort_unstable();
        r.repairs = self.repair_samples.len() as u64;
        if !self.repair_samples.is_empty() {
            let n = self.repair_samples.len();
            r.repair_ms_p50 = self.repair_samples[n / 2] as f64 / 1e6;
            r.repair_ms_p99 = self.repair_samples[(n * 99 / 100).min(n - 1)] as f64 / 1e6;
            r.repair_ms_max = *self.repair_samples.last().unwrap() as f64 / 1e6;
        }
        r
    }

    fn stalled(&self, node: usize, t: u64) -> bool {
        let r = node - self.cfg.senders;
        self.cfg
            .stalls
            .iter()
            .any(|s| s.receiver == r && (s.from.as_nanos() as u64..s.until.as_nanos() as u64).contains(&t))
    }

    fn blacked_out(&self, node: usize, t: u64) -> bool {
        if !self.is_receiver(node) {
            return false;
        }
        let r = node - self.cfg.senders;
        self.cfg
            .blackouts
            .iter()
            .any(|b| b.receiver == r && (b.from.as_nanos() as u64..b.until.as_nanos() as u64).contains(&t))
    }

    fn done(&self) -> bool {
        self.nodes[..self.cfg.senders].iter().all(|n| n.next_index >= self.cfg.messages)
            && self.nodes[self.cfg.senders..].iter().all(|n| n.expected.iter().all(|&e| e >= self.cfg.messages))
    }

    fn offer_messages(&mut self, now: Instant) {
        let size = self.cfg.message_size;
        let mut msg = vec![0u8; size];
        for s in 0..self.cfg.senders {
            for _ in 0..self.cfg.batch {
                let n = &mut self.nodes[s];
                if n.next_index >= self.cfg.messages {
                    break;
                }
                fill_message(&mut msg, s as u32, n.next_index);
                match n.endpoint.send(now, &msg) {
                    Ok(()) => n.next_index += 1,
                    Err(SendError::WouldBlock) => {
                        self.report.sender_blocked += 1;
                        break;
                    }
                    Err(e) => panic!("simulated sender rejected a message: {e}"),
                }
            }
        }
    }

    fn read(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let mut tally = Tally {
            senders: &self.sender_sessions,
            late_next: self.cfg.protocol.late_join == crate::proto::LateJoin::Next,
            expected: &mut n.expected,
            started: &mut n.started,
            report: &mut self.report,
        };
        loop {
            let one = if self.cfg.batched_reads {
                match n.endpoint.recv_batch() {
                    None => break,
                    Some(Batch::One(d)) => d,
                    Some(Batch::Run(run)) => {
                        tally.report.runs += 1;
                        let mut count = 0;
                        for m in run.messages() {
                            tally.message(m);
                            count += 1;
                        }
                        if count != run.count {
                            tally.report.corrupt += 1; // a run's count must match its frames
                        }
                        continue;
                    }
                }
            } else {
                match n.endpoint.recv() {
                    None => break,
                    Some(d) => d,
                }
            };
            match one {
                Delivery::Message(m) => tally.message(m),
                Delivery::Loss { session, messages, .. } => tally.loss(session, messages),
            }
        }
    }

    fn drain_events(&mut self, node: usize) {
        while let Some(e) = self.nodes[node].endpoint.poll_event() {
            if let Event::SlowReceiverDropped { .. } = e {
                self.report.slow_receivers_dropped += 1;
            }
        }
    }

    fn transmit(&mut self, src: usize, t: u64) {
        let now = self.at(t);
        while let Some(tx) = self.nodes[src].endpoint.poll_transmit(now, &mut self.buf) {
            let bytes = self.buf[..tx.len].to_vec();
            // The uplink decides once for every destination: a drop here is shared by all.
            let up_ok = self.link_passes(src, true, bytes.len()) && !self.scripted_drop(src, &bytes);
            let dsts: Vec<usize> = match tx.destination {
                Destination::Group => (0..self.nodes.len()).filter(|&d| d != src).collect(),
                Destination::Unicast(a) => self.nodes.iter().position(|n| n.addr == a).into_iter().collect(),
            };
            for dst in dsts {
                if !up_ok || self.blacked_out(dst, t) || !self.link_passes(dst, false, bytes.len()) {
                    self.note_drop(t, dst, &bytes);
                    continue;
                }
                let copies = if self.rng.unit() < self.nodes[dst].downlink.duplicate { 2 } else { 1 };
                for _ in 0..copies {
                    let delay = self.delay(src, dst);
                    self.counter += 1;
                    self.queue.push(Reverse((t + delay, self.counter)));
                    self.in_flight
                        .insert(self.counter, InFlight { dst, from: self.nodes[src].addr, bytes: bytes.clone() });
                }
            }
        }
    }

    fn scripted_drop(&self, src: usize, bytes: &[u8]) -> bool {
        if self.is_receiver(src) || self.cfg.drop_datagrams.is_empty() {
            return false;
        }
        let bytes = self.clear(bytes);
        matches!(DataPacket::parse(&bytes), Ok(d) if !d.is_retransmit() && self.cfg.drop_datagrams.contains(&d.seq))
    }

    /// The packet as the protocol sees it: opened, when encryption is configured.
    fn clear<'b>(&self, bytes: &'b [u8]) -> Cow<'b, [u8]> {
        match &self.cfg.protocol.encryption {
            Some(keys) if bytes.len() > 3 && u16::from_be_bytes([bytes[2], bytes[3]]) & FLAG_SEALED != 0 => {
                crate::proto::seal::peek(keys, bytes).map_or(Cow::Borrowed(&[][..]), Cow::Owned)
            }
            _ => Cow::Borrowed(bytes),
        }
    }

    fn delay(&mut self, src: usize, dst: usize) -> u64 {
        let up = &self.nodes[src].uplink;
        let down = &self.nodes[dst].downlink;
        let fixed = (up.delay + down.delay).as_nanos() as u64;
        let jitter = (up.jitter + down.jitter).as_nanos() as u64;
        fixed + self.rng.below_nanos(jitter)
    }

    fn link_passes(&mut self, node: usize, up: bool, len: usize) -> bool {
        let n = &mut self.nodes[node];
        let (link, bad) = if up { (&n.uplink, &mut n.up_bad) } else { (&n.downlink, &mut n.down_bad) };
        if len > link.mtu {
            return false;
        }
        if let Some((enter, exit)) = link.burst {
            let u = self.rng.unit();
            *bad = if *bad { u >= exit } else { u < enter };
            if *bad {
                return false;
            }
        }
        link.loss == 0.0 || self.rng.unit() >= link.loss
    }

    fn note_drop(&mut self, t: u64, dst: usize, bytes: &[u8]) {
        self.report.dropped_packets += 1;
        if !self.is_receiver(dst) || bytes.get(1) != Some(&(Kind::Data as u8)) {
            return;
        }
        let bytes = self.clear(bytes);
        if let Ok(d) = DataPacket::parse(&bytes) {
            self.lost_at.entry((dst, d.header.session, d.seq)).or_insert(t);
            self.lost_distinct.insert((d.header.session, d.seq));
        }
    }

    fn note_arrival(&mut self, t: u64, dst: usize, bytes: &[u8]) {
        if self.lost_at.is_empty() || bytes.get(1) != Some(&(Kind::Data as u8)) {
            return;
        }
        let bytes = self.clear(bytes);
        if let Ok(d) = DataPacket::parse(&bytes)
            && let Some(lost) = self.lost_at.remove(&(dst, d.header.session, d.seq))
        {
            self.repair_samples.push(t - lost);
        }
    }
}

/// Writes message `index` of sender `sender`: index and sender first, then a pattern derived from them.
pub fn fill_message(buf: &mut [u8], sender: u32, index: u64) {
    buf[..8].copy_from_slice(&index.to_le_bytes());
    buf[8..12].copy_from_slice(&sender.to_le_bytes());
    let seed = index.wrapping_mul(31).wrapping_add(sender as u64) as u8;
    for (j, b) in buf[12..].iter_mut().enumerate() {
        *b = seed.wrapping_add(j as u8);
    }
}

/// Checks a message written by [`fill_message`] against the sequence it was delivered with.
pub fn check_message(buf: &[u8], sender: u32, seq: u64) -> bool {
    if buf.len() < 12 || buf[..8] != seq.to_le_bytes() || buf[8..12] != sender.to_le_bytes() {
        return false;
    }
    let seed = seq.wrapping_mul(31).wrapping_add(sender as u64) as u8;
    buf[12..].iter().enumerate().all(|(j, &b)| b == seed.wrapping_add(j as u8))
}
