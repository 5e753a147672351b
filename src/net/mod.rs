//! Socket setup for multicast groups (socket2): IPv4 and IPv6, join on a named interface, IP_MULTICAST_IF,
//! TTL / hop limit, loop, IP_MULTICAST_ALL off, address reuse so several processes on one host can join the
//! same group, and buffer sizes read back after setting.
//!
//! Defaults keep every packet on this host: the loopback interface, TTL 0, a group in 239.255.0.0/16.
//!
//! A node has two sockets (see [`open`]): the group socket, bound to the group's port and joined to the
//! group, only receives; the unicast socket, bound to an ephemeral port on the interface's address, sends
//! everything (multicast and unicast) and receives unicast replies, so its address ([`SocketReport::local`])
//! is how other nodes see this one.
//!
//! ```no_run
//! let sockets = blip::net::open(&blip::net::SocketConfig::default())?;
//! for warning in &sockets.report.warnings {
//!     eprintln!("warning: {warning}");
//! }
//! # Ok::<(), blip::net::NetError>(())
//! ```
//!
//! IPv6 works the same way on an interface that carries IPv6 multicast; loopback (`lo`) on Linux does not
//! (the sockets open and the join succeeds, but the kernel delivers nothing: see `KERNEL-NOTES.md`), so IPv6 needs a real or veth
//! interface.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

/// The default group: administratively scoped, never routed off the host with TTL 0.
pub const DEFAULT_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 77, 1);
/// The default port.
pub const DEFAULT_PORT: u16 = 47_001;
/// Default receive buffer requested (the kernel may clamp it to `net.core.rmem_max`).
pub const DEFAULT_RECV_BUFFER: usize = 4 << 20;
/// Default send buffer requested (clamped to `net.core.wmem_max`).
pub const DEFAULT_SEND_BUFFER: usize = 4 << 20;

/// Which interface to send and join on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Interface {
    /// The loopback interface (127.0.0.1 / ::1, index of `lo`): traffic stays on this host.
    #[default]
    Loopback,
    /// The interface that has this address.
    Addr(IpAddr),
    /// The interface with this index.
    Index(u32),
    /// The interface with this name (e.g. `eth0`, `veth1`).
    Name(String),
}

/// How to open a node's sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketConfig {
    /// Multicast group address and port.
    pub group: SocketAddr,
    /// Interface to join and send on.
    pub interface: Interface,
    /// Multicast TTL (IPv4) or hop limit (IPv6). 0 keeps packets on the host.
    pub ttl: u32,
    /// Deliver the node's multicast to other sockets on this host (IP_MULTICAST_LOOP). Needed for several
    /// processes on one host; loopback ignores it.
    pub multicast_loop: bool,
    /// Allow other sockets on this host to bind the same group and port (SO_REUSEADDR and SO_REUSEPORT).
    pub reuse: bool,
    /// Receive buffer to request for the group socket, in bytes (0 keeps the kernel default). The kernel caps
    /// it at `net.core.rmem_max` (Linux) or `kern.ipc.maxsockbuf` (BSD, macOS); a cap is reported as a
    /// warning, not an error. Size it by the kernel's per-datagram charge (about 832 B for a 64-byte
    /// datagram on Linux), not by payload.
    pub recv_buffer: usize,
    /// Send buffer to request for the unicast socket, in bytes (0 keeps the kernel default); capped by
    /// `net.core.wmem_max` on Linux.
    pub send_buffer: usize,
}

impl Default for SocketConfig {
    fn default() -> SocketConfig {
        SocketConfig {
            group: SocketAddr::new(IpAddr::V4(DEFAULT_GROUP), DEFAULT_PORT),
            interface: Interface::Loopback,
            ttl: 0,
            multicast_loop: true,
            reuse: true,
            recv_buffer: DEFAULT_RECV_BUFFER,
            send_buffer: DEFAULT_SEND_BUFFER,
        }
    }
}

/// What was actually set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketReport {
    /// The sending socket's address: where other nodes see this node's packets come from.
    pub local: SocketAddr,
    /// Interface index joined on (and named in `IPV6_MULTICAST_IF`).
    pub interface_index: u32,
    /// Receive buffer of the group socket as read back. Linux reads back twice the granted size (the grant is
    /// `min(requested, net.core.rmem_max)`, the doubling covers kernel bookkeeping, and the whole doubled
    /// amount is what datagrams are charged against); other systems read back the grant.
    pub recv_buffer: usize,
    /// Send buffer of the unicast socket as read back (doubled on Linux like `recv_buffer`).
    pub send_buffer: usize,
    /// Human-readable warnings (e.g. a buffer clamped by `net.core.rmem_max`).
    pub warnings: Vec<String>,
}

