//! The control socket's protocol: the client sends one JSON request on one
//! line, the VM answers with one JSON line. After a `console` answer the
//! connection carries raw bytes both ways (guest output to the client,
//! keystrokes to the guest) until either side closes it.

use std::io::BufRead;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cli::ForwardRule;
use crate::net::NatSnapshot;

/// Longest request or answer line read; anything longer is refused, not
/// buffered without bound.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Name, pid, state, uptime and forwards.
    Status,
    /// Press the ACPI power button; the guest powers off in its own time.
    Stop,
    /// Attach to the serial console.
    Console,
    /// The NAT's flow table, forwards and counters.
    Nat,
    /// A live snapshot's switch: each path is one of the VM's disks, where a
    /// new overlay over the image the VM has open now lies. Pause the guest,
    /// drain and flush those disks, switch them to their overlays, resume.
    /// All or nothing: an error answer means no disk switched.
    SnapshotDisks { disks: Vec<PathBuf> },
    /// Save the whole VM (memory and devices) to `path` and end it; the
    /// answer comes once the state is durable.
    Suspend { path: PathBuf },
    /// A full snapshot: in one pause, save the whole VM to `state` and
    /// switch `disks` as `SnapshotDisks` does; the guest runs on. All or
    /// nothing: an error answer means no disk switched and no state file.
    SnapshotFull { disks: Vec<PathBuf>, state: PathBuf },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Response {
    Status(VmStatus),
    /// The power button was pressed.
    Stopping,
    /// Raw console bytes follow.
    Console,
    /// `nat` is None for a VM without a network card.
    Nat {
        nat: Option<NatSnapshot>,
    },
    /// Every disk asked for switched; the guest stood still this long.
    DisksSwitched {
        paused_us: u64,
    },
    /// The VM is saved and ends now.
    Suspended {
        ram_bytes: u64,
        written_bytes: u64,
        file_bytes: u64,
        took_us: u64,
    },
    /// A full snapshot was taken; the guest stood still `paused_us`.
    FullSnapshotTaken {
        paused_us: u64,
        ram_bytes: u64,
        written_bytes: u64,
        file_bytes: u64,
    },
    Error {
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub pid: u32,
    /// "running", or "stopping" once the power button was pressed.
    pub state: String,
    pub uptime_secs: u64,
    pub forwards: Vec<ForwardRule>,
    /// Control connections the VM failed to accept (out of descriptors).
    #[serde(default)]
    pub accept_errors: u64,
}

/// Serializes one message as a line.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("protocol types always serialize");
    line.push(b'\n');
    line
}

/// Why a control message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("cannot read from the control socket: {0}")]
    Read(#[source] std::io::Error),
    #[error("the control socket closed without an answer")]
    Closed,
    #[error("the control socket closed in the middle of a message")]
    Truncated,
    #[error("control message longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("malformed control message: {0}")]
    Malformed(#[source] serde_json::Error),
}

/// Reads one line and parses it; errors are worded for the user.
pub fn read_message<T: for<'de> Deserialize<'de>>(
    reader: &mut impl BufRead,
) -> Result<T, MessageError> {
    let mut line = Vec::new();
    let read = std::io::Read::take(&mut *reader, MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(MessageError::Read)?;
    if read == 0 {
        return Err(MessageError::Closed);
    }
    if line.last() != Some(&b'\n') {
        return Err(if line.len() > MAX_LINE {
            MessageError::TooLong
        } else {
            MessageError::Truncated
        });
    }
    serde_json::from_slice(&line).map_err(MessageError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn round_trip<T>(message: &T) -> T
    where
        T: Serialize + for<'de> Deserialize<'de>,
    {
        let bytes = encode(message);
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
        read_message(&mut Cursor::new(bytes)).unwrap()
    }

    #[test]
    fn requests_are_one_json_line_each() {
        for request in [
            Request::Status,
            Request::Stop,
            Request::Console,
            Request::Nat,
            Request::SnapshotDisks {
                disks: vec!["/v/vm1/disk.qcow2".into()],
            },
            Request::SnapshotFull {
                disks: vec!["/v/vm1/disk.qcow2".into()],
                state: "/v/vm1/warm.state".into(),
            },
        ] {
            assert_eq!(round_trip(&request), request);
        }
        assert_eq!(encode(&Request::Stop), b"{\"request\":\"stop\"}\n");
    }

    #[test]
    fn answers_round_trip() {
        let status = Response::Status(VmStatus {
            name: "vm1".into(),
            pid: 42,
            state: "running".into(),
            uptime_secs: 7,
            forwards: vec!["tcp:127.0.0.1:2222:22".parse().unwrap()],
            accept_errors: 0,
        });
        let error = Response::Error {
            message: "no".into(),
        };
        let switched = Response::DisksSwitched { paused_us: 1234 };
        for answer in [
            status,
            error,
            switched,
            Response::FullSnapshotTaken {
                paused_us: 1,
                ram_bytes: 2,
                written_bytes: 3,
                file_bytes: 4,
            },
            Response::Stopping,
            Response::Console,
        ] {
            assert_eq!(round_trip(&answer), answer);
        }
    }

    #[test]
    fn nat_answers_carry_the_snapshot_as_it_is() {
        let snapshot = NatSnapshot {
            forwards: vec!["tcp:2222:22".parse().unwrap()],
            ..NatSnapshot::default()
        };
        for nat in [Some(snapshot), None] {
            let answer = Response::Nat { nat };
            assert_eq!(round_trip(&answer), answer);
        }
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let cases: [&[u8]; 5] = [
            b"",
            b"{\"request\":\"status\"}",
            b"{\"request\":\"reboot\"}\n",
            b"\xff\xfe\n",
            b"[1,2,3]\n",
        ];
        for bytes in cases {
            assert!(
                read_message::<Request>(&mut Cursor::new(bytes)).is_err(),
                "{bytes:?}"
            );
        }
        let mut long = vec![b' '; MAX_LINE + 10];
        long.push(b'\n');
        let err = read_message::<Request>(&mut Cursor::new(long)).unwrap_err();
        assert!(matches!(err, MessageError::TooLong), "{err}");
    }
}
