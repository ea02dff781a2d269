//! Stall detection for PVM hosts.
//!
//! On a PVM host an ordinary kernel cannot take exceptions: at its first
//! one it either fails with an internal error (reported by the vCPU) or
//! spins forever inside `KVM_RUN` without another exit. This watchdog turns
//! the second case into the same clear failure: it runs only on PVM hosts,
//! only until the guest's userspace starts, and fires when no vCPU exit has
//! happened for `STALL_SECONDS`.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

use super::boot_timer::BootTimeline;
use super::exit::{ExitReason, ExitSignal};
use super::kvm::PVM_HINT;

/// Seconds without a single vCPU exit after which a booting guest on a PVM
/// host is declared stuck. A kernel that works makes port I/O exits within
/// milliseconds at native speed.
pub const STALL_SECONDS: u32 = 3;

/// Counts vCPU exits; shared by every vCPU of a VM.
pub type ExitCounter = Arc<AtomicU64>;

pub struct StallWatchdog {
    timer: TimerFd,
    exits: ExitCounter,
    last_count: u64,
    quiet_seconds: u32,
    timeline: Arc<BootTimeline>,
    exit: ExitSignal,
}

impl StallWatchdog {
    pub fn new(
        exits: ExitCounter,
        timeline: Arc<BootTimeline>,
        exit: ExitSignal,
    ) -> std::io::Result<Self> {
        let mut timer = TimerFd::new()?;
        let second = Duration::from_secs(1);
        timer.reset(second, Some(second))?;
        Ok(StallWatchdog {
            timer,
            exits,
            last_count: u64::MAX,
            quiet_seconds: 0,
            timeline,
            exit,
        })
    }

    /// One tick: returns whether the guest is now considered stuck.
    fn tick(&mut self) -> bool {
        let count = self.exits.load(Ordering::Relaxed);
        if count == self.last_count {
            self.quiet_seconds += 1;
        } else {
            self.quiet_seconds = 0;
            self.last_count = count;
        }
        self.quiet_seconds >= STALL_SECONDS
    }
}

impl MutEventSubscriber for StallWatchdog {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let _ = self.timer.wait();
        if self.timeline.userspace_started().is_some() {
            // The guest got far enough: it is a PVM guest, stop watching.
            let _ = ops.remove(Events::new_raw(self.timer.as_raw_fd(), EventSet::IN));
            return;
        }
        if self.tick() {
            self.exit.request(ExitReason::KvmFailure {
                vcpu: 0,
                what: format!(
                    "the guest kernel stopped making progress ({STALL_SECONDS} s without leaving KVM_RUN)"
                ),
                registers: "see -vv for the vCPU state".to_string(),
                hint: Some(PVM_HINT.to_string()),
            });
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.timer.as_raw_fd(), EventSet::IN)) {
            log::warn!("cannot start the stall watchdog: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn fires_only_after_enough_quiet_seconds() {
        let exits: ExitCounter = Arc::new(AtomicU64::new(0));
        let exit = ExitSignal::new().unwrap();
        let mut dog = StallWatchdog::new(
            exits.clone(),
            BootTimeline::new(Instant::now(), false),
            exit,
        )
        .unwrap();
        assert!(!dog.tick(), "first tick only records the count");
        for _ in 1..STALL_SECONDS {
            assert!(!dog.tick());
        }
        exits.fetch_add(1, Ordering::Relaxed);
        assert!(!dog.tick(), "an exit resets the count");
        for _ in 1..STALL_SECONDS {
            assert!(!dog.tick());
        }
        assert!(dog.tick());
    }
}
