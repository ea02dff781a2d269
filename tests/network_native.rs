//! Lab networks with network namespaces as members, natively: the real
//! `vmlab` binary creates networks and attaches namespaces, the network
//! process it starts switches their frames and serves DHCP, DNS and NAT.
//! A "VM" member is played by this test speaking the join protocol on the
//! network's socket. Each test has its own XDG directories, so their
//! networks never meet.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{expect_pattern, require_root_and_tools, send_pattern, Guest, Netns};
use vmlab::control::protocol::encode;
use vmlab::devices::virtio::net::NetBackend;
use vmlab::net::EpollRegistry;
use vmlab::network::link::MemberLink;
use vmlab::network::protocol::{JoinRequest, NetRequest, NetResponse};
use vmlab::network::NetworkDir;

const VMLAB: &str = env!("CARGO_BIN_EXE_vmlab");
const HUNDRED_MB: usize = 100 << 20;

struct Lab {
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        require_root_and_tools(&["ip", "busybox"]);
        Lab {
            dir: tempfile::Builder::new()
                .prefix("vmlab-net")
                .tempdir()
                .unwrap(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let home = self.dir.path();
        let mut command = Command::new(VMLAB);
        command
            .args(args)
            .env("HOME", home)
            .env("XDG_DATA_HOME", home.join("data"))
            .env("XDG_RUNTIME_DIR", home.join("run"));
        command
    }

    fn vmlab(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn log(&self, net: &str) -> String {
        let path = self
            .dir
            .path()
            .join(format!("data/vmlab/networks/{net}/network.log"));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vmlab(args);
        assert!(
            out.status.success(),
            "vmlab {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Fails with exactly one line on stderr, which is returned.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.vmlab(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "vmlab {args:?} should fail");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        err
    }

    /// Attaches `ns`; returns its address.
    fn attach(&self, net: &str, ns: &Netns) -> Ipv4Addr {
        let path = ns.path();
        let out = self.ok(&["network", "attach", net, "--netns", path.to_str().unwrap()]);
        // "NAME joined NET as IP (MAC)"
        out.split_whitespace().nth(4).unwrap().parse().unwrap()
    }

    fn socket(&self, net: &str) -> PathBuf {
        self.dir.path().join(format!("run/vmlab/net-{net}.sock"))
    }

    fn pid(&self, net: &str) -> Option<u32> {
        let show = self.vmlab(&["network", "show", net]);
        let show = String::from_utf8_lossy(&show.stdout);
        let first = show.lines().next()?;
        let at = first.find("(pid ")?;
        first[at + 5..].trim_end_matches(')').parse().ok()
    }

    /// A VM member as the network sees one: joins, then holds the socket.
    fn join(&self, net: &str, request: JoinRequest) -> Result<(UnixStream, Ipv4Addr), String> {
        let stream = UnixStream::connect(self.socket(net)).map_err(|e| e.to_string())?;
        (&stream)
            .write_all(&encode(&NetRequest::Join(request)))
            .unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8];
        while byte[0] != b'\n' {
            assert_eq!((&stream).read(&mut byte).unwrap(), 1, "answer cut short");
            line.push(byte[0]);
        }
        match serde_json::from_slice(&line).unwrap() {
            NetResponse::Joined(joined) => Ok((stream, joined.ip)),
            NetResponse::Error { message } => Err(message),
            other => panic!("{other:?}"),
        }
    }
}

impl Drop for Lab {
    /// Stops the networks' processes (the namespaces go with the test).
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("data/vmlab/networks")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(pid) = self.pid(&name) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}

/// A namespace whose resolver is its network's gateway.
fn member_ns(domain: &str, gateway: Ipv4Addr) -> Netns {
    let ns = Netns::new();
    let dir = PathBuf::from("/etc/netns").join(&ns.name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("resolv.conf"),
        format!("nameserver {gateway}\nsearch {domain}\n"),
    )
    .unwrap();
    ns
}

fn forget_resolver(ns: &Netns) {
    let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&ns.name));
}

fn pings(ns: &Netns, target: &str) -> bool {
    ns.sh(&format!("busybox ping -c1 -W2 {target} >/dev/null 2>&1"))
        .status
        .success()
}

fn gateway() -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, 1)
}

