//! A VM's card on a lab network: the virtio-net backend that is the VM's
//! end of its switch port (a Unix stream to the network process, frames
//! in the [`wire`](crate::switch::wire) format with their vnet headers).
//! When the network process goes away (killed), the link rejoins on its
//! own with the same request, so the guest keeps its address without a
//! reboot.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use event_manager::EventSet;

use super::client;
use super::error::Result;
use super::protocol::{JoinRequest, NetRequest, NetResponse};
use super::store::NetworkDir;
use crate::devices::virtio::net::NetBackend;
use crate::net::{GuestFrame, GuestPort, NatSnapshot, NatView, NetHdr, SocketRegistry, GSO_NONE};
use crate::switch::stream::{ReadState, StreamPort};
use crate::switch::wire::Framing;

/// The link's token on the VM's event loop: clear of the device's queue
/// indices and timer (0x100) and of the NAT's (bit 31).
const TOKEN_LINK: u32 = 0x200;
/// Bytes queued toward the network before the guest's TX queue pauses.
const OUT_LIMIT: usize = 4 << 20;
/// Socket reads per flush, so the guest's other work goes on.
const READS_PER_FLUSH: usize = 16;
/// Between two attempts to rejoin a network that went away.
const REJOIN_EVERY: Duration = Duration::from_secs(1);

/// What the link dropped (a frame while the network was away, a frame
/// the guest cannot take).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub dropped_to_network: u64,
    pub dropped_to_guest: u64,
    pub rejoins: u64,
}

pub struct MemberLink {
    net: NetworkDir,
    request: JoinRequest,
    port: Option<StreamPort>,
    readable: bool,
    /// A frame the guest had no room for, delivered first next time.
    held: Option<GuestFrame>,
    last_attempt: Instant,
    pub counters: LinkCounters,
}

impl MemberLink {
    /// Joins `net` (starting its process if needed) as `request` says;
    /// a refusal (address taken, port in use) is the error `run` prints.
    pub fn join(net: NetworkDir, request: JoinRequest) -> Result<(MemberLink, std::net::Ipv4Addr)> {
        let (stream, joined) = client::join(&net, &request)?;
        let socket = net.socket_path();
        let link = MemberLink::joined(net, request, stream)
            .map_err(super::error::NetworkError::io("cannot use", &socket))?;
        Ok((link, joined.ip))
    }

    /// The link over `stream`, a connection that has joined `net` as
    /// `request` said (a rejoin sends `request` again).
    pub fn joined(
        net: NetworkDir,
        request: JoinRequest,
        stream: std::os::unix::net::UnixStream,
    ) -> std::io::Result<MemberLink> {
        Ok(MemberLink {
            port: Some(StreamPort::new(stream, Framing::VnetHdr, OUT_LIMIT)?),
            net,
            request,
            readable: true,
            held: None,
            last_attempt: Instant::now(),
            counters: LinkCounters::default(),
        })
    }

    fn disconnected(&mut self, reg: &mut dyn SocketRegistry) {
        if let Some(port) = self.port.take() {
            let _ = reg.remove(port.as_raw_fd(), TOKEN_LINK);
            log::warn!(
                "network {}: the network went away; rejoining",
                self.net.name()
            );
        }
        self.readable = false;
        self.last_attempt = Instant::now() - REJOIN_EVERY;
    }

    /// Tries to join again, once a [`REJOIN_EVERY`], on the event loop
    /// itself: connecting to a running network's socket is quick, and a
    /// network that does not run is left to the next member command.
    fn rejoin(&mut self, reg: &mut dyn SocketRegistry) {
        if self.last_attempt.elapsed() < REJOIN_EVERY {
            return;
        }
        self.last_attempt = Instant::now();
        match client::rejoin(&self.net, &self.request) {
            Ok(Some((stream, _))) => match StreamPort::new(stream, Framing::VnetHdr, OUT_LIMIT) {
                Ok(port) if reg.add(port.as_raw_fd(), TOKEN_LINK).is_ok() => {
                    log::info!("network {}: rejoined", self.net.name());
                    self.counters.rejoins += 1;
                    self.port = Some(port);
                    self.readable = true;
                }
                _ => {}
            },
            Ok(None) => {}
            Err(e) => log::debug!("network {}: rejoin: {e}", self.net.name()),
        }
    }

