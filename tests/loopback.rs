//! Integration suite over real loopback multicast, run once per backend.

mod common;

use std::time::Duration;

use blip::proto::{Event, KEY_LEN, KeyError, Keyring};
use blip::{BackendChoice, BackendKind, Received};
use common::*;

const WAIT: Duration = Duration::from_secs(60);

fn one_to_three_threads(backend: BackendChoice) {
    let group = unique_group();
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(builder(backend, group).build().expect("subscriber node"));
    }
    let mut pub_node = builder(backend, group).build().expect("publisher node");
    let mut publisher = pub_node.publisher().unwrap();
    let mut own = pub_node.subscriber().unwrap();
    const N: u64 = 20_000;
    let threads: Vec<_> = subs
        .iter_mut()
        .map(|n| {
            let mut s = n.subscriber().unwrap();
            std::thread::spawn(move || collect(&mut s, 1, N, WAIT))
        })
        .collect();
    handshake(&mut publisher, &mut own, 3, 100);
    send_rest(&mut publisher, N, 100);
    for t in threads {
        assert_perfect(&t.join().expect("subscriber thread"), N);
    }
}

fn two_to_two(backend: BackendChoice) {
    let group = unique_group();
    let mut subs: Vec<_> = (0..2).map(|_| builder(backend, group).build().expect("subscriber")).collect();
    let mut pubs: Vec<_> = (0..2).map(|_| builder(backend, group).build().expect("publisher")).collect();
    const N: u64 = 10_000;
    let collectors: Vec<_> = subs
        .iter_mut()
        .map(|n| {
            let mut s = n.subscriber().unwrap();
            std::thread::spawn(move || collect(&mut s, 2, N, WAIT))
        })
        .collect();
    let senders: Vec<_> = pubs
        .iter_mut()
        .map(|n| {
            let mut p = n.publisher().unwrap();
            let mut own = n.subscriber().unwrap();
            // The three other nodes (two subscribers and the other publisher) all follow this stream.
            std::thread::spawn(move || {
                handshake(&mut p, &mut own, 3, 64);
                send_rest(&mut p, N, 64);
                (p, own)
            })
        })
        .collect();
    for c in collectors {
        assert_perfect(&c.join().expect("collector"), N);
    }
    for s in senders {
        drop(s.join().expect("sender"));
    }
}

fn million_small(backend: BackendChoice) {
    let group = unique_group();
    let mut sub_node = builder(backend, group).build().unwrap();
    let mut pub_node = builder(backend, group).build().unwrap();
    let mut sub = sub_node.subscriber().unwrap();
    const N: u64 = 1_000_000;
    let c = std::thread::spawn(move || collect(&mut sub, 1, N, Duration::from_secs(240)));
    let mut publisher = pub_node.publisher().unwrap();
    let mut own = pub_node.subscriber().unwrap();
    handshake(&mut publisher, &mut own, 1, 64);
    send_rest(&mut publisher, N, 64);
    assert_perfect(&c.join().unwrap(), N);
}

fn large_messages(backend: BackendChoice) {
    let group = unique_group();
    let mut sub_node = builder(backend, group).build().unwrap();
    let mut pub_node = builder(backend, group).build().unwrap();
    let mut sub = sub_node.subscriber().unwrap();
    let mut publisher = pub_node.publisher().unwrap();
    let mut own = pub_node.subscriber().unwrap();
    handshake(&mut publisher, &mut own, 1, 64);
    let sizes = [1 << 20, 16 << 20, 1 << 20];
    let mut buf = Vec::new();
    for (k, &size) in sizes.iter().enumerate() {
        payload(k as u64 + 1, size, &mut buf);
        publisher.send(&buf).unwrap();
    }
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while got.len() < sizes.len() + 1 {
        assert!(std::time::Instant::now() < deadline, "large messages: got {} of {}", got.len(), sizes.len() + 1);
        sub.wait(Duration::from_millis(50));
        sub.poll(16, |r| {
            if let Received::Message(m) = r {
                got.push((m.seq, m.payload.len(), check_payload(m.seq, m.payload)));
            }
        });
    }
    assert_eq!(got[0], (0, 64, true));
    for (k, &size) in sizes.iter().enumerate() {
        assert_eq!(got[k + 1], (k as u64 + 1, size, true), "message {} of {size} bytes", k + 1);
    }
}

