//! Ingress rules on switch ports (security groups) and the connection
//! tracking they need.
//!
//! A port with rules is *guarded*: an IPv4 packet toward it passes when it
//! belongs to a connection the switch tracks for that port, or when it
//! opens a new one that a rule admits (a TCP SYN, a UDP datagram, an ICMP
//! echo request; other ICMP only with an `icmp` rule). Whatever the
//! guarded member sends opens or refreshes a connection, so replies to
//! connections it opened itself always pass. ARP passes, and so do the
//! gateway's DHCP answers (UDP 67 to 68). IPv6, IPv4 fragments after the
//! first and other IP protocols toward a guarded port are dropped.
//!
//! Connections are keyed by guarded port and 5-tuple (ICMP echo by its
//! identifier), and forgotten after a while without packets: TCP 1 h
//! once answered, 30 s while only the opening side spoke, 10 s after a
//! FIN or RST; UDP 60 s; ICMP echo 30 s. The table holds at most
//! [`MAX_CONNECTIONS`], [`MAX_PER_PORT`] of them for one port: a packet
//! that would open one more is dropped and counted (`table_full`), as
//! Linux conntrack does when full — the guarded member sees a lost packet,
//! never a hole in its rules.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::PortId;
use crate::cli::{IngressProtocol, IngressRule};

pub const MAX_CONNECTIONS: usize = 16384;
pub const MAX_PER_PORT: usize = 4096;
/// Distinct refused kinds (`tcp:22`) counted per port; more go to `other`.
const MAX_DROP_KINDS: usize = 32;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

const TCP_OPEN: Duration = Duration::from_secs(3600);
const TCP_OPENING: Duration = Duration::from_secs(30);
const TCP_CLOSING: Duration = Duration::from_secs(10);
const UDP_IDLE: Duration = Duration::from_secs(60);
const ICMP_IDLE: Duration = Duration::from_secs(30);

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// What an IPv4 packet is, as far as the rules care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Packet {
    protocol: IngressProtocol,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    /// Ports (ICMP echo: the identifier on both sides; other ICMP: 0).
    sport: u16,
    dport: u16,
    /// TCP: SYN without ACK. ICMP: an echo request.
    opens: bool,
    /// TCP: FIN or RST.
    closes: bool,
    /// ICMP other than echo (errors, and the rest).
    icmp_other: bool,
}

