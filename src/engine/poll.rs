//! The portable backend: a readiness poller (`polling` crate: epoll, kqueue, event ports, IOCP) over the two
//! non-blocking sockets. On Linux it batches with recvmmsg/sendmmsg (safe wrappers from `nix`); elsewhere it
//! falls back to one `recv_from`/`send_to` per datagram. Everything is allocated in [`PollBackend::new`].

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use polling::{Event, Events, PollMode, Poller};

use super::backend::{Backend, BackendKind, Wake};

/// Datagrams per recvmmsg/sendmmsg call.
const BATCH: usize = 32;
/// Bytes per receive buffer: any UDP payload fits.
const RECV_SIZE: usize = 65_536;
/// recvmmsg calls per socket per `receive`, so one busy socket cannot starve the engine's other work.
const MAX_ROUNDS: usize = 8;

const KEY_GROUP: usize = 0;
const KEY_UNICAST: usize = 1;

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
    send_bufs: Box<[u8]>,
    send_lens: [usize; BATCH],
    send_dests: [Option<SocketAddr>; BATCH],
    queued: usize,
    send_errors: u64,
    #[cfg(target_os = "linux")]
    mmsg: linux::Mmsg,
}

impl PollBackend {
    /// Takes ownership of the node's sockets (already non-blocking and configured) and registers them.
    pub fn new(group: UdpSocket, unicast: UdpSocket, max_datagram: usize) -> io::Result<PollBackend> {
        let poller = Arc::new(Poller::new()?);
        // SAFETY (polling's contract, not memory safety in this crate): each socket is deleted from the poller
        // in `Drop` before it is closed.
        unsafe {
            poller.add_with_mode(&group, Event::readable(KEY_GROUP), PollMode::Level)?;
            poller.add_with_mode(&unicast, Event::readable(KEY_UNICAST), PollMode::Level)?;
        }
        Ok(PollBackend {
            poller,
            events: Events::new(),
            group,
            unicast,
            recv_bufs: vec![0u8; BATCH * RECV_SIZE].into_boxed_slice(),
            send_bufs: vec![0u8; BATCH * max_datagram.max(1)].into_boxed_slice(),
            send_lens: [0; BATCH],
            send_dests: [None; BATCH],
            queued: 0,
            send_errors: 0,
            #[cfg(target_os = "linux")]
            mmsg: linux::Mmsg::new(),
        })
    }

    fn slot_size(&self) -> usize {
        self.send_bufs.len() / BATCH
    }

    /// Receives everything ready on one socket (bounded rounds).
    fn drain(&mut self, which: usize, sink: &mut dyn FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
        let mut total = 0;
        for _ in 0..MAX_ROUNDS {
            let sock = if which == KEY_GROUP { &self.group } else { &self.unicast };
            let n = recv_batch(
                sock,
                &mut self.recv_bufs,
                #[cfg(target_os = "linux")]
                &mut self.mmsg,
                sink,
            )?;
            total += n;
            if n < BATCH {
                break;
            }
        }
        Ok(total)
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
        let size = self.slot_size();
        if bytes.len() > size {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "datagram larger than max_datagram"));
        }
        if self.queued == BATCH {
            self.flush()?;
        }
        let i = self.queued;
        self.send_bufs[i * size..i * size + bytes.len()].copy_from_slice(bytes);
        self.send_lens[i] = bytes.len();
        self.send_dests[i] = Some(dest);
        self.queued += 1;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.queued == 0 {
            return Ok(());
        }
        let size = self.slot_size();
        let n = self.queued;
        self.queued = 0;
        self.send_errors += send_batch(
            &self.unicast,
            &self.send_bufs,
            size,
            &self.send_lens[..n],
            &self.send_dests[..n],
            #[cfg(target_os = "linux")]
            &mut self.mmsg,
        )?;
        Ok(())
    }

    fn receive(&mut self, timeout: Option<Duration>, sink: &mut dyn FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
        self.flush()?;
        let mut n = self.drain(KEY_GROUP, sink)? + self.drain(KEY_UNICAST, sink)?;
        if n == 0 && timeout != Some(Duration::ZERO) {
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

    fn waker(&self) -> Arc<dyn Wake> {
        Arc::new(PollWaker(self.poller.clone()))
    }

    fn send_errors(&self) -> u64 {
        self.send_errors
    }
}

#[cfg(not(target_os = "linux"))]
fn recv_batch(sock: &UdpSocket, bufs: &mut [u8], sink: &mut dyn FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
    let buf = &mut bufs[..RECV_SIZE];
    let mut n = 0;
    while n < BATCH {
        match sock.recv_from(buf) {
            Ok((len, from)) => {
                sink(from, &buf[..len]);
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

#[cfg(not(target_os = "linux"))]
fn send_batch(
    sock: &UdpSocket,
    bufs: &[u8],
    size: usize,
    lens: &[usize],
    dests: &[Option<SocketAddr>],
) -> io::Result<u64> {
    let mut errors = 0;
    for (i, (&len, dest)) in lens.iter().zip(dests).enumerate() {
        let Some(dest) = dest else { continue };
        match sock.send_to(&bufs[i * size..i * size + len], dest) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => errors += 1,
            Err(_) => errors += 1,
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
    use std::os::fd::AsRawFd;

    use nix::errno::Errno;
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};

    use super::{BATCH, RECV_SIZE};

    /// Preallocated mmsghdr arrays for both directions.
    pub(super) struct Mmsg {
        recv: MultiHeaders<SockaddrStorage>,
        send: MultiHeaders<SockaddrStorage>,
        addrs: [Option<SockaddrStorage>; BATCH],
        results: [(usize, Option<SocketAddr>); BATCH],
    }

    impl Mmsg {
        pub(super) fn new() -> Mmsg {
            Mmsg {
                recv: MultiHeaders::preallocate(BATCH, None),
                send: MultiHeaders::preallocate(BATCH, None),
                addrs: [None; BATCH],
                results: [(0, None); BATCH],
            }
        }
    }

    fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
        if let Some(v4) = addr.as_sockaddr_in() {
            Some(SocketAddr::V4((*v4).into()))
        } else {
            addr.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
        }
    }

    pub(super) fn recv_batch(
        sock: &UdpSocket,
        bufs: &mut [u8],
        mmsg: &mut Mmsg,
        sink: &mut dyn FnMut(SocketAddr, &[u8]),
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
                            mmsg.results[n] = (r.bytes, r.address.as_ref().and_then(to_std));
                        } else {
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
                sink(from, &bufs[i * RECV_SIZE..i * RECV_SIZE + len]);
            }
        }
        Ok(count)
    }

    pub(super) fn send_batch(
        sock: &UdpSocket,
        bufs: &[u8],
        size: usize,
        lens: &[usize],
        dests: &[Option<SocketAddr>],
        mmsg: &mut Mmsg,
    ) -> io::Result<u64> {
        let n = lens.len();
        for (slot, dest) in mmsg.addrs.iter_mut().zip(dests) {
            *slot = dest.map(SockaddrStorage::from);
        }
        let iovs: [[IoSlice<'_>; 1]; BATCH] =
            std::array::from_fn(|i| [IoSlice::new(&bufs[i * size..i * size + if i < n { lens[i] } else { 0 }])]);
        let mut errors = 0u64;
        let mut done = 0;
        while done < n {
            let res = sendmmsg(
                sock.as_raw_fd(),
                &mut mmsg.send,
                iovs[done..n].iter(),
                &mmsg.addrs[done..n],
                [],
                MsgFlags::MSG_DONTWAIT,
            );
            match res {
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
