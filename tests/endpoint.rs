//! Endpoint behaviour through its public sans-IO API, with a tiny in-memory network (no loss).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blip::proto::{Config, ConfigError, Delivery, Destination, Endpoint, Event, FramesStop, SendError};
use blip::wire::{DataWriter, FRAME_FIRST, FRAME_LAST, Header, HeartbeatRepr, Kind};
use proptest::prelude::*;

struct Net {
    nodes: Vec<(SocketAddr, Endpoint)>,
    now: Instant,
    buf: Vec<u8>,
}

impl Net {
    fn new() -> Net {
        Net { nodes: Vec::new(), now: Instant::now(), buf: vec![0; 65_536] }
    }

    fn add(&mut self, node_id: u64, session: u64) -> usize {
        let cfg = Config { node_id, node_name: format!("node-{node_id}"), ..Config::default() };
        let ep = Endpoint::new(cfg, session, session ^ 0x5555, self.now).unwrap();
        let addr: SocketAddr = format!("127.0.0.{}:4000", self.nodes.len() + 1).parse().unwrap();
        self.nodes.push((addr, ep));
        self.nodes.len() - 1
    }

    /// Moves every pending datagram until none is left (bounded, so a ping-pong bug fails the test).
    fn pump(&mut self) {
        for _ in 0..100_000 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some(t) = self.nodes[i].1.poll_transmit(self.now, &mut self.buf) {
                    moved = true;
                    let from = self.nodes[i].0;
                    for j in 0..self.nodes.len() {
                        let to_j = match t.destination {
                            Destination::Group => j != i,
                            Destination::Unicast(a) => self.nodes[j].0 == a,
                        };
                        if to_j {
                            self.nodes[j].1.handle_datagram(self.now, from, &self.buf[..t.len]);
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("network did not settle");
    }

    /// Advances virtual time, running timers and pumping at each step.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        for _ in 0..1_000_000 {
            let next = self.nodes.iter().filter_map(|n| n.1.poll_timeout()).min().unwrap_or(end);
            self.now = next.clamp(self.now, end);
            for n in self.nodes.iter_mut() {
                n.1.handle_timeout(self.now);
            }
            self.pump();
            if self.now >= end {
                return;
            }
            if next <= self.now {
                // Timers due now have been handled; make progress.
                self.now += Duration::from_micros(1);
            }
        }
        panic!("advance did not reach its end");
    }

    fn send(&mut self, node: usize, msg: &[u8]) {
        self.nodes[node].1.send(self.now, msg).unwrap();
    }

    fn messages(&mut self, node: usize) -> Vec<(u64, u64, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(d) = self.nodes[node].1.recv() {
            match d {
                Delivery::Message(m) => out.push((m.session, m.seq, m.payload.to_vec())),
                Delivery::Loss { .. } => panic!("unexpected loss: {d:?}"),
            }
        }
        out
    }

    fn events(&mut self, node: usize) -> Vec<Event> {
        std::iter::from_fn(|| self.nodes[node].1.poll_event()).collect()
    }
}

#[test]
fn sender_restart_is_a_new_session_not_a_gap() {
    let mut net = Net::new();
    let rx = net.add(1, 100);
    let tx = net.add(2, 200);
    net.advance(Duration::from_millis(1));
    for i in 0..5u8 {
        net.send(tx, &[i; 10]);
    }
    net.pump();
    let got = net.messages(rx);
    assert_eq!(got.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(), (0..5).map(|s| (200, s)).collect::<Vec<_>>());

    // Same node id, new incarnation: sequence numbers start over in a new session.
    net.nodes[tx].1 = Endpoint::new(Config { node_id: 2, ..Config::default() }, 201, 9, net.now).unwrap();
    net.advance(Duration::from_millis(2));
    for i in 0..5u8 {
        net.send(tx, &[i; 10]);
    }
    net.pump();
    let got = net.messages(rx);
    assert_eq!(got.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(), (0..5).map(|s| (201, s)).collect::<Vec<_>>());
    let events = net.events(rx);
    assert!(events.contains(&Event::PeerRestarted { node_id: 2, old_session: 200, new_session: 201 }), "{events:?}");
    assert!(events.contains(&Event::SenderJoined { session: 201, addr: net.nodes[tx].0 }), "{events:?}");
    // The old session is forgotten once silent for sender_timeout.
    net.advance(Config::default().sender_timeout + Duration::from_secs(1));
    let events = net.events(rx);
    assert!(events.contains(&Event::SenderGone { session: 200 }), "{events:?}");
    assert!(!events.contains(&Event::SenderGone { session: 201 }), "the live session must stay: {events:?}");
    assert_eq!(net.nodes[rx].1.senders().collect::<Vec<_>>(), vec![201]);
}

/// A sender vanishes with its last datagram lost: once it is given up, the receiver delivers what it has
/// and then an exact loss for the tail (the heartbeat told it the next message number); nothing is skipped
/// silently.
#[test]
fn vanished_sender_tail_is_reported_lost() {
    let mut net = Net::new();
    let rx = net.add(1, 10);
    let tx = net.add(2, 20);
    for i in 0..5u8 {
        net.send(tx, &[i; 10]);
        net.pump();
    }
    // Message 5 is sent, but its datagram never reaches anyone; then one heartbeat does.
    net.send(tx, &[5; 10]);
    let mut buf = vec![0u8; 2048];
    let now = net.now;
    while net.nodes[tx].1.poll_transmit(now, &mut buf).is_some() {}
    let later = now + Config::default().heartbeat_min;
    net.nodes[tx].1.handle_timeout(later);
    let t = net.nodes[tx].1.poll_transmit(later, &mut buf).expect("heartbeat");
    let from = net.nodes[tx].0;
    net.nodes[rx].1.handle_datagram(later, from, &buf[..t.len]);
    net.nodes.truncate(1); // the sender is gone for good
    net.advance(Config::default().sender_timeout + Duration::from_secs(1));
    let mut got = Vec::new();
    while let Some(d) = net.nodes[rx].1.recv() {
        got.push(match d {
            Delivery::Message(m) => format!("msg {}", m.seq),
            Delivery::Loss { messages, .. } => format!("loss {messages:?}"),
        });
    }
    assert_eq!(got, ["msg 0", "msg 1", "msg 2", "msg 3", "msg 4", "loss Some(5..6)"]);
    net.advance(Duration::from_secs(1));
    assert!(net.events(rx).contains(&Event::SenderGone { session: 20 }));
}

#[test]
fn membership_join_and_leave() {
    let mut net = Net::new();
    let a = net.add(1, 10);
    let b = net.add(2, 20);
    net.pump();
    assert!(net.events(a).contains(&Event::PeerJoined { node_id: 2, session: 20, name: "node-2".into() }));
    assert_eq!(net.nodes[a].1.members().len(), 1);
    net.nodes[b].1.close(net.now);
    net.pump();
    assert!(net.events(a).contains(&Event::PeerLeft { node_id: 2, session: 20 }));
    assert!(net.nodes[a].1.members().is_empty());
}

/// A receiver that says goodbye stops counting for flow control at once, not after `receiver_timeout`.
#[test]
fn a_leaving_receiver_is_forgotten_by_the_sender_at_once() {
    let mut net = Net::new();
    let a = net.add(1, 10);
    let b = net.add(2, 20);
    net.send(a, b"hello");
    net.advance(Duration::from_millis(300));
    assert_eq!(net.messages(b).len(), 1);
    assert!(net.events(a).contains(&Event::ReceiverJoined { session: 20 }));
    assert_eq!(net.nodes[a].1.receivers(), 1);
    net.nodes[b].1.close(net.now);
    net.pump();
    assert_eq!(net.nodes[a].1.receivers(), 0);
    assert!(net.events(a).contains(&Event::ReceiverGone { session: 20 }));
}

#[test]
fn silent_member_expires() {
    let mut net = Net::new();
    let a = net.add(1, 10);
    let _b = net.add(2, 20);
    net.pump();
    net.nodes.truncate(1); // node 2 vanishes without a word
    net.advance(Config::default().member_timeout + Duration::from_secs(1));
    assert!(net.events(a).contains(&Event::PeerExpired { node_id: 2, session: 20 }));
}

#[test]
fn messages_over_the_maximum_are_refused_with_the_limit() {
    let cfg = Config { max_message: 1000, ..Config::default() };
    let mut ep = Endpoint::new(cfg, 1, 1, Instant::now()).unwrap();
    assert_eq!(ep.send(Instant::now(), &[0; 1001]), Err(SendError::TooLarge { size: 1001, max: 1000 }));
    assert_eq!(ep.send(Instant::now(), &[0; 1000]), Ok(()));
}

#[test]
fn bad_configuration_is_an_error_not_a_panic() {
    let now = Instant::now();
    let e = |cfg: Config| Endpoint::new(cfg, 1, 1, now).err().expect("config should be rejected");
    assert_eq!(e(Config { max_datagram: 40, ..Config::default() }), ConfigError::DatagramSize(40));
    assert_eq!(e(Config { max_datagram: 70_000, ..Config::default() }), ConfigError::DatagramSize(70_000));
    assert!(matches!(e(Config { window: 1, ..Config::default() }), ConfigError::BufferSize { name: "window", .. }));
    assert!(matches!(e(Config { node_name: "x".repeat(65), ..Config::default() }), ConfigError::NameTooLong(65)));
    assert!(matches!(e(Config { nak_retry: Duration::ZERO, ..Config::default() }), ConfigError::Timer("nak_retry")));
    let msg = e(Config { max_datagram: 40, ..Config::default() }).to_string();
    assert!(msg.contains("MTU"), "error should say what to change: {msg}");
}

#[test]
fn idle_sender_heartbeats_back_off() {
    let mut net = Net::new();
    let rx = net.add(1, 10);
    let tx = net.add(2, 20);
    net.send(tx, b"hello");
    net.pump();
    assert_eq!(net.messages(rx).len(), 1);
    let before = net.nodes[tx].1.stats().heartbeats_sent;
    net.advance(Duration::from_secs(10));
    let beats = net.nodes[tx].1.stats().heartbeats_sent - before;
    // 0.5 ms doubling to 1 s: about 11 to reach the cap, then one a second.
    assert!((10..=25).contains(&beats), "{beats} heartbeats in 10 s of idleness");
}

/// A packet claiming a sequence number far ahead must not allocate or stall delivery from real senders.
#[test]
fn far_ahead_sequence_from_another_session_does_not_disturb_delivery() {
    let mut net = Net::new();
    let rx = net.add(1, 10);
    let tx = net.add(2, 20);
    let mut buf = [0u8; 200];
    let h = Header { kind: Kind::Data, flags: 0, stream: 0, session: 666 };
    let n = DataWriter::begin(&mut buf, &h, u64::MAX / 2, 0, u64::MAX / 2 - 10).unwrap();
    let n = DataWriter::push_frame(&mut buf, n, FRAME_FIRST | FRAME_LAST, b"forged").unwrap();
    let from: SocketAddr = "127.0.0.99:4000".parse().unwrap();
    net.nodes[rx].1.handle_datagram(net.now, from, &buf[..n]);
    let hb = HeartbeatRepr { next_seq: u64::MAX - 1, low: 0, next_msg: 0, receivers: 0 };
    let n = hb.emit(&Header { kind: Kind::Heartbeat, ..h }, &mut buf).unwrap();
    net.nodes[rx].1.handle_datagram(net.now, from, &buf[..n]);
    for i in 0..100u8 {
        net.send(tx, &[i; 100]);
    }
    net.advance(Duration::from_millis(20));
    let got: Vec<_> = net.messages(rx).into_iter().filter(|m| m.0 == 20).collect();
    assert_eq!(got.len(), 100);
}

#[test]
fn own_packets_and_other_streams_are_ignored() {
    let now = Instant::now();
    let mut a = Endpoint::new(Config::default(), 1, 1, now).unwrap();
    let mut b = Endpoint::new(Config { stream: 9, ..Config::default() }, 2, 2, now).unwrap();
    let mut buf = [0u8; 2048];
    a.send(now, b"x").unwrap();
    let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
    while let Some(t) = a.poll_transmit(now, &mut buf) {
        let bytes = buf[..t.len].to_vec();
        a.handle_datagram(now, from, &bytes);
        b.handle_datagram(now, from, &bytes);
    }
    assert!(a.stats().own_packets > 0);
    assert!(b.stats().foreign_stream > 0);
    assert!(b.recv().is_none());
}

proptest! {
    /// Arbitrary datagrams, valid headers with garbage bodies, and mutated real packets: never a panic,
    /// and a legitimate sender is still delivered afterwards.
    #[test]
    fn arbitrary_packet_sequences_never_panic(
        packets in proptest::collection::vec((0u8..6, any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..40)
    ) {
        let now = Instant::now();
        let mut rx = Endpoint::new(Config::default(), 1, 1, now).unwrap();
        let from: SocketAddr = "127.0.0.7:4000".parse().unwrap();
        for (kind, session, body) in &packets {
            let mut bytes = vec![1u8, *kind, 0, 0, 0, 0, 0, 0];
            bytes.extend_from_slice(&(session % 4).to_be_bytes());
            bytes.extend_from_slice(body);
            rx.handle_datagram(now, from, &bytes);
            rx.handle_datagram(now, from, body);
            rx.handle_timeout(now);
            let mut buf = [0u8; 2048];
            while rx.poll_transmit(now, &mut buf).is_some() {}
            while rx.recv().is_some() {}
        }
        let mut tx = Endpoint::new(Config::default(), 99, 2, now).unwrap();
        tx.send(now, b"legit").unwrap();
        let mut buf = [0u8; 2048];
        while let Some(t) = tx.poll_transmit(now, &mut buf) {
            let bytes = buf[..t.len].to_vec();
            rx.handle_datagram(now, "127.0.0.8:4000".parse().unwrap(), &bytes);
        }
        let mut found = false;
        while let Some(d) = rx.recv() {
            if let Delivery::Message(m) = d { found |= m.session == 99 && m.payload == b"legit"; }
        }
        prop_assert!(found);
    }
}

/// A NAK flood from a requester that never reported (possibly forged) is bounded by the shared budget, and
/// a real receiver keeps its own budget: the node is not an amplifier.
#[test]
fn nak_flood_is_rate_limited_per_requester() {
    use blip::wire::{NakRepr, SeqRange};
    let mut net = Net::new();
    let rx = net.add(1, 10);
    let cfg = Config { retransmit_rate: 1_000_000, retransmit_burst: 100_000, ..Config::default() };
    let tx_ep = Endpoint::new(cfg, 20, 5, net.now).unwrap();
    net.nodes.push(("127.0.0.2:4000".parse().unwrap(), tx_ep));
    let tx = 1;
    for i in 0..1000u32 {
        net.send(tx, &i.to_le_bytes().repeat(250));
        net.pump();
    }
    assert_eq!(net.messages(rx).len(), 1000);
    let before = net.nodes[tx].1.stats().retransmits;
    let mut buf = vec![0u8; 2048];
    let nak = |session: u64, start: u64, len: u32, buf: &mut [u8]| {
        let h = Header { kind: Kind::Nak, flags: 0, stream: 0, session };
        NakRepr { target_session: 20, ranges: &[SeqRange { start, len }] }.emit(&h, buf).unwrap()
    };
    let stranger: SocketAddr = "127.0.0.66:4000".parse().unwrap();
    for _ in 0..100 {
        net.now += Duration::from_millis(1);
        let n = nak(777, 0, 1000, &mut buf);
        net.nodes[tx].1.handle_datagram(net.now, stranger, &buf[..n]);
        let now = net.now;
        while net.nodes[tx].1.poll_transmit(now, &mut buf).is_some() {}
    }
    let flood = net.nodes[tx].1.stats().retransmits - before;
    // 100 kB of burst plus 1 MB/s for 0.1 s, in 1,472-byte datagrams: about 135; unlimited it would be 100,000.
    assert!(flood <= 140, "{flood} retransmissions for a stranger's flood");
    assert!(net.nodes[tx].1.stats().retransmits_rate_limited > 90_000);
    // The real receiver (it reported STATUS) still gets its repair.
    net.now += Duration::from_millis(1);
    let n = nak(10, 5, 1, &mut buf);
    let from = net.nodes[rx].0;
    let before = net.nodes[tx].1.stats().retransmits;
    net.nodes[tx].1.handle_datagram(net.now, from, &buf[..n]);
    let now = net.now;
    while net.nodes[tx].1.poll_transmit(now, &mut buf).is_some() {}
    assert_eq!(net.nodes[tx].1.stats().retransmits - before, 1);
}

/// Reassembly memory is bounded across senders: a message that would take more than `max_reassembly` is
/// reported lost (exactly that one), and the memory of completed messages is given back.
#[test]
fn reassembly_budget_turns_an_oversized_message_into_a_reported_loss() {
    let mut net = Net::new();
    let rx_cfg = Config { max_reassembly: 50_000, max_message: 1 << 20, ..Config::default() };
    let rx_ep = Endpoint::new(rx_cfg, 10, 3, net.now).unwrap();
    net.nodes.push(("127.0.0.1:4000".parse().unwrap(), rx_ep));
    let tx = net.add(2, 20);
    for (i, size) in [30_000usize, 100_000, 30_000].into_iter().enumerate() {
        net.send(tx, &vec![i as u8; size]);
        net.advance(Duration::from_millis(5));
    }
    let mut got = Vec::new();
    while let Some(d) = net.nodes[0].1.recv() {
        got.push(match d {
            Delivery::Message(m) => format!("msg {} of {} bytes", m.seq, m.payload.len()),
            Delivery::Loss { messages, .. } => format!("loss {messages:?}"),
        });
    }
    assert_eq!(got, ["msg 0 of 30000 bytes", "loss Some(1..2)", "msg 2 of 30000 bytes"]);
    assert_eq!(net.nodes[0].1.stats().oversized_messages, 1);
}

/// Per-peer counters follow one sender's stream on both sides: the receiver's row for the sender, and the
/// sender's row for the receiver, including a NAK and its repair.
#[test]
fn peer_stats_count_both_sides_of_a_repair() {
    use blip::proto::PeerRole;
    let mut net = Net::new();
    let rx = net.add(1, 100);
    let tx = net.add(2, 200);
    net.advance(Duration::from_millis(5));
    net.send(tx, b"first");
    net.pump();
    // The second datagram is lost on the way: only the sender's endpoint sees it.
    net.send(tx, &[7; 1400]);
    while net.nodes[tx].1.poll_transmit(net.now, &mut net.buf).is_some() {}
    net.send(tx, b"third");
    net.advance(Duration::from_millis(200));
    assert_eq!(net.messages(rx).len(), 3);

    let rows: Vec<_> = net.nodes[rx].1.peer_stats().collect();
    let s = rows.iter().find(|p| p.role == PeerRole::Sender && p.session == 200).expect("sender row");
    assert_eq!(s.node_id, Some(2));
    assert_eq!(s.addr, Some(net.nodes[tx].0));
    assert_eq!(s.counters.messages_delivered, 3);
    assert!(s.counters.naks_sent >= 1, "{s:?}");
    assert_eq!(s.counters.repairs_received, 1, "{s:?}");
    assert_eq!(s.counters.position, 3);
    assert_eq!(s.counters.lost_datagrams, 0);
    assert!(s.counters.datagrams >= 3 && s.counters.bytes > 1400, "{s:?}");

    let rows: Vec<_> = net.nodes[tx].1.peer_stats().collect();
    let r = rows.iter().find(|p| p.role == PeerRole::Receiver && p.session == 100).expect("receiver row");
    assert_eq!(r.node_id, Some(1));
    assert!(r.counters.naks_received >= 1 && r.counters.retransmits >= 1, "{r:?}");
    assert!(r.counters.status_received >= 1);
    // Its position arrives with its next periodic STATUS.
    net.advance(Config::default().status_interval);
    let rows: Vec<_> = net.nodes[tx].1.peer_stats().collect();
    let r = rows.iter().find(|p| p.role == PeerRole::Receiver && p.session == 100).expect("receiver row");
    assert_eq!(r.counters.position, 3, "{r:?}");
    assert_eq!(net.nodes[tx].1.stats().naks_received, r.counters.naks_received);
}

/// Frames a message as `Endpoint::send_frames` takes it.
fn frame(msg: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(&[FRAME_FIRST | FRAME_LAST, 0]);
    out.extend_from_slice(msg);
}

/// Everything `ep` transmits now, datagram by datagram.
fn transmitted(ep: &mut Endpoint, now: Instant) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    let mut out = Vec::new();
    while let Some(t) = ep.poll_transmit(now, &mut buf) {
        out.push(buf[..t.len].to_vec());
    }
    out
}

proptest! {
    /// Messages given to `send_frames` in chunks (the ones it leaves, too large for a datagram, go to
    /// `send`, as the engine does) make exactly the datagrams that `send` one message at a time makes, and
    /// the same counters, flow-control refusals included: with a window of 8 datagrams the sender refuses
    /// until what it holds has been transmitted once, and both sides then transmit and try again.
    #[test]
    fn send_frames_makes_the_datagrams_send_makes(
        sizes in proptest::collection::vec(prop_oneof![0usize..200, 1300usize..1500, 3000usize..5000], 1..120),
        chunk in 1u64..40,
        flush_every in 1usize..50,
        small_window in any::<bool>(),
    ) {
        let now = Instant::now();
        let cfg = if small_window { Config { window: 8, ..Config::default() } } else { Config::default() };
        let mut one = Endpoint::new(cfg.clone(), 7, 7, now).unwrap();
        let mut framed = Endpoint::new(cfg, 7, 7, now).unwrap();
        let msgs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| (0..n).map(|b| (b ^ i) as u8).collect()).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for batch in msgs.chunks(flush_every) {
            for m in batch {
                while let Err(e) = one.send(now, m) {
                    prop_assert_eq!(e, SendError::WouldBlock);
                    a.extend(transmitted(&mut one, now));
                }
            }
            let mut frames = Vec::new();
            for m in batch {
                frame(m, &mut frames);
            }
            let (mut at, mut left) = (0, batch.len() as u64);
            while at < frames.len() {
                let t = framed.send_frames(now, &frames[at..], chunk.min(left));
                at += t.bytes;
                left -= t.messages;
                match t.stop {
                    FramesStop::WouldBlock => b.extend(transmitted(&mut framed, now)),
                    FramesStop::NotTaken if t.messages == 0 => {
                        // A message that needs fragmenting: `send`, as the engine does.
                        let len = u16::from_be_bytes([frames[at], frames[at + 1]]) as usize;
                        match framed.send(now, &frames[at + 4..at + 4 + len]) {
                            Ok(()) => {
                                at += 4 + len;
                                left -= 1;
                            }
                            Err(e) => {
                                prop_assert_eq!(e, SendError::WouldBlock);
                                b.extend(transmitted(&mut framed, now));
                            }
                        }
                    }
                    _ => {}
                }
            }
            a.extend(transmitted(&mut one, now));
            b.extend(transmitted(&mut framed, now));
        }
        prop_assert_eq!(a.len(), b.len());
        prop_assert!(a == b, "different datagrams");
        prop_assert_eq!(one.stats(), framed.stats());
    }
}

