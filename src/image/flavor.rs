//! The two Debian guests vmlab builds, and what tells their images apart.
//!
//! - **lean** (guest/debian/): vmlab's small kernel (built in, no modules)
//!   and a shell-script init; the fastest boot, the benchmark's guest.
//! - **full** (guest/debian-full/): an ordinary Debian system: systemd,
//!   Debian's cloud kernel with its modules and an initrd made in the image,
//!   booted from the VM's own /boot; extra packages baked in at build time.
//!
//! Each flavor and package set is its own cached image, keyed by a hash of
//! the recipe files it is built from and of the package list.

use std::fmt;
use std::str::FromStr;

use super::ImageError;

/// Most packages one image may name (the list rides on a command line).
const MAX_PACKAGES: usize = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Flavor {
    #[default]
    Lean,
    Full,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Lean => "lean",
            Flavor::Full => "full",
        }
    }

    /// The recipe files (paths inside guest/, or prefixes ending in '/')
    /// the image is built from: a change to one of them makes a new image.
    fn recipe_inputs(self) -> &'static [&'static str] {
        match self {
            Flavor::Lean => &["debian/"],
            // The full recipe reads the lean one's shared steps, its sshd
            // and dpkg settings and its resume hook, but not its init.
            Flavor::Full => &[
                "debian-full/",
                "debian/lib.sh",
                "debian/rootfs/sbin/vmlab-identity",
                "debian/rootfs/etc/ssh/sshd_config.d/vmlab.conf",
                "debian/rootfs/etc/dpkg/dpkg.cfg.d/vmlab-nodoc",
            ],
        }
    }

    /// The build script, inside guest/.
    pub fn script(self) -> &'static str {
        match self {
            Flavor::Lean => "debian/build-rootfs.sh",
            Flavor::Full => "debian-full/build-rootfs.sh",
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Flavor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lean" => Ok(Flavor::Lean),
            "full" => Ok(Flavor::Full),
            other => Err(format!("flavor '{other}' is not 'lean' or 'full'")),
        }
    }
}

/// One cached image: a flavor and the extra packages baked into it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ImageSpec {
    flavor: Flavor,
    /// Sorted, without repeats: the same set is the same image.
    packages: Vec<String>,
}

impl ImageSpec {
    /// The lean image (no extra packages: its recipe takes none).
    pub fn lean() -> Self {
        ImageSpec::default()
    }

