//! Authenticated encryption at the endpoint level: lossy transfer on the simulator, a receiver with the wrong
//! key, replayed datagrams, key rotation mid-stream, and arbitrary bytes into a sealed endpoint.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blip::proto::{
    Cipher, Config, ConfigError, Delivery, Destination, Endpoint, KEY_LEN, KeyError, Keyring, MIN_DATAGRAM,
};
use blip::sim::{self, LinkConfig, SimConfig};
use blip::wire::{DataWriter, FLAG_SEALED, FRAME_FIRST, FRAME_LAST, Header, Kind, SEAL_OVERHEAD};
use proptest::prelude::*;

const KEY_A: [u8; KEY_LEN] = [0xA1; KEY_LEN];
const KEY_B: [u8; KEY_LEN] = [0xB2; KEY_LEN];

fn sealed_config(keys: Keyring) -> Config {
    Config { encryption: Some(keys), ..Config::default() }
}

/// Endpoints joined by a lossless network whose datagrams wait in a queue until `deliver`, so a test can
/// hold packets in flight, duplicate them or replay them.
struct Net {
    nodes: Vec<(SocketAddr, Endpoint)>,
    now: Instant,
    buf: Vec<u8>,
    /// (from node, destination, bytes)
    in_flight: VecDeque<(usize, Destination, Vec<u8>)>,
    /// Everything ever transmitted, for replays.
    log: Vec<(usize, Destination, Vec<u8>)>,
    /// Per node: (session, seq, payload) delivered.
    delivered: Vec<Vec<(u64, u64, Vec<u8>)>>,
}

impl Net {
    fn new() -> Net {
        Net {
            nodes: Vec::new(),
            now: Instant::now(),
            buf: vec![0; 65_536],
            in_flight: VecDeque::new(),
            log: Vec::new(),
            delivered: Vec::new(),
        }
    }

    fn add(&mut self, session: u64, config: Config) -> usize {
        let ep = Endpoint::new(config, session, session ^ 0x5555, self.now).unwrap();
        let addr: SocketAddr = format!("127.0.0.{}:4000", self.nodes.len() + 1).parse().unwrap();
        self.nodes.push((addr, ep));
        self.delivered.push(Vec::new());
        self.nodes.len() - 1
    }

    /// Takes every datagram the nodes have to send into the in-flight queue.
    fn collect(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.nodes.len() {
            while let Some(t) = self.nodes[i].1.poll_transmit(self.now, &mut self.buf) {
                assert!(t.len <= self.nodes[i].1.config().max_datagram, "datagram over max_datagram");
                let bytes = self.buf[..t.len].to_vec();
                self.log.push((i, t.destination, bytes.clone()));
                self.in_flight.push_back((i, t.destination, bytes));
                n += 1;
            }
        }
        n
    }

    fn inject(&mut self, from: usize, to: usize, bytes: &[u8]) {
        let addr = self.nodes[from].0;
        self.nodes[to].1.handle_datagram(self.now, addr, bytes);
        self.drain(to);
    }

    /// Delivers what is in flight, then what that caused, until the network is quiet.
    fn deliver(&mut self) {
        for _ in 0..100_000 {
            while let Some((from, dest, bytes)) = self.in_flight.pop_front() {
                for to in 0..self.nodes.len() {
                    let reaches = match dest {
                        Destination::Group => to != from,
                        Destination::Unicast(a) => self.nodes[to].0 == a,
                    };
                    if reaches {
                        self.inject(from, to, &bytes);
                    }
                }
            }
            if self.collect() == 0 {
                return;
            }
        }
        panic!("network did not settle");
    }

    fn drain(&mut self, node: usize) {
        while let Some(d) = self.nodes[node].1.recv() {
            match d {
                Delivery::Message(m) => self.delivered[node].push((m.session, m.seq, m.payload.to_vec())),
                Delivery::Loss { .. } => panic!("unexpected loss at node {node}: {d:?}"),
            }
        }
    }

    /// Advances virtual time in small steps, running timers and the network.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        while self.now < end {
            self.now = (self.now + Duration::from_micros(500)).min(end);
            for n in self.nodes.iter_mut() {
                n.1.handle_timeout(self.now);
            }
            self.collect();
            self.deliver();
        }
    }

    fn send(&mut self, node: usize, msg: &[u8]) {
        self.nodes[node].1.send(self.now, msg).unwrap();
    }

    fn stats(&self, node: usize) -> &blip::proto::Stats {
        self.nodes[node].1.stats()
    }
}

