//! The wire format of a switch port: whole Ethernet frames over a Unix
//! stream socket.
//!
//! ```text
//!   +----------------+----------------------------+--------------------------+
//!   | length: u32 BE | virtio_net_hdr_v1 (12 B)   | Ethernet frame           |
//!   +----------------+----------------------------+--------------------------+
//!                    \______________ length bytes ___________________________/
//! ```
//!
//! Every message is a 4-byte big-endian length, then that many bytes. That
//! is QEMU's `-netdev stream` (and `-netdev socket`) framing, so a QEMU
//! guest can be a port too ([`Framing::Plain`]: the bytes are the Ethernet
//! frame alone). Between vmlab members ([`Framing::VnetHdr`]) the bytes
//! start with the 12-byte `virtio_net_hdr_v1` (flags, gso_type, hdr_len,
//! gso_size, csum_start, csum_offset, num_buffers; little-endian, as virtio
//! defines it) that the sending guest's driver wrote, so checksum offload
//! and TSO survive the switch: a 64 KiB TCP segment crosses it as one
//! message, with its checksum still to be finished by whoever finally
//! needs it (`F_NEEDS_CSUM`). `num_buffers` is meaningless on the wire and
//! sent as 0.
//!
//! A length below the smallest Ethernet header (plus the vnet header) or
//! above [`MAX_MESSAGE`] is a protocol error: the port is closed.

use std::io::{self, Read, Write};

use crate::net::{NetHdr, NET_HDR_LEN};

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Largest Ethernet frame carried: a 64 KiB IPv4 packet (a TSO segment)
/// behind an Ethernet header and a VLAN tag.
pub const MAX_FRAME: usize = 14 + 4 + 65535;
/// Largest message: the vnet header and the largest frame.
pub const MAX_MESSAGE: usize = NET_HDR_LEN + MAX_FRAME;
const MIN_FRAME: usize = 14;

/// What a message holds besides the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// vmlab members: the virtio-net header, then the frame.
    VnetHdr,
    /// QEMU's stream netdev: the frame alone (no offloads).
    Plain,
}

impl Framing {
    fn header_len(self) -> usize {
        match self {
            Framing::VnetHdr => NET_HDR_LEN,
            Framing::Plain => 0,
        }
    }
}

/// The stream broke the format.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message of {0} bytes (a frame is 14 to {MAX_FRAME} bytes)")]
    BadLength(usize),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Incoming messages: reads in large chunks, hands out whole frames.
pub struct FrameReader {
    framing: Framing,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// How much is read per system call: several 64 KiB frames.
const READ_CHUNK: usize = 256 * 1024;

impl FrameReader {
    pub fn new(framing: Framing) -> Self {
        FrameReader {
            framing,
            buf: vec![0; READ_CHUNK + LEN_PREFIX + MAX_MESSAGE],
            start: 0,
            end: 0,
        }
    }

    /// Reads what `source` has (once); Ok(false) at end of stream.
    /// `WouldBlock` passes through.
    pub fn fill(&mut self, source: &mut impl Read) -> io::Result<bool> {
        if self.start > 0 && self.buf.len() - self.end < READ_CHUNK {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let room = self.buf.len() - self.end;
        if room == 0 {
            return Ok(true);
        }
        let n = source.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n > 0)
    }

    /// True when a whole message may be waiting without another read.
    pub fn has_buffered(&self) -> bool {
        self.end > self.start
    }

    /// The next whole frame buffered, with its header (all zero for
    /// [`Framing::Plain`]); None until more is read.
    pub fn next_frame(&mut self) -> Option<Result<(NetHdr, &[u8]), WireError>> {
        let avail = self.end - self.start;
        if avail < LEN_PREFIX {
            return None;
        }
        let at = self.start;
        let len = u32::from_be_bytes(self.buf[at..at + LEN_PREFIX].try_into().ok()?) as usize;
        let header = self.framing.header_len();
        if len < header + MIN_FRAME || len > header + MAX_FRAME {
            return Some(Err(WireError::BadLength(len)));
        }
        if avail < LEN_PREFIX + len {
            return None;
        }
        self.start += LEN_PREFIX + len;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let body = &self.buf[at + LEN_PREFIX..at + LEN_PREFIX + len];
        let hdr = match self.framing {
            Framing::VnetHdr => NetHdr::parse(body).unwrap_or_default(),
            Framing::Plain => NetHdr::default(),
        };
        Some(Ok((hdr, &body[header..])))
    }
}

/// Outgoing messages: encoded into one buffer, written in large pieces;
/// bounded, so a peer that does not read cannot make it grow.
pub struct FrameWriter {
    framing: Framing,
    buf: Vec<u8>,
    sent: usize,
    limit: usize,
}

/// The peer cannot take more now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl FrameWriter {
    /// A writer holding at most `limit` bytes not yet written.
    pub fn new(framing: Framing, limit: usize) -> Self {
        FrameWriter {
            framing,
            buf: Vec::new(),
            sent: 0,
            limit: limit.max(LEN_PREFIX + MAX_MESSAGE),
        }
    }

