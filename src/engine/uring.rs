//! io_uring backend (Linux).
//!
//! # Design
//!
//! - **One ring per backend**, created on the thread that drives it. Setup walks a downgrade ladder of flags:
//!   `SINGLE_ISSUER|DEFER_TASKRUN`, then `SINGLE_ISSUER|COOP_TASKRUN|TASKRUN_FLAG`, then `COOP_TASKRUN`, then
//!   none; [`UringBackend::setup_flags`] tells which one the kernel took. Every non-blocking reap enters the
//!   kernel with `GETEVENTS`, so deferred task work runs whatever the flags.
//! - **Receive**: one multishot `RecvMsgMulti` per socket (group and unicast), both drawing from one
//!   registered provided-buffer ring of [`UringOptions::buffers`] buffers. Each completion names a buffer that
//!   holds an `io_uring_recvmsg_out` header, the source address (room for a `sockaddr_storage`) and the
//!   payload; it is parsed with `RecvMsgOut::parse` against the msghdr template used to arm the receive,
//!   handed to the sink, and the buffer goes straight back to the ring. When a multishot ends (ENOBUFS
//!   because the ring ran dry, a CQ overflow, an error) it is re-armed after the buffers are back: the
//!   datagrams wait in the socket meanwhile, nothing is lost.
//! - **Sparse traffic, spinning**: an armed multishot receive costs every datagram a round of task work
//!   before user space sees it (a 64-byte round trip of a ping-pong measured 9.2 against 5.1 us for a spun
//!   plain read on this machine kind). So after `PLAIN_AFTER` (256) spinning receives in a row (`receive`
//!   with a zero timeout) that each found at most one datagram, with nothing to submit and no send in
//!   flight (replies and pings leave by `sendto`, see below), the group socket's multishot receive is
//!   cancelled and the socket is read by plain non-blocking `recvmsg` calls (GRO batches split as above);
//!   the ring is then entered only when a send or submission is waiting, and every `ENTER_EVERY` (4)
//!   receives otherwise (for the unicast socket's multishot receive and the waker). A read that finds a GRO
//!   batch or several datagrams (bulk traffic), `PLAIN_SENDING` (8) receives in a row with sends in the ring
//!   (bulk sending), or a `receive` that may wait arms the multishot receive again; the datagrams queued
//!   meanwhile wait in the socket, so nothing is lost or reordered.
//! - **Send**: [`UringOptions::send_batch`] slots, each with its own buffer, address, iovec and msghdr at
//!   stable addresses. `queue_send` copies into a free slot and queues a `SendMsg`; `flush` (or `receive`)
//!   submits; a completion frees its slot. When every slot is busy, `queue_send` submits and reaps (bounded).
//!   Receive completions reaped there are stashed and delivered by the next `receive`. A lone datagram that
//!   `receive` finds with nothing else to submit and no send in flight (a reply, a ping) goes out by a plain
//!   `sendto` instead: one system call, no submission and completion to go through.
//! - **GSO** ([`UringOptions::gso`]): consecutive datagrams to one destination with one length are appended
//!   into one slot (up to the kernel's segment cap, 128 or 64, found by a probe, and 65,507 bytes; one shorter
//!   datagram may end the batch) and go out as one `SendMsg` whose msghdr carries a `UDP_SEGMENT` control
//!   message from the slot's own control buffer. The batch being filled is submitted when a datagram does not
//!   fit it, and by `flush` and `receive`: a lone datagram is never held back. Slots then hold 64 KiB each, so
//!   at most [`GSO_SLOTS`] are used. A GSO send the kernel refuses (EINVAL, EIO, EOPNOTSUPP, EMSGSIZE) counts
//!   its datagrams as send errors and turns coalescing off for good (or lowers the segment cap to 64).
//! - **GRO** ([`UringOptions::gro`]): `UDP_GRO` on both sockets, so that a GSO batch arrives whole in one
//!   buffer; the receive template has room for the `UDP_GRO` control message, and a buffer carrying one is cut
//!   back into its datagrams before the sink sees them. Receive buffers then hold 64 KiB each, so at most
//!   [`GRO_BUFFERS`] are used.
//! - **Wake**: an eventfd with a `Read` armed in the ring; [`Wake::wake`] writes to it from any thread.
//! - **No allocation per datagram**: all memory (buffers, slots, the stash) is allocated in `new`.
//! - **Teardown**: dropping the ring fd does not stop in-flight operations synchronously (the kernel cancels
//!   them later, from a work queue), so `Drop` cancels every operation it has in flight and reaps until each
//!   has completed before any buffer is freed. Fields are declared so that the ring drops before the memory.
//!   If the drain cannot finish (e.g. the backend is dropped on a thread other than its creator's, which a
//!   `SINGLE_ISSUER` ring refuses), the memory the kernel might still write is leaked rather than freed.

mod addr;
mod mem;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use io_uring::{EnterFlags, IoUring, Probe, cqueue, opcode, squeue, types};

use super::backend::{Backend, BackendKind, BackendStats, RECEIVE_ALL_PASSES, Wake};
use super::offload::{self, Batch, Commit, Gso, Lent};
use mem::{BufRing, Region};

/// Bytes at the start of every receive buffer before the payload: the kernel's `io_uring_recvmsg_out`
/// header (16 bytes) and room for the source address (a `sockaddr_storage`, 128 bytes). A receive buffer of
/// `buffer_size` bytes holds datagrams of up to `buffer_size - RECV_OVERHEAD` bytes.
pub const RECV_OVERHEAD: usize = RECVMSG_OUT_HEADER + size_of::<libc::sockaddr_storage>();

/// Receive buffers used at most with GRO on (each then holds 64 KiB).
pub const GRO_BUFFERS: u16 = 256;
/// Send slots used at most with GSO on (each then holds 64 KiB).
pub const GSO_SLOTS: usize = 32;

/// Where received datagrams go: `(source, payload)`.
type Sink<'a> = dyn FnMut(SocketAddr, &mut [u8]) + 'a;

/// Size of the kernel's `struct io_uring_recvmsg_out` (namelen, controllen, payloadlen, flags: four u32).
const RECVMSG_OUT_HEADER: usize = 16;

/// The buffer group id of the provided-buffer ring.
const BGID: u16 = 0;

/// user_data of the group socket's multishot receive (socket index 0).
const UD_RECV_GROUP: u64 = 0;
/// user_data of the unicast socket's multishot receive (socket index 1).
const UD_RECV_UNICAST: u64 = 1;
/// user_data of the eventfd read.
const UD_WAKE: u64 = 2;
/// user_data of cancellation requests (their completions are ignored).
const UD_CANCEL: u64 = 3;
/// user_data of send slot `i` is `UD_SEND + i`.
const UD_SEND: u64 = 1 << 32;

/// Spinning receives in a row that each found at most one datagram before the group socket is read by plain
/// system calls instead of its multishot receive (module docs, "Sparse traffic"). A few hundred
/// microseconds of spinning: bulk traffic, which fills GRO batches, never gets there.
const PLAIN_AFTER: u32 = 256;
/// While the group socket is read plainly: spinning receives per entry into the ring when no send or
/// submission is waiting. The ring then holds the unicast socket's receive (STATUS reports, which can wait
/// a few microseconds) and the waker.
const ENTER_EVERY: u32 = 4;
/// Plain receives in a row that had something to submit (sends, mostly) or a send in flight before the group
/// socket goes back to its multishot receive: a node that sends in bulk enters the ring every cycle anyway,
/// and a plain read would add a system call to each.
const PLAIN_SENDING: u32 = 8;
/// Plain reads of the group socket per receive at most (each a datagram or a GRO batch).
const PLAIN_READS: usize = 64;

/// How the group socket is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupRead {
    /// By its multishot receive (armed, or re-armed once its buffers are back).
    Multishot,
    /// Its multishot receive is being cancelled; completions still come from it until the final one.
    Cancelling,
    /// By plain non-blocking `recvmsg` calls.
    Plain,
}