fn payload(i: u64) -> Vec<u8> {
    let mut v = i.to_be_bytes().to_vec();
    v.resize(100 + (i as usize % 300), i as u8);
    v
}

fn assert_all_in_order(net: &Net, rx: usize, session: u64, count: u64) {
    let got = &net.delivered[rx];
    assert_eq!(got.len() as u64, count, "node {rx} delivered {} of {count}", got.len());
    for (i, (s, seq, p)) in got.iter().enumerate() {
        assert_eq!((*s, *seq), (session, i as u64), "node {rx}: out of order at {i}");
        assert_eq!(p, &payload(i as u64), "node {rx}: payload {i} differs");
    }
}

#[test]
fn lossy_sealed_transfer_delivers_everything_in_order() {
    for cipher in [Cipher::Aegis128L, Cipher::Aes256Gcm] {
        let link =
            LinkConfig { loss: 0.05, jitter: Duration::from_micros(200), duplicate: 0.02, ..LinkConfig::default() };
        let cfg = SimConfig {
            seed: 21,
            receivers: 4,
            messages: 3000,
            message_size: 300,
            protocol: sealed_config(Keyring::new(1, KEY_A).with_cipher(cipher)),
            receiver_downlink: link.clone(),
            receiver_uplink: link,
            ..SimConfig::default()
        };
        let r = sim::run(&cfg).unwrap_or_else(|e| panic!("{cipher}: simulation failed: {e}"));
        assert!(r.in_order && r.duplicates == 0 && r.unreported_gaps == 0 && r.corrupt == 0, "{cipher}: {r:?}");
        assert_eq!((r.delivered, r.loss_events), (r.expected, 0), "{cipher}: {r:?}");
        assert!(r.lost_datagrams > 0 && r.retransmissions > 0, "{cipher}: the network must have dropped DATA: {r:?}");
    }
}

#[test]
fn receiver_with_the_wrong_key_delivers_nothing_and_counts() {
    let mut net = Net::new();
    let tx = net.add(100, sealed_config(Keyring::new(1, KEY_A)));
    let good = net.add(200, sealed_config(Keyring::new(1, KEY_A)));
    let wrong = net.add(300, sealed_config(Keyring::new(1, KEY_B)));
    let other_id = net.add(400, sealed_config(Keyring::new(2, KEY_A)));
    let clear = net.add(500, Config::default());
    let other_cipher = net.add(600, sealed_config(Keyring::new(1, KEY_A).with_cipher(Cipher::Aes256Gcm)));
    net.advance(Duration::from_millis(1));
    for i in 0..50 {
        net.send(tx, &payload(i));
        net.advance(Duration::from_millis(1));
    }
    net.advance(Duration::from_millis(200));
    assert_all_in_order(&net, good, 100, 50);
    for (node, what) in [
        (wrong, "wrong secret"),
        (other_id, "unknown key id"),
        (clear, "no encryption"),
        (other_cipher, "another cipher"),
    ] {
        assert!(net.delivered[node].is_empty(), "{what}: delivered {:?}", net.delivered[node].len());
        assert_eq!(net.stats(node).messages_delivered, 0, "{what}");
        assert_eq!(net.nodes[node].1.senders().count(), 0, "{what}: followed a sender it cannot authenticate");
        assert!(net.nodes[node].1.members().is_empty(), "{what}: {:?}", net.nodes[node].1.members());
    }
    assert!(net.stats(wrong).auth_failed >= 50, "{:?}", net.stats(wrong));
    assert!(net.stats(other_id).auth_failed >= 50, "{:?}", net.stats(other_id));
    assert!(net.stats(other_cipher).auth_failed >= 50, "{:?}", net.stats(other_cipher));
    assert!(net.stats(clear).sealed_dropped >= 50, "{:?}", net.stats(clear));
    // The sealed nodes drop each other's and the clear node's packets alike: nothing reaches the sender's
    // flow control or membership from them.
    assert!(net.stats(tx).auth_failed > 0 && net.stats(tx).unsealed_dropped > 0, "{:?}", net.stats(tx));
    assert_eq!(net.nodes[tx].1.receivers(), 1, "only the receiver with the right key reports STATUS");
}

