//! Fault lab: hosts are network namespaces on one bridge, and faults are real kernel faults. Root only
//! (skipped with a message otherwise); `.ci/run` runs it as root and installs iproute2 and iptables.
//!
//! Scenarios:
//! - 1 sender → 3 receivers on 3 hosts, with iptables dropping 1 %, 5 % and 20 % of everything in and out
//!   of every receiver: every message arrives, in order, once;
//! - a 2-second total blackout of one receiver mid-stream, longer than the window, under the
//!   drop-the-slow-receiver policy: the sender drops it and goes on, the other receivers are unaffected,
//!   and the cut-off receiver gets an exact loss event (every message delivered or reported lost, never
//!   both, nothing out of order);
//! - a receiver frozen with SIGSTOP for 5 s under each slow-receiver policy: under HoldBack the sender waits
//!   and nobody loses anything; under DropAfter the sender drops it, the others are unaffected, and the
//!   frozen one gets an exact loss event once it resumes.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use blip::BackendChoice;
use blip::Received;
use blip::net::Interface;
use blip::proto::{Event, LateJoin, SlowReceiverPolicy};
use common::netlab::{Star, skip_reason};
use common::*;

const N: u64 = 20_000;
const RECEIVERS: usize = 3;

fn done_file(port: u16, i: usize) -> String {
    format!("/tmp/blip-faultlab-{port}-{i}")
}

