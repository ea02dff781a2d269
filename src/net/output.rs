//! Frames on their way to the guest: a bounded queue, a pool of buffers, and
//! the builders that lay out Ethernet/IPv4/TCP/UDP/ICMP headers.
//!
//! The queue is the engine's backpressure point: bulk producers (host socket
//! reads) stop when it is past its high mark, and control frames beyond its
//! hard cap are dropped and counted.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    checksum, ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    IpProtocol, Ipv4Packet, TcpPacket, TcpSeqNumber, UdpPacket,
};

use super::counters::Counters;
use super::frame::{GuestFrame, NetHdr, Offloads, F_NEEDS_CSUM, GSO_TCPV4};
use super::port::GuestPort;

pub(crate) const ETH_LEN: usize = 14;
pub(crate) const IPV4_LEN: usize = 20;
pub(crate) const TCP_LEN: usize = 20;
pub(crate) const UDP_LEN: usize = 8;
/// Largest IPv4 packet: bounds GSO segments.
pub(crate) const MAX_IP_PACKET: usize = 65535;

/// Past this many queued frames, bulk producers wait.
const HIGH_MARK: usize = 256;
/// Control frames beyond this are dropped.
const HARD_CAP: usize = 1024;
/// Buffers kept for reuse.
const POOL_MAX: usize = 64;
/// Most guest addresses remembered (a /16 of members is far fewer).
const MAX_NEIGHBORS: usize = 4096;

/// TCP control bits for [`Output::tcp`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
    pub psh: bool,
}

impl TcpFlags {
    const NONE: TcpFlags = TcpFlags {
        syn: false,
        ack: false,
        fin: false,
        rst: false,
        psh: false,
    };
    pub const ACK: TcpFlags = TcpFlags {
        ack: true,
        ..TcpFlags::NONE
    };
    pub const SYN: TcpFlags = TcpFlags {
        syn: true,
        ..TcpFlags::NONE
    };
    pub const SYN_ACK: TcpFlags = TcpFlags {
        syn: true,
        ..TcpFlags::ACK
    };
    pub const FIN_ACK: TcpFlags = TcpFlags {
        fin: true,
        ..TcpFlags::ACK
    };
    pub const RST: TcpFlags = TcpFlags {
        rst: true,
        ..TcpFlags::NONE
    };
    pub const RST_ACK: TcpFlags = TcpFlags {
        rst: true,
        ..TcpFlags::ACK
    };
}

/// Options the engine puts in a SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SynOptions {
    pub mss: u16,
    pub window_scale: Option<u8>,
}

/// One TCP segment toward the guest.
pub(crate) struct TcpSegment<'a> {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    pub window: u16,
    pub syn_options: Option<SynOptions>,
    /// Payload in up to two pieces (a ring buffer may wrap).
    pub payload: (&'a [u8], &'a [u8]),
    /// Segment size the guest asked for; larger payloads go out as GSO.
    pub mss: u16,
}

pub(crate) struct Output {
    queue: VecDeque<GuestFrame>,
    pool: Vec<Vec<u8>>,
    pub gateway_mac: EthernetAddress,
    /// Guests' MACs by address, learned from their frames and leases;
    /// frames for an address not in it go to broadcast.
    pub neighbors: HashMap<Ipv4Addr, EthernetAddress>,
    pub offloads: Offloads,
    /// A bulk producer stopped for lack of room; resume it after a flush.
    pub starved: bool,
    /// A flow stopped for lack of buffer budget; resume flows once memory
    /// comes back.
    pub budget_starved: bool,
    ident: u16,
    pub counters: Counters,
}

impl Output {
    pub fn new(gateway_mac: EthernetAddress) -> Self {
        Output {
            queue: VecDeque::new(),
            pool: Vec::new(),
            gateway_mac,
            neighbors: HashMap::new(),
            offloads: Offloads::default(),
            starved: false,
            budget_starved: false,
            ident: 1,
            counters: Counters::default(),
        }
    }

    /// True while bulk producers may add frames.
    pub fn has_room(&self) -> bool {
        self.queue.len() < HIGH_MARK
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Hands queued frames to the port until it is empty or busy.
    pub fn flush(&mut self, port: &mut dyn GuestPort) {
        while let Some(frame) = self.queue.front() {
            if port.send(frame).is_err() {
                return;
            }
            let frame = self.queue.pop_front().expect("front exists");
            self.counters.frames_to_guest += 1;
            if self.pool.len() < POOL_MAX {
                self.pool.push(frame.data);
            }
        }
    }

    /// Drains queued frames without a port (tests, fuzzing).
    pub fn take_all(&mut self) -> Vec<GuestFrame> {
        self.counters.frames_to_guest += self.queue.len() as u64;
        self.queue.drain(..).collect()
    }

    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        buf
    }