/// A frame as the firewall sees it.
enum Frame {
    /// Not IP (ARP and the like): always passes.
    NotIp,
    Ipv4(Packet),
    /// IP the rules cannot reason about (IPv6, fragments, other protocols).
    Unsupported(&'static str),
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn classify(frame: &[u8]) -> Frame {
    match be16(frame, 12) {
        Some(0x0800) => {}
        Some(0x86dd) => return Frame::Unsupported("ipv6"),
        _ => return Frame::NotIp,
    }
    let Some(ip) = frame.get(14..) else {
        return Frame::Unsupported("ip");
    };
    let Ok(packet) = smoltcp::wire::Ipv4Packet::new_checked(ip) else {
        return Frame::Unsupported("ip");
    };
    if packet.frag_offset() != 0 {
        return Frame::Unsupported("fragment");
    }
    let (src, dst) = (packet.src_addr(), packet.dst_addr());
    let l4 = packet.payload();
    let base = |protocol, sport, dport| Packet {
        protocol,
        src,
        dst,
        sport,
        dport,
        opens: false,
        closes: false,
        icmp_other: false,
    };
    use smoltcp::wire::IpProtocol;
    let parsed = match packet.next_header() {
        IpProtocol::Tcp => {
            let flags = l4.get(13).copied();
            match (be16(l4, 0), be16(l4, 2), flags) {
                (Some(s), Some(d), Some(f)) => Some(Packet {
                    opens: f & 0x12 == 0x02,
                    closes: f & 0x05 != 0,
                    ..base(IngressProtocol::Tcp, s, d)
                }),
                _ => None,
            }
        }
        IpProtocol::Udp => match (be16(l4, 0), be16(l4, 2)) {
            (Some(s), Some(d)) => Some(base(IngressProtocol::Udp, s, d)),
            _ => None,
        },
        IpProtocol::Icmp => match (l4.first().copied(), be16(l4, 4)) {
            (Some(t @ (ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY)), Some(id)) => Some(Packet {
                opens: t == ICMP_ECHO_REQUEST,
                ..base(IngressProtocol::Icmp, id, id)
            }),
            (Some(_), _) => Some(Packet {
                icmp_other: true,
                ..base(IngressProtocol::Icmp, 0, 0)
            }),
            _ => None,
        },
        _ => return Frame::Unsupported("ip-proto"),
    };
    parsed.map_or(Frame::Unsupported("ip"), Frame::Ipv4)
}

/// One direction of a connection: who opened it, toward whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    port: PortId,
    protocol: IngressProtocol,
    from: (Ipv4Addr, u16),
    to: (Ipv4Addr, u16),
}

#[derive(Clone, Copy, Debug)]
struct Conn {
    last: Instant,
    answered: bool,
    closing: bool,
}

impl Conn {
    fn idle_limit(&self, protocol: IngressProtocol) -> Duration {
        match protocol {
            IngressProtocol::Tcp if self.closing => TCP_CLOSING,
            IngressProtocol::Tcp if self.answered => TCP_OPEN,
            IngressProtocol::Tcp => TCP_OPENING,
            IngressProtocol::Udp => UDP_IDLE,
            IngressProtocol::Icmp => ICMP_IDLE,
        }
    }
}

/// A guarded port's rules and counters.
struct Guard {
    rules: Vec<IngressRule>,
    /// New connections each rule let in.
    allowed: Vec<u64>,
    /// Packets refused, by what they were (`tcp:22`, `icmp`, `ipv6`).
    dropped: BTreeMap<String, u64>,
    connections: usize,
}

/// A rule and how many connections it let in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    pub rule: IngressRule,
    pub allowed: u64,
}

/// What `network show` prints for a guarded member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IngressView {
    pub rules: Vec<RuleCount>,
    /// Refused packets by kind, most first.
    pub dropped: Vec<(String, u64)>,
    pub connections: usize,
}

/// Counters of the whole table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConntrackCounters {
    pub connections: usize,
    /// Packets dropped because they would open one connection too many.
    pub table_full: u64,
}

/// Guarded ports and their connections; see the module docs.
#[derive(Default)]
pub struct Firewall {
    guards: HashMap<PortId, Guard>,
    conns: HashMap<Key, Conn>,
    table_full: u64,
    last_sweep: Option<Instant>,
}

impl Firewall {
    /// Guards `port` with `rules` (none: the port is open, as before).
    pub fn guard(&mut self, port: PortId, rules: &[IngressRule]) {
        if rules.is_empty() {
            return;
        }
        self.guards.insert(
            port,
            Guard {
                rules: rules.to_vec(),
                allowed: vec![0; rules.len()],
                dropped: BTreeMap::new(),
                connections: 0,
            },
        );
    }

    pub fn remove_port(&mut self, port: PortId) {
        if self.guards.remove(&port).is_some() {
            self.conns.retain(|k, _| k.port != port);
        }
    }

    pub fn is_guarded(&self, port: PortId) -> bool {
        self.guards.contains_key(&port)
    }

