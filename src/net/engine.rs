//! The engine: parses guest frames, keeps the flow table, and moves data
//! between flows and host sockets.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use event_manager::EventSet;
use smoltcp::wire::{
    checksum, ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    Icmpv4Message, Icmpv4Packet, IpProtocol, Ipv4Packet, TcpOption, TcpPacket, UdpPacket,
    DHCP_SERVER_PORT,
};
use socket2::{Domain, Socket, Type};

use super::config::{HostLoopback, NatConfig, Outbound};
use super::counters::Counters;
use super::dhcp;
use super::error::NatError;
use super::flow::{FlowInfo, FlowProtocol};
use super::forward::{ForwardListeners, ListenSocket, Listener};
use super::frame::{GuestFrame, NetHdr, Offloads};
use super::icmp::{self, IcmpFlow};
use super::output::{Output, IPV4_LEN, UDP_LEN};
use super::port::GuestPort;
use super::registry::SocketRegistry;
use super::tcp::{self, Seg, TcpFlow, Verdict};
use super::udp::{self, UdpFlow, UNREACH_ADMIN, UNREACH_PORT};

/// How often [`Nat::tick`] should run: the granularity of TCP timers.
pub const TICK: Duration = Duration::from_millis(50);

/// Tokens with this bit belong to the NAT; the rest are the owner's.
const TOKEN_NAT: u32 = 1 << 31;
const TOKEN_LISTENER: u32 = 1 << 30;
const TOKEN_INDEX: u32 = TOKEN_LISTENER - 1;

/// First gateway-side port handed to forwarded connections.
const FORWARD_PORT_BASE: u16 = 20000;
const FORWARD_PORT_COUNT: u16 = 40000;

enum Flow {
    Tcp(TcpFlow),
    Udp(UdpFlow),
    Icmp(IcmpFlow),
}

impl Flow {
    fn fd(&self) -> Option<RawFd> {
        match self {
            Flow::Tcp(f) => Some(f.stream.as_raw_fd()),
            Flow::Udp(f) => f.socket.as_ref().map(|s| s.as_raw_fd()),
            Flow::Icmp(f) => Some(f.socket.as_raw_fd()),
        }
    }

    fn last_active(&self) -> Instant {
        match self {
            Flow::Tcp(f) => f.last_active,
            Flow::Udp(f) => f.last_active,
            Flow::Icmp(f) => f.last_active,
        }
    }