fn injected_loss(backend: BackendChoice) {
    let group = unique_group();
    let mut sub_node = builder(backend, group).inject_loss(0.05, 42).build().unwrap();
    let mut pub_node = builder(backend, group).build().unwrap();
    let mut sub = sub_node.subscriber().unwrap();
    const N: u64 = 100_000;
    let c = std::thread::spawn(move || collect(&mut sub, 1, N, WAIT));
    let mut publisher = pub_node.publisher().unwrap();
    let mut own = pub_node.subscriber().unwrap();
    handshake(&mut publisher, &mut own, 1, 200);
    send_rest(&mut publisher, N, 200);
    assert_perfect(&c.join().unwrap(), N);
    let rx = sub_node.stats();
    let tx = pub_node.stats();
    assert!(rx.injected_drops > 100, "loss injector dropped {}", rx.injected_drops);
    assert!(tx.protocol.retransmits > 0, "no retransmissions: {tx:?}");
    assert!(rx.protocol.naks_sent > 0);
}

fn events_and_info(backend: BackendChoice, kind: BackendKind) {
    let group = unique_group();
    let mut a = builder(backend, group).name("alpha").build().unwrap();
    assert_eq!(a.info().backend, kind);
    let b = builder(backend, group).name("beta").build().unwrap();
    let b_id = b.info().node_id;
    let mut sub = a.subscriber().unwrap();
    match sub.recv_timeout(Duration::from_secs(10)) {
        Some(blip::Owned::BackendChosen { kind: k, reason }) => {
            assert_eq!(k, kind);
            assert!(!reason.is_empty());
        }
        other => panic!("the first delivery should name the backend, got {other:?}"),
    }
    wait_events(
        &mut sub,
        1,
        Duration::from_secs(10),
        "beta to join",
        |e| matches!(e, Event::PeerJoined { node_id, name, .. } if *node_id == b_id && name == "beta"),
    );
    b.shutdown();
    wait_events(
        &mut sub,
        1,
        Duration::from_secs(10),
        "beta to leave",
        |e| matches!(e, Event::PeerLeft { node_id, .. } if *node_id == b_id),
    );
}

fn driven_by_caller(backend: BackendChoice) {
    let group = unique_group();
    let mut a = builder(backend, group).build_driven().unwrap();
    let mut b = builder(backend, group).build_driven().unwrap();
    let mut pa = a.publisher().unwrap();
    let mut sb = b.subscriber().unwrap();
    let mut buf = Vec::new();
    for i in 0..1000 {
        payload(i, 64, &mut buf);
        if i % 2 == 0 {
            pa.try_send(&buf).unwrap();
        } else {
            // Written in place in the ring.
            let mut claim = pa.claim(buf.len()).unwrap();
            claim.copy_from_slice(&buf);
            claim.commit();
        }
    }
    assert!(matches!(pa.claim(pa.max_claim() + 1), Err(blip::SendError::TooLarge { .. })));
    let deadline = std::time::Instant::now() + WAIT;
    let mut next = 0u64;
    while next < 1000 {
        assert!(std::time::Instant::now() < deadline, "driven nodes delivered {next} of 1000");
        a.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        b.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        sb.poll(1024, |r| {
            if let Received::Message(m) = r {
                assert_eq!(m.seq, next);
                assert!(check_payload(m.seq, m.payload));
                next += 1;
            }
        });
    }
}

