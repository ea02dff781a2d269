//! The namespace rig: a network namespace whose TAP device is served by the
//! NAT engine running in this process (host sockets in the host namespace),
//! and helpers to run tools or Rust code inside the namespace.
//!
//! Every rig has unique names (pid + counter), so tests run in parallel, and
//! removes its namespace on drop, also when a test fails. Namespaces left by
//! a killed test process are removed by the next rig.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmlab::cli::ForwardRule;
use vmlab::net::{
    Counters, FlowInfo, ForwardListeners, GuestFrame, GuestPort, Nat, NatConfig, Offloads,
    Outbound, PortBusy, Tap, TapNat,
};

const PREFIX: &str = "vmlabt";
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Fails the test (never skips) when the rig cannot work here.
pub fn require_root_and_tools(tools: &[&str]) {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the NAT namespace tests need root (network namespaces and TAP devices); run them as root"
    );
    for tool in tools {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "the NAT namespace tests need '{tool}' on PATH (see .ci/setup)"
        );
    }
}

/// Deletes namespaces of earlier test processes that died without cleanup.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn check(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        remove_stale_namespaces();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}x{n}", std::process::id());
        check(Command::new("ip").args(["netns", "add", &name]));
        Netns { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs a shell command inside the namespace.
    pub fn sh(&self, script: &str) -> Output {
        run(Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", script]))
    }

    /// Like [`Netns::sh`] but fails the test on a non-zero exit.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = check(Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", script]));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Runs `f` on a thread inside the namespace (its sockets live there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let handle = self.spawn(f);
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Starts `f` on a thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let ns = File::open(self.path()).expect("open namespace");
        std::thread::spawn(move || {
            // SAFETY: setns on this fresh thread only changes the thread's
            // own network namespace; `ns` is an open namespace descriptor.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A namespace with a TAP device served by the NAT in this process.
pub struct Rig {
    pub ns: Netns,
    pub tap: String,
    /// Forward rules with the host addresses actually bound.
    pub forwards: Vec<(ForwardRule, SocketAddr)>,
    backend: Arc<Mutex<TapNat>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The configuration tests start from: host-only egress, no resolvers.
pub fn test_config() -> NatConfig {
    NatConfig {
        outbound: Outbound::HostOnly,
        hostname: "labvm".into(),
        ..NatConfig::default()
    }
}

impl Rig {
    /// Starts the engine for `cfg`; forward rules with host port 0 get an
    /// ephemeral port (see [`Rig::forwards`]).
    pub fn start(cfg: NatConfig) -> Rig {
        require_root_and_tools(&["ip", "busybox"]);
        let ns = Netns::new();
        let tap = format!("vt{}", &ns.name[PREFIX.len()..]);
        let tap: String = tap.chars().take(15).collect();
        let listeners = ForwardListeners::bind(&cfg.forwards).expect("bind forwards");
        let forwards = listeners.local_addrs();
        let device = Tap::open_in_netns(&tap, &ns.path()).expect("open tap in namespace");
        let backend = Arc::new(Mutex::new(
            TapNat::new(Nat::new(cfg, listeners), device).expect("backend"),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let backend = backend.clone();
            let stop = stop.clone();
            std::thread::spawn(move || vmlab::net::run_until(backend, &stop).expect("NAT loop"))
        };
        ns.sh_ok(&format!("ip link set lo up && ip link set {tap} up"));
        Rig {
            ns,
            tap,
            forwards,
            backend,
            stop,
            thread: Some(thread),
        }
    }

    /// Static configuration, as a guest without DHCP would do it.
    pub fn configure_static(&self) {
        self.ns.sh_ok(&format!(
            "ip addr add 10.0.2.15/24 dev {0} && ip route add default via 10.0.2.2 dev {0}",
            self.tap
        ));
    }

    /// Runs busybox udhcpc; returns the variables its script saw.
    pub fn dhcp(&self) -> HashMap<String, String> {
        let dir = std::env::temp_dir().join(format!("{}-dhcp", self.ns.name));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("script.sh");
        let result = dir.join("lease");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ncase \"$1\" in bound|renew)\n\
                 ip addr flush dev $interface\n\
                 ip addr add $ip/$mask dev $interface\n\
                 ip route add default via $router dev $interface\n\
                 printf 'ip=%s\\nrouter=%s\\ndns=%s\\nhostname=%s\\nmtu=%s\\nsubnet=%s\\nlease=%s\\n' \
                 \"$ip\" \"$router\" \"$dns\" \"$hostname\" \"$mtu\" \"$subnet\" \"$lease\" > {}\n;;\nesac\n",
                result.display()
            ),
        )
        .unwrap();
        check(Command::new("chmod").arg("+x").arg(&script));
        self.ns.sh_ok(&format!(
            "timeout 20 busybox udhcpc -i {} -s {} -q -f -n -t 5 -T 1",
            self.tap,
            script.display()
        ));
        let text = std::fs::read_to_string(&result).expect("udhcpc script did not run");
        let _ = std::fs::remove_dir_all(&dir);
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn flows(&self) -> Vec<FlowInfo> {
        self.backend.lock().unwrap().nat().flows()
    }

    pub fn counters(&self) -> Counters {
        self.backend.lock().unwrap().nat().counters()
    }

    /// Waits until `cond` holds on the flow table, up to `limit`.
    pub fn wait_flows(&self, limit: Duration, cond: impl Fn(&[FlowInfo]) -> bool) -> Vec<FlowInfo> {
        let start = Instant::now();
        loop {
            let flows = self.flows();
            if cond(&flows) || start.elapsed() > limit {
                return flows;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A deterministic byte stream (xorshift), so both ends can check every byte.
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern { state: seed | 1 }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let bytes = self.state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Writes `len` pattern bytes.
pub fn send_pattern(w: &mut impl Write, seed: u64, len: usize) -> io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n;
    }
    Ok(())
}

/// Reads to EOF and checks the bytes are exactly `len` pattern bytes.
pub fn expect_pattern(r: &mut impl Read, seed: u64, len: usize) -> io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    // The pattern is generated in 8-byte steps; keep reads aligned to that
    // by comparing through a carry buffer.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
        if total > len {
            return Err(io::Error::other(format!("more than {len} bytes")));
        }
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / want.len() * want.len();
        let whole = if total == len { pending.len() } else { whole };
        let mut off = 0;
        while off < whole {
            let k = (whole - off).min(want.len());
            p.fill(&mut want[..k]);
            if pending[off..off + k] != want[..k] {
                return Err(io::Error::other(format!(
                    "data differs near byte {}",
                    total - pending.len() + off
                )));
            }
            off += k;
        }
        pending.drain(..whole);
    }
    if total != len {
        return Err(io::Error::other(format!("got {total} of {len} bytes")));
    }
    Ok(())
}

/// Frames for the guest, as a VM's RX queue with room would take them
/// (a card's backend driven without a VM).
#[derive(Default)]
pub struct Guest {
    pub frames: Vec<Vec<u8>>,
}

impl GuestPort for Guest {
    fn send(&mut self, frame: &GuestFrame) -> Result<(), PortBusy> {
        self.frames.push(frame.data.clone());
        Ok(())
    }

    fn offloads(&self) -> Offloads {
        Offloads {
            csum: true,
            tso4: true,
        }
    }
}
