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
    /// Frames carry a `virtio_net_hdr` (`IFF_VNET_HDR`). Without one,
    /// [`Tap::read_frame`] puts an empty header in front, and frames
    /// written must be whole (no GSO, no partial checksum).
    vnet_hdr: bool,
}

/// `IFF_VNET_HDR` as TUNGETFEATURES reports it.
const IFF_VNET_HDR: libc::c_int = libc::IFF_VNET_HDR;

/// Whether `name` can name a network device (what TUNSETIFF takes).
pub fn tap_name_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name.contains(['/', '\0'])
        && !name.chars().any(char::is_whitespace)
}

impl Tap {
    /// Attaches to TAP device `name` (creating it if it does not exist),
    /// non-blocking, with vnet headers and offloads.
    pub fn open(name: &str) -> Result<Tap, NatError> {
        if !tap_name_is_valid(name) {
            return Err(NatError::TapName(name.to_string()));
        }
        let file = open_tun(name)?;
        set_iff(&file, name, true).map_err(|cause| NatError::Tap {
            name: name.to_string(),
            cause,
        })?;
        Tap::with_vnet_hdr(file, name)
    }

    /// Attaches to the existing TAP device `name` in this thread's network
    /// namespace, which vmlab neither creates nor configures (`run --net
    /// tap:DEV`); with vnet headers when the kernel offers them, unless
    /// `vnet_hdr` is false.
    pub fn attach_existing(name: &str, vnet_hdr: bool) -> Result<Tap, NatError> {
        if !tap_name_is_valid(name) {
            return Err(NatError::TapName(name.to_string()));
        }
        let c_name = std::ffi::CString::new(name).map_err(|_| NatError::TapName(name.into()))?;
        // SAFETY: if_nametoindex reads the NUL-terminated string, which
        // lives for the call.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            return Err(NatError::TapMissing(name.to_string()));
        }
        let file = open_tun(name)?;
        let vnet_hdr = vnet_hdr && tun_features(&file) & IFF_VNET_HDR != 0;
        set_iff(&file, name, vnet_hdr).map_err(|cause| match cause.raw_os_error() {
            // The name is taken by a device that is not a TAP.
            Some(libc::EINVAL) => NatError::NotATap(name.to_string()),
            Some(libc::EBUSY) => NatError::TapBusy(name.to_string()),
            _ => NatError::Tap {
                name: name.to_string(),
                cause,
            },
        })?;
        if vnet_hdr {
            return Tap::with_vnet_hdr(file, name);
        }
        log::info!("tap {name}: no vnet headers; whole frames only");
        Ok(Tap {
            file,
            name: name.to_string(),
            offloads: Offloads::default(),
            vnet_hdr: false,
        })
    }

    /// Whether frames carry a vnet header (offloads possible both ways).
    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// What the kernel may hand us: partial checksums and TSO segments
    /// only if the reader takes them (TUNSETOFFLOAD); otherwise the kernel
    /// finishes checksums and segments first.
    pub fn set_receive_offloads(&self, offloads: Offloads) -> io::Result<()> {
        if !self.vnet_hdr {
            return Ok(());
        }
        let mut flags = 0;
        if offloads.csum {
            flags |= libc::TUN_F_CSUM;
            if offloads.tso4 {
                flags |= libc::TUN_F_TSO4;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is
        // shared with the kernel.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn with_vnet_hdr(file: File, name: &str) -> Result<Tap, NatError> {
        let fail = |cause| NatError::Tap {
            name: name.to_string(),
            cause,
        };
        let fd = file.as_raw_fd();
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
            vnet_hdr: true,
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
        let with_hdr = [IoSlice::new(&hdr), IoSlice::new(frame)];
        let bufs = if self.vnet_hdr {
            &with_hdr[..]
        } else {
            &with_hdr[1..]
        };
        match self.file.write_vectored(bufs) {
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
    /// A TAP without vnet headers gets an empty one (a whole frame).
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.vnet_hdr {
            return self.file.read(buf);
        }
        let Some(body) = buf.get_mut(NET_HDR_LEN..) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let n = self.file.read(body)?;
        buf[..NET_HDR_LEN].copy_from_slice(&NetHdr::default().to_bytes());
        Ok(NET_HDR_LEN + n)
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

/// /dev/net/tun, non-blocking; not yet bound to a device.
fn open_tun(name: &str) -> Result<File, NatError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|cause| NatError::Tap {
            name: name.to_string(),
            cause,
        })
}

/// The TUN/TAP flags this kernel supports (0 if it cannot say).
fn tun_features(file: &File) -> libc::c_int {
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int through the pointer,
    // which points at a live local.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNGETFEATURES,
            &mut features as *mut libc::c_uint,
        )
    };
    if rc < 0 {
        return 0;
    }
    features as libc::c_int
}

/// Binds `file` to TAP device `name` (TUNSETIFF: created if missing and
/// the caller may), without packet information, with vnet headers or not.
fn set_iff(file: &File, name: &str, vnet_hdr: bool) -> io::Result<()> {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= IFF_VNET_HDR;
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: flags as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a
    // properly sized, live `#[repr(C)]` value for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
    fn a_missing_device_is_not_created() {
        let err = Tap::attach_existing("vmlab-nosuch0", true).err().unwrap();
        assert!(matches!(err, NatError::TapMissing(_)), "{err}");
        assert!(err.to_string().contains("ip tuntap add"), "{err}");
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "a/b", "with space", "sixteen-chars-xx"] {
            assert!(matches!(Tap::open(bad), Err(NatError::TapName(_))), "{bad}");
            assert!(
                matches!(Tap::attach_existing(bad, true), Err(NatError::TapName(_))),
                "{bad}"
            );
        }
    }
}
