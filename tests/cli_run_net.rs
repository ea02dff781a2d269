//! `vmlab run`'s network options: a busy forward port, a bad MAC and
//! contradictory options fail at once with one clear line, before the
//! guest is even looked at (the kernel given does not exist).

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};

fn vmlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmlab"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("vmlab runs")
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "should fail: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line expected, got: {stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout: {out:?}");
    stderr
}

/// `vmlab run` of a missing kernel with a forward of `port`; its error line.
fn run_with_forward(port: u16) -> String {
    let rule = format!("tcp:{port}:80");
    let out = vmlab(&[
        "run",
        "--kernel",
        "/nonexistent/vmlinux",
        "--forward",
        &rule,
    ]);
    one_line_error(&out)
}

#[test]
fn busy_forward_port_fails_before_the_guest_is_built() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = run_with_forward(port);
    // The port, not the missing kernel: forwards are bound first.
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("choose another host port"), "{err}");
    assert!(!err.contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn free_forward_port_gets_past_binding() {
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let err = run_with_forward(port);
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn invalid_mac_is_refused() {
    let out = vmlab(&[
        "run",
        "--kernel",
        "/nonexistent",
        "--mac",
        "01:00:5e:00:00:01",
    ]);
    let err = one_line_error(&out);
    assert!(err.contains("--mac"), "{err}");
    assert!(err.contains("multicast"), "{err}");
}

#[test]
fn forward_without_a_network_is_refused() {
    let out = vmlab(&[
        "run",
        "--kernel",
        "/nonexistent",
        "--net",
        "none",
        "--forward",
        "tcp:2222:22",
    ]);
    let err = one_line_error(&out);
    assert!(err.contains("--net none"), "{err}");
}

#[test]
fn unknown_net_mode_is_refused() {
    let out = vmlab(&["run", "--kernel", "/nonexistent", "--net", "bridge"]);
    let err = one_line_error(&out);
    assert!(err.contains("bridge"), "{err}");
}

/// Several cards: each impossible combination is one line, before the
/// guest is looked at; a TAP that does not exist is named, not created.
#[test]
fn card_lists_that_cannot_work_are_refused_in_one_line() {
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--kernel", "/nonexistent/vmlinux"];
        args.extend_from_slice(extra);
        one_line_error(&vmlab(&args))
    };
    let nine: Vec<&str> = ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
        .iter()
        .flat_map(|n| ["--net", n])
        .collect();
    for (extra, needle) in [
        (
            &["--net", "user", "--net", "user"][..],
            "one card behind its own NAT",
        ),
        (
            &["--net", "user", "--net", "none"],
            "--net none means no card",
        ),
        (
            &[
                "--net",
                "user",
                "--mac",
                "52:54:00:00:00:01",
                "--mac",
                "52:54:00:00:00:02",
            ],
            "--mac given twice for eth0",
        ),
        (
            &[
                "--net",
                "user",
                "--mac",
                "52:54:00:00:00:01",
                "--net",
                "tap:vmlabnone0",
                "--mac",
                "52:54:00:00:00:01",
            ],
            "eth0 and eth1 both have MAC 52:54:00:00:00:01",
        ),
        (&["--net", "tap:a/b"], "is not a network device name"),
        (
            &["--net", "tap:vmlabnone0", "--forward", "tcp:2222:22"],
            "a TAP card is bridged",
        ),
        (
            &["--net", "user", "--ip", "192.168.100.9"],
            "add --net NETWORK",
        ),
        (
            &["--net", "tap:vmlabnone0"],
            "no network device 'vmlabnone0'",
        ),
        (&nine, "at most 8 fit"),
    ] {
        let err = run(extra);
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("/nonexistent"), "refused first: {err}");
    }
    // A forward before any --net is the first card's (a user one, which
    // binds it: the busy port is what fails, not the TAP card after it).
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = format!("tcp:{}:22", taken.local_addr().unwrap().port());
    let err = run(&["--forward", &busy, "--net", "user", "--net", "lab-none"]);
    assert!(err.contains("choose another host port"), "{err}");
}
