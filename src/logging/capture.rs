//! For tests: the log lines the current thread emits through the `log`
//! facade (rate-limited macros included), without touching other tests'
//! threads.

use std::cell::RefCell;
use std::sync::Once;

use log::{Log, Metadata, Record};

thread_local! {
    static LINES: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

struct Capture;

impl Log for Capture {
    fn enabled(&self, _metadata: &Metadata<'_>) -> bool {
        LINES.with(|lines| lines.borrow().is_some())
    }

    fn log(&self, record: &Record<'_>) {
        LINES.with(|lines| {
            if let Some(lines) = lines.borrow_mut().as_mut() {
                lines.push(format!("{} {}", record.level(), record.args()));
            }
        });
    }

    fn flush(&self) {}
}

/// Runs `f` and returns what it logged on this thread, every level.
pub fn lines(f: impl FnOnce()) -> Vec<String> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&Capture).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    });
    LINES.with(|lines| *lines.borrow_mut() = Some(Vec::new()));
    f();
    LINES.with(|lines| lines.borrow_mut().take().unwrap_or_default())
}
