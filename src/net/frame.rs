//! Ethernet frames as they cross the guest boundary, with the offload
//! metadata of a `virtio_net_hdr` (v1, 12 bytes).
//!
//! Both guest transports speak this header natively: a TAP device opened with
//! `IFF_VNET_HDR` and a virtio-net queue. Carrying it lets the NAT exchange
//! 64 KiB TSO segments with partial checksums instead of 1500-byte frames,
//! which is what makes it fast at MTU 1500.

/// Length of the header in bytes (`virtio_net_hdr_v1`, with `num_buffers`).
pub const NET_HDR_LEN: usize = 12;

/// `flags`: the checksum at `csum_start + csum_offset` holds only the
/// pseudo-header sum; whoever transmits must finish it.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has already been validated.
pub const F_DATA_VALID: u8 = 2;

/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

/// Offload metadata carried beside a frame, with `virtio_net_hdr` meaning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl NetHdr {
    /// Reads the header from the first [`NET_HDR_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Option<NetHdr> {
        let b = bytes.get(..NET_HDR_LEN)?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// The header as bytes (`num_buffers` = 0: the device fills it if needed).
    pub fn to_bytes(&self) -> [u8; NET_HDR_LEN] {
        let mut b = [0u8; NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// True when the transport vouches for the L4 checksum (or will compute it).
    pub fn checksum_trusted(&self) -> bool {
        self.flags & (F_NEEDS_CSUM | F_DATA_VALID) != 0
    }

    /// GSO kind without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }
}

/// What the guest side can take from the NAT beyond plain frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Frames may carry a partial checksum (`F_NEEDS_CSUM`).
    pub csum: bool,
    /// Frames may be TCPv4 GSO segments up to 64 KiB (implies `csum`).
    pub tso4: bool,
}

/// A frame travelling to the guest: metadata plus the Ethernet bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestFrame {
    pub hdr: NetHdr,
    pub data: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let hdr = NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1460,
            csum_start: 34,
            csum_offset: 16,
        };
        let bytes = hdr.to_bytes();
        assert_eq!(bytes[4..6], 1460u16.to_le_bytes());
        assert_eq!(NetHdr::parse(&bytes), Some(hdr));
        assert!(hdr.checksum_trusted());
        assert_eq!(NetHdr::parse(&bytes[..11]), None);
    }
}
