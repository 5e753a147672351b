//! Interface lookup: which interface index and local address a [`SocketConfig`](super::SocketConfig) means.
//!
//! Addresses come from `getifaddrs(3)` (freed by a guard, also on early return), names and indices from
//! `if_nametoindex(3)` / `if_indextoname(3)`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Interface, NetError};

/// One address of one interface, as listed by `getifaddrs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IfAddr {
    /// Interface name, e.g. `lo`.
    pub name: String,
    /// Interface index (`if_nametoindex`), 0 if the name has no index.
    pub index: u32,
    /// The address. For IPv6 link-local addresses the scope is in `scope_id`, not in the address bytes.
    pub addr: IpAddr,
    /// IPv6 scope id (the interface index for link-local addresses), 0 otherwise.
    pub scope_id: u32,
    /// `IFF_LOOPBACK` is set.
    pub loopback: bool,
}

/// The interface a configuration resolves to, for a group of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// Interface index to join and send on.
    pub index: u32,
    /// Local address to bind the unicast socket to and, for IPv4, to name in `IP_MULTICAST_IF`. Always
    /// present for IPv4; for IPv6 `None` when the interface has no IPv6 address (bind `[::]:0` then).
    pub addr: Option<IpAddr>,
    /// IPv6 scope id for `addr` (non-zero for link-local addresses).
    pub scope_id: u32,
}

/// How an interface is named in error messages: as the user gave it.
pub(crate) fn describe(interface: &Interface) -> String {
    match interface {
        Interface::Loopback => "loopback".to_string(),
        Interface::Addr(ip) => ip.to_string(),
        Interface::Index(i) => format!("index {i}"),
        Interface::Name(name) => name.clone(),
    }
}

fn family_name(group: IpAddr) -> &'static str {
    if group.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Resolves `interface` for a group of `group`'s family.
pub(crate) fn resolve(interface: &Interface, group: IpAddr) -> Result<Resolved, NetError> {
    let want_v4 = group.is_ipv4();
    let mismatch = || NetError::FamilyMismatch { interface: describe(interface), family: family_name(group), group };
    let unknown = || NetError::UnknownInterface(describe(interface));

    // An address of the other family can never be bound or joined for this group: say so before looking.
    if matches!(interface, Interface::Addr(ip) if ip.is_ipv4() != want_v4) {
        return Err(mismatch());
    }

    let all = list()?;
    let index = match interface {
        Interface::Loopback => {
            let well_known = if want_v4 { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::V6(Ipv6Addr::LOCALHOST) };
            let owner = all.iter().find(|a| a.addr == well_known).or_else(|| all.iter().find(|a| a.loopback));
            match owner {
                Some(a) if a.index != 0 => a.index,
                _ => return Err(unknown()),
            }
        }
        Interface::Addr(ip) => match all.iter().find(|a| a.addr == *ip) {
            Some(a) if a.index != 0 => {
                // The address itself is the one to use, not merely the first of its interface.
                return Ok(Resolved { index: a.index, addr: Some(*ip), scope_id: a.scope_id });
            }
            _ => return Err(unknown()),
        },
        Interface::Index(i) => {
            if *i == 0 || index_to_name(*i).is_none() {
                return Err(unknown());
            }
            *i
        }
        Interface::Name(name) => match name_to_index(name) {
            Some(i) => i,
            None => return Err(unknown()),
        },
    };

    let of_family: Vec<&IfAddr> = all.iter().filter(|a| a.index == index && a.addr.is_ipv4() == want_v4).collect();
    let pick = if want_v4 {
        // Loopback: 127.0.0.1 if the interface has it (it may carry more of 127/8).
        of_family.iter().find(|a| a.addr == IpAddr::V4(Ipv4Addr::LOCALHOST)).or_else(|| of_family.first()).copied()
    } else {
        pick_v6(&of_family, group)
    };
    match pick {
        Some(a) => Ok(Resolved { index, addr: Some(a.addr), scope_id: a.scope_id }),
        None if want_v4 => Err(mismatch()),
        None => Ok(Resolved { index, addr: None, scope_id: 0 }),
    }
}

/// Chooses the IPv6 source address: `::1` first, then an address whose scope suits the group's (link-local
/// for link- or interface-scoped groups, wider otherwise), then any.
fn pick_v6<'a>(addrs: &[&'a IfAddr], group: IpAddr) -> Option<&'a IfAddr> {
    let link_scoped_group = match group {
        IpAddr::V6(g) => matches!(g.octets()[1] & 0x0f, 1 | 2),
        IpAddr::V4(_) => false,
    };
    let is_link_local = |a: &IfAddr| matches!(a.addr, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
    addrs
        .iter()
        .find(|a| a.addr == IpAddr::V6(Ipv6Addr::LOCALHOST))
        .or_else(|| addrs.iter().find(|a| is_link_local(a) == link_scoped_group))
        .or_else(|| addrs.first())
        .copied()
}

/// `if_nametoindex`, `None` if there is no such interface.
pub(crate) fn name_to_index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok().filter(|&i| i != 0)
}

/// `if_indextoname`, `None` if there is no interface with that index.
pub(crate) fn index_to_name(index: u32) -> Option<String> {
    // nix 0.30 does not turn the NULL of an unknown index into an error: it returns an empty name.
    let name = nix::net::if_::if_indextoname(index).ok()?.to_string_lossy().into_owned();
    (!name.is_empty()).then_some(name)
}

/// Every IPv4 and IPv6 address of every interface (nix's safe `getifaddrs`, which frees the list).
pub(crate) fn list() -> Result<Vec<IfAddr>, NetError> {
    use nix::net::if_::InterfaceFlags;
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| NetError::Io { op: "list interface addresses (getifaddrs)", source: e.into() })?;
    let mut out = Vec::new();
    for ifa in addrs {
        let Some(a) = ifa.address else { continue };
        let (addr, scope_id) = if let Some(v4) = a.as_sockaddr_in() {
            (IpAddr::V4(v4.ip()), 0)
        } else if let Some(v6) = a.as_sockaddr_in6() {
            let (v6, scope) = v6_with_scope(v6.ip().octets(), v6.scope_id());
            (IpAddr::V6(v6), scope)
        } else {
            continue;
        };
        let index = name_to_index(&ifa.interface_name).unwrap_or(0);
        let loopback = ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK);
        out.push(IfAddr { name: ifa.interface_name, index, addr, scope_id, loopback });
    }
    Ok(out)
}

/// The BSD kernels (macOS included) report link-local addresses with the scope embedded in bytes 2..4
/// ("KAME" form) and sometimes no `sin6_scope_id`: move it out so the address compares equal to what users
/// write.
#[cfg(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly"
))]
fn v6_with_scope(mut bytes: [u8; 16], scope_id: u32) -> (Ipv6Addr, u32) {
    let link_local = bytes[0] == 0xfe && (bytes[1] & 0xc0) == 0x80;
    let embedded = u32::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    let mut scope = scope_id;
    if link_local && embedded != 0 {
        if scope == 0 {
            scope = embedded;
        }
        bytes[2] = 0;
        bytes[3] = 0;
    }
    (Ipv6Addr::from(bytes), scope)
}

#[cfg(not(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly"
)))]
fn v6_with_scope(bytes: [u8; 16], scope_id: u32) -> (Ipv6Addr, u32) {
    (Ipv6Addr::from(bytes), scope_id)
}
