//! vmlab to ssh-ready, as a user gets there: `vmlab run` of the Debian
//! guest's kernel on a fresh linked clone of the base image, with the
//! guest's identity on the command line, virtio-net behind vmlab's NAT and
//! a forward from a free loopback port to the guest's port 22, timed from
//! spawning vmlab to the first successful `ssh true`. vmlab is then ended
//! with SIGTERM (its orderly stop), and its `--report-json` splits the time
//! on its own clock: VMM ready, first vCPU entry, kernel to init (the
//! Debian init's boot-timer byte), init to ssh-ready.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::debian::{DebianGuest, DebianSpec};
use super::scratch::ScratchFile;
use super::ssh_probe::SshProbe;
use super::ssh_run::{log_file, SshRun};
use super::vmlab::{cost_metrics, duration_ms, ms, prepare_dir};
use crate::bench::contender::{Contender, Description, Goal, Missing, Role, Sample, SampleError};
use crate::image::Flavor;
use crate::vmm::RunReport;

pub struct VmlabSsh {
    vmlab: PathBuf,
    guest: DebianGuest,
    flavor: Flavor,
    dir: PathBuf,
    count: usize,
}

impl VmlabSsh {
    pub fn new(vmlab: PathBuf, guest: DebianGuest, flavor: Flavor, dir: PathBuf) -> Self {
        VmlabSsh {
            vmlab,
            guest,
            flavor,
            dir,
            count: 0,
        }
    }
}

/// `vmlab run`'s arguments for one sample.
fn run_args(
    spec: &DebianSpec,
    disk: &Path,
    cmdline: &str,
    port: u16,
    report: &Path,
) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        "--kernel".to_string(),
        spec.kernel.display().to_string(),
    ];
    if let Some(initrd) = &spec.initrd {
        args.extend(["--initrd".to_string(), initrd.display().to_string()]);
    }
    args.extend([
        "--disk".to_string(),
        disk.display().to_string(),
        "--mem".to_string(),
        format!("{}M", spec.mem_mib),
        "--cmdline".to_string(),
        cmdline.to_string(),
        "--forward".to_string(),
        format!("tcp:127.0.0.1:{port}:22"),
        "--report-json".to_string(),
        report.display().to_string(),
    ]);
    args
}

/// From spawning vmlab to its own start (exec, loading), on the shared
/// CLOCK_MONOTONIC.
fn exec_time(report: &RunReport, spawned_monotonic: Duration) -> Duration {
    Duration::from_nanos(report.started_monotonic_ns).saturating_sub(spawned_monotonic)
}

/// The phases of one sample: vmlab's report gives its events in ms since
/// its own start, which it also gives on CLOCK_MONOTONIC; the harness read
/// that clock at the spawn, and measured `total` to ssh-ready.
fn phases(
    report: &RunReport,
    spawned_monotonic: Duration,
    total: Duration,
) -> Result<Vec<Duration>, String> {
    let event = |v: Option<f64>, what: &str| {
        v.ok_or_else(|| format!("vmlab reported no {what} (it ended: {})", report.exit))
    };
    let ready = event(report.vmm_ready_ms, "VMM-ready time")?;
    let entry = event(report.first_vcpu_entry_ms, "first vCPU entry")?;
    let init = event(
        report.userspace_started_ms,
        "boot-timer write from the guest",
    )?;
    let exec = exec_time(report, spawned_monotonic);
    let to_init = exec + duration_ms(init);
    Ok(vec![
        exec + duration_ms(ready),
        duration_ms(entry - ready),
        duration_ms(init - entry),
        total.saturating_sub(to_init),
    ])
}

