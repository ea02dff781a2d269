//! NAT throughput and connection rate: `vmlab nat` against slirp4netns, on
//! the same namespace rig, in the same run. Reports, never asserts.
//!
//! Run as root: `cargo bench --bench nat` (env: NAT_BENCH_SECS, default 4;
//! NAT_BENCH_ROUNDS, default 2). For each MTU (1500, 65520) and direction,
//! iperf3 runs from inside a namespace to an iperf3 server on the host's
//! 127.0.0.1 through the gateway 10.0.2.2; rounds alternate between the two
//! NATs. CPU time is the NAT process's user+system time during the transfer.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{require_root_and_tools, Netns};

const VMLAB: &str = env!("CARGO_BIN_EXE_vmlab");
/// USER_HZ: /proc/PID/stat counts CPU time in these ticks on Linux.
const CLOCK_TICKS: f64 = 100.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Vmlab,
    Slirp,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Vmlab => "vmlab",
            Peer::Slirp => "slirp4netns",
        }
    }
}

/// A NAT process serving a namespace; killed on drop.
struct Rig {
    ns: Netns,
    child: Child,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Rig {
    fn start(peer: Peer, mtu: u16) -> Rig {
        let ns = Netns::new();
        let tap = "tap0";
        let child = match peer {
            Peer::Vmlab => Command::new(VMLAB)
                .args([
                    "nat",
                    "--tap",
                    tap,
                    "--host-only",
                    "--mtu",
                    &mtu.to_string(),
                ])
                .arg("--netns")
                .arg(ns.path())
                .stdout(Stdio::null())
                .spawn()
                .expect("start vmlab nat"),
            Peer::Slirp => Command::new("slirp4netns")
                .args(["--configure", &format!("--mtu={mtu}"), "--netns-type=path"])
                .arg(ns.path())
                .arg(tap)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start slirp4netns"),
        };
        let rig = Rig { ns, child };
        let start = Instant::now();
        while !rig.ns.sh(&format!("ip link show {tap}")).status.success() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} never made {tap}",
                peer.name()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        match peer {
            Peer::Vmlab => {
                rig.ns.sh_ok(&format!(
                    "ip link set lo up && ip link set {tap} mtu {mtu} up && \
                     ip addr add 10.0.2.15/24 dev {tap} && ip route add default via 10.0.2.2"
                ));
            }
            Peer::Slirp => {
                // --configure sets address and route; wait until it did.
                let start = Instant::now();
                while !rig.ns.sh("ip route | grep -q default").status.success() {
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "slirp4netns never configured"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                rig.ns.sh_ok("ip link set lo up");
            }
        }
        rig
    }

    /// CPU seconds the NAT process used so far.
    fn cpu(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which may hold spaces).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        ticks as f64 / CLOCK_TICKS
    }
}

#[derive(Clone, Copy, Default)]
struct Sample {
    gbits: f64,
    cpu_per_gb: f64,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One iperf3 run; `reverse` is host -> namespace.
fn iperf(rig: &Rig, secs: u64, reverse: bool) -> Sample {
    let port = free_port();
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(200));
    let cpu0 = rig.cpu();
    let out = rig.ns.sh(&format!(
        "iperf3 -c 10.0.2.2 -p {port} -t {secs} -J {}",
        if reverse { "-R" } else { "" }
    ));
    let cpu = rig.cpu() - cpu0;
    let _ = server.kill();
    let _ = server.wait();
    let json = String::from_utf8_lossy(&out.stdout);
    let (bps, bytes) = received(&json).unwrap_or_else(|| panic!("iperf3 output: {json}"));
    Sample {
        gbits: bps / 1e9,
        cpu_per_gb: cpu / (bytes / 1e9),
    }
}

/// `end.sum_received.{bits_per_second,bytes}` from iperf3's JSON.
fn received(json: &str) -> Option<(f64, f64)> {
    let at = json.find("\"sum_received\"")?;
    let field = |name: &str| -> Option<f64> {
        let s = &json[at..];
        let i = s.find(&format!("\"{name}\""))? + name.len() + 3;
        let v: String = s[i..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == '+' || *c == '-')
            .collect();
        v.parse().ok()
    };
    Some((field("bits_per_second")?, field("bytes")?))
}

/// Connections per second from the namespace to a loopback server that
/// answers one byte and closes; and CPU ms per 1000 connections.
fn connection_rate(rig: &Rig, secs: u64) -> (f64, f64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        use std::io::Write;
                        s.set_nonblocking(false).unwrap();
                        let _ = s.write_all(b"x");
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        })
    };
    let cpu0 = rig.cpu();
    let count = rig.ns.run(move || {
        let addr = SocketAddr::from(([10, 0, 2, 2], port));
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            let _ = s.shutdown(Shutdown::Both);
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    });
    let cpu = rig.cpu() - cpu0;
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    (count, cpu * 1000.0 / (count * secs as f64) * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing we use.
    require_root_and_tools(&["ip", "iperf3", "slirp4netns"]);
    let secs = env("NAT_BENCH_SECS", 4);
    let rounds = env("NAT_BENCH_ROUNDS", 2) as usize;
    println!("NAT benchmark: iperf3 {secs}s x {rounds} rounds per cell, median shown");
    println!(
        "{:<7} {:<15} {:>12} {:>12} {:>7} {:>14} {:>14}",
        "MTU", "direction", "vmlab Gb/s", "slirp Gb/s", "ratio", "vmlab CPU s/GB", "slirp CPU s/GB"
    );
    for mtu in [1500u16, 65520] {
        for (label, reverse) in [("ns -> host", false), ("host -> ns", true)] {
            let mut results: Vec<(Peer, Sample)> = Vec::new();
            for _ in 0..rounds {
                for peer in [Peer::Vmlab, Peer::Slirp] {
                    let rig = Rig::start(peer, mtu);
                    results.push((peer, iperf(&rig, secs, reverse)));
                }
            }
            let pick = |peer: Peer, f: fn(&Sample) -> f64| {
                median(
                    results
                        .iter()
                        .filter(|(p, _)| *p == peer)
                        .map(|(_, s)| f(s))
                        .collect(),
                )
            };
            let (v, s) = (
                pick(Peer::Vmlab, |s| s.gbits),
                pick(Peer::Slirp, |s| s.gbits),
            );
            println!(
                "{:<7} {:<15} {:>12.2} {:>12.2} {:>6.2}x {:>14.2} {:>14.2}",
                mtu,
                label,
                v,
                s,
                v / s,
                pick(Peer::Vmlab, |s| s.cpu_per_gb),
                pick(Peer::Slirp, |s| s.cpu_per_gb)
            );
        }
    }
    let mut rates = Vec::new();
    for peer in [Peer::Vmlab, Peer::Slirp] {
        let rig = Rig::start(peer, 1500);
        rates.push((peer, connection_rate(&rig, secs.min(3))));
    }
    println!();
    println!(
        "{:<12} {:>14} {:>22}",
        "connections", "per second", "CPU ms per 1000 conns"
    );
    for (peer, (rate, cpu)) in &rates {
        println!("{:<12} {:>14.0} {:>22.1}", peer.name(), rate, cpu);
    }
    println!(
        "connection rate ratio vmlab/slirp4netns: {:.2}x",
        rates[0].1 .0 / rates[1].1 .0
    );
}
