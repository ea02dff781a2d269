//! TCP flows: the engine is the guest's TCP peer on one side and an ordinary
//! socket user on the host side, splicing bytes between the two.
//!
//! Why our own state machine rather than smoltcp's sockets: the throughput
//! target needs 64 KiB TSO segments in both directions with partial
//! checksums, windows tied directly to host socket buffers and no
//! per-segment copies into an interface model built for small MTUs. A NAT
//! peer is also simpler than a general TCP: the guest is the only party on
//! the link, so there is no congestion control, no SACK or timestamps, and
//! out-of-order segments are dropped and re-acknowledged (the guest
//! retransmits them) instead of being reassembled.
//!
//! Buffers: `tx` holds what the host sent and the guest has not yet
//! acknowledged (kept for retransmission); `rx` holds what the guest sent and
//! the host socket would not take yet. Both are bounded by
//! `NatConfig::tcp_buffer`, and the window offered to the guest is exactly
//! the free space of `rx`, so a full host socket closes the guest's window
//! and a closed guest window stops reads from the host socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::budget::BufferBudget;
use super::config::NatConfig;
use super::output::{Output, SynOptions, TcpFlags, TcpSegment, IPV4_LEN, MAX_IP_PACKET, TCP_LEN};
use super::ring::Ring;
use super::view::FlowState;

const INITIAL_RTO: Duration = Duration::from_millis(200);
const MAX_RTO: Duration = Duration::from_secs(10);
/// Retransmissions of one segment before the flow is given up.
const MAX_RETRIES: u32 = 10;
/// Duplicate acknowledgements that trigger a fast retransmit.
const DUP_ACK_THRESHOLD: u32 = 3;
/// Most bytes taken from a host socket per read: several GSO segments' worth
/// per system call.
const HOST_READ: usize = 256 * 1024;
/// MSS assumed when the guest does not say (RFC 9293).
const DEFAULT_MSS: u16 = 536;

/// `a` comes before `b` in sequence space.
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn seq_le(a: u32, b: u32) -> bool {
    a == b || seq_lt(a, b)
}

/// A TCP segment from the guest, already checked and parsed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg<'a> {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: Option<u32>,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub window: u16,
    pub mss: Option<u16>,
    pub window_scale: Option<u8>,
    pub payload: &'a [u8],
}

/// Who opened the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    Guest,
    /// Accepted on a forward listener.
    Forward,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Guest sent SYN; the host `connect()` is in progress.
    Connecting,
    /// Forward: SYN sent to the guest.
    SynSent,
    /// SYN-ACK sent to the guest.
    SynReceived,
    Open,
    /// Both directions closed; lingering to re-acknowledge a late FIN.
    TimeWait,
}

/// What the engine should do with a flow after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Keep,
    Close,
}

pub(crate) struct TcpFlow {
    pub stream: TcpStream,
    pub guest: SocketAddrV4,
    /// The endpoint the guest talks to, as the guest sees it.
    pub remote: SocketAddrV4,
    pub host_peer: SocketAddr,
    pub origin: Origin,
    phase: Phase,

    // Engine -> guest.
    iss: u32,
    snd_una: u32,
    snd_nxt: u32,
    /// Highest sequence number sent so far (snd_nxt may go back to resend).
    snd_max: u32,
    snd_wnd: u32,
    snd_wscale: u8,
    guest_mss: u16,
    tx: Ring,
    host_eof: bool,
    fin_sent: bool,
    fin_acked: bool,

    // Guest -> engine.
    rcv_nxt: u32,
    rcv_wscale: u8,
    window_scaling: bool,
    rx: Ring,
    guest_fin: bool,
    host_write_shut: bool,
    last_window: u32,
    ack_due: bool,

    // Host socket readiness (edge-triggered, so remembered).
    readable: bool,
    writable: bool,

    rto: Duration,
    rto_at: Option<Instant>,
    retries: u32,
    dup_acks: u32,
    time_wait_until: Option<Instant>,

    pub created: Instant,
    pub last_active: Instant,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
}

/// Window shift that lets `buffer` bytes be advertised.
fn window_shift(buffer: usize) -> u8 {
    let mut shift = 0u8;
    while (buffer >> shift) > 0xffff && shift < 14 {
        shift += 1;
    }
    shift
}

impl TcpFlow {
    fn new(
        stream: TcpStream,
        (guest, remote, host_peer): (SocketAddrV4, SocketAddrV4, SocketAddr),
        iss: u32,
        (cfg, budget): (&NatConfig, &BufferBudget),
        now: Instant,
    ) -> Self {
        TcpFlow {
            stream,
            guest,
            remote,
            host_peer,
            origin: Origin::Guest,
            phase: Phase::Connecting,
            iss,
            snd_una: iss,
            snd_nxt: iss,
            snd_max: iss,
            snd_wnd: 0,
            snd_wscale: 0,
            guest_mss: DEFAULT_MSS,
            tx: Ring::new(cfg.tcp_buffer, budget),
            host_eof: false,
            fin_sent: false,
            fin_acked: false,
            rcv_nxt: 0,
            rcv_wscale: 0,
            window_scaling: false,
            rx: Ring::new(cfg.tcp_buffer, budget),
            guest_fin: false,
            host_write_shut: false,
            last_window: 0,
            ack_due: false,
            readable: false,
            writable: false,
            rto: INITIAL_RTO,
            rto_at: None,
            retries: 0,
            dup_acks: 0,
            time_wait_until: None,
            created: now,
            last_active: now,
            bytes_from_guest: 0,
            bytes_to_guest: 0,
        }
    }