#[test]
fn members_get_stable_leases_and_reach_each_other_by_address_and_name() {
    let lab = Lab::new();
    lab.ok(&["network", "create", "lab"]);
    let namespaces: Vec<Netns> = (0..10).map(|_| member_ns("lab", gateway())).collect();
    // Two members first, then eight more: ten distinct addresses.
    let mut ips: Vec<Ipv4Addr> = namespaces[..2]
        .iter()
        .map(|ns| lab.attach("lab", ns))
        .collect();
    assert_eq!(
        ips,
        [
            Ipv4Addr::new(192, 168, 100, 100),
            Ipv4Addr::new(192, 168, 100, 101)
        ]
    );
    let (a, b) = (&namespaces[0], &namespaces[1]);
    assert!(pings(a, &ips[1].to_string()), "by address");
    assert!(pings(a, &b.name), "by name");
    assert!(pings(b, &format!("{}.lab", a.name)), "by NAME.NETWORK");
    let hosts = b.sh_ok(&format!("getent hosts {}.lab", a.name));
    assert!(hosts.starts_with(&ips[0].to_string()), "{hosts}");
    ips.extend(namespaces[2..].iter().map(|ns| lab.attach("lab", ns)));
    let mut distinct = ips.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 10, "{ips:?}");
    for ns in &namespaces[2..] {
        assert!(pings(ns, &a.name), "{} reaches {}", ns.name, a.name);
    }
    // A member that leaves and comes back gets its address again.
    let path = b.path();
    lab.ok(&[
        "network",
        "detach",
        "lab",
        "--netns",
        path.to_str().unwrap(),
    ]);
    assert!(!pings(a, &ips[1].to_string()), "detached");
    assert_eq!(lab.attach("lab", b), ips[1]);

    // 100 MB from one member to another, every byte checked.
    let server = b.spawn(|| {
        let listener = TcpListener::bind("0.0.0.0:5001").unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        expect_pattern(&mut conn, 7, HUNDRED_MB).map_err(|e| e.to_string())
    });
    let to = SocketAddr::from((ips[1], 5001));
    a.run(move || {
        let mut conn = connect_within(to, Duration::from_secs(5));
        send_pattern(&mut conn, 7, HUNDRED_MB).unwrap();
    });
    assert_eq!(server.join().unwrap(), Ok(()));

    // The host's loopback through the gateway, as with --net user.
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let served = std::thread::spawn(move || {
        let (mut s, _) = host.accept().unwrap();
        s.write_all(b"hello member\n").unwrap();
    });
    let line = a.run(move || {
        let s = TcpStream::connect((gateway(), port)).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line
    });
    served.join().unwrap();
    assert_eq!(line, "hello member\n");
    for ns in &namespaces {
        forget_resolver(ns);
    }
}

#[test]
fn networks_are_apart_and_no_nat_keeps_members_in() {
    let lab = Lab::new();
    lab.ok(&["network", "create", "open"]);
    let out = lab.ok(&["network", "create", "closed", "--no-nat"]);
    assert!(
        out.contains("192.168.101.0/24") && out.contains("no NAT"),
        "{out}"
    );
    let closed_gw = Ipv4Addr::new(192, 168, 101, 1);
    let x = member_ns("open", gateway());
    let (y, z) = (
        member_ns("closed", closed_gw),
        member_ns("closed", closed_gw),
    );
    let x_ip = lab.attach("open", &x);
    let y_ip = lab.attach("closed", &y);
    let z_ip = lab.attach("closed", &z);
    assert!(
        pings(&y, &z_ip.to_string()),
        "neighbours on a closed network"
    );
    assert!(pings(&y, &z.name), "and their names");
    assert!(pings(&y, &closed_gw.to_string()), "and the gateway");
    assert!(
        !pings(&y, &x_ip.to_string()),
        "nothing beyond a closed network"
    );
    assert!(!pings(&x, &y_ip.to_string()), "another network's member");
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let refused = y.run(move || {
        TcpStream::connect_timeout(&SocketAddr::from((closed_gw, port)), Duration::from_secs(5))
            .map(drop)
            .map_err(|e| e.kind())
    });
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused));
    let reached = x.run(move || TcpStream::connect((gateway(), port)).is_ok());
    assert!(reached, "the open network reaches the host");
    let show = lab.ok(&["network", "show", "closed"]);
    assert!(show.contains("nat no"), "{show}");
    for ns in [&x, &y, &z] {
        forget_resolver(ns);
    }
}

