//! What both backends' tests share: loopback sockets (groups in 239.255.0.0/16, TTL 0), and the datagram
//! plan of the GSO/GRO tests (which datagram goes where, how long it is, what it holds, and the receiver's
//! check that each arrives whole and in order).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use super::Backend;

use socket2::{Domain, Protocol, Socket, Type};

pub(crate) const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A non-blocking socket bound to `group:port`, joined on loopback.
pub(crate) fn group_socket(group: Ipv4Addr, port: u16) -> UdpSocket {
    assert_eq!(group.octets()[..2], [239, 255], "tests use 239.255.0.0/16 only");
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddrV4::new(group, port).into()).unwrap();
    s.join_multicast_v4(&group, &LO).unwrap();
    s.set_multicast_if_v4(&LO).unwrap();
    s.set_multicast_ttl_v4(0).unwrap();
    s.set_recv_buffer_size(4 << 20).unwrap();
    s.set_nonblocking(true).unwrap();
    s.into()
}

/// A non-blocking sending socket on 127.0.0.1 with an ephemeral port, multicasting on loopback with TTL 0.
pub(crate) fn unicast_socket() -> UdpSocket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.bind(&SocketAddrV4::new(LO, 0).into()).unwrap();
    s.set_multicast_if_v4(&LO).unwrap();
    s.set_multicast_ttl_v4(0).unwrap();
    s.set_recv_buffer_size(4 << 20).unwrap();
    s.set_send_buffer_size(4 << 20).unwrap();
    s.set_nonblocking(true).unwrap();
    s.into()
}

/// Datagrams per GSO test run.
pub(crate) const GSO_N: usize = 10_000;
/// Full-size datagrams: what a sender mostly sends.
pub(crate) const FULL: usize = 1472;
/// Datagrams queued between flushes.
pub(crate) const CHUNK: usize = 500;

/// Datagram `i` of the plan: whether it goes to the receiver's unicast address (three in a row every 100),
/// and its length: full size, except every 37th (and the last of each unicast run), which is shorter and
/// so ends a GSO batch as its last segment.
pub(crate) fn plan(i: usize) -> (bool, usize) {
    let unicast = (40..43).contains(&(i % 100));
    let short = i % 37 == 36 || i % 100 == 42;
    (unicast, if short { 9 + (i * 13) % (FULL - 9) } else { FULL })
}

/// Writes datagram `i` of the plan: its index in the first 8 bytes, then a pattern that depends on it.
pub(crate) fn plan_fill(i: usize, buf: &mut [u8]) -> usize {
    let len = plan(i).1;
    buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
    for (k, b) in buf[8..len].iter_mut().enumerate() {
        *b = (i.wrapping_mul(31) + k) as u8;
    }
    len
}

/// What the receiver expects next on each stream (group, unicast): datagrams must arrive one by one, intact
/// and in the order they were queued on their stream.
pub(crate) struct Expect {
    pub(crate) group: Vec<usize>,
    pub(crate) unicast: Vec<usize>,
    pub(crate) next: [usize; 2],
}

impl Expect {
    pub(crate) fn new() -> Expect {
        let (unicast, group) = (0..GSO_N).partition(|i| plan(*i).0);
        Expect { group, unicast, next: [0, 0] }
    }

    pub(crate) fn check(&mut self, bytes: &[u8]) {
        assert!(bytes.len() >= 8, "a {}-byte datagram: not one of ours, or split wrongly", bytes.len());
        let i = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert!(i < GSO_N, "index {i} out of range: contents damaged");
        let s = usize::from(plan(i).0);
        let stream = if s == 1 { &self.unicast } else { &self.group };
        assert_eq!(Some(&i), stream.get(self.next[s]), "datagram {i} out of order on stream {s}");
        let mut want = [0u8; FULL];
        let len = plan_fill(i, &mut want);
        assert_eq!(bytes.len(), len, "datagram {i}: length");
        assert!(bytes == &want[..len], "datagram {i}: contents differ");
        self.next[s] += 1;
    }

    /// Whether every datagram below `end` was received.
    pub(crate) fn caught_up(&self, end: usize) -> bool {
        let want_g = self.group.partition_point(|i| *i < end);
        let want_u = self.unicast.partition_point(|i| *i < end);
        self.next[0] >= want_g && self.next[1] >= want_u
    }
}

/// Sends the plan from `tx` (whose datagrams come from `tx_addr`) to the group and to `rx`'s unicast
/// address, in chunks, and checks that everything arrives at `rx` whole and in order (bounded: 60 s).
/// With `lend`, each datagram is written in the room `send_buffer` lends and queued by `commit_send` (in
/// place at the end of the batch being filled, or through the backend's scratch buffer); else by
/// `queue_send`. Returns how long it took.
pub(crate) fn send_plan(
    tx: &mut dyn Backend,
    tx_addr: SocketAddr,
    rx: &mut dyn Backend,
    rx_addr: SocketAddr,
    group: SocketAddr,
    lend: bool,
) -> Duration {
    let mut expect = Expect::new();
    let mut buf = [0u8; FULL];
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    for first in (0..GSO_N).step_by(CHUNK) {
        let end = (first + CHUNK).min(GSO_N);
        for i in first..end {
            let dest = if plan(i).0 { rx_addr } else { group };
            if lend {
                let room = tx.send_buffer(FULL);
                assert!(room.len() >= FULL, "send_buffer lent {} bytes, asked {FULL}", room.len());
                let len = plan_fill(i, room);
                tx.commit_send(dest, len).expect("commit_send");
            } else {
                let len = plan_fill(i, &mut buf);
                tx.queue_send(dest, &buf[..len]).expect("queue_send");
            }
        }
        tx.flush().expect("flush");
        while !expect.caught_up(end) {
            assert!(
                Instant::now() < deadline,
                "timed out at chunk {first}..{end}: received {:?} of {} group, {} unicast; tx send errors {}",
                expect.next,
                expect.group.len(),
                expect.unicast.len(),
                tx.stats().send_errors
            );
            rx.receive(Some(Duration::from_millis(100)), &mut |src, bytes| {
                if src == tx_addr {
                    expect.check(bytes);
                }
            })
            .expect("receive");
        }
    }
    start.elapsed()
}

/// Waits until `socket` is readable (without reading it) or `deadline` passes.
#[cfg(unix)]
pub(crate) fn readable(socket: &UdpSocket, deadline: Instant) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, ms), Ok(n) if n > 0) && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN))
}
