//! What each class of vmlab thread may ask the kernel, one list per class.
//!
//! A change that adds a thread adds its class here; a change that makes a
//! thread do something new (a file write for suspend, a socket for a lab
//! network) adds the syscalls to that thread's list, with a word on why.
//! Lists name syscalls; `ioctl` is the one call whose request numbers are
//! narrowed too, since it multiplexes everything from KVM to the terminal.

use libc::c_long;

use super::ThreadClass;

/// Every thread: memory, locks, time, signals, exiting, and the logs (any
/// thread may log or print on the serial console, and a log file rotates
/// on the thread whose line fills it: rename, open, fchmod to its owner
/// only, dup2 onto stderr, or truncate when the rename fails).
const EVERY_THREAD: &[c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_ftruncate,
    // The rotated log's new file is made private (fsutil::create_private
    // tightens its mode), on whichever thread filled the old one.
    libc::SYS_fchmod,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    // HashMap keys, once per thread.
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    // A panic that aborts raises SIGABRT at itself.
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Threads that serve sockets someone else opened: accepting, talking,
/// and the socket options (timeouts, non-blocking) that go with it.
const SOCKET_SERVER: &[c_long] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
];

/// vCPU threads: KVM_RUN and the other KVM ioctls (see `ioctl_types`), the
/// serial console's output (a log file, console clients' sockets, the
/// terminal) and eventfds that wake the event loop and the guest.
const VCPU: &[c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_eventfd2,
    libc::SYS_epoll_ctl,
];

/// The NAT engine's host side, wherever it runs (a VM's event loop, a lab
/// network's process, `vmlab nat`): its epoll loop, its tick (a timer
/// that runs only while it has work), a host socket per flow (TCP
/// connects, UDP and ICMP datagrams, the DNS relay) and the forward
/// listeners (bound when a lab member joins, too).
const NAT_ENGINE: &[c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_create1,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
];

/// The event loop (a thread of its own each boot, see vmm::reboot): the
/// NAT (see `NAT_ENGINE`), a lab network's socket, a TAP card's device
/// (read, writev, and TUNSETOFFLOAD, a 'T' ioctl, as the guest's driver
/// negotiates offloads), console input, the stop and signal eventfds; and,
/// once the VM has ended, joining the other threads, reading its own
/// memory footprint, closing the disks, writing the run report, restoring
/// the terminal and removing the control socket and pid file.
const EVENT_LOOP: &[c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_eventfd2,
    libc::SYS_pipe2,
    libc::SYS_getdents64,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_flock,
    libc::SYS_fchmod,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // The disks close here once the VM has ended: a qcow2 image writes back
    // the tables it still caches (a guest that never flushed leaves some;
    // the rig's e2e_blk found it).
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_sched_getaffinity,
];

