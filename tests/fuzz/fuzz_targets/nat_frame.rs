//! Fuzzes the NAT's frame-input path: a sequence of guest frames, with host
//! events and timers in between, must never panic the engine.
//!
//! Input: records of [flags, len_hi, len_lo, frame...]. Flag bits: 0 marks
//! the L4 checksum valid (as a TAP/virtio offload would), 1 repairs the IPv4
//! header checksum so deeper layers are reached, 2 polls host sockets and
//! runs timers afterwards. Only the fuzzer's own loopback ports are
//! reachable (no traffic leaves the machine).

#![no_main]

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmlab::net::{
    EpollRegistry, ForwardListeners, HostLoopback, Nat, NatConfig, NetHdr, Outbound, F_DATA_VALID,
};

/// Fixed so the corpus can aim at it.
const PORT: u16 = 47999;

fn servers() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let tcp = TcpListener::bind(("127.0.0.1", PORT)).expect("fuzz TCP port");
        std::thread::spawn(move || {
            for mut conn in tcp.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = conn.write_all(b"hello guest, this is the host\n");
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let udp = UdpSocket::bind(("127.0.0.1", PORT)).expect("fuzz UDP port");
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], peer);
            }
        });
    });
}

fn fix_ipv4_checksum(frame: &mut [u8]) {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    if ihl < 20 || frame.len() < 14 + ihl {
        return;
    }
    frame[24] = 0;
    frame[25] = 0;
    let mut sum: u32 = 0;
    for pair in frame[14..14 + ihl].chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

fuzz_target!(|data: &[u8]| {
    servers();
    let cfg = NatConfig {
        outbound: Outbound::HostOnly,
        host_loopback: HostLoopback::Ports(vec![PORT]),
        resolvers: vec![std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, PORT)],
        max_flows: 16,
        tcp_buffer: 64 * 1024,
        time_wait: Duration::ZERO,
        ..NatConfig::default()
    };
    let mut reg = EpollRegistry::new().unwrap();
    let mut nat = Nat::new(cfg, ForwardListeners::default());
    nat.start(&mut reg).unwrap();
    let mut rest = data;
    while rest.len() >= 3 {
        let flags = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let mut frame = rest[3..3 + len].to_vec();
        rest = &rest[3 + len..];
        if flags & 2 != 0 {
            fix_ipv4_checksum(&mut frame);
        }
        let hdr = NetHdr {
            flags: if flags & 1 != 0 { F_DATA_VALID } else { 0 },
            ..NetHdr::default()
        };
        nat.handle_frame(&hdr, &frame, &mut reg);
        if flags & 4 != 0 {
            for (token, events) in reg.wait(Duration::from_millis(1)).unwrap() {
                nat.handle_event(token, events, &mut reg);
            }
            nat.tick(&mut reg);
        }
        let _ = nat.take_frames(&mut reg);
        let _ = nat.flows();
    }
});