    /// A flow for a guest SYN whose host `connect()` has been started.
    pub fn outbound(
        stream: TcpStream,
        syn: &Seg<'_>,
        host_peer: SocketAddr,
        iss: u32,
        (cfg, budget): (&NatConfig, &BufferBudget),
        now: Instant,
    ) -> Self {
        let mut flow = TcpFlow::new(
            stream,
            (syn.src, syn.dst, host_peer),
            iss,
            (cfg, budget),
            now,
        );
        flow.rcv_nxt = syn.seq.wrapping_add(1);
        flow.take_syn_options(syn, cfg);
        flow
    }

    /// A flow for a connection accepted on a forward listener; sends the SYN.
    pub fn forward(
        stream: TcpStream,
        (guest, remote): (SocketAddrV4, SocketAddrV4),
        iss: u32,
        (cfg, budget): (&NatConfig, &BufferBudget),
        out: &mut Output,
        now: Instant,
    ) -> Self {
        let host_peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut flow = TcpFlow::new(stream, (guest, remote, host_peer), iss, (cfg, budget), now);
        flow.origin = Origin::Forward;
        flow.phase = Phase::SynSent;
        flow.rcv_wscale = window_shift(cfg.tcp_buffer);
        flow.send_syn(out, cfg, now);
        flow
    }

    fn take_syn_options(&mut self, syn: &Seg<'_>, cfg: &NatConfig) {
        self.guest_mss = syn.mss.unwrap_or(DEFAULT_MSS).clamp(64, our_mss(cfg));
        if let Some(ws) = syn.window_scale {
            self.window_scaling = true;
            self.snd_wscale = ws.min(14);
            self.rcv_wscale = window_shift(cfg.tcp_buffer);
        } else {
            self.window_scaling = false;
            self.snd_wscale = 0;
            self.rcv_wscale = 0;
        }
        // Windows in SYN segments are never scaled.
        self.snd_wnd = u32::from(syn.window);
    }

    /// The state, from the engine's side of the guest connection.
    pub fn state(&self) -> FlowState {
        match self.phase {
            Phase::Connecting => FlowState::Connecting,
            Phase::SynSent => FlowState::SynSent,
            Phase::SynReceived => FlowState::SynReceived,
            Phase::TimeWait => FlowState::TimeWait,
            Phase::Open => match (self.fin_sent, self.fin_acked, self.guest_fin) {
                (false, _, false) => FlowState::Established,
                (false, _, true) => FlowState::CloseWait,
                (true, false, false) => FlowState::FinWait1,
                (true, true, false) => FlowState::FinWait2,
                (true, false, true) => FlowState::LastAck,
                (true, true, true) => FlowState::Closed,
            },
        }
    }

    pub fn is_time_wait(&self) -> bool {
        self.phase == Phase::TimeWait
    }

    /// The window we offer the guest, before scaling.
    fn window(&self) -> u32 {
        self.rx.available() as u32
    }

    /// Gives empty rings' memory back to the budget.
    pub fn release_idle_buffers(&mut self) {
        self.tx.release_if_empty();
        self.rx.release_if_empty();
    }

    fn scaled_window(&self) -> u16 {
        (self.window() >> self.rcv_wscale).min(0xffff) as u16
    }

