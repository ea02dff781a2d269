//! What the `control_protocol` fuzz target does with each input, kept in the
//! library so that the ordinary test suite replays exactly what the fuzzer
//! did (tests/fuzz_regressions.rs).
//!
//! Anyone who can reach a VM's control socket can send it anything: the
//! server must answer every byte string with one well-formed line (an error
//! answer at worst), and never panic or hang; the client must refuse a
//! garbled answer cleanly.

use std::fs::File;
use std::io::{BufReader, Cursor, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::console_hub::ConsoleHub;
use super::protocol::{encode, read_message, Response};
use super::server::{serve, ControlContext};

/// Byte 0: bit 0 gives the VM a console input pipe (a detached VM's);
/// the rest is what a client sends, then half-closes. The same bytes are
/// also read as an answer, as a client reads a VM's.
pub fn exercise_control(data: &[u8]) {
    let Some((&flags, sent)) = data.split_first() else {
        return;
    };
    serve_bytes(flags & 1 != 0, sent);
    read_as_answer(sent);
}

fn serve_bytes(console_input: bool, sent: &[u8]) {
    let Ok((mut client, server)) = UnixStream::pair() else {
        return;
    };
    let mut ctx = ControlContext::new(
        "fuzz".into(),
        vec![],
        Box::new(|| Ok(())),
        ConsoleHub::new(None, false),
    );
    let mut keep = None;
    if console_input {
        let Ok((read, write)) = nix::unistd::pipe() else {
            return;
        };
        // Keystrokes beyond what the pipe holds end the session rather
        // than block it: nobody reads them here.
        if fcntl(&write, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_err() {
            return;
        }
        ctx.console_input = Some(Mutex::new(File::from(write)));
        keep = Some(read);
    }
    // The input fits the socket's buffer, or the rest is dropped: the
    // server reads only after we are done writing.
    let _ = client.set_nonblocking(true);
    let _ = client.write_all(sent);
    let _ = client.shutdown(Shutdown::Write);
    serve(server, &ctx);
    let _ = client.set_nonblocking(false);
    let answer = read_message::<Response>(&mut BufReader::new(&client));
    assert!(
        answer.is_ok(),
        "the server's answer does not parse: {answer:?}"
    );
    drop(keep);
}

fn read_as_answer(bytes: &[u8]) {
    let Ok(answer) = read_message::<Response>(&mut Cursor::new(bytes)) else {
        return;
    };
    if let Response::Nat {
        nat: Some(snapshot),
    } = &answer
    {
        let _ = snapshot.render();
    }
    let again = read_message::<Response>(&mut Cursor::new(encode(&answer)));
    assert_eq!(again.ok().as_ref(), Some(&answer), "answers round-trip");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::Request;

    #[test]
    fn requests_garbage_and_console_sessions_are_answered() {
        exercise_control(&[0]);
        exercise_control(&[0, b'\n']);
        exercise_control(&[0, 0xff, 0xfe, b'\n', b'x']);
        let mut console = vec![1];
        console.extend(encode(&Request::Console));
        console.extend(vec![b'k'; 200_000]);
        exercise_control(&console);
        let mut status = vec![0];
        status.extend(encode(&Request::Status));
        exercise_control(&status);
        let answer = b"\x00{\"answer\":\"nat\",\"network\":true,\"forwards\":[\"\\u001b[2J\"],\"flows\":[],\"counters\":{}}\n";
        exercise_control(answer);
    }
}
