//! QEMU guests as members: every connection to the network's QEMU socket
//! (`-netdev stream,server=off,addr.type=unix,addr.path=...`) is one.
//! QEMU says nothing about itself, so the connection waits until the
//! guest's first frame: its source MAC is the member's MAC (the port is
//! locked to it from then on) and names the member, `qemu-` and the MAC's
//! last three bytes (`-device ...,mac=52:54:00:12:34:56` is
//! `qemu-123456`), which is stable across restarts as the lease is.

use super::*;

/// Connections not yet heard from, at most: more are closed at once.
const MAX_WAITING: usize = 64;

/// The member name of a QEMU guest with MAC `mac`.
pub(super) fn qemu_name(mac: MacAddress) -> String {
    let o = mac.octets();
    format!("qemu-{:02x}{:02x}{:02x}", o[3], o[4], o[5])
}

impl Process {
    pub(super) fn accept_qemu(&mut self) {
        loop {
            let stream = match self.qemu_listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("network {}: accept: {e}", self.dir.name());
                    return;
                }
            };
            if self.qemu_waiting.len() >= MAX_WAITING {
                log::warn!(
                    "network {}: {MAX_WAITING} QEMU connections wait for a first frame; closing another",
                    self.dir.name()
                );
                continue;
            }
            let id = self.next_conn & TOKEN_INDEX;
            self.next_conn = self.next_conn.wrapping_add(1);
            let Ok(port) = StreamPort::new(stream, Framing::Plain, PORT_BUFFER) else {
                continue;
            };
            if self
                .reg
                .add(port.as_raw_fd(), TOKEN_QEMU_WAITING | id)
                .is_err()
            {
                continue;
            }
            self.qemu_waiting.insert(id, port);
            self.hear_qemu(id);
        }
    }

    /// Reads a waiting QEMU connection; its first frame makes it a member
    /// (and is then switched like any other).
    pub(super) fn hear_qemu(&mut self, id: u32) {
        let Some(mut port) = self.qemu_waiting.remove(&id) else {
            return;
        };
        let mut first: Option<Vec<u8>> = None;
        let state = port.receive(
            |_, frame| {
                first = Some(frame.to_vec());
                false
            },
            READS_PER_TURN,
        );
        let Some(frame) = first else {
            match state {
                Ok(ReadState::Drained) => {
                    self.qemu_waiting.insert(id, port);
                }
                _ => {
                    let _ = self.reg.remove(port.as_raw_fd(), TOKEN_QEMU_WAITING | id);
                }
            }
            return;
        };
        let _ = self.reg.remove(port.as_raw_fd(), TOKEN_QEMU_WAITING | id);
        let mut src = [0u8; 6];
        src.copy_from_slice(&frame[6..12]);
        let mac = MacAddress(src);
        if !EthernetAddress(src).is_unicast() {
            log::warn!(
                "network {}: a QEMU guest sent from {mac}; closing it",
                self.dir.name()
            );
            return;
        }
        let name = qemu_name(mac);
        let ip = match self.admit(&name, mac, None) {
            Ok(ip) => ip,
            Err(message) => {
                // Two QEMU guests with QEMU's default MAC, typically.
                log::warn!("network {}: QEMU guest {mac}: {message}", self.dir.name());
                return;
            }
        };
        let switch_port = self.switch.add_port(Some(EthernetAddress(src)));
        if let Err(e) = self.reg.add(port.as_raw_fd(), TOKEN_MEMBER | switch_port.0) {
            log::warn!("network {}: cannot watch {name}: {e}", self.dir.name());
            self.switch.remove_port(switch_port);
            self.nat.forget_guest(ip, &mut self.reg);
            return;
        }
        log::info!("network: {name} (QEMU) joined as {ip} ({mac})");
        self.members.insert(
            switch_port,
            Member {
                name,
                mac,
                ip,
                link: Link::Qemu {
                    port,
                    segmenter: Segmenter::new(self.nat.config().mtu),
                },
                forwards: Vec::new(),
                ingress: Vec::new(),
                readable: true,
                paused: false,
            },
        );
        self.had_member = true;
        // The first frame goes where any frame from it would.
        let Some(member) = self.members.remove(&switch_port) else {
            return;
        };
        let mut fabric = Fabric {
            switch: &mut self.switch,
            firewall: &mut self.firewall,
            members: &mut self.members,
            gateway_port: self.gateway_port,
        };
        fabric.carry(
            &mut self.nat,
            &mut self.reg,
            switch_port,
            &NetHdr::default(),
            &frame,
        );
        self.members.insert(switch_port, member);
    }

    /// Closes the QEMU connections not yet heard from (a stop).
    pub(super) fn close_waiting_qemu(&mut self) {
        for (id, port) in self.qemu_waiting.drain() {
            let _ = self.reg.remove(port.as_raw_fd(), TOKEN_QEMU_WAITING | id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qemu_member_is_named_after_its_mac() {
        let mac: MacAddress = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(qemu_name(mac), "qemu-123456");
    }
}
