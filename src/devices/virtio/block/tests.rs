//! virtio-blk against vm-memory-backed queues (virtio-queue's mock split
//! queue) and real raw and qcow2 images: each request type, each refusal,
//! and each hostile chain on its own.

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::device::{ActivateContext, VirtioDevice};
use crate::devices::virtio::interrupt::VirtioInterrupt;
use crate::devices::virtio::test_support::returns_in_time;
use crate::devices::virtio::F_VERSION_1;
use crate::disk::{self, BlockStatus, ImageFormat, LockMode, OpenOptions};
use crate::vmm::memory::GuestMemoryMmap;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const MEM_SIZE: usize = 0x80_0000;
const DISK_SIZE: u64 = 1 << 20;
const QSIZE: u16 = 256;
const FEATURES: u64 = F_VERSION_1 | F_FLUSH | F_DISCARD | F_WRITE_ZEROES;

#[derive(Clone, Copy)]
enum Kind {
    Raw,
    Qcow2,
}

fn image(dir: &Path, kind: Kind) -> PathBuf {
    match kind {
        Kind::Raw => {
            let path = dir.join("disk.raw");
            let f = std::fs::File::create(&path).unwrap();
            f.set_len(DISK_SIZE).unwrap();
            path
        }
        Kind::Qcow2 => {
            let path = dir.join("disk.qcow2");
            disk::create_image(&path, &disk::CreateOptions::qcow2(DISK_SIZE)).unwrap();
            path
        }
    }
}

fn open(path: &Path, read_only: bool) -> Arc<dyn BlockBackend> {
    let opts = OpenOptions {
        read_only,
        lock: LockMode::None,
        ..OpenOptions::read_only()
    };
    Arc::from(disk::open_image(path, &opts).unwrap())
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Device-readable (R) or device-writable (W) buffer.
#[derive(Clone, Copy)]
enum Dir {
    R,
    W,
}

/// One chain of `bufs` whose descriptors sit at `first` onwards.
fn chain(first: u16, bufs: &[(u64, u32, Dir)]) -> Vec<RawDescriptor> {
    bufs.iter()
        .enumerate()
        .map(|(i, &(addr, len, dir))| {
            let mut flags = 0;
            if matches!(dir, Dir::W) {
                flags |= VRING_DESC_F_WRITE;
            }
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            raw(addr, len, flags, first + i as u16 + 1)
        })
        .collect()
}

fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn write_header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// A device on a mock queue, activated with `features`.
struct Rig<'m> {
    mem: &'m GuestMemoryMmap,
    vq: MockSplitQueue<'m, GuestMemoryMmap>,
    dev: Block,
    interrupt: Arc<VirtioInterrupt>,
    next_desc: u16,
    submitted: u16,
}

impl<'m> Rig<'m> {
    fn new(mem: &'m GuestMemoryMmap, backend: Arc<dyn BlockBackend>, read_only: bool) -> Self {
        Self::with_features(mem, backend, read_only, FEATURES)
    }

