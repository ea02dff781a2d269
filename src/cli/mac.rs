//! MAC addresses for `--mac`, and the stable one a VM gets from its name.

use std::fmt;
use std::str::FromStr;

/// An Ethernet unicast address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

/// Why a `--mac` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address '{text}': {reason} (expected six hex pairs like 52:54:00:12:34:56)")]
pub struct MacParseError {
    text: String,
    reason: &'static str,
}

impl MacAddress {
    /// The prefix QEMU and libvirt use for guests; its first octet has the
    /// locally-administered bit set and the multicast bit clear.
    pub const VM_PREFIX: [u8; 3] = [0x52, 0x54, 0x00];

    /// The address a VM called `name` gets unless `--mac` says otherwise:
    /// the same name gives the same MAC on every run (so DHCP leases and
    /// ARP caches stay valid), different names differ in the last three
    /// octets. FNV-1a rather than std's hasher, whose output may change
    /// between Rust releases.
    pub fn for_vm(name: &str) -> MacAddress {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in name.bytes() {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        // Fold the top octet in so all 32 bits count.
        let [_, a, b, c] = (hash ^ (hash >> 24)).to_be_bytes();
        let [p, q, r] = Self::VM_PREFIX;
        MacAddress([p, q, r, a, b, c])
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddress {
    type Err = MacParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason| MacParseError {
            text: text.to_string(),
            reason,
        };
        let parts: Vec<&str> = text.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(fail("it needs six octets"));
        }
        let mut octets = [0u8; 6];
        for (octet, part) in octets.iter_mut().zip(&parts) {
            if part.len() != 2 {
                return Err(fail("each octet is two hex digits"));
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| fail("not hexadecimal"))?;
        }
        if octets[0] & 1 != 0 {
            return Err(fail("it is a multicast address; a NIC needs a unicast one"));
        }
        if octets == [0; 6] {
            return Err(fail("the all-zero address is not a valid NIC address"));
        }
        Ok(MacAddress(octets))
    }
}

/// On the control sockets a MAC travels as its text.
impl serde::Serialize for MacAddress {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_mac_is_stable_local_unicast_and_per_name() {
        let a = MacAddress::for_vm("web");
        assert_eq!(a, MacAddress::for_vm("web"), "stable");
        assert_eq!(a.0[..3], MacAddress::VM_PREFIX);
        assert_eq!(a.0[0] & 0b11, 0b10, "locally administered, unicast");
        assert_ne!(a, MacAddress::for_vm("web2"));
        assert_ne!(MacAddress::for_vm("vm1"), MacAddress::for_vm("vm2"));
        // Pinned: a change here changes every existing VM's address.
        assert_eq!(MacAddress::for_vm("vmlab").to_string(), "52:54:00:a1:3b:b2");
    }

    #[test]
    fn parses_and_prints() {
        let mac: MacAddress = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0, 0xab, 0xcd, 1]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:01");
        assert_eq!("02-00-00-00-00-01".parse::<MacAddress>().unwrap().0[5], 1);
    }

    #[test]
    fn refuses_bad_addresses() {
        for (text, why) in [
            ("52:54:00:12:34", "six octets"),
            ("52:54:00:12:34:56:78", "six octets"),
            ("52:54:00:12:34:5", "two hex digits"),
            ("52:54:00:12:34:zz", "hexadecimal"),
            ("01:00:5e:00:00:01", "multicast"),
            ("ff:ff:ff:ff:ff:ff", "multicast"),
            ("00:00:00:00:00:00", "all-zero"),
        ] {
            let err = text.parse::<MacAddress>().unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
            assert!(err.contains(text), "{err}");
        }
    }
}
