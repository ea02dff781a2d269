//! The addresses the gateway hands out: one stable lease per MAC from a
//! pool, reservations (`--ip`), and the name each guest goes by (its DHCP
//! hostname and its DNS name on a lab network).
//!
//! `--net user` is a pool of one: its single address goes to whichever MAC
//! asks last, as QEMU's user networking does. A lab network's pool keeps a
//! MAC's address for good, across restarts of the guest and (saved as text
//! by its owner, see [`Leases::render`]) of the network.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use smoltcp::wire::EthernetAddress;

/// Why a reservation or a lease file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("{ip} is already taken by {holder} ({mac}): choose another --ip")]
    Taken {
        ip: Ipv4Addr,
        holder: String,
        mac: String,
    },
    #[error("{ip} is not in the pool {first}-{last} nor reserved")]
    OutsidePool {
        ip: Ipv4Addr,
        first: Ipv4Addr,
        last: Ipv4Addr,
    },
    #[error("line {line} of the lease file: {what}")]
    File { line: usize, what: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    /// The guest's name (DHCP option 12, DNS), when its owner said.
    pub name: Option<String>,
    /// Chosen by the user (`--ip`) rather than from the pool.
    pub reserved: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leases {
    first: Ipv4Addr,
    last: Ipv4Addr,
    /// The single address goes to the last MAC that asks.
    single: bool,
    by_mac: BTreeMap<[u8; 6], Lease>,
    changed: bool,
}

impl Leases {
    /// `--net user`: one address, for whoever asks.
    pub fn single(ip: Ipv4Addr) -> Self {
        Leases {
            first: ip,
            last: ip,
            single: true,
            by_mac: BTreeMap::new(),
            changed: false,
        }
    }

    /// A pool from `first` to `last`, inclusive.
    pub fn pool(first: Ipv4Addr, last: Ipv4Addr) -> Self {
        Leases {
            first,
            last,
            single: false,
            by_mac: BTreeMap::new(),
            changed: false,
        }
    }

    /// The address for `mac`: its lease, or a new one (the lowest free
    /// address of the pool); None when the pool is exhausted.
    pub fn lease_for(&mut self, mac: EthernetAddress) -> Option<Ipv4Addr> {
        if let Some(lease) = self.by_mac.get(&mac.0) {
            return Some(lease.ip);
        }
        let ip = if self.single {
            self.by_mac.retain(|_, l| l.reserved);
            self.first
        } else {
            (u32::from(self.first)..=u32::from(self.last))
                .map(Ipv4Addr::from)
                .find(|ip| self.holder(*ip).is_none())?
        };
        self.by_mac.insert(
            mac.0,
            Lease {
                ip,
                name: None,
                reserved: false,
            },
        );
        self.changed = true;
        Some(ip)
    }

    /// The lease `mac` has, without making one.
    pub fn get(&self, mac: EthernetAddress) -> Option<&Lease> {
        self.by_mac.get(&mac.0)
    }

    /// Gives `mac` the address `ip` (the caller checked it lies in the
    /// subnet); refused when another MAC holds it.
    pub fn reserve(&mut self, mac: EthernetAddress, ip: Ipv4Addr) -> Result<(), LeaseError> {
        if let Some((other, lease)) = self.holder(ip) {
            if other != mac.0 {
                return Err(LeaseError::Taken {
                    ip,
                    holder: lease.name.clone().unwrap_or_else(|| "a member".into()),
                    mac: crate::cli::MacAddress(other).to_string(),
                });
            }
        }
        let name = self.by_mac.get(&mac.0).and_then(|l| l.name.clone());
        let lease = Lease {
            ip,
            name,
            reserved: true,
        };
        if self.by_mac.get(&mac.0) != Some(&lease) {
            self.by_mac.insert(mac.0, lease);
            self.changed = true;
        }
        Ok(())
    }

    /// Names the guest holding `mac`'s lease.
    pub fn set_name(&mut self, mac: EthernetAddress, name: &str) {
        if let Some(lease) = self.by_mac.get_mut(&mac.0) {
            if lease.name.as_deref() != Some(name) {
                lease.name = Some(name.to_string());
                self.changed = true;
            }
        }
    }

    /// Who holds `ip`: MAC and lease.
    pub fn holder(&self, ip: Ipv4Addr) -> Option<([u8; 6], &Lease)> {
        self.by_mac
            .iter()
            .find(|(_, l)| l.ip == ip)
            .map(|(mac, l)| (*mac, l))
    }

    /// The MAC that holds `ip`.
    pub fn mac_of(&self, ip: Ipv4Addr) -> Option<EthernetAddress> {
        self.holder(ip).map(|(mac, _)| EthernetAddress(mac))
    }

    /// The address a guest name resolves to.
    pub fn address_of(&self, name: &str) -> Option<Ipv4Addr> {
        self.by_mac
            .values()
            .find(|l| {
                l.name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
            .map(|l| l.ip)
    }

    pub fn iter(&self) -> impl Iterator<Item = (EthernetAddress, &Lease)> {
        self.by_mac
            .iter()
            .map(|(mac, l)| (EthernetAddress(*mac), l))
    }

    /// True once since the last call if anything changed (for saving).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The leases as text, one `MAC IP [NAME] [reserved]` a line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (mac, lease) in self.iter() {
            let _ = write!(out, "{} {}", crate::cli::MacAddress(mac.0), lease.ip);
            if let Some(name) = &lease.name {
                let _ = write!(out, " name={name}");
            }
            if lease.reserved {
                out.push_str(" reserved");
            }
            out.push('\n');
        }
        out
    }

    /// Reads [`Leases::render`]'s text into this pool; leases outside the
    /// pool that are not reservations are refused (the file is not ours).
    pub fn load(&mut self, text: &str) -> Result<(), LeaseError> {
        for (index, line) in text.lines().enumerate() {
            let bad = |what: &str| LeaseError::File {
                line: index + 1,
                what: what.to_string(),
            };
            let mut words = line.split_whitespace();
            let (Some(mac), Some(ip)) = (words.next(), words.next()) else {
                if line.trim().is_empty() {
                    continue;
                }
                return Err(bad("expected 'MAC IP'"));
            };
            let mac: crate::cli::MacAddress = mac.parse().map_err(|_| bad("bad MAC"))?;
            let ip: Ipv4Addr = ip.parse().map_err(|_| bad("bad address"))?;
            let mut lease = Lease {
                ip,
                name: None,
                reserved: false,
            };
            for word in words {
                match word.split_once('=') {
                    Some(("name", name)) if !name.is_empty() => lease.name = Some(name.into()),
                    None if word == "reserved" => lease.reserved = true,
                    _ => return Err(bad("unknown field")),
                }
            }
            let in_pool = (u32::from(self.first)..=u32::from(self.last)).contains(&u32::from(ip));
            if !in_pool && !lease.reserved {
                return Err(bad("address outside the pool"));
            }
            if self.holder(ip).is_some() {
                return Err(bad("address leased twice"));
            }
            self.by_mac.insert(mac.octets(), lease);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> EthernetAddress {
        EthernetAddress([0x52, 0x54, 0, 0, 0, n])
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 100, n)
    }

    #[test]
    fn a_pool_gives_each_mac_its_own_stable_address() {
        let mut l = Leases::pool(ip(100), ip(102));
        assert_eq!(l.lease_for(mac(1)), Some(ip(100)));
        assert_eq!(l.lease_for(mac(2)), Some(ip(101)));
        assert_eq!(l.lease_for(mac(1)), Some(ip(100)));
        assert_eq!(l.lease_for(mac(3)), Some(ip(102)));
        assert_eq!(l.lease_for(mac(4)), None, "exhausted");
        assert!(l.take_changed());
        assert!(!l.take_changed());
    }

    #[test]
    fn reservations_hold_and_conflicts_are_refused() {
        let mut l = Leases::pool(ip(100), ip(200));
        l.reserve(mac(1), ip(20)).unwrap();
        l.set_name(mac(1), "db");
        assert_eq!(l.lease_for(mac(1)), Some(ip(20)));
        assert_eq!(l.address_of("DB"), Some(ip(20)));
        let err = l.reserve(mac(2), ip(20)).unwrap_err().to_string();
        assert!(err.contains("already taken by db"), "{err}");
        assert_eq!(l.lease_for(mac(2)), Some(ip(100)));
        let err = l.reserve(mac(3), ip(100)).unwrap_err();
        assert!(matches!(err, LeaseError::Taken { .. }));
    }

    #[test]
    fn leases_survive_as_text() {
        let mut l = Leases::pool(ip(100), ip(200));
        l.lease_for(mac(1));
        l.set_name(mac(1), "web");
        l.reserve(mac(2), ip(20)).unwrap();
        let mut back = Leases::pool(ip(100), ip(200));
        back.load(&l.render()).unwrap();
        assert_eq!(back.render(), l.render());
        assert_eq!(back.lease_for(mac(1)), Some(ip(100)));
        for bad in [
            "52:54:00:00:00:09 10.0.0.1\n",
            "x y\n",
            "52:54:00:00:00:09\n",
        ] {
            assert!(Leases::pool(ip(100), ip(200)).load(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pool_of_one_goes_to_the_last_asker() {
        let mut l = Leases::single(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(l.lease_for(mac(1)), Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(l.lease_for(mac(2)), Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(l.mac_of(Ipv4Addr::new(10, 0, 2, 15)), Some(mac(2)));
    }
}
