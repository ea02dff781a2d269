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
    fn input_beyond_the_fifo_is_refused_not_dropped() {
        let (mut s, _) = serial();
        let capacity = s.input_capacity();
        let big = vec![b'x'; capacity + 10];
        assert_eq!(s.enqueue_input(&big), capacity);
        assert_eq!(s.enqueue_input(b"more"), 0);
    }
}