    fn with_features(
        mem: &'m GuestMemoryMmap,
        backend: Arc<dyn BlockBackend>,
        read_only: bool,
        features: u64,
    ) -> Self {
        let vq = MockSplitQueue::new(mem, QSIZE);
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut dev = Block::new(backend, read_only, disk_serial(Path::new("disk.img"), "x"));
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![vq.create_queue().unwrap()],
            interrupt: interrupt.clone(),
            features,
        })
        .unwrap();
        Rig {
            mem,
            vq,
            dev,
            interrupt,
            next_desc: 0,
            submitted: 0,
        }
    }

    /// Submits a chain and runs the queue; returns (used length, status).
    fn submit(&mut self, bufs: &[(u64, u32, Dir)]) -> (u32, u8) {
        self.submit_raw(&chain(self.next_desc, bufs))
    }

    /// Submits the descriptors `descs` (the chain's `next` fields count
    /// from `self.next_desc`) and runs the queue.
    fn submit_raw(&mut self, descs: &[RawDescriptor]) -> (u32, u8) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        self.vq.add_desc_chains(descs, self.next_desc).unwrap();
        self.next_desc += descs.len() as u16;
        self.submitted += 1;
        self.dev.process_queue(0);
        assert!(!self.interrupt.needs_reset(), "a valid chain was refused");
        assert_eq!(self.vq.used().idx().load(), self.submitted, "request used");
        let used = self
            .vq
            .used()
            .ring()
            .ref_at(usize::from(self.submitted - 1))
            .unwrap()
            .load();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (used.len(), status)
    }

    /// A standard request: header, data, status.
    fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, Dir)>) -> (u32, u8) {
        write_header(self.mem, HDR, kind, sector);
        let mut bufs = vec![(HDR, 16, Dir::R)];
        if let Some((len, dir)) = data {
            bufs.push((DATA, len, dir));
        }
        bufs.push((STATUS, 1, Dir::W));
        self.submit(&bufs)
    }

    fn write(&mut self, sector: u64, bytes: &[u8]) -> u8 {
        self.mem.write_slice(bytes, GuestAddress(DATA)).unwrap();
        self.request(T_OUT, sector, Some((bytes.len() as u32, Dir::R)))
            .1
    }

    fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&vec![0xeeu8; len as usize], GuestAddress(DATA))
            .unwrap();
        let (used, status) = self.request(T_IN, sector, Some((len, Dir::W)));
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(DATA)).unwrap();
        if status == S_OK {
            assert_eq!(used, len + 1, "data and status byte");
        }
        (status, out)
    }

    /// A discard or write-zeroes request with `segments` (sector, count, flags).
    fn zero(&mut self, kind: u32, segments: &[(u64, u32, u32)]) -> u8 {
        let mut raw = Vec::new();
        for &(sector, count, flags) in segments {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&count.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        self.mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
        self.request(kind, 0, Some((raw.len() as u32, Dir::R))).1
    }

    /// Submits a chain the driver should never send; asserts the device
    /// now needs a reset and answered nothing.
    fn hostile(&mut self, descs: &[RawDescriptor]) {
        self.vq.add_desc_chains(descs, 0).unwrap();
        self.dev.process_queue(0);
        assert!(self.interrupt.needs_reset(), "hostile chain accepted");
        assert_eq!(self.vq.used().idx().load(), 0, "nothing used");
        // The device stays stopped until the driver resets it.
        self.dev.process_queue(0);
        assert_eq!(self.vq.used().idx().load(), 0);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn each_backend(test: impl Fn(Kind)) {
    test(Kind::Raw);
    test(Kind::Qcow2);
}

#[test]
fn configuration_space_describes_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Block::new(
        open(&image(dir.path(), Kind::Qcow2), false),
        false,
        [0; ID_BYTES],
    );
    let mut c = [0u8; CONFIG_LEN];
    dev.read_config(0, &mut c);
    let le32 = |at: usize| u32::from_le_bytes(c[at..at + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
    assert_eq!(le32(12), u32::from(QUEUE_SIZE) - 2, "seg_max");
    assert_eq!(le32(20), 512, "blk_size");
    assert_eq!(le32(36), MAX_DISCARD_SECTORS);
    assert_eq!(le32(40), MAX_DISCARD_SEG);
    assert_eq!(le32(48), MAX_WRITE_ZEROES_SECTORS);
    assert_eq!(le32(52), MAX_WRITE_ZEROES_SEG);
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    let f = dev.device_features();
    for bit in [
        F_SEG_MAX,
        F_BLK_SIZE,
        F_FLUSH,
        F_DISCARD,
        F_WRITE_ZEROES,
        F_RING_EVENT_IDX,
        F_RING_INDIRECT_DESC,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x}");
    }
    assert_eq!(f & F_RO, 0);
    assert_eq!(dev.device_type(), TYPE_BLOCK);
    assert!(dev.io_thread_handler().is_some(), "disks get an I/O thread");
}

#[test]
fn read_only_disk_offers_ro_and_no_discard() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Block::new(open(&image(dir.path(), Kind::Raw), true), true, [0; 20]);
    let f = dev.device_features();
    assert_ne!(f & F_RO, 0);
    assert_eq!(f & (F_DISCARD | F_WRITE_ZEROES), 0);
}

#[test]
fn write_then_read_back() {
    each_backend(|kind| {
        let dir = tempfile::tempdir().unwrap();
        let m = mem();
        let mut rig = Rig::new(&m, open(&image(dir.path(), kind), false), false);
        let data = pattern(8192, 7);
        assert_eq!(rig.write(100, &data), S_OK);
        let (status, back) = rig.read(100, 8192);
        assert_eq!(status, S_OK);
        assert_eq!(back, data);
        // Untouched sectors read as zeroes.
        let (status, back) = rig.read(0, 512);
        assert_eq!((status, back), (S_OK, vec![0u8; 512]));
        assert_eq!(rig.interrupt.status() & 1, 1, "used-ring interrupt");
    });
}

#[test]
fn data_is_on_disk_where_the_sector_says() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), Kind::Raw);
    let m = mem();
    let mut rig = Rig::new(&m, open(&path, false), false);
    assert_eq!(rig.write(3, &[0xab; 512]), S_OK);
    assert_eq!(rig.request(T_FLUSH, 0, None), (1, S_OK));
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[3 * 512..4 * 512], &[0xab; 512][..]);
    assert!(bytes[..3 * 512].iter().all(|&b| b == 0));
}

