//! `vmlab bench boot`: vmlab, QEMU microvm and runc brought to the same
//! "init started" signal, interleaved, with vmlab's own cost; and, when the
//! Debian image is there, the same three to ssh-ready. With the full
//! flavor: vmlab and QEMU microvm to ssh-ready (split at init) on the full
//! image, both booting the kernel and initrd that image carries, and vmlab
//! resume of a named full VM.

use std::path::{Path, PathBuf};

use super::contender::Missing;
use super::contender::{Contender, Goal, Role};
use super::contenders::{
    DebianGuest, DebianSpec, GuestSpec, QemuMicrovm, QemuSsh, Runc, RuncSshd, Vmlab, VmlabResume,
    VmlabSsh, BENCH_CMDLINE,
};
use super::host::{HostInfo, HostKind};
use super::process::find_program;
use super::report::{BenchReport, Target};
use super::runner::{self, Progress, RunOptions};
use crate::image::{DebianImage, Flavor, ImageSpec};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("this host's KVM is PVM ({0}): it cannot boot the default guest kernel, which has no PVM guest support; run the benchmark in the emulated-SVM rig instead: `cargo bench --bench boot` (or `bash tests/rig/l1 -- target/release/vmlab bench boot`)")]
    PvmHost(String),
    #[error("cannot create a scratch directory under {dir}: {source}")]
    Scratch {
        dir: PathBuf,
        source: vmm_sys_util::errno::Error,
    },
    #[error("cannot write {path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {0}: its directory does not exist")]
    NoOutputDir(PathBuf),
    #[error("the ssh-ready contenders (--ssh): {0}")]
    SshGuest(String),
    #[error("the full image's kernel: {0}")]
    FullBoot(String),
}

/// Whether the ssh-ready contenders run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SshPeers {
    /// When the Debian image is cached; else they are listed as missing.
    Auto,
    /// Always: build the image first if needed (`--ssh`).
    Build,
    /// Listed as missing, never run (`--no-ssh`).
    Off,
}

/// This host, unless it is one where the benchmark guest cannot boot (PVM).
pub fn check_host() -> Result<HostInfo, BenchError> {
    let host = HostInfo::detect();
    match host.kind {
        HostKind::Pvm => Err(BenchError::PvmHost(host.detail)),
        _ => Ok(host),
    }
}

/// Fails early, before minutes of measuring, when `path` cannot be written
/// for want of its directory.
pub fn check_output_path(path: &Path) -> Result<(), BenchError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if parent.is_dir() && path.file_name().is_some() {
        Ok(())
    } else {
        Err(BenchError::NoOutputDir(path.to_path_buf()))
    }
}

/// What `vmlab bench boot` measures with.
#[derive(Clone, Debug)]
pub struct BootBench {
    /// The vmlab binary to run (`vmlab run --report-json`).
    pub vmlab: PathBuf,
    /// The guest every VM boots, and whose initramfs the container runs.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub mem_mib: u64,
    pub options: RunOptions,
    pub ssh: SshPeers,
    /// Which Debian image the ssh-ready contenders boot; the full one is
    /// only timed to ssh-ready (its init is systemd, no container's).
    pub flavor: Flavor,
}

impl BootBench {
    fn guest(&self) -> GuestSpec {
        GuestSpec {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            mem_mib: self.mem_mib,
            cmdline: BENCH_CMDLINE.to_string(),
        }
    }