#[test]
fn replayed_datagrams_are_counted_and_not_delivered_twice() {
    let mut net = Net::new();
    let tx = net.add(100, sealed_config(Keyring::new(1, KEY_A)));
    let rx = net.add(200, sealed_config(Keyring::new(1, KEY_A)));
    net.advance(Duration::from_millis(1));
    for i in 0..20 {
        net.send(tx, &payload(i));
    }
    net.advance(Duration::from_millis(50));
    assert_all_in_order(&net, rx, 100, 20);
    let replayed_before = net.stats(rx).replayed;
    // Replay everything the sender ever sent (DATA, heartbeats, announcements) to the receiver, and
    // everything the receiver sent (STATUS, announcements) to the sender.
    let log = net.log.clone();
    for (from, _, bytes) in &log {
        let to = if *from == tx { rx } else { tx };
        net.inject(*from, to, bytes);
    }
    assert_all_in_order(&net, rx, 100, 20);
    let to_rx = log.iter().filter(|(f, _, _)| *f == tx).count() as u64;
    assert_eq!(net.stats(rx).replayed - replayed_before, to_rx, "{:?}", net.stats(rx));
    assert_eq!(net.stats(rx).duplicates, 0, "replays must be stopped before the protocol sees them");
    assert!(net.stats(tx).replayed > 0);
    assert_eq!(net.stats(rx).auth_failed + net.stats(tx).auth_failed, 0);
}

/// A replayed NAK must not make the sender retransmit (forged NAKs are an amplification attack).
#[test]
fn replayed_nak_causes_no_retransmission() {
    let mut net = Net::new();
    let tx = net.add(100, sealed_config(Keyring::new(1, KEY_A)));
    let rx = net.add(200, sealed_config(Keyring::new(1, KEY_A)));
    net.advance(Duration::from_millis(1));
    net.send(tx, &payload(0));
    net.collect();
    net.in_flight.clear(); // datagram 0 lost: the receiver learns of it from the heartbeat and NAKs
    net.advance(Duration::from_millis(50));
    assert_all_in_order(&net, rx, 100, 1);
    let naks: Vec<Vec<u8>> =
        net.log.iter().filter(|(f, _, b)| *f == rx && b[1] == Kind::Nak as u8).map(|(_, _, b)| b.clone()).collect();
    assert!(!naks.is_empty(), "the receiver must have NAKed");
    let retransmits = net.stats(tx).retransmits;
    net.advance(Duration::from_millis(10)); // past the retransmit linger
    for nak in &naks {
        net.inject(rx, tx, nak);
    }
    net.deliver();
    assert_eq!(net.stats(tx).retransmits, retransmits, "a replayed NAK was answered");
    assert_eq!(net.stats(tx).replayed, naks.len() as u64);
}

#[test]
fn key_rotation_mid_stream_loses_nothing() {
    let mut net = Net::new();
    let keys = Keyring::new(1, KEY_A);
    let tx = net.add(100, sealed_config(keys.clone()));
    let rxs: Vec<usize> = (0..3).map(|i| net.add(200 + i, sealed_config(keys.clone()))).collect();
    let all: Vec<usize> = std::iter::once(tx).chain(rxs.iter().copied()).collect();
    net.advance(Duration::from_millis(1));
    let mut sent = 0u64;
    let mut burst = |net: &mut Net, n: u64| {
        for _ in 0..n {
            net.send(tx, &payload(sent));
            sent += 1;
        }
        net.collect(); // in flight, sealed under the key in force now
    };
    burst(&mut net, 100);
    // 1. Every node accepts the new key; packets sealed under the old one are still in flight.
    for &n in &all {
        net.nodes[n].1.add_key(2, KEY_B).unwrap();
    }
    burst(&mut net, 100);
    // 2. The nodes switch one by one, with traffic in flight under both keys.
    net.nodes[tx].1.use_key(2).unwrap();
    burst(&mut net, 100);
    net.deliver();
    for &n in &rxs {
        net.nodes[n].1.use_key(2).unwrap();
    }
    burst(&mut net, 100);
    net.advance(Duration::from_millis(20));
    // 3. The old key goes away everywhere.
    for &n in &all {
        assert_eq!(net.nodes[n].1.add_key(3, KEY_A), Err(KeyError::Full));
        net.nodes[n].1.remove_key(1).unwrap();
    }
    burst(&mut net, 100);
    net.advance(Duration::from_millis(200));
    for &rx in &rxs {
        assert_all_in_order(&net, rx, 100, 500);
        assert_eq!(net.stats(rx).auth_failed + net.stats(rx).replayed, 0, "{:?}", net.stats(rx));
    }
    assert_eq!(net.stats(tx).retransmits, 0, "nothing was lost, nothing needed repair");
    // Old-key packets are rejected now: replay the first datagram of the stream.
    let first = net.log.iter().find(|(f, _, _)| *f == tx).unwrap().2.clone();
    net.inject(tx, rxs[0], &first);
    assert_eq!(net.stats(rxs[0]).auth_failed, 1);
    assert_eq!(net.nodes[tx].1.config().encryption.as_ref().unwrap().sending_id(), 2);
}

