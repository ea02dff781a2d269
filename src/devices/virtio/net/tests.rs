//! virtio-net against vm-memory-backed mock queues and a real NAT (host-only,
//! loopback sockets): header handling, RX/TX chains, hostile chains,
//! backpressure.

use std::net::{SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::wire::{ArpOperation, ArpRepr};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::interrupt::{VirtioInterrupt, INT_USED_RING};
use crate::devices::virtio::test_support::returns_in_time;
use crate::devices::virtio::F_VERSION_1;
use crate::net::testkit::{self, GuestSide, GATEWAY_IP, GUEST_IP};
use crate::net::{
    EpollRegistry, GuestFrame, GuestPort, NetHdr, NullRegistry, Outbound, F_NEEDS_CSUM, GSO_TCPV4,
    NET_HDR_LEN,
};
use crate::vmm::memory::GuestMemoryMmap;

const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x1_0000;
/// virtio-queue's mock lays the used ring out after only half of the
/// avail ring, so at most RING_SIZE / 2 chains may be posted per queue.
const RING_SIZE: u16 = 1024;
/// Buffers live from here up.
const BUFS: u64 = 0x10_0000;

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// A device on a NAT that reaches nothing beyond the host.
fn host_only_net() -> Net {
    Net::new(NetSettings::nat(
        MacAddress::for_vm("test"),
        NatConfig {
            outbound: Outbound::HostOnly,
            ..NatConfig::default()
        },
        ForwardListeners::default(),
    ))
}

struct Rig<'m> {
    mem: &'m GuestMemoryMmap,
    rx: MockSplitQueue<'m, GuestMemoryMmap>,
    tx: MockSplitQueue<'m, GuestMemoryMmap>,
    net: Net,
    interrupt: Arc<VirtioInterrupt>,
    /// Next free descriptor index in each ring.
    rx_next: u16,
    tx_next: u16,
    /// Next free buffer address.
    buf_next: u64,
}

impl<'m> Rig<'m> {
    /// A started device whose driver accepted `features`.
    fn new(mem: &'m GuestMemoryMmap, features: u64) -> Self {
        Self::with(mem, features, host_only_net())
    }

