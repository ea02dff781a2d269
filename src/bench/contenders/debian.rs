//! The guest of the ssh-ready contenders: a Debian image (the cached base
//! from `vmlab image build`, lean or full), booted by the VMs from a fresh
//! linked clone per sample with the identity a named VM gets (hostname,
//! the user's public key, a new instance id: new host keys each boot), and
//! (lean) unpacked once as the container's root filesystem.

use std::path::{Path, PathBuf};

use super::scratch::ScratchFile;
use crate::bench::contender::{Missing, SampleError};
use crate::disk::{clone_image, CloneOptions};
use crate::image::{boot_params_for, Flavor, GuestIdentity, UserKey};

/// The guest's hostname in every ssh-ready sample.
const HOSTNAME: &str = "vmlab-bench";

/// Everything the ssh-ready contenders share.
#[derive(Clone, Debug)]
pub struct DebianSpec {
    /// The kernel the VMs boot: the default guest's (or `--kernel`) for the
    /// lean image, the one the full image carries in /boot for the full.
    pub kernel: PathBuf,
    /// The full image's initrd, beside its kernel.
    pub initrd: Option<PathBuf>,
    pub flavor: Flavor,
    /// The cached qcow2 base image.
    pub base: PathBuf,
    pub mem_mib: u64,
    /// The user's key pair: its public half goes into the guest, its
    /// private half logs in.
    pub key: UserKey,
    /// The system `ssh`.
    pub ssh: PathBuf,
}

/// The Debian guest, or why the ssh-ready contenders cannot run (they are
/// then reported missing with that reason).
pub type DebianGuest = Result<DebianSpec, Missing>;

impl DebianSpec {
    /// The kernel command line parameters of one boot (after vmlab's own
    /// `console=ttyS0 ...`): root on the first disk, the Debian init, the
    /// identity, and a quiet console as in every boot the benchmark times
    /// (serial output costs VM exits that have nothing to do with booting).
    pub fn cmdline(&self, instance: &str) -> Result<String, SampleError> {
        let identity = GuestIdentity::new(HOSTNAME, &self.key.public_key)
            .and_then(|id| id.with_instance(instance))
            .map_err(|e| SampleError::new(format!("the guest's identity: {e}")))?;
        let mut params = boot_params_for(self.flavor, &identity);
        if !params.iter().any(|p| p == "quiet") {
            params.push("quiet".to_string());
        }
        Ok(params.join(" "))
    }

    /// A fresh linked clone of the base at `path` (removed when dropped):
    /// every sample boots a disk that never booted, as a new VM does.
    pub fn fresh_disk(&self, path: &Path) -> Result<ScratchFile, SampleError> {
        let _ = std::fs::remove_file(path);
        clone_image(&self.base, path, &CloneOptions::default()).map_err(|e| {
            SampleError::new(format!(
                "cannot clone {} to {}: {e}",
                self.base.display(),
                path.display()
            ))
        })?;
        Ok(ScratchFile(path.to_path_buf()))
    }
}

/// A spec for the contenders' tests: kernel /k/vmlinux, 256 MiB, the key
/// /d/id_ed25519.
#[cfg(test)]
pub(crate) fn spec(base: PathBuf) -> DebianSpec {
    DebianSpec {
        kernel: PathBuf::from("/k/vmlinux"),
        initrd: None,
        flavor: Flavor::Lean,
        base,
        mem_mib: 256,
        key: UserKey {
            private_key: PathBuf::from("/d/id_ed25519"),
            public_key:
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC2x8Jf2Yy0fLQ8XIbRp1gqG2hH2Qm2m6u7pU4bJzY5A vmlab"
                    .to_string(),
        },
        ssh: PathBuf::from("/usr/bin/ssh"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::cmdline_param;

    #[test]
    fn cmdline_boots_the_image_init_with_the_users_key_and_a_new_instance() {
        let line = spec(PathBuf::from("/b")).cmdline("bench-7").unwrap();
        assert!(
            line.starts_with("root=/dev/vda rootfstype=ext4 rw init=/sbin/vmlab-init "),
            "{line}"
        );
        assert_eq!(cmdline_param(&line, "vmlab.hostname"), Some(HOSTNAME));
        assert_eq!(cmdline_param(&line, "vmlab.instance"), Some("bench-7"));
        assert!(cmdline_param(&line, "vmlab.ssh_key").is_some());
        assert!(line.ends_with(" quiet"), "{line}");
        let full = DebianSpec {
            flavor: Flavor::Full,
            ..spec(PathBuf::from("/b"))
        };
        let line = full.cmdline("bench-8").unwrap();
        assert!(!line.contains("init="), "systemd: {line}");
        assert_eq!(line.matches("quiet").count(), 1, "{line}");
        let err = spec(PathBuf::from("/b"))
            .cmdline("no spaces allowed")
            .unwrap_err();
        assert!(err.what.contains("instance id"), "{err}");
    }

    #[test]
    fn fresh_disk_is_a_linked_clone_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 16]).unwrap();
        let spec = spec(base.clone());
        let disk_path = dir.path().join("sample.qcow2");
        std::fs::write(&disk_path, "stale").unwrap();
        let disk = spec.fresh_disk(&disk_path).unwrap();
        let chain =
            crate::disk::image_info(disk.path(), &crate::disk::BackingPolicy::vmlab()).unwrap();
        assert_eq!(chain[0].format, crate::disk::ImageFormat::Qcow2);
        assert_eq!(chain.len(), 2, "a linked clone: {chain:?}");
        assert_eq!(
            chain[1].path.canonicalize().unwrap(),
            base.canonicalize().unwrap()
        );
        assert_eq!(chain[0].virtual_size, 1 << 16);
        drop(disk);
        assert!(!disk_path.exists());
        let err = spec
            .fresh_disk(&dir.path().join("missing/dir/x.qcow2"))
            .unwrap_err();
        assert!(err.what.contains("cannot clone"), "{err}");
    }
}