/// The network process runs its loop and its namespace helper under
/// seccomp filters: the test hook makes one syscall outside the class's
/// list (personality, 135) right after its filter is in, the process dies
/// with the one line in its log, and the command that started it says so.
#[test]
fn a_forbidden_syscall_in_the_network_process_kills_it_and_its_starter_says_why() {
    let lab = Lab::new();
    lab.ok(&["network", "create", "lab"]);
    let ns = Netns::new();
    let path = ns.path();
    let attach = |extra: &[&str], class: &str| {
        let mut args = vec![
            "network",
            "attach",
            "lab",
            "--netns",
            path.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        lab.command(&args)
            .env("VMLAB_SECCOMP_SELFTEST", class)
            .output()
            .unwrap()
    };
    for class in ["network", "netns"] {
        let out = attach(&[], class);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{class}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        let line =
            format!("killed by its seccomp filter (SIGSYS): syscall 135 on a {class} thread");
        assert!(err.contains(&line), "{err}");
        assert!(
            lab.log("lab").contains(&format!("vmlab: error: {line}")),
            "{}",
            lab.log("lab")
        );
        assert_eq!(lab.pid("lab"), None, "{class}: the process is gone");
    }
    // Without the filters the hook never fires.
    let out = attach(&["--no-seccomp"], "network");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pings(&ns, &gateway().to_string()), "the member is on");
}

/// `attach --no-config`: the TAP comes up without an address, and a DHCP
/// client in the namespace (busybox udhcpc, its script setting what the
/// lease says) gets the very address the member was given.
#[test]
fn attach_without_config_leaves_the_address_to_a_dhcp_client_with_the_same_lease() {
    let lab = Lab::new();
    lab.ok(&["network", "create", "lab"]);
    let ns = Netns::new();
    let path = ns.path();
    let out = lab.ok(&[
        "network",
        "attach",
        "lab",
        "--netns",
        path.to_str().unwrap(),
        "--no-config",
    ]);
    let ip: Ipv4Addr = out.split_whitespace().nth(4).unwrap().parse().unwrap();
    let unconfigured = ns.sh_ok("ip -4 -o addr show dev vl-lab");
    assert_eq!(unconfigured.trim(), "", "no address before DHCP");
    let script = lab.dir.path().join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip addr add \"$ip/$mask\" dev \"$interface\"\n  ip route add default via \"$router\"\nesac\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    ns.sh_ok(&format!(
        "timeout 20 busybox udhcpc -i vl-lab -q -f -n -t 5 -T 1 -s {} >/dev/null",
        script.display()
    ));
    let addr = ns.sh_ok("ip -4 -o addr show dev vl-lab");
    assert!(addr.contains(&format!("{ip}/24")), "{ip}: {addr}");
    let route = ns.sh_ok("ip route show default");
    assert!(route.contains(&format!("via {}", gateway())), "{route}");
    assert!(pings(&ns, &gateway().to_string()), "the lease works");
}

fn vm(name: &str, mac: &str, ip: Option<Ipv4Addr>) -> JoinRequest {
    JoinRequest {
        name: name.into(),
        mac: mac.parse().unwrap(),
        ip,
        forwards: Vec::new(),
        ingress: Vec::new(),
    }
}

