//! The host side of the serial console: the user's terminal (raw mode,
//! restored on every exit path), the Ctrl-A escape, and input fed to the
//! UART without ever dropping a byte.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::exit::{ExitReason, ExitSignal};
use crate::devices::bus::lock;
use crate::devices::legacy::Serial;

const CTRL_A: u8 = 0x01;

/// What the escape parser makes of one input byte.
#[derive(Debug, PartialEq, Eq)]
pub enum EscapeAction {
    /// Forward these bytes to the guest.
    Send(Vec<u8>),
    /// Quit vmlab (Ctrl-A x).
    Quit,
    /// Nothing yet (Ctrl-A seen, waiting for the next key).
    Pending,
}

/// QEMU's console escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A,
/// Ctrl-A followed by anything else sends both keys.
#[derive(Debug, Default)]
pub struct EscapeParser {
    after_prefix: bool,
}

impl EscapeParser {
    pub fn feed(&mut self, byte: u8) -> EscapeAction {
        if std::mem::take(&mut self.after_prefix) {
            return match byte {
                b'x' | b'X' => EscapeAction::Quit,
                CTRL_A => EscapeAction::Send(vec![CTRL_A]),
                other => EscapeAction::Send(vec![CTRL_A, other]),
            };
        }
        if byte == CTRL_A {
            self.after_prefix = true;
            EscapeAction::Pending
        } else {
            EscapeAction::Send(vec![byte])
        }
    }
}

/// Puts a terminal in raw mode and restores its exact previous settings
/// when dropped.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Switches `fd` to raw mode if it is a terminal; `None` otherwise.
    pub fn enable(fd: RawFd) -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it and we check
        // the result before using it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct we pass.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores settings read from this same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Reads console input (stdin, or any readable descriptor) and feeds the
/// UART, holding back when its FIFO is full until the guest drains it.
pub struct ConsoleInput {
    input: Option<File>,
    /// Whether the input descriptor is registered with the event loop.
    watching: bool,
    /// Regular files and /dev/null cannot be polled; they are read directly
    /// whenever the UART has room.
    pollable: bool,
    serial: Arc<Mutex<Serial>>,
    room: Arc<EventFd>,
    escape: Option<EscapeParser>,
    pending: Vec<u8>,
    exit: ExitSignal,
}

impl ConsoleInput {
    /// `escapes`: interpret Ctrl-A sequences (for interactive terminals).
    pub fn new(
        input: OwnedFd,
        escapes: bool,
        serial: Arc<Mutex<Serial>>,
        exit: ExitSignal,
    ) -> Self {
        let room = lock(&serial).input_room_event();
        ConsoleInput {
            input: Some(File::from(input)),
            watching: false,
            pollable: true,
            serial,
            room,
            escape: escapes.then(EscapeParser::default),
            pending: Vec::new(),
            exit,
        }
    }

    /// Duplicates stdin so the console owns its own descriptor.
    pub fn stdin_fd() -> std::io::Result<OwnedFd> {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) has no memory effects; the result
        // is checked. Close-on-exec: helpers vmlab starts must not hold the
        // terminal.
        let fd = unsafe { libc::fcntl(libc::STDIN_FILENO, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn translate(&mut self, bytes: &[u8]) {
        match self.escape.as_mut() {
            None => self.pending.extend_from_slice(bytes),
            Some(parser) => {
                for &b in bytes {
                    match parser.feed(b) {
                        EscapeAction::Send(out) => self.pending.extend_from_slice(&out),
                        EscapeAction::Quit => self.exit.request(ExitReason::UserQuit),
                        EscapeAction::Pending => {}
                    }
                }
            }
        }
    }

    /// Moves pending input into the UART FIFO as far as it fits.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let taken = lock(&self.serial).enqueue_input(&self.pending);
        self.pending.drain(..taken);
    }

    /// Watch the input only while there is nothing left to deliver.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let want = self.pollable && self.input.is_some() && self.pending.is_empty();
        if want == self.watching {
            return;
        }
        if let Some(input) = &self.input {
            let result = if want {
                ops.add(Events::new(input, EventSet::IN))
            } else {
                ops.remove(Events::new(input, EventSet::IN))
            };
            match result {
                Ok(()) => self.watching = want,
                Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EPERM => {
                    self.pollable = false;
                }
                Err(e) => log::warn!("console: cannot update input interest: {e:?}"),
            }
        }
    }

    /// Delivers what fits; reads unpollable input directly while there is
    /// room, and otherwise waits for the event loop.
    fn pump(&mut self, ops: &mut EventOps) {
        loop {
            self.flush();
            self.update_interest(ops);
            if self.pollable || self.input.is_none() || !self.pending.is_empty() {
                return;
            }
            self.read_input(ops);
        }
    }

    fn read_input(&mut self, ops: &mut EventOps) {
        let Some(input) = self.input.as_mut() else {
            return;
        };
        let mut buf = [0u8; 256];
        match input.read(&mut buf) {
            Ok(0) => {
                // End of input (a pipe closed): the VM keeps running.
                log::debug!("console: input closed");
                if self.watching {
                    let _ = ops.remove(Events::new(input, EventSet::IN));
                    self.watching = false;
                }
                self.input = None;
            }
            Ok(n) => self.translate(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("console: input error, closing it: {e}");
                if self.watching {
                    let _ = ops.remove(Events::new(input, EventSet::IN));
                    self.watching = false;
                }
                self.input = None;
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.room.as_raw_fd() {
            let _ = self.room.read();
        } else if self.input.as_ref().map(|f| f.as_raw_fd()) == Some(events.fd()) {
            self.read_input(ops);
        }
        self.pump(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.room.as_ref(), EventSet::IN)) {
            log::warn!("console: cannot watch the UART: {e:?}");
        }
        self.pump(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(parser: &mut EscapeParser, bytes: &[u8]) -> Vec<EscapeAction> {
        bytes.iter().map(|&b| parser.feed(b)).collect()
    }

    #[test]
    fn ctrl_a_x_quits() {
        let mut p = EscapeParser::default();
        assert_eq!(
            feed_all(&mut p, b"\x01x"),
            vec![EscapeAction::Pending, EscapeAction::Quit]
        );
    }

    #[test]
    fn ctrl_a_ctrl_a_sends_one_ctrl_a() {
        let mut p = EscapeParser::default();
        assert_eq!(
            feed_all(&mut p, b"\x01\x01a"),
            vec![
                EscapeAction::Pending,
                EscapeAction::Send(vec![0x01]),
                EscapeAction::Send(vec![b'a'])
            ]
        );
    }

    #[test]
    fn other_keys_pass_through_even_after_ctrl_a() {
        let mut p = EscapeParser::default();
        assert_eq!(p.feed(b'l'), EscapeAction::Send(vec![b'l']));
        assert_eq!(p.feed(0x01), EscapeAction::Pending);
        assert_eq!(p.feed(b'c'), EscapeAction::Send(vec![0x01, b'c']));
        assert_eq!(
            p.feed(b'x'),
            EscapeAction::Send(vec![b'x']),
            "x alone is just x"
        );
    }

    #[test]
    fn raw_mode_is_not_applied_to_non_terminals() {
        let file = File::open("/dev/null").unwrap();
        assert!(RawTerminal::enable(file.as_raw_fd()).is_none());
    }
}
