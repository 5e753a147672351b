//! Interface lookup: which interface index and local address a [`SocketConfig`](super::SocketConfig) means.
//!
//! Addresses come from `getifaddrs(3)` (freed by a guard, also on early return), names and indices from
//! `if_nametoindex(3)` / `if_indextoname(3)`.

use std::ffi::{CStr, CString};
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
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// `if_indextoname`, `None` if there is no interface with that index.
pub(crate) fn index_to_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes the call may write.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// Frees the `getifaddrs` list when dropped.
struct IfAddrsGuard(*mut libc::ifaddrs);

impl Drop for IfAddrsGuard {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from a successful getifaddrs and is freed exactly once.
            unsafe { libc::freeifaddrs(self.0) };
        }
    }
}

/// Every IPv4 and IPv6 address of every interface.
pub(crate) fn list() -> Result<Vec<IfAddr>, NetError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head on success; the guard frees it.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(NetError::Io {
            op: "list interface addresses (getifaddrs)",
            source: std::io::Error::last_os_error(),
        });
    }
    let guard = IfAddrsGuard(head);
    let mut out = Vec::new();
    let mut cur = guard.0;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list owned by `guard`, alive until the guard drops.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says which larger struct it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let (addr, scope_id) = match family {
            libc::AF_INET => {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                (IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))), 0)
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let (v6, scope) = v6_with_scope(sin6.sin6_addr.s6_addr, sin6.sin6_scope_id);
                (IpAddr::V6(v6), scope)
            }
            _ => continue,
        };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        let index = name_to_index(&name).unwrap_or(0);
        let loopback = ifa.ifa_flags & (libc::IFF_LOOPBACK as libc::c_uint) != 0;
        out.push(IfAddr { name, index, addr, scope_id, loopback });
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
