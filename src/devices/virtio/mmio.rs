//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the
//! registers a driver programs, and the device status state machine
//! (section 3.1.1). A driver that skips or reorders steps is refused: its
//! status write is ignored (and logged), so the device never starts on a
//! half-negotiated configuration.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};

use super::device::{ActivateContext, VirtioDevice};
use super::interrupt::VirtioInterrupt;
use super::{
    F_RING_EVENT_IDX, F_VERSION_1, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
};
use crate::devices::bus::lock;
use crate::devices::BusDevice;
use crate::vmm::memory::GuestMemoryMmap;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "VMLB": vmlab has no PCI vendor ID; any value is allowed.
const VENDOR_ID: u32 = 0x424c_4d56;

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// One virtio device as the guest sees it on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    mem: GuestMemoryMmap,
    device_type: u32,
    device_features: u64,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioInterrupt>,
        mem: GuestMemoryMmap,
    ) -> Self {
        let (device_type, device_features, queues) = {
            let d = lock(&device);
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|&max| Queue::new(max).expect("device declares a valid queue size"))
                .collect();
            (d.device_type(), d.device_features() | F_VERSION_1, queues)
        };
        MmioTransport {
            device,
            interrupt,
            mem,
            device_type,
            device_features,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
        }
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn read_register(&self, offset: u64) -> u32 {
        let selected = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => selected.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => selected.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => {
                let needs_reset = if self.interrupt.needs_reset() {
                    STATUS_DEVICE_NEEDS_RESET
                } else {
                    0
                };
                self.status | needs_reset
            }
            REG_CONFIG_GENERATION => 0,
            _ => {
                crate::debug_limited!(
                    "virtio-mmio: read of write-only or unknown register {offset:#x}"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
                    crate::warn_limited!(
                        "virtio-mmio: driver features written outside negotiation; ignored"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            REG_QUEUE_NOTIFY => {
                // Valid notifications are ioeventfds and never exit to us.
                crate::debug_limited!(
                    "virtio-mmio: notify for a queue that does not exist ({value})"
                );
            }
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.write_status(value),
            _ => crate::debug_limited!(
                "virtio-mmio: write to read-only or unknown register {offset:#x}"
            ),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_setup_allowed() {
            crate::warn_limited!(
                "virtio-mmio: queue register {offset:#x} written outside queue setup; ignored"
            );
            return;
        }
        let Some(queue) = self.selected_queue() else {
            crate::warn_limited!(
                "virtio-mmio: queue register written for a queue that does not exist"
            );
            return;
        };
        match offset {
            REG_QUEUE_NUM => queue.set_size(value as u16),
            REG_QUEUE_READY => queue.set_ready(value == 1),
            REG_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            REG_QUEUE_DRIVER_LOW => queue.set_avail_ring_address(Some(value), None),
            REG_QUEUE_DRIVER_HIGH => queue.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_DEVICE_LOW => queue.set_used_ring_address(Some(value), None),
            REG_QUEUE_DEVICE_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & STATUS_FAILED != 0 {
            crate::warn_limited!(
                "virtio-mmio: the driver gave up on device type {}",
                self.device_type
            );
            self.status |= STATUS_FAILED;
            return;
        }
        let old = self.status;
        let step = |bit| old | bit == value;
        if old == 0 && value == STATUS_ACKNOWLEDGE
            || old == STATUS_ACKNOWLEDGE && step(STATUS_DRIVER)
        {
            self.status = value;
        } else if old == STATUS_ACKNOWLEDGE | STATUS_DRIVER && step(STATUS_FEATURES_OK) {
            if self.features_acceptable() {
                self.status = value;
            } else {
                // Leaving FEATURES_OK clear is how the device says no.
                crate::warn_limited!(
                    "virtio-mmio: driver asked for features {:#x}, device offers {:#x}; refused",
                    self.driver_features,
                    self.device_features
                );
            }
        } else if old == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
            && step(STATUS_DRIVER_OK)
        {
            self.status = value;
            self.activate();
        } else {
            crate::warn_limited!(
                "virtio-mmio: status {value:#x} after {old:#x} skips a step of device initialisation; refused"
            );
        }
    }

    /// The driver may only take what the device offers, and must speak
    /// virtio 1 (this transport is modern only).
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device_features == 0 && self.driver_features & F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & F_RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                crate::warn_limited!(
                    "virtio-mmio: queue {index} of device type {} is invalid",
                    self.device_type
                );
                self.interrupt.mark_needs_reset();
                return;
            }
            let mut copy = Queue::try_from(queue.state()).expect("queue state round-trips");
            copy.set_event_idx(event_idx);
            queues.push(copy);
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
        };
        if let Err(e) = lock(&self.device).activate(ctx) {
            crate::warn_limited!(
                "virtio-mmio: device type {} cannot start: {e}",
                self.device_type
            );
            self.interrupt.mark_needs_reset();
        }
    }

    fn reset(&mut self) {
        if self.status & STATUS_DRIVER_OK != 0 {
            lock(&self.device).reset();
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.interrupt.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            crate::debug_limited!(
                "virtio-mmio: {}-byte read at {offset:#x} is not a register access",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::debug_limited!(
                "virtio-mmio: {}-byte write at {offset:#x} is not a register access",
                data.len()
            );
            return;
        };
        if offset % 4 == 0 {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::device::ActivateError;
    use crate::devices::virtio::interrupt::INT_USED_RING;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A device that records what the transport asked of it.
    #[derive(Default)]
    struct Probe {
        activations: Vec<(u64, Vec<bool>, bool)>,
        resets: usize,
        config: [u8; 8],
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn device_features(&self) -> u64 {
            F_RING_EVENT_IDX | (1 << 3)
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::devices::virtio::device::read_config_bytes(&self.config, offset, data);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            let ready = ctx.queues.iter().map(|q| q.ready()).collect();
            let event_idx = ctx.queues[0].event_idx_enabled();
            self.activations.push((ctx.features, ready, event_idx));
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn process_queue(&mut self, _index: usize) {}
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Probe>>) {
        let probe = Arc::new(Mutex::new(Probe {
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            ..Default::default()
        }));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let int = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        (MmioTransport::new(probe.clone(), int, mem), probe)
    }

    fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(0, offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(0, offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        wr(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        wr(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, features as u32);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        wr(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32) {
        let base = 0x1000 * (index + 1);
        wr(t, REG_QUEUE_SEL, index);
        wr(t, REG_QUEUE_NUM, size);
        wr(t, REG_QUEUE_DESC_LOW, base);
        wr(t, REG_QUEUE_DRIVER_LOW, base + 0x400);
        wr(t, REG_QUEUE_DEVICE_LOW, base + 0x800);
        wr(t, REG_QUEUE_READY, 1);
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identifies_itself() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 4);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), (1 << 29) | (1 << 3));
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 8);
        wr(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0, "no third queue");
    }

    #[test]
    fn full_initialisation_activates_with_the_negotiated_features() {
        let (mut t, probe) = transport();
        negotiate(&mut t, F_VERSION_1 | F_RING_EVENT_IDX);
        assert_eq!(
            rd(&mut t, REG_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );
        setup_queue(&mut t, 0, 16);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(rd(&mut t, REG_STATUS), ALL_OK);
        let p = probe.lock().unwrap();
        assert_eq!(
            p.activations,
            vec![(F_VERSION_1 | F_RING_EVENT_IDX, vec![true, false], true)]
        );
    }

    #[test]
    fn features_the_device_lacks_are_refused() {
        let (mut t, _) = transport();
        negotiate(&mut t, F_VERSION_1 | (1 << 5));
        assert_eq!(rd(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn legacy_drivers_without_version_1_are_refused() {
        let (mut t, _) = transport();
        negotiate(&mut t, 1 << 3);
        assert_eq!(rd(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn skipping_steps_is_refused_and_nothing_starts() {
        let (mut t, probe) = transport();
        // DRIVER_OK straight away.
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        // FEATURES_OK without DRIVER.
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_FEATURES_OK);
        assert_eq!(rd(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE);
        // DRIVER_OK before FEATURES_OK.
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert_eq!(rd(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert!(probe.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn queue_registers_are_locked_outside_setup() {
        let (mut t, _) = transport();
        // Before FEATURES_OK.
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0, 16);
        wr(&mut t, REG_STATUS, ALL_OK);
        // After DRIVER_OK.
        wr(&mut t, REG_QUEUE_SEL, 1);
        wr(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn invalid_queue_marks_the_device_as_needing_reset() {
        let (mut t, probe) = transport();
        negotiate(&mut t, F_VERSION_1);
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_NUM, 16);
        // Descriptor table outside the 1 MiB of guest memory.
        wr(&mut t, REG_QUEUE_DESC_LOW, 0x4000_0000);
        wr(&mut t, REG_QUEUE_DRIVER_LOW, 0x2000);
        wr(&mut t, REG_QUEUE_DEVICE_LOW, 0x3000);
        wr(&mut t, REG_QUEUE_READY, 1);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_ne!(rd(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            rd(&mut t, REG_INTERRUPT_STATUS) & 2,
            2,
            "config change raised"
        );
        assert!(probe.lock().unwrap().activations.is_empty());
        // Writing 0 resets everything, the needs-reset flag included.
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn reset_after_activation_resets_the_device() {
        let (mut t, probe) = transport();
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 0, 16);
        wr(&mut t, REG_STATUS, ALL_OK);
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(probe.lock().unwrap().resets, 1);
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn a_driver_hammering_bad_registers_logs_a_few_lines_per_kind() {
        let (mut t, _) = transport();
        let lines = crate::logging::capture::lines(|| {
            for _ in 0..1000 {
                wr(&mut t, REG_STATUS, ALL_OK); // skips steps
                wr(&mut t, REG_QUEUE_READY, 1); // outside queue setup
                wr(&mut t, REG_QUEUE_NOTIFY, 7); // no such queue
                rd(&mut t, 0x0f0); // unknown register
            }
        });
        assert_eq!(
            lines.len(),
            4 * crate::rate_limit::LOG_BURST as usize,
            "{lines:#?}"
        );
        assert!(lines
            .last()
            .unwrap()
            .starts_with("DEBUG virtio-mmio: read of write-only"));
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, _) = transport();
        t.interrupt.signal_used_queue();
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
        wr(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn config_space_and_odd_accesses() {
        let (mut t, _) = transport();
        let mut b = [0u8; 2];
        t.read(0, CONFIG_SPACE + 2, &mut b);
        assert_eq!(b, [3, 4]);
        // Sub-word register reads return zero instead of half a register.
        let mut one = [0xffu8; 1];
        t.read(0, REG_MAGIC, &mut one);
        assert_eq!(one, [0]);
        t.write(0, REG_STATUS, &[1]);
        assert_eq!(
            rd(&mut t, REG_STATUS),
            0,
            "byte write to a register ignored"
        );
    }
}
