//! What the `nat_frame` fuzz target does with each input, kept in the
//! library so that the ordinary test suite replays exactly what the fuzzer
//! did (tests/fuzz_regressions.rs).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use super::{
    EpollRegistry, ForwardListeners, HostLoopback, Nat, NatConfig, NetHdr, Outbound, F_DATA_VALID,
};

/// The host port the fuzzer's seeds aim at (10.0.2.2:PORT, and DNS to
/// it): the only host port the engine may reach while fuzzing. Whoever
/// runs the exercise may serve it (an echo server) to get deeper.
pub const PORT: u16 = 47999;

/// Feeds `data` to a NAT as guest frames. Input: records of [flags, len_hi,
/// len_lo, frame...]. Flag bits: 0 marks the L4 checksum valid (as a
/// TAP/virtio offload would), 1 repairs the IPv4 header checksum so deeper
/// layers are reached, 2 polls host sockets and runs timers afterwards.
pub fn exercise_frames(data: &[u8]) {
    let cfg = NatConfig {
        outbound: Outbound::HostOnly,
        host_loopback: HostLoopback::Ports(vec![PORT]),
        resolvers: vec![SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT)],
        max_flows: 16,
        tcp_buffer: 64 * 1024,
        time_wait: Duration::ZERO,
        ..NatConfig::default()
    };
    let Ok(mut reg) = EpollRegistry::new() else {
        return;
    };
    let mut nat = Nat::new(cfg, ForwardListeners::default());
    if nat.start(&mut reg).is_err() {
        return;
    }
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
            if let Ok(events) = reg.wait(Duration::from_millis(1)) {
                for (token, events) in events {
                    nat.handle_event(token, events, &mut reg);
                }
            }
            nat.tick(&mut reg);
        }
        let _ = nat.take_frames(&mut reg);
        let _ = nat.flows();
    }
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
