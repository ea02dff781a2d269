//! vmlab as a contender: `vmlab run --report-json` of the benchmark guest.
//! Its report gives the phases on vmlab's own clock; the harness adds the
//! time from spawning it to vmlab's start (exec, loading), read from the
//! shared CLOCK_MONOTONIC.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::GuestSpec;
use crate::bench::contender::{Contender, Description, Goal, Missing, Role, Sample, SampleError};
use crate::bench::process::{log_tails, wait_with_limit, SAMPLE_TIMEOUT};
use crate::vmm::boot_timer::monotonic_now;
use crate::vmm::RunReport;

const MIB: f64 = (1u64 << 20) as f64;

/// One `vmlab run` and what it reported.
struct VmlabRun {
    report: RunReport,
    /// From spawning vmlab to its own start.
    exec: Duration,
    success: bool,
    logs: String,
}

fn run_vmlab(vmlab: &Path, guest: &GuestSpec, dir: &Path) -> Result<VmlabRun, SampleError> {
    let report_path = dir.join("vmlab-report.json");
    let console = dir.join("vmlab.console");
    let stderr = dir.join("vmlab.stderr");
    let _ = std::fs::remove_file(&report_path);
    let create = |p: &Path| {
        File::create(p).map_err(|e| SampleError::new(format!("cannot create {}: {e}", p.display())))
    };
    let (out, err) = (create(&console)?, create(&stderr)?);
    let spawned = monotonic_now();
    let mut child = Command::new(vmlab)
        .arg("run")
        .arg("--kernel")
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&guest.initrd)
        .args(["--mem", &format!("{}M", guest.mem_mib)])
        .args(["--cmdline", &guest.cmdline])
        .arg("--report-json")
        .arg(&report_path)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| SampleError::new(format!("cannot start {}: {e}", vmlab.display())))?;
    let status = wait_with_limit(&mut child, "vmlab", SAMPLE_TIMEOUT);
    let logs = log_tails(&[&stderr, &console]);
    let status = status.map_err(|e| e.with_details(logs.clone()))?;
    let report = RunReport::read(&report_path).map_err(|e| {
        SampleError::new(format!("vmlab ({status}) wrote no report: {e}"))
            .with_details(logs.clone())
    })?;
    let started = Duration::from_nanos(report.started_monotonic_ns);
    Ok(VmlabRun {
        exec: started.saturating_sub(spawned),
        success: status.success(),
        report,
        logs,
    })
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(super) fn duration_ms(ms: f64) -> Duration {
    Duration::from_secs_f64((ms / 1000.0).max(0.0))
}

/// The moment `what` happened, in ms since vmlab's start, or why not.
fn event(value: Option<f64>, what: &str, run: &VmlabRun) -> Result<f64, SampleError> {
    value.ok_or_else(|| {
        SampleError::new(format!(
            "vmlab reported no {what} (it ended: {})",
            run.report.exit
        ))
        .with_details(run.logs.clone())
    })
}

/// vmlab's own cost, from its report.
pub(super) fn cost_metrics(report: &RunReport) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::new();
    let mut put = |key: &str, value: Option<f64>| {
        if let Some(v) = value {
            metrics.insert(key.to_string(), v);
        }
    };
    put("vmm_cpu_before_entry_ms", report.vmm_cpu_before_entry_ms);
    put(
        "vmm_overhead_mib",
        report.vmm_overhead_bytes.map(|b| b as f64 / MIB),
    );
    put(
        "peak_rss_mib",
        report.peak_rss_bytes.map(|b| b as f64 / MIB),
    );
    put(
        "guest_touched_mib",
        report.guest_touched_bytes.map(|b| b as f64 / MIB),
    );
    metrics
}

/// vmlab brought to one of two goals:
/// - the guest's init (its boot-timer write), the real boot;
/// - its first vCPU entry: everything vmlab does itself before the guest
///   runs. That does not need the guest to boot, so it is measurable
///   natively even where KVM cannot run Linux (PVM), where the run then ends
///   at the guest's first exception, as expected.
pub struct Vmlab {
    vmlab: PathBuf,
    guest: GuestSpec,
    /// Scratch space for its logs and report.
    dir: PathBuf,
    goal: Goal,
}

