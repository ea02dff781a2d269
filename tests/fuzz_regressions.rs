//! The fuzz targets' inputs replayed as ordinary tests: every seed, and every
//! input that ever broke a target (tests/fuzz/regressions/TARGET/), through
//! the same library function the target calls. A panic fails the test, and
//! so does an input still running after a minute (a hang). The disk
//! target's are in disk_fuzz_regressions.rs.

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use vmlab::devices::virtio::fuzzing::{exercise_blk_request, exercise_mmio};

/// Seeds and regressions of `target`, by name.
fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let mut found = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let name = format!(
                "{kind}/{target}/{}",
                path.file_name().unwrap().to_string_lossy()
            );
            found.push((name, std::fs::read(&path).unwrap()));
        }
    }
    assert!(!found.is_empty(), "no inputs for {target}");
    found.sort();
    found
}

/// Runs `exercise` on every input of `target`, each within a minute.
fn replay(target: &str, exercise: fn(&[u8], &Path)) {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in inputs(target) {
        let scratch: PathBuf = dir.path().join("scratch");
        let (done, finished) = mpsc::channel();
        let runner = std::thread::spawn(move || {
            exercise(&data, &scratch);
            let _ = done.send(());
        });
        match finished.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => runner.join().unwrap(),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{name}: panicked"),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("{name}: still running after 60 s"),
        }
    }
}

/// The fuzzer's echo servers on the NAT's one reachable host port, when
/// that port is free (another fuzzing run may hold it; the inputs then
/// meet a refused connection instead).
fn nat_echo_servers() {
    let port = vmlab::net::fuzzing::PORT;
    if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
        std::thread::spawn(move || {
            for mut conn in tcp.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    if let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)) {
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], peer);
            }
        });
    }
}

#[test]
fn nat_frame_inputs_stay_fixed() {
    nat_echo_servers();
    replay("nat_frame", |data, _| {
        vmlab::net::fuzzing::exercise_frames(data)
    });
}

#[test]
fn virtio_mmio_inputs_stay_fixed() {
    replay("virtio_mmio", |data, scratch| {
        exercise_mmio(data, scratch);
    });
}

#[test]
fn the_mmio_seeds_start_their_devices() {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in inputs("virtio_mmio") {
        if !name.starts_with("seeds/") {
            continue;
        }
        let status = exercise_mmio(&data, &dir.path().join("disk"));
        let needs_reset = status & 0x40 != 0;
        assert_eq!(status & 0xf, 0xf, "{name}: not started ({status:#x})");
        assert_eq!(needs_reset, name.contains("overrun"), "{name}: {status:#x}");
    }
}

#[test]
fn virtio_blk_request_inputs_stay_fixed() {
    replay("virtio_blk_request", |data, scratch| {
        exercise_blk_request(data, scratch);
    });
}

#[test]
fn control_protocol_inputs_stay_fixed() {
    replay("control_protocol", |data, _| {
        vmlab::control::fuzzing::exercise_control(data)
    });
}

#[test]
fn the_blk_seeds_are_requests_the_disk_serves() {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in inputs("virtio_blk_request") {
        if name.starts_with("seeds/") {
            assert!(
                exercise_blk_request(&data, &dir.path().join("disk")),
                "{name} was refused"
            );
        }
    }
}
