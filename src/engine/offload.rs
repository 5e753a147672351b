//! UDP segmentation offload on send (GSO, `UDP_SEGMENT`) and receive coalescing (GRO, `UDP_GRO`), shared by
//! both backends. Safe code only: the kernel interfaces go through `nix`, control messages are built and
//! parsed as plain bytes.
//!
//! # Send: coalescing
//!
//! Consecutive datagrams to the same destination with the same length `L` are appended into one buffer and
//! sent with one `sendmsg` carrying a `UDP_SEGMENT` control message (`u16 L`): the kernel cuts the buffer
//! back into datagrams of `L` bytes (the last may be shorter), so the receivers see exactly the datagrams that
//! were queued, in order. A [`Batch`] decides what may be appended: up to the kernel's segment cap (128 since
//! Linux 6.x, 64 before: [`probe_segments`] finds out) and [`GSO_MAX_BYTES`] in all; one datagram shorter than
//! `L` may end the batch as its last segment. A batch of one datagram is sent plainly.
//!
//! # Receive: splitting
//!
//! With `UDP_GRO` set on a socket, the kernel hands a GSO batch to it whole (on loopback it does not merge
//! separately sent datagrams; on a real NIC it may merge datagrams of one flow of equal size). A buffer that
//! arrives with a `UDP_GRO` control message (`i32` segment size) is cut back into segments by [`split`]; one
//! without it is a single datagram.

// GSO and GRO are Linux's; elsewhere the backends never batch, and these helpers go unused.
#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

use std::net::SocketAddr;

/// Most payload bytes one UDP send may carry over IPv4 (65,535 minus the IP and UDP headers); more gives
/// EMSGSIZE. A GSO batch never exceeds it.
pub(crate) const GSO_MAX_BYTES: usize = 65_507;

/// Bytes of a send buffer that holds any GSO batch.
pub(crate) const GSO_BUFFER: usize = 65_536;

/// Largest payload a GRO receive can hand over (a whole 64 KiB IP packet's worth).
pub(crate) const GRO_MAX_PAYLOAD: usize = 65_535;

/// Segments per GSO send the kernel accepts at most: 128 on current kernels (`UDP_MAX_SEGMENTS`), 64 on older
/// ones (EINVAL beyond).
pub(crate) const GSO_SEGMENTS_MAX: usize = 128;
/// The older kernels' segment cap.
pub(crate) const GSO_SEGMENTS_OLD: usize = 64;

/// `CMSG_ALIGN`: control messages and their data are aligned to the size of a `long`.
const fn cmsg_align(n: usize) -> usize {
    let a = size_of::<usize>();
    (n + a - 1) & !(a - 1)
}

/// Bytes of a `cmsghdr`, aligned: where a control message's data starts.
const CMSG_HDR: usize = cmsg_align(size_of::<libc::cmsghdr>());

/// `CMSG_SPACE(sizeof(u16))`: the room a `UDP_SEGMENT` control message takes in `msg_control`.
pub(crate) const GSO_CMSG_SPACE: usize = CMSG_HDR + cmsg_align(size_of::<u16>());

/// `CMSG_SPACE(sizeof(int))`: the room a `UDP_GRO` control message takes in `msg_control`.
pub(crate) const GRO_CMSG_SPACE: usize = CMSG_HDR + cmsg_align(size_of::<i32>());

/// `SOL_UDP`, the level of both control messages and socket options.
#[cfg(target_os = "linux")]
const SOL_UDP: i32 = libc::SOL_UDP;
#[cfg(not(target_os = "linux"))]
const SOL_UDP: i32 = 17;
/// `UDP_SEGMENT` (Linux).
const UDP_SEGMENT: i32 = 103;
/// `UDP_GRO` (Linux).
const UDP_GRO: i32 = 104;

