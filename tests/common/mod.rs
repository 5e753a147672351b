//! Helpers shared by the integration tests: unique groups and ports, payloads that check themselves, and
//! bounded waits that fail with a message.
#![allow(dead_code)]

pub mod netlab;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Child;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use blip::proto::Event;
use blip::{BackendChoice, Node, NodeBuilder, Publisher, Received, Subscriber};

/// A group and port no other test in this run uses (tests in one binary run in parallel; binaries and child
/// processes get different process ids).
pub fn unique_group() -> (IpAddr, u16) {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() as u16;
    let port = 20_000 + (pid % 400) * 100 + n % 100;
    (IpAddr::V4(Ipv4Addr::new(239, 255, (pid % 250) as u8, (n % 250) as u8 + 1)), port)
}

/// Whether the io_uring backend can run here; prints why not.
pub fn uring_or_skip() -> bool {
    match blip::engine::uring::probe() {
        Ok(_) => true,
        Err(why) => {
            eprintln!("skipping io_uring variant: {why}");
            false
        }
    }
}

pub fn builder(backend: BackendChoice, group: (IpAddr, u16)) -> NodeBuilder {
    Node::builder().backend(backend).group(group.0).port(group.1)
}

/// Message `i` of `size` bytes (at least 8): the index, then a pattern derived from it.
pub fn payload(i: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&i.to_le_bytes());
    out.extend((8..size).map(|j| (i as usize).wrapping_mul(7).wrapping_add(j) as u8));
}

pub fn check_payload(i: u64, bytes: &[u8]) -> bool {
    bytes.len() >= 8
        && bytes[..8] == i.to_le_bytes()
        && bytes[8..].iter().enumerate().all(|(j, &b)| b == (i as usize).wrapping_mul(7).wrapping_add(j + 8) as u8)
}

/// Polls `sub` until `pred` has been true for `count` events, or fails the test at the deadline.
pub fn wait_events(sub: &mut Subscriber, count: usize, timeout: Duration, what: &str, pred: impl Fn(&Event) -> bool) {
    let deadline = Instant::now() + timeout;
    let mut seen = 0;
    while seen < count {
        assert!(Instant::now() < deadline, "timed out waiting for {what}: saw {seen} of {count}");
        sub.wait(Duration::from_millis(20));
        sub.poll(1024, |r| {
            if let Received::Event(e) = r
                && pred(&e)
            {
                seen += 1;
            }
        });
    }
}

/// Sends message 0, then waits until `receivers` receivers have reported to this sender (so flow control
/// protects them from here on).
pub fn handshake(publisher: &mut Publisher, own: &mut Subscriber, receivers: usize, size: usize) {
    let mut buf = Vec::new();
    payload(0, size, &mut buf);
    publisher.send(&buf).expect("send message 0");
    // Generous: the fault lab starts eleven scenarios of four processes each at once on two cores.
    wait_events(own, receivers, Duration::from_secs(30), "receivers to report", |e| {
        matches!(e, Event::ReceiverJoined { .. })
    });
}

/// Sends messages `1..count` (after `handshake` sent 0).
pub fn send_rest(publisher: &mut Publisher, count: u64, size: usize) {
    let mut buf = Vec::new();
    for i in 1..count {
        payload(i, size, &mut buf);
        publisher.send(&buf).expect("send");
    }
}

/// What a subscriber got from one sender session.
#[derive(Debug, Default)]
pub struct Tally {
    pub delivered: u64,
    pub out_of_order: u64,
    pub corrupt: u64,
    pub losses: u64,
}

/// Receives until every one of `senders` sessions delivered `count` messages (sequence = index), checking
/// order and contents, or fails at the deadline. Sessions are learned from the first message of each.
pub fn collect(sub: &mut Subscriber, senders: usize, count: u64, timeout: Duration) -> Vec<(u64, Tally)> {
    let deadline = Instant::now() + timeout;
    let mut tallies: Vec<(u64, Tally)> = Vec::new();
    let done = |t: &Vec<(u64, Tally)>| t.len() == senders && t.iter().all(|(_, t)| t.delivered + t.losses >= count);
    while !done(&tallies) {
        assert!(
            Instant::now() < deadline,
            "timed out: {:?}",
            tallies.iter().map(|(s, t)| (format!("{s:x}"), t.delivered)).collect::<Vec<_>>()
        );
        sub.wait(Duration::from_millis(20));
        sub.poll(4096, |r| match r {
            Received::Message(m) => {
                let i = match tallies.iter().position(|(s, _)| *s == m.session) {
                    Some(i) => i,
                    None => {
                        tallies.push((m.session, Tally::default()));
                        tallies.len() - 1
                    }
                };
                let t = &mut tallies[i].1;
                if m.seq != t.delivered + t.losses {
                    t.out_of_order += 1;
                }
                if !check_payload(m.seq, m.payload) {
                    t.corrupt += 1;
                }
                t.delivered += 1;
            }
            Received::Loss { session, messages, .. } => {
                if let Some(t) = tallies.iter_mut().find(|(s, _)| *s == session) {
                    t.1.losses += messages.map(|m| m.end - m.start).unwrap_or(0);
                }
            }
            _ => {}
        });
    }
    tallies
}

pub fn assert_perfect(tallies: &[(u64, Tally)], count: u64) {
    for (s, t) in tallies {
        assert_eq!(
            (t.delivered, t.out_of_order, t.corrupt, t.losses),
            (count, 0, 0, 0),
            "session {s:x}: delivered, out of order, corrupt, lost"
        );
    }
}

/// Waits for a child process this test started; returns its stdout, fails the test if it failed, and kills
/// it (by its own handle, nothing else) at the deadline.
pub fn wait_child(mut child: Child, deadline: Instant, what: &str) -> String {
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut out = String::new();
            if let Some(stdout) = child.stdout.as_mut() {
                std::io::Read::read_to_string(stdout, &mut out).expect("read child output");
            }
            assert!(status.success(), "{what} failed ({status}): {out}");
            return out;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish in time");
        }
        std::thread::park_timeout(Duration::from_millis(20));
    }
}
