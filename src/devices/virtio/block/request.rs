//! Framing of a virtio-blk request (virtio 1.2, section 5.2.6): a 16-byte
//! header, data, and a status byte, laid out over the descriptor chain in
//! any way (virtio 1 drivers may split or merge the parts freely): the
//! device-readable bytes are the header then the driver's data, the
//! device-writable bytes are the device's data then the status byte.
//!
//! A chain this module rejects cannot be answered at all (no status byte,
//! buffers outside guest memory, a loop): the device then needs a reset.
//! Requests that are well framed but wrong (bad type, lengths, sectors)
//! are answered with a status by the worker.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::vmm::memory::GuestMemoryMmap;

/// Size of the request header: le32 type, le32 reserved, le64 sector.
pub const HEADER_LEN: u64 = 16;

/// One guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBuf {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A request as the chain frames it.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Device-readable bytes after the header (OUT data, discard segments).
    pub readable: Vec<GuestBuf>,
    /// Device-writable bytes before the status byte (IN data, the ID).
    pub writable: Vec<GuestBuf>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain cannot be served: the driver broke the queue.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor chain is empty or cut short (a loop, an index past the queue, a bad indirect table)")]
    Truncated,
    #[error("a device-readable descriptor follows a device-writable one")]
    Order,
    #[error("buffer at {addr:#x} of {len} bytes lies outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("request header is shorter than {HEADER_LEN} bytes")]
    ShortHeader,
}

/// Total length of a buffer list.
pub fn total_len(bufs: &[GuestBuf]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// Splits `bufs` at byte `at` of their concatenation.
fn split_at(bufs: &[GuestBuf], at: u64) -> (Vec<GuestBuf>, Vec<GuestBuf>) {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    let mut pos = 0u64;
    for b in bufs {
        let len = u64::from(b.len);
        if pos + len <= at {
            head.push(*b);
        } else if pos >= at {
            tail.push(*b);
        } else {
            let cut = (at - pos) as u32;
            head.push(GuestBuf {
                addr: b.addr,
                len: cut,
            });
            tail.push(GuestBuf {
                addr: b.addr.unchecked_add(u64::from(cut)),
                len: b.len - cut,
            });
        }
        pos += len;
    }
    (head, tail)
}

/// Reads the concatenation of `bufs` into `out` (which has their length).
pub fn read_bufs(
    mem: &GuestMemoryMmap,
    bufs: &[GuestBuf],
    out: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut pos = 0usize;
    for b in bufs {
        let len = (b.len as usize).min(out.len() - pos);
        mem.read_slice(&mut out[pos..pos + len], b.addr)?;
        pos += len;
    }
    Ok(())
}

/// Writes `data` over the concatenation of `bufs`, as far as both go;
/// returns the bytes written.
pub fn write_bufs(
    mem: &GuestMemoryMmap,
    bufs: &[GuestBuf],
    data: &[u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut pos = 0usize;
    for b in bufs {
        if pos == data.len() {
            break;
        }
        let len = (b.len as usize).min(data.len() - pos);
        mem.write_slice(&data[pos..pos + len], b.addr)?;
        pos += len;
    }
    Ok(pos)
}

/// Frames the request carried by `chain`.
pub fn parse(
    chain: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
) -> Result<Request, ChainError> {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut last_has_next = true;
    for desc in chain {
        last_has_next = desc.has_next();
        let buf = GuestBuf {
            addr: desc.addr(),
            len: desc.len(),
        };
        if !GuestMemoryBackend::check_range(mem, buf.addr, buf.len as usize) {
            return Err(ChainError::OutsideMemory {
                addr: buf.addr.0,
                len: buf.len,
            });
        }
        if desc.is_write_only() {
            writable.push(buf);
        } else if writable.is_empty() {
            readable.push(buf);
        } else {
            return Err(ChainError::Order);
        }
    }
    // The iterator stops silently on a loop (after as many descriptors as
    // the queue holds), on a next index past the queue and on an unreadable
    // descriptor or indirect table: the last one it gave still says "next".
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    readable.retain(|b| b.len > 0);
    writable.retain(|b| b.len > 0);
    let Some(last) = writable.last_mut() else {
        return Err(ChainError::NoStatus);
    };
    let status = last.addr.unchecked_add(u64::from(last.len) - 1);
    last.len -= 1;
    writable.retain(|b| b.len > 0);

    if total_len(&readable) < HEADER_LEN {
        return Err(ChainError::ShortHeader);
    }
    let (header_bufs, readable) = split_at(&readable, HEADER_LEN);
    let mut header = [0u8; HEADER_LEN as usize];
    // Checked against guest memory above, so this cannot fail; a failure
    // would still only reject the chain.
    read_bufs(mem, &header_bufs, &mut header).map_err(|_| ChainError::ShortHeader)?;
    Ok(Request {
        kind: u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")),
        sector: u64::from_le_bytes(header[8..16].try_into().expect("8 bytes")),
        readable,
        writable,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(addr: u64, len: u32) -> GuestBuf {
        GuestBuf {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn split_cuts_inside_a_buffer() {
        let bufs = [buf(0x1000, 10), buf(0x2000, 10)];
        let (h, t) = split_at(&bufs, 14);
        assert_eq!(h, vec![buf(0x1000, 10), buf(0x2000, 4)]);
        assert_eq!(t, vec![buf(0x2004, 6)]);
        let (h, t) = split_at(&bufs, 10);
        assert_eq!((h.len(), t.len()), (1, 1));
        let (h, t) = split_at(&bufs, 0);
        assert_eq!((h.len(), t), (0, bufs.to_vec()));
    }
}
