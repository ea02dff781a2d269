//! A network namespace as a member: a TAP device made inside it (kept
//! when the network process dies, so a restarted one finds it again), its
//! MAC set, and unless told otherwise its address, prefix and default
//! route set from the member's lease, as `pasta --config-net` does. The
//! old ioctl interface does it in a few calls, with no netlink library and
//! no `ip` command.
//!
//! The work inside a namespace is the [`NetnsHelper`]'s, a thread of its
//! own started before the seccomp filters: the network's event loop, which
//! parses what members send, may neither enter a namespace nor start a
//! thread.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use crate::cli::MacAddress;
use crate::net::{enter_netns, NatError, Tap};
use crate::seccomp::{SeccompError, ThreadClass};

type Job = Box<dyn FnOnce(&File) + Send>;

/// The thread that enters namespaces for the network process, one job at
/// a time, going back to the process's own namespace after each (staying
/// would keep a deleted namespace alive).
pub struct NetnsHelper {
    jobs: mpsc::Sender<Job>,
}

impl NetnsHelper {
    /// Starts the helper under its own filter (the `netns` class).
    pub fn start() -> Result<NetnsHelper, SeccompError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (started, filtered) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || {
                let home = match File::open("/proc/thread-self/ns/net") {
                    Ok(home) => home,
                    Err(e) => {
                        log::error!("network: cannot open its own namespace: {e}");
                        return;
                    }
                };
                let result = crate::seccomp::install(ThreadClass::Netns);
                let ok = result.is_ok();
                let _ = started.send(result);
                if !ok {
                    return;
                }
                for job in queue {
                    job(&home);
                }
            });
        if let Err(e) = spawned {
            log::error!("network: cannot start its namespace helper: {e}");
        }
        // A helper that could not start makes every attach fail in its
        // own line; a filter it could not install fails the process.
        filtered.recv().unwrap_or(Ok(()))?;
        Ok(NetnsHelper { jobs })
    }

    /// [`open`] on the helper.
    pub fn open(
        &self,
        netns: &Path,
        device: &str,
        mac: MacAddress,
        address: Option<Address>,
    ) -> Result<Tap, NatError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let (path, device) = (netns.to_path_buf(), device.to_string());
        let job: Job = Box::new(move |home| {
            let _ = reply.send(open(&path, &device, mac, address, home));
        });
        let gone = || NatError::EventLoop(io::Error::other("the namespace helper is gone"));
        self.jobs.send(job).map_err(|_| gone())?;
        answer.recv().unwrap_or_else(|_| Err(gone()))
    }
}

/// The address a member's TAP gets.
#[derive(Clone, Copy, Debug)]
pub struct Address {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
}

/// Opens (or, after a restart, re-opens) TAP `device` in `netns` for a
/// member with `mac`, up, configured with `address` when given; the
/// calling thread enters `netns` for it and goes back `home` after.
fn open(
    netns: &PathBuf,
    device: &str,
    mac: MacAddress,
    address: Option<Address>,
    home: &File,
) -> Result<Tap, NatError> {
    let enter_failed = |cause| NatError::Netns {
        path: netns.clone(),
        cause,
    };
    let ns = File::open(netns).map_err(enter_failed)?;
    enter_netns(&ns).map_err(enter_failed)?;
    let result = open_here(device, mac, address);
    if let Err(e) = enter_netns(home) {
        log::error!("network: cannot go back to its own namespace: {e}");
    }
    result
}

/// [`open`] in the calling thread's namespace.
fn open_here(device: &str, mac: MacAddress, address: Option<Address>) -> Result<Tap, NatError> {
    let tap = Tap::open(device)?;
    let fail = |cause: io::Error| NatError::Tap {
        name: device.to_string(),
        cause,
    };
    tap.set_persistent(true).map_err(fail)?;
    let sock = Ioctls::new().map_err(fail)?;
    sock.set_mac(device, mac).map_err(fail)?;
    sock.set_up("lo").map_err(fail)?;
    sock.set_up(device).map_err(fail)?;
    if let Some(a) = address {
        sock.set_address(device, a.ip, a.prefix).map_err(fail)?;
        sock.add_default_route(a.gateway).map_err(fail)?;
    }
    Ok(tap)
}

/// The identity of the namespace at `netns` (its nsfs device and inode).
pub fn identity(netns: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(netns).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// The member leaves: its TAP goes with the descriptor.
pub fn release(tap: Tap) {
    if let Err(e) = tap.set_persistent(false) {
        log::debug!("network: tap {}: {e}", tap.name());
    }
}

/// An AF_INET datagram socket to issue interface ioctls on, in the
/// namespace of the thread that made it.
struct Ioctls(OwnedFd);

/// `struct rtentry` of <net/route.h> (x86-64 layout).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

const RTF_UP: libc::c_ushort = 0x1;
const RTF_GATEWAY: libc::c_ushort = 0x2;

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain C structs;
    // the kernel reads this one as the family says.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

impl Ioctls {
    fn new() -> io::Result<Self> {
        // SAFETY: socket() has no memory effects; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Ioctls(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn request(device: &str) -> io::Result<libc::ifreq> {
        if device.len() >= libc::IFNAMSIZ {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: ifreq is plain C data; all zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(device.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(req)
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        // SAFETY: every request used here reads or writes one `T` (ifreq
        // or rtentry) through the pointer, which is live for the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, arg as *mut T) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_mac(&self, device: &str, mac: MacAddress) -> io::Result<()> {
        let mut req = Self::request(device)?;
        // SAFETY: writing the hwaddr member of the request's union.
        unsafe {
            req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (dst, src) in req
                .ifr_ifru
                .ifru_hwaddr
                .sa_data
                .iter_mut()
                .zip(mac.octets())
            {
                *dst = src as libc::c_char;
            }
        }
        self.ioctl(libc::SIOCSIFHWADDR, &mut req)
    }

    fn set_up(&self, device: &str) -> io::Result<()> {
        let mut req = Self::request(device)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }

    fn set_address(&self, device: &str, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut req = Self::request(device)?;
        req.ifr_ifru.ifru_addr = sockaddr_in(ip);
        self.ioctl(libc::SIOCSIFADDR, &mut req)?;
        let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix)));
        let mut req = Self::request(device)?;
        req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
        self.ioctl(libc::SIOCSIFNETMASK, &mut req)
    }

    fn add_default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut route = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_in(gateway),
            rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_flags: RTF_UP | RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        match self.ioctl(libc::SIOCADDRT, &mut route) {
            // Already there (a restarted network re-attaching).
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }
}
