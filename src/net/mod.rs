//! The userspace NAT: the guest's network without root, TAP or iptables.
//!
//! The engine ([`Nat`]) takes Ethernet frames from the guest side and gives
//! frames back; it owns the host sockets and knows nothing of virtio or TAP.
//! A guest transport implements [`GuestPort`] (TAP here, virtio-net later);
//! frames carry `virtio_net_hdr` offload metadata ([`NetHdr`]) so both can
//! exchange 64 KiB TSO segments with partial checksums.
//!
//! Addressing follows QEMU's user networking: network 10.0.2.0/24, gateway
//! 10.0.2.2 (which is the host's 127.0.0.1 for TCP and UDP), DNS relay
//! 10.0.2.3, guest 10.0.2.15 handed out by DHCP.
//!
//! Packet formats come from smoltcp's `wire` module; TCP toward the guest is
//! our own state machine (see [`tcp`](self) module docs for why: TSO, windows
//! tied to host socket buffers, no reassembly needed on a one-guest link).
//!
//! Driving it: register its sockets with an event loop through
//! [`SocketRegistry`] (implemented for `event_manager::EventOps`), pass
//! readiness to [`Nat::handle_event`], run [`Nat::tick`] every [`TICK`], and
//! call [`Nat::flush`] after feeding frames. [`TapNat`] does all of this for
//! a TAP device as an `event_manager::MutEventSubscriber`.

mod backend;
mod budget;
mod config;
mod counters;
mod dhcp;
mod dns;
mod egress;
mod engine;
mod error;
mod flow_table;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod icmp;
mod ingress;
mod leases;
mod listeners;
mod output;
mod port;
mod registry;
mod ring;
mod saved_flows;
mod segment;
mod tap;
mod tcp;
#[cfg(test)]
pub(crate) mod testkit;
mod udp;
mod view;

pub use backend::{run_until, TapNat};
pub use config::{
    parse_resolv_conf, resolvers_from_file, HostLoopback, NatConfig, Outbound, PolicyParseError,
    DEFAULT_BUFFER_BUDGET,
};
pub use counters::Counters;
pub use engine::{Nat, TICK};
pub use error::NatError;
pub use frame::{
    GuestFrame, NetHdr, Offloads, F_DATA_VALID, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4,
    GSO_TCPV6, GSO_UDP, NET_HDR_LEN,
};
pub use leases::{Lease, LeaseError, Leases};
pub use listeners::ForwardListeners;
pub use port::{GuestPort, PortBusy};
pub use registry::{EpollRegistry, NullRegistry, SocketRegistry};
pub use saved_flows::SavedFlows;
pub use segment::{SegmentError, Segmenter};
pub use tap::{enter_netns, in_netns, tap_name_is_valid, Tap};
pub use tcp::TcpReset;
pub use view::{FlowInfo, FlowProtocol, FlowState, NatSnapshot, NatView};