    /// A frame from guarded port `port`: it opens or refreshes its
    /// connection; false when the table is full and it must be dropped.
    pub fn outbound(&mut self, port: PortId, frame: &[u8], now: Instant) -> bool {
        let Frame::Ipv4(p) = classify(frame) else {
            return true;
        };
        if p.icmp_other || (p.protocol == IngressProtocol::Icmp && !p.opens) {
            return true;
        }
        let (forward, reverse) = keys(port, &p);
        if let Some(conn) = self.conns.get_mut(&reverse) {
            conn.last = now;
            conn.answered = true;
            conn.closing |= p.closes;
            return true;
        }
        if let Some(conn) = self.conns.get_mut(&forward) {
            conn.last = now;
            conn.closing |= p.closes;
            return true;
        }
        if p.protocol == IngressProtocol::Tcp && p.closes {
            // A RST or FIN for nothing tracked opens nothing.
            return true;
        }
        self.insert(forward, now)
    }

    /// Whether a frame toward guarded port `port` may pass (counted when
    /// it may not); unguarded ports take everything.
    pub fn inbound(&mut self, port: PortId, frame: &[u8], now: Instant) -> bool {
        if !self.guards.contains_key(&port) {
            return true;
        }
        self.sweep(now);
        let p = match classify(frame) {
            Frame::NotIp => return true,
            Frame::Ipv4(p) => p,
            Frame::Unsupported(kind) => {
                self.count_drop(port, kind.to_string());
                return false;
            }
        };
        if p.protocol == IngressProtocol::Udp && p.sport == 67 && p.dport == 68 {
            return true;
        }
        let (forward, reverse) = keys(port, &p);
        for (key, answer) in [(reverse, true), (forward, false)] {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.last = now;
                conn.answered |= answer;
                conn.closing |= p.closes;
                return true;
            }
        }
        let kind = match p.protocol {
            IngressProtocol::Tcp => format!("tcp:{}", p.dport),
            IngressProtocol::Udp => format!("udp:{}", p.dport),
            IngressProtocol::Icmp => "icmp".to_string(),
        };
        let new_connection = match p.protocol {
            IngressProtocol::Tcp => p.opens,
            IngressProtocol::Udp => true,
            IngressProtocol::Icmp => p.opens || p.icmp_other,
        };
        let guard = self.guards.get_mut(&port).expect("guarded");
        let rule = guard
            .rules
            .iter()
            .position(|r| r.admits(p.protocol, p.src, p.dport));
        match rule {
            Some(i) if new_connection => {
                if p.icmp_other {
                    guard.allowed[i] += 1;
                    return true;
                }
                if !self.insert(forward, now) {
                    return false;
                }
                let guard = self.guards.get_mut(&port).expect("guarded");
                guard.allowed[i] += 1;
                true
            }
            _ => {
                self.count_drop(port, kind);
                false
            }
        }
    }

    fn insert(&mut self, key: Key, now: Instant) -> bool {
        self.sweep(now);
        let Some(guard) = self.guards.get_mut(&key.port) else {
            return true;
        };
        if self.conns.len() >= MAX_CONNECTIONS || guard.connections >= MAX_PER_PORT {
            self.table_full += 1;
            return false;
        }
        guard.connections += 1;
        self.conns.insert(
            key,
            Conn {
                last: now,
                answered: false,
                closing: false,
            },
        );
        true
    }

    fn count_drop(&mut self, port: PortId, kind: String) {
        let Some(guard) = self.guards.get_mut(&port) else {
            return;
        };
        let kind = if guard.dropped.len() >= MAX_DROP_KINDS && !guard.dropped.contains_key(&kind) {
            "other".to_string()
        } else {
            kind
        };
        *guard.dropped.entry(kind).or_default() += 1;
    }

    /// Forgets idle connections, once a [`SWEEP_EVERY`].
    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        let guards = &mut self.guards;
        self.conns.retain(|k, c| {
            let keep = now.saturating_duration_since(c.last) < c.idle_limit(k.protocol);
            if !keep {
                if let Some(g) = guards.get_mut(&k.port) {
                    g.connections -= 1;
                }
            }
            keep
        });
    }

    pub fn view(&self, port: PortId) -> Option<IngressView> {
        let guard = self.guards.get(&port)?;
        let mut dropped: Vec<(String, u64)> =
            guard.dropped.iter().map(|(k, v)| (k.clone(), *v)).collect();
        dropped.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Some(IngressView {
            rules: guard
                .rules
                .iter()
                .zip(&guard.allowed)
                .map(|(rule, allowed)| RuleCount {
                    rule: *rule,
                    allowed: *allowed,
                })
                .collect(),
            dropped,
            connections: guard.connections,
        })
    }

    pub fn counters(&self) -> ConntrackCounters {
        ConntrackCounters {
            connections: self.conns.len(),
            table_full: self.table_full,
        }
    }
}

