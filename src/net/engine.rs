//! The engine: owns the flow table, the forward listeners and the queue of
//! frames for the guest, and drives them from host readiness and timers.
//! Guest frames come in through [`Nat::handle_frame`] (see `ingress`),
//! forwarded connections through the listeners (see `listeners`).

use std::time::{Duration, Instant};

use event_manager::EventSet;

use smoltcp::wire::EthernetAddress;

use super::budget::BufferBudget;
use super::config::NatConfig;
use super::counters::Counters;
use super::flow_table::{Flow, FlowTable};
use super::frame::{GuestFrame, Offloads};
use super::leases::Leases;
use super::listeners::{ForwardListeners, ListenerSlots};
use super::output::Output;
use super::port::GuestPort;
use super::registry::SocketRegistry;
use super::tcp::Verdict;
use super::view::{FlowInfo, NatSnapshot};
use crate::rate_limit::RateLimit;

/// How often [`Nat::tick`] should run: the granularity of TCP timers.
pub const TICK: Duration = Duration::from_millis(50);

/// Tokens with this bit belong to the NAT; the rest are the owner's.
const TOKEN_NAT: u32 = 1 << 31;
const TOKEN_LISTENER: u32 = 1 << 30;
const TOKEN_INDEX: u32 = TOKEN_LISTENER - 1;

/// The event-loop token of the flow in `slot`.
pub(super) fn flow_token(slot: usize) -> u32 {
    TOKEN_NAT | slot as u32
}

/// The event-loop token of forward listener `index`.
pub(super) fn listener_token(index: usize) -> u32 {
    TOKEN_NAT | TOKEN_LISTENER | index as u32
}

/// The userspace NAT. Feed it guest frames with [`Nat::handle_frame`] and
/// host readiness with [`Nat::handle_event`]; call [`Nat::tick`] every
/// [`TICK`]; collect frames for the guest with [`Nat::flush`].
pub struct Nat {
    pub(super) cfg: NatConfig,
    pub(super) out: Output,
    pub(super) table: FlowTable,
    pub(super) listeners: ListenerSlots,
    pub(super) ack_due: Vec<usize>,
    pub(super) next_forward_port: u16,
    pub(super) icmp_unavailable_logged: bool,
    pub(super) scratch: Vec<u8>,
    /// What the TCP flows' buffers draw on (`NatConfig::buffer_budget`).
    pub(super) budget: BufferBudget,
    /// Warnings about running out of descriptors: a few a minute.
    pub(super) fd_warnings: RateLimit,
    /// New flows toward the host (`NatConfig::new_flows_per_sec`).
    pub(super) new_flows: RateLimit,
    /// Who gets which address (DHCP) and goes by which name (DNS).
    pub(super) leases: Leases,
    /// Source MAC of the frame being handled.
    pub(super) frame_src: EthernetAddress,
    next_iss: u32,
}

impl Nat {
    /// An engine with the given plan and forward listeners (bound before, see
    /// [`ForwardListeners::bind`]). Nothing is registered until [`Nat::start`].
    pub fn new(cfg: NatConfig, listeners: ForwardListeners) -> Self {
        let leases = Leases::single(cfg.guest);
        Self::with_leases(cfg, listeners, leases)
    }