/// Disk threads (`virtioN-io`): the image files, positioned I/O, flush,
/// discard and zeroing (fallocate, or the block-device ioctls); their
/// eventfds and epoll loop.
const BLOCK_IO: &[c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// The control server (its accept loop and one thread per connection):
/// Unix sockets, a new thread per client, console sessions (the input
/// pipe), the power button (a KVM interrupt line), and the file work of
/// requests that change a VM's disks.
const CONTROL: &[c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    // std::thread::spawn for each connection.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_flock,
    libc::SYS_fchmod,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_getdents64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    // A live snapshot opens the new overlays under the VM's backing-file
    // policy, which resolves paths (realpath reads every component's link).
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    // `vmlab nat show` of a lab-network member asks the network's process.
    libc::SYS_socket,
    libc::SYS_connect,
];

/// A lab network's process, one event loop (see `NAT_ENGINE` for its
/// gateway): members' sockets and TAP devices (non-blocking through
/// FIONBIO; TUNSETPERSIST off when a namespace member leaves), requests
/// on the network's socket (accept, a write timeout), the leases and
/// namespace list saved beside the definition (a temporary file renamed
/// over it, see EVERY_THREAD), a namespace's file looked at to see it
/// deleted, and its socket removed at the end. It starts no thread and
/// enters no namespace: its namespace helper does that.
const NETWORK: &[c_long] = &[libc::SYS_ioctl, libc::SYS_unlink, libc::SYS_unlinkat];

/// The network process's namespace helper, started before the filters:
/// it enters a member's namespace (setns), makes the TAP there (the TUN
/// ioctls) and configures it (an AF_INET socket's interface and route
/// ioctls), then goes back to the process's own namespace.
const NETNS: &[c_long] = &[libc::SYS_setns, libc::SYS_socket, libc::SYS_ioctl];

/// `vmlab nat --tap`: the NAT's loop (see `NAT_ENGINE`), on a TAP opened
/// before the filter (its descriptor is read and written, made
/// non-blocking with FIONBIO).
const NAT: &[c_long] = &[libc::SYS_ioctl];

/// The syscalls `class` may make.
pub fn allowed(class: ThreadClass) -> impl Iterator<Item = c_long> {
    let own: &[&[c_long]] = match class {
        ThreadClass::Vcpu => &[VCPU],
        ThreadClass::EventLoop => &[EVENT_LOOP, NAT_ENGINE, SOCKET_SERVER],
        ThreadClass::BlockIo => &[BLOCK_IO],
        ThreadClass::Control => &[CONTROL, SOCKET_SERVER],
        ThreadClass::Network => &[NETWORK, NAT_ENGINE, SOCKET_SERVER],
        ThreadClass::Netns => &[NETNS],
        ThreadClass::Nat => &[NAT, NAT_ENGINE, SOCKET_SERVER],
    };
    EVERY_THREAD
        .iter()
        .chain(own.iter().copied().flatten())
        .copied()
}

/// `_IOC_TYPE` values of the ioctls `class` may make (the request's bits
/// 8..16). KVM's are 0xAE, the terminal's and FIONBIO/FIONREAD/FIOCLEX
/// ('T') 0x54, the block layer's (BLKDISCARD, BLKZEROOUT, BLKGETSIZE64)
/// 0x12, the TUN device's ('T', TUNSETIFF and the like) 0x54 too, and
/// the interface and route ioctls of a socket (SIOCSIFADDR, SIOCADDRT)
/// 0x89.
pub fn ioctl_types(class: ThreadClass) -> &'static [u64] {
    match class {
        ThreadClass::Vcpu => &[0xae],
        ThreadClass::EventLoop | ThreadClass::Control => &[0xae, 0x54],
        ThreadClass::BlockIo => &[0x12],
        ThreadClass::Network | ThreadClass::Nat => &[0x54],
        ThreadClass::Netns => &[0x54, 0x89],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_class_may_start_programs_or_trace() {
        for class in ThreadClass::ALL {
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_personality,
            ] {
                assert!(
                    !allowed(class).any(|s| s == forbidden),
                    "{class:?} allows {forbidden}"
                );
            }
        }
    }

    #[test]
    fn the_event_loop_may_set_a_tap_cards_offloads() {
        let tun_type = (libc::TUNSETOFFLOAD >> 8) & 0xff;
        assert!(ioctl_types(ThreadClass::EventLoop).contains(&tun_type));
        for call in [libc::SYS_read, libc::SYS_writev, libc::SYS_ioctl] {
            assert!(allowed(ThreadClass::EventLoop).any(|s| s == call), "{call}");
        }
    }

    #[test]
    fn only_the_namespace_helper_enters_namespaces_and_no_network_class_touches_kvm() {
        for class in ThreadClass::ALL {
            let enters = allowed(class).any(|s| s == libc::SYS_setns);
            assert_eq!(enters, class == ThreadClass::Netns, "{class:?}");
        }
        for class in [ThreadClass::Network, ThreadClass::Netns, ThreadClass::Nat] {
            assert!(!ioctl_types(class).contains(&0xae), "{class:?}");
        }
    }

    #[test]
    fn only_the_control_server_starts_threads() {
        for class in ThreadClass::ALL {
            let spawns = allowed(class).any(|s| s == libc::SYS_clone3);
            assert_eq!(spawns, class == ThreadClass::Control, "{class:?}");
        }
    }
}