/// Entry point inside a namespace; does nothing in a normal run.
#[test]
fn faultlab_child() {
    let Ok(spec) = std::env::var("BLIP_FAULTLAB") else { return };
    let f: Vec<&str> = spec.split(',').collect();
    let (role, group, port, index) =
        (f[0], f[1].parse().unwrap(), f[2].parse().unwrap(), f[3].parse::<usize>().unwrap());
    let paced = role.ends_with("paced");
    let hold = f.get(4) == Some(&"hold");
    let late_next = f.get(4) == Some(&"next");
    let mut b = builder(BackendChoice::Auto, (group, port)).interface(Interface::Name("eth0".into())).ttl(1);
    if late_next {
        b = b.late_join(LateJoin::Next);
    }
    if role.starts_with("pub-restart") {
        // Both incarnations of the sender are the same node.
        b = b.node_id(4242);
    }
    if paced && !role.contains("late") {
        // A window far shorter than the outage; the policy for a receiver that stops: wait for it, or stop
        // waiting after 300 ms.
        let policy =
            if hold { SlowReceiverPolicy::HoldBack } else { SlowReceiverPolicy::DropAfter(Duration::from_millis(300)) };
        b = b.window(256).slow_receiver(policy);
    }
    let mut node = b.build().expect("node in namespace");
    if role == "sub-restart" {
        let mut sub = node.subscriber().unwrap();
        let (old, lost, restarts) = follow_restart(&mut sub);
        std::fs::write(done_file(port, index), b"done").unwrap();
        println!("SUB OK old {old} lost {lost} new {N} restarts {restarts}");
        return;
    }
    if role.starts_with("pub") {
        let mut p = node.publisher().unwrap();
        let mut own = node.subscriber().unwrap();
        // The late receiver is not there yet.
        let present = if role.contains("late") { RECEIVERS - 1 } else { RECEIVERS };
        handshake(&mut p, &mut own, present, 100);
        std::fs::write(done_file(port, 0), b"started").unwrap();
        if paced {
            // About 10,000 messages a second for 4 s, so the outage falls mid-stream.
            let mut buf = Vec::new();
            for i in 1..N * 2 {
                payload(i, 100, &mut buf);
                p.send(&buf).unwrap();
                if i % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        } else {
            send_rest(&mut p, N, 100);
        }
        // Keep repairing until every receiver has everything (bounded).
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut dropped = 0;
        while (1..=RECEIVERS).any(|i| std::fs::metadata(done_file(port, i)).is_err()) {
            assert!(Instant::now() < deadline, "receivers did not finish");
            own.wait(Duration::from_millis(20));
            own.poll(1024, |r| {
                if let Received::Event(Event::SlowReceiverDropped { .. }) = r {
                    dropped += 1;
                }
            });
        }
        let s = node.stats().protocol;
        println!(
            "PUB OK datagrams {} retransmits {} naks_received {} dropped_receivers {dropped}",
            s.datagrams_sent, s.retransmits, s.naks_received
        );
    } else {
        let mut sub = node.subscriber().unwrap();
        let n = if paced { N * 2 } else { N };
        if role == "sub-reborn-paced" {
            // A new incarnation of a killed receiver: it starts at the oldest datagram the sender still
            // retains and must have no gap after its first message (a loss can only come before it).
            let (first, got) = collect_from_first(&mut sub, n, true);
            assert_eq!(first + got, n, "nothing missing after its first message");
            std::fs::write(done_file(port, index), b"done").unwrap();
            println!("SUB OK {got} first {first}");
            return;
        }
        if role == "sub-late-paced" && late_next {
            // Starts with the first datagram it hears: some message m > 0, then everything after it.
            let (first, got) = collect_from_first(&mut sub, n, false);
            assert!(first > 0, "a late joiner under LateJoin::Next must start mid-stream");
            assert_eq!(first + got, n, "nothing missing after its first message");
            std::fs::write(done_file(port, index), b"done").unwrap();
            println!("SUB OK {got} first {first}");
            return;
        }
        let t = collect(&mut sub, 1, n, Duration::from_secs(120));
        if role == "sub-cut-paced" && !hold {
            let t = &t[0].1;
            assert_eq!((t.out_of_order, t.corrupt), (0, 0), "{t:?}");
            assert_eq!(t.delivered + t.losses, n, "every message delivered or reported lost: {t:?}");
            std::fs::write(done_file(port, index), b"done").unwrap();
            println!("SUB OK {} lost {}", t.delivered, t.losses);
            return;
        }
        assert_perfect(&t, n);
        std::fs::write(done_file(port, index), b"done").unwrap();
        let s = node.stats().protocol;
        println!(
            "SUB OK {} naks_sent {} repairs {} duplicates {}",
            t[0].1.delivered, s.naks_sent, s.repairs_received, s.duplicates
        );
    }
}

/// Receives from a sender that is killed and restarted: the first session's messages must be consecutive
/// from 0 (any tail reported lost) until `SenderGone` ends it; the second session (the restarted node, with
/// `PeerRestarted` seen) must deliver all `N` from 0. Returns (old delivered, old lost, restarts seen).
fn follow_restart(sub: &mut blip::Subscriber) -> (u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut sessions: Vec<(u64, u64)> = Vec::new(); // (session, next expected)
    let (mut lost, mut old_gone, mut restarts) = (0u64, false, 0u64);
    while !(old_gone && sessions.len() == 2 && sessions[1].1 == N) {
        assert!(Instant::now() < deadline, "restart not followed: {sessions:?} gone {old_gone}");
        sub.wait(Duration::from_millis(20));
        sub.poll(4096, |r| match r {
            Received::Message(m) => {
                let i = sessions.iter().position(|s| s.0 == m.session).unwrap_or_else(|| {
                    sessions.push((m.session, 0));
                    sessions.len() - 1
                });
                assert!(i < 2, "a third session");
                assert_eq!(m.seq, sessions[i].1, "session {i}: gap or disorder");
                assert!(check_payload(m.seq, m.payload));
                sessions[i].1 += 1;
            }
            Received::Loss { session, messages, datagrams } => {
                let s = sessions.iter_mut().find(|s| s.0 == session).expect("loss for an unknown session");
                match messages {
                    Some(m) => {
                        assert_eq!(m.start, s.1, "loss must start where delivery stopped");
                        lost += m.end - m.start;
                        s.1 = m.end;
                    }
                    // The tail of a sender that died before any heartbeat told its last message number:
                    // the datagrams are exact, the message count is not known.
                    None => assert!(!datagrams.is_empty(), "an empty loss"),
                }
            }
            Received::Event(Event::SenderGone { session }) => {
                assert_eq!(Some(session), sessions.first().map(|s| s.0), "only the old session may go");
                old_gone = true;
            }
            Received::Event(Event::PeerRestarted { node_id: 4242, .. }) => restarts += 1,
            _ => {}
        });
    }
    (sessions[0].1 - lost, lost, restarts)
}

/// Receives one sender's messages until `n - 1`, checking they are consecutive from the first one heard;
/// returns (first message, messages received).
/// With `initial_loss`, a loss reported before the first message (its history moved out of the window while
/// it was being repaired) is allowed.
fn collect_from_first(sub: &mut blip::Subscriber, n: u64, initial_loss: bool) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut first, mut next) = (None, 0u64);
    while first.is_none() || next < n {
        assert!(Instant::now() < deadline, "late joiner stalled at {next}");
        sub.wait(Duration::from_millis(20));
        sub.poll(4096, |r| match r {
            Received::Message(m) => {
                let f = *first.get_or_insert(m.seq);
                assert!(m.seq == next || (m.seq == f && next == 0), "gap: {} after {next}", m.seq);
                assert!(check_payload(m.seq, m.payload));
                next = m.seq + 1;
            }
            Received::Loss { messages, .. } => {
                assert!(initial_loss && first.is_none(), "a loss after the first message: {messages:?}");
                if let Some(m) = messages {
                    next = m.end;
                }
            }
            _ => {}
        });
    }
    (first.unwrap(), n - first.unwrap())
}

