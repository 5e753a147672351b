//! Loopback tests of the poll backend's UDP GSO and GRO. They keep every packet on this host: 127.0.0.1,
//! groups in 239.255.203.0/24 joined on 127.0.0.1, IP_MULTICAST_IF 127.0.0.1, TTL 0, each test with its own
//! group and ports. Every wait is bounded and fails the test when it runs out.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;

use crate::engine::test_support::{FULL, GSO_N as N, group_socket, readable, send_plan, unicast_socket};

/// A backend and its unicast socket's address.
fn backend(group: Ipv4Addr, port: u16, opts: PollOptions) -> (PollBackend, SocketAddr) {
    let unicast = unicast_socket();
    let addr = unicast.local_addr().unwrap();
    let b = PollBackend::with_options(group_socket(group, port), unicast, 2048, opts).expect("PollBackend");
    (b, addr)
}

/// Sends the plan from `tx` to `rx` (group and unicast) and checks what arrives.
fn run(tx: &mut PollBackend, tx_addr: SocketAddr, rx: &mut PollBackend, rx_addr: SocketAddr, group: SocketAddr) {
    let took = send_plan(tx, tx_addr, rx, rx_addr, group, false);
    eprintln!(
        "{N} datagrams in {took:?}; tx: gso segments {}, {} GSO sends, {} fallbacks, {} send errors; rx: gro {}, {} GRO batches",
        tx.gso_segments(),
        tx.gso_sends(),
        tx.gso_fallbacks(),
        tx.stats().send_errors,
        rx.gro(),
        rx.gro_batches()
    );
}

#[test]
fn gso_to_gro_arrives_datagram_by_datagram() {
    let group = Ipv4Addr::new(239, 255, 203, 1);
    let (mut rx, rx_addr) = backend(group, 46_301, PollOptions::default());
    let (mut tx, tx_addr) = backend(group, 46_302, PollOptions::default());
    run(&mut tx, tx_addr, &mut rx, rx_addr, SocketAddr::from((group, 46_301)));
    assert_eq!(tx.stats().send_errors, 0);
    if tx.gso_segments() == 0 {
        eprintln!("UDP GSO unavailable here: sent one datagram per send");
        return;
    }
    assert!(tx.gso_sends() > 0, "GSO on but no GSO send");
    assert_eq!(tx.gso_fallbacks(), 0);
    if rx.gro() {
        assert!(rx.gro_batches() > 0, "GRO on but every batch arrived as separate datagrams");
    }
}

