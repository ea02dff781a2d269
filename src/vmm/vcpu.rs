//! A vCPU thread: `KVM_RUN`, dispatch the exit to a bus, repeat.
//!
//! Nothing slow happens here: devices on the buses only touch memory.
//! A stop request is noticed between runs; the VMM interrupts a vCPU that
//! is inside `KVM_RUN` (e.g. halted) with a signal (see `kick_signal`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::boot_timer::BootTimeline;
use super::error::VmmError;
use super::exit::{ExitReason, ExitSignal};
use super::kvm::{is_pvm_host, PVM_HINT};
use super::pause::VcpuGate;
use super::progress::ExitCounter;
use crate::arch::x86_64::regs::{boot_fpu, boot_regs, boot_sregs, BootEntry};
use crate::arch::x86_64::{cpuid, msrs};
use crate::devices::Bus;

/// LAPIC local vector table entries for LINT0/LINT1 and their delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// `kvm_run.internal.suberror` value for an instruction KVM could not emulate.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

/// The signal used to pull a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process: its only job is to
/// make `KVM_RUN` return `EINTR`.
pub fn install_kick_handler() -> Result<(), VmmError> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), ignore_signal)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| VmmError::Io {
            what: "install the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(errno),
        })
}

/// What every vCPU thread of a VM shares.
pub struct VcpuShared {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: ExitSignal,
    pub timeline: Arc<BootTimeline>,
    pub exits: ExitCounter,
    /// Where the vCPUs park while the guest is paused.
    pub gate: Arc<VcpuGate>,
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: ExitSignal,
    timeline: Arc<BootTimeline>,
    exits: ExitCounter,
    gate: Arc<VcpuGate>,
}

/// What to do after one exit, decided while the exit borrows the vCPU.
enum Next {
    Continue,
    Stop(ExitReason),
    TripleFault,
    Failure(String),
}

impl Vcpu {
    pub fn new(index: u8, fd: VcpuFd, shared: &VcpuShared) -> Self {
        Vcpu {
            index,
            fd,
            pio: shared.pio.clone(),
            mmio: shared.mmio.clone(),
            exit: shared.exit.clone(),
            timeline: shared.timeline.clone(),
            exits: shared.exits.clone(),
            gate: shared.gate.clone(),
        }
    }