/// How long `queue_send` waits for a send slot before reporting the backend broken.
const SLOT_WAIT: Duration = Duration::from_secs(5);
/// How long `Drop` waits for cancelled operations to complete before leaking their memory instead.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// Backends whose teardown could not drain the ring and leaked their buffers instead (see `Drop`).
static LEAKED_TEARDOWNS: AtomicU64 = AtomicU64::new(0);

/// How many backends were dropped without being able to drain their ring (for example on a thread other
/// than the one that created them): each leaked its buffers (a few MiB) rather than free memory the kernel
/// might still write.
pub fn leaked_teardowns() -> u64 {
    LEAKED_TEARDOWNS.load(Ordering::Relaxed)
}

/// Sizes of the ring and its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringOptions {
    /// Submission queue entries (default 256). The completion queue is sized from the buffers and slots.
    pub entries: u32,
    /// Receive buffers in the provided-buffer ring, shared by both sockets: a power of two, at most 32768
    /// (default 1024). With GRO on, at most [`GRO_BUFFERS`] are used.
    pub buffers: u16,
    /// Bytes per receive buffer and per send slot (default 2048). A receive buffer holds a datagram of up
    /// to `buffer_size - RECV_OVERHEAD` bytes (1904 by default: a 1472-byte datagram fits); a longer one
    /// is dropped and counted as truncated. A send is refused beyond `buffer_size` bytes. With GRO on,
    /// receive buffers hold 64 KiB whatever this says (see [`UringBackend::max_datagram`]); with GSO on,
    /// send slots too.
    pub buffer_size: usize,
    /// Sends in flight at most (default 64). With GSO on, at most [`GSO_SLOTS`] (each may carry a batch).
    pub send_batch: usize,
    /// Coalesce consecutive datagrams to one destination into UDP GSO sends (default true). Off by itself
    /// where the kernel does not support it.
    pub gso: bool,
    /// Turn on `UDP_GRO` on both sockets and split the batches it delivers (default true). Off by itself
    /// where the kernel does not support it.
    pub gro: bool,
}

impl Default for UringOptions {
    fn default() -> UringOptions {
        UringOptions { entries: 256, buffers: 1024, buffer_size: 2048, send_batch: 64, gso: true, gro: true }
    }
}

impl UringOptions {
    fn validate(&self) -> Result<(), UringError> {
        let bad = |what: String| Err(UringError::InvalidOptions(what));
        if self.entries == 0 || self.entries > 32768 {
            return bad(format!("entries must be 1..=32768, not {}", self.entries));
        }
        if !self.buffers.is_power_of_two() || self.buffers > 32768 {
            return bad(format!("buffers must be a power of two up to 32768, not {}", self.buffers));
        }
        if self.buffer_size <= RECV_OVERHEAD || self.buffer_size > u32::MAX as usize {
            return bad(format!(
                "buffer_size must exceed the {RECV_OVERHEAD}-byte receive header (and fit in u32), not {}",
                self.buffer_size
            ));
        }
        if self.send_batch == 0 || self.send_batch > usize::from(u16::MAX) {
            return bad(format!("send_batch must be 1..=65535, not {}", self.send_batch));
        }
        Ok(())
    }

    /// Completion queue entries for `buffers` receive buffers and `slots` send slots: room for a completion
    /// per buffer twice over plus every send in flight, so that a burst does not overflow the queue (which
    /// would end the multishot receives).
    fn cq_entries(&self, buffers: u16, slots: usize) -> u32 {
        let need = 2 * u32::from(buffers) + slots as u32 + 16;
        need.max(2 * self.entries).next_power_of_two().min(65536)
    }
}

/// Why the io_uring backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// io_uring cannot be used here: absent from the kernel, blocked (seccomp, sysctl), or missing a feature.
    #[error("io_uring is unavailable: {0}; use the poll backend (BLIP_BACKEND=poll)")]
    Unavailable(String),
    /// The kernel refused ring or buffer memory (ENOMEM): the locked-memory limit is too small.
    #[error(
        "io_uring setup failed with ENOMEM: the locked-memory limit (`ulimit -l`: {limit}) is too small for the \
         ring and its buffers; raise it (e.g. `ulimit -l 65536`, or LimitMEMLOCK= for a systemd service), use \
         fewer buffers, or use the poll backend (BLIP_BACKEND=poll)"
    )]
    Memlock {
        /// The current limit, as read from /proc/self/limits.
        limit: String,
    },
    /// The options are out of range.
    #[error("invalid io_uring options: {0}")]
    InvalidOptions(String),
    /// Creating the ring, the eventfd or the buffers failed for another reason.
    #[error("io_uring setup failed: {0}")]
    Setup(#[source] io::Error),
    /// Registering the provided-buffer ring or arming the first operations failed.
    #[error("io_uring registration failed: {0}")]
    Register(#[source] io::Error),
}

/// One rung of the setup-flag downgrade ladder.
#[derive(Clone, Copy)]
struct Rung {
    name: &'static str,
    single_issuer: bool,
    defer_taskrun: bool,
    coop_taskrun: bool,
    taskrun_flag: bool,
}

const LADDER: [Rung; 4] = [
    Rung {
        name: "SINGLE_ISSUER|DEFER_TASKRUN",
        single_issuer: true,
        defer_taskrun: true,
        coop_taskrun: false,
        taskrun_flag: false,
    },
    Rung {
        name: "SINGLE_ISSUER|COOP_TASKRUN|TASKRUN_FLAG",
        single_issuer: true,
        defer_taskrun: false,
        coop_taskrun: true,
        taskrun_flag: true,
    },
    Rung { name: "COOP_TASKRUN", single_issuer: false, defer_taskrun: false, coop_taskrun: true, taskrun_flag: false },
    Rung { name: "none", single_issuer: false, defer_taskrun: false, coop_taskrun: false, taskrun_flag: false },
];

/// A ring, the rung of the ladder it was built with, and the rungs refused before (name, reason).
struct BuiltRing {
    ring: IoUring,
    flags: &'static str,
    rejected: Vec<(&'static str, String)>,
}

/// Creates a ring with the best flags the kernel accepts. EINVAL moves down the ladder; anything else
/// (ENOSYS, EPERM, ENOMEM) means io_uring itself is unusable and stops.
fn build_ring(entries: u32, cq_entries: u32, first_rung: usize) -> Result<BuiltRing, UringError> {
    let mut rejected = Vec::new();
    for rung in &LADDER[first_rung..] {
        let mut builder: io_uring::Builder = IoUring::builder();
        builder.setup_cqsize(cq_entries);
        if rung.single_issuer {
            builder.setup_single_issuer();
        }
        if rung.defer_taskrun {
            builder.setup_defer_taskrun();
        }
        if rung.coop_taskrun {
            builder.setup_coop_taskrun();
        }
        if rung.taskrun_flag {
            builder.setup_taskrun_flag();
        }
        match builder.build(entries) {
            Ok(ring) => return Ok(BuiltRing { ring, flags: rung.name, rejected }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => rejected.push((rung.name, e.to_string())),
            Err(e) => return Err(classify_setup_error(e)),
        }
    }
    Err(UringError::Unavailable(format!("the kernel rejected every setup flag combination: {rejected:?}")))
}

/// Names the cause of a failed `io_uring_setup`.
fn classify_setup_error(e: io::Error) -> UringError {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => UringError::Unavailable(
            "io_uring_setup returned ENOSYS: the kernel is built without io_uring (CONFIG_IO_URING) or too old"
                .to_string(),
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => {
            let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
            let cause = match sysctl.trim() {
                "2" => "the sysctl kernel.io_uring_disabled=2 disables it for everyone",
                "1" => "the sysctl kernel.io_uring_disabled=1 restricts it to the group kernel.io_uring_group",
                _ => "a seccomp profile blocks it (e.g. a container runtime's default profile)",
            };
            UringError::Unavailable(format!("io_uring_setup was refused ({e}): {cause}"))
        }
        Some(libc::ENOMEM) => UringError::Memlock { limit: memlock_limit() },
        _ => UringError::Setup(e),
    }
}

/// Names the cause of a failed registration (buffer ring, probe).
fn classify_register_error(e: io::Error) -> UringError {
    match e.raw_os_error() {
        Some(libc::ENOMEM) => UringError::Memlock { limit: memlock_limit() },
        Some(libc::EINVAL) => {
            UringError::Unavailable(format!("registering a provided-buffer ring failed ({e}): Linux 5.19+ is needed"))
        }
        _ => UringError::Register(e),
    }
}

/// The locked-memory limit as `ulimit -l` shows it, read from /proc/self/limits.
fn memlock_limit() -> String {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    for line in limits.lines() {
        if let Some(rest) = line.strip_prefix("Max locked memory") {
            let soft = rest.split_whitespace().next().unwrap_or("?");
            return match soft.parse::<u64>() {
                Ok(bytes) => format!("{} KiB", bytes / 1024),
                Err(_) => soft.to_string(),
            };
        }
    }
    "unknown".to_string()
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// The setup flags the kernel accepted (the first rung of the downgrade ladder that worked).
    pub setup_flags: &'static str,
    /// Rungs tried before, with the kernel's reason for refusing them.
    pub rejected: Vec<(&'static str, String)>,
    /// `IORING_FEAT_NODROP`: completions are never dropped on CQ overflow.
    pub nodrop: bool,
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "io_uring on Linux {}: setup flags {}", self.kernel, self.setup_flags)?;
        for (rung, why) in &self.rejected {
            write!(f, "; {rung} refused ({why})")?;
        }
        if !self.nodrop {
            f.write_str("; no IORING_FEAT_NODROP")?;
        }
        Ok(())
    }
}

/// Checks that this kernel supports everything the backend uses: creates a small ring (walking the
/// setup-flag ladder), checks the opcodes (RecvMsg, SendMsg, Read, AsyncCancel), the extended-argument wait
/// and provided-buffer rings. `Err` names the cause and what to change.
pub fn probe() -> Result<ProbeReport, String> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    // Allocated before the ring so that it is dropped after it.
    let buf_ring = BufRing::new(8).map_err(|e| format!("allocating a buffer ring: {e}"))?;
    let BuiltRing { ring, flags: setup_flags, rejected } = build_ring(8, 16, 0).map_err(|e| e.to_string())?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| format!("io_uring opcode probe failed: {e}"))?;
    let needed = [
        (opcode::RecvMsg::CODE, "RecvMsg"),
        (opcode::SendMsg::CODE, "SendMsg"),
        (opcode::Read::CODE, "Read"),
        (opcode::AsyncCancel::CODE, "AsyncCancel"),
    ];
    let missing: Vec<&str> = needed.iter().filter(|(code, _)| !probe.is_supported(*code)).map(|(_, n)| *n).collect();
    if !missing.is_empty() {
        return Err(format!("io_uring on Linux {kernel} lacks {}; use the poll backend", missing.join(", ")));
    }
    if !ring.params().is_feature_ext_arg() {
        return Err(format!("io_uring on Linux {kernel} cannot wait with a timeout (needs 5.11+)"));
    }
    let major_minor: Vec<u32> = kernel.split(['.', '-']).take(2).filter_map(|p| p.parse().ok()).collect();
    if major_minor.len() == 2 && major_minor[0] < 6 {
        return Err(format!("multishot RecvMsg needs Linux 6.0+, this is {kernel}; use the poll backend"));
    }
    // SAFETY: the ring memory is page aligned and holds 8 entries. It outlives its registration: it was
    // allocated before `ring`, so it is dropped after it, and it is unregistered just below anyway. No
    // operation that selects a buffer from it is ever armed.
    unsafe { ring.submitter().register_buf_ring_with_flags(buf_ring.addr(), 8, BGID, 0) }
        .map_err(|e| classify_register_error(e).to_string())?;
    ring.submitter().unregister_buf_ring(BGID).map_err(|e| format!("unregistering a buffer ring: {e}"))?;
    Ok(ProbeReport { kernel, setup_flags, rejected, nodrop: ring.params().is_feature_nodrop() })
}

