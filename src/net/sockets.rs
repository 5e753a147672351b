//! The two sockets of a node: the group socket (receives the group's traffic) and the unicast socket (sends
//! everything, receives unicast replies).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::iface::{self, Resolved};
use super::{NetError, NodeSockets, SocketConfig, SocketReport};

/// Wraps an OS error with the step that failed.
fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> NetError {
    move |source| NetError::Io { op, source }
}

pub(super) fn open(cfg: &SocketConfig) -> Result<NodeSockets, NetError> {
    let group_ip = cfg.group.ip();
    if !group_ip.is_multicast() {
        return Err(NetError::NotMulticast(group_ip));
    }
    let resolved = iface::resolve(&cfg.interface, group_ip)?;
    let mut warnings = Vec::new();
    let (group, recv_buffer) = open_group(cfg, &resolved, &mut warnings)?;
    let (unicast, local, send_buffer) = open_unicast(cfg, &resolved, &mut warnings)?;
    Ok(NodeSockets {
        group: group.into(),
        unicast: unicast.into(),
        report: SocketReport { local, interface_index: resolved.index, recv_buffer, send_buffer, warnings },
    })
}

/// A UDP socket of the group's family; IPv6 sockets are IPv6-only.
fn udp_socket(v4: bool, op: &'static str) -> Result<Socket, NetError> {
    let domain = if v4 { Domain::IPV4 } else { Domain::IPV6 };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err(op))?;
    if !v4 {
        socket.set_only_v6(true).map_err(io_err("set IPV6_V6ONLY"))?;
    }
    Ok(socket)
}

/// IPv6 multicast scopes 1 (interface-local) and 2 (link-local) name a link, so binding needs a scope id.
fn link_scoped(group: &Ipv6Addr) -> bool {
    matches!(group.octets()[1] & 0x0f, 1 | 2)
}

/// Where the group socket binds: on Linux the group address itself (the kernel then delivers only that
/// group's datagrams to it), elsewhere the unspecified address.
fn group_bind_addr(cfg: &SocketConfig, resolved: &Resolved) -> SocketAddr {
    let port = cfg.group.port();
    if cfg!(target_os = "linux") {
        match cfg.group {
            SocketAddr::V4(g) => SocketAddr::V4(SocketAddrV4::new(*g.ip(), port)),
            SocketAddr::V6(g) => {
                let scope = if link_scoped(g.ip()) { resolved.index } else { 0 };
                SocketAddr::V6(SocketAddrV6::new(*g.ip(), port, 0, scope))
            }
        }
    } else {
        match cfg.group {
            SocketAddr::V4(_) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
            SocketAddr::V6(_) => SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)),
        }
    }
}

/// Receive only the groups this socket joined (Linux; the default delivers every group joined on the host
/// whose port matches).
#[cfg(target_os = "linux")]
fn multicast_all_off(socket: &Socket, v4: bool) -> Result<(), NetError> {
    if v4 {
        socket.set_multicast_all_v4(false).map_err(io_err("set IP_MULTICAST_ALL off"))
    } else {
        socket.set_multicast_all_v6(false).map_err(io_err("set IPV6_MULTICAST_ALL off"))
    }
}

#[cfg(not(target_os = "linux"))]
fn multicast_all_off(_socket: &Socket, _v4: bool) -> Result<(), NetError> {
    Ok(())
}

fn open_group(
    cfg: &SocketConfig,
    resolved: &Resolved,
    warnings: &mut Vec<String>,
) -> Result<(Socket, usize), NetError> {
    let v4 = cfg.group.is_ipv4();
    let socket = udp_socket(v4, "create group socket")?;
    if cfg.reuse {
        socket.set_reuse_address(true).map_err(io_err("set SO_REUSEADDR"))?;
        #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))))]
        socket.set_reuse_port(true).map_err(io_err("set SO_REUSEPORT"))?;
    }
    multicast_all_off(&socket, v4)?;

    let bind_to = group_bind_addr(cfg, resolved);
    socket.bind(&SockAddr::from(bind_to)).map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            NetError::AddrInUse { port: cfg.group.port() }
        } else {
            NetError::Io { op: "bind group socket", source }
        }
    })?;

    join(&socket, cfg.group.ip(), resolved)?;

    let recv_buffer = set_buffer(&socket, Buffer::Recv, cfg.recv_buffer, warnings)?;
    socket.set_nonblocking(true).map_err(io_err("set group socket non-blocking"))?;
    Ok((socket, recv_buffer))
}

fn join(socket: &Socket, group: IpAddr, resolved: &Resolved) -> Result<(), NetError> {
    match group {
        IpAddr::V4(g) => {
            #[cfg(target_os = "linux")]
            let joined = socket.join_multicast_v4_n(&g, &socket2::InterfaceIndexOrAddress::Index(resolved.index));
            #[cfg(not(target_os = "linux"))]
            let joined = match resolved.addr {
                Some(IpAddr::V4(a)) => socket.join_multicast_v4(&g, &a),
                _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "no IPv4 address on the interface")),
            };
            joined.map_err(io_err("join IPv4 multicast group (IP_ADD_MEMBERSHIP)"))
        }
        IpAddr::V6(g) => {
            socket.join_multicast_v6(&g, resolved.index).map_err(io_err("join IPv6 multicast group (IPV6_JOIN_GROUP)"))
        }
    }
}

