//! Where a named VM's serial output goes: its serial log, optionally the
//! terminal it runs on, and every attached `vmlab console`.
//!
//! The UART writes from a vCPU thread, so nothing here may block: a console
//! client that cannot take the bytes at once misses them (its terminal
//! lags), and the guest never waits for it.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use nix::sys::socket::{send, MsgFlags};

use crate::devices::bus::lock;

struct Client {
    id: u64,
    stream: UnixStream,
}

/// Where the serial log goes: a capped file in a real VM.
pub type SerialLog = Box<dyn Write + Send>;

pub struct ConsoleHub {
    log: Mutex<Option<SerialLog>>,
    tee_stdout: bool,
    clients: Mutex<Vec<Client>>,
    next_id: Mutex<u64>,
}

impl ConsoleHub {
    /// `log`: the serial log (None: keep nothing); `tee_stdout`: also
    /// print to this process's stdout (a named VM run in the foreground).
    pub fn new(log: Option<SerialLog>, tee_stdout: bool) -> Arc<ConsoleHub> {
        Arc::new(ConsoleHub {
            log: Mutex::new(log),
            tee_stdout,
            clients: Mutex::new(Vec::new()),
            next_id: Mutex::new(0),
        })
    }

    /// The UART's output sink.
    pub fn writer(self: &Arc<Self>) -> HubWriter {
        HubWriter(self.clone())
    }

    /// Starts copying output to `stream`; returns an id for `detach`.
    pub fn attach(&self, stream: UnixStream) -> u64 {
        let mut next = lock(&self.next_id);
        *next += 1;
        lock(&self.clients).push(Client { id: *next, stream });
        *next
    }

    pub fn detach(&self, id: u64) {
        lock(&self.clients).retain(|c| c.id != id);
    }

    pub fn clients(&self) -> usize {
        lock(&self.clients).len()
    }

    fn publish(&self, bytes: &[u8]) {
        // One guard for the write and the drop: locking again while the
        // first guard lives would deadlock the vCPU that holds the UART.
        let mut log = lock(&self.log);
        if let Some(file) = log.as_mut() {
            if let Err(e) = file.write_all(bytes) {
                log::warn!("serial log: {e}; no longer writing it");
                *log = None;
            }
        }
        drop(log);
        if self.tee_stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes).and_then(|()| out.flush());
        }
        lock(&self.clients).retain(|client| {
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            match send(client.stream.as_raw_fd(), bytes, flags) {
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => true,
                Err(e) => {
                    log::debug!("console client {} gone: {e}", client.id);
                    false
                }
            }
        });
    }
}

/// `Write` for the UART; never fails, never blocks on a client.
pub struct HubWriter(Arc<ConsoleHub>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.publish(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::RotatingFile;
    use std::io::Read;

    #[test]
    fn output_reaches_log_and_clients_and_gone_clients_are_dropped() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmlab-hub").unwrap();
        let log_path = dir.as_path().join("serial.log");
        let log = RotatingFile::create(&log_path, 1 << 20).unwrap();
        let hub = ConsoleHub::new(Some(Box::new(log)), false);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let id = hub.attach(ours);
        let (gone, closed) = UnixStream::pair().unwrap();
        hub.attach(gone);
        drop(closed);
        hub.writer().write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(hub.clients(), 1, "the closed client is dropped");
        hub.detach(id);
        assert_eq!(hub.clients(), 0);
        hub.writer().write_all(b" world").unwrap();
        assert_eq!(std::fs::read(&log_path).unwrap(), b"hello world");
    }

    #[test]
    fn a_failing_serial_log_is_dropped_and_output_goes_on() {
        // ENOSPC on every write, no root needed.
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let hub = ConsoleHub::new(Some(Box::new(full)), false);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        hub.attach(ours);
        let (done, finished) = std::sync::mpsc::channel();
        let writer_hub = hub.clone();
        std::thread::spawn(move || {
            writer_hub.writer().write_all(b"a").unwrap();
            writer_hub.writer().write_all(b"b").unwrap();
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the UART's writer deadlocked on the failed log write");
        assert!(lock(&hub.log).is_none(), "the failed log is dropped");
        let mut buf = [0u8; 2];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ab", "clients still get the output");
    }

    #[test]
    fn a_guest_printing_forever_fills_its_log_and_one_previous_only() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("serial.log");
        let log = RotatingFile::create(&log_path, 1024).unwrap();
        let hub = ConsoleHub::new(Some(Box::new(log)), false);
        // A UART writes a byte at a time.
        for i in 0..5000u32 {
            hub.writer().write_all(&[b'a' + (i % 26) as u8]).unwrap();
        }
        let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
        assert!(size(&log_path) <= 1024);
        assert_eq!(size(&dir.path().join("serial.log.1")), 1024);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_client_that_does_not_read_never_blocks_the_guest() {
        let hub = ConsoleHub::new(None, false);
        let (ours, _theirs) = UnixStream::pair().unwrap();
        hub.attach(ours);
        let chunk = vec![b'x'; 64 << 10];
        // Far more than a socket buffer holds: must return, not block.
        for _ in 0..64 {
            hub.writer().write_all(&chunk).unwrap();
        }
        assert_eq!(hub.clients(), 1, "a slow client stays attached");
    }
}