/// Counters kept by the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UringStats {
    /// Datagrams handed to a sink.
    pub received: u64,
    /// Datagrams the kernel sent (a GSO send counts each of its datagrams).
    pub sent: u64,
    /// Datagrams the kernel refused to send (e.g. ENETUNREACH, EPERM; every datagram of a refused GSO send).
    pub send_errors: u64,
    /// GSO sends (two datagrams or more) the kernel completed.
    pub gso_sends: u64,
    /// Times the kernel refused a GSO send and the backend fell back (to 64 segments, or to no GSO).
    pub gso_fallbacks: u64,
    /// Receive buffers that held a GRO batch (several datagrams, split before the sink).
    pub gro_batches: u64,
    /// Datagrams dropped because they did not fit a receive buffer (MSG_TRUNC), plain reads included.
    pub truncated: u64,
    /// Receive completions (and plain reads) that could not be parsed, named an unknown address family, or
    /// had their control data cut under GRO.
    pub malformed: u64,
    /// Receive completions with an error other than ENOBUFS.
    pub recv_errors: u64,
    /// Times the buffer ring ran dry (ENOBUFS), ending a multishot receive.
    pub enobufs: u64,
    /// Times a multishot receive ended and was re-armed.
    pub rearms: u64,
    /// Lone datagrams sent with a plain `sendto` instead of a `SendMsg` (counted in `sent` too).
    pub plain_sends: u64,
    /// Times sparse traffic on a spinning backend put the group socket on plain reads.
    pub plain_switches: u64,
    /// Datagrams received by plain reads of the group socket (counted in `received` too).
    pub plain_received: u64,
}

/// The eventfd behind [`UringBackend::waker`]; closed when the backend and every waker are gone.
struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a fresh descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a valid descriptor just returned by eventfd, owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

impl Wake for EventFd {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of a live u64 to a descriptor this value owns. EAGAIN (counter
        // saturated) means a wake is already pending, so the result can be ignored.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), size_of::<u64>()) };
    }
}

/// A control-message buffer for `UDP_SEGMENT`, aligned like a `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; offload::GSO_CMSG_SPACE]);

/// One send slot's metadata; its payload buffer is slice `i` of `State::send_bufs`.
struct SendSlot {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
    iov: libc::iovec,
    msg: libc::msghdr,
    cmsg: CmsgBuf,
    /// Datagrams in the send (more than one: a GSO send).
    count: usize,
    busy: bool,
}

/// A receive completion reaped while no sink was at hand (in `queue_send`), delivered by the next `receive`.
#[derive(Clone, Copy)]
struct Stashed {
    bid: u16,
    len: u32,
}

impl Stashed {
    /// The buffer id of an entry already delivered (never a real one: there are at most 32,768 buffers).
    const TAKEN: u16 = u16::MAX;
}

/// A zeroed msghdr: null pointers and zero lengths.
fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain data (pointers and integers); all-zero bytes are a valid value of it.
    unsafe { std::mem::zeroed() }
}

/// The io_uring [`Backend`]. See the [module documentation](self) for the design.
///
/// Must be used (and dropped) on the thread that created it: the ring is created `SINGLE_ISSUER` where the
/// kernel allows, and such a ring refuses other threads (every call then fails with an error saying so).
pub struct UringBackend {
    // Declared first so that it drops first: by the time the buffers in `st` are freed, the ring fd is
    // closed and Drop has already reaped the final completion of every operation that used them.
    ring: IoUring,
    setup_flags: &'static str,
    st: State,
}

