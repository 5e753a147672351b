//! The application layer over real loopback multicast, once per backend: topic filtering in the engine,
//! directed messages and private topics, request/reply and scatter-gather, membership; and the in-process
//! bus and local delivery.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blip::proto::Event;
use blip::{BackendChoice, Expect, Node, Received, Subscriber, topic};
use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// Receives messages on `sub` until `count` arrived or the deadline fails the test; returns (topic, payload).
fn take_messages(sub: &mut Subscriber, count: usize, what: &str) -> Vec<(String, Vec<u8>)> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < count {
        assert!(Instant::now() < deadline, "{what}: timed out with {} of {count} messages", got.len());
        sub.wait(Duration::from_millis(20));
        sub.poll(usize::MAX, |r| {
            if let Received::Message(m) = r {
                got.push((m.topic.to_owned(), m.payload.to_vec()));
            }
        });
    }
    got
}

/// Messages ready on `sub` now (events and losses are not counted).
fn count_messages(sub: &mut Subscriber) -> usize {
    let mut n = 0;
    sub.poll(usize::MAX, |r| n += matches!(r, Received::Message(_)) as usize);
    n
}

/// Polls `sub` until `until` is true, failing the test at the deadline.
fn poll_until(sub: &mut Subscriber, what: &str, mut until: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !until() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sub.wait(Duration::from_millis(20));
        sub.poll(usize::MAX, |_| {});
    }
}

