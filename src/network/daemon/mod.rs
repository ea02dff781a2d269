//! The network process (`vmlab network-daemon NAME`, started by a
//! network's first member): one event loop with the switch, the member
//! ports, the gateway's NAT (its host sockets and forwards) and the
//! network's socket, where members join and commands ask. It ends when
//! its last member leaves; killed, it is started again by the next member
//! (VMs reconnect on their own) and finds its leases and namespace
//! members where it left them.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use smoltcp::wire::EthernetAddress;

use super::error::{NetworkError, Result};
use super::member::{Fabric, Link, Member};
use super::netns::{self, NetnsHelper};
use super::protocol::{AttachRequest, JoinRequest, Joined, NetRequest, NetResponse};
use super::store::{NetworkDef, NetworkDir};
use super::view::{LeaseView, MemberView, NetworkView};
use crate::cli::{IngressRule, MacAddress};
use crate::control::protocol::{encode, MAX_LINE};
use crate::net::{
    EpollRegistry, ForwardListeners, Leases, Nat, NatConfig, NetHdr, Segmenter, SocketRegistry,
    NET_HDR_LEN, TICK,
};
use crate::switch::firewall::Firewall;
use crate::switch::stream::{ReadState, StreamPort};
use crate::switch::wire::{Framing, MAX_MESSAGE};
use crate::switch::{PortId, Switch};

mod membership;
mod qemu;
mod requests;
mod saved;

use saved::SavedNetns;

const TOKEN_LISTENER: u32 = 1;
const TOKEN_QEMU_LISTENER: u32 = 2;
/// A QEMU connection that has not sent its first frame yet.
const TOKEN_QEMU_WAITING: u32 = 1 << 30;
const TOKEN_CONN: u32 = 1 << 28;
const TOKEN_MEMBER: u32 = 1 << 29;
const TOKEN_INDEX: u32 = TOKEN_CONN - 1;

/// A new network process waits this long for its first member.
const FIRST_MEMBER_GRACE: Duration = Duration::from_secs(15);
/// A connection must send its request line within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes waiting for one member before frames for it are dropped.
const PORT_BUFFER: usize = 4 << 20;
/// How often namespace members are checked for a deleted namespace.
const NAMESPACE_CHECK: Duration = Duration::from_secs(1);
/// Reads per member per loop turn, so one busy member cannot starve others.
const READS_PER_TURN: usize = 8;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_stop_handlers() {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; sigaction is given a valid, zeroed struct.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = request_stop as *const () as usize;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// A connection that has not said what it wants yet.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

struct Process {
    dir: NetworkDir,
    def: NetworkDef,
    reg: EpollRegistry,
    listener: UnixListener,
    qemu_listener: UnixListener,
    qemu_waiting: HashMap<u32, StreamPort>,
    switch: Switch,
    firewall: Firewall,
    gateway_port: PortId,
    nat: Nat,
    members: HashMap<PortId, Member>,
    pending: HashMap<u32, Pending>,
    next_conn: u32,
    tap_buf: Vec<u8>,
    had_member: bool,
    started: Instant,
    netns: NetnsHelper,
}

/// Runs network `name` until its last member leaves. Called in the
/// process `vmlab network-daemon NAME`; `ready` is called once members can
/// join.
pub fn serve(name: &str, ready: impl FnOnce()) -> Result<()> {
    let dir = NetworkDir::existing(name)?;
    let def = dir.load()?;
    let Some(_lock) = dir.lock_daemon()? else {
        // Another process runs it: the starter can connect to that one.
        ready();
        return Ok(());
    };
    install_stop_handlers();
    let runtime = crate::dirs::ensure_runtime_dir().map_err(NetworkError::io(
        "cannot prepare",
        &crate::dirs::runtime_dir(),
    ))?;
    let socket = dir.socket_path();
    let _ = std::fs::remove_file(&socket);
    let listener = listen(&socket)?;
    let qemu_socket = dir.qemu_socket_path();
    let _ = std::fs::remove_file(&qemu_socket);
    let qemu_listener = listen(&qemu_socket)?;
    log::info!("network {name}: {} in {}", def.subnet, runtime.display());
    let netns = NetnsHelper::start()?;
    let mut process = Process::new(dir, def, listener, netns, qemu_listener)?;
    process.restore_namespaces();
    // Set up: from here on the loop runs under its filter (a failure to
    // install it, or a violation, is the last line of the network's log,
    // which the starter prints).
    crate::seccomp::install(crate::seccomp::ThreadClass::Network)?;
    ready();
    let result = process.run();
    process.shut_down();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&qemu_socket);
    result
}