    /// [`Rig::new`] with `net` as the device.
    fn with(mem: &'m GuestMemoryMmap, features: u64, mut net: Net) -> Self {
        let rx = MockSplitQueue::create(mem, GuestAddress(RX_RING), RING_SIZE);
        let tx = MockSplitQueue::create(mem, GuestAddress(TX_RING), RING_SIZE);
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        net.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()],
            interrupt: interrupt.clone(),
            features: features | F_VERSION_1,
        })
        .unwrap();
        Rig {
            mem,
            rx,
            tx,
            net,
            interrupt,
            rx_next: 0,
            tx_next: 0,
            buf_next: BUFS,
        }
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.buf_next;
        self.buf_next += u64::from(len).next_multiple_of(0x100);
        addr
    }

    /// Posts one RX chain of writable buffers with these sizes.
    fn post_rx(&mut self, sizes: &[u32]) {
        let start = self.rx_next;
        let descs: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let last = i + 1 == sizes.len();
                let flags = VRING_DESC_F_WRITE | if last { 0 } else { VRING_DESC_F_NEXT };
                desc(self.alloc(len), len, flags, start + i as u16 + 1)
            })
            .collect();
        self.rx.add_desc_chains(&descs, start).unwrap();
        self.rx_next += sizes.len() as u16;
    }

    /// Puts raw descriptors in the TX ring as they are.
    fn post_tx_raw(&mut self, descs: &[RawDescriptor]) {
        self.tx.add_desc_chains(descs, self.tx_next).unwrap();
        self.tx_next += descs.len() as u16;
    }

    /// Sends `bytes` (header included) split at the given points.
    fn post_tx(&mut self, bytes: &[u8], splits: &[usize]) {
        let start = self.tx_next;
        let mut cuts = vec![0];
        cuts.extend_from_slice(splits);
        cuts.push(bytes.len());
        let mut descs = Vec::new();
        for (i, pair) in cuts.windows(2).enumerate() {
            let piece = &bytes[pair[0]..pair[1]];
            let addr = self.alloc(piece.len() as u32);
            self.mem.write_slice(piece, GuestAddress(addr)).unwrap();
            let last = i + 2 == cuts.len();
            let flags = if last { 0 } else { VRING_DESC_F_NEXT };
            descs.push(desc(addr, piece.len() as u32, flags, start + i as u16 + 1));
        }
        self.post_tx_raw(&descs);
    }

    fn send_frame(&mut self, frame: &[u8]) {
        let mut bytes = NetHdr::default().to_bytes().to_vec();
        bytes.extend_from_slice(frame);
        self.post_tx(&bytes, &[]);
    }

    fn kick(&mut self, queue: usize, reg: &mut dyn SocketRegistry) {
        self.net.queue_notified(queue, reg);
    }

    /// Kicks `queue` from another thread; fails if the device never returns.
    fn kick_in_time(&mut self, queue: usize) {
        let net = std::mem::replace(&mut self.net, host_only_net());
        self.net = returns_in_time(net, move |net| net.queue_notified(queue, &mut NullRegistry));
    }

    /// Used RX entries so far, each as the bytes the device wrote (the
    /// chain's buffers concatenated, cut at the used length).
    fn received(&self) -> Vec<Vec<u8>> {
        let used = self.rx.used();
        let count = used.idx().load();
        (0..count)
            .map(|i| {
                let elem = used.ring().ref_at(usize::from(i)).unwrap().load();
                let mut out = Vec::new();
                let mut index = elem.id() as u16;
                let mut left = elem.len() as usize;
                while left > 0 {
                    let d = SplitDescriptor::from(self.rx.desc_table().load(index).unwrap());
                    let n = left.min(d.len() as usize);
                    let mut chunk = vec![0u8; n];
                    self.mem
                        .read_slice(&mut chunk, GuestAddress(d.addr().0))
                        .unwrap();
                    out.extend_from_slice(&chunk);
                    left -= n;
                    index = d.next();
                }
                out
            })
            .collect()
    }

    /// Received frames with mergeable buffers joined by `num_buffers`.
    fn frames(&self) -> Vec<(NetHdr, u16, Vec<u8>)> {
        let mut pieces = self.received().into_iter();
        let mut frames = Vec::new();
        while let Some(first) = pieces.next() {
            let hdr = NetHdr::parse(&first).unwrap();
            let count = u16::from_le_bytes([first[10], first[11]]);
            let mut data = first[NET_HDR_LEN..].to_vec();
            for _ in 1..count {
                data.extend(pieces.next().expect("num_buffers chains used"));
            }
            frames.push((hdr, count, data));
        }
        frames
    }

    fn tx_used(&self) -> u16 {
        self.tx.used().idx().load()
    }
}

fn arp_request() -> Vec<u8> {
    GuestSide::new().arp_request(GATEWAY_IP)
}

fn assert_arp_reply(data: &[u8]) {
    let seen = testkit::parse(&GuestFrame {
        hdr: NetHdr::default(),
        data: data.to_vec(),
    });
    match seen.arp {
        Some(ArpRepr::EthernetIpv4 {
            operation,
            source_protocol_addr,
            ..
        }) => {
            assert_eq!(operation, ArpOperation::Reply);
            assert_eq!(source_protocol_addr, GATEWAY_IP);
        }
        other => panic!("not an ARP reply: {other:?}"),
    }
}

// ---- Configuration ------------------------------------------------------

#[test]
fn config_space_has_mac_link_up_and_mtu() {
    let net = Net::new(NetSettings::nat(
        "52:54:00:01:02:03".parse().unwrap(),
        NatConfig {
            mtu: 9000,
            ..NatConfig::default()
        },
        ForwardListeners::default(),
    ));
    let mut config = [0u8; 12];
    net.read_config(0, &mut config);
    assert_eq!(config[..6], [0x52, 0x54, 0, 1, 2, 3]);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 9000);
    let mut word = [0u8; 2];
    net.read_config(10, &mut word);
    assert_eq!(u16::from_le_bytes(word), 9000, "partial reads");
    let features = net.device_features();
    for b in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(features & bit(b), 0, "feature {b}");
    }
    assert_ne!(features & F_RING_EVENT_IDX, 0);
    assert_eq!(net.queue_max_sizes().len(), 2);
}

