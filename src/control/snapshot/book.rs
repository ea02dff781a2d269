//! A VM's snapshot records (`snapshots.json` in its state directory): each
//! snapshot's name, when it was taken and, for each disk, the layer that
//! holds the disk as it was then. The file is replaced whole and durably
//! (written beside, fsync'd, renamed, directory fsync'd), so a reader sees
//! the old records or the new ones; writing it is the moment an operation
//! takes effect.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::control::error::{ControlError, Result};
use crate::control::state::VmDir;

const BOOK_FILE: &str = "snapshots.json";
const LOCK_FILE: &str = "snapshots.lock";
const FORMAT_VERSION: u32 = 1;

/// Every snapshot of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    pub version: u32,
    pub snapshots: Vec<Snapshot>,
    /// A restore under way: it is finished (again) before anything else
    /// touches the VM's disks, so that they all reach that snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restoring: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub name: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// Taken while the VM ran (crash-consistent).
    pub live: bool,
    pub disks: Vec<SnapshotDisk>,
    /// A full snapshot's memory and device state, a file in the VM's
    /// directory; None for a snapshot of the disks alone (all there is yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<String>,
}

/// One disk's part of a snapshot: the disk (as the VM's settings name it,
/// a file in its directory) and the frozen layer that holds its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    pub disk: String,
    pub layer: String,
}

/// The records, written beside the real file but not yet in its place.
pub struct StagedBook {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

/// Held while a command reads or changes a VM's snapshots.
pub struct BookLock(#[allow(dead_code)] Flock<File>);

impl Book {
    fn path(vm: &VmDir) -> PathBuf {
        vm.path().join(BOOK_FILE)
    }

    /// The VM's records; none yet when the file does not exist.
    pub fn load(vm: &VmDir) -> Result<Book> {
        let path = Self::path(vm);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Book {
                    version: FORMAT_VERSION,
                    ..Book::default()
                })
            }
            Err(e) => return Err(ControlError::io("cannot read", &path)(e)),
        };
        let book: Book = serde_json::from_str(&text).map_err(|e| ControlError::Config {
            path: path.clone(),
            line: e.line(),
            message: format!("not a snapshot record file: {e}"),
        })?;
        if book.version != FORMAT_VERSION {
            return Err(ControlError::Config {
                path,
                line: 1,
                message: format!(
                    "snapshot records of version {} (this vmlab reads {FORMAT_VERSION}): use a newer vmlab",
                    book.version
                ),
            });
        }
        Ok(book)
    }

    pub fn find(&self, name: &str) -> Option<&Snapshot> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    /// Writes the records beside their file; [`StagedBook::commit`] puts
    /// them in place. A full disk fails here, before anything depends on it.
    pub fn stage(&self, vm: &VmDir) -> Result<StagedBook> {
        let path = Self::path(vm);
        let err = || ControlError::io("cannot write the snapshot records", &path);
        // A fresh private file: the records name the VM's disk layers.
        let (tmp, mut file) =
            crate::fsutil::create_temporary_beside(&path, crate::fsutil::PRIVATE_FILE_MODE)
                .map_err(err())?;
        let staged = StagedBook {
            tmp,
            path: path.clone(),
            committed: false,
        };
        let text = serde_json::to_string_pretty(self).expect("records always serialize");
        file.write_all(text.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .map_err(err())?;
        Ok(staged)
    }

    /// Replaces the records on disk with these.
    pub fn save(&self, vm: &VmDir) -> Result<()> {
        self.stage(vm)?.commit()
    }
}

impl StagedBook {
    pub fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.path).map_err(ControlError::io(
            "cannot write the snapshot records",
            &self.path,
        ))?;
        self.committed = true;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for StagedBook {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Takes the VM's snapshot lock, waiting for another snapshot command to
/// finish (a merge can take a while).
pub fn lock_book(vm: &VmDir) -> Result<BookLock> {
    let path = vm.path().join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(crate::fsutil::PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(ControlError::io("cannot open the snapshot lock", &path))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map(BookLock)
        .map_err(|(_, e)| ControlError::Io {
            what: "cannot lock",
            path,
            source: e.into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Book {
        Book {
            version: FORMAT_VERSION,
            snapshots: vec![Snapshot {
                name: "before-upgrade".into(),
                created: 1_700_000_000,
                live: true,
                disks: vec![SnapshotDisk {
                    disk: "disk.qcow2".into(),
                    layer: "disk.frozen-1.qcow2".into(),
                }],
                vm_state: None,
            }],
            restoring: None,
        }
    }

    #[test]
    fn records_round_trip_and_a_missing_file_is_an_empty_book() {
        let _home = crate::control::state::tests::temp_home();
        let vm = VmDir::named("vm1").unwrap();
        std::fs::create_dir_all(vm.path()).unwrap();
        assert!(Book::load(&vm).unwrap().snapshots.is_empty());
        let book = sample();
        book.save(&vm).unwrap();
        assert_eq!(Book::load(&vm).unwrap(), book);
        // Nothing but the file is left behind.
        let names: Vec<_> = std::fs::read_dir(vm.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["snapshots.json"]);
    }

    #[test]
    fn records_are_private_and_never_written_through_a_planted_link() {
        use std::os::unix::fs::PermissionsExt;
        let _home = crate::control::state::tests::temp_home();
        let vm = VmDir::named("vm1").unwrap();
        std::fs::create_dir_all(vm.path()).unwrap();
        let victim = vm.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let pid = std::process::id();
        for name in [
            format!(".{BOOK_FILE}.tmp{pid}"),
            format!(".{BOOK_FILE}.tmp{pid}-0"),
        ] {
            std::os::unix::fs::symlink(&victim, vm.path().join(name)).unwrap();
        }
        let book = sample();
        book.save(&vm).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(Book::load(&vm).unwrap(), book);
        let mode = |name: &str| {
            let meta = std::fs::metadata(vm.path().join(name)).unwrap();
            meta.permissions().mode() & 0o777
        };
        assert_eq!(mode(BOOK_FILE), 0o600);
        drop(lock_book(&vm).unwrap());
        assert_eq!(mode(LOCK_FILE), 0o600);
    }

    #[test]
    fn a_staged_book_dropped_uncommitted_changes_nothing() {
        let _home = crate::control::state::tests::temp_home();
        let vm = VmDir::named("vm1").unwrap();
        std::fs::create_dir_all(vm.path()).unwrap();
        let staged = sample().stage(&vm).unwrap();
        drop(staged);
        assert!(Book::load(&vm).unwrap().snapshots.is_empty());
        assert_eq!(std::fs::read_dir(vm.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_damaged_or_newer_file_is_one_clear_error() {
        let _home = crate::control::state::tests::temp_home();
        let vm = VmDir::named("vm1").unwrap();
        std::fs::create_dir_all(vm.path()).unwrap();
        std::fs::write(vm.path().join(BOOK_FILE), "{ not json").unwrap();
        let err = Book::load(&vm).unwrap_err().to_string();
        assert!(
            err.contains("snapshots.json:1: not a snapshot record file"),
            "{err}"
        );
        std::fs::write(
            vm.path().join(BOOK_FILE),
            r#"{"version": 9, "snapshots": []}"#,
        )
        .unwrap();
        let err = Book::load(&vm).unwrap_err().to_string();
        assert!(err.contains("use a newer vmlab"), "{err}");
    }
}
