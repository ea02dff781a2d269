//! Software offloads, for a peer that negotiated none (a QEMU guest on a
//! stream netdev, a TAP without vnet headers): a frame whose
//! `virtio_net_hdr` asks for work — a partial checksum (`F_NEEDS_CSUM`),
//! a 64 KiB TCP segment (`GSO_TCPV4`/`GSO_TCPV6`) — becomes the plain,
//! fully checksummed frames a real wire would have carried.
//!
//! A TSO segment is cut at its `gso_size` (the sender's MSS, already
//! fitted to its MTU), each piece with its own copy of the headers: IPv4
//! total length, identification (one more per piece, as the kernel's GSO
//! does) and header checksum; IPv6 payload length; TCP sequence number,
//! FIN and PSH on the last piece only, CWR on the first only, and a full
//! TCP checksum. IPv6 is carried without extension headers only.
//!
//! The guest chooses `gso_size`, so it is bounded before any piece is
//! built: below [`MIN_GSO_SIZE`] a 64 KiB frame would become tens of
//! thousands of frames (work the guest should not command), and a piece
//! larger than the peer's MTU is one no wire carries. Such frames, and
//! fragments, are refused whole. `hdr_len`, `csum_start` and
//! `csum_offset` are hints only: the layout is read from the frame.

use smoltcp::wire::{checksum, IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket};

use super::frame::{NetHdr, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPV6_HEADER: usize = 40;
const TCP_MIN_HEADER: usize = 20;

/// Smallest `gso_size` cut at: Linux's own floor for what TCP sends
/// (`tcp_min_snd_mss`, 48, its answer to peers forcing tiny segments,
/// CVE-2019-11479), and what a Linux sender uses at the smallest MSS a
/// Linux peer can ask for (`TCP_MAXSEG` 88 less timestamp and SACK
/// options). Each piece then carries at least as many bytes as the guest
/// could have sent itself in a frame of its own, so segmenting costs no
/// more than the guest sending those frames; at most 1,366 pieces a frame.
pub const MIN_GSO_SIZE: u16 = 48;

/// A frame the segmenter cannot turn into plain frames (it is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("frame too short for the headers it claims")]
    Truncated,
    #[error("partial checksum at {0} lies outside the frame")]
    ChecksumOutside(usize),
    #[error("GSO type {0} cannot be segmented (only TCP over IPv4 and IPv6)")]
    UnsupportedGso(u8),
    #[error("GSO frame is not TCP over IPv4 or IPv6 without extension headers")]
    NotTcp,
    #[error("GSO segment size {0} is below {MIN_GSO_SIZE} bytes")]
    SegmentSizeTooSmall(u16),
    #[error("GSO segments of {packet} bytes exceed the MTU of {mtu}")]
    OverMtu { packet: usize, mtu: u16 },
    #[error("GSO frame is an IPv4 fragment")]
    Fragment,
}

/// Where the layers of a TCP frame start.
struct TcpLayout {
    l3: usize,
    l4: usize,
    /// End of the TCP header: the payload starts here.
    payload: usize,
    /// End of the IP packet (Ethernet padding excluded).
    end: usize,
    ipv6: bool,
}

fn tcp_layout(frame: &[u8]) -> Result<TcpLayout, SegmentError> {
    let be16 = |at: usize| {
        frame
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(SegmentError::Truncated)
    };
    let (mut ethertype, mut l3) = (be16(12)?, 14);
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(16)?;
        l3 = 18;
    }
    let (l4, end, ipv6) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ip = Ipv4Packet::new_checked(frame.get(l3..).ok_or(SegmentError::Truncated)?)
                .map_err(|_| SegmentError::Truncated)?;
            if ip.version() != 4 || ip.next_header() != IpProtocol::Tcp {
                return Err(SegmentError::NotTcp);
            }
            if ip.more_frags() || ip.frag_offset() != 0 {
                return Err(SegmentError::Fragment);
            }
            let header = usize::from(ip.header_len());
            (l3 + header, l3 + usize::from(ip.total_len()), false)
        }
        ETHERTYPE_IPV6 => {
            let first = *frame.get(l3).ok_or(SegmentError::Truncated)?;
            let next = *frame.get(l3 + 6).ok_or(SegmentError::Truncated)?;
            if first >> 4 != 6 || next != u8::from(IpProtocol::Tcp) {
                return Err(SegmentError::NotTcp);
            }
            let payload_len = usize::from(be16(l3 + 4)?);
            (l3 + IPV6_HEADER, l3 + IPV6_HEADER + payload_len, true)
        }
        _ => return Err(SegmentError::NotTcp),
    };
    if end > frame.len() || l4 + TCP_MIN_HEADER > end {
        return Err(SegmentError::Truncated);
    }
    let tcp_header = usize::from(frame[l4 + 12] >> 4) * 4;
    if tcp_header < TCP_MIN_HEADER || l4 + tcp_header > end {
        return Err(SegmentError::Truncated);
    }
    Ok(TcpLayout {
        l3,
        l4,
        payload: l4 + tcp_header,
        end,
        ipv6,
    })
}