/// Receiver 3 starts a second into a paced stream, under LateJoin `policy` ("oldest" or "next").
fn late_join(tag: u32, policy: &str) {
    let Some((star, group, port)) = lab(tag) else { return };
    let spec = |role: &str, i: usize| ("BLIP_FAULTLAB", format!("{role},{group},{port},{i},{policy}"));
    let mut subs: Vec<Child> = (1..RECEIVERS).map(|i| star.spawn(i, "faultlab_child", spec("sub-paced", i))).collect();
    let publ = star.spawn(0, "faultlab_child", spec("pub-late-paced", 0));
    wait_started(port);
    // The join's timing, not synchronisation.
    std::thread::sleep(Duration::from_secs(1));
    subs.push(star.spawn(RECEIVERS, "faultlab_child", spec("sub-late-paced", RECEIVERS)));
    let deadline = Instant::now() + Duration::from_secs(150);
    for (i, c) in subs.into_iter().enumerate() {
        let out = wait_child(c, deadline, &format!("receiver {}", i + 1));
        println!("late join {policy}, receiver {}: {}", i + 1, summary(&out, "SUB OK"));
    }
    wait_child(publ, deadline, "sender");
}

/// The sender is killed (SIGKILL) a second into a paced stream and restarted as a new incarnation of the
/// same node, which sends a fresh stream.
#[test]
fn sender_killed_and_restarted() {
    let Some((star, group, port)) = lab(29) else { return };
    let spec = |role: &str, i: usize| ("BLIP_FAULTLAB", format!("{role},{group},{port},{i},oldest"));
    let subs: Vec<Child> = (1..=RECEIVERS).map(|i| star.spawn(i, "faultlab_child", spec("sub-restart", i))).collect();
    let mut first = star.spawn(0, "faultlab_child", spec("pub-restart-paced", 0));
    wait_started(port);
    std::thread::sleep(Duration::from_secs(1)); // the kill's timing
    // Our own child, by its handle.
    first.kill().expect("kill the first sender");
    let _ = first.wait();
    let _ = std::fs::remove_file(done_file(port, 0));
    let second = star.spawn(0, "faultlab_child", spec("pub-restart", 0));
    let deadline = Instant::now() + Duration::from_secs(150);
    for (i, c) in subs.into_iter().enumerate() {
        let out = wait_child(c, deadline, &format!("receiver {}", i + 1));
        let line = summary(&out, "SUB OK");
        println!("restart, receiver {}: {line}", i + 1);
        // Exactly one: the node came back once (a second report would mean announcements flap).
        assert_eq!(number_after(line, "restarts "), 1, "PeerRestarted: {line}");
        assert!(number_after(line, "old ") > 0, "the first incarnation delivered nothing: {line}");
    }
    wait_child(second, deadline, "restarted sender");
}