#[test]
fn activation_needs_both_queues() {
    let m = mem();
    let rx = MockSplitQueue::create(&m, GuestAddress(RX_RING), 16);
    let mut tx_queue: Queue = MockSplitQueue::create(&m, GuestAddress(TX_RING), 16)
        .create_queue()
        .unwrap();
    tx_queue.set_ready(false);
    let mut net = Net::new(NetSettings::nat(
        MacAddress::for_vm("t"),
        NatConfig::default(),
        ForwardListeners::default(),
    ));
    let err = net.activate(ActivateContext {
        mem: m.clone(),
        queues: vec![rx.create_queue().unwrap(), tx_queue],
        interrupt: Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        features: F_VERSION_1,
    });
    assert!(matches!(err, Err(ActivateError::QueueNotReady(TX_QUEUE))));
}

#[test]
fn negotiated_features_set_the_nats_offloads() {
    let m = mem();
    let all = Rig::new(&m, FEATURES);
    let a = all.net.active.as_ref().unwrap();
    assert_eq!(
        (a.offloads, a.mergeable),
        (
            Offloads {
                csum: true,
                tso4: true
            },
            true
        )
    );
    let m2 = mem();
    let none = Rig::new(&m2, bit(VIRTIO_NET_F_GUEST_TSO4));
    let a = none.net.active.as_ref().unwrap();
    assert_eq!(a.offloads, Offloads::default(), "TSO needs GUEST_CSUM");
    assert!(!a.mergeable);
}

// ---- TX and RX ------------------------------------------------------------

#[test]
fn tx_frame_reaches_the_nat_and_the_reply_fills_an_rx_buffer() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    rig.post_rx(&[2048]);
    rig.send_frame(&arp_request());
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert_eq!(rig.tx_used(), 1);
    assert_eq!(rig.net.counters().tx_frames, 1);
    assert_eq!(rig.net.nat().unwrap().counters().frames_from_guest, 1);
    let frames = rig.frames();
    assert_eq!(frames.len(), 1);
    let (hdr, num_buffers, data) = &frames[0];
    assert_eq!(*hdr, NetHdr::default());
    assert_eq!(*num_buffers, 1);
    assert_arp_reply(data);
    assert_eq!(rig.net.counters().rx_frames, 1);
    assert_ne!(rig.interrupt.status() & INT_USED_RING, 0);
}

#[test]
fn tx_header_and_frame_may_be_split_anywhere() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    rig.post_rx(&[2048]);
    let mut bytes = NetHdr::default().to_bytes().to_vec();
    bytes.extend(arp_request());
    // Header cut in two, frame cut in the Ethernet header.
    rig.post_tx(&bytes, &[5, 12, 20]);
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert_eq!(rig.net.counters().tx_frames, 1);
    assert_arp_reply(&rig.frames()[0].2);
}

#[test]
fn rx_header_may_span_descriptors_without_mergeable_buffers() {
    let m = mem();
    let mut rig = Rig::new(&m, 0);
    // 4 + 8 bytes of header, then the frame.
    rig.post_rx(&[4, 8, 100]);
    rig.send_frame(&arp_request());
    rig.kick(TX_QUEUE, &mut NullRegistry);
    let frames = rig.frames();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].1, 1, "num_buffers is 1 without MRG_RXBUF");
    assert_arp_reply(&frames[0].2);
}

#[test]
fn rx_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_kept() {
    let m = mem();
    let mut rig = Rig::new(&m, 0);
    rig.post_rx(&[30]);
    rig.send_frame(&arp_request());
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert_eq!(rig.received().len(), 0);
    assert_eq!(rig.net.counters().rx_too_big, 1);
    assert!(!rig.interrupt.needs_reset());
    // A buffer big enough takes the next frame; the small one is skipped
    // again (it stays first in the ring).
    rig.send_frame(&arp_request());
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert_eq!(rig.net.counters().rx_too_big, 2);
}

