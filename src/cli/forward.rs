//! Port-forward rules: `tcp:[HOSTADDR:]HOSTPORT:GUESTPORT` and `udp:...`.
//!
//! One parser for every command that forwards ports (`run`, `nat`), so the
//! spelling and the default bind address cannot drift between them.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;

/// Transport protocol of a forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A host port relayed to a guest port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ForwardRule {
    pub protocol: Protocol,
    /// Address the host side listens on; 127.0.0.1 unless the user asks, so
    /// a VM is not exposed beyond the host by accident.
    pub host: SocketAddrV4,
    pub guest_port: u16,
}

/// Why a forward rule did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid forward '{rule}': {reason} (expected tcp:[HOSTADDR:]HOSTPORT:GUESTPORT or udp:..., e.g. tcp:2222:22)")]
pub struct ForwardParseError {
    rule: String,
    reason: &'static str,
}

impl ForwardRule {
    pub const DEFAULT_HOST_ADDR: Ipv4Addr = Ipv4Addr::LOCALHOST;
}

fn parse_port(text: &str) -> Option<u16> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(port) => Some(port),
    }
}

impl FromStr for ForwardRule {
    type Err = ForwardParseError;

    fn from_str(rule: &str) -> Result<Self, Self::Err> {
        let fail = |reason| ForwardParseError {
            rule: rule.to_string(),
            reason,
        };
        let parts: Vec<&str> = rule.split(':').collect();
        let protocol = match parts[0].to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(fail("protocol must be tcp or udp")),
        };
        let (addr, host_port, guest_port) = match parts[1..] {
            [host_port, guest_port] => (ForwardRule::DEFAULT_HOST_ADDR, host_port, guest_port),
            [addr, host_port, guest_port] => {
                let addr = if addr.is_empty() {
                    ForwardRule::DEFAULT_HOST_ADDR
                } else {
                    addr.parse()
                        .map_err(|_| fail("host address is not an IPv4 address"))?
                };
                (addr, host_port, guest_port)
            }
            _ => return Err(fail("wrong number of fields")),
        };
        let host_port = parse_port(host_port).ok_or_else(|| fail("host port must be 1-65535"))?;
        let guest_port =
            parse_port(guest_port).ok_or_else(|| fail("guest port must be 1-65535"))?;
        Ok(ForwardRule {
            protocol,
            host: SocketAddrV4::new(addr, host_port),
            guest_port,
        })
    }
}

impl fmt::Display for ForwardRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.protocol,
            self.host.ip(),
            self.host.port(),
            self.guest_port
        )
    }
}

/// On the control socket a rule travels as its text.
impl serde::Serialize for ForwardRule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ForwardRule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> ForwardRule {
        text.parse().unwrap()
    }

    #[test]
    fn short_form_binds_loopback() {
        let r = rule("tcp:2222:22");
        assert_eq!(r.protocol, Protocol::Tcp);
        assert_eq!(r.host, "127.0.0.1:2222".parse().unwrap());
        assert_eq!(r.guest_port, 22);
    }

    #[test]
    fn explicit_address_and_udp() {
        let r = rule("udp:0.0.0.0:5353:53");
        assert_eq!(r.protocol, Protocol::Udp);
        assert_eq!(r.host, "0.0.0.0:5353".parse().unwrap());
        assert_eq!(r.guest_port, 53);
        assert_eq!(rule("TCP::8080:80").host, "127.0.0.1:8080".parse().unwrap());
    }

    #[test]
    fn display_round_trips() {
        for text in ["tcp:127.0.0.1:2222:22", "udp:10.1.2.3:9:9"] {
            assert_eq!(rule(text).to_string(), text);
            assert_eq!(rule(&rule(text).to_string()), rule(text));
        }
    }

    #[test]
    fn rejects_bad_rules() {
        for bad in [
            "",
            "tcp",
            "sctp:1:2",
            "tcp:2222",
            "tcp:0:22",
            "tcp:2222:0",
            "tcp:70000:22",
            "tcp:host:2222:22",
            "tcp:1.2.3.4:5:6:7",
            "tcp:2222:ssh",
        ] {
            let err = bad.parse::<ForwardRule>().unwrap_err().to_string();
            assert!(err.contains("expected tcp:"), "{bad}: {err}");
        }
    }
}
