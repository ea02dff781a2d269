//! vmlab resumed to ssh-ready: a named VM of a Debian guest, lean or full
//! (as `vmlab run --name [--flavor full]` boots it, with a forward from a free loopback
//! port to its port 22) is brought to ssh-ready once and suspended there;
//! each sample then times `vmlab resume` from its spawn to the first
//! successful `ssh true`, the same probe the other ssh-ready contenders
//! use, and suspends the VM again (untimed) at ssh-ready for the next.
//! The VM lives in a vmlab home of its own inside the scratch directory,
//! so the user's VMs and keys are never touched.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::debian::{DebianGuest, DebianSpec};
use super::scratch::ScratchFile;
use super::ssh_probe::{free_port, SshProbe};
use super::vmlab::{ms, prepare_dir};
use crate::bench::contender::{Contender, Description, Goal, Missing, Role, Sample, SampleError};
use crate::bench::process::{log_tails, SAMPLE_TIMEOUT};
use crate::image::Flavor;

/// The VM's name in its private home.
const NAME: &str = "bench-resume";
/// The first boot to ssh-ready before anything is timed (a Debian boot
/// under CPU emulation takes a minute or more).
const FIRST_BOOT_LIMIT: Duration = Duration::from_secs(600);

pub struct VmlabResume {
    vmlab: PathBuf,
    guest: DebianGuest,
    flavor: Flavor,
    dir: PathBuf,
    /// The forwarded port, fixed when the VM is made.
    port: Option<u16>,
    /// Whether the VM is suspended at ssh-ready, ready for a sample.
    suspended: bool,
}