/// Receiver 1 is killed (SIGKILL) a second into a paced stream and started again as a new incarnation.
#[test]
fn receiver_killed_and_restarted() {
    let Some((star, group, port)) = lab(30) else { return };
    let spec = |role: &str, i: usize| ("BLIP_FAULTLAB", format!("{role},{group},{port},{i},drop"));
    let mut victim = star.spawn(1, "faultlab_child", spec("sub-victim-paced", 1));
    let others: Vec<Child> = (2..=RECEIVERS).map(|i| star.spawn(i, "faultlab_child", spec("sub-paced", i))).collect();
    let publ = star.spawn(0, "faultlab_child", spec("pub-paced", 0));
    wait_started(port);
    std::thread::sleep(Duration::from_secs(1)); // the kill's timing
    // Our own child, by its handle.
    victim.kill().expect("kill receiver 1");
    let _ = victim.wait();
    let reborn = star.spawn(1, "faultlab_child", spec("sub-reborn-paced", 1));
    let deadline = Instant::now() + Duration::from_secs(150);
    let out = wait_child(reborn, deadline, "restarted receiver");
    println!("receiver restart, receiver 1: {}", summary(&out, "SUB OK"));
    for (i, c) in others.into_iter().enumerate() {
        let out = wait_child(c, deadline, &format!("receiver {}", i + 2));
        println!("receiver restart, receiver {}: {}", i + 2, summary(&out, "SUB OK"));
    }
    let out = wait_child(publ, deadline, "sender");
    let line = summary(&out, "PUB OK");
    println!("receiver restart, sender: {line}");
    assert!(number_after(line, "dropped_receivers ") >= 1, "the dead receiver should have been dropped: {line}");
}

#[test]
fn late_joiner_under_oldest_gets_everything_retained() {
    late_join(27, "oldest");
}

#[test]
fn late_joiner_under_next_starts_mid_stream_without_gaps() {
    late_join(28, "next");
}

/// The child's result line (the test harness may print on the same line before it).
fn summary<'a>(out: &'a str, mark: &str) -> &'a str {
    out.find(mark).map(|i| out[i..].lines().next().unwrap_or("")).unwrap_or(out)
}

/// A fresh lab of a sender and `RECEIVERS` receivers for scenario `tag`, with its group, port and no
/// leftover markers; `None` (with the reason printed) inside a child or where the lab cannot run.
fn lab(tag: u32) -> Option<(Star, String, u16)> {
    if std::env::var("BLIP_FAULTLAB").is_ok() {
        return None;
    }
    if let Some(why) = skip_reason(true) {
        eprintln!("skipping fault lab: {why} (CI runs it as root)");
        return None;
    }
    let star = Star::new(tag, RECEIVERS + 1);
    let (group, port) = (format!("239.255.201.{tag}"), unique_group().1);
    for i in 0..=RECEIVERS {
        let _ = std::fs::remove_file(done_file(port, i));
    }
    Some((star, group, port))
}

