//! Socket addresses to and from the kernel's `sockaddr_in` / `sockaddr_in6`, without unsafe code.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The kernel's form of an IPv4 address and port.
pub(super) fn sockaddr_v4(addr: &SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.ip().octets()) },
        sin_zero: [0; 8],
    }
}

/// The kernel's form of an IPv6 address, port, flow label and scope.
pub(super) fn sockaddr_v6(addr: &SocketAddrV6) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: addr.port().to_be(),
        sin6_flowinfo: addr.flowinfo(),
        sin6_addr: libc::in6_addr { s6_addr: addr.ip().octets() },
        sin6_scope_id: addr.scope_id(),
    }
}

/// Decodes the source address the kernel wrote into a receive buffer's name field; `None` for a family
/// other than IPv4 or IPv6, or a field too short for its family.
pub(super) fn decode(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(name.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    if family == libc::AF_INET as u16 {
        let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
        Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
    } else if family == libc::AF_INET6 as u16 {
        let flowinfo = u32::from_ne_bytes(name.get(4..8)?.try_into().ok()?);
        let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
        let scope_id = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
        Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flowinfo, scope_id)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: reads size_of::<T>() initialised bytes of a live value (sockaddr structs have no padding
        // that is left uninitialised here: every field, including sin_zero, was written).
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()).to_vec() }
    }

    #[test]
    fn round_trip_v4_and_v6() {
        let a4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 47_001);
        assert_eq!(decode(&bytes_of(&sockaddr_v4(&a4))), Some(SocketAddr::V4(a4)));
        let a6 = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 9, 7, 3);
        assert_eq!(decode(&bytes_of(&sockaddr_v6(&a6))), Some(SocketAddr::V6(a6)));
        assert_eq!(decode(&[0, 0, 1, 2]), None);
        assert_eq!(decode(&[]), None);
    }
}
