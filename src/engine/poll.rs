//! The portable backend: a readiness poller (`polling` crate: epoll, kqueue, event ports, IOCP) over the two
//! non-blocking sockets. On Linux it batches with recvmmsg/sendmmsg (safe wrappers from `nix`); elsewhere it
//! falls back to one `recv_from`/`send_to` per datagram. Everything is allocated in
//! [`PollBackend::with_options`].
//!
//! On Linux it also uses the kernel's UDP offloads (see [`PollOptions`]):
//!
//! - **GSO**: `queue_send` coalesces consecutive datagrams to one destination with one length into a batch
//!   (up to the kernel's segment cap and 65,507 bytes; one shorter datagram may end it), and `flush` sends
//!   each batch of two or more with one `UDP_SEGMENT` control message; sendmmsg still sends up to 32 batches
//!   per call. If the kernel refuses a GSO send, the batch is sent again one datagram per send and the
//!   backend stops coalescing for good.
//! - **GRO**: `UDP_GRO` on both sockets, so that a GSO batch arrives whole; each read (one `recvmsg` into a
//!   64 KiB buffer) is cut back into its datagrams by the segment size in its control message.
//!   (`recvmmsg` through `nix` cannot be used for this: its reused headers keep the control-buffer length
//!   the kernel wrote back, so after one datagram without a control message a header never receives one
//!   again.)

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use polling::{Event, Events, PollMode, Poller};

use super::backend::{Backend, BackendKind, BackendStats, RECEIVE_ALL_PASSES, Wake};
use super::offload::{self, Batch, Commit, Gso, Lent};

/// Datagrams (or GSO batches) per recvmmsg/sendmmsg call.
const BATCH: usize = 32;
/// Bytes per receive buffer: any UDP payload fits, a GRO batch too.
const RECV_SIZE: usize = 65_536;
/// recvmmsg calls per socket per `receive`, so one busy socket cannot starve the engine's other work.
const MAX_ROUNDS: usize = 8;
/// With GRO: reads per socket per `receive` at most, and datagrams after which a socket's turn ends.
#[cfg(target_os = "linux")]
const GRO_READS: usize = 64;
#[cfg(target_os = "linux")]
const DRAIN_DATAGRAMS: usize = BATCH * MAX_ROUNDS;

const KEY_GROUP: usize = 0;
const KEY_UNICAST: usize = 1;

/// Non-blocking receives per read of the unicast socket. It carries only STATUS reports (flow control, a
/// few per window's worth of data), which can wait a few microseconds; a busy-spinning engine then makes
/// one system call per idle cycle instead of two, and sees a datagram on the group socket sooner. On a
/// driven node this is every fourth `duty_cycle(Some(ZERO))`: a receiver reports when a quarter of the
/// sender's window is delivered, so a report a few cycles late does not stall the sender (`blip-bench cost
/// --backend poll`, one thread driving both nodes, measured the same). A receive that hands a lone datagram
/// over early (see `drain`) puts a due read off to the next receive, so that it is not on a round trip.
const UNICAST_EVERY: u32 = 4;

/// The kernel offloads the poll backend may use (Linux; ignored elsewhere). Both default to on; each falls
/// back by itself when the kernel does not support it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollOptions {
    /// Coalesce consecutive datagrams to one destination into UDP GSO sends (`UDP_SEGMENT`).
    pub gso: bool,
    /// Receive GSO batches whole (`UDP_GRO`) and split them in user space.
    pub gro: bool,
}

impl Default for PollOptions {
    fn default() -> PollOptions {
        PollOptions { gso: true, gro: true }
    }
}

struct PollWaker(Arc<Poller>);

impl Wake for PollWaker {
    fn wake(&self) {
        let _ = self.0.notify();
    }
}

