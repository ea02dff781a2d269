//! A disk image's ext4 root filesystem as a directory, for a container: the
//! image (qcow2 or raw) written out raw by vmlab's disk layer, then copied
//! out with e2fsprogs' `debugfs -R 'rdump / DIR'`, which reads the
//! filesystem as a plain file: no loop device, no mount, no root needed
//! (as root it also keeps every file's owner, which sshd insists on).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::bench::process::find_program;
use crate::disk::{clone_image, CloneMode, CloneOptions, ImageFormat};

/// `name` on PATH, or in the sbin directories where Debian keeps
/// e2fsprogs (not on an ordinary user's PATH).
pub fn find_admin_tool(name: &str) -> Option<PathBuf> {
    find_program(name).or_else(|| {
        ["/usr/sbin", "/sbin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|p| p.is_file())
    })
}

/// The problems debugfs reported: it exits 0 whatever happens and says
/// what went wrong on stderr, after its version banner.
fn debugfs_errors(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| {
            // The banner: "debugfs 1.47.0 (5-Feb-2023)".
            !l.strip_prefix("debugfs ")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .collect()
}

/// Copies the ext4 filesystem of `image` into `rootfs` (created, must not
/// exist yet), through a raw copy at `raw` that is removed afterwards.
pub fn extract(image: &Path, raw: &Path, rootfs: &Path) -> Result<(), String> {
    let debugfs = find_admin_tool("debugfs")
        .ok_or("debugfs not found (Debian: apt-get install e2fsprogs)")?;
    let target = rootfs
        .to_str()
        .filter(|s| !s.contains(char::is_whitespace) && !s.contains('"'));
    let target = target.ok_or_else(|| {
        format!(
            "{}: debugfs cannot take a path with spaces or quotes",
            rootfs.display()
        )
    })?;
    clone_image(
        image,
        raw,
        &CloneOptions {
            mode: CloneMode::Full,
            format: Some(ImageFormat::Raw),
            force: true,
            ..CloneOptions::default()
        },
    )
    .map_err(|e| format!("cannot write {} out raw: {e}", image.display()))?;
    let result = (|| {
        std::fs::create_dir(rootfs)
            .map_err(|e| format!("cannot create {}: {e}", rootfs.display()))?;
        let out = Command::new(&debugfs)
            .arg("-R")
            .arg(format!("rdump / {target}"))
            .arg(raw)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", debugfs.display()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors = debugfs_errors(&stderr);
        if !out.status.success() || !errors.is_empty() {
            return Err(format!(
                "debugfs could not copy the filesystem of {} ({}): {}",
                image.display(),
                out.status,
                errors.join("; ")
            ));
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(raw);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn tells_debugfs_errors_from_its_banner() {
        assert!(debugfs_errors("debugfs 1.47.0 (5-Feb-2023)\n").is_empty());
        assert_eq!(
            debugfs_errors(
                "debugfs 1.47.0 (5-Feb-2023)\nrdump: No such file or directory while statting /x\n"
            ),
            ["rdump: No such file or directory while statting /x"]
        );
        assert_eq!(
            debugfs_errors("debugfs: Bad magic number in super-block while trying to open junk"),
            ["debugfs: Bad magic number in super-block while trying to open junk"]
        );
    }

    /// A tiny ext4 made with `mkfs.ext4 -d`, as a qcow2 image (like the
    /// Debian base), comes out whole: contents, modes, symlinks, empty
    /// directories, and owners when run as root.
    #[test]
    fn extracts_a_tiny_ext4_from_a_qcow2_image() {
        let mkfs = find_admin_tool("mkfs.ext4").expect("e2fsprogs is installed (.ci/setup)");
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("etc/ssh")).unwrap();
        std::fs::create_dir_all(src.join("run/sshd")).unwrap();
        std::fs::write(src.join("etc/ssh/sshd_config"), "Port 22\n").unwrap();
        std::fs::set_permissions(
            src.join("etc/ssh/sshd_config"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("ssh/sshd_config", src.join("etc/link")).unwrap();
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if root {
            std::os::unix::fs::chown(src.join("etc/ssh/sshd_config"), Some(101), Some(102))
                .unwrap();
        }
        let ext4 = dir.path().join("fs.ext4");
        let made = Command::new(&mkfs)
            .args(["-q", "-F", "-d"])
            .arg(&src)
            .arg(&ext4)
            .arg("8M")
            .status()
            .unwrap();
        assert!(made.success());
        let qcow2 = dir.path().join("fs.qcow2");
        clone_image(
            &ext4,
            &qcow2,
            &CloneOptions {
                mode: CloneMode::Full,
                format: Some(ImageFormat::Qcow2),
                ..CloneOptions::default()
            },
        )
        .unwrap();

        let raw = dir.path().join("fs.raw");
        let rootfs = dir.path().join("rootfs");
        extract(&qcow2, &raw, &rootfs).unwrap();
        let config = rootfs.join("etc/ssh/sshd_config");
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "Port 22\n");
        let meta = std::fs::metadata(&config).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        if root {
            assert_eq!((meta.uid(), meta.gid()), (101, 102));
        }
        assert_eq!(
            std::fs::read_link(rootfs.join("etc/link")).unwrap(),
            Path::new("ssh/sshd_config")
        );
        assert!(rootfs.join("run/sshd").is_dir());
        assert!(!raw.exists(), "the raw copy is removed");

        // Not an ext4: debugfs's complaint, nothing claimed done.
        let junk = dir.path().join("junk.raw");
        std::fs::write(&junk, vec![0u8; 1 << 16]).unwrap();
        let err = extract(&junk, &raw, &dir.path().join("rootfs2")).unwrap_err();
        assert!(err.contains("debugfs could not copy"), "{err}");
        let err = extract(&qcow2, &raw, &dir.path().join("with space")).unwrap_err();
        assert!(err.contains("spaces"), "{err}");
    }
}
