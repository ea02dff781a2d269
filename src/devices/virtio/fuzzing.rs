//! What the `virtio_mmio` and `virtio_blk_request` fuzz targets do with each
//! input, kept in the library so that the ordinary test suite replays
//! exactly what the fuzzer did (tests/fuzz_regressions.rs).
//!
//! The guest is the attacker here: it owns guest memory (the rings, the
//! descriptors, the buffers) and the transport's registers. Whatever it
//! does, the devices may refuse, ignore or go to NEEDS_RESET, but never
//! panic, hang or touch memory outside the guest's.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::block::{disk_serial, Block};
use super::device::{ActivateContext, VirtioDevice};
use super::interrupt::VirtioInterrupt;
use super::mmio::MmioTransport;
use super::net::{Net, NetSettings};
use super::rng::Rng;
use super::{F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1};
use crate::cli::MacAddress;
use crate::devices::bus::lock;
use crate::devices::BusDevice;
use crate::disk::{open_image, ImageFormat, LockMode, OpenOptions};
use crate::net::{ForwardListeners, HostLoopback, NatConfig, NullRegistry, Outbound};
use crate::vmm::memory::GuestMemoryMmap;

/// Guest memory of the fuzzed machine: small, so that random addresses
/// land inside it as often as outside.
pub const MEM_SIZE: usize = 64 << 10;
/// The disk behind virtio-blk.
const DISK_SIZE: u64 = 64 << 10;
/// Where the `init` operation puts queue `q`: its descriptor table at
/// `QUEUE_AREA * q`, the available ring 0x1000 and the used ring 0x1400
/// further (room for 256 entries each).
const QUEUE_AREA: u64 = 0x2000;
/// Operations per input, so that no input runs for long.
const MAX_OPS: usize = 4096;

fn memory() -> Option<GuestMemoryMmap> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()
}

fn interrupt() -> Option<Arc<VirtioInterrupt>> {
    Some(Arc::new(VirtioInterrupt::new(
        EventFd::new(EFD_NONBLOCK).ok()?,
    )))
}

/// Where a fuzzing process keeps its blk disk: one file per process, in
/// memory when /dev/shm is there (a flush is then free, not an fdatasync
/// that a busy host disk makes last seconds).
pub fn scratch_disk_path(target: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("vmlab-fuzz-{target}-{}.raw", std::process::id()))
}

/// A raw disk of `DISK_SIZE` zero bytes at `scratch`.
fn disk(scratch: &Path, read_only: bool) -> Option<Block> {
    let file = std::fs::File::create(scratch).ok()?;
    file.set_len(DISK_SIZE).ok()?;
    let opts = OpenOptions {
        read_only,
        lock: LockMode::None,
        format: Some(ImageFormat::Raw),
        cache_bytes: None,
        // A raw scratch file: no backing file to follow.
        backing_policy: crate::disk::BackingPolicy::vmlab(),
    };
    let backend = open_image(scratch, &opts).ok()?;
    Some(Block::new(
        Arc::from(backend),
        read_only,
        disk_serial(scratch, "fuzz"),
    ))
}

/// A NAT that reaches nothing at all: no host port, no resolver.
fn isolated_net() -> Net {
    Net::new(NetSettings::nat(
        MacAddress::for_vm("fuzz"),
        NatConfig {
            outbound: Outbound::HostOnly,
            host_loopback: HostLoopback::None,
            resolvers: Vec::new(),
            max_flows: 16,
            ..NatConfig::default()
        },
        ForwardListeners::default(),
    ))
}

/// The device under the transport, kept concretely typed so that
/// notifications reach it as its event loop would deliver them.
enum Device {
    Rng(Arc<Mutex<Rng>>),
    Block(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net>>),
}

impl Device {
    fn as_dyn(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Device::Rng(d) => d.clone(),
            Device::Block(d) => d.clone(),
            Device::Net(d) => d.clone(),
        }
    }

    /// The guest kicked queue `index` (an ioeventfd in a real VM).
    fn notify(&self, index: usize) {
        match self {
            Device::Rng(d) => lock(d).process_queue(index),
            Device::Block(d) => lock(d).process_queue(index),
            Device::Net(d) => lock(d).queue_notified(index, &mut NullRegistry),
        }
    }

    /// Time passes for the NAT (its timers, its queued frames).
    fn tick(&self) {
        if let Device::Net(d) = self {
            lock(d).tick(&mut NullRegistry);
        }
    }
}

