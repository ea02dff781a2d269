//! Helpers for device tests.

use std::sync::mpsc;
use std::time::Duration;

/// Long enough for any honest round of queue work on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `work` on `subject` in a thread of its own and gives `subject` back;
/// fails the test if it has not returned by the deadline (a device spinning
/// on a hostile ring), instead of hanging the suite.
pub fn returns_in_time<S, F>(subject: S, work: F) -> S
where
    S: Send + 'static,
    F: FnOnce(&mut S) + Send + 'static,
{
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let mut subject = subject;
        work(&mut subject);
        let _ = done.send(subject);
    });
    finished
        .recv_timeout(DEADLINE)
        .expect("the device did not return: it spins on the queue")
}
