//! IPv4 and IPv6 multicast between two network namespaces joined by a veth pair, per backend. The test
//! creates the namespaces and deletes them (even on failure). Needs root and iproute2; without them it says
//! why and skips. The publisher and subscriber are this test binary, started inside the namespaces with
//! `ip netns exec` and `BLIP_NETNS_CHILD` set.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blip::BackendChoice;
use blip::net::Interface;
use common::netlab::{ip, skip_reason};
use common::*;

const N: u64 = 20_000;

/// Two namespaces and the veth pair between them; deleted on drop.
struct Lab {
    ns: [String; 2],
    veth: [String; 2],
}

impl Lab {
    fn new(tag: u32) -> Lab {
        let pid = std::process::id() % 100_000;
        let lab = Lab {
            ns: [format!("blipA{pid}x{tag}"), format!("blipB{pid}x{tag}")],
            veth: [format!("bva{pid}x{tag}"), format!("bvb{pid}x{tag}")],
        };
        for ns in &lab.ns {
            ip(&["netns", "add", ns]);
        }
        ip(&[
            "link",
            "add",
            &lab.veth[0],
            "netns",
            &lab.ns[0],
            "type",
            "veth",
            "peer",
            "name",
            &lab.veth[1],
            "netns",
            &lab.ns[1],
        ]);
        for (i, (ns, dev)) in lab.ns.iter().zip(&lab.veth).enumerate() {
            let v4 = format!("10.199.{tag}.{}/24", i + 1);
            let v6 = format!("fd42:0:{tag}::{}/64", i + 1);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "addr", "add", &v4, "dev", dev]);
            ip(&["-n", ns, "-6", "addr", "add", &v6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up", "multicast", "on"]);
        }
        lab
    }

    fn spawn(&self, side: usize, role: &str, group: &str, port: u16, backend: &str) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.ns[side]])
            .arg(std::env::current_exe().unwrap())
            .args(["netns_child", "--exact", "--nocapture", "--test-threads=1"])
            .env("BLIP_NETNS_CHILD", format!("{role},{group},{port},{},{backend}", self.veth[side]))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child in namespace")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Entry point inside a namespace; does nothing in a normal run.
#[test]
fn netns_child() {
    let Ok(spec) = std::env::var("BLIP_NETNS_CHILD") else { return };
    let f: Vec<&str> = spec.split(',').collect();
    let (role, group, port, dev) = (f[0], f[1].parse().unwrap(), f[2].parse().unwrap(), f[3]);
    let backend = if f[4] == "uring" { BackendChoice::Uring } else { BackendChoice::Poll };
    // TTL 1: the packets cross the veth pair and go no further (the namespaces have no other link).
    let mut node = builder(backend, (group, port))
        .interface(Interface::Name(dev.to_owned()))
        .ttl(1)
        .build()
        .expect("node in namespace");
    if role == "pub" {
        let mut p = node.publisher().unwrap();
        let mut own = node.subscriber().unwrap();
        handshake(&mut p, &mut own, 1, 100);
        send_rest(&mut p, N, 100);
        // Stay (repairing) until the subscriber has everything, bounded.
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::metadata(format!("/tmp/blip-netns-done-{port}")).is_err() {
            assert!(Instant::now() < deadline, "subscriber never finished");
            own.wait(Duration::from_millis(50));
            own.poll(1024, |_| {});
        }
        println!("PUB OK");
    } else {
        let mut sub = node.subscriber().unwrap();
        let t = collect(&mut sub, 1, N, Duration::from_secs(60));
        assert_perfect(&t, N);
        let _ = std::fs::write(format!("/tmp/blip-netns-done-{port}"), b"done");
        println!("SUB OK {}", t[0].1.delivered);
    }
}

fn across_veth(tag: u32, group: &str, backend: &str) {
    if std::env::var("BLIP_NETNS_CHILD").is_ok() {
        return;
    }
    if let Some(why) = skip_reason(false) {
        eprintln!("skipping namespace test: {why} (CI runs it as root)");
        return;
    }
    if backend == "uring" && !uring_or_skip() {
        return;
    }
    let lab = Lab::new(tag);
    let port = unique_group().1;
    let _ = std::fs::remove_file(format!("/tmp/blip-netns-done-{port}"));
    let sub = lab.spawn(1, "sub", group, port, backend);
    let publ = lab.spawn(0, "pub", group, port, backend);
    let deadline = Instant::now() + Duration::from_secs(90);
    let out = wait_child(sub, deadline, "subscriber");
    assert!(out.contains(&format!("SUB OK {N}")), "{out}");
    wait_child(publ, deadline, "publisher");
    let _ = std::fs::remove_file(format!("/tmp/blip-netns-done-{port}"));
}

#[test]
fn poll_ipv4_between_namespaces() {
    across_veth(11, "239.255.199.11", "poll");
}

#[test]
fn poll_ipv6_between_namespaces() {
    across_veth(12, "ff15::b11b:12", "poll");
}

#[test]
fn uring_ipv4_between_namespaces() {
    across_veth(13, "239.255.199.13", "uring");
}

#[test]
fn uring_ipv6_between_namespaces() {
    across_veth(14, "ff15::b11b:14", "uring");
}
