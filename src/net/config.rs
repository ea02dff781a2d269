//! The NAT's addressing plan, limits and host-side choices.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use smoltcp::wire::EthernetAddress;

use crate::cli::ForwardRule;

/// What all flows of one NAT may buffer together: 128 MiB, room for 128
/// flows moving at full speed both ways (the rest wait), where 4096 flows
/// at their own limit would hold 4 GiB.
pub const DEFAULT_BUFFER_BUDGET: usize = 128 << 20;

/// Which host destinations guest flows may reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Anything the host can reach (what a user of a VM expects).
    Any,
    /// Only the host itself: the gateway (host loopback) and the DNS relay.
    /// Tests and the fuzzer use this so no frame ever leaves the machine.
    HostOnly,
}

/// What the gateway address reaches on the host's loopback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostLoopback {
    /// Any port: gateway:PORT is host 127.0.0.1:PORT (QEMU's behaviour).
    All,
    /// Nothing, like slirp4netns --disable-host-loopback.
    None,
    /// Only these ports (the fuzzer confines itself to its own sockets).
    Ports(Vec<u16>),
}

/// A `--outbound` or `--host-loopback` value that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyParseError(String);

impl FromStr for Outbound {
    type Err = PolicyParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "any" => Ok(Outbound::Any),
            "host" => Ok(Outbound::HostOnly),
            other => Err(PolicyParseError(format!(
                "outbound '{other}' is not 'any' (anywhere the host reaches) or 'host' (the host itself only)"
            ))),
        }
    }
}

impl fmt::Display for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outbound::Any => "any",
            Outbound::HostOnly => "host",
        })
    }
}

impl FromStr for HostLoopback {
    type Err = PolicyParseError;

    /// `all`, `none`, or ports: `22,8080`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "all" => return Ok(HostLoopback::All),
            "none" => return Ok(HostLoopback::None),
            _ => {}
        }
        let ports: Option<Vec<u16>> = text
            .split(',')
            .map(|p| p.trim().parse::<u16>().ok().filter(|&p| p != 0))
            .collect();
        match ports {
            Some(mut ports) if !ports.is_empty() => {
                ports.sort_unstable();
                ports.dedup();
                Ok(HostLoopback::Ports(ports))
            }
            _ => Err(PolicyParseError(format!(
                "host loopback '{text}' is not 'all', 'none' or ports like 22,8080"
            ))),
        }
    }
}

impl fmt::Display for HostLoopback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostLoopback::All => f.write_str("all"),
            HostLoopback::None => f.write_str("none"),
            HostLoopback::Ports(ports) => {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

/// Everything the engine needs to know before it starts.
#[derive(Clone, Debug)]
pub struct NatConfig {
    pub network: Ipv4Addr,
    pub netmask: Ipv4Addr,
    /// The host as the guest sees it; `gateway:PORT` reaches host 127.0.0.1:PORT.
    pub gateway: Ipv4Addr,
    /// DNS relay address.
    pub dns: Ipv4Addr,
    /// The one address `--net user`'s DHCP server hands out, and where its
    /// forwards lead (a lab network's NAT has leases instead, see
    /// [`crate::net::Nat::with_leases`]).
    pub guest: Ipv4Addr,
    /// The network's name: DHCP's domain option, and NAME.DOMAIN resolves
    /// to the member NAME.
    pub domain: Option<String>,
    /// Other guests' networks (lab networks', `--net user`'s): never
    /// reached through this NAT, so networks stay apart and no packet for
    /// them leaves the host. (network, prefix length) pairs.
    pub walled_off: Vec<(Ipv4Addr, u8)>,
    /// Nothing leaves the network (`network create --no-nat`): no flow to
    /// the host or beyond, no DNS relay; DHCP, DNS for members and ping of
    /// the gateway stay.
    pub closed: bool,
    /// MAC the gateway and DNS answer ARP with.
    pub gateway_mac: EthernetAddress,
    /// MTU announced by DHCP; also bounds the MSS offered to the guest.
    pub mtu: u16,
    /// Hostname announced by DHCP (option 12): the VM's name.
    pub hostname: String,
    pub lease_time: Duration,
    /// Host resolvers the DNS relay forwards to, in order of preference.
    pub resolvers: Vec<SocketAddrV4>,
    pub forwards: Vec<ForwardRule>,
    pub outbound: Outbound,
    pub host_loopback: HostLoopback,
    /// Most flows (TCP, UDP, ICMP) at once; the oldest idle is evicted.
    pub max_flows: usize,
    /// Most new flows toward the host per second (a burst of this many,
    /// then the rest of the second's SYNs and datagrams are dropped and
    /// counted): a guest cannot turn vmlab into a fast port scanner.
    pub new_flows_per_sec: u32,
    /// Bytes buffered per TCP flow and direction.
    pub tcp_buffer: usize,
    /// Bytes all TCP flows together may buffer (see `budget`).
    pub buffer_budget: usize,
    pub udp_timeout: Duration,
    pub icmp_timeout: Duration,
    /// How long a closed TCP flow lingers to re-acknowledge a late FIN.
    pub time_wait: Duration,
    /// A TCP flow with no traffic at all for this long is reset and removed.
    pub tcp_idle_timeout: Duration,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            network: Ipv4Addr::new(10, 0, 2, 0),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            dns: Ipv4Addr::new(10, 0, 2, 3),
            guest: Ipv4Addr::new(10, 0, 2, 15),
            domain: None,
            walled_off: Vec::new(),
            closed: false,
            gateway_mac: EthernetAddress([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]),
            mtu: 1500,
            hostname: "vmlab".to_string(),
            lease_time: Duration::from_secs(86400),
            resolvers: Vec::new(),
            forwards: Vec::new(),
            outbound: Outbound::Any,
            host_loopback: HostLoopback::All,
            max_flows: 4096,
            new_flows_per_sec: 256,
            tcp_buffer: 512 * 1024,
            buffer_budget: DEFAULT_BUFFER_BUDGET,
            udp_timeout: Duration::from_secs(60),
            icmp_timeout: Duration::from_secs(10),
            time_wait: Duration::from_secs(10),
            tcp_idle_timeout: Duration::from_secs(7200),
        }
    }
}

