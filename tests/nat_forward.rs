//! Port forwards from the host into the namespace.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_root_and_tools, test_config, Rig};
use vmlab::cli::ForwardRule;
use vmlab::net::FlowProtocol;

fn rule(text: &str) -> ForwardRule {
    let mut r: ForwardRule = text.parse().unwrap();
    r.host.set_port(0); // ephemeral, so parallel tests never collide
    r
}

/// A child process killed on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connect_retry(addr: SocketAddr) -> TcpStream {
    let start = Instant::now();
    loop {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The forward accepts at once; a session exists once the guest
        // side answers, so probe with one line.
        let mut probe = s.try_clone().unwrap();
        if probe.write_all(b"probe\n").is_ok() {
            let mut line = String::new();
            if BufReader::new(&s).read_line(&mut line).is_ok() && line == "probe\n" {
                return s;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "forward never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tcp_forward_carries_a_session_to_an_echo_server() {
    require_root_and_tools(&["socat"]);
    let mut cfg = test_config();
    cfg.forwards = vec![rule("tcp:127.0.0.1:2222:22")];
    let rig = Rig::start(cfg);
    rig.configure_static();
    let host = rig.forwards[0].1;
    let _echo = Guard(
        Command::new("ip")
            .args(["netns", "exec", &rig.ns.name])
            .args(["socat", "TCP-LISTEN:22,fork,reuseaddr", "EXEC:cat"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat"),
    );
    let s = connect_retry(host);
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut writer = s;
    for i in 0..20 {
        let line = format!("line {i} of an interactive session\n");
        writer.write_all(line.as_bytes()).unwrap();
        let mut back = String::new();
        reader.read_line(&mut back).unwrap();
        assert_eq!(back, line);
    }
    // A bulk transfer through the same session.
    let blob: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i % 251) as u8)
        .filter(|&b| b != b'\n')
        .collect();
    let w = {
        let mut writer = writer.try_clone().unwrap();
        let blob = blob.clone();
        std::thread::spawn(move || writer.write_all(&blob).unwrap())
    };
    let mut back = vec![0u8; blob.len()];
    reader.read_exact(&mut back).unwrap();
    w.join().unwrap();
    assert!(back == blob, "echoed bulk data differs");
    let flows = rig.flows();
    assert!(
        flows.iter().any(|f| f.forwarded
            && f.protocol == FlowProtocol::Tcp
            && f.guest.to_string() == "10.0.2.15:22"
            && f.state == "ESTABLISHED"),
        "{flows:#?}"
    );
    drop(writer);
    drop(reader);
}

#[test]
fn udp_forward_echo() {
    let mut cfg = test_config();
    cfg.forwards = vec![rule("udp:127.0.0.1:5353:7")];
    let rig = Rig::start(cfg);
    rig.configure_static();
    let host = rig.forwards[0].1;
    let echo = rig.ns.spawn(|| {
        let s = UdpSocket::bind("0.0.0.0:7").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for _ in 0..4 {
            let mut buf = [0u8; 2048];
            let (n, peer) = s.recv_from(&mut buf).unwrap();
            s.send_to(&buf[..n], peer).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    // The first datagram may wait for ARP; retry until the echo server answers.
    let mut buf = [0u8; 2048];
    let mut got = None;
    for _ in 0..5 {
        a.send_to(b"first", host).unwrap();
        if let Ok((n, _)) = a.recv_from(&mut buf) {
            got = Some(buf[..n].to_vec());
            break;
        }
    }
    assert_eq!(got.as_deref(), Some(&b"first"[..]));
    b.send_to(b"from b", host).unwrap();
    let (n, from) = b.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"from b");
    assert_eq!(from, host);
    a.send_to(b"again a", host).unwrap();
    let (n, _) = a.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"again a");
    let flows = rig.flows();
    let forwarded = flows
        .iter()
        .filter(|f| f.forwarded && f.protocol == FlowProtocol::Udp)
        .count();
    assert_eq!(forwarded, 2, "one flow per host peer: {flows:#?}");
    // Let the echo thread finish its loop.
    let _ = a.send_to(b"last", host);
    let _ = a.recv_from(&mut buf);
    let _ = echo.join();
}
