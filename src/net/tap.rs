//! A TAP device as the guest side: frames with a 12-byte `virtio_net_hdr` in
//! front (`IFF_VNET_HDR`), checksum and TSO offloads enabled so the kernel
//! hands us 64 KiB segments and takes ours.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::error::NatError;
use super::frame::{GuestFrame, NetHdr, Offloads, NET_HDR_LEN};
use super::port::{GuestPort, PortBusy};

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
    offloads: Offloads,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name.contains(['/', '\0'])
        && !name.chars().any(char::is_whitespace)
}

impl Tap {
    /// Attaches to TAP device `name` (creating it if it does not exist),
    /// non-blocking, with vnet headers and offloads.
    pub fn open(name: &str) -> Result<Tap, NatError> {
        if !valid_name(name) {
            return Err(NatError::TapName(name.to_string()));
        }
        let fail = |cause| NatError::Tap {
            name: name.to_string(),
            cause,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(fail)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let fd = file.as_raw_fd();
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a
        // properly sized, live `#[repr(C)]` value for the whole call.
        let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        let hdr_len = NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at a live local.
        let rc = unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) };
        if rc < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        let flags = libc::TUN_F_CSUM | libc::TUN_F_TSO4;
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // shared with the kernel.
        let rc = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
        if rc < 0 {
            log::warn!(
                "nat: tap {name}: offloads unavailable ({}); throughput will be lower",
                io::Error::last_os_error()
            );
        }
        Ok(Tap {
            file,
            name: name.to_string(),
            // Writes with vnet headers may always carry partial checksums and
            // GSO; the kernel finishes them.
            offloads: Offloads {
                csum: true,
                tso4: true,
            },
        })
    }

    /// [`Tap::open`] inside the network namespace at `netns` (a path such
    /// as /run/netns/NAME or /proc/PID/ns/net), while the engine's host
    /// sockets stay in the caller's namespace, as slirp4netns does.
    pub fn open_in_netns(name: &str, netns: &Path) -> Result<Tap, NatError> {
        let name = name.to_string();
        in_netns(netns, move || Tap::open(&name))
    }

    /// Keeps the device when its last descriptor closes (a network process
    /// killed with SIGKILL finds its members' TAPs again), or not.
    pub fn set_persistent(&self, persistent: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes an int by value; no memory is shared.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETPERSIST,
                libc::c_ulong::from(persistent),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes one frame with its header; never blocks (a full queue in the
    /// kernel drops, as a wire would).
    pub fn send_frame(&mut self, hdr: &NetHdr, frame: &[u8]) -> Result<(), PortBusy> {
        let hdr = hdr.to_bytes();
        let bufs = [IoSlice::new(&hdr), IoSlice::new(frame)];
        match self.file.write_vectored(&bufs) {
            Ok(_) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Err(PortBusy),
            Err(err) => {
                // A down interface or a frame the kernel rejects: drop it,
                // as a wire would.
                log::debug!("nat: tap {}: write: {err}", self.name);
                Ok(())
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame with its header into `buf`; `WouldBlock` when empty.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl GuestPort for Tap {
    fn send(&mut self, frame: &GuestFrame) -> Result<(), PortBusy> {
        self.send_frame(&frame.hdr, &frame.data)
    }

    fn offloads(&self) -> Offloads {
        self.offloads
    }
}

/// Moves the calling thread into the network namespace `ns` (an open
/// namespace file); the process's other threads stay where they are.
pub fn enter_netns(ns: &File) -> io::Result<()> {
    // SAFETY: setns changes only the calling thread's network namespace;
    // `ns` is an open descriptor for the call.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a short-lived thread inside the network namespace at
/// `netns`; descriptors it opens keep working from any namespace.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, NatError> + Send + 'static,
) -> Result<T, NatError> {
    let ns = File::open(netns).map_err(|cause| NatError::Netns {
        path: netns.to_path_buf(),
        cause,
    })?;
    let path = netns.to_path_buf();
    std::thread::spawn(move || {
        enter_netns(&ns).map_err(|cause| NatError::Netns { path, cause })?;
        f()
    })
    .join()
    .unwrap_or_else(|_| {
        Err(NatError::EventLoop(io::Error::other(
            "namespace thread panicked",
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "a/b", "with space", "sixteen-chars-xx"] {
            assert!(matches!(Tap::open(bad), Err(NatError::TapName(_))), "{bad}");
        }
    }
}
