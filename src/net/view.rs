//! The flow table as the outside sees it: plain rows for `vmlab ps`-style
//! listings and the control socket.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::flow_table::Flow;
use super::listeners::Listener;
use super::tcp::Origin;

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

impl Flow {
    /// The flow's row; `listeners` names the host side of forwarded UDP
    /// flows, which answer through their listener's socket.
    pub(super) fn info(&self, now: Instant, listeners: &[Listener]) -> FlowInfo {
        match self {
            Flow::Tcp(f) => FlowInfo {
                protocol: FlowProtocol::Tcp,
                forwarded: f.origin == Origin::Forward,
                guest: f.guest,
                remote: f.remote,
                host: f.host_peer,
                host_local: f.stream.local_addr().ok(),
                state: f.state_name(),
                bytes_from_guest: f.bytes_from_guest,
                bytes_to_guest: f.bytes_to_guest,
                age: now.saturating_duration_since(f.created),
                idle: now.saturating_duration_since(f.last_active),
            },
            Flow::Udp(f) => FlowInfo {
                protocol: FlowProtocol::Udp,
                forwarded: f.listener.is_some(),
                guest: f.guest,
                remote: f.remote,
                host: f.host_peer,
                host_local: match (&f.socket, f.listener.and_then(|i| listeners.get(i))) {
                    (Some(s), _) => s.local_addr().ok(),
                    (None, Some(l)) => l.local_addr(),
                    (None, None) => None,
                },
                state: "ACTIVE",
                bytes_from_guest: f.bytes_from_guest,
                bytes_to_guest: f.bytes_to_guest,
                age: now.saturating_duration_since(f.created),
                idle: now.saturating_duration_since(f.last_active),
            },
            Flow::Icmp(f) => FlowInfo {
                protocol: FlowProtocol::Icmp,
                forwarded: false,
                guest: SocketAddrV4::new(f.guest, f.ident),
                remote: SocketAddrV4::new(f.remote, 0),
                host: SocketAddr::from((f.remote, 0)),
                host_local: f.socket.local_addr().ok().and_then(|a| a.as_socket()),
                state: "ACTIVE",
                bytes_from_guest: f.bytes_from_guest,
                bytes_to_guest: f.bytes_to_guest,
                age: now.saturating_duration_since(f.created),
                idle: now.saturating_duration_since(f.last_active),
            },
        }
    }
}