/// A guest flow to a UDP server on the host's loopback, reached through
/// the gateway address as a guest would; returns the server.
fn udp_peer(rig: &mut Rig, reg: &mut EpollRegistry) -> (UdpSocket, std::net::SocketAddr) {
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let frame = GuestSide::new().udp(
        SocketAddrV4::new(GUEST_IP, 40000),
        SocketAddrV4::new(GATEWAY_IP, port),
        b"hello",
    );
    rig.send_frame(&frame);
    rig.kick(TX_QUEUE, reg);
    let mut buf = [0u8; 16];
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (n, nat_side) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    (server, nat_side)
}

/// Runs the event loop's part by hand until `done` or `limit` passed.
fn poll(rig: &mut Rig, reg: &mut EpollRegistry, limit: Duration, done: impl Fn(&Rig) -> bool) {
    let deadline = Instant::now() + limit;
    while !done(rig) && Instant::now() < deadline {
        for (token, events) in reg.wait(Duration::from_millis(10)).unwrap() {
            rig.net.backend_event(token, events, reg);
        }
    }
}

fn udp_payloads(rig: &Rig) -> Vec<Vec<u8>> {
    rig.frames()
        .iter()
        .map(|(hdr, _, data)| {
            testkit::parse(&GuestFrame {
                hdr: *hdr,
                data: data.clone(),
            })
            .payload
        })
        .collect()
}

#[test]
fn mergeable_buffers_carry_a_frame_over_several_chains() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    let mut reg = EpollRegistry::new().unwrap();
    let (server, nat_side) = udp_peer(&mut rig, &mut reg);
    for _ in 0..4 {
        rig.post_rx(&[512]);
    }
    let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
    server.send_to(&payload, nat_side).unwrap();
    poll(&mut rig, &mut reg, Duration::from_secs(5), |r| {
        !r.received().is_empty()
    });
    let frames = rig.frames();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].1, 3, "12 + 1442 bytes in 512-byte buffers");
    assert_eq!(rig.received().len(), 3);
    assert_eq!(udp_payloads(&rig)[0], payload);
}

#[test]
fn without_rx_buffers_the_nat_stops_reading_and_resumes_when_posted() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    let mut reg = EpollRegistry::new().unwrap();
    let (server, nat_side) = udp_peer(&mut rig, &mut reg);
    // More datagrams than the NAT queues for the guest (256), in two
    // halves so the NAT socket's receive buffer never overflows.
    const SENT: usize = 300;
    for half in [0..SENT / 2, SENT / 2..SENT] {
        for i in half {
            server.send_to(&(i as u16).to_be_bytes(), nat_side).unwrap();
        }
        // Loopback delivery is immediate: a short settle suffices.
        poll(&mut rig, &mut reg, Duration::from_millis(300), |_| false);
    }
    let waiting = rig.net.nat().unwrap().pending_frames();
    assert!(
        (1..SENT).contains(&waiting),
        "the NAT holds what the guest cannot take and leaves the rest in the socket: {waiting}"
    );
    assert_eq!(rig.net.nat().unwrap().counters().dropped_to_guest, 0);
    assert!(rig.received().is_empty());

    // The guest posts buffers and notifies RX: everything arrives, in order.
    for _ in 0..SENT + 10 {
        rig.post_rx(&[256]);
    }
    rig.kick(RX_QUEUE, &mut reg);
    poll(&mut rig, &mut reg, Duration::from_secs(5), |r| {
        r.received().len() >= SENT
    });
    let got = udp_payloads(&rig);
    assert_eq!(got.len(), SENT);
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p[..], (i as u16).to_be_bytes(), "datagram {i}");
    }
    assert_eq!(rig.net.nat().unwrap().counters().dropped_to_guest, 0);
}

