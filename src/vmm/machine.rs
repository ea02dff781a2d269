//! The VM: built from a `VmConfig`, run until it stops.
//!
//! Threads: one per vCPU (`KVM_RUN` loop), plus the calling thread, which
//! runs the event loop (console input, signals, and later virtio devices)
//! until a stop is requested, then kicks and joins the vCPUs.

use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use super::boot_timer::BootTimeline;
use super::config::{BootSource, ConsoleInput as InputSource, VmConfig, BASE_CMDLINE};
use super::console::{ConsoleInput, RawTerminal};
use super::error::VmmError;
use super::exit::{ExitReason, ExitSignal};
use super::footprint::{self, Footprint};
use super::kvm;
use super::live_snapshot::{LiveDisk, LiveDisks};
use super::memory::{self, GuestMemoryMmap};
use super::pause::VcpuGate;
use super::power_button::PowerButton;
use super::progress::{ExitCounter, StallWatchdog};
use super::signals::TerminationSignals;
use super::suspend::{SuspendDevice, Suspender, VcpuCaptures};
use super::vcpu::{install_kick_handler, kick_signal, Vcpu, VcpuShared};
use super::vmgenid::{self, VmGenId};
use crate::arch::x86_64::acpi::VirtioMmioSlot;
use crate::arch::x86_64::boot::{setup_boot, BootConfig, BootError};
use crate::arch::x86_64::gdt::EntryMode;
use crate::arch::x86_64::kernel::check_images;
use crate::arch::x86_64::layout::{
    ram_regions, ACPI_SLEEP_CONTROL_PORT, BOOT_TIMER_PORT, CMOS_RTC_PORT, GDT_ADDR,
    HOST_CLOCK_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR,
    PVPANIC_PORT, SERIAL_IRQ, SERIAL_PORT,
};
use crate::arch::x86_64::layout::{
    FIRST_DEVICE_GSI, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START, VMGENID_GSI,
};
use crate::arch::x86_64::paging;
use crate::arch::x86_64::regs::{gdt_bytes, BootEntry};
use crate::arch::x86_64::reset_vector::write_reset_entry;
use crate::cli::DiskSpec;
use crate::devices::bus::lock;
use crate::devices::legacy::{
    AcpiPmRegisters, BootTimerPort, CmosRtc, HostClock, PvPanic, Serial, CMOS_RTC_LEN,
    HOST_CLOCK_LEN, I8042,
};
use crate::devices::virtio::block::{disk_serial, Block};
use crate::devices::virtio::events::QueueEvents;
use crate::devices::virtio::events::QueueHandler;
use crate::devices::virtio::io_thread::IoThread;
use crate::devices::virtio::mmio::REG_QUEUE_NOTIFY;
use crate::devices::virtio::net::{Net, NetEvents};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::{MmioTransport, VirtioDevice, VirtioInterrupt};
use crate::devices::Bus;
use crate::net::{NatSnapshot, NatView};
use crate::seccomp::ThreadClass;
use crate::vmstate::{spec::VMLAB_VERSION, MachineSpec, SavedState, StateError};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the event loop when a stop is requested.
struct StopWatcher(ExitSignal);

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event().read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            log::error!("cannot watch for stop requests: {e:?}");
        }
    }
}

/// A VM ready to run.
pub struct Vm {
    // Field order matters for drop: vCPUs and the VM fd go before memory.
    vcpus: Vec<Vcpu>,
    events: EventManager<Subscriber>,
    /// Device I/O threads (one per disk), stopped once the vCPUs are.
    io_threads: Vec<IoThread>,
    _vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
    serial: Arc<Mutex<Serial>>,
    console_input: InputSource,
    exit: ExitSignal,
    timeline: Arc<BootTimeline>,
    exits: ExitCounter,
    power_button: PowerButton,
    /// What `vmlab nat show` reads; set when a network card is attached.
    nat_view: Option<Arc<dyn NatView>>,
    /// Where the vCPUs park while the guest is paused.
    gate: Arc<VcpuGate>,
    live_disks: Arc<LiveDisks>,
    suspender: Arc<Suspender>,
}