    /// An engine for a subnet of guests, handing out `leases`; forwards
    /// in `listeners` lead to `cfg.guest` (add others per guest with
    /// [`Nat::add_forwards`]).
    pub fn with_leases(mut cfg: NatConfig, listeners: ForwardListeners, leases: Leases) -> Self {
        let fitting = crate::fds::flow_capacity(cfg.max_flows);
        if fitting < cfg.max_flows {
            log::info!(
                "nat: {fitting} flows at most (not {}): that is what the open-file limit leaves",
                cfg.max_flows
            );
            cfg.max_flows = fitting;
        }
        let out = Output::new(cfg.gateway_mac);
        let budget = BufferBudget::new(cfg.buffer_budget);
        let new_flows = RateLimit::new(cfg.new_flows_per_sec, Duration::from_secs(1));
        let mut nat = Nat {
            cfg,
            out,
            table: FlowTable::default(),
            listeners: ListenerSlots::default(),
            ack_due: Vec::new(),
            next_forward_port: 0,
            icmp_unavailable_logged: false,
            scratch: vec![0u8; 65536],
            budget,
            fd_warnings: RateLimit::new(1, Duration::from_secs(60)),
            new_flows,
            leases,
            frame_src: EthernetAddress([0; 6]),
            next_iss: 0x1000_0000,
        };
        let guest = nat.cfg.guest;
        nat.adopt(listeners, guest);
        for (mac, lease) in nat.leases.iter() {
            nat.out.learn(lease.ip, mac);
        }
        nat
    }

    /// True when an event-loop token belongs to the NAT: the NAT's tokens
    /// have bit 31 set, so the owner's own tokens (TAP, queues, timers) must
    /// keep it clear.
    pub fn owns_token(token: u32) -> bool {
        token & TOKEN_NAT != 0
    }

    pub fn config(&self) -> &NatConfig {
        &self.cfg
    }

    pub fn counters(&self) -> Counters {
        self.out.counters
    }

    /// Offloads the guest side takes (see [`GuestPort::offloads`]).
    pub fn set_offloads(&mut self, offloads: Offloads) {
        self.out.offloads = offloads;
    }

    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// The leases, to reserve addresses and name guests (a lab network's
    /// owner saves them when [`Leases::take_changed`] says so).
    pub fn leases_mut(&mut self) -> &mut Leases {
        &mut self.leases
    }

    /// Bytes the TCP flows buffer now (what they hold of the budget).
    pub fn buffered_bytes(&self) -> usize {
        self.budget.used()
    }

    /// Frames waiting for the guest.
    pub fn pending_frames(&self) -> usize {
        self.out.len()
    }

    /// Whether [`Nat::tick`] has work: with no flow and nothing queued it
    /// has none, so an owner may stop its timer until traffic starts.
    pub fn needs_tick(&self) -> bool {
        self.table.len() > 0 || self.out.len() > 0 || self.listeners_pending()
    }

