//! Socket setup on loopback: groups in 239.255.0.0/16, TTL 0.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use super::*;

fn cfg(group_last: u8) -> SocketConfig {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let port = 30_000 + (std::process::id() as u16 % 300) * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100;
    SocketConfig {
        group: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(239, 255, 91, group_last)), port),
        ..Default::default()
    }
}

fn recv_within(s: &UdpSocket, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => return Some((buf[..n].to_vec(), from)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) => panic!("recv: {e}"),
        }
    }
    None
}

#[test]
fn two_members_on_one_host_both_receive_and_can_reply_by_unicast() {
    let c = cfg(1);
    let a = open(&c).unwrap();
    let b = open(&c).unwrap();
    assert_eq!(a.report.local.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    a.unicast.send_to(b"to the group", c.group).unwrap();
    for s in [&a.group, &b.group] {
        let (bytes, from) = recv_within(s, Duration::from_secs(5)).expect("group datagram");
        assert_eq!(bytes, b"to the group");
        assert_eq!(from, a.report.local);
    }
    b.unicast.send_to(b"reply", a.report.local).unwrap();
    let (bytes, from) = recv_within(&a.unicast, Duration::from_secs(5)).expect("unicast reply");
    assert_eq!((bytes.as_slice(), from), (&b"reply"[..], b.report.local));
}

#[test]
fn another_group_on_the_same_port_is_not_received() {
    let c = cfg(2);
    let mut other = c.clone();
    other.group.set_ip(IpAddr::V4(Ipv4Addr::new(239, 255, 91, 3)));
    let a = open(&c).unwrap();
    let b = open(&other).unwrap();
    a.unicast.send_to(b"only for group 2", c.group).unwrap();
    assert!(recv_within(&a.group, Duration::from_secs(5)).is_some());
    // The datagram reached this host's stack; b would have it by now if it were going to.
    assert!(recv_within(&b.group, Duration::from_millis(200)).is_none(), "b received another group's traffic");
}

#[test]
fn clear_errors_for_bad_configuration() {
    let mut c = cfg(4);
    c.group = "10.1.2.3:4000".parse().unwrap();
    assert!(matches!(open(&c), Err(NetError::NotMulticast(_))));
    let mut c = cfg(4);
    c.interface = Interface::Name("nonexistent0".into());
    let e = open(&c).unwrap_err();
    assert!(matches!(e, NetError::UnknownInterface(ref n) if n == "nonexistent0"), "{e}");
    assert!(e.to_string().contains("ip addr"));
    let mut c = cfg(4);
    c.interface = Interface::Addr("::1".parse().unwrap());
    assert!(matches!(open(&c), Err(NetError::FamilyMismatch { .. })));
    // A port held by a socket that does not share it.
    let c = cfg(4);
    let _holder = UdpSocket::bind(("0.0.0.0", c.group.port())).unwrap();
    let e = open(&c).unwrap_err();
    assert!(matches!(e, NetError::AddrInUse { port } if port == c.group.port()), "{e}");
}

#[test]
fn clamped_buffer_is_reported_with_the_sysctl_to_change() {
    let mut c = cfg(5);
    c.recv_buffer = 1 << 30;
    let s = open(&c).unwrap();
    assert!(s.report.recv_buffer < 1 << 30);
    assert!(s.report.warnings.iter().any(|w| w.contains("net.core.rmem_max")), "{:?}", s.report.warnings);
}

#[test]
fn ipv6_sockets_open_on_loopback() {
    // Loopback carries no IPv6 multicast on this kernel, but the sockets must still be set up (namespaces
    // joined by veth carry it; see tests/netns.rs).
    let mut c = cfg(6);
    c.group = SocketAddr::new("ff15::b11b:6".parse().unwrap(), c.group.port());
    match open(&c) {
        Ok(s) => assert!(s.report.local.is_ipv6()),
        Err(e) => panic!("IPv6 setup on loopback failed: {e}"),
    }
}
