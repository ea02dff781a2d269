//! UDP flows: one connected host socket per guest flow (so ICMP errors from
//! the host come back as `ECONNREFUSED` on that socket), or the shared
//! listener socket of a `udp:` forward.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Instant;

use super::output::{Output, IPV4_LEN, UDP_LEN};

/// ICMP "destination unreachable" codes the engine sends.
pub(crate) const UNREACH_PORT: u8 = 3;
pub(crate) const UNREACH_ADMIN: u8 = 13;

/// Largest datagram read from a host socket.
const MAX_DATAGRAM: usize = 65507;

pub(crate) struct UdpFlow {
    /// Own socket for guest-opened flows; `None` for forwards, which answer
    /// through their listener.
    pub socket: Option<UdpSocket>,
    pub listener: Option<usize>,
    pub guest: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub host_peer: SocketAddr,
    /// IPv4 + UDP header of the guest's last datagram, quoted in ICMP errors.
    pub last_header: [u8; IPV4_LEN + UDP_LEN],
    pub readable: bool,
    pub created: Instant,
    pub last_active: Instant,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
}

impl UdpFlow {
    pub fn new(
        socket: Option<UdpSocket>,
        listener: Option<usize>,
        guest: SocketAddrV4,
        remote: SocketAddrV4,
        host_peer: SocketAddr,
        now: Instant,
    ) -> Self {
        UdpFlow {
            socket,
            listener,
            guest,
            remote,
            host_peer,
            last_header: [0; IPV4_LEN + UDP_LEN],
            readable: false,
            created: now,
            last_active: now,
            bytes_from_guest: 0,
            bytes_to_guest: 0,
        }
    }

    /// Tells the guest its datagram could not be delivered.
    pub fn unreachable(&self, out: &mut Output, code: u8) {
        icmp_unreachable(
            out,
            *self.remote.ip(),
            *self.guest.ip(),
            code,
            &self.last_header,
        );
    }

    /// Reads datagrams from the flow's own socket into frames for the guest.
    pub fn read_host(&mut self, out: &mut Output, buf: &mut [u8], now: Instant) {
        let Some(socket) = &self.socket else {
            return;
        };
        while self.readable {
            if !out.has_room() {
                out.starved = true;
                return;
            }
            match socket.recv(&mut buf[..MAX_DATAGRAM]) {
                Ok(n) => {
                    self.last_active = now;
                    self.bytes_to_guest += n as u64;
                    out.udp(self.remote, self.guest, &buf[..n]);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                    self.unreachable(out, UNREACH_PORT);
                }
                Err(err) => {
                    log::debug!("nat: udp {} -> {}: {err}", self.guest, self.remote);
                    self.readable = false;
                }
            }
        }
    }

    /// Sends one guest datagram to the host side.
    pub fn send(
        &mut self,
        payload: &[u8],
        listener: Option<&UdpSocket>,
        out: &mut Output,
        now: Instant,
    ) {
        self.last_active = now;
        let result = match (&self.socket, listener) {
            (Some(socket), _) => socket.send(payload),
            (None, Some(listener)) => listener.send_to(payload, self.host_peer),
            (None, None) => return,
        };
        match result {
            Ok(_) => self.bytes_from_guest += payload.len() as u64,
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                self.unreachable(out, UNREACH_PORT);
            }
            Err(err) => {
                out.counters.dropped_from_guest += 1;
                log::trace!("nat: udp {} -> {}: send: {err}", self.guest, self.remote);
            }
        }
    }
}

/// ICMP destination unreachable quoting `original` (IPv4 header + 8 bytes).
pub(crate) fn icmp_unreachable(
    out: &mut Output,
    from: std::net::Ipv4Addr,
    to: std::net::Ipv4Addr,
    code: u8,
    original: &[u8],
) {
    let mut msg = Vec::with_capacity(8 + original.len());
    msg.extend_from_slice(&[3, code, 0, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(original);
    out.icmp(from, to, &msg);
}