/// Busy-spinning driven nodes: sparse traffic (a ping-pong, which puts io_uring's group socket on plain
/// reads), then a burst from one node (bulk, which puts its multishot receive back), then a ping-pong again:
/// every message arrives once, in order, whole, across the switches.
fn ping_pong_then_burst(backend: BackendChoice) {
    const ROUND_TRIPS: u64 = 1_000;
    const BURST: u64 = 20_000;
    let group = unique_group();
    let node = || builder(backend, group).idle(blip::IdleStrategy::BusySpin).direct_receive().build_driven().unwrap();
    let (mut a, mut b) = (node(), node());
    let deadline = std::time::Instant::now() + WAIT;
    // Messages sent by and delivered to each node.
    let (mut sent, mut got) = ([0u64; 2], [0u64; 2]);
    let mut buf = Vec::new();
    for phase in 0..3 {
        if phase == 1 {
            let end = sent[0] + BURST;
            while got[1] < end {
                assert!(std::time::Instant::now() < deadline, "burst: {} sent, {} delivered", sent[0], got[1]);
                while sent[0] < end {
                    payload(sent[0], 64, &mut buf);
                    if a.try_send(&buf).is_err() {
                        break;
                    }
                    sent[0] += 1;
                }
                a.duty_cycle(Some(Duration::ZERO)).unwrap();
                b.duty_cycle(Some(Duration::ZERO)).unwrap();
                take(&mut b, &mut got[1]);
            }
            continue;
        }
        for _ in 0..ROUND_TRIPS {
            for (from, to) in [(0, 1), (1, 0)] {
                let (tx, rx) = if from == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
                payload(sent[from], 64, &mut buf);
                while tx.try_send(&buf).is_err() {
                    tx.duty_cycle(Some(Duration::ZERO)).unwrap();
                }
                sent[from] += 1;
                while got[to] < sent[from] {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "phase {phase}: {} of {} delivered",
                        got[to],
                        sent[from]
                    );
                    tx.duty_cycle(Some(Duration::ZERO)).unwrap();
                    rx.duty_cycle(Some(Duration::ZERO)).unwrap();
                    take(rx, &mut got[to]);
                }
            }
        }
    }
    assert_eq!(got, [2 * ROUND_TRIPS, 2 * ROUND_TRIPS + BURST]);
    if a.info().backend == BackendKind::Uring {
        // The ping-pong is sparse traffic on spinning nodes: io_uring took the group socket's multishot
        // receive down at least once at each end (counters are published every 50 ms of duty cycles).
        let switches = |n: &blip::Node| n.stats().backend.plain_switches;
        while switches(&a) == 0 || switches(&b) == 0 {
            let (sa, sb) = (a.stats().backend, b.stats().backend);
            assert!(std::time::Instant::now() < deadline, "no switch to plain reads: {sa:?}, {sb:?}");
            a.duty_cycle(Some(Duration::ZERO)).unwrap();
            b.duty_cycle(Some(Duration::ZERO)).unwrap();
        }
    }
    assert_eq!(a.stats().backend.truncated + b.stats().backend.truncated, 0);

    /// Takes what `node` has for its reader, checking order and contents.
    fn take(node: &mut blip::Node, next: &mut u64) {
        node.poll(4096, |r| match r {
            Received::Message(m) => {
                assert_eq!(m.seq, *next, "out of order");
                assert!(check_payload(m.seq, m.payload), "message {} corrupted", m.seq);
                *next += 1;
            }
            Received::Loss { .. } => panic!("loss on a lossless run"),
            _ => {}
        })
        .unwrap();
    }
}

/// `Node::try_send` from the thread that drives the node: every message reaches another node and, with
/// local delivery, the sender's own subscriber, in order, whole (fragmented ones too), through a window
/// small enough that the sender must wait for acknowledgements; limits and threaded nodes are refused.
fn direct_sends(backend: BackendChoice) {
    const N: u64 = 20_000;
    let group = unique_group();
    let mut a = builder(backend, group).window(64).max_message(10_000).local_delivery(true).build_driven().unwrap();
    let mut b = builder(backend, group).window(64).build_driven().unwrap();
    let mut own = a.subscriber().unwrap();
    let mut sb = b.subscriber().unwrap();
    let size = |i: u64| if i % 1000 == 999 { 5000 } else { 64 };
    let (mut sent, mut next_b, mut next_own, mut fulls) = (0u64, 0u64, 0u64, 0u64);
    let mut buf = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while next_b < N || next_own < N {
        assert!(
            std::time::Instant::now() < deadline,
            "direct sends: {sent} sent, {next_b} delivered to the other node, {next_own} to the sender's own"
        );
        while sent < N {
            payload(sent, size(sent), &mut buf);
            match a.try_send(&buf) {
                Ok(()) => sent += 1,
                Err(blip::SendError::Full) => {
                    fulls += 1;
                    break;
                }
                Err(e) => panic!("direct send {sent}: {e}"),
            }
        }
        a.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        b.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        for (sub, next) in [(&mut sb, &mut next_b), (&mut own, &mut next_own)] {
            sub.poll(4096, |r| match r {
                Received::Message(m) => {
                    assert_eq!(m.seq, *next);
                    assert_eq!(m.payload.len(), size(m.seq), "message {}", m.seq);
                    assert!(check_payload(m.seq, m.payload), "message {} corrupted", m.seq);
                    *next += 1;
                }
                Received::Loss { .. } => panic!("loss on a lossless run"),
                _ => {}
            });
        }
    }
    assert!(fulls > 0, "a window of 64 datagrams never filled over {N} messages");
    assert_eq!(a.try_send(&[0; 9_999]), Err(blip::SendError::TooLarge { size: 10_001, max: 10_000 }));
    let mut threaded = builder(backend, unique_group()).build().unwrap();
    assert_eq!(threaded.try_send(b"x"), Err(blip::SendError::NotDriven));
}

