//! Why a device stops serving its queues. Either the driver broke the virtio
//! contract (a buggy or hostile guest: the host is fine), or the host failed
//! the device (its entropy source, say). Both end the same way, the device in
//! DEVICE_NEEDS_RESET until the driver resets it, but logs and tests can tell
//! them apart.

use super::block::request::ChainError;

/// A fault that stops a device until the driver resets it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceFault {
    #[error("the driver broke a queue: {0}")]
    Driver(#[from] DriverFault),
    #[error("host failure: {0}")]
    Host(#[from] HostFault),
}

/// The driver broke a queue: nothing the device can answer.
#[derive(Debug, thiserror::Error)]
pub enum DriverFault {
    /// `avail.idx` runs further ahead of the device than the queue has
    /// entries: the driver offers buffers it cannot have.
    #[error("avail.idx {avail} is more than the queue size ({size}) ahead of the device's {next}")]
    AvailRingOverrun { avail: u16, next: u16, size: u16 },
    /// The available ring promises buffers whose entries cannot be read.
    #[error("the available ring offers buffers that cannot be read")]
    AvailRingUnreadable,
    /// Reading or writing a ring (indices, flags, the used ring) failed.
    #[error("ring access failed: {0}")]
    Ring(virtio_queue::Error),
    #[error("a buffer at {addr:#x} of {len} bytes lies outside guest memory")]
    OutsideMemory { addr: u64, len: u64 },
    /// A virtio-blk chain that cannot carry a request.
    #[error(transparent)]
    BlockChain(#[from] ChainError),
    /// With mergeable RX buffers every buffer must hold the header.
    #[error("an RX buffer is smaller than the virtio-net header")]
    RxBufferTooSmall,
}

/// The host failed the device.
#[derive(Debug, thiserror::Error)]
pub enum HostFault {
    #[error("cannot read host entropy: {0}")]
    Entropy(#[source] std::io::Error),
}

impl DriverFault {
    /// A guest buffer that could not be read or written.
    pub fn outside_memory(addr: vm_memory::GuestAddress, len: usize) -> Self {
        DriverFault::OutsideMemory {
            addr: addr.0,
            len: len as u64,
        }
    }
}

impl DeviceFault {
    /// Whether the driver, not the host, is to blame.
    pub fn is_driver_fault(&self) -> bool {
        matches!(self, DeviceFault::Driver(_))
    }
}