/// Writes a `UDP_SEGMENT` control message for segments of `segment` bytes into `buf`, as the kernel reads
/// it from `msg_control` (with `msg_controllen` = [`GSO_CMSG_SPACE`]).
pub(crate) fn encode_gso_cmsg(buf: &mut [u8; GSO_CMSG_SPACE], segment: u16) {
    // struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; } then the data at CMSG_HDR.
    let len = CMSG_HDR + size_of::<u16>(); // CMSG_LEN(sizeof(u16))
    buf.fill(0);
    let w = size_of::<usize>();
    buf[..w].copy_from_slice(&len.to_ne_bytes());
    buf[w..w + 4].copy_from_slice(&SOL_UDP.to_ne_bytes());
    buf[w + 4..w + 8].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
    buf[CMSG_HDR..CMSG_HDR + 2].copy_from_slice(&segment.to_ne_bytes());
}

/// The segment size in a received buffer's control data (`UDP_GRO`), if any: `Some(size)` means the payload
/// is a batch of datagrams of `size` bytes, the last possibly shorter.
pub(crate) fn gro_segment(mut control: &[u8]) -> Option<usize> {
    let w = size_of::<usize>();
    while control.len() >= CMSG_HDR {
        let len = usize::from_ne_bytes(control[..w].try_into().ok()?);
        let level = i32::from_ne_bytes(control[w..w + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[w + 4..w + 8].try_into().ok()?);
        if len < CMSG_HDR || len > control.len() {
            return None;
        }
        if level == SOL_UDP && kind == UDP_GRO && len >= CMSG_HDR + 4 {
            let size = i32::from_ne_bytes(control[CMSG_HDR..CMSG_HDR + 4].try_into().ok()?);
            return usize::try_from(size).ok().filter(|s| *s > 0);
        }
        control = control.get(cmsg_align(len)..)?;
    }
    None
}

/// The segment size a read's control data gives ([`gro_segment`]), or `Err` when that data was cut
/// (`cut`: `MSG_CTRUNC`) with none in it: control messages that socket options add before it can crowd it
/// out, and a GRO batch must not go up as one datagram. Both backends judge their reads with GRO on by this.
pub(crate) fn read_segment(control: &[u8], cut: bool) -> Result<Option<usize>, ()> {
    match gro_segment(control) {
        None if cut => Err(()),
        segment => Ok(segment),
    }
}

/// Hands `payload` to `sink` as the datagrams it holds: cut into `segment`-byte pieces (the last may be
/// shorter) when the kernel coalesced it (`Some(segment)`), whole otherwise. Returns the datagrams delivered.
pub(crate) fn split(
    from: SocketAddr,
    payload: &mut [u8],
    segment: Option<usize>,
    sink: &mut dyn FnMut(SocketAddr, &mut [u8]),
) -> usize {
    match segment {
        Some(s) if payload.len() > s => {
            let mut n = 0;
            for chunk in payload.chunks_mut(s) {
                sink(from, chunk);
                n += 1;
            }
            n
        }
        _ => {
            sink(from, payload);
            1
        }
    }
}

/// A GSO batch being filled: datagrams to one destination, all of `segment` bytes but maybe the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Batch {
    /// Where every datagram of the batch goes.
    pub(crate) dest: SocketAddr,
    /// The length of the first datagram: the segment size.
    pub(crate) segment: usize,
    /// Datagrams in the batch.
    pub(crate) count: usize,
    /// Bytes in the batch.
    pub(crate) len: usize,
    /// A datagram shorter than `segment` ended the batch.
    ended: bool,
}

impl Batch {
    /// A batch holding one datagram of `len` bytes.
    pub(crate) fn new(dest: SocketAddr, len: usize) -> Batch {
        // An empty datagram cannot be a GSO segment size: such a batch takes nothing more.
        Batch { dest, segment: len, count: 1, len, ended: len == 0 }
    }

    /// Whether a datagram of `len` bytes to `dest` may be appended, with at most `max_segments` per batch.
    pub(crate) fn accepts(&self, dest: SocketAddr, len: usize, max_segments: usize) -> bool {
        !self.ended
            && dest == self.dest
            && len > 0
            && len <= self.segment
            && self.count < max_segments
            && self.len + len <= GSO_MAX_BYTES
    }

    /// Appends a datagram of `len` bytes (after [`accepts`](Self::accepts) said yes).
    pub(crate) fn push(&mut self, len: usize) {
        debug_assert!(len > 0 && len <= self.segment);
        self.count += 1;
        self.len += len;
        if len < self.segment {
            self.ended = true;
        }
    }

