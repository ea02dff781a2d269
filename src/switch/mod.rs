//! The L2 switch of a lab network: ports that carry whole Ethernet frames
//! (over Unix stream sockets between vmlab members, see [`wire`]), MAC
//! learning, and the decision where each frame goes. It knows neither
//! virtio nor the NAT: the network process plugs the NAT in as one more
//! port (the gateway's MAC) and moves the frames.
//!
//! A port may also be guarded by ingress rules ([`firewall`]): then only
//! connections its rules admit, and replies to its own, reach it.
//!
//! A port may be locked to one source MAC (a VM member's, a namespace's
//! TAP): frames from it with any other source address are dropped, so a
//! member cannot pose as another or flood the table with made-up
//! addresses.

pub mod firewall;
mod mac_table;
pub mod stream;
pub mod wire;

use std::time::Instant;

use smoltcp::wire::EthernetAddress;

use mac_table::MacTable;

/// A port's number on its switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u32);

/// Where a frame goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// To the one port that has its destination.
    One(PortId),
    /// To every other port (broadcast, multicast, or not learned yet).
    Flood(Vec<PortId>),
    /// Nowhere: back where it came from, or a source the port may not use.
    Drop,
}

/// What the switch counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SwitchCounters {
    pub frames: u64,
    pub flooded: u64,
    /// Frames whose source MAC was not the port's own.
    pub spoofed: u64,
    /// Frames a full port could not take.
    pub dropped: u64,
    /// Frames toward a member that takes plain frames only whose offload
    /// request could not be carried out (a segment size below the floor,
    /// pieces over the MTU, a malformed GSO frame).
    pub refused_offload: u64,
}

struct PortEntry {
    id: PortId,
    /// The only source MAC allowed from this port, if locked.
    mac: Option<EthernetAddress>,
}

/// Ports and MAC learning; see the module docs.
#[derive(Default)]
pub struct Switch {
    ports: Vec<PortEntry>,
    next: u32,
    macs: MacTable,
    pub counters: SwitchCounters,
}

impl Switch {
    /// A new port, locked to source `mac` when given.
    pub fn add_port(&mut self, mac: Option<EthernetAddress>) -> PortId {
        let id = PortId(self.next);
        self.next += 1;
        self.ports.push(PortEntry { id, mac });
        if let Some(mac) = mac {
            self.macs.learn(mac, id, Instant::now());
        }
        id
    }

    pub fn remove_port(&mut self, id: PortId) {
        self.ports.retain(|p| p.id != id);
        self.macs.forget_port(id);
    }

    pub fn ports(&self) -> impl Iterator<Item = PortId> + '_ {
        self.ports.iter().map(|p| p.id)
    }

    /// The port unicast address `dst` was learned on, without counting
    /// or learning anything.
    pub fn lookup(&self, dst: EthernetAddress) -> Option<PortId> {
        self.macs.lookup(dst, Instant::now())
    }

    /// Where a frame from port `from` with these addresses goes; learns
    /// where `src` is.
    pub fn route(&mut self, from: PortId, src: EthernetAddress, dst: EthernetAddress) -> Route {
        let now = Instant::now();
        self.counters.frames += 1;
        let Some(entry) = self.ports.iter().find(|p| p.id == from) else {
            return Route::Drop;
        };
        if entry.mac.is_some_and(|mac| mac != src) {
            self.counters.spoofed += 1;
            return Route::Drop;
        }
        self.macs.learn(src, from, now);
        if dst.is_unicast() {
            match self.macs.lookup(dst, now) {
                Some(port) if port == from => return Route::Drop,
                Some(port) => return Route::One(port),
                None => {}
            }
        }
        self.counters.flooded += 1;
        Route::Flood(self.ports().filter(|&p| p != from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> EthernetAddress {
        EthernetAddress([0x52, 0x54, 0, 0, 0, n])
    }

    #[test]
    fn unknown_and_broadcast_flood_then_unicast_is_learned() {
        let mut s = Switch::default();
        let a = s.add_port(None);
        let b = s.add_port(None);
        let c = s.add_port(None);
        assert_eq!(s.route(a, mac(1), mac(2)), Route::Flood(vec![b, c]));
        assert_eq!(s.route(b, mac(2), mac(1)), Route::One(a));
        assert_eq!(s.route(a, mac(1), mac(2)), Route::One(b));
        assert_eq!(
            s.route(c, mac(3), EthernetAddress::BROADCAST),
            Route::Flood(vec![a, b])
        );
        assert_eq!(s.route(a, mac(1), mac(1)), Route::Drop, "hairpin");
        s.remove_port(b);
        assert_eq!(s.route(a, mac(1), mac(2)), Route::Flood(vec![c]));
    }

    #[test]
    fn a_locked_port_may_only_use_its_own_source_address() {
        let mut s = Switch::default();
        let a = s.add_port(Some(mac(1)));
        let b = s.add_port(None);
        assert_eq!(s.route(b, mac(9), mac(1)), Route::One(a), "known at once");
        assert_eq!(s.route(a, mac(7), mac(9)), Route::Drop);
        assert_eq!(s.counters.spoofed, 1);
        assert_eq!(s.route(a, mac(1), mac(9)), Route::One(b));
    }
}
