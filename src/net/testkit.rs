//! A scripted guest for unit tests: builds frames as a guest would send them
//! and parses what the engine sends back, checking every checksum.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use smoltcp::wire::{
    checksum, ArpOperation, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress,
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpOption, TcpPacket, UdpPacket,
};

use super::config::{NatConfig, Outbound};
use super::engine::Nat;
use super::frame::{GuestFrame, NetHdr, F_NEEDS_CSUM};
use super::listeners::ForwardListeners;
use super::output::{Output, SynOptions, TcpFlags, TcpSegment};
use super::registry::EpollRegistry;

pub const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// A frame the engine sent, decoded.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub eth_dst: Option<EthernetAddress>,
    pub src: Option<Ipv4Addr>,
    pub dst: Option<Ipv4Addr>,
    pub proto: Option<IpProtocol>,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub ack_flag: bool,
    pub window: u16,
    pub mss: Option<u16>,
    pub window_scale: Option<u8>,
    pub payload: Vec<u8>,
    pub arp: Option<ArpRepr>,
    pub gso_size: u16,
}

/// Decodes an engine frame; panics on a bad checksum or length.
pub fn parse(frame: &GuestFrame) -> Seen {
    let eth = EthernetFrame::new_checked(&frame.data[..]).expect("ethernet");
    let mut seen = Seen {
        eth_dst: Some(eth.dst_addr()),
        gso_size: frame.hdr.gso_size,
        ..Seen::default()
    };
    if eth.ethertype() == EthernetProtocol::Arp {
        let p = smoltcp::wire::ArpPacket::new_checked(eth.payload()).expect("arp");
        seen.arp = Some(ArpRepr::parse(&p).expect("arp repr"));
        return seen;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
    assert!(ip.verify_checksum(), "ipv4 checksum");
    seen.src = Some(ip.src_addr());
    seen.dst = Some(ip.dst_addr());
    seen.proto = Some(ip.next_header());
    let l4 = ip.payload();
    let l4_sum = |proto| {
        let pseudo =
            checksum::pseudo_header_v4(&ip.src_addr(), &ip.dst_addr(), proto, l4.len() as u32);
        if frame.hdr.flags & F_NEEDS_CSUM != 0 {
            // Only the pseudo header sum is there; finish it here.
            let mut copy = l4.to_vec();
            let at = usize::from(frame.hdr.csum_offset);
            let partial = u16::from_be_bytes([copy[at], copy[at + 1]]);
            assert_eq!(partial, pseudo, "partial checksum is the pseudo header");
            copy[at] = 0;
            copy[at + 1] = 0;
            checksum::combine(&[pseudo, checksum::data(&copy)]) != 0
        } else {
            checksum::combine(&[pseudo, checksum::data(l4)]) == 0xffff
        }
    };
    match ip.next_header() {
        IpProtocol::Tcp => {
            assert!(l4_sum(IpProtocol::Tcp), "tcp checksum");
            let t = TcpPacket::new_checked(l4).expect("tcp");
            seen.src_port = t.src_port();
            seen.dst_port = t.dst_port();
            seen.seq = t.seq_number().0 as u32;
            seen.ack = t.ack_number().0 as u32;
            seen.syn = t.syn();
            seen.fin = t.fin();
            seen.rst = t.rst();
            seen.ack_flag = t.ack();
            seen.window = t.window_len();
            let mut opts = t.options();
            while !opts.is_empty() {
                let (rest, opt) = TcpOption::parse(opts).expect("tcp options");
                match opt {
                    TcpOption::MaxSegmentSize(m) => seen.mss = Some(m),
                    TcpOption::WindowScale(w) => seen.window_scale = Some(w),
                    TcpOption::EndOfList => break,
                    _ => {}
                }
                opts = rest;
            }
            seen.payload = t.payload().to_vec();
        }
        IpProtocol::Udp => {
            let u = UdpPacket::new_checked(l4).expect("udp");
            assert!(u.checksum() == 0 || l4_sum(IpProtocol::Udp), "udp checksum");
            seen.src_port = u.src_port();
            seen.dst_port = u.dst_port();
            seen.payload = u.payload().to_vec();
        }
        IpProtocol::Icmp => {
            assert_eq!(checksum::data(l4), 0xffff, "icmp checksum");
            seen.payload = l4.to_vec();
        }
        _ => {}
    }
    seen
}

/// A DNS query (id 0x1234, recursion desired) for `name`, type `qtype`.
pub fn dns_query(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// A DHCP message from `mac`, as a client sends it.
pub fn dhcp_request(
    mac: EthernetAddress,
    kind: DhcpMessageType,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
) -> Vec<u8> {
    let repr = DhcpRepr {
        message_type: kind,
        transaction_id: 0x1234_5678,
        secs: 0,
        client_hardware_address: mac,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: false,
        requested_ip: requested,
        client_identifier: Some(mac),
        server_identifier: server,
        parameter_request_list: Some(&[1, 3, 6, 12, 15, 26, 51]),
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut DhcpPacket::new_unchecked(&mut buf)).unwrap();
    buf
}

/// Builds guest frames by running the engine's own builders with the roles
/// swapped (full checksums, no offloads).
pub struct GuestSide {
    out: Output,
}

impl GuestSide {
    pub fn new() -> Self {
        Self::with_mac(GUEST_MAC, NatConfig::default().gateway_mac)
    }

    /// A guest at `mac` whose gateway and DNS are at `gateway_mac`.
    pub fn with_mac(mac: EthernetAddress, gateway_mac: EthernetAddress) -> Self {
        let mut out = Output::new(mac);
        for ip in [GATEWAY_IP, Ipv4Addr::new(10, 0, 2, 3)] {
            out.learn(ip, gateway_mac);
        }
        GuestSide { out }
    }

    /// Frames to `ip` go to `mac` (the gateway of another network).
    pub fn route(&mut self, ip: Ipv4Addr, mac: EthernetAddress) {
        self.out.learn(ip, mac);
    }

    fn one(&mut self) -> Vec<u8> {
        let mut frames = self.out.take_all();
        assert_eq!(frames.len(), 1);
        frames.pop().unwrap().data
    }

    #[allow(clippy::too_many_arguments)]
    pub fn tcp(
        &mut self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        seq: u32,
        ack: Option<u32>,
        flags: TcpFlags,
        window: u16,
        syn: Option<SynOptions>,
        payload: &[u8],
    ) -> Vec<u8> {
        self.out.tcp(&TcpSegment {
            src,
            dst,
            seq,
            ack: ack.unwrap_or(0),
            flags: TcpFlags {
                ack: ack.is_some(),
                ..flags
            },
            window,
            syn_options: syn,
            payload: (payload, &[]),
            mss: 1460,
        });
        self.one()
    }

    /// A bare SYN (no options) from `src` to `dst`.
    pub fn syn(&mut self, src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
        self.tcp(src, dst, 1, None, TcpFlags::SYN, 1000, None, &[])
    }

    pub fn udp(&mut self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
        self.out.udp(src, dst, payload);
        self.one()
    }

    pub fn icmp(&mut self, src: Ipv4Addr, dst: Ipv4Addr, msg: &[u8]) -> Vec<u8> {
        self.out.icmp(src, dst, msg);
        self.one()
    }

    pub fn arp_request(&mut self, target: Ipv4Addr) -> Vec<u8> {
        let repr = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: GUEST_MAC,
            source_protocol_addr: GUEST_IP,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        self.out.arp(&repr, EthernetAddress::BROADCAST);
        self.one()
    }
}

/// An engine with a private epoll set, host-only egress.
pub struct Harness {
    pub nat: Nat,
    pub reg: EpollRegistry,
    pub guest: GuestSide,
}

impl Harness {
    pub fn new(cfg: NatConfig) -> Self {
        let leases = super::leases::Leases::single(cfg.guest);
        Self::with_leases(cfg, leases)
    }

    /// An engine for a subnet of guests.
    pub fn with_leases(cfg: NatConfig, leases: super::leases::Leases) -> Self {
        let mut reg = EpollRegistry::new().unwrap();
        let mut nat = Nat::with_leases(
            NatConfig {
                outbound: Outbound::HostOnly,
                ..cfg
            },
            ForwardListeners::default(),
            leases,
        );
        nat.start(&mut reg).unwrap();
        Harness {
            nat,
            reg,
            guest: GuestSide::new(),
        }
    }

    pub fn send(&mut self, frame: &[u8]) {
        self.nat
            .handle_frame(&NetHdr::default(), frame, &mut self.reg);
    }

    /// Frames the engine has for the guest right now.
    pub fn frames(&mut self) -> Vec<Seen> {
        self.nat
            .take_frames(&mut self.reg)
            .iter()
            .map(parse)
            .collect()
    }

    /// Polls host sockets (and timers) until `want` frames arrived or
    /// `limit` passed.
    pub fn poll_until(&mut self, limit: Duration, want: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let start = Instant::now();
        let mut seen = self.frames();
        while !want(&seen) && start.elapsed() < limit {
            for (token, events) in self.reg.wait(Duration::from_millis(10)).unwrap() {
                self.nat.handle_event(token, events, &mut self.reg);
            }
            self.nat.tick(&mut self.reg);
            seen.extend(self.frames());
        }
        seen
    }
}