    fn info(&self, now: Instant, listeners: &[Listener]) -> FlowInfo {
        match self {
            Flow::Tcp(f) => FlowInfo {
                protocol: FlowProtocol::Tcp,
                forwarded: f.origin == tcp::Origin::Forward,
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

/// Flow key: the guest's end and the end it talks to.
type Key = (SocketAddrV4, SocketAddrV4);

/// The userspace NAT. Feed it guest frames with [`Nat::handle_frame`] and
/// host readiness with [`Nat::handle_event`]; call [`Nat::tick`] every
/// [`TICK`]; collect frames for the guest with [`Nat::flush`].
pub struct Nat {
    cfg: NatConfig,
    out: Output,
    flows: Vec<Option<Flow>>,
    free_slots: Vec<usize>,
    live: usize,
    tcp_map: HashMap<Key, usize>,
    udp_map: HashMap<Key, usize>,
    icmp_map: HashMap<(Ipv4Addr, u16), usize>,
    udp_forward_map: HashMap<(usize, SocketAddr), usize>,
    listeners: Vec<Listener>,
    ack_due: Vec<usize>,
    next_forward_port: u16,
    icmp_unavailable_logged: bool,
    scratch: Vec<u8>,
    next_iss: u32,
}

impl Nat {
    /// An engine with the given plan and forward listeners (bound before, see
    /// [`ForwardListeners::bind`]). Nothing is registered until [`Nat::start`].
    pub fn new(cfg: NatConfig, listeners: ForwardListeners) -> Self {
        let out = Output::new(cfg.gateway_mac);
        Nat {
            cfg,
            out,
            flows: Vec::new(),
            free_slots: Vec::new(),
            live: 0,
            tcp_map: HashMap::new(),
            udp_map: HashMap::new(),
            icmp_map: HashMap::new(),
            udp_forward_map: HashMap::new(),
            listeners: listeners.listeners,
            ack_due: Vec::new(),
            next_forward_port: 0,
            icmp_unavailable_logged: false,
            scratch: vec![0u8; 65536],
            next_iss: 0x1000_0000,
        }
    }

    /// Registers the forward listeners with the event loop.
    pub fn start(&mut self, reg: &mut dyn SocketRegistry) -> Result<(), NatError> {
        for (i, l) in self.listeners.iter().enumerate() {
            let fd = match &l.socket {
                ListenSocket::Tcp(s) => s.as_raw_fd(),
                ListenSocket::Udp(s) => s.as_raw_fd(),
            };
            reg.add(fd, TOKEN_NAT | TOKEN_LISTENER | i as u32)
                .map_err(NatError::EventLoop)?;
            log::info!("nat: forwarding {}", l.rule);
        }
        Ok(())
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

    /// Frames waiting for the guest.
    pub fn pending_frames(&self) -> usize {
        self.out.len()
    }

    /// Whether [`Nat::tick`] has work: with no flow and nothing queued it
    /// has none, so an owner may stop its timer until traffic starts.
    pub fn needs_tick(&self) -> bool {
        self.live > 0 || self.out.len() > 0
    }

    /// The flow table, one row per flow.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let now = Instant::now();
        self.flows
            .iter()
            .flatten()
            .map(|f| f.info(now, &self.listeners))
            .collect()
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
            if let Some(Some(Flow::Tcp(f))) = self.flows.get_mut(slot) {
                f.flush_ack(&mut self.out);
            }
        }
    }

    /// Gives every flow that waited for room another go.
    fn resume(&mut self, reg: &mut dyn SocketRegistry) {
        let now = Instant::now();
        for slot in 0..self.flows.len() {
            let verdict = match &mut self.flows[slot] {
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
        for i in 0..self.listeners.len() {
            if self.listeners[i].readable {
                self.listener_ready(i, reg);
            }
        }
    }

    // ---- Guest frames ----------------------------------------------------

    /// One Ethernet frame from the guest. Malformed or hostile frames are
    /// counted and dropped.
    pub fn handle_frame(&mut self, hdr: &NetHdr, frame: &[u8], reg: &mut dyn SocketRegistry) {
        self.out.counters.frames_from_guest += 1;
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            self.out.counters.malformed += 1;
            return;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => self.on_arp(eth.payload()),
            EthernetProtocol::Ipv4 => self.on_ipv4(hdr, eth.src_addr(), eth.payload(), reg),
            _ => self.out.counters.unsupported += 1,
        }
    }

    fn on_arp(&mut self, payload: &[u8]) {
        let Ok(packet) = ArpPacket::new_checked(payload) else {
            self.out.counters.malformed += 1;
            return;
        };
        let Ok(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = ArpRepr::parse(&packet)
        else {
            self.out.counters.malformed += 1;
            return;
        };
        if !source_hardware_addr.is_unicast() {
            self.out.counters.malformed += 1;
            return;
        }
        if source_protocol_addr == self.cfg.guest {
            self.out.guest_mac = Some(source_hardware_addr);
        }
        if operation != ArpOperation::Request {
            return;
        }
        if target_protocol_addr == self.cfg.gateway || target_protocol_addr == self.cfg.dns {
            let reply = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: self.cfg.gateway_mac,
                source_protocol_addr: target_protocol_addr,
                target_hardware_addr: source_hardware_addr,
                target_protocol_addr: source_protocol_addr,
            };
            self.out.arp(&reply, source_hardware_addr);
        }
    }

    fn on_ipv4(
        &mut self,
        hdr: &NetHdr,
        mac: EthernetAddress,
        payload: &[u8],
        reg: &mut dyn SocketRegistry,
    ) {
        let Ok(ip) = Ipv4Packet::new_checked(payload) else {
            self.out.counters.malformed += 1;
            return;
        };
        if ip.version() != 4 {
            self.out.counters.malformed += 1;
            return;
        }
        if !ip.verify_checksum() {
            self.out.counters.bad_checksum += 1;
            return;
        }
        if ip.more_frags() || ip.frag_offset() != 0 {
            self.out.counters.unsupported += 1;
            return;
        }
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if src == self.cfg.guest && mac.is_unicast() {
            self.out.guest_mac = Some(mac);
        }
        let header = &payload[..usize::from(ip.header_len())];
        let l4 = ip.payload();
        match ip.next_header() {
            IpProtocol::Tcp => self.on_tcp(hdr, src, dst, l4, reg),
            IpProtocol::Udp => self.on_udp(hdr, src, dst, header, l4, reg),
            IpProtocol::Icmp => self.on_icmp(src, dst, l4, reg),
            _ => self.out.counters.unsupported += 1,
        }
    }

    /// Where a guest flow to `dst` goes on the host, or why it may not.
    fn host_target(&self, dst: SocketAddrV4) -> Result<SocketAddrV4, u8> {
        let ip = *dst.ip();
        if ip == self.cfg.gateway {
            let allowed = match &self.cfg.host_loopback {
                HostLoopback::All => true,
                HostLoopback::None => false,
                HostLoopback::Ports(ports) => ports.contains(&dst.port()),
            };
            return if allowed {
                Ok(SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port()))
            } else {
                Err(UNREACH_ADMIN)
            };
        }
        if ip == self.cfg.dns {
            return match (dst.port(), self.cfg.resolvers.first()) {
                (53, Some(resolver)) => Ok(*resolver),
                _ => Err(UNREACH_PORT),
            };
        }
        if self.cfg.in_network(ip)
            || ip.is_broadcast()
            || ip.is_multicast()
            || ip.is_unspecified()
            || ip.is_loopback()
        {
            return Err(UNREACH_PORT);
        }
        match self.cfg.outbound {
            Outbound::Any => Ok(dst),
            Outbound::HostOnly => Err(UNREACH_ADMIN),
        }
    }

    fn verify_l4(
        &mut self,
        hdr: &NetHdr,
        proto: IpProtocol,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        l4: &[u8],
    ) -> bool {
        if hdr.checksum_trusted() {
            return true;
        }
        let pseudo = checksum::pseudo_header_v4(&src, &dst, proto, l4.len() as u32);
        if checksum::combine(&[pseudo, checksum::data(l4)]) == 0xffff {
            return true;
        }
        self.out.counters.bad_checksum += 1;
        false
    }

    // ---- TCP -------------------------------------------------------------

    fn on_tcp(
        &mut self,
        hdr: &NetHdr,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        l4: &[u8],
        reg: &mut dyn SocketRegistry,
    ) {
        let Ok(packet) = TcpPacket::new_checked(l4) else {
            self.out.counters.malformed += 1;
            return;
        };
        if packet.src_port() == 0 || packet.dst_port() == 0 {
            self.out.counters.malformed += 1;
            return;
        }
        if !self.verify_l4(hdr, IpProtocol::Tcp, src, dst, l4) {
            return;
        }
        let mut mss = None;
        let mut window_scale = None;
        let mut options = packet.options();
        while !options.is_empty() {
            let Ok((rest, option)) = TcpOption::parse(options) else {
                self.out.counters.malformed += 1;
                return;
            };
            match option {
                TcpOption::EndOfList => break,
                TcpOption::MaxSegmentSize(v) => mss = Some(v),
                TcpOption::WindowScale(v) => window_scale = Some(v),
                _ => {}
            }
            options = rest;
        }
        let seg = Seg {
            src: SocketAddrV4::new(src, packet.src_port()),
            dst: SocketAddrV4::new(dst, packet.dst_port()),
            seq: packet.seq_number().0 as u32,
            ack: packet.ack().then(|| packet.ack_number().0 as u32),
            syn: packet.syn(),
            fin: packet.fin(),
            rst: packet.rst(),
            window: packet.window_len(),
            mss,
            window_scale,
            payload: packet.payload(),
        };
        if seg.syn && (seg.fin || seg.rst) {
            self.out.counters.malformed += 1;
            return;
        }
        let now = Instant::now();
        let key = (seg.src, seg.dst);
        if let Some(&slot) = self.tcp_map.get(&key) {
            let Some(Flow::Tcp(flow)) = &mut self.flows[slot] else {
                unreachable!("tcp map points at a tcp flow");
            };
            if flow.is_time_wait() && seg.syn && seg.ack.is_none() {
                // The guest reuses the port: the old flow is done.
                self.remove(slot, reg);
            } else {
                let verdict = flow.on_segment(&seg, &mut self.out, &self.cfg, now);
                self.ack_due.push(slot);
                if verdict == Verdict::Close {
                    self.remove(slot, reg);
                }
                return;
            }
        }
        if seg.syn && seg.ack.is_none() && !seg.rst {
            self.open_tcp(&seg, reg, now);
        } else {
            tcp::reset_stray(&mut self.out, &seg);
        }
    }

    fn open_tcp(&mut self, syn: &Seg<'_>, reg: &mut dyn SocketRegistry, now: Instant) {
        let refuse = |out: &mut Output| tcp::refuse(out, syn.dst, syn.src, syn.seq.wrapping_add(1));
        let target = match self.host_target(syn.dst) {
            Ok(t) => t,
            Err(_) => {
                self.out.counters.dropped_from_guest += 1;
                refuse(&mut self.out);
                return;
            }
        };
        if !self.make_room(reg) {
            self.out.counters.dropped_from_guest += 1;
            refuse(&mut self.out);
            return;
        }
        let stream = match connect_nonblocking(target) {
            Ok(s) => s,
            Err(err) => {
                log::debug!(
                    "nat: tcp {} -> {}: connect {target}: {err}",
                    syn.src,
                    syn.dst
                );
                refuse(&mut self.out);
                return;
            }
        };
        let iss = self.iss();
        let flow = TcpFlow::outbound(stream, syn, target.into(), iss, &self.cfg, now);
        let fd = flow.stream.as_raw_fd();
        let slot = self.insert(Flow::Tcp(flow));
        if let Err(err) = reg.add(fd, TOKEN_NAT | slot as u32) {
            log::warn!("nat: cannot watch a host socket: {err}");
            self.remove_unregistered(slot);
            refuse(&mut self.out);
            return;
        }
        self.tcp_map.insert((syn.src, syn.dst), slot);
        log::debug!("nat: open tcp {} -> {} via {target}", syn.src, syn.dst);
    }

    // ---- UDP -------------------------------------------------------------

    fn on_udp(
        &mut self,
        hdr: &NetHdr,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ip_header: &[u8],
        l4: &[u8],
        reg: &mut dyn SocketRegistry,
    ) {
        let Ok(packet) = UdpPacket::new_checked(l4) else {
            self.out.counters.malformed += 1;
            return;
        };
        let l4 = &l4[..usize::from(packet.len())];
        if packet.checksum() != 0 && !self.verify_l4(hdr, IpProtocol::Udp, src, dst, l4) {
            return;
        }
        let payload = packet.payload();
        if packet.dst_port() == DHCP_SERVER_PORT {
            dhcp::answer(&self.cfg, &mut self.out, payload);
            return;
        }
        if packet.src_port() == 0 || packet.dst_port() == 0 {
            self.out.counters.malformed += 1;
            return;
        }
        let guest = SocketAddrV4::new(src, packet.src_port());
        let remote = SocketAddrV4::new(dst, packet.dst_port());
        let mut quoted = [0u8; IPV4_LEN + UDP_LEN];
        quoted[..IPV4_LEN].copy_from_slice(&ip_header[..IPV4_LEN]);
        quoted[IPV4_LEN..].copy_from_slice(&l4[..UDP_LEN]);
        let now = Instant::now();
        let slot = match self.udp_map.get(&(guest, remote)) {
            Some(&slot) => slot,
            None => match self.open_udp(guest, remote, reg, now) {
                Ok(slot) => slot,
                Err(code) => {
                    self.out.counters.dropped_from_guest += 1;
                    udp::icmp_unreachable(&mut self.out, dst, src, code, &quoted);
                    return;
                }
            },
        };
        let Some(Flow::Udp(flow)) = &mut self.flows[slot] else {
            unreachable!("udp map points at a udp flow");
        };
        flow.last_header = quoted;
        let listener = flow.listener.and_then(|i| match &self.listeners[i].socket {
            ListenSocket::Udp(s) => Some(s),
            ListenSocket::Tcp(_) => None,
        });
        flow.send(payload, listener, &mut self.out, now);
    }

    fn open_udp(
        &mut self,
        guest: SocketAddrV4,
        remote: SocketAddrV4,
        reg: &mut dyn SocketRegistry,
        now: Instant,
    ) -> Result<usize, u8> {
        if remote.ip().is_broadcast() || remote.ip().is_multicast() {
            return Err(UNREACH_PORT);
        }
        let target = self.host_target(remote)?;
        if !self.make_room(reg) {
            return Err(UNREACH_PORT);
        }
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .and_then(|s| s.connect(target).map(|_| s))
            .and_then(|s| s.set_nonblocking(true).map(|_| s));
        let socket = match socket {
            Ok(s) => s,
            Err(err) => {
                log::debug!("nat: udp {guest} -> {remote}: {target}: {err}");
                return Err(UNREACH_PORT);
            }
        };
        let fd = socket.as_raw_fd();
        let flow = UdpFlow::new(Some(socket), None, guest, remote, target.into(), now);
        let slot = self.insert(Flow::Udp(flow));
        if reg.add(fd, TOKEN_NAT | slot as u32).is_err() {
            self.remove_unregistered(slot);
            return Err(UNREACH_PORT);
        }
        self.udp_map.insert((guest, remote), slot);
        log::debug!("nat: open udp {guest} -> {remote} via {target}");
        Ok(slot)
    }

    // ---- ICMP ------------------------------------------------------------

    fn on_icmp(&mut self, src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8], reg: &mut dyn SocketRegistry) {
        let Ok(packet) = Icmpv4Packet::new_checked(l4) else {
            self.out.counters.malformed += 1;
            return;
        };
        if !packet.verify_checksum() {
            self.out.counters.bad_checksum += 1;
            return;
        }
        if packet.msg_type() != Icmpv4Message::EchoRequest || packet.msg_code() != 0 {
            self.out.counters.unsupported += 1;
            return;
        }
        if dst == self.cfg.gateway || dst == self.cfg.dns {
            let mut reply = l4.to_vec();
            reply[0] = 0;
            self.out.icmp(dst, src, &reply);
            return;
        }
        if self.host_target(SocketAddrV4::new(dst, 0)).is_err() {
            self.out.counters.dropped_from_guest += 1;
            return;
        }
        let ident = packet.echo_ident();
        let now = Instant::now();
        let slot = match self.icmp_map.get(&(dst, ident)) {
            Some(&slot) => slot,
            None => match self.open_icmp(src, dst, ident, reg, now) {
                Some(slot) => slot,
                None => {
                    self.out.counters.dropped_from_guest += 1;
                    return;
                }
            },
        };
        let Some(Flow::Icmp(flow)) = &mut self.flows[slot] else {
            unreachable!("icmp map points at an icmp flow");
        };
        if let Err(err) = flow.send(l4, now) {
            log::debug!("nat: icmp {src} -> {dst}: {err}");
            self.out.counters.dropped_from_guest += 1;
        }
    }

    fn open_icmp(
        &mut self,
        guest: Ipv4Addr,
        remote: Ipv4Addr,
        ident: u16,
        reg: &mut dyn SocketRegistry,
        now: Instant,
    ) -> Option<usize> {
        if !self.make_room(reg) {
            return None;
        }
        let (socket, raw) = match icmp::open_socket() {
            Ok(s) => s,
            Err(err) => {
                if !self.icmp_unavailable_logged {
                    self.icmp_unavailable_logged = true;
                    log::warn!(
                        "nat: guest ping to {remote} dropped: ICMP sockets unavailable ({err}); \
                         allow them with sysctl net.ipv4.ping_group_range=\"0 2147483647\" or run as root"
                    );
                }
                return None;
            }
        };
        let fd = socket.as_raw_fd();
        let flow = IcmpFlow {
            socket,
            raw,
            guest,
            remote,
            ident,
            readable: false,
            created: now,
            last_active: now,
            bytes_from_guest: 0,
            bytes_to_guest: 0,
        };
        let slot = self.insert(Flow::Icmp(flow));
        if reg.add(fd, TOKEN_NAT | slot as u32).is_err() {
            self.remove_unregistered(slot);
            return None;
        }
        self.icmp_map.insert((remote, ident), slot);
        log::debug!(
            "nat: open icmp {guest} -> {remote} id {ident} ({})",
            if raw { "raw" } else { "ping socket" }
        );
        Some(slot)
    }

    // ---- Host events -----------------------------------------------------

    /// Readiness of a socket the NAT registered (see [`Nat::owns_token`]).
    pub fn handle_event(&mut self, token: u32, events: EventSet, reg: &mut dyn SocketRegistry) {
        if !Self::owns_token(token) {
            return;
        }
        let index = (token & TOKEN_INDEX) as usize;
        if token & TOKEN_LISTENER != 0 {
            if let Some(l) = self.listeners.get_mut(index) {
                l.readable = true;
                self.listener_ready(index, reg);
            }
            return;
        }
        let readable = events.intersects(
            EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
        );
        let writable = events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR);
        let now = Instant::now();
        let verdict = match self.flows.get_mut(index) {
            Some(Some(Flow::Tcp(f))) => {
                let v = f.on_host_event(readable, writable, &mut self.out, &self.cfg, now);
                self.ack_due.push(index);
                v
            }
            Some(Some(Flow::Udp(f))) => {
                f.readable |= readable;
                f.read_host(&mut self.out, &mut self.scratch, now);
                Verdict::Keep
            }
            Some(Some(Flow::Icmp(f))) => {
                f.readable |= readable;
                f.read_host(&mut self.out, &mut self.scratch, now);
                Verdict::Keep
            }
            _ => Verdict::Keep,
        };
        if verdict == Verdict::Close {
            self.remove(index, reg);
        }
    }

    fn listener_ready(&mut self, index: usize, reg: &mut dyn SocketRegistry) {
        let now = Instant::now();
        loop {
            if !self.out.has_room() {
                self.out.starved = true;
                return;
            }
            let rule = self.listeners[index].rule;
            match &self.listeners[index].socket {
                ListenSocket::Tcp(listener) => match listener.accept() {
                    Ok((stream, peer)) => self.accept_tcp(index, stream, peer, reg, now),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        log::warn!("nat: forward {rule}: accept: {err}");
                        break;
                    }
                },
                ListenSocket::Udp(socket) => match socket.recv_from(&mut self.scratch) {
                    Ok((n, peer)) => self.forward_datagram(index, peer, n, reg, now),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => log::debug!("nat: forward {rule}: {err}"),
                },
            }
        }
        self.listeners[index].readable = false;
    }

