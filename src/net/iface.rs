//! Finding an interface's index and the address to send from, by name, index, address or "loopback".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Interface, NetError};

/// An interface resolved for one IP family.
#[derive(Debug, Clone)]
pub(super) struct Resolved {
    pub(super) index: u32,
    /// Address to bind the sending socket to (and, for IPv4, IP_MULTICAST_IF).
    pub(super) addr: IpAddr,
    /// Scope id for a link-local IPv6 address.
    pub(super) scope: u32,
}

struct Entry {
    name: String,
    index: u32,
    addr: IpAddr,
    loopback: bool,
}

#[cfg(unix)]
fn entries() -> Result<Vec<Entry>, NetError> {
    use nix::ifaddrs::getifaddrs;
    use nix::net::if_::{InterfaceFlags, if_nametoindex};
    let io = |e: nix::Error| NetError::Io { op: "list interfaces (getifaddrs)", source: e.into() };
    let mut out = Vec::new();
    for ifa in getifaddrs().map_err(io)? {
        let Some(a) = ifa.address else { continue };
        let addr = if let Some(v4) = a.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = a.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let Ok(index) = if_nametoindex(ifa.interface_name.as_str()) else { continue };
        out.push(Entry {
            loopback: ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK),
            name: ifa.interface_name,
            index,
            addr,
        });
    }
    Ok(out)
}

#[cfg(not(unix))]
fn entries() -> Result<Vec<Entry>, NetError> {
    Ok(Vec::new())
}

fn describe(i: &Interface) -> String {
    match i {
        Interface::Loopback => "loopback".into(),
        Interface::Addr(a) => a.to_string(),
        Interface::Index(n) => format!("#{n}"),
        Interface::Name(s) => s.clone(),
    }
}

/// Resolves `interface` for the family of `group`.
pub(super) fn resolve(interface: &Interface, group: IpAddr) -> Result<Resolved, NetError> {
    let all = entries()?;
    let matching: Vec<&Entry> = all
        .iter()
        .filter(|e| match interface {
            Interface::Loopback => e.loopback,
            Interface::Addr(a) => all.iter().any(|x| x.addr == *a && x.name == e.name),
            Interface::Index(n) => e.index == *n,
            Interface::Name(s) => e.name == *s,
        })
        .collect();
    if matching.is_empty() {
        if let (Interface::Loopback, IpAddr::V4(_)) = (interface, group) {
            // No interface list on this platform: loopback is still 127.0.0.1.
            return Ok(Resolved { index: 0, addr: IpAddr::V4(Ipv4Addr::LOCALHOST), scope: 0 });
        }
        return Err(NetError::UnknownInterface(describe(interface)));
    }
    let index = matching[0].index;
    let pick = |pred: &dyn Fn(&IpAddr) -> bool| matching.iter().find(|e| pred(&e.addr)).map(|e| e.addr);
    let addr = match group {
        // An address names the interface and the source address at once; it must be of the group's family.
        _ if matches!(interface, Interface::Addr(a) if a.is_ipv4() != group.is_ipv4()) => None,
        IpAddr::V4(_) => match interface {
            Interface::Addr(a @ IpAddr::V4(_)) => Some(*a),
            Interface::Loopback => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            _ => pick(&|a| a.is_ipv4()),
        },
        IpAddr::V6(_) => match interface {
            Interface::Addr(a @ IpAddr::V6(_)) => Some(*a),
            Interface::Loopback => Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            // Prefer a routable address (stable source); a link-local one needs its scope.
            _ => pick(&|a| matches!(a, IpAddr::V6(v6) if !is_link_local(v6))).or_else(|| pick(&|a| a.is_ipv6())),
        },
    };
    let Some(addr) = addr else {
        return Err(NetError::FamilyMismatch {
            interface: describe(interface),
            family: if group.is_ipv4() { "IPv4" } else { "IPv6" },
            group,
        });
    };
    let scope = match addr {
        IpAddr::V6(v6) if is_link_local(&v6) => index,
        _ => 0,
    };
    Ok(Resolved { index, addr, scope })
}

fn is_link_local(a: &Ipv6Addr) -> bool {
    (a.segments()[0] & 0xffc0) == 0xfe80
}
