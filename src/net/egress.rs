//! Egress policy: where a flow the guest opens may go on the host, and the
//! host sockets that take it there.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};

use socket2::{Domain, Socket, Type};

use super::config::{HostLoopback, NatConfig, Outbound};
use super::udp::{UNREACH_ADMIN, UNREACH_PORT};

/// Where a guest flow to `dst` goes on the host, or the ICMP unreachable
/// code that says why it may not: the gateway is the host's loopback (as
/// far as `host_loopback` allows), the DNS address is the first resolver,
/// the NAT's own network and special addresses go nowhere, and the rest of
/// the world only with [`Outbound::Any`].
pub(super) fn host_target(cfg: &NatConfig, dst: SocketAddrV4) -> Result<SocketAddrV4, u8> {
    let ip = *dst.ip();
    if cfg.closed {
        return Err(UNREACH_ADMIN);
    }
    if ip == cfg.gateway {
        let allowed = match &cfg.host_loopback {
            HostLoopback::All => true,
            HostLoopback::None => false,
            HostLoopback::Ports(ports) => ports.contains(&dst.port()),
        };
        return if allowed {
            Ok(SocketAddrV4::new(Ipv4Addr::LOCALHOST, dst.port()))
        } else {
            Err(UNREACH_ADMIN)
        };
    }
    if ip == cfg.dns {
        return match (dst.port(), cfg.resolvers.first()) {
            (53, Some(resolver)) => Ok(*resolver),
            _ => Err(UNREACH_PORT),
        };
    }
    if cfg.walled(ip) {
        return Err(UNREACH_ADMIN);
    }
    if cfg.in_network(ip)
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_unspecified()
        || ip.is_loopback()
    {
        return Err(UNREACH_PORT);
    }
    match cfg.outbound {
        Outbound::Any => Ok(dst),
        Outbound::HostOnly => Err(UNREACH_ADMIN),
    }
}

/// Starts a TCP connection to `target` without waiting for it.
pub(super) fn connect_tcp(target: SocketAddrV4) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&SocketAddr::from(target).into()) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(err) => return Err(err),
    }
    Ok(socket.into())
}

/// A non-blocking UDP socket connected to `target`, so ICMP errors for it
/// come back as `ECONNREFUSED`.
pub(super) fn connect_udp(target: SocketAddrV4) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(target)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(cfg: &NatConfig, ip: [u8; 4], port: u16) -> Result<SocketAddrV4, u8> {
        host_target(cfg, SocketAddrV4::new(ip.into(), port))
    }

    #[test]
    fn gateway_is_host_loopback_as_far_as_allowed() {
        let mut cfg = NatConfig::default();
        assert_eq!(
            target(&cfg, [10, 0, 2, 2], 8080),
            Ok("127.0.0.1:8080".parse().unwrap())
        );
        cfg.host_loopback = HostLoopback::Ports(vec![22]);
        assert!(target(&cfg, [10, 0, 2, 2], 22).is_ok());
        assert_eq!(target(&cfg, [10, 0, 2, 2], 8080), Err(UNREACH_ADMIN));
        cfg.host_loopback = HostLoopback::None;
        assert_eq!(target(&cfg, [10, 0, 2, 2], 22), Err(UNREACH_ADMIN));
    }

    #[test]
    fn special_addresses_go_nowhere_and_outbound_is_policy() {
        let mut cfg = NatConfig::default();
        for ip in [
            [10, 0, 2, 77],
            [255, 255, 255, 255],
            [224, 0, 0, 1],
            [0, 0, 0, 0],
        ] {
            assert_eq!(target(&cfg, ip, 80), Err(UNREACH_PORT), "{ip:?}");
        }
        assert_eq!(
            target(&cfg, [10, 0, 2, 3], 53),
            Err(UNREACH_PORT),
            "no resolver"
        );
        assert!(target(&cfg, [192, 0, 2, 1], 80).is_ok());
        cfg.walled_off = vec![([192, 168, 100, 0].into(), 24)];
        assert_eq!(target(&cfg, [192, 168, 100, 7], 80), Err(UNREACH_ADMIN));
        assert!(target(&cfg, [192, 168, 101, 7], 80).is_ok());
        cfg.outbound = Outbound::HostOnly;
        assert_eq!(target(&cfg, [192, 0, 2, 1], 80), Err(UNREACH_ADMIN));
    }
}
