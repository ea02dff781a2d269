//! The PC-compatible and platform devices every vmlab guest has.

mod acpi_pm;
mod boot_timer;
mod cmos_rtc;
mod host_clock;
mod i8042;
mod pvpanic;
mod serial;

pub use acpi_pm::AcpiPmRegisters;
pub use boot_timer::BootTimerPort;
pub use cmos_rtc::{CmosRtc, CMOS_RTC_LEN};
pub use host_clock::{HostClock, HOST_CLOCK_LEN};
pub use i8042::I8042;
pub use pvpanic::PvPanic;
pub use serial::{EventFdTrigger, Serial, SerialSnapshot};
