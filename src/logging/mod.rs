//! vmlab's log: env_logger's format and filters (`-v`, `VMLAB_LOG`), written
//! to stderr or, for a VM in the background, to its capped `vmm.log`
//! ([`RotatingFile`]), with a rate limit on what other crates log.
//!
//! A guest can make log lines happen in a loop. vmlab's own call sites that
//! a guest reaches use [`warn_limited!`](crate::warn_limited) and friends;
//! lines from the crates underneath (virtio-queue's error lines about a
//! broken ring, say) cannot, so the logger limits each of their call sites
//! itself, with the same budget.

#[cfg(test)]
pub mod capture;
mod rotating_file;

use std::collections::HashMap;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

use crate::rate_limit::{Admission, RateLimit};
pub use rotating_file::RotatingFile;

/// Foreign call sites tracked one by one; any beyond share one limit.
const MAX_FOREIGN_SITES: usize = 256;

/// Installs the logger: `level` unless `VMLAB_LOG` says otherwise, to
/// `file` if given, else to stderr.
pub fn init(level: LevelFilter, file: Option<RotatingFile>) {
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(level)
        .format_timestamp_millis()
        .parse_env("VMLAB_LOG");
    if let Some(file) = file {
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    let inner = builder.build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(LimitedLogger::new(inner))).is_ok() {
        log::set_max_level(max);
    }
}

/// Whether `target` is one of vmlab's own modules (the library's or the
/// binary's), whose guest-reachable call sites limit themselves.
fn is_ours(target: &str) -> bool {
    target == "vmlab" || target.starts_with("vmlab::")
}

/// An env_logger that rate-limits the call sites of other crates.
struct LimitedLogger<L> {
    inner: L,
    foreign: Mutex<ForeignSites>,
}

#[derive(Default)]
struct ForeignSites {
    sites: HashMap<(String, u32), RateLimit>,
    overflow: Option<RateLimit>,
}

impl<L: Log> LimitedLogger<L> {
    fn new(inner: L) -> Self {
        LimitedLogger {
            inner,
            foreign: Mutex::new(ForeignSites::default()),
        }
    }

    fn admit_foreign(&self, record: &Record<'_>) -> Admission {
        let mut foreign = self.foreign.lock().unwrap_or_else(|p| p.into_inner());
        let key = (record.target().to_string(), record.line().unwrap_or(0));
        if !foreign.sites.contains_key(&key) && foreign.sites.len() >= MAX_FOREIGN_SITES {
            return foreign
                .overflow
                .get_or_insert_with(RateLimit::for_log)
                .admit();
        }
        foreign
            .sites
            .entry(key)
            .or_insert_with(RateLimit::for_log)
            .admit()
    }
}

impl<L: Log> Log for LimitedLogger<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if is_ours(record.target()) || !self.inner.enabled(record.metadata()) {
            self.inner.log(record);
            return;
        }
        match self.admit_foreign(record) {
            Admission::Admitted { suppressed: 0 } => self.inner.log(record),
            Admission::Admitted { suppressed } => self.inner.log(
                &Record::builder()
                    .metadata(record.metadata().clone())
                    .args(format_args!(
                        "{} ({suppressed} more like it suppressed)",
                        record.args()
                    ))
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
            Admission::Suppressed => {}
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A `Write` into a buffer the test keeps.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logger() -> (LimitedLogger<env_logger::Logger>, Shared) {
        let out = Shared::default();
        let inner = env_logger::Builder::new()
            .filter_level(LevelFilter::Info)
            .target(env_logger::Target::Pipe(Box::new(out.clone())))
            .build();
        (LimitedLogger::new(inner), out)
    }

    fn emit(logger: &impl Log, target: &str, line: u32, text: &str) {
        logger.log(
            &Record::builder()
                .level(log::Level::Error)
                .target(target)
                .line(Some(line))
                .args(format_args!("{text}"))
                .build(),
        );
    }

    fn lines(out: &Shared) -> Vec<String> {
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn each_foreign_call_site_gets_the_log_budget() {
        let (logger, out) = logger();
        for _ in 0..100 {
            emit(&logger, "virtio_queue::queue", 573, "Iterator error");
            emit(
                &logger,
                "virtio_queue::queue",
                448,
                "out of bounds descriptor",
            );
        }
        let lines = lines(&out);
        let burst = crate::rate_limit::LOG_BURST as usize;
        assert_eq!(lines.len(), 2 * burst, "{lines:#?}");
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("Iterator error"))
                .count(),
            burst
        );
    }

    #[test]
    fn vmlab_lines_pass_untouched_and_disabled_levels_cost_no_budget() {
        let (logger, out) = logger();
        for _ in 0..100 {
            emit(&logger, "vmlab::devices::virtio::mmio", 1, "ours");
            logger.log(
                &Record::builder()
                    .level(log::Level::Debug)
                    .target("virtio_queue::chain")
                    .args(format_args!("debug, filtered out"))
                    .build(),
            );
        }
        emit(&logger, "virtio_queue::chain", 9, "foreign");
        let lines = lines(&out);
        assert_eq!(lines.len(), 101);
        assert!(lines[100].contains("foreign"));
    }

    #[test]
    fn many_foreign_call_sites_share_one_overflow_budget() {
        let (logger, out) = logger();
        for line in 0..(MAX_FOREIGN_SITES as u32 + 100) {
            emit(&logger, "other_crate", line, "site");
        }
        let burst = crate::rate_limit::LOG_BURST as usize;
        assert_eq!(lines(&out).len(), MAX_FOREIGN_SITES + burst);
    }
}