fn open_unicast(
    cfg: &SocketConfig,
    resolved: &Resolved,
    warnings: &mut Vec<String>,
) -> Result<(Socket, SocketAddr, usize), NetError> {
    let v4 = cfg.group.is_ipv4();
    let socket = udp_socket(v4, "create unicast socket")?;
    // Never receive group traffic here, whatever port the kernel picks.
    multicast_all_off(&socket, v4)?;
    match resolved.addr {
        Some(IpAddr::V4(a)) => {
            socket.bind(&SockAddr::from(SocketAddrV4::new(a, 0))).map_err(io_err("bind unicast socket"))?;
            socket.set_multicast_if_v4(&a).map_err(io_err("set IP_MULTICAST_IF"))?;
            socket.set_multicast_ttl_v4(cfg.ttl).map_err(io_err("set IP_MULTICAST_TTL"))?;
            socket.set_multicast_loop_v4(cfg.multicast_loop).map_err(io_err("set IP_MULTICAST_LOOP"))?;
        }
        addr => {
            let ip = match addr {
                Some(IpAddr::V6(a)) => a,
                _ => Ipv6Addr::UNSPECIFIED,
            };
            let bind_to = SocketAddrV6::new(ip, 0, 0, resolved.scope_id);
            socket.bind(&SockAddr::from(bind_to)).map_err(io_err("bind unicast socket"))?;
            socket.set_multicast_if_v6(resolved.index).map_err(io_err("set IPV6_MULTICAST_IF"))?;
            socket.set_multicast_hops_v6(cfg.ttl).map_err(io_err("set IPV6_MULTICAST_HOPS"))?;
            socket.set_multicast_loop_v6(cfg.multicast_loop).map_err(io_err("set IPV6_MULTICAST_LOOP"))?;
        }
    }
    let send_buffer = set_buffer(&socket, Buffer::Send, cfg.send_buffer, warnings)?;
    socket.set_nonblocking(true).map_err(io_err("set unicast socket non-blocking"))?;
    let local = socket.local_addr().map_err(io_err("read unicast socket address"))?.as_socket().ok_or_else(|| {
        NetError::Io {
            op: "read unicast socket address",
            source: io::Error::new(io::ErrorKind::InvalidData, "not an IP socket address"),
        }
    })?;
    Ok((socket, local, send_buffer))
}

#[derive(Clone, Copy)]
enum Buffer {
    Recv,
    Send,
}

impl Buffer {
    fn what(self) -> &'static str {
        match self {
            Buffer::Recv => "receive",
            Buffer::Send => "send",
        }
    }

    fn option(self) -> &'static str {
        match self {
            Buffer::Recv => "SO_RCVBUF",
            Buffer::Send => "SO_SNDBUF",
        }
    }

    /// The sysctl that caps this buffer.
    fn sysctl(self) -> &'static str {
        match (self, cfg!(target_os = "linux")) {
            (Buffer::Recv, true) => "net.core.rmem_max",
            (Buffer::Send, true) => "net.core.wmem_max",
            (_, false) => "kern.ipc.maxsockbuf",
        }
    }

    fn set(self, socket: &Socket, size: usize) -> io::Result<()> {
        match self {
            Buffer::Recv => socket.set_recv_buffer_size(size),
            Buffer::Send => socket.set_send_buffer_size(size),
        }
    }

    fn get(self, socket: &Socket) -> io::Result<usize> {
        match self {
            Buffer::Recv => socket.recv_buffer_size(),
            Buffer::Send => socket.send_buffer_size(),
        }
    }
}

/// Linux reads `SO_RCVBUF` / `SO_SNDBUF` back as twice what was granted (the kernel doubles the request to
/// leave room for its bookkeeping); the BSDs and macOS read back the grant itself.
const READ_BACK_FACTOR: usize = if cfg!(target_os = "linux") { 2 } else { 1 };

/// Sets a buffer size, reads it back and warns when the kernel granted less than requested. A request of 0
/// keeps the kernel's default. Returns the value read back.
///
/// Linux clamps an oversized request to the sysctl maximum silently; the BSDs and macOS refuse it with
/// `ENOBUFS`, so there the request is halved until accepted (down to 64 KiB) and the result reported the
/// same way.
fn set_buffer(socket: &Socket, which: Buffer, requested: usize, warnings: &mut Vec<String>) -> Result<usize, NetError> {
    let set_op = match which {
        Buffer::Recv => "set SO_RCVBUF",
        Buffer::Send => "set SO_SNDBUF",
    };
    let get_op = match which {
        Buffer::Recv => "read SO_RCVBUF",
        Buffer::Send => "read SO_SNDBUF",
    };
    // The option is a C int: larger requests would wrap.
    let requested = requested.min(i32::MAX as usize);
    let mut size = requested;
    while size > 0 {
        match which.set(socket, size) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && size > (64 << 10) => size /= 2,
            Err(e) => return Err(NetError::Io { op: set_op, source: e }),
        }
    }
    let read_back = which.get(socket).map_err(io_err(get_op))?;
    let granted = read_back / READ_BACK_FACTOR;
    if requested > 0 && granted < requested {
        let reported = if READ_BACK_FACTOR == 2 {
            format!(" ({} reads back {read_back}, twice the grant)", which.option())
        } else {
            String::new()
        };
        warnings.push(format!(
            "{} buffer: requested {requested} bytes, granted {granted}{reported}: the kernel caps it at {}; \
             raise the cap with `sudo sysctl -w {}={requested}`",
            which.what(),
            which.sysctl(),
            which.sysctl(),
        ));
    }
    Ok(read_back)
}
