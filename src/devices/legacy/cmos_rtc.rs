//! The PC's CMOS real-time clock (MC146818 registers at ports 0x70-0x71),
//! reading the host's UTC time whenever the guest reads it.
//!
//! Why vmlab has one: a resumed VM's kernel clock goes on from where it was
//! suspended, and a guest needs the host's time to step it. Debian's cloud
//! kernel has no `/dev/port` for the host-clock ports (`host_clock`), and
//! userspace port I/O is not something to build on; its `rtc_cmos` driver
//! reads these registers in the kernel, so `/sys/class/rtc/rtc0/since_epoch`
//! is the host's time to the second (the full Debian guest's resume hook
//! uses it; `hwclock` and `timedatectl` show it too).
//!
//! The clock follows the host: writes to the time and date registers are
//! ignored (as a VM's clock follows the host in QEMU's `-rtc base=utc`
//! until the guest sets it; vmlab keeps no offset). Status B's 24-hour and
//! binary-mode bits are the guest's to choose; there are no interrupts
//! (no periodic, alarm or update IRQ: Linux then runs it without alarms)
//! and the update-in-progress bit is never set, since a read always sees
//! one whole second. The other bytes are plain CMOS RAM, lost with the
//! process (not part of a snapshot).

use crate::arch::x86_64::layout::CMOS_CENTURY as CENTURY;
use crate::civil_time::CivilTime;
use crate::devices::BusDevice;

/// Ports in the range: the index register, then the data register.
pub const CMOS_RTC_LEN: u16 = 2;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;

/// Status A: the 32.768 kHz time base and 1024 Hz rate PCs boot with.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B: 24-hour mode (bit 1) and BCD (bit 2 clear), as a PC's BIOS
/// leaves it.
const STATUS_B_DEFAULT: u8 = 0x02;
const B_24_HOUR: u8 = 1 << 1;
const B_BINARY: u8 = 1 << 2;
/// Status B's interrupt enables and SET: kept clear (none is implemented).
const B_UNSUPPORTED: u8 = 0xf0;
/// Status D: VRT, the battery is good and the time valid.
const STATUS_D_VALID: u8 = 0x80;

fn to_bcd(v: u8) -> u8 {
    (v / 10) << 4 | (v % 10)
}

pub struct CmosRtc {
    index: u8,
    status_b: u8,
    ram: [u8; 128],
    /// The host's time, in seconds since the epoch (a seam for tests).
    now: fn() -> i64,
}

fn host_now() -> i64 {
    (crate::vmstate::now_ns() / 1_000_000_000) as i64
}

impl Default for CmosRtc {
    fn default() -> Self {
        CmosRtc::with_clock(host_now)
    }
}

impl CmosRtc {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_clock(now: fn() -> i64) -> Self {
        CmosRtc {
            index: 0,
            status_b: STATUS_B_DEFAULT,
            ram: [0; 128],
            now,
        }
    }

    /// A time or date register as the guest's mode asks (BCD or binary,
    /// 12- or 24-hour).
    fn format(&self, value: u8) -> u8 {
        if self.status_b & B_BINARY != 0 {
            value
        } else {
            to_bcd(value)
        }
    }

    fn hours(&self, hour: u8) -> u8 {
        if self.status_b & B_24_HOUR != 0 {
            return self.format(hour);
        }
        // 12-hour mode: 12, 1..11 with bit 7 for PM.
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.format(h12) | pm
    }

    fn register(&self, index: u8) -> u8 {
        let time = || CivilTime::from_unix((self.now)());
        match index {
            SECONDS => self.format(time().second),
            MINUTES => self.format(time().minute),
            HOURS => self.hours(time().hour),
            WEEKDAY => self.format(time().weekday),
            DAY => self.format(time().day),
            MONTH => self.format(time().month),
            YEAR => self.format(time().year.rem_euclid(100) as u8),
            CENTURY => self.format(time().year.div_euclid(100).clamp(0, 99) as u8),
            STATUS_A => STATUS_A_DEFAULT,
            STATUS_B => self.status_b,
            STATUS_C => 0,
            STATUS_D => STATUS_D_VALID,
            _ => self.ram[usize::from(index)],
        }
    }

