//! Pausing the guest: every vCPU thread parks between two `KVM_RUN`s until
//! the pause ends, so that the guest stands still while the VMM changes
//! what it runs on (a live snapshot switches its disks). Devices are not
//! paused: their I/O threads finish what they hold, and the caller drains
//! them.
//!
//! A vCPU inside `KVM_RUN` (halted, say) is pulled out with the kick signal,
//! resent until it parks: a signal that lands just before the thread enters
//! `KVM_RUN` does not interrupt it. Threads register their pthread id while
//! they run and leave under the gate's lock, so a kick never reaches a
//! thread that has ended.
//!
//! The gate knows how many vCPUs the machine has: a pause asked for just
//! after the VM started (a `suspend` right after `resume`) waits until
//! every vCPU thread has registered, instead of parking the ones that have
//! and saving a VM without the others' state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::vcpu::kick_signal;

/// How often a pause resends the kick to vCPUs that have not parked.
const KICK_EVERY: Duration = Duration::from_millis(1);

/// Why the guest could not be paused.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the VM is stopping")]
    Stopping,
    #[error("the guest's vCPUs did not stop within {0:?}")]
    Timeout(Duration),
}

#[derive(Default)]
struct GateState {
    /// A pause holds (or is being taken).
    paused: bool,
    /// The VM is ending: nothing parks any more.
    closed: bool,
    /// vCPU threads in their run loop, by pthread id.
    threads: Vec<libc::pthread_t>,
    /// Of those, how many are parked.
    parked: usize,
}

/// Where the vCPU threads park while the guest is paused.
pub struct VcpuGate {
    /// How many vCPU threads the machine runs: a pause holds all of them.
    vcpus: usize,
    state: Mutex<GateState>,
    changed: Condvar,
    /// `state.paused`, read without the lock on every vCPU exit.
    requested: AtomicBool,
}

/// A vCPU thread's place at the gate; dropping it leaves.
pub struct Registration<'a> {
    gate: &'a VcpuGate,
    thread: libc::pthread_t,
}

/// The guest stands still while this lives.
pub struct Pause<'a> {
    gate: &'a VcpuGate,
}