impl NatConfig {
    /// The default plan with resolvers read from the host's resolv.conf.
    pub fn with_host_resolvers() -> Self {
        NatConfig {
            resolvers: resolvers_from_file(Path::new("/etc/resolv.conf")),
            ..NatConfig::default()
        }
    }

    /// True when `addr` lies in another guest network (see `walled_off`).
    pub fn walled(&self, addr: Ipv4Addr) -> bool {
        self.walled_off.iter().any(|&(net, prefix)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(addr) & mask == u32::from(net) & mask
        })
    }

    /// True when `addr` lies in the NAT's own network.
    pub fn in_network(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & u32::from(self.netmask) == u32::from(self.network)
    }
}

/// IPv4 `nameserver` lines of a resolv.conf, port 53; loopback resolvers
/// (such as systemd-resolved's 127.0.0.53) included, since the relay runs on
/// the host. An unreadable file gives no resolvers: DNS queries then fail
/// with ICMP unreachable instead of hanging.
pub fn resolvers_from_file(path: &Path) -> Vec<SocketAddrV4> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_resolv_conf(&text),
        Err(err) => {
            log::warn!(
                "nat: cannot read {}: {err}; the DNS relay has no resolver",
                path.display()
            );
            Vec::new()
        }
    }
}

/// Parses resolv.conf text; see [`resolvers_from_file`].
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddrV4> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => addr.parse::<Ipv4Addr>().ok(),
                _ => None,
            }
        })
        .map(|ip| SocketAddrV4::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_keeps_ipv4_including_loopback() {
        let text = "# comment\nsearch lan\nnameserver 127.0.0.53\nnameserver ::1\n\
                    nameserver 10.1.2.3 \noptions edns0\nnameserver\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "127.0.0.53:53".parse().unwrap(),
                "10.1.2.3:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn policies_parse_and_print_back() {
        for text in ["all", "none", "22", "22,8080"] {
            let p: HostLoopback = text.parse().unwrap();
            assert_eq!(p.to_string(), text);
        }
        assert_eq!(
            "8080, 22,22".parse::<HostLoopback>(),
            Ok(HostLoopback::Ports(vec![22, 8080]))
        );
        for bad in ["", "some", "0", "22,", "70000", "22;80"] {
            let err = bad.parse::<HostLoopback>().unwrap_err().to_string();
            assert!(err.contains("'all', 'none' or ports"), "{bad}: {err}");
        }
        assert_eq!("host".parse::<Outbound>(), Ok(Outbound::HostOnly));
        assert_eq!(Outbound::Any.to_string(), "any");
        assert!("world".parse::<Outbound>().is_err());
    }

    #[test]
    fn network_membership() {
        let c = NatConfig::default();
        assert!(c.in_network(Ipv4Addr::new(10, 0, 2, 200)));
        assert!(!c.in_network(Ipv4Addr::new(10, 0, 3, 1)));
    }
}
