//! The NAT on a TAP device, as an event-manager subscriber: TAP frames in,
//! host socket readiness and a timer drive the engine.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::timerfd::TimerFd;

use super::engine::{Nat, TICK};
use super::error::NatError;
use super::frame::{NetHdr, NET_HDR_LEN};
use super::port::GuestPort;
use super::tap::Tap;

const TOKEN_TAP: u32 = 1;
const TOKEN_TIMER: u32 = 2;
/// Frames read from the TAP per wakeup before answering (bounds latency and
/// lets ACKs coalesce).
const READ_BATCH: usize = 64;
/// A vnet header plus the largest IPv4 packet in an Ethernet frame.
const FRAME_BUF: usize = NET_HDR_LEN + 14 + 65535;

pub struct TapNat {
    nat: Nat,
    tap: Tap,
    timer: TimerFd,
    buf: Vec<u8>,
    /// TAP registered for EPOLLOUT because it refused a frame.
    waiting_writable: bool,
    /// The TAP failed for good (device removed, namespace gone).
    failed: Option<io::Error>,
}

impl TapNat {
    pub fn new(nat: Nat, tap: Tap) -> Result<Self, NatError> {
        let mut timer = TimerFd::new().map_err(|e| NatError::EventLoop(e.into()))?;
        timer
            .reset(TICK, Some(TICK))
            .map_err(|e| NatError::EventLoop(e.into()))?;
        let mut nat = nat;
        nat.set_offloads(tap.offloads());
        Ok(TapNat {
            nat,
            tap,
            timer,
            buf: vec![0u8; FRAME_BUF],
            waiting_writable: false,
            failed: None,
        })
    }

    pub fn nat(&self) -> &Nat {
        &self.nat
    }

    /// Why the TAP stopped working, if it did; the loop should end.
    pub fn failure(&self) -> Option<&io::Error> {
        self.failed.as_ref()
    }

    fn tap_failed(&mut self, err: io::Error, ops: &mut EventOps) {
        log::error!("nat: tap {} failed: {err}", self.tap.name());
        let _ = ops.remove(Events::empty(&self.tap));
        self.failed = Some(err);
    }

    fn read_tap(&mut self, ops: &mut EventOps) {
        for _ in 0..READ_BATCH {
            let n = match self.tap.read_frame(&mut self.buf) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    self.tap_failed(err, ops);
                    return;
                }
            };
            let Some(hdr) = NetHdr::parse(&self.buf[..n]) else {
                continue;
            };
            self.nat.handle_frame(&hdr, &self.buf[NET_HDR_LEN..n], ops);
        }
    }

    fn flush(&mut self, ops: &mut EventOps) {
        if self.failed.is_some() {
            return;
        }
        self.nat.flush(&mut self.tap, ops);
        let waiting = self.nat.pending_frames() > 0;
        if waiting != self.waiting_writable {
            let set = if waiting {
                EventSet::IN | EventSet::OUT
            } else {
                EventSet::IN
            };
            let _ = ops.modify(Events::with_data(&self.tap, TOKEN_TAP, set));
            self.waiting_writable = waiting;
        }
    }
}

impl MutEventSubscriber for TapNat {
    fn init(&mut self, ops: &mut EventOps) {
        let watched = ops
            .add(Events::with_data(&self.tap, TOKEN_TAP, EventSet::IN))
            .and_then(|_| ops.add(Events::with_data(&self.timer, TOKEN_TIMER, EventSet::IN)));
        if let Err(err) = watched {
            log::error!("nat: cannot watch tap {}: {err}", self.tap.name());
        }
        if let Err(err) = self.nat.start(ops) {
            log::error!("{err}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_TAP
                if events
                    .event_set()
                    .intersects(EventSet::HANG_UP | EventSet::ERROR) =>
            {
                self.tap_failed(io::Error::other("device closed"), ops);
            }
            TOKEN_TAP if events.event_set().contains(EventSet::IN) => self.read_tap(ops),
            TOKEN_TIMER => {
                let _ = self.timer.wait();
                self.nat.tick(ops);
            }
            token if Nat::owns_token(token) => {
                self.nat.handle_event(token, events.event_set(), ops)
            }
            _ => {}
        }
        self.flush(ops);
    }
}

impl AsRawFd for TapNat {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.tap.as_raw_fd()
    }
}

/// Runs `backend` on its own event manager until `stop` is set.
pub fn run_until(backend: Arc<Mutex<TapNat>>, stop: &AtomicBool) -> Result<(), NatError> {
    let mut manager = EventManager::<Arc<Mutex<TapNat>>>::new()
        .map_err(|e| NatError::EventLoop(io::Error::other(e.to_string())))?;
    manager.add_subscriber(backend.clone());
    while !stop.load(Ordering::Relaxed) {
        manager
            .run_with_timeout(100)
            .map_err(|e| NatError::EventLoop(io::Error::other(e.to_string())))?;
        let backend = backend.lock().expect("NAT backend lock");
        if let Some(err) = backend.failure() {
            return Err(NatError::TapGone {
                name: backend.tap.name().to_string(),
                cause: io::Error::new(err.kind(), err.to_string()),
            });
        }
    }
    Ok(())
}