    /// The flow table, one row per flow.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let now = Instant::now();
        self.table
            .iter()
            .map(|f| f.info(now, &self.listeners))
            .collect()
    }

    /// Forwards, flows and counters, for `vmlab nat show`.
    pub fn snapshot(&self) -> NatSnapshot {
        NatSnapshot {
            forwards: self.listeners.iter().map(|(_, l)| l.bound_rule()).collect(),
            flows: self.flows(),
            counters: self.counters(),
        }
    }

    /// [`Nat::snapshot`] of one guest: its forwards and its flows (the
    /// counters are the whole NAT's).
    pub fn snapshot_of(&self, guest: std::net::Ipv4Addr) -> NatSnapshot {
        let now = Instant::now();
        NatSnapshot {
            forwards: self
                .listeners
                .iter()
                .filter(|(_, l)| l.guest == guest)
                .map(|(_, l)| l.bound_rule())
                .collect(),
            flows: self
                .table
                .iter()
                .filter(|f| f.guest_ip() == guest)
                .map(|f| f.info(now, &self.listeners))
                .collect(),
            counters: self.counters(),
        }
    }

    /// Tells the NAT where guest `ip` is, before it says so itself (a lab
    /// network knows its members' MACs).
    pub fn add_neighbor(&mut self, ip: std::net::Ipv4Addr, mac: EthernetAddress) {
        self.out.learn(ip, mac);
    }

    /// Guest `ip` left: its forwards close and its flows end (host sides
    /// reset), so nothing it opened outlives it.
    pub fn forget_guest(&mut self, ip: std::net::Ipv4Addr, reg: &mut dyn SocketRegistry) {
        self.remove_forwards(ip, reg);
        for slot in self.table.slots_of(ip) {
            if let Some(Flow::Tcp(f)) = self.table.get_mut(slot) {
                f.abort_host();
            }
            self.remove(slot, reg);
        }
        self.out.neighbors.remove(&ip);
    }

    /// Emits owed ACKs and hands queued frames to the guest; resumes host
    /// reads that waited for room.
    pub fn flush(&mut self, port: &mut dyn GuestPort, reg: &mut dyn SocketRegistry) {
        self.out.offloads = port.offloads();
        self.flush_acks();
        for _ in 0..8 {
            self.out.flush(port);
            if !(self.out.starved && self.out.has_room()) {
                break;
            }
            self.out.starved = false;
            self.resume(reg);
            self.flush_acks();
        }
    }

    /// Drains queued frames without a port (tests and fuzzing); host reads
    /// that waited for room resume.
    pub fn take_frames(&mut self, reg: &mut dyn SocketRegistry) -> Vec<GuestFrame> {
        self.flush_acks();
        let mut frames = self.out.take_all();
        if self.out.starved {
            self.out.starved = false;
            self.resume(reg);
            self.flush_acks();
            frames.extend(self.out.take_all());
        }
        frames
    }

    fn flush_acks(&mut self) {
        for slot in std::mem::take(&mut self.ack_due) {
            if let Some(Flow::Tcp(f)) = self.table.get_mut(slot) {
                f.flush_ack(&mut self.out);
            }
        }
    }

    /// Gives every flow that waited for room another go.
    fn resume(&mut self, reg: &mut dyn SocketRegistry) {
        let now = Instant::now();
        for slot in 0..self.table.slot_count() {
            let verdict = match self.table.get_mut(slot) {
                Some(Flow::Tcp(f)) => {
                    let v = f.pump(&mut self.out, now);
                    self.ack_due.push(slot);
                    v
                }
                Some(Flow::Udp(f)) => {
                    f.read_host(&mut self.out, &mut self.scratch, now);
                    Verdict::Keep
                }
                Some(Flow::Icmp(f)) => {
                    f.read_host(&mut self.out, &mut self.scratch, now);
                    Verdict::Keep
                }
                None => Verdict::Keep,
            };
            if verdict == Verdict::Close {
                self.remove(slot, reg);
            }
        }
        self.retry_listeners(reg);
    }

    /// Readiness of a socket the NAT registered (see [`Nat::owns_token`]).
    pub fn handle_event(&mut self, token: u32, events: EventSet, reg: &mut dyn SocketRegistry) {
        if !Self::owns_token(token) {
            return;
        }
        let index = (token & TOKEN_INDEX) as usize;
        if token & TOKEN_LISTENER != 0 {
            self.listener_event(index, reg);
            return;
        }
        let readable = events.intersects(
            EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
        );
        let writable = events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR);
        let now = Instant::now();
        let verdict = match self.table.get_mut(index) {
            Some(Flow::Tcp(f)) => {
                let v = f.on_host_event(readable, writable, &mut self.out, &self.cfg, now);
                self.ack_due.push(index);
                v
            }
            Some(Flow::Udp(f)) => {
                f.readable |= readable;
                f.read_host(&mut self.out, &mut self.scratch, now);
                Verdict::Keep
            }
            Some(Flow::Icmp(f)) => {
                f.readable |= readable;
                f.read_host(&mut self.out, &mut self.scratch, now);
                Verdict::Keep
            }
            None => Verdict::Keep,
        };
        if verdict == Verdict::Close {
            self.remove(index, reg);
        }
    }

    /// Runs timers: TCP retransmission and TIME-WAIT, UDP/ICMP idle expiry;
    /// lets flows that waited for buffer memory try again.
    pub fn tick(&mut self, reg: &mut dyn SocketRegistry) {
        if self.out.budget_starved {
            self.out.budget_starved = false;
            for slot in 0..self.table.slot_count() {
                if let Some(Flow::Tcp(f)) = self.table.get_mut(slot) {
                    f.release_idle_buffers();
                }
            }
            self.resume(reg);
        }
        self.retry_listeners(reg);
        let now = Instant::now();
        for slot in 0..self.table.slot_count() {
            let verdict = match self.table.get_mut(slot) {
                Some(Flow::Tcp(f)) => f.on_tick(&mut self.out, &self.cfg, now),
                Some(Flow::Udp(f)) if now.duration_since(f.last_active) >= self.cfg.udp_timeout => {
                    Verdict::Close
                }
                Some(Flow::Icmp(f))
                    if now.duration_since(f.last_active) >= self.cfg.icmp_timeout =>
                {
                    Verdict::Close
                }
                _ => Verdict::Keep,
            };
            if verdict == Verdict::Close {
                self.remove(slot, reg);
            }
        }
    }

    /// Initial sequence numbers need not be secret here: the guest is the
    /// only party on its link and the host side is a separate connection.
    /// Spacing them apart keeps a reused port from matching old segments,
    /// and determinism keeps fuzzing reproducible.
    pub(super) fn iss(&mut self) -> u32 {
        self.next_iss = self.next_iss.wrapping_add(0x0100_0001);
        self.next_iss
    }

    /// Closes the flow in `slot` (its socket closes as it drops).
    pub(super) fn remove(&mut self, slot: usize, reg: &mut dyn SocketRegistry) {
        if let Some(flow) = self.table.remove(slot, reg, &mut self.out.counters) {
            log::debug!("nat: close {}", flow.info(Instant::now(), &self.listeners));
        }
    }

    /// Makes room for one more flow: first every TCP flow in TIME-WAIT (one
    /// scan serves many new flows), else the flow idle longest. False if the
    /// table cannot hold any flow.
    pub(super) fn make_room(&mut self, reg: &mut dyn SocketRegistry) -> bool {
        if self.table.len() < self.cfg.max_flows {
            return true;
        }
        let lingering = self.table.time_wait_slots();
        if !lingering.is_empty() {
            for slot in lingering {
                self.out.counters.flows_evicted += 1;
                self.remove(slot, reg);
            }
            return true;
        }
        let Some(slot) = self.table.idlest() else {
            return false;
        };
        if let Some(Flow::Tcp(f)) = self.table.get_mut(slot) {
            f.send_reset(&mut self.out);
            f.abort_host();
        }
        self.out.counters.flows_evicted += 1;
        self.remove(slot, reg);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
    use std::time::Duration;

    use smoltcp::wire::{
        DhcpMessageType, DhcpPacket, DhcpRepr, DHCP_CLIENT_PORT, DHCP_SERVER_PORT,
    };

    use super::*;
    use crate::net::testkit::{dhcp_request, dns_query, GuestSide, Harness, Seen};

    const A: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0, 0, 0xa]);
    const B: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0, 0, 0xb]);

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 100, n)
    }

    fn lab() -> Harness {
        let cfg = NatConfig {
            network: ip(0),
            gateway: ip(1),
            dns: ip(1),
            guest: ip(100),
            domain: Some("lab".into()),
            ..NatConfig::default()
        };
        let mut h = Harness::with_leases(cfg, Leases::pool(ip(100), ip(200)));
        for (mac, name) in [(A, "web"), (B, "db")] {
            h.nat.leases_mut().lease_for(mac);
            h.nat.leases_mut().set_name(mac, name);
        }
        h
    }

    fn guest(mac: EthernetAddress) -> GuestSide {
        let mut g = GuestSide::with_mac(mac, NatConfig::default().gateway_mac);
        g.route(ip(1), NatConfig::default().gateway_mac);
        g
    }

    /// The address and router offered to `mac`.
    fn discover(h: &mut Harness, mac: EthernetAddress) -> (Ipv4Addr, Option<Ipv4Addr>) {
        let frame = guest(mac).udp(
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DHCP_CLIENT_PORT),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_SERVER_PORT),
            &dhcp_request(mac, DhcpMessageType::Discover, None, None),
        );
        h.send(&frame);
        let offer: Seen = h.frames().pop().expect("an offer");
        let packet = DhcpPacket::new_checked(&offer.payload[..]).unwrap();
        let repr = DhcpRepr::parse(&packet).unwrap();
        (repr.your_ip, repr.router)
    }

    #[test]
    fn a_subnet_of_guests_gets_leases_names_forwards_and_their_own_views() {
        let mut h = lab();
        assert_eq!(discover(&mut h, A), (ip(100), Some(ip(1))));
        assert_eq!(discover(&mut h, B).0, ip(101));
        assert_eq!(discover(&mut h, A).0, ip(100), "stable");

        // DNS: web.lab from db, answered by the gateway itself.
        let q = guest(B).udp(
            SocketAddrV4::new(ip(101), 5000),
            SocketAddrV4::new(ip(1), 53),
            &dns_query("web.lab", 1),
        );
        h.send(&q);
        let answer = h.frames().pop().expect("a DNS answer");
        assert_eq!(answer.dst, Some(ip(101)));
        assert_eq!(answer.eth_dst, Some(B));
        assert_eq!(
            &answer.payload[answer.payload.len() - 4..],
            &ip(100).octets()
        );

        // A forward to db: the SYN goes to db's address and MAC.
        let mut rule: crate::cli::ForwardRule = "tcp:1:5432".parse().unwrap();
        rule.host.set_port(0);
        let listeners = ForwardListeners::bind(&[rule]).unwrap();
        let host = listeners.local_addrs()[0].1;
        h.nat.add_forwards(listeners, ip(101), &mut h.reg).unwrap();
        let _client = TcpStream::connect(host).unwrap();
        let frames = h.poll_until(Duration::from_secs(3), |f| f.iter().any(|s| s.syn));
        let syn = frames.iter().find(|s| s.syn).unwrap();
        assert_eq!(
            (syn.dst, syn.dst_port, syn.eth_dst),
            (Some(ip(101)), 5432, Some(B))
        );
        let db = h.nat.snapshot_of(ip(101));
        assert_eq!((db.forwards.len(), db.flows.len()), (1, 1));
        let web = h.nat.snapshot_of(ip(100));
        assert!(web.forwards.is_empty() && web.flows.is_empty());

        // db leaves: its forward and flows go with it.
        h.nat.forget_guest(ip(101), &mut h.reg);
        let db = h.nat.snapshot_of(ip(101));
        assert!(db.forwards.is_empty() && db.flows.is_empty());
        assert!(TcpStream::connect(host).is_err(), "the forward is closed");
    }

    #[test]
    fn a_closed_network_keeps_its_guests_in() {
        let mut h = Harness::with_leases(
            NatConfig {
                network: ip(0),
                gateway: ip(1),
                dns: ip(1),
                closed: true,
                ..NatConfig::default()
            },
            Leases::pool(ip(100), ip(200)),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let syn = guest(A).syn(
            SocketAddrV4::new(ip(100), 40000),
            SocketAddrV4::new(ip(1), port),
        );
        h.send(&syn);
        let frames = h.frames();
        assert!(frames.iter().any(|s| s.rst), "refused: {frames:?}");
        assert!(h.nat.flows().is_empty());
        // Other names are refused rather than relayed.
        let q = guest(A).udp(
            SocketAddrV4::new(ip(100), 5000),
            SocketAddrV4::new(ip(1), 53),
            &dns_query("example.com", 1),
        );
        h.send(&q);
        let answer = h.frames().pop().expect("a DNS answer");
        assert_eq!(answer.payload[3] & 0x0f, 5, "REFUSED");
    }
}
