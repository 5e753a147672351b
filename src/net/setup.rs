//! The socket options, one function per socket.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};

use super::iface::Resolved;
use super::{NetError, SocketConfig};

fn io_err(op: &'static str) -> impl Fn(io::Error) -> NetError {
    move |source| NetError::Io { op, source }
}

fn new_socket(group: IpAddr) -> Result<Socket, NetError> {
    let domain = if group.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(io_err("create UDP socket"))?;
    if group.is_ipv6() {
        s.set_only_v6(true).map_err(io_err("set IPV6_V6ONLY"))?;
    }
    Ok(s)
}

fn bind(s: &Socket, addr: SocketAddr) -> Result<(), NetError> {
    s.bind(&SockAddr::from(addr)).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            NetError::AddrInUse { port: addr.port() }
        } else {
            NetError::Io { op: "bind", source: e }
        }
    })
}

/// Bound to the group and port, joined on the interface: receives the group's traffic and nothing else.
pub(super) fn group_socket(
    cfg: &SocketConfig,
    iface: &Resolved,
    warnings: &mut Vec<String>,
) -> Result<Socket, NetError> {
    let group = cfg.group.ip();
    let s = new_socket(group)?;
    if cfg.reuse {
        s.set_reuse_address(true).map_err(io_err("set SO_REUSEADDR"))?;
        #[cfg(unix)]
        s.set_reuse_port(true).map_err(io_err("set SO_REUSEPORT"))?;
    }
    // Binding to the group address (Linux) filters out other groups sharing the port.
    let bind_ip = if cfg!(target_os = "linux") {
        group
    } else if group.is_ipv4() {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    };
    bind(&s, SocketAddr::new(bind_ip, cfg.group.port()))?;
    match group {
        IpAddr::V4(g) => {
            #[cfg(target_os = "linux")]
            s.set_multicast_all_v4(false).map_err(io_err("set IP_MULTICAST_ALL off"))?;
            let via = match iface.addr {
                IpAddr::V4(a) if iface.index == 0 => InterfaceIndexOrAddress::Address(a),
                _ => InterfaceIndexOrAddress::Index(iface.index),
            };
            s.join_multicast_v4_n(&g, &via).map_err(io_err("join IPv4 group (IP_ADD_MEMBERSHIP)"))?;
        }
        IpAddr::V6(g) => {
            #[cfg(target_os = "linux")]
            s.set_multicast_all_v6(false).map_err(io_err("set IPV6_MULTICAST_ALL off"))?;
            s.join_multicast_v6(&g, iface.index).map_err(io_err("join IPv6 group (IPV6_JOIN_GROUP)"))?;
        }
    }
    s.set_recv_buffer_size(cfg.recv_buffer).map_err(io_err("set SO_RCVBUF"))?;
    let got = granted(&s, true)?;
    if got < cfg.recv_buffer {
        warnings.push(format!(
            "receive buffer clamped to {got} bytes (asked for {}): raise net.core.rmem_max, e.g. `sysctl -w net.core.rmem_max={}`",
            cfg.recv_buffer, cfg.recv_buffer
        ));
    }
    s.set_nonblocking(true).map_err(io_err("set non-blocking"))?;
    Ok(s)
}

/// Bound to an ephemeral port on the interface: sends everything, receives unicast replies.
pub(super) fn unicast_socket(
    cfg: &SocketConfig,
    iface: &Resolved,
    warnings: &mut Vec<String>,
) -> Result<(Socket, SocketAddr), NetError> {
    let s = new_socket(cfg.group.ip())?;
    let local = match iface.addr {
        IpAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(a, 0, 0, iface.scope)),
        a => SocketAddr::new(a, 0),
    };
    bind(&s, local)?;
    match iface.addr {
        IpAddr::V4(a) => {
            s.set_multicast_if_v4(&a).map_err(io_err("set IP_MULTICAST_IF"))?;
            s.set_multicast_ttl_v4(cfg.ttl).map_err(io_err("set IP_MULTICAST_TTL"))?;
            s.set_multicast_loop_v4(cfg.multicast_loop).map_err(io_err("set IP_MULTICAST_LOOP"))?;
        }
        IpAddr::V6(_) => {
            s.set_multicast_if_v6(iface.index).map_err(io_err("set IPV6_MULTICAST_IF"))?;
            s.set_multicast_hops_v6(cfg.ttl).map_err(io_err("set IPV6_MULTICAST_HOPS"))?;
            s.set_multicast_loop_v6(cfg.multicast_loop).map_err(io_err("set IPV6_MULTICAST_LOOP"))?;
        }
    }
    s.set_send_buffer_size(cfg.send_buffer).map_err(io_err("set SO_SNDBUF"))?;
    let got = granted(&s, false)?;
    if got < cfg.send_buffer {
        warnings.push(format!(
            "send buffer clamped to {got} bytes (asked for {}): raise net.core.wmem_max, e.g. `sysctl -w net.core.wmem_max={}`",
            cfg.send_buffer, cfg.send_buffer
        ));
    }
    s.set_nonblocking(true).map_err(io_err("set non-blocking"))?;
    let local = s
        .local_addr()
        .map_err(io_err("read local address"))?
        .as_socket()
        .ok_or_else(|| NetError::Io { op: "read local address", source: io::Error::other("not an IP socket") })?;
    Ok((s, local))
}

/// The buffer size the kernel granted. Linux reads back twice the granted size (the other half is for its
/// bookkeeping), so it is halved there.
pub(super) fn granted(s: &Socket, recv: bool) -> Result<usize, NetError> {
    let raw = if recv {
        s.recv_buffer_size().map_err(io_err("read SO_RCVBUF"))?
    } else {
        s.send_buffer_size().map_err(io_err("read SO_SNDBUF"))?
    };
    Ok(if cfg!(target_os = "linux") { raw / 2 } else { raw })
}