    /// `flavor` with `packages` (Debian package names); only the full
    /// flavor takes packages.
    pub fn new(flavor: Flavor, packages: &[String]) -> Result<Self, ImageError> {
        let bad = |message: String| Err(ImageError::InvalidPackages(message));
        if flavor == Flavor::Lean && !packages.is_empty() {
            return bad(
                "--packages needs --flavor full (the lean image takes no extra packages)".into(),
            );
        }
        if packages.len() > MAX_PACKAGES {
            return bad(format!(
                "{} packages given, at most {MAX_PACKAGES}",
                packages.len()
            ));
        }
        for name in packages {
            if !is_package_name(name) {
                return bad(format!(
                    "'{name}' is not a Debian package name (lowercase letters, digits, '+', '-', '.'; two or more)"
                ));
            }
        }
        let mut packages = packages.to_vec();
        packages.sort();
        packages.dedup();
        Ok(ImageSpec { flavor, packages })
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    pub fn packages(&self) -> &[String] {
        &self.packages
    }

    /// The cache entry's name: `debian-HASH` (lean, as before flavors
    /// existed) or `debian-full-HASH`.
    pub fn entry_name(&self) -> String {
        match self.flavor {
            Flavor::Lean => format!("debian-{}", self.hash()),
            Flavor::Full => format!("debian-full-{}", self.hash()),
        }
    }

    /// FNV-1a over each input recipe file's path, mode and content (like
    /// build.rs), then the package list.
    pub fn hash(&self) -> String {
        let mut extra = Vec::new();
        if !self.packages.is_empty() {
            extra.extend_from_slice(b"\0packages:");
            extra.extend_from_slice(self.packages.join(",").as_bytes());
        }
        super::recipe::hash_of_files_then(|rel| self.reads(rel), &extra)
    }

    /// Whether the recipe file `rel` (inside guest/) goes into this image.
    fn reads(&self, rel: &str) -> bool {
        self.flavor.recipe_inputs().iter().any(|input| {
            if input.ends_with('/') {
                rel.starts_with(input)
            } else {
                rel == *input
            }
        })
    }

    /// The build script's arguments after the output path.
    pub fn script_args(&self) -> Vec<String> {
        match self.flavor {
            Flavor::Lean => Vec::new(),
            Flavor::Full => vec![self.packages.join(",")],
        }
    }
}

/// A Debian package name (policy 5.6.1): lowercase letters, digits, '+',
/// '-' and '.', at least two, starting with a letter or digit.
fn is_package_name(name: &str) -> bool {
    name.len() >= 2
        && name.len() <= 100
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

/// Splits `docker.io,linux-image-amd64` (the CLI's and vm.conf's form).
pub fn parse_package_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::recipe::RECIPE_FILES;
    use super::*;

    fn full(packages: &[&str]) -> ImageSpec {
        let packages: Vec<String> = packages.iter().map(|p| p.to_string()).collect();
        ImageSpec::new(Flavor::Full, &packages).unwrap()
    }

    #[test]
    fn each_package_set_is_its_own_image_whatever_the_order() {
        let plain = full(&[]);
        let docker = full(&["docker.io"]);
        let both = full(&["linux-image-amd64", "docker.io"]);
        assert_ne!(plain.entry_name(), docker.entry_name());
        assert_ne!(docker.entry_name(), both.entry_name());
        assert_eq!(
            both.entry_name(),
            full(&["docker.io", "linux-image-amd64", "docker.io"]).entry_name()
        );
        assert_eq!(both.packages(), ["docker.io", "linux-image-amd64"]);
        assert_eq!(both.script_args(), ["docker.io,linux-image-amd64"]);
        assert!(plain.entry_name().starts_with("debian-full-"));
        assert_eq!(plain.script_args(), [""]);
    }

    #[test]
    fn the_lean_image_keeps_its_name_and_takes_no_packages() {
        let lean = ImageSpec::lean();
        assert_eq!(lean.entry_name(), format!("debian-{}", lean.hash()));
        assert!(lean.script_args().is_empty());
        let err = ImageSpec::new(Flavor::Lean, &["docker.io".into()]).unwrap_err();
        assert!(err.to_string().contains("--flavor full"), "{err}");
    }

    #[test]
    fn flavors_read_their_own_recipe_files() {
        let lean = ImageSpec::lean();
        let full = full(&[]);
        assert!(lean.reads("debian/rootfs/sbin/vmlab-init"));
        assert!(!lean.reads("debian-full/build-rootfs.sh"));
        assert!(full.reads("debian-full/build-rootfs.sh"));
        assert!(full.reads("debian-full/rootfs/usr/lib/vmlab/identity"));
        assert!(full.reads("debian/lib.sh"));
        // The resume hook both flavors run.
        assert!(full.reads("debian/rootfs/sbin/vmlab-identity"));
        // The lean init changing does not rebuild the full image.
        assert!(!full.reads("debian/rootfs/sbin/vmlab-init"));
        assert!(!full.reads("kernel/vmlab.config"));
        for flavor in [Flavor::Lean, Flavor::Full] {
            for input in flavor.recipe_inputs() {
                assert!(
                    RECIPE_FILES
                        .iter()
                        .any(|(rel, _, _)| rel.starts_with(input)),
                    "{input} is embedded"
                );
            }
            let script = RECIPE_FILES
                .iter()
                .find(|(rel, _, _)| *rel == flavor.script())
                .expect("the script is embedded");
            assert_eq!(script.2 & 0o111, 0o111, "{} is executable", flavor.script());
        }
    }

    #[test]
    fn package_names_are_checked() {
        for bad in [
            "",
            "a",
            "Docker",
            "docker io",
            "-x",
            "x;reboot",
            "a/b",
            "pkg=1.0",
        ] {
            let err = ImageSpec::new(Flavor::Full, &[bad.to_string()]).unwrap_err();
            assert!(
                err.to_string().contains("not a Debian package name"),
                "{bad}: {err}"
            );
        }
        full(&["docker.io", "g++", "linux-image-6.1.0-50-amd64", "0ad"]);
        let many: Vec<String> = (0..65).map(|i| format!("p{i}")).collect();
        assert!(ImageSpec::new(Flavor::Full, &many).is_err());
    }

    #[test]
    fn flavors_and_lists_parse() {
        assert_eq!("full".parse::<Flavor>(), Ok(Flavor::Full));
        assert_eq!("lean".parse::<Flavor>(), Ok(Flavor::Lean));
        assert!("fat"
            .parse::<Flavor>()
            .unwrap_err()
            .contains("'lean' or 'full'"));
        assert_eq!(
            parse_package_list(" docker.io, ,nano "),
            ["docker.io", "nano"]
        );
        assert!(parse_package_list("").is_empty());
    }
}
