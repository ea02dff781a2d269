//! Which kernel the default guests boot, and getting it:
//!
//! - **debian**: Debian's packaged kernel (`linux-image-amd64`, fetched with
//!   apt by guest/debian-kernel.sh in seconds, cached by package version),
//!   with the busybox initramfs carrying the virtio, ext4 and power-button
//!   modules it needs (guest/kernel/debian-guest.modules). No compile: what a
//!   new user gets.
//! - **lean**: vmlab's own kernel (guest/build-kernel.sh: tinyconfig plus
//!   guest/kernel/vmlab.config, everything built in), compiled only when
//!   asked: `vmlab image kernel lean`, or `vmlab bench boot`, whose guest it
//!   is. It boots faster; once it is built, the default guests use it.
//!
//! `VMLAB_GUEST_KERNEL=lean|debian` overrides that choice.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::recipe::{Recipe, RECIPE_FILES};
use super::step::{run_step, run_step_as};
use super::ImageError;

/// The environment variable that picks the default guests' kernel.
pub const GUEST_KERNEL_VAR: &str = "VMLAB_GUEST_KERNEL";
/// The Debian kernel package guest/debian-kernel.sh fetches for the guests
/// (and the rig's L1): `generic` is linux-image-amd64, which has /dev/port
/// for the boot-timer byte (the cloud kernel has not).
const DEBIAN_FLAVOR: &str = "generic";
/// The modules the default guests load from it, inside guest/.
pub const DEBIAN_MODULES: &str = "kernel/debian-guest.modules";
/// The recipe files the lean kernel is built from: a change to one of them
/// is a new lean kernel, which must be asked for again.
const LEAN_INPUTS: [&str; 2] = ["build-kernel.sh", "kernel/vmlab.config"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestKernel {
    Lean,
    Debian,
}

impl GuestKernel {
    pub fn name(self) -> &'static str {
        match self {
            GuestKernel::Lean => "lean",
            GuestKernel::Debian => "debian",
        }
    }

    /// The default guests' kernel now: `VMLAB_GUEST_KERNEL` when set, else
    /// the lean kernel when it was built here, else Debian's.
    pub fn chosen() -> Result<GuestKernel, ImageError> {
        Self::choose(
            std::env::var(GUEST_KERNEL_VAR).ok().as_deref(),
            lean_kernel_dir().is_some(),
        )
    }

    fn choose(setting: Option<&str>, lean_built: bool) -> Result<GuestKernel, ImageError> {
        match setting.map(str::trim).filter(|s| !s.is_empty()) {
            Some(text) => text.parse().map_err(|e: String| {
                ImageError::InvalidSetting(format!("{GUEST_KERNEL_VAR}={text}: {e}"))
            }),
            None if lean_built => Ok(GuestKernel::Lean),
            None => Ok(GuestKernel::Debian),
        }
    }
}

impl fmt::Display for GuestKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GuestKernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lean" => Ok(GuestKernel::Lean),
            "debian" => Ok(GuestKernel::Debian),
            other => Err(format!("kernel '{other}' is not 'lean' or 'debian'")),
        }
    }
}

/// FNV-1a over the lean kernel's recipe files (path, mode, content), like
/// build.rs.
fn lean_recipe_hash() -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (rel, bytes, mode) in RECIPE_FILES {
        if LEAN_INPUTS.contains(rel) {
            feed(rel.as_bytes());
            feed(&mode.to_le_bytes());
            feed(bytes);
        }
    }
    format!("{hash:016x}")
}

/// The note that this recipe's lean kernel was built, and where: written
/// when vmlab builds it, so the choice never needs to look at (or fetch)
/// the kernel source.
fn lean_marker() -> PathBuf {
    crate::dirs::cache_dir()
        .join("default-guest")
        .join(format!("lean-kernel-{}.path", lean_recipe_hash()))
}

/// The built lean kernel's directory (vmlinux, bzImage, .config), if this
/// recipe's was built here.
pub fn lean_kernel_dir() -> Option<PathBuf> {
    read_marker(&lean_marker())
}

fn read_marker(marker: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(marker).ok()?;
    let dir = PathBuf::from(text.trim_end_matches('\n'));
    (dir.join("vmlinux").is_file() && dir.join("bzImage").is_file()).then_some(dir)
}