#[test]
fn reservations_hold_bad_joins_are_refused_and_a_killed_network_keeps_its_leases() {
    let lab = Lab::new();
    lab.ok(&["network", "create", "lab"]);
    let a = Netns::new();
    let a_ip = lab.attach("lab", &a);
    let reserved = Ipv4Addr::new(192, 168, 100, 20);
    let (vm1, ip) = lab
        .join("lab", vm("db", "52:54:00:00:00:20", Some(reserved)))
        .unwrap();
    assert_eq!(ip, reserved);
    for (request, needle) in [
        (vm("db2", "52:54:00:00:00:20", None), "cannot share one"),
        (vm("db", "52:54:00:00:00:21", None), "a member named db"),
        (
            vm("web", "52:54:00:00:00:22", Some(reserved)),
            "already taken by db",
        ),
        (
            vm("web", "52:54:00:00:00:22", Some(Ipv4Addr::new(10, 1, 1, 1))),
            "not a member address",
        ),
        (
            vm("web", "52:54:00:00:00:22", Some(gateway())),
            "not a member address",
        ),
    ] {
        let err = lab.join("lab", request).unwrap_err();
        assert!(err.contains(needle), "{err}");
    }
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut busy = vm("web", "52:54:00:00:00:22", None);
    busy.forwards = vec![format!("tcp:{}:80", taken.local_addr().unwrap().port())
        .parse()
        .unwrap()];
    let err = lab.join("lab", busy).unwrap_err();
    assert!(err.contains("choose another host port"), "{err}");
    let show = lab.ok(&["network", "show", "lab"]);
    assert!(
        !show.contains("web"),
        "a refused member leaves no trace: {show}"
    );
    let err = lab.fails(&["network", "rm", "lab"]);
    assert!(err.contains("has members"), "{err}");

    // kill -9: the next member command starts it again, leases intact.
    let pid = lab.pid("lab").unwrap();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    // Frames flooded to the VM may still be queued before the end.
    let mut rest = Vec::new();
    vm1.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&vm1)
        .read_to_end(&mut rest)
        .expect("the VM's socket closed");
    let start = Instant::now();
    while lab.pid("lab").is_some() {
        assert!(start.elapsed() < Duration::from_secs(5), "still running");
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = Netns::new();
    let b_ip = lab.attach("lab", &b);
    assert_ne!(lab.pid("lab"), Some(pid));
    let show = lab.ok(&["network", "show", "lab"]);
    assert!(show.contains(&a.name), "the namespace is back: {show}");
    assert!(pings(&b, &a_ip.to_string()), "and works");
    let (_vm1, ip) = lab
        .join("lab", vm("db", "52:54:00:00:00:20", None))
        .unwrap();
    assert_eq!(ip, reserved, "the reservation outlived the process");
    assert_ne!(b_ip, a_ip);
}