    /// Whether nothing more can be appended (so the batch may as well be sent now).
    pub(crate) fn is_full(&self, max_segments: usize) -> bool {
        self.ended || self.count >= max_segments || self.len + 1 > GSO_MAX_BYTES || max_segments < 2
    }

    /// Whether the batch goes out with `UDP_SEGMENT` (two datagrams or more).
    pub(crate) fn is_gso(&self) -> bool {
        self.count >= 2
    }
}

/// What a backend's `send_buffer` lent last, for its `commit_send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lent {
    /// Nothing (or it was committed already).
    Nothing,
    /// The free end of the batch being filled in send slot `slot`: `room` bytes from offset `at` (the batch's
    /// length then).
    Tail { slot: usize, at: usize, room: usize },
    /// The backend's scratch buffer, `len` bytes.
    Scratch { len: usize },
}

/// What a backend's `commit_send` does with the room its `send_buffer` lent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Commit {
    /// Written at the free end of the open batch, which takes it: the batch grows over it.
    Grow,
    /// Written at the free end of the open batch, which cannot take it (another destination, a longer
    /// datagram): the `len` bytes at offset `at` of send slot `slot` are queued like any datagram.
    Requeue { slot: usize, at: usize },
    /// Written in the scratch buffer: its first `len` bytes are queued.
    Scratch,
    /// Nothing was lent, or `len` exceeds what was.
    Invalid,
}

impl Lent {
    /// Lends the free end of the open batch (in send slot `slot`, `batch_len` bytes long) when `max_len` bytes
    /// fit there, else the scratch buffer, grown to `max_len` if needed.
    pub(crate) fn lend(open: Option<(usize, usize)>, slot_size: usize, max_len: usize, scratch: &mut Vec<u8>) -> Lent {
        if let Some((slot, at)) = open
            && slot_size - at >= max_len
        {
            return Lent::Tail { slot, at, room: slot_size - at };
        }
        if scratch.len() < max_len {
            scratch.resize(max_len, 0);
        }
        Lent::Scratch { len: scratch.len() }
    }

    /// What committing `len` bytes to `dest` means, given the batch open now (`slot`, batch), the largest
    /// datagram the backend sends and its GSO segment cap.
    pub(crate) fn commit(
        self,
        len: usize,
        open: Option<(usize, &Batch)>,
        dest: SocketAddr,
        max_datagram: usize,
        segments: usize,
    ) -> Commit {
        match (self, open) {
            (Lent::Tail { slot, at, room }, Some((i, batch))) if len <= room && i == slot && batch.len == at => {
                if len <= max_datagram && batch.accepts(dest, len, segments) {
                    Commit::Grow
                } else {
                    Commit::Requeue { slot, at }
                }
            }
            (Lent::Scratch { len: lent }, _) if len <= lent => Commit::Scratch,
            _ => Commit::Invalid,
        }
    }
}

/// The error of a `commit_send` that does not match what `send_buffer` lent.
pub(crate) fn invalid_commit() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "commit_send without a lent buffer of that size")
}

/// Whether GSO is on, and how it went: shared by both backends' send paths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Gso {
    /// Segments per GSO send at most; below 2: GSO is off (never coalesce).
    pub(crate) segments: usize,
    /// Times the kernel refused a GSO send and the backend fell back (to the older segment cap, or to one
    /// datagram per send for good).
    pub(crate) fallbacks: u64,
    /// GSO sends (two datagrams or more) the kernel accepted.
    pub(crate) sends: u64,
}

impl Gso {
    /// GSO with `segments` per send at most (`None`: off).
    pub(crate) fn new(segments: Option<usize>) -> Gso {
        Gso { segments: segments.unwrap_or(0), fallbacks: 0, sends: 0 }
    }

    /// Whether the backend coalesces.
    pub(crate) fn is_on(&self) -> bool {
        self.segments >= 2
    }

