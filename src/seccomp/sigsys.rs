//! What happens at a forbidden syscall: the filter traps (SIGSYS), and the
//! handler, which may only do async-signal-safe work, writes one line and
//! ends the process. Firecracker does the same, so that a violation is
//! told apart from any other death.

use std::cell::Cell;
use std::fs::OpenOptions;
use std::os::fd::IntoRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use super::ThreadClass;

/// The process's exit status after a violation: what a shell shows for a
/// process ended by SIGSYS.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// How ps, stop and run say it.
pub const KILLED: &str = "killed by its seccomp filter (SIGSYS)";

/// The VM's `seccomp.violation`, open for the handler; -1 when none.
static RECORD_FD: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    static CLASS: Cell<Option<ThreadClass>> = const { Cell::new(None) };
}

pub(super) fn set_thread_class(class: ThreadClass) {
    CLASS.with(|c| c.set(Some(class)));
}

pub(super) fn record_in(path: &Path) -> std::io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let old = RECORD_FD.swap(file.into_raw_fd(), Ordering::SeqCst);
    if old >= 0 {
        // SAFETY: `old` came from into_raw_fd above and nothing else owns it.
        unsafe { libc::close(old) };
    }
    Ok(())
}

/// The violation recorded at `path` (a VM's `seccomp.violation`), if any.
pub fn violation(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().next()?.trim();
    (!line.is_empty()).then(|| line.to_string())
}

pub(super) fn catch() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// The test hook's syscall: `personality(0xffffffff)` only reads the
/// persona, and no list allows it.
pub(super) fn forbidden_syscall() {
    // SAFETY: personality with 0xffffffff queries and changes nothing.
    unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
}

/// A line built without allocating (the handler may not).
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut value: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

fn write_all(fd: i32, bytes: &[u8]) {
    // SAFETY: write(2) is async-signal-safe; `bytes` is a live buffer.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills siginfo's `_sigsys` member, whose
    // `_syscall` int sits 8 bytes into the union, which starts at byte 16
    // on x86-64 (after si_signo, si_errno, si_code and padding).
    let syscall = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let class = CLASS
        .with(Cell::get)
        .map_or("unfiltered", ThreadClass::name);
    let mut line = Line {
        buf: [0; 160],
        len: 0,
    };
    line.push(KILLED.as_bytes());
    line.push(b": syscall ");
    line.push_number(syscall as u32);
    line.push(b" on a ");
    line.push(class.as_bytes());
    line.push(b" thread\n");
    let text = &line.buf[..line.len];
    write_all(2, b"vmlab: error: ");
    write_all(2, text);
    let record = RECORD_FD.load(Ordering::SeqCst);
    if record >= 0 {
        write_all(record, text);
    }
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(EXIT_STATUS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_decimal() {
        let mut line = Line {
            buf: [0; 160],
            len: 0,
        };
        for n in [0, 7, 135, u32::MAX] {
            line.push_number(n);
            line.push(b" ");
        }
        assert_eq!(&line.buf[..line.len], b"0 7 135 4294967295 ");
    }

    #[test]
    fn a_recorded_violation_is_read_back_and_an_empty_record_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seccomp.violation");
        assert_eq!(violation(&path), None);
        std::fs::write(&path, "").unwrap();
        assert_eq!(violation(&path), None);
        std::fs::write(&path, format!("{KILLED}: syscall 135 on a vcpu thread\n")).unwrap();
        assert!(violation(&path).unwrap().starts_with(KILLED));
    }
}