    fn segment<'a>(
        &self,
        seq: u32,
        flags: TcpFlags,
        payload: (&'a [u8], &'a [u8]),
    ) -> TcpSegment<'a> {
        TcpSegment {
            src: self.remote,
            dst: self.guest,
            seq,
            ack: self.rcv_nxt,
            flags,
            window: self.scaled_window(),
            syn_options: None,
            payload,
            mss: self.guest_mss,
        }
    }

    fn send_syn(&mut self, out: &mut Output, cfg: &NatConfig, now: Instant) {
        if out.neighbor(*self.guest.ip()).is_none() {
            // Nobody to send to yet; the retransmission timer tries again.
            out.arp_request(cfg.gateway, *self.guest.ip());
        } else {
            let mut seg = self.segment(self.iss, TcpFlags::SYN, (&[], &[]));
            seg.ack = 0;
            seg.window = self.window().min(0xffff) as u16;
            seg.syn_options = Some(SynOptions {
                mss: our_mss(cfg),
                window_scale: Some(self.rcv_wscale),
            });
            out.tcp(&seg);
        }
        self.snd_nxt = self.iss.wrapping_add(1);
        self.snd_max = self.snd_nxt;
        self.rto_at = Some(now + self.rto);
    }

    fn send_syn_ack(&mut self, out: &mut Output, cfg: &NatConfig, now: Instant) {
        let mut seg = self.segment(self.iss, TcpFlags::SYN_ACK, (&[], &[]));
        seg.window = self.window().min(0xffff) as u16;
        seg.syn_options = Some(SynOptions {
            mss: our_mss(cfg),
            window_scale: self.window_scaling.then_some(self.rcv_wscale),
        });
        out.tcp(&seg);
        self.snd_nxt = self.iss.wrapping_add(1);
        self.snd_max = self.snd_nxt;
        self.rto_at = Some(now + self.rto);
    }

    fn send_ack(&mut self, out: &mut Output) {
        let seg = self.segment(self.snd_nxt, TcpFlags::ACK, (&[], &[]));
        out.tcp(&seg);
        self.last_window = self.window();
        self.ack_due = false;
    }

    /// RST toward the guest, e.g. when the host side failed.
    pub fn send_reset(&mut self, out: &mut Output) {
        let seg = self.segment(self.snd_nxt, TcpFlags::RST_ACK, (&[], &[]));
        out.tcp(&seg);
    }

    /// Where a reset of this flow lands in the guest (`saved_flows`): the
    /// highest sequence number sent, which is the guest's next expected
    /// one or inside its window (Linux answers the latter with a
    /// challenge ACK, which finds no flow and is reset exactly). None once
    /// both sides have closed.
    pub fn reset_point(&self) -> Option<TcpReset> {
        (self.phase != Phase::TimeWait).then_some(TcpReset {
            guest: self.guest,
            remote: self.remote,
            seq: self.snd_max,
            ack: self.rcv_nxt,
        })
    }

    /// Resets the host side too: closing with linger 0 sends RST.
    pub fn abort_host(&self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
    }

    /// The host `connect()` finished (writable or error).
    fn on_connected(&mut self, out: &mut Output, cfg: &NatConfig, now: Instant) -> Verdict {
        let failed = match self.stream.take_error() {
            Ok(Some(err)) => Some(err),
            Ok(None) => self.stream.peer_addr().err(),
            Err(err) => Some(err),
        };
        if let Some(err) = failed {
            log::debug!(
                "nat: tcp {} -> {}: host connect to {} failed: {err}",
                self.guest,
                self.remote,
                self.host_peer
            );
            refuse(out, self.remote, self.guest, self.rcv_nxt);
            return Verdict::Close;
        }
        self.phase = Phase::SynReceived;
        self.send_syn_ack(out, cfg, now);
        Verdict::Keep
    }

    /// A segment from the guest for this flow.
    pub fn on_segment(
        &mut self,
        seg: &Seg<'_>,
        out: &mut Output,
        cfg: &NatConfig,
        now: Instant,
    ) -> Verdict {
        self.last_active = now;
        if seg.rst {
            return self.on_reset(seg);
        }
        match self.phase {
            Phase::Connecting => Verdict::Keep,
            Phase::SynSent => self.on_syn_ack(seg, out, cfg, now),
            Phase::SynReceived => {
                if seg.syn && !seg.fin && seg.ack.is_none() {
                    // Our SYN-ACK was lost.
                    self.send_syn_ack(out, cfg, now);
                    return Verdict::Keep;
                }
                if seg.ack != Some(self.iss.wrapping_add(1)) {
                    return Verdict::Keep;
                }
                self.phase = Phase::Open;
                self.snd_una = self.iss.wrapping_add(1);
                self.rto_at = None;
                self.retries = 0;
                self.rto = INITIAL_RTO;
                self.snd_wnd = u32::from(seg.window) << self.snd_wscale;
                self.on_open_segment(seg, out, cfg, now)
            }
            Phase::Open => self.on_open_segment(seg, out, cfg, now),
            Phase::TimeWait => {
                if seg.fin {
                    self.send_ack(out);
                }
                Verdict::Keep
            }
        }
    }

    fn on_reset(&mut self, seg: &Seg<'_>) -> Verdict {
        let acceptable = match self.phase {
            Phase::SynSent => seg.ack == Some(self.iss.wrapping_add(1)),
            Phase::Connecting => false,
            _ => {
                // In-window RSTs only (RFC 5961 would challenge the rest).
                let end = self.rcv_nxt.wrapping_add(self.window().max(1));
                seq_le(self.rcv_nxt, seg.seq) && seq_lt(seg.seq, end)
            }
        };
        if !acceptable {
            return Verdict::Keep;
        }
        log::debug!("nat: tcp {} -> {}: reset by guest", self.guest, self.remote);
        self.abort_host();
        Verdict::Close
    }

    fn on_syn_ack(
        &mut self,
        seg: &Seg<'_>,
        out: &mut Output,
        cfg: &NatConfig,
        now: Instant,
    ) -> Verdict {
        if !seg.syn || seg.ack != Some(self.iss.wrapping_add(1)) {
            if let Some(ack) = seg.ack {
                if !seg.syn {
                    // Not for this connection attempt.
                    send_bare(out, self.remote, self.guest, (ack, 0), TcpFlags::RST);
                }
            }
            return Verdict::Keep;
        }
        let ws_ours = self.rcv_wscale;
        self.rcv_nxt = seg.seq.wrapping_add(1);
        self.take_syn_options(seg, cfg);
        if seg.window_scale.is_some() {
            self.rcv_wscale = ws_ours;
        }
        self.snd_una = self.iss.wrapping_add(1);
        self.phase = Phase::Open;
        self.rto_at = None;
        self.retries = 0;
        self.rto = INITIAL_RTO;
        self.send_ack(out);
        self.pump(out, now)
    }

    fn on_open_segment(
        &mut self,
        seg: &Seg<'_>,
        out: &mut Output,
        cfg: &NatConfig,
        now: Instant,
    ) -> Verdict {
        if seg.syn {
            // A retransmitted SYN (our SYN-ACK's ACK was lost) or junk:
            // either way the guest learns where we are.
            self.send_ack(out);
            return Verdict::Keep;
        }
        let Some(ack) = seg.ack else {
            return Verdict::Keep;
        };
        let outstanding = self.snd_max.wrapping_sub(self.snd_una);
        if seq_lt(self.snd_una, ack) && seq_le(ack, self.snd_max) {
            let mut acked = ack.wrapping_sub(self.snd_una) as usize;
            if acked > self.tx.len() {
                // The FIN takes the sequence number after the last byte.
                self.fin_acked = true;
                self.fin_sent = true;
                acked = self.tx.len();
            }
            self.tx.consume(acked);
            self.snd_una = ack;
            if seq_lt(self.snd_nxt, ack) {
                self.snd_nxt = ack;
            }
            self.retries = 0;
            self.rto = INITIAL_RTO;
            self.dup_acks = 0;
            self.rto_at = if self.snd_una == self.snd_max {
                None
            } else {
                Some(now + self.rto)
            };
        } else if ack == self.snd_una {
            let new_wnd = u32::from(seg.window) << self.snd_wscale;
            if seg.payload.is_empty() && !seg.fin && outstanding > 0 && new_wnd == self.snd_wnd {
                self.dup_acks += 1;
                if self.dup_acks == DUP_ACK_THRESHOLD {
                    out.counters.tcp_retransmits += 1;
                    self.go_back();
                }
            }
        } else if seq_lt(self.snd_max, ack) {
            // Acknowledges what was never sent.
            self.send_ack(out);
            return Verdict::Keep;
        }
        self.snd_wnd = u32::from(seg.window) << self.snd_wscale;

        if !seg.payload.is_empty() || seg.fin {
            if let Verdict::Close = self.receive(seg, out) {
                return Verdict::Close;
            }
        }
        if let Verdict::Close = self.pump(out, now) {
            return Verdict::Close;
        }
        self.check_closed(cfg, now)
    }

    /// Takes the in-order part of the guest's data and FIN.
    fn receive(&mut self, seg: &Seg<'_>, out: &mut Output) -> Verdict {
        let offset = self.rcv_nxt.wrapping_sub(seg.seq) as usize;
        if seq_lt(self.rcv_nxt, seg.seq) {
            // A gap: drop it and say what we expect (a duplicate ACK).
            out.counters.tcp_out_of_order += 1;
            self.ack_due = true;
            return Verdict::Keep;
        }
        let seg_len = seg.payload.len() + usize::from(seg.fin);
        if offset >= seg_len {
            // Entirely old: a retransmission of something we have.
            self.ack_due = true;
            return Verdict::Keep;
        }
        if self.guest_fin {
            self.ack_due = true;
            return Verdict::Keep;
        }
        let data = seg
            .payload
            .get(offset.min(seg.payload.len())..)
            .unwrap_or(&[]);
        let mut taken = 0;
        if self.rx.is_empty() && self.writable && !self.host_write_shut {
            match self.stream.write(data) {
                Ok(n) => taken = n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return self.host_failed(err, out),
            }
            if taken < data.len() {
                self.writable = false;
            }
        }
        taken += self.rx.push(&data[taken..]);
        self.rcv_nxt = self.rcv_nxt.wrapping_add(taken as u32);
        self.bytes_from_guest += taken as u64;
        if seg.fin && taken == data.len() {
            self.guest_fin = true;
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            log::trace!("nat: tcp {} -> {}: guest FIN", self.guest, self.remote);
        }
        self.ack_due = true;
        Verdict::Keep
    }

    fn host_failed(&mut self, err: io::Error, out: &mut Output) -> Verdict {
        log::debug!(
            "nat: tcp {} -> {}: host side failed: {err}",
            self.guest,
            self.remote
        );
        self.send_reset(out);
        Verdict::Close
    }

    fn note_sent(&mut self) {
        if seq_lt(self.snd_max, self.snd_nxt) {
            self.snd_max = self.snd_nxt;
        }
    }

    /// Resends everything not acknowledged (go-back-N).
    fn go_back(&mut self) {
        self.snd_nxt = self.snd_una;
        if self.fin_sent && !self.fin_acked {
            self.fin_sent = false;
        }
        self.dup_acks = 0;
    }

    /// The host socket reported readiness.
    pub fn on_host_event(
        &mut self,
        readable: bool,
        writable: bool,
        out: &mut Output,
        cfg: &NatConfig,
        now: Instant,
    ) -> Verdict {
        self.readable |= readable;
        self.writable |= writable;
        if self.phase == Phase::Connecting {
            if !(readable || writable) {
                return Verdict::Keep;
            }
            return self.on_connected(out, cfg, now);
        }
        if let Verdict::Close = self.pump(out, now) {
            return Verdict::Close;
        }
        self.check_closed(cfg, now)
    }

    /// Moves bytes both ways as far as buffers, windows and the output queue
    /// allow, then sends what is due.
    pub fn pump(&mut self, out: &mut Output, now: Instant) -> Verdict {
        if self.phase != Phase::Open {
            return Verdict::Keep;
        }
        // Guest -> host.
        while self.writable && !self.rx.is_empty() {
            match self.stream.write(self.rx.front()) {
                Ok(0) => break,
                Ok(n) => self.rx.consume(n),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return self.host_failed(err, out),
            }
        }
        if self.guest_fin && self.rx.is_empty() && !self.host_write_shut {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        // Reopen the guest's window once the host drained enough of it.
        let window = self.window();
        if !self.guest_fin
            && window > self.last_window
            && (self.last_window < u32::from(self.guest_mss) * 2
                || window - self.last_window >= (self.rx.limit() / 4) as u32)
        {
            self.ack_due = true;
        }
        // Host -> guest.
        while self.readable && !self.host_eof && self.tx.free() > 0 {
            if !out.has_room() {
                out.starved = true;
                break;
            }
            let space = self.tx.write_space(HOST_READ);
            if space.is_empty() {
                // The NAT's buffer budget is spent: wait for memory.
                if !out.budget_starved {
                    out.budget_starved = true;
                    out.counters.budget_waits += 1;
                }
                break;
            }
            match self.stream.read(space) {
                Ok(0) => {
                    self.host_eof = true;
                    log::trace!("nat: tcp {} -> {}: host EOF", self.guest, self.remote);
                }
                Ok(n) => {
                    self.tx.commit(n);
                    self.output(out, now);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return self.host_failed(err, out),
            }
        }
        self.output(out, now);
        Verdict::Keep
    }

    /// Largest payload per frame toward the guest.
    fn max_segment(&self, out: &Output) -> usize {
        let mss = usize::from(self.guest_mss);
        if out.offloads.tso4 && out.offloads.csum {
            let room = MAX_IP_PACKET - IPV4_LEN - TCP_LEN;
            (room / mss).max(1) * mss
        } else {
            mss
        }
    }

    /// Sends new data (and the FIN) within the guest's window.
    fn output(&mut self, out: &mut Output, now: Instant) {
        if self.phase != Phase::Open {
            return;
        }
        let max_seg = self.max_segment(out);
        loop {
            let in_flight = (self.snd_nxt.wrapping_sub(self.snd_una) as usize).min(self.tx.len());
            let unsent = self.tx.len() - in_flight;
            let window_left = (self.snd_wnd as usize).saturating_sub(in_flight);
            if unsent > 0 && window_left > 0 {
                if !out.has_room() {
                    out.starved = true;
                    break;
                }
                let len = unsent.min(window_left).min(max_seg);
                let payload = self.tx.slices(in_flight, len);
                let last = len == unsent;
                let seg = self.segment(
                    self.snd_nxt,
                    TcpFlags {
                        ack: true,
                        psh: last,
                        ..TcpFlags::default()
                    },
                    payload,
                );
                out.tcp(&seg);
                self.last_window = self.window();
                self.ack_due = false;
                self.snd_nxt = self.snd_nxt.wrapping_add(len as u32);
                self.note_sent();
                self.bytes_to_guest += len as u64;
                if self.rto_at.is_none() {
                    self.rto_at = Some(now + self.rto);
                }
                continue;
            }
            if unsent == 0 && self.host_eof && !self.fin_sent {
                let seg = self.segment(self.snd_nxt, TcpFlags::FIN_ACK, (&[], &[]));
                out.tcp(&seg);
                self.last_window = self.window();
                self.ack_due = false;
                self.fin_sent = true;
                self.snd_nxt = self.snd_nxt.wrapping_add(1);
                self.note_sent();
                if self.rto_at.is_none() {
                    self.rto_at = Some(now + self.rto);
                }
            }
            if unsent > 0 && self.snd_wnd == 0 && self.rto_at.is_none() {
                // Zero window: probe later in case the update gets lost.
                self.rto_at = Some(now + self.rto);
            }
            break;
        }
    }

    /// Sends a pure ACK if one is owed and nothing else carried it.
    pub fn flush_ack(&mut self, out: &mut Output) {
        if self.ack_due && matches!(self.phase, Phase::Open | Phase::TimeWait) {
            self.send_ack(out);
        }
    }

    /// Both directions finished: linger in TIME-WAIT or close.
    fn check_closed(&mut self, cfg: &NatConfig, now: Instant) -> Verdict {
        if self.phase != Phase::Open || !(self.guest_fin && self.fin_acked && self.host_write_shut)
        {
            return Verdict::Keep;
        }
        self.rto_at = None;
        if cfg.time_wait.is_zero() {
            return Verdict::Close;
        }
        self.phase = Phase::TimeWait;
        self.time_wait_until = Some(now + cfg.time_wait);
        Verdict::Keep
    }

    /// Timers: retransmission, zero-window probe, TIME-WAIT, idleness.
    pub fn on_tick(&mut self, out: &mut Output, cfg: &NatConfig, now: Instant) -> Verdict {
        if let Some(until) = self.time_wait_until {
            return if now >= until {
                Verdict::Close
            } else {
                Verdict::Keep
            };
        }
        if now.duration_since(self.last_active) >= cfg.tcp_idle_timeout {
            log::debug!("nat: tcp {} -> {}: idle, reset", self.guest, self.remote);
            self.send_reset(out);
            self.abort_host();
            return Verdict::Close;
        }
        let Some(at) = self.rto_at else {
            return Verdict::Keep;
        };
        if now < at {
            return Verdict::Keep;
        }
        self.retries += 1;
        if self.retries > MAX_RETRIES {
            log::debug!(
                "nat: tcp {} -> {}: guest stopped answering, reset",
                self.guest,
                self.remote
            );
            self.send_reset(out);
            self.abort_host();
            return Verdict::Close;
        }
        self.rto = (self.rto * 2).min(MAX_RTO);
        self.rto_at = Some(now + self.rto);
        match self.phase {
            Phase::SynSent => self.send_syn(out, cfg, now),
            Phase::SynReceived => self.send_syn_ack(out, cfg, now),
            Phase::Open => {
                if self.snd_max != self.snd_una {
                    out.counters.tcp_retransmits += 1;
                    self.go_back();
                    self.output(out, now);
                } else if !self.tx.is_empty() && self.snd_wnd == 0 {
                    // Zero-window probe: an old sequence number draws an ACK
                    // carrying the guest's current window.
                    let seg = self.segment(self.snd_nxt.wrapping_sub(1), TcpFlags::ACK, (&[], &[]));
                    out.tcp(&seg);
                } else {
                    self.rto_at = None;
                }
            }
            Phase::Connecting | Phase::TimeWait => self.rto_at = None,
        }
        Verdict::Keep
    }
}

/// MSS the engine offers: what fits in one guest MTU.
pub(crate) fn our_mss(cfg: &NatConfig) -> u16 {
    cfg.mtu.saturating_sub((IPV4_LEN + TCP_LEN) as u16).max(64)
}

/// Answers a guest SYN (or anything without a flow) with RST, the way a host
/// with nothing listening does.
pub(crate) fn refuse(out: &mut Output, from: SocketAddrV4, to: SocketAddrV4, ack: u32) {
    send_bare(out, from, to, (0, ack), TcpFlags::RST_ACK);
}

/// A segment with no payload, options or window (resets).
fn send_bare(
    out: &mut Output,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    (seq, ack): (u32, u32),
    flags: TcpFlags,
) {
    out.tcp(&TcpSegment {
        src,
        dst,
        seq,
        ack,
        flags,
        window: 0,
        syn_options: None,
        payload: (&[], &[]),
        mss: DEFAULT_MSS,
    });
}

/// A TCP flow the guest has, as a reset toward it needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpReset {
    pub guest: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
}