    /// A gateway-side port no flow of the guest uses yet.
    fn forward_port(&mut self, guest: SocketAddrV4) -> Option<SocketAddrV4> {
        for _ in 0..FORWARD_PORT_COUNT {
            let port = FORWARD_PORT_BASE + self.next_forward_port;
            self.next_forward_port = (self.next_forward_port + 1) % FORWARD_PORT_COUNT;
            let remote = SocketAddrV4::new(self.cfg.gateway, port);
            if !self.tcp_map.contains_key(&(guest, remote))
                && !self.udp_map.contains_key(&(guest, remote))
            {
                return Some(remote);
            }
        }
        None
    }

    fn accept_tcp(
        &mut self,
        index: usize,
        stream: TcpStream,
        peer: SocketAddr,
        reg: &mut dyn SocketRegistry,
        now: Instant,
    ) {
        let rule = self.listeners[index].rule;
        if stream.set_nonblocking(true).is_err() || !self.make_room(reg) {
            self.out.counters.dropped_from_guest += 1;
            return;
        }
        let _ = stream.set_nodelay(true);
        let guest = SocketAddrV4::new(self.cfg.guest, rule.guest_port);
        let Some(remote) = self.forward_port(guest) else {
            self.out.counters.dropped_from_guest += 1;
            return;
        };
        let iss = self.iss();
        let flow = TcpFlow::forward(stream, (guest, remote), iss, &self.cfg, &mut self.out, now);
        let fd = flow.stream.as_raw_fd();
        let slot = self.insert(Flow::Tcp(flow));
        if reg.add(fd, TOKEN_NAT | slot as u32).is_err() {
            self.remove_unregistered(slot);
            return;
        }
        self.tcp_map.insert((guest, remote), slot);
        log::debug!("nat: open tcp forward {peer} -> {rule} as {remote} -> {guest}");
    }

