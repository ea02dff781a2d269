//! `--net tap:DEV`: the card bound to an existing TAP device (bridged
//! mode), which vmlab neither creates nor configures. Frames pass as they
//! are: with vnet headers, the guest's checksum and TSO offloads go to the
//! kernel, and the kernel hands the guest only what its driver negotiated
//! (TUNSETOFFLOAD follows the guest). A TAP without vnet headers takes
//! whole frames only, so the card then offers the guest no offloads and
//! its driver segments and checksums itself.

use std::io;
use std::os::fd::AsRawFd;

use event_manager::EventSet;

use super::NetBackend;
use crate::net::{
    GuestFrame, GuestPort, NatError, NetHdr, Offloads, SocketRegistry, Tap, F_NEEDS_CSUM, GSO_NONE,
    NET_HDR_LEN,
};

/// The TAP's token on the VM's event loop: clear of the device's queue
/// indices and timer (0x100), of a member link's (0x200) and of the NAT's
/// (bit 31).
const TOKEN_TAP: u32 = 0x300;
/// Frames read per flush, so the guest's other work goes on.
const READS_PER_FLUSH: usize = 64;
/// A vnet header plus the largest frame a TSO segment makes.
const FRAME_BUF: usize = NET_HDR_LEN + 14 + 65535;

/// What the TAP card dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapCounters {
    /// The kernel's queue was full, or a frame the TAP cannot take whole.
    pub dropped_to_tap: u64,
    /// A segment the guest's driver did not negotiate.
    pub dropped_to_guest: u64,
}

pub struct TapLink {
    tap: Tap,
    buf: Vec<u8>,
    readable: bool,
    /// A frame the guest had no room for, delivered first next time.
    held: Option<GuestFrame>,
    /// What TUNSETOFFLOAD was last told (None: not yet).
    receive_offloads: Option<Offloads>,
    /// The TAP failed for good (deleted): nothing more is read.
    failed: bool,
    pub counters: TapCounters,
}

impl TapLink {
    /// Attaches to TAP `dev`, with vnet headers when the kernel offers them.
    pub fn attach(dev: &str) -> Result<TapLink, NatError> {
        Ok(TapLink::new(Tap::attach_existing(dev, true)?))
    }

    pub fn new(tap: Tap) -> TapLink {
        TapLink {
            tap,
            buf: vec![0u8; FRAME_BUF],
            readable: true,
            held: None,
            receive_offloads: None,
            failed: false,
            counters: TapCounters::default(),
        }
    }

    /// The TAP's MTU as the host set it (what DHCP on the bridge side
    /// would say too); 1500 if it cannot be read.
    pub fn mtu(dev: &str) -> u16 {
        std::fs::read_to_string(format!("/sys/class/net/{dev}/mtu"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .filter(|&m: &u16| m >= 576)
            .unwrap_or(1500)
    }

    fn fail(&mut self, err: &io::Error, reg: &mut dyn SocketRegistry) {
        if !self.failed {
            log::error!("tap {}: stopped working: {err}", self.tap.name());
            let _ = reg.remove(self.tap.as_raw_fd(), TOKEN_TAP);
        }
        self.failed = true;
        self.readable = false;
    }

    /// Tells the kernel what the guest takes, when that changed.
    fn follow_guest(&mut self, offloads: Offloads) {
        if self.receive_offloads == Some(offloads) {
            return;
        }
        if let Err(e) = self.tap.set_receive_offloads(offloads) {
            crate::warn_limited!("tap {}: cannot set offloads: {e}", self.tap.name());
        }
        self.receive_offloads = Some(offloads);
    }
}

impl NetBackend for TapLink {
    fn start(&mut self, reg: &mut dyn SocketRegistry) {
        if let Err(e) = reg.add(self.tap.as_raw_fd(), TOKEN_TAP) {
            log::error!("tap {}: cannot watch it: {e}", self.tap.name());
        }
    }

    fn guest_frame(&mut self, hdr: &NetHdr, frame: &[u8], _reg: &mut dyn SocketRegistry) {
        let whole = hdr.gso_type == GSO_NONE && hdr.flags & F_NEEDS_CSUM == 0;
        if !self.tap.has_vnet_hdr() && !whole {
            // Not offered to the guest (see `accepts`); a driver that sends
            // one anyway loses it. Software segmentation would go here.
            self.counters.dropped_to_tap += 1;
            return;
        }
        if self.tap.send_frame(hdr, frame).is_err() {
            self.counters.dropped_to_tap += 1;
        }
    }

    fn owns_token(&self, token: u32) -> bool {
        token == TOKEN_TAP
    }

    fn event(&mut self, _token: u32, events: EventSet, reg: &mut dyn SocketRegistry) {
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.fail(&io::Error::other("device closed"), reg);
        } else if events.contains(EventSet::IN) {
            self.readable = true;
        }
    }

    fn tick(&mut self, _reg: &mut dyn SocketRegistry) {}

    fn needs_tick(&self) -> bool {
        self.readable || self.held.is_some()
    }

    fn flush(&mut self, guest: &mut dyn GuestPort, reg: &mut dyn SocketRegistry) {
        self.follow_guest(guest.offloads());
        if let Some(frame) = self.held.take() {
            if guest.send(&frame).is_err() {
                self.held = Some(frame);
                return;
            }
        }
        let offloads = guest.offloads();
        for _ in 0..READS_PER_FLUSH {
            if !self.readable {
                return;
            }
            let n = match self.tap.read_frame(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail(&e, reg);
                    return;
                }
            };
            let Some(hdr) = NetHdr::parse(&self.buf[..n]) else {
                continue;
            };
            if hdr.gso_type != GSO_NONE && !offloads.tso4 {
                // Sent before TUNSETOFFLOAD took effect: lost, as on a wire.
                self.counters.dropped_to_guest += 1;
                continue;
            }
            let frame = GuestFrame {
                hdr,
                data: self.buf[NET_HDR_LEN..n].to_vec(),
            };
            if guest.send(&frame).is_err() {
                self.held = Some(frame);
                return;
            }
        }
    }

    fn accepts(&self) -> Offloads {
        if self.tap.has_vnet_hdr() {
            Offloads {
                csum: true,
                tso4: true,
            }
        } else {
            Offloads::default()
        }
    }
}