impl VmlabResume {
    pub fn new(vmlab: PathBuf, guest: DebianGuest, flavor: Flavor, dir: PathBuf) -> Self {
        VmlabResume {
            vmlab,
            guest,
            flavor,
            dir,
            port: None,
            suspended: false,
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    fn vm_dir(&self) -> PathBuf {
        self.home().join("data/vmlab/vms").join(NAME)
    }

    /// `vmlab ARGS` in the private home.
    fn command(&self, args: &[String]) -> Command {
        let home = self.home();
        let mut command = Command::new(&self.vmlab);
        command
            .args(args)
            .env("XDG_DATA_HOME", home.join("data"))
            .env("XDG_RUNTIME_DIR", home.join("run"))
            .stdin(Stdio::null());
        command
    }

    /// Runs `vmlab ARGS` to its end; its stderr is the error when it fails.
    fn vmlab(&self, args: &[String]) -> Result<Output, SampleError> {
        let out = self
            .command(args)
            .output()
            .map_err(|e| SampleError::new(format!("cannot run {}: {e}", self.vmlab.display())))?;
        if !out.status.success() {
            let said = String::from_utf8_lossy(&out.stderr);
            return Err(SampleError::new(format!(
                "vmlab {} failed ({}): {}",
                args.join(" "),
                out.status,
                said.trim()
            ))
            .with_details(self.logs()));
        }
        Ok(out)
    }

    fn logs(&self) -> String {
        let dir = self.vm_dir();
        log_tails(&[&dir.join("vmm.log"), &dir.join("serial.log")])
    }

    /// The probe of the VM's port with the key its private home made.
    fn probe(&self, spec: &DebianSpec, port: u16) -> SshProbe {
        let known_hosts = ScratchFile(self.dir.join("known_hosts"));
        let _ = std::fs::remove_file(known_hosts.path());
        SshProbe {
            ssh: spec.ssh.clone(),
            key: self.home().join("data/vmlab/ssh/id_ed25519"),
            port,
            known_hosts,
        }
    }

    /// Why the VM's process is gone, when it is.
    fn alive(&self) -> Result<(), String> {
        let pid = std::fs::read_to_string(self.vm_dir().join("vmlab.pid"))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        match pid {
            Some(pid) if kill(Pid::from_raw(pid), None).is_ok() => Ok(()),
            _ => Err(format!("the VM {NAME} is not running")),
        }
    }

    /// Boots the VM to ssh-ready the first time, untimed.
    fn first_boot(&mut self, spec: &DebianSpec) -> Result<u16, SampleError> {
        let port = free_port().map_err(|e| SampleError::new(format!("no free port: {e}")))?;
        std::fs::create_dir_all(self.home().join("run")).map_err(|e| {
            SampleError::new(format!("cannot create {}: {e}", self.home().display()))
        })?;
        self.vmlab(&run_args(spec, port))?;
        self.port = Some(port);
        self.probe(spec, port)
            .wait_while("vmlab", Instant::now() + FIRST_BOOT_LIMIT, || self.alive())
            .map_err(|e| e.with_details(self.logs()))?;
        Ok(port)
    }

    /// The saved state's size: (on disk, as the file says) in bytes.
    fn state_size(&self) -> Option<(u64, u64)> {
        let meta = std::fs::metadata(self.vm_dir().join("vm.state")).ok()?;
        Some((meta.blocks() * 512, meta.len()))
    }
}

/// `vmlab run`'s arguments for the VM: the image of the spec's flavor, as a
/// user runs it (the full one boots the kernel its disk carries).
fn run_args(spec: &DebianSpec, port: u16) -> Vec<String> {
    [
        "run",
        "--name",
        NAME,
        "--flavor",
        spec.flavor.name(),
        "--mem",
        &format!("{}M", spec.mem_mib),
        "--forward",
        &format!("tcp:127.0.0.1:{port}:22"),
        "--detach",
    ]
    .map(String::from)
    .to_vec()
}

impl Contender for VmlabResume {
    fn describe(&self) -> Description {
        let (id, label) = match self.flavor {
            Flavor::Lean => ("vmlab-resume-ssh", "vmlab resume → ssh-ready"),
            Flavor::Full => ("vmlab-full-resume-ssh", "vmlab resume → ssh-ready (full)"),
        };
        Description::new(
            id,
            label,
            Goal::SshReady,
            Role::Vmlab,
            &["resume command", "to ssh-ready"],
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
            .map_err(|m| SampleError::new(m.0.clone()))?
            .clone();
        let port = match self.port {
            Some(port) => port,
            None => self.first_boot(&spec)?,
        };
        if !self.suspended {
            self.vmlab(&["suspend".to_string(), NAME.to_string()])?;
            self.suspended = true;
        }
        let (on_disk, file) = self.state_size().ok_or_else(|| {
            SampleError::new(format!("the suspended VM {NAME} has no vm.state"))
                .with_details(self.logs())
        })?;
        let probe = self.probe(&spec, port);
        let start = Instant::now();
        self.vmlab(&["resume".to_string(), NAME.to_string()])?;
        self.suspended = false;
        let resumed = Instant::now();
        let ready = probe
            .wait_while("vmlab", start + SAMPLE_TIMEOUT, || self.alive())
            .map_err(|e| e.with_details(self.logs()))?;
        // Suspended again at ssh-ready: the next sample's snapshot.
        self.vmlab(&["suspend".to_string(), NAME.to_string()])?;
        self.suspended = true;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut sample = Sample {
            phases: vec![resumed - start, ready - resumed],
            ..Sample::default()
        };
        sample
            .metrics
            .insert("resume_cmd_ms".into(), ms(resumed - start));
        sample
            .metrics
            .insert("snapshot_disk_mib".into(), mib(on_disk));
        sample.metrics.insert("snapshot_file_mib".into(), mib(file));
        Ok(sample)
    }
}

impl Drop for VmlabResume {
    /// Stops the VM (a suspended one's state is discarded): nothing of the
    /// benchmark runs on after it.
    fn drop(&mut self) {
        if self.port.is_some() {
            let _ = self
                .command(&["stop", "--timeout", "10", NAME].map(String::from))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_the_flavors_image_named_detached_with_a_loopback_forward() {
        let spec = super::super::debian::spec(PathBuf::from("/c/base.qcow2"));
        assert_eq!(
            run_args(&spec, 40022).join(" "),
            "run --name bench-resume --flavor lean --mem 256M --forward tcp:127.0.0.1:40022:22 --detach"
        );
        let full = DebianSpec {
            flavor: Flavor::Full,
            ..spec
        };
        assert!(run_args(&full, 40022).join(" ").contains(" --flavor full "));
    }

    #[test]
    fn a_missing_image_is_reported_missing() {
        let mut c = VmlabResume::new(
            PathBuf::from("/bin/sh"),
            Err(Missing("run `vmlab image build` first".into())),
            Flavor::Lean,
            std::env::temp_dir(),
        );
        assert_eq!(c.prepare().unwrap_err().0, "run `vmlab image build` first");
        assert_eq!(c.describe().id, "vmlab-resume-ssh");
        assert_eq!(c.describe().phases.len(), 2);
    }

    #[test]
    fn a_vm_without_a_live_pid_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let c = VmlabResume::new(
            PathBuf::from("/bin/sh"),
            Err(Missing("x".into())),
            Flavor::Lean,
            dir.path().to_path_buf(),
        );
        assert!(c.alive().is_err());
        std::fs::create_dir_all(c.vm_dir()).unwrap();
        std::fs::write(c.vm_dir().join("vmlab.pid"), std::process::id().to_string()).unwrap();
        assert!(c.alive().is_ok());
    }
}