/// See the module docs.
pub struct PollBackend {
    poller: Arc<Poller>,
    events: Events,
    group: UdpSocket,
    unicast: UdpSocket,
    recv_bufs: Box<[u8]>,
    /// `BATCH` send slots of `slot_size` bytes; slot `i` holds batch `sends[i]`.
    send_bufs: Box<[u8]>,
    slot_size: usize,
    max_datagram: usize,
    sends: [Option<Batch>; BATCH],
    /// Batches closed and waiting for `flush`, in slots `0..queued`.
    queued: usize,
    /// The batch being filled, in slot `queued`.
    open: Option<Batch>,
    gso: Gso,
    gro: bool,
    gro_batches: u64,
    /// Per socket: its last read found it empty (the traffic is sparse). See `drain`.
    #[cfg(target_os = "linux")]
    sparse: [bool; 2],
    /// Non-blocking receives since the unicast socket was last read.
    unicast_skipped: u32,
    /// The last `drain` handed over a lone datagram after idleness without reading on.
    lone: bool,
    /// Reads per socket (system calls, empty ones included), for tests.
    #[cfg(test)]
    reads: [u64; 2],
    send_errors: u64,
    /// Datagrams dropped unread: longer than a receive buffer, or from no IPv4/IPv6 address.
    skipped: offload::Skipped,
    /// Lent by `send_buffer` when the open batch has no room (or there is none).
    scratch: Vec<u8>,
    lent: Lent,
    #[cfg(target_os = "linux")]
    mmsg: linux::Mmsg,
}

impl PollBackend {
    /// Takes ownership of the node's sockets (already non-blocking and configured) and registers them, with
    /// the default [`PollOptions`] (GSO and GRO where the kernel has them). Control messages that socket
    /// options add to reads get 40 bytes before GRO's segment size (a `SO_TIMESTAMP` takes 32); a read whose
    /// control data was cut with no segment size in it is dropped (`BackendStats::malformed_reads`), whether
    /// or not it held a batch.
    pub fn new(group: UdpSocket, unicast: UdpSocket, max_datagram: usize) -> io::Result<PollBackend> {
        PollBackend::with_options(group, unicast, max_datagram, PollOptions::default())
    }

    /// [`new`](Self::new) with explicit offload options.
    pub fn with_options(
        group: UdpSocket,
        unicast: UdpSocket,
        max_datagram: usize,
        opts: PollOptions,
    ) -> io::Result<PollBackend> {
        let v6 = unicast.local_addr()?.is_ipv6();
        let gso = Gso::new(if opts.gso { offload::probe_segments(v6) } else { None });
        let gro = opts.gro && {
            // Both are tried; if only one took it, every read still parses the control message.
            let g = offload::enable_gro(&group);
            let u = offload::enable_gro(&unicast);
            g || u
        };
        let max_datagram = max_datagram.max(1);
        let slot_size = if gso.is_on() { max_datagram.max(offload::GSO_BUFFER) } else { max_datagram };
        let poller = Arc::new(Poller::new()?);
        // SAFETY (polling's contract, not memory safety in this crate): each socket is deleted from the poller
        // before it is closed: in `Drop`, or here if the second registration fails.
        unsafe {
            poller.add_with_mode(&group, Event::readable(KEY_GROUP), PollMode::Level)?;
            if let Err(e) = poller.add_with_mode(&unicast, Event::readable(KEY_UNICAST), PollMode::Level) {
                let _ = poller.delete(&group);
                return Err(e);
            }
        }
        Ok(PollBackend {
            poller,
            events: Events::new(),
            group,
            unicast,
            // With GRO one read at a time, into one buffer; otherwise BATCH per recvmmsg.
            recv_bufs: vec![0u8; if gro { RECV_SIZE } else { BATCH * RECV_SIZE }].into_boxed_slice(),
            send_bufs: vec![0u8; BATCH * slot_size].into_boxed_slice(),
            slot_size,
            max_datagram,
            sends: [None; BATCH],
            queued: 0,
            open: None,
            gso,
            gro,
            gro_batches: 0,
            #[cfg(target_os = "linux")]
            sparse: [true; 2],
            unicast_skipped: 0,
            lone: false,
            #[cfg(test)]
            reads: [0; 2],
            send_errors: 0,
            skipped: offload::Skipped::default(),
            scratch: Vec::new(),
            lent: Lent::Nothing,
            #[cfg(target_os = "linux")]
            mmsg: linux::Mmsg::new(),
        })
    }

