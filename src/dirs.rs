//! Where vmlab keeps things, following the XDG base directory spec so tests
//! (and users) can redirect everything with environment variables.

use std::path::PathBuf;

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

fn xdg(var: &str, fallback: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(dir) if !dir.is_empty() && PathBuf::from(&dir).is_absolute() => PathBuf::from(dir),
        _ => home().join(fallback),
    }
}

/// Built artefacts that can be rebuilt: guest kernels, images.
pub fn cache_dir() -> PathBuf {
    xdg("XDG_CACHE_HOME", ".cache").join("vmlab")
}

/// Things that cannot be rebuilt: VM disks and configuration, SSH keys.
pub fn data_dir() -> PathBuf {
    xdg("XDG_DATA_HOME", ".local/share").join("vmlab")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdg_variable_wins_when_absolute() {
        // Only this test touches these names.
        std::env::set_var("VMLAB_TEST_XDG_A", "/srv/cache");
        assert_eq!(
            xdg("VMLAB_TEST_XDG_A", ".cache"),
            PathBuf::from("/srv/cache")
        );
        std::env::set_var("VMLAB_TEST_XDG_B", "relative/path");
        assert_eq!(xdg("VMLAB_TEST_XDG_B", ".cache"), home().join(".cache"));
        assert_eq!(
            xdg("VMLAB_TEST_XDG_UNSET", ".local/share"),
            home().join(".local/share")
        );
    }
}
