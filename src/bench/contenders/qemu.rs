//! QEMU's microvm machine booting the same kernel, initramfs and command
//! line as vmlab, timed to the same boot-timer write: QEMU's debug console
//! (isa-debugcon on port 0xe9) passes the byte to its stdout, where the
//! harness timestamps it.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::GuestSpec;
use crate::bench::contender::{Contender, Description, Goal, Missing, Role, Sample, SampleError};
use crate::bench::process::{find_program, MarkerRun};
use crate::vmm::config::BASE_CMDLINE;

const QEMU: &str = "qemu-system-x86_64";

pub struct QemuMicrovm {
    guest: GuestSpec,
    dir: PathBuf,
    qemu: Option<PathBuf>,
}

impl QemuMicrovm {
    pub fn new(guest: GuestSpec, dir: PathBuf) -> Self {
        QemuMicrovm {
            guest,
            dir,
            qemu: None,
        }
    }

    /// QEMU's arguments: microvm with KVM, the guest's console in a file,
    /// port 0xe9 on stdout, vmlab's whole kernel command line.
    fn args(&self, console: &Path) -> Vec<String> {
        let g = &self.guest;
        let mut args = microvm_args(g.mem_mib, console);
        args.extend([
            "-kernel".to_string(),
            g.kernel.display().to_string(),
            "-initrd".to_string(),
            g.initrd.display().to_string(),
            "-append".to_string(),
            format!("{BASE_CMDLINE} {}", g.cmdline),
        ]);
        args
    }
}

/// The machine every QEMU contender boots: microvm on KVM with the host's
/// CPU and one vCPU like vmlab's default, no default devices, `mem_mib` of
/// memory, the serial console in the file `console`, and the boot-timer
/// port 0xe9 (isa-debugcon) on QEMU's stdout.
pub(super) fn microvm_args(mem_mib: u64, console: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "-m".to_string(),
        format!("{mem_mib}M"),
        "-chardev".to_string(),
        format!("file,id=con,path={}", console.display()),
        "-serial".to_string(),
        "chardev:con".to_string(),
        "-chardev".to_string(),
        "stdio,id=e9,signal=off".to_string(),
        "-device".to_string(),
        "isa-debugcon,iobase=0xe9,chardev=e9".to_string(),
    ]);
    args
}

/// QEMU on PATH, and `dir` made for a QEMU contender's files; or why it
/// cannot run.
pub(super) fn prepare_qemu(dir: &Path) -> Result<PathBuf, Missing> {
    let qemu = find_program(QEMU).ok_or_else(|| {
        Missing(format!(
            "{QEMU} not found on PATH (Debian: apt-get install qemu-system-x86)"
        ))
    })?;
    std::fs::create_dir_all(dir)
        .map_err(|e| Missing(format!("cannot create {}: {e}", dir.display())))?;
    Ok(qemu)
}

impl Contender for QemuMicrovm {
    fn describe(&self) -> Description {
        Description::new(
            "qemu-microvm-init",
            "QEMU microvm → init",
            Goal::Init,
            Role::Qemu,
            &["QEMU start to init"],
        )
    }
    fn prepare(&mut self) -> Result<(), Missing> {
        self.qemu = Some(prepare_qemu(&self.dir)?);
        Ok(())
    }
    fn sample(&mut self) -> Result<Sample, SampleError> {
        let qemu = self
            .qemu
            .clone()
            .ok_or_else(|| SampleError::new("QEMU was not prepared"))?;
        let console = self.dir.join("qemu.console");
        let mut command = Command::new(&qemu);
        command.args(self.args(&console));
        let marker = MarkerRun {
            what: "QEMU",
            marker: "the guest's boot-timer write on port 0xe9",
            stderr: self.dir.join("qemu.stderr"),
            logs: vec![console],
        };
        Ok(Sample {
            phases: vec![marker.run(command, || {})?],
            metrics: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_the_same_guest_with_port_e9_on_stdout() {
        let q = QemuMicrovm::new(
            GuestSpec {
                kernel: PathBuf::from("/k/vmlinux"),
                initrd: PathBuf::from("/k/initrd"),
                mem_mib: 256,
                cmdline: "quiet vmlab.bench=1".into(),
            },
            PathBuf::from("/scratch"),
        );
        let args = q.args(Path::new("/scratch/qemu.console")).join(" ");
        assert!(args.contains("-M microvm -enable-kvm"), "{args}");
        assert!(args.contains("-m 256M"), "{args}");
        assert!(
            args.contains("-kernel /k/vmlinux -initrd /k/initrd"),
            "{args}"
        );
        assert!(
            args.contains("isa-debugcon,iobase=0xe9,chardev=e9"),
            "{args}"
        );
        assert!(
            args.ends_with(&format!("-append {BASE_CMDLINE} quiet vmlab.bench=1")),
            "{args}"
        );
    }
}