/// The TCP pseudo-header sum of the packet at `l3` for `l4_len` bytes.
fn pseudo_header(packet: &[u8], layout: &TcpLayout, l4_len: usize) -> u16 {
    let l3 = layout.l3;
    let proto_len = [
        0,
        u8::from(IpProtocol::Tcp),
        (l4_len >> 8) as u8,
        l4_len as u8,
    ];
    if layout.ipv6 {
        // Source and destination addresses: 32 bytes from offset 8.
        checksum::combine(&[
            checksum::data(&packet[l3 + 8..l3 + IPV6_HEADER]),
            checksum::data(&proto_len),
        ])
    } else {
        let address = |at: usize| {
            let octets: [u8; 4] = packet[at..at + 4].try_into().expect("4 bytes");
            Ipv4Address::from(octets)
        };
        let (src, dst) = (address(l3 + 12), address(l3 + 16));
        checksum::pseudo_header_v4(&src, &dst, IpProtocol::Tcp, l4_len as u32)
    }
}

/// Turns frames with offload metadata into plain ones for a peer with
/// MTU `mtu`; keeps one buffer for the pieces it builds.
pub struct Segmenter {
    buf: Vec<u8>,
    mtu: u16,
}

impl Segmenter {
    pub fn new(mtu: u16) -> Segmenter {
        Segmenter {
            buf: Vec::new(),
            mtu,
        }
    }

    /// Hands `each` the plain frames that carry what `frame` (with its
    /// offload metadata `hdr`) carries, and returns how many there were.
    /// A frame that needs nothing is passed on as it is.
    pub fn segment(
        &mut self,
        hdr: &NetHdr,
        frame: &[u8],
        mut each: impl FnMut(&[u8]),
    ) -> Result<usize, SegmentError> {
        match hdr.gso_kind() {
            GSO_NONE if hdr.flags & F_NEEDS_CSUM == 0 => {
                each(frame);
                Ok(1)
            }
            GSO_NONE => {
                self.finish_checksum(hdr, frame)?;
                each(&self.buf);
                Ok(1)
            }
            GSO_TCPV4 | GSO_TCPV6 => self.split_tcp(hdr, frame, each),
            other => Err(SegmentError::UnsupportedGso(other)),
        }
    }