impl Vm {
    /// Creates the VM, loads the guest and sets up devices and vCPUs.
    pub fn build(mut config: VmConfig) -> Result<Vm, VmmError> {
        if let BootSource::Linux { kernel, initrd, .. } = &config.boot {
            check_images(kernel, initrd.as_ref()).map_err(BootError::from)?;
        }
        // A state to resume is read and checked before anything is built.
        let saved = config.resume.as_deref().map(SavedState::open).transpose()?;
        // Disks before anything else: a missing or locked image fails at
        // once, before the guest starts.
        let disks = open_disks(&config.name, &config.disks, &config.backing_policy)?;
        let mut devices = vec!["virtio-rng".to_string()];
        for (spec, disk) in config.disks.iter().zip(&disks) {
            devices.push(format!(
                "virtio-blk {} bytes{}",
                disk.worker().lock().map_or(0, |w| w.backend().size()),
                if spec.read_only { " read-only" } else { "" }
            ));
        }
        for _ in &config.nets {
            devices.push("virtio-net".into());
        }
        // Not a virtio device; named so that a state saved before vmlab had
        // it (its guest never bound it) is refused.
        devices.push("vmgenid".into());
        let spec = MachineSpec {
            vmlab_version: VMLAB_VERSION.into(),
            cpus: config.cpus,
            mem_size: config.mem_size,
            devices,
        };
        if let Some(saved) = &saved {
            spec.check(&saved.state.spec)?;
        }
        let gate = Arc::new(VcpuGate::new(usize::from(config.cpus)));
        let live_disks = Arc::new(LiveDisks::new(
            gate.clone(),
            config
                .disks
                .iter()
                .zip(&disks)
                .map(|(spec, block)| LiveDisk {
                    path: spec.path.clone(),
                    read_only: spec.read_only,
                    worker: block.worker(),
                })
                .collect(),
            config.backing_policy.clone(),
        ));
        let kvm = kvm::open()?;
        let max = kvm::max_vcpus(&kvm);
        if usize::from(config.cpus) > max || config.cpus == 0 {
            return Err(VmmError::TooManyCpus {
                requested: config.cpus,
                max,
            });
        }
        memory::check_size(config.mem_size)?;

        let vm = kvm.create_vm().map_err(VmmError::kvm("create a VM"))?;
        vm.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(VmmError::kvm("set the TSS address"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(VmmError::kvm("set the identity map address"))?;
        vm.create_irq_chip()
            .map_err(VmmError::kvm("create the in-kernel interrupt controllers"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(VmmError::kvm("create the in-kernel PIT"))?;

        let mem = memory::create(config.mem_size)?;
        if let Some(saved) = &saved {
            crate::vmstate::memory::map(&mem, &saved.file, saved.memory_offset)?;
        }
        memory::register(&vm, &mem)?;
        let ram = ram_regions(config.mem_size);

        let mut virtio: Vec<Attached> = virtio_devices(disks)?
            .into_iter()
            .map(Attached::Queues)
            .collect();
        // `nat show` shows the first card's NAT (eth0's, the one ssh and
        // the forwards of a one-card VM go through).
        let mut nat_view: Option<Arc<dyn NatView>> = None;
        for mut net in std::mem::take(&mut config.nets) {
            let view = net.nat_view.take();
            let net = Arc::new(Mutex::new(Net::new(net)));
            if nat_view.is_none() {
                nat_view = Some(view.unwrap_or_else(|| Arc::new(NetNatView(net.clone()))));
            }
            virtio.push(Attached::Net(net));
        }
        let slots = virtio_slots(virtio.len())?;

        let boot = match &config.boot {
            _ if saved.is_some() => None,
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let full_cmdline = format!("{BASE_CMDLINE} {cmdline}");
                let setup = setup_boot(
                    &mem,
                    &BootConfig {
                        kernel,
                        initrd: initrd.as_ref(),
                        cmdline: &full_cmdline,
                        cpus: config.cpus,
                        ram: &ram,
                        virtio: &slots,
                    },
                )?;
                log::info!(
                    "booting {} at {:#x} with {} vCPU(s), {} MiB",
                    setup.format,
                    setup.entry.entry_point,
                    config.cpus,
                    config.mem_size >> 20
                );
                Some((setup.entry, setup.cr3))
            }
            BootSource::Flat { image, load_addr } => Some(load_flat(&mem, image, *load_addr)?),
        };
        if boot.is_some() {
            // A resumed machine has it in its saved memory.
            write_reset_entry(&mem).map_err(|e| VmmError::GuestMemory(e.to_string()))?;
        }

        let genid = VmGenId::new(&vm)?;
        let new_generation = match (&saved, &config.new_generation) {
            (None, _) => Some(format!("hostname={}\n", config.name)),
            (Some(_), note) => note.clone(),
        };
        if let Some(note) = &new_generation {
            vmgenid::write(&mem, &vmgenid::random_id()?, note)?;
        }

        let exit = ExitSignal::new().map_err(VmmError::io("create the stop event"))?;
        let timeline = BootTimeline::new(config.started, config.boot_timer);
        let serial_irq = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
            .map_err(VmmError::io("create the UART interrupt"))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(VmmError::kvm("route the UART interrupt"))?;
        let serial = Arc::new(Mutex::new(
            Serial::new(serial_irq, config.console.output)
                .map_err(VmmError::io("create the UART"))?,
        ));
        let pio = Arc::new(legacy_bus(&serial, &exit, &timeline)?);
        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(|e| VmmError::device("event loop")(format!("{e:?}")))?;
        let mut mmio = Bus::new();
        let mut io_threads = Vec::new();
        let mut attached = Vec::new();
        for (index, (device, slot)) in virtio.into_iter().zip(&slots).enumerate() {
            let mut io = attach_virtio(&vm, &mem, &mut mmio, &mut events, *slot, device)?;
            if let Some(handler) = io.own_thread.take() {
                let thread = IoThread::spawn(&format!("virtio{index}-io"), handler)
                    .map_err(VmmError::io("start a device I/O thread"))?;
                io_threads.push(thread);
            }
            attached.push(io);
        }
        let mmio = Arc::new(mmio);

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::kvm("report supported CPUID"))?;
        let power_button = PowerButton::new(&vm)?;
        let exits = ExitCounter::default();
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(VmmError::kvm("list the MSRs to save"))?
            .as_slice()
            .to_vec();
        let captures = Arc::new(VcpuCaptures::new(msr_indices));
        let shared = VcpuShared {
            pio,
            mmio,
            exit: exit.clone(),
            timeline: timeline.clone(),
            exits: exits.clone(),
            gate: gate.clone(),
            captures: captures.clone(),
        };
        let vcpus = match (&saved, &boot) {
            (Some(saved), _) => {
                let vcpus = resume_vcpus(&vm, config.cpus, &supported, saved, &shared)?;
                resume_devices(&vm, saved, &serial, &attached)?;
                vcpus
            }
            (None, Some((entry, cr3))) => {
                create_vcpus(&vm, config.cpus, &supported, entry, *cr3, &shared)?
            }
            (None, None) => unreachable!("a VM not resumed is booted"),
        };
        if saved.is_some() && new_generation.is_some() {
            // Raised once the chips are restored: delivered at the guest's
            // first instruction.
            genid.notify()?;
        }
        timeline.record_vmm_ready();

        let vm = Arc::new(vm);
        let suspender = Arc::new(Suspender {
            vm: vm.clone(),
            gate: gate.clone(),
            captures,
            memory: mem.clone(),
            serial: serial.clone(),
            devices: attached
                .iter()
                .map(|a| SuspendDevice {
                    transport: a.transport.clone(),
                    device: a.device.clone(),
                    io_handler: a.io_handler.clone(),
                })
                .collect(),
            spec,
            disks: live_disks.clone(),
            resumed_from: match &saved {
                Some(saved) => Some(
                    saved
                        .file
                        .try_clone()
                        .map_err(VmmError::io("keep the state file open"))?,
                ),
                None => None,
            },
            exit: exit.clone(),
            done: Mutex::new(false),
        });

        Ok(Vm {
            vcpus,
            events,
            io_threads,
            _vm: vm,
            memory: mem,
            serial,
            console_input: config.console.input,
            exit,
            timeline,
            exits,
            power_button,
            nat_view,
            gate,
            live_disks,
            suspender,
        })
    }

    /// What `vmlab suspend` calls to save this VM and end it.
    pub fn suspender(&self) -> Arc<Suspender> {
        self.suspender.clone()
    }

    /// The VM's disks, for live snapshots from the control socket.
    pub fn live_disks(&self) -> Arc<LiveDisks> {
        self.live_disks.clone()
    }

    /// The ACPI power button, to ask the guest to power off.
    pub fn power_button(&self) -> PowerButton {
        self.power_button.clone()
    }

    /// The NAT's flow table and counters for the control socket, when the
    /// VM has a network card.
    pub fn nat_view(&self) -> Option<Arc<dyn NatView>> {
        self.nat_view.clone()
    }

    pub fn timeline(&self) -> Arc<BootTimeline> {
        self.timeline.clone()
    }

    /// Handle to stop this VM from another thread.
    pub fn exit_signal(&self) -> ExitSignal {
        self.exit.clone()
    }

    /// Memory cost of the VM so far (see `footprint`).
    pub fn footprint(&self) -> Option<Footprint> {
        footprint::measure(&self.memory)
    }

    /// Runs the VM until it stops; returns why and the final footprint.
    pub fn run(self) -> Result<ExitReason, VmmError> {
        self.run_measured().map(|(reason, _)| reason)
    }

    /// Runs the VM until it stops; returns why, and the memory footprint
    /// measured once the vCPUs have stopped.
    pub fn run_measured(mut self) -> Result<(ExitReason, Option<Footprint>), VmmError> {
        install_kick_handler()?;
        let mut events = std::mem::replace(
            &mut self.events,
            EventManager::new().map_err(|e| VmmError::device("event loop")(format!("{e:?}")))?,
        );
        events.add_subscriber(Arc::new(Mutex::new(StopWatcher(self.exit.clone()))));
        let signals = TerminationSignals::install(self.exit.clone())
            .map_err(VmmError::io("install signal handlers"))?;
        events.add_subscriber(Arc::new(Mutex::new(signals)));

        // The terminal guard lives until the vCPUs are joined, so every way
        // out of this function restores the terminal.
        let mut _raw_terminal = None;
        let input = match std::mem::replace(&mut self.console_input, InputSource::None) {
            InputSource::Stdin => {
                _raw_terminal = RawTerminal::enable(libc::STDIN_FILENO);
                Some((
                    ConsoleInput::stdin_fd().map_err(VmmError::io("read stdin"))?,
                    _raw_terminal.is_some(),
                ))
            }
            InputSource::Fd(fd) => Some((fd, false)),
            InputSource::None => None,
        };
        if let Some((fd, escapes)) = input {
            set_nonblocking(fd.as_raw_fd()).map_err(VmmError::io("configure console input"))?;
            let console = ConsoleInput::new(fd, escapes, self.serial.clone(), self.exit.clone());
            events.add_subscriber(Arc::new(Mutex::new(console)));
        }

        if kvm::is_pvm_host() {
            let watchdog =
                StallWatchdog::new(self.exits.clone(), self.timeline.clone(), self.exit.clone())
                    .map_err(VmmError::io("start the stall watchdog"))?;
            events.add_subscriber(Arc::new(Mutex::new(watchdog)));
        }
        // Every thread is under its filter before the guest's first
        // instruction: the vCPUs wait for the event loop's.
        let (threads, gates) = self.start_vcpus();
        let filtered = crate::seccomp::install(ThreadClass::EventLoop);
        for gate in gates {
            let _ = gate.send(filtered.is_ok());
        }
        if let Err(e) = filtered {
            stop_vcpus(threads);
            return Err(e.into());
        }
        while !self.exit.is_requested() {
            if let Err(e) = events.run_with_timeout(-1) {
                log::error!("event loop failed: {e:?}");
                self.exit.request(ExitReason::KvmFailure {
                    vcpu: 0,
                    what: format!("vmlab's event loop failed: {e:?}"),
                    registers: String::new(),
                    hint: None,
                });
            }
        }
        // Parked vCPUs must see the stop too.
        self.gate.close();
        stop_vcpus(threads);
        // In-flight disk requests finish; the images close (qcow2 metadata
        // written back) when the devices drop with this Vm.
        for thread in self.io_threads.drain(..) {
            thread.stop();
        }
        let footprint = self.footprint();
        Ok((self.exit.reason().unwrap_or(ExitReason::Halted), footprint))
    }

    /// Starts the vCPU threads, each under its seccomp filter and waiting
    /// at its gate: `true` there lets it enter the guest.
    fn start_vcpus(&mut self) -> (Vec<JoinHandle<()>>, Vec<mpsc::Sender<bool>>) {
        let mut threads = Vec::new();
        let mut gates = Vec::new();
        for (index, vcpu) in self.vcpus.drain(..).enumerate() {
            let (open, gate) = mpsc::channel();
            let exit = self.exit.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    if let Err(e) = crate::seccomp::install(ThreadClass::Vcpu) {
                        exit.request(ExitReason::KvmFailure {
                            vcpu: index as u8,
                            what: e.to_string(),
                            registers: String::new(),
                            hint: None,
                        });
                        return;
                    }
                    if gate.recv() == Ok(true) {
                        vcpu.run();
                    }
                });
            match spawned {
                Ok(handle) => {
                    threads.push(handle);
                    gates.push(open);
                }
                Err(e) => {
                    self.exit.request(ExitReason::KvmFailure {
                        vcpu: index as u8,
                        what: format!("cannot start the vCPU thread: {e}"),
                        registers: String::new(),
                        hint: None,
                    });
                    break;
                }
            }
        }
        (threads, gates)
    }
}

