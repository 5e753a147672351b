//! A socket filter that drops a node's own packets in the kernel.
//!
//! A node's group socket receives everything sent to the group on this host, including what the node
//! itself sends (multicast loop must stay on, or other nodes on the host would hear nothing). The protocol
//! drops those packets by their session, but only after the kernel has copied each one into user space:
//! measured with `perf`, that copy was about a fifth of a publishing thread's time. A classic BPF filter
//! drops them before the copy.

use std::io;
use std::net::UdpSocket;

use socket2::{SockFilter, SockRef};

// Classic BPF opcodes (linux/filter.h).
const LD_LEN: u16 = 0x80; // BPF_LD | BPF_W | BPF_LEN: A = packet length
const LD_ABS_W: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS: A = 32-bit word at k (big-endian)
const JGE: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const RET: u16 = 0x06; // BPF_RET | BPF_K

/// Offset of the session in the packet the filter sees: the filter runs on the UDP datagram, header first
/// (8 bytes), and the session is bytes 8..16 of the Blip header (docs/PROTOCOL.md section 2).
const SESSION_AT: u32 = 8 + 8;

/// The filter program: accept anything too short to hold a session (the protocol counts it as malformed),
/// drop what carries `session`, accept the rest.
pub(crate) fn program(session: u64) -> [SockFilter; 8] {
    let (hi, lo) = ((session >> 32) as u32, session as u32);
    [
        SockFilter::new(LD_LEN, 0, 0, 0),
        SockFilter::new(JGE, 0, 5, SESSION_AT + 8), // shorter: accept
        SockFilter::new(LD_ABS_W, 0, 0, SESSION_AT),
        SockFilter::new(JEQ, 0, 3, hi), // other session: accept
        SockFilter::new(LD_ABS_W, 0, 0, SESSION_AT + 4),
        SockFilter::new(JEQ, 0, 1, lo), // other session: accept
        SockFilter::new(RET, 0, 0, 0),  // own: drop
        SockFilter::new(RET, 0, 0, u32::MAX),
    ]
}

/// Attaches the filter to `socket` (the group socket of the node whose session is `session`).
pub fn drop_own_packets(socket: &UdpSocket, session: u64) -> io::Result<()> {
    SockRef::from(socket).attach_filter(&program(session))
}