#[test]
fn any_layout_header_data_and_status_split_or_merged() {
    each_backend(|kind| {
        let dir = tempfile::tempdir().unwrap();
        let m = mem();
        let mut rig = Rig::new(&m, open(&image(dir.path(), kind), false), false);
        // OUT: header split in two descriptors, data in three pieces, the
        // last sharing a descriptor with the end of the header would be
        // too odd; status in its own.
        write_header(&m, HDR, T_OUT, 8);
        let data = pattern(1024, 3);
        m.write_slice(&data[..100], GuestAddress(DATA)).unwrap();
        m.write_slice(&data[100..], GuestAddress(DATA + 0x1000))
            .unwrap();
        let (_, status) = rig.submit(&[
            (HDR, 10, Dir::R),
            (HDR + 10, 6, Dir::R),
            (DATA, 100, Dir::R),
            (DATA + 0x1000, 924, Dir::R),
            (STATUS, 1, Dir::W),
        ]);
        assert_eq!(status, S_OK);
        // IN: header and nothing else readable; data and status in ONE
        // writable descriptor (status is its last byte).
        write_header(&m, HDR, T_IN, 8);
        let (used, _) = rig.submit(&[(HDR, 16, Dir::R), (DATA + 0x4000, 1025, Dir::W)]);
        assert_eq!(used, 1025);
        let mut back = vec![0u8; 1025];
        m.read_slice(&mut back, GuestAddress(DATA + 0x4000))
            .unwrap();
        assert_eq!(&back[..1024], &data[..]);
        assert_eq!(back[1024], S_OK);
    });
}

#[test]
fn indirect_descriptor_tables_are_followed() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut rig = Rig::new(&m, open(&image(dir.path(), Kind::Raw), false), false);
    assert_eq!(rig.write(1, &[0x5a; 512]), S_OK);
    let table = 0x40_0000u64;
    write_header(&m, HDR, T_IN, 1);
    for (i, d) in chain(
        0,
        &[(HDR, 16, Dir::R), (DATA, 512, Dir::W), (STATUS, 1, Dir::W)],
    )
    .into_iter()
    .enumerate()
    {
        m.write_obj(d, GuestAddress(table + 16 * i as u64)).unwrap();
    }
    let (used, status) = rig.submit_raw(&[raw(table, 48, VRING_DESC_F_INDIRECT, 0)]);
    assert_eq!((used, status), (513, S_OK));
    let mut back = [0u8; 512];
    m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, [0x5a; 512]);
}

