//! The flow table as the outside sees it: plain rows for `vmlab ps`-style
//! listings and the control socket.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

/// Transport of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowProtocol {
    Tcp,
    Udp,
    Icmp,
}

impl fmt::Display for FlowProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlowProtocol::Tcp => "tcp",
            FlowProtocol::Udp => "udp",
            FlowProtocol::Icmp => "icmp",
        })
    }
}

/// One row of the flow table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowInfo {
    pub protocol: FlowProtocol,
    /// True for flows accepted on a port forward.
    pub forwarded: bool,
    /// The guest's end (for ICMP the port is the echo identifier).
    pub guest: SocketAddrV4,
    /// The address the guest talks to, as the guest sees it.
    pub remote: SocketAddrV4,
    /// The host-side peer actually used (e.g. 127.0.0.1 for the gateway).
    pub host: SocketAddr,
    /// The host socket's own address (the listener's for forwarded UDP).
    pub host_local: Option<SocketAddr>,
    /// TCP state name, or "ACTIVE" for UDP and ICMP.
    pub state: &'static str,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
    pub age: Duration,
    pub idle: Duration,
}

impl fmt::Display for FlowInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{} {} -> {} via {} {} out={}B in={}B age={}s",
            self.protocol,
            if self.forwarded { " fwd" } else { "" },
            self.guest,
            self.remote,
            self.host,
            self.state,
            self.bytes_from_guest,
            self.bytes_to_guest,
            self.age.as_secs()
        )
    }
}