impl Vmlab {
    pub fn to_init(vmlab: PathBuf, guest: GuestSpec, dir: PathBuf) -> Self {
        Vmlab {
            vmlab,
            guest,
            dir,
            goal: Goal::Init,
        }
    }

    pub fn to_first_entry(vmlab: PathBuf, guest: GuestSpec, dir: PathBuf) -> Self {
        Vmlab {
            vmlab,
            guest,
            dir,
            goal: Goal::FirstEntry,
        }
    }
}

impl Contender for Vmlab {
    fn describe(&self) -> Description {
        match self.goal {
            Goal::FirstEntry => Description::new(
                "vmlab-first-entry",
                "vmlab → first vCPU entry",
                Goal::FirstEntry,
                Role::Vmlab,
                &["VMM ready", "first vCPU entry"],
            ),
            _ => Description::new(
                "vmlab-init",
                "vmlab → init",
                Goal::Init,
                Role::Vmlab,
                &["VMM ready", "first vCPU entry", "kernel to init"],
            ),
        }
    }
    fn prepare(&mut self) -> Result<(), Missing> {
        prepare_dir(&self.vmlab, &self.dir)
    }
    fn sample(&mut self) -> Result<Sample, SampleError> {
        let run = run_vmlab(&self.vmlab, &self.guest, &self.dir)?;
        let ready = event(run.report.vmm_ready_ms, "VMM-ready time", &run)?;
        let entry = event(run.report.first_vcpu_entry_ms, "first vCPU entry", &run)?;
        let mut phases = vec![run.exec + duration_ms(ready), duration_ms(entry - ready)];
        if self.goal != Goal::FirstEntry {
            let init = event(
                run.report.userspace_started_ms,
                "boot-timer write from the guest",
                &run,
            )?;
            if !run.success {
                return Err(SampleError::new(format!(
                    "vmlab failed after the guest's init started: {}",
                    run.report.exit
                ))
                .with_details(run.logs));
            }
            phases.push(duration_ms(init - entry));
        }
        let mut metrics = cost_metrics(&run.report);
        metrics.insert("exec_ms".to_string(), ms(run.exec));
        Ok(Sample { phases, metrics })
    }
}

pub(super) fn prepare_dir(vmlab: &Path, dir: &Path) -> Result<(), Missing> {
    if !vmlab.is_file() {
        return Err(Missing(format!("{} not found", vmlab.display())));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Missing(format!("cannot create {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_metrics_in_mib_and_ms() {
        let report = RunReport {
            started_monotonic_ns: 0,
            vmm_ready_ms: Some(3.0),
            first_vcpu_entry_ms: Some(4.0),
            vmm_cpu_before_entry_ms: Some(2.5),
            userspace_started_ms: None,
            peak_rss_bytes: Some(40 << 20),
            guest_touched_bytes: Some(36 << 20),
            vmm_overhead_bytes: Some(4 << 20),
            exit: "guest powered off".into(),
            exit_code: 0,
        };
        let m = cost_metrics(&report);
        assert_eq!(m["vmm_cpu_before_entry_ms"], 2.5);
        assert_eq!(m["vmm_overhead_mib"], 4.0);
        assert_eq!(m["peak_rss_mib"], 40.0);
        assert_eq!(m["guest_touched_mib"], 36.0);
    }

    #[test]
    fn a_missing_binary_is_reported_missing() {
        let mut c = Vmlab::to_init(
            PathBuf::from("/nonexistent/vmlab"),
            GuestSpec {
                kernel: PathBuf::from("k"),
                initrd: PathBuf::from("i"),
                mem_mib: 256,
                cmdline: String::new(),
            },
            std::env::temp_dir(),
        );
        let missing = c.prepare().unwrap_err();
        assert!(missing.0.contains("/nonexistent/vmlab"), "{missing}");
    }
}
