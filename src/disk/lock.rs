//! Advisory image locks that interoperate with QEMU.
//!
//! QEMU marks what each opener does with OFD read locks on single bytes of the
//! image file: byte 100+i is held by an opener that *uses* permission i, byte
//! 200+i by one that *does not share* it (i: 0 consistent read, 1 write,
//! 2 write-unchanged, 3 resize). An opener first takes its own bytes, then
//! tests, with F_OFD_GETLK for a write lock, the bytes of the others that
//! conflict with it: 200+i for each permission it wants, 100+i for each one
//! it refuses to share. OFD locks belong to the open file, so they vanish when
//! the file is closed, even after SIGKILL. We take the same bytes, so a vmlab
//! writer and a QEMU writer exclude each other, and readers of a backing
//! file (which refuse to share write and resize) keep writers away.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg};

use super::error::{DiskError, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

const PERM_CONSISTENT_READ: u8 = 1 << 0;
const PERM_WRITE: u8 = 1 << 1;
const PERM_WRITE_UNCHANGED: u8 = 1 << 2;
const PERM_RESIZE: u8 = 1 << 3;
const PERM_BITS: i64 = 4;

/// What an opener intends to do with an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Read the image; nobody may write or resize it meanwhile (backing files,
    /// the source of a clone).
    SharedRead,
    /// Read and write; others may read but not write or resize.
    Write,
    /// Take and check no lock at all (like `qemu-img info -U`).
    None,
}

impl LockMode {
    /// (permissions used, permissions shared with others).
    fn perms(self) -> (u8, u8) {
        match self {
            LockMode::SharedRead => (
                PERM_CONSISTENT_READ,
                PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
            ),
            LockMode::Write => (
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE,
                PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
            ),
            LockMode::None => (0, 0xff),
        }
    }
}

/// Sets (`F_RDLCK`) or releases (`F_UNLCK`) our OFD lock on one byte.
fn set_byte(file: &File, offset: i64, l_type: libc::c_int) -> nix::Result<()> {
    let req = libc::flock {
        l_type: l_type as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: offset,
        l_len: 1,
        l_pid: 0,
    };
    fcntl(file, FcntlArg::F_OFD_SETLK(&req)).map(|_| ())
}

fn lock_byte(file: &File, offset: i64) -> nix::Result<()> {
    set_byte(file, offset, libc::F_RDLCK)
}

fn unlock_byte(file: &File, offset: i64) -> nix::Result<()> {
    set_byte(file, offset, libc::F_UNLCK)
}

/// True when another open file holds a lock on `offset`.
fn byte_is_held(file: &File, offset: i64) -> nix::Result<bool> {
    let mut req = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: offset,
        l_len: 1,
        l_pid: 0,
    };
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut req))?;
    Ok(req.l_type != libc::F_UNLCK as i16)
}

/// How long a conflicting lock may take to go away before it counts.
///
/// OFD locks belong to the open file description, and a process that forks
/// (to spawn anything) shares every description with the child until the
/// child's exec closes them. So a file this process, or another, has just
/// closed can stay locked for the instant between a fork and an exec. A
/// real holder keeps its lock far longer than this; the wait is paid only
/// when a conflict is about to be reported.
const SETTLE: Duration = Duration::from_millis(250);

/// Calls `conflict` until it finds none or `SETTLE` has passed, returning the
/// last conflict found.
fn settled<T>(mut conflict: impl FnMut() -> nix::Result<Option<T>>) -> nix::Result<Option<T>> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let found = conflict()?;
        if found.is_none() || Instant::now() >= deadline {
            return Ok(found);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Takes the lock bytes for `mode` on `file`, then refuses if another opener
/// conflicts. The locks live as long as `file` stays open.
pub fn lock_image(file: &File, path: &Path, mode: LockMode) -> Result<()> {
    if mode == LockMode::None {
        return Ok(());
    }
    let (perm, shared) = mode.perms();
    let io = |e: nix::Error| DiskError::io(path, std::io::Error::from(e));
    for i in 0..PERM_BITS {
        if perm & (1 << i) != 0 {
            lock_byte(file, PERM_BASE + i).map_err(io)?;
        }
        if shared & (1 << i) == 0 {
            lock_byte(file, SHARED_BASE + i).map_err(io)?;
        }
    }
    let conflict = || -> nix::Result<Option<(i64, i64)>> {
        for i in 0..PERM_BITS {
            if perm & (1 << i) != 0 && byte_is_held(file, SHARED_BASE + i)? {
                return Ok(Some((SHARED_BASE + i, i)));
            }
            if shared & (1 << i) == 0 && byte_is_held(file, PERM_BASE + i)? {
                return Ok(Some((PERM_BASE + i, i)));
            }
        }
        Ok(None)
    };
    match settled(conflict).map_err(io)? {
        None => Ok(()),
        Some((offset, i)) => Err(DiskError::Locked {
            path: path.to_path_buf(),
            holder: describe_holder(file, offset, i),
        }),
    }
}

/// Trades the locks of `LockMode::Write` held on `file` for those of
/// `LockMode::SharedRead`: the writer becomes a reader of a backing file
/// that nobody may write. Dropping locks cannot conflict with anyone.
pub fn downgrade_to_shared_read(file: &File, path: &Path) -> Result<()> {
    let (write_perm, write_shared) = LockMode::Write.perms();
    let (read_perm, read_shared) = LockMode::SharedRead.perms();
    for i in 0..PERM_BITS {
        let bit = 1 << i;
        let release = [
            (write_perm & bit != 0 && read_perm & bit == 0, PERM_BASE + i),
            (
                write_shared & bit == 0 && read_shared & bit != 0,
                SHARED_BASE + i,
            ),
        ];
        for (_, offset) in release.iter().filter(|(drop, _)| *drop) {
            unlock_byte(file, *offset).map_err(|e| DiskError::io(path, std::io::Error::from(e)))?;
        }
    }
    Ok(())
}

/// True when some other process holds `path` open for writing (QEMU's or
/// vmlab's write-permission byte is locked).
pub fn held_for_writing(file: &File) -> bool {
    let write_byte = || byte_is_held(file, PERM_BASE + 1).map(|held| held.then_some(()));
    matches!(settled(write_byte), Ok(Some(())))
}

/// Names who holds lock byte `offset` (best effort).
fn describe_holder(file: &File, offset: i64, perm_index: i64) -> String {
    let what = match (offset >= SHARED_BASE, perm_index) {
        (false, 1) => "another process writing to it",
        (false, 3) => "another process that may resize it",
        (false, _) => "another process",
        (true, _) => "another process that forbids writers",
    };
    match lock_owner_pid(file, offset) {
        Some(pid) => {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let comm = comm.trim();
            if comm.is_empty() {
                format!("{what} (pid {pid})")
            } else {
                format!("{what} ({comm}, pid {pid})")
            }
        }
        None => what.to_string(),
    }
}

/// The process holding an OFD lock on byte `offset` of `file`. /proc/locks
/// shows OFD locks without a pid, so look through every process's open files
/// (/proc/PID/fdinfo lists the locks of each open file).
fn lock_owner_pid(file: &File, offset: i64) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let me = std::process::id();
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            // "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:1234 100 101"
            let holds = info.lines().filter(|l| l.starts_with("lock:")).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let n = f.len();
                n >= 4
                    && f[n - 3] == id
                    && f[n - 2].parse::<i64>().is_ok_and(|s| s <= offset)
                    && (f[n - 1] == "EOF" || f[n - 1].parse::<i64>().is_ok_and(|e| e >= offset))
            });
            if holds {
                return Some(pid);
            }
        }
    }
    None
}
