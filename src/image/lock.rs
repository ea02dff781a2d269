//! An exclusive lock file that serialises builders of one artefact (two
//! `vmlab image build` at once, two first runs creating the SSH key).

use std::fs::File;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::ImageError;

/// Held until dropped; the kernel releases it if vmlab dies.
pub struct BuildLock {
    _lock: Flock<File>,
}

impl BuildLock {
    /// Takes the lock on `path` (created if missing), waiting for another
    /// holder; `what` names the artefact in the waiting message.
    pub fn acquire(path: &Path, what: &str) -> Result<BuildLock, ImageError> {
        let io = |source| ImageError::Io {
            what: format!("cannot lock {}", path.display()),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io)?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(BuildLock { _lock: lock }),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => file,
            Err((_, errno)) => return Err(io(errno.into())),
        };
        eprintln!("vmlab: waiting for another vmlab building {what}");
        let lock =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io(errno.into()))?;
        Ok(BuildLock { _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("x.lock");
        let first = BuildLock::acquire(&path, "x").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let waiter = std::thread::spawn(move || {
            let _second = BuildLock::acquire(&p, "x").unwrap();
            tx.send(()).unwrap();
        });
        // flock locks belong to the open file, so a second open in this
        // process contends like another process would.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err());
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the lock passes on when dropped");
        waiter.join().unwrap();
    }
}