impl VcpuGate {
    pub fn new(vcpus: usize) -> Self {
        VcpuGate {
            vcpus,
            state: Mutex::default(),
            changed: Condvar::new(),
            requested: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread before its first `KVM_RUN`.
    pub fn register(&self) -> Registration<'_> {
        // SAFETY: pthread_self has no preconditions and always succeeds.
        let thread = unsafe { libc::pthread_self() };
        self.lock().threads.push(thread);
        self.changed.notify_all();
        Registration { gate: self, thread }
    }

    /// Called by a vCPU thread between two `KVM_RUN`s: waits here while the
    /// guest is paused.
    pub fn checkpoint(&self) {
        self.checkpoint_then(|| {});
    }

    /// As `checkpoint`, and when the thread parks, runs `on_park` first:
    /// the pause is not complete until it has returned (a suspend reads the
    /// vCPU's state there, on the thread that owns it).
    pub fn checkpoint_then(&self, on_park: impl FnOnce()) {
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        let st = self.lock();
        if !st.paused || st.closed {
            return;
        }
        drop(st);
        on_park();
        let mut st = self.lock();
        st.parked += 1;
        self.changed.notify_all();
        while st.paused && !st.closed {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.parked -= 1;
    }

    /// Stops every vCPU thread at its next checkpoint and returns once all
    /// are parked; the guest runs again when the `Pause` is dropped. Waits
    /// for a pause another thread holds. Gives up after `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<Pause<'_>, PauseError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.paused && !st.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PauseError::Timeout(timeout));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if st.closed {
            return Err(PauseError::Stopping);
        }
        st.paused = true;
        self.requested.store(true, Ordering::Release);
        loop {
            if st.closed {
                drop(st);
                self.resume();
                return Err(PauseError::Stopping);
            }
            if st.threads.len() >= self.vcpus && st.parked == st.threads.len() {
                return Ok(Pause { gate: self });
            }
            if Instant::now() >= deadline {
                drop(st);
                self.resume();
                return Err(PauseError::Timeout(timeout));
            }
            for &thread in &st.threads {
                // SAFETY: `thread` is registered, so its thread is running
                // (it deregisters under this lock before it ends), and the
                // kick signal has a handler (installed before any vCPU runs).
                let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
                if rc != 0 {
                    log::warn!("cannot kick a vCPU thread: errno {rc}");
                }
            }
            st = self
                .changed
                .wait_timeout(st, KICK_EVERY)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn resume(&self) {
        let mut st = self.lock();
        st.paused = false;
        self.requested.store(false, Ordering::Release);
        drop(st);
        self.changed.notify_all();
    }

    /// The VM is ending: parked vCPUs go on (to their exit), pauses fail.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        st.threads.retain(|&t| t != self.thread);
        drop(st);
        self.gate.changed.notify_all();
    }
}

impl Drop for Pause<'_> {
    fn drop(&mut self) {
        self.gate.resume();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// Threads that count loop turns, checking the gate each turn as vCPUs do.
    fn spin(gate: &Arc<VcpuGate>, n: usize, stop: &Arc<AtomicBool>) -> Vec<Arc<AtomicU64>> {
        crate::vmm::vcpu::install_kick_handler().unwrap();
        (0..n)
            .map(|_| {
                let (gate, stop) = (gate.clone(), stop.clone());
                let turns = Arc::new(AtomicU64::new(0));
                let counted = turns.clone();
                std::thread::spawn(move || {
                    let _at_gate = gate.register();
                    while !stop.load(Ordering::SeqCst) {
                        gate.checkpoint();
                        counted.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                });
                turns
            })
            .collect()
    }

    fn wait_registered(gate: &VcpuGate, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.lock().threads.len() < n {
            assert!(Instant::now() < deadline, "threads did not register");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_pause_parks_every_thread_until_dropped() {
        let gate = Arc::new(VcpuGate::new(3));
        let stop = Arc::new(AtomicBool::new(false));
        let turns = spin(&gate, 3, &stop);
        wait_registered(&gate, 3);
        let pause = gate.pause(Duration::from_secs(10)).unwrap();
        let frozen: Vec<u64> = turns.iter().map(|t| t.load(Ordering::SeqCst)).collect();
        std::thread::sleep(Duration::from_millis(30));
        let later: Vec<u64> = turns.iter().map(|t| t.load(Ordering::SeqCst)).collect();
        assert_eq!(frozen, later, "no thread ran while paused");
        drop(pause);
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            turns
                .iter()
                .zip(&later)
                .all(|(t, &before)| t.load(Ordering::SeqCst) > before),
            "every thread runs again"
        );
        // A second pause works as the first did.
        drop(gate.pause(Duration::from_secs(10)).unwrap());
        stop.store(true, Ordering::SeqCst);
    }

    #[test]
    fn closing_releases_parked_threads_and_refuses_pauses() {
        let gate = Arc::new(VcpuGate::new(2));
        let stop = Arc::new(AtomicBool::new(false));
        let turns = spin(&gate, 2, &stop);
        wait_registered(&gate, 2);
        let pause = gate.pause(Duration::from_secs(10)).unwrap();
        let before: u64 = turns.iter().map(|t| t.load(Ordering::SeqCst)).sum();
        gate.close();
        std::thread::sleep(Duration::from_millis(30));
        let after: u64 = turns.iter().map(|t| t.load(Ordering::SeqCst)).sum();
        assert!(after > before, "closed, the threads go on");
        drop(pause);
        assert!(matches!(
            gate.pause(Duration::from_secs(1)),
            Err(PauseError::Stopping)
        ));
        stop.store(true, Ordering::SeqCst);
    }

    #[test]
    fn a_thread_that_never_parks_times_the_pause_out_and_it_resumes() {
        crate::vmm::vcpu::install_kick_handler().unwrap();
        let gate = Arc::new(VcpuGate::new(1));
        // Registered but never at a checkpoint (a vCPU stuck in a device).
        let _stuck = gate.register();
        let err = gate.pause(Duration::from_millis(50)).err().unwrap();
        assert!(matches!(err, PauseError::Timeout(_)), "{err}");
        assert!(!gate.requested.load(Ordering::SeqCst), "not left paused");
    }

    #[test]
    fn a_pause_waits_for_vcpus_that_have_not_registered_yet() {
        let gate = Arc::new(VcpuGate::new(2));
        let stop = Arc::new(AtomicBool::new(false));
        // One of two vCPU threads has started: no pause yet.
        let first = spin(&gate, 1, &stop);
        wait_registered(&gate, 1);
        let err = gate.pause(Duration::from_millis(50)).err().unwrap();
        assert!(matches!(err, PauseError::Timeout(_)), "{err}");
        // A pause asked before the second starts holds once it has.
        let asked = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.pause(Duration::from_secs(10)).map(|_| ()).is_ok())
        };
        std::thread::sleep(Duration::from_millis(20));
        let _second = spin(&gate, 1, &stop);
        assert!(asked.join().unwrap(), "the pause held once both had parked");
        assert!(first[0].load(Ordering::SeqCst) > 0);
        stop.store(true, Ordering::SeqCst);
    }
}