impl Contender for VmlabSsh {
    fn describe(&self) -> Description {
        let (id, label) = match self.flavor {
            Flavor::Lean => ("vmlab-ssh", "vmlab → ssh-ready"),
            Flavor::Full => ("vmlab-full-ssh", "vmlab → ssh-ready (full)"),
        };
        Description::new(
            id,
            label,
            Goal::SshReady,
            Role::Vmlab,
            &[
                "VMM ready",
                "first vCPU entry",
                "kernel to init",
                "init to ssh-ready",
            ],
        )
    }
    fn prepare(&mut self) -> Result<(), Missing> {
        self.guest.clone()?;
        prepare_dir(&self.vmlab, &self.dir)
    }
    fn sample(&mut self) -> Result<Sample, SampleError> {
        let spec = self
            .guest
            .as_ref()
            .map_err(|m| SampleError::new(m.0.clone()))?;
        self.count += 1;
        let dir = &self.dir;
        let probe = SshProbe::for_sample(&spec.ssh, &spec.key.private_key, dir)?;
        let disk = spec.fresh_disk(&dir.join("disk.qcow2"))?;
        let report_path = ScratchFile(dir.join("vmlab-report.json"));
        let _ = std::fs::remove_file(report_path.path());
        let instance = format!("bench-{}-{}", std::process::id(), self.count);
        let cmdline = spec.cmdline(&instance)?;
        let (console, stderr) = (dir.join("vmlab.console"), dir.join("vmlab.stderr"));
        let mut command = Command::new(&self.vmlab);
        command
            .args(run_args(
                spec,
                disk.path(),
                &cmdline,
                probe.port,
                report_path.path(),
            ))
            .stdin(Stdio::null())
            .stdout(log_file(&console)?)
            .stderr(log_file(&stderr)?);
        let run = SshRun {
            what: "vmlab",
            probe: &probe,
            logs: vec![stderr.clone(), console.clone()],
        };
        // SIGTERM: vmlab ends the VM in order and writes its report.
        let times = run.run(command, |child| {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        })?;
        let details = || crate::bench::process::log_tails(&[&stderr, &console]);
        let report = RunReport::read(report_path.path()).map_err(|e| {
            SampleError::new(format!("vmlab wrote no report: {e}")).with_details(details())
        })?;
        let phases = phases(&report, times.start_monotonic, times.total())
            .map_err(|e| SampleError::new(e).with_details(details()))?;
        let mut metrics = cost_metrics(&report);
        metrics.insert(
            "exec_ms".to_string(),
            ms(exec_time(&report, times.start_monotonic)),
        );
        Ok(Sample { phases, metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DebianSpec {
        super::super::debian::spec(PathBuf::from("/c/base.qcow2"))
    }

    #[test]
    fn runs_the_image_kernel_on_the_clone_with_a_loopback_forward() {
        let args = run_args(
            &spec(),
            Path::new("/s/disk.qcow2"),
            "root=/dev/vda quiet",
            40022,
            Path::new("/s/r.json"),
        );
        assert_eq!(
            args.join(" "),
            "run --kernel /k/vmlinux --disk /s/disk.qcow2 --mem 256M \
             --cmdline root=/dev/vda quiet --forward tcp:127.0.0.1:40022:22 \
             --report-json /s/r.json"
        );
        // The command line is one argument, whatever its spaces.
        assert_eq!(args[8], "root=/dev/vda quiet");
        let full = DebianSpec {
            initrd: Some(PathBuf::from("/s/initrd.img")),
            ..spec()
        };
        let args = run_args(&full, Path::new("/d"), "q", 1, Path::new("/r"));
        assert!(
            args.join(" ")
                .starts_with("run --kernel /k/vmlinux --initrd /s/initrd.img --disk /d"),
            "{args:?}"
        );
    }

    fn report(started_ns: u64, init: Option<f64>) -> RunReport {
        RunReport {
            started_monotonic_ns: started_ns,
            vmm_ready_ms: Some(5.0),
            first_vcpu_entry_ms: Some(8.0),
            vmm_cpu_before_entry_ms: Some(4.0),
            userspace_started_ms: init,
            peak_rss_bytes: None,
            guest_touched_bytes: None,
            vmm_overhead_bytes: None,
            exit: "stopped by signal 15".into(),
            exit_code: 0,
        }
    }

    #[test]
    fn phases_add_up_to_the_harness_total() {
        // Spawned at 1.000 s, vmlab's main at 1.002 s; ssh at 900 ms.
        let r = report(1_002_000_000, Some(300.0));
        let total = Duration::from_millis(900);
        let p = phases(&r, Duration::from_secs(1), total).unwrap();
        let ms: Vec<f64> = p
            .iter()
            .map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
            .collect();
        assert_eq!(ms, [7.0, 3.0, 292.0, 598.0]);
        assert_eq!(p.iter().sum::<Duration>(), total);
        let err = phases(&report(0, None), Duration::ZERO, total).unwrap_err();
        assert!(err.contains("no boot-timer write"), "{err}");
    }

    #[test]
    fn a_missing_image_is_reported_missing() {
        let mut c = VmlabSsh::new(
            PathBuf::from("/bin/sh"),
            Err(Missing("run `vmlab image build` first".into())),
            Flavor::Lean,
            std::env::temp_dir(),
        );
        assert_eq!(c.prepare().unwrap_err().0, "run `vmlab image build` first");
        assert_eq!(c.describe().id, "vmlab-ssh");
        assert_eq!(c.describe().phases.len(), 4);
    }
}
