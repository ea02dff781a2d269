//! The guest recipes embedded in the binary (see build.rs), written out to
//! the cache so their scripts can run.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use vmm_sys_util::tempdir::TempDir;

use super::ImageError;

include!(concat!(env!("OUT_DIR"), "/guest_recipe.rs"));

/// A materialised copy of guest/ on disk.
pub struct Recipe {
    dir: PathBuf,
    /// The private directory holding it when the cache was not writable,
    /// removed with the recipe.
    _private: Option<TempDir>,
}

impl Recipe {
    /// Writes the recipe to `cache/recipes/<hash>/guest` unless already
    /// there, or to a fresh private directory when the cache is read-only
    /// (as inside the test rig, where the host's files are shared
    /// read-only). The directory keeps the name `guest` because the scripts
    /// name their outputs after it.
    pub fn materialize() -> Result<Recipe, ImageError> {
        Self::materialize_under(&crate::dirs::cache_dir())
    }

    fn materialize_under(cache: &Path) -> Result<Recipe, ImageError> {
        let cached = cache.join("recipes").join(RECIPE_HASH);
        match Self::materialize_in(&cached) {
            Ok(dir) => Ok(Recipe {
                dir,
                _private: None,
            }),
            Err(e) => {
                // Never a predictable name in /tmp: another user could
                // plant scripts there that we (maybe as root) would run.
                // mkdtemp makes a new directory only we can enter.
                let prefix = std::env::temp_dir().join(format!("vmlab-recipe-{RECIPE_HASH}-"));
                let private = TempDir::new_with_prefix(&prefix).map_err(|err| ImageError::Io {
                    what: format!("cannot create a directory like {}", prefix.display()),
                    source: std::io::Error::from_raw_os_error(err.errno()),
                })?;
                log::debug!(
                    "cache not writable ({e}); using {}",
                    private.as_path().display()
                );
                Ok(Recipe {
                    dir: Self::materialize_in(private.as_path())?,
                    _private: Some(private),
                })
            }
        }
    }

    /// Writes the recipe to `parent/guest`, through a scratch directory
    /// renamed into place so a killed vmlab never leaves a partial recipe.
    fn materialize_in(parent: &Path) -> Result<PathBuf, ImageError> {
        let dir = parent.join("guest");
        if dir.is_dir() {
            return Ok(dir);
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
        Ok(dir)
    }

    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.join(rel)
    }
}

/// FNV-1a over the embedded recipe files `keep` selects (each file's
/// path, mode and content, like build.rs): the cache key of what they build.
pub fn hash_of_files(keep: impl Fn(&str) -> bool) -> String {
    hash_of_files_then(keep, &[])
}

/// `hash_of_files`, then `extra` (what else the build takes, such as a
/// package list); an empty `extra` keeps the files' hash.
pub fn hash_of_files_then(keep: impl Fn(&str) -> bool, extra: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (rel, bytes, mode) in RECIPE_FILES {
        if keep(rel) {
            feed(rel.as_bytes());
            feed(&mode.to_le_bytes());
            feed(bytes);
        }
    }
    feed(extra);
    format!("{hash:016x}")
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

    #[test]
    fn an_unwritable_cache_never_runs_scripts_planted_in_tmp() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // Where vmlab used to put the recipe: a name anyone can predict.
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        let planted = std::env::temp_dir().join(format!("vmlab-recipe-{RECIPE_HASH}-{uid}"));
        std::fs::create_dir_all(planted.join("guest")).unwrap();
        std::fs::write(planted.join("guest/build-kernel.sh"), "#!/bin/sh\nevil\n").unwrap();
        // A cache below a regular file cannot be created, even by root.
        let scratch = TempDir::new_with_prefix("/tmp/vmlab-recipe-test").unwrap();
        let not_a_dir = scratch.as_path().join("file");
        std::fs::write(&not_a_dir, b"").unwrap();
        let recipe = Recipe::materialize_under(&not_a_dir.join("cache")).unwrap();
        let script = recipe.path("build-kernel.sh");
        let embedded = RECIPE_FILES
            .iter()
            .find(|(rel, _, _)| *rel == "build-kernel.sh")
            .unwrap();
        let run = std::fs::read(&script);
        let _ = std::fs::remove_dir_all(&planted);
        assert!(
            run.unwrap() == embedded.1,
            "{} is not vmlab's own script",
            script.display()
        );
        assert!(!script.starts_with(&planted));
        let private = script.parent().unwrap().parent().unwrap().to_path_buf();
        let meta = std::fs::metadata(&private).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert_eq!(meta.uid(), uid);
        drop(recipe);
        assert!(!private.exists(), "the private copy goes with the recipe");
    }
}
