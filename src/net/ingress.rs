//! Ingress: frames from the guest, parsed layer by layer (Ethernet, ARP,
//! IPv4, TCP, UDP, ICMP) and handed to the flow they belong to, or opening
//! one where policy allows. Malformed or hostile frames are counted and
//! dropped; nothing a guest sends can do more than that.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Instant;

use smoltcp::wire::{
    checksum, ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    Icmpv4Message, Icmpv4Packet, IpProtocol, Ipv4Packet, TcpOption, TcpPacket, UdpPacket,
    DHCP_SERVER_PORT,
};

use super::dhcp;
use super::dns;
use super::egress::{connect_tcp, connect_udp, host_target};
use super::engine::{flow_token, Nat};
use super::flow_table::Flow;
use super::frame::NetHdr;
use super::icmp::{self, IcmpFlow};
use super::listeners::ListenSocket;
use super::output::{Output, IPV4_LEN, UDP_LEN};
use super::registry::SocketRegistry;
use super::tcp::{self, Seg, TcpFlow, Verdict};
use super::udp::{self, UdpFlow, UNREACH_PORT};

impl Nat {
    /// One Ethernet frame from the guest. Malformed or hostile frames are
    /// counted and dropped.
    pub fn handle_frame(&mut self, hdr: &NetHdr, frame: &[u8], reg: &mut dyn SocketRegistry) {
        self.out.counters.frames_from_guest += 1;
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            self.out.counters.malformed += 1;
            return;
        };
        self.frame_src = eth.src_addr();
        match eth.ethertype() {
            EthernetProtocol::Arp => self.on_arp(eth.payload()),
            // On a lab network the switch floods frames for MACs it has not
            // learned yet: IPv4 between two members is none of the NAT's.
            EthernetProtocol::Ipv4
                if eth.dst_addr() != self.cfg.gateway_mac && !eth.dst_addr().is_broadcast() =>
            {
                self.out.counters.not_for_gateway += 1;
            }
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
        if self.cfg.in_network(source_protocol_addr) {
            self.out.learn(source_protocol_addr, source_hardware_addr);
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
        if self.cfg.in_network(src) {
            self.out.learn(src, mac);
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
        if let Some(&slot) = self.table.tcp.get(&key) {
            let Some(Flow::Tcp(flow)) = self.table.get_mut(slot) else {
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

    /// Whether one more flow toward the host fits this second's allowance;
    /// one that does not is counted.
    fn admit_new_flow(&mut self, now: Instant) -> bool {
        let admitted = self.new_flows.admit_at(now).admitted().is_some();
        if !admitted {
            self.out.counters.rate_limited += 1;
            self.out.counters.dropped_from_guest += 1;
        }
        admitted
    }

    fn open_tcp(&mut self, syn: &Seg<'_>, reg: &mut dyn SocketRegistry, now: Instant) {
        let refuse = |out: &mut Output| tcp::refuse(out, syn.dst, syn.src, syn.seq.wrapping_add(1));
        let target = match host_target(&self.cfg, syn.dst) {
            Ok(t) => t,
            Err(_) => {
                self.out.counters.dropped_from_guest += 1;
                refuse(&mut self.out);
                return;
            }
        };
        if !self.admit_new_flow(now) {
            // Dropped, not refused: the guest's SYN retransmission slows
            // it down, as a scan should be.
            return;
        }
        if !self.make_room(reg) {
            self.out.counters.dropped_from_guest += 1;
            refuse(&mut self.out);
            return;
        }
        let stream = match connect_tcp(target) {
            Ok(s) => s,
            Err(err) => {
                self.note_host_socket_error(&err);
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
        let flow = TcpFlow::outbound(
            stream,
            syn,
            target.into(),
            iss,
            (&self.cfg, &self.budget),
            now,
        );
        let fd = flow.stream.as_raw_fd();
        let slot = self.table.insert(Flow::Tcp(flow), &mut self.out.counters);
        if let Err(err) = reg.add(fd, flow_token(slot)) {
            log::warn!("nat: cannot watch a host socket: {err}");
            self.table
                .discard_unregistered(slot, &mut self.out.counters);
            refuse(&mut self.out);
            return;
        }
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
            let sender = self.frame_src;
            dhcp::answer(&self.cfg, &mut self.leases, &mut self.out, sender, payload);
            return;
        }
        if dst == self.cfg.dns && packet.dst_port() == 53 && self.answer_dns(src, &packet) {
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
        let slot = match self.table.udp.get(&(guest, remote)) {
            Some(&slot) => slot,
            None => match self.open_udp(guest, remote, reg, now) {
                Ok(slot) => slot,
                Err(Some(code)) => {
                    self.out.counters.dropped_from_guest += 1;
                    udp::icmp_unreachable(&mut self.out, dst, src, code, &quoted);
                    return;
                }
                Err(None) => return,
            },
        };
        let Some(Flow::Udp(flow)) = self.table.get_mut(slot) else {
            unreachable!("udp map points at a udp flow");
        };
        flow.last_header = quoted;
        let listener = flow
            .listener
            .and_then(|i| self.listeners.get(i))
            .and_then(|l| match &l.socket {
                ListenSocket::Udp(s) => Some(s),
                ListenSocket::Tcp(_) => None,
            });
        flow.send(payload, listener, &mut self.out, now);
    }

    /// Answers a DNS query from the network's own names; false when it is
    /// for the relay.
    fn answer_dns(&mut self, src: Ipv4Addr, packet: &UdpPacket<&[u8]>) -> bool {
        let leases = &self.leases;
        let lookup = |name: &str| leases.address_of(name);
        let zone = dns::Zone {
            domain: self.cfg.domain.as_deref(),
            lookup: &lookup,
            closed: self.cfg.closed,
        };
        match dns::decide(packet.payload(), &zone) {
            dns::Decision::Relay => false,
            // Not a query we understand: the resolver's to judge, unless
            // nothing may leave.
            dns::Decision::Malformed => self.cfg.closed,
            dns::Decision::Reply(reply) => {
                let from = SocketAddrV4::new(self.cfg.dns, 53);
                self.out
                    .udp(from, SocketAddrV4::new(src, packet.src_port()), &reply);
                true
            }
        }
    }

    /// A flow for the guest's first datagram from `guest` to `remote`, or
    /// the ICMP unreachable code to answer with (None: dropped silently,
    /// over the new-flow rate).
    fn open_udp(
        &mut self,
        guest: SocketAddrV4,
        remote: SocketAddrV4,
        reg: &mut dyn SocketRegistry,
        now: Instant,
    ) -> Result<usize, Option<u8>> {
        if remote.ip().is_broadcast() || remote.ip().is_multicast() {
            return Err(Some(UNREACH_PORT));
        }
        let target = host_target(&self.cfg, remote).map_err(Some)?;
        if !self.admit_new_flow(now) {
            return Err(None);
        }
        if !self.make_room(reg) {
            return Err(Some(UNREACH_PORT));
        }
        let socket = match connect_udp(target) {
            Ok(s) => s,
            Err(err) => {
                self.note_host_socket_error(&err);
                log::debug!("nat: udp {guest} -> {remote}: {target}: {err}");
                return Err(Some(UNREACH_PORT));
            }
        };
        let fd = socket.as_raw_fd();
        let flow = UdpFlow::new(Some(socket), None, guest, remote, target.into(), now);
        let slot = self.table.insert(Flow::Udp(flow), &mut self.out.counters);
        if reg.add(fd, flow_token(slot)).is_err() {
            self.table
                .discard_unregistered(slot, &mut self.out.counters);
            return Err(Some(UNREACH_PORT));
        }
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
        if host_target(&self.cfg, SocketAddrV4::new(dst, 0)).is_err() {
            self.out.counters.dropped_from_guest += 1;
            return;
        }
        let ident = packet.echo_ident();
        let now = Instant::now();
        let slot = match self.table.icmp.get(&(src, dst, ident)) {
            Some(&slot) => slot,
            None => match self.open_icmp(src, dst, ident, reg, now) {
                Some(slot) => slot,
                None => {
                    self.out.counters.dropped_from_guest += 1;
                    return;
                }
            },
        };
        let Some(Flow::Icmp(flow)) = self.table.get_mut(slot) else {
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
            Err(err) if crate::fds::exhausted(&err) => {
                self.note_host_socket_error(&err);
                return None;
            }
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
        let slot = self.table.insert(Flow::Icmp(flow), &mut self.out.counters);
        if reg.add(fd, flow_token(slot)).is_err() {
            self.table
                .discard_unregistered(slot, &mut self.out.counters);
            return None;
        }
        log::debug!(
            "nat: open icmp {guest} -> {remote} id {ident} ({})",
            if raw { "raw" } else { "ping socket" }
        );
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, UdpSocket};
    use std::time::Duration;

    use super::*;
    use crate::net::testkit::{Harness, GATEWAY_IP, GUEST_IP, GUEST_MAC};
    use crate::net::NatConfig;

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
    fn new_flows_toward_the_host_are_rate_limited() {
        let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = host.local_addr().unwrap().port();
        let mut h = Harness::new(NatConfig {
            new_flows_per_sec: 5,
            ..NatConfig::default()
        });
        for i in 0..20u16 {
            let syn = h.guest.syn(
                SocketAddrV4::new(GUEST_IP, 42000 + i),
                SocketAddrV4::new(GATEWAY_IP, port),
            );
            h.send(&syn);
            let dns = h.guest.udp(
                SocketAddrV4::new(GUEST_IP, 43000 + i),
                SocketAddrV4::new(GATEWAY_IP, port),
                b"x",
            );
            h.send(&dns);
        }
        let c = h.nat.counters();
        assert_eq!(c.flows_opened, 5, "{c:?}");
        assert_eq!(c.rate_limited, 35, "{c:?}");
        assert!(h.frames().is_empty(), "dropped, not answered");
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
}