/// Waits until `node` lists `n` peers.
fn wait_peers(node: &Node, n: usize) {
    let deadline = Instant::now() + WAIT;
    while node.peers().len() != n {
        assert!(Instant::now() < deadline, "expected {n} peers, have {:?}", node.peers());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn topics_are_filtered_in_the_engine(backend: BackendChoice) {
    let group = unique_group();
    let mut rx = builder(backend, group).build().unwrap();
    let mut catch_all = rx.subscriber().unwrap();
    let mut logs = rx.subscribe("logs.>").unwrap();
    let mut errors = rx.subscribe("logs.*.error").unwrap();
    let mut metrics = rx.subscribe("metrics.*").unwrap();
    let mut deaf_node = builder(backend, group).build().unwrap();
    drop(deaf_node.subscriber()); // no catch-all: only the filter below
    let _deaf = deaf_node.subscribe("nothing.matches.this").unwrap();

    let mut tx = builder(backend, group).build().unwrap();
    let mut publisher = tx.publisher().unwrap();
    let mut own = tx.subscriber().unwrap();
    handshake(&mut publisher, &mut own, 2, 16);
    const ROUNDS: usize = 200;
    let topics = ["logs.web.error", "logs.db.warn", "metrics.cpu", "metrics.cpu.core0"];
    for i in 0..ROUNDS {
        for t in topics {
            publisher.publish(t, format!("{t} {i}").as_bytes()).unwrap();
        }
        publisher.send(format!("plain {i}").as_bytes()).unwrap();
    }
    let expect = |wanted: &[&str]| -> Vec<(String, Vec<u8>)> {
        (0..ROUNDS).flat_map(|i| wanted.iter().map(move |t| (t.to_string(), format!("{t} {i}").into_bytes()))).collect()
    };
    assert_eq!(take_messages(&mut logs, 2 * ROUNDS, "logs.>"), expect(&["logs.web.error", "logs.db.warn"]));
    assert_eq!(take_messages(&mut errors, ROUNDS, "logs.*.error"), expect(&["logs.web.error"]));
    assert_eq!(take_messages(&mut metrics, ROUNDS, "metrics.*"), expect(&["metrics.cpu"]));
    // The catch-all gets everything, topics or not (message 0 of the handshake first).
    let all = take_messages(&mut catch_all, 1 + 5 * ROUNDS, "catch-all");
    assert_eq!(all[0].0, "");
    assert_eq!(all.iter().filter(|(t, _)| t.is_empty()).count(), 1 + ROUNDS);
    assert_eq!(all.iter().filter(|(t, _)| t == "metrics.cpu.core0").count(), ROUNDS);
    // Nothing beyond: no filter delivered a message it should not have.
    std::thread::sleep(Duration::from_millis(50));
    for (name, sub) in [("logs", &mut logs), ("errors", &mut errors), ("metrics", &mut metrics)] {
        assert_eq!(count_messages(sub), 0, "{name}: a message its filter does not select");
    }
    // The deaf node's engine dropped every message: counted, never handed over.
    let deadline = Instant::now() + WAIT;
    while deaf_node.stats().unmatched < (1 + 5 * ROUNDS) as u64 {
        assert!(Instant::now() < deadline, "deaf node unmatched: {:?}", deaf_node.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn directed_messages_and_private_topics(backend: BackendChoice) {
    let group = unique_group();
    let mut b = builder(backend, group).node_id(0xb).build().unwrap();
    let mut c = builder(backend, group).node_id(0xc).build().unwrap();
    let mut b_sub = b.subscriber().unwrap();
    let mut c_sub = c.subscriber().unwrap();
    // Another node's private topics cannot be subscribed to, by name or by namespace.
    let foreign = topic::private_topic(0xb, "inbox").unwrap();
    assert!(matches!(c.subscribe(&foreign), Err(blip::Error::Topic(topic::FilterError::Private(_)))));
    assert!(matches!(c.subscribe("_private.>"), Err(blip::Error::Topic(_))));
    let mut b_private = b.subscribe(&format!("_private.{:016x}.>", 0xb)).unwrap();
    let mut c_everything = c.subscribe(">").unwrap();

    let mut a = builder(backend, group).node_id(0xa).build().unwrap();
    let mut publisher = a.publisher().unwrap();
    let mut own = a.subscriber().unwrap();
    handshake(&mut publisher, &mut own, 2, 16);
    const N: usize = 100;
    for i in 0..N {
        publisher.send_to(0xb, "orders.new", format!("b {i}").as_bytes()).unwrap();
        publisher.send_to(0xc, "orders.new", format!("c {i}").as_bytes()).unwrap();
        publisher.publish(&foreign, format!("private {i}").as_bytes()).unwrap();
    }
    let got_b = take_messages(&mut b_sub, 1 + 2 * N, "b catch-all");
    let got_c = take_messages(&mut c_sub, 1 + N, "c catch-all");
    assert!(got_b[1..].iter().all(|(_, p)| p.starts_with(b"b ") || p.starts_with(b"private ")), "{got_b:?}");
    assert!(got_c[1..].iter().all(|(_, p)| p.starts_with(b"c ")), "{got_c:?}");
    assert_eq!(take_messages(&mut b_private, N, "b private").len(), N);
    assert_eq!(take_messages(&mut c_everything, N, "c >").iter().filter(|(t, _)| t.starts_with("_private")).count(), 0);
    let deadline = Instant::now() + WAIT;
    while c.stats().not_addressed < 2 * N as u64 || b.stats().not_addressed < N as u64 {
        assert!(Instant::now() < deadline, "not_addressed: b {:?} c {:?}", b.stats(), c.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts a node that answers every request on `status.query` with its name, until `stop`.
fn responder(
    backend: BackendChoice,
    group: (std::net::IpAddr, u16),
    id: u64,
    answer: bool,
    stop: Arc<AtomicBool>,
) -> (Node, std::thread::JoinHandle<()>) {
    let mut node = builder(backend, group).node_id(id).name(&format!("r{id}")).build().unwrap();
    let mut sub = node.subscribe("status.query").unwrap();
    let mut publisher = node.publisher().unwrap();
    let thread = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            sub.wait(Duration::from_millis(10));
            sub.poll(usize::MAX, |r| {
                if let Received::Message(m) = r
                    && answer
                {
                    publisher.reply(&m, format!("status of {id}: {}", m.payload.len()).as_bytes()).unwrap();
                }
            });
        }
    });
    (node, thread)
}

fn request_reply_and_scatter_gather(backend: BackendChoice) {
    let group = unique_group();
    let stop = Arc::new(AtomicBool::new(false));
    let responders: Vec<_> = (1..=3).map(|id| responder(backend, group, id, true, stop.clone())).collect();
    let mut node = builder(backend, group).node_id(0x99).build().unwrap();
    let mut requester = node.requester().unwrap();
    wait_peers(&node, 3);
    let g = requester.scatter("status.query", b"?", Expect::AllPeers, WAIT).unwrap();
    assert!(g.complete, "{g:?}");
    let mut from: Vec<u64> = g.replies.iter().map(|r| r.from).collect();
    from.sort();
    assert_eq!(from, vec![1, 2, 3]);
    assert!(g.missing.is_empty());
    assert_eq!(g.replies.iter().find(|r| r.from == 2).unwrap().payload, b"status of 2: 1");

    // Directed request: only node 3 answers.
    let r = requester.request(3, "status.query", b"??", WAIT).unwrap().expect("reply from 3");
    assert_eq!((r.from, r.payload.as_slice()), (3, &b"status of 3: 2"[..]));

    // A node that joins and never answers is reported missing after the timeout.
    let silent = responder(backend, group, 4, false, stop.clone());
    wait_peers(&node, 4);
    let g = requester.scatter("status.query", b"!", Expect::AllPeers, Duration::from_millis(500)).unwrap();
    assert!(!g.complete);
    assert_eq!(g.replies.len(), 3, "{g:?}");
    assert_eq!(g.missing, vec![4]);
    // An expected count ends early.
    let g = requester.scatter("status.query", b"!", Expect::Count(2), WAIT).unwrap();
    assert!(g.complete && g.replies.len() >= 2, "{g:?}");
    stop.store(true, Ordering::Relaxed);
    for (_node, thread) in responders.into_iter().chain([silent]) {
        thread.join().unwrap();
    }
}

fn membership_join_leave_expire_restart(backend: BackendChoice) {
    let group = unique_group();
    let fast = |b: blip::NodeBuilder| b.membership(Duration::from_millis(50), Duration::from_millis(400));
    let mut watcher = fast(builder(backend, group)).node_id(0x1).build().unwrap();
    let mut events = watcher.subscriber().unwrap();

    let joiner = fast(builder(backend, group)).node_id(0x2).name("two").build().unwrap();
    wait_events(
        &mut events,
        1,
        WAIT,
        "join",
        |e| matches!(e, Event::PeerJoined { node_id: 2, name, .. } if name == "two"),
    );
    wait_peers(&watcher, 1);
    assert_eq!(watcher.peers()[0].name, "two");
    joiner.shutdown();
    wait_events(&mut events, 1, WAIT, "leave", |e| matches!(e, Event::PeerLeft { node_id: 2, .. }));
    wait_peers(&watcher, 0);

    // A driven node that stops running its engine falls silent and expires.
    let mut silent = fast(builder(backend, group)).node_id(0x3).build_driven().unwrap();
    let deadline = Instant::now() + WAIT;
    while watcher.peers().is_empty() {
        assert!(Instant::now() < deadline, "driven node never announced itself");
        silent.duty_cycle(Some(Duration::from_millis(5))).unwrap();
    }
    wait_events(&mut events, 1, WAIT, "expiry", |e| matches!(e, Event::PeerExpired { node_id: 3, .. }));
    wait_peers(&watcher, 0);
    drop(silent);

    // A node that crashes (falls silent without saying goodbye: a driven node no longer driven) and comes
    // back with the same id before it expires is a restart: a new incarnation with a new session.
    // A watcher with a long member timeout, so the crashed incarnation cannot expire first on a slow machine.
    let patient = |b: blip::NodeBuilder| b.membership(Duration::from_millis(50), Duration::from_secs(20));
    let mut watcher = patient(builder(backend, group)).node_id(0x5).build().unwrap();
    let mut events = watcher.subscriber().unwrap();
    let mut first = fast(builder(backend, group)).node_id(0x4).build_driven().unwrap();
    let first_session = first.info().session;
    let deadline = Instant::now() + WAIT;
    while !watcher.peers().iter().any(|p| p.node_id == 4) {
        assert!(Instant::now() < deadline, "first incarnation never announced itself");
        first.duty_cycle(Some(Duration::from_millis(5))).unwrap();
    }
    let second = fast(builder(backend, group)).node_id(0x4).build().unwrap();
    let second_session = second.info().session;
    assert_ne!(first_session, second_session);
    wait_events(&mut events, 1, WAIT, "restart", |e| {
        matches!(e, Event::PeerRestarted { node_id: 4, old_session, new_session }
            if *old_session == first_session && *new_session == second_session)
    });
    poll_until(&mut events, "the new incarnation listed", || {
        watcher.peers().iter().any(|p| p.node_id == 4 && p.session == second_session)
    });
    drop(first); // its goodbye names the old session: the new incarnation stays listed
    std::thread::sleep(Duration::from_millis(100));
    assert!(watcher.peers().iter().any(|p| p.node_id == 4 && p.session == second_session), "{:?}", watcher.peers());
}

macro_rules! suite {
    ($name:ident, $choice:expr, $available:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn topics_filtered_in_engine() {
                if $available {
                    topics_are_filtered_in_the_engine($choice)
                }
            }
            #[test]
            fn directed_and_private() {
                if $available {
                    directed_messages_and_private_topics($choice)
                }
            }
            #[test]
            fn request_reply_scatter_gather() {
                if $available {
                    request_reply_and_scatter_gather($choice)
                }
            }
            #[test]
            fn membership() {
                if $available {
                    membership_join_leave_expire_restart($choice)
                }
            }
        }
    };
}

suite!(poll, BackendChoice::Poll, true);
suite!(uring, BackendChoice::Uring, uring_or_skip());

/// An in-process node: two publishers in two threads, filtered and catch-all subscribers, no sockets.
#[test]
fn in_process_bus() {
    let mut bus = Node::builder().local_only().build().unwrap();
    assert_eq!(bus.info().backend, blip::BackendKind::Local);
    let mut all = bus.subscriber().unwrap();
    let mut a_only = bus.subscribe("a.>").unwrap();
    const N: u64 = 20_000;
    let threads: Vec<_> = ["a.x", "b.y"]
        .into_iter()
        .map(|t| {
            let mut p = bus.publisher().unwrap();
            std::thread::spawn(move || {
                for i in 0..N {
                    p.publish(t, &i.to_le_bytes()).unwrap();
                }
            })
        })
        .collect();
    let got = take_messages(&mut all, 2 * N as usize, "bus catch-all");
    for t in ["a.x", "b.y"] {
        let seq: Vec<u64> = got
            .iter()
            .filter(|(topic, _)| topic == t)
            .map(|(_, p)| u64::from_le_bytes(p[..8].try_into().unwrap()))
            .collect();
        assert_eq!(seq, (0..N).collect::<Vec<_>>(), "{t} in publish order");
    }
    assert_eq!(take_messages(&mut a_only, N as usize, "a.>").len(), N as usize);
    for t in threads {
        t.join().unwrap();
    }
    // The engine publishes its counters when it parks and every 50 ms, so they may lag the deliveries.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bus.stats().local_deliveries < 2 * N && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(bus.stats().local_deliveries, 2 * N);
}

/// Tiny subscriber rings kept near full: two subscribers (one filtered) polled a few deliveries at a time
/// while another node publishes messages of every size, some too large for a ring record (side channel)
/// or a datagram (reassembled). Every message must arrive whole and in order; the engine checks ring room
/// in bulk, and a wrong check would panic it.
#[test]
fn small_rings_near_full_deliver_everything_in_order() {
    rings_near_full(4096, |i| 8 + (i as usize * 37) % 3000);
}

/// The same with small messages and rings large enough for runs (whole messages sharing a datagram go to
/// the catch-all as one record): polls that stop in the middle of a run must resume exactly there.
#[test]
fn runs_polled_a_few_messages_at_a_time_deliver_everything_in_order() {
    rings_near_full(64 * 1024, |i| 8 + (i as usize * 13) % 90);
}

fn rings_near_full(ring_bytes: usize, size: fn(u64) -> usize) {
    const N: u64 = 20_000;
    let topic = |i: u64| if i % 3 == 0 { "b.y" } else { "a.x" };
    let group = unique_group();
    let mut rx = builder(BackendChoice::Poll, group).ring_bytes(ring_bytes).build().unwrap();
    let mut all = rx.subscriber().unwrap();
    let mut a_only = rx.subscribe("a.>").unwrap();
    let mut tx = builder(BackendChoice::Poll, group).build().unwrap();
    let mut own = tx.subscriber().unwrap();
    let mut p = tx.publisher().unwrap();
    let mut buf = Vec::new();
    payload(0, size(0), &mut buf);
    p.publish(topic(0), &buf).unwrap();
    wait_events(&mut own, 1, WAIT, "the receiver to report", |e| matches!(e, Event::ReceiverJoined { .. }));
    let sender = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for i in 1..N {
            payload(i, size(i), &mut buf);
            p.publish(topic(i), &buf).unwrap();
        }
    });
    let (mut next_all, mut next_a) = (0u64, 1u64);
    let deadline = Instant::now() + WAIT;
    while next_all < N || next_a < N {
        assert!(Instant::now() < deadline, "timed out: catch-all at {next_all}, a.> at {next_a} of {N}");
        all.poll(7, |r| match r {
            Received::Message(m) => {
                let i = u64::from_le_bytes(m.payload[..8].try_into().unwrap());
                assert_eq!((i, m.topic, m.payload.len()), (next_all, topic(i), size(i)), "catch-all");
                assert!(check_payload(i, m.payload), "catch-all: message {i} damaged");
                next_all += 1;
            }
            Received::Loss { .. } => panic!("catch-all: loss reported"),
            _ => {}
        });
        a_only.poll(5, |r| match r {
            Received::Message(m) => {
                let i = u64::from_le_bytes(m.payload[..8].try_into().unwrap());
                assert_eq!((i, m.topic, m.payload.len()), (next_a, "a.x", size(i)), "a.>");
                assert!(check_payload(i, m.payload), "a.>: message {i} damaged");
                next_a += 1;
                while next_a < N && topic(next_a) != "a.x" {
                    next_a += 1;
                }
            }
            Received::Loss { .. } => panic!("a.>: loss reported"),
            _ => {}
        });
        std::thread::yield_now();
    }
    sender.join().unwrap();
    drop(tx);
}

/// A networked node delivers its own messages to itself only when asked to.
#[test]
fn local_delivery_on_a_networked_node() {
    let group = unique_group();
    let mut plain = builder(BackendChoice::Poll, group).build().unwrap();
    let mut looped = builder(BackendChoice::Poll, group).local_delivery(true).build().unwrap();
    let mut plain_sub = plain.subscribe("t.>").unwrap();
    let mut looped_sub = looped.subscribe("t.>").unwrap();
    let mut p = looped.publisher().unwrap();
    for i in 0..10u8 {
        p.publish("t.x", &[i]).unwrap();
    }
    let own = take_messages(&mut looped_sub, 10, "own messages");
    assert_eq!(own.iter().map(|(_, p)| p[0]).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
    // The other node hears them over the network; the publisher's node delivered them once, not twice.
    assert_eq!(take_messages(&mut plain_sub, 10, "network copy").len(), 10);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(count_messages(&mut looped_sub), 0);
    let mut p2 = plain.publisher().unwrap();
    p2.publish("t.y", b"z").unwrap();
    assert_eq!(take_messages(&mut looped_sub, 1, "other node's message")[0].0, "t.y");
    assert_eq!(count_messages(&mut plain_sub), 0, "no local delivery unless asked");
}

/// A node whose application only publishes never takes its catch-all subscriber, so nobody polls it; once
/// its ring is full the engine gives it up instead of holding every sender of the group back for it.
#[test]
fn a_node_that_never_subscribes_does_not_hold_senders_back() {
    let group = unique_group();
    let mut quiet = builder(BackendChoice::Poll, group).build().unwrap();
    let _only_publishes = quiet.publisher().unwrap();
    let mut listener = builder(BackendChoice::Poll, group).build().unwrap();
    let mut sub = listener.subscribe("bulk.>").unwrap();
    let mut sender = builder(BackendChoice::Poll, group).build().unwrap();
    drop(sender.subscriber());
    let mut publisher = sender.publisher().unwrap();
    // 12 MB, three times what the quiet node's catch-all ring holds.
    const N: usize = 12_000;
    let payload = [7u8; 1000];
    let deadline = Instant::now() + WAIT;
    let (mut sent, mut got) = (0, 0);
    while got < N {
        assert!(Instant::now() < deadline, "senders held back: sent {sent}, received {got} of {N}");
        while sent < N && publisher.try_publish("bulk.x", &payload).is_ok() {
            sent += 1;
        }
        sub.wait(Duration::from_millis(5));
        got += count_messages(&mut sub);
    }
    assert!(quiet.subscriber().is_none(), "the abandoned catch-all is not handed out");
}

/// A subscription made on the builder exists before the node announces itself: a request that arrives
/// before the application takes the subscriber is held for it and answered.
#[test]
fn builder_subscriptions_hold_what_arrives_before_they_are_taken() {
    let group = unique_group();
    assert!(matches!(Node::builder().subscribe("a..b").build(), Err(blip::Error::Topic(_))));
    let mut responder = builder(BackendChoice::Poll, group).node_id(0x21).subscribe("status.query").build().unwrap();
    let mut asker = builder(BackendChoice::Poll, group).node_id(0x22).build().unwrap();
    let mut requester = asker.requester().unwrap();
    wait_peers(&asker, 1);
    let gather = std::thread::spawn(move || requester.scatter("status.query", b"?", Expect::AllPeers, WAIT).unwrap());
    // The request reached the responder's engine and was routed into the preset subscriber's ring.
    let deadline = Instant::now() + WAIT;
    while responder.stats().protocol.messages_delivered == 0 || responder.stats().unmatched > 0 {
        assert!(Instant::now() < deadline, "request never arrived: {:?}", responder.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut sub = responder.subscribe("status.query").unwrap();
    let mut publisher = responder.publisher().unwrap();
    let deadline = Instant::now() + WAIT;
    let mut answered = false;
    while !answered {
        assert!(Instant::now() < deadline, "the held request was never delivered");
        sub.wait(Duration::from_millis(20));
        sub.poll(usize::MAX, |r| {
            if let Received::Message(m) = r {
                publisher.reply(&m, b"here").unwrap();
                answered = true;
            }
        });
    }
    let g = gather.join().unwrap();
    assert!(g.complete && g.missing.is_empty(), "{g:?}");
    assert_eq!(g.replies[0].from, 0x21);
}