#[test]
fn bad_input_is_one_line_and_changes_nothing() {
    let lab = Lab::new();
    lab.ok(&["network", "create", "lab", "--subnet", "10.20.0.0/16"]);
    for (args, needle) in [
        (&["network", "show", "nope"][..], "no network named nope"),
        (&["network", "rm", "nope"], "no network named nope"),
        (&["network", "create", "lab"], "already exists"),
        (
            &["network", "create", "b", "--subnet", "10.20.5.0/24"],
            "overlaps lab's",
        ),
        (
            &["network", "create", "b", "--subnet", "10.0.2.0/24"],
            "--net user",
        ),
        (
            &["network", "create", "b", "--subnet", "10.30.0.1/24"],
            "host bits",
        ),
        (
            &["network", "create", "b", "--subnet", "10.30.0.0/31"],
            "16 to 29",
        ),
        (&["network", "create", "user"], "means something else"),
        (&["network", "create", "Big"], "invalid network name"),
        (
            &[
                "network",
                "attach",
                "lab",
                "--netns",
                "/run/netns/vmlab-no-such",
            ],
            "no network namespace",
        ),
        (
            &["network", "attach", "lab", "--netns", "/etc/hostname"],
            "cannot enter network namespace",
        ),
        (
            &["network", "detach", "lab", "--netns", "/etc/hostname"],
            "is not attached",
        ),
    ] {
        let err = lab.fails(args);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let ls = lab.ok(&["network", "ls"]);
    assert_eq!(ls.lines().count(), 2, "only lab: {ls}");
    let ns = Netns::new();
    lab.attach("lab", &ns);
    let path = ns.path();
    let err = lab.fails(&[
        "network",
        "attach",
        "lab",
        "--netns",
        path.to_str().unwrap(),
    ]);
    assert!(err.contains("already attached"), "{err}");
    let ls = lab.ok(&["network", "ls"]);
    assert!(
        ls.contains("10.20.0.0/16") && ls.contains("running"),
        "{ls}"
    );
}

/// `vmlab run --net NAME`: the join happens before the guest is looked at
/// (the kernel given does not exist), so each refusal is `run`'s one line.
#[test]
fn run_on_a_lab_network_refuses_bad_input_before_booting() {
    let lab = Lab::new();
    lab.ok(&["network", "create", "lab"]);
    let a = Netns::new();
    lab.attach("lab", &a);
    let (_db, _) = lab
        .join(
            "lab",
            vm(
                "db",
                "52:54:00:00:00:20",
                Some(Ipv4Addr::new(192, 168, 100, 20)),
            ),
        )
        .unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = format!("tcp:{}:80", taken.local_addr().unwrap().port());
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--name", "web", "--kernel", "/nonexistent/vmlinux"];
        args.extend_from_slice(extra);
        lab.fails(&args)
    };
    for (extra, needle) in [
        (&["--net", "nope"][..], "no network named nope"),
        (&["--net", "Bad!"], "is not user, none or a network"),
        (&["--ip", "192.168.100.30"], "add --net NETWORK"),
        (
            &["--net", "lab", "--ip", "10.1.2.3"],
            "not a member address of lab's 192.168.100.0/24",
        ),
        (
            &["--net", "lab", "--ip", "192.168.100.20"],
            "already taken by db",
        ),
        (
            &["--net", "lab", "--forward", &busy],
            "choose another host port",
        ),
    ] {
        let err = run(extra);
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("/nonexistent"), "refused first: {err}");
    }
    // Past the join, the missing kernel is what fails; the member it was
    // for a moment is gone again, its address kept for its MAC.
    let err = run(&["--net", "lab", "--ip", "192.168.100.30"]);
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    let start = Instant::now();
    loop {
        let show = lab.ok(&["network", "show", "lab"]);
        if !show.lines().any(|l| l.trim_start().starts_with("web ")) {
            assert!(show.contains("192.168.100.30"), "the lease stays: {show}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{show}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Drives `link` until `guest` holds an ARP request for `ip`.
fn wait_arp_for(link: &mut MemberLink, reg: &mut EpollRegistry, ip: Ipv4Addr) -> bool {
    let start = Instant::now();
    let mut guest = Guest::default();
    while start.elapsed() < Duration::from_secs(5) {
        for (token, events) in reg.wait(Duration::from_millis(20)).unwrap() {
            link.event(token, events, reg);
        }
        link.flush(&mut guest, reg);
        let asked = guest
            .frames
            .iter()
            .any(|f| f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[38..42] == ip.octets());
        if asked {
            return true;
        }
    }
    false
}

/// A VM's member link (the virtio-net backend of `run --net`), in this
/// process: it hears its neighbours, and when the network process is
/// killed and started again it rejoins on its own with its address.
#[test]
fn a_vm_link_hears_its_neighbours_and_rejoins_a_restarted_network() {
    let lab = Lab::new();
    lab.ok(&["network", "create", "lab"]);
    let a = Netns::new();
    lab.attach("lab", &a);
    // This process looks for the network where the vmlab children put it
    // (every child is given its directories explicitly).
    std::env::set_var("XDG_DATA_HOME", lab.dir.path().join("data"));
    std::env::set_var("XDG_RUNTIME_DIR", lab.dir.path().join("run"));
    let net = NetworkDir::existing("lab").unwrap();
    let (mut link, ip) = MemberLink::join(net, vm("web", "52:54:00:00:00:30", None)).unwrap();
    let mut reg = EpollRegistry::new().unwrap();
    link.start(&mut reg);
    let _ = a.sh(&format!("busybox ping -c1 -W1 {ip}"));
    assert!(wait_arp_for(&mut link, &mut reg, ip), "the neighbour's ARP");

    let pid = lab.pid("lab").unwrap();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    // The link sees its socket close; the next member command starts the
    // network again (before the link's own attempt, which would start
    // it from this test's executable).
    let start = Instant::now();
    while lab.pid("lab").is_some() {
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = Netns::new();
    lab.attach("lab", &b);
    let start = Instant::now();
    while link.counters.rejoins == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "no rejoin");
        for (token, events) in reg.wait(Duration::from_millis(20)).unwrap() {
            link.event(token, events, &mut reg);
        }
        link.flush(&mut Guest::default(), &mut reg);
        link.tick(&mut reg);
    }
    let show = lab.ok(&["network", "show", "lab"]);
    assert!(
        show.lines()
            .any(|l| l.trim_start().starts_with("web ") && l.contains(&ip.to_string())),
        "web is back with {ip}: {show}"
    );
    let _ = b.sh(&format!("busybox ping -c1 -W1 {ip}"));
    assert!(wait_arp_for(&mut link, &mut reg, ip), "and hears again");
}

/// A TAP device without vnet headers in `ns` (no offloads: what the
/// kernel reads from it must be whole, checksummed frames), up, with `mac`.
fn plain_tap(ns: &Netns, name: &str, mac: &str) -> std::fs::File {
    let dev = name.to_string();
    let tap = ns.run(move || {
        #[repr(C)]
        struct IfReq {
            name: [u8; libc::IFNAMSIZ],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..dev.len()].copy_from_slice(dev.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one live, properly sized ifreq.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::TUNSETIFF,
                &mut req as *mut IfReq,
            )
        };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        file
    });
    ns.sh_ok(&format!(
        "ip link set {name} address {mac} && ip link set {name} up"
    ));
    tap
}

/// What a QEMU guest on `-netdev stream` does with its NIC, played by two
/// threads: frames from `tap` go to `socket` behind a 4-byte big-endian
/// length, and back. Returns the largest frame written to the TAP.
fn qemu_relay(
    tap: std::fs::File,
    socket: UnixStream,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    let mut to_tap = tap.try_clone().unwrap();
    let mut from_socket = socket.try_clone().unwrap();
    let inbound = std::thread::spawn(move || {
        let mut largest = 0;
        let mut len = [0u8; 4];
        while from_socket.read_exact(&mut len).is_ok() {
            let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
            if from_socket.read_exact(&mut frame).is_err() {
                break;
            }
            largest = largest.max(frame.len());
            let _ = to_tap.write_all(&frame);
        }
        largest
    });
    let (mut from_tap, mut to_socket) = (tap, socket);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::SeqCst) {
            let mut fds = libc::pollfd {
                fd: from_tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes one live pollfd.
            if unsafe { libc::poll(&mut fds, 1, 100) } <= 0 {
                continue;
            }
            let Ok(n) = from_tap.read(&mut buf) else {
                break;
            };
            let mut msg = (n as u32).to_be_bytes().to_vec();
            msg.extend_from_slice(&buf[..n]);
            if to_socket.write_all(&msg).is_err() {
                break;
            }
        }
        let _ = to_socket.shutdown(std::net::Shutdown::Both);
        inbound.join().unwrap()
    })
}

