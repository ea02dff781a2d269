//! The engine: owns the flow table, the forward listeners and the queue of
//! frames for the guest, and drives them from host readiness and timers.
//! Guest frames come in through [`Nat::handle_frame`] (see `ingress`),
//! forwarded connections through the listeners (see `listeners`).

use std::time::{Duration, Instant};

use event_manager::EventSet;

use super::budget::BufferBudget;
use super::config::NatConfig;
use super::counters::Counters;
use super::flow_table::{Flow, FlowTable};
use super::frame::{GuestFrame, Offloads};
use super::listeners::{ForwardListeners, Listener};
use super::output::Output;
use super::port::GuestPort;
use super::registry::SocketRegistry;
use super::tcp::Verdict;
use super::view::{FlowInfo, NatSnapshot};
use crate::rate::RateWindow;

/// How often [`Nat::tick`] should run: the granularity of TCP timers.
pub const TICK: Duration = Duration::from_millis(50);

/// Tokens with this bit belong to the NAT; the rest are the owner's.
const TOKEN_NAT: u32 = 1 << 31;
const TOKEN_LISTENER: u32 = 1 << 30;
const TOKEN_INDEX: u32 = TOKEN_LISTENER - 1;

/// The event-loop token of the flow in `slot`.
pub(super) fn flow_token(slot: usize) -> u32 {
    TOKEN_NAT | slot as u32
}

/// The event-loop token of forward listener `index`.
pub(super) fn listener_token(index: usize) -> u32 {
    TOKEN_NAT | TOKEN_LISTENER | index as u32
}

/// The userspace NAT. Feed it guest frames with [`Nat::handle_frame`] and
/// host readiness with [`Nat::handle_event`]; call [`Nat::tick`] every
/// [`TICK`]; collect frames for the guest with [`Nat::flush`].
pub struct Nat {
    pub(super) cfg: NatConfig,
    pub(super) out: Output,
    pub(super) table: FlowTable,
    pub(super) listeners: Vec<Listener>,
    pub(super) ack_due: Vec<usize>,
    pub(super) next_forward_port: u16,
    pub(super) icmp_unavailable_logged: bool,
    pub(super) scratch: Vec<u8>,
    /// What the TCP flows' buffers draw on (`NatConfig::buffer_budget`).
    pub(super) budget: BufferBudget,
    /// Warnings about running out of descriptors: a few a minute.
    pub(super) fd_warnings: RateWindow,
    /// New flows toward the host (`NatConfig::new_flows_per_sec`).
    pub(super) new_flows: RateWindow,
    next_iss: u32,
}

impl Nat {
    /// An engine with the given plan and forward listeners (bound before, see
    /// [`ForwardListeners::bind`]). Nothing is registered until [`Nat::start`].
    pub fn new(mut cfg: NatConfig, listeners: ForwardListeners) -> Self {
        let fitting = crate::fds::flow_capacity(cfg.max_flows);
        if fitting < cfg.max_flows {
            log::info!(
                "nat: {fitting} flows at most (not {}): that is what the open-file limit leaves",
                cfg.max_flows
            );
            cfg.max_flows = fitting;
        }
        let out = Output::new(cfg.gateway_mac);
        let budget = BufferBudget::new(cfg.buffer_budget);
        let new_flows = RateWindow::new(cfg.new_flows_per_sec, Duration::from_secs(1));
        Nat {
            cfg,
            out,
            table: FlowTable::default(),
            listeners: listeners.listeners,
            ack_due: Vec::new(),
            next_forward_port: 0,
            icmp_unavailable_logged: false,
            scratch: vec![0u8; 65536],
            budget,
            fd_warnings: RateWindow::new(1, Duration::from_secs(60)),
            new_flows,
            next_iss: 0x1000_0000,
        }
    }