/// `max_message` holds even for a message that would fit the open datagram, in one piece or in two.
#[test]
fn a_message_over_max_message_is_refused_when_it_would_fit() {
    let now = Instant::now();
    let cfg = Config { max_message: 100, ..Config::default() };
    let mut ep = Endpoint::new(cfg, 7, 7, now).unwrap();
    ep.send(now, &[1; 10]).unwrap();
    let too_large = Err(SendError::TooLarge { size: 101, max: 100 });
    assert_eq!(ep.send(now, &[2; 101]), too_large);
    assert_eq!(ep.send_parts(now, &[2; 50], &[3; 51]), too_large);
    ep.send_parts(now, &[4; 40], &[5; 60]).unwrap();
    assert_eq!(ep.stats().messages_sent, 2);
    let mut expected = Vec::new();
    frame(&[1; 10], &mut expected);
    frame(&[[4u8; 40].as_slice(), &[5; 60]].concat(), &mut expected);
    let sent = transmitted(&mut ep, now);
    assert!(sent.iter().any(|d| d.ends_with(&expected)), "no datagram ends with both frames: {sent:?}");
}

proptest! {
    /// A message given as a head and a body, split anywhere, to `try_append_parts` and then (when that did
    /// nothing) to `send_parts`, as the engine's direct sends do, makes exactly the datagrams, refusals and
    /// counters that `send` makes of it in one piece: whole messages that fit the open datagram, ones that
    /// open the next, ones that fragment, and ones over `max_message`. (`send` is `send_parts` with an empty
    /// head; `send_frames_makes_the_datagrams_send_makes` checks it against `send_frames`, which frames by
    /// other code.)
    #[test]
    fn send_parts_makes_the_datagrams_send_makes(
        msgs in proptest::collection::vec(
            // Small ones leave room in the open datagram; 1380..1480 straddle `small_max` and a datagram's room.
            (prop_oneof![0usize..24, 0usize..200, 1380usize..1480, 3000usize..5000], any::<proptest::sample::Index>()),
            1..120,
        ),
        flush_every in 1usize..50,
        small_window in any::<bool>(),
        small_max in any::<bool>(),
    ) {
        let now = Instant::now();
        let mut cfg = Config::default();
        if small_window {
            cfg.window = 8;
        }
        if small_max {
            cfg.max_message = 1400;
        }
        let mut one = Endpoint::new(cfg.clone(), 7, 7, now).unwrap();
        let mut parts = Endpoint::new(cfg, 7, 7, now).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (i, (size, split)) in msgs.iter().enumerate() {
            let m: Vec<u8> = (0..*size).map(|k| (k ^ i) as u8).collect();
            let (head, body) = m.split_at(split.index(m.len() + 1));
            let r1 = loop {
                match one.send(now, &m) {
                    Err(SendError::WouldBlock) => a.extend(transmitted(&mut one, now)),
                    r => break r,
                }
            };
            let r2 = loop {
                if parts.try_append_parts(head, body) {
                    break Ok(());
                }
                match parts.send_parts(now, head, body) {
                    Err(SendError::WouldBlock) => b.extend(transmitted(&mut parts, now)),
                    r => break r,
                }
            };
            prop_assert_eq!(r1, r2);
            if i % flush_every == 0 {
                a.extend(transmitted(&mut one, now));
                b.extend(transmitted(&mut parts, now));
            }
        }
        a.extend(transmitted(&mut one, now));
        b.extend(transmitted(&mut parts, now));
        prop_assert_eq!(a.len(), b.len());
        prop_assert!(a == b, "different datagrams");
        prop_assert_eq!(one.stats(), parts.stats());
    }
}

