//! A device's own I/O thread: an event loop of its own, woken by the
//! device's queue notifications (ioeventfds), so that slow device work (disk
//! reads, writes, fdatasync) never holds up the vCPUs, the console or the
//! NAT on the main loop, nor another disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Ends the loop when its eventfd is written.
struct Stop {
    event: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stop {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        self.stopped.store(true, Ordering::SeqCst);
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.event, EventSet::IN)) {
            log::error!("io thread: cannot watch for stop requests: {e:?}");
            self.stopped.store(true, Ordering::SeqCst);
        }
    }
}

/// A running I/O thread; stopping (or dropping) it joins the thread once
/// the work in hand is done.
pub struct IoThread {
    name: String,
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts a thread named `name` running an event loop with `subscriber`;
    /// returns once the thread is under its seccomp filter.
    pub fn spawn(name: &str, subscriber: Subscriber) -> std::io::Result<IoThread> {
        let stop = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let watcher = Stop {
            event: stop.try_clone()?,
            stopped: Arc::new(AtomicBool::new(false)),
        };
        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let stopped = watcher.stopped.clone();
        events.add_subscriber(Arc::new(Mutex::new(watcher)));
        events.add_subscriber(subscriber);
        let thread_name = name.to_string();
        let (filtered, installed) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let result = crate::seccomp::install(crate::seccomp::ThreadClass::BlockIo);
                let failed = result.is_err();
                let _ = filtered.send(result);
                if failed {
                    return;
                }
                while !stopped.load(Ordering::SeqCst) {
                    if let Err(e) = events.run_with_timeout(-1) {
                        log::error!("{thread_name}: event loop failed: {e:?}");
                        break;
                    }
                }
            })?;
        match installed.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(std::io::Error::other(e)),
            Err(_) => return Err(std::io::Error::other("the thread ended at its start")),
        }
        Ok(IoThread {
            name: name.to_string(),
            stop,
            handle: Some(handle),
        })
    }

    /// Asks the loop to end and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            log::error!("{}: cannot ask the thread to stop: {e}", self.name);
            return;
        }
        if handle.join().is_err() {
            log::error!("{}: the thread panicked", self.name);
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::events::{QueueEvents, QueueHandler};

    struct Count(Arc<Mutex<Vec<(usize, String)>>>);

    impl QueueHandler for Count {
        fn handle_queue(&mut self, index: usize) {
            let thread = std::thread::current().name().unwrap_or("").to_string();
            self.0.lock().unwrap().push((index, thread));
        }
    }

    #[test]
    fn notifications_run_on_the_named_thread_and_stop_joins() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let notifier = EventFd::new(EFD_NONBLOCK).unwrap();
        let events = QueueEvents::new(
            Arc::new(Mutex::new(Count(seen.clone()))),
            vec![notifier.try_clone().unwrap()],
        );
        let thread = IoThread::spawn("disk-test", Arc::new(Mutex::new(events))).unwrap();
        notifier.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while seen.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        thread.stop();
        assert_eq!(*seen.lock().unwrap(), vec![(0, "disk-test".to_string())]);
    }
}
