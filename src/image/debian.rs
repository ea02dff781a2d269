//! The default Debian guest: a bookworm root filesystem built from the
//! recipe in guest/debian/ (debootstrap, then `mkfs.ext4 -d`), converted to
//! a qcow2 base image by vmlab's own disk layer and cached under
//! `$XDG_CACHE_HOME/vmlab/images/debian-<recipe hash>/`. VM disks are
//! linked clones of that base.
//!
//! A build happens in a scratch directory beside the cache entry and is
//! renamed into place only when complete, under a lock file, so a killed or
//! concurrent build never leaves a half-built image where a run would use it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::identity::GuestIdentity;
use super::lock::BuildLock;
use super::recipe::{Recipe, RECIPE_FILES};
use super::step::run_step;
use super::ImageError;
use crate::disk::{self, CloneMode, CloneOptions, ImageFormat};

/// The Debian release of the image (the recipe script says the same).
pub const DEBIAN_SUITE: &str = "bookworm";
/// The recipe's directory inside guest/.
const RECIPE_DIR: &str = "debian/";
/// The base image's file name inside its cache entry.
const BASE_NAME: &str = "base.qcow2";
/// What a complete cache entry describes itself with.
const INDEX_NAME: &str = "image.json";
/// Where the guest's init lives, as the kernel command line names it.
pub const GUEST_INIT: &str = "/sbin/vmlab-init";

/// A built base image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebianImage {
    /// The qcow2 base: open it read-only, or make linked clones of it.
    pub base: PathBuf,
    pub index: ImageIndex,
}

/// The description stored beside the base (`image.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIndex {
    pub recipe: String,
    pub suite: String,
    pub base: String,
    pub virtual_size: u64,
    /// Bytes of the base file on disk.
    pub file_size: u64,
    /// Wall time of the build, in milliseconds.
    pub build_ms: u64,
    /// When it was built, seconds since the epoch.
    pub built_at: u64,
}

/// What `vmlab image build` did.
#[derive(Clone, Debug)]
pub struct BuildOutcome {
    pub image: DebianImage,
    /// False when the cached image was already there.
    pub built: bool,
    pub elapsed: Duration,
}

/// Everything `vmlab run` needs to boot the Debian guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebianGuest {
    pub kernel: PathBuf,
    /// Debian's packaged kernel needs its initramfs (virtio and ext4 are
    /// modules there; its /init mounts the disk and starts the image's
    /// init); the lean kernel boots the disk directly.
    pub initrd: Option<PathBuf>,
    /// The base image, to be attached as the VM's first virtio-blk disk
    /// (through a linked clone: the base is never written).
    pub base: PathBuf,
    /// Kernel command line parameters to append (root, init, identity).
    pub cmdline: Vec<String>,
}

/// The hash of the Debian recipe alone (guest/debian/): other recipes (the
/// kernel, the initramfs) changing does not rebuild the image. FNV-1a over
/// each file's path, mode and content, like build.rs.
pub fn recipe_hash() -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (rel, bytes, mode) in RECIPE_FILES {
        if rel.starts_with(RECIPE_DIR) {
            feed(rel.as_bytes());
            feed(&mode.to_le_bytes());
            feed(bytes);
        }
    }
    format!("{hash:016x}")
}

/// The cache entry of this recipe's image.
pub fn image_dir() -> PathBuf {
    crate::dirs::images_dir().join(format!("debian-{}", recipe_hash()))
}

/// The cached image of this recipe, if it was built.
pub fn cached_image() -> Option<DebianImage> {
    read_entry(&image_dir())
}

fn read_entry(dir: &Path) -> Option<DebianImage> {
    let text = std::fs::read_to_string(dir.join(INDEX_NAME)).ok()?;
    let index: ImageIndex = serde_json::from_str(&text).ok()?;
    let base = dir.join(&index.base);
    base.is_file().then_some(DebianImage { base, index })
}

/// The base image, building it first if this recipe was never built here.
pub fn image() -> Result<DebianImage, ImageError> {
    match cached_image() {
        Some(image) => Ok(image),
        None => build_image(false).map(|outcome| outcome.image),
    }
}