/// Everything but the ring, so that completions can be handled while the completion queue is borrowed.
struct State {
    group: UdpSocket,
    unicast: UdpSocket,
    eventfd: Arc<EventFd>,
    /// Receive buffers in the ring.
    buffers: u16,
    /// Largest datagram `queue_send` takes.
    buffer_size: usize,
    /// Bytes per receive buffer.
    recv_size: usize,
    /// Bytes reserved for control data in each receive buffer (the template's `msg_controllen`).
    recv_control: usize,
    /// Bytes per send slot.
    slot_size: usize,
    /// The msghdr both multishot receives are armed with (only its name and control lengths matter).
    /// A boxed slice of one, so that it can be leaked with `mem::take`.
    recv_msg: Box<[libc::msghdr]>,
    buf_ring: BufRing,
    buf_ring_registered: bool,
    recv_bufs: Region,
    recv_armed: [bool; 2],
    rearm: [bool; 2],
    recv_failed: bool,
    stash: Vec<Stashed>,
    slots: Box<[SendSlot]>,
    send_bufs: Region,
    free: Vec<u16>,
    sends_in_flight: usize,
    /// The GSO batch being filled: its slot (busy, not yet submitted) and what it holds.
    open: Option<(u16, Batch)>,
    /// Lent by `send_buffer` when the open batch has no room (or there is none).
    scratch: Vec<u8>,
    lent: Lent,
    gso: Gso,
    gro: bool,
    wake_buf: Region,
    wake_armed: bool,
    woken: bool,
    group_read: GroupRead,
    /// Spinning receives in a row that delivered at most one datagram and had no send to submit or in flight.
    sparse_spins: u32,
    /// Plain receives in a row that had sends to submit or in flight.
    sending_spins: u32,
    /// Whether the last plain read of the group socket found it empty.
    plain_empty: bool,
    /// Plain receives since the ring was last entered.
    enter_skipped: u32,
    /// Buffer and control buffer of plain reads.
    plain_buf: Box<[u8]>,
    plain_cmsg: Box<[u8]>,
    stats: UringStats,
}

// SAFETY: the raw pointers in State (msghdr/iovec fields, regions) point into memory owned by State itself,
// with no thread affinity. The ring's own thread restriction (SINGLE_ISSUER) is enforced by the kernel with
// EEXIST, not by memory safety.
unsafe impl Send for State {}

impl State {
    /// Ops the kernel may still be working on (and so may still touch our memory).
    fn in_flight(&self) -> usize {
        self.recv_armed.iter().filter(|a| **a).count() + usize::from(self.wake_armed) + self.sends_in_flight
    }

    /// Handles one completion; returns the datagrams delivered.
    fn complete(&mut self, ud: u64, res: i32, flags: u32, sink: Option<&mut Sink<'_>>) -> usize {
        if ud >= UD_SEND {
            let i = (ud - UD_SEND) as usize;
            let open = self.open.map(|(o, _)| usize::from(o));
            if let Some(slot) = self.slots.get_mut(i).filter(|s| s.busy && open != Some(i)) {
                slot.busy = false;
                self.free.push(i as u16);
                self.sends_in_flight -= 1;
                let count = slot.count;
                if res >= 0 {
                    self.stats.sent += count as u64;
                    if count > 1 {
                        self.stats.gso_sends += 1;
                        self.gso.sends += 1;
                    }
                } else {
                    self.stats.send_errors += count as u64;
                    if count > 1 && offload::gso_refused(-res) {
                        self.gso.refused(-res, count);
                        self.stats.gso_fallbacks = self.gso.fallbacks;
                    }
                }
            }
            return 0;
        }
        match ud {
            UD_WAKE => {
                self.wake_armed = false;
                if res != -libc::ECANCELED {
                    self.woken = true;
                }
                0
            }
            UD_RECV_GROUP | UD_RECV_UNICAST => {
                let i = ud as usize;
                if !cqueue::more(flags) {
                    self.recv_armed[i] = false;
                    if ud == UD_RECV_GROUP && self.group_read == GroupRead::Cancelling {
                        self.group_read = GroupRead::Plain;
                        self.stats.plain_switches += 1;
                    } else {
                        // Cancelled too, when a cancel that reported failure (EALREADY) took effect after all
                        // and the group socket stayed on its multishot receive: without a new one it would
                        // never be read again. (While the backend drains, nothing acts on this.)
                        self.rearm[i] = true;
                        self.stats.rearms += 1;
                    }
                }
                if res < 0 {
                    // A receive can fail after the kernel picked a buffer for it: give that buffer back, or
                    // the ring shrinks for good.
                    if let Some(bid) = cqueue::buffer_select(flags).filter(|b| *b < self.buffers) {
                        self.recycle(bid);
                    }
                    match -res {
                        libc::ENOBUFS => self.stats.enobufs += 1,
                        libc::ECANCELED => {}
                        _ => {
                            self.stats.recv_errors += 1;
                            self.recv_failed = true;
                        }
                    }
                    return 0;
                }
                let Some(bid) = cqueue::buffer_select(flags) else {
                    self.stats.recv_errors += 1;
                    return 0;
                };
                match sink {
                    Some(sink) => self.deliver(bid, res as u32, sink),
                    None if self.stash.len() < self.stash.capacity() => {
                        self.stash.push(Stashed { bid, len: res as u32 });
                        0
                    }
                    None => {
                        // Cannot happen (each stashed entry holds a distinct buffer), but never allocate.
                        self.stats.malformed += 1;
                        self.recycle(bid);
                        0
                    }
                }
            }
            UD_CANCEL => {
                // A cancel that could not take the group's multishot receive (it keeps reading): stay on it,
                // and let sparse traffic try again later. ENOENT: it had ended already (its final completion
                // finishes the switch).
                if res < 0 && res != -libc::ENOENT && self.group_read == GroupRead::Cancelling && self.recv_armed[0] {
                    self.group_read = GroupRead::Multishot;
                }
                0
            }
            _ => 0,
        }
    }

    /// Hands the datagram in buffer `bid` (`len` bytes written by the kernel) to the sink (cut into its
    /// datagrams if it holds a GRO batch), then gives the buffer back to the ring (published at the end of
    /// the reap). Returns the datagrams delivered.
    fn deliver(&mut self, bid: u16, len: u32, sink: &mut dyn FnMut(SocketAddr, &mut [u8])) -> usize {
        if bid >= self.buffers {
            self.stats.malformed += 1;
            return 0;
        }
        if len as usize > self.recv_size {
            self.stats.malformed += 1;
            self.recycle(bid);
            return 0;
        }
        let mut delivered = 0;
        {
            // SAFETY: buffer `bid` lies inside recv_bufs (bid < buffers, buffers * recv_size bytes) and
            // `len` <= recv_size bytes of it were written by the kernel. The completion handed the buffer
            // to us: the kernel will not write it again until `recycle` below puts it back in the ring, no
            // other reference to it exists (each buffer id is completed once per use), and the slice does not
            // outlive this block. Mutable so that the sink may decrypt in place.
            let buf = unsafe {
                std::slice::from_raw_parts_mut(
                    self.recv_bufs.as_ptr().add(usize::from(bid) * self.recv_size),
                    len as usize,
                )
            };
            // Parsed on a shared reborrow; what the sink gets is the payload's place, reborrowed mutably.
            let parsed = match types::RecvMsgOut::parse(buf, &self.recv_msg[0]) {
                Ok(out) if out.is_payload_truncated() => Err(true),
                Ok(out) => {
                    let segment = if self.gro {
                        offload::read_segment(out.control_data(), out.is_control_data_truncated())
                    } else {
                        Ok(None)
                    };
                    match (addr::decode(out.name_data()), segment) {
                        (Some(from), Ok(segment)) => {
                            let start = out.payload_data().as_ptr() as usize - buf.as_ptr() as usize;
                            Ok((from, segment, start..start + out.payload_data().len()))
                        }
                        _ => Err(false),
                    }
                }
                Err(()) => Err(false),
            };
            match parsed {
                Ok((from, segment, payload)) => {
                    delivered = offload::split(from, &mut buf[payload], segment, sink);
                    self.stats.received += delivered as u64;
                    if delivered > 1 {
                        self.stats.gro_batches += 1;
                    }
                }
                Err(true) => self.stats.truncated += 1,
                Err(false) => self.stats.malformed += 1,
            }
        }
        self.recycle(bid);
        delivered
    }