#[test]
fn sectors_beyond_the_end_are_io_errors() {
    each_backend(|kind| {
        let dir = tempfile::tempdir().unwrap();
        let m = mem();
        let mut rig = Rig::new(&m, open(&image(dir.path(), kind), false), false);
        let last = DISK_SIZE / 512 - 1;
        assert_eq!(rig.read(last, 512).0, S_OK, "last sector is fine");
        assert_eq!(rig.read(last + 1, 512).0, S_IOERR, "one past the end");
        assert_eq!(rig.read(last, 1024).0, S_IOERR, "straddles the end");
        assert_eq!(rig.write(last + 1, &[1; 512]), S_IOERR);
        assert_eq!(rig.read(u64::MAX, 512).0, S_IOERR, "sector * 512 overflows");
        assert_eq!(rig.read(u64::MAX / 512, 512).0, S_IOERR, "end overflows");
        assert_eq!(rig.zero(T_DISCARD, &[(last, 2, 0)]), S_IOERR);
        assert_eq!(rig.zero(T_WRITE_ZEROES, &[(u64::MAX, 1, 0)]), S_IOERR);
    });
}

#[test]
fn lengths_that_are_not_whole_sectors_are_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), Kind::Raw);
    let m = mem();
    let mut rig = Rig::new(&m, open(&path, false), false);
    assert_eq!(rig.read(0, 100).0, S_IOERR);
    assert_eq!(rig.write(0, &[7; 700]), S_IOERR);
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    // A discard whose segment list is cut mid-segment.
    m.write_slice(&[0u8; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(rig.request(T_DISCARD, 0, Some((20, Dir::R))).1, S_IOERR);
}

#[test]
fn get_id_answers_the_serial() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut rig = Rig::new(&m, open(&image(dir.path(), Kind::Raw), false), false);
    let (used, status) = rig.request(T_GET_ID, 0, Some((20, Dir::W)));
    assert_eq!((used, status), (21, S_OK));
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..8], b"disk.img");
    assert!(id[8..].iter().all(|&b| b == 0), "NUL-padded");
    // A shorter buffer gets the ID cut.
    let (used, status) = rig.request(T_GET_ID, 0, Some((4, Dir::W)));
    assert_eq!((used, status), (5, S_OK));
}

#[test]
fn serials_come_from_the_file_name_or_the_fallback() {
    let id = disk_serial(
        Path::new("/images/a-very-long-disk-image-name.qcow2"),
        "vm-0",
    );
    assert_eq!(&id, b"a-very-long-disk-ima");
    let id = disk_serial(Path::new("/images/d\u{e9} 1.raw"), "vm-0");
    assert_eq!(&id[..6], b"d1.raw");
    let id = disk_serial(Path::new("/"), "lab-disk1");
    assert_eq!(&id[..9], b"lab-disk1");
    assert_eq!(id[9], 0);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut rig = Rig::new(&m, open(&image(dir.path(), Kind::Raw), false), false);
    assert_eq!(rig.request(10, 0, None), (1, S_UNSUPP), "GET_LIFETIME");
    assert_eq!(rig.request(0xdead, 0, Some((512, Dir::W))).1, S_UNSUPP);
}

#[test]
fn discard_and_write_zeroes_zero_the_ranges() {
    each_backend(|kind| {
        let dir = tempfile::tempdir().unwrap();
        let m = mem();
        let mut rig = Rig::new(&m, open(&image(dir.path(), kind), false), false);
        let data = pattern(256 * 1024, 9);
        assert_eq!(rig.write(0, &data), S_OK);
        // Discard sectors 8..136 and 200..208, write zeroes (with UNMAP
        // allowed) over 300..310.
        assert_eq!(rig.zero(T_DISCARD, &[(8, 128, 0), (200, 8, 0)]), S_OK);
        assert_eq!(rig.zero(T_WRITE_ZEROES, &[(300, 10, 1)]), S_OK);
        let (status, back) = rig.read(0, 256 * 1024);
        assert_eq!(status, S_OK);
        for (sector, chunk) in back.chunks(512).enumerate() {
            let zeroed = (8..136).contains(&sector)
                || (200..208).contains(&sector)
                || (300..310).contains(&sector);
            if zeroed {
                assert!(chunk.iter().all(|&b| b == 0), "sector {sector} zeroed");
            } else {
                assert_eq!(chunk, &data[sector * 512..(sector + 1) * 512], "{sector}");
            }
        }
    });
}