    fn push(&mut self, hdr: NetHdr, data: Vec<u8>) {
        if self.queue.len() >= HARD_CAP {
            self.counters.dropped_to_guest += 1;
            return;
        }
        self.queue.push_back(GuestFrame { hdr, data });
    }

    /// The MAC of guest address `ip`, if known.
    pub fn neighbor(&self, ip: Ipv4Addr) -> Option<EthernetAddress> {
        self.neighbors.get(&ip).copied()
    }

    /// Remembers that guest address `ip` is at `mac` (bounded: a guest
    /// making up addresses cannot grow it without end).
    pub fn learn(&mut self, ip: Ipv4Addr, mac: EthernetAddress) {
        if !mac.is_unicast() {
            return;
        }
        if self.neighbors.len() >= MAX_NEIGHBORS && !self.neighbors.contains_key(&ip) {
            self.neighbors.clear();
        }
        self.neighbors.insert(ip, mac);
    }

    fn dst_mac(&self, ip: Ipv4Addr) -> EthernetAddress {
        self.neighbor(ip).unwrap_or(EthernetAddress::BROADCAST)
    }

    fn ethernet(&self, buf: &mut [u8], dst: EthernetAddress, ethertype: EthernetProtocol) {
        let mut eth = EthernetFrame::new_unchecked(buf);
        eth.set_dst_addr(dst);
        eth.set_src_addr(self.gateway_mac);
        eth.set_ethertype(ethertype);
    }

    /// Writes an IPv4 header at `buf[ETH_LEN..]` for `payload_len` bytes.
    fn ipv4(
        &mut self,
        buf: &mut [u8],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: IpProtocol,
        payload_len: usize,
    ) {
        self.ident = self.ident.wrapping_add(1);
        let mut ip = Ipv4Packet::new_unchecked(&mut buf[ETH_LEN..ETH_LEN + IPV4_LEN]);
        ip.set_version(4);
        ip.set_header_len(IPV4_LEN as u8);
        ip.set_dscp(0);
        ip.set_ecn(0);
        ip.set_total_len((IPV4_LEN + payload_len) as u16);
        ip.set_ident(self.ident);
        ip.clear_flags();
        ip.set_dont_frag(true);
        ip.set_frag_offset(0);
        ip.set_hop_limit(64);
        ip.set_next_header(proto);
        ip.set_src_addr(src);
        ip.set_dst_addr(dst);
        ip.fill_checksum();
    }

