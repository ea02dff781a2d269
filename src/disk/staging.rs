//! New image files are written under a hidden temporary name in the target
//! directory and published by link or rename only when complete, so a failed
//! create or clone leaves nothing behind.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::error::{DiskError, Result};

pub(crate) struct StagedFile {
    tmp: PathBuf,
    dst: PathBuf,
    file: File,
    force: bool,
    published: bool,
}

impl StagedFile {
    /// Starts a new file that will become `dst`; refuses if `dst` exists
    /// unless `force`.
    pub fn create(dst: &Path, force: bool) -> Result<Self> {
        if !force && dst.symlink_metadata().is_ok() {
            return Err(DiskError::Exists {
                path: dst.to_path_buf(),
            });
        }
        let name = dst.file_name().ok_or_else(|| {
            DiskError::InvalidArgument(format!("{}: not a file name", dst.display()))
        })?;
        let dir = match dst.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!(
            ".{}.vmlab-{}-{nanos}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        // Images hold a guest's data: owner-only, whatever the umask.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(crate::fsutil::PRIVATE_FILE_MODE)
            .open(&tmp)
            .map_err(|e| DiskError::io(&dir, e))?;
        Ok(StagedFile {
            tmp,
            dst: dst.to_path_buf(),
            file,
            force,
            published: false,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Makes the file durable and gives it its real name.
    pub fn publish(mut self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| DiskError::io(&self.dst, e))?;
        if self.force {
            std::fs::rename(&self.tmp, &self.dst).map_err(|e| DiskError::io(&self.dst, e))?;
        } else {
            // link(2) fails if the name appeared meanwhile: never clobber.
            std::fs::hard_link(&self.tmp, &self.dst).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    DiskError::Exists {
                        path: self.dst.clone(),
                    }
                } else {
                    DiskError::io(&self.dst, e)
                }
            })?;
            let _ = std::fs::remove_file(&self.tmp);
        }
        self.published = true;
        if let Some(dir) = self.dst.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