    fn set_register(&mut self, index: u8, value: u8) {
        match index {
            SECONDS..=YEAR | CENTURY => {
                crate::debug_limited!(
                    "cmos rtc: the guest set register {index:#x}: the clock follows the host"
                )
            }
            STATUS_B => self.status_b = value & !B_UNSUPPORTED,
            STATUS_A | STATUS_C | STATUS_D => {}
            _ => self.ram[usize::from(index)] = value,
        }
    }
}

impl BusDevice for CmosRtc {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            1 => self.register(self.index),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 is the NMI mask on PCs: not a register bit.
            0 => self.index = value & 0x7f,
            1 => self.set_register(self.index, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-03 14:05:09 UTC, a Thursday.
    fn fixed() -> i64 {
        1_796_306_709
    }

    fn read(rtc: &mut CmosRtc, index: u8) -> u8 {
        rtc.write(0x70, 0, &[index]);
        let mut b = [0u8];
        rtc.read(0x70, 1, &mut b);
        b[0]
    }

    #[test]
    fn reads_the_time_in_bcd_24_hour_mode_as_pcs_boot() {
        let mut rtc = CmosRtc::with_clock(fixed);
        assert_eq!(read(&mut rtc, SECONDS), 0x09);
        assert_eq!(read(&mut rtc, MINUTES), 0x05);
        assert_eq!(read(&mut rtc, HOURS), 0x14);
        assert_eq!(read(&mut rtc, WEEKDAY), 0x05);
        assert_eq!(read(&mut rtc, DAY), 0x03);
        assert_eq!(read(&mut rtc, MONTH), 0x12);
        assert_eq!(read(&mut rtc, YEAR), 0x26);
        assert_eq!(read(&mut rtc, CENTURY), 0x20);
        assert_eq!(read(&mut rtc, STATUS_A) & 0x80, 0, "never updating");
        assert_eq!(read(&mut rtc, STATUS_D), 0x80, "valid");
    }

    #[test]
    fn follows_the_guests_binary_and_12_hour_modes() {
        let mut rtc = CmosRtc::with_clock(fixed);
        rtc.write(0x70, 0, &[STATUS_B]);
        rtc.write(0x70, 1, &[B_BINARY | B_24_HOUR]);
        assert_eq!(read(&mut rtc, HOURS), 14);
        assert_eq!(read(&mut rtc, MONTH), 12);
        rtc.write(0x70, 0, &[STATUS_B]);
        rtc.write(0x70, 1, &[B_BINARY]);
        assert_eq!(read(&mut rtc, HOURS), 0x80 | 2, "2 PM");
        // Interrupt enables are not kept: there are none.
        rtc.write(0x70, 0, &[STATUS_B]);
        rtc.write(0x70, 1, &[0x70 | B_24_HOUR]);
        assert_eq!(read(&mut rtc, STATUS_B), B_24_HOUR);
    }

    #[test]
    fn time_writes_in_a_loop_log_a_few_lines() {
        let mut rtc = CmosRtc::with_clock(fixed);
        let lines = crate::logging::capture::lines(|| {
            for _ in 0..1000 {
                rtc.write(0x70, 0, &[SECONDS]);
                rtc.write(0x70, 1, &[0]);
            }
        });
        assert_eq!(lines.len(), crate::rate_limit::LOG_BURST as usize);
    }

    #[test]
    fn time_writes_leave_the_host_clock_and_ram_keeps_its_bytes() {
        let mut rtc = CmosRtc::with_clock(fixed);
        rtc.write(0x70, 0, &[HOURS]);
        rtc.write(0x70, 1, &[0x03]);
        assert_eq!(read(&mut rtc, HOURS), 0x14);
        // The NMI mask bit selects nothing.
        rtc.write(0x70, 0, &[0x80 | 0x40]);
        rtc.write(0x70, 1, &[0xab]);
        assert_eq!(read(&mut rtc, 0x40), 0xab);
        assert_eq!(read(&mut rtc, 0x7f), 0);
    }
}
