//! The default guests, built from the recipes in guest/ on first use and
//! cached under the XDG cache directory: vmlab's own kernel and initramfs
//! (this file), the Debian base images booted from a disk (debian.rs) in
//! their two flavors (flavor.rs), the full flavor's kernel read from the
//! VM's own disk (disk_boot.rs), the identity each VM gets at boot
//! (identity.rs) and the user's SSH key (ssh_key.rs).

mod debian;
mod disk_boot;
mod flavor;
mod identity;
mod lock;
mod recipe;
mod ssh_key;
mod step;

use std::path::PathBuf;

pub use debian::{
    boot_params, boot_params_for, build, build_image, cached_image, cached_image_for, debian_guest,
    image as debian_image, image_dir, image_dir_for, image_for, recipe_hash, BuildOutcome,
    DebianGuest, DebianImage, ImageIndex, DEBIAN_SUITE, GUEST_INIT,
};
pub use disk_boot::{read_disk_boot, DiskBoot, DiskBootError, INITRD_LINK, KERNEL_LINK};
pub use flavor::{parse_package_list, Flavor, ImageSpec};
pub use identity::{check_hostname, cmdline_param, GuestIdentity};
pub use recipe::{Recipe, RECIPE_HASH};
pub use ssh_key::{ssh_dir, user_key, UserKey};
pub use step::run_step;

/// Why the default guest could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("building {step} failed ({status}); last output:\n{tail}")]
    StepFailed {
        step: String,
        status: String,
        tail: String,
    },
    #[error("building {step} printed no result path")]
    NoResult { step: String },
    #[error("building the Debian base image needs root (debootstrap): run `vmlab image build` as root once")]
    NeedsRoot,
    #[error("{tool} not found: install {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{0}")]
    InvalidIdentity(String),
    #[error("{0}")]
    InvalidPackages(String),
    // Not a #[source]: the message already includes it, and error chains
    // printed with their sources would say it twice.
    #[error("the Debian base image: {0}")]
    Disk(crate::disk::DiskError),
}

impl From<crate::disk::DiskError> for ImageError {
    fn from(e: crate::disk::DiskError) -> Self {
        ImageError::Disk(e)
    }
}

/// Paths of the default guest's kernel and initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefaultGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Where the paths of the built default guest are remembered, per recipe.
fn index_file() -> PathBuf {
    crate::dirs::cache_dir()
        .join("default-guest")
        .join(format!("{RECIPE_HASH}.paths"))
}

fn read_index() -> Option<DefaultGuest> {
    let text = std::fs::read_to_string(index_file()).ok()?;
    let mut lines = text.lines();
    let guest = DefaultGuest {
        kernel: PathBuf::from(lines.next()?),
        initrd: PathBuf::from(lines.next()?),
    };
    (guest.kernel.is_file() && guest.initrd.is_file()).then_some(guest)
}

fn write_index(guest: &DefaultGuest) -> Result<(), ImageError> {
    let path = index_file();
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| ImageError::Io { what, source }
    };
    std::fs::create_dir_all(path.parent().unwrap()).map_err(io("cannot create"))?;
    let tmp = path.with_extension("paths.tmp");
    let text = format!("{}\n{}\n", guest.kernel.display(), guest.initrd.display());
    std::fs::write(&tmp, text).map_err(io("cannot write"))?;
    std::fs::rename(&tmp, &path).map_err(io("cannot write"))
}

/// The default guest, building it first if this recipe has not been built
/// on this machine (minutes, with progress on stderr).
pub fn default_guest() -> Result<DefaultGuest, ImageError> {
    if let Some(guest) = read_index() {
        return Ok(guest);
    }
    let recipe = Recipe::materialize()?;
    let kernel_dir = run_step(
        "the default guest kernel",
        &recipe.path("build-kernel.sh"),
        &[],
    )?;
    let initrd = run_step(
        "the default guest initramfs",
        &recipe.path("build-initramfs.sh"),
        &[],
    )?;
    let guest = DefaultGuest {
        kernel: PathBuf::from(kernel_dir).join("vmlinux"),
        initrd: PathBuf::from(initrd),
    };
    // A read-only cache only costs the quick recipe check next time.
    if let Err(e) = write_index(&guest) {
        log::debug!("cannot remember the default guest's paths: {e}");
    }
    Ok(guest)
}
