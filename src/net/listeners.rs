//! Port-forward listeners: bound up front so that a host port already in
//! use is reported before a guest starts, then served by the engine, which
//! turns each accepted connection (or new UDP peer) into a flow toward the
//! guest.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Instant;

use socket2::{Domain, Socket, Type};

use super::engine::{flow_token, Nat};
use super::error::NatError;
use super::flow_table::Flow;
use super::registry::SocketRegistry;
use super::tcp::TcpFlow;
use super::udp::UdpFlow;
use crate::cli::{ForwardRule, Protocol};

/// First gateway-side port handed to forwarded connections.
const FORWARD_PORT_BASE: u16 = 20000;
const FORWARD_PORT_COUNT: u16 = 40000;

pub(crate) enum ListenSocket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

pub(crate) struct Listener {
    pub rule: ForwardRule,
    pub socket: ListenSocket,
    /// The guest address the forward leads to.
    pub guest: Ipv4Addr,
    /// Edge-triggered readiness not yet drained.
    pub readable: bool,
}

impl Listener {
    /// The rule as bound: with the port the kernel chose for port 0.
    pub fn bound_rule(&self) -> ForwardRule {
        let mut rule = self.rule;
        if let Some(SocketAddr::V4(addr)) = self.local_addr() {
            rule.host = addr;
        }
        rule
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.socket {
            ListenSocket::Tcp(s) => s.local_addr().ok(),
            ListenSocket::Udp(s) => s.local_addr().ok(),
        }
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        match &self.socket {
            ListenSocket::Tcp(s) => s.as_raw_fd(),
            ListenSocket::Udp(s) => s.as_raw_fd(),
        }
    }
}

/// The bound host sides of every `--forward` of one guest.
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
                guest: Ipv4Addr::UNSPECIFIED,
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

/// The NAT's listeners by slot (a slot is part of an event token and of
/// forwarded UDP flows' keys, so slots of removed listeners stay empty).
#[derive(Default)]
pub(crate) struct ListenerSlots(Vec<Option<Listener>>);

impl ListenerSlots {
    pub fn get(&self, index: usize) -> Option<&Listener> {
        self.0.get(index).and_then(Option::as_ref)
    }

    fn get_mut(&mut self, index: usize) -> Option<&mut Listener> {
        self.0.get_mut(index).and_then(Option::as_mut)
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, &Listener)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.as_ref().map(|l| (i, l)))
    }

    fn insert(&mut self, listener: Listener) -> usize {
        match self.0.iter().position(Option::is_none) {
            Some(i) => {
                self.0[i] = Some(listener);
                i
            }
            None => {
                self.0.push(Some(listener));
                self.0.len() - 1
            }
        }
    }
}

impl Nat {
    /// Registers the forward listeners given at creation.
    pub fn start(&mut self, reg: &mut dyn SocketRegistry) -> Result<(), NatError> {
        for (i, l) in self.listeners.iter() {
            reg.add(l.raw_fd(), super::engine::listener_token(i))
                .map_err(NatError::EventLoop)?;
            log::info!("nat: forwarding {} to {}", l.rule, l.guest);
        }
        Ok(())
    }

    /// Takes `listeners` into the NAT, leading to `guest`, without
    /// registering them (see [`Nat::start`], [`Nat::add_forwards`]).
    pub(super) fn adopt(&mut self, listeners: ForwardListeners, guest: Ipv4Addr) -> Vec<usize> {
        listeners
            .listeners
            .into_iter()
            .map(|mut l| {
                l.guest = guest;
                self.listeners.insert(l)
            })
            .collect()
    }

    /// Forwards to one more guest of a lab network, served at once.
    pub fn add_forwards(
        &mut self,
        listeners: ForwardListeners,
        guest: Ipv4Addr,
        reg: &mut dyn SocketRegistry,
    ) -> Result<(), NatError> {
        for index in self.adopt(listeners, guest) {
            let Some(l) = self.listeners.get(index) else {
                continue;
            };
            if let Err(e) = reg.add(l.raw_fd(), super::engine::listener_token(index)) {
                self.listeners.0[index] = None;
                return Err(NatError::EventLoop(e));
            }
            log::info!("nat: forwarding {} to {guest}", l.rule);
        }
        Ok(())
    }

    /// Closes the forwards that lead to `guest` (it left the network).
    pub(super) fn remove_forwards(&mut self, guest: Ipv4Addr, reg: &mut dyn SocketRegistry) {
        for index in 0..self.listeners.0.len() {
            if self.listeners.get(index).is_some_and(|l| l.guest == guest) {
                if let Some(l) = self.listeners.0[index].take() {
                    let _ = reg.remove(l.raw_fd(), super::engine::listener_token(index));
                }
            }
        }
    }

    /// Marks listener `index` readable after an event.
    pub(super) fn listener_event(&mut self, index: usize, reg: &mut dyn SocketRegistry) {
        if let Some(l) = self.listeners.get_mut(index) {
            l.readable = true;
            self.listener_ready(index, reg);
        }
    }

