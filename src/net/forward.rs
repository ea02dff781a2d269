//! Port-forward listeners, bound up front so that a host port already in use
//! is reported before a guest starts.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};

use socket2::{Domain, Socket, Type};

use super::error::NatError;
use crate::cli::{ForwardRule, Protocol};

pub(crate) enum ListenSocket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

pub(crate) struct Listener {
    pub rule: ForwardRule,
    pub socket: ListenSocket,
    /// Edge-triggered readiness not yet drained.
    pub readable: bool,
}

impl Listener {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.socket {
            ListenSocket::Tcp(s) => s.local_addr().ok(),
            ListenSocket::Udp(s) => s.local_addr().ok(),
        }
    }
}

/// The bound host sides of every `--forward`.
#[derive(Default)]
pub struct ForwardListeners {
    pub(crate) listeners: Vec<Listener>,
}

impl ForwardListeners {
    /// Binds every rule now, in order; the first failure is returned and
    /// nothing stays bound. Port 0 binds an ephemeral port (tests).
    pub fn bind(rules: &[ForwardRule]) -> Result<Self, NatError> {
        let mut listeners = Vec::with_capacity(rules.len());
        for rule in rules {
            let fail = |cause| NatError::ForwardBind {
                rule: *rule,
                addr: rule.host,
                cause,
            };
            let socket = match rule.protocol {
                Protocol::Tcp => ListenSocket::Tcp(bind_tcp(rule.host.into()).map_err(fail)?),
                Protocol::Udp => {
                    let sock = UdpSocket::bind(rule.host).map_err(fail)?;
                    sock.set_nonblocking(true).map_err(fail)?;
                    ListenSocket::Udp(sock)
                }
            };
            listeners.push(Listener {
                rule: *rule,
                socket,
                readable: false,
            });
        }
        Ok(ForwardListeners { listeners })
    }

    /// Each rule with the address actually bound.
    pub fn local_addrs(&self) -> Vec<(ForwardRule, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().map(|a| (l.rule, a)))
            .collect()
    }
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    // Lets a restarted vmlab reuse a port whose old connections linger in
    // TIME-WAIT; a port with a live listener still fails with EADDRINUSE.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_in_use_is_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let rule: ForwardRule = format!("tcp:{port}:22").parse().unwrap();
        let err = ForwardListeners::bind(&[rule])
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(err.contains("choose another host port"), "{err}");

        let udp_taken = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp_taken.local_addr().unwrap().port();
        let rule: ForwardRule = format!("udp:{port}:53").parse().unwrap();
        assert!(ForwardListeners::bind(&[rule]).is_err());
    }

    #[test]
    fn binds_all_rules() {
        let mut rules: Vec<ForwardRule> =
            vec!["tcp:1:22".parse().unwrap(), "udp:1:53".parse().unwrap()];
        for r in &mut rules {
            r.host.set_port(0);
        }
        let l = ForwardListeners::bind(&rules).unwrap();
        let addrs = l.local_addrs();
        assert_eq!(addrs.len(), 2);
        assert!(addrs
            .iter()
            .all(|(_, a)| a.port() != 0 && a.ip().is_loopback()));
    }
}
