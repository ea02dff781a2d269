//! The 8250/16550A UART at 0x3f8 (IRQ 4): the guest's console.
//!
//! vm-superio does the register model; this wraps it for the bus, routes
//! its interrupt to an irqfd and tells the console side when the receive
//! FIFO has room again, so host input is never dropped.

use std::io::Write;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::devices::BusDevice;

/// An interrupt line backed by an eventfd (registered with KVM as an irqfd).
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals "receive FIFO drained" to whoever feeds input.
struct InputRoom(Arc<EventFd>);

impl vm_superio::serial::SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        crate::debug_limited!("serial: a console output byte could not be written");
    }
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            crate::warn_limited!("serial: cannot signal input room: {e}");
        }
    }
}

/// The 16550A's receive FIFO (vm-superio's size).
const FIFO_SIZE: usize = 64;

type Uart = vm_superio::Serial<EventFdTrigger, InputRoom, Box<dyn Write + Send>>;

pub struct Serial {
    uart: Uart,
    input_room: Arc<EventFd>,
}

impl Serial {
    /// A UART raising `interrupt` and writing guest output to `out`.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let input_room = Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?);
        let uart = vm_superio::Serial::with_events(
            EventFdTrigger(interrupt),
            InputRoom(input_room.clone()),
            out,
        );
        Ok(Serial { uart, input_room })
    }

    /// Readable when the guest has drained the receive FIFO.
    pub fn input_room_event(&self) -> Arc<EventFd> {
        self.input_room.clone()
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                crate::warn_limited!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }

    /// The interrupt eventfd, to register as an irqfd.
    pub fn interrupt_event(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// The registers and receive FIFO, for a VM snapshot.
    pub fn save_state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Takes back a snapshot's registers and FIFO (same interrupt, same
    /// output); an interrupt the guest had pending is raised again.
    pub fn restore_state(&mut self, saved: &SerialSnapshot) -> std::io::Result<()> {
        // Checked before the UART is taken apart, so a bad snapshot leaves
        // it as it was.
        if saved.in_buffer.len() > FIFO_SIZE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} bytes saved in a {FIFO_SIZE}-byte receive FIFO",
                    saved.in_buffer.len()
                ),
            ));
        }
        let trigger = || -> std::io::Result<EventFdTrigger> {
            Ok(EventFdTrigger(self.uart.interrupt_evt().0.try_clone()?))
        };
        let placeholder = vm_superio::Serial::with_events(
            trigger()?,
            InputRoom(self.input_room.clone()),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        );
        let trigger = trigger()?;
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let bad = |e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e:?}"));
        self.uart = vm_superio::Serial::from_state(
            &state,
            trigger,
            InputRoom(self.input_room.clone()),
            out,
        )
        .map_err(bad)?;
        Ok(())
    }
}

/// vm-superio's `SerialState`, serialisable: the 8250's registers and the
/// bytes in its receive FIFO.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = self.uart.read(offset as u8);
        data.fill(value);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, value) {
                crate::debug_limited!("serial: write to register {offset}: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Collects what the guest writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    fn serial() -> (Serial, Capture) {
        let capture = Capture::default();
        let s = Serial::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Box::new(capture.clone()),
        )
        .unwrap();
        (s, capture)
    }

    #[test]
    fn guest_writes_reach_the_console() {
        let (mut s, out) = serial();
        for b in b"hi\n" {
            s.write(0x3f8, THR, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn host_input_reaches_the_receive_register_and_raises_the_irq() {
        let (mut s, _) = serial();
        // Enable the received-data interrupt, as the 8250 driver does.
        s.write(0x3f8, IER, &[0x1]);
        let _ = s.interrupt_event().read();
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert_eq!(s.interrupt_event().read().unwrap(), 1);
        let mut lsr = [0];
        s.read(0x3f8, LSR, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut byte = [0];
        s.read(0x3f8, THR, &mut byte);
        assert_eq!(byte, [b'o']);
        s.read(0x3f8, THR, &mut byte);
        assert_eq!(byte, [b'k']);
        s.read(0x3f8, LSR, &mut lsr);
        assert_eq!(lsr[0] & 1, 0, "FIFO drained");
        assert_eq!(s.input_room_event().read().unwrap(), 1, "room signalled");
    }

    #[test]
    fn registers_and_fifo_survive_a_save_and_restore() {
        let (mut s, _) = serial();
        s.write(0x3f8, 3, &[0x83]); // LCR: DLAB on, 8 bits
        s.write(0x3f8, 0, &[0x0c]); // divisor low
        s.write(0x3f8, 3, &[0x03]); // DLAB off
        s.write(0x3f8, 7, &[0x5a]); // scratch
        s.write(0x3f8, IER, &[0x1]);
        assert_eq!(s.enqueue_input(b"abc"), 3);
        let saved = s.save_state();

        let (mut t, out) = serial();
        let _ = t.interrupt_event().read();
        t.restore_state(&saved).unwrap();
        assert_eq!(t.save_state(), saved);
        assert_eq!(
            t.interrupt_event().read().unwrap(),
            1,
            "pending receive interrupt raised again"
        );
        let mut byte = [0];
        t.read(0x3f8, THR, &mut byte);
        assert_eq!(byte, [b'a']);
        let mut scratch = [0];
        t.read(0x3f8, 7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        // Output still goes where it went.
        t.write(0x3f8, THR, b"z");
        assert_eq!(&*out.0.lock().unwrap(), b"z");
        let mut damaged = saved.clone();
        damaged.in_buffer = vec![0; 1000];
        assert!(t.restore_state(&damaged).is_err());
    }

    #[test]
    fn input_beyond_the_fifo_is_refused_not_dropped() {
        let (mut s, _) = serial();
        let capacity = s.input_capacity();
        let big = vec![b'x'; capacity + 10];
        assert_eq!(s.enqueue_input(&big), capacity);
        assert_eq!(s.enqueue_input(b"more"), 0);
    }
}
