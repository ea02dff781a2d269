//! The Debian guests: a bookworm root filesystem built from a recipe in
//! guest/ (guest/debian/ for the lean flavor, guest/debian-full/ for the full
//! one; debootstrap, then `mkfs.ext4 -d`), converted to a qcow2 base image
//! by vmlab's own disk layer and cached under
//! `$XDG_CACHE_HOME/vmlab/images/<entry>/` (see `ImageSpec::entry_name`).
//! VM disks are linked clones of that base.
//!
//! A build happens in a scratch directory beside the cache entry and is
//! renamed into place only when complete, under a lock file, so a killed or
//! concurrent build never leaves a half-built image where a run would use it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::flavor::ImageSpec;
use super::identity::GuestIdentity;
use super::lock::BuildLock;
use super::recipe::Recipe;
use super::step::run_step;
use super::ImageError;
use crate::disk::{self, CloneMode, CloneOptions, ImageFormat};

/// The Debian release of the image (the recipe script says the same).
pub const DEBIAN_SUITE: &str = "bookworm";
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
    /// `lean` or `full` (an index from before flavors is a lean image's).
    #[serde(default = "lean_name")]
    pub flavor: String,
    /// Extra packages baked in (full flavor).
    #[serde(default)]
    pub packages: Vec<String>,
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

fn lean_name() -> String {
    "lean".into()
}

/// The hash of the lean Debian recipe alone (guest/debian/): other recipes
/// (the kernel, the initramfs) changing does not rebuild the image.
pub fn recipe_hash() -> String {
    ImageSpec::lean().hash()
}

/// The cache entry of the lean image.
pub fn image_dir() -> PathBuf {
    image_dir_for(&ImageSpec::lean())
}

/// The cache entry of `spec`'s image.
pub fn image_dir_for(spec: &ImageSpec) -> PathBuf {
    crate::dirs::images_dir().join(spec.entry_name())
}

/// The cached lean image, if it was built.
pub fn cached_image() -> Option<DebianImage> {
    cached_image_for(&ImageSpec::lean())
}

/// The cached image of `spec`, if it was built.
pub fn cached_image_for(spec: &ImageSpec) -> Option<DebianImage> {
    read_entry(&image_dir_for(spec))
}

fn read_entry(dir: &Path) -> Option<DebianImage> {
    let text = std::fs::read_to_string(dir.join(INDEX_NAME)).ok()?;
    let index: ImageIndex = serde_json::from_str(&text).ok()?;
    let base = dir.join(&index.base);
    base.is_file().then_some(DebianImage { base, index })
}

/// The lean base image, building it first if this recipe was never built
/// here.
pub fn image() -> Result<DebianImage, ImageError> {
    image_for(&ImageSpec::lean())
}

/// `spec`'s base image, building it first if it was never built here.
pub fn image_for(spec: &ImageSpec) -> Result<DebianImage, ImageError> {
    match cached_image_for(spec) {
        Some(image) => Ok(image),
        None => build(spec, false).map(|outcome| outcome.image),
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

/// The command line parameters booting the lean image's init as
/// `identity`.
pub fn boot_params(identity: &GuestIdentity) -> Vec<String> {
    boot_params_for(super::Flavor::Lean, identity)
}

/// The command line parameters booting a `flavor` image as `identity`: the
/// lean image's own init, or the full image's systemd (its initrd mounts
/// the root read-write), quiet.
pub fn boot_params_for(flavor: super::Flavor, identity: &GuestIdentity) -> Vec<String> {
    let mut params: Vec<String> = ["root=/dev/vda", "rootfstype=ext4", "rw"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    match flavor {
        super::Flavor::Lean => params.push(format!("init={GUEST_INIT}")),
        // Every byte on the serial console is a VM exit: the kernel's and
        // systemd's boot messages cost seconds under emulation. Errors
        // still show; `--cmdline "loglevel=7 systemd.show_status=1"`
        // brings the rest back (later parameters win).
        // AppArmor is on in Debian's kernels but its userspace is not in
        // the image: Docker then refuses every container ("the
        // docker-default profile could not be loaded"). `apparmor=1` in
        // `--cmdline` turns it back on once `apparmor` is installed.
        super::Flavor::Full => params.extend(["quiet".to_string(), "apparmor=0".to_string()]),
    }
    params.extend(identity.cmdline_params());
    params
}

/// Builds the lean base image unless this recipe's is cached (or `force`).
pub fn build_image(force: bool) -> Result<BuildOutcome, ImageError> {
    build(&ImageSpec::lean(), force)
}

/// Builds `spec`'s base image unless it is cached (or `force`). Needs root
/// (debootstrap); takes a few minutes, with progress on stderr.
pub fn build(spec: &ImageSpec, force: bool) -> Result<BuildOutcome, ImageError> {
    let started = Instant::now();
    let dir = image_dir_for(spec);
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
    let mut args = vec![ext4
        .to_str()
        .ok_or_else(|| ImageError::Io {
            what: format!("{}: not UTF-8", ext4.display()),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?
        .to_string()];
    args.extend(spec.script_args());
    let what = match spec.flavor() {
        super::Flavor::Lean => "the Debian base image".to_string(),
        super::Flavor::Full => "the full Debian image".to_string(),
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_step(&what, &recipe.path(spec.flavor().script()), &args)?;

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
        recipe: spec.hash(),
        suite: DEBIAN_SUITE.to_string(),
        flavor: spec.flavor().name().to_string(),
        packages: spec.packages().to_vec(),
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
    use super::super::recipe::RECIPE_FILES;
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
    fn the_full_image_boots_systemd_with_the_same_identity() {
        let id = GuestIdentity::new("node1", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me")
            .unwrap()
            .with_instance("node1")
            .unwrap();
        let params = boot_params_for(super::super::Flavor::Full, &id);
        assert!(params.iter().all(|p| !p.starts_with("init=")), "{params:?}");
        for want in [
            "root=/dev/vda",
            "rw",
            "vmlab.hostname=node1",
            "vmlab.instance=node1",
            "apparmor=0",
        ] {
            assert!(params.iter().any(|p| p == want), "{want} in {params:?}");
        }
    }

    #[test]
    fn an_index_from_before_flavors_is_a_lean_image() {
        let old = r#"{"recipe":"x","suite":"bookworm","base":"base.qcow2","virtual_size":1,
            "file_size":1,"build_ms":1,"built_at":0}"#;
        let index: ImageIndex = serde_json::from_str(old).unwrap();
        assert_eq!(index.flavor, "lean");
        assert!(index.packages.is_empty());
    }

    #[test]
    fn an_entry_without_its_index_or_base_is_not_an_image() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_entry(dir.path()).is_none());
        let index = ImageIndex {
            recipe: recipe_hash(),
            suite: DEBIAN_SUITE.into(),
            flavor: "lean".into(),
            packages: Vec::new(),
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
