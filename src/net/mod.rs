//! Socket setup for multicast groups (socket2): IPv4 and IPv6, join on a named interface, IP_MULTICAST_IF,
//! TTL / hop limit, loop, IP_MULTICAST_ALL off, address reuse so several processes on one host can join the
//! same group, and buffer sizes read back after setting.
//!
//! Defaults keep every packet on this host: the loopback interface, TTL 0, a group in 239.255.0.0/16.

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
    /// Receive buffer to request, in bytes.
    pub recv_buffer: usize,
    /// Send buffer to request, in bytes.
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
    /// Interface index joined on.
    pub interface_index: u32,
    /// Receive buffer the kernel granted (Linux reads back twice the granted size for bookkeeping; this is
    /// the granted size).
    pub recv_buffer: usize,
    /// Send buffer the kernel granted.
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
    /// The named interface does not exist, or has no address of the group's family.
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
    /// The interface and the group are of different IP families.
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
pub fn open(cfg: &SocketConfig) -> Result<NodeSockets, NetError> {
    let group = cfg.group.ip();
    if !group.is_multicast() {
        return Err(NetError::NotMulticast(group));
    }
    let iface = iface::resolve(&cfg.interface, group)?;
    let mut warnings = Vec::new();
    let group_sock = setup::group_socket(cfg, &iface, &mut warnings)?;
    let (unicast, local) = setup::unicast_socket(cfg, &iface, &mut warnings)?;
    let recv_buffer = setup::granted(&group_sock, true)?;
    let send_buffer = setup::granted(&unicast, false)?;
    Ok(NodeSockets {
        group: group_sock.into(),
        unicast: unicast.into(),
        report: SocketReport { local, interface_index: iface.index, recv_buffer, send_buffer, warnings },
    })
}

mod iface;
mod setup;

#[cfg(test)]
mod tests;
