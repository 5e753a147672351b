//! Source access control: allow/deny rules by source network, first match wins, with an explicit default.
//! Checked on the source address of every datagram before anything in it is parsed.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// What a rule does with a matching source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Process the datagram.
    Allow,
    /// Drop it (counted in `Stats::denied`).
    Deny,
}

/// An IPv4 or IPv6 network, `address/prefix` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a network could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The part before `/` is not an IP address.
    #[error("not an IP address: {0:?}")]
    Address(String),
    /// The prefix length is not a number up to 32 (IPv4) or 128 (IPv6).
    #[error("bad prefix length {0:?}: at most 32 for IPv4, 128 for IPv6")]
    Prefix(String),
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| CidrError::Address(a.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => {
                p.trim().parse::<u8>().ok().filter(|&n| n <= max).ok_or_else(|| CidrError::Prefix(p.to_owned()))?
            }
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is in this network. IPv4-mapped IPv6 sources are matched as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u32::from(net) as u128, u32::from(ip) as u128, 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(u128::from(net), u128::from(ip), 128, self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, bits: u32, prefix: u8) -> bool {
    let host_bits = bits - prefix as u32;
    host_bits >= bits || (a >> host_bits) == (b >> host_bits)
}

/// Ordered rules and a default. The default list allows everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessList {
    rules: Vec<(Action, Cidr)>,
    default: Action,
}

impl Default for AccessList {
    fn default() -> AccessList {
        AccessList::new(Action::Allow)
    }
}

impl AccessList {
    /// An empty list whose answer for every source is `default`.
    pub fn new(default: Action) -> AccessList {
        AccessList { rules: Vec::new(), default }
    }

    /// Appends a rule (rules are tried in the order added; the first match wins).
    pub fn rule(mut self, action: Action, network: Cidr) -> AccessList {
        self.rules.push((action, network));
        self
    }

    /// Appends `allow` for a network written as text.
    pub fn allow(self, network: &str) -> Result<AccessList, CidrError> {
        Ok(self.rule(Action::Allow, network.parse()?))
    }

    /// Appends `deny` for a network written as text.
    pub fn deny(self, network: &str) -> Result<AccessList, CidrError> {
        Ok(self.rule(Action::Deny, network.parse()?))
    }

    /// The action for a source.
    pub fn check(&self, from: SocketAddr) -> Action {
        let ip = from.ip();
        self.rules.iter().find(|(_, net)| net.contains(ip)).map(|(a, _)| *a).unwrap_or(self.default)
    }

    /// Whether every source is allowed (no rules, default allow): the check can be skipped.
    pub fn allows_all(&self) -> bool {
        self.rules.is_empty() && self.default == Action::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 4000)
    }

    #[test]
    fn cidr_table() {
        let cases = [
            ("10.0.0.0/8", "10.200.3.4", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("192.168.1.0/24", "192.168.1.255", true),
            ("192.168.1.0/24", "192.168.2.1", false),
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1", "127.0.0.2", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("fd00::/8", "fd12:3456::1", true),
            ("fd00::/8", "fe80::1", false),
            ("::/0", "2001:db8::1", true),
            ("::1", "::1", true),
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("10.0.0.0/8", "fd00::1", false),
            ("fd00::/8", "10.0.0.1", false),
        ];
        for (net, ip, want) in cases {
            let c: Cidr = net.parse().unwrap();
            assert_eq!(c.contains(ip.parse().unwrap()), want, "{net} contains {ip}");
        }
    }

    #[test]
    fn bad_networks_are_errors() {
        assert!(matches!("10.0.0.0/33".parse::<Cidr>(), Err(CidrError::Prefix(_))));
        assert!(matches!("fd00::/129".parse::<Cidr>(), Err(CidrError::Prefix(_))));
        assert!(matches!("banana/8".parse::<Cidr>(), Err(CidrError::Address(_))));
        assert!(matches!("10.0.0.0/x".parse::<Cidr>(), Err(CidrError::Prefix(_))));
    }

    #[test]
    fn first_match_wins_then_default() {
        let list = AccessList::new(Action::Deny).deny("10.0.0.66").unwrap().allow("10.0.0.0/8").unwrap();
        assert_eq!(list.check(at("10.0.0.66")), Action::Deny);
        assert_eq!(list.check(at("10.0.0.67")), Action::Allow);
        assert_eq!(list.check(at("192.168.0.1")), Action::Deny, "default");
        assert!(!list.allows_all());
        assert!(AccessList::default().allows_all());
    }
}