/// `Node::poll`: the thread that drives a node takes its deliveries straight from the protocol, repaired
/// and in order, events included, what a catch-all subscriber would get (not messages aimed at another
/// node), with the reader's pace holding the sender back through a 64-datagram window.
fn direct_receives(backend: BackendChoice) {
    const N: u64 = 20_000;
    let group = unique_group();
    let mut a = builder(backend, group).window(64).max_message(10_000).build_driven().unwrap();
    let mut b = builder(backend, group).window(64).inject_loss(0.05, 7).direct_receive().build_driven().unwrap();
    assert!(b.subscriber().is_none(), "a direct reader's node has no catch-all subscriber");
    assert!(matches!(b.subscribe("t"), Err(blip::Error::DirectReceive(_))));
    let mut publisher = a.publisher().unwrap();
    let b_id = b.info().node_id;
    let size = |i: u64| if i % 1000 == 999 { 5000 } else { 64 };
    let (mut sent, mut next, mut joined, mut directed, mut others) = (1u64, 0u64, false, 0, 0);
    let mut buf = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    // The stream starts once a knows b as a receiver: before that, a's window slides past what b lost.
    payload(0, size(0), &mut buf);
    a.try_send(&buf).unwrap();
    // (b acknowledges what its reader took: message 0 is read here.)
    while !a.peer_stats().iter().any(|r| r.role == blip::proto::PeerRole::Receiver && r.counters.position > 0) {
        assert!(std::time::Instant::now() < deadline, "a never heard from b");
        a.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        b.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        b.poll(usize::MAX, |r| match r {
            Received::Message(m) => {
                assert_eq!((m.seq, next), (0, 0));
                next = 1;
            }
            Received::Event(Event::SenderJoined { .. }) => joined = true,
            _ => {}
        })
        .unwrap();
    }
    while next < N || directed < 1 {
        assert!(std::time::Instant::now() < deadline, "direct receives: {sent} sent, {next} read, {directed} directed");
        while sent < N {
            payload(sent, size(sent), &mut buf);
            match a.try_send(&buf) {
                Ok(()) => sent += 1,
                Err(blip::SendError::Full) => break,
                Err(e) => panic!("direct send {sent}: {e}"),
            }
        }
        if sent == N && next == N && directed == 0 && others == 0 {
            // After the stream: one message aimed at b, one at another node (not for b's reader).
            publisher.send_to(b_id ^ 4, "t", b"other").unwrap();
            publisher.send_to(b_id, "t", b"mine").unwrap();
            others = 1;
        }
        a.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        b.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        b.poll(4096, |r| match r {
            Received::Message(m) if m.is_directed() => {
                assert_eq!(m.payload, b"mine", "a message aimed at another node reached b's reader");
                directed += 1;
            }
            Received::Message(m) => {
                assert_eq!(m.seq, next);
                assert_eq!(m.payload.len(), size(m.seq), "message {}", m.seq);
                assert!(check_payload(m.seq, m.payload), "message {} corrupted", m.seq);
                next += 1;
            }
            Received::Loss { datagrams, .. } => panic!("an unrepaired loss under 5 % injected loss: {datagrams:?}"),
            Received::Event(Event::SenderJoined { .. }) => joined = true,
            _ => {}
        })
        .unwrap();
    }
    assert!(joined, "no SenderJoined event reached the reader");
    // Statistics are published every few cycles: run some until they show the repairs and the refusal.
    while b.stats().protocol.naks_sent == 0 || b.stats().not_addressed == 0 {
        assert!(std::time::Instant::now() < deadline, "no repair asked for, or the refusal not counted");
        b.duty_cycle(Some(Duration::from_millis(1))).unwrap();
    }
    assert_eq!(b.stats().not_addressed, 1, "the message aimed at another node, counted once");
    let mut threaded = builder(backend, unique_group()).build().unwrap();
    assert!(matches!(threaded.poll(1, |_| {}), Err(blip::Error::NotDriven)));
    let mut rings = builder(backend, unique_group()).build_driven().unwrap();
    assert!(matches!(rings.poll(1, |_| {}), Err(blip::Error::DirectReceive(_))));
    let refused = builder(backend, unique_group()).direct_receive().local_delivery(true).build_driven();
    assert!(matches!(refused, Err(blip::Error::DirectReceive(_))));
    assert!(matches!(builder(backend, unique_group()).direct_receive().build(), Err(blip::Error::DirectReceive(_))));
}