    /// The contenders, in sampling order; `scratch` holds their files.
    /// `debian` is what the ssh-ready ones boot, or why they cannot.
    pub fn contenders(&self, scratch: &Path, debian: &DebianGuest) -> Vec<Box<dyn Contender>> {
        if self.flavor == Flavor::Full {
            return vec![
                Box::new(VmlabSsh::new(
                    self.vmlab.clone(),
                    debian.clone(),
                    Flavor::Full,
                    scratch.join("vmlab-full-ssh"),
                )),
                Box::new(QemuSsh::new(
                    debian.clone(),
                    Flavor::Full,
                    scratch.join("qemu-full-ssh"),
                )),
                Box::new(VmlabResume::new(
                    self.vmlab.clone(),
                    debian.clone(),
                    Flavor::Full,
                    scratch.join("vmlab-full-resume"),
                )),
            ];
        }
        vec![
            Box::new(Vmlab::to_init(
                self.vmlab.clone(),
                self.guest(),
                scratch.join("vmlab"),
            )),
            Box::new(QemuMicrovm::new(self.guest(), scratch.join("qemu"))),
            Box::new(Runc::new(self.initrd.clone(), scratch.join("runc"))),
            Box::new(VmlabSsh::new(
                self.vmlab.clone(),
                debian.clone(),
                Flavor::Lean,
                scratch.join("vmlab-ssh"),
            )),
            Box::new(QemuSsh::new(
                debian.clone(),
                Flavor::Lean,
                scratch.join("qemu-ssh"),
            )),
            Box::new(RuncSshd::new(debian.clone(), scratch.join("runc-sshd"))),
            Box::new(VmlabResume::new(
                self.vmlab.clone(),
                debian.clone(),
                Flavor::Lean,
                scratch.join("vmlab-resume"),
            )),
        ]
    }

    /// The Debian guest of the ssh-ready contenders, as [`SshPeers`] asks:
    /// the cached image (built first with `Build`), the user's key pair
    /// (made on first use, as `vmlab run --name` would) and the system ssh.
    /// Fails only with `Build`, when they cannot run; otherwise whatever is
    /// lacking makes them missing. The full image's kernel and initrd are
    /// copied out of it into `scratch`, for both VMMs to boot.
    pub fn debian_guest(&self, scratch: &Path) -> Result<DebianGuest, BenchError> {
        let spec = match self.flavor {
            Flavor::Lean => ImageSpec::lean(),
            Flavor::Full => ImageSpec::new(Flavor::Full, &[]).expect("no packages"),
        };
        let guest = self.debian_guest_from(
            || crate::image::cached_image_for(&spec),
            || crate::image::image_for(&spec).map_err(|e| e.to_string()),
        )?;
        match (guest, self.flavor) {
            (Ok(spec), Flavor::Full) => self.with_full_boot(spec, scratch).map(Ok),
            (guest, _) => Ok(guest),
        }
    }

    /// `spec` booting the kernel and initrd its full image carries, copied
    /// to `scratch/full-boot/` (QEMU takes files; vmlab gets the same).
    fn with_full_boot(&self, spec: DebianSpec, scratch: &Path) -> Result<DebianSpec, BenchError> {
        let fail = |e: String| BenchError::FullBoot(e);
        let boot = crate::image::read_disk_boot(
            &spec.base,
            self.mem_mib << 20,
            &crate::disk::BackingPolicy::vmlab(),
        )
        .map_err(|e| fail(e.to_string()))?;
        let dir = scratch.join("full-boot");
        std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.img"));
        for (file, path) in [(&boot.kernel, &kernel), (&boot.initrd, &initrd)] {
            file.read_all()
                .and_then(|bytes| std::fs::write(path, bytes))
                .map_err(|e| fail(format!("{}: {e}", path.display())))?;
        }
        Ok(DebianSpec {
            kernel,
            initrd: Some(initrd),
            flavor: Flavor::Full,
            ..spec
        })
    }

    /// [`BootBench::debian_guest`] with the image looked up by `cached` and
    /// built by `build`.
    fn debian_guest_from(
        &self,
        cached: impl FnOnce() -> Option<DebianImage>,
        build: impl FnOnce() -> Result<DebianImage, String>,
    ) -> Result<DebianGuest, BenchError> {
        let image = match self.ssh {
            SshPeers::Off => return Ok(Err(Missing("left out (--no-ssh)".into()))),
            SshPeers::Auto => cached().ok_or_else(|| {
                "the Debian image is not built: run `vmlab image build` first (or pass --ssh)"
                    .to_string()
            }),
            SshPeers::Build => build(),
        };
        let spec = image.and_then(|image| {
            let key = crate::image::user_key().map_err(|e| format!("the SSH key: {e}"))?;
            let ssh = find_program("ssh")
                .ok_or("ssh not found on PATH (Debian: apt-get install openssh-client)")?;
            Ok(DebianSpec {
                kernel: self.kernel.clone(),
                initrd: None,
                flavor: Flavor::Lean,
                base: image.base,
                mem_mib: self.mem_mib,
                key,
                ssh,
            })
        });
        match (spec, self.ssh) {
            (Ok(spec), _) => Ok(Ok(spec)),
            (Err(e), SshPeers::Build) => Err(BenchError::SshGuest(e)),
            (Err(e), _) => Ok(Err(Missing(e))),
        }
    }

