//! Boot timeline: milliseconds from vmlab's start to the VM being built
//! ("VMM ready"), to the first vCPU entry and to the guest's "userspace
//! started" signal (one byte written to `BOOT_TIMER_PORT`), plus the VMM's
//! CPU time spent before the first entry.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Shared between the vCPU threads (which record) and the VMM (which reports).
#[derive(Debug)]
pub struct BootTimeline {
    started: Instant,
    vmm_ready: OnceLock<Duration>,
    first_vcpu_entry: OnceLock<Duration>,
    vmm_cpu_before_entry: OnceLock<Duration>,
    userspace_started: OnceLock<Duration>,
    /// Later writes to the port: (byte, time).
    markers: Mutex<Vec<(u8, Duration)>>,
    /// Print the timeline as soon as userspace starts.
    report_live: bool,
}

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which lives
    // on this stack frame for the duration of the call.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time (user + system) this process has used so far.
pub fn process_cpu_time() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CLOCK_MONOTONIC now: the clock `Instant` uses on Linux, and one that
/// every process on the machine shares, so a parent can place a child's
/// timeline on its own (see `run_report`).
pub fn monotonic_now() -> Duration {
    clock(libc::CLOCK_MONOTONIC)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl BootTimeline {
    pub fn new(started: Instant, report_live: bool) -> Arc<Self> {
        Arc::new(BootTimeline {
            started,
            vmm_ready: OnceLock::new(),
            first_vcpu_entry: OnceLock::new(),
            vmm_cpu_before_entry: OnceLock::new(),
            userspace_started: OnceLock::new(),
            markers: Mutex::new(Vec::new()),
            report_live,
        })
    }

    /// When vmlab started: the origin of every time here.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Called once the VM is built: memory, guest loaded, devices, vCPUs.
    pub fn record_vmm_ready(&self) {
        let _ = self.vmm_ready.set(self.started.elapsed());
    }

    pub fn vmm_ready(&self) -> Option<Duration> {
        self.vmm_ready.get().copied()
    }

    /// Called by vCPU 0 right before its first `KVM_RUN`.
    pub fn record_first_entry(&self) {
        let now = self.started.elapsed();
        if self.first_vcpu_entry.set(now).is_ok() {
            let _ = self.vmm_cpu_before_entry.set(process_cpu_time());
        }
    }

    /// Called when the guest writes the boot-timer port.
    pub fn record_guest_write(&self, value: u8) {
        let now = self.started.elapsed();
        if self.userspace_started.set(now).is_ok() {
            log::info!("{}", self.summary());
            if self.report_live {
                // The terminal may be in raw mode: end the line by hand.
                eprint!("vmlab: {}\r\n", self.summary());
            }
        } else {
            log::info!("boot timer marker {value:#04x} at {:.1} ms", ms(now));
            crate::devices::bus::lock(&self.markers).push((value, now));
        }
    }

    pub fn first_vcpu_entry(&self) -> Option<Duration> {
        self.first_vcpu_entry.get().copied()
    }

    pub fn vmm_cpu_before_entry(&self) -> Option<Duration> {
        self.vmm_cpu_before_entry.get().copied()
    }

    pub fn userspace_started(&self) -> Option<Duration> {
        self.userspace_started.get().copied()
    }

    pub fn markers(&self) -> Vec<(u8, Duration)> {
        crate::devices::bus::lock(&self.markers).clone()
    }

    /// One line: "boot timer: first vCPU entry 9.8 ms (VMM CPU 6.1 ms), userspace started 312.4 ms".
    pub fn summary(&self) -> String {
        let mut line = String::from("boot timer:");
        match self.first_vcpu_entry() {
            Some(t) => {
                line += &format!(" first vCPU entry {:.1} ms", ms(t));
                if let Some(cpu) = self.vmm_cpu_before_entry() {
                    line += &format!(" (VMM CPU {:.1} ms)", ms(cpu));
                }
            }
            None => line += " no vCPU entry",
        }
        match self.userspace_started() {
            Some(t) => line += &format!(", userspace started {:.1} ms", ms(t)),
            None => line += ", no userspace signal",
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_events_once_and_later_writes_as_markers() {
        let timeline = BootTimeline::new(Instant::now(), false);
        assert!(timeline.summary().contains("no vCPU entry"));
        timeline.record_first_entry();
        let first = timeline.first_vcpu_entry().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        timeline.record_first_entry();
        assert_eq!(timeline.first_vcpu_entry(), Some(first));
        timeline.record_guest_write(b'U');
        timeline.record_guest_write(b'S');
        let started = timeline.userspace_started().unwrap();
        assert!(started > first);
        assert_eq!(timeline.markers().len(), 1);
        assert_eq!(timeline.markers()[0].0, b'S');
        let summary = timeline.summary();
        assert!(summary.contains("first vCPU entry"), "{summary}");
        assert!(summary.contains("userspace started"), "{summary}");
    }

    #[test]
    fn vmm_ready_is_recorded_once() {
        let timeline = BootTimeline::new(Instant::now(), false);
        assert_eq!(timeline.vmm_ready(), None);
        timeline.record_vmm_ready();
        let ready = timeline.vmm_ready().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        timeline.record_vmm_ready();
        assert_eq!(timeline.vmm_ready(), Some(ready));
    }

    #[test]
    fn monotonic_clock_matches_instant() {
        // Instant is CLOCK_MONOTONIC on Linux: both advance together.
        let (mono, instant) = (monotonic_now(), Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        let (mono2, elapsed) = (monotonic_now(), instant.elapsed());
        let diff = (mono2 - mono).as_secs_f64() - elapsed.as_secs_f64();
        assert!(diff.abs() < 0.002, "{diff}");
    }

    #[test]
    fn process_cpu_time_advances() {
        let before = process_cpu_time();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_time() > before);
    }
}
