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

/// One directory per named VM: configuration, disks, serial log, pid file.
pub fn vms_dir() -> PathBuf {
    data_dir().join("vms")
}

/// vmlab's built guest images (the Debian base image and its index).
pub fn images_dir() -> PathBuf {
    cache_dir().join("images")
}

/// vmlab's SSH key pair and known_hosts.
pub fn ssh_dir() -> PathBuf {
    data_dir().join("ssh")
}

/// Sockets and other things that must not outlive a login: control sockets.
/// `$XDG_RUNTIME_DIR/vmlab`, or a private directory under /tmp when the
/// variable is unset (as under `sudo` or in a container).
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() && PathBuf::from(&dir).is_absolute() => {
            PathBuf::from(dir).join("vmlab")
        }
        _ => std::env::temp_dir().join(format!("vmlab-{}", current_uid())),
    }
}

/// Creates the runtime directory private to this user (mode 0700) and
/// refuses one that another user owns or that others can write to, since a
/// socket in it would let them impersonate our VMs.
pub fn ensure_runtime_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = runtime_dir();
    match std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != current_uid() || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a private directory of this user; remove it or set XDG_RUNTIME_DIR",
                dir.display()
            ),
        ));
    }
    Ok(dir)
}

fn current_uid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { libc::getuid() }
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

    #[test]
    fn runtime_dir_is_private_and_rejects_a_shared_one() {
        use std::os::unix::fs::PermissionsExt;
        // Tests that change the XDG variables take turns.
        let _home = crate::control::state::tests::temp_home();
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmlab-dirs").unwrap();
        std::env::set_var("XDG_RUNTIME_DIR", tmp.as_path());
        let dir = ensure_runtime_dir().unwrap();
        assert_eq!(dir, tmp.as_path().join("vmlab"));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_runtime_dir().unwrap_err();
        assert!(err.to_string().contains("not a private directory"), "{err}");
        std::env::set_var("XDG_RUNTIME_DIR", "");
        assert!(runtime_dir().starts_with(std::env::temp_dir()));
        assert!(runtime_dir().to_string_lossy().contains("vmlab-"));
    }
}
