//! Hostile and malformed input from a plain socket into live nodes, while a legitimate publisher streams:
//! truncated packets, header fields at their extremes, lengths past the datagram, unknown kinds and
//! versions, sequence numbers far ahead, duplicate floods, and a NAK flood for old ranges. The nodes stay
//! up, deliver every legitimate message in order, and count the drops by reason.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use blip::BackendChoice;
use blip::wire::{DataWriter, FRAME_FIRST, FRAME_LAST, Header, HeartbeatRepr, Kind, NakRepr, SeqRange, VERSION};
use common::*;

fn attacker() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_multicast_ttl_v4(0).unwrap();
    socket2::SockRef::from(&s).set_multicast_if_v4(&"127.0.0.1".parse().unwrap()).unwrap();
    s
}

fn data(session: u64, seq: u64, msg_seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let h = Header { kind: Kind::Data, flags: 0, stream: 0, session };
    let n = DataWriter::begin(&mut buf, &h, seq, msg_seq, 0).unwrap();
    let n = DataWriter::push_frame(&mut buf, n, FRAME_FIRST | FRAME_LAST, payload).unwrap();
    buf.truncate(n);
    buf
}

/// Every malformed or hostile datagram this test throws.
fn garbage(target: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let valid = data(0xBAD, 3, 3, b"forged but well formed");
    // Truncated at every length.
    for n in 0..valid.len() {
        out.push(valid[..n].to_vec());
    }
    // Versions and kinds that do not exist; flags and streams at their extremes.
    for (byte, v) in [(0usize, 0u8), (0, 2), (0, 255), (1, 0), (1, 6), (1, 255)] {
        let mut p = valid.clone();
        p[byte] = v;
        out.push(p);
    }
    let mut p = valid.clone();
    p[2..4].copy_from_slice(&[0xFF, 0xFF]); // every flag bit
    out.push(p);
    let mut p = valid.clone();
    p[4..8].copy_from_slice(&u32::MAX.to_be_bytes()); // another stream
    out.push(p);
    // Lengths past the datagram: a frame claiming 65,535 bytes, a NAK claiming 64 ranges, a long name.
    let mut p = valid.clone();
    p[40..42].copy_from_slice(&[0xFF, 0xFF]);
    out.push(p);
    let mut nak = vec![VERSION, Kind::Nak as u8, 0, 0, 0, 0, 0, 0];
    nak.extend_from_slice(&0xBADu64.to_be_bytes());
    nak.extend_from_slice(&target.to_be_bytes());
    nak.extend_from_slice(&64u32.to_be_bytes());
    nak.extend_from_slice(&[0; 12]);
    out.push(nak);
    let mut member = vec![VERSION, Kind::Member as u8, 0, 0, 0, 0, 0, 0];
    member.extend_from_slice(&0xBADu64.to_be_bytes());
    member.extend_from_slice(&1u64.to_be_bytes());
    member.extend_from_slice(&[0, 64, 0, 0]);
    member.extend_from_slice(b"short");
    out.push(member);
    // Sequence numbers at and past the protocol's bound, and far ahead for a forged session.
    for seq in [u64::MAX, 1 << 63, (1 << 63) - 1, 1 << 40] {
        out.push(data(0xFA4, seq, 0, b"far ahead"));
    }
    let hb = HeartbeatRepr { next_seq: 1 << 62, low: 0, next_msg: 0, receivers: 0 };
    let mut b = vec![0u8; 64];
    let n = hb.emit(&Header { kind: Kind::Heartbeat, flags: 0, stream: 0, session: 0xFA4 }, &mut b).unwrap();
    out.push(b[..n].to_vec());
    out
}

