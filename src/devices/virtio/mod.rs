//! virtio 1.x devices on the virtio-mmio transport.
//!
//! A device is split in two: the transport (`mmio::MmioTransport`), which
//! sits on the MMIO bus and runs on vCPU threads, handling register access
//! and the status/feature state machine; and the device model (a
//! `VirtioDevice`), which moves data on the event-loop thread when the
//! guest notifies a queue (ioeventfd) and signals completions (irqfd).

pub mod block;
pub mod device;
pub mod events;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
pub mod interrupt;
pub mod io_thread;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
#[cfg(test)]
mod test_support;

pub use device::{ActivateContext, ActivateError, VirtioDevice};
pub use fault::{DeviceFault, DriverFault, HostFault};
pub use interrupt::VirtioInterrupt;
pub use mmio::MmioTransport;
pub use queue::QueueService;

/// Device type IDs (virtio 1.2, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;

/// Feature bits common to all devices.
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// Device status bits (section 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;