    /// The kernel refused a GSO send of `count` datagrams with `errno` (one for which [`gso_refused`] holds):
    /// past the segment cap (EINVAL with more than 64 segments while the cap was 128), lower the cap to 64;
    /// otherwise stop coalescing for good.
    pub(crate) fn refused(&mut self, errno: i32, count: usize) {
        self.fallbacks += 1;
        if errno == libc::EINVAL && count > GSO_SEGMENTS_OLD && self.segments > GSO_SEGMENTS_OLD {
            self.segments = GSO_SEGMENTS_OLD;
        } else {
            self.segments = 0;
        }
    }
}

/// Errors of a GSO send that mean the kernel (or the path) does not take GSO sends like this one: the
/// backend then stops coalescing for good and sends one datagram per send. EMSGSIZE: the segment size plus
/// headers exceeds the route's MTU (a plain send would have been fragmented instead); EINVAL: the segment
/// count or checksum settings; EIO: an xfrm (IPsec) route; EOPNOTSUPP: no UDP GSO at all.
pub(crate) fn gso_refused(errno: i32) -> bool {
    matches!(errno, libc::EINVAL | libc::EIO | libc::EOPNOTSUPP | libc::EMSGSIZE)
}

/// Reads dropped before the sink: longer than the buffer, from no IPv4/IPv6 address, or whose control data
/// lost the GRO segment size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Skipped {
    pub(crate) truncated: u64,
    pub(crate) malformed_reads: u64,
}

impl std::ops::AddAssign for Skipped {
    fn add_assign(&mut self, other: Skipped) {
        self.truncated += other.truncated;
        self.malformed_reads += other.malformed_reads;
    }
}