    pub fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Past half its limit: a producer that can wait should.
    pub fn is_filling(&self) -> bool {
        self.pending() > self.limit / 2
    }

    /// Whether a frame of any size may be queued now.
    pub fn has_room(&self) -> bool {
        self.pending() + LEN_PREFIX + self.framing.header_len() + MAX_FRAME <= self.limit
    }

    /// Queues one frame; `Full` when it would pass the limit.
    pub fn push(&mut self, hdr: &NetHdr, frame: &[u8]) -> Result<(), Full> {
        let header = self.framing.header_len();
        let len = header + frame.len();
        if self.pending() + LEN_PREFIX + len > self.limit {
            return Err(Full);
        }
        if self.sent > 0 && self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        }
        self.buf.extend_from_slice(&(len as u32).to_be_bytes());
        if header > 0 {
            self.buf.extend_from_slice(&hdr.to_bytes());
        }
        self.buf.extend_from_slice(frame);
        Ok(())
    }

    /// Writes what is queued until done (Ok(true)) or the peer is full
    /// (Ok(false)).
    pub fn flush(&mut self, sink: &mut impl Write) -> io::Result<bool> {
        while self.sent < self.buf.len() {
            match sink.write(&self.buf[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.compact();
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        self.sent = 0;
        Ok(true)
    }

    fn compact(&mut self) {
        if self.sent > self.limit / 2 {
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{F_NEEDS_CSUM, GSO_TCPV4};

    fn frame(n: usize, fill: u8) -> Vec<u8> {
        vec![fill; n]
    }

    #[test]
    fn frames_and_headers_cross_in_any_chunking() {
        let hdr = NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut w = FrameWriter::new(Framing::VnetHdr, 1 << 20);
        let sizes = [60, 65000, 14, 1514];
        for (i, &n) in sizes.iter().enumerate() {
            w.push(&hdr, &frame(n, i as u8)).unwrap();
        }
        let mut bytes = Vec::new();
        assert!(w.flush(&mut bytes).unwrap());
        assert_eq!(&bytes[..4], &(12u32 + 60).to_be_bytes(), "length first");
        // Fed back one odd-sized piece at a time.
        let mut r = FrameReader::new(Framing::VnetHdr);
        let mut got = Vec::new();
        for piece in bytes.chunks(777) {
            r.fill(&mut &piece[..]).unwrap();
            while let Some(next) = r.next_frame() {
                let (h, f) = next.unwrap();
                assert_eq!(h, hdr);
                got.push((f.len(), f[0]));
            }
        }
        let want: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (n, i as u8))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn plain_framing_is_qemus() {
        let mut w = FrameWriter::new(Framing::Plain, 1 << 20);
        w.push(&NetHdr::default(), &frame(60, 7)).unwrap();
        let mut bytes = Vec::new();
        w.flush(&mut bytes).unwrap();
        assert_eq!(bytes.len(), 64);
        assert_eq!(&bytes[..4], &[0, 0, 0, 60]);
    }

    #[test]
    fn bad_lengths_are_errors_and_the_writer_is_bounded() {
        let mut r = FrameReader::new(Framing::VnetHdr);
        r.fill(&mut &[0u8, 2, 0, 0][..]).unwrap();
        assert!(matches!(
            r.next_frame(),
            Some(Err(WireError::BadLength(131072)))
        ));
        let mut r = FrameReader::new(Framing::VnetHdr);
        r.fill(&mut &[0u8, 0, 0, 5, 1, 2, 3, 4, 5][..]).unwrap();
        assert!(matches!(r.next_frame(), Some(Err(WireError::BadLength(5)))));
        let mut w = FrameWriter::new(Framing::VnetHdr, 0);
        w.push(&NetHdr::default(), &frame(MAX_FRAME, 0)).unwrap();
        assert_eq!(w.push(&NetHdr::default(), &frame(60, 0)), Err(Full));
    }
}
