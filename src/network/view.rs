//! What `network show` and `network ls` print: typed views of a running
//! network, carried by its control socket as they are.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::subnet::Subnet;
use crate::cli::{ForwardRule, MacAddress};
use crate::net::NatSnapshot;
use crate::switch::firewall::{ConntrackCounters, IngressView};
use crate::switch::SwitchCounters;

/// What kind of member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MemberKind {
    /// A vmlab VM (`run --net NAME`).
    Vm,
    /// A network namespace with a TAP device (`network attach --netns`).
    Netns { path: PathBuf, device: String },
    /// A QEMU guest on the network's QEMU socket (`-netdev stream`).
    Qemu,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub name: String,
    pub mac: MacAddress,
    pub ip: Ipv4Addr,
    #[serde(flatten)]
    pub kind: MemberKind,
    pub forwards: Vec<ForwardRule>,
    /// Its ingress rules and what they let in and dropped (none: open).
    #[serde(default)]
    pub ingress: Option<IngressView>,
}

/// A lease as `network show` lists it (members or not).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    pub mac: MacAddress,
    pub ip: Ipv4Addr,
    pub name: Option<String>,
    pub reserved: bool,
}

/// A running network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    pub name: String,
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
    pub nat: bool,
    pub pid: u32,
    pub members: Vec<MemberView>,
    pub leases: Vec<LeaseView>,
    /// The gateway's NAT: every member's forwards and flows, and counters.
    pub gateway_nat: NatSnapshot,
    pub switch: SwitchCounters,
    #[serde(default)]
    pub conntrack: ConntrackCounters,
}

impl NetworkView {
    /// The text `vmlab network show` prints.
    pub fn render(&self) -> String {
        let mut out = format!(
            "network {}: {} gateway {} nat {} (pid {})\n",
            self.name,
            self.subnet,
            self.gateway,
            if self.nat { "yes" } else { "no" },
            self.pid
        );
        render_members(&mut out, &self.members);
        let _ = writeln!(out, "leases:");
        for l in &self.leases {
            let _ = writeln!(
                out,
                "  {:<17} {:<15} {}{}",
                l.mac.to_string(),
                l.ip.to_string(),
                l.name.as_deref().unwrap_or("-"),
                if l.reserved { " (reserved)" } else { "" }
            );
        }
        let s = &self.switch;
        let _ = writeln!(
            out,
            "switch: frames {} flooded {} spoofed {} dropped {} refused offload {}",
            s.frames, s.flooded, s.spoofed, s.dropped, s.refused_offload
        );
        render_ingress(&mut out, &self.members, self.conntrack);
        out.push_str(&self.gateway_nat.render());
        out
    }
}

fn render_members(out: &mut String, members: &[MemberView]) {
    let _ = writeln!(out, "members: {}", members.len());
    if members.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  {:<16} {:<17} {:<15} {:<6} FORWARDS",
        "NAME", "MAC", "IP", "KIND"
    );
    for m in members {
        let kind = match &m.kind {
            MemberKind::Vm => "vm".to_string(),
            MemberKind::Qemu => "qemu".to_string(),
            MemberKind::Netns { path, .. } => format!("netns {}", path.display()),
        };
        let forwards: Vec<String> = m.forwards.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  {:<16} {:<17} {:<15} {:<6} {}",
            m.name,
            m.mac.to_string(),
            m.ip.to_string(),
            kind,
            if forwards.is_empty() {
                "-".to_string()
            } else {
                forwards.join(", ")
            }
        );
    }
}

/// Each guarded member's rules (with the connections each let in) and
/// what was dropped toward it.
fn render_ingress(out: &mut String, members: &[MemberView], conntrack: ConntrackCounters) {
    let guarded: Vec<(&str, &IngressView)> = members
        .iter()
        .filter_map(|m| m.ingress.as_ref().map(|v| (m.name.as_str(), v)))
        .collect();
    if guarded.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "ingress: connections {} (at most {}) table_full {}",
        conntrack.connections,
        crate::switch::firewall::MAX_CONNECTIONS,
        conntrack.table_full
    );
    for (name, view) in guarded {
        let rules: Vec<String> = view
            .rules
            .iter()
            .map(|r| format!("{} allowed {}", r.rule, r.allowed))
            .collect();
        let dropped: Vec<String> = view
            .dropped
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  {name}: {}; dropped {}; connections {}",
            rules.join(", "),
            if dropped.is_empty() {
                "none".to_string()
            } else {
                dropped.join(", ")
            },
            view.connections
        );
    }
}

