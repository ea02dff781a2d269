//! Fuzzes the NAT's frame-input path: a sequence of guest frames, with host
//! events and timers in between, must never panic the engine. The input
//! format is `vmlab::net::fuzzing::exercise_frames`'s. Only the fuzzer's own
//! loopback port is reachable (no traffic leaves the machine); echo servers
//! on it let flows get somewhere.

#![no_main]

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmlab::net::fuzzing::{exercise_frames, PORT};

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

fuzz_target!(|data: &[u8]| {
    servers();
    exercise_frames(data);
});
