//! A network's members as its process holds them: each is a switch port
//! (a VM's Unix socket, or a namespace's TAP device), and the fabric that
//! moves a frame from one port to the ports the switch chose.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;

use smoltcp::wire::EthernetAddress;

use super::view::{MemberKind, MemberView};
use crate::cli::{ForwardRule, IngressRule, MacAddress};
use crate::net::{
    GuestFrame, GuestPort, Nat, NetHdr, Offloads, PortBusy, Segmenter, SocketRegistry, Tap,
};
use crate::switch::firewall::Firewall;
use crate::switch::stream::StreamPort;
use crate::switch::{PortId, Route, Switch, SwitchCounters};

/// How a member is connected.
pub(super) enum Link {
    Stream(StreamPort),
    /// A QEMU guest: plain frames, no offloads, so what it is sent is
    /// segmented and checksummed here first.
    Qemu {
        port: StreamPort,
        segmenter: Segmenter,
    },
    Tap {
        tap: Tap,
        netns: PathBuf,
        /// vmlab sets its address (else DHCP in the namespace does).
        configure: bool,
        /// The namespace's identity (device, inode) when it was attached:
        /// the TAP keeps the namespace alive, so its deletion shows only as
        /// its file going away or naming another namespace.
        identity: (u64, u64),
    },
}

/// Why a frame did not reach a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Undelivered {
    /// Its buffer was full.
    Full,
    /// It needs plain frames and this one's offload request (a hostile
    /// or malformed GSO header) cannot be carried out.
    Refused,
}

pub(super) struct Member {
    pub name: String,
    pub mac: MacAddress,
    pub ip: Ipv4Addr,
    pub link: Link,
    pub forwards: Vec<ForwardRule>,
    /// What may open connections toward it (enforced by the fabric's
    /// firewall; kept here to be saved and shown).
    pub ingress: Vec<IngressRule>,
    /// Readiness not yet drained (edge-triggered).
    pub readable: bool,
    /// Stopped reading because a port it sends to is full.
    pub paused: bool,
}

impl Member {
    pub fn fd(&self) -> RawFd {
        match &self.link {
            Link::Stream(port) | Link::Qemu { port, .. } => port.as_raw_fd(),
            Link::Tap { tap, .. } => tap.as_raw_fd(),
        }
    }

    pub fn view(&self) -> MemberView {
        MemberView {
            name: self.name.clone(),
            mac: self.mac,
            ip: self.ip,
            kind: match &self.link {
                Link::Stream(_) => MemberKind::Vm,
                Link::Qemu { .. } => MemberKind::Qemu,
                Link::Tap { tap, netns, .. } => MemberKind::Netns {
                    path: netns.clone(),
                    device: tap.name().to_string(),
                },
            },
            forwards: self.forwards.clone(),
            ingress: None,
        }
    }

    /// Queues a frame for the member; a frame it had no room for, or
    /// whose offload request cannot be carried out, is dropped.
    fn send(&mut self, hdr: &NetHdr, frame: &[u8]) -> Result<(), Undelivered> {
        match &mut self.link {
            Link::Stream(port) => port.send(hdr, frame).map_err(|_| Undelivered::Full),
            Link::Qemu { port, segmenter } => {
                let mut sent = true;
                let plain = NetHdr::default();
                let result = segmenter.segment(hdr, frame, |piece| {
                    sent &= port.send(&plain, piece).is_ok();
                });
                if let Err(e) = result {
                    crate::warn_limited!("network: frame toward {} dropped: {e}", self.name);
                    return Err(Undelivered::Refused);
                }
                sent.then_some(()).ok_or(Undelivered::Full)
            }
            Link::Tap { tap, .. } => tap.send_frame(hdr, frame).map_err(|_| Undelivered::Full),
        }
    }

    /// Its outgoing buffer is past half full: senders should wait.
    pub fn is_filling(&self) -> bool {
        match &self.link {
            Link::Stream(port) | Link::Qemu { port, .. } => port.is_filling(),
            Link::Tap { .. } => false,
        }
    }

    pub fn has_pending(&self) -> bool {
        matches!(&self.link, Link::Stream(port) | Link::Qemu { port, .. } if port.pending() > 0)
    }

    /// Writes what waits; Ok(false) while the peer is full.
    pub fn flush(&mut self) -> io::Result<bool> {
        match &mut self.link {
            Link::Stream(port) | Link::Qemu { port, .. } => port.flush(),
            Link::Tap { .. } => Ok(true),
        }
    }
}

