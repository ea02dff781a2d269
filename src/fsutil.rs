//! File helpers shared across modules: atomic replacement, and files and
//! directories only their owner can read.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Owner-only modes for vmlab's private state (VM directories, settings,
/// logs, disks): other local users must not read a VM's disk or host keys.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Writes `bytes` to `path` through a temporary file in the same directory
/// renamed into place: readers see the old file or the whole new one, and a
/// failure leaves nothing half-written. The temporary is created afresh
/// (never through a file or symlink planted at its name).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_replacing(path, bytes, 0o666)
}

/// [`write_atomically`], the file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_replacing(path, bytes, PRIVATE_FILE_MODE)
}

fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (tmp, mut file) = create_temporary_beside(path, mode)?;
    let result = file
        .write_all(bytes)
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates a fresh temporary file `.NAME.tmpPID-N` beside `path` (to be
/// renamed over it) with `mode`: O_EXCL, so never a file or a symlink
/// planted at its name, which is skipped for the next N.
pub fn create_temporary_beside(path: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let mut attempt = 0u32;
    loop {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp{}-{attempt}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            // Someone else's name (a crashed run's, or planted): another.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Creates or truncates `path` for writing, readable by its owner only
/// (also when it existed with a looser mode); a symlink there is refused.
pub fn create_private(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
    Ok(file)
}

/// Creates `dir` (and missing parents) accessible to its owner only, and
/// tightens it if it exists with a looser mode.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_whole_file_and_leaves_no_temporary() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmlab-fsutil").unwrap();
        let path = dir.as_path().join("out.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_directory_is_an_error_with_nothing_written() {
        let path = Path::new("/tmp/vmlab-no-such-dir-for-test/out.json");
        assert!(write_atomically(path, b"x").is_err());
        assert!(!path.parent().unwrap().exists());
    }

    #[test]
    fn a_symlink_planted_at_the_temporary_name_is_not_followed() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmlab-fsutil").unwrap();
        let victim = dir.as_path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.as_path().join("vm.conf");
        let planted = dir
            .as_path()
            .join(format!(".vm.conf.tmp{}-0", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        write_private(&path, b"cpus = 1\n").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&path).unwrap(), b"cpus = 1\n");
        assert_eq!(mode(&path), 0o600);
        assert!(
            planted.symlink_metadata().is_ok(),
            "the planted link is left alone"
        );
        // A symlink at the target itself is replaced, not written through.
        let report = dir.as_path().join("report.json");
        std::os::unix::fs::symlink(&victim, &report).unwrap();
        write_atomically(&report, b"{}").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(report.symlink_metadata().unwrap().is_file());
    }

    #[test]
    fn private_files_and_directories_are_owner_only() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmlab-fsutil").unwrap();
        let vms = dir.as_path().join("data/vms/vm1");
        create_private_dir(&vms).unwrap();
        assert_eq!(mode(&vms), 0o700);
        assert_eq!(mode(&dir.as_path().join("data")), 0o700);
        std::fs::set_permissions(&vms, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&vms).unwrap();
        assert_eq!(mode(&vms), 0o700, "an existing directory is tightened");

        let log = vms.join("serial.log");
        std::fs::write(&log, b"old").unwrap();
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
        create_private(&log).unwrap().write_all(b"new").unwrap();
        assert_eq!(
            (std::fs::read(&log).unwrap(), mode(&log)),
            (b"new".to_vec(), 0o600)
        );

        let victim = dir.as_path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = vms.join("vmm.log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(
            create_private(&link).is_err(),
            "a planted symlink is refused"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
