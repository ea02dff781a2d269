//! One TX chain read into a frame: the 12-byte header, then Ethernet bytes.

use vm_memory::Bytes;

use crate::devices::virtio::fault::DriverFault;
use crate::devices::virtio::queue::Chain;
use crate::net::{NetHdr, NET_HDR_LEN};
use crate::vmm::memory::GuestMemoryMmap;

/// Largest chain accepted: the header plus an Ethernet header plus the
/// largest IPv4 packet (a TSO segment), plus a VLAN tag's worth of slack.
pub(super) const MAX_CHAIN_BYTES: usize = NET_HDR_LEN + 14 + 4 + 65535;

/// What a TX chain held.
#[derive(Debug)]
pub(super) enum TxChain<'b> {
    Frame {
        hdr: NetHdr,
        frame: &'b [u8],
    },
    /// Not a frame; dropped and counted, the queue goes on.
    Malformed(&'static str),
}

impl<'b> TxChain<'b> {
    /// Reads `chain` into `buf`. An address outside guest memory is an
    /// error (the driver broke the queue: the device needs a reset);
    /// anything else wrong is [`TxChain::Malformed`].
    pub fn read(
        chain: Chain<'_>,
        mem: &GuestMemoryMmap,
        buf: &'b mut Vec<u8>,
    ) -> Result<TxChain<'b>, DriverFault> {
        buf.clear();
        for desc in chain {
            if desc.is_write_only() {
                return Ok(TxChain::Malformed("device-writable buffer in a TX chain"));
            }
            let len = desc.len() as usize;
            let start = buf.len();
            if len > MAX_CHAIN_BYTES - start {
                return Ok(TxChain::Malformed("chain longer than the largest frame"));
            }
            buf.resize(start + len, 0);
            mem.read_slice(&mut buf[start..], desc.addr())
                .map_err(|_| DriverFault::outside_memory(desc.addr(), len))?;
        }
        let Some(hdr) = NetHdr::parse(buf) else {
            return Ok(TxChain::Malformed(
                "chain shorter than the virtio-net header",
            ));
        };
        Ok(TxChain::Frame {
            hdr,
            frame: &buf[NET_HDR_LEN..],
        })
    }
}