/// Datagrams written in the room the backend lends (in place in the GSO batch) arrive like queued ones,
/// including those that cannot join the batch they were written after (other destination, longer).
#[test]
fn lent_send_buffers_arrive_datagram_by_datagram() {
    let group = Ipv4Addr::new(239, 255, 203, 9);
    let (mut rx, rx_addr) = backend(group, 46_331, PollOptions::default());
    let (mut tx, tx_addr) = backend(group, 46_332, PollOptions::default());
    send_plan(&mut tx, tx_addr, &mut rx, rx_addr, SocketAddr::from((group, 46_331)), true);
    assert_eq!(tx.stats().send_errors, 0);
    assert!(tx.gso_segments() == 0 || tx.gso_sends() > 0, "GSO on but no GSO send");
    // Committing without a lent buffer, or more than was lent, is refused.
    let dest = SocketAddr::from((group, 46_331));
    assert_eq!(tx.commit_send(dest, 10).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    let room = tx.send_buffer(100).len();
    assert_eq!(tx.commit_send(dest, room + 1).unwrap_err().kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn gso_to_receiver_without_gro() {
    let group = Ipv4Addr::new(239, 255, 203, 2);
    let (mut rx, rx_addr) = backend(group, 46_303, PollOptions { gso: true, gro: false });
    let (mut tx, tx_addr) = backend(group, 46_304, PollOptions::default());
    assert!(!rx.gro());
    run(&mut tx, tx_addr, &mut rx, rx_addr, SocketAddr::from((group, 46_303)));
    assert_eq!(tx.stats().send_errors, 0);
    assert_eq!(rx.gro_batches(), 0);
    assert!(tx.gso_segments() == 0 || tx.gso_sends() > 0);
}

#[test]
fn gso_off_sends_one_datagram_per_send() {
    let group = Ipv4Addr::new(239, 255, 203, 3);
    let (mut rx, rx_addr) = backend(group, 46_305, PollOptions::default());
    let (mut tx, tx_addr) = backend(group, 46_306, PollOptions { gso: false, gro: true });
    assert_eq!(tx.gso_segments(), 0);
    run(&mut tx, tx_addr, &mut rx, rx_addr, SocketAddr::from((group, 46_305)));
    assert_eq!(tx.stats().send_errors, 0);
    assert_eq!((tx.gso_sends(), tx.gso_fallbacks(), rx.gro_batches()), (0, 0, 0));
}

/// A GSO send past the kernel's segment cap is refused with EINVAL: the backend lowers its cap to 64 and
/// sends that batch again one datagram per send, so nothing is lost.
#[test]
fn refused_gso_send_is_resent_and_the_cap_lowered() {
    let group = Ipv4Addr::new(239, 255, 203, 4);
    let (mut rx, rx_addr) = backend(group, 46_307, PollOptions::default());
    let (mut tx, tx_addr) = backend(group, 46_308, PollOptions::default());
    if tx.gso_segments() == 0 {
        eprintln!("UDP GSO unavailable here: nothing to test");
        return;
    }
    // Pretend the cap is higher than any kernel's (128).
    tx.gso.segments = 200;
    let dest = SocketAddr::from((group, 46_307));
    const K: usize = 150;
    for i in 0..K {
        let mut d = [0u8; 100];
        d[..8].copy_from_slice(&(i as u64).to_le_bytes());
        tx.queue_send(dest, &d).unwrap();
    }
    tx.flush().unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < K {
        assert!(Instant::now() < deadline, "received {} of {K} datagrams within 10 s", got.len());
        rx.receive(Some(Duration::from_millis(100)), &mut |src, bytes| {
            if src == tx_addr {
                assert_eq!(bytes.len(), 100);
                got.push(u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize);
            }
        })
        .unwrap();
    }
    assert_eq!(got, (0..K).collect::<Vec<_>>());
    assert_eq!(tx.stats().send_errors, 0);
    assert_eq!(tx.gso_fallbacks(), 1);
    assert_eq!(tx.gso_segments(), 64);
    // From now on batches stay within 64 segments and go out as GSO sends.
    let before = tx.gso_sends();
    run(&mut tx, tx_addr, &mut rx, rx_addr, dest);
    assert!(tx.gso_sends() > before);
    assert_eq!((tx.stats().send_errors, tx.gso_fallbacks()), (0, 1));
}

/// A lone datagram goes out at `flush`, not when a batch fills.
#[test]
fn flush_sends_a_lone_datagram_at_once() {
    let group = Ipv4Addr::new(239, 255, 203, 5);
    let (mut rx, _) = backend(group, 46_309, PollOptions::default());
    let (mut tx, tx_addr) = backend(group, 46_310, PollOptions::default());
    let dest = SocketAddr::from((group, 46_309));
    for round in 0..3u8 {
        tx.queue_send(dest, &[round; FULL]).unwrap();
        tx.flush().unwrap();
        let mut got = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.is_none() {
            assert!(Instant::now() < deadline, "lone datagram {round} not received within 5 s");
            rx.receive(Some(Duration::from_millis(100)), &mut |src, bytes| {
                if src == tx_addr {
                    got = Some(bytes.to_vec());
                }
            })
            .unwrap();
        }
        assert_eq!(got.unwrap(), vec![round; FULL]);
    }
}

/// When traffic is sparse, a receive hands over a lone datagram after one read: it does not read again to
/// learn that the socket is empty before the datagram goes up (a system call on a ping-pong's round trip).
/// A burst that follows is still read to the end at the next receive.
#[test]
fn sparse_traffic_is_handed_over_after_one_read() {
    let group = Ipv4Addr::new(239, 255, 203, 10);
    let (mut rx, _) = backend(group, 46_333, PollOptions::default());
    let (mut tx, _) = backend(group, 46_334, PollOptions::default());
    let dest = SocketAddr::from((group, 46_333));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = 0;
    // Idle: the socket is found empty.
    assert_eq!(rx.receive(Some(Duration::ZERO), &mut |_, _| got += 1).unwrap(), 0);
    tx.queue_send(dest, &[1; 100]).unwrap();
    tx.flush().unwrap();
    assert!(readable(&rx.group, deadline), "datagram not received within 5 s");
    let reads = rx.reads[KEY_GROUP];
    assert_eq!(rx.receive(Some(Duration::ZERO), &mut |_, _| got += 1).unwrap(), 1);
    assert_eq!(rx.reads[KEY_GROUP] - reads, 1, "a lone datagram after idleness took more than one read");
    if !rx.gro() {
        eprintln!("UDP GRO unavailable here: recvmmsg reads whatever is ready in one call anyway");
    }
    // Idle again, then a burst of separate datagrams (no GSO batch): the first receive takes one, the next
    // one the rest.
    assert_eq!(rx.receive(Some(Duration::ZERO), &mut |_, _| got += 1).unwrap(), 0);
    for i in 0..10u8 {
        tx.queue_send(dest, &[i; 100]).unwrap();
        tx.flush().unwrap();
    }
    let mut taken = Vec::new();
    while taken.iter().sum::<usize>() < 10 {
        assert!(Instant::now() < deadline, "burst not received within 5 s ({taken:?} of 10)");
        if !readable(&rx.group, deadline) {
            continue;
        }
        taken.push(rx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap());
    }
    // Loopback normally delivers within the sender's call, so the rest waits for the second receive ([1, 9]);
    // a kernel that defers its receive work may split it further, but a turn that stayed at one datagram
    // would take ten receives.
    if rx.gro() {
        assert_eq!(taken[0], 1, "the lone first datagram: {taken:?}");
        assert!(taken.len() <= 4, "draining after a lone datagram stopped: {taken:?}");
    }
}

/// The unicast socket carries only STATUS reports: a spinning receive reads it every `UNICAST_EVERY`
/// calls, a receive that may wait reads it every time. Either way a datagram there is delivered.
#[test]
fn unicast_is_read_every_few_spins_and_always_before_waiting() {
    let group = Ipv4Addr::new(239, 255, 203, 11);
    let (mut rx, rx_addr) = backend(group, 46_335, PollOptions::default());
    let (mut tx, _) = backend(group, 46_336, PollOptions::default());
    let deadline = Instant::now() + Duration::from_secs(5);
    let before = rx.reads;
    for _ in 0..UNICAST_EVERY * 3 {
        rx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap();
    }
    assert_eq!(rx.reads[KEY_GROUP] - before[KEY_GROUP], u64::from(UNICAST_EVERY * 3));
    assert_eq!(rx.reads[KEY_UNICAST] - before[KEY_UNICAST], 3, "idle spins read the unicast socket");
    // Spinning: delivered within UNICAST_EVERY receives.
    tx.queue_send(rx_addr, b"status").unwrap();
    tx.flush().unwrap();
    assert!(readable(&rx.unicast, deadline), "unicast datagram not received within 5 s");
    let mut got = 0;
    for _ in 0..UNICAST_EVERY {
        got += rx.receive(Some(Duration::ZERO), &mut |_, b| assert_eq!(b, b"status")).unwrap();
    }
    assert_eq!(got, 1, "a spinning receive left the unicast socket unread for {UNICAST_EVERY} calls");
    // Waiting: the first read of the receive takes it (not a read after a wait).
    tx.queue_send(rx_addr, b"status").unwrap();
    tx.flush().unwrap();
    assert!(readable(&rx.unicast, deadline), "unicast datagram not received within 5 s");
    let before = rx.reads;
    assert_eq!(rx.receive(Some(Duration::from_secs(1)), &mut |_, b| assert_eq!(b, b"status")).unwrap(), 1);
    // One read, or two when the last read before found data (then it reads on until the socket is empty).
    let unicast_reads = rx.reads[KEY_UNICAST] - before[KEY_UNICAST];
    assert!((1..=2).contains(&unicast_reads), "{unicast_reads} unicast reads");
    assert_eq!(rx.reads[KEY_GROUP] - before[KEY_GROUP], 1, "the receive read again after waiting");
    if !rx.gro() {
        return; // without GRO a receive reads whatever is ready in one recvmmsg: nothing is handed early
    }
    // A lone group datagram after idleness goes up before a due unicast read, which the next receive does.
    while rx.unicast_skipped + 1 < UNICAST_EVERY {
        assert_eq!(rx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap(), 0);
    }
    tx.queue_send(rx_addr, b"status").unwrap();
    tx.queue_send(SocketAddr::from((group, 46_335)), &[7; 100]).unwrap();
    tx.flush().unwrap();
    assert!(readable(&rx.unicast, deadline) && readable(&rx.group, deadline), "datagrams not received within 5 s");
    let before = rx.reads;
    let mut lens = Vec::new();
    assert_eq!(rx.receive(Some(Duration::ZERO), &mut |_, b| lens.push(b.len())).unwrap(), 1);
    assert_eq!((lens.as_slice(), rx.reads[KEY_UNICAST] - before[KEY_UNICAST]), (&[100][..], 0), "unicast read first");
    assert_eq!(rx.receive(Some(Duration::ZERO), &mut |_, b| lens.push(b.len())).unwrap(), 1);
    assert_eq!(lens, [100, 6], "the unicast datagram waited past the next receive");
}

/// `receive_all` reads both sockets until they are empty in one call, whatever the lone-datagram and
/// unicast cadences would have left for later receives.
#[test]
fn receive_all_reads_both_sockets_to_the_end() {
    let group = Ipv4Addr::new(239, 255, 203, 12);
    let (mut rx, rx_addr) = backend(group, 46_341, PollOptions::default());
    let (mut tx, _) = backend(group, 46_342, PollOptions::default());
    let deadline = Instant::now() + Duration::from_secs(5);
    // Idle, and the unicast socket just read: the next spinning receive would hand up one datagram and skip it.
    while rx.unicast_skipped != 0 {
        rx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap();
    }
    assert_eq!(rx.receive(Some(Duration::ZERO), &mut |_, _| {}).unwrap(), 0);
    for i in 0..3u8 {
        tx.queue_send(SocketAddr::from((group, 46_341)), &[i; 100]).unwrap();
        tx.flush().unwrap();
    }
    tx.queue_send(rx_addr, b"status").unwrap();
    tx.flush().unwrap();
    assert!(readable(&rx.unicast, deadline) && readable(&rx.group, deadline), "datagrams not received within 5 s");
    let mut got = Vec::new();
    assert_eq!(rx.receive_all(&mut |_, b| got.push(b.len())).unwrap(), 4, "{got:?}");
    got.sort_unstable();
    assert_eq!(got, [6, 100, 100, 100]);
}

/// A GRO read whose control data was cut before the segment size (a `SO_TIMESTAMPING` record fills the
/// room first) is dropped and counted, not handed up as one datagram. A plain timestamp leaves room for the
/// segment size, and a cut after it (`IP_PKTINFO` comes later) loses nothing: the batch arrives datagram by
/// datagram.
#[test]
fn reads_whose_control_data_lost_the_segment_size_are_dropped() {
    use nix::sys::socket::{TimestampingFlag, setsockopt, sockopt};
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Options {
        Timestamp,
        TimestampAndPacketInfo,
        Timestamping,
    }
    let group = Ipv4Addr::new(239, 255, 203, 25);
    let flags = TimestampingFlag::SOF_TIMESTAMPING_SOFTWARE | TimestampingFlag::SOF_TIMESTAMPING_RX_SOFTWARE;
    for (port, options) in
        [(46_355, Options::Timestamp), (46_357, Options::TimestampAndPacketInfo), (46_359, Options::Timestamping)]
    {
        let sock = group_socket(group, port);
        if options == Options::Timestamping {
            setsockopt(&sock, sockopt::Timestamping, &flags).expect("SO_TIMESTAMPING");
        } else {
            setsockopt(&sock, sockopt::ReceiveTimestamp, &true).expect("SO_TIMESTAMP");
        }
        if options == Options::TimestampAndPacketInfo {
            setsockopt(&sock, sockopt::Ipv4PacketInfo, &true).expect("IP_PKTINFO");
        }
        let mut rx = PollBackend::with_options(sock, unicast_socket(), 2048, PollOptions::default()).unwrap();
        let (mut tx, _) = backend(group, port + 1, PollOptions::default());
        if !rx.gro() || tx.gso_segments() == 0 {
            eprintln!("skipping: no UDP GSO/GRO here");
            return;
        }
        for i in 0..8u8 {
            tx.queue_send(SocketAddr::from((group, port)), &[i; FULL]).unwrap();
        }
        tx.flush().unwrap();
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while got < 8 && rx.stats().malformed_reads == 0 {
            assert!(Instant::now() < deadline, "nothing within 5 s ({got} delivered, {options:?})");
            rx.receive(Some(Duration::from_millis(20)), &mut |_, d| {
                assert_eq!(d.len(), FULL, "a datagram of the batch, not the batch");
                got += 1;
            })
            .unwrap();
        }
        let want = if options == Options::Timestamping { (0, 1, 0) } else { (8, 0, 1) };
        assert_eq!((got, rx.stats().malformed_reads, rx.gro_batches()), want, "{options:?}");
    }
}