/// Interrupts every vCPU until its thread has finished, then joins it. A
/// signal can arrive just before a thread enters `KVM_RUN`, so it is resent.
fn stop_vcpus(threads: Vec<JoinHandle<()>>) {
    for handle in threads {
        while !handle.is_finished() {
            if let Err(e) = handle.kill(kick_signal()) {
                log::warn!("cannot signal a vCPU thread: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if handle.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

fn set_nonblocking(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, result checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The port-I/O devices every guest gets.
fn legacy_bus(
    serial: &Arc<Mutex<Serial>>,
    exit: &ExitSignal,
    timeline: &Arc<BootTimeline>,
) -> Result<Bus, VmmError> {
    let mut bus = Bus::new();
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
    let placed = [
        (serial.clone() as _, SERIAL_PORT, 8),
        (i8042.clone() as _, I8042_DATA_PORT, 1),
        (i8042 as _, I8042_COMMAND_PORT, 1),
        (
            Arc::new(Mutex::new(AcpiPmRegisters::new(exit.clone()))) as _,
            ACPI_SLEEP_CONTROL_PORT,
            AcpiPmRegisters::LEN,
        ),
        (
            Arc::new(Mutex::new(PvPanic::new(exit.clone()))) as _,
            PVPANIC_PORT,
            1,
        ),
        (
            Arc::new(Mutex::new(BootTimerPort::new(timeline.clone()))) as _,
            BOOT_TIMER_PORT,
            1,
        ),
        (
            Arc::new(Mutex::new(CmosRtc::new())) as _,
            CMOS_RTC_PORT,
            CMOS_RTC_LEN,
        ),
        (
            Arc::new(Mutex::new(HostClock::new(crate::vmstate::now_ns()))) as _,
            HOST_CLOCK_PORT,
            HOST_CLOCK_LEN,
        ),
    ];
    for (device, port, len) in placed {
        bus.insert(device, u64::from(port), u64::from(len))
            .map_err(|e| VmmError::device("legacy port I/O")(e.to_string()))?;
    }
    Ok(bus)
}

/// Opens each `--disk` image (format by content, locked while the VM
/// runs, backing files as `policy` allows) as a virtio-blk device.
fn open_disks(
    vm_name: &str,
    specs: &[DiskSpec],
    policy: &crate::disk::BackingPolicy,
) -> Result<Vec<Block>, VmmError> {
    specs
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            let opts = if spec.read_only {
                crate::disk::OpenOptions::read_only()
            } else {
                crate::disk::OpenOptions::read_write()
            };
            let opts = opts.with_backing_policy(policy.clone());
            let backend = crate::disk::open_image(&spec.path, &opts)?;
            let serial = disk_serial(&spec.path, &format!("{vm_name}-disk{index}"));
            Ok(Block::new(Arc::from(backend), spec.read_only, serial))
        })
        .collect()
}

/// The virtio devices of the guest: rng, then the disks in `--disk` order.
/// Linux names virtio disks in the order their devices are probed, which
/// is the DSDT order of these slots: the first disk is /dev/vda.
fn virtio_devices(disks: Vec<Block>) -> Result<Vec<Arc<Mutex<dyn VirtioDevice>>>, VmmError> {
    let rng = Rng::new().map_err(VmmError::io("open the host's entropy source"))?;
    let mut devices: Vec<Arc<Mutex<dyn VirtioDevice>>> = vec![Arc::new(Mutex::new(rng))];
    for disk in disks {
        devices.push(Arc::new(Mutex::new(disk)));
    }
    Ok(devices)
}

/// MMIO windows and GSIs for `count` devices: one page each from
/// `VIRTIO_MMIO_START`, GSIs from `FIRST_DEVICE_GSI` up to the GED's.
fn virtio_slots(count: usize) -> Result<Vec<VirtioMmioSlot>, VmmError> {
    let available = (VMGENID_GSI - FIRST_DEVICE_GSI) as usize;
    if count > available {
        return Err(VmmError::device("virtio")(format!(
            "{count} devices requested, at most {available} fit"
        )));
    }
    Ok((0..count)
        .map(|i| VirtioMmioSlot {
            base: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE,
            len: VIRTIO_MMIO_SIZE,
            gsi: FIRST_DEVICE_GSI + i as u32,
        })
        .collect())
}

/// A virtio device and what serves its queue notifications.
enum Attached {
    /// The device's own queue handler (`VirtioDevice::process_queue`), on
    /// the main loop or on an I/O thread of its own.
    Queues(Arc<Mutex<dyn VirtioDevice>>),
    /// virtio-net, whose NAT registers host sockets on the main loop.
    Net(Arc<Mutex<Net>>),
}

/// An attached device, and what attaching it left to do.
struct Attachment {
    /// Queue events for the device's own I/O thread, if it wants one.
    own_thread: Option<Subscriber>,
    transport: Arc<Mutex<MmioTransport>>,
    device: Arc<Mutex<dyn VirtioDevice>>,
    io_handler: Option<Arc<Mutex<dyn QueueHandler>>>,
    /// The queue notifiers' other ends: a resume notifies every queue once.
    notifiers: Vec<EventFd>,
}

/// Puts a virtio device on the MMIO bus with its interrupt (irqfd) and
/// queue notifications (one ioeventfd per queue, matched on the index),
/// watched by the main event loop or, for devices that ask for it, by an
/// I/O thread of their own.
fn attach_virtio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    events: &mut EventManager<Subscriber>,
    slot: VirtioMmioSlot,
    attached: Attached,
) -> Result<Attachment, VmmError> {
    let device: Arc<Mutex<dyn VirtioDevice>> = match &attached {
        Attached::Queues(device) => device.clone(),
        Attached::Net(net) => net.clone(),
    };
    let irq = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
        .map_err(VmmError::io("create a virtio interrupt"))?;
    vm.register_irqfd(&irq, slot.gsi)
        .map_err(VmmError::kvm("route a virtio interrupt"))?;
    let queues = lock(&device).queue_max_sizes().len();
    let mut notifiers = Vec::with_capacity(queues);
    for index in 0..queues {
        let notifier = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
            .map_err(VmmError::io("create a queue notifier"))?;
        vm.register_ioevent(
            &notifier,
            &IoEventAddress::Mmio(slot.base + REG_QUEUE_NOTIFY),
            index as u32,
        )
        .map_err(VmmError::kvm("register a queue notifier"))?;
        notifiers.push(notifier);
    }
    let kicks = notifiers
        .iter()
        .map(EventFd::try_clone)
        .collect::<Result<Vec<_>, _>>()
        .map_err(VmmError::io("create a queue notifier"))?;
    let interrupt = Arc::new(VirtioInterrupt::new(irq));
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        device.clone(),
        interrupt,
        mem.clone(),
    )));
    mmio.insert(transport.clone(), slot.base, slot.len)
        .map_err(|e| VmmError::device("virtio-mmio")(e.to_string()))?;
    let mut attachment = Attachment {
        own_thread: None,
        transport,
        device: device.clone(),
        io_handler: None,
        notifiers: kicks,
    };
    let subscriber: Subscriber = match attached {
        Attached::Queues(device) => {
            let own = lock(&device).io_thread_handler();
            if let Some(handler) = own {
                attachment.io_handler = Some(handler.clone());
                attachment.own_thread =
                    Some(Arc::new(Mutex::new(QueueEvents::new(handler, notifiers))));
                return Ok(attachment);
            }
            Arc::new(Mutex::new(QueueEvents::new(device, notifiers)))
        }
        Attached::Net(net) => Arc::new(Mutex::new(
            NetEvents::new(net, notifiers).map_err(VmmError::io("create the NAT timer"))?,
        )),
    };
    events.add_subscriber(subscriber);
    Ok(attachment)
}