    /// Completes a partial checksum (the field holds the pseudo-header
    /// sum; the rest is summed from `csum_start` to the end).
    fn finish_checksum(&mut self, hdr: &NetHdr, frame: &[u8]) -> Result<(), SegmentError> {
        let start = usize::from(hdr.csum_start);
        let at = start + usize::from(hdr.csum_offset);
        if at + 2 > frame.len() {
            return Err(SegmentError::ChecksumOutside(at));
        }
        self.buf.clear();
        self.buf.extend_from_slice(frame);
        let mut sum = !checksum::data(&self.buf[start..]);
        if sum == 0 {
            // 0 means "no checksum" to UDP; 0xffff is the same sum.
            sum = 0xffff;
        }
        self.buf[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        Ok(())
    }

    fn split_tcp(
        &mut self,
        hdr: &NetHdr,
        frame: &[u8],
        mut each: impl FnMut(&[u8]),
    ) -> Result<usize, SegmentError> {
        if hdr.gso_size < MIN_GSO_SIZE {
            return Err(SegmentError::SegmentSizeTooSmall(hdr.gso_size));
        }
        let layout = tcp_layout(frame)?;
        let mss = usize::from(hdr.gso_size);
        let headers = &frame[..layout.payload];
        let payload = &frame[layout.payload..layout.end];
        let packet = layout.payload - layout.l3 + mss.min(payload.len());
        if packet > usize::from(self.mtu) {
            return Err(SegmentError::OverMtu {
                packet,
                mtu: self.mtu,
            });
        }
        let (seq, fin, psh) = {
            let tcp = TcpPacket::new_unchecked(&frame[layout.l4..]);
            (tcp.seq_number(), tcp.fin(), tcp.psh())
        };
        let ident = (!layout.ipv6).then(|| Ipv4Packet::new_unchecked(&frame[layout.l3..]).ident());
        let pieces = payload.len().div_ceil(mss).max(1);
        for i in 0..pieces {
            let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
            let last = i + 1 == pieces;
            self.buf.clear();
            self.buf.extend_from_slice(headers);
            self.buf.extend_from_slice(chunk);
            let l4_len = self.buf.len() - layout.l4;
            if let Some(ident) = ident {
                let mut ip = Ipv4Packet::new_unchecked(&mut self.buf[layout.l3..]);
                ip.set_total_len((layout.l4 - layout.l3 + l4_len) as u16);
                ip.set_ident(ident.wrapping_add(i as u16));
                ip.fill_checksum();
            } else {
                let at = layout.l3 + 4;
                self.buf[at..at + 2].copy_from_slice(&(l4_len as u16).to_be_bytes());
            }
            let pseudo = pseudo_header(&self.buf, &layout, l4_len);
            let mut tcp = TcpPacket::new_unchecked(&mut self.buf[layout.l4..]);
            tcp.set_seq_number(seq + i * mss);
            tcp.set_fin(fin && last);
            tcp.set_psh(psh && last);
            if i > 0 {
                tcp.set_cwr(false);
            }
            tcp.set_checksum(0);
            let sum = !checksum::combine(&[pseudo, checksum::data(&self.buf[layout.l4..])]);
            self.buf[layout.l4 + 16..layout.l4 + 18].copy_from_slice(&sum.to_be_bytes());
            each(&self.buf);
        }
        Ok(pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame::GSO_ECN;
    use smoltcp::wire::{EthernetFrame, IpAddress, TcpSeqNumber};

    const SRC: [u8; 4] = [192, 168, 100, 100];
    const DST: [u8; 4] = [192, 168, 100, 101];

    /// An Ethernet/IPv4/TCP frame carrying `payload` as a TSO sender
    /// writes it: lengths for the whole, pseudo-header sum only.
    fn tso_frame_v4(payload: &[u8], fin: bool) -> Vec<u8> {
        let l4 = 14 + 20;
        let mut f = vec![0u8; l4 + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f.extend_from_slice(payload);
        {
            let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
            ip.set_version(4);
            ip.set_header_len(20);
            ip.set_total_len((40 + payload.len()) as u16);
            ip.set_ident(0xfffe);
            ip.set_dont_frag(true);
            ip.set_hop_limit(64);
            ip.set_next_header(IpProtocol::Tcp);
            ip.set_src_addr(Ipv4Address::from(SRC));
            ip.set_dst_addr(Ipv4Address::from(DST));
            ip.fill_checksum();
        }
        let mut tcp = TcpPacket::new_unchecked(&mut f[l4..]);
        tcp.set_src_port(40000);
        tcp.set_dst_port(5001);
        tcp.set_seq_number(TcpSeqNumber(-10));
        tcp.set_header_len(20);
        tcp.set_ack(true);
        tcp.set_psh(true);
        tcp.set_cwr(true);
        tcp.set_fin(fin);
        tcp.set_window_len(1000);
        let pseudo = checksum::pseudo_header_v4(
            &Ipv4Address::from(SRC),
            &Ipv4Address::from(DST),
            IpProtocol::Tcp,
            (20 + payload.len()) as u32,
        );
        tcp.set_checksum(pseudo);
        f
    }

    fn gso(kind: u8, mss: u16) -> NetHdr {
        NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: kind,
            hdr_len: 54,
            gso_size: mss,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_64k_tso_segment_becomes_mss_sized_frames_with_valid_checksums() {
        let payload = pattern(65_000);
        let frame = tso_frame_v4(&payload, true);
        let mut got = Vec::new();
        let mut pieces = Vec::new();
        let n = Segmenter::new(1500)
            .segment(&gso(GSO_TCPV4, 1448), &frame, |f| pieces.push(f.to_vec()))
            .unwrap();
        assert_eq!(n, 65_000usize.div_ceil(1448));
        assert_eq!(pieces.len(), n);
        let (src, dst) = (
            IpAddress::Ipv4(Ipv4Address::from(SRC)),
            IpAddress::Ipv4(Ipv4Address::from(DST)),
        );
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == n;
            assert!(piece.len() <= 14 + 1500, "fits the MTU: {}", piece.len());
            let eth = EthernetFrame::new_checked(&piece[..]).unwrap();
            let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
            assert!(ip.verify_checksum(), "IP checksum of piece {i}");
            assert_eq!(ip.ident(), 0xfffeu16.wrapping_add(i as u16));
            assert_eq!(usize::from(ip.total_len()), eth.payload().len());
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            assert!(tcp.verify_checksum(&src, &dst), "TCP checksum of piece {i}");
            assert_eq!(tcp.seq_number(), TcpSeqNumber(-10) + i * 1448);
            assert_eq!((tcp.fin(), tcp.psh()), (last, last), "piece {i}");
            assert_eq!(tcp.cwr(), i == 0, "piece {i}");
            assert!(tcp.ack() && tcp.window_len() == 1000);
            got.extend_from_slice(tcp.payload());
        }
        assert_eq!(got, payload, "data intact, in order");
    }

    #[test]
    fn ipv6_segments_get_their_payload_length_and_checksum() {
        let payload = pattern(3000);
        let mut f = vec![0u8; 14 + 40 + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f[14] = 0x60;
        f[14 + 4..14 + 6].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        f[14 + 6] = 6;
        f[14 + 7] = 64;
        for (i, b) in f[14 + 8..14 + 40].iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        f[54 + 12] = 5 << 4;
        f.extend_from_slice(&payload);
        let mut pieces = Vec::new();
        Segmenter::new(1500)
            .segment(&gso(GSO_TCPV6, 1000), &f, |p| pieces.push(p.to_vec()))
            .unwrap();
        assert_eq!(pieces.len(), 3);
        for p in &pieces {
            assert_eq!(
                usize::from(u16::from_be_bytes([p[18], p[19]])),
                p.len() - 54
            );
            let l4_len = p.len() - 54;
            let pseudo = checksum::combine(&[
                checksum::data(&p[22..54]),
                checksum::data(&[0, 6, (l4_len >> 8) as u8, l4_len as u8]),
            ]);
            let total = checksum::combine(&[pseudo, checksum::data(&p[54..])]);
            assert_eq!(total, 0xffff, "the sum over a valid segment is all ones");
        }
    }

    #[test]
    fn partial_checksums_are_finished_and_plain_frames_pass_as_they_are() {
        let payload = pattern(999);
        let frame = tso_frame_v4(&payload, false);
        let hdr = NetHdr {
            gso_type: GSO_NONE,
            ..gso(GSO_NONE, 0)
        };
        let mut out = Vec::new();
        let mut s = Segmenter::new(1500);
        assert_eq!(s.segment(&hdr, &frame, |f| out.push(f.to_vec())), Ok(1));
        let ip = Ipv4Packet::new_checked(&out[0][14..]).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let (src, dst) = (
            IpAddress::Ipv4(ip.src_addr()),
            IpAddress::Ipv4(ip.dst_addr()),
        );
        assert!(tcp.verify_checksum(&src, &dst));
        assert_eq!(&out[0][..34], &frame[..34], "only the checksum changes");

        let mut passed = Vec::new();
        s.segment(&NetHdr::default(), &frame, |f| passed.push(f.to_vec()))
            .unwrap();
        assert_eq!(passed, [frame]);
    }

    /// A guest may ask for any segment size: 1 would turn one 64 KiB
    /// frame into 65,000 (and 3.5 MB of headers), work it must not command.
    #[test]
    fn a_hostile_segment_size_is_refused_before_any_piece_is_built() {
        let frame = tso_frame_v4(&pattern(65_000), false);
        let mut s = Segmenter::new(1500);
        for mss in [1, 2, 47] {
            let mut count = 0;
            assert_eq!(
                s.segment(&gso(GSO_TCPV4, mss), &frame, |_| count += 1),
                Err(SegmentError::SegmentSizeTooSmall(mss))
            );
            assert_eq!(count, 0, "gso_size {mss}: nothing built");
        }
        let mut count = 0;
        assert_eq!(
            s.segment(&gso(GSO_TCPV4, MIN_GSO_SIZE), &frame, |_| count += 1),
            Ok(65_000usize.div_ceil(48)),
            "the floor itself is cut"
        );
        // Pieces larger than the peer's MTU: refused, not sent oversized.
        assert_eq!(
            s.segment(&gso(GSO_TCPV4, 1461), &frame, |_| count += 1),
            Err(SegmentError::OverMtu {
                packet: 1501,
                mtu: 1500
            })
        );
        assert_eq!(s.segment(&gso(GSO_TCPV4, 1460), &frame, |_| {}), Ok(45));
        // A GSO frame smaller than one segment is one piece, checked by
        // its real size.
        let small = tso_frame_v4(&pattern(100), false);
        assert_eq!(s.segment(&gso(GSO_TCPV4, 9000), &small, |_| {}), Ok(1));
        // IPv4 fragments are not cut: their "TCP header" may be payload.
        let mut fragment = frame.clone();
        fragment[14 + 6] |= 0x20;
        assert_eq!(
            s.segment(&gso(GSO_TCPV4, 1448), &fragment, |_| {}),
            Err(SegmentError::Fragment)
        );
    }

    /// `hdr_len`, `csum_start` and `csum_offset` lie freely: the layout
    /// comes from the frame, so the pieces are the same.
    #[test]
    fn lying_header_lengths_change_nothing() {
        let frame = tso_frame_v4(&pattern(5000), true);
        let mut s = Segmenter::new(1500);
        let mut honest = Vec::new();
        s.segment(&gso(GSO_TCPV4, 1448), &frame, |p| honest.push(p.to_vec()))
            .unwrap();
        for (hdr_len, csum_start, csum_offset) in [(0, 0, 0), (65535, 65535, 65535), (20, 3, 1)] {
            let hdr = NetHdr {
                hdr_len,
                csum_start,
                csum_offset,
                ..gso(GSO_TCPV4 | GSO_ECN, 1448)
            };
            let mut got = Vec::new();
            s.segment(&hdr, &frame, |p| got.push(p.to_vec())).unwrap();
            assert_eq!(got, honest, "hdr_len {hdr_len}");
        }
    }

    /// Any header values over a valid frame and mangled copies of it: no
    /// panic, and what comes out is bounded and fits the MTU.
    #[test]
    fn any_header_values_are_bounded_and_never_panic() {
        let base = tso_frame_v4(&pattern(3000), false);
        let mut s = Segmenter::new(1500);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let r = next();
            let mut hdr = NetHdr::parse(&r.to_le_bytes().repeat(2)).unwrap();
            hdr.gso_type = [
                GSO_NONE,
                GSO_TCPV4,
                GSO_TCPV6,
                GSO_TCPV4 | GSO_ECN,
                3,
                hdr.gso_type,
            ][(r >> 60) as usize % 6];
            if r & (1 << 59) != 0 {
                hdr.gso_size %= 1600;
            }
            let mut frame = base.clone();
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % frame.len();
                frame[at] = next() as u8;
            }
            frame.truncate((next() as usize) % (frame.len() + 1));
            let mut pieces = 0;
            let mut largest = 0;
            if let Ok(n) = s.segment(&hdr, &frame, |p| {
                pieces += 1;
                largest = largest.max(p.len());
            }) {
                assert_eq!(n, pieces);
                assert!(n <= 65_535usize.div_ceil(usize::from(MIN_GSO_SIZE)));
                if hdr.gso_kind() != GSO_NONE {
                    assert!(largest <= 18 + 1500, "{hdr:?}: {largest}");
                }
            }
        }
    }

    #[test]
    fn malformed_offload_requests_are_errors_not_panics() {
        let frame = tso_frame_v4(&pattern(100), false);
        let mut s = Segmenter::new(1500);
        let mut count = 0;
        let bad_csum = NetHdr {
            csum_start: 100,
            csum_offset: 200,
            ..gso(GSO_NONE, 0)
        };
        assert_eq!(
            s.segment(&bad_csum, &frame, |_| count += 1),
            Err(SegmentError::ChecksumOutside(300))
        );
        assert_eq!(
            s.segment(&gso(GSO_TCPV4, 0), &frame, |_| count += 1),
            Err(SegmentError::SegmentSizeTooSmall(0))
        );
        assert_eq!(
            s.segment(&gso(3, 1448), &frame, |_| count += 1),
            Err(SegmentError::UnsupportedGso(3))
        );
        for cut in [0, 13, 20, 40, 60] {
            assert!(s
                .segment(&gso(GSO_TCPV4, 1448), &frame[..cut], |_| count += 1)
                .is_err());
        }
        let mut lying = frame.clone();
        lying[14 + 2..14 + 4].copy_from_slice(&9000u16.to_be_bytes());
        assert_eq!(
            s.segment(&gso(GSO_TCPV4, 1448), &lying, |_| count += 1),
            Err(SegmentError::Truncated)
        );
        let mut udp = frame.clone();
        udp[14 + 9] = 17;
        assert_eq!(
            s.segment(&gso(GSO_TCPV4, 1448), &udp, |_| count += 1),
            Err(SegmentError::NotTcp)
        );
        assert_eq!(count, 0, "nothing half-sent");
    }
}
