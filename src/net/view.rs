//! What the NAT shows the outside: the flow table as rows, the whole NAT
//! as a snapshot, and the text `vmlab nat show` prints. These are the types
//! the control socket carries as they are (serde), so a client never
//! rebuilds them from strings.

use std::fmt::{self, Write as _};
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::counters::Counters;
use super::flow_table::Flow;
use super::listeners::ListenerSlots;
use super::tcp::Origin;
use crate::cli::ForwardRule;

/// Transport of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// Where a flow is: TCP states from the engine's side of the guest
/// connection (RFC 9293 names), `Active` for UDP and ICMP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlowState {
    /// The guest sent SYN; the host `connect()` is in progress.
    #[serde(rename = "CONNECTING")]
    Connecting,
    #[serde(rename = "SYN_SENT")]
    SynSent,
    #[serde(rename = "SYN_RECEIVED")]
    SynReceived,
    #[serde(rename = "ESTABLISHED")]
    Established,
    #[serde(rename = "CLOSE_WAIT")]
    CloseWait,
    #[serde(rename = "FIN_WAIT_1")]
    FinWait1,
    #[serde(rename = "FIN_WAIT_2")]
    FinWait2,
    #[serde(rename = "LAST_ACK")]
    LastAck,
    #[serde(rename = "CLOSED")]
    Closed,
    #[serde(rename = "TIME_WAIT")]
    TimeWait,
    #[serde(rename = "ACTIVE")]
    Active,
}

impl FlowState {
    pub fn name(self) -> &'static str {
        match self {
            FlowState::Connecting => "CONNECTING",
            FlowState::SynSent => "SYN_SENT",
            FlowState::SynReceived => "SYN_RECEIVED",
            FlowState::Established => "ESTABLISHED",
            FlowState::CloseWait => "CLOSE_WAIT",
            FlowState::FinWait1 => "FIN_WAIT_1",
            FlowState::FinWait2 => "FIN_WAIT_2",
            FlowState::LastAck => "LAST_ACK",
            FlowState::Closed => "CLOSED",
            FlowState::TimeWait => "TIME_WAIT",
            FlowState::Active => "ACTIVE",
        }
    }
}

impl fmt::Display for FlowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Compares with the state's name, as tests and scripts spell it.
impl PartialEq<&str> for FlowState {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

/// One row of the flow table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    pub state: FlowState,
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

/// A running NAT at one moment: its forwards (with the host ports actually
/// bound), its flows and its counters. What `vmlab nat show` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatSnapshot {
    pub forwards: Vec<ForwardRule>,
    pub flows: Vec<FlowInfo>,
    pub counters: Counters,
}

/// The NAT's state as a running machine exposes it, for its control socket
/// (implemented by whatever owns the NAT).
pub trait NatView: Send + Sync {
    fn snapshot(&self) -> NatSnapshot;
}

impl NatSnapshot {
    /// The text `vmlab nat show` prints.
    pub fn render(&self) -> String {
        let mut out = String::from("forwards:\n");
        if self.forwards.is_empty() {
            out.push_str("  (none)\n");
        }
        for rule in &self.forwards {
            let _ = writeln!(out, "  {rule}");
        }
        let _ = writeln!(out, "flows: {}", self.flows.len());
        if !self.flows.is_empty() {
            let _ = writeln!(
                out,
                "  {:<8} {:<21} {:<21} {:<21} {:<12} {:>10} {:>10} {:>6}",
                "PROTO", "GUEST", "REMOTE", "HOST", "STATE", "OUT", "IN", "AGE"
            );
        }
        for f in &self.flows {
            let proto = format!("{}{}", f.protocol, if f.forwarded { "/fwd" } else { "" });
            let _ = writeln!(
                out,
                "  {:<8} {:<21} {:<21} {:<21} {:<12} {:>10} {:>10} {:>5}s",
                proto,
                f.guest.to_string(),
                f.remote.to_string(),
                f.host.to_string(),
                f.state.name(),
                f.bytes_from_guest,
                f.bytes_to_guest,
                f.age.as_secs()
            );
        }
        out.push_str("counters:\n");
        for (name, value) in self.counters.named() {
            let _ = writeln!(out, "  {name} {value}");
        }
        out
    }
}

impl Flow {
    /// The flow's row; `listeners` names the host side of forwarded UDP
    /// flows, which answer through their listener's socket.
    pub(super) fn info(&self, now: Instant, listeners: &ListenerSlots) -> FlowInfo {
        match self {
            Flow::Tcp(f) => FlowInfo {
                protocol: FlowProtocol::Tcp,
                forwarded: f.origin == Origin::Forward,
                guest: f.guest,
                remote: f.remote,
                host: f.host_peer,
                host_local: f.stream.local_addr().ok(),
                state: f.state(),
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
                state: FlowState::Active,
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
                state: FlowState::Active,
                bytes_from_guest: f.bytes_from_guest,
                bytes_to_guest: f.bytes_to_guest,
                age: now.saturating_duration_since(f.created),
                idle: now.saturating_duration_since(f.last_active),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> FlowInfo {
        FlowInfo {
            protocol: FlowProtocol::Tcp,
            forwarded: true,
            guest: "10.0.2.15:22".parse().unwrap(),
            remote: "10.0.2.2:40000".parse().unwrap(),
            host: "127.0.0.1:40000".parse().unwrap(),
            host_local: None,
            state: FlowState::Established,
            bytes_from_guest: 100,
            bytes_to_guest: 200,
            age: Duration::from_secs(3),
            idle: Duration::from_secs(1),
        }
    }

    fn snapshot() -> NatSnapshot {
        NatSnapshot {
            forwards: vec!["tcp:2222:22".parse().unwrap()],
            flows: vec![flow()],
            counters: Counters {
                flows_opened: 1,
                ..Counters::default()
            },
        }
    }

    #[test]
    fn snapshot_round_trips_as_json_with_typed_fields() {
        let snapshot = snapshot();
        let json = serde_json::to_string(&snapshot).unwrap();
        assert!(json.contains("\"state\":\"ESTABLISHED\""), "{json}");
        assert!(json.contains("\"guest\":\"10.0.2.15:22\""), "{json}");
        assert!(json.contains("\"tcp:127.0.0.1:2222:22\""), "{json}");
        let back: NatSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snapshot);
    }

    #[test]
    fn snapshot_renders_forwards_flows_and_counters() {
        let snapshot = snapshot();
        let text = snapshot.render();
        assert!(text.contains("tcp:127.0.0.1:2222:22"), "{text}");
        assert!(text.contains("tcp/fwd"), "{text}");
        assert!(text.contains("ESTABLISHED"), "{text}");
        assert!(text.contains("flows_opened 1"), "{text}");
        assert!(NatSnapshot::default().render().contains("(none)"));
    }

    #[test]
    fn states_compare_with_their_names() {
        assert_eq!(FlowState::FinWait1, "FIN_WAIT_1");
        assert_eq!(
            serde_json::to_string(&FlowState::FinWait1).unwrap(),
            "\"FIN_WAIT_1\""
        );
    }
}
