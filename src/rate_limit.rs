//! Limits on how often something may happen, for whatever a guest can make
//! vmlab do over and over: a log line first of all (a hostile driver must not
//! fill the host's disk with warnings), but also any other event a caller
//! counts, such as new connections.
//!
//! A [`RateLimit`] admits a burst of events per window and counts the ones it
//! turns away, so the next admitted log line can say how many were
//! suppressed. [`log_limited!`](crate::log_limited) and its level shorthands
//! give each call site a limit of its own.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `burst` events per `window`; the window starts at the first
/// event after the previous one ended.
pub struct RateLimit {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

struct Window {
    started: Option<Instant>,
    admitted: u32,
    /// Events turned away since the last admitted one.
    suppressed: u64,
}

/// What [`RateLimit::admit`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead; this many events were turned away since the last admitted one.
    Admitted { suppressed: u64 },
    /// Over the limit: drop the event (it is counted).
    Suppressed,
}

impl Admission {
    /// `Some(suppressed)` when admitted, for callers that only branch on it.
    pub fn admitted(self) -> Option<u64> {
        match self {
            Admission::Admitted { suppressed } => Some(suppressed),
            Admission::Suppressed => None,
        }
    }
}

/// Lines per window and the window of every rate-limited log call site: a
/// guest that triggers one line in a loop gets 10 lines a minute into
/// `vmm.log`, the first 10 of them at once.
pub const LOG_BURST: u32 = 10;
pub const LOG_WINDOW: Duration = Duration::from_secs(60);

impl RateLimit {
    pub const fn new(burst: u32, window: Duration) -> Self {
        RateLimit {
            burst,
            window,
            state: Mutex::new(Window {
                started: None,
                admitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// The limit of a log call site.
    pub const fn for_log() -> Self {
        Self::new(LOG_BURST, LOG_WINDOW)
    }

    /// Decides on an event happening now.
    pub fn admit(&self) -> Admission {
        self.admit_at(Instant::now())
    }

    /// Decides on an event happening at `now` (monotonic; callers with a
    /// clock of their own, and tests, pass it).
    pub fn admit_at(&self, now: Instant) -> Admission {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let expired = w
            .started
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            w.started = Some(now);
            w.admitted = 0;
        }
        if w.admitted < self.burst {
            w.admitted += 1;
            let suppressed = std::mem::take(&mut w.suppressed);
            Admission::Admitted { suppressed }
        } else {
            w.suppressed += 1;
            Admission::Suppressed
        }
    }
}

/// Logs like `log::log!` at most [`LOG_BURST`] times per [`LOG_WINDOW`] from
/// this call site; the next line after a pause says how many were dropped.
/// For every line a guest can trigger.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::rate_limit::RateLimit = $crate::rate_limit::RateLimit::for_log();
        let level = $level;
        if ::log::log_enabled!(level) {
            match LIMIT.admit() {
                $crate::rate_limit::Admission::Admitted { suppressed: 0 } => {
                    ::log::log!(level, $($arg)+)
                }
                $crate::rate_limit::Admission::Admitted { suppressed } => ::log::log!(
                    level,
                    "{} ({suppressed} more like it suppressed)",
                    format_args!($($arg)+)
                ),
                $crate::rate_limit::Admission::Suppressed => {}
            }
        }
    }};
}

/// [`log_limited!`](crate::log_limited) at warn level.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!(::log::Level::Warn, $($arg)+) };
}

/// [`log_limited!`](crate::log_limited) at info level.
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => { $crate::log_limited!(::log::Level::Info, $($arg)+) };
}

/// [`log_limited!`](crate::log_limited) at debug level.
#[macro_export]
macro_rules! debug_limited {
    ($($arg:tt)+) => { $crate::log_limited!(::log::Level::Debug, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_events_are_counted_until_the_window_ends() {
        let limit = RateLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limit.admit_at(t0), Admission::Admitted { suppressed: 0 });
        }
        for i in 1..=5 {
            let at = t0 + Duration::from_secs(i);
            assert_eq!(limit.admit_at(at), Admission::Suppressed);
        }
        let later = t0 + Duration::from_secs(10);
        assert_eq!(limit.admit_at(later), Admission::Admitted { suppressed: 5 });
        assert_eq!(limit.admit_at(later), Admission::Admitted { suppressed: 0 });
    }

    #[test]
    fn a_steady_flood_gets_the_burst_per_window() {
        let limit = RateLimit::new(10, Duration::from_secs(60));
        let t0 = Instant::now();
        // One event every 10 ms for ten minutes.
        let admitted = (0..60_000u64)
            .filter(|i| {
                let at = t0 + Duration::from_millis(i * 10);
                matches!(limit.admit_at(at), Admission::Admitted { .. })
            })
            .count();
        assert_eq!(admitted, 100);
    }

    #[test]
    fn a_call_site_logs_its_burst_then_is_quiet() {
        let lines = crate::logging::capture::lines(|| {
            for i in 0..25 {
                crate::warn_limited!("hostile driver line {i}");
            }
        });
        assert_eq!(lines.len(), LOG_BURST as usize, "{lines:#?}");
        assert_eq!(lines[0], "WARN hostile driver line 0");
    }

    #[test]
    fn call_sites_have_budgets_of_their_own() {
        let lines = crate::logging::capture::lines(|| {
            for _ in 0..25 {
                crate::debug_limited!("one");
                crate::info_limited!("two");
            }
        });
        assert_eq!(lines.len(), 2 * LOG_BURST as usize, "{lines:#?}");
    }
}
