//! The I/O operations the engine needs, behind one trait with two implementations: io_uring
//! ([`super::uring`], Linux) and a readiness poller ([`super::poll`], everywhere).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Which backend drives a node's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Linux io_uring: batched SendMsg, multishot RecvMsg over a provided-buffer ring.
    Uring,
    /// Readiness polling (`polling` crate) with recvmmsg/sendmmsg on Linux.
    Poll,
    /// No network: an in-process node (`NodeBuilder::local_only`).
    Local,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Uring => "io_uring",
            BackendKind::Poll => "poll",
            BackendKind::Local => "local",
        })
    }
}

/// What a backend counted on its sockets besides the datagrams it handed on: drops, and how it batched.
/// Every backend has the same fields; one that never meets an event leaves its field at 0 (the poll backend
/// has no provided buffers to run dry, for example).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendStats {
    /// Datagrams the kernel refused to send (counted and dropped, see [`Backend::queue_send`]).
    pub send_errors: u64,
    /// Sends of two datagrams or more in one UDP GSO buffer that the kernel took.
    pub gso_sends: u64,
    /// Times the kernel refused a GSO send and the backend fell back (to fewer segments, or to none).
    pub gso_fallbacks: u64,
    /// Reads that held a UDP GRO batch (several datagrams, split before the protocol saw them).
    pub gro_batches: u64,
    /// Datagrams dropped because they did not fit a receive buffer (they cannot be Blip packets).
    pub truncated: u64,
    /// Reads dropped because the kernel's answer named no IPv4 or IPv6 source, had its control data cut (a
    /// GRO batch's segment size may be lost), or could not be made sense of (io_uring:
    /// `UringStats::malformed`, which also counts completions naming an unknown buffer).
    pub malformed_reads: u64,
    /// Failed receives the backend counted and went on from (io_uring), other than "nothing ready" and
    /// `enobufs`. The poll backend returns a failed receive as an error instead and leaves this at 0.
    pub recv_errors: u64,
    /// io_uring: times the provided receive buffers ran dry (the kernel dropped what found no buffer).
    pub enobufs: u64,
    /// io_uring: times sparse traffic on a spinning node put the group socket on plain reads.
    pub plain_switches: u64,
}

/// Non-waiting receives at most in one [`Backend::receive_all`].
pub const RECEIVE_ALL_PASSES: usize = 64;

/// Interrupts a backend's wait from another thread.
pub trait Wake: Send + Sync {
    /// Makes the backend's current or next `receive` wait return promptly. Cheap to call when nobody waits.
    fn wake(&self);
}

/// The sockets a node uses: one bound to the group port that receives the group's traffic, and one bound to
/// an ephemeral port on the interface that sends everything (multicast and unicast) and receives unicast
/// replies (STATUS) addressed to it.
///
/// A backend is created on, and used from, one thread (io_uring's SINGLE_ISSUER requires it), so the trait
/// does not require `Send`.
pub trait Backend {
    /// Which implementation this is.
    fn kind(&self) -> BackendKind;

    /// Queues one datagram to `dest` from the node's sending socket. The bytes are copied; nothing need stay
    /// alive after the call. May buffer until [`flush`](Self::flush) or until the batch is full (then it
    /// submits by itself). A datagram the kernel refuses (e.g. no route) is counted and dropped, not returned
    /// as an error: multicast is best effort and the protocol repairs. Errors are for a broken backend.
    fn queue_send(&mut self, dest: SocketAddr, bytes: &[u8]) -> io::Result<()>;

    /// Lends room for the next datagram, at least `max_len` bytes: a backend that batches sends lends the free
    /// end of the batch being filled, so the datagram is written in place instead of being copied there by
    /// `queue_send`. [`commit_send`](Self::commit_send) then queues what was written; lending again without
    /// committing discards it.
    fn send_buffer(&mut self, max_len: usize) -> &mut [u8];

    /// Queues the first `len` bytes of the room last lent by [`send_buffer`](Self::send_buffer) to `dest`, as
    /// [`queue_send`](Self::queue_send) would queue them. `InvalidInput` if nothing was lent or `len` exceeds
    /// what was.
    fn commit_send(&mut self, dest: SocketAddr, len: usize) -> io::Result<()>;

    /// Submits every queued datagram to the kernel.
    fn flush(&mut self) -> io::Result<()>;

    /// Calls `sink(from, bytes)` for each datagram received on either socket. If none is ready, waits up to
    /// `timeout` (`None`: until one arrives or [`Wake::wake`]; `Some(ZERO)`: do not wait). Returns the number
    /// of datagrams delivered. Queued sends are flushed first. A call may leave ready datagrams for the next
    /// one (the poll backend hands a lone datagram up without a second read to learn that the socket is
    /// empty, bounds each socket's turn, and reads the unicast socket only every few calls that do not
    /// wait); a call that may wait returns instead of waiting while any datagram is ready.
    fn receive(&mut self, timeout: Option<Duration>, sink: &mut dyn FnMut(SocketAddr, &mut [u8])) -> io::Result<usize>;

    /// Receives until every socket is found empty, without waiting (bounded: a socket that keeps filling
    /// ends the call after `RECEIVE_ALL_PASSES` non-waiting receives). For a node whose thread did not run
    /// for a while: it must see what arrived meanwhile before it judges any peer silent. Returns the number
    /// of datagrams delivered.
    fn receive_all(&mut self, sink: &mut dyn FnMut(SocketAddr, &mut [u8])) -> io::Result<usize> {
        let mut total = 0;
        for _ in 0..RECEIVE_ALL_PASSES {
            let n = self.receive(Some(Duration::ZERO), sink)?;
            total += n;
            if n == 0 {
                break;
            }
        }
        Ok(total)
    }

    /// A handle other threads use to interrupt `receive`.
    fn waker(&self) -> Arc<dyn Wake>;

    /// The backend's counters.
    fn stats(&self) -> BackendStats;
}
