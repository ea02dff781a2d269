//! How often something may happen: a burst of events per window, with the
//! ones turned away counted. For whatever a guest (or a full descriptor
//! table) can make vmlab do in a loop: log lines, new connections.

use std::time::{Duration, Instant};

/// At most `burst` events per `window`; a window starts at the first
/// event after the previous one ended. Single-threaded: the owner holds it.
#[derive(Debug)]
pub struct RateWindow {
    burst: u32,
    window: Duration,
    started: Option<Instant>,
    admitted: u32,
    /// Turned away since the last admitted event.
    suppressed: u64,
}

impl RateWindow {
    pub const fn new(burst: u32, window: Duration) -> Self {
        RateWindow {
            burst,
            window,
            started: None,
            admitted: 0,
            suppressed: 0,
        }
    }

    /// Decides on an event at `now`: `Some(n)` admits it (`n` events were
    /// turned away since the last admitted one), `None` turns it away.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let expired = self
            .started
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            self.started = Some(now);
            self.admitted = 0;
        }
        if self.admitted < self.burst {
            self.admitted += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_and_the_rest_counted() {
        let mut r = RateWindow::new(2, Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(r.admit(t), Some(0));
        assert_eq!(r.admit(t), Some(0));
        assert_eq!(r.admit(t + Duration::from_millis(500)), None);
        assert_eq!(r.admit(t + Duration::from_millis(900)), None);
        assert_eq!(r.admit(t + Duration::from_secs(1)), Some(2));
        assert_eq!(r.admit(t + Duration::from_secs(1)), Some(0));
        assert_eq!(r.admit(t + Duration::from_secs(1)), None);
    }
}