#[test]
fn sealing_mismatch_and_key_errors() {
    let now = Instant::now();
    let from: SocketAddr = "127.0.0.9:4000".parse().unwrap();
    let mut clear = Endpoint::new(Config::default(), 1, 1, now).unwrap();
    let mut sealed = Endpoint::new(sealed_config(Keyring::new(1, KEY_A)), 2, 2, now).unwrap();
    let mut buf = vec![0u8; 2048];
    let h = Header { kind: Kind::Data, flags: 0, stream: 0, session: 77 };
    let n = DataWriter::begin(&mut buf, &h, 0, 0, 0).unwrap();
    let n = DataWriter::push_frame(&mut buf, n, FRAME_FIRST | FRAME_LAST, b"in clear").unwrap();
    sealed.handle_datagram(now, from, &buf[..n]);
    assert_eq!(sealed.stats().unsealed_dropped, 1);
    assert!(sealed.recv().is_none());
    buf[2] |= (FLAG_SEALED >> 8) as u8;
    clear.handle_datagram(now, from, &buf[..n]);
    assert_eq!(clear.stats().sealed_dropped, 1);
    assert_eq!(clear.add_key(2, KEY_B), Err(KeyError::NotEnabled));
    assert_eq!(sealed.use_key(9), Err(KeyError::UnknownId(9)));
    assert_eq!(sealed.remove_key(1), Err(KeyError::SendingKey(1)));
    assert_eq!(sealed.add_key(1, KEY_B), Err(KeyError::DuplicateId(1)));
    let small = Config { max_datagram: MIN_DATAGRAM, ..sealed_config(Keyring::new(1, KEY_A)) };
    assert_eq!(small.validate(), Err(ConfigError::SealedDatagramSize(MIN_DATAGRAM)));
    let fits = Config { max_datagram: MIN_DATAGRAM + SEAL_OVERHEAD, ..small };
    assert_eq!(fits.validate(), Ok(()));
    assert!(!format!("{:?}", fits).contains("161"), "Debug must not show the secret");
}

proptest! {
    /// Arbitrary datagrams, with and without the sealed flag, into an endpoint with encryption on: never a
    /// panic, never a delivery, and a legitimate sealed sender is still delivered afterwards.
    #[test]
    fn arbitrary_bytes_into_a_sealed_endpoint(
        packets in proptest::collection::vec((0u8..6, any::<u16>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..40)
    ) {
        let now = Instant::now();
        let config = sealed_config(Keyring::new(1, KEY_A));
        let mut rx = Endpoint::new(config.clone(), 1, 1, now).unwrap();
        let from: SocketAddr = "127.0.0.7:4000".parse().unwrap();
        let mut buf = [0u8; 2048];
        for (kind, flags, session, body) in &packets {
            let mut bytes = vec![1u8, *kind];
            bytes.extend_from_slice(&(flags | FLAG_SEALED).to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, 0]);
            bytes.extend_from_slice(&(session % 4).to_be_bytes());
            bytes.extend_from_slice(body);
            rx.handle_datagram(now, from, &bytes);
            rx.handle_datagram(now, from, body);
            rx.handle_timeout(now);
            while rx.poll_transmit(now, &mut buf).is_some() {}
            prop_assert!(rx.recv().is_none());
        }
        let mut tx = Endpoint::new(config, 99, 2, now).unwrap();
        tx.send(now, b"legit").unwrap();
        while let Some(t) = tx.poll_transmit(now, &mut buf) {
            rx.handle_datagram(now, from, &buf[..t.len]);
        }
        let mut got = Vec::new();
        while let Some(d) = rx.recv() {
            if let Delivery::Message(m) = d {
                got.push(m.payload.to_vec());
            }
        }
        prop_assert_eq!(got, vec![b"legit".to_vec()]);
    }
}
