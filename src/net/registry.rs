//! How the engine asks an event loop to watch its host sockets.
//!
//! The engine registers sockets edge-triggered as flows open and removes them
//! as they close. [`EventOps`] from `event-manager` is the loop used by vmlab;
//! [`EpollRegistry`] is a small standalone one for tests and the fuzzer.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};

/// Readiness the engine wants for every socket it registers.
pub fn interest() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// Something that watches file descriptors and reports them by token.
pub trait SocketRegistry {
    fn add(&mut self, fd: RawFd, token: u32) -> io::Result<()>;
    fn remove(&mut self, fd: RawFd, token: u32) -> io::Result<()>;
}

impl SocketRegistry for EventOps<'_> {
    fn add(&mut self, fd: RawFd, token: u32) -> io::Result<()> {
        EventOps::add(self, Events::with_data_raw(fd, token, interest())).map_err(to_io)
    }

    fn remove(&mut self, fd: RawFd, token: u32) -> io::Result<()> {
        EventOps::remove(self, Events::with_data_raw(fd, token, interest())).map_err(to_io)
    }
}

fn to_io(err: event_manager::Error) -> io::Error {
    io::Error::other(err.to_string())
}

/// A private epoll set, for driving the engine without an event manager.
pub struct EpollRegistry {
    epoll: Epoll,
}

impl EpollRegistry {
    pub fn new() -> io::Result<Self> {
        Ok(EpollRegistry {
            epoll: Epoll::new()?,
        })
    }

    /// Waits up to `timeout` and returns (token, readiness) pairs.
    pub fn wait(&self, timeout: Duration) -> io::Result<Vec<(u32, EventSet)>> {
        let mut events = vec![EpollEvent::default(); 256];
        let n = self
            .epoll
            .wait(timeout.as_millis() as i32, &mut events)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(0)
                } else {
                    Err(e)
                }
            })?;
        Ok(events[..n]
            .iter()
            .map(|e| (e.data() as u32, EventSet::from_bits_truncate(e.events())))
            .collect())
    }
}

impl AsRawFd for EpollRegistry {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl SocketRegistry for EpollRegistry {
    fn add(&mut self, fd: RawFd, token: u32) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(interest(), u64::from(token)),
        )
    }

    fn remove(&mut self, fd: RawFd, _token: u32) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// A registry that watches nothing: for feeding frames where no host socket
/// is ever polled (unit tests of pure protocol paths).
#[derive(Default)]
pub struct NullRegistry;

impl SocketRegistry for NullRegistry {
    fn add(&mut self, _fd: RawFd, _token: u32) -> io::Result<()> {
        Ok(())
    }

    fn remove(&mut self, _fd: RawFd, _token: u32) -> io::Result<()> {
        Ok(())
    }
}