#[test]
fn discard_and_write_zeroes_refuse_bad_flags_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut rig = Rig::new(&m, open(&image(dir.path(), Kind::Raw), false), false);
    assert_eq!(
        rig.zero(T_DISCARD, &[(0, 8, 1)]),
        S_UNSUPP,
        "unmap on discard"
    );
    assert_eq!(
        rig.zero(T_WRITE_ZEROES, &[(0, 8, 2)]),
        S_UNSUPP,
        "unknown flag"
    );
    assert_eq!(
        rig.zero(T_DISCARD, &[(0, MAX_DISCARD_SECTORS + 1, 0)]),
        S_IOERR
    );
    let many = vec![(0u64, 1u32, 0u32); MAX_DISCARD_SEG as usize + 1];
    assert_eq!(rig.zero(T_DISCARD, &many), S_IOERR, "too many segments");
    assert_eq!(
        rig.request(T_DISCARD, 0, None).1,
        S_IOERR,
        "no segment at all"
    );
}

#[test]
fn a_bad_segment_stops_the_whole_request_before_any_change() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut rig = Rig::new(&m, open(&image(dir.path(), Kind::Qcow2), false), false);
    assert_eq!(rig.write(0, &[0x11; 4096]), S_OK);
    assert_eq!(rig.zero(T_DISCARD, &[(0, 8, 0), (u64::MAX, 1, 0)]), S_IOERR);
    assert_eq!(rig.read(0, 4096).1, vec![0x11; 4096]);
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_its_bytes() {
    each_backend(|kind| {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path(), kind);
        {
            let m = mem();
            let mut rig = Rig::new(&m, open(&path, false), false);
            assert_eq!(rig.write(0, &[0x42; 512]), S_OK);
            assert_eq!(rig.request(T_FLUSH, 0, None).1, S_OK);
        }
        let before = std::fs::read(&path).unwrap();
        let m = mem();
        let mut rig = Rig::new(&m, open(&path, true), true);
        assert_eq!(rig.write(0, &[0; 512]), S_IOERR);
        assert_eq!(rig.zero(T_DISCARD, &[(0, 1, 0)]), S_IOERR);
        assert_eq!(rig.zero(T_WRITE_ZEROES, &[(0, 1, 0)]), S_IOERR);
        assert_eq!(rig.request(T_FLUSH, 0, None).1, S_OK, "nothing to flush");
        assert_eq!(rig.read(0, 512), (S_OK, vec![0x42; 512]));
        drop(rig);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    });
}

#[test]
fn read_only_flag_alone_refuses_writes_on_a_writable_backend() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let mut rig = Rig::new(&m, open(&image(dir.path(), Kind::Raw), false), true);
    assert_eq!(rig.write(0, &[1; 512]), S_IOERR);
}

/// Records the backend calls, and what the status byte held when the
/// flush ran.
struct Recorder {
    inner: Arc<dyn BlockBackend>,
    mem: GuestMemoryMmap,
    log: Mutex<Vec<String>>,
}

impl Recorder {
    fn note(&self, what: &str) {
        self.log.lock().unwrap().push(what.to_string());
    }
}