/// A direct send that first finds the window held by a stalled receiver times `DropAfter` from then, not
/// from the node's last duty cycle: the application may have run for longer than the limit in between.
fn direct_send_times_a_stall_from_the_send(backend: BackendChoice) {
    let limit = Duration::from_secs(1);
    let group = unique_group();
    let policy = blip::proto::SlowReceiverPolicy::DropAfter(limit);
    let mut a = builder(backend, group).window(64).slow_receiver(policy).build_driven().unwrap();
    let mut b = builder(backend, group).window(64).build_driven().unwrap();
    // b follows a's stream and acknowledges a's first datagram.
    a.try_send(b"hello").unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let position = loop {
        assert!(std::time::Instant::now() < deadline, "b never acknowledged a's first datagram");
        a.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        b.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        let rows = a.peer_stats();
        if let Some(r) = rows.iter().find(|r| r.role == blip::proto::PeerRole::Receiver && r.counters.position > 0) {
            break r.counters.position;
        }
    };
    // b stalls from here on. a fills the room b advertised (64 datagrams from its position), one datagram
    // per message, transmitting as it goes.
    for k in 0..position + 63 {
        a.try_send(&[7; 1400]).unwrap_or_else(|e| panic!("message {k} of {}: {e}", position + 63));
        a.duty_cycle(Some(Duration::ZERO)).unwrap();
    }
    // The application runs for longer than the limit without a duty cycle, then sends into b's stall.
    std::thread::sleep(limit + limit / 2);
    assert_eq!(a.try_send(&[7; 1400]), Err(blip::SendError::Full), "b's room should be used up");
    a.duty_cycle(Some(Duration::ZERO)).unwrap();
    // b has held a back for microseconds, not for the limit: it is still waited for.
    assert_eq!(a.try_send(&[7; 1400]), Err(blip::SendError::Full), "b was dropped before its time");
}

/// The fault of the stall tests, timed: `stalled` runs until its sockets are empty, then its thread does
/// something else for `gap` while `others` keep running; then all run a few cycles, `stalled` first.
fn stall(stalled: &mut blip::Node, mut others: [&mut blip::Node; 2], gap: Duration) {
    for _ in 0..8 {
        stalled.duty_cycle(Some(Duration::ZERO)).unwrap();
    }
    let stall_end = std::time::Instant::now() + gap;
    while std::time::Instant::now() < stall_end {
        for n in others.iter_mut() {
            n.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        }
    }
    for _ in 0..10 {
        stalled.duty_cycle(Some(Duration::ZERO)).unwrap();
        for n in others.iter_mut() {
            n.duty_cycle(Some(Duration::ZERO)).unwrap();
        }
    }
}

