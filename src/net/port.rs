//! The guest side of the NAT as a transport: a TAP device today, a virtio-net
//! queue pair later. The engine only needs to hand it frames and to learn
//! when it is full.

use super::frame::{GuestFrame, Offloads};

/// The guest side cannot take a frame now; retry once it says it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortBusy;

/// Where frames for the guest go.
pub trait GuestPort {
    /// Delivers one frame to the guest, or says it is full. A full port makes
    /// the engine stop reading host sockets until [`crate::net::Nat::flush`]
    /// succeeds again, so nothing is dropped and nothing grows without bound.
    fn send(&mut self, frame: &GuestFrame) -> Result<(), PortBusy>;

    /// Offloads the guest negotiated; the engine sends large segments only
    /// when `tso4` is set.
    fn offloads(&self) -> Offloads;
}
