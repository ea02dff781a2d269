//! ICMP echo toward the host's network: unprivileged ping sockets where
//! `net.ipv4.ping_group_range` allows, raw sockets when root.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::output::Output;

pub(crate) struct IcmpFlow {
    pub socket: Socket,
    /// Raw sockets see every ICMP packet, with its IPv4 header.
    pub raw: bool,
    pub guest: Ipv4Addr,
    pub remote: Ipv4Addr,
    pub ident: u16,
    pub readable: bool,
    pub created: Instant,
    pub last_active: Instant,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
}

/// Opens an ICMP socket: ping socket first, then raw.
pub(crate) fn open_socket() -> io::Result<(Socket, bool)> {
    let open = |ty| {
        let s = Socket::new(Domain::IPV4, ty, Some(Protocol::ICMPV4))?;
        s.set_nonblocking(true)?;
        Ok::<_, io::Error>(s)
    };
    match open(Type::DGRAM) {
        Ok(s) => Ok((s, false)),
        Err(ping_err) => open(Type::RAW).map(|s| (s, true)).map_err(|_| ping_err),
    }
}

impl IcmpFlow {
    /// Sends the guest's echo request (`icmp`: header and data).
    pub fn send(&mut self, icmp: &[u8], now: Instant) -> io::Result<()> {
        self.last_active = now;
        self.bytes_from_guest += icmp.len() as u64;
        let to = SockAddr::from(SocketAddrV4::new(self.remote, 0));
        self.socket.send_to(icmp, &to).map(|_| ())
    }

    /// Turns echo replies from the socket into frames for the guest.
    pub fn read_host(&mut self, out: &mut Output, buf: &mut [u8], now: Instant) {
        while self.readable {
            if !out.has_room() {
                out.starved = true;
                return;
            }
            let n = match (&self.socket).read(buf) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    log::debug!("nat: icmp {} -> {}: {err}", self.guest, self.remote);
                    self.readable = false;
                    return;
                }
            };
            let msg = if self.raw {
                // IPv4 header first; keep only replies from our peer.
                let Some(&first) = buf.first() else { continue };
                let ihl = usize::from(first & 0x0f) * 4;
                if n < ihl + 8 || buf[12..16] != self.remote.octets() {
                    continue;
                }
                &mut buf[ihl..n]
            } else {
                &mut buf[..n]
            };
            if msg.len() < 8 || msg[0] != 0 {
                continue;
            }
            let ident = u16::from_be_bytes([msg[4], msg[5]]);
            if self.raw && ident != self.ident {
                continue;
            }
            // Ping sockets pick their own identifier; give the guest its own.
            msg[4..6].copy_from_slice(&self.ident.to_be_bytes());
            self.last_active = now;
            self.bytes_to_guest += msg.len() as u64;
            out.icmp(self.remote, self.guest, msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::net::testkit::parse;

    /// Echo through a real host socket to the loopback address.
    #[test]
    fn echo_through_a_host_socket_keeps_the_guest_identifier() {
        let (socket, raw) = open_socket().expect("ICMP sockets need root or ping_group_range");
        let now = Instant::now();
        let mut flow = IcmpFlow {
            socket,
            raw,
            guest: Ipv4Addr::new(10, 0, 2, 15),
            remote: Ipv4Addr::LOCALHOST,
            ident: 0x4242,
            readable: true,
            created: now,
            last_active: now,
            bytes_from_guest: 0,
            bytes_to_guest: 0,
        };
        let mut echo = vec![8, 0, 0, 0, 0x42, 0x42, 0, 9];
        echo.extend_from_slice(b"payload!");
        let sum = !smoltcp::wire::checksum::data(&echo);
        echo[2..4].copy_from_slice(&sum.to_be_bytes());
        flow.send(&echo, now).unwrap();
        let mut out = Output::new(smoltcp::wire::EthernetAddress([2, 0, 0, 0, 0, 1]));
        let mut buf = vec![0u8; 2048];
        let start = Instant::now();
        let mut frames = Vec::new();
        while frames.is_empty() && start.elapsed() < Duration::from_secs(3) {
            flow.readable = true;
            flow.read_host(&mut out, &mut buf, Instant::now());
            frames = out.take_all();
            std::thread::sleep(Duration::from_millis(10));
        }
        let reply = parse(frames.first().expect("echo reply"));
        assert_eq!(reply.src, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(reply.dst, Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(&reply.payload[..2], &[0, 0]);
        assert_eq!(&reply.payload[4..], &echo[4..]);
    }
}