    fn forward_datagram(
        &mut self,
        index: usize,
        peer: SocketAddr,
        len: usize,
        reg: &mut dyn SocketRegistry,
        now: Instant,
    ) {
        let slot = match self.udp_forward_map.get(&(index, peer)) {
            Some(&slot) => slot,
            None => {
                if !self.make_room(reg) {
                    self.out.counters.dropped_from_guest += 1;
                    return;
                }
                let rule = self.listeners[index].rule;
                let guest = SocketAddrV4::new(self.cfg.guest, rule.guest_port);
                let Some(remote) = self.forward_port(guest) else {
                    self.out.counters.dropped_from_guest += 1;
                    return;
                };
                let flow = UdpFlow::new(None, Some(index), guest, remote, peer, now);
                let slot = self.insert(Flow::Udp(flow));
                self.udp_map.insert((guest, remote), slot);
                self.udp_forward_map.insert((index, peer), slot);
                log::debug!("nat: open udp forward {peer} -> {rule} as {remote} -> {guest}");
                slot
            }
        };
        if let Some(Flow::Udp(flow)) = &mut self.flows[slot] {
            flow.last_active = now;
            flow.bytes_to_guest += len as u64;
            self.out.udp(flow.remote, flow.guest, &self.scratch[..len]);
        }
    }

