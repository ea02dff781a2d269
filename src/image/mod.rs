//! The default guests, built from the recipes in guest/ on first use and
//! cached under the XDG cache directory: the kernel and initramfs of the
//! default guest (this file) on Debian's packaged kernel or vmlab's lean
//! one (guest_kernel.rs), the Debian base images booted from a disk
//! (debian.rs) in their two flavors (flavor.rs), the full flavor's kernel
//! read from the VM's own disk (disk_boot.rs), the identity each VM gets at
//! boot (identity.rs) and the user's SSH key (ssh_key.rs).

mod debian;
mod disk_boot;
mod flavor;
mod guest_kernel;
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
pub use guest_kernel::{
    build_lean_kernel, fetch_debian_kernel, lean_kernel_dir, DebianKernel, GuestKernel,
    DEBIAN_MODULES, GUEST_KERNEL_VAR,
};
pub use identity::{check_hostname, cmdline_param, GuestIdentity};
pub use recipe::{Recipe, RECIPE_HASH};
pub use ssh_key::{ssh_dir, user_key, UserKey};
pub use step::{run_step, run_step_as};

/// Why the default guest could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{step} failed ({status}); last output:\n{tail}")]
    StepFailed {
        step: String,
        status: String,
        tail: String,
    },
    #[error("{step} printed no result path")]
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
    #[error("{0}")]
    InvalidSetting(String),
    /// A recipe refused in one line what it cannot do here (exit status 69):
    /// no apt, Debian's archive unreachable.
    #[error("{step}: {reason}")]
    Unavailable { step: String, reason: String },
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
    /// Which kernel it is: Debian's needs `initrd` even to boot from a disk
    /// (its disk and filesystem drivers are modules in it).
    pub kind: GuestKernel,
}

/// Where the paths of the built default guest are remembered, per recipe
/// and kernel.
fn index_file(kind: GuestKernel) -> PathBuf {
    crate::dirs::cache_dir()
        .join("default-guest")
        .join(format!("{RECIPE_HASH}-{kind}.paths"))
}

fn read_index(kind: GuestKernel) -> Option<DefaultGuest> {
    let text = std::fs::read_to_string(index_file(kind)).ok()?;
    let mut lines = text.lines();
    let guest = DefaultGuest {
        kernel: PathBuf::from(lines.next()?),
        initrd: PathBuf::from(lines.next()?),
        kind,
    };
    (guest.kernel.is_file() && guest.initrd.is_file()).then_some(guest)
}

fn write_index(guest: &DefaultGuest) -> Result<(), ImageError> {
    let path = index_file(guest.kind);
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| ImageError::Io { what, source }
    };
    std::fs::create_dir_all(path.parent().unwrap()).map_err(io("cannot create"))?;
    let text = format!("{}\n{}\n", guest.kernel.display(), guest.initrd.display());
    crate::fsutil::write_atomically(&path, text.as_bytes()).map_err(io("cannot write"))
}

/// The default guest on the kernel [`GuestKernel::chosen`] picks: Debian's
/// packaged kernel (fetched on first use, seconds) unless vmlab's lean
/// kernel was built.
pub fn default_guest() -> Result<DefaultGuest, ImageError> {
    default_guest_on(GuestKernel::chosen()?)
}

/// The default guest on `kind`, fetching or building what is missing (with
/// progress on stderr; the lean kernel compiles for minutes). Debian's
/// kernel is looked up again (a newer package version) only when the guest
/// recipe changes or `vmlab image kernel debian` asks.
pub fn default_guest_on(kind: GuestKernel) -> Result<DefaultGuest, ImageError> {
    if let Some(guest) = read_index(kind) {
        return Ok(guest);
    }
    refresh_default_guest(kind)
}

/// [`default_guest_on`] without the remembered paths: runs the recipes
/// (cache hits when nothing changed) and remembers what they give.
pub fn refresh_default_guest(kind: GuestKernel) -> Result<DefaultGuest, ImageError> {
    let recipe = Recipe::materialize()?;
    let initramfs = recipe.path("build-initramfs.sh");
    let guest = match kind {
        GuestKernel::Lean => {
            let kernel = build_lean_kernel()?.join("vmlinux");
            let initrd = run_step("the default guest initramfs", &initramfs, &[])?;
            DefaultGuest {
                kernel,
                initrd: PathBuf::from(initrd),
                kind,
            }
        }
        GuestKernel::Debian => {
            let kernel = fetch_debian_kernel()?;
            let kdir = kernel.dir.to_string_lossy().into_owned();
            let modules = recipe.path(DEBIAN_MODULES).to_string_lossy().into_owned();
            let initrd = run_step(
                "the default guest initramfs",
                &initramfs,
                &["-k", &kdir, "-m", &modules],
            )?;
            DefaultGuest {
                kernel: kernel.vmlinuz(),
                initrd: PathBuf::from(initrd),
                kind,
            }
        }
    };
    // A read-only cache only costs the quick recipe checks next time.
    if let Err(e) = write_index(&guest) {
        log::debug!("cannot remember the default guest's paths: {e}");
    }
    Ok(guest)
}
