//! Ingress rules (security groups): `tcp:PORT[-PORT]`, `udp:PORT[-PORT]`
//! or `icmp`, each optionally followed by ` from CIDR`. With any rule
//! given, a member of a lab network accepts new connections only when one
//! of its rules matches (see `switch::firewall`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// What a rule lets in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IngressProtocol {
    Tcp,
    Udp,
    Icmp,
}

/// One rule: a protocol, its destination ports (TCP and UDP), and the
/// sources it admits (any, without `from`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IngressRule {
    pub protocol: IngressProtocol,
    /// First and last port, inclusive (0..=0 for ICMP).
    pub ports: (u16, u16),
    /// Network address and prefix length.
    pub from: Option<(Ipv4Addr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ingress rule '{rule}': {reason} (expected tcp:PORT[-PORT], udp:PORT[-PORT] or icmp, optionally followed by 'from CIDR', e.g. 'tcp:5432 from 192.168.100.0/24')")]
pub struct IngressParseError {
    rule: String,
    reason: &'static str,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl IngressRule {
    /// Whether a new connection of `protocol` from `src` to `port` matches.
    pub fn admits(&self, protocol: IngressProtocol, src: Ipv4Addr, port: u16) -> bool {
        protocol == self.protocol
            && (protocol == IngressProtocol::Icmp || (self.ports.0..=self.ports.1).contains(&port))
            && self.from.is_none_or(|(net, prefix)| {
                u32::from(src) & mask(prefix) == u32::from(net) & mask(prefix)
            })
    }
}

fn parse_port(text: &str) -> Option<u16> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(port) => Some(port),
    }
}

impl FromStr for IngressRule {
    type Err = IngressParseError;

    fn from_str(rule: &str) -> Result<Self, Self::Err> {
        let fail = |reason| IngressParseError {
            rule: rule.to_string(),
            reason,
        };
        let mut words = rule.split_whitespace();
        let what = words.next().ok_or_else(|| fail("it is empty"))?;
        let from = match (words.next(), words.next(), words.next()) {
            (None, _, _) => None,
            (Some(w), Some(cidr), None) if w.eq_ignore_ascii_case("from") => {
                let (addr, prefix) = cidr.split_once('/').unwrap_or((cidr, "32"));
                let addr: Ipv4Addr = addr
                    .parse()
                    .map_err(|_| fail("the source is not an IPv4 address"))?;
                let prefix: u8 = prefix
                    .parse()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| fail("the prefix length must be 0-32"))?;
                Some((Ipv4Addr::from(u32::from(addr) & mask(prefix)), prefix))
            }
            _ => return Err(fail("only 'from CIDR' may follow the rule")),
        };
        let (proto, ports) = what.split_once(':').unwrap_or((what, ""));
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => IngressProtocol::Tcp,
            "udp" => IngressProtocol::Udp,
            "icmp" if ports.is_empty() => {
                return Ok(IngressRule {
                    protocol: IngressProtocol::Icmp,
                    ports: (0, 0),
                    from,
                })
            }
            "icmp" => return Err(fail("icmp takes no ports")),
            _ => return Err(fail("protocol must be tcp, udp or icmp")),
        };
        let (first, last) = ports.split_once('-').unwrap_or((ports, ports));
        let first = parse_port(first).ok_or_else(|| fail("ports must be 1-65535"))?;
        let last = parse_port(last).ok_or_else(|| fail("ports must be 1-65535"))?;
        if first > last {
            return Err(fail("a port range must go upward"));
        }
        Ok(IngressRule {
            protocol,
            ports: (first, last),
            from,
        })
    }
}

impl fmt::Display for IngressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            IngressProtocol::Icmp => f.write_str("icmp")?,
            p => {
                let name = if p == IngressProtocol::Tcp {
                    "tcp"
                } else {
                    "udp"
                };
                write!(f, "{name}:{}", self.ports.0)?;
                if self.ports.1 != self.ports.0 {
                    write!(f, "-{}", self.ports.1)?;
                }
            }
        }
        if let Some((net, prefix)) = self.from {
            write!(f, " from {net}/{prefix}")?;
        }
        Ok(())
    }
}

/// On sockets and in vm.conf a rule travels as its text.
impl serde::Serialize for IngressRule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for IngressRule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> IngressRule {
        text.parse().unwrap()
    }

    #[test]
    fn rules_parse_print_back_and_match() {
        let db = rule("tcp:5432");
        assert_eq!(db.ports, (5432, 5432));
        assert!(db.admits(IngressProtocol::Tcp, Ipv4Addr::new(1, 2, 3, 4), 5432));
        assert!(!db.admits(IngressProtocol::Tcp, Ipv4Addr::new(1, 2, 3, 4), 5433));
        assert!(!db.admits(IngressProtocol::Udp, Ipv4Addr::new(1, 2, 3, 4), 5432));
        let web = rule("UDP:8000-8010 from 192.168.100.77/24");
        assert_eq!(web.from, Some((Ipv4Addr::new(192, 168, 100, 0), 24)));
        assert!(web.admits(IngressProtocol::Udp, Ipv4Addr::new(192, 168, 100, 9), 8010));
        assert!(!web.admits(IngressProtocol::Udp, Ipv4Addr::new(192, 168, 101, 9), 8010));
        let ping = rule("icmp from 10.0.0.1");
        assert!(ping.admits(IngressProtocol::Icmp, Ipv4Addr::new(10, 0, 0, 1), 0));
        assert!(!ping.admits(IngressProtocol::Icmp, Ipv4Addr::new(10, 0, 0, 2), 0));
        assert!(rule("icmp from 0.0.0.0/0").admits(
            IngressProtocol::Icmp,
            Ipv4Addr::new(8, 8, 8, 8),
            0
        ));
        for text in [
            "tcp:5432",
            "udp:8000-8010 from 192.168.100.0/24",
            "icmp from 10.0.0.1/32",
        ] {
            assert_eq!(rule(text).to_string(), text);
            let json = serde_json::to_string(&rule(text)).unwrap();
            assert_eq!(
                serde_json::from_str::<IngressRule>(&json).unwrap(),
                rule(text)
            );
        }
    }

    #[test]
    fn bad_rules_are_one_clear_error() {
        for bad in [
            "",
            "sctp:1",
            "tcp",
            "tcp:0",
            "tcp:70000",
            "tcp:20-10",
            "icmp:8",
            "tcp:22 from",
            "tcp:22 to 1.2.3.4",
            "tcp:22 from 1.2.3/24",
            "tcp:22 from 1.2.3.4/33",
        ] {
            let err = bad.parse::<IngressRule>().unwrap_err().to_string();
            assert!(err.starts_with("invalid ingress rule"), "{bad}: {err}");
            assert_eq!(err.lines().count(), 1);
        }
    }
}