fn hostile(backend: BackendChoice) {
    let group = unique_group();
    let dest = SocketAddr::new(group.0, group.1);
    let mut victim = builder(backend, group).build().unwrap();
    let mut pub_node = builder(backend, group).build().unwrap();
    let target = pub_node.info().session;
    let mut sub = victim.subscriber().unwrap();
    let mut publisher = pub_node.publisher().unwrap();
    let mut own = pub_node.subscriber().unwrap();
    const N: u64 = 20_000;
    let collector = std::thread::spawn(move || collect(&mut sub, 1, N, Duration::from_secs(60)));
    handshake(&mut publisher, &mut own, 1, 100);

    let evil = attacker();
    let junk = garbage(target);
    let dup = data(0xD0B, 1, 1, b"again and again");
    let mut nak = vec![0u8; 1024];
    let nak_len = NakRepr { target_session: target, ranges: &[SeqRange { start: 0, len: 4000 }] }
        .emit(&Header { kind: Kind::Nak, flags: 0, stream: 0, session: 0xE71 }, &mut nak)
        .unwrap();
    let mut buf = Vec::new();
    let attack_start = Instant::now();
    for i in 1..N {
        payload(i, 100, &mut buf);
        publisher.send(&buf).unwrap();
        if i % 100 == 0 {
            // Interleave the attack with the legitimate stream, bounded: 199 rounds in all.
            for p in &junk {
                evil.send_to(p, dest).unwrap();
            }
            for _ in 0..10 {
                evil.send_to(&dup, dest).unwrap();
            }
            evil.send_to(&nak[..nak_len], dest).unwrap();
        }
    }
    assert_perfect(&collector.join().unwrap(), N);
    let attack_time = attack_start.elapsed().as_secs_f64();

    let deadline = Instant::now() + Duration::from_secs(5);
    let (v, p) = loop {
        let (v, p) = (victim.stats().protocol, pub_node.stats().protocol);
        let counted = v.malformed > 0 && v.foreign_stream > 0 && v.duplicates > 0 && v.beyond_buffer > 0;
        if (counted && p.retransmits_rate_limited > 0) || Instant::now() > deadline {
            break (v, p);
        }
        std::thread::park_timeout(Duration::from_millis(10));
    };
    assert!(!victim.is_closed() && !pub_node.is_closed());
    // The kernel may drop some of the flood itself (receive buffer), so each reason must be counted, not an
    // exact total.
    assert!(v.malformed > 0, "malformed not counted: {v:?}");
    assert!(v.foreign_stream > 0, "foreign stream not counted: {v:?}");
    assert!(v.duplicates > 0, "duplicate flood not counted: {v:?}");
    assert!(v.beyond_buffer > 0, "far-ahead datagrams not counted: {v:?}");
    // The forged NAKs each asked for every datagram sent so far; the strangers' shared budget granted
    // what its burst and rate allow over the attack, and the legitimate receiver's repairs come on top.
    use blip::proto::{DEFAULT_RETRANSMIT_BURST, DEFAULT_RETRANSMIT_RATE, STRANGER_SHARE};
    let strangers = (DEFAULT_RETRANSMIT_BURST + (DEFAULT_RETRANSMIT_RATE as f64 * (attack_time + 0.5)) as u64)
        / STRANGER_SHARE
        / 1472;
    println!(
        "{backend:?}: {attack_time:.2} s of attack; victim dropped {} malformed, {} foreign-stream, {} duplicates; \
         publisher retransmitted {} and refused {} (strangers' budget {strangers})",
        v.malformed, v.foreign_stream, v.duplicates, p.retransmits, p.retransmits_rate_limited
    );
    assert!(p.retransmits_rate_limited > 0, "NAK flood not limited: {p:?}");
    assert!(
        p.retransmits <= strangers + 2 * v.naks_sent.max(1) * 64,
        "{} retransmissions in {attack_time:.2} s (strangers' budget {strangers}): {p:?}",
        p.retransmits
    );
}

#[test]
fn poll_node_survives_hostile_input() {
    hostile(BackendChoice::Poll);
}

#[test]
fn uring_node_survives_hostile_input() {
    if uring_or_skip() {
        hostile(BackendChoice::Uring);
    }
}