/// Copies a flat binary to `load_addr` with the long-mode scaffolding it
/// needs (GDT and identity paging).
fn load_flat(
    mem: &GuestMemoryMmap,
    image: &[u8],
    load_addr: u64,
) -> Result<(BootEntry, u64), VmmError> {
    let write_err = |e: vm_memory::GuestMemoryError| VmmError::GuestMemory(e.to_string());
    mem.write_slice(image, GuestAddress(load_addr))
        .map_err(write_err)?;
    mem.write_slice(&gdt_bytes(EntryMode::Long), GuestAddress(GDT_ADDR))
        .map_err(write_err)?;
    let cr3 = paging::write_identity_tables(mem).map_err(write_err)?;
    let entry = BootEntry {
        mode: EntryMode::Long,
        entry_point: load_addr,
        boot_info: 0,
    };
    Ok((entry, cr3))
}

fn create_vcpus(
    vm: &VmFd,
    cpus: u8,
    supported: &CpuId,
    entry: &BootEntry,
    cr3: u64,
    shared: &VcpuShared,
) -> Result<Vec<Vcpu>, VmmError> {
    (0..cpus)
        .map(|index| {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(VmmError::kvm("create a vCPU"))?;
            let vcpu = Vcpu::new(index, fd, shared);
            vcpu.configure(supported, cpus, (index == 0).then_some((entry, cr3)))?;
            Ok(vcpu)
        })
        .collect()
}