/// Builds the lean kernel unless it is cached (minutes on 2 cores, with
/// progress on stderr); from then on the default guests boot it.
pub fn build_lean_kernel() -> Result<PathBuf, ImageError> {
    if let Some(dir) = lean_kernel_dir() {
        return Ok(dir);
    }
    let recipe = Recipe::materialize()?;
    let dir = PathBuf::from(run_step(
        "vmlab's lean kernel",
        &recipe.path("build-kernel.sh"),
        &[],
    )?);
    let marker = lean_marker();
    let io = |what: String| move |source| ImageError::Io { what, source };
    // A read-only cache (the rig's L1) cannot remember it: the next run
    // asks build-kernel.sh again, a quick cache hit.
    let written = std::fs::create_dir_all(marker.parent().unwrap())
        .map_err(io(format!("cannot create {}", marker.display())))
        .and_then(|()| {
            crate::fsutil::write_atomically(&marker, format!("{}\n", dir.display()).as_bytes())
                .map_err(io(format!("cannot write {}", marker.display())))
        });
    if let Err(e) = written {
        log::debug!("cannot remember the lean kernel: {e}");
    }
    Ok(dir)
}

/// A Debian packaged kernel fetched by guest/debian-kernel.sh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebianKernel {
    pub dir: PathBuf,
}

impl DebianKernel {
    /// The bzImage.
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The ELF inside the bzImage.
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
}

/// Fetches Debian's current packaged kernel unless that version is cached
/// (seconds: one download, no compile). A host without apt or without
/// Debian's archive gets one line saying what to do.
pub fn fetch_debian_kernel() -> Result<DebianKernel, ImageError> {
    let recipe = Recipe::materialize()?;
    let dir = run_step_as(
        "fetching",
        "Debian's packaged kernel",
        &recipe.path("debian-kernel.sh"),
        &[DEBIAN_FLAVOR],
    )?;
    Ok(DebianKernel {
        dir: PathBuf::from(dir),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lean_kernel_is_chosen_once_built_unless_overridden() {
        assert_eq!(
            GuestKernel::choose(None, false).unwrap(),
            GuestKernel::Debian
        );
        assert_eq!(GuestKernel::choose(None, true).unwrap(), GuestKernel::Lean);
        assert_eq!(
            GuestKernel::choose(Some(""), true).unwrap(),
            GuestKernel::Lean
        );
        assert_eq!(
            GuestKernel::choose(Some("debian"), true).unwrap(),
            GuestKernel::Debian
        );
        assert_eq!(
            GuestKernel::choose(Some("lean"), false).unwrap(),
            GuestKernel::Lean
        );
        let err = GuestKernel::choose(Some("fat"), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("VMLAB_GUEST_KERNEL=fat"), "{err}");
        assert!(err.contains("'lean' or 'debian'"), "{err}");
    }

    #[test]
    fn the_lean_marker_follows_the_kernel_recipe_only() {
        for input in LEAN_INPUTS {
            assert!(
                RECIPE_FILES.iter().any(|(rel, _, _)| *rel == input),
                "{input} is embedded"
            );
        }
        let name = lean_marker()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(name, format!("lean-kernel-{}.path", lean_recipe_hash()));
        assert_ne!(lean_recipe_hash(), super::super::RECIPE_HASH);
        assert!(RECIPE_FILES
            .iter()
            .any(|(rel, _, _)| *rel == DEBIAN_MODULES));
        assert!(RECIPE_FILES
            .iter()
            .any(|(rel, _, mode)| *rel == "debian-kernel.sh" && mode & 0o100 != 0));
    }

    #[test]
    fn a_marker_counts_only_while_its_kernel_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("m.path");
        assert_eq!(read_marker(&marker), None, "no marker");
        let kernel = dir.path().join("k");
        std::fs::create_dir(&kernel).unwrap();
        std::fs::write(&marker, format!("{}\n", kernel.display())).unwrap();
        assert_eq!(read_marker(&marker), None, "no vmlinux yet");
        std::fs::write(kernel.join("vmlinux"), b"x").unwrap();
        std::fs::write(kernel.join("bzImage"), b"x").unwrap();
        assert_eq!(read_marker(&marker), Some(kernel.clone()));
        std::fs::remove_file(kernel.join("bzImage")).unwrap();
        assert_eq!(read_marker(&marker), None, "half a kernel");
    }
}
