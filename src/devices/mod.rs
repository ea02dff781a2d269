//! Emulated devices and the buses that route guest accesses to them.
//!
//! vCPU threads call into the buses on every port-I/O or MMIO exit, so
//! handlers here only touch memory: anything slow (disk, sockets, the
//! terminal) happens on the event loop thread.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