/// The `InCsumErrors` counter of TCP in `ns` (/proc/net/snmp).
fn tcp_checksum_errors(ns: &Netns) -> u64 {
    let snmp = ns.sh_ok("cat /proc/net/snmp");
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// A QEMU guest joins by the QEMU socket `network show` prints: it gets a
/// lease and the DNS name `qemu-` + its MAC's last three bytes, shows as
/// kind `qemu`, and a TCP stream toward it from a member with offloads (a
/// namespace's vnet-header TAP, whose kernel sends 64 KiB TSO segments
/// with partial checksums) arrives as MTU-sized frames that the kernel
/// behind a TAP without vnet headers checks: no checksum errors, every
/// byte intact.
#[test]
fn a_qemu_member_gets_a_lease_and_a_segmented_checksummed_stream() {
    const SIZE: usize = 20 << 20;
    let lab = Lab::new();
    lab.ok(&["network", "create", "lab"]);
    let a = member_ns("lab", gateway());
    lab.attach("lab", &a);
    let show = lab.ok(&["network", "show", "lab"]);
    let socket = lab.dir.path().join("run/vmlab/net-lab.qemu.sock");
    assert!(
        show.contains(&format!(
            "-netdev stream,id=n0,server=off,addr.type=unix,addr.path={} -device virtio-net-device,netdev=n0",
            socket.display()
        )),
        "{show}"
    );

    let q = Netns::new();
    let tap = plain_tap(&q, "qt0", "52:54:00:ab:cd:ef");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = qemu_relay(tap, UnixStream::connect(&socket).unwrap(), stop.clone());
    q.sh_ok("timeout 20 busybox udhcpc -i qt0 -q -f -n -t 5 -T 1 -s /bin/true >/dev/null 2>&1");
    let show = lab.ok(&["network", "show", "lab"]);
    let row = show
        .lines()
        .find(|l| l.trim_start().starts_with("qemu-abcdef "))
        .unwrap_or_else(|| panic!("{show}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(fields[1], "52:54:00:ab:cd:ef", "{row}");
    assert_eq!(fields[3], "qemu", "{row}");
    let ip: Ipv4Addr = fields[2].parse().unwrap();
    q.sh_ok(&format!("ip addr add {ip}/24 dev qt0"));
    let hosts = a.sh_ok("getent hosts qemu-abcdef.lab");
    assert!(hosts.starts_with(&ip.to_string()), "{hosts}");
    assert!(pings(&a, "qemu-abcdef"), "by name");

    let errors_before = tcp_checksum_errors(&q);
    let server = q.spawn(|| {
        let listener = TcpListener::bind("0.0.0.0:5001").unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        // Lost frames stall the stream: fail, not hang.
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        expect_pattern(&mut conn, 11, SIZE).map_err(|e| e.to_string())
    });
    let to = SocketAddr::from((ip, 5001));
    a.run(move || {
        let mut conn = connect_within(to, Duration::from_secs(5));
        send_pattern(&mut conn, 11, SIZE).unwrap();
    });
    assert_eq!(server.join().unwrap(), Ok(()), "every byte intact");
    assert_eq!(tcp_checksum_errors(&q), errors_before, "no checksum errors");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let largest = relay.join().unwrap();
    assert!(
        largest <= 1514,
        "frames toward QEMU fit its MTU: {largest} bytes"
    );
    forget_resolver(&a);
}

/// Serves one line on `port` in `ns` to every connection, until the test ends.
fn greeter(ns: &Netns, port: u16) {
    let listener = ns.run(move || TcpListener::bind(("0.0.0.0", port)).unwrap());
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"hello\n");
        }
    });
}

