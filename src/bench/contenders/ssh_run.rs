//! One ssh-ready sample's server (a VMM, or a container runtime) run from
//! its spawn to the first successful `ssh true`, then stopped: the times
//! it was started, wrote its first byte on stdout (the boot-timer marker,
//! when stdout is piped) and answered ssh.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::ssh_probe::SshProbe;
use crate::bench::contender::SampleError;
use crate::bench::process::{first_byte_time, log_tails, wait_with_limit, SAMPLE_TIMEOUT};
use crate::vmm::boot_timer::monotonic_now;

/// How long a server may take to stop once asked (a VM's orderly end
/// under CPU emulation takes seconds).
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// A log file for a server's output, created empty.
pub fn log_file(path: &Path) -> Result<File, SampleError> {
    File::create(path)
        .map_err(|e| SampleError::new(format!("cannot create {}: {e}", path.display())))
}

/// When things happened in one run.
#[derive(Clone, Copy, Debug)]
pub struct SshRunTimes {
    pub start: Instant,
    /// CLOCK_MONOTONIC at `start`, to compare with a VMM's own report.
    pub start_monotonic: Duration,
    /// The first byte on the server's stdout, when it was piped.
    pub first_byte: Option<Instant>,
    pub ready: Instant,
}

impl SshRunTimes {
    /// From start to ssh-ready.
    pub fn total(&self) -> Duration {
        self.ready - self.start
    }

    /// The two phases split at the first byte on stdout (the boot-timer
    /// marker): start to init, init to ssh-ready. `marker` says what the
    /// byte is, for the error when it never came.
    pub fn split_at_marker(&self, what: &str, marker: &str) -> Result<Vec<Duration>, SampleError> {
        let at = self.first_byte.ok_or_else(|| {
            SampleError::new(format!("{what} answered ssh without {marker} first"))
        })?;
        Ok(vec![
            at - self.start,
            self.ready.saturating_duration_since(at),
        ])
    }
}

/// A server to bring to ssh-ready.
pub struct SshRun<'a> {
    /// Who serves ("vmlab", "QEMU", "runc").
    pub what: &'static str,
    pub probe: &'a SshProbe,
    /// Logs quoted when the sample fails (the server's stderr, a console).
    pub logs: Vec<PathBuf>,
}

impl SshRun<'_> {
    /// Spawns `command` (its stdio set by the caller; a piped stdout is
    /// timestamped at its first byte), waits until ssh answers, then asks
    /// the server to stop with `stop` and waits for its end (killing it
    /// past a limit). The sample fails when ssh never answers within
    /// [`SAMPLE_TIMEOUT`] or the server does not stop.
    pub fn run(
        &self,
        mut command: Command,
        stop: impl FnOnce(&mut Child),
    ) -> Result<SshRunTimes, SampleError> {
        let what = self.what;
        let start_monotonic = monotonic_now();
        let start = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| SampleError::new(format!("cannot start {what}: {e}")))?;
        let first = child.stdout.take().map(first_byte_time);
        let ready = self
            .probe
            .wait_ready(&mut child, what, start + SAMPLE_TIMEOUT);
        if ready.is_ok() {
            stop(&mut child);
        }
        // After a failure, or when asked and not stopping: killed.
        let ended = match ready {
            Ok(_) => wait_with_limit(&mut child, what, STOP_LIMIT).map(drop),
            Err(_) => {
                let _ = child.kill();
                child
                    .wait()
                    .map(drop)
                    .map_err(|e| SampleError::new(format!("cannot wait for {what}: {e}")))
            }
        };
        let logs = || {
            let paths: Vec<_> = self.logs.iter().map(PathBuf::as_path).collect();
            log_tails(&paths)
        };
        let ready = ready.map_err(|e| e.with_details(logs()))?;
        ended.map_err(|e| {
            SampleError::new(format!("{what} answered ssh, then would not stop: {e}"))
                .with_details(logs())
        })?;
        let first_byte = first
            .and_then(|rx| rx.recv_timeout(Duration::from_secs(5)).ok())
            .map(|(at, _)| at);
        Ok(SshRunTimes {
            start,
            start_monotonic,
            first_byte,
            ready,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::scratch::ScratchFile;
    use super::*;
    use std::process::Stdio;

    /// A fake ssh that succeeds once `flag` exists.
    fn fake_probe(dir: &std::path::Path) -> (SshProbe, PathBuf) {
        let flag = dir.join("up");
        let fake = dir.join("fake-ssh");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\n[ -e {} ] || exit 255\n", flag.display()),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let probe = SshProbe {
            ssh: fake,
            key: dir.join("key"),
            port: 1,
            known_hosts: ScratchFile(dir.join("known_hosts")),
        };
        (probe, flag)
    }

    #[test]
    fn times_marker_and_ssh_then_stops_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let (probe, flag) = fake_probe(dir.path());
        // The "server": writes its marker, comes up 300 ms later, and ends
        // only when told (SIGTERM from `stop`).
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "sleep 0.1; printf U; sleep 0.3; touch {}; exec sleep 60",
                flag.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let run = SshRun {
            what: "sh",
            probe: &probe,
            logs: Vec::new(),
        };
        let mut stopped = false;
        let times = run
            .run(command, |child| {
                stopped = true;
                let _ = child.kill();
            })
            .unwrap();
        assert!(stopped);
        let phases = times.split_at_marker("sh", "its marker").unwrap();
        assert!(phases[0] >= Duration::from_millis(100), "{phases:?}");
        assert!(phases[1] >= Duration::from_millis(300), "{phases:?}");
        assert_eq!(phases[0] + phases[1], times.total());
    }

    #[test]
    fn a_server_that_dies_fails_the_sample_with_its_logs() {
        let dir = tempfile::tempdir().unwrap();
        let (probe, _flag) = fake_probe(dir.path());
        let log = dir.path().join("server.stderr");
        let mut command = Command::new("sh");
        command
            .args(["-c", "echo 'cannot bind the port' >&2; exit 1"])
            .stdin(Stdio::null())
            .stderr(log_file(&log).unwrap());
        let run = SshRun {
            what: "the VMM",
            probe: &probe,
            logs: vec![log],
        };
        let err = run
            .run(command, |_| panic!("not stopped: it never came up"))
            .unwrap_err();
        assert!(err.what.starts_with("the VMM ended"), "{err}");
        assert!(
            err.details.contains("cannot bind the port"),
            "{}",
            err.details
        );
    }

    #[test]
    fn no_marker_is_an_error_when_phases_are_asked_for() {
        let now = Instant::now();
        let times = SshRunTimes {
            start: now,
            start_monotonic: Duration::ZERO,
            first_byte: None,
            ready: now,
        };
        let err = times
            .split_at_marker("QEMU", "the boot-timer byte")
            .unwrap_err();
        assert!(err.what.contains("without the boot-timer byte"), "{err}");
    }
}