impl BlockBackend for Recorder {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> disk::Result<()> {
        self.note("read");
        self.inner.read_vectored_at(offset, bufs)
    }
    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> disk::Result<()> {
        self.note("write");
        self.inner.write_vectored_at(offset, bufs)
    }
    fn flush(&self) -> disk::Result<()> {
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        self.note(&format!("flush(status={status:#x})"));
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> disk::Result<()> {
        self.note("discard");
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> disk::Result<()> {
        self.note("write_zeroes");
        self.inner.write_zeroes(offset, len)
    }
    fn block_status(&self, offset: u64, len: u64) -> disk::Result<(BlockStatus, u64)> {
        self.inner.block_status(offset, len)
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn format(&self) -> ImageFormat {
        self.inner.format()
    }
    fn backing(&self) -> Option<&dyn BlockBackend> {
        self.inner.backing()
    }
}

fn recorder(dir: &Path, kind: Kind, mem: &GuestMemoryMmap) -> Arc<Recorder> {
    Arc::new(Recorder {
        inner: open(&image(dir, kind), false),
        mem: mem.clone(),
        log: Mutex::new(Vec::new()),
    })
}

#[test]
fn flush_reaches_the_backend_before_the_status_is_written() {
    each_backend(|kind| {
        let dir = tempfile::tempdir().unwrap();
        let m = mem();
        let rec = recorder(dir.path(), kind, &m);
        let mut rig = Rig::new(&m, rec.clone(), false);
        assert_eq!(rig.write(0, &[3; 512]), S_OK);
        assert_eq!(rig.request(T_FLUSH, 0, None), (1, S_OK));
        assert_eq!(
            *rec.log.lock().unwrap(),
            vec!["write", "flush(status=0xff)"],
            "the write, then the flush while the status byte was untouched"
        );
    });
}

#[test]
fn without_the_flush_feature_every_write_is_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem();
    let rec = recorder(dir.path(), Kind::Qcow2, &m);
    let mut rig = Rig::with_features(&m, rec.clone(), false, F_VERSION_1);
    assert_eq!(rig.write(0, &[3; 512]), S_OK);
    assert_eq!(
        *rec.log.lock().unwrap(),
        vec!["write", "flush(status=0xff)"]
    );
}

// Hostile chains: each one marks the device as needing a reset, answers
// nothing and never panics.

fn hostile_rig(m: &GuestMemoryMmap) -> (tempfile::TempDir, Rig<'_>) {
    let dir = tempfile::tempdir().unwrap();
    let rig = Rig::new(m, open(&image(dir.path(), Kind::Raw), false), false);
    write_header(m, HDR, T_IN, 0);
    (dir, rig)
}

/// A fresh device refuses `descs` (see `Rig::hostile`).
fn assert_hostile(descs: &[RawDescriptor]) {
    let m = mem();
    let (_dir, mut rig) = hostile_rig(&m);
    rig.hostile(descs);
}

#[test]
fn hostile_chain_without_a_status_descriptor() {
    assert_hostile(&chain(0, &[(HDR, 16, Dir::R), (DATA, 512, Dir::R)]));
}

#[test]
fn hostile_chain_with_an_empty_writable_descriptor_only() {
    assert_hostile(&chain(0, &[(HDR, 16, Dir::R), (STATUS, 0, Dir::W)]));
}

#[test]
fn hostile_chain_with_a_short_header() {
    assert_hostile(&chain(0, &[(HDR, 8, Dir::R), (STATUS, 1, Dir::W)]));
}

#[test]
fn hostile_chain_with_the_header_writable() {
    assert_hostile(&chain(0, &[(HDR, 16, Dir::W), (STATUS, 1, Dir::W)]));
}

#[test]
fn hostile_chain_readable_after_writable() {
    assert_hostile(&chain(
        0,
        &[
            (HDR, 16, Dir::R),
            (DATA, 512, Dir::W),
            (DATA + 512, 512, Dir::R),
            (STATUS, 1, Dir::W),
        ],
    ));
}

#[test]
fn hostile_chain_with_a_buffer_outside_guest_memory() {
    assert_hostile(&chain(
        0,
        &[
            (HDR, 16, Dir::R),
            (MEM_SIZE as u64 - 256, 512, Dir::W),
            (STATUS, 1, Dir::W),
        ],
    ));
}

#[test]
fn hostile_chain_with_the_status_outside_guest_memory() {
    assert_hostile(&chain(0, &[(HDR, 16, Dir::R), (1 << 40, 1, Dir::W)]));
}

#[test]
fn hostile_chain_that_loops() {
    assert_hostile(&[
        raw(HDR, 16, VRING_DESC_F_NEXT, 1),
        raw(DATA, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
        raw(STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
    ]);
}

#[test]
fn hostile_chain_with_a_next_index_past_the_queue() {
    assert_hostile(&[
        raw(HDR, 16, VRING_DESC_F_NEXT, 1),
        raw(STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, QSIZE + 5),
    ]);
}

#[test]
fn hostile_chain_with_an_indirect_table_outside_memory() {
    assert_hostile(&[
        raw(HDR, 16, VRING_DESC_F_NEXT, 1),
        raw(1 << 40, 32, VRING_DESC_F_INDIRECT, 0),
    ]);
}

#[test]
fn hostile_chain_longer_than_4_gib() {
    assert_hostile(&[
        raw(HDR, 16, VRING_DESC_F_NEXT, 1),
        raw(DATA, u32::MAX, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
        raw(STATUS, 1, VRING_DESC_F_WRITE, 0),
    ]);
}

#[test]
fn avail_index_beyond_the_queue_size_needs_reset_instead_of_spinning() {
    let m = mem();
    let (_dir, rig) = hostile_rig(&m);
    rig.vq
        .add_desc_chains(&chain(0, &[(HDR, 16, Dir::R), (STATUS, 1, Dir::W)]), 0)
        .unwrap();
    rig.vq.avail().idx().store(QSIZE + 1);
    // On the disk's own I/O thread, as in a VM.
    returns_in_time(rig.dev.worker(), |worker| lock(worker).process());
    assert!(rig.interrupt.needs_reset());
    assert_eq!(rig.vq.used().idx().load(), 0, "nothing used");
}

#[test]
fn reset_after_a_hostile_chain_starts_afresh() {
    let m = mem();
    let (_dir, mut rig) = hostile_rig(&m);
    rig.hostile(&chain(0, &[(HDR, 8, Dir::R)]));
    rig.dev.reset();
    rig.interrupt.reset();
    // A new activation on a fresh queue serves requests again.
    let vq = MockSplitQueue::new(&m, QSIZE);
    rig.dev
        .activate(ActivateContext {
            mem: m.clone(),
            queues: vec![vq.create_queue().unwrap()],
            interrupt: rig.interrupt.clone(),
            features: FEATURES,
        })
        .unwrap();
    rig.vq = vq;
    rig.next_desc = 0;
    rig.submitted = 0;
    assert_eq!(rig.read(0, 512).0, S_OK);
}

#[test]
fn request_framing_reports_each_fault() {
    use super::request::{parse, ChainError};
    let m = mem();
    let descs = |raws: &[RawDescriptor]| -> Vec<virtio_queue::desc::split::Descriptor> {
        raws.iter()
            .map(|r| virtio_queue::desc::split::Descriptor::from(*r))
            .collect()
    };
    let parsed = |bufs: &[(u64, u32, Dir)]| parse(descs(&chain(0, bufs)).into_iter(), &m);
    write_header(&m, HDR, T_OUT, 77);
    let req = parsed(&[(HDR, 16, Dir::R), (DATA, 1024, Dir::R), (STATUS, 1, Dir::W)]).unwrap();
    assert_eq!((req.kind, req.sector), (T_OUT, 77));
    assert_eq!(request::total_len(&req.readable), 1024);
    assert!(req.writable.is_empty());
    assert_eq!(req.status, GuestAddress(STATUS));
    assert_eq!(parsed(&[(HDR, 16, Dir::R)]), Err(ChainError::NoStatus));
    assert_eq!(
        parsed(&[(HDR, 15, Dir::R), (STATUS, 1, Dir::W)]),
        Err(ChainError::ShortHeader)
    );
    assert_eq!(
        parsed(&[(HDR, 16, Dir::W), (STATUS, 1, Dir::R)]),
        Err(ChainError::Order)
    );
    assert!(matches!(
        parsed(&[(HDR, 16, Dir::R), (1 << 40, 1, Dir::W)]),
        Err(ChainError::OutsideMemory { .. })
    ));
    assert_eq!(parse(std::iter::empty(), &m), Err(ChainError::Truncated));
}
