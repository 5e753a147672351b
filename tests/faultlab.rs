//! Fault lab: hosts are network namespaces on one bridge, and faults are real kernel faults. Root only
//! (skipped with a message otherwise); `.ci/run` runs it as root and installs iproute2 and iptables.
//!
//! Scenarios:
//! - 1 sender → 3 receivers on 3 hosts, with iptables dropping 1 %, 5 % and 20 % of everything in and out
//!   of every receiver: every message arrives, in order, once;
//! - a 2-second total blackout of one receiver mid-stream, longer than the window, under the
//!   drop-the-slow-receiver policy: the sender drops it and goes on, the other receivers are unaffected,
//!   and the cut-off receiver gets an exact loss event (every message delivered or reported lost, never
//!   both, nothing out of order).

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use blip::BackendChoice;
use blip::net::Interface;
use blip::proto::SlowReceiverPolicy;
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
    let mut b = builder(BackendChoice::Auto, (group, port)).interface(Interface::Name("eth0".into())).ttl(1);
    if paced {
        // A window far shorter than the outage, and a policy that stops waiting for a dead receiver.
        b = b.window(256).slow_receiver(SlowReceiverPolicy::DropAfter(Duration::from_millis(300)));
    }
    let mut node = b.build().expect("node in namespace");
    if role.starts_with("pub") {
        let mut p = node.publisher().unwrap();
        let mut own = node.subscriber().unwrap();
        handshake(&mut p, &mut own, RECEIVERS, 100);
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
        while (1..=RECEIVERS).any(|i| std::fs::metadata(done_file(port, i)).is_err()) {
            assert!(Instant::now() < deadline, "receivers did not finish");
            own.wait(Duration::from_millis(20));
            own.poll(1024, |_| {});
        }
        let s = node.stats().protocol;
        println!(
            "PUB OK datagrams {} retransmits {} naks_received {}",
            s.datagrams_sent, s.retransmits, s.naks_received
        );
    } else {
        let mut sub = node.subscriber().unwrap();
        let n = if paced { N * 2 } else { N };
        let t = collect(&mut sub, 1, n, Duration::from_secs(120));
        if role == "sub-cut-paced" {
            let t = &t[0].1;
            assert_eq!((t.out_of_order, t.corrupt), (0, 0), "{t:?}");
            assert_eq!(t.delivered + t.losses, n, "every message delivered or reported lost: {t:?}");
            assert!(t.losses > 0, "an outage longer than the window must lose something: {t:?}");
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

/// The child's result line (the test harness may print on the same line before it).
fn summary<'a>(out: &'a str, mark: &str) -> &'a str {
    out.find(mark).map(|i| out[i..].lines().next().unwrap_or("")).unwrap_or(out)
}

fn scenario(tag: u32, drop: f64) {
    if std::env::var("BLIP_FAULTLAB").is_ok() {
        return;
    }
    if let Some(why) = skip_reason(true) {
        eprintln!("skipping fault lab: {why} (CI runs it as root)");
        return;
    }
    let star = Star::new(tag, RECEIVERS + 1);
    for i in 1..=RECEIVERS {
        star.drop_fraction(i, drop);
    }
    let (group, port) = (format!("239.255.201.{tag}"), unique_group().1);
    for i in 1..=RECEIVERS {
        let _ = std::fs::remove_file(done_file(port, i));
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

/// Receiver 1 is cut off entirely (an iptables DROP rule in and out) for 2 s, a second into the stream.
#[test]
fn two_second_blackout_of_one_receiver() {
    if std::env::var("BLIP_FAULTLAB").is_ok() {
        return;
    }
    if let Some(why) = skip_reason(true) {
        eprintln!("skipping fault lab: {why} (CI runs it as root)");
        return;
    }
    let tag = 24;
    let star = Star::new(tag, RECEIVERS + 1);
    let (group, port) = (format!("239.255.201.{tag}"), unique_group().1);
    for i in 0..=RECEIVERS {
        let _ = std::fs::remove_file(done_file(port, i));
    }
    let spec = |role: &str, i: usize| ("BLIP_FAULTLAB", format!("{role},{group},{port},{i}"));
    let mut subs = vec![star.spawn(1, "faultlab_child", spec("sub-cut-paced", 1))];
    subs.extend((2..=RECEIVERS).map(|i| star.spawn(i, "faultlab_child", spec("sub-paced", i))));
    let publ = star.spawn(0, "faultlab_child", spec("pub-paced", 0));
    // Wait for the stream to start, then cut receiver 1 off: the sleeps are the fault's timing, not
    // synchronisation (everything after is checked by the children's own bounded waits).
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(done_file(port, 0)).is_err() {
        assert!(Instant::now() < deadline, "the sender never started");
        std::thread::park_timeout(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(1));
    star.blackout(1, true);
    std::thread::sleep(Duration::from_secs(2));
    star.blackout(1, false);
    let deadline = Instant::now() + Duration::from_secs(150);
    for (i, c) in subs.into_iter().enumerate() {
        let out = wait_child(c, deadline, &format!("receiver {}", i + 1));
        println!("blackout, receiver {}: {}", i + 1, summary(&out, "SUB OK"));
    }
    let out = wait_child(publ, deadline, "sender");
    println!("blackout, sender: {}", summary(&out, "PUB OK"));
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