/// How a QEMU guest joins: the socket, and the options QEMU 7.2 takes
/// (a stream netdev connecting to it; any NIC model works, the MMIO
/// virtio-net of a microvm is shown). Each guest needs a MAC of its own.
pub fn render_qemu_join(socket: &std::path::Path) -> String {
    format!(
        "qemu socket: {path}\n  qemu-system-x86_64 ... -netdev stream,id=n0,server=off,addr.type=unix,addr.path={path} -device virtio-net-device,netdev=n0,mac=52:54:00:XX:XX:XX\n",
        path = socket.display()
    )
}

/// One row of `vmlab network ls`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkRow {
    pub name: String,
    pub subnet: Subnet,
    pub nat: bool,
    /// Members, when the network runs.
    pub members: Option<usize>,
}

/// The table `vmlab network ls` prints.
pub fn render_rows(rows: &[NetworkRow]) -> String {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let mut out = format!(
        "{:<width$}  {:<18}  {:<3}  {:>7}  STATE\n",
        "NAME", "SUBNET", "NAT", "MEMBERS"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<width$}  {:<18}  {:<3}  {:>7}  {}",
            r.name,
            r.subnet.to_string(),
            if r.nat { "yes" } else { "no" },
            r.members.map_or_else(|| "-".into(), |n| n.to_string()),
            if r.members.is_some() {
                "running"
            } else {
                "stopped"
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_round_trip_and_render() {
        let view = NetworkView {
            name: "lab".into(),
            subnet: "192.168.100.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(192, 168, 100, 1),
            nat: true,
            pid: 7,
            members: vec![
                MemberView {
                    name: "web".into(),
                    mac: "52:54:00:00:00:01".parse().unwrap(),
                    ip: Ipv4Addr::new(192, 168, 100, 100),
                    kind: MemberKind::Vm,
                    forwards: vec!["tcp:8080:80".parse().unwrap()],
                    ingress: Some(IngressView {
                        rules: vec![crate::switch::firewall::RuleCount {
                            rule: "tcp:80".parse().unwrap(),
                            allowed: 3,
                        }],
                        dropped: vec![("tcp:22".into(), 5)],
                        connections: 1,
                    }),
                },
                MemberView {
                    name: "ct1".into(),
                    mac: "52:54:00:00:00:02".parse().unwrap(),
                    ip: Ipv4Addr::new(192, 168, 100, 101),
                    kind: MemberKind::Netns {
                        path: "/run/netns/ct1".into(),
                        device: "vl-lab".into(),
                    },
                    forwards: vec![],
                    ingress: None,
                },
            ],
            leases: vec![],
            gateway_nat: NatSnapshot::default(),
            switch: SwitchCounters::default(),
            conntrack: ConntrackCounters::default(),
        };
        let json = serde_json::to_string(&view).unwrap();
        assert_eq!(serde_json::from_str::<NetworkView>(&json).unwrap(), view);
        let text = view.render();
        assert!(text.contains("web"), "{text}");
        assert!(text.contains("tcp:127.0.0.1:8080:80"), "{text}");
        assert!(text.contains("netns /run/netns/ct1"), "{text}");
        assert!(
            text.contains("  web: tcp:80 allowed 3; dropped tcp:22 5; connections 1"),
            "{text}"
        );
        let rows = [NetworkRow {
            name: "lab".into(),
            subnet: view.subnet,
            nat: false,
            members: Some(2),
        }];
        let table = render_rows(&rows);
        assert!(table.starts_with("NAME  SUBNET"), "{table}");
        assert!(
            table.contains("lab   192.168.100.0/24    no         2  running"),
            "{table}"
        );
    }
}
