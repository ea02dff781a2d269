//! A machine-readable account of one `vmlab run`, written at exit with
//! `--report-json PATH`: the boot timeline, the memory footprint and why the
//! VM ended. Benchmarks read it (see `crate::bench`).

use std::io;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::boot_timer::{monotonic_now, BootTimeline};
use super::exit::ExitReason;
use super::footprint::Footprint;

/// Times are milliseconds since vmlab started; `None` when the event did not
/// happen (no vCPU entry, no userspace signal).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// CLOCK_MONOTONIC at vmlab's start, in nanoseconds: a parent that read
    /// the same clock before starting vmlab can add its exec time.
    pub started_monotonic_ns: u64,
    pub vmm_ready_ms: Option<f64>,
    pub first_vcpu_entry_ms: Option<f64>,
    pub vmm_cpu_before_entry_ms: Option<f64>,
    pub userspace_started_ms: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    pub guest_touched_bytes: Option<u64>,
    pub vmm_overhead_bytes: Option<u64>,
    /// Why the VM ended, as `vmlab run` says it, and its exit status.
    pub exit: String,
    pub exit_code: i32,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl RunReport {
    pub fn new(
        timeline: &BootTimeline,
        footprint: Option<&Footprint>,
        reason: &ExitReason,
    ) -> RunReport {
        // Instant is CLOCK_MONOTONIC on Linux: now minus elapsed is the start.
        let started = monotonic_now().saturating_sub(timeline.started().elapsed());
        RunReport {
            started_monotonic_ns: started.as_nanos() as u64,
            vmm_ready_ms: timeline.vmm_ready().map(ms),
            first_vcpu_entry_ms: timeline.first_vcpu_entry().map(ms),
            vmm_cpu_before_entry_ms: timeline.vmm_cpu_before_entry().map(ms),
            userspace_started_ms: timeline.userspace_started().map(ms),
            peak_rss_bytes: footprint.map(|f| f.peak_rss),
            guest_touched_bytes: footprint.map(|f| f.guest_resident),
            vmm_overhead_bytes: footprint.map(Footprint::vmm_overhead),
            exit: reason.to_string().lines().next().unwrap_or_default().into(),
            exit_code: reason.exit_code(),
        }
    }

    /// Writes the report as JSON, through a temporary file renamed into
    /// place, so a reader never sees half of it.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        crate::fsutil::write_atomically(path, text.as_bytes())
    }

    pub fn read(path: &Path) -> io::Result<RunReport> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn round_trips_through_a_file() {
        let timeline = BootTimeline::new(Instant::now(), false);
        timeline.record_vmm_ready();
        timeline.record_first_entry();
        let footprint = Footprint {
            peak_rss: 300 << 20,
            guest_resident: 290 << 20,
        };
        let report = RunReport::new(&timeline, Some(&footprint), &ExitReason::PowerOff);
        assert_eq!(report.vmm_overhead_bytes, Some(10 << 20));
        assert_eq!(report.userspace_started_ms, None);
        assert_eq!(report.exit, "guest powered off");
        assert_eq!(report.exit_code, 0);
        let started = Duration::from_nanos(report.started_monotonic_ns);
        assert!(started <= monotonic_now());
        assert!(monotonic_now() - started < Duration::from_secs(5));

        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmlab-report").unwrap();
        let path = dir.as_path().join("r.json");
        report.write(&path).unwrap();
        assert_eq!(RunReport::read(&path).unwrap(), report);
    }
}