#[test]
fn tso_segments_from_the_nat_keep_their_offload_header() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    rig.post_rx(&[4096]);
    // Drive the RX port directly with a frame as the NAT would send it.
    let frame = GuestFrame {
        hdr: NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        },
        data: vec![0xab; 3000],
    };
    let active = rig.net.active.as_mut().unwrap();
    let mut counters = NetCounters::default();
    let mut port = RxPort::new(
        &mut active.rx,
        &active.service,
        true,
        active.offloads,
        &mut counters,
    );
    assert!(port.send(&frame).is_ok());
    assert_eq!(
        port.offloads(),
        Offloads {
            csum: true,
            tso4: true
        }
    );
    assert!(matches!(port.finish(), Ok(true)));
    let frames = rig.frames();
    assert_eq!(frames[0].0, frame.hdr);
    assert_eq!(frames[0].2, frame.data);
}

// ---- Hostile chains ------------------------------------------------------

#[test]
fn tx_chain_shorter_than_the_header_is_dropped_and_counted() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    rig.post_tx(&[0u8; 11], &[]);
    rig.send_frame(&arp_request());
    rig.post_rx(&[2048]);
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert_eq!(rig.tx_used(), 2, "both chains returned");
    assert_eq!(rig.net.counters().tx_malformed, 1);
    assert_eq!(
        rig.net.counters().tx_frames,
        1,
        "the next chain still works"
    );
    assert!(!rig.interrupt.needs_reset());
}

#[test]
fn tx_chain_with_a_writable_buffer_is_dropped() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    rig.post_tx_raw(&[
        desc(BUFS, 64, VRING_DESC_F_NEXT, 1),
        desc(BUFS + 0x1000, 64, VRING_DESC_F_WRITE, 0),
    ]);
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert_eq!(rig.net.counters().tx_malformed, 1);
    assert_eq!(rig.net.nat().unwrap().counters().frames_from_guest, 0);
    assert!(!rig.interrupt.needs_reset());
}

#[test]
fn tx_chain_longer_than_any_frame_is_dropped_without_reading_it() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    // Claims 4 GiB: must not be allocated or read.
    rig.post_tx_raw(&[desc(BUFS, u32::MAX, 0, 0)]);
    rig.post_tx_raw(&[
        desc(BUFS, 40_000, VRING_DESC_F_NEXT, 2),
        desc(BUFS, 40_000, 0, 0),
    ]);
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert_eq!(rig.net.counters().tx_malformed, 2);
    assert_eq!(rig.tx_used(), 2);
    assert!(!rig.interrupt.needs_reset());
}

#[test]
fn tx_buffer_outside_guest_memory_needs_reset_without_panic() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    rig.post_tx_raw(&[desc(0xffff_ffff_0000, 64, 0, 0)]);
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert!(rig.interrupt.needs_reset());
    assert!(rig.net.active.is_none(), "stopped until the driver resets");
    // Further kicks are ignored; the NAT still runs.
    rig.send_frame(&arp_request());
    rig.kick(TX_QUEUE, &mut NullRegistry);
    rig.net.tick(&mut NullRegistry);
    assert_eq!(rig.net.nat().unwrap().counters().frames_from_guest, 0);
}

#[test]
fn tx_descriptor_loop_terminates() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    rig.post_tx_raw(&[
        desc(BUFS, 8, VRING_DESC_F_NEXT, 1),
        desc(BUFS + 0x100, 8, VRING_DESC_F_NEXT, 0),
    ]);
    rig.kick(TX_QUEUE, &mut NullRegistry);
    // The chain is cut at the queue size: a bounded, garbage frame.
    assert_eq!(rig.tx_used(), 1);
    assert!(!rig.interrupt.needs_reset());
}

#[test]
fn tx_next_index_out_of_range_ends_the_chain() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    let mut bytes = NetHdr::default().to_bytes().to_vec();
    bytes.extend(arp_request());
    m.write_slice(&bytes, GuestAddress(BUFS)).unwrap();
    rig.post_tx_raw(&[desc(BUFS, bytes.len() as u32, VRING_DESC_F_NEXT, 9999)]);
    rig.post_rx(&[2048]);
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert_eq!(rig.tx_used(), 1);
    assert!(!rig.interrupt.needs_reset());
}

