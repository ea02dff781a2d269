//! Which files a qcow2 image may name as its backing file. An image is
//! untrusted data: without a rule, a downloaded image could name
//! `~/.ssh/id_ed25519` as a raw backing file and its guest would read it.
//!
//! With symlinks and `..` resolved, a backing file is allowed when it lies
//! - below the directory of the image the user opened, through no hidden
//!   (dot) name, so that `~/disk.qcow2` cannot reach `~/.ssh/` or `~/.netrc`;
//! - under vmlab's own image and VM directories, where vmlab's disks name
//!   their backing files by absolute path (linked clones of the base image
//!   and of other VMs' frozen layers);
//! - at or under a path the user allowed (`--allow-backing PATH`).
//!
//! Never in vmlab's ssh directory, whatever the user allowed; block devices
//! only when the user allowed them.

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use super::error::{DiskError, Result};

/// Where the backing files of an image chain may lie, besides the top
/// image's own directory (which [`BackingPolicy::check`] is given per chain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingPolicy {
    /// Directories whose files vmlab itself names as backing layers.
    trusted_dirs: Vec<PathBuf>,
    /// Files or directories the user allowed.
    allowed: Vec<PathBuf>,
    /// Directories no image may reach.
    never: Vec<PathBuf>,
}

/// Why a backing file was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingRefusal {
    /// Outside the image's directory, vmlab's directories and every allowed path.
    Outside,
    /// Below the image's directory, but through a hidden (dot) name.
    Hidden,
    /// A block device the user did not allow.
    BlockDevice,
    /// In vmlab's ssh directory, which no image may name.
    Secret,
}

impl fmt::Display for BackingRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackingRefusal::Outside => {
                "lies outside the image's directory and vmlab's image and VM directories"
            }
            BackingRefusal::Hidden => {
                "is reached through a hidden name below the image's directory"
            }
            BackingRefusal::BlockDevice => "is a block device",
            BackingRefusal::Secret => "is in vmlab's ssh directory, which no image may name",
        })
    }
}

/// A backing file that passed the policy: which file it was (device,
/// inode), so that the file opened afterwards can be checked to be it.
#[derive(Clone, Debug)]
pub(crate) struct AllowedBacking {
    pub id: (u64, u64),
}

impl BackingPolicy {
    /// vmlab's rule: its image cache and VM directories are trusted, its
    /// ssh directory never reachable; nothing else allowed yet.
    pub fn vmlab() -> Self {
        BackingPolicy {
            trusted_dirs: vec![crate::dirs::images_dir(), crate::dirs::vms_dir()],
            allowed: Vec::new(),
            never: vec![crate::dirs::ssh_dir()],
        }
    }

    /// The same policy, also allowing `paths` (files, or directories and
    /// everything below them), as `--allow-backing` does.
    pub fn allowing<I, P>(mut self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        self.allowed.extend(paths.into_iter().map(Into::into));
        self
    }

    /// The paths allowed beyond vmlab's own rule.
    pub fn allowed(&self) -> &[PathBuf] {
        &self.allowed
    }

    /// Checks `backing`, named by `image`, for a chain whose top image lies
    /// in `top_dirs` (canonical directories).
    pub(crate) fn check(
        &self,
        image: &Path,
        backing: &Path,
        top_dirs: &[PathBuf],
    ) -> Result<AllowedBacking> {
        let real = backing
            .canonicalize()
            .map_err(|e| DiskError::io(backing, e))?;
        let meta = std::fs::metadata(&real).map_err(|e| DiskError::io(&real, e))?;
        let refuse = |reason| DiskError::BackingNotAllowed {
            image: image.to_path_buf(),
            backing: real.clone(),
            reason,
        };
        let allowed = AllowedBacking {
            id: (meta.dev(), meta.ino()),
        };
        if self.never.iter().any(|dir| real.starts_with(resolved(dir))) {
            return Err(refuse(BackingRefusal::Secret));
        }
        if self.allowed.iter().any(|p| real.starts_with(resolved(p))) {
            return Ok(allowed);
        }
        if meta.file_type().is_block_device() {
            return Err(refuse(BackingRefusal::BlockDevice));
        }
        if self
            .trusted_dirs
            .iter()
            .any(|dir| real.starts_with(resolved(dir)))
        {
            return Ok(allowed);
        }
        let mut below_hidden = false;
        for dir in top_dirs {
            if let Ok(rest) = real.strip_prefix(dir) {
                if rest.components().any(is_hidden) {
                    below_hidden = true;
                } else {
                    return Ok(allowed);
                }
            }
        }
        Err(refuse(if below_hidden {
            BackingRefusal::Hidden
        } else {
            BackingRefusal::Outside
        }))
    }
}