    /// Sets CPUID, MSRs, FPU and LAPIC for vCPU `index` of `cpus`; the boot
    /// vCPU also gets its entry registers (the others wait for INIT/SIPI).
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        cpus: u8,
        boot: Option<(&BootEntry, u64)>,
    ) -> Result<(), VmmError> {
        let entries = cpuid::vcpu_cpuid(supported_cpuid.as_slice(), self.index, cpus);
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| VmmError::device("CPUID")(format!("{e:?}")))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(VmmError::kvm("set the vCPU's CPUID"))?;

        let boot_msrs = msrs::boot_msrs();
        let msrs = Msrs::from_entries(&boot_msrs)
            .map_err(|e| VmmError::device("MSRs")(format!("{e:?}")))?;
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(VmmError::kvm("set boot MSRs"))?;
        if written != boot_msrs.len() {
            let failed = boot_msrs[written].index;
            return Err(VmmError::device("MSRs")(format!(
                "KVM refused MSR {failed:#x}"
            )));
        }
        self.fd
            .set_fpu(&boot_fpu())
            .map_err(VmmError::kvm("set the FPU state"))?;
        self.configure_lapic()?;

        if let Some((entry, cr3)) = boot {
            let current = self
                .fd
                .get_sregs()
                .map_err(VmmError::kvm("read segment registers"))?;
            self.fd
                .set_sregs(&boot_sregs(&current, entry.mode, cr3))
                .map_err(VmmError::kvm("set segment registers"))?;
            self.fd
                .set_regs(&boot_regs(entry))
                .map_err(VmmError::kvm("set registers"))?;
        }
        Ok(())
    }

    /// LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware leaves them.
    fn configure_lapic(&self) -> Result<(), VmmError> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(VmmError::kvm("read the LAPIC"))?;
        let set_mode = |regs: &mut [libc::c_char], offset: usize, mode: u32| {
            let mut bytes = [0u8; 4];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = regs[offset + i] as u8;
            }
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                regs[offset + i] = *b as libc::c_char;
            }
        };
        set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(VmmError::kvm("set the LAPIC"))
    }

    /// A short register dump for failure messages.
    fn register_dump(&self) -> String {
        let regs = self.fd.get_regs().unwrap_or_else(|_| kvm_regs::default());
        let sregs = self.fd.get_sregs().unwrap_or_else(|_| kvm_sregs::default());
        let mut dump = format!(
            "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
            regs.rip, regs.rsp, regs.rflags, sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer, sregs.cs.selector
        );
        // On AMD, KVM resets a vCPU after a shutdown (triple fault) exit,
        // so what it reports then is the reset vector, not the fault.
        if regs.rip == 0xfff0 && sregs.cs.selector == 0xf000 {
            dump.push_str(" (KVM already reset this vCPU: the faulting state is lost)");
        }
        dump
    }

    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member of the union because the
        // exit reason is KVM_EXIT_INTERNAL_ERROR; it is plain data.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    fn failure(&mut self, what: String) -> ExitReason {
        let pvm = is_pvm_host();
        ExitReason::KvmFailure {
            vcpu: self.index,
            what,
            registers: self.register_dump(),
            hint: pvm.then(|| PVM_HINT.to_string()),
        }
    }

    fn step(&mut self) -> Next {
        let result = self.fd.run();
        self.exits.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    self.pio.read(u64::from(port), data);
                    log::trace!("vCPU {}: in {port:#x} -> {data:x?}", self.index);
                    Next::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    log::trace!("vCPU {}: out {port:#x} <- {data:x?}", self.index);
                    self.pio.write(u64::from(port), data);
                    Next::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                    log::trace!("vCPU {}: read {addr:#x} -> {data:x?}", self.index);
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    log::trace!("vCPU {}: write {addr:#x} <- {data:x?}", self.index);
                    self.mmio.write(addr, data);
                    Next::Continue
                }
                VcpuExit::Hlt => Next::Stop(ExitReason::Halted),
                VcpuExit::Shutdown => Next::TripleFault,
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(ExitReason::PowerOff),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Stop(ExitReason::Reset),
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => Next::Stop(ExitReason::GuestPanic),
                    other => {
                        crate::warn_limited!("vCPU {}: ignoring system event {other}", self.index);
                        Next::Continue
                    }
                },
                VcpuExit::InternalError => Next::Failure(String::new()),
                VcpuExit::FailEntry(reason, cpu) => Next::Failure(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
                )),
                VcpuExit::Intr => {
                    log::trace!("vCPU {}: interrupted", self.index);
                    Next::Continue
                }
                other => {
                    crate::warn_limited!("vCPU {}: unexpected exit {other:?}", self.index);
                    Next::Continue
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                log::trace!("vCPU {}: KVM_RUN {e}", self.index);
                Next::Continue
            }
            Err(e) => Next::Failure(format!("KVM_RUN failed: {e}")),
        }
    }

    /// Runs until the VM is asked to stop, or this vCPU ends it.
    pub fn run(mut self) {
        let gate = self.gate.clone();
        let _at_gate = gate.register();
        if self.index == 0 {
            self.timeline.record_first_entry();
        }
        while !self.exit.is_requested() {
            // Parks here while the guest is paused (a live snapshot).
            gate.checkpoint();
            if self.exit.is_requested() {
                break;
            }
            match self.step() {
                Next::Continue => {}
                Next::Stop(reason) => self.exit.request(reason),
                Next::TripleFault => {
                    let registers = self.register_dump();
                    self.exit.request(ExitReason::TripleFault {
                        vcpu: self.index,
                        registers,
                    });
                }
                Next::Failure(what) if what.is_empty() => {
                    let suberror = self.internal_suberror();
                    let what = if suberror == KVM_INTERNAL_ERROR_EMULATION {
                        "KVM internal error: instruction emulation failed (suberror 1)".to_string()
                    } else {
                        format!("KVM internal error (suberror {suberror})")
                    };
                    let reason = self.failure(what);
                    self.exit.request(reason);
                }
                Next::Failure(what) => {
                    let reason = self.failure(what);
                    self.exit.request(reason);
                }
            }
        }
        log::debug!("vCPU {} stopped at {}", self.index, self.register_dump());
    }
}