#[test]
fn tx_garbage_frames_are_counted_by_the_nat() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    let mut bytes = NetHdr {
        flags: 0xff,
        gso_type: 0xff,
        hdr_len: u16::MAX,
        gso_size: u16::MAX,
        csum_start: u16::MAX,
        csum_offset: u16::MAX,
    }
    .to_bytes()
    .to_vec();
    bytes.extend_from_slice(&[0xee; 9]);
    rig.post_tx(&bytes, &[]);
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert_eq!(rig.net.counters().tx_frames, 1);
    assert_eq!(rig.net.nat().unwrap().counters().malformed, 1);
}

#[test]
fn rx_buffer_outside_guest_memory_needs_reset_without_panic() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    let start = rig.rx_next;
    rig.rx
        .add_desc_chains(
            &[desc(0xffff_ffff_0000, 2048, VRING_DESC_F_WRITE, 0)],
            start,
        )
        .unwrap();
    rig.send_frame(&arp_request());
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert!(rig.interrupt.needs_reset());
    assert!(rig.net.active.is_none());
}

#[test]
fn rx_chain_without_writable_buffers_needs_reset_with_mergeable_buffers() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    rig.rx
        .add_desc_chains(&[desc(BUFS, 2048, 0, 0)], 0)
        .unwrap();
    rig.send_frame(&arp_request());
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert!(rig.interrupt.needs_reset());
}

#[test]
fn tx_avail_index_beyond_the_queue_size_needs_reset_instead_of_spinning() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    rig.send_frame(&arp_request());
    rig.tx.avail().idx().store(RING_SIZE + 1);
    rig.kick_in_time(TX_QUEUE);
    assert!(rig.interrupt.needs_reset());
    assert!(rig.net.active.is_none());
    assert_eq!(rig.net.nat().unwrap().counters().frames_from_guest, 0);
}

#[test]
fn rx_avail_index_beyond_the_queue_size_needs_reset_instead_of_stalling() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    rig.post_rx(&[2048]);
    rig.rx.avail().idx().store(RING_SIZE + 1);
    // The gateway's ARP reply has nowhere legal to go.
    rig.send_frame(&arp_request());
    rig.kick_in_time(TX_QUEUE);
    assert_eq!(rig.tx_used(), 1, "TX itself is fine");
    assert!(rig.interrupt.needs_reset());
    assert!(rig.net.active.is_none());
    assert_eq!(rig.rx.used().idx().load(), 0);
}

#[test]
fn reset_stops_the_device_and_keeps_the_nat() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    rig.net.reset();
    rig.send_frame(&arp_request());
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert_eq!(rig.tx_used(), 0);
    // Frames the NAT makes meanwhile wait (Unplugged is always busy).
    rig.net
        .backend
        .guest_frame(&NetHdr::default(), &arp_request(), &mut NullRegistry);
    rig.net.flush(&mut NullRegistry);
    assert_eq!(rig.net.nat().unwrap().pending_frames(), 1);
}

#[test]
fn the_nat_timer_is_only_needed_while_there_is_traffic() {
    let m = mem();
    let mut rig = Rig::new(&m, FEATURES);
    assert!(
        !rig.net.nat().unwrap().needs_tick(),
        "an idle VM needs no timer"
    );
    rig.post_rx(&[2048]);
    rig.send_frame(&arp_request());
    rig.kick(TX_QUEUE, &mut NullRegistry);
    assert!(!rig.net.nat().unwrap().needs_tick(), "ARP opens no flow");
    let mut reg = EpollRegistry::new().unwrap();
    let _peer = udp_peer(&mut rig, &mut reg);
    assert!(
        rig.net.nat().unwrap().needs_tick(),
        "a UDP flow has a timeout to run"
    );
}

// ---- On a lab network's member link ---------------------------------------