    /// Puts buffer `bid` back at the ring's tail (not yet published).
    fn recycle(&mut self, bid: u16) {
        let addr = self.recv_bufs.as_ptr() as u64 + (usize::from(bid) * self.recv_size) as u64;
        self.buf_ring.push(addr, self.recv_size as u32, bid);
    }

    /// Copies `bytes` into slot `i` at `offset`. The slot must be busy and not submitted: taken from the free
    /// list for the batch being filled (or about to be sent), so that no operation reads its buffer.
    fn copy_into_slot(&mut self, i: usize, offset: usize, bytes: &[u8]) {
        self.slot_mut(i, offset, bytes.len()).copy_from_slice(bytes);
    }

    /// `len` bytes of slot `i` from `offset`. The slot must be busy and not submitted, as for
    /// [`copy_into_slot`](Self::copy_into_slot).
    fn slot_mut(&mut self, i: usize, offset: usize, len: usize) -> &mut [u8] {
        assert!(i < self.slots.len() && offset + len <= self.slot_size, "send slot overrun");
        // SAFETY: slot i is ours (busy but not submitted, see above): no operation in flight reads its buffer,
        // and the slice borrows `self` mutably, so no other reference to it exists while it lives and the slot
        // cannot be submitted meanwhile. The range lies inside send_bufs (checked just above: i < slots,
        // offset + len <= slot_size, and send_bufs holds slots * slot_size bytes).
        unsafe { std::slice::from_raw_parts_mut(self.send_bufs.as_ptr().add(i * self.slot_size + offset), len) }
    }

    /// Fills slot `i`'s msghdr for `batch` (already copied into its buffer) and returns the SendMsg for it:
    /// with a `UDP_SEGMENT` control message when the batch holds two datagrams or more.
    fn send_entry(&mut self, i: usize, batch: &Batch) -> squeue::Entry {
        // Slot i's buffer (i < slots: the caller took it from the free list).
        let buf = self.send_bufs.as_ptr().wrapping_add(i * self.slot_size);
        let slot = &mut self.slots[i];
        slot.busy = true;
        slot.count = batch.count;
        slot.iov = libc::iovec { iov_base: buf.cast(), iov_len: batch.len };
        let mut msg = zeroed_msghdr();
        match batch.dest {
            SocketAddr::V4(a) => {
                slot.v4 = addr::sockaddr_v4(&a);
                msg.msg_name = (&raw mut slot.v4).cast();
                msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            SocketAddr::V6(a) => {
                slot.v6 = addr::sockaddr_v6(&a);
                msg.msg_name = (&raw mut slot.v6).cast();
                msg.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        msg.msg_iov = &raw mut slot.iov;
        msg.msg_iovlen = 1;
        if batch.is_gso() {
            offload::encode_gso_cmsg(&mut slot.cmsg.0, batch.segment as u16);
            msg.msg_control = (&raw mut slot.cmsg).cast();
            msg.msg_controllen = offload::GSO_CMSG_SPACE as _;
        }
        slot.msg = msg;
        opcode::SendMsg::new(types::Fd(self.unicast.as_raw_fd()), &raw const slot.msg)
            .build()
            .user_data(UD_SEND + i as u64)
    }

    /// Sends the one datagram in slot `i` (busy, not submitted: the open batch just taken) with `sendto`, and
    /// frees the slot. A refusal counts as a send error, as a failed SendMsg completion does.
    fn send_lone(&mut self, i: usize, dest: SocketAddr, len: usize) {
        assert!(i < self.slots.len() && len <= self.slot_size, "send slot overrun");
        // SAFETY: slot i is ours (busy but never submitted, so no operation reads or writes its buffer), and
        // the range lies inside send_bufs (checked above). The slice is dropped before the slot is freed.
        let buf = unsafe { std::slice::from_raw_parts(self.send_bufs.as_ptr().add(i * self.slot_size), len) };
        let sent = loop {
            match self.unicast.send_to(buf, dest) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r.is_ok(),
            }
        };
        if sent {
            self.stats.sent += 1;
            self.stats.plain_sends += 1;
        } else {
            self.stats.send_errors += 1;
        }
        self.slots[i].busy = false;
        self.free.push(i as u16);
    }

    /// One turn of plain reads of the group socket ([`offload::read_turn`]; `to_the_end`: no lone datagram
    /// ends it early). A failed read counts as a failed receive completion does (`recv_errors`,
    /// `recv_failed`) and ends the turn.
    fn read_plain(&mut self, sink: &mut Sink<'_>, to_the_end: bool) -> offload::Turn {
        if to_the_end {
            self.plain_empty = false;
        }
        // What a multishot receive buffer holds (`max_datagram`): a longer datagram is dropped either way.
        let room = self.max_datagram().min(self.plain_buf.len());
        let (turn, result) = offload::read_turn(
            &self.group,
            &mut self.plain_buf[..room],
            if self.gro { Some(&mut self.plain_cmsg) } else { None },
            &mut self.plain_empty,
            PLAIN_READS,
            usize::MAX,
            sink,
        );
        if result.is_err() {
            self.stats.recv_errors += 1;
            self.recv_failed = true;
        }
        self.stats.gro_batches += turn.batches;
        self.stats.received += turn.datagrams as u64;
        self.stats.plain_received += turn.datagrams as u64;
        self.stats.truncated += turn.skipped.truncated;
        self.stats.malformed += turn.skipped.malformed_reads;
        turn
    }

    /// See [`UringBackend::max_datagram`].
    fn max_datagram(&self) -> usize {
        self.recv_size - RECV_OVERHEAD - self.recv_control
    }

    fn take_woken(&mut self) -> bool {
        std::mem::take(&mut self.woken)
    }

    fn take_recv_failed(&mut self) -> bool {
        std::mem::take(&mut self.recv_failed)
    }
}

/// Turns a failed `io_uring_enter` into the error `Backend` calls return.
fn enter_error(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::EEXIST) {
        io::Error::other(
            "io_uring backend used from a thread other than the one that created it (the ring is SINGLE_ISSUER): \
             create the backend on the engine thread",
        )
    } else {
        e
    }
}

/// Errors of `io_uring_enter` that only mean "try again later": a timeout, a signal, a full CQ backlog.
fn transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN))
}

impl UringBackend {
    /// Takes ownership of the group socket (bound to the group's port, joined) and the unicast socket (bound
    /// to an ephemeral port on the interface; it sends everything), both non-blocking, and sets up the ring,
    /// the buffers, and a multishot receive on each socket. Call it on the thread that will use the backend.
    /// Control messages that socket options add to reads get 40 bytes before GRO's segment size (a
    /// `SO_TIMESTAMP` takes 32); a read whose control data was cut with no segment size in it is dropped
    /// (`BackendStats::malformed_reads`), whether or not it held a batch.
    pub fn new(group: UdpSocket, unicast: UdpSocket, opts: UringOptions) -> Result<UringBackend, UringError> {
        UringBackend::with_ladder(group, unicast, opts, 0)
    }

