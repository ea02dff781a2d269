//! A lab network's IPv4 subnet: its address plan (gateway at .1, the DHCP
//! pool), and the rules a subnet must follow to be one.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What `--net user` uses; no lab network may overlap it.
pub const USER_NET: Subnet = Subnet {
    network: Ipv4Addr::new(10, 0, 2, 0),
    prefix: 24,
};
/// Where default subnets start: the first free /24 from here up.
pub const FIRST_DEFAULT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 0);

/// An IPv4 network, /16 to /29, written `192.168.100.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// Why a `--subnet` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid subnet '{text}': {why} (expected ADDRESS/PREFIX, /16 to /29, e.g. 192.168.100.0/24)"
)]
pub struct SubnetParseError {
    text: String,
    why: String,
}

impl Subnet {
    pub fn new(network: Ipv4Addr, prefix: u8) -> Option<Subnet> {
        let s = Subnet { network, prefix };
        ((16..=29).contains(&prefix) && u32::from(network) & !s.mask_bits() == 0).then_some(s)
    }

    fn mask_bits(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    fn size(&self) -> u32 {
        1 << (32 - u32::from(self.prefix))
    }

    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask_bits())
    }

    /// The gateway (DHCP, DNS, NAT): the subnet's first address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The DHCP pool, inclusive: from .100 up in a /24 or larger, the top
    /// half of a smaller subnet; never the gateway or the broadcast.
    pub fn pool(&self) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.network);
        let first = if self.size() >= 256 {
            base + 100
        } else {
            base + self.size() / 2
        };
        (
            Ipv4Addr::from(first),
            Ipv4Addr::from(u32::from(self.broadcast()) - 1),
        )
    }

    /// An address a member may use: inside, not the network, gateway or
    /// broadcast address.
    pub fn is_host(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network && ip != self.gateway() && ip != self.broadcast()
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.network)
    }

    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// The first /24 from 192.168.100.0 up that overlaps none of `taken`.
    pub fn first_free(taken: &[Subnet]) -> Option<Subnet> {
        let start = u32::from(FIRST_DEFAULT);
        (0..=255u32 - 100)
            .filter_map(|i| Subnet::new(Ipv4Addr::from(start + (i << 8)), 24))
            .find(|s| !taken.iter().any(|t| t.overlaps(s)) && !s.overlaps(&USER_NET))
    }
}

impl FromStr for Subnet {
    type Err = SubnetParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |why: &str| SubnetParseError {
            text: text.escape_default().to_string(),
            why: why.to_string(),
        };
        let (addr, prefix) = text.split_once('/').ok_or_else(|| fail("no /PREFIX"))?;
        let network: Ipv4Addr = addr.parse().map_err(|_| fail("not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| fail("the prefix is not a number"))?;
        if !(16..=29).contains(&prefix) {
            return Err(fail("the prefix must be 16 to 29"));
        }
        Subnet::new(network, prefix).ok_or_else(|| {
            let s = Subnet { network, prefix };
            fail(&format!(
                "host bits are set (the network is {}/{prefix})",
                Ipv4Addr::from(u32::from(network) & s.mask_bits())
            ))
        })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Subnet {
        text.parse().unwrap()
    }

    #[test]
    fn the_plan_of_a_slash_24_and_of_a_small_one() {
        let lab = s("192.168.100.0/24");
        assert_eq!(lab.gateway(), Ipv4Addr::new(192, 168, 100, 1));
        assert_eq!(
            lab.pool(),
            (
                Ipv4Addr::new(192, 168, 100, 100),
                Ipv4Addr::new(192, 168, 100, 254)
            )
        );
        assert_eq!(lab.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        let small = s("10.9.9.8/29");
        assert_eq!(
            small.pool(),
            (Ipv4Addr::new(10, 9, 9, 12), Ipv4Addr::new(10, 9, 9, 14))
        );
        assert!(small.is_host(Ipv4Addr::new(10, 9, 9, 10)));
        assert!(!small.is_host(Ipv4Addr::new(10, 9, 9, 9)), "the gateway");
        assert!(!small.is_host(Ipv4Addr::new(10, 9, 9, 15)), "broadcast");
        assert!(!small.is_host(Ipv4Addr::new(10, 9, 9, 16)));
    }

    #[test]
    fn bad_subnets_say_why() {
        for (text, why) in [
            ("192.168.100.0", "no /PREFIX"),
            ("192.168.100/24", "not an IPv4"),
            ("10.0.0.0/8", "16 to 29"),
            ("10.0.0.0/30", "16 to 29"),
            ("10.0.0.5/24", "the network is 10.0.0.0/24"),
            ("10.0.0.0/x", "not a number"),
        ] {
            let err = text.parse::<Subnet>().unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn overlaps_and_the_first_free_slash_24() {
        assert!(s("192.168.0.0/16").overlaps(&s("192.168.100.0/24")));
        assert!(!s("192.168.101.0/24").overlaps(&s("192.168.100.0/24")));
        assert_eq!(Subnet::first_free(&[]), Some(s("192.168.100.0/24")));
        assert_eq!(
            Subnet::first_free(&[s("192.168.100.0/24"), s("192.168.102.0/23")]),
            Some(s("192.168.101.0/24"))
        );
        assert_eq!(s("10.0.2.0/24").to_string(), "10.0.2.0/24");
    }
}