    /// Runs the whole benchmark. Refuses on a PVM host (the guest cannot
    /// boot there).
    pub fn run(&self, progress: &Progress) -> Result<BenchReport, BenchError> {
        let host = check_host()?;
        let scratch = scratch_dir()?;
        let debian = self.debian_guest(scratch.as_path())?;
        let mut contenders = self.contenders(scratch.as_path(), &debian);
        let mut report = runner::run(&mut contenders, self.options, host, progress);
        report.targets = targets(&report);
        Ok(report)
    }

    /// vmlab's start-up alone, up to the first vCPU entry: runs on any
    /// KVM, including PVM (see [`Vmlab::to_first_entry`]).
    pub fn run_first_entry(&self, progress: &Progress) -> Result<BenchReport, BenchError> {
        let scratch = scratch_dir()?;
        let mut contenders: Vec<Box<dyn Contender>> = vec![Box::new(Vmlab::to_first_entry(
            self.vmlab.clone(),
            self.guest(),
            scratch.as_path().join("vmlab"),
        ))];
        let mut report = runner::run(&mut contenders, self.options, HostInfo::detect(), progress);
        report.targets = targets(&report);
        Ok(report)
    }
}

fn scratch_dir() -> Result<vmm_sys_util::tempdir::TempDir, BenchError> {
    let dir = std::env::temp_dir();
    let prefix = dir.join("vmlab-bench-");
    vmm_sys_util::tempdir::TempDir::new_with_prefix(&prefix)
        .map_err(|source| BenchError::Scratch { dir, source })
}