/// The sending side of a stall: a sender whose thread stops for three receiver timeouts, while its two
/// receivers keep reporting to its unicast socket, reads those reports before it judges either receiver
/// gone.
fn stalled_sender_reads_before_it_judges_receivers(backend: BackendChoice) {
    let group = unique_group();
    let config = blip::proto::Config {
        receiver_timeout: Duration::from_millis(200),
        status_interval: Duration::from_millis(20),
        heartbeat_max: Duration::from_millis(20),
        ..blip::proto::Config::default()
    };
    let node = || builder(backend, group).protocol(config.clone()).build_driven().unwrap();
    let (mut a, mut b1, mut b2) = (node(), node(), node());
    let mut sa = a.subscriber().unwrap();
    let (mut s1, mut s2) = (b1.subscriber().unwrap(), b2.subscriber().unwrap());
    a.try_send(b"one").unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let (mut joined, mut got) = (0, 0);
    while joined < 2 || got < 2 {
        assert!(std::time::Instant::now() < deadline, "{got} of 2 deliveries, {joined} of 2 receivers joined");
        for n in [&mut a, &mut b1, &mut b2] {
            n.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        }
        sa.poll(64, |r| joined += usize::from(matches!(r, Received::Event(Event::ReceiverJoined { .. }))));
        for s in [&mut s1, &mut s2] {
            s.poll(64, |r| got += usize::from(matches!(r, Received::Message(_))));
        }
    }
    // b1 and b2 report meanwhile.
    stall(&mut a, [&mut b1, &mut b2], 3 * config.receiver_timeout);
    sa.poll(1024, |r| {
        assert!(!matches!(r, Received::Event(Event::ReceiverGone { .. })), "a judged a receiver gone before reading it")
    });
}

/// A node whose thread stalls for longer than the sender timeout, while two senders go on heartbeating,
/// reads what arrived meanwhile, from both, before its timers judge them: it declares neither gone. (Its
/// sockets were found empty before the stall, so a plain receive would have handed one datagram up alone.)
fn stalled_node_reads_before_it_judges_senders(backend: BackendChoice) {
    let group = unique_group();
    let config = blip::proto::Config {
        sender_timeout: Duration::from_millis(200),
        heartbeat_max: Duration::from_millis(20),
        ..blip::proto::Config::default()
    };
    let node = || builder(backend, group).protocol(config.clone()).build_driven().unwrap();
    let (mut a1, mut a2, mut b) = (node(), node(), node());
    let mut sb = b.subscriber().unwrap();
    a1.try_send(b"one").unwrap();
    a2.try_send(b"two").unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let mut got = 0;
    while got < 2 {
        assert!(std::time::Instant::now() < deadline, "{got} of 2 first messages arrived");
        for n in [&mut a1, &mut a2, &mut b] {
            n.duty_cycle(Some(Duration::from_millis(1))).unwrap();
        }
        sb.poll(64, |r| got += usize::from(matches!(r, Received::Message(_))));
    }
    // a1 and a2 heartbeat meanwhile.
    stall(&mut b, [&mut a1, &mut a2], 3 * config.sender_timeout);
    sb.poll(1024, |r| {
        assert!(!matches!(r, Received::Event(Event::SenderGone { .. })), "b judged a sender gone before reading it")
    });
}

/// A node that dropped its subscriber consumes and discards: it never holds a sender back, even with a
/// window far smaller than what is sent.
fn dropped_subscriber_never_holds_back(backend: BackendChoice) {
    let group = unique_group();
    let mut quiet = builder(backend, group).window(64).build().unwrap();
    drop(quiet.subscriber());
    let mut pub_node = builder(backend, group).window(64).build().unwrap();
    let mut publisher = pub_node.publisher().unwrap();
    let mut own = pub_node.subscriber().unwrap();
    handshake(&mut publisher, &mut own, 1, 200);
    const N: u64 = 50_000; // about 7,000 datagrams through a 64-datagram window
    let mut buf = Vec::new();
    for i in 1..N {
        payload(i, 200, &mut buf);
        publisher.send_timeout(&buf, WAIT).expect("the sender must not be held back");
    }
    let deadline = std::time::Instant::now() + WAIT;
    while quiet.stats().protocol.messages_delivered < N {
        assert!(std::time::Instant::now() < deadline, "consumed {}", quiet.stats().protocol.messages_delivered);
        own.wait(Duration::from_millis(10));
        own.poll(usize::MAX, |_| {});
    }
}

const KEY_A: [u8; KEY_LEN] = [0x3C; KEY_LEN];
const KEY_B: [u8; KEY_LEN] = [0xC3; KEY_LEN];