/// The Debian guest for a VM with `identity`: the default guest kernel, the
/// base image and the command line that boots it (`root=/dev/vda`).
pub fn debian_guest(identity: &GuestIdentity) -> Result<DebianGuest, ImageError> {
    let image = image()?;
    let guest = super::default_guest()?;
    Ok(DebianGuest {
        kernel: guest.kernel,
        initrd: (guest.kind == super::GuestKernel::Debian).then_some(guest.initrd),
        base: image.base,
        cmdline: boot_params(identity),
    })
}

/// The command line parameters booting the image's init as `identity`.
pub fn boot_params(identity: &GuestIdentity) -> Vec<String> {
    let mut params: Vec<String> = [
        "root=/dev/vda",
        "rootfstype=ext4",
        "rw",
        &format!("init={GUEST_INIT}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    params.extend(identity.cmdline_params());
    params
}

/// Builds the base image unless this recipe's is cached (or `force`).
/// Needs root (debootstrap); takes a minute or two, with progress on stderr.
pub fn build_image(force: bool) -> Result<BuildOutcome, ImageError> {
    let started = Instant::now();
    let dir = image_dir();
    let cache_hit = || {
        read_entry(&dir).map(|image| BuildOutcome {
            image,
            built: false,
            elapsed: started.elapsed(),
        })
    };
    if let Some(outcome) = cache_hit().filter(|_| !force) {
        return Ok(outcome);
    }
    if !is_root() {
        return Err(ImageError::NeedsRoot);
    }
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let parent = crate::dirs::images_dir();
    let _lock = BuildLock::acquire(&parent.join(format!(".{name}.lock")), "the Debian image")?;
    // Built by the vmlab we waited for?
    if let Some(outcome) = cache_hit().filter(|_| !force) {
        return Ok(outcome);
    }
    if force {
        // VMs running on the old base hold a lock on it: never pull it
        // from under them.
        disk::check_replaceable(&dir.join(BASE_NAME))?;
    }
    remove_stale_scratch(&parent, &name);

    let scratch = parent.join(format!(".{name}.build-{}", std::process::id()));
    let guard = ScratchDir(scratch.clone());
    let io = |what: String| move |source| ImageError::Io { what, source };
    std::fs::create_dir_all(&scratch)
        .map_err(io(format!("cannot create {}", scratch.display())))?;

    let recipe = Recipe::materialize()?;
    let ext4 = scratch.join("rootfs.ext4");
    run_step(
        "the Debian base image",
        &recipe.path("debian/build-rootfs.sh"),
        &[ext4.to_str().ok_or_else(|| ImageError::Io {
            what: format!("{}: not UTF-8", ext4.display()),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?],
    )?;

    let base = scratch.join(BASE_NAME);
    let spinner = super::step::spinner("converting the root filesystem to qcow2");
    let converted = disk::clone_image(
        &ext4,
        &base,
        &CloneOptions {
            mode: CloneMode::Full,
            format: Some(ImageFormat::Qcow2),
            ..CloneOptions::default()
        },
    );
    super::step::finish(spinner);
    let outcome = converted?;
    // New images are owner-only; the base holds no secret (a VM's identity
    // is made at its first boot, in its own overlay) and stays readable.
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o644))
        .map_err(io(format!("cannot set the mode of {}", base.display())))?;
    std::fs::remove_file(&ext4).map_err(io(format!("cannot remove {}", ext4.display())))?;

    let file_size = std::fs::metadata(&base)
        .map_err(io(format!("cannot stat {}", base.display())))?
        .blocks()
        * 512;
    let index = ImageIndex {
        recipe: recipe_hash(),
        suite: DEBIAN_SUITE.to_string(),
        base: BASE_NAME.to_string(),
        virtual_size: outcome.virtual_size,
        file_size,
        build_ms: started.elapsed().as_millis() as u64,
        built_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let json = serde_json::to_string_pretty(&index).expect("plain struct serialises");
    crate::fsutil::write_atomically(&scratch.join(INDEX_NAME), json.as_bytes()).map_err(io(
        format!("cannot write the index in {}", scratch.display()),
    ))?;

    // Into place: the entry is complete or absent, never half there.
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(&dir, &old).map_err(io(format!("cannot replace {}", dir.display())))?;
        std::fs::rename(&scratch, &dir).map_err(io(format!("cannot install {}", dir.display())))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&scratch, &dir).map_err(io(format!("cannot install {}", dir.display())))?;
    }
    std::mem::forget(guard);
    log::info!("Debian base image ready: {}", dir.join(BASE_NAME).display());
    Ok(BuildOutcome {
        image: DebianImage {
            base: dir.join(BASE_NAME),
            index,
        },
        built: true,
        elapsed: started.elapsed(),
    })
}

fn is_root() -> bool {
    // /proc/self belongs to the effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Removes what killed builds of `name` left (under the lock, no build of
/// it is running). A killed debootstrap may have left proc or sys mounted
/// inside its tree: detach those first, so nothing outside is touched.
fn remove_stale_scratch(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefixes = [format!(".{name}.build-"), format!(".{name}.old-")];
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if prefixes.iter().any(|p| file_name.starts_with(p.as_str())) {
            let path = entry.path();
            log::info!("removing {} left by an interrupted build", path.display());
            unmount_below(&path);
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut below: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    // Deepest first.
    below.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mount in below {
        let _ = std::process::Command::new("umount")
            .args(["-l", mount])
            .status();
    }
}

/// Removes a failed build's scratch directory (a successful build renames
/// it away and forgets the guard).
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        unmount_below(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_hash_covers_the_debian_recipe_only() {
        let hash = recipe_hash();
        assert_eq!(hash.len(), 16);
        assert_ne!(hash, super::super::RECIPE_HASH, "not the whole guest/ hash");
        for needed in [
            "debian/build-rootfs.sh",
            "debian/rootfs/sbin/vmlab-init",
            "debian/rootfs/etc/ssh/sshd_config.d/vmlab.conf",
        ] {
            let (_, bytes, mode) = RECIPE_FILES
                .iter()
                .find(|(rel, _, _)| *rel == needed)
                .unwrap_or_else(|| panic!("{needed} is embedded"));
            assert!(!bytes.is_empty());
            if needed.ends_with(".sh") || needed.ends_with("init") {
                assert_eq!(mode & 0o111, 0o111, "{needed} is executable");
            }
        }
    }

    #[test]
    fn boot_params_name_root_init_and_identity() {
        let id = GuestIdentity::new("vm7", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me").unwrap();
        let params = boot_params(&id);
        for want in [
            "root=/dev/vda",
            "rw",
            "init=/sbin/vmlab-init",
            "vmlab.hostname=vm7",
        ] {
            assert!(params.iter().any(|p| p == want), "{want} in {params:?}");
        }
        assert!(params.iter().any(|p| p.starts_with("vmlab.ssh_key=")));
        let cmdline = params.join(" ");
        assert!(cmdline.len() < 512, "well under the kernel's limit");
    }

    #[test]
    fn an_entry_without_its_index_or_base_is_not_an_image() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_entry(dir.path()).is_none());
        let index = ImageIndex {
            recipe: recipe_hash(),
            suite: DEBIAN_SUITE.into(),
            base: BASE_NAME.into(),
            virtual_size: 1 << 30,
            file_size: 0,
            build_ms: 1,
            built_at: 0,
        };
        std::fs::write(
            dir.path().join(INDEX_NAME),
            serde_json::to_string(&index).unwrap(),
        )
        .unwrap();
        assert!(read_entry(dir.path()).is_none(), "no base file");
        std::fs::write(dir.path().join(BASE_NAME), b"x").unwrap();
        let image = read_entry(dir.path()).unwrap();
        assert_eq!(image.base, dir.path().join(BASE_NAME));
        assert_eq!(image.index, index);
        std::fs::write(dir.path().join(INDEX_NAME), b"{not json").unwrap();
        assert!(read_entry(dir.path()).is_none(), "a torn index");
    }

    #[test]
    fn stale_scratch_of_this_image_is_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".debian-x.build-123");
        std::fs::create_dir_all(stale.join("root/etc")).unwrap();
        let other = dir.path().join(".debian-y.build-123");
        std::fs::create_dir_all(&other).unwrap();
        let entry = dir.path().join("debian-x");
        std::fs::create_dir_all(&entry).unwrap();
        remove_stale_scratch(dir.path(), "debian-x");
        assert!(!stale.exists());
        assert!(other.exists());
        assert!(entry.exists());
    }
}
