//! Writing to standard output without `print!`, which panics when stdout is
//! a pipe whose reader went away (`vmlab disk info IMG | head -1`: Rust
//! ignores SIGPIPE, so the write fails with EPIPE). A closed stdout is
//! [`StdoutError::Closed`], on which the command stops quietly, as Unix
//! tools do.

use std::io::{ErrorKind, Write};

#[derive(Debug, thiserror::Error)]
pub enum StdoutError {
    /// Nobody reads any more: not a failure of the command.
    #[error("standard output is closed")]
    Closed,
    #[error("cannot write to standard output: {0}")]
    Io(#[source] std::io::Error),
}

impl From<std::io::Error> for StdoutError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == ErrorKind::BrokenPipe {
            StdoutError::Closed
        } else {
            StdoutError::Io(e)
        }
    }
}

/// Writes `text` to stdout and flushes it.
pub fn print(text: std::fmt::Arguments) -> Result<(), StdoutError> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(text)?;
    out.flush()?;
    Ok(())
}

/// Whether `error` (anywhere in its chain) is a closed stdout.
pub fn is_closed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if matches!(e.downcast_ref::<StdoutError>(), Some(StdoutError::Closed)) {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_pipe_is_closed_and_other_errors_are_not() {
        let closed = StdoutError::from(std::io::Error::from(ErrorKind::BrokenPipe));
        assert!(matches!(closed, StdoutError::Closed));
        assert!(is_closed(&closed));
        let full = StdoutError::from(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(full, StdoutError::Io(_)));
        assert!(!is_closed(&full));
    }
}
