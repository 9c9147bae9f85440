//! Address ranges for a TCP server channel's allow-list (`peers=`): `10.0.0.0/8`,
//! `192.168.1.7` (a single host), `fd00::/8`.
//!
//! A peer is matched by its canonical address, so an IPv4 peer that reaches a dual-stack
//! listener as `::ffff:10.1.2.3` matches `10.0.0.0/8`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One address range: a network address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a range does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address part is not an IP address.
    #[error("'{0}' is not an IP address (give a range such as 10.0.0.0/8 or 127.0.0.1)")]
    AddressInvalid(String),
    /// The prefix length is not a number or too long for the address family.
    #[error("'/{0}' is not a prefix length for this address (0..=32 for IPv4, 0..=128 for IPv6)")]
    PrefixInvalid(String),
    /// Bits are set below the prefix (`10.1.0.0/8`): probably a typo, so refused.
    #[error("'{0}' has host bits set below its prefix (did you mean {1}?)")]
    HostBitsSet(String, String),
}

impl Cidr {
    fn bits(addr: IpAddr) -> (u128, u8) {
        match addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    }

    fn mask(prefix: u8, width: u8) -> u128 {
        if prefix == 0 {
            0
        } else {
            let all = if width == 32 {
                u128::from(u32::MAX)
            } else {
                u128::MAX
            };
            all & !((1u128 << (width - prefix)) - 1)
        }
    }

    /// Whether `peer` lies in the range.
    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        if peer.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let (net, width) = Self::bits(self.addr);
        let (p, _) = Self::bits(peer);
        let m = Self::mask(self.prefix, width);
        p & m == net & m
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = IpAddr::from_str(addr_text)
            .map_err(|_| CidrError::AddressInvalid(addr_text.to_owned()))?
            .to_canonical();
        let (net, width) = Self::bits(addr);
        let prefix = match prefix_text {
            None => width,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|v| *v <= width)
                .ok_or_else(|| CidrError::PrefixInvalid(p.to_owned()))?,
        };
        let m = Self::mask(prefix, width);
        if net & !m & Self::mask(width, width) != 0 {
            let fixed = match addr {
                IpAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::from((net & m) as u32)),
                IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(net & m)),
            };
            return Err(CidrError::HostBitsSet(
                s.to_owned(),
                format!("{fixed}/{prefix}"),
            ));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_match_their_addresses_only() {
        let r: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(r.contains(ip("10.200.3.4")));
        assert!(!r.contains(ip("11.0.0.1")));
        assert!(r.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped peers match");
        assert!(!r.contains(ip("::1")));
        let host: Cidr = "127.0.0.1".parse().unwrap();
        assert_eq!(host.to_string(), "127.0.0.1/32");
        assert!(host.contains(ip("127.0.0.1")) && !host.contains(ip("127.0.0.2")));
        let any: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains(ip("203.0.113.9")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let one: Cidr = "::1/128".parse().unwrap();
        assert!(one.contains(ip("::1")));
    }

    #[test]
    fn bad_ranges_say_what_is_wrong() {
        for (text, want) in [
            ("10.0.0/8", "not an IP address"),
            ("10.0.0.0/33", "'/33' is not a prefix length"),
            ("10.0.0.0/x", "'/x' is not a prefix length"),
            ("10.1.0.0/8", "did you mean 10.0.0.0/8?"),
            ("fd00::1/8", "did you mean fd00::/8?"),
        ] {
            let err = text.parse::<Cidr>().unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
