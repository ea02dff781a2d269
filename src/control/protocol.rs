//! The control socket's protocol: the client sends one JSON request on one
//! line, the VM answers with one JSON line. After a `console` answer the
//! connection carries raw bytes both ways (guest output to the client,
//! keystrokes to the guest) until either side closes it.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cli::ForwardRule;
use crate::net::{Counters, FlowInfo};

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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Response {
    Status(VmStatus),
    /// The power button was pressed.
    Stopping,
    /// Raw console bytes follow.
    Console,
    Nat(NatSnapshot),
    /// Every disk asked for switched; the guest stood still this long.
    DisksSwitched {
        paused_us: u64,
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
    /// As typed on the command line: tcp:127.0.0.1:2222:22.
    pub forwards: Vec<String>,
}

/// What `vmlab nat show` prints. `network: false` for a VM without a
/// network card (then the lists are empty).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NatSnapshot {
    pub network: bool,
    pub forwards: Vec<String>,
    pub flows: Vec<NatFlow>,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NatFlow {
    pub protocol: String,
    pub forwarded: bool,
    pub guest: String,
    pub remote: String,
    pub host: String,
    pub state: String,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
    pub age_secs: u64,
    pub idle_secs: u64,
}

impl NatSnapshot {
    /// From a running NAT's `flows()` and `counters()`.
    pub fn from_nat(forwards: &[ForwardRule], flows: &[FlowInfo], counters: &Counters) -> Self {
        let c = counters;
        let counters = [
            ("frames_from_guest", c.frames_from_guest),
            ("frames_to_guest", c.frames_to_guest),
            ("malformed", c.malformed),
            ("bad_checksum", c.bad_checksum),
            ("unsupported", c.unsupported),
            ("dropped_from_guest", c.dropped_from_guest),
            ("dropped_to_guest", c.dropped_to_guest),
            ("tcp_out_of_order", c.tcp_out_of_order),
            ("tcp_retransmits", c.tcp_retransmits),
            ("flows_opened", c.flows_opened),
            ("flows_closed", c.flows_closed),
            ("flows_evicted", c.flows_evicted),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        NatSnapshot {
            network: true,
            forwards: forwards.iter().map(ToString::to_string).collect(),
            flows: flows
                .iter()
                .map(|f| NatFlow {
                    protocol: f.protocol.to_string(),
                    forwarded: f.forwarded,
                    guest: f.guest.to_string(),
                    remote: f.remote.to_string(),
                    host: f.host.to_string(),
                    state: f.state.to_string(),
                    bytes_from_guest: f.bytes_from_guest,
                    bytes_to_guest: f.bytes_to_guest,
                    age_secs: f.age.as_secs(),
                    idle_secs: f.idle.as_secs(),
                })
                .collect(),
            counters,
        }
    }

    /// The text `vmlab nat show` prints.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        if !self.network {
            return "no network card (the VM runs without a NAT)\n".to_string();
        }
        let mut out = String::from("forwards:\n");
        if self.forwards.is_empty() {
            out.push_str("  (none)\n");
        }
        for rule in &self.forwards {
            let _ = writeln!(out, "  {rule}");
        }
        let _ = writeln!(out, "flows: {}", self.flows.len());
        if !self.flows.is_empty() {
            let _ = writeln!(
                out,
                "  {:<8} {:<21} {:<21} {:<21} {:<12} {:>10} {:>10} {:>6}",
                "PROTO", "GUEST", "REMOTE", "HOST", "STATE", "OUT", "IN", "AGE"
            );
        }
        for f in &self.flows {
            let proto = format!("{}{}", f.protocol, if f.forwarded { "/fwd" } else { "" });
            let _ = writeln!(
                out,
                "  {:<8} {:<21} {:<21} {:<21} {:<12} {:>10} {:>10} {:>5}s",
                proto,
                f.guest,
                f.remote,
                f.host,
                f.state,
                f.bytes_from_guest,
                f.bytes_to_guest,
                f.age_secs
            );
        }
        out.push_str("counters:\n");
        for (name, value) in &self.counters {
            let _ = writeln!(out, "  {name} {value}");
        }
        out
    }
}

/// Serializes one message as a line.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("protocol types always serialize");
    line.push(b'\n');
    line
}

/// Reads one line and parses it; errors are worded for the user.
pub fn read_message<T: for<'de> Deserialize<'de>>(reader: &mut impl BufRead) -> Result<T, String> {
    let mut line = Vec::new();
    let read = std::io::Read::take(&mut *reader, MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("cannot read from the control socket: {e}"))?;
    if read == 0 {
        return Err("the control socket closed without an answer".into());
    }
    if line.last() != Some(&b'\n') {
        return Err(if line.len() > MAX_LINE {
            format!("control message longer than {MAX_LINE} bytes")
        } else {
            "the control socket closed in the middle of a message".into()
        });
    }
    serde_json::from_slice(&line).map_err(|e| format!("malformed control message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::net::SocketAddrV4;
    use std::time::Duration;

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
            forwards: vec!["tcp:127.0.0.1:2222:22".into()],
        });
        let error = Response::Error {
            message: "no".into(),
        };
        let switched = Response::DisksSwitched { paused_us: 1234 };
        for answer in [
            status,
            error,
            switched,
            Response::Stopping,
            Response::Console,
        ] {
            assert_eq!(round_trip(&answer), answer);
        }
    }

    #[test]
    fn nat_snapshot_comes_from_the_nat_and_renders() {
        let flow = FlowInfo {
            protocol: crate::net::FlowProtocol::Tcp,
            forwarded: true,
            guest: "10.0.2.15:22".parse::<SocketAddrV4>().unwrap(),
            remote: "10.0.2.2:40000".parse().unwrap(),
            host: "127.0.0.1:40000".parse().unwrap(),
            host_local: None,
            state: "ESTABLISHED",
            bytes_from_guest: 100,
            bytes_to_guest: 200,
            age: Duration::from_secs(3),
            idle: Duration::from_secs(1),
        };
        let counters = Counters {
            flows_opened: 1,
            ..Counters::default()
        };
        let rule: ForwardRule = "tcp:2222:22".parse().unwrap();
        let snapshot = NatSnapshot::from_nat(&[rule], &[flow], &counters);
        assert_eq!(
            round_trip(&Response::Nat(snapshot.clone())),
            Response::Nat(snapshot.clone())
        );
        let text = snapshot.render();
        assert!(text.contains("tcp:127.0.0.1:2222:22"), "{text}");
        assert!(text.contains("tcp/fwd"), "{text}");
        assert!(text.contains("ESTABLISHED"), "{text}");
        assert!(text.contains("flows_opened 1"), "{text}");
        assert!(NatSnapshot::default().render().contains("no network card"));
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
        assert!(err.contains("longer"), "{err}");
    }
}
