//! SIGTERM, SIGINT and SIGHUP end the VM in order (terminal restored,
//! vCPUs joined) instead of killing vmlab mid-flight.
//!
//! The handler may only do async-signal-safe work, so it records the signal
//! number and writes to an eventfd; the event loop does the rest.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::exit::{ExitReason, ExitSignal};

static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static RECEIVED: AtomicI32 = AtomicI32::new(0);

const HANDLED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

extern "C" fn on_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RECEIVED.store(num, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a local u64
        // and the descriptor is an eventfd that outlives the handler.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// The termination signal received so far, if any: one that arrives while
/// no VM runs (between two boots of a rebooting guest) is only recorded.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        num => Some(num),
    }
}

/// Turns termination signals into a stop request on the event loop.
pub struct TerminationSignals {
    wake: EventFd,
    exit: ExitSignal,
}

impl TerminationSignals {
    pub fn install(exit: ExitSignal) -> std::io::Result<Self> {
        let wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        WAKE_FD.store(wake.as_raw_fd(), Ordering::SeqCst);
        for num in HANDLED {
            vmm_sys_util::signal::register_signal_handler(num, on_signal)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        }
        Ok(TerminationSignals { wake, exit })
    }
}

impl Drop for TerminationSignals {
    fn drop(&mut self) {
        WAKE_FD.store(-1, Ordering::SeqCst);
    }
}

impl MutEventSubscriber for TerminationSignals {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.wake.read();
        let num = RECEIVED.load(Ordering::SeqCst);
        self.exit.request(ExitReason::Signal(num));
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            log::warn!("cannot watch for termination signals: {e:?}");
        }
    }
}