/// The switch and the member ports, borrowed together to move frames.
pub(super) struct Fabric<'a> {
    pub switch: &'a mut Switch,
    /// Ingress rules of guarded ports, and the connections they track.
    pub firewall: &'a mut Firewall,
    pub members: &'a mut HashMap<PortId, Member>,
    pub gateway_port: PortId,
}

/// Where a frame from a member went.
pub(super) enum Delivered {
    /// Everywhere it had to (or dropped where full, counted).
    Done,
    /// Its one destination is filling up: the source should pause.
    DestinationFilling,
    /// It is the gateway's: hand it to the NAT.
    ToGateway,
    /// Flooded to the members, and the gateway must see it too.
    AlsoToGateway,
}

/// Counts a frame a member did not take.
fn count_drop(counters: &mut SwitchCounters, sent: Result<(), Undelivered>) {
    match sent {
        Ok(()) => {}
        Err(Undelivered::Full) => counters.dropped += 1,
        Err(Undelivered::Refused) => counters.refused_offload += 1,
    }
}

fn addresses(frame: &[u8]) -> Option<(EthernetAddress, EthernetAddress)> {
    let dst = EthernetAddress::from_bytes(frame.get(0..6)?);
    let src = EthernetAddress::from_bytes(frame.get(6..12)?);
    Some((src, dst))
}

impl Fabric<'_> {
    /// Sends a frame from port `from` where the switch says (the source
    /// member is not in `members` while its frames are read).
    pub fn deliver(&mut self, from: PortId, hdr: &NetHdr, frame: &[u8]) -> Delivered {
        let Some((src, dst)) = addresses(frame) else {
            return Delivered::Done;
        };
        let now = std::time::Instant::now();
        if self.firewall.is_guarded(from) && !self.firewall.outbound(from, frame, now) {
            return Delivered::Done;
        }
        match self.switch.route(from, src, dst) {
            Route::Drop => Delivered::Done,
            Route::One(port) if port == self.gateway_port => Delivered::ToGateway,
            Route::One(port) => {
                if !self.firewall.inbound(port, frame, now) {
                    return Delivered::Done;
                }
                let Some(member) = self.members.get_mut(&port) else {
                    return Delivered::Done;
                };
                count_drop(&mut self.switch.counters, member.send(hdr, frame));
                if member.is_filling() {
                    Delivered::DestinationFilling
                } else {
                    Delivered::Done
                }
            }
            Route::Flood(ports) => {
                let mut gateway = false;
                for port in ports {
                    if port == self.gateway_port {
                        gateway = true;
                    } else if !self.firewall.inbound(port, frame, now) {
                        continue;
                    } else if let Some(member) = self.members.get_mut(&port) {
                        count_drop(&mut self.switch.counters, member.send(hdr, frame));
                    }
                }
                if gateway {
                    Delivered::AlsoToGateway
                } else {
                    Delivered::Done
                }
            }
        }
    }

    /// A frame from a member, to its destinations and the NAT if it is
    /// one of them; false when the source should pause.
    pub fn carry(
        &mut self,
        nat: &mut Nat,
        reg: &mut dyn SocketRegistry,
        from: PortId,
        hdr: &NetHdr,
        frame: &[u8],
    ) -> bool {
        match self.deliver(from, hdr, frame) {
            Delivered::Done => true,
            Delivered::DestinationFilling => false,
            Delivered::ToGateway | Delivered::AlsoToGateway => {
                nat.handle_frame(hdr, frame, reg);
                true
            }
        }
    }
}

/// The NAT's side of the switch: frames from the gateway go where the
/// switch says; a full destination holds the NAT back (it stops reading
/// host sockets) instead of dropping.
impl GuestPort for Fabric<'_> {
    fn send(&mut self, frame: &GuestFrame) -> Result<(), PortBusy> {
        let filling = addresses(&frame.data)
            .and_then(|(_, dst)| self.switch.lookup(dst))
            .and_then(|port| self.members.get(&port))
            .is_some_and(Member::is_filling);
        if filling {
            return Err(PortBusy);
        }
        self.deliver(self.gateway_port, &frame.hdr, &frame.data);
        Ok(())
    }

    /// Every member takes partial checksums and TSO segments: VMs finish
    /// them for a guest that cannot, TAPs pass them to the kernel, and
    /// QEMU members get them segmented in software.
    fn offloads(&self) -> Offloads {
        Offloads {
            csum: true,
            tso4: true,
        }
    }
}