/// Frame `i` of the pause test: its number after the Ethernet header, and
/// a size that varies.
fn numbered_frame(i: u16) -> Vec<u8> {
    let mut frame = vec![i as u8; 50_000 + usize::from(i % 7) * 1000];
    frame[..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1, 0x52, 0x54, 0, 0, 0, 2]);
    frame[14..16].copy_from_slice(&i.to_be_bytes());
    frame
}

/// A network that stops reading a member makes the member's card stop
/// taking TX chains (the guest's ring fills, as with a real card's full
/// FIFO) instead of dropping frames; nothing spins meanwhile, the device
/// answers kicks at once, and once the network reads again every frame
/// arrives, in order.
#[test]
fn a_full_member_link_pauses_tx_and_loses_nothing_once_the_network_reads() {
    use crate::network::link::MemberLink;
    use crate::network::protocol::JoinRequest;
    use crate::network::NetworkDir;
    use crate::switch::wire::{FrameReader, Framing, LEN_PREFIX};
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    let m = mem();
    let (ours, mut network) = UnixStream::pair().unwrap();
    let request = JoinRequest {
        name: "web".into(),
        mac: MacAddress::for_vm("web"),
        ip: None,
        forwards: Vec::new(),
        ingress: Vec::new(),
    };
    let link = MemberLink::joined(NetworkDir::named("lab").unwrap(), request, ours).unwrap();
    let net = Net::new(NetSettings {
        mac: MacAddress::for_vm("web"),
        mtu: 1500,
        backend: Box::new(link),
        nat_view: None,
    });
    let mut rig = Rig::with(&m, FEATURES, net);
    let mut reg = EpollRegistry::new().unwrap();
    rig.net.start(&mut reg);
    // About 10 MB: more than the link holds (4 MiB) and the socket too.
    const FRAMES: u16 = 200;
    let frames: Vec<Vec<u8>> = (0..FRAMES).map(numbered_frame).collect();
    for frame in &frames {
        rig.send_frame(frame);
    }
    rig.kick(TX_QUEUE, &mut reg);
    let taken = rig.tx_used();
    assert!(rig.net.tx_paused(), "paused after {taken} frames");
    assert!((1..FRAMES).contains(&taken), "{taken} of {FRAMES} taken");

    // The network reads nothing: the loop is not woken over and over, and
    // a kick returns at once and takes nothing more.
    let mut wakeups = 0;
    let idle = Instant::now();
    while idle.elapsed() < Duration::from_millis(300) {
        for (token, events) in reg.wait(Duration::from_millis(20)).unwrap() {
            wakeups += 1;
            rig.net.backend_event(token, events, &mut reg);
        }
    }
    assert!(wakeups <= 2, "{wakeups} wake-ups while paused");
    assert!(!rig.net.needs_tick(), "no timer while paused");
    rig.kick_in_time(TX_QUEUE);
    assert_eq!(rig.tx_used(), taken, "still paused");

    // It reads again: each EPOLLOUT lets the device take more, to the end.
    let total: usize = frames
        .iter()
        .map(|f| LEN_PREFIX + NET_HDR_LEN + f.len())
        .sum();
    network
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = network.by_ref().take(total as u64).read_to_end(&mut bytes);
        bytes
    });
    // Until the network has read it all (the link writes its last
    // frames after the last chain was taken).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() && Instant::now() < deadline {
        for (token, events) in reg.wait(Duration::from_millis(20)).unwrap() {
            rig.net.backend_event(token, events, &mut reg);
        }
    }
    assert_eq!(rig.tx_used(), FRAMES, "every chain taken");
    assert!(!rig.net.tx_paused());
    let bytes = reader.join().unwrap();
    let mut reader = FrameReader::new(Framing::VnetHdr);
    let (mut got, mut rest) = (Vec::new(), &bytes[..]);
    loop {
        while let Some(next) = reader.next_frame() {
            got.push(next.unwrap().1.to_vec());
        }
        if !reader.fill(&mut rest).unwrap() {
            break;
        }
    }
    assert_eq!(got.len(), frames.len(), "no frame lost");
    assert!(got == frames, "every frame whole and in order");
}
