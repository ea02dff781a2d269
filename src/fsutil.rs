//! File helpers shared across modules.

use std::io;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same directory
/// renamed into place: readers see the old file or the whole new one, and a
/// failure leaves nothing half-written.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
