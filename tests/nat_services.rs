//! DHCP, ICMP, DNS relay and UDP through the NAT, against a namespace.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{test_config, Rig};
use vmlab::net::FlowProtocol;

#[test]
fn udhcpc_gets_address_router_dns_and_hostname() {
    let rig = Rig::start(test_config());
    let lease = rig.dhcp();
    assert_eq!(lease["ip"], "10.0.2.15", "{lease:?}");
    assert_eq!(lease["router"], "10.0.2.2");
    assert_eq!(lease["dns"], "10.0.2.3");
    assert_eq!(lease["subnet"], "255.255.255.0");
    assert_eq!(lease["hostname"], "labvm");
    assert_eq!(lease["mtu"], "1500");
    assert_eq!(lease["lease"], "86400");
    let addr = rig.ns.sh_ok(&format!("ip -4 addr show dev {}", rig.tap));
    assert!(addr.contains("10.0.2.15/24"), "{addr}");
    // The configured namespace reaches the gateway.
    rig.ns.sh_ok("busybox ping -c 1 -W 5 10.0.2.2");
}

#[test]
fn ping_gateway_and_dns() {
    let rig = Rig::start(test_config());
    rig.configure_static();
    let out = rig.ns.sh_ok("busybox ping -c 3 -i 0.2 -W 5 10.0.2.2");
    assert!(out.contains("3 packets received"), "{out}");
    let out = rig.ns.sh_ok("busybox ping -c 1 -W 5 10.0.2.3");
    assert!(out.contains("1 packets received"), "{out}");
}

#[test]
fn ping_outside_under_host_only_is_dropped_and_counted() {
    let rig = Rig::start(test_config());
    rig.configure_static();
    // TEST-NET-1: nothing is sent; the namespace's ping just gets no answer.
    let out = rig.ns.sh("busybox ping -c 1 -W 1 192.0.2.1");
    assert!(!out.status.success());
    assert!(rig.counters().dropped_from_guest >= 1);
    assert!(rig.flows().is_empty());
}

/// A resolver on the host's loopback answering every A query with 10.9.8.7.
fn tiny_resolver() -> (UdpSocket, SocketAddr) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    (sock, addr)
}

fn serve_dns(sock: UdpSocket, queries: usize) {
    for _ in 0..queries {
        let mut buf = [0u8; 512];
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            return;
        };
        let q = &buf[..n];
        // Header: copy id, set QR/AA/RD/RA, one question, one answer.
        let mut r = Vec::new();
        r.extend_from_slice(&q[..2]);
        r.extend_from_slice(&[0x85, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
        // Question: name until the zero label, then type and class.
        let end = 12 + q[12..].iter().position(|&b| b == 0).unwrap() + 1 + 4;
        let qtype = u16::from_be_bytes([q[end - 4], q[end - 3]]);
        r.extend_from_slice(&q[12..end]);
        if qtype == 1 {
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 9, 8, 7]);
        } else {
            r[7] = 0; // no answer for other types (AAAA)
        }
        sock.send_to(&r, peer).unwrap();
    }
}

#[test]
fn dns_relay_to_a_loopback_resolver() {
    let (sock, addr) = tiny_resolver();
    let SocketAddr::V4(addr) = addr else {
        unreachable!()
    };
    let mut cfg = test_config();
    cfg.resolvers = vec![addr];
    let rig = Rig::start(cfg);
    rig.configure_static();
    let server = std::thread::spawn(move || serve_dns(sock, 2));
    let out = rig
        .ns
        .sh_ok("busybox nslookup -type=a lab.example 10.0.2.3");
    assert!(out.contains("10.9.8.7"), "{out}");
    drop(server);
    let flows = rig.flows();
    assert!(
        flows.iter().any(|f| f.protocol == FlowProtocol::Udp
            && f.remote.to_string() == "10.0.2.3:53"
            && f.host == SocketAddr::V4(addr)),
        "{flows:#?}"
    );
}

#[test]
fn udp_to_host_loopback_and_port_unreachable() {
    let rig = Rig::start(test_config());
    rig.configure_static();
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let server = std::thread::spawn(move || {
        for _ in 0..3 {
            let mut buf = [0u8; 2048];
            let (n, peer) = echo.recv_from(&mut buf).unwrap();
            echo.send_to(&buf[..n], peer).unwrap();
        }
    });
    rig.ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.connect(("10.0.2.2", port)).unwrap();
        for msg in [&b"one"[..], &[5u8; 1400][..], b"three"] {
            s.send(msg).unwrap();
            let mut buf = [0u8; 2048];
            let n = s.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], msg);
        }
        // Nothing listens there: the host's ICMP error comes back as ours.
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.connect(("10.0.2.2", closed_port)).unwrap();
        s.send(b"anyone?").unwrap();
        let mut buf = [0u8; 64];
        let err = s.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    });
    server.join().unwrap();
}

#[test]
fn udp_flows_time_out_and_free_their_sockets() {
    let mut cfg = test_config();
    cfg.udp_timeout = Duration::from_millis(500);
    let rig = Rig::start(cfg);
    rig.configure_static();
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    rig.ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"hello", ("10.0.2.2", port)).unwrap();
    });
    let mut buf = [0u8; 16];
    echo.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (n, _) = echo.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    let flows = rig.flows();
    let flow = flows
        .iter()
        .find(|f| f.protocol == FlowProtocol::Udp)
        .unwrap_or_else(|| panic!("no udp flow: {flows:#?}"));
    let host_local = flow.host_local.expect("udp flow has a socket");
    let flows = rig.wait_flows(Duration::from_secs(5), |f| f.is_empty());
    assert!(flows.is_empty(), "{flows:#?}");
    // The socket is closed: its port can be bound again.
    UdpSocket::bind(("0.0.0.0", host_local.port())).expect("flow socket was freed");
    assert!(rig.counters().flows_closed >= 1);
}
