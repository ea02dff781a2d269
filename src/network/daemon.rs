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
use super::netns;
use super::protocol::{AttachRequest, JoinRequest, Joined, NetRequest, NetResponse};
use super::store::{NetworkDef, NetworkDir};
use super::view::{LeaseView, MemberView, NetworkView};
use crate::cli::MacAddress;
use crate::control::protocol::{encode, MAX_LINE};
use crate::net::{
    EpollRegistry, ForwardListeners, Leases, Nat, NatConfig, NetHdr, SocketRegistry, NET_HDR_LEN,
    TICK,
};
use crate::switch::stream::{ReadState, StreamPort};
use crate::switch::wire::{Framing, MAX_MESSAGE};
use crate::switch::{PortId, Switch};

const TOKEN_LISTENER: u32 = 1;
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

/// A namespace member as saved for a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SavedNetns {
    path: PathBuf,
    device: String,
    name: String,
    mac: MacAddress,
    configure: bool,
}

struct Process {
    dir: NetworkDir,
    def: NetworkDef,
    reg: EpollRegistry,
    listener: UnixListener,
    switch: Switch,
    gateway_port: PortId,
    nat: Nat,
    members: HashMap<PortId, Member>,
    pending: HashMap<u32, Pending>,
    next_conn: u32,
    tap_buf: Vec<u8>,
    had_member: bool,
    started: Instant,
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
    let listener =
        UnixListener::bind(&socket).map_err(NetworkError::io("cannot listen on", &socket))?;
    listener
        .set_nonblocking(true)
        .map_err(NetworkError::io("cannot listen on", &socket))?;
    log::info!("network {name}: {} in {}", def.subnet, runtime.display());
    let mut process = Process::new(dir, def, listener)?;
    process.restore_namespaces();
    ready();
    let result = process.run();
    process.shut_down();
    let _ = std::fs::remove_file(&socket);
    result
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
    fn new(dir: NetworkDir, def: NetworkDef, listener: UnixListener) -> Result<Process> {
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
        let mut switch = Switch::default();
        let gateway_port = switch.add_port(Some(gateway_mac));
        Ok(Process {
            dir,
            def,
            reg,
            listener,
            switch,
            gateway_port,
            nat,
            members: HashMap::new(),
            pending: HashMap::new(),
            next_conn: 0,
            tap_buf: vec![0; NET_HDR_LEN + MAX_MESSAGE],
            had_member: false,
            started: Instant::now(),
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
                && (self.had_member || self.started.elapsed() > FIRST_MEMBER_GRACE)
            {
                log::info!("network {}: no members left", self.dir.name());
                break;
            }
        }
        Ok(())
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let id = self.next_conn & TOKEN_INDEX;
                    self.next_conn = self.next_conn.wrapping_add(1);
                    if stream.set_nonblocking(true).is_err()
                        || self.reg.add(stream.as_raw_fd(), TOKEN_CONN | id).is_err()
                    {
                        continue;
                    }
                    self.pending.insert(
                        id,
                        Pending {
                            stream,
                            line: Vec::new(),
                            since: Instant::now(),
                        },
                    );
                    self.read_request(id);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, typically: the next event retries.
                    log::warn!("network {}: accept: {e}", self.dir.name());
                    return;
                }
            }
        }
    }

    /// Reads what connection `id` sent; acts on a whole request line.
    fn read_request(&mut self, id: u32) {
        let Some(conn) = self.pending.get_mut(&id) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let closed = loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    conn.line.extend_from_slice(&chunk[..n]);
                    if conn.line.contains(&b'\n') || conn.line.len() > MAX_LINE {
                        break false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        let Some(conn) = self.pending.remove(&id) else {
            return;
        };
        let _ = self.reg.remove(conn.stream.as_raw_fd(), TOKEN_CONN | id);
        if closed && !conn.line.contains(&b'\n') {
            return;
        }
        let end = conn
            .line
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(conn.line.len());
        let request = serde_json::from_slice::<NetRequest>(&conn.line[..end])
            .map_err(|e| format!("malformed request: {e}"));
        let answer = match request {
            Ok(NetRequest::Join(join)) => match self.join(&join) {
                Ok((joined, port)) => {
                    self.become_member(conn.stream, port, &join, joined);
                    return;
                }
                Err(message) => NetResponse::Error { message },
            },
            Ok(NetRequest::Status) => NetResponse::Status(self.view()),
            Ok(NetRequest::MemberNat { name }) => match self.member_named(&name) {
                Some(m) => NetResponse::Nat {
                    nat: self.nat.snapshot_of(m.ip),
                },
                None => NetResponse::Error {
                    message: format!("{name} is not a member"),
                },
            },
            Ok(NetRequest::Attach(attach)) => match self.attach(&attach) {
                Ok(view) => NetResponse::Attached(view),
                Err(message) => NetResponse::Error { message },
            },
            Ok(NetRequest::Detach { netns }) => match self.detach(&netns) {
                Ok(()) => NetResponse::Detached,
                Err(message) => NetResponse::Error { message },
            },
            Err(message) => NetResponse::Error { message },
        };
        answer_and_close(conn.stream, &answer);
    }

    fn expire_pending(&mut self) {
        let late: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, c)| c.since.elapsed() > REQUEST_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(conn) = self.pending.remove(&id) {
                let _ = self.reg.remove(conn.stream.as_raw_fd(), TOKEN_CONN | id);
            }
        }
    }

    fn member_named(&self, name: &str) -> Option<&Member> {
        self.members.values().find(|m| m.name == name)
    }

    /// Checks a new member and gives it its address; the caller makes it
    /// a port. Errors are the one line the joining command prints.
    fn admit(
        &mut self,
        name: &str,
        mac: MacAddress,
        ip: Option<std::net::Ipv4Addr>,
    ) -> std::result::Result<std::net::Ipv4Addr, String> {
        let network = self.dir.name().to_string();
        if self.member_named(name).is_some() {
            return Err(format!(
                "a member named {name} is already on network {network}"
            ));
        }
        if let Some(other) = self.members.values().find(|m| m.mac == mac) {
            return Err(format!(
                "{} already uses MAC {mac} on network {network}: two members cannot share one (give another --mac)",
                other.name
            ));
        }
        let eth = EthernetAddress(mac.octets());
        let leases = self.nat.leases_mut();
        let ip = match ip {
            Some(ip) => {
                if !self.def.subnet.is_host(ip) {
                    return Err(format!(
                        "--ip {ip} is not a member address of {network}'s {} (not the network, gateway or broadcast address)",
                        self.def.subnet
                    ));
                }
                leases.reserve(eth, ip).map_err(|e| e.to_string())?;
                ip
            }
            None => leases
                .lease_for(eth)
                .ok_or_else(|| format!("network {network} has no address left in its pool"))?,
        };
        leases.set_name(eth, name);
        self.nat.add_neighbor(ip, eth);
        Ok(ip)
    }

    fn join(&mut self, join: &JoinRequest) -> std::result::Result<(Joined, PortId), String> {
        // Bind the forwards first: a port in use fails the join, and so
        // `vmlab run`, before the member counts.
        let listeners = ForwardListeners::bind(&join.forwards).map_err(|e| e.to_string())?;
        let ip = self.admit(&join.name, join.mac, join.ip)?;
        self.nat
            .add_forwards(listeners, ip, &mut self.reg)
            .map_err(|e| e.to_string())?;
        let port = self
            .switch
            .add_port(Some(EthernetAddress(join.mac.octets())));
        let joined = Joined {
            ip,
            prefix: self.def.subnet.prefix(),
            gateway: self.def.subnet.gateway(),
        };
        Ok((joined, port))
    }

    fn become_member(
        &mut self,
        stream: UnixStream,
        port: PortId,
        join: &JoinRequest,
        joined: Joined,
    ) {
        let answered = write_line(&stream, &NetResponse::Joined(joined.clone()));
        let link = answered
            .and_then(|()| StreamPort::new(stream, Framing::VnetHdr, PORT_BUFFER))
            .and_then(|p| {
                self.reg
                    .add(p.as_raw_fd(), TOKEN_MEMBER | port.0)
                    .map(|()| p)
            });
        let member = Member {
            name: join.name.clone(),
            mac: join.mac,
            ip: joined.ip,
            link: match link {
                Ok(link) => Link::Stream(link),
                Err(e) => {
                    log::warn!("network: {} could not join: {e}", join.name);
                    self.switch.remove_port(port);
                    self.nat.forget_guest(joined.ip, &mut self.reg);
                    return;
                }
            },
            forwards: join.forwards.clone(),
            readable: true,
            paused: false,
        };
        log::info!(
            "network: {} joined as {} ({})",
            join.name,
            joined.ip,
            join.mac
        );
        self.members.insert(port, member);
        self.had_member = true;
    }

    fn attach(&mut self, attach: &AttachRequest) -> std::result::Result<MemberView, String> {
        if self
            .members
            .values()
            .any(|m| matches!(&m.link, Link::Tap { netns, .. } if netns == &attach.netns))
        {
            return Err(format!(
                "{} is already attached to network {}",
                attach.netns.display(),
                self.dir.name()
            ));
        }
        let saved = SavedNetns {
            path: attach.netns.clone(),
            device: tap_name(self.dir.name()),
            name: attach.name.clone(),
            mac: MacAddress::for_vm(&format!("netns:{}:{}", self.dir.name(), attach.name)),
            configure: attach.configure,
        };
        let view = self.add_netns(&saved)?;
        self.save_namespaces();
        Ok(view)
    }

    fn add_netns(&mut self, saved: &SavedNetns) -> std::result::Result<MemberView, String> {
        let ip = self.admit(&saved.name, saved.mac, None)?;
        let address = saved.configure.then_some(netns::Address {
            ip,
            prefix: self.def.subnet.prefix(),
            gateway: self.def.subnet.gateway(),
        });
        let identity = netns::identity(&saved.path);
        let opened = identity
            .ok_or_else(|| format!("no network namespace at {}", saved.path.display()))
            .and_then(|_| {
                netns::open(&saved.path, &saved.device, saved.mac, address)
                    .map_err(|e| e.to_string())
            });
        let tap = match opened {
            Ok(tap) => tap,
            Err(e) => {
                self.nat.forget_guest(ip, &mut self.reg);
                return Err(e);
            }
        };
        let port = self
            .switch
            .add_port(Some(EthernetAddress(saved.mac.octets())));
        if let Err(e) = self.reg.add(tap.as_raw_fd(), TOKEN_MEMBER | port.0) {
            self.switch.remove_port(port);
            netns::release(tap);
            return Err(format!("cannot watch the TAP device: {e}"));
        }
        let member = Member {
            name: saved.name.clone(),
            mac: saved.mac,
            ip,
            link: Link::Tap {
                tap,
                netns: saved.path.clone(),
                configure: saved.configure,
                identity: identity.unwrap_or_default(),
            },
            forwards: Vec::new(),
            readable: true,
            paused: false,
        };
        let view = member.view();
        log::info!(
            "network: {} ({}) attached as {ip}",
            saved.name,
            saved.path.display()
        );
        self.members.insert(port, member);
        self.had_member = true;
        Ok(view)
    }

    fn detach(&mut self, netns: &Path) -> std::result::Result<(), String> {
        let port = self
            .members
            .iter()
            .find(|(_, m)| matches!(&m.link, Link::Tap { netns: n, .. } if n == netns))
            .map(|(p, _)| *p)
            .ok_or_else(|| {
                format!(
                    "{} is not attached to network {}",
                    netns.display(),
                    self.dir.name()
                )
            })?;
        self.leave(port);
        Ok(())
    }

    /// Member `port` is gone: its port, forwards and flows go too (its
    /// lease stays for when it comes back).
    fn leave(&mut self, port: PortId) {
        let Some(member) = self.members.remove(&port) else {
            return;
        };
        let _ = self.reg.remove(member.fd(), TOKEN_MEMBER | port.0);
        self.switch.remove_port(port);
        self.nat.forget_guest(member.ip, &mut self.reg);
        log::info!("network: {} left", member.name);
        if let Link::Tap { tap, .. } = member.link {
            netns::release(tap);
            self.save_namespaces();
        }
    }

    /// Namespace members whose namespace was deleted leave.
    fn drop_deleted_namespaces(&mut self) {
        let gone: Vec<PortId> = self
            .members
            .iter()
            .filter(|(_, m)| match &m.link {
                Link::Tap {
                    netns, identity, ..
                } => netns::identity(netns) != Some(*identity),
                Link::Stream(_) => false,
            })
            .map(|(p, _)| *p)
            .collect();
        for port in gone {
            self.leave(port);
        }
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
                Link::Stream(stream) => stream
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

    fn saved_namespaces(&self) -> Vec<SavedNetns> {
        self.members
            .values()
            .filter_map(|m| match &m.link {
                Link::Tap {
                    tap,
                    netns,
                    configure,
                    ..
                } => Some(SavedNetns {
                    path: netns.clone(),
                    device: tap.name().to_string(),
                    name: m.name.clone(),
                    mac: m.mac,
                    configure: *configure,
                }),
                Link::Stream(_) => None,
            })
            .collect()
    }

    fn save_namespaces(&self) {
        let path = self.dir.members_path();
        let text = render_namespaces(&self.saved_namespaces());
        if let Err(e) = crate::fsutil::write_atomically(&path, text.as_bytes()) {
            log::warn!(
                "network {}: cannot save {}: {e}",
                self.dir.name(),
                path.display()
            );
        }
    }

    /// After a kill, the namespaces that were members come back (their
    /// TAP devices outlived the process).
    fn restore_namespaces(&mut self) {
        let Ok(text) = std::fs::read_to_string(self.dir.members_path()) else {
            return;
        };
        for saved in parse_namespaces(&text) {
            if !saved.path.exists() {
                log::info!("network: {} is gone", saved.path.display());
                continue;
            }
            if let Err(e) = self.add_netns(&saved) {
                log::warn!("network: cannot re-attach {}: {e}", saved.path.display());
            }
        }
        self.save_namespaces();
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
    }

    fn view(&self) -> NetworkView {
        let mut members: Vec<MemberView> = self.members.values().map(Member::view).collect();
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

/// The device a namespace member gets: `vl-NETWORK`, cut to fit.
fn tap_name(network: &str) -> String {
    format!("vl-{network}").chars().take(15).collect()
}

fn write_line(mut stream: &UnixStream, answer: &NetResponse) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&encode(answer))
}