    /// Queues a TCP segment; payloads beyond `mss` go out as one GSO frame
    /// (the caller only makes them when the guest took TSO).
    pub fn tcp(&mut self, seg: &TcpSegment<'_>) {
        let opt_len = match seg.syn_options {
            Some(SynOptions {
                window_scale: Some(_),
                ..
            }) => 8,
            Some(_) => 4,
            None => 0,
        };
        let tcp_len = TCP_LEN + opt_len;
        let payload_len = seg.payload.0.len() + seg.payload.1.len();
        let l4_len = tcp_len + payload_len;
        let headers = ETH_LEN + IPV4_LEN + tcp_len;
        // Only the headers are zeroed; the payload is copied in once.
        let mut buf = self.buffer(headers);
        buf.reserve(payload_len);
        buf.extend_from_slice(seg.payload.0);
        buf.extend_from_slice(seg.payload.1);
        let dst_mac = self.dst_mac(*seg.dst.ip());
        self.ethernet(&mut buf, dst_mac, EthernetProtocol::Ipv4);
        self.ipv4(
            &mut buf,
            *seg.src.ip(),
            *seg.dst.ip(),
            IpProtocol::Tcp,
            l4_len,
        );
        let l4 = ETH_LEN + IPV4_LEN;
        {
            let mut tcp = TcpPacket::new_unchecked(&mut buf[l4..]);
            tcp.set_src_port(seg.src.port());
            tcp.set_dst_port(seg.dst.port());
            tcp.set_seq_number(TcpSeqNumber(seg.seq as i32));
            tcp.set_ack_number(TcpSeqNumber(seg.ack as i32));
            tcp.set_header_len(tcp_len as u8);
            tcp.clear_flags();
            tcp.set_syn(seg.flags.syn);
            tcp.set_ack(seg.flags.ack);
            tcp.set_fin(seg.flags.fin);
            tcp.set_rst(seg.flags.rst);
            tcp.set_psh(seg.flags.psh);
            tcp.set_window_len(seg.window);
            tcp.set_urgent_at(0);
            tcp.set_checksum(0);
            if let Some(opts) = seg.syn_options {
                let o = tcp.options_mut();
                o[0] = 2;
                o[1] = 4;
                o[2..4].copy_from_slice(&opts.mss.to_be_bytes());
                if let Some(ws) = opts.window_scale {
                    o[4..8].copy_from_slice(&[1, 3, 3, ws]);
                }
            }
        }

        let mut hdr = NetHdr::default();
        let pseudo =
            checksum::pseudo_header_v4(seg.src.ip(), seg.dst.ip(), IpProtocol::Tcp, l4_len as u32);
        if self.offloads.csum {
            // The guest side finishes the sum: only the pseudo header here.
            hdr.flags = F_NEEDS_CSUM;
            hdr.csum_start = l4 as u16;
            hdr.csum_offset = 16;
            buf[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
            if payload_len > seg.mss as usize && self.offloads.tso4 {
                hdr.gso_type = GSO_TCPV4;
                hdr.gso_size = seg.mss;
                hdr.hdr_len = (l4 + tcp_len) as u16;
            }
        } else {
            let sum = !checksum::combine(&[pseudo, checksum::data(&buf[l4..])]);
            buf[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
        }
        self.push(hdr, buf);
    }

    /// Queues a UDP datagram with a full checksum.
    pub fn udp(&mut self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
        self.udp_to(self.dst_mac(*dst.ip()), src, dst, payload);
    }

    /// [`Output::udp`] to an explicit MAC (DHCP answers a client by its chaddr).
    pub fn udp_to(
        &mut self,
        mac: EthernetAddress,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
    ) {
        let l4_len = UDP_LEN + payload.len();
        if IPV4_LEN + l4_len > MAX_IP_PACKET {
            self.counters.dropped_to_guest += 1;
            return;
        }
        let mut buf = self.buffer(ETH_LEN + IPV4_LEN + l4_len);
        self.ethernet(&mut buf, mac, EthernetProtocol::Ipv4);
        self.ipv4(&mut buf, *src.ip(), *dst.ip(), IpProtocol::Udp, l4_len);
        let l4 = ETH_LEN + IPV4_LEN;
        let mut udp = UdpPacket::new_unchecked(&mut buf[l4..]);
        udp.set_src_port(src.port());
        udp.set_dst_port(dst.port());
        udp.set_len(l4_len as u16);
        udp.set_checksum(0);
        udp.payload_mut().copy_from_slice(payload);
        let pseudo = checksum::pseudo_header_v4(src.ip(), dst.ip(), IpProtocol::Udp, l4_len as u32);
        let mut sum = !checksum::combine(&[pseudo, checksum::data(&buf[l4..])]);
        if sum == 0 {
            sum = 0xffff;
        }
        buf[l4 + 6..l4 + 8].copy_from_slice(&sum.to_be_bytes());
        self.push(NetHdr::default(), buf);
    }

    /// Queues an ICMP message (`icmp` is header and body; its checksum is
    /// filled here).
    pub fn icmp(&mut self, src: Ipv4Addr, dst: Ipv4Addr, icmp: &[u8]) {
        if icmp.len() < 8 || IPV4_LEN + icmp.len() > MAX_IP_PACKET {
            self.counters.dropped_to_guest += 1;
            return;
        }
        let mut buf = self.buffer(ETH_LEN + IPV4_LEN + icmp.len());
        let dst_mac = self.dst_mac(dst);
        self.ethernet(&mut buf, dst_mac, EthernetProtocol::Ipv4);
        self.ipv4(&mut buf, src, dst, IpProtocol::Icmp, icmp.len());
        let l4 = ETH_LEN + IPV4_LEN;
        buf[l4..].copy_from_slice(icmp);
        buf[l4 + 2] = 0;
        buf[l4 + 3] = 0;
        let sum = !checksum::data(&buf[l4..]);
        buf[l4 + 2..l4 + 4].copy_from_slice(&sum.to_be_bytes());
        self.push(NetHdr::default(), buf);
    }

    /// Queues an ARP packet.
    pub fn arp(&mut self, repr: &ArpRepr, dst: EthernetAddress) {
        let mut buf = self.buffer(ETH_LEN + repr.buffer_len());
        self.ethernet(&mut buf, dst, EthernetProtocol::Arp);
        repr.emit(&mut ArpPacket::new_unchecked(&mut buf[ETH_LEN..]));
        self.push(NetHdr::default(), buf);
    }

    /// Asks who has `target` (the guest, before we know its MAC).
    pub fn arp_request(&mut self, sender: Ipv4Addr, target: Ipv4Addr) {
        let repr = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: self.gateway_mac,
            source_protocol_addr: sender,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        self.arp(&repr, EthernetAddress::BROADCAST);
    }
}
