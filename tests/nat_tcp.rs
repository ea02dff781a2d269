//! TCP through the NAT against the Linux stack of a network namespace.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{expect_pattern, send_pattern, test_config, Rig};

const HUNDRED_MB: usize = 100 * 1024 * 1024;

fn gateway(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 2, 2], port))
}

fn loopback_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[test]
fn hundred_megabytes_each_way_to_host_loopback() {
    let rig = Rig::start(test_config());
    rig.configure_static();
    let (listener, port) = loopback_listener();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut up = s.try_clone().unwrap();
        // Guest -> host first, then host -> guest on the same connection.
        let mut limited = (&mut up).take(HUNDRED_MB as u64);
        expect_pattern(&mut limited, 1, HUNDRED_MB).expect("guest->host data");
        send_pattern(&mut s, 2, HUNDRED_MB).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    });
    rig.ns.run(move || {
        let mut s = TcpStream::connect_timeout(&gateway(port), Duration::from_secs(5)).unwrap();
        send_pattern(&mut s, 1, HUNDRED_MB).unwrap();
        expect_pattern(&mut s, 2, HUNDRED_MB).expect("host->guest data");
    });
    server.join().unwrap();
    let c = rig.counters();
    assert_eq!(c.malformed + c.bad_checksum, 0, "{c:?}");
}

#[test]
fn two_hundred_concurrent_connections() {
    const N: usize = 200;
    let rig = Rig::start(test_config());
    rig.configure_static();
    let (listener, port) = loopback_listener();
    let server = std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = (0..N).map(|_| listener.accept().unwrap().0).collect();
        for c in &mut conns {
            let mut buf = [0u8; 8];
            c.read_exact(&mut buf).unwrap();
            let id = u64::from_le_bytes(buf);
            c.write_all(&(id * 3).to_le_bytes()).unwrap();
        }
    });
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
    let client = rig.ns.spawn(move || {
        let mut conns: Vec<TcpStream> = (0..N)
            .map(|_| TcpStream::connect_timeout(&gateway(port), Duration::from_secs(10)).unwrap())
            .collect();
        opened_tx.send(()).unwrap();
        rx.recv().unwrap();
        for (i, c) in conns.iter_mut().enumerate() {
            c.write_all(&(i as u64).to_le_bytes()).unwrap();
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let mut buf = [0u8; 8];
            c.read_exact(&mut buf).unwrap();
            assert_eq!(u64::from_le_bytes(buf), i as u64 * 3);
        }
    });
    opened_rx.recv().unwrap();
    // The last handshake's ACK may still be on its way.
    let flows = rig.wait_flows(Duration::from_secs(5), |f| {
        f.iter().filter(|f| f.state == "ESTABLISHED").count() >= N
    });
    let established = flows.iter().filter(|f| f.state == "ESTABLISHED").count();
    assert_eq!(
        established, N,
        "all {N} connections open at once: {flows:#?}"
    );
    tx.send(()).unwrap();
    client.join().unwrap();
    server.join().unwrap();
}

#[test]
fn half_close_both_directions() {
    let rig = Rig::start(test_config());
    rig.configure_static();
    let (listener, port) = loopback_listener();
    let server = std::thread::spawn(move || {
        // Guest closes its sending side first; the host still answers.
        let (mut a, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        a.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"request from guest");
        a.write_all(b"answer after guest shutdown").unwrap();
        drop(a);
        // Host closes its sending side first; the guest still sends.
        let (mut b, _) = listener.accept().unwrap();
        b.write_all(b"host says bye").unwrap();
        b.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 300_000);
    });
    rig.ns.run(move || {
        let mut a = TcpStream::connect(gateway(port)).unwrap();
        a.write_all(b"request from guest").unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        a.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"answer after guest shutdown");

        let mut b = TcpStream::connect(gateway(port)).unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"host says bye");
        b.write_all(&vec![7u8; 300_000]).unwrap();
        b.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
    });
    server.join().unwrap();
}

#[test]
fn refused_port_is_refused_at_once() {
    let rig = Rig::start(test_config());
    rig.configure_static();
    let (listener, port) = loopback_listener();
    drop(listener);
    let (kind, took) = rig.ns.run(move || {
        let start = Instant::now();
        let err = TcpStream::connect_timeout(&gateway(port), Duration::from_secs(10)).unwrap_err();
        (err.kind(), start.elapsed())
    });
    assert_eq!(kind, ErrorKind::ConnectionRefused, "after {took:?}");
}

#[test]
fn outside_destinations_are_refused_when_host_only() {
    let rig = Rig::start(test_config());
    rig.configure_static();
    // 192.0.2.0/24 is TEST-NET-1; with host-only egress nothing is sent.
    let kind = rig.ns.run(|| {
        TcpStream::connect_timeout(
            &SocketAddr::from(([192, 0, 2, 1], 80)),
            Duration::from_secs(10),
        )
        .unwrap_err()
        .kind()
    });
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    assert!(rig.counters().dropped_from_guest >= 1);
}

#[test]
fn closed_connections_leave_the_table() {
    let mut cfg = test_config();
    cfg.time_wait = Duration::from_millis(200);
    let rig = Rig::start(cfg);
    rig.configure_static();
    let (listener, port) = loopback_listener();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
    });
    let local = rig.ns.run(move || {
        let mut s = TcpStream::connect(gateway(port)).unwrap();
        s.write_all(b"ping").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        assert_eq!(buf, b"ping");
        s.local_addr().unwrap()
    });
    server.join().unwrap();
    let flows = rig.wait_flows(Duration::from_secs(5), |f| f.is_empty());
    assert!(
        flows.is_empty(),
        "flow for {local} still listed: {flows:#?}"
    );
    let c = rig.counters();
    assert_eq!(c.flows_opened, c.flows_closed, "{c:?}");
}
