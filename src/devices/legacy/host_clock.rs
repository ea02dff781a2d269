//! The host's wall clock, for the guest to step its own after a resume
//! (a resumed VM's kvm-clock goes on from where it was suspended, so its
//! wall clock is behind by the time it was suspended; see `vmstate::platform`).
//!
//! Sixteen read-only ports at `HOST_CLOCK_PORT`, two little-endian u64:
//! bytes 0-7 the host's time now, in ns since the Unix epoch, taken when
//! byte 0 is read (so a byte-at-a-time reader sees one value); bytes 8-15
//! the host's time when this VM process started running the guest, which
//! changes at each resume: a guest that sees it change steps its clock.
//! Linux guests read them with `dd if=/dev/port bs=8 skip=...`, as the
//! Debian guest's init does (guest/debian/rootfs/sbin/vmlab-init).

use crate::devices::BusDevice;

/// Bytes in the port range.
pub const HOST_CLOCK_LEN: u16 = 16;

pub struct HostClock {
    /// When this process began running the guest (ns since the epoch).
    run_started_ns: u64,
    latched_ns: u64,
}

impl HostClock {
    pub fn new(run_started_ns: u64) -> Self {
        HostClock {
            run_started_ns,
            latched_ns: run_started_ns,
        }
    }
}

impl BusDevice for HostClock {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset == 0 {
            self.latched_ns = crate::vmstate::now_ns();
        }
        let mut bytes = [0u8; HOST_CLOCK_LEN as usize];
        bytes[..8].copy_from_slice(&self.latched_ns.to_le_bytes());
        bytes[8..].copy_from_slice(&self.run_started_ns.to_le_bytes());
        for (i, out) in data.iter_mut().enumerate() {
            *out = usize::try_from(offset)
                .ok()
                .and_then(|o| bytes.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Read-only: writes are ignored.
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_u64(dev: &mut HostClock, at: u64, bytewise: bool) -> u64 {
        let mut bytes = [0u8; 8];
        if bytewise {
            for (i, b) in bytes.iter_mut().enumerate() {
                dev.read(0x520, at + i as u64, std::slice::from_mut(b));
            }
        } else {
            dev.read(0x520, at, &mut bytes);
        }
        u64::from_le_bytes(bytes)
    }

    #[test]
    fn gives_the_host_time_and_when_the_run_started() {
        let started = crate::vmstate::now_ns() - 5_000_000_000;
        let mut dev = HostClock::new(started);
        let before = crate::vmstate::now_ns();
        let now = read_u64(&mut dev, 0, true);
        assert!(
            now >= before && now - before < 1_000_000_000,
            "{now} {before}"
        );
        assert_eq!(read_u64(&mut dev, 8, false), started);
        assert_eq!(read_u64(&mut dev, 8, true), started);
        // Past the range, and writes: nothing.
        let mut beyond = [0xffu8; 4];
        dev.read(0x520, 14, &mut beyond);
        assert_eq!(beyond[2..], [0, 0]);
        dev.write(0x520, 0, &[1; 8]);
        assert_eq!(read_u64(&mut dev, 8, false), started);
    }
}
