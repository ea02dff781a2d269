//! `vmlab nat` as a user runs it.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_root_and_tools, Netns};

const VMLAB: &str = env!("CARGO_BIN_EXE_vmlab");

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn forward_port_in_use_fails_before_anything_else() {
    require_root_and_tools(&["ip"]);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let tap = format!("vtcli{}", std::process::id() % 100_000);
    let out = Command::new(VMLAB)
        .args(["nat", "--tap", &tap, "--forward", &format!("tcp:{port}:22")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("choose another host port"), "{stderr}");
    // The TAP device was never created.
    let link = Command::new("ip")
        .args(["link", "show", &tap])
        .output()
        .unwrap();
    assert!(!link.status.success(), "tap {tap} exists");
}

#[test]
fn bad_forward_rule_is_one_clear_line() {
    let out = Command::new(VMLAB)
        .args(["nat", "--tap", "x", "--forward", "tcp:22"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("expected tcp:[HOSTADDR:]HOSTPORT:GUESTPORT"),
        "{stderr}"
    );
}

/// `vmlab nat` with `args` serving TAP `tap` in `ns`, once the TAP is there.
fn serve(ns: &Netns, tap: &str, args: &[&str]) -> Guard {
    let nat = Guard(
        Command::new(VMLAB)
            .args(["nat", "--tap", tap])
            .args(args)
            .arg("--netns")
            .arg(ns.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    // The TAP appears inside the namespace once vmlab has opened it.
    let start = Instant::now();
    while !ns.sh(&format!("ip link show {tap}")).status.success() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "vmlab never opened {tap}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nat
}

#[test]
fn nat_command_serves_a_namespace() {
    require_root_and_tools(&["ip", "busybox"]);
    let ns = Netns::new();
    let tap = "vmlab0";
    let _nat = serve(&ns, tap, &["--host-only", "--hostname", "clitest"]);
    ns.sh_ok(&format!(
        "ip link set lo up && ip link set {tap} up && \
         timeout 20 busybox udhcpc -i {tap} -q -f -n -t 5 -T 1 -s /bin/true >/dev/null"
    ));
    // udhcpc with a no-op script only proves the lease; configure statically.
    ns.sh_ok(&format!(
        "ip addr add 10.0.2.15/24 dev {tap} && ip route add default via 10.0.2.2"
    ));
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        s.write_all(b"hello from the host\n").unwrap();
    });
    let got = ns.run(move || {
        let mut s = TcpStream::connect(("10.0.2.2", port)).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    });
    t.join().unwrap();
    assert_eq!(got, "hello from the host\n");
}

/// The loop runs under its seccomp filter: the test hook makes one
/// syscall outside its list (personality, 135) once the filter is in, and
/// the process ends with SIGSYS's status and one line saying why.
#[test]
fn a_forbidden_syscall_in_the_nat_loop_kills_it_with_one_line() {
    require_root_and_tools(&["ip"]);
    let ns = Netns::new();
    let nat = |extra: &[&str]| {
        Command::new(VMLAB)
            .args(["nat", "--tap", "vmlab0", "--netns"])
            .arg(ns.path())
            .args(extra)
            .env("VMLAB_SECCOMP_SELFTEST", "nat")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let out = nat(&[]).wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + 31), "exits as SIGSYS");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "vmlab: error: killed by its seccomp filter (SIGSYS): syscall 135 on a nat thread"
    );
    // Unfiltered, the hook never fires: it serves until killed.
    let mut unfiltered = Guard(nat(&["--no-seccomp"]));
    std::thread::sleep(Duration::from_millis(500));
    assert!(unfiltered.0.try_wait().unwrap().is_none(), "still serving");
}

#[test]
fn host_loopback_ports_limit_what_the_gateway_reaches() {
    require_root_and_tools(&["ip", "busybox"]);
    let ns = Netns::new();
    let tap = "vmlab0";
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let (allowed_port, other_port) = (
        allowed.local_addr().unwrap().port(),
        other.local_addr().unwrap().port(),
    );
    let allowed_arg = allowed_port.to_string();
    let _nat = serve(
        &ns,
        tap,
        &["--outbound", "host", "--host-loopback", &allowed_arg],
    );
    ns.sh_ok(&format!(
        "ip link set lo up && ip link set {tap} up && \
         ip addr add 10.0.2.15/24 dev {tap} && ip route add default via 10.0.2.2"
    ));
    let results = ns.run(move || {
        [allowed_port, other_port].map(|port| {
            TcpStream::connect_timeout(&([10, 0, 2, 2], port).into(), Duration::from_secs(5))
                .map(drop)
                .map_err(|e| e.kind())
        })
    });
    assert_eq!(results[0], Ok(()), "the allowed port");
    assert_eq!(
        results[1],
        Err(std::io::ErrorKind::ConnectionRefused),
        "another host port"
    );
}

#[test]
fn bad_reach_policies_are_one_clear_line() {
    for (args, needle) in [
        (["--host-loopback", "22;80"], "ports like 22,8080"),
        (["--outbound", "world"], "'any'"),
    ] {
        let out = Command::new(VMLAB)
            .args(["nat", "--tap", "x"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
}
