//! The commands' side of a VM's control socket.

use std::io::{BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::error::{ControlError, Result};
use super::protocol::{encode, read_message, MessageError, Request, Response};
use super::state::VmDir;
use crate::vmm::console::{EscapeAction, EscapeParser, RawTerminal};

/// How long a VM may take to answer a quick request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a VM may take to answer a request that writes its memory or
/// flushes its disks first: 512 MiB to a slow disk under nested
/// emulation took over 10 s in CI. A hung VM still lets the command end.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);

/// The answer timeout for `request`.
fn answer_timeout(request: &Request) -> Duration {
    match request {
        Request::Status | Request::Stop | Request::Console | Request::Nat => ANSWER_TIMEOUT,
        Request::SnapshotDisks { .. } | Request::Suspend { .. } | Request::SnapshotFull { .. } => {
            SAVE_TIMEOUT
        }
    }
}

fn connect(vm: &VmDir) -> Result<UnixStream> {
    let path = vm.socket_path();
    UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ControlError::NotRunning(vm.name().to_string())
        }
        _ => ControlError::io("cannot connect to", &path)(e),
    })
}

fn send(vm: &VmDir, request: &Request) -> Result<(UnixStream, BufReader<UnixStream>, Response)> {
    send_within(vm, request, answer_timeout(request))
}

fn send_within(
    vm: &VmDir,
    request: &Request,
    timeout: Duration,
) -> Result<(UnixStream, BufReader<UnixStream>, Response)> {
    let protocol = |message: String| ControlError::Protocol {
        name: vm.name().to_string(),
        message,
    };
    let mut stream = connect(vm)?;
    let _ = stream.set_read_timeout(Some(timeout));
    stream
        .write_all(&encode(request))
        .map_err(|e| protocol(format!("cannot send the request: {e}")))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| protocol(e.to_string()))?);
    let answer = read_message(&mut reader).map_err(|e| match e {
        // SO_RCVTIMEO expiring reads as EAGAIN: say what it means.
        MessageError::Read(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            protocol(format!("no answer within {} s", timeout.as_secs_f64()))
        }
        e => protocol(e.to_string()),
    })?;
    Ok((stream, reader, answer))
}

/// Sends one request and returns the VM's answer (an error answer becomes
/// an error).
pub fn request(vm: &VmDir, request: &Request) -> Result<Response> {
    let answer = request_answer(vm, request)?;
    if let Response::Error { message } = answer {
        return Err(ControlError::Protocol {
            name: vm.name().to_string(),
            message,
        });
    }
    Ok(answer)
}

/// Sends one request and returns whatever the VM answered, an error answer
/// included: for callers that must tell "the VM said no" from "no answer".
pub fn request_answer(vm: &VmDir, request: &Request) -> Result<Response> {
    send(vm, request).map(|(_, _, answer)| answer)
}

/// Attaches this terminal to the VM's serial console until Ctrl-A x (the
/// VM keeps running) or until the VM ends. Returns true if the VM ended.
pub fn attach_console(vm: &VmDir) -> Result<bool> {
    let (mut stream, reader, answer) = send(vm, &Request::Console)?;
    if let Response::Error { message } = answer {
        return Err(ControlError::Protocol {
            name: vm.name().to_string(),
            message,
        });
    }
    let _ = stream.set_read_timeout(None);
    let io = |e: std::io::Error| ControlError::Protocol {
        name: vm.name().to_string(),
        message: format!("console: {e}"),
    };
    // Unbuffered, so that poll sees every byte still to read.
    let mut stdin = std::fs::File::from(crate::vmm::console::ConsoleInput::stdin_fd().map_err(io)?);
    let terminal = RawTerminal::enable(libc::STDIN_FILENO);
    let mut escape = terminal.is_some().then(EscapeParser::default);
    let mut out = std::io::stdout();
    // Output that arrived with the answer line.
    if !show(&mut out, reader.buffer()).map_err(io)? {
        return Ok(false);
    }
    let mut buf = [0u8; 4096];
    let mut stdin_open = true;
    loop {
        let mut fds = vec![PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io(e.into())),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        let socket_ready = ready(&fds[0]);
        let stdin_ready = stdin_open && ready(&fds[1]);
        drop(fds);
        if socket_ready {
            let n = stream.read(&mut buf).map_err(io)?;
            if n == 0 {
                drop(terminal);
                eprintln!("\r\nvmlab: {} stopped", vm.name());
                return Ok(true);
            }
            if !show(&mut out, &buf[..n]).map_err(io)? {
                return Ok(false);
            }
        }
        if stdin_ready {
            let n = stdin.read(&mut buf).map_err(io)?;
            if n == 0 {
                // Input closed (a pipe): keep showing output until the VM ends.
                stdin_open = false;
                continue;
            }
            let mut send = Vec::with_capacity(n);
            for &b in &buf[..n] {
                match escape.as_mut().map(|p| p.feed(b)) {
                    None => send.push(b),
                    Some(EscapeAction::Send(bytes)) => send.extend_from_slice(&bytes),
                    Some(EscapeAction::Pending) => {}
                    Some(EscapeAction::Quit) => {
                        stream.write_all(&send).map_err(io)?;
                        drop(terminal);
                        eprintln!("\r\nvmlab: detached from {} (still running)", vm.name());
                        return Ok(false);
                    }
                }
            }
            stream.write_all(&send).map_err(io)?;
        }
    }
}

/// Copies console output to `out`; false when nobody reads it any more
/// (`vmlab console NAME | head`): then the client detaches quietly and the
/// VM keeps running.
fn show(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<bool> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::state::tests::temp_home;
    use std::os::unix::net::UnixListener;

    #[test]
    fn requests_that_save_the_vm_may_take_minutes_and_quick_ones_do_not() {
        let save = [
            Request::SnapshotDisks { disks: vec![] },
            Request::Suspend { path: "s".into() },
            Request::SnapshotFull {
                disks: vec![],
                state: "s".into(),
            },
        ];
        for request in &save {
            assert!(
                answer_timeout(request) >= Duration::from_secs(300),
                "{request:?}"
            );
        }
        for request in [
            Request::Status,
            Request::Stop,
            Request::Nat,
            Request::Console,
        ] {
            assert_eq!(answer_timeout(&request), ANSWER_TIMEOUT, "{request:?}");
        }
    }

    #[test]
    fn a_vm_that_does_not_answer_in_time_is_named_in_one_line() {
        let _home = temp_home();
        let vm = VmDir::named("mute").unwrap();
        std::fs::create_dir_all(vm.socket_path().parent().unwrap()).unwrap();
        // Accepts and reads, never answers.
        let listener = UnixListener::bind(vm.socket_path()).unwrap();
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let err = send_within(&vm, &Request::Status, Duration::from_millis(200))
            .expect_err("a silent VM is an error");
        let _ = held.join();
        let text = err.to_string();
        assert!(
            text.contains("mute") && text.contains("no answer within 0.2 s"),
            "{text}"
        );
        assert!(!text.contains("os error"), "{text}");
    }
}
