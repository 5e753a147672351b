//! One publisher and three subscribers in separate processes, per backend. The subscribers are this test
//! binary started again with `BLIP_CHILD` set, so no helper program is needed.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blip::BackendChoice;
use common::*;

const N: u64 = 20_000;

/// Entry point of a child process; does nothing in a normal test run.
#[test]
fn child_subscriber() {
    let Ok(spec) = std::env::var("BLIP_CHILD") else { return };
    let mut parts = spec.split(',');
    let ip = parts.next().unwrap().parse().unwrap();
    let port = parts.next().unwrap().parse().unwrap();
    let backend = match parts.next().unwrap() {
        "uring" => BackendChoice::Uring,
        _ => BackendChoice::Poll,
    };
    let mut node = builder(backend, (ip, port)).build().expect("child node");
    let mut sub = node.subscriber().unwrap();
    println!("CHILD READY");
    let tallies = collect(&mut sub, 1, N, Duration::from_secs(60));
    assert_perfect(&tallies, N);
    println!("CHILD OK {}", tallies[0].1.delivered);
}

fn spawn_child(group: (std::net::IpAddr, u16), backend: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_subscriber", "--exact", "--nocapture", "--test-threads=1"])
        .env("BLIP_CHILD", format!("{},{},{}", group.0, group.1, backend))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

fn three_processes(backend: BackendChoice, name: &str) {
    let group = unique_group();
    let children: Vec<Child> = (0..3).map(|_| spawn_child(group, name)).collect();
    let mut node = builder(backend, group).build().expect("publisher node");
    let mut publisher = node.publisher().unwrap();
    let mut own = node.subscriber().unwrap();
    handshake(&mut publisher, &mut own, 3, 100);
    send_rest(&mut publisher, N, 100);
    let deadline = Instant::now() + Duration::from_secs(90);
    for c in children {
        let out = wait_child(c, deadline, "child subscriber");
        assert!(out.contains(&format!("CHILD OK {N}")), "child output: {out}");
    }
}

#[test]
fn poll_one_publisher_three_subscriber_processes() {
    if std::env::var("BLIP_CHILD").is_err() {
        three_processes(BackendChoice::Poll, "poll");
    }
}

#[test]
fn uring_one_publisher_three_subscriber_processes() {
    if std::env::var("BLIP_CHILD").is_err() && uring_or_skip() {
        three_processes(BackendChoice::Uring, "uring");
    }
}
