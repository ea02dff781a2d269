//! The process's file descriptors: the open-file limit raised at start (a
//! NAT with thousands of flows needs more than the usual soft limit of
//! 1024), the share of it the NAT may take, and close-on-exec for every
//! descriptor before vmlab starts a long-lived helper process.

use std::io;

/// Descriptors kept back from the NAT for everything else a VM or a
/// network process opens (disks, queues, control connections, members).
const RESERVED: u64 = 256;
/// Fewest flows a NAT is sized for, however low the limit.
const MIN_FLOWS: usize = 16;
/// Highest soft limit asked for: some hard limits are "unlimited".
const MAX_SOFT: u64 = 1 << 20;

fn limits() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// Raises the soft open-file limit to the hard one (capped); returns the
/// soft limit now in force.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut lim = limits()?;
    let wanted = lim.rlim_max.min(MAX_SOFT);
    if lim.rlim_cur < wanted {
        let old = lim.rlim_cur;
        lim.rlim_cur = wanted;
        // SAFETY: setrlimit reads one rlimit from the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
        log::debug!("open-file limit raised from {old} to {wanted}");
    }
    Ok(lim.rlim_cur)
}

/// Descriptors open now.
fn open_now() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// How many flows (one host socket each) fit in what the open-file limit
/// leaves, at most `requested`.
pub fn flow_capacity(requested: usize) -> usize {
    let Ok(lim) = limits() else {
        return requested;
    };
    capacity_within(requested, lim.rlim_cur, open_now())
}

fn capacity_within(requested: usize, limit: u64, open: u64) -> usize {
    let left = limit.saturating_sub(open).saturating_sub(RESERVED);
    requested.min((left as usize).max(MIN_FLOWS))
}

/// True for "out of descriptors", per process (EMFILE) or system (ENFILE).
pub fn exhausted(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Marks every descriptor above stderr close-on-exec, so a helper started
/// next (a network process lives longer than the VM that starts it)
/// inherits none of this process's sockets, eventfds or disks.
pub fn close_on_exec_above_stderr() -> io::Result<()> {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD only read and set the descriptor's flags;
        // a descriptor closed meanwhile (the listing's own) fails harmlessly.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_get_what_the_limit_leaves() {
        assert_eq!(capacity_within(4096, 1024, 20), 748);
        assert_eq!(capacity_within(4096, 1 << 20, 20), 4096);
        assert_eq!(capacity_within(4096, 100, 90), MIN_FLOWS);
        assert_eq!(capacity_within(3, 100, 90), 3);
    }

    #[test]
    fn the_soft_limit_reaches_the_hard_one() {
        let soft = raise_open_file_limit().unwrap();
        assert_eq!(soft, limits().unwrap().rlim_max.min(MAX_SOFT));
    }

    #[test]
    fn descriptors_become_close_on_exec() {
        let (r, w) = nix::unistd::pipe().unwrap();
        close_on_exec_above_stderr().unwrap();
        for fd in [&r, &w] {
            use std::os::fd::AsRawFd;
            // SAFETY: F_GETFD on a descriptor this test owns.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
    }
}
