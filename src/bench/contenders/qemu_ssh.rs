//! QEMU microvm to ssh-ready: the same kernel file, command line, memory and
//! Debian base (its own fresh linked clone per sample) as vmlab's
//! ssh-ready contender, with the devices vmlab gives the guest (virtio-blk,
//! virtio-net behind QEMU's user-mode network with the same loopback
//! forward, virtio-rng), all virtio-mmio. The Debian init's boot-timer
//! byte comes out of port 0xe9 on QEMU's stdout and splits the time: start
//! to init, init to ssh-ready.
//!
//! QEMU boots the very file vmlab boots (an ELF vmlinux goes in through its
//! PVH entry; no bzImage decompression on either side), as the QEMU
//! contender to init does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::debian::{DebianGuest, DebianSpec};
use super::qemu::{microvm_args, prepare_qemu};
use super::ssh_probe::SshProbe;
use super::ssh_run::{log_file, SshRun};
use crate::bench::contender::{Contender, Description, Goal, Missing, Role, Sample, SampleError};
use crate::image::Flavor;
use crate::vmm::config::BASE_CMDLINE;

pub struct QemuSsh {
    guest: DebianGuest,
    flavor: Flavor,
    dir: PathBuf,
    qemu: Option<PathBuf>,
    count: usize,
}

impl QemuSsh {
    pub fn new(guest: DebianGuest, flavor: Flavor, dir: PathBuf) -> Self {
        QemuSsh {
            guest,
            flavor,
            dir,
            qemu: None,
            count: 0,
        }
    }
}

/// QEMU's arguments for one sample; `cmdline` is what vmlab gets, which
/// QEMU gets after vmlab's own base line.
fn qemu_args(
    spec: &DebianSpec,
    console: &Path,
    disk: &Path,
    cmdline: &str,
    port: u16,
) -> Vec<String> {
    let mut args = microvm_args(spec.mem_mib, console);
    args.extend([
        "-kernel".to_string(),
        spec.kernel.display().to_string(),
        "-append".to_string(),
        format!("{BASE_CMDLINE} {cmdline}"),
    ]);
    if let Some(initrd) = &spec.initrd {
        args.extend(["-initrd".to_string(), initrd.display().to_string()]);
    }
    args.extend([
        "-drive".to_string(),
        format!("file={},if=none,id=d0,format=qcow2", disk.display()),
        "-device".to_string(),
        "virtio-blk-device,drive=d0".to_string(),
        "-netdev".to_string(),
        format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22"),
        "-device".to_string(),
        "virtio-net-device,netdev=n0".to_string(),
        "-device".to_string(),
        "virtio-rng-device".to_string(),
    ]);
    args
}

impl Contender for QemuSsh {
    fn describe(&self) -> Description {
        let (id, label) = match self.flavor {
            Flavor::Lean => ("qemu-microvm-ssh", "QEMU microvm → ssh-ready"),
            Flavor::Full => ("qemu-microvm-full-ssh", "QEMU microvm → ssh-ready (full)"),
        };
        Description::new(
            id,
            label,
            Goal::SshReady,
            Role::Qemu,
            &["QEMU start to init", "init to ssh-ready"],
        )
    }
    fn prepare(&mut self) -> Result<(), Missing> {
        self.guest.clone()?;
        self.qemu = Some(prepare_qemu(&self.dir)?);
        Ok(())
    }
    fn sample(&mut self) -> Result<Sample, SampleError> {
        let (Ok(spec), Some(qemu)) = (&self.guest, &self.qemu) else {
            return Err(SampleError::new("QEMU was not prepared"));
        };
        self.count += 1;
        let dir = &self.dir;
        let probe = SshProbe::for_sample(&spec.ssh, &spec.key.private_key, dir)?;
        let disk = spec.fresh_disk(&dir.join("disk.qcow2"))?;
        let instance = format!("bench-{}-q{}", std::process::id(), self.count);
        let cmdline = spec.cmdline(&instance)?;
        let (console, stderr) = (dir.join("qemu.console"), dir.join("qemu.stderr"));
        let mut command = Command::new(qemu);
        command
            .args(qemu_args(spec, &console, disk.path(), &cmdline, probe.port))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(&stderr)?);
        let run = SshRun {
            what: "QEMU",
            probe: &probe,
            logs: vec![stderr, console],
        };
        // SIGTERM: QEMU quits at once (the disk is thrown away anyway).
        let times = run.run(command, |child| {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        })?;
        Ok(Sample {
            phases: times.split_at_marker("QEMU", "the guest's boot-timer write on port 0xe9")?,
            metrics: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_the_same_kernel_and_line_with_vmlabs_devices_and_forward() {
        let spec = super::super::debian::spec(PathBuf::from("/c/base.qcow2"));
        let args = qemu_args(
            &spec,
            Path::new("/s/qemu.console"),
            Path::new("/s/disk.qcow2"),
            "root=/dev/vda quiet",
            40023,
        );
        let line = args.join(" ");
        for needle in [
            "-M microvm -enable-kvm -cpu host -smp 1",
            "-m 256M",
            "-kernel /k/vmlinux -append",
            "-drive file=/s/disk.qcow2,if=none,id=d0,format=qcow2 -device virtio-blk-device,drive=d0",
            "-netdev user,id=n0,hostfwd=tcp:127.0.0.1:40023-:22 -device virtio-net-device,netdev=n0",
            "-device virtio-rng-device",
            "isa-debugcon,iobase=0xe9,chardev=e9",
        ] {
            assert!(line.contains(needle), "no {needle:?} in {line}");
        }
        let append = args.iter().position(|a| a == "-append").unwrap();
        assert_eq!(
            args[append + 1],
            format!("{BASE_CMDLINE} root=/dev/vda quiet")
        );
        assert!(
            !line.contains("-initrd"),
            "the lean Debian guest boots from its disk"
        );
        let full = DebianSpec {
            initrd: Some(PathBuf::from("/s/initrd.img")),
            ..spec
        };
        let line = qemu_args(&full, Path::new("/c"), Path::new("/d"), "q", 1).join(" ");
        assert!(line.contains("-initrd /s/initrd.img -drive"), "{line}");
    }

    #[test]
    fn a_missing_image_is_reported_missing() {
        let mut c = QemuSsh::new(
            Err(Missing("no image".into())),
            Flavor::Lean,
            std::env::temp_dir(),
        );
        assert_eq!(c.prepare().unwrap_err().0, "no image");
        assert!(c.sample().is_err());
    }
}