fn answer_and_close(stream: UnixStream, answer: &NetResponse) {
    let _ = write_line(&stream, answer);
}

fn render_namespaces(saved: &[SavedNetns]) -> String {
    saved
        .iter()
        .map(|s| {
            format!(
                "{}\t{}\t{}\t{}\t{}\n",
                s.path.display(),
                s.device,
                s.name,
                s.mac,
                if s.configure { "configure" } else { "dhcp" }
            )
        })
        .collect()
}

fn parse_namespaces(text: &str) -> Vec<SavedNetns> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let [path, device, name, mac, how] = f[..] else {
                return None;
            };
            Some(SavedNetns {
                path: PathBuf::from(path),
                device: device.to_string(),
                name: name.to_string(),
                mac: mac.parse().ok()?,
                configure: how == "configure",
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_namespaces_read_back() {
        let saved = vec![SavedNetns {
            path: "/run/netns/ct1".into(),
            device: tap_name("a-very-long-network-name"),
            name: "ct1".into(),
            mac: "52:54:00:01:02:03".parse().unwrap(),
            configure: true,
        }];
        assert_eq!(saved[0].device, "vl-a-very-long-");
        assert_eq!(parse_namespaces(&render_namespaces(&saved)), saved);
        assert!(parse_namespaces("junk\n").is_empty());
    }
}