/// Creates the vCPUs of a resumed VM and gives each its saved state, once
/// its saved CPUID is checked against what this host would give it now.
fn resume_vcpus(
    vm: &VmFd,
    cpus: u8,
    supported: &CpuId,
    saved: &SavedState,
    shared: &VcpuShared,
) -> Result<Vec<Vcpu>, VmmError> {
    if saved.state.vcpus.len() != usize::from(cpus) {
        return Err(StateError::Damaged {
            what: format!("{} vCPU states for {cpus} vCPU(s)", saved.state.vcpus.len()),
        }
        .into());
    }
    saved
        .state
        .vcpus
        .iter()
        .enumerate()
        .map(|(index, state)| {
            let index = index as u8;
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(VmmError::kvm("create a vCPU"))?;
            let vcpu = Vcpu::new(index, fd, shared);
            // Configured as at boot, then overwritten: what KVM gives such a
            // vCPU here is what the saved CPUID must match.
            vcpu.configure(supported, cpus, None)?;
            let here = vcpu
                .fd()
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(VmmError::kvm("read the vCPU's CPUID"))?;
            crate::vmstate::spec::check_cpuid(index, &state.cpuid, here.as_slice())?;
            state.restore(vcpu.fd())?;
            Ok(vcpu)
        })
        .collect()
}