proptest! {
    /// `send_frames` on arbitrary bytes never panics, takes only whole frames it can vouch for, and never
    /// reports more than it was given.
    #[test]
    fn send_frames_on_arbitrary_bytes_is_safe(bytes in proptest::collection::vec(any::<u8>(), 0..3000), max in 0u64..50) {
        let now = Instant::now();
        let mut ep = Endpoint::new(Config::default(), 3, 3, now).unwrap();
        let t = ep.send_frames(now, &bytes, max);
        let (taken, count) = (t.bytes, t.messages);
        prop_assert!(t.stop != FramesStop::WouldBlock, "an empty default window refused");
        prop_assert!(taken <= bytes.len() && count <= max);
        prop_assert_eq!(ep.stats().messages_sent, count);
        // What was taken parses as `count` whole frames.
        let (mut at, mut frames) = (0, 0u64);
        while at < taken {
            let len = u16::from_be_bytes([bytes[at], bytes[at + 1]]) as usize;
            prop_assert_eq!(&bytes[at + 2..at + 4], &[FRAME_FIRST | FRAME_LAST, 0][..]);
            at += 4 + len;
            frames += 1;
        }
        prop_assert_eq!((at, frames), (taken, count));
        let _ = transmitted(&mut ep, now);
    }
}

/// Events nobody polls stay bounded: a peer that restarts over and over (each MEMBER with a new session is
/// a `PeerRestarted`) fills the queue to `MAX_QUEUED_EVENTS`, after which the oldest are dropped and counted.
#[test]
fn unpolled_events_are_bounded_and_counted() {
    use blip::proto::MAX_QUEUED_EVENTS;
    use blip::wire::{MemberRepr, MemberState};
    let now = Instant::now();
    let mut ep = Endpoint::new(Config::default(), 1, 1, now).unwrap();
    let from: SocketAddr = "127.0.0.1:4000".parse().unwrap();
    let mut buf = [0u8; 256];
    let restarts = MAX_QUEUED_EVENTS as u64 + 100;
    for session in 1000..1000 + restarts {
        let header = Header { kind: Kind::Member, flags: 0, stream: 0, session };
        let repr = MemberRepr { node_id: 7, state: MemberState::Alive, name: "churn" };
        let len = repr.emit(&header, &mut buf).unwrap();
        ep.handle_datagram(now, from, &buf[..len]);
    }
    ep.handle_timeout(now);
    // The first announcement is a join, every later one a restart: one event each.
    let dropped = ep.stats().events_dropped;
    assert_eq!(dropped, restarts - MAX_QUEUED_EVENTS as u64, "{:?}", ep.stats());
    let mut left = 0;
    while ep.poll_event().is_some() {
        left += 1;
    }
    assert_eq!(left, MAX_QUEUED_EVENTS);
}