    /// Segments per GSO send at most (64 or 128), or 0 if the backend does not coalesce (GSO off, refused
    /// by the kernel, or fallen back after a refused send).
    pub fn gso_segments(&self) -> usize {
        if self.gso.is_on() { self.gso.segments } else { 0 }
    }

    /// Times the kernel refused a GSO send and the backend fell back.
    pub fn gso_fallbacks(&self) -> u64 {
        self.gso.fallbacks
    }

    /// GSO sends (of two datagrams or more) the kernel accepted.
    pub fn gso_sends(&self) -> u64 {
        self.gso.sends
    }

    /// Whether `UDP_GRO` is on (reads may hold several datagrams, split before the sink sees them).
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Reads that held a GRO batch (several datagrams, split before the sink).
    pub fn gro_batches(&self) -> u64 {
        self.gro_batches
    }

    /// Receives everything ready on one socket (bounded rounds).
    ///
    /// With GRO a read returns one datagram or batch, so only a read that finds nothing tells the socket is
    /// empty. When traffic is sparse (the last read found the socket empty), a read that returns a lone
    /// datagram ends the turn instead: the datagram reaches the application a system call sooner (the
    /// round trip of a ping-pong), and the next turn, at most a cycle later, reads on until empty. Such a
    /// turn sets `lone`.
    fn drain(&mut self, which: usize, sink: &mut dyn FnMut(SocketAddr, &mut [u8])) -> io::Result<usize> {
        let sock = if which == KEY_GROUP { &self.group } else { &self.unicast };
        #[cfg(target_os = "linux")]
        if self.gro {
            let (turn, result) = offload::read_turn(
                sock,
                &mut self.recv_bufs[..RECV_SIZE],
                Some(&mut self.mmsg.cmsg),
                &mut self.sparse[which],
                GRO_READS,
                DRAIN_DATAGRAMS,
                sink,
            );
            #[cfg(test)]
            {
                self.reads[which] += turn.reads;
            }
            self.gro_batches += turn.batches;
            self.skipped += turn.skipped;
            self.lone |= turn.lone;
            result?;
            return Ok(turn.datagrams);
        }
        let mut total = 0;
        for _ in 0..MAX_ROUNDS {
            #[cfg(test)]
            {
                self.reads[which] += 1;
            }
            let n = recv_batch(
                sock,
                &mut self.recv_bufs,
                #[cfg(target_os = "linux")]
                &mut self.mmsg,
                #[cfg(target_os = "linux")]
                &mut self.skipped,
                sink,
            )?;
            total += n;
            if n < BATCH {
                break;
            }
        }
        Ok(total)
    }

    /// Closes the batch being filled: it waits for `flush` with the others.
    fn close_open(&mut self) {
        if let Some(b) = self.open.take() {
            self.sends[self.queued] = Some(b);
            self.queued += 1;
        }
    }

    /// Sends the closed batches.
    fn send_queued(&mut self) -> io::Result<()> {
        if self.queued == 0 {
            return Ok(());
        }
        let n = self.queued;
        self.queued = 0;
        self.send_errors += send_batch(
            &self.unicast,
            &self.send_bufs,
            self.slot_size,
            &self.sends[..n],
            &mut self.gso,
            #[cfg(target_os = "linux")]
            &mut self.mmsg,
        )?;
        Ok(())
    }
}

impl Drop for PollBackend {
    fn drop(&mut self) {
        let _ = self.poller.delete(&self.group);
        let _ = self.poller.delete(&self.unicast);
    }
}