/// Connects from `ns` to `to` and reads one line, within a second.
fn greeted(ns: &Netns, to: SocketAddr) -> bool {
    ns.run(move || {
        let Ok(conn) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) else {
            return false;
        };
        conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line).is_ok() && line == "hello\n"
    })
}

/// Ingress rules on a namespace member: its allowed port is reached,
/// other ports and ping are dropped and counted, and replies to the
/// connections it opens itself come back.
#[test]
fn ingress_rules_let_in_only_what_they_admit_and_replies() {
    let lab = Lab::new();
    lab.ok(&["network", "create", "lab"]);
    let web = Netns::new();
    let db = Netns::new();
    let web_ip = lab.attach("lab", &web);
    let path = db.path();
    let err = lab.fails(&[
        "network",
        "attach",
        "lab",
        "--netns",
        path.to_str().unwrap(),
        "--ingress",
        "tcp:0",
    ]);
    assert!(err.contains("invalid ingress rule 'tcp:0'"), "{err}");
    let out = lab.ok(&[
        "network",
        "attach",
        "lab",
        "--netns",
        path.to_str().unwrap(),
        "--ingress",
        "tcp:5432",
        "--ingress",
        "udp:53 from 10.0.0.0/8",
    ]);
    let db_ip: Ipv4Addr = out.split_whitespace().nth(4).unwrap().parse().unwrap();
    for port in [5432, 22] {
        greeter(&db, port);
    }
    greeter(&web, 8080);
    assert!(
        greeted(&web, SocketAddr::from((db_ip, 5432))),
        "allowed port"
    );
    assert!(!greeted(&web, SocketAddr::from((db_ip, 22))), "other port");
    assert!(!pings(&web, &db_ip.to_string()), "no icmp rule");
    assert!(
        greeted(&db, SocketAddr::from((web_ip, 8080))),
        "replies to db's own connection"
    );
    assert!(pings(&db, &web_ip.to_string()), "echo replies to db's ping");
    let show = lab.ok(&["network", "show", "lab"]);
    let line = show
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with(&format!("{}: tcp:5432", db.name))
        })
        .unwrap_or_else(|| panic!("{show}"));
    assert!(line.contains("tcp:5432 allowed 1"), "{line}");
    assert!(line.contains("udp:53 from 10.0.0.0/8 allowed 0"), "{line}");
    assert!(line.contains("tcp:22 "), "{line}");
    assert!(line.contains("icmp "), "{line}");
    assert!(show.contains("ingress: connections"), "{show}");
}

/// Connects to `to`, retrying while its server is still starting; fails
/// the test after `limit`.
fn connect_within(to: SocketAddr, limit: Duration) -> TcpStream {
    let start = Instant::now();
    loop {
        match TcpStream::connect(to) {
            Ok(c) => return c,
            Err(_) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("cannot connect to {to}: {e}"),
        }
    }
}
