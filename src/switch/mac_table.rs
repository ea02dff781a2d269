//! MAC learning: which port a source address was last seen on, forgotten
//! after a while (a guest that moved, or left) and bounded in size.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use smoltcp::wire::EthernetAddress;

use super::PortId;

/// How long an address is remembered without traffic (a bridge's default).
const AGING: Duration = Duration::from_secs(300);
/// Most addresses remembered; beyond it the table starts over (a guest
/// inventing source addresses only makes the switch flood).
const MAX_ENTRIES: usize = 4096;

#[derive(Default)]
pub(super) struct MacTable {
    entries: HashMap<[u8; 6], (PortId, Instant)>,
}

impl MacTable {
    pub fn learn(&mut self, mac: EthernetAddress, port: PortId, now: Instant) {
        if !mac.is_unicast() {
            return;
        }
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&mac.0) {
            self.entries.clear();
        }
        self.entries.insert(mac.0, (port, now));
    }

    pub fn lookup(&self, mac: EthernetAddress, now: Instant) -> Option<PortId> {
        self.entries
            .get(&mac.0)
            .filter(|(_, seen)| now.saturating_duration_since(*seen) < AGING)
            .map(|(port, _)| *port)
    }

    pub fn forget_port(&mut self, port: PortId) {
        self.entries.retain(|_, (p, _)| *p != port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_ages_and_forgets() {
        let mut t = MacTable::default();
        let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
        let now = Instant::now();
        t.learn(mac, PortId(3), now);
        assert_eq!(t.lookup(mac, now), Some(PortId(3)));
        assert_eq!(t.lookup(mac, now + AGING), None, "aged out");
        t.learn(EthernetAddress::BROADCAST, PortId(1), now);
        assert_eq!(t.lookup(EthernetAddress::BROADCAST, now), None);
        t.forget_port(PortId(3));
        assert_eq!(t.lookup(mac, now), None);
    }
}