/// Reads the input as a driver's actions.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
    fn bytes(&mut self, len: usize) -> &[u8] {
        let (taken, rest) = self.0.split_at(len.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

fn mmio_write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(0, offset, &value.to_le_bytes());
}

/// What a well-behaved driver does to start the device (virtio 1.2,
/// 3.1.1), with `features` (VERSION_1 always added) and every queue of
/// `size` entries at its `QUEUE_AREA`; the fuzzer then only has to find
/// hostile rings, not the whole handshake.
fn init(t: &mut MmioTransport, features: u32, size: u16, queues: u32) {
    for status in [1, 3] {
        mmio_write(t, 0x70, status);
    }
    mmio_write(t, 0x24, 0);
    mmio_write(t, 0x20, features);
    mmio_write(t, 0x24, 1);
    mmio_write(t, 0x20, (F_VERSION_1 >> 32) as u32);
    mmio_write(t, 0x70, 11);
    for q in 0..queues {
        let base = QUEUE_AREA * u64::from(q);
        mmio_write(t, 0x30, q);
        mmio_write(t, 0x38, u32::from(size));
        mmio_write(t, 0x80, base as u32);
        mmio_write(t, 0x90, (base + 0x1000) as u32);
        mmio_write(t, 0xa0, (base + 0x1400) as u32);
        mmio_write(t, 0x44, 1);
    }
    mmio_write(t, 0x70, 15);
}

/// The `virtio_mmio` target. Byte 0 picks the device (rng, blk, read-only
/// blk, net); then operations, an opcode byte each, with operands:
///
/// - 0 register write: offset/4 (u8), value (u32)
/// - 1 register read: offset/4 (u8)
/// - 2 memory write: address (u16), length (u8), bytes
/// - 3 notify: queue (u8)
/// - 4 init: features (u32), queue size as a power of two (u8)
/// - 5 config read: offset (u8), length 1..8 (u8)
/// - 6 config write: offset (u8), value (u32)
/// - 7 time passes (the NAT's timer)
///
/// `scratch` is a file the blk device may use as its disk. Returns the
/// status register as the driver last saw it (before the final reset).
pub fn exercise_mmio(data: &[u8], scratch: &Path) -> u32 {
    let mut input = Input(data);
    let Some(kind) = input.u8() else { return 0 };
    let (Some(mem), Some(int)) = (memory(), interrupt()) else {
        return 0;
    };
    let device = match kind % 4 {
        0 => match Rng::new() {
            Ok(rng) => Device::Rng(Arc::new(Mutex::new(rng))),
            Err(_) => return 0,
        },
        1 | 2 => match disk(scratch, kind % 4 == 2) {
            Some(block) => Device::Block(Arc::new(Mutex::new(block))),
            None => return 0,
        },
        _ => Device::Net(Arc::new(Mutex::new(isolated_net()))),
    };
    let queues = lock(&device.as_dyn()).queue_max_sizes().len() as u32;
    let mut transport = MmioTransport::new(device.as_dyn(), int, mem.clone());
    for _ in 0..MAX_OPS {
        let Some(op) = input.u8() else { break };
        match op % 8 {
            0 => {
                let (Some(reg), Some(value)) = (input.u8(), input.u32()) else {
                    break;
                };
                mmio_write(&mut transport, u64::from(reg) * 4, value);
            }
            1 => {
                let Some(reg) = input.u8() else { break };
                let mut out = [0u8; 4];
                transport.read(0, u64::from(reg) * 4, &mut out);
            }
            2 => {
                let (Some(addr), Some(len)) = (input.u16(), input.u8()) else {
                    break;
                };
                let bytes = input.bytes(usize::from(len));
                let _ = mem.write_slice(bytes, GuestAddress(u64::from(addr)));
            }
            3 => {
                let Some(q) = input.u8() else { break };
                device.notify(usize::from(q % 4));
            }
            4 => {
                let (Some(features), Some(size)) = (input.u32(), input.u8()) else {
                    break;
                };
                let size = 1u16 << (size % 9);
                init(&mut transport, features, size, queues);
            }
            5 => {
                let (Some(offset), Some(len)) = (input.u8(), input.u8()) else {
                    break;
                };
                let mut out = vec![0u8; usize::from(len % 8) + 1];
                transport.read(0, 0x100 + u64::from(offset), &mut out);
            }
            6 => {
                let (Some(offset), Some(value)) = (input.u8(), input.u32()) else {
                    break;
                };
                transport.write(0, 0x100 + u64::from(offset), &value.to_le_bytes());
            }
            _ => device.tick(),
        }
    }
    let mut status = [0u8; 4];
    transport.read(0, 0x70, &mut status);
    // Reset, as a driver unloading: the device must let go of everything.
    mmio_write(&mut transport, 0x70, 0);
    u32::from_le_bytes(status)
}

/// Queue size of the `virtio_blk_request` target.
const BLK_QUEUE: u16 = 16;

/// The `virtio_blk_request` target: one disk request framed however the
/// input says. Byte 0: flags (bit 0 a read-only disk, bit 1 EVENT_IDX, bit
/// 2 no FLUSH feature, so writes are write-through); byte 1: the head
/// index; then 16 descriptors of 6 bytes (address u16 × 4, length u16,
/// flags u8, next u8), then guest memory from 0x1000 on (request headers,
/// data, indirect tables). Every request either completes or puts the
/// device in NEEDS_RESET; returns true when it completed.
pub fn exercise_blk_request(data: &[u8], scratch: &Path) -> bool {
    let mut input = Input(data);
    let (Some(flags), Some(head)) = (input.u8(), input.u8()) else {
        return false;
    };
    let (Some(mem), Some(int)) = (memory(), interrupt()) else {
        return false;
    };
    let Some(mut block) = disk(scratch, flags & 1 != 0) else {
        return false;
    };
    // Descriptor table at 0, avail ring at 0x200, used ring at 0x400.
    for i in 0..u64::from(BLK_QUEUE) {
        let (Some(addr), Some(len), Some(dflags), Some(next)) =
            (input.u16(), input.u16(), input.u8(), input.u8())
        else {
            break;
        };
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&(u64::from(addr) * 4).to_le_bytes());
        desc[8..12].copy_from_slice(&u32::from(len).to_le_bytes());
        // NEXT, WRITE, INDIRECT: the three flags a split ring knows.
        desc[12..14].copy_from_slice(&u16::from(dflags & 7).to_le_bytes());
        desc[14..16].copy_from_slice(&u16::from(next).to_le_bytes());
        let _ = mem.write_slice(&desc, GuestAddress(16 * i));
    }
    let _ = mem.write_slice(input.bytes(MEM_SIZE - 0x1000), GuestAddress(0x1000));
    let avail = [0, 0, 1, 0, head % BLK_QUEUE as u8, 0];
    let _ = mem.write_slice(&avail, GuestAddress(0x200));

    let Ok(mut queue) = Queue::new(BLK_QUEUE) else {
        return false;
    };
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x200), Some(0));
    queue.set_used_ring_address(Some(0x400), Some(0));
    queue.set_ready(true);
    queue.set_event_idx(flags & 2 != 0);
    let mut features = F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX;
    if flags & 4 == 0 {
        features |= super::block::F_FLUSH;
    }
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: vec![queue],
        interrupt: int.clone(),
        features,
    };
    if block.activate(ctx).is_err() {
        return false;
    }
    block.process_queue(0);
    let used: u16 = mem.read_obj(GuestAddress(0x402)).unwrap_or(0);
    assert!(
        used >= 1 || int.needs_reset(),
        "a request neither completed nor refused"
    );
    block.reset();
    !int.needs_reset()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        (dir, path)
    }

    #[test]
    fn a_well_framed_read_completes() {
        let (_dir, path) = scratch();
        let mut data = vec![0u8, 0];
        // header (16 bytes at 0x1000), 512 data bytes at 0x1010, status.
        let descs: [(u16, u16, u8, u8); 3] =
            [(0x400, 16, 1, 1), (0x404, 512, 3, 2), (0x484, 1, 2, 0)];
        for i in 0..16 {
            let (addr, len, flags, next) = descs.get(i).copied().unwrap_or_default();
            data.extend_from_slice(&addr.to_le_bytes());
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(&[flags, next]);
        }
        data.extend_from_slice(&[0u8; 16]); // T_IN, sector 0
        assert!(exercise_blk_request(&data, &path));
        // The same with the status byte made device-readable: refused.
        let status_flags = 2 + 6 * 2 + 4;
        data[status_flags] = 0;
        assert!(!exercise_blk_request(&data, &path));
    }

    #[test]
    fn garbage_never_panics_any_device() {
        let (_dir, path) = scratch();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..200 {
            let data: Vec<u8> = (0..512)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut with_init = vec![round as u8, 4, 0xff, 0xff, 0, 0x30, 4];
            with_init.extend_from_slice(&data);
            exercise_mmio(&with_init, &path);
            exercise_blk_request(&data, &path);
        }
    }
}