fn listen(socket: &Path) -> Result<UnixListener> {
    let listener =
        UnixListener::bind(socket).map_err(NetworkError::io("cannot listen on", socket))?;
    listener
        .set_nonblocking(true)
        .map_err(NetworkError::io("cannot listen on", socket))?;
    Ok(listener)
}

fn nat_config(dir: &NetworkDir, def: &NetworkDef) -> NatConfig {
    let subnet = def.subnet;
    let name = dir.name();
    NatConfig {
        walled_off: dir
            .other_subnets()
            .iter()
            .map(|s| (s.network(), s.prefix()))
            .collect(),
        network: subnet.network(),
        netmask: subnet.netmask(),
        gateway: subnet.gateway(),
        dns: subnet.gateway(),
        guest: subnet.pool().0,
        hostname: String::new(),
        domain: Some(name.to_string()),
        closed: !def.nat,
        ..NatConfig::with_host_resolvers()
    }
}

impl Process {
    fn new(
        dir: NetworkDir,
        def: NetworkDef,
        listener: UnixListener,
        netns: NetnsHelper,
        qemu_listener: UnixListener,
    ) -> Result<Process> {
        let (first, last) = def.subnet.pool();
        let mut leases = Leases::pool(first, last);
        let path = dir.leases_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                if let Err(e) = leases.load(&text) {
                    log::warn!("network {}: {}: {e}", dir.name(), path.display());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(NetworkError::io("cannot read", &path)(e)),
        }
        let cfg = nat_config(&dir, &def);
        let gateway_mac = cfg.gateway_mac;
        let mut nat = Nat::with_leases(cfg, ForwardListeners::default(), leases);
        let mut reg = EpollRegistry::new().map_err(NetworkError::io("cannot poll", dir.path()))?;
        nat.start(&mut reg)?;
        reg.add(listener.as_raw_fd(), TOKEN_LISTENER)
            .map_err(NetworkError::io("cannot poll", dir.path()))?;
        reg.add(qemu_listener.as_raw_fd(), TOKEN_QEMU_LISTENER)
            .map_err(NetworkError::io("cannot poll", dir.path()))?;
        let mut switch = Switch::default();
        let gateway_port = switch.add_port(Some(gateway_mac));
        Ok(Process {
            dir,
            def,
            reg,
            listener,
            qemu_listener,
            qemu_waiting: HashMap::new(),
            switch,
            firewall: Firewall::default(),
            gateway_port,
            nat,
            members: HashMap::new(),
            pending: HashMap::new(),
            next_conn: 0,
            tap_buf: vec![0; NET_HDR_LEN + MAX_MESSAGE],
            had_member: false,
            started: Instant::now(),
            netns,
        })
    }

