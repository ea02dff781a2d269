//! The flow table: every live flow in one slab, with the indexes the engine
//! finds flows by. It is the single source of truth for what the NAT holds
//! open; a flow's slot number is also its event-loop token.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use super::counters::Counters;
use super::engine::flow_token;
use super::icmp::IcmpFlow;
use super::registry::SocketRegistry;
use super::tcp::TcpFlow;
use super::udp::UdpFlow;

pub(super) enum Flow {
    Tcp(TcpFlow),
    Udp(UdpFlow),
    Icmp(IcmpFlow),
}

impl Flow {
    /// The host socket the event loop watches for this flow (forwarded UDP
    /// flows share their listener's and have none of their own).
    pub fn fd(&self) -> Option<RawFd> {
        match self {
            Flow::Tcp(f) => Some(f.stream.as_raw_fd()),
            Flow::Udp(f) => f.socket.as_ref().map(|s| s.as_raw_fd()),
            Flow::Icmp(f) => Some(f.socket.as_raw_fd()),
        }
    }

    /// The guest address the flow belongs to.
    pub fn guest_ip(&self) -> Ipv4Addr {
        match self {
            Flow::Tcp(f) => *f.guest.ip(),
            Flow::Udp(f) => *f.guest.ip(),
            Flow::Icmp(f) => f.guest,
        }
    }

    pub fn last_active(&self) -> Instant {
        match self {
            Flow::Tcp(f) => f.last_active,
            Flow::Udp(f) => f.last_active,
            Flow::Icmp(f) => f.last_active,
        }
    }
}

/// Flow key: the guest's end and the end it talks to.
pub(super) type Key = (SocketAddrV4, SocketAddrV4);

#[derive(Default)]
pub(super) struct FlowTable {
    slots: Vec<Option<Flow>>,
    free: Vec<usize>,
    live: usize,
    pub tcp: HashMap<Key, usize>,
    pub udp: HashMap<Key, usize>,
    /// ICMP echo flows by (guest, remote, identifier).
    pub icmp: HashMap<(Ipv4Addr, Ipv4Addr, u16), usize>,
    /// Forwarded UDP flows by (listener, host peer).
    pub udp_forward: HashMap<(usize, SocketAddr), usize>,
}

impl FlowTable {
    /// Flows alive now.
    pub fn len(&self) -> usize {
        self.live
    }

    /// One past the highest slot ever used: walk `0..slot_count()` with
    /// [`FlowTable::get_mut`] to visit every flow while changing others.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Flow> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.slots.iter().flatten()
    }

    /// Takes a slot for `flow` and indexes it under its key.
    pub fn insert(&mut self, flow: Flow, counters: &mut Counters) -> usize {
        self.live += 1;
        counters.flows_opened += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(flow);
                slot
            }
            None => {
                self.slots.push(Some(flow));
                self.slots.len() - 1
            }
        };
        match &self.slots[slot] {
            Some(Flow::Tcp(f)) => {
                self.tcp.insert((f.guest, f.remote), slot);
            }
            Some(Flow::Udp(f)) => {
                self.udp.insert((f.guest, f.remote), slot);
                if let Some(listener) = f.listener {
                    self.udp_forward.insert((listener, f.host_peer), slot);
                }
            }
            Some(Flow::Icmp(f)) => {
                self.icmp.insert((f.guest, f.remote, f.ident), slot);
            }
            None => unreachable!("slot just filled"),
        }
        slot
    }

    /// Removes the flow in `slot`, unwatches its socket and drops it from
    /// every index; the caller gets it back (to log it) before it closes.
    pub fn remove(
        &mut self,
        slot: usize,
        reg: &mut dyn SocketRegistry,
        counters: &mut Counters,
    ) -> Option<Flow> {
        let flow = self.take(slot, counters)?;
        if let Some(fd) = flow.fd() {
            let _ = reg.remove(fd, flow_token(slot));
        }
        Some(flow)
    }

    /// [`FlowTable::remove`] for a flow whose socket never made it into
    /// the event loop.
    pub fn discard_unregistered(&mut self, slot: usize, counters: &mut Counters) {
        self.take(slot, counters);
    }

    fn take(&mut self, slot: usize, counters: &mut Counters) -> Option<Flow> {
        let flow = self.slots.get_mut(slot)?.take()?;
        match &flow {
            Flow::Tcp(f) => {
                self.tcp.remove(&(f.guest, f.remote));
            }
            Flow::Udp(f) => {
                self.udp.remove(&(f.guest, f.remote));
                if let Some(listener) = f.listener {
                    self.udp_forward.remove(&(listener, f.host_peer));
                }
            }
            Flow::Icmp(f) => {
                self.icmp.remove(&(f.guest, f.remote, f.ident));
            }
        }
        self.live -= 1;
        counters.flows_closed += 1;
        self.free.push(slot);
        Some(flow)
    }

    /// True when a TCP or UDP flow already uses this pair of ends.
    pub fn has_pair(&self, key: &Key) -> bool {
        self.tcp.contains_key(key) || self.udp.contains_key(key)
    }

    /// Slots of every TCP flow lingering in TIME-WAIT.
    pub fn time_wait_slots(&self) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, f)| matches!(f, Some(Flow::Tcp(t)) if t.is_time_wait()))
            .map(|(i, _)| i)
            .collect()
    }

    /// Slots of every flow of guest `ip`.
    pub fn slots_of(&self, ip: Ipv4Addr) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, f)| f.as_ref().is_some_and(|f| f.guest_ip() == ip))
            .map(|(i, _)| i)
            .collect()
    }

    /// The slot of the flow idle longest.
    pub fn idlest(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|f| (i, f.last_active())))
            .min_by_key(|&(_, last)| last)
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use crate::net::testkit::{Harness, GATEWAY_IP, GUEST_IP};
    use crate::net::NatConfig;

    use super::*;

    #[test]
    fn flow_table_is_bounded_and_evicts_the_oldest() {
        let mut h = Harness::new(NatConfig {
            max_flows: 3,
            ..NatConfig::default()
        });
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sink.local_addr().unwrap().port();
        for i in 0..5u16 {
            let frame = h.guest.udp(
                SocketAddrV4::new(GUEST_IP, 41000 + i),
                SocketAddrV4::new(GATEWAY_IP, port),
                b"x",
            );
            h.send(&frame);
        }
        let flows = h.nat.flows();
        assert_eq!(flows.len(), 3);
        let mut ports: Vec<u16> = flows.iter().map(|f| f.guest.port()).collect();
        ports.sort();
        assert_eq!(ports, [41002, 41003, 41004]);
        assert_eq!(h.nat.counters().flows_evicted, 2);
    }
}