/// Sealed traffic with 2% injected loss (so NAKs and retransmissions are sealed too), and a key rotation
/// through the node API half-way: everything arrives, in order.
fn sealed_with_rotation(backend: BackendChoice) {
    let group = unique_group();
    let keys = Keyring::new(1, KEY_A);
    let mut sub_node = builder(backend, group).encryption(keys.clone()).inject_loss(0.02, 7).build().unwrap();
    let mut pub_node = builder(backend, group).encryption(keys).build().unwrap();
    let mut sub = sub_node.subscriber().unwrap();
    const N: u64 = 20_000;
    let c = std::thread::spawn(move || collect(&mut sub, 1, N, WAIT));
    let mut publisher = pub_node.publisher().unwrap();
    let mut own = pub_node.subscriber().unwrap();
    handshake(&mut publisher, &mut own, 1, 1024);
    let mut buf = Vec::new();
    for i in 1..N {
        if i == N / 2 {
            // Rotation: the new key everywhere, then sent under everywhere, then the old one gone.
            for node in [&sub_node, &pub_node] {
                node.add_key(2, KEY_B).unwrap();
            }
            for node in [&pub_node, &sub_node] {
                node.use_key(2).unwrap();
            }
            for node in [&sub_node, &pub_node] {
                node.remove_key(1).unwrap();
                assert_eq!(node.remove_key(2), Err(KeyError::SendingKey(2)));
            }
        }
        payload(i, 1024, &mut buf);
        publisher.send(&buf).expect("send");
    }
    assert_perfect(&c.join().unwrap(), N);
    let s = sub_node.stats().protocol;
    assert!(s.retransmits + s.repairs_received > 0, "the injected loss must have been repaired: {s:?}");
    drop(own);
}

/// A node with another key hears the traffic, delivers nothing, and counts authentication failures; a node
/// with the right key beside it gets everything.
fn wrong_key_delivers_nothing(backend: BackendChoice) {
    let group = unique_group();
    let mut wrong = builder(backend, group).encryption(Keyring::new(1, KEY_B)).build().unwrap();
    let mut good = builder(backend, group).encryption(Keyring::new(1, KEY_A)).build().unwrap();
    let mut pub_node = builder(backend, group).encryption(Keyring::new(1, KEY_A)).build().unwrap();
    let mut wrong_sub = wrong.subscriber().unwrap();
    let mut good_sub = good.subscriber().unwrap();
    let collector = std::thread::spawn(move || collect(&mut good_sub, 1, 1000, WAIT));
    let mut publisher = pub_node.publisher().unwrap();
    let mut own = pub_node.subscriber().unwrap();
    handshake(&mut publisher, &mut own, 1, 64);
    send_rest(&mut publisher, 1000, 64);
    assert_perfect(&collector.join().unwrap(), 1000);
    let deadline = std::time::Instant::now() + WAIT;
    while wrong.stats().protocol.auth_failed < 10 {
        assert!(std::time::Instant::now() < deadline, "the node with the wrong key counted no authentication failures");
        std::thread::park_timeout(Duration::from_millis(10));
    }
    let s = wrong.stats().protocol;
    assert_eq!((s.datagrams_received, s.messages_delivered), (0, 0), "a packet under the wrong key got through: {s:?}");
    let mut delivered = 0;
    wrong_sub.poll(usize::MAX, |r| {
        if let Received::Message(_) = r {
            delivered += 1;
        }
    });
    assert_eq!(delivered, 0);
}