/// Resets the guest's side of a flow the engine no longer has.
pub(crate) fn reset_guest(out: &mut Output, flow: &TcpReset) {
    send_bare(
        out,
        flow.remote,
        flow.guest,
        (flow.seq, flow.ack),
        TcpFlags::RST_ACK,
    );
}

/// RST for a segment that belongs to no flow (RFC 9293 3.10.7.1).
pub(crate) fn reset_stray(out: &mut Output, seg: &Seg<'_>) {
    if seg.rst {
        return;
    }
    let (seq, ack, ack_flag) = match seg.ack {
        Some(ack) => (ack, 0, false),
        None => (
            0,
            seg.seq
                .wrapping_add(seg.payload.len() as u32)
                .wrapping_add(u32::from(seg.syn) + u32::from(seg.fin)),
            true,
        ),
    };
    let flags = if ack_flag {
        TcpFlags::RST_ACK
    } else {
        TcpFlags::RST
    };
    send_bare(out, seg.dst, seg.src, (seq, ack), flags);
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{Ipv4Addr, TcpListener};

    use super::*;
    use crate::net::testkit::{Harness, Seen, GATEWAY_IP, GUEST_IP};

    const ISN: u32 = 1_000_000;
    const ACK: TcpFlags = TcpFlags::ACK;

    struct Conn {
        h: Harness,
        guest: SocketAddrV4,
        remote: SocketAddrV4,
        /// Next sequence number the guest sends.
        snd: u32,
        /// Next sequence number the guest expects.
        rcv: u32,
        host: TcpStream,
    }

    impl Conn {
        fn segment(&mut self, seq: u32, flags: TcpFlags, window: u16, payload: &[u8]) {
            let frame = self.h.guest.tcp(
                self.guest,
                self.remote,
                seq,
                Some(self.rcv),
                flags,
                window,
                None,
                payload,
            );
            self.h.send(&frame);
        }

        fn send(&mut self, payload: &[u8]) {
            self.segment(self.snd, ACK, 512, payload);
            self.snd = self.snd.wrapping_add(payload.len() as u32);
        }

        fn poll(&mut self, want: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
            self.h.poll_until(Duration::from_secs(3), want)
        }
    }

    /// The guest opens a connection from `port` to `remote`.
    fn send_syn(h: &mut Harness, port: u16, remote: SocketAddrV4, options: Option<SynOptions>) {
        let syn = h.guest.tcp(
            SocketAddrV4::new(GUEST_IP, port),
            remote,
            ISN,
            None,
            TcpFlags::SYN,
            64000,
            options,
            &[],
        );
        h.send(&syn);
    }

    fn connect(cfg: NatConfig) -> Conn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let buffer = cfg.tcp_buffer;
        let mut h = Harness::new(cfg);
        let guest = SocketAddrV4::new(GUEST_IP, 33000);
        let remote = SocketAddrV4::new(GATEWAY_IP, port);
        let options = SynOptions {
            mss: 1460,
            window_scale: Some(7),
        };
        send_syn(&mut h, guest.port(), remote, Some(options));
        let frames = h.poll_until(Duration::from_secs(3), |f| f.iter().any(|s| s.syn));
        let synack = frames.iter().find(|s| s.syn).expect("SYN-ACK");
        assert!(synack.ack_flag);
        assert_eq!(synack.ack, ISN + 1);
        assert_eq!(synack.mss, Some(1460));
        assert_eq!(synack.window_scale, Some(window_shift(buffer)));
        assert_eq!((synack.src_port, synack.dst_port), (port, 33000));
        let (host, _) = listener.accept().unwrap();
        host.set_nonblocking(true).unwrap();
        let mut conn = Conn {
            h,
            guest,
            remote,
            snd: ISN + 1,
            rcv: synack.seq.wrapping_add(1),
            host,
        };
        conn.segment(conn.snd, ACK, 512, &[]);
        let flows = conn.h.nat.flows();
        assert_eq!(flows[0].state, "ESTABLISHED");
        conn
    }

    fn host_read(host: &mut TcpStream) -> Vec<u8> {
        let mut all = Vec::new();
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() < Duration::from_millis(300) {
            match host.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        all
    }

    /// A suspend saves the flows; the resumed VM's NAT, a new one that has
    /// not heard from the guest yet, resets each where the guest accepts
    /// it: at the sequence number it expects next, to its MAC.
    #[test]
    fn a_resumed_nat_resets_the_flows_the_guest_had() {
        let mut c = connect(NatConfig::default());
        c.send(b"hello host");
        c.poll(|f| f.iter().any(|s| s.ack == ISN + 11));
        c.host.write_all(b"and back").unwrap();
        let data = c.poll(|f| f.iter().any(|s| !s.payload.is_empty()));
        let sent = data.iter().find(|s| !s.payload.is_empty()).unwrap();
        let expected = sent.seq.wrapping_add(sent.payload.len() as u32);
        let saved = c.h.nat.saved_flows();
        let saved: crate::net::SavedFlows =
            serde_json::from_slice(&serde_json::to_vec(&saved).unwrap()).unwrap();
        assert_eq!(saved.tcp.len(), 1, "{saved:?}");

        let mut resumed = Harness::new(NatConfig::default());
        assert!(resumed.frames().is_empty());
        resumed.nat.reset_saved_flows(&saved);
        let frames = resumed.frames();
        assert_eq!(frames.len(), 1, "{frames:?}");
        let rst = &frames[0];
        assert!(rst.rst && rst.ack_flag, "{rst:?}");
        assert_eq!(rst.eth_dst, Some(crate::net::testkit::GUEST_MAC));
        assert_eq!((rst.src, rst.dst), (Some(*c.remote.ip()), Some(GUEST_IP)));
        assert_eq!((rst.src_port, rst.dst_port), (c.remote.port(), 33000));
        assert_eq!(rst.seq, expected, "where the guest expects the next byte");
        assert_eq!(rst.ack, ISN + 11);
        // Nothing is left to reset once the flow is gone on both sides.
        assert!(Harness::new(NatConfig::default())
            .nat
            .saved_flows()
            .tcp
            .is_empty());
    }

    #[test]
    fn handshake_then_data_to_host() {
        let mut c = connect(NatConfig::default());
        c.send(b"hello host");
        let acks = c.poll(|f| f.iter().any(|s| s.ack == ISN + 11));
        assert!(
            acks.iter().any(|s| s.ack == ISN + 11 && s.ack_flag),
            "{acks:?}"
        );
        assert_eq!(host_read(&mut c.host), b"hello host");
    }

    #[test]
    fn out_of_order_segments_are_dropped_and_reacknowledged() {
        let mut c = connect(NatConfig::default());
        let first = c.snd;
        c.segment(first + 5, ACK, 512, b"world");
        let dup = c.h.frames();
        assert_eq!(dup.len(), 1, "{dup:?}");
        assert_eq!(dup[0].ack, first, "duplicate ACK names the gap");
        assert_eq!(c.h.nat.counters().tcp_out_of_order, 1);
        assert!(host_read(&mut c.host).is_empty());
        c.segment(first, ACK, 512, b"hello");
        assert_eq!(c.h.frames().last().unwrap().ack, first + 5);
        // The guest retransmits what was dropped; overlap is trimmed.
        c.segment(first + 3, ACK, 512, b"loworld");
        assert_eq!(c.h.frames().last().unwrap().ack, first + 10);
        assert_eq!(host_read(&mut c.host), b"helloworld");
    }

    #[test]
    fn unacknowledged_data_is_retransmitted() {
        let mut c = connect(NatConfig::default());
        c.host.write_all(b"from host").unwrap();
        let frames = c.poll(|f| f.iter().any(|s| !s.payload.is_empty()));
        let data = frames
            .iter()
            .find(|s| !s.payload.is_empty())
            .unwrap()
            .clone();
        assert_eq!(data.payload, b"from host");
        assert_eq!(data.seq, c.rcv);
        // No ACK from the guest: the same bytes come again after the RTO.
        std::thread::sleep(INITIAL_RTO + Duration::from_millis(50));
        let again = c.poll(|f| f.iter().any(|s| !s.payload.is_empty()));
        let re = again
            .iter()
            .find(|s| !s.payload.is_empty())
            .expect("retransmission");
        assert_eq!((re.seq, &re.payload), (data.seq, &data.payload));
        assert!(c.h.nat.counters().tcp_retransmits >= 1);
        // Acknowledged: nothing more is sent.
        c.rcv = c.rcv.wrapping_add(9);
        c.segment(c.snd, ACK, 512, &[]);
        std::thread::sleep(INITIAL_RTO * 3);
        let quiet = c.poll(|_| false);
        assert!(quiet.iter().all(|s| s.payload.is_empty()), "{quiet:?}");
    }

    #[test]
    fn large_segments_when_the_guest_takes_tso() {
        let mut c = connect(NatConfig::default());
        c.h.nat.set_offloads(crate::net::Offloads {
            csum: true,
            tso4: true,
        });
        c.host.write_all(&[3u8; 100_000]).unwrap();
        let frames = c.poll(|f| f.iter().any(|s| !s.payload.is_empty()));
        let first = frames.iter().find(|s| !s.payload.is_empty()).unwrap();
        assert_eq!(first.gso_size, 1460);
        assert!(first.payload.len() > 1460, "{}", first.payload.len());
        let biggest = frames.iter().map(|s| s.payload.len()).max().unwrap();
        assert!(
            biggest <= 65536 / 1460 * 1460,
            "within the window and one IP packet"
        );
    }

    #[test]
    fn three_duplicate_acks_trigger_fast_retransmit() {
        let mut c = connect(NatConfig::default());
        c.host.write_all(&[1u8; 3000]).unwrap();
        let frames = c.poll(|f| f.iter().map(|s| s.payload.len()).sum::<usize>() >= 3000);
        let first_seq = frames.iter().find(|s| !s.payload.is_empty()).unwrap().seq;
        for _ in 0..3 {
            c.segment(c.snd, ACK, 512, &[]);
        }
        let again = c.h.frames();
        assert!(
            again
                .iter()
                .any(|s| s.seq == first_seq && !s.payload.is_empty()),
            "{again:?}"
        );
    }

    #[test]
    fn fin_each_way_with_half_close_then_time_wait() {
        let mut c = connect(NatConfig {
            time_wait: Duration::from_millis(100),
            ..NatConfig::default()
        });
        // Guest closes its side: the host reads EOF but may still send.
        c.segment(c.snd, TcpFlags::FIN_ACK, 512, b"bye");
        c.snd += 4;
        assert_eq!(c.h.frames().last().unwrap().ack, c.snd);
        assert_eq!(c.h.nat.flows()[0].state, "CLOSE_WAIT");
        let start = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match c.host.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let _ = c.poll(|_| true);
                    assert!(start.elapsed() < Duration::from_secs(3), "no EOF at host");
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, b"bye");
        c.host.write_all(b"still talking").unwrap();
        c.host.shutdown(std::net::Shutdown::Write).unwrap();
        let frames = c.poll(|f| f.iter().any(|s| s.fin));
        let data: Vec<u8> = frames.iter().flat_map(|s| s.payload.clone()).collect();
        assert_eq!(data, b"still talking");
        let fin = frames.iter().find(|s| s.fin).unwrap();
        assert_eq!(fin.seq, c.rcv + 13);
        c.rcv = fin.seq + 1;
        c.segment(c.snd, ACK, 512, &[]);
        let state = c.h.nat.flows()[0].state;
        assert_eq!(state, "TIME_WAIT");
        std::thread::sleep(Duration::from_millis(150));
        c.h.nat.tick(&mut c.h.reg);
        assert!(c.h.nat.flows().is_empty());
    }

    #[test]
    fn guest_reset_resets_the_host_side() {
        let mut c = connect(NatConfig::default());
        c.segment(c.snd, TcpFlags::RST, 0, &[]);
        assert!(c.h.nat.flows().is_empty());
        c.host.set_nonblocking(false).unwrap();
        c.host
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let err = c.host.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    }

    #[test]
    fn refused_host_port_resets_the_guest() {
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let mut h = Harness::new(NatConfig::default());
        send_syn(&mut h, 33001, SocketAddrV4::new(GATEWAY_IP, port), None);
        let frames = h.poll_until(Duration::from_secs(3), |f| f.iter().any(|s| s.rst));
        let rst = frames.iter().find(|s| s.rst).expect("RST");
        assert!(rst.ack_flag);
        assert_eq!(rst.ack, ISN + 1);
        assert!(h.nat.flows().is_empty());
    }

    #[test]
    fn tcp_dns_goes_to_the_resolver() {
        let resolver = TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(addr) = resolver.local_addr().unwrap() else {
            unreachable!()
        };
        let mut h = Harness::new(NatConfig {
            resolvers: vec![addr],
            ..NatConfig::default()
        });
        send_syn(
            &mut h,
            33003,
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 53),
            None,
        );
        let frames = h.poll_until(Duration::from_secs(3), |f| f.iter().any(|s| s.syn));
        assert!(frames
            .iter()
            .any(|s| s.syn && s.ack == ISN + 1 && s.src_port == 53));
        resolver.set_nonblocking(true).unwrap();
        assert!(
            resolver.accept().is_ok(),
            "the relay connected to the resolver"
        );
    }

    #[test]
    fn stray_segments_get_reset() {
        let mut h = Harness::new(NatConfig::default());
        let frame = h.guest.tcp(
            SocketAddrV4::new(GUEST_IP, 33002),
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 80),
            5,
            Some(77),
            ACK,
            100,
            None,
            b"late",
        );
        h.send(&frame);
        let frames = h.frames();
        assert_eq!(frames.len(), 1);
        assert!(frames[0].rst && !frames[0].ack_flag);
        assert_eq!(frames[0].seq, 77);
    }

    /// A guest side that can be told to refuse frames.
    struct Port {
        busy: bool,
        got: Vec<crate::net::GuestFrame>,
    }

    impl crate::net::GuestPort for Port {
        fn send(&mut self, frame: &crate::net::GuestFrame) -> Result<(), crate::net::PortBusy> {
            if self.busy {
                return Err(crate::net::PortBusy);
            }
            self.got.push(frame.clone());
            Ok(())
        }

        fn offloads(&self) -> crate::net::Offloads {
            crate::net::Offloads::default()
        }
    }

    #[test]
    fn a_busy_guest_port_pauses_host_reads_without_dropping() {
        let mut c = connect(NatConfig {
            tcp_buffer: 4 * 1024 * 1024,
            ..NatConfig::default()
        });
        // A wide-open guest window: only the port can hold data back.
        c.segment(c.snd, ACK, 0xffff, &[]);
        let mut port = Port {
            busy: true,
            got: Vec::new(),
        };
        let chunk = [5u8; 64 * 1024];
        let mut written = 0usize;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(500) {
            match c.host.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            for (token, events) in c.h.reg.wait(Duration::from_millis(5)).unwrap() {
                c.h.nat.handle_event(token, events, &mut c.h.reg);
            }
            c.h.nat.flush(&mut port, &mut c.h.reg);
        }
        let queued = c.h.nat.pending_frames();
        assert!(queued > 0 && queued <= 300, "{queued} frames queued");
        assert_eq!(c.h.nat.counters().dropped_to_guest, 0);
        assert!(matches!(c.host.write(&chunk), Err(e) if e.kind() == ErrorKind::WouldBlock));
        // The port takes frames again: everything queued goes out, and
        // reading the host resumes.
        port.busy = false;
        c.h.nat.flush(&mut port, &mut c.h.reg);
        let delivered: usize = port
            .got
            .iter()
            .map(|f| crate::net::testkit::parse(f).payload.len())
            .sum();
        assert!(
            delivered > queued * 1000,
            "{delivered} bytes for {queued} frames"
        );
        assert!(delivered < written);
    }

    #[test]
    fn closed_guest_window_stops_reading_the_host() {
        let cfg = NatConfig {
            tcp_buffer: 64 * 1024,
            ..NatConfig::default()
        };
        let mut c = connect(cfg);
        // The guest closes its window.
        c.segment(c.snd, ACK, 0, &[]);
        let mut written = 0usize;
        let chunk = [9u8; 16 * 1024];
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(500) {
            match c.host.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            let frames = c.poll(|_| true);
            assert!(
                frames.iter().all(|s| s.payload.is_empty()),
                "data sent into a closed window"
            );
        }
        // The host could only fill socket buffers plus the flow's bounded
        // buffer: its writes block, nothing grows without bound.
        assert!(written < 64 * 1024 * 1024, "host wrote {written} bytes");
        assert!(matches!(c.host.write(&chunk), Err(e) if e.kind() == ErrorKind::WouldBlock));
        // Reopen: data flows again, within the window.
        c.segment(c.snd, ACK, 256, &[]);
        let frames = c.poll(|f| f.iter().any(|s| !s.payload.is_empty()));
        let sent: usize = frames.iter().map(|s| s.payload.len()).sum();
        assert!(sent > 0 && sent <= 256 * 128, "{sent}");
    }
}
