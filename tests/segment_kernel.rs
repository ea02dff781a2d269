//! The software segmenter against the kernel, natively: namespace A's TAP
//! has vnet headers and TSO on (so A's kernel hands over 64 KiB TCP
//! segments with partial checksums, as a vmlab member's guest does),
//! namespace B's TAP has none (it takes whole frames, as a QEMU stream
//! member or a plain TAP does). A relay in this process carries A's frames
//! to B through `net::Segmenter` and B's back to A. A TCP stream from A to
//! B arrives byte for byte, which B's kernel allows only if every piece's
//! IPv4 and TCP checksums, lengths and sequence numbers are right; the
//! relay checks that large GSO frames did come and were cut.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{expect_pattern, require_root_and_tools, send_pattern, Netns};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmlab::net::{NetHdr, Segmenter, Tap, GSO_NONE, NET_HDR_LEN};

const MTU: u16 = 1500;
const STREAM: usize = 16 << 20;

/// What the relay saw of A's frames.
#[derive(Debug, Default)]
struct Relayed {
    gso_frames: usize,
    largest_gso: usize,
    pieces: usize,
    refused: usize,
}

/// Carries frames both ways until `stop`: A's through the segmenter.
fn relay(mut a: Tap, mut b: Tap, stop: Arc<AtomicBool>) -> Relayed {
    let mut seen = Relayed::default();
    let mut segmenter = Segmenter::new(MTU);
    let mut buf = vec![0u8; NET_HDR_LEN + 65_550];
    let plain = NetHdr::default();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: both descriptors stay open for this loop (the Taps own
        // them and outlive the borrow).
        let (fa, fb) = unsafe {
            (
                BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&a)),
                BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&b)),
            )
        };
        let mut fds = [
            PollFd::new(fa.as_fd(), PollFlags::POLLIN),
            PollFd::new(fb.as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, PollTimeout::from(50u16));
        while let Ok(n) = a.read_frame(&mut buf) {
            let hdr = NetHdr::parse(&buf).expect("a header");
            let frame = &buf[NET_HDR_LEN..n];
            if hdr.gso_kind() != GSO_NONE {
                seen.gso_frames += 1;
                seen.largest_gso = seen.largest_gso.max(frame.len());
            }
            match segmenter.segment(&hdr, frame, |piece| {
                assert!(piece.len() <= usize::from(MTU) + 14, "{}", piece.len());
                let _ = b.send_frame(&plain, piece);
            }) {
                Ok(pieces) => seen.pieces += pieces,
                Err(_) => seen.refused += 1,
            }
        }
        while let Ok(n) = b.read_frame(&mut buf) {
            let hdr = NetHdr::parse(&buf).expect("a header");
            let _ = a.send_frame(&hdr, &buf[NET_HDR_LEN..n]);
        }
    }
    seen
}

#[test]
fn a_tcp_stream_cut_from_tso_frames_reaches_a_plain_tap_intact() {
    require_root_and_tools(&["ip"]);
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let a = Tap::open_in_netns("sega", &ns_a.path()).expect("vnet TAP in A");
    assert!(a.has_vnet_hdr());
    ns_b.sh_ok("ip tuntap add dev segb mode tap");
    let b = ns_b
        .run(|| Tap::attach_existing("segb", false))
        .expect("plain TAP in B");
    assert!(!b.has_vnet_hdr());
    ns_a.sh_ok(
        "ip addr add 10.79.0.1/24 dev sega && ip link set sega mtu 1500 up && ip link set lo up",
    );
    ns_b.sh_ok(
        "ip addr add 10.79.0.2/24 dev segb && ip link set segb mtu 1500 up && ip link set lo up",
    );

    let stop = Arc::new(AtomicBool::new(false));
    let relay = {
        let stop = stop.clone();
        std::thread::spawn(move || relay(a, b, stop))
    };
    let server = ns_b.spawn(|| {
        let listener = TcpListener::bind("10.79.0.2:7000").unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let got = expect_pattern(&mut conn, 7, STREAM);
        let _ = conn.write_all(b"k");
        got
    });
    let client = ns_a.run(|| {
        let mut conn = (0..100)
            .find_map(|_| {
                TcpStream::connect_timeout(
                    &"10.79.0.2:7000".parse().unwrap(),
                    Duration::from_secs(2),
                )
                .map_err(|_| std::thread::sleep(Duration::from_millis(50)))
                .ok()
            })
            .expect("connects to B");
        conn.set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        send_pattern(&mut conn, 7, STREAM)?;
        conn.shutdown(std::net::Shutdown::Write)?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut ack = [0u8; 1];
        conn.read_exact(&mut ack).map(|_| ack)
    });
    let received = server.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let seen = relay.join().unwrap();
    eprintln!("{seen:?}");
    received.expect("B received the stream intact");
    assert_eq!(client.expect("A sent it and heard B's answer"), *b"k");
    assert!(
        seen.gso_frames > 0 && seen.largest_gso > usize::from(MTU) + 14,
        "A's kernel sent no TSO frames, so nothing was segmented: {seen:?}"
    );
    assert!(seen.pieces > seen.gso_frames, "{seen:?}");
    assert_eq!(seen.refused, 0, "{seen:?}");
}
