//! Files a sample makes for itself (a disk clone, a known_hosts, a report)
//! and must not leave behind, however it ends.

use std::path::{Path, PathBuf};

/// A file removed when dropped.
#[derive(Debug)]
pub struct ScratchFile(pub PathBuf);

impl ScratchFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_when_dropped_even_if_never_made() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        drop(ScratchFile(path.clone()));
        assert!(!path.exists());
        drop(ScratchFile(dir.path().join("never-made")));
    }
}