#[cfg(target_os = "linux")]
pub(crate) use linux::{RECV_CMSG_ROOM, Turn, enable_gro, probe_segments, read_turn, to_std};

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::sync::OnceLock;

    use nix::errno::Errno;
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, recvmsg, sendmsg, setsockopt, sockopt};

    use super::{GSO_SEGMENTS_MAX, GSO_SEGMENTS_OLD, Skipped};

    /// Bytes of control data a GRO read makes room for: the `UDP_GRO` control message, and 40 bytes of what
    /// socket options may put before it (a `SO_TIMESTAMP` timestamp takes 32). A read whose control data is cut
    /// before the segment size is dropped (see [`recv_one`]).
    pub(crate) const RECV_CMSG_ROOM: usize = 40 + super::GRO_CMSG_SPACE;

    /// Reads at most this many datagrams in one [`recv_one`], skipping unusable ones.
    const SKIP_MAX: usize = 32;

    /// One non-blocking read (a `recvmsg` into `buf`, with `UDP_GRO` control data into `cmsg` when the socket
    /// has GRO on, `None` otherwise): `Some((source, length, segment size if the kernel coalesced))`, `None`
    /// when nothing is ready. A truncated or unaddressed read is skipped (the next one is tried) and counted
    /// in `skipped`, and so is one that [`read_segment`](super::read_segment) refuses. Both backends read
    /// this way when a read must hand over one datagram or GRO batch at once.
    #[inline]
    pub(crate) fn recv_one(
        sock: &UdpSocket,
        buf: &mut [u8],
        mut cmsg: Option<&mut [u8]>,
        skipped: &mut Skipped,
    ) -> io::Result<Option<(SocketAddr, usize, Option<usize>)>> {
        // Bounded: every skipped read consumed a datagram.
        for _ in 0..SKIP_MAX {
            if let Some(c) = cmsg.as_deref_mut() {
                // Zeroed so that cut control data is read only as far as the kernel wrote it (see below).
                c.fill(0);
            }
            let mut iov = [IoSliceMut::new(&mut *buf)];
            let (flags, len, from) = match recvmsg::<SockaddrStorage>(
                sock.as_raw_fd(),
                &mut iov,
                cmsg.as_deref_mut(),
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(r) => (r.flags, r.bytes, r.address.as_ref().and_then(to_std)),
                // Non-blocking, so EINTR is as good as "nothing now": the caller polls again.
                Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNREFUSED) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            // A datagram longer than the buffer is truncated: drop it (it cannot be a Blip packet).
            if flags.contains(MsgFlags::MSG_TRUNC) {
                skipped.truncated += 1;
                continue;
            }
            // Read from the raw bytes, as far as the kernel wrote them (nix parses nothing once they are cut).
            let cut = flags.contains(MsgFlags::MSG_CTRUNC);
            let Ok(segment) = cmsg.as_deref().map_or(Ok(None), |c| super::read_segment(c, cut)) else {
                skipped.malformed_reads += 1;
                continue;
            };
            let Some(from) = from else {
                skipped.malformed_reads += 1;
                continue;
            };
            return Ok(Some((from, len, segment)));
        }
        Ok(None)
    }

    /// What one [`read_turn`] found.
    #[derive(Debug, Default, Clone, Copy)]
    pub(crate) struct Turn {
        /// Datagrams handed to the sink.
        pub(crate) datagrams: usize,
        /// Reads that held a GRO batch (several datagrams).
        pub(crate) batches: u64,
        /// System calls made, empty reads included.
        pub(crate) reads: u64,
        /// The turn ended after a lone datagram that followed an empty turn.
        pub(crate) lone: bool,
        /// Datagrams dropped unread.
        pub(crate) skipped: Skipped,
    }

    /// One turn of [`recv_one`] reads of `sock` (`cmsg`: `None` when it has GRO off), each datagram or GRO
    /// batch split for `sink`: until the socket is found empty, after `max_reads` reads or once
    /// `max_datagrams` are delivered. When the last turn found the socket empty (`*empty`), a read that
    /// returns a lone datagram ends the turn instead (`Turn::lone`): it reaches the application a system
    /// call sooner (the round trip of a ping-pong), and the next turn reads on until empty. Clear `*empty`
    /// first to read to the end regardless. On return, `*empty` tells whether this turn found the socket
    /// empty without reading anything.
    pub(crate) fn read_turn(
        sock: &UdpSocket,
        buf: &mut [u8],
        mut cmsg: Option<&mut [u8]>,
        empty: &mut bool,
        max_reads: usize,
        max_datagrams: usize,
        sink: &mut dyn FnMut(SocketAddr, &mut [u8]),
    ) -> (Turn, io::Result<()>) {
        let was_empty = std::mem::replace(empty, false);
        let mut turn = Turn::default();
        for _ in 0..max_reads {
            turn.reads += 1;
            match recv_one(sock, buf, cmsg.as_deref_mut(), &mut turn.skipped) {
                Ok(Some((from, len, segment))) => {
                    let n = super::split(from, &mut buf[..len], segment, sink);
                    turn.batches += u64::from(n > 1);
                    turn.datagrams += n;
                    if was_empty && turn.datagrams == 1 {
                        turn.lone = true;
                        break;
                    }
                }
                Ok(None) => {
                    *empty = turn.datagrams == 0;
                    break;
                }
                Err(e) => return (turn, Err(e)),
            }
            if turn.datagrams >= max_datagrams {
                break;
            }
        }
        (turn, Ok(()))
    }

    /// The standard library's address of a socket address from `nix`, if it is IPv4 or IPv6.
    pub(crate) fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
        if let Some(v4) = addr.as_sockaddr_in() {
            Some(SocketAddr::V4((*v4).into()))
        } else {
            addr.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
        }
    }

    /// Turns `UDP_GRO` on; false if the kernel refuses (then the socket receives one datagram per read).
    pub(crate) fn enable_gro(sock: &UdpSocket) -> bool {
        setsockopt(sock, sockopt::UdpGroSegment, &true).is_ok()
    }

    /// How many segments one GSO send may carry here (128 or 64), or `None` if UDP GSO does not work. Found
    /// once per address family by sending one GSO batch of one-byte segments between two throwaway sockets on
    /// the loopback address (nothing leaves the host), then cached.
    pub(crate) fn probe_segments(v6: bool) -> Option<usize> {
        static V4: OnceLock<Option<usize>> = OnceLock::new();
        static V6: OnceLock<Option<usize>> = OnceLock::new();
        let cell = if v6 { &V6 } else { &V4 };
        *cell.get_or_init(|| probe_uncached(v6))
    }

    fn probe_uncached(v6: bool) -> Option<usize> {
        let lo: SocketAddr = if v6 { (Ipv6Addr::LOCALHOST, 0).into() } else { (Ipv4Addr::LOCALHOST, 0).into() };
        let rx = UdpSocket::bind(lo).ok()?;
        let tx = UdpSocket::bind(lo).ok()?;
        let to = SockaddrStorage::from(rx.local_addr().ok()?);
        let payload = [0u8; GSO_SEGMENTS_MAX];
        let one: u16 = 1;
        for segments in [GSO_SEGMENTS_MAX, GSO_SEGMENTS_OLD] {
            let iov = [IoSlice::new(&payload[..segments])];
            let cmsg = [ControlMessage::UdpGsoSegments(&one)];
            match sendmsg(tx.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_DONTWAIT, Some(&to)) {
                Ok(n) if n == segments => return Some(segments),
                // Past the cap: EINVAL. Try the older cap.
                Err(Errno::EINVAL) => continue,
                _ => return None,
            }
        }
        None
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn enable_gro(_sock: &std::net::UdpSocket) -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn probe_segments(_v6: bool) -> Option<usize> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([239, 255, 203, 1], port))
    }

    #[test]
    fn lending_and_committing_follow_the_open_batch() {
        let mut scratch = Vec::new();
        let batch = Batch::new(a(1), 100);
        // Room at the end of the open batch in slot 3: lent in place.
        let tail = Lent::lend(Some((3, batch.len)), 4096, 1500, &mut scratch);
        assert_eq!(tail, Lent::Tail { slot: 3, at: 100, room: 3996 });
        assert_eq!(tail.commit(100, Some((3, &batch)), a(1), 1500, 64), Commit::Grow);
        assert_eq!(tail.commit(100, Some((3, &batch)), a(2), 1500, 64), Commit::Requeue { slot: 3, at: 100 });
        assert_eq!(tail.commit(4000, Some((3, &batch)), a(1), 1500, 64), Commit::Invalid, "beyond the room");
        assert_eq!(tail.commit(100, None, a(1), 1500, 64), Commit::Invalid, "the batch was sent meanwhile");
        // No room, or no batch: the scratch buffer, grown to the request.
        let s = Lent::lend(Some((3, 3000)), 4096, 1500, &mut scratch);
        assert_eq!((s, scratch.len()), (Lent::Scratch { len: 1500 }, 1500));
        assert_eq!(Lent::lend(None, 4096, 1500, &mut scratch), Lent::Scratch { len: 1500 });
        assert_eq!(s.commit(1500, None, a(1), 1500, 64), Commit::Scratch);
        assert_eq!(s.commit(1501, None, a(1), 1500, 64), Commit::Invalid);
        assert_eq!(Lent::Nothing.commit(1, Some((3, &batch)), a(1), 1500, 64), Commit::Invalid);
    }

    #[test]
    fn cmsg_sizes_match_the_kernel_macros() {
        #[cfg(target_os = "linux")]
        {
            assert_eq!(GSO_CMSG_SPACE, nix::sys::socket::cmsg_space::<u16>());
            assert_eq!(GRO_CMSG_SPACE, nix::sys::socket::cmsg_space::<i32>());
        }
        assert_eq!(GSO_CMSG_SPACE, GRO_CMSG_SPACE);
    }

    #[test]
    fn gso_cmsg_round_trips_through_the_parser_layout() {
        let mut buf = [0xAAu8; GSO_CMSG_SPACE];
        encode_gso_cmsg(&mut buf, 1472);
        let w = size_of::<usize>();
        assert_eq!(usize::from_ne_bytes(buf[..w].try_into().unwrap()), CMSG_HDR + 2);
        assert_eq!(i32::from_ne_bytes(buf[w..w + 4].try_into().unwrap()), 17);
        assert_eq!(i32::from_ne_bytes(buf[w + 4..w + 8].try_into().unwrap()), 103);
        assert_eq!(u16::from_ne_bytes(buf[CMSG_HDR..CMSG_HDR + 2].try_into().unwrap()), 1472);
        assert!(buf[CMSG_HDR + 2..].iter().all(|b| *b == 0));
    }

    fn gro_cmsg(level: i32, kind: i32, size: i32) -> Vec<u8> {
        let w = size_of::<usize>();
        let mut v = vec![0u8; GRO_CMSG_SPACE];
        v[..w].copy_from_slice(&(CMSG_HDR + 4).to_ne_bytes());
        v[w..w + 4].copy_from_slice(&level.to_ne_bytes());
        v[w + 4..w + 8].copy_from_slice(&kind.to_ne_bytes());
        v[CMSG_HDR..CMSG_HDR + 4].copy_from_slice(&size.to_ne_bytes());
        v
    }

    #[test]
    fn gro_segment_parses_and_skips() {
        assert_eq!(gro_segment(&gro_cmsg(17, 104, 1472)), Some(1472));
        assert_eq!(gro_segment(&[]), None);
        assert_eq!(gro_segment(&gro_cmsg(0, 104, 1472)), None);
        assert_eq!(gro_segment(&gro_cmsg(17, 104, 0)), None);
        // Another control message first, then UDP_GRO.
        let mut two = gro_cmsg(0, 2, 64);
        two.extend(gro_cmsg(17, 104, 100));
        assert_eq!(gro_segment(&two), Some(100));
        // A length field past the end: stop, do not panic.
        let mut bad = gro_cmsg(17, 104, 1472);
        bad[0] = 200;
        assert_eq!(gro_segment(&bad), None);
        assert_eq!(gro_segment(&bad[..5]), None);
    }

    #[test]
    fn split_cuts_at_the_segment_size() {
        let mut payload: Vec<u8> = (0..10u8).collect();
        let mut got = Vec::new();
        let n = split(a(1), &mut payload, Some(4), &mut |_, c| got.push(c.to_vec()));
        assert_eq!(n, 3);
        assert_eq!(got, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
        got.clear();
        assert_eq!(split(a(1), &mut payload, None, &mut |_, c| got.push(c.to_vec())), 1);
        assert_eq!(split(a(1), &mut payload, Some(10), &mut |_, c| got.push(c.to_vec())), 1);
        assert_eq!(got, vec![payload.clone(), payload]);
    }

    #[test]
    fn batch_rules() {
        // Same destination and length: appended up to the segment cap.
        let mut b = Batch::new(a(1), 1472);
        for _ in 1..44 {
            assert!(b.accepts(a(1), 1472, 128));
            b.push(1472);
        }
        // 44 x 1472 = 64,768; one more would exceed 65,507.
        assert!(!b.accepts(a(1), 1472, 128));
        // A shorter one still fits (65,507 - 64,768 = 739 bytes).
        assert!(!b.is_full(128));
        assert!(b.accepts(a(1), 739, 128));
        assert!(!b.accepts(a(1), 740, 128));
        b.push(739);
        assert!(b.is_full(128));

        // Other destination, longer datagram: refused. Shorter: taken, and it ends the batch.
        let mut b = Batch::new(a(1), 1000);
        assert!(!b.accepts(a(2), 1000, 128));
        assert!(!b.accepts(a(1), 1001, 128));
        assert!(b.accepts(a(1), 10, 128));
        b.push(10);
        assert!(b.is_gso());
        assert!(b.is_full(128));
        assert!(!b.accepts(a(1), 10, 128));
        assert!(!b.accepts(a(1), 1000, 128));

        // The segment cap.
        let mut b = Batch::new(a(1), 64);
        for _ in 1..64 {
            b.push(64);
        }
        assert!(!b.accepts(a(1), 64, 64));
        assert!(b.is_full(64));
        assert!(b.accepts(a(1), 64, 128));

        // Empty datagrams never coalesce; a batch of one is not GSO.
        let b = Batch::new(a(1), 0);
        assert!(!b.accepts(a(1), 0, 128) && b.is_full(128) && !b.is_gso());
        assert!(!Batch::new(a(1), 100).accepts(a(1), 0, 128));
        // GSO off (cap below 2): every batch is full at once.
        assert!(Batch::new(a(1), 100).is_full(1));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn probe_finds_a_segment_cap() {
        let cap = probe_segments(false);
        eprintln!("UDP GSO segment cap on 127.0.0.1: {cap:?}");
        assert!(matches!(cap, None | Some(GSO_SEGMENTS_MAX) | Some(GSO_SEGMENTS_OLD)));
        assert_eq!(probe_segments(false), cap, "cached");
    }
}