/// Waits until the sender has started its stream (its marker file), bounded.
fn wait_started(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(done_file(port, 0)).is_err() {
        assert!(Instant::now() < deadline, "the sender never started");
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

fn scenario(tag: u32, drop: f64) {
    let Some((star, group, port)) = lab(tag) else { return };
    for i in 1..=RECEIVERS {
        star.drop_fraction(i, drop);
    }
    let spec = |role: &str, i: usize| ("BLIP_FAULTLAB", format!("{role},{group},{port},{i}"));
    let subs: Vec<Child> = (1..=RECEIVERS).map(|i| star.spawn(i, "faultlab_child", spec("sub", i))).collect();
    let publ = star.spawn(0, "faultlab_child", spec("pub", 0));
    let deadline = Instant::now() + Duration::from_secs(150);
    for (i, c) in subs.into_iter().enumerate() {
        let out = wait_child(c, deadline, &format!("receiver {}", i + 1));
        assert!(out.contains(&format!("SUB OK {N}")), "{out}");
        println!("{:.0} % drop, receiver {}: {}", drop * 100.0, i + 1, summary(&out, "SUB OK"));
    }
    let out = wait_child(publ, deadline, "sender");
    println!("{:.0} % drop, sender: {}", drop * 100.0, summary(&out, "PUB OK"));
    for i in 1..=RECEIVERS {
        let _ = std::fs::remove_file(done_file(port, i));
    }
}

/// A fault applied to receiver 1 a second into a paced stream.
enum Fault {
    /// Cut off entirely (an iptables DROP rule in and out) for 2 s.
    Blackout,
    /// Frozen with SIGSTOP for 5 s, then resumed with SIGCONT.
    Freeze,
}

/// Receiver 1 suffers `fault`; the others must be unaffected (under DropAfter) or merely delayed (under
/// HoldBack, where the frozen receiver must also lose nothing).
fn fault_on_one_receiver(tag: u32, fault: Fault, hold: bool) {
    let Some((star, group, port)) = lab(tag) else { return };
    let policy = if hold { "hold" } else { "drop" };
    let spec = |role: &str, i: usize| ("BLIP_FAULTLAB", format!("{role},{group},{port},{i},{policy}"));
    let mut subs = vec![star.spawn(1, "faultlab_child", spec("sub-cut-paced", 1))];
    subs.extend((2..=RECEIVERS).map(|i| star.spawn(i, "faultlab_child", spec("sub-paced", i))));
    let publ = star.spawn(0, "faultlab_child", spec("pub-paced", 0));
    // Wait for the stream to start, then cut receiver 1 off: the sleeps are the fault's timing, not
    // synchronisation (everything after is checked by the children's own bounded waits).
    wait_started(port);
    std::thread::sleep(Duration::from_secs(1));
    match fault {
        Fault::Blackout => {
            star.blackout(1, true);
            std::thread::sleep(Duration::from_secs(2));
            star.blackout(1, false);
        }
        Fault::Freeze => {
            // Our own child, by its pid (`ip netns exec` execs the test binary in place).
            use nix::sys::signal::{Signal, kill};
            let pid = nix::unistd::Pid::from_raw(subs[0].id() as i32);
            kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
            std::thread::sleep(Duration::from_secs(5));
            kill(pid, Signal::SIGCONT).expect("SIGCONT");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut lost = 0;
    for (i, c) in subs.into_iter().enumerate() {
        let out = wait_child(c, deadline, &format!("receiver {}", i + 1));
        let line = summary(&out, "SUB OK");
        println!("{tag} {policy}, receiver {}: {line}", i + 1);
        lost += number_after(line, "lost ");
    }
    let out = wait_child(publ, deadline, "sender");
    let line = summary(&out, "PUB OK");
    println!("{tag} {policy}, sender: {line}");
    let dropped = number_after(line, "dropped_receivers ");
    match (fault, hold) {
        // The outage outlasts the window: the sender stops waiting, and the cut-off receiver loses data.
        (Fault::Blackout, _) => assert!(dropped >= 1 && lost > 0, "dropped {dropped}, lost {lost}"),
        // Frozen, its socket still queued what the kernel could hold: it may lose nothing, but the sender
        // must have stopped waiting for it.
        (Fault::Freeze, false) => assert!(dropped >= 1, "the sender never dropped the frozen receiver"),
        (Fault::Freeze, true) => assert_eq!((dropped, lost), (0, 0), "HoldBack must wait and lose nothing"),
    }
}

fn number_after(line: &str, key: &str) -> u64 {
    line.find(key)
        .and_then(|i| line[i + key.len()..].split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn two_second_blackout_of_one_receiver() {
    fault_on_one_receiver(24, Fault::Blackout, false);
}

#[test]
fn receiver_frozen_5s_under_hold_back() {
    fault_on_one_receiver(25, Fault::Freeze, true);
}

#[test]
fn receiver_frozen_5s_under_drop_after() {
    fault_on_one_receiver(26, Fault::Freeze, false);
}

#[test]
fn three_receivers_at_1_percent_kernel_drop() {
    scenario(21, 0.01);
}

#[test]
fn three_receivers_at_5_percent_kernel_drop() {
    scenario(22, 0.05);
}

#[test]
fn three_receivers_at_20_percent_kernel_drop() {
    scenario(23, 0.20);
}
