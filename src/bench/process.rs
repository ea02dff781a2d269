//! Running a contender's program once: finding it, timing the first byte
//! it writes on stdout (the boot-timer marker that QEMU's debug console and
//! a container's init write there), waiting with a time limit, and quoting
//! its logs when it fails.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use super::contender::SampleError;

/// How long one boot may take. Generous: under CPU emulation (the test
/// rig) a nested guest boot takes around ten seconds.
pub const SAMPLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Lines of a log quoted when a sample fails.
const TAIL_LINES: usize = 15;

/// The first `name` found on PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Reads `stdout` to its end on a thread; the receiver gets the moment its
/// first byte arrived (nothing if it never came).
pub fn first_byte_time(mut stdout: ChildStdout) -> Receiver<(Instant, u8)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut byte = [0u8; 1];
        if let Ok(1) = stdout.read(&mut byte) {
            let _ = tx.send((Instant::now(), byte[0]));
            let mut rest = Vec::new();
            let _ = stdout.read_to_end(&mut rest);
        }
    });
    rx
}

/// Waits for `child` to exit, killing it after `limit`.
pub fn wait_with_limit(
    child: &mut Child,
    what: &str,
    limit: Duration,
) -> Result<ExitStatus, SampleError> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if start.elapsed() >= limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SampleError::new(format!(
                    "{what} did not finish within {} s and was killed",
                    limit.as_secs()
                )));
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(SampleError::new(format!("cannot wait for {what}: {e}"))),
        }
    }
}

/// The last lines of the text file at `path`, headed by its name, for
/// failure details (empty when there is nothing to show).
pub fn log_tail(path: &Path) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "--- last lines of {} ---\n{}\n",
        path.display(),
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    )
}

/// Tails of several logs, one after the other.
pub fn log_tails(paths: &[&Path]) -> String {
    paths.iter().map(|p| log_tail(p)).collect()
}

/// One run of a peer timed from its start to the first byte on its stdout.
pub struct MarkerRun {
    /// Who runs ("QEMU").
    pub what: &'static str,
    /// What the first byte means, for errors.
    pub marker: &'static str,
    /// Where its stderr goes (quoted when it fails).
    pub stderr: PathBuf,
    /// Further logs to quote when it fails (e.g. a guest console).
    pub logs: Vec<PathBuf>,
}

impl MarkerRun {
    /// Runs `command` (stdin empty) to its end; the time from its start to
    /// its first byte on stdout. The run must also end successfully.
    /// `on_timeout` cleans up what killing the program leaves behind.
    pub fn run(
        &self,
        mut command: Command,
        on_timeout: impl FnOnce(),
    ) -> Result<Duration, SampleError> {
        let what = self.what;
        let err = File::create(&self.stderr).map_err(|e| {
            SampleError::new(format!("cannot create {}: {e}", self.stderr.display()))
        })?;
        let start = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| SampleError::new(format!("cannot start {what}: {e}")))?;
        let first = first_byte_time(child.stdout.take().expect("stdout is piped"));
        let status = wait_with_limit(&mut child, what, SAMPLE_TIMEOUT);
        let logs = || {
            let mut paths = vec![self.stderr.as_path()];
            paths.extend(self.logs.iter().map(PathBuf::as_path));
            log_tails(&paths)
        };
        let status = status.map_err(|e| {
            on_timeout();
            e.with_details(logs())
        })?;
        let Ok((at, _)) = first.recv_timeout(Duration::from_secs(5)) else {
            return Err(SampleError::new(format!(
                "{what} ended ({status}) without {}",
                self.marker
            ))
            .with_details(logs()));
        };
        if !status.success() {
            return Err(
                SampleError::new(format!("{what} failed after {}: {status}", self.marker))
                    .with_details(logs()),
            );
        }
        Ok(at.duration_since(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn finds_a_program_on_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("vmlab-no-such-program").is_none());
    }

    #[test]
    fn times_the_first_byte_and_drains_the_rest() {
        let start = Instant::now();
        let mut child = Command::new("sh")
            .args(["-c", "sleep 0.05; printf 'Urest of it'"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = first_byte_time(child.stdout.take().unwrap());
        let status = wait_with_limit(&mut child, "sh", Duration::from_secs(10)).unwrap();
        assert!(status.success());
        let (at, byte) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(byte, b'U');
        assert!(at.duration_since(start) >= Duration::from_millis(50));
    }

    #[test]
    fn silent_child_sends_no_time() {
        let mut child = Command::new("true").stdout(Stdio::piped()).spawn().unwrap();
        let rx = first_byte_time(child.stdout.take().unwrap());
        wait_with_limit(&mut child, "true", Duration::from_secs(10)).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_err());
    }

    #[test]
    fn marker_run_times_the_first_byte_and_checks_the_end() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmlab-marker").unwrap();
        let run = MarkerRun {
            what: "sh",
            marker: "the marker",
            stderr: dir.as_path().join("sh.stderr"),
            logs: Vec::new(),
        };
        let mut ok = Command::new("sh");
        ok.args(["-c", "sleep 0.02; printf U; sleep 0.02"]);
        let t = run.run(ok, || {}).unwrap();
        assert!(t >= Duration::from_millis(20), "{t:?}");

        let mut silent = Command::new("sh");
        silent.args(["-c", "echo oops >&2"]);
        let err = run.run(silent, || {}).unwrap_err();
        assert!(err.what.contains("without the marker"), "{err}");
        assert!(err.details.contains("oops"), "{}", err.details);

        let mut failing = Command::new("sh");
        failing.args(["-c", "printf U; exit 3"]);
        let err = run.run(failing, || {}).unwrap_err();
        assert!(err.what.contains("failed after the marker"), "{err}");
    }

    #[test]
    fn kills_a_child_over_its_limit() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let err = wait_with_limit(&mut child, "sleep", Duration::from_millis(50)).unwrap_err();
        assert!(err.what.contains("killed"), "{err}");
        assert!(child.try_wait().unwrap().is_some());
    }
}
