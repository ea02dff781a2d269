//! What is behind the guest's card: the in-process NAT (`--net user`), a
//! port of a lab network's switch (`--net NAME`) or a TAP (`--net tap:DEV`). The device only moves
//! frames between its queues and a backend; the backend owns whatever
//! host descriptors it needs and registers them on the VM's event loop.

use event_manager::EventSet;

use crate::net::{GuestPort, Nat, NetHdr, Offloads, SocketRegistry};

pub trait NetBackend: Send {
    /// Registers the backend's descriptors (forward listeners, a socket).
    fn start(&mut self, reg: &mut dyn SocketRegistry);

    /// A frame the guest sent.
    fn guest_frame(&mut self, hdr: &NetHdr, frame: &[u8], reg: &mut dyn SocketRegistry);

    /// Whether it can take another guest frame, of any size, now. While it
    /// cannot, the device leaves the guest's TX chains in their ring (the
    /// guest's queue fills and its driver stops, nothing is dropped) and
    /// asks again after each of the backend's events.
    fn can_take_frame(&self) -> bool {
        true
    }

    /// True when an event-loop token is this backend's. Its tokens keep
    /// clear of the device's own (queue indices, the timer).
    fn owns_token(&self, token: u32) -> bool;

    /// One of its descriptors is ready.
    fn event(&mut self, token: u32, events: EventSet, reg: &mut dyn SocketRegistry);

    /// The device's timer, every [`crate::net::TICK`] while
    /// [`NetBackend::needs_tick`] says so.
    fn tick(&mut self, reg: &mut dyn SocketRegistry);

    fn needs_tick(&self) -> bool;

    /// Hands frames for the guest to `port` until it is full.
    fn flush(&mut self, port: &mut dyn GuestPort, reg: &mut dyn SocketRegistry);

    /// The NAT, when it runs in this process.
    fn nat(&self) -> Option<&Nat> {
        None
    }

    /// What the backend takes from the guest: partial checksums, TSO
    /// segments. The card offers the guest only these, so a backend that
    /// needs whole frames gets them from the guest's own driver.
    fn accepts(&self) -> Offloads {
        Offloads {
            csum: true,
            tso4: true,
        }
    }

    fn nat_mut(&mut self) -> Option<&mut Nat> {
        None
    }
}

impl NetBackend for Nat {
    fn start(&mut self, reg: &mut dyn SocketRegistry) {
        if let Err(e) = Nat::start(self, reg) {
            log::error!("virtio-net: {e}");
        }
    }

    fn guest_frame(&mut self, hdr: &NetHdr, frame: &[u8], reg: &mut dyn SocketRegistry) {
        self.handle_frame(hdr, frame, reg);
    }

    fn owns_token(&self, token: u32) -> bool {
        Nat::owns_token(token)
    }

    fn event(&mut self, token: u32, events: EventSet, reg: &mut dyn SocketRegistry) {
        self.handle_event(token, events, reg);
    }

    fn tick(&mut self, reg: &mut dyn SocketRegistry) {
        Nat::tick(self, reg);
    }

    fn needs_tick(&self) -> bool {
        Nat::needs_tick(self)
    }

    fn flush(&mut self, port: &mut dyn GuestPort, reg: &mut dyn SocketRegistry) {
        Nat::flush(self, port, reg);
    }

    fn nat(&self) -> Option<&Nat> {
        Some(self)
    }

    fn nat_mut(&mut self) -> Option<&mut Nat> {
        Some(self)
    }
}
