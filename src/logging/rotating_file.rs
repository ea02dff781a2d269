//! A log file with a size cap: past `limit` bytes it is renamed to
//! `NAME.1` (replacing the one before) and started afresh, so a log costs at
//! most twice its limit on disk however long the VM runs and whatever its
//! guest prints.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub struct RotatingFile {
    path: PathBuf,
    file: File,
    written: u64,
    limit: u64,
    /// The file is also the process's stderr, after each rotation too.
    stderr: bool,
}

impl RotatingFile {
    /// Starts the log at `path` afresh (a new run), with no previous file.
    pub fn create(path: &Path, limit: u64) -> io::Result<RotatingFile> {
        let file = open_fresh(path)?;
        match std::fs::remove_file(previous(path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(RotatingFile {
            path: path.to_path_buf(),
            file,
            written: 0,
            limit,
            stderr: false,
        })
    }

    /// Makes the log this process's stderr as well, now and after every
    /// rotation, so that panics and other direct writes to stderr land in
    /// the current file too.
    pub fn as_stderr(mut self) -> io::Result<RotatingFile> {
        nix::unistd::dup2_stderr(&self.file)?;
        self.stderr = true;
        Ok(self)
    }

    /// Where the previous file of this log goes.
    pub fn previous_path(&self) -> PathBuf {
        previous(&self.path)
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, previous(&self.path))?;
        self.file = open_fresh(&self.path)?;
        self.written = 0;
        if self.stderr {
            nix::unistd::dup2_stderr(&self.file)?;
        }
        Ok(())
    }

    /// Makes room for `len` more bytes: rotates, or if even that fails
    /// (the directory is read-only now), starts the same file over.
    fn make_room(&mut self, len: usize) -> io::Result<()> {
        if self.written == 0 || self.written.saturating_add(len as u64) <= self.limit {
            return Ok(());
        }
        if self.rotate().is_err() {
            // Appending, so the next write lands at the start again.
            self.file.set_len(0)?;
            self.written = 0;
        }
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.make_room(buf.len())?;
        // One write never takes the file past its limit.
        let room = self.limit.saturating_sub(self.written).max(1);
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.file.write(&buf[..take])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn previous(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Opens `path` empty, for appending, readable by its owner only.
fn open_fresh(path: &Path) -> io::Result<File> {
    // Private, and a symlink planted in the VM's directory is refused.
    let file = crate::fsutil::create_private(path)?;
    // Truncated above; appending from here keeps a shared stderr
    // descriptor and this one from overwriting each other.
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_APPEND),
    )?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(path: &Path) -> (u64, Option<u64>) {
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len());
        (len(path).unwrap(), len(&previous(path)).ok())
    }

    #[test]
    fn the_log_rotates_at_its_limit_keeping_one_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut log = RotatingFile::create(&path, 1000).unwrap();
        for i in 0..100u32 {
            log.write_all(format!("line {i:04} of the guest\n").as_bytes())
                .unwrap();
        }
        // 100 lines of 23 bytes: 43 per file, the third file current.
        let (current, previous) = sizes(&path);
        assert!(current <= 1000 && previous.unwrap() <= 1000);
        let text = std::fs::read_to_string(&path).unwrap();
        let before = std::fs::read_to_string(log.previous_path()).unwrap();
        assert!(text.ends_with("line 0099 of the guest\n"), "{text}");
        assert!(before.starts_with("line 0043"), "{before}");
        assert!(
            text.starts_with("line 0086"),
            "whole lines per file: {text}"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "one current and one previous file only");
    }

    #[test]
    fn one_huge_write_cannot_pass_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.log");
        let mut log = RotatingFile::create(&path, 100).unwrap();
        log.write_all(&[b'x'; 1000]).unwrap();
        let (current, previous) = sizes(&path);
        assert_eq!((current, previous), (100, Some(100)));
    }

    #[test]
    fn a_new_run_starts_afresh_without_the_old_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut log = RotatingFile::create(&path, 10).unwrap();
        log.write_all(b"0123456789abc").unwrap();
        assert!(log.previous_path().exists());
        drop(log);
        let log = RotatingFile::create(&path, 10).unwrap();
        assert_eq!(sizes(&path), (0, None));
        drop(log);
    }

    #[test]
    fn when_rotation_fails_the_file_starts_over_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.log");
        let mut log = RotatingFile::create(&path, 10).unwrap();
        // A directory in the way of the rename.
        std::fs::create_dir(previous(&path)).unwrap();
        std::fs::write(previous(&path).join("x"), b"").unwrap();
        for _ in 0..5 {
            log.write_all(b"12345678").unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"12345678");
    }
}