/// The connection `p` would open from its source (`forward`), and the one
/// it answers (`reverse`), both as seen by guarded port `port`.
fn keys(port: PortId, p: &Packet) -> (Key, Key) {
    let forward = Key {
        port,
        protocol: p.protocol,
        from: (p.src, p.sport),
        to: (p.dst, p.dport),
    };
    let reverse = Key {
        from: forward.to,
        to: forward.from,
        ..forward
    };
    (forward, reverse)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PortId = PortId(1);
    const DB: [u8; 4] = [192, 168, 100, 20];
    const WEB: [u8; 4] = [192, 168, 100, 30];

    /// An Ethernet/IPv4 frame of `proto` with `l4` as its payload.
    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        f[22] = 64;
        f[23] = proto;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        f.extend_from_slice(l4);
        f
    }

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
        let mut l4 = vec![0u8; 20];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = flags;
        ipv4(src, dst, 6, &l4)
    }

    fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        ipv4(src, dst, 17, &l4)
    }

    fn echo(src: [u8; 4], dst: [u8; 4], kind: u8, id: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0] = kind;
        l4[4..6].copy_from_slice(&id.to_be_bytes());
        ipv4(src, dst, 1, &l4)
    }

    const SYN: u8 = 0x02;
    const SYN_ACK: u8 = 0x12;
    const ACK: u8 = 0x10;
    const FIN_ACK: u8 = 0x11;

    fn guarded(rules: &[&str]) -> Firewall {
        let mut fw = Firewall::default();
        let rules: Vec<IngressRule> = rules.iter().map(|r| r.parse().unwrap()).collect();
        fw.guard(P, &rules);
        fw
    }

    #[test]
    fn only_ruled_connections_come_in_and_each_is_counted() {
        let mut fw = guarded(&["tcp:5432", "icmp from 192.168.100.0/24"]);
        let now = Instant::now();
        assert!(fw.inbound(P, &tcp(WEB, 40000, DB, 5432, SYN), now));
        assert!(fw.outbound(P, &tcp(DB, 5432, WEB, 40000, SYN_ACK), now));
        assert!(fw.inbound(P, &tcp(WEB, 40000, DB, 5432, ACK), now));
        assert!(!fw.inbound(P, &tcp(WEB, 40001, DB, 22, SYN), now));
        assert!(!fw.inbound(P, &tcp(WEB, 40001, DB, 22, SYN), now));
        assert!(
            !fw.inbound(P, &tcp(WEB, 40002, DB, 5432, ACK), now),
            "no SYN"
        );
        assert!(!fw.inbound(P, &udp(WEB, 5000, DB, 53), now));
        assert!(fw.inbound(P, &echo(WEB, DB, ICMP_ECHO_REQUEST, 7), now));
        assert!(!fw.inbound(P, &echo([10, 0, 0, 1], DB, ICMP_ECHO_REQUEST, 7), now));
        let mut v6 = tcp(WEB, 1, DB, 5432, SYN);
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(!fw.inbound(P, &v6, now));
        let mut arp = v6.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(fw.inbound(P, &arp, now));
        assert!(
            fw.inbound(P, &udp([192, 168, 100, 1], 67, DB, 68), now),
            "DHCP"
        );

        let view = fw.view(P).unwrap();
        assert_eq!(
            view.rules.iter().map(|r| r.allowed).collect::<Vec<_>>(),
            [1, 1]
        );
        assert_eq!(
            view.dropped,
            [
                ("tcp:22".to_string(), 2),
                ("icmp".to_string(), 1),
                ("ipv6".to_string(), 1),
                ("tcp:5432".to_string(), 1),
                ("udp:53".to_string(), 1),
            ]
        );
        assert!(
            fw.inbound(PortId(9), &tcp(WEB, 1, DB, 22, SYN), now),
            "unguarded"
        );
    }

    #[test]
    fn replies_to_what_the_member_opened_pass_until_idle() {
        let mut fw = guarded(&["tcp:5432"]);
        let now = Instant::now();
        assert!(fw.outbound(P, &tcp(DB, 33000, WEB, 80, SYN), now));
        assert!(fw.inbound(P, &tcp(WEB, 80, DB, 33000, SYN_ACK), now));
        assert!(fw.outbound(P, &udp(DB, 5353, WEB, 53), now));
        assert!(fw.inbound(P, &udp(WEB, 53, DB, 5353), now));
        assert!(!fw.inbound(P, &udp(WEB, 53, DB, 5354), now), "another port");
        assert!(fw.outbound(P, &echo(DB, WEB, ICMP_ECHO_REQUEST, 3), now));
        assert!(fw.inbound(P, &echo(WEB, DB, ICMP_ECHO_REPLY, 3), now));
        assert!(!fw.inbound(P, &echo(WEB, DB, ICMP_ECHO_REPLY, 4), now));
        // Idle: UDP goes after a minute, an answered TCP connection stays.
        let later = now + UDP_IDLE + SWEEP_EVERY;
        assert!(!fw.inbound(P, &udp(WEB, 53, DB, 5353), later));
        assert!(fw.inbound(P, &tcp(WEB, 80, DB, 33000, ACK), later));
        // Closed: gone soon after the FIN.
        assert!(fw.outbound(P, &tcp(DB, 33000, WEB, 80, FIN_ACK), later));
        let after = later + TCP_CLOSING + SWEEP_EVERY;
        assert!(!fw.inbound(P, &tcp(WEB, 80, DB, 33000, ACK), after));
        assert_eq!(fw.view(P).unwrap().connections, 0);
    }

    #[test]
    fn one_guarded_members_connection_is_not_anothers() {
        let mut fw = guarded(&["tcp:5432"]);
        let q = PortId(2);
        fw.guard(q, &["tcp:80".parse().unwrap()]);
        let now = Instant::now();
        // DB (P) opens toward WEB's (Q) port 22: Q's rules still decide.
        assert!(fw.outbound(P, &tcp(DB, 33000, WEB, 22, SYN), now));
        assert!(!fw.inbound(q, &tcp(DB, 33000, WEB, 22, SYN), now));
        assert!(fw.inbound(q, &tcp(DB, 33001, WEB, 80, SYN), now));
        fw.remove_port(q);
        assert!(!fw.is_guarded(q));
        assert_eq!(fw.counters().connections, 1);
    }

    #[test]
    fn the_table_is_bounded_and_a_full_one_drops_new_connections() {
        let mut fw = guarded(&["udp:1-65535"]);
        let now = Instant::now();
        for i in 0..MAX_PER_PORT {
            let src = [10, 1, (i >> 8) as u8, i as u8];
            assert!(fw.inbound(P, &udp(src, 1000, DB, 53), now));
        }
        assert!(!fw.inbound(P, &udp([10, 2, 0, 0], 1000, DB, 53), now));
        assert!(!fw.outbound(P, &udp(DB, 1000, WEB, 53), now));
        assert_eq!(fw.counters().table_full, 2);
        assert!(
            fw.inbound(P, &udp([10, 1, 0, 0], 1000, DB, 53), now),
            "known"
        );
        let later = now + UDP_IDLE + SWEEP_EVERY;
        assert!(
            fw.inbound(P, &udp([10, 2, 0, 0], 1000, DB, 53), later),
            "room again"
        );
    }
}