/// Gives a resumed VM's chips and devices their saved state, then raises
/// the interrupts the devices still show and notifies every queue once
/// (what the guest posted before the save is served now).
fn resume_devices(
    vm: &VmFd,
    saved: &SavedState,
    serial: &Arc<Mutex<Serial>>,
    attached: &[Attachment],
) -> Result<(), VmmError> {
    let state = &saved.state;
    state.platform.restore(vm)?;
    lock(serial)
        .restore_state(&state.serial)
        .map_err(|source| StateError::Io {
            what: "restore the UART",
            source,
        })?;
    if state.virtio.len() != attached.len() {
        return Err(StateError::Damaged {
            what: format!(
                "{} virtio devices saved for {}",
                state.virtio.len(),
                attached.len()
            ),
        }
        .into());
    }
    for (slot, (saved, device)) in state.virtio.iter().zip(attached).enumerate() {
        let mut transport = lock(&device.transport);
        transport
            .restore_state(saved)
            .map_err(|source| StateError::Virtio { slot, source })?;
        transport.raise_pending_interrupt();
        // Queued now, delivered once the queues are served below.
        lock(&device.device).reset_saved_flows(&state.nat_flows);
    }
    for device in attached {
        for kick in &device.notifiers {
            kick.write(1).map_err(VmmError::io("notify a queue"))?;
        }
    }
    Ok(())
}

/// The control socket's view of a running VM's NAT (`vmlab nat show`): a
/// snapshot taken under the device's lock, between two event-loop turns.
struct NetNatView(Arc<Mutex<Net>>);

impl NatView for NetNatView {
    fn snapshot(&self) -> NatSnapshot {
        lock(&self.0)
            .nat()
            .map(|nat| nat.snapshot())
            .unwrap_or_default()
    }
}