    /// `new`, starting the setup-flag ladder at rung `first_rung` (tests use it to exercise every rung).
    fn with_ladder(
        group: UdpSocket,
        unicast: UdpSocket,
        opts: UringOptions,
        first_rung: usize,
    ) -> Result<UringBackend, UringError> {
        opts.validate()?;
        let v6 = unicast.local_addr().map_err(UringError::Setup)?.is_ipv6();
        let gso = Gso::new(if opts.gso { offload::probe_segments(v6) } else { None });
        let gro = opts.gro && {
            // Both are tried; if only one took it, every buffer is still checked for the control message.
            let g = offload::enable_gro(&group);
            let u = offload::enable_gro(&unicast);
            g || u
        };
        // With GRO a buffer holds a whole batch: header, source address, control message, 64 KiB of payload.
        let (nbufs, recv_size) = if gro {
            let size = (RECV_OVERHEAD + offload::RECV_CMSG_ROOM + offload::GRO_MAX_PAYLOAD).next_multiple_of(64);
            (opts.buffers.min(GRO_BUFFERS), size.max(opts.buffer_size))
        } else {
            (opts.buffers, opts.buffer_size)
        };
        let (nslots, slot_size) = if gso.is_on() {
            (opts.send_batch.min(GSO_SLOTS), opts.buffer_size.max(offload::GSO_BUFFER))
        } else {
            (opts.send_batch, opts.buffer_size)
        };
        let cq_entries = opts.cq_entries(nbufs, nslots);
        let BuiltRing { ring, flags: setup_flags, .. } = build_ring(opts.entries, cq_entries, first_rung)?;
        let eventfd = Arc::new(EventFd::new().map_err(UringError::Setup)?);
        let buffers = usize::from(nbufs);
        let buf_ring = BufRing::new(nbufs).map_err(UringError::Setup)?;
        // Checked: on a 32-bit target valid-looking options can overflow, and a wrapped size would hand the
        // kernel buffer addresses past the allocation.
        let too_big = || UringError::InvalidOptions("buffers too large for this address space".into());
        let recv_bufs = Region::new(buffers.checked_mul(recv_size).ok_or_else(too_big)?, mem::page_size())
            .map_err(UringError::Setup)?;
        let send_bufs =
            Region::new(nslots.checked_mul(slot_size).ok_or_else(too_big)?, 64).map_err(UringError::Setup)?;
        let wake_buf = Region::new(size_of::<u64>(), align_of::<u64>()).map_err(UringError::Setup)?;
        let slots = (0..nslots)
            .map(|_| SendSlot {
                v4: addr::sockaddr_v4(&std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0)),
                v6: addr::sockaddr_v6(&std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, 0, 0, 0)),
                iov: libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 },
                msg: zeroed_msghdr(),
                cmsg: CmsgBuf([0; offload::GSO_CMSG_SPACE]),
                count: 0,
                busy: false,
            })
            .collect();
        let mut recv_msg = zeroed_msghdr();
        recv_msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // Only the lengths matter to a multishot receive: the kernel reserves this much room for control data
        // in every buffer, between the source address and the payload.
        let recv_control = if gro { offload::RECV_CMSG_ROOM } else { 0 };
        recv_msg.msg_controllen = recv_control as _;
        let mut free = Vec::with_capacity(nslots);
        free.extend((0..nslots as u16).rev());
        let st = State {
            group,
            unicast,
            eventfd,
            buffers: nbufs,
            buffer_size: opts.buffer_size,
            recv_size,
            recv_control,
            slot_size,
            recv_msg: Box::new([recv_msg]),
            buf_ring,
            buf_ring_registered: false,
            recv_bufs,
            recv_armed: [false; 2],
            rearm: [false; 2],
            recv_failed: false,
            stash: Vec::with_capacity(buffers),
            slots,
            send_bufs,
            free,
            sends_in_flight: 0,
            open: None,
            scratch: Vec::new(),
            lent: Lent::Nothing,
            gso,
            gro,
            wake_buf,
            wake_armed: false,
            woken: false,
            group_read: GroupRead::Multishot,
            sparse_spins: 0,
            sending_spins: 0,
            plain_empty: true,
            enter_skipped: 0,
            plain_buf: vec![0u8; offload::GSO_BUFFER.max(opts.buffer_size)].into_boxed_slice(),
            plain_cmsg: vec![0u8; offload::RECV_CMSG_ROOM].into_boxed_slice(),
            stats: UringStats::default(),
        };
        // From here on, Drop cleans up whatever was set up.
        let mut backend = UringBackend { ring, setup_flags, st };
        for bid in 0..nbufs {
            backend.st.recycle(bid);
        }
        backend.st.buf_ring.publish();
        // SAFETY: the ring memory is page aligned and holds `buffers` entries (a power of two); it lives in
        // `st.buf_ring` until Drop unregisters it (or leaks it when the drain fails). Every buffer address
        // published in it points into `st.recv_bufs`, which lives just as long.
        unsafe { backend.ring.submitter().register_buf_ring_with_flags(backend.st.buf_ring.addr(), nbufs, BGID, 0) }
            .map_err(classify_register_error)?;
        backend.st.buf_ring_registered = true;
        backend.arm_recv(0).map_err(UringError::Register)?;
        backend.arm_recv(1).map_err(UringError::Register)?;
        backend.arm_waker().map_err(UringError::Register)?;
        backend.ring.submit().map_err(UringError::Register)?;
        Ok(backend)
    }

    /// The setup flags the kernel accepted, e.g. `"SINGLE_ISSUER|DEFER_TASKRUN"`.
    pub fn setup_flags(&self) -> &'static str {
        self.setup_flags
    }

    /// The io_uring backend's own counters, a superset of what [`Backend::stats`] reports for it.
    pub fn uring_stats(&self) -> UringStats {
        self.st.stats
    }

    /// The group socket's local address.
    pub fn group_addr(&self) -> io::Result<SocketAddr> {
        self.st.group.local_addr()
    }

    /// The unicast (sending) socket's local address: the source of everything this backend sends.
    pub fn unicast_addr(&self) -> io::Result<SocketAddr> {
        self.st.unicast.local_addr()
    }

    /// Largest datagram a receive buffer holds whole (with GRO on, more than any UDP datagram).
    pub fn max_datagram(&self) -> usize {
        self.st.max_datagram()
    }

    /// Segments per GSO send at most (64 or 128), or 0 if the backend does not coalesce (GSO off, refused
    /// by the kernel, or fallen back after a refused send).
    pub fn gso_segments(&self) -> usize {
        if self.st.gso.is_on() { self.st.gso.segments } else { 0 }
    }

    /// Whether `UDP_GRO` is on (buffers may hold several datagrams, split before the sink sees them).
    pub fn gro(&self) -> bool {
        self.st.gro
    }

    /// Queues the SendMsg of `batch`, already copied into slot `i` (busy), and counts it in flight.
    fn push_send(&mut self, i: u16, batch: &Batch) -> io::Result<()> {
        let entry = self.st.send_entry(usize::from(i), batch);
        // SAFETY: the entry points to slot i's msghdr, which points to the slot's iovec, address and control
        // buffer and to the slot's buffer: all inside st.slots / st.send_bufs, allocated once in `new`, never
        // moved or reallocated, and freed only after Drop reaped every send (leaked otherwise). The slot stays
        // busy, so nothing rewrites it, until its completion is reaped.
        if let Err(e) = unsafe { self.push(&entry) } {
            self.st.slots[usize::from(i)].busy = false;
            self.st.free.push(i);
            return Err(e);
        }
        self.st.sends_in_flight += 1;
        Ok(())
    }

    /// Queues the SendMsg of the batch being filled, if any.
    fn close_batch(&mut self) -> io::Result<()> {
        match self.st.open.take() {
            Some((i, batch)) => self.push_send(i, &batch),
            None => Ok(()),
        }
    }

    /// Queues an SQE, submitting first if the submission queue is full.
    ///
    /// # Safety
    ///
    /// Every pointer in `entry` must stay valid until the operation's final completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        for _ in 0..64 {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if transient(&e) => {
                    // The kernel wants its completion backlog drained first.
                    self.enter_nowait()?;
                    self.reap(None);
                }
                Err(e) => return Err(enter_error(e)),
            }
        }
        Err(io::Error::other("io_uring submission queue stays full"))
    }

    /// Arms the multishot receive of socket `i` (0: group, 1: unicast).
    fn arm_recv(&mut self, i: usize) -> io::Result<()> {
        let fd = if i == 0 { self.st.group.as_raw_fd() } else { self.st.unicast.as_raw_fd() };
        let msg = self.st.recv_msg.as_ptr();
        let entry = opcode::RecvMsgMulti::new(types::Fd(fd), msg, BGID).build().user_data(UD_RECV_GROUP + i as u64);
        // SAFETY: the msghdr template lives in st.recv_msg for the backend's life (leaked, not freed, if
        // Drop cannot reap this operation's final completion); the buffers the receive selects belong to
        // the registered ring, whose memory has the same lifetime. The socket fd is owned by st.
        unsafe { self.push(&entry)? };
        self.st.recv_armed[i] = true;
        self.st.rearm[i] = false;
        Ok(())
    }

    /// Arms the eventfd read.
    fn arm_waker(&mut self) -> io::Result<()> {
        let fd = self.st.eventfd.0.as_raw_fd();
        let entry = opcode::Read::new(types::Fd(fd), self.st.wake_buf.as_ptr(), size_of::<u64>() as u32)
            .build()
            .user_data(UD_WAKE);
        // SAFETY: wake_buf is an 8-byte region owned by st, never read or written by us, freed only after
        // this read's completion was reaped (or leaked). The eventfd is kept open by st.eventfd.
        unsafe { self.push(&entry)? };
        self.st.wake_armed = true;
        Ok(())
    }

    /// Re-arms whatever ended: the waker, and the receives once their buffers are back.
    fn rearm(&mut self) -> io::Result<()> {
        if !self.st.wake_armed {
            self.arm_waker()?;
        }
        for i in 0..2 {
            if self.st.rearm[i] {
                debug_assert!(i == 1 || self.st.group_read == GroupRead::Multishot);
                self.arm_recv(i)?;
            }
        }
        Ok(())
    }

    /// Puts the group socket on plain reads: cancels its multishot receive (its final completion, reaped
    /// later, completes the switch), or switches at once if none is armed.
    fn go_plain(&mut self) -> io::Result<()> {
        self.st.sparse_spins = 0;
        self.st.plain_empty = true;
        if self.st.recv_armed[0] {
            // Set first: the push may reap, and a final completion of the receive reaped there must find
            // the switch under way.
            self.st.group_read = GroupRead::Cancelling;
            let cancel = opcode::AsyncCancel::new(UD_RECV_GROUP).build().user_data(UD_CANCEL);
            // SAFETY: a cancel request carries no pointer into our memory.
            if let Err(e) = unsafe { self.push(&cancel) } {
                if self.st.recv_armed[0] {
                    self.st.group_read = GroupRead::Multishot;
                }
                return Err(e);
            }
        } else {
            self.st.rearm[0] = false;
            self.st.group_read = GroupRead::Plain;
            self.st.stats.plain_switches += 1;
        }
        Ok(())
    }

    /// Puts the group socket back on its multishot receive (armed by the next `rearm`).
    fn go_multishot(&mut self) {
        self.st.group_read = GroupRead::Multishot;
        self.st.rearm[0] = true;
        self.st.sparse_spins = 0;
    }

    /// Before a receive waits in the ring: the group socket must have its multishot receive, which is what a
    /// wait wakes up for. Called after each reap, since a cancellation's final completion (reaped there)
    /// can leave the socket on plain reads; datagrams queued meanwhile are the first the receive takes.
    fn arm_group_before_wait(&mut self, spinning: bool) {
        if !spinning && self.st.group_read == GroupRead::Plain {
            self.go_multishot();
        }
    }

    /// A receive that does not wait while the group socket is read plainly (`to_the_end`: read until empty
    /// and enter the ring whatever is due). Queued sends were handed over by the caller.
    fn receive_plain(&mut self, sink: &mut Sink<'_>, to_the_end: bool) -> io::Result<usize> {
        let mut delivered = self.deliver_stash(sink);
        let read = self.st.read_plain(sink, to_the_end);
        delivered += read.datagrams;
        self.st.enter_skipped += 1;
        let sending = self.st.sends_in_flight > 0 || !self.ring.submission().is_empty();
        self.st.sending_spins = if sending { self.st.sending_spins + 1 } else { 0 };
        // A lone datagram goes up before an entry that is only due by count, as on the poll backend.
        let due = self.st.enter_skipped >= ENTER_EVERY && !read.lone;
        if to_the_end || due || sending {
            self.st.enter_skipped = 0;
            self.enter_nowait()?;
            delivered += self.reap(Some(sink));
        }
        // A failed read hands the socket back to the multishot receive, which counts and re-arms as usual.
        if read.datagrams > 1 || self.st.sending_spins >= PLAIN_SENDING || self.st.recv_failed {
            self.st.sending_spins = 0;
            self.go_multishot();
        }
        self.rearm()?;
        self.st.take_woken();
        self.st.take_recv_failed();
        Ok(delivered)
    }

    /// Submits what is queued and runs pending completion work without waiting.
    fn enter_nowait(&mut self) -> io::Result<()> {
        let to_submit = self.ring.submission().len() as u32;
        // SAFETY: no argument pointer is passed (None); every queued SQE points to memory that outlives its
        // operation (see the `push` call sites).
        let r =
            unsafe { self.ring.submitter().enter::<libc::sigset_t>(to_submit, 0, EnterFlags::GETEVENTS.bits(), None) };
        match r {
            Ok(_) => Ok(()),
            Err(e) if transient(&e) => Ok(()),
            Err(e) => Err(enter_error(e)),
        }
    }

    /// Submits what is queued and waits for one completion, up to `timeout` (`None`: no limit).
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let r = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if transient(&e) => Ok(()),
            Err(e) => Err(enter_error(e)),
        }
    }

    /// Handles every completion in the queue; returns the datagrams delivered. Without a sink, receive
    /// completions are stashed for the next `receive`.
    fn reap(&mut self, mut sink: Option<&mut Sink<'_>>) -> usize {
        let st = &mut self.st;
        let mut delivered = 0;
        for cqe in self.ring.completion() {
            delivered += st.complete(cqe.user_data(), cqe.result(), cqe.flags(), sink.as_deref_mut());
        }
        st.buf_ring.publish();
        delivered
    }

    /// Delivers the receive completions stashed by `queue_send`.
    fn deliver_stash(&mut self, sink: &mut dyn FnMut(SocketAddr, &mut [u8])) -> usize {
        if self.st.stash.is_empty() {
            return 0;
        }
        let mut delivered = 0;
        for k in 0..self.st.stash.len() {
            // Marked taken before it is delivered: if the sink panics and the backend is used again, the
            // entries already handed over are not delivered and recycled a second time (the one being
            // delivered leaks its buffer instead).
            let s = std::mem::replace(&mut self.st.stash[k], Stashed { bid: Stashed::TAKEN, len: 0 });
            if s.bid != Stashed::TAKEN {
                delivered += self.st.deliver(s.bid, s.len, sink);
            }
        }
        self.st.stash.clear();
        self.st.buf_ring.publish();
        delivered
    }

    /// Submits and reaps until a send slot is free (bounded by [`SLOT_WAIT`]).
    fn wait_for_slot(&mut self) -> io::Result<u16> {
        let deadline = Instant::now() + SLOT_WAIT;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "io_uring backend: no send completed within 5 s (every send slot is busy)",
                ));
            }
            self.wait(Some((deadline - now).min(Duration::from_millis(100))))?;
            self.reap(None);
            if !self.st.wake_armed {
                self.arm_waker()?;
            }
            if let Some(i) = self.st.free.pop() {
                return Ok(i);
            }
        }
    }

    /// Cancels every operation in flight and reaps until all have completed (bounded by [`DRAIN_WAIT`]).
    /// Returns whether nothing is left in flight.
    fn drain(&mut self) -> bool {
        // The batch being filled goes out like every other queued send (and frees its slot if it cannot).
        let _ = self.close_batch();
        if self.st.in_flight() == 0 {
            return true;
        }
        // Everything counted as in flight must have reached the kernel to be cancellable.
        if let Err(e) = self.ring.submit() {
            if !transient(&e) {
                return false;
            }
        }
        for ud in [UD_RECV_GROUP, UD_RECV_UNICAST, UD_WAKE] {
            let armed = if ud == UD_WAKE { self.st.wake_armed } else { self.st.recv_armed[ud as usize] };
            let cancel = opcode::AsyncCancel::new(ud).build().user_data(UD_CANCEL);
            // SAFETY: a cancel request carries no pointer into our memory.
            if armed && unsafe { self.push(&cancel) }.is_err() {
                return false;
            }
        }
        for i in 0..self.st.slots.len() {
            if self.st.slots[i].busy {
                let cancel = opcode::AsyncCancel::new(UD_SEND + i as u64).build().user_data(UD_CANCEL);
                // SAFETY: a cancel request carries no pointer into our memory.
                if unsafe { self.push(&cancel) }.is_err() {
                    return false;
                }
            }
        }
        let deadline = Instant::now() + DRAIN_WAIT;
        while self.st.in_flight() > 0 {
            let now = Instant::now();
            if now >= deadline || self.wait(Some((deadline - now).min(Duration::from_millis(50)))).is_err() {
                return false;
            }
            self.reap(None);
        }
        true
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        if self.drain() {
            if self.st.buf_ring_registered && self.ring.submitter().unregister_buf_ring(BGID).is_err() {
                // The kernel keeps the ring memory pinned and may read it until the ring is torn down.
                self.st.buf_ring.leak();
            }
        } else {
            // Some operation may still write into our buffers after the ring fd is closed (the kernel
            // cancels it asynchronously): leak everything it could touch rather than free it.
            LEAKED_TEARDOWNS.fetch_add(1, Ordering::Relaxed);
            self.st.buf_ring.leak();
            self.st.recv_bufs.leak();
            self.st.send_bufs.leak();
            self.st.wake_buf.leak();
            std::mem::forget(std::mem::take(&mut self.st.slots));
            std::mem::forget(std::mem::take(&mut self.st.recv_msg));
        }
        // Fields drop next, in declaration order: the ring (fd closed), then the sockets and the memory.
    }
}

