//! One end of a port's Unix stream socket: frames in and out in the
//! [`wire`](super::wire) format, non-blocking, with bounded buffers. Both
//! the network process (its side of each member) and a VM member (its side
//! of its network) use it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::wire::{FrameReader, FrameWriter, Framing, Full, WireError};
use crate::net::NetHdr;

/// Where reading stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadState {
    /// Nothing more to read now (the socket said `WouldBlock`).
    Drained,
    /// The consumer asked to stop, or the read allowance ran out: there
    /// may be more (edge-triggered: the caller must come back unasked).
    More,
    /// The peer closed its end.
    Closed,
}

pub struct StreamPort {
    stream: UnixStream,
    reader: FrameReader,
    writer: FrameWriter,
}

impl StreamPort {
    /// Wraps a connected stream (made non-blocking) that holds at most
    /// `out_limit` bytes waiting to be written.
    pub fn new(stream: UnixStream, framing: Framing, out_limit: usize) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(StreamPort {
            stream,
            reader: FrameReader::new(framing),
            writer: FrameWriter::new(framing, out_limit),
        })
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Hands whole frames to `each` (which returns false to stop after
    /// the one it got), reading at most `max_reads` times.
    pub fn receive(
        &mut self,
        mut each: impl FnMut(&NetHdr, &[u8]) -> bool,
        max_reads: usize,
    ) -> Result<ReadState, WireError> {
        let mut reads = 0;
        loop {
            while let Some(next) = self.reader.next_frame() {
                let (hdr, frame) = next?;
                if !each(&hdr, frame) {
                    return Ok(ReadState::More);
                }
            }
            if reads == max_reads {
                return Ok(ReadState::More);
            }
            reads += 1;
            match self.reader.fill(&mut self.stream) {
                Ok(true) => {}
                Ok(false) => return Ok(ReadState::Closed),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadState::Drained),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Queues a frame for the peer; `Full` when its buffer is at its limit.
    pub fn send(&mut self, hdr: &NetHdr, frame: &[u8]) -> Result<(), Full> {
        self.writer.push(hdr, frame)
    }

    /// Writes what is queued; Ok(false) while some waits for the peer.
    pub fn flush(&mut self) -> io::Result<bool> {
        self.writer.flush(&mut self.stream)
    }

    /// Bytes waiting for the peer.
    pub fn pending(&self) -> usize {
        self.writer.pending()
    }

    /// Whether a frame of any size may be sent now.
    pub fn has_room(&self) -> bool {
        self.writer.has_room()
    }

    /// Past half the outgoing limit: sources feeding it should wait.
    pub fn is_filling(&self) -> bool {
        self.writer.is_filling()
    }
}

impl AsRawFd for StreamPort {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_a_socket_pair_both_ways() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut a = StreamPort::new(a, Framing::VnetHdr, 1 << 20).unwrap();
        let mut b = StreamPort::new(b, Framing::VnetHdr, 1 << 20).unwrap();
        for n in [60usize, 9000, 65000] {
            a.send(&NetHdr::default(), &vec![n as u8; n]).unwrap();
        }
        assert!(a.flush().unwrap());
        let mut got = Vec::new();
        let state = b
            .receive(
                |_, f| {
                    got.push(f.len());
                    true
                },
                16,
            )
            .unwrap();
        assert_eq!(state, ReadState::Drained);
        assert_eq!(got, [60, 9000, 65000]);
        drop(a);
        assert_eq!(b.receive(|_, _| true, 4).unwrap(), ReadState::Closed);
    }
}
