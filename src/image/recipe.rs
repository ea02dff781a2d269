//! The guest recipes embedded in the binary (see build.rs), written out to
//! the cache so their scripts can run.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::ImageError;

include!(concat!(env!("OUT_DIR"), "/guest_recipe.rs"));

/// A materialised copy of guest/ on disk.
pub struct Recipe {
    dir: PathBuf,
}

impl Recipe {
    /// Writes the recipe to `cache/recipes/<hash>` unless already there.
    /// It is written to a scratch directory and renamed into place, so a
    /// killed vmlab never leaves a partial recipe behind.
    pub fn materialize() -> Result<Recipe, ImageError> {
        let parent = crate::dirs::cache_dir().join("recipes");
        let dir = parent.join(RECIPE_HASH);
        if dir.is_dir() {
            return Ok(Recipe { dir });
        }
        let io = |what: String| move |source| ImageError::Io { what, source };
        std::fs::create_dir_all(&parent)
            .map_err(io(format!("cannot create {}", parent.display())))?;
        let scratch = parent.join(format!(".{RECIPE_HASH}.{}", std::process::id()));
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
