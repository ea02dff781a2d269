//! The guest recipes embedded in the binary (see build.rs), written out to
//! the cache so their scripts can run.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::ImageError;

include!(concat!(env!("OUT_DIR"), "/guest_recipe.rs"));

/// A materialised copy of guest/ on disk.
pub struct Recipe {
    dir: PathBuf,
}

impl Recipe {
    /// Writes the recipe to `cache/recipes/<hash>/guest` unless already
    /// there, or to a temporary directory when the cache is read-only (as
    /// inside the test rig, where the host's files are shared read-only).
    /// The directory keeps the name `guest` because the scripts name their
    /// outputs after it.
    pub fn materialize() -> Result<Recipe, ImageError> {
        let cached = crate::dirs::cache_dir().join("recipes").join(RECIPE_HASH);
        match Self::materialize_in(&cached) {
            Ok(recipe) => Ok(recipe),
            Err(e) => {
                let uid = std::fs::metadata("/proc/self")
                    .map(|m| m.uid())
                    .unwrap_or(0);
                let temp = std::env::temp_dir().join(format!("vmlab-recipe-{RECIPE_HASH}-{uid}"));
                log::debug!("cache not writable ({e}); using {}", temp.display());
                Self::materialize_in(&temp)
            }
        }
    }

    /// Writes the recipe to `parent/guest`, through a scratch directory
    /// renamed into place so a killed vmlab never leaves a partial recipe.
    fn materialize_in(parent: &Path) -> Result<Recipe, ImageError> {
        let dir = parent.join("guest");
        if dir.is_dir() {
            return Ok(Recipe { dir });
        }
        let io = |what: String| move |source| ImageError::Io { what, source };
        std::fs::create_dir_all(parent)
            .map_err(io(format!("cannot create {}", parent.display())))?;
        let scratch = parent.join(format!(".guest.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        for (rel, bytes, mode) in RECIPE_FILES {
            let path = scratch.join(rel);
            std::fs::create_dir_all(path.parent().unwrap())
                .map_err(io(format!("cannot create {}", path.display())))?;
            std::fs::write(&path, bytes).map_err(io(format!("cannot write {}", path.display())))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                .map_err(io(format!("cannot set mode on {}", path.display())))?;
        }
        match std::fs::rename(&scratch, &dir) {
            Ok(()) => {}
            // Another vmlab won the race: its copy is identical.
            Err(_) if dir.is_dir() => {
                let _ = std::fs::remove_dir_all(&scratch);
            }
            Err(e) => return Err(io(format!("cannot install {}", dir.display()))(e)),
        }
        Ok(Recipe { dir })
    }

    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.join(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeds_the_kernel_recipe_with_its_mode() {
        let script = RECIPE_FILES
            .iter()
            .find(|(rel, _, _)| *rel == "build-kernel.sh")
            .expect("guest/build-kernel.sh is embedded");
        assert_eq!(script.2 & 0o100, 0o100, "executable");
        assert!(script.1.starts_with(b"#!"));
        assert!(RECIPE_FILES
            .iter()
            .any(|(rel, _, _)| *rel == "kernel/vmlab.config"));
        assert_eq!(RECIPE_HASH.len(), 16);
    }
}