impl Backend for UringBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Uring
    }

    fn queue_send(&mut self, dest: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() > self.st.buffer_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("datagram of {} bytes exceeds the io_uring buffer_size ({})", bytes.len(), self.st.buffer_size),
            ));
        }
        let len = bytes.len();
        if let Some((i, batch)) = self.st.open.as_mut() {
            if batch.accepts(dest, len, self.st.gso.segments) {
                let (i, offset) = (usize::from(*i), batch.len);
                batch.push(len);
                let full = batch.is_full(self.st.gso.segments);
                self.st.copy_into_slot(i, offset, bytes);
                if full {
                    self.close_batch()?;
                }
                return Ok(());
            }
            self.close_batch()?;
        }
        let i = match self.st.free.pop() {
            Some(i) => i,
            None => self.wait_for_slot()?,
        };
        self.st.slots[usize::from(i)].busy = true;
        self.st.copy_into_slot(usize::from(i), 0, bytes);
        let batch = Batch::new(dest, len);
        if batch.is_full(self.st.gso.segments) {
            self.push_send(i, &batch)
        } else {
            self.st.open = Some((i, batch));
            Ok(())
        }
    }

    fn send_buffer(&mut self, max_len: usize) -> &mut [u8] {
        let open = self.st.open.map(|(i, b)| (usize::from(i), b.len));
        self.st.lent = Lent::lend(open, self.st.slot_size, max_len, &mut self.st.scratch);
        match self.st.lent {
            Lent::Tail { slot, at, room } => self.st.slot_mut(slot, at, room),
            _ => &mut self.st.scratch,
        }
    }

    fn commit_send(&mut self, dest: SocketAddr, len: usize) -> io::Result<()> {
        let segments = self.st.gso.segments;
        let lent = std::mem::replace(&mut self.st.lent, Lent::Nothing);
        let open = self.st.open.as_ref().map(|(i, b)| (usize::from(*i), b));
        match lent.commit(len, open, dest, self.st.buffer_size, segments) {
            Commit::Grow => {
                let Some((_, batch)) = self.st.open.as_mut() else { return Ok(()) };
                batch.push(len);
                if batch.is_full(segments) { self.close_batch() } else { Ok(()) }
            }
            c @ (Commit::Requeue { .. } | Commit::Scratch) => {
                let mut scratch = std::mem::take(&mut self.st.scratch);
                if let Commit::Requeue { slot, at } = c {
                    // Written after a batch it cannot join: moved out, and queued like any other datagram.
                    scratch.clear();
                    scratch.extend_from_slice(self.st.slot_mut(slot, at, len));
                }
                let r = self.queue_send(dest, &scratch[..len]);
                self.st.scratch = scratch;
                r
            }
            Commit::Invalid => Err(offload::invalid_commit()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.close_batch()?;
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if transient(&e) => Ok(()),
            Err(e) => Err(enter_error(e)),
        }
    }

    fn receive(&mut self, timeout: Option<Duration>, sink: &mut dyn FnMut(SocketAddr, &mut [u8])) -> io::Result<usize> {
        // A lone datagram with nothing else to submit or in flight goes out by a plain `sendto`: a SendMsg
        // submission of one datagram costs more than the system call it replaces (a round trip of a
        // ping-pong measured 13.7 -> 12.8 us). Nothing in flight means it cannot overtake an earlier send.
        if self.st.sends_in_flight == 0
            && self.ring.submission().is_empty()
            && let Some((i, batch)) = self.st.open.take_if(|(_, b)| b.count == 1)
        {
            self.st.send_lone(usize::from(i), batch.dest, batch.len);
        }
        self.close_batch()?;
        let spinning = timeout == Some(Duration::ZERO);
        if spinning && self.st.group_read == GroupRead::Plain {
            return self.receive_plain(sink, false);
        }
        if !spinning {
            // Sparse means spinning receives in a row.
            self.st.sparse_spins = 0;
        }
        let mut delivered = self.deliver_stash(sink);
        let submitting = !self.ring.submission().is_empty();
        self.enter_nowait()?;
        delivered += self.reap(Some(sink));
        self.arm_group_before_wait(spinning);
        self.rearm()?;
        let woken = self.st.take_woken();
        let failed = self.st.take_recv_failed();
        if spinning {
            if delivered > 1 || submitting || self.st.sends_in_flight > 0 {
                self.st.sparse_spins = 0;
            } else if self.st.group_read == GroupRead::Multishot {
                self.st.sparse_spins += 1;
                if self.st.sparse_spins >= PLAIN_AFTER {
                    self.go_plain()?;
                }
            }
        }
        if delivered > 0 || woken || failed || spinning {
            return Ok(delivered);
        }
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let wait = match (timeout, deadline) {
                (None, _) => None,
                (Some(_), None) => None, // too far in the future to represent: as good as forever
                (Some(_), Some(d)) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    Some(d - now)
                }
            };
            self.wait(wait)?;
            delivered += self.reap(Some(sink));
            self.arm_group_before_wait(spinning);
            self.rearm()?;
            if delivered > 0 || self.st.take_woken() || self.st.take_recv_failed() {
                break;
            }
        }
        Ok(delivered)
    }

    fn receive_all(&mut self, sink: &mut dyn FnMut(SocketAddr, &mut [u8])) -> io::Result<usize> {
        let mut total = 0;
        for _ in 0..RECEIVE_ALL_PASSES {
            let n = if self.st.group_read == GroupRead::Plain {
                self.close_batch()?;
                self.receive_plain(sink, true)?
            } else {
                self.receive(Some(Duration::ZERO), sink)?
            };
            total += n;
            if n == 0 {
                break;
            }
        }
        Ok(total)
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.st.eventfd.clone()
    }

    fn stats(&self) -> BackendStats {
        let s = &self.st.stats;
        BackendStats {
            send_errors: s.send_errors,
            gso_sends: s.gso_sends,
            gso_fallbacks: s.gso_fallbacks,
            gro_batches: s.gro_batches,
            truncated: s.truncated,
            malformed_reads: s.malformed,
            recv_errors: s.recv_errors,
            enobufs: s.enobufs,
            plain_switches: s.plain_switches,
        }
    }
}

impl fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringBackend")
            .field("setup_flags", &self.setup_flags)
            .field("group", &self.st.group)
            .field("unicast", &self.st.unicast)
            .field("stats", &self.st.stats)
            .finish_non_exhaustive()
    }
}
