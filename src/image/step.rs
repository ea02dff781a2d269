//! Runs one recipe script, showing its progress, and returns the path it
//! prints on its last line. A script that cannot do its work on this host
//! (no apt, Debian's archive unreachable) says why on its last line of
//! stderr and exits with status [`REFUSED`]: that line is the whole error.

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::ImageError;

/// How many lines of a failed step's output to show.
const TAIL_LINES: usize = 15;
/// The exit status of a recipe refusing in one line (see the module doc):
/// sysexits' EX_UNAVAILABLE.
pub const REFUSED: i32 = 69;

/// Runs `script` with `args`; `what` names the result for the user.
pub fn run_step(what: &str, script: &Path, args: &[&str]) -> Result<String, ImageError> {
    run_step_as("building", what, script, args)
}

/// [`run_step`] for a script that does something other than build
/// (`verb`: "fetching").
pub fn run_step_as(
    verb: &str,
    what: &str,
    script: &Path,
    args: &[&str],
) -> Result<String, ImageError> {
    let mut child = Command::new("bash")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Io {
            what: format!("cannot run {}", script.display()),
            source,
        })?;

    // stdout carries only the result path; read it on its own thread so
    // neither pipe can fill up and stall the script.
    let stdout = child.stdout.take().expect("piped stdout");
    let result =
        std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).last());

    let interactive = std::io::stderr().is_terminal();
    let bar = if interactive {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed}] {prefix}: {wide_msg}")
                .expect("valid template"),
        );
        bar.set_prefix(format!("{verb} {what}"));
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(bar)
    } else {
        eprintln!("vmlab: {verb} {what}");
        None
    };

    let mut tail: Vec<String> = Vec::new();
    let stderr = child.stderr.take().expect("piped stderr");
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        match &bar {
            Some(bar) => bar.set_message(line.clone()),
            None => eprintln!("vmlab:   {line}"),
        }
        tail.push(line);
        if tail.len() > TAIL_LINES {
            tail.remove(0);
        }
    }
    let status = child.wait().map_err(|source| ImageError::Io {
        what: format!("cannot wait for {}", script.display()),
        source,
    })?;
    let last = result.join().ok().flatten();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if status.code() == Some(REFUSED) {
        if let Some(reason) = tail.last() {
            // The script's own prefix ("vmlab-kernel: ") is noise here.
            let reason = reason.split_once(": ").map_or(reason.as_str(), |(_, r)| r);
            return Err(ImageError::Unavailable {
                step: what.to_string(),
                reason: reason.to_string(),
            });
        }
    }
    if !status.success() {
        return Err(ImageError::StepFailed {
            step: format!("{verb} {what}"),
            status: status.to_string(),
            tail: tail.join("\n"),
        });
    }
    last.filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .ok_or_else(|| ImageError::NoResult {
            step: format!("{verb} {what}"),
        })
}

/// A spinner for a step run in-process (none when stderr is not a
/// terminal: then one line says what is happening).
pub fn spinner(what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        eprintln!("vmlab: {what}");
        return None;
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}").expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

pub fn finish(bar: Option<ProgressBar>) {
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(body: &str) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmlab-step-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("s{n}.sh"));
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn returns_the_last_stdout_line() {
        let s = script("echo progress >&2\necho first\necho /some/result\n");
        assert_eq!(run_step("a thing", &s, &[]).unwrap(), "/some/result");
    }

    #[test]
    fn failure_carries_the_output_tail() {
        let s = script("echo 'compiler exploded' >&2\nexit 3\n");
        let err = run_step("a kernel", &s, &[]).unwrap_err().to_string();
        assert!(err.contains("building a kernel failed"), "{err}");
        assert!(err.contains("compiler exploded"), "{err}");
    }

    #[test]
    fn a_refusal_is_its_last_line_alone() {
        let s = script(
            "echo 'vmlab-kernel: downloading' >&2\necho 'vmlab-kernel: no archive: run apt-get update' >&2\nexit 69\n",
        );
        let err = run_step("Debian's kernel", &s, &[]).unwrap_err();
        assert!(matches!(err, ImageError::Unavailable { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "Debian's kernel: no archive: run apt-get update"
        );
    }

    #[test]
    fn silence_is_an_error() {
        let s = script("true\n");
        assert!(matches!(
            run_step("x", &s, &[]),
            Err(ImageError::NoResult { .. })
        ));
    }
}