/// `path` with symlinks resolved, or as it is when it does not exist
/// (nothing real can lie below it then).
fn resolved(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

fn is_hidden(c: Component<'_>) -> bool {
    matches!(c, Component::Normal(name) if name.as_encoded_bytes().first() == Some(&b'.'))
}

/// The directories a chain's top image at `top` lies in, resolved: the one
/// it was named in and the one it really is in (they differ when `top` is
/// a symlink).
pub(crate) fn top_dirs(top: &Path) -> Vec<PathBuf> {
    let named = match top.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut dirs = Vec::new();
    if let Ok(d) = named.canonicalize() {
        dirs.push(d);
    }
    if let Some(d) = top.canonicalize().ok().as_deref().and_then(Path::parent) {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_path_buf());
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(root: &Path) -> BackingPolicy {
        BackingPolicy {
            trusted_dirs: vec![root.join("vmlab/vms")],
            allowed: Vec::new(),
            never: vec![root.join("vmlab/ssh")],
        }
    }

    #[test]
    fn each_rule_decides_as_documented() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        for dir in [
            "lab/sub",
            "lab/.hidden",
            "other",
            "vmlab/vms/vm1",
            "vmlab/ssh",
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for file in [
            "lab/base",
            "lab/sub/base",
            "lab/.hidden/base",
            "lab/.dotfile",
            "other/secret",
            "vmlab/vms/vm1/disk",
            "vmlab/ssh/id_ed25519",
        ] {
            std::fs::write(root.join(file), b"x").unwrap();
        }
        std::os::unix::fs::symlink(root.join("other/secret"), root.join("lab/link")).unwrap();
        let top = top_dirs(&root.join("lab/top.qcow2"));
        assert_eq!(top, [root.join("lab")]);
        let p = policy(&root);
        let check = |p: &BackingPolicy, rel: &str| {
            p.check(Path::new("top"), &root.join(rel), &top)
                .map(drop)
                .map_err(|e| match e {
                    DiskError::BackingNotAllowed { reason, .. } => reason,
                    other => panic!("{rel}: {other}"),
                })
        };
        assert_eq!(check(&p, "lab/base"), Ok(()));
        assert_eq!(check(&p, "lab/sub/../sub/base"), Ok(()));
        assert_eq!(check(&p, "vmlab/vms/vm1/disk"), Ok(()));
        assert_eq!(check(&p, "lab/.hidden/base"), Err(BackingRefusal::Hidden));
        assert_eq!(check(&p, "lab/.dotfile"), Err(BackingRefusal::Hidden));
        assert_eq!(check(&p, "other/secret"), Err(BackingRefusal::Outside));
        assert_eq!(
            check(&p, "lab/../other/secret"),
            Err(BackingRefusal::Outside)
        );
        assert_eq!(check(&p, "lab/link"), Err(BackingRefusal::Outside));
        assert_eq!(
            check(&p, "vmlab/ssh/id_ed25519"),
            Err(BackingRefusal::Secret)
        );
        let allowed = policy(&root).allowing([root.join("other"), root.join("vmlab")]);
        assert_eq!(check(&allowed, "lab/link"), Ok(()));
        assert_eq!(
            check(&allowed, "vmlab/ssh/id_ed25519"),
            Err(BackingRefusal::Secret),
            "no allowance reaches vmlab's ssh directory"
        );
        if Path::new("/dev/loop0").exists() {
            let dev = |p: &BackingPolicy| p.check(Path::new("t"), Path::new("/dev/loop0"), &top);
            assert!(matches!(
                dev(&p),
                Err(DiskError::BackingNotAllowed {
                    reason: BackingRefusal::BlockDevice,
                    ..
                })
            ));
            assert!(dev(&policy(&root).allowing(["/dev/loop0"])).is_ok());
        }
    }

    #[test]
    fn a_symlinked_top_image_counts_both_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("store")).unwrap();
        std::fs::create_dir_all(root.join("lab")).unwrap();
        std::fs::write(root.join("store/top.qcow2"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("store/top.qcow2"), root.join("lab/top.qcow2"))
            .unwrap();
        assert_eq!(
            top_dirs(&root.join("lab/top.qcow2")),
            [root.join("lab"), root.join("store")]
        );
    }
}