macro_rules! suite {
    ($name:ident, $choice:expr, $kind:expr, $available:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn one_publisher_three_subscriber_threads() {
                if $available {
                    one_to_three_threads($choice)
                }
            }
            #[test]
            fn two_publishers_two_subscribers() {
                if $available {
                    two_to_two($choice)
                }
            }
            #[test]
            fn a_million_small_messages_in_order() {
                if $available {
                    million_small($choice)
                }
            }
            #[test]
            fn one_and_sixteen_mib_messages() {
                if $available {
                    large_messages($choice)
                }
            }
            #[test]
            fn five_percent_injected_loss_is_repaired() {
                if $available {
                    injected_loss($choice)
                }
            }
            #[test]
            fn membership_events_and_backend_info() {
                if $available {
                    events_and_info($choice, $kind)
                }
            }
            #[test]
            fn dropped_subscriber_never_holds_a_sender_back() {
                if $available {
                    dropped_subscriber_never_holds_back($choice)
                }
            }
            #[test]
            fn engine_driven_from_the_callers_thread() {
                if $available {
                    driven_by_caller($choice)
                }
            }
            #[test]
            fn busy_spinning_ping_pong_then_burst() {
                if $available {
                    ping_pong_then_burst($choice)
                }
            }
            #[test]
            fn direct_sends_from_the_driving_thread() {
                if $available {
                    direct_sends($choice)
                }
            }
            #[test]
            fn direct_receives_from_the_driving_thread() {
                if $available {
                    direct_receives($choice)
                }
            }
            #[test]
            fn a_direct_send_times_a_stall_from_the_send() {
                if $available {
                    direct_send_times_a_stall_from_the_send($choice)
                }
            }
            #[test]
            fn a_stalled_sender_reads_before_it_judges_receivers() {
                if $available {
                    stalled_sender_reads_before_it_judges_receivers($choice)
                }
            }
            #[test]
            fn a_stalled_node_reads_before_it_judges_senders() {
                if $available {
                    stalled_node_reads_before_it_judges_senders($choice)
                }
            }
            #[test]
            fn sealed_traffic_survives_loss_and_key_rotation() {
                if $available {
                    sealed_with_rotation($choice)
                }
            }
            #[test]
            fn wrong_key_delivers_nothing_and_counts() {
                if $available {
                    wrong_key_delivers_nothing($choice)
                }
            }
        }
    };
}

suite!(poll, BackendChoice::Poll, BackendKind::Poll, true);
suite!(uring, BackendChoice::Uring, BackendKind::Uring, uring_or_skip());

/// Source access control over real sockets: a node that denies loopback hears nothing and counts the drops;
/// one that allows 127.0.0.0/8 with a default of deny hears everything.
#[test]
fn access_list_filters_by_source_network() {
    use blip::proto::{AccessList, Action};
    let group = unique_group();
    let mut deaf = builder(BackendChoice::Poll, group)
        .access(AccessList::new(Action::Allow).deny("127.0.0.0/8").unwrap())
        .build()
        .unwrap();
    let mut open = builder(BackendChoice::Poll, group)
        .access(AccessList::new(Action::Deny).allow("127.0.0.0/8").unwrap())
        .build()
        .unwrap();
    let mut pub_node = builder(BackendChoice::Poll, group).build().unwrap();
    let mut publisher = pub_node.publisher().unwrap();
    let mut own = pub_node.subscriber().unwrap();
    drop(deaf.subscriber());
    let mut heard = open.subscriber().unwrap();
    let collector = std::thread::spawn(move || collect(&mut heard, 1, 1000, WAIT));
    handshake(&mut publisher, &mut own, 1, 64);
    send_rest(&mut publisher, 1000, 64);
    assert_perfect(&collector.join().unwrap(), 1000);
    let deadline = std::time::Instant::now() + WAIT;
    while deaf.stats().protocol.denied == 0 {
        assert!(std::time::Instant::now() < deadline, "the denying node counted no drops");
        std::thread::park_timeout(Duration::from_millis(10));
    }
    let s = deaf.stats().protocol;
    assert_eq!((s.datagrams_received, s.messages_delivered), (0, 0), "a denied source got through: {s:?}");
}

/// A node's own multicast packets, looped back to its group socket, are dropped by a socket filter in the
/// kernel (never copied out): the protocol sees none of them, while another node hears everything.
#[cfg(target_os = "linux")]
#[test]
fn own_packets_are_dropped_in_the_kernel() {
    let group = unique_group();
    let mut rx = builder(BackendChoice::Poll, group).build().unwrap();
    let mut tx = builder(BackendChoice::Poll, group).build().unwrap();
    let mut sub = rx.subscriber().unwrap();
    let mut publisher = tx.publisher().unwrap();
    let mut own = tx.subscriber().unwrap();
    handshake(&mut publisher, &mut own, 1, 64);
    send_rest(&mut publisher, 2_000, 64);
    assert_perfect(&collect(&mut sub, 1, 2_000, WAIT), 2_000);
    let stats = tx.stats().protocol;
    assert!(stats.datagrams_sent > 50, "{stats:?}");
    assert_eq!(stats.own_packets, 0, "own packets reached the protocol: {stats:?}");
}