    /// Accepts what listener `index` has waiting, as long as the guest's
    /// queue has room (else it resumes after the next flush).
    fn listener_ready(&mut self, index: usize, reg: &mut dyn SocketRegistry) {
        let now = Instant::now();
        loop {
            if !self.out.has_room() {
                self.out.starved = true;
                return;
            }
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            let (rule, guest) = (listener.rule, listener.guest);
            match &listener.socket {
                ListenSocket::Tcp(listener) => match listener.accept() {
                    Ok((stream, peer)) => self.accept_tcp((index, guest), stream, peer, reg, now),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) if crate::fds::exhausted(&err) => {
                        // The connection waits in the backlog; `tick` tries
                        // again (edge-triggered: no new event will come).
                        self.note_host_socket_error(&err);
                        return;
                    }
                    Err(err) => {
                        log::warn!("nat: forward {rule}: accept: {err}");
                        break;
                    }
                },
                ListenSocket::Udp(socket) => match socket.recv_from(&mut self.scratch) {
                    Ok((n, peer)) => self.forward_datagram((index, guest), peer, n, reg, now),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => log::debug!("nat: forward {rule}: {err}"),
                },
            }
        }
        if let Some(l) = self.listeners.get_mut(index) {
            l.readable = false;
        }
    }

    /// Counts a host socket the NAT could not get for lack of descriptors,
    /// and says so now and then (not once per attempt).
    pub(super) fn note_host_socket_error(&mut self, err: &io::Error) {
        if !crate::fds::exhausted(err) {
            return;
        }
        self.out.counters.fd_exhausted += 1;
        if let Some(suppressed) = self.fd_warnings.admit().admitted() {
            log::warn!(
                "nat: out of file descriptors ({err}; {suppressed} more since the last warning): \
                 new flows wait or are refused; raise the limit (ulimit -n) or lower --max-flows"
            );
        }
    }

    /// True while a listener has connections it could not accept yet.
    pub(super) fn listeners_pending(&self) -> bool {
        self.listeners.iter().any(|(_, l)| l.readable)
    }

    /// Accepts again on listeners that stopped early (queue full, no
    /// descriptors).
    pub(super) fn retry_listeners(&mut self, reg: &mut dyn SocketRegistry) {
        let pending: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.readable)
            .map(|(i, _)| i)
            .collect();
        for index in pending {
            self.listener_ready(index, reg);
        }
    }

    /// A gateway-side port no flow of the guest uses yet.
    fn forward_port(&mut self, guest: SocketAddrV4) -> Option<SocketAddrV4> {
        for _ in 0..FORWARD_PORT_COUNT {
            let port = FORWARD_PORT_BASE + self.next_forward_port;
            self.next_forward_port = (self.next_forward_port + 1) % FORWARD_PORT_COUNT;
            let remote = SocketAddrV4::new(self.cfg.gateway, port);
            if !self.table.has_pair(&(guest, remote)) {
                return Some(remote);
            }
        }
        None
    }

    fn accept_tcp(
        &mut self,
        (index, guest_ip): (usize, Ipv4Addr),
        stream: TcpStream,
        peer: SocketAddr,
        reg: &mut dyn SocketRegistry,
        now: Instant,
    ) {
        let Some(rule) = self.listeners.get(index).map(|l| l.rule) else {
            return;
        };
        if stream.set_nonblocking(true).is_err() || !self.make_room(reg) {
            self.out.counters.dropped_from_guest += 1;
            return;
        }
        let _ = stream.set_nodelay(true);
        let guest = SocketAddrV4::new(guest_ip, rule.guest_port);
        let Some(remote) = self.forward_port(guest) else {
            self.out.counters.dropped_from_guest += 1;
            return;
        };
        let iss = self.iss();
        let flow = TcpFlow::forward(
            stream,
            (guest, remote),
            iss,
            (&self.cfg, &self.budget),
            &mut self.out,
            now,
        );
        let fd = flow.stream.as_raw_fd();
        let slot = self.table.insert(Flow::Tcp(flow), &mut self.out.counters);
        if reg.add(fd, flow_token(slot)).is_err() {
            self.table
                .discard_unregistered(slot, &mut self.out.counters);
            return;
        }
        log::debug!("nat: open tcp forward {peer} -> {rule} as {remote} -> {guest}");
    }

    fn forward_datagram(
        &mut self,
        (index, guest_ip): (usize, Ipv4Addr),
        peer: SocketAddr,
        len: usize,
        reg: &mut dyn SocketRegistry,
        now: Instant,
    ) {
        let slot = match self.table.udp_forward.get(&(index, peer)) {
            Some(&slot) => slot,
            None => {
                if !self.make_room(reg) {
                    self.out.counters.dropped_from_guest += 1;
                    return;
                }
                let Some(rule) = self.listeners.get(index).map(|l| l.rule) else {
                    return;
                };
                let guest = SocketAddrV4::new(guest_ip, rule.guest_port);
                let Some(remote) = self.forward_port(guest) else {
                    self.out.counters.dropped_from_guest += 1;
                    return;
                };
                let flow = UdpFlow::new(None, Some(index), guest, remote, peer, now);
                log::debug!("nat: open udp forward {peer} -> {rule} as {remote} -> {guest}");
                self.table.insert(Flow::Udp(flow), &mut self.out.counters)
            }
        };
        if let Some(Flow::Udp(flow)) = self.table.get_mut(slot) {
            flow.last_active = now;
            flow.bytes_to_guest += len as u64;
            self.out.udp(flow.remote, flow.guest, &self.scratch[..len]);
        }
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