/// A node's two sockets, non-blocking.
#[derive(Debug)]
pub struct NodeSockets {
    /// Bound to the group port, joined to the group: receives the group's traffic.
    pub group: UdpSocket,
    /// Bound to an ephemeral port on the interface: sends everything, receives unicast replies.
    pub unicast: UdpSocket,
    /// What was set up.
    pub report: SocketReport,
}

/// Why sockets could not be set up. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The named interface does not exist, or no interface has the given address. The string is the interface
    /// as given: a name, an address, `index N`, or `loopback`.
    #[error("unknown interface {0}: check `ip addr` for its name, index and addresses")]
    UnknownInterface(String),
    /// The group address is not a multicast address.
    #[error("{0} is not a multicast address: use a group in 239.0.0.0/8 (IPv4) or ff00::/8 (IPv6), e.g. 239.255.77.1")]
    NotMulticast(IpAddr),
    /// The port is taken by a socket that does not allow sharing, or reuse was disabled.
    #[error("port {port} is in use: stop the other program, pick another port, or enable address reuse")]
    AddrInUse {
        /// The port.
        port: u16,
    },
    /// The interface and the group are of different IP families: `Interface::Addr` of the other family, or an
    /// interface without any IPv4 address for an IPv4 group. (An IPv6 group on an interface without IPv6
    /// addresses is attempted with the unicast socket bound to `[::]:0`.)
    #[error("interface {interface} has no {family} address for group {group}")]
    FamilyMismatch {
        /// The interface as given.
        interface: String,
        /// "IPv4" or "IPv6".
        family: &'static str,
        /// The group.
        group: IpAddr,
    },
    /// A socket call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Opens and configures a node's sockets.
///
/// Steps, in order (each failure names the step in [`NetError::Io::op`](NetError::Io)):
///
/// 1. The group must be multicast ([`NetError::NotMulticast`]); the interface is resolved to an index and a
///    local address of the group's family ([`NetError::UnknownInterface`], [`NetError::FamilyMismatch`]).
///    For IPv6 an interface without any IPv6 address is accepted: the unicast socket then binds `[::]:0`.
/// 2. The group socket: `SO_REUSEADDR` and `SO_REUSEPORT` when [`SocketConfig::reuse`]; on Linux
///    `IP_MULTICAST_ALL` / `IPV6_MULTICAST_ALL` off and bound to the group address itself (elsewhere to the
///    unspecified address), so traffic of other groups on the same port is not received; joined on the
///    interface; receive buffer set and read back; non-blocking. A port held by a socket that does not allow
///    sharing (or `reuse: false` on either side) gives [`NetError::AddrInUse`].
/// 3. The unicast socket: bound to the interface address, port 0; `IP_MULTICAST_IF` (IPv4: the address;
///    IPv6: the index), multicast TTL / hop limit, multicast loop; send buffer set and read back;
///    non-blocking.
///
/// A buffer the kernel clamps below the request is not an error: a warning naming the sysctl to raise is
/// pushed to [`SocketReport::warnings`].
///
/// Behaviour measured on Linux 6.18 (the project's machine):
///
/// - `SO_RCVBUF` / `SO_SNDBUF` read back as twice the granted size, the grant being
///   `min(request, net.core.rmem_max / wmem_max)` (and at least 2304 / 4608 bytes read back); root does not
///   change this, only `SO_RCVBUFFORCE` would, and it is not used.
/// - A plain socket bound to `0.0.0.0:port` without `SO_REUSEADDR` makes the group bind fail with
///   `EADDRINUSE` even though ours sets both reuse options: [`NetError::AddrInUse`].
/// - IPv6 on loopback: both sockets open and joining an `ff15::/16` group on `lo` succeeds, although `lo`
///   lacks the `MULTICAST` flag; the kernel does not deliver IPv6 multicast over `lo` (see
///   `KERNEL-NOTES.md`), so IPv6 groups need a real or veth interface to carry traffic.
pub fn open(cfg: &SocketConfig) -> Result<NodeSockets, NetError> {
    sockets::open(cfg)
}

#[cfg(unix)]
mod iface;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod own_filter;
#[cfg(any(target_os = "linux", target_os = "android"))]
pub use own_filter::drop_own_packets;

/// Without a socket filter, the protocol drops the node's own packets after they are read.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn drop_own_packets(_socket: &UdpSocket, _session: u64) -> std::io::Result<()> {
    Ok(())
}
#[cfg(unix)]
mod sockets;

/// Interface lookup and socket options are written against the Unix socket API (getifaddrs, if_nametoindex).
#[cfg(not(unix))]
mod sockets {
    pub(super) fn open(_cfg: &super::SocketConfig) -> Result<super::NodeSockets, super::NetError> {
        Err(super::NetError::Io {
            op: "open multicast sockets",
            source: std::io::Error::new(std::io::ErrorKind::Unsupported, "blip::net supports Unix platforms only"),
        })
    }
}

#[cfg(all(test, unix))]
mod tests;