/// The project's boot targets (issue "Boot an unmodified Linux guest"),
/// evaluated on this report.
pub fn targets(report: &BenchReport) -> Vec<Target> {
    let mut targets = Vec::new();
    if report.contenders.iter().any(|c| c.goal == Goal::Init) {
        let ratio = report.ratio(Goal::Init, Role::Qemu).map(|r| r.median);
        targets.push(Target {
            what: "vmlab to init / QEMU microvm to init (median)".into(),
            limit: 0.8,
            unit: "x".into(),
            measured: ratio,
            met: ratio.map(|r| r <= 0.8),
            note: ratio
                .is_none()
                .then(|| "QEMU microvm or vmlab was not measured".into()),
        });
    }
    let vmlab = report
        .contenders
        .iter()
        .find(|c| c.role == Role::Vmlab && c.summary.is_some());
    let metric = |key: &str| {
        vmlab
            .and_then(|c| c.summary.as_ref())
            .and_then(|s| s.metrics.get(key))
            .map(|s| s.median)
    };
    for (what, key, limit, unit) in [
        (
            "VMM CPU time before the first vCPU entry (median)",
            "vmm_cpu_before_entry_ms",
            // Firecracker's promise: at most 8 CPU ms to its API socket.
            8.0,
            "ms",
        ),
        (
            "VMM overhead, peak RSS minus guest memory touched (median)",
            "vmm_overhead_mib",
            5.0,
            "MiB",
        ),
    ] {
        let measured = metric(key);
        targets.push(Target {
            what: what.into(),
            limit,
            unit: unit.into(),
            measured,
            met: measured.map(|v| v <= limit),
            note: measured.is_none().then(|| "vmlab was not measured".into()),
        });
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(ssh: SshPeers) -> BootBench {
        BootBench {
            vmlab: PathBuf::from("/bin/vmlab"),
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
            mem_mib: 256,
            options: RunOptions { runs: 1, warmup: 0 },
            ssh,
            flavor: Flavor::Lean,
        }
    }

    #[test]
    fn every_peer_is_in_the_list() {
        let ids: Vec<String> = bench(SshPeers::Auto)
            .contenders(Path::new("/tmp/x"), &Err(Missing("no image".into())))
            .iter()
            .map(|c| c.describe().id)
            .collect();
        assert_eq!(
            ids,
            [
                "vmlab-init",
                "qemu-microvm-init",
                "runc-init",
                "vmlab-ssh",
                "qemu-microvm-ssh",
                "runc-sshd",
                "vmlab-resume-ssh"
            ]
        );
    }

    #[test]
    fn the_full_flavor_is_vmlab_and_qemu_to_ssh_ready() {
        let full = BootBench {
            flavor: Flavor::Full,
            ..bench(SshPeers::Auto)
        };
        let missing = Err(Missing("no image".into()));
        let ids: Vec<String> = full
            .contenders(Path::new("/tmp/x"), &missing)
            .iter()
            .map(|c| c.describe().id)
            .collect();
        assert_eq!(
            ids,
            [
                "vmlab-full-ssh",
                "qemu-microvm-full-ssh",
                "vmlab-full-resume-ssh"
            ]
        );
        let err = full
            .with_full_boot(
                super::super::contenders::debian_spec_for_tests(PathBuf::from("/nope.qcow2")),
                Path::new("/tmp"),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the full image's kernel") && err.contains("/nope.qcow2"),
            "{err}"
        );
    }

    fn image(base: &str) -> DebianImage {
        DebianImage {
            base: PathBuf::from(base),
            index: crate::image::ImageIndex {
                recipe: "r".into(),
                suite: "bookworm".into(),
                flavor: "lean".into(),
                packages: Vec::new(),
                base: "base.qcow2".into(),
                virtual_size: 1 << 30,
                file_size: 1 << 20,
                build_ms: 1,
                built_at: 0,
            },
        }
    }

    #[test]
    fn ssh_peers_left_out_or_without_an_image_are_missing_with_the_reason() {
        let never = || -> Result<DebianImage, String> { panic!("nothing is built") };
        let off = bench(SshPeers::Off)
            .debian_guest_from(|| Some(image("/c/base.qcow2")), never)
            .unwrap()
            .unwrap_err();
        assert!(off.0.contains("--no-ssh"), "{off}");
        let auto = bench(SshPeers::Auto)
            .debian_guest_from(|| None, never)
            .unwrap()
            .unwrap_err();
        assert!(auto.0.contains("run `vmlab image build` first"), "{auto}");
        let mut contenders =
            bench(SshPeers::Auto).contenders(Path::new("/tmp/x"), &Err(auto.clone()));
        for c in &mut contenders[3..] {
            assert_eq!(c.prepare().unwrap_err(), auto, "{}", c.describe().id);
        }
        // --ssh: an image that cannot be built is an error, not a gap.
        let err = bench(SshPeers::Build)
            .debian_guest_from(|| None, || Err("needs root".into()))
            .unwrap_err();
        assert!(err.to_string().contains("needs root"), "{err}");
    }

    #[test]
    fn a_cached_image_boots_with_the_users_key() {
        // The key is made under a scratch XDG_DATA_HOME.
        let _home = crate::control::state::tests::temp_home();
        let spec = bench(SshPeers::Auto)
            .debian_guest_from(
                || Some(image("/c/base.qcow2")),
                || panic!("a cached image is not rebuilt"),
            )
            .unwrap()
            .unwrap();
        assert_eq!(spec.base, PathBuf::from("/c/base.qcow2"));
        assert_eq!(spec.kernel, PathBuf::from("/k"));
        assert_eq!(spec.mem_mib, 256);
        assert!(spec.key.public_key.starts_with("ssh-ed25519 "));
        assert!(spec.key.private_key.starts_with(crate::dirs::data_dir()));
    }

    #[test]
    fn output_paths_need_an_existing_directory() {
        assert!(check_output_path(Path::new("results.json")).is_ok());
        assert!(check_output_path(Path::new("/tmp/results.json")).is_ok());
        let err = check_output_path(Path::new("/nonexistent-dir/r.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/r.json"), "{err}");
        assert!(check_output_path(Path::new("/")).is_err());
    }

    #[test]
    fn pvm_refusal_is_one_line_that_points_to_the_rig() {
        let text = BenchError::PvmHost("kvm_pvm loaded".into()).to_string();
        assert!(!text.contains('\n'));
        assert!(text.contains("PVM") && text.contains("rig"), "{text}");
    }
}
