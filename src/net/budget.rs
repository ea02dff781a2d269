//! The NAT's total buffer budget: every TCP flow's rings draw their memory
//! from one account, so however many flows a guest opens (up to
//! `max_flows`, each allowed `tcp_buffer` bytes each way) vmlab holds at
//! most `NatConfig::buffer_budget` bytes for them. A ring that cannot grow
//! stops its flow from reading its host socket (or, toward the host, from
//! taking more of the guest's data) until memory comes back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
struct Account {
    limit: usize,
    used: AtomicUsize,
}

/// A shared byte account; clones draw on the same one.
#[derive(Clone, Debug)]
pub(crate) struct BufferBudget(Arc<Account>);

impl BufferBudget {
    pub fn new(limit: usize) -> Self {
        BufferBudget(Arc::new(Account {
            limit,
            used: AtomicUsize::new(0),
        }))
    }

    /// Takes up to `want` bytes; returns how many were granted.
    pub fn take_up_to(&self, want: usize) -> usize {
        let account = &self.0;
        let mut used = account.used.load(Ordering::Relaxed);
        loop {
            let grant = want.min(account.limit.saturating_sub(used));
            if grant == 0 {
                return 0;
            }
            match account.used.compare_exchange_weak(
                used,
                used + grant,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return grant,
                Err(now) => used = now,
            }
        }
    }

    /// Returns `n` bytes taken before.
    pub fn give(&self, n: usize) {
        self.0.used.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    pub fn available(&self) -> usize {
        self.0.limit.saturating_sub(self.used())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Write};
    use std::net::{SocketAddrV4, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::net::output::{SynOptions, TcpFlags};
    use crate::net::testkit::{Harness, GATEWAY_IP, GUEST_IP};
    use crate::net::NatConfig;

    const FLOWS: u16 = 16;
    const PER_FLOW: usize = 256 * 1024;
    const BUDGET: usize = 1 << 20;

    /// Many slow flows: 16 host connections each send 256 KiB to a guest
    /// that acknowledges nothing, where every flow may buffer 256 KiB. The
    /// NAT holds at most its budget (1 MiB, not 4 MiB); once the guest
    /// reads, every byte of every flow still arrives.
    #[test]
    fn many_slow_flows_stay_within_the_budget_and_all_finish() {
        let mut h = Harness::new(NatConfig {
            tcp_buffer: PER_FLOW,
            buffer_budget: BUDGET,
            ..NatConfig::default()
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let remote = SocketAddrV4::new(GATEWAY_IP, listener.local_addr().unwrap().port());
        let isn = 5000u32;
        for i in 0..FLOWS {
            let syn = h.guest.tcp(
                SocketAddrV4::new(GUEST_IP, 40000 + i),
                remote,
                isn,
                None,
                TcpFlags::SYN,
                0xffff,
                Some(SynOptions {
                    mss: 1460,
                    window_scale: Some(7),
                }),
                &[],
            );
            h.send(&syn);
        }
        let synacks = h.poll_until(Duration::from_secs(5), |f| {
            f.iter().filter(|s| s.syn).count() == usize::from(FLOWS)
        });
        // Next sequence number each guest port expects, and what arrived.
        let mut expect = std::collections::HashMap::new();
        for s in synacks.iter().filter(|s| s.syn) {
            expect.insert(s.dst_port, (s.seq.wrapping_add(1), 0usize));
            let ack = h.guest.tcp(
                SocketAddrV4::new(GUEST_IP, s.dst_port),
                remote,
                isn + 1,
                Some(s.seq.wrapping_add(1)),
                TcpFlags::ACK,
                0xffff,
                None,
                &[],
            );
            h.send(&ack);
        }
        let mut hosts: Vec<(TcpStream, usize)> = (0..FLOWS)
            .map(|_| {
                let (s, _) = listener.accept().unwrap();
                s.set_nonblocking(true).unwrap();
                (s, 0)
            })
            .collect();
        let chunk = vec![7u8; 64 * 1024];
        let write_some = |hosts: &mut Vec<(TcpStream, usize)>| {
            for (s, sent) in hosts.iter_mut() {
                while *sent < PER_FLOW {
                    match s.write(&chunk[..(PER_FLOW - *sent).min(chunk.len())]) {
                        Ok(n) => *sent += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        };
        // The guest reads nothing: what the NAT buffers is bounded.
        let start = Instant::now();
        let mut peak = 0;
        while start.elapsed() < Duration::from_millis(1500) {
            write_some(&mut hosts);
            let _ = h.poll_until(Duration::from_millis(20), |_| false);
            peak = peak.max(h.nat.buffered_bytes());
        }
        assert!(peak <= BUDGET, "NAT buffered {peak} bytes, budget {BUDGET}");
        assert!(h.nat.counters().budget_waits > 0);
        // The guest acknowledges all it gets: every flow completes.
        let deadline = Instant::now() + Duration::from_secs(20);
        while expect.values().any(|&(_, got)| got < PER_FLOW) {
            assert!(
                Instant::now() < deadline,
                "flows stalled: {:?}",
                expect.values().map(|v| v.1).collect::<Vec<_>>()
            );
            write_some(&mut hosts);
            for seg in h.poll_until(Duration::from_millis(20), |_| false) {
                let Some((next, got)) = expect.get_mut(&seg.dst_port) else {
                    continue;
                };
                if seg.payload.is_empty() || seg.seq != *next {
                    continue;
                }
                *next = next.wrapping_add(seg.payload.len() as u32);
                *got += seg.payload.len();
                let ack = h.guest.tcp(
                    SocketAddrV4::new(GUEST_IP, seg.dst_port),
                    remote,
                    isn + 1,
                    Some(*next),
                    TcpFlags::ACK,
                    0xffff,
                    None,
                    &[],
                );
                h.send(&ack);
            }
        }
        assert!(h.nat.buffered_bytes() <= BUDGET);
    }

    #[test]
    fn grants_stop_at_the_limit_and_come_back() {
        let b = BufferBudget::new(100);
        let other = b.clone();
        assert_eq!(b.take_up_to(60), 60);
        assert_eq!(other.take_up_to(60), 40);
        assert_eq!(b.take_up_to(1), 0);
        assert_eq!(b.used(), 100);
        other.give(40);
        assert_eq!(b.available(), 40);
    }
}