    // ---- Timers and the table --------------------------------------------

    /// Runs timers: TCP retransmission and TIME-WAIT, UDP/ICMP idle expiry.
    pub fn tick(&mut self, reg: &mut dyn SocketRegistry) {
        let now = Instant::now();
        for slot in 0..self.flows.len() {
            let verdict = match &mut self.flows[slot] {
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
    fn iss(&mut self) -> u32 {
        self.next_iss = self.next_iss.wrapping_add(0x0100_0001);
        self.next_iss
    }

    fn insert(&mut self, flow: Flow) -> usize {
        self.live += 1;
        self.out.counters.flows_opened += 1;
        match self.free_slots.pop() {
            Some(slot) => {
                self.flows[slot] = Some(flow);
                slot
            }
            None => {
                self.flows.push(Some(flow));
                self.flows.len() - 1
            }
        }
    }

    /// Frees a slot whose socket never made it into the event loop.
    fn remove_unregistered(&mut self, slot: usize) {
        if self.flows[slot].take().is_some() {
            self.live -= 1;
            self.out.counters.flows_closed += 1;
            self.free_slots.push(slot);
        }
    }

    fn remove(&mut self, slot: usize, reg: &mut dyn SocketRegistry) {
        let Some(flow) = self.flows[slot].take() else {
            return;
        };
        if let Some(fd) = flow.fd() {
            let _ = reg.remove(fd, TOKEN_NAT | slot as u32);
        }
        let info = flow.info(Instant::now(), &self.listeners);
        match &flow {
            Flow::Tcp(f) => {
                self.tcp_map.remove(&(f.guest, f.remote));
            }
            Flow::Udp(f) => {
                self.udp_map.remove(&(f.guest, f.remote));
                if let Some(i) = f.listener {
                    self.udp_forward_map.remove(&(i, f.host_peer));
                }
            }
            Flow::Icmp(f) => {
                self.icmp_map.remove(&(f.remote, f.ident));
            }
        }
        log::debug!("nat: close {info}");
        self.live -= 1;
        self.out.counters.flows_closed += 1;
        self.free_slots.push(slot);
    }

    /// Makes room for one more flow: first every TCP flow in TIME-WAIT (one
    /// scan serves many new flows), else the flow idle longest. False if the
    /// table cannot hold any flow.
    fn make_room(&mut self, reg: &mut dyn SocketRegistry) -> bool {
        if self.live < self.cfg.max_flows {
            return true;
        }
        let lingering: Vec<usize> = self
            .flows
            .iter()
            .enumerate()
            .filter(|(_, f)| matches!(f, Some(Flow::Tcp(t)) if t.is_time_wait()))
            .map(|(i, _)| i)
            .collect();
        if !lingering.is_empty() {
            for slot in lingering {
                self.out.counters.flows_evicted += 1;
                self.remove(slot, reg);
            }
            return true;
        }
        let victim = self
            .flows
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|f| (i, f.last_active())))
            .min_by_key(|&(_, last)| last)
            .map(|(i, _)| i);
        let Some(slot) = victim else {
            return false;
        };
        if let Some(Flow::Tcp(f)) = &mut self.flows[slot] {
            f.send_reset(&mut self.out);
            f.abort_host();
        }
        self.out.counters.flows_evicted += 1;
        self.remove(slot, reg);
        true
    }
}

fn connect_nonblocking(target: SocketAddrV4) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&SocketAddr::from(target).into()) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(err) => return Err(err),
    }
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use smoltcp::wire::{ArpOperation, ArpRepr};

    use super::*;
    use crate::net::testkit::{Harness, GATEWAY_IP, GUEST_IP, GUEST_MAC};

    #[test]
    fn arp_answers_for_gateway_and_dns_only() {
        let mut h = Harness::new(NatConfig::default());
        for (target, answered) in [
            (GATEWAY_IP, true),
            (Ipv4Addr::new(10, 0, 2, 3), true),
            (Ipv4Addr::new(10, 0, 2, 77), false),
        ] {
            let frame = h.guest.arp_request(target);
            h.send(&frame);
            let frames = h.frames();
            if !answered {
                assert!(frames.is_empty());
                continue;
            }
            assert_eq!(frames.len(), 1);
            assert_eq!(frames[0].eth_dst, Some(GUEST_MAC));
            let Some(ArpRepr::EthernetIpv4 {
                operation,
                source_hardware_addr,
                source_protocol_addr,
                target_protocol_addr,
                ..
            }) = frames[0].arp
            else {
                panic!("not arp: {:?}", frames[0]);
            };
            assert_eq!(operation, ArpOperation::Reply);
            assert_eq!(source_hardware_addr, NatConfig::default().gateway_mac);
            assert_eq!(source_protocol_addr, target);
            assert_eq!(target_protocol_addr, GUEST_IP);
        }
    }

    fn echo(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let mut m = vec![8, 0, 0, 0];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(data);
        m
    }

    #[test]
    fn ping_gateway_is_answered_locally() {
        let mut h = Harness::new(NatConfig::default());
        let frame = h.guest.icmp(GUEST_IP, GATEWAY_IP, &echo(7, 1, b"abcdefgh"));
        h.send(&frame);
        let frames = h.frames();
        assert_eq!(frames.len(), 1);
        let r = &frames[0];
        assert_eq!((r.src, r.dst), (Some(GATEWAY_IP), Some(GUEST_IP)));
        assert_eq!(r.payload[0], 0, "echo reply");
        assert_eq!(&r.payload[4..], &echo(7, 1, b"abcdefgh")[4..]);
    }

    #[test]
    fn bad_checksums_and_truncations_are_counted() {
        let mut h = Harness::new(NatConfig::default());
        let good = h.guest.icmp(GUEST_IP, GATEWAY_IP, &echo(1, 1, b"x"));
        let mut bad_icmp = good.clone();
        let last = bad_icmp.len() - 1;
        bad_icmp[last] ^= 0xff;
        h.send(&bad_icmp);
        let mut bad_ip = good.clone();
        bad_ip[14 + 10] ^= 1;
        h.send(&bad_ip);
        h.send(&good[..20]);
        h.send(&good[..good.len() - 1]);
        let mut bad_ihl = good.clone();
        bad_ihl[14] = 0x43;
        h.send(&bad_ihl);
        assert!(h.frames().is_empty());
        let c = h.nat.counters();
        assert_eq!(c.bad_checksum, 2, "{c:?}");
        assert_eq!(c.malformed, 3, "{c:?}");
    }

    #[test]
    fn dns_relay_matches_answers_to_the_asking_flow() {
        let resolver = UdpSocket::bind("127.0.0.1:0").unwrap();
        resolver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let SocketAddr::V4(resolver_addr) = resolver.local_addr().unwrap() else {
            unreachable!()
        };
        let mut h = Harness::new(NatConfig {
            resolvers: vec![resolver_addr],
            ..NatConfig::default()
        });
        let dns = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 53);
        let a = SocketAddrV4::new(GUEST_IP, 40001);
        let b = SocketAddrV4::new(GUEST_IP, 40002);
        for (client, query) in [(a, &b"query-a"[..]), (b, b"query-b")] {
            let frame = h.guest.udp(client, dns, query);
            h.send(&frame);
        }
        let mut buf = [0u8; 64];
        for _ in 0..2 {
            let (n, peer) = resolver.recv_from(&mut buf).unwrap();
            let answer = [b"answer-", &buf[6..n]].concat();
            resolver.send_to(&answer, peer).unwrap();
        }
        let frames = h.poll_until(Duration::from_secs(5), |f| f.len() >= 2);
        assert_eq!(frames.len(), 2);
        for f in frames {
            assert_eq!(f.src, Some(*dns.ip()));
            assert_eq!(f.src_port, 53);
            let want = if f.dst_port == 40001 {
                &b"answer-a"[..]
            } else {
                b"answer-b"
            };
            assert_eq!(f.payload, want);
        }
    }

    #[test]
    fn no_resolver_means_port_unreachable() {
        let mut h = Harness::new(NatConfig::default());
        let frame = h.guest.udp(
            SocketAddrV4::new(GUEST_IP, 40001),
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 53),
            b"q",
        );
        h.send(&frame);
        let frames = h.frames();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].proto, Some(IpProtocol::Icmp));
        assert_eq!(&frames[0].payload[..2], &[3, UNREACH_PORT]);
        // The quoted header names the guest's datagram.
        assert_eq!(&frames[0].payload[8 + 12..8 + 16], &GUEST_IP.octets());
    }

    #[test]
    fn flow_table_is_bounded_and_evicts_the_oldest() {
        let mut h = Harness::new(NatConfig {
            max_flows: 3,
            ..NatConfig::default()
        });
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sink.local_addr().unwrap().port();
        for i in 0..5u16 {
            let frame = h.guest.udp(
                SocketAddrV4::new(GUEST_IP, 41000 + i),
                SocketAddrV4::new(GATEWAY_IP, port),
                b"x",
            );
            h.send(&frame);
        }
        let flows = h.nat.flows();
        assert_eq!(flows.len(), 3);
        let mut ports: Vec<u16> = flows.iter().map(|f| f.guest.port()).collect();
        ports.sort();
        assert_eq!(ports, [41002, 41003, 41004]);
        assert_eq!(h.nat.counters().flows_evicted, 2);
    }
}