    fn run(&mut self) -> Result<()> {
        let mut next_tick = Instant::now() + TICK;
        let mut last_check = Instant::now();
        while !STOP.load(Ordering::SeqCst) {
            let busy = self.members.values().any(|m| m.readable && !m.paused);
            let timeout = if busy {
                Duration::ZERO
            } else {
                next_tick.saturating_duration_since(Instant::now())
            };
            let events = self
                .reg
                .wait(timeout)
                .map_err(NetworkError::io("cannot poll", self.dir.path()))?;
            for (token, events) in events {
                if Nat::owns_token(token) {
                    self.nat.handle_event(token, events, &mut self.reg);
                } else if token == TOKEN_LISTENER {
                    self.accept();
                } else if token == TOKEN_QEMU_LISTENER {
                    self.accept_qemu();
                } else if token & TOKEN_QEMU_WAITING != 0 {
                    self.hear_qemu(token & TOKEN_INDEX);
                } else if token & TOKEN_CONN != 0 {
                    self.read_request(token & TOKEN_INDEX);
                } else if token & TOKEN_MEMBER != 0 {
                    let port = PortId(token & TOKEN_INDEX);
                    if let Some(m) = self.members.get_mut(&port) {
                        m.readable = true;
                    }
                }
            }
            self.pump_members();
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                self.nat.tick(&mut self.reg);
                self.expire_pending();
                if last_check.elapsed() >= NAMESPACE_CHECK {
                    last_check = Instant::now();
                    self.drop_deleted_namespaces();
                }
            }
            self.flush();
            self.save_leases();
            if self.members.is_empty()
                && self.pending.is_empty()
                && self.qemu_waiting.is_empty()
                && (self.had_member || self.started.elapsed() > FIRST_MEMBER_GRACE)
            {
                log::info!("network {}: no members left", self.dir.name());
                break;
            }
        }
        Ok(())
    }

    /// Reads every member with readiness left, a few reads each.
    fn pump_members(&mut self) {
        let ready: Vec<PortId> = self
            .members
            .iter()
            .filter(|(_, m)| m.readable && !m.paused)
            .map(|(p, _)| *p)
            .collect();
        for port in ready {
            let Some(mut member) = self.members.remove(&port) else {
                continue;
            };
            let mut fabric = Fabric {
                switch: &mut self.switch,
                firewall: &mut self.firewall,
                members: &mut self.members,
                gateway_port: self.gateway_port,
            };
            let (nat, reg) = (&mut self.nat, &mut self.reg);
            let mut paused = false;
            let mut carry = |hdr: &NetHdr, frame: &[u8]| {
                let go_on = fabric.carry(nat, reg, port, hdr, frame);
                paused |= !go_on;
                go_on
            };
            let state = match &mut member.link {
                Link::Stream(stream) | Link::Qemu { port: stream, .. } => stream
                    .receive(&mut carry, READS_PER_TURN)
                    .map_err(|e| e.to_string()),
                Link::Tap { tap, .. } => read_tap(tap, &mut self.tap_buf, &mut carry),
            };
            if let Err(e) = &state {
                log::debug!("network: {}: {e}", member.name);
            }
            member.paused = paused;
            member.readable = matches!(state, Ok(ReadState::More));
            self.members.insert(port, member);
            if matches!(state, Ok(ReadState::Closed) | Err(_)) {
                self.leave(port);
            }
        }
    }

    /// Hands the NAT's frames to the members, then writes what waits for
    /// each; a member that drained lets paused senders go on.
    fn flush(&mut self) {
        let mut fabric = Fabric {
            switch: &mut self.switch,
            firewall: &mut self.firewall,
            members: &mut self.members,
            gateway_port: self.gateway_port,
        };
        self.nat.flush(&mut fabric, &mut self.reg);
        let mut gone = Vec::new();
        let mut drained = false;
        for (port, member) in self.members.iter_mut() {
            if !member.has_pending() {
                continue;
            }
            match member.flush() {
                Ok(true) => drained = true,
                Ok(false) => {}
                Err(e) => {
                    log::debug!("network: {}: {e}", member.name);
                    gone.push(*port);
                }
            }
        }
        if drained {
            for member in self.members.values_mut() {
                member.paused = false;
            }
        }
        for port in gone {
            self.leave(port);
        }
    }

    fn save_leases(&mut self) {
        if !self.nat.leases_mut().take_changed() {
            return;
        }
        let path = self.dir.leases_path();
        let text = self.nat.leases().render();
        if let Err(e) = crate::fsutil::write_atomically(&path, text.as_bytes()) {
            log::warn!(
                "network {}: cannot save {}: {e}",
                self.dir.name(),
                path.display()
            );
        }
    }

    /// A stop (SIGTERM) takes the namespaces' TAPs away; VMs see their
    /// socket close.
    fn shut_down(&mut self) {
        if !STOP.load(Ordering::SeqCst) {
            return;
        }
        let ports: Vec<PortId> = self.members.keys().copied().collect();
        for port in ports {
            self.leave(port);
        }
        self.close_waiting_qemu();
    }

    fn view(&self) -> NetworkView {
        let mut members: Vec<MemberView> = self
            .members
            .iter()
            .map(|(port, m)| MemberView {
                ingress: self.firewall.view(*port),
                ..m.view()
            })
            .collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        NetworkView {
            name: self.dir.name().to_string(),
            subnet: self.def.subnet,
            gateway: self.def.subnet.gateway(),
            nat: self.def.nat,
            pid: std::process::id(),
            members,
            leases: self
                .nat
                .leases()
                .iter()
                .map(|(mac, l)| LeaseView {
                    mac: MacAddress(mac.0),
                    ip: l.ip,
                    name: l.name.clone(),
                    reserved: l.reserved,
                })
                .collect(),
            gateway_nat: self.nat.snapshot(),
            switch: self.switch.counters,
            conntrack: self.firewall.counters(),
        }
    }
}

/// Reads frames from a TAP device (each with its vnet header) and hands
/// them on while `each` says so.
fn read_tap(
    tap: &mut crate::net::Tap,
    buf: &mut [u8],
    mut each: impl FnMut(&NetHdr, &[u8]) -> bool,
) -> std::result::Result<ReadState, String> {
    for _ in 0..READS_PER_TURN * 8 {
        let n = match tap.read_frame(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadState::Drained),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The namespace was deleted, or the device removed.
            Err(e) => return Err(format!("tap {}: {e}", tap.name())),
        };
        let Some(hdr) = NetHdr::parse(&buf[..n]) else {
            continue;
        };
        if !each(&hdr, &buf[NET_HDR_LEN..n]) {
            return Ok(ReadState::More);
        }
    }
    Ok(ReadState::More)
}