    fn write_out(&mut self, reg: &mut dyn SocketRegistry) {
        if let Some(port) = self.port.as_mut() {
            if port.pending() > 0 && port.flush().is_err() {
                self.disconnected(reg);
            }
        }
    }
}

impl NetBackend for MemberLink {
    fn start(&mut self, reg: &mut dyn SocketRegistry) {
        if let Some(port) = &self.port {
            if let Err(e) = reg.add(port.as_raw_fd(), TOKEN_LINK) {
                log::error!("network {}: cannot watch its socket: {e}", self.net.name());
            }
        }
    }

    fn guest_frame(&mut self, hdr: &NetHdr, frame: &[u8], reg: &mut dyn SocketRegistry) {
        // Away from the network (until it rejoins), frames are lost as on
        // an unplugged wire; a full socket never gets here (see
        // can_take_frame), so a refusal is counted, not expected.
        let Some(port) = self.port.as_mut() else {
            self.counters.dropped_to_network += 1;
            return;
        };
        if port.send(hdr, frame).is_err() {
            self.counters.dropped_to_network += 1;
        }
        self.write_out(reg);
    }

    /// Room for one more frame toward the network, or no network (frames
    /// then go nowhere: the guest must not wait for a rejoin).
    fn can_take_frame(&self) -> bool {
        self.port.as_ref().is_none_or(StreamPort::has_room)
    }

    fn owns_token(&self, token: u32) -> bool {
        token == TOKEN_LINK
    }

    fn event(&mut self, _token: u32, events: EventSet, reg: &mut dyn SocketRegistry) {
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            self.readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.write_out(reg);
        }
    }

    fn tick(&mut self, reg: &mut dyn SocketRegistry) {
        if self.port.is_none() {
            self.rejoin(reg);
        }
    }

    fn needs_tick(&self) -> bool {
        self.port.is_none() || self.readable || self.held.is_some()
    }

    fn flush(&mut self, guest: &mut dyn GuestPort, reg: &mut dyn SocketRegistry) {
        if let Some(frame) = self.held.take() {
            if guest.send(&frame).is_err() {
                self.held = Some(frame);
                return;
            }
        }
        self.write_out(reg);
        if !self.readable {
            return;
        }
        let Some(port) = self.port.as_mut() else {
            return;
        };
        let offloads = guest.offloads();
        let (held, counters) = (&mut self.held, &mut self.counters);
        let state = port.receive(
            |hdr, data| {
                if hdr.gso_type != GSO_NONE && !offloads.tso4 {
                    // The guest's driver did not take TSO: a segment it
                    // cannot receive is lost, as on a real link.
                    counters.dropped_to_guest += 1;
                    return true;
                }
                let frame = GuestFrame {
                    hdr: *hdr,
                    data: data.to_vec(),
                };
                match guest.send(&frame) {
                    Ok(()) => true,
                    Err(_) => {
                        *held = Some(frame);
                        false
                    }
                }
            },
            READS_PER_FLUSH,
        );
        match state {
            Ok(ReadState::Drained) => self.readable = false,
            Ok(ReadState::More) => {}
            Ok(ReadState::Closed) | Err(_) => self.disconnected(reg),
        }
    }
}

/// `vmlab nat show VM` of a member: its forwards and flows live in the
/// network's NAT, so the network process is asked.
pub struct MemberNatView {
    pub net: NetworkDir,
    pub name: String,
}

impl NatView for MemberNatView {
    fn snapshot(&self) -> NatSnapshot {
        let request = NetRequest::MemberNat {
            name: self.name.clone(),
        };
        match client::ask(&self.net, &request) {
            Ok(Some(NetResponse::Nat { nat })) => nat,
            Ok(_) => NatSnapshot::default(),
            Err(e) => {
                log::debug!("network {}: {e}", self.net.name());
                NatSnapshot::default()
            }
        }
    }
}
