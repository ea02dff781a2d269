//! Talking to a network's process: one request and its answer, joining
//! as a member, and starting the process when it does not run (the first
//! member does, and after a kill the next one).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::fcntl::FlockArg;

use super::error::{NetworkError, Result};
use super::protocol::{JoinRequest, Joined, NetRequest, NetResponse};
use super::store::{lock_file, NetworkDir};
use crate::control::protocol::{encode, read_message};

/// The hidden subcommand the network process runs as.
pub const DAEMON_COMMAND: &str = "network-daemon";
const READY: &str = "ready";
/// How long a starting network process may take to say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the network's socket if its process runs.
pub fn connect(net: &NetworkDir) -> Option<UnixStream> {
    if !net.is_running().unwrap_or(false) {
        return None;
    }
    UnixStream::connect(net.socket_path()).ok()
}

/// Connects, starting the network process first when it does not run
/// (under its seccomp filters when `filtered`).
pub fn connect_or_start(net: &NetworkDir, filtered: bool) -> Result<UnixStream> {
    if let Some(stream) = connect(net) {
        return Ok(stream);
    }
    // One starter at a time; the others find it running once they get in.
    let _starting = lock_file(&net.start_lock_path(), FlockArg::LockExclusive)?;
    if let Some(stream) = connect(net) {
        return Ok(stream);
    }
    start(net, filtered)?;
    connect(net).ok_or_else(|| NetworkError::Daemon {
        name: net.name().to_string(),
        message: format!(
            "its process started but does not answer (see {})",
            net.log_path().display()
        ),
    })
}

/// Starts `vmlab network-daemon NAME` and waits until it says it is ready.
/// It forks away from its starter, so a VM that starts it does not collect
/// a zombie when the network ends.
fn start(net: &NetworkDir, filtered: bool) -> Result<()> {
    let exe = std::env::current_exe().map_err(NetworkError::io("cannot find", "vmlab".as_ref()))?;
    let log_path = net.log_path();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(NetworkError::io("cannot open", &log_path))?;
    // The network outlives its starter: it inherits nothing but its stdio.
    crate::fds::close_on_exec_above_stderr().map_err(NetworkError::io("cannot prepare", &exe))?;
    let mut command = Command::new(&exe);
    command.arg(DAEMON_COMMAND).arg(net.name());
    if !filtered {
        command.arg("--no-seccomp");
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(NetworkError::io("cannot start", &exe))?;
    let out = child.stdout.take();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        if let Some(out) = out {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
    // The first process forks the network's and exits at once.
    let _ = child.wait();
    if line.trim() == READY {
        return Ok(());
    }
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    Err(NetworkError::Daemon {
        name: net.name().to_string(),
        message: match last {
            Some(line) => format!(
                "its process did not start: {}",
                line.trim_start_matches("vmlab: error: ")
            ),
            None => "its process did not start".to_string(),
        },
    })
}

/// The network process's side of [`start`]: tells the starter it is ready.
pub fn signal_ready() {
    crate::control::daemon::signal_ready();
}

/// Reads the answer line one byte at a time: after a join answer the
/// stream carries frames, and a buffered reader would swallow some.
fn read_answer_line(mut stream: &UnixStream) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() <= crate::control::protocol::MAX_LINE {
        if std::io::Read::read(&mut stream, &mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    Ok(line)
}

fn exchange(net: &NetworkDir, stream: &UnixStream, request: &NetRequest) -> Result<NetResponse> {
    let io_err = |e: std::io::Error| NetworkError::Daemon {
        name: net.name().to_string(),
        message: format!("no answer: {e}"),
    };
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(io_err)?;
    let mut writer = stream;
    writer.write_all(&encode(request)).map_err(io_err)?;
    let answer = if matches!(request, NetRequest::Join(_)) {
        let line = read_answer_line(stream).map_err(io_err)?;
        read_message::<NetResponse>(&mut &line[..])
    } else {
        read_message::<NetResponse>(&mut BufReader::new(stream))
    }
    .map_err(|e| NetworkError::Daemon {
        name: net.name().to_string(),
        message: e.to_string(),
    })?;
    match answer {
        NetResponse::Error { message } => Err(NetworkError::Refused {
            name: net.name().to_string(),
            message,
        }),
        other => Ok(other),
    }
}

/// One request to a running network; None when its process does not run.
pub fn ask(net: &NetworkDir, request: &NetRequest) -> Result<Option<NetResponse>> {
    match connect(net) {
        Some(stream) => exchange(net, &stream, request).map(Some),
        None => Ok(None),
    }
}

/// One request, starting the network process if needed (filtered or
/// not, as [`connect_or_start`]).
pub fn ask_starting(net: &NetworkDir, request: &NetRequest, filtered: bool) -> Result<NetResponse> {
    let stream = connect_or_start(net, filtered)?;
    exchange(net, &stream, request)
}

/// Joins the network as a VM member: the connection then carries frames.
/// A network this starts runs filtered as the VM does (`run --no-seccomp`
/// starts it without its filters too).
pub fn join(net: &NetworkDir, request: &JoinRequest) -> Result<(UnixStream, Joined)> {
    let stream = connect_or_start(net, crate::seccomp::enabled())?;
    join_over(net, stream, request)
}

/// Joins again a network whose process runs; None while it does not. For
/// a running VM's link: it never starts the process itself (that is an
/// exec, which its seccomp filter forbids), the next member command does.
pub fn rejoin(net: &NetworkDir, request: &JoinRequest) -> Result<Option<(UnixStream, Joined)>> {
    match UnixStream::connect(net.socket_path()) {
        Ok(stream) => join_over(net, stream, request).map(Some),
        Err(_) => Ok(None),
    }
}

fn join_over(
    net: &NetworkDir,
    stream: UnixStream,
    request: &JoinRequest,
) -> Result<(UnixStream, Joined)> {
    match exchange(net, &stream, &NetRequest::Join(request.clone()))? {
        NetResponse::Joined(joined) => {
            let _ = stream.set_read_timeout(None);
            Ok((stream, joined))
        }
        other => Err(NetworkError::Daemon {
            name: net.name().to_string(),
            message: format!("unexpected answer {other:?}"),
        }),
    }
}