    /// True when an event-loop token belongs to the NAT: the NAT's tokens
    /// have bit 31 set, so the owner's own tokens (TAP, queues, timers) must
    /// keep it clear.
    pub fn owns_token(token: u32) -> bool {
        token & TOKEN_NAT != 0
    }

    pub fn config(&self) -> &NatConfig {
        &self.cfg
    }

    pub fn counters(&self) -> Counters {
        self.out.counters
    }

    /// Offloads the guest side takes (see [`GuestPort::offloads`]).
    pub fn set_offloads(&mut self, offloads: Offloads) {
        self.out.offloads = offloads;
    }

    /// Bytes the TCP flows buffer now (what they hold of the budget).
    pub fn buffered_bytes(&self) -> usize {
        self.budget.used()
    }

    /// Frames waiting for the guest.
    pub fn pending_frames(&self) -> usize {
        self.out.len()
    }

    /// Whether [`Nat::tick`] has work: with no flow and nothing queued it
    /// has none, so an owner may stop its timer until traffic starts.
    pub fn needs_tick(&self) -> bool {
        self.table.len() > 0 || self.out.len() > 0 || self.listeners_pending()
    }

    /// The flow table, one row per flow.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let now = Instant::now();
        self.table
            .iter()
            .map(|f| f.info(now, &self.listeners))
            .collect()
    }

    /// Forwards, flows and counters, for `vmlab nat show`.
    pub fn snapshot(&self) -> NatSnapshot {
        NatSnapshot {
            forwards: self.listeners.iter().map(Listener::bound_rule).collect(),
            flows: self.flows(),
            counters: self.counters(),
        }
    }

    /// Emits owed ACKs and hands queued frames to the guest; resumes host
    /// reads that waited for room.
    pub fn flush(&mut self, port: &mut dyn GuestPort, reg: &mut dyn SocketRegistry) {
        self.out.offloads = port.offloads();
        self.flush_acks();
        for _ in 0..8 {
            self.out.flush(port);
            if !(self.out.starved && self.out.has_room()) {
                break;
            }
            self.out.starved = false;
            self.resume(reg);
            self.flush_acks();
        }
    }

    /// Drains queued frames without a port (tests and fuzzing); host reads
    /// that waited for room resume.
    pub fn take_frames(&mut self, reg: &mut dyn SocketRegistry) -> Vec<GuestFrame> {
        self.flush_acks();
        let mut frames = self.out.take_all();
        if self.out.starved {
            self.out.starved = false;
            self.resume(reg);
            self.flush_acks();
            frames.extend(self.out.take_all());
        }
        frames
    }

    fn flush_acks(&mut self) {
        for slot in std::mem::take(&mut self.ack_due) {
            if let Some(Flow::Tcp(f)) = self.table.get_mut(slot) {
                f.flush_ack(&mut self.out);
            }
        }
    }

    /// Gives every flow that waited for room another go.
    fn resume(&mut self, reg: &mut dyn SocketRegistry) {
        let now = Instant::now();
        for slot in 0..self.table.slot_count() {
            let verdict = match self.table.get_mut(slot) {
                Some(Flow::Tcp(f)) => {
                    let v = f.pump(&mut self.out, now);
                    self.ack_due.push(slot);
                    v
                }
                Some(Flow::Udp(f)) => {
                    f.read_host(&mut self.out, &mut self.scratch, now);
                    Verdict::Keep
                }
                Some(Flow::Icmp(f)) => {
                    f.read_host(&mut self.out, &mut self.scratch, now);
                    Verdict::Keep
                }
                None => Verdict::Keep,
            };
            if verdict == Verdict::Close {
                self.remove(slot, reg);
            }
        }
        self.retry_listeners(reg);
    }

    /// Readiness of a socket the NAT registered (see [`Nat::owns_token`]).
    pub fn handle_event(&mut self, token: u32, events: EventSet, reg: &mut dyn SocketRegistry) {
        if !Self::owns_token(token) {
            return;
        }
        let index = (token & TOKEN_INDEX) as usize;
        if token & TOKEN_LISTENER != 0 {
            if let Some(l) = self.listeners.get_mut(index) {
                l.readable = true;
                self.listener_ready(index, reg);
            }
            return;
        }
        let readable = events.intersects(
            EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
        );
        let writable = events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR);
        let now = Instant::now();
        let verdict = match self.table.get_mut(index) {
            Some(Flow::Tcp(f)) => {
                let v = f.on_host_event(readable, writable, &mut self.out, &self.cfg, now);
                self.ack_due.push(index);
                v
            }
            Some(Flow::Udp(f)) => {
                f.readable |= readable;
                f.read_host(&mut self.out, &mut self.scratch, now);
                Verdict::Keep
            }
            Some(Flow::Icmp(f)) => {
                f.readable |= readable;
                f.read_host(&mut self.out, &mut self.scratch, now);
                Verdict::Keep
            }
            None => Verdict::Keep,
        };
        if verdict == Verdict::Close {
            self.remove(index, reg);
        }
    }

    /// Runs timers: TCP retransmission and TIME-WAIT, UDP/ICMP idle expiry;
    /// lets flows that waited for buffer memory try again.
    pub fn tick(&mut self, reg: &mut dyn SocketRegistry) {
        if self.out.budget_starved {
            self.out.budget_starved = false;
            for slot in 0..self.table.slot_count() {
                if let Some(Flow::Tcp(f)) = self.table.get_mut(slot) {
                    f.release_idle_buffers();
                }
            }
            self.resume(reg);
        }
        self.retry_listeners(reg);
        let now = Instant::now();
        for slot in 0..self.table.slot_count() {
            let verdict = match self.table.get_mut(slot) {
                Some(Flow::Tcp(f)) => f.on_tick(&mut self.out, &self.cfg, now),
                Some(Flow::Udp(f)) if now.duration_since(f.last_active) >= self.cfg.udp_timeout => {
                    Verdict::Close
                }
                Some(Flow::Icmp(f))
                    if now.duration_since(f.last_active) >= self.cfg.icmp_timeout =>
                {
                    Verdict::Close
                }
                _ => Verdict::Keep,
            };
            if verdict == Verdict::Close {
                self.remove(slot, reg);
            }
        }
    }

    /// Initial sequence numbers need not be secret here: the guest is the
    /// only party on its link and the host side is a separate connection.
    /// Spacing them apart keeps a reused port from matching old segments,
    /// and determinism keeps fuzzing reproducible.
    pub(super) fn iss(&mut self) -> u32 {
        self.next_iss = self.next_iss.wrapping_add(0x0100_0001);
        self.next_iss
    }

    /// Closes the flow in `slot` (its socket closes as it drops).
    pub(super) fn remove(&mut self, slot: usize, reg: &mut dyn SocketRegistry) {
        if let Some(flow) = self.table.remove(slot, reg, &mut self.out.counters) {
            log::debug!("nat: close {}", flow.info(Instant::now(), &self.listeners));
        }
    }

    /// Makes room for one more flow: first every TCP flow in TIME-WAIT (one
    /// scan serves many new flows), else the flow idle longest. False if the
    /// table cannot hold any flow.
    pub(super) fn make_room(&mut self, reg: &mut dyn SocketRegistry) -> bool {
        if self.table.len() < self.cfg.max_flows {
            return true;
        }
        let lingering = self.table.time_wait_slots();
        if !lingering.is_empty() {
            for slot in lingering {
                self.out.counters.flows_evicted += 1;
                self.remove(slot, reg);
            }
            return true;
        }
        let Some(slot) = self.table.idlest() else {
            return false;
        };
        if let Some(Flow::Tcp(f)) = self.table.get_mut(slot) {
            f.send_reset(&mut self.out);
            f.abort_host();
        }
        self.out.counters.flows_evicted += 1;
        self.remove(slot, reg);
        true
    }
}
