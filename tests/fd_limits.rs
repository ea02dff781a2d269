//! Running out of file descriptors (EMFILE) is survived: a forward
//! listener and the control listener count it, log it a few times rather
//! than in a loop, and serve the waiting connection once descriptors are
//! free again.
//!
//! The open-file limit is process-wide, so both cases run in one test, one
//! after the other.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmlab::control::protocol::{encode, read_message, Request, Response};
use vmlab::control::server::{self, ControlContext};
use vmlab::net::{EpollRegistry, ForwardListeners, Nat, NatConfig, Outbound};

/// Counts warnings, so the test sees how often vmlab complained.
struct Warnings(AtomicUsize);

impl log::Log for Warnings {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            self.0.fetch_add(1, Ordering::SeqCst);
            eprintln!("warning seen: {}", record.args());
        }
    }
    fn flush(&self) {}
}

static WARNINGS: Warnings = Warnings(AtomicUsize::new(0));

fn rlimit() -> libc::rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim
}

fn set_soft_limit(soft: u64) {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: rlimit().rlim_max,
    };
    // SAFETY: setrlimit reads one rlimit from the struct we pass.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

/// Lowers the soft limit to what is open now and fills the gaps below it,
/// so the next descriptor the process makes fails with EMFILE. Returns the
/// limit to restore and the fillers (close them first).
fn exhaust() -> (u64, Vec<std::fs::File>) {
    let before = rlimit().rlim_cur;
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    set_soft_limit(highest + 1);
    let mut fillers = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        fillers.push(f);
    }
    (before, fillers)
}

/// Runs the NAT's events and timers until `done` or `limit`.
fn drive(nat: &mut Nat, reg: &mut EpollRegistry, limit: Duration, done: impl Fn(&Nat) -> bool) {
    let start = Instant::now();
    while !done(nat) && start.elapsed() < limit {
        for (token, events) in reg.wait(Duration::from_millis(10)).unwrap() {
            nat.handle_event(token, events, reg);
        }
        nat.tick(reg);
    }
}

fn forward_listener_waits_out_emfile() {
    let mut rule: vmlab::cli::ForwardRule = "tcp:1:22".parse().unwrap();
    rule.host.set_port(0);
    let listeners = ForwardListeners::bind(&[rule]).unwrap();
    let SocketAddr::V4(host) = listeners.local_addrs()[0].1 else {
        unreachable!()
    };
    let mut reg = EpollRegistry::new().unwrap();
    let mut nat = Nat::new(
        NatConfig {
            outbound: Outbound::HostOnly,
            ..NatConfig::default()
        },
        listeners,
    );
    nat.start(&mut reg).unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let (restore, fillers) = exhaust();
    socket.connect(&SocketAddr::V4(host).into()).unwrap();
    let warned = WARNINGS.0.load(Ordering::SeqCst);
    drive(&mut nat, &mut reg, Duration::from_millis(1500), |_| false);
    assert!(nat.flows().is_empty(), "accepted without a descriptor?");
    let complaints = WARNINGS.0.load(Ordering::SeqCst) - warned;
    drop(fillers);
    set_soft_limit(restore);
    assert!(
        (1..=2).contains(&complaints),
        "{complaints} warnings for one stuck forward"
    );
    assert!(nat.counters().fd_exhausted >= 1, "{:?}", nat.counters());
    // Descriptors are back: the waiting connection becomes a flow without
    // another connection arriving to wake the listener.
    drive(&mut nat, &mut reg, Duration::from_secs(3), |nat| {
        !nat.flows().is_empty()
    });
    assert_eq!(nat.flows().len(), 1, "the forward never accepted again");
    drop(socket);
}

fn control_listener_waits_out_emfile() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let ctx = ControlContext::new(
        "vm1".into(),
        Vec::new(),
        Box::new(|| Ok(())),
        vmlab::control::console_hub::ConsoleHub::new(None, false),
    );
    let ctx = Arc::new(ctx);
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    let warned = WARNINGS.0.load(Ordering::SeqCst);
    // Out of descriptors before the server's first accept (a blocked
    // accept holds the descriptor it will return).
    let (restore, fillers) = exhaust();
    server::spawn(listener, ctx).unwrap();
    socket
        .connect(&socket2::SockAddr::unix(&path).unwrap())
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let complaints = WARNINGS.0.load(Ordering::SeqCst) - warned;
    drop(fillers);
    set_soft_limit(restore);
    assert!(
        (1..=2).contains(&complaints),
        "{complaints} warnings in 1.5 s for one waiting client"
    );
    let mut stream: UnixStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&encode(&Request::Status)).unwrap();
    let answer: Response = read_message(&mut BufReader::new(&stream)).unwrap();
    let Response::Status(status) = answer else {
        panic!("{answer:?}")
    };
    assert!(status.accept_errors >= 1, "{status:?}");
    let _ = BufReader::new(&stream).fill_buf();
}

#[test]
fn emfile_is_counted_rate_limited_and_recovered() {
    log::set_logger(&WARNINGS).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    forward_listener_waits_out_emfile();
    control_listener_waits_out_emfile();
}