impl Backend for PollBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Poll
    }

    fn queue_send(&mut self, dest: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        let len = bytes.len();
        if len > self.max_datagram {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "datagram larger than max_datagram"));
        }
        if let Some(b) = self.open.as_mut() {
            if b.accepts(dest, len, self.gso.segments) {
                let at = self.queued * self.slot_size + b.len;
                self.send_bufs[at..at + len].copy_from_slice(bytes);
                b.push(len);
                if b.is_full(self.gso.segments) {
                    self.close_open();
                }
                return Ok(());
            }
            self.close_open();
        }
        if self.queued == BATCH {
            self.send_queued()?;
        }
        let at = self.queued * self.slot_size;
        self.send_bufs[at..at + len].copy_from_slice(bytes);
        let b = Batch::new(dest, len);
        if b.is_full(self.gso.segments) {
            self.sends[self.queued] = Some(b);
            self.queued += 1;
        } else {
            self.open = Some(b);
        }
        Ok(())
    }

    fn send_buffer(&mut self, max_len: usize) -> &mut [u8] {
        let open = self.open.map(|b| (self.queued, b.len));
        self.lent = Lent::lend(open, self.slot_size, max_len, &mut self.scratch);
        match self.lent {
            Lent::Tail { slot, at, room } => &mut self.send_bufs[slot * self.slot_size + at..][..room],
            _ => &mut self.scratch,
        }
    }

    fn commit_send(&mut self, dest: SocketAddr, len: usize) -> io::Result<()> {
        let lent = std::mem::replace(&mut self.lent, Lent::Nothing);
        let open = self.open.as_ref().map(|b| (self.queued, b));
        match lent.commit(len, open, dest, self.max_datagram, self.gso.segments) {
            Commit::Grow => {
                let Some(b) = self.open.as_mut() else { return Ok(()) };
                b.push(len);
                if b.is_full(self.gso.segments) {
                    self.close_open();
                }
                Ok(())
            }
            c @ (Commit::Requeue { .. } | Commit::Scratch) => {
                let mut scratch = std::mem::take(&mut self.scratch);
                if let Commit::Requeue { slot, at } = c {
                    // Written after a batch it cannot join: moved out, and queued like any other datagram.
                    let start = slot * self.slot_size + at;
                    scratch.clear();
                    scratch.extend_from_slice(&self.send_bufs[start..start + len]);
                }
                let r = self.queue_send(dest, &scratch[..len]);
                self.scratch = scratch;
                r
            }
            Commit::Invalid => Err(offload::invalid_commit()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.close_open();
        self.send_queued()
    }

    fn receive(&mut self, timeout: Option<Duration>, sink: &mut dyn FnMut(SocketAddr, &mut [u8])) -> io::Result<usize> {
        self.flush()?;
        self.lone = false;
        let mut n = self.drain(KEY_GROUP, sink)?;
        let spinning = timeout == Some(Duration::ZERO);
        // A lone datagram after idleness goes up before the unicast read that is due: the next receive, which
        // reads the group socket to the end, does it.
        if !spinning || (self.unicast_skipped + 1 >= UNICAST_EVERY && !self.lone) {
            self.unicast_skipped = 0;
            n += self.drain(KEY_UNICAST, sink)?;
        } else {
            self.unicast_skipped += 1;
        }
        if n == 0 && !spinning {
            self.events.clear();
            match self.poller.wait(&mut self.events, timeout) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            n = self.drain(KEY_GROUP, sink)? + self.drain(KEY_UNICAST, sink)?;
        }
        Ok(n)
    }

    fn receive_all(&mut self, sink: &mut dyn FnMut(SocketAddr, &mut [u8])) -> io::Result<usize> {
        self.flush()?;
        let mut total = 0;
        for _ in 0..RECEIVE_ALL_PASSES {
            // Both sockets every pass, each read on until it is found empty (no lone datagram handed early).
            #[cfg(target_os = "linux")]
            {
                self.sparse = [false; 2];
            }
            let n = self.drain(KEY_GROUP, sink)? + self.drain(KEY_UNICAST, sink)?;
            total += n;
            if n == 0 {
                break;
            }
        }
        self.unicast_skipped = 0;
        Ok(total)
    }

    fn waker(&self) -> Arc<dyn Wake> {
        Arc::new(PollWaker(self.poller.clone()))
    }

    fn stats(&self) -> BackendStats {
        BackendStats {
            send_errors: self.send_errors,
            gso_sends: self.gso.sends,
            gso_fallbacks: self.gso.fallbacks,
            gro_batches: self.gro_batches,
            truncated: self.skipped.truncated,
            malformed_reads: self.skipped.malformed_reads,
            ..BackendStats::default()
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn recv_batch(sock: &UdpSocket, bufs: &mut [u8], sink: &mut dyn FnMut(SocketAddr, &mut [u8])) -> io::Result<usize> {
    let buf = &mut bufs[..RECV_SIZE];
    let mut n = 0;
    while n < BATCH {
        match sock.recv_from(buf) {
            Ok((len, from)) => {
                sink(from, &mut buf[..len]);
                n += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // ICMP errors surface on UDP sockets as failed reads; they say nothing about this datagram stream.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Sends each batch as one datagram (GSO never turns on here).
#[cfg(not(target_os = "linux"))]
fn send_batch(sock: &UdpSocket, bufs: &[u8], size: usize, sends: &[Option<Batch>], _gso: &mut Gso) -> io::Result<u64> {
    let mut errors = 0;
    for (i, b) in sends.iter().enumerate() {
        let Some(b) = b else { continue };
        match sock.send_to(&bufs[i * size..i * size + b.len], b.dest) {
            Ok(_) => {}
            Err(_) => errors += b.count as u64,
        }
    }
    Ok(errors)
}

#[cfg(target_os = "linux")]
use linux::{recv_batch, send_batch};

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::{SocketAddr, UdpSocket};
    use std::os::fd::{AsRawFd, RawFd};

    use nix::errno::Errno;
    use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};

    use super::super::offload::{self, Batch, Gso};
    use super::{BATCH, RECV_SIZE};

    /// Preallocated mmsghdr arrays for both directions, and a control buffer for GRO reads.
    pub(super) struct Mmsg {
        recv: MultiHeaders<SockaddrStorage>,
        send: MultiHeaders<SockaddrStorage>,
        /// Headers with room for a `UDP_SEGMENT` control message each.
        send_gso: MultiHeaders<SockaddrStorage>,
        addrs: [Option<SockaddrStorage>; BATCH],
        results: [(usize, Option<SocketAddr>); BATCH],
        /// Control buffer of a GRO read ([`offload::recv_one`]).
        pub(super) cmsg: Box<[u8]>,
    }

    impl Mmsg {
        pub(super) fn new() -> Mmsg {
            Mmsg {
                recv: MultiHeaders::preallocate(BATCH, None),
                send: MultiHeaders::preallocate(BATCH, None),
                send_gso: MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(u16))),
                addrs: [None; BATCH],
                results: [(0, None); BATCH],
                cmsg: vec![0u8; offload::RECV_CMSG_ROOM].into_boxed_slice(),
            }
        }
    }

    /// One `recvmmsg` of up to `BATCH` datagrams into `bufs`, each handed to `sink`; truncated and
    /// unaddressed ones are dropped and counted in `skipped`.
    pub(super) fn recv_batch(
        sock: &UdpSocket,
        bufs: &mut [u8],
        mmsg: &mut Mmsg,
        skipped: &mut offload::Skipped,
        sink: &mut dyn FnMut(SocketAddr, &mut [u8]),
    ) -> io::Result<usize> {
        let count = {
            let mut chunks = bufs.chunks_exact_mut(RECV_SIZE);
            let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
                std::array::from_fn(|_| [IoSliceMut::new(chunks.next().expect("BATCH buffers"))]);
            // Non-blocking, so EINTR is as good as "nothing now": the caller polls again.
            match recvmmsg(sock.as_raw_fd(), &mut mmsg.recv, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None) {
                Ok(results) => {
                    let mut n = 0;
                    for r in results {
                        // A datagram longer than the buffer is truncated: drop it (it cannot be a Blip packet).
                        if !r.flags.contains(MsgFlags::MSG_TRUNC) {
                            mmsg.results[n] = (r.bytes, r.address.as_ref().and_then(offload::to_std));
                            skipped.malformed_reads += u64::from(mmsg.results[n].1.is_none());
                        } else {
                            skipped.truncated += 1;
                            mmsg.results[n] = (0, None);
                        }
                        n += 1;
                    }
                    n
                }
                Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNREFUSED) => 0,
                Err(e) => return Err(e.into()),
            }
        };
        for (i, &(len, from)) in mmsg.results[..count].iter().enumerate() {
            if let Some(from) = from {
                sink(from, &mut bufs[i * RECV_SIZE..i * RECV_SIZE + len]);
            }
        }
        Ok(count)
    }

    /// The segment size a queued batch is sent with: 0 for a plain send (one datagram).
    fn segment_of(b: &Option<Batch>) -> usize {
        match b {
            Some(b) if b.is_gso() => b.segment,
            _ => 0,
        }
    }

    fn datagrams(sends: &[Option<Batch>]) -> u64 {
        sends.iter().map(|b| b.map_or(0, |b| b.count as u64)).sum()
    }

    /// Sends the queued batches in order, each run of plain sends or of GSO sends with one segment size in
    /// sendmmsg calls. Returns the datagrams the kernel refused.
    pub(super) fn send_batch(
        sock: &UdpSocket,
        bufs: &[u8],
        size: usize,
        sends: &[Option<Batch>],
        gso: &mut Gso,
        mmsg: &mut Mmsg,
    ) -> io::Result<u64> {
        // One lone datagram: a plain sendto, without building the batch's 32 iovecs and sendmmsg's headers
        // (a few hundred nanoseconds of a ping-pong's round trip).
        if let [Some(b)] = sends
            && b.count == 1
        {
            return send_one(sock, &bufs[..b.len], b.dest);
        }
        let fd = sock.as_raw_fd();
        let n = sends.len();
        for (slot, b) in mmsg.addrs.iter_mut().zip(sends) {
            *slot = b.map(|b| SockaddrStorage::from(b.dest));
        }
        let iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|i| {
            let len = sends.get(i).and_then(|b| b.map(|b| b.len)).unwrap_or(0);
            [IoSlice::new(&bufs[i * size..i * size + len])]
        });
        let mut errors = 0u64;
        let mut start = 0;
        while start < n {
            let segment = segment_of(&sends[start]);
            let mut end = start + 1;
            while end < n && segment_of(&sends[end]) == segment {
                end += 1;
            }
            errors += if segment == 0 {
                send_plain(fd, &mut mmsg.send, &iovs[start..end], &mmsg.addrs[start..end])?
            } else {
                let headers = (&mut mmsg.send_gso, &mut mmsg.send);
                send_gso(fd, headers, &iovs[start..end], &mmsg.addrs[start..end], &sends[start..end], segment, gso)?
            };
            start = end;
        }
        Ok(errors)
    }

    /// One datagram with `sendto`, refusals counted as `send_plain` counts them. Returns the datagrams
    /// refused (0 or 1).
    fn send_one(sock: &UdpSocket, bytes: &[u8], dest: SocketAddr) -> io::Result<u64> {
        loop {
            return match sock.send_to(bytes, dest) {
                Ok(_) => Ok(0),
                Err(e) => match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
                    Errno::EINTR => continue,
                    Errno::EAGAIN => Ok(1),
                    errno if errno.len_hint_is_per_datagram() => Ok(1),
                    _ => Err(e),
                },
            };
        }
    }

    /// One datagram per message. Returns the datagrams refused.
    fn send_plain(
        fd: RawFd,
        headers: &mut MultiHeaders<SockaddrStorage>,
        iovs: &[[IoSlice<'_>; 1]],
        addrs: &[Option<SockaddrStorage>],
    ) -> io::Result<u64> {
        let n = iovs.len();
        let mut errors = 0u64;
        let mut done = 0;
        while done < n {
            match sendmmsg(fd, headers, iovs[done..n].iter(), &addrs[done..n], [], MsgFlags::MSG_DONTWAIT) {
                Ok(results) => {
                    let sent = results.count();
                    if sent == 0 {
                        errors += (n - done) as u64;
                        break;
                    }
                    done += sent;
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    // Send buffer full: the protocol repairs what we drop here, and the send buffer is sized
                    // to make this rare. Count and move on rather than block the engine.
                    errors += (n - done) as u64;
                    break;
                }
                Err(e) if e.len_hint_is_per_datagram() => {
                    // The first datagram was refused (e.g. unreachable): skip it, send the rest.
                    errors += 1;
                    done += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(errors)
    }

    /// GSO batches of one segment size, one per message. A batch the kernel refuses as GSO is sent again one
    /// datagram per send (and GSO is turned off or its segment cap lowered, see [`Gso::refused`]). Returns the
    /// datagrams refused.
    fn send_gso(
        fd: RawFd,
        (headers, plain): (&mut MultiHeaders<SockaddrStorage>, &mut MultiHeaders<SockaddrStorage>),
        iovs: &[[IoSlice<'_>; 1]],
        addrs: &[Option<SockaddrStorage>],
        sends: &[Option<Batch>],
        segment: usize,
        gso: &mut Gso,
    ) -> io::Result<u64> {
        let n = iovs.len();
        let seg = segment as u16;
        let cmsgs = [ControlMessage::UdpGsoSegments(&seg)];
        let mut errors = 0u64;
        let mut done = 0;
        while done < n {
            let count = sends[done].map_or(1, |b| b.count);
            if !gso.is_on() || count > gso.segments {
                // GSO went off (or its cap fell) during this flush.
                errors += send_split(fd, plain, &iovs[done][0], sends[done])?;
                done += 1;
                continue;
            }
            match sendmmsg(fd, headers, iovs[done..n].iter(), &addrs[done..n], cmsgs, MsgFlags::MSG_DONTWAIT) {
                Ok(results) => {
                    let sent = results.count();
                    if sent == 0 {
                        errors += datagrams(&sends[done..]);
                        break;
                    }
                    gso.sends += sent as u64;
                    done += sent;
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    errors += datagrams(&sends[done..]);
                    break;
                }
                // Sent again, one datagram per send, at the top of the loop.
                Err(e) if offload::gso_refused(e as i32) => gso.refused(e as i32, count),
                Err(e) if e.len_hint_is_per_datagram() => {
                    errors += count as u64;
                    done += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(errors)
    }

    /// Sends the datagrams of one batch one per message (after the kernel refused it as a GSO send).
    fn send_split(
        fd: RawFd,
        headers: &mut MultiHeaders<SockaddrStorage>,
        bytes: &[u8],
        batch: Option<Batch>,
    ) -> io::Result<u64> {
        let Some(batch) = batch else { return Ok(0) };
        let addrs = [Some(SockaddrStorage::from(batch.dest)); BATCH];
        let mut chunks = bytes.chunks(batch.segment.max(1));
        let mut errors = 0;
        let mut left = batch.count;
        while left > 0 {
            let k = left.min(BATCH);
            let iovs: [[IoSlice<'_>; 1]; BATCH] =
                std::array::from_fn(|i| [IoSlice::new(if i < k { chunks.next().unwrap_or(&[]) } else { &[] })]);
            errors += send_plain(fd, headers, &iovs[..k], &addrs[..k])?;
            left -= k;
        }
        Ok(errors)
    }

    trait PerDatagram {
        fn len_hint_is_per_datagram(&self) -> bool;
    }

    impl PerDatagram for Errno {
        /// Errors that concern the first datagram of the batch rather than the socket.
        fn len_hint_is_per_datagram(&self) -> bool {
            matches!(
                self,
                Errno::ENETUNREACH
                    | Errno::EHOSTUNREACH
                    | Errno::EPERM
                    | Errno::EACCES
                    | Errno::EMSGSIZE
                    | Errno::EINVAL
                    | Errno::ECONNREFUSED
                    | Errno::EADDRNOTAVAIL
            )
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests;
